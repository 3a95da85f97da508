//! The etcd connection (TLS, user/password) and bounded, paginated reads.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
};

use super::config::Settings;
use super::keys::prefix_end;

/// No single etcd call may hang the agent's loops longer than this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per page when listing a prefix.
pub const PAGE_SIZE: i64 = 500;

/// Run one etcd call with the call timeout.
pub async fn bounded<T>(
    call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(anyhow::Error::from),
        Err(_) => anyhow::bail!("etcd did not answer within {CALL_TIMEOUT:?}"),
    }
}

/// Client options from the flags; every mistake here is fatal (retrying cannot fix it).
pub fn options(settings: &Settings) -> Result<ConnectOptions> {
    let https = settings
        .etcd_endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    anyhow::ensure!(
        https == 0 || https == settings.etcd_endpoints.len(),
        "--etcd-endpoints mixes http:// and https:// URLs"
    );
    anyhow::ensure!(
        settings
            .etcd_endpoints
            .iter()
            .all(|e| e.starts_with("http://") || e.starts_with("https://")),
        "--etcd-endpoints must be http:// or https:// URLs"
    );
    anyhow::ensure!(
        (https > 0) == settings.etcd_ca.is_some(),
        "https:// etcd endpoints need --etcd-ca, and --etcd-ca needs https:// endpoints"
    );
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(ca) = &settings.etcd_ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(
            std::fs::read(ca).with_context(|| format!("reading --etcd-ca {}", ca.display()))?,
        ));
        if let (Some(cert), Some(key)) = (&settings.etcd_cert, &settings.etcd_key) {
            let cert = std::fs::read(cert)
                .with_context(|| format!("reading --etcd-cert {}", cert.display()))?;
            let key = std::fs::read(key)
                .with_context(|| format!("reading --etcd-key {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    if let Some(user) = &settings.etcd_user {
        let password = match &settings.etcd_password_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading --etcd-password-file {}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => String::new(),
        };
        // Tokens expire (and all of them die with an etcd restart): authenticate again.
        options = options
            .with_user(user.clone(), password)
            .with_auto_token_refresh(true);
    }
    Ok(options)
}

/// Whether this connection may write keys outside any node's own prefixes: etcd's auth is off,
/// or the credential is shared or an administrator's. Either way a node could speak for every
/// other. Asked with a transaction whose put never runs (its compare is never true): etcd
/// checks the permissions of both branches before it evaluates the compare.
pub async fn writes_beyond_own_keys(client: &mut Client) -> Result<bool> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let probe = format!("{}.permission-probe", super::keys::ROOT);
    let txn = Txn::new()
        .when([Compare::version(probe.clone(), CompareOp::Less, 0)])
        .and_then([TxnOp::put(probe, "", None)]);
    match bounded(client.txn(txn)).await {
        Ok(_) => Ok(true),
        Err(e) if format!("{e:#}").contains("permission denied") => Ok(false),
        Err(e) => Err(e.context("probing this credential's write permissions")),
    }
}

/// Connect (bounded); the caller retries with backoff.
pub async fn connect(settings: &Settings, options: ConnectOptions) -> Result<Client> {
    let connect = Client::connect(settings.etcd_endpoints.clone(), Some(options));
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(client) => client.context("connecting to etcd"),
        Err(_) => anyhow::bail!("connecting to etcd timed out"),
    }
}

/// Every key under `prefix`, page by page, all pages at one pinned revision; returns the
/// key-values and that revision.
pub async fn list_prefix(client: &mut Client, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
    list_pages(client, prefix, false).await
}

/// `list_prefix` without the values (a scan of names: no page nears the response limit).
pub async fn list_keys(client: &mut Client, prefix: &str) -> Result<Vec<KeyValue>> {
    Ok(list_pages(client, prefix, true).await?.0)
}

async fn list_pages(
    client: &mut Client,
    prefix: &str,
    keys_only: bool,
) -> Result<(Vec<KeyValue>, i64)> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut all = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE_SIZE);
        if keys_only {
            options = options.with_keys_only();
        }
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut resp = bounded(client.get(from.clone(), Some(options))).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        if let Some(last) = kvs.last() {
            from = last.key().to_vec();
            from.push(0);
        }
        all.extend(kvs);
        if !more {
            return Ok((all, revision));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoints: &[&str], ca: Option<&str>) -> Settings {
        Settings {
            etcd_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            store: "/s".into(),
            node: "n".into(),
            cni_conf_dir: "/c".into(),
            etcd_ca: ca.map(Into::into),
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password_file: None,
            lease_ttl: Duration::from_secs(15),
            grace_period: Duration::from_secs(3600),
            subnet_lease_ttl: Duration::from_secs(3600),
            resync_interval: Duration::from_secs(30),
            health_listen: "127.0.0.1:9765".parse().unwrap(),
            metrics_listen: None,
            metrics_per_peer: false,
            template: None,
        }
    }

    #[test]
    fn tls_flags_must_match_the_url_schemes() {
        assert!(options(&settings(&["http://127.0.0.1:2379"], None)).is_ok());
        for (endpoints, ca) in [
            (&["https://127.0.0.1:2379"][..], None),
            (&["http://127.0.0.1:2379"][..], Some("/nonexistent-ca.pem")),
            (&["http://a:2379", "https://b:2379"][..], None),
            (&["127.0.0.1:2379"][..], None),
        ] {
            assert!(
                options(&settings(endpoints, ca)).is_err(),
                "{endpoints:?} {ca:?}"
            );
        }
        let e = options(&settings(&["https://a:2379"], Some("/nonexistent-ca.pem"))).unwrap_err();
        assert!(format!("{e:#}").contains("--etcd-ca"), "{e:#}");
    }
}
