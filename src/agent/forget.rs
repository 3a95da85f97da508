//! `wg-cni-agent forget-node NAME`: delete a node that is gone for good from etcd. Its keys
//! live under `nodes/<node>/`, `links/<node>/` and `subnets/<node>/` of each network; once
//! they are gone every agent drops the node's records from its mirror and the node's subnet
//! and addresses are free. A node whose node key exists is alive and is refused unless forced.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{DeleteOptions, GetOptions};

use super::config::Settings;
use super::etcd::{self, bounded};
use super::keys::{KeyKind, Keys, ROOT, prefix_end};

/// How to reach etcd (the agent's connection flags).
pub struct Connection {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Connection {
    /// Run a one-shot command's `work` with a client connected as these flags say, on a
    /// runtime of its own.
    pub(super) fn run<T, Work>(&self, work: impl FnOnce(etcd_client::Client) -> Work) -> Result<T>
    where
        Work: std::future::Future<Output = Result<T>>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let settings = self.settings();
            let client = etcd::connect(&settings, etcd::options(&settings)?).await?;
            work(client).await
        })
    }

    pub(super) fn settings(&self) -> Settings {
        Settings {
            etcd_endpoints: self.endpoints.clone(),
            etcd_ca: self.ca.clone(),
            etcd_cert: self.cert.clone(),
            etcd_key: self.key.clone(),
            etcd_user: self.user.clone(),
            etcd_password_file: self.password_file.clone(),
            store: PathBuf::new(),
            node: String::new(),
            cni_conf_dir: PathBuf::new(),
            lease_ttl: Duration::ZERO,
            grace_period: Duration::ZERO,
            subnet_lease_ttl: Duration::ZERO,
            resync_interval: Duration::ZERO,
            health_listen: "127.0.0.1:0".parse().expect("valid"),
            metrics_listen: None,
            metrics_per_peer: false,
            template: None,
        }
    }
}

/// Delete `node`'s keys in `network` (or every network it appears in); returns the number of
/// keys deleted per network.
pub fn forget_node(
    connection: &Connection,
    node: &str,
    network: Option<&str>,
    force: bool,
) -> Result<Vec<(String, i64)>> {
    connection.run(|mut client| async move {
        let networks = match network {
            Some(network) => vec![network.to_string()],
            None => networks_of(&mut client, node).await?,
        };
        let mut deleted = Vec::new();
        for network in networks {
            let keys = Keys::new(&network);
            let alive = bounded(client.get(
                keys.node_info(node),
                Some(GetOptions::new().with_count_only()),
            ))
            .await?
            .count()
                > 0;
            anyhow::ensure!(
                !alive || force,
                "node {node} is alive in network {network} (its node key exists): stop its agent first, or pass --force"
            );
            let mut count = 0;
            for prefix in keys.node_write_prefixes(node) {
                let options = DeleteOptions::new().with_range(prefix_end(&prefix));
                let resp = bounded(client.delete(prefix.clone(), Some(options)))
                    .await
                    .with_context(|| format!("deleting {prefix}"))?;
                count += resp.deleted();
            }
            tracing::info!(%network, %node, keys = count, "node forgotten");
            deleted.push((network, count));
        }
        Ok(deleted)
    })
}

/// The networks in which `node` has any key (a keys-only listing of the root, page by page).
async fn networks_of(client: &mut etcd_client::Client, node: &str) -> Result<Vec<String>> {
    let mut networks: Vec<String> = Vec::new();
    for kv in &etcd::list_keys(client, ROOT).await? {
        let Ok(key) = kv.key_str() else { continue };
        let Some(network) = key.strip_prefix(ROOT).and_then(|r| r.split('/').next()) else {
            continue;
        };
        let of_node = match Keys::new(network).parse(key) {
            Some(KeyKind::NodeInfo { node: n })
            | Some(KeyKind::Heartbeat { node: n })
            | Some(KeyKind::EndpointClaim { node: n, .. })
            | Some(KeyKind::Link { node: n, .. })
            | Some(KeyKind::Claim { node: n }) => n == node,
            None => false,
        };
        if of_node && !networks.iter().any(|n| n == network) {
            networks.push(network.to_string());
        }
    }
    Ok(networks)
}
