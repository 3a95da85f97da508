//! `wg-cni agent`: the per-node loop that carries records between nodes through etcd.
//! Per served network: claim the node's subnet, hold a liveness lease with the node key,
//! publish this node's records, mirror every other node's trusted records into the store,
//! and hand what changed to the reconciler thread, which writes the mirror files and the links. The CNI commands never reach this
//! module (no tokio multi-thread runtime, no etcd client on their path).

pub mod cli;
pub mod config;
mod credentials;
mod datastore;
mod dir_watch;
pub mod direct;
mod directory;
mod etcd;
pub mod forget;
mod grant;
mod handshakes;
pub mod health;
mod index;
pub mod keys;
pub mod links;
mod liveness;
pub mod membership;
pub mod memory;
pub mod metrics;
pub mod mirror;
mod mirror_files;
mod network;
mod publish;
mod reconciler;
mod rotator;
mod server;
pub mod subnet;
mod supervisor;
pub mod template;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::cni::config::NetConf;
use crate::reconcile;

pub use config::Settings;
pub use health::AgentStatus;

/// Relayed flows waiting for the promoter (beyond, new ones are dropped: the packet log
/// repeats a live flow every second).
const FLOW_QUEUE: usize = 4096;

/// Applies a network's peers to this node's live WireGuard links. The agent calls it on its
/// reconciler thread (calls never overlap), only after the network's first complete sync
/// (`AgentStatus::first_sync_done`), once the mirror files say what the call is about. It
/// takes the network's flock itself, per link.
pub trait LinkReconciler: Send + Sync {
    /// Bring every link to its whole desired peer set, from the store (this node's records
    /// and the mirrored ones): after the first complete sync and every resync interval.
    /// On-demand, the promoter's direct peers for `directory`'s pods (and this node's) stay.
    fn resync(&self, conf: &NetConf, directory: &directory::SharedDirectory);
    /// Write these one-peer changes (a remote pod or gateway came, went or moved) to the links
    /// they concern, without reading the devices.
    fn apply(&self, conf: &NetConf, changes: &reconcile::PeerChanges);
}

/// Run the agent until SIGTERM or SIGINT (on a multi-thread tokio runtime of its own).
pub fn run(
    settings: Settings,
    reconciler: Arc<dyn LinkReconciler>,
    status: Arc<AgentStatus>,
) -> Result<()> {
    run_until(settings, reconciler, status, async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
}

/// Run the agent until `stop` completes. Threads of the runtime are created from the calling
/// thread, so they share its network namespace (tests run etcd in one of their own).
pub fn run_until(
    settings: Settings,
    reconciler: Arc<dyn LinkReconciler>,
    status: Arc<AgentStatus>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            result = run_async(Arc::new(settings), reconciler, status) => result,
            _ = stop => {
                tracing::info!("agent stopping (the liveness lease lapses on its own)");
                Ok(())
            }
        }
    });
    // Blocking file and link work runs on the reconciler thread, which ends with its senders.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Feed the promoter what the gateways' relay watch logs (`nat::relay_watch_rules`), on a
/// thread of its own in this namespace. Without the log (the group taken, no nfnetlink_log)
/// pairs stay relayed: said in the log, tried again.
fn watch_relayed_flows(flows: std::sync::mpsc::SyncSender<direct::Event>) -> Result<()> {
    std::thread::Builder::new()
        .name("relay-watch".into())
        .spawn(move || {
            loop {
                let mut watch = match crate::flows::FlowWatch::open(crate::nat::RELAY_NFLOG_GROUP) {
                    Ok(watch) => watch,
                    Err(e) => {
                        tracing::warn!(error = %e, group = crate::nat::RELAY_NFLOG_GROUP, "cannot watch relayed flows: on-demand pairs stay relayed; trying again in 10 s");
                        std::thread::sleep(Duration::from_secs(10));
                        continue;
                    }
                };
                loop {
                    match watch.recv() {
                        Ok(flow) => {
                            let flow = direct::Event::Flow(direct::Flow {
                                gateway: flow.prefix,
                                src: flow.src,
                                dst: flow.dst,
                                seen: std::time::Instant::now(),
                            });
                            match flows.try_send(flow) {
                                Ok(()) | Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading relayed flows failed; listening again");
                            std::thread::sleep(Duration::from_secs(1));
                            break;
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// Bind the HTTP endpoints' listeners (a taken address fails the start) and serve them.
async fn serve_http(settings: &Settings, status: &Arc<AgentStatus>) -> Result<()> {
    let links = match settings.metrics_listen {
        Some(_) => Some(metrics::LinkReader::new(settings).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let shared = Arc::new(server::Shared {
        status: status.clone(),
        links,
    });
    for (addr, routes) in server::plan(settings.health_listen, settings.metrics_listen) {
        let listener = server::bind(addr, routes).await?;
        tokio::spawn(server::serve(listener, routes, shared.clone()));
    }
    Ok(())
}

async fn run_async(
    settings: Arc<Settings>,
    reconciler: Arc<dyn LinkReconciler>,
    status: Arc<AgentStatus>,
) -> Result<()> {
    serve_http(&settings, &status).await?;
    let boot_id = crate::host::boot_id().map_err(|e| anyhow::anyhow!("{e}"))?;

    let options = etcd::options(&settings)?;
    let mut delay = Duration::from_millis(500);
    let client = loop {
        match etcd::connect(&settings, options.clone()).await {
            Ok(client) => break client,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot connect to etcd; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    tracing::info!(node = %settings.node, endpoints = ?settings.etcd_endpoints, "agent started");
    warn_if_unconfined(client.clone());
    let mut credentials = credentials::Fingerprint::of(&settings);
    let mut next_credentials_look = tokio::time::Instant::now() + credentials::POLL;

    let reconciler =
        reconciler::Reconciler::spawn(settings.node.clone(), reconciler, status.clone())?;
    let (flows, relayed) = std::sync::mpsc::sync_channel(FLOW_QUEUE);
    let directories = Arc::new(directory::Directories::new(flows.clone()));
    direct::spawn(
        &settings,
        directories.clone(),
        relayed,
        status.counters.clone(),
    )?;
    rotator::spawn(&settings)?;
    watch_relayed_flows(flows)?;
    let mut supervisor = supervisor::Supervisor::new(
        settings.clone(),
        client,
        boot_id,
        status.clone(),
        reconciler,
        directories.clone(),
    );
    let (tx, mut conf_changed) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = dir_watch::watch_dir(&settings.cni_conf_dir, "CNI conf dir", tx);
    let mut next_read = tokio::time::Instant::now();
    #[allow(clippy::infinite_loop)] // ends when run_until's stop future completes
    loop {
        if tokio::time::Instant::now() >= next_read {
            supervisor.follow_conf_dir();
            next_read = tokio::time::Instant::now() + supervisor::CONF_POLL;
        }
        if tokio::time::Instant::now() >= next_credentials_look {
            next_credentials_look = tokio::time::Instant::now() + credentials::POLL;
            // File reads: off the async workers (a slow or hung mount must not stall them).
            let of = settings.clone();
            let now = tokio::task::spawn_blocking(move || credentials::Fingerprint::of(&of))
                .await
                .unwrap_or(credentials);
            if now != credentials {
                match reconnect(&settings).await {
                    Ok(client) => {
                        tracing::info!("etcd credential files changed: connected again with them");
                        credentials = now;
                        warn_if_unconfined(client.clone());
                        supervisor.use_client(client);
                    }
                    // Half-replaced files, or a credential etcd refuses: the old connection
                    // stays, and the next look tries again.
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "etcd credential files changed, but connecting with them failed; keeping the current connection")
                    }
                }
            }
        }
        supervisor.restart_ended_loops();
        supervisor.write_conflist_when_ready();
        status.supervisor_alive();
        tokio::select! {
            Some(()) = conf_changed.recv() => {
                // Let an installer's burst of writes (temp file, rename) settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while conf_changed.try_recv().is_ok() {}
                next_read = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A connection with the credential files as they are now.
async fn reconnect(settings: &Settings) -> Result<etcd_client::Client> {
    let options = etcd::options(settings)?;
    etcd::connect(settings, options).await
}

/// Warn (once per connection) when this credential could write other nodes' keys: the
/// per-node trust of the README's "Per-node credentials" needs etcd's auth and one role per node.
fn warn_if_unconfined(mut client: etcd_client::Client) {
    tokio::spawn(async move {
        match etcd::writes_beyond_own_keys(&mut client).await {
            Ok(true) => tracing::warn!(
                "this node's etcd credential may write other nodes' keys (etcd's auth is off, or \
                 the credential is shared or an administrator's): any node holding it can speak \
                 for every other; give each node its own user (wg-cni-agent grant-node)"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot tell this credential's reach")
            }
        }
    });
}

#[cfg(test)]
mod tests;
