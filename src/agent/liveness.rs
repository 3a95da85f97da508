//! The liveness lease's keeper: a task of its own per granted lease, so that keep-alives
//! never wait behind anything else the network loop does. It renews every third of the TTL
//! and reports once when the lease is lost (etcd answered TTL 0 or "not found", or no renewal
//! got through for a whole TTL); the network loop then grants a new one and republishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::etcd;
use super::health::AgentStatus;

/// A granted lease and its keeper (stopped when this is dropped).
pub struct Lease {
    pub id: i64,
    lost: oneshot::Receiver<()>,
    keeper: JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Lease {
    /// Start keeping lease `id` (granted just now with `ttl`) alive.
    pub fn keep(
        client: Client,
        id: i64,
        ttl: Duration,
        network: String,
        status: Arc<AgentStatus>,
    ) -> Lease {
        let (tell, lost) = oneshot::channel();
        let keeper = Keeper {
            client,
            id,
            ttl,
            network,
            status,
            stream: None,
            last_ok: Instant::now(),
        };
        Lease {
            id,
            lost,
            keeper: tokio::spawn(keeper.run(tell)),
        }
    }

    /// Completes when the lease is lost (never, while it is kept).
    pub async fn lost(&mut self) {
        if (&mut self.lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

struct Keeper {
    client: Client,
    id: i64,
    ttl: Duration,
    network: String,
    status: Arc<AgentStatus>,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    last_ok: Instant,
}

impl Keeper {
    fn interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(500))
    }

    async fn run(mut self, lost: oneshot::Sender<()>) {
        loop {
            tokio::time::sleep(self.interval()).await;
            if !self.renew().await {
                self.status.update(&self.network, |s| s.lease_held = false);
                self.status.counters.lease_lost(&self.network);
                let _ = lost.send(());
                return;
            }
        }
    }

    /// One keep-alive; false once the lease is lost.
    async fn renew(&mut self) -> bool {
        let now = Instant::now();
        let outcome = async {
            if self.stream.is_none() {
                self.stream = Some(etcd::bounded(self.client.lease_keep_alive(self.id)).await?);
            }
            let (keeper, stream) = self.stream.as_mut().expect("just set");
            etcd::bounded(keeper.keep_alive()).await?;
            match etcd::bounded(stream.message()).await? {
                Some(resp) => anyhow::Ok(resp.ttl()),
                None => anyhow::bail!("keep-alive stream closed"),
            }
        }
        .await;
        let (network, id) = (&self.network, self.id);
        match outcome {
            Ok(ttl) if ttl > 0 => {
                self.last_ok = now;
                self.status.update(network, |s| s.lease_held = true);
                true
            }
            Ok(_) => {
                tracing::warn!(%network, lease = id, "liveness lease lost: granting a new one and republishing");
                false
            }
            Err(e) => {
                // etcd-client reports a keep-alive answered with TTL 0 as this error.
                let not_found = matches!(
                    e.downcast_ref::<etcd_client::Error>(),
                    Some(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found"
                );
                if not_found || now.duration_since(self.last_ok) >= self.ttl {
                    tracing::warn!(%network, lease = id, error = %format!("{e:#}"), "liveness lease lost: granting a new one and republishing");
                    return false;
                }
                self.stream = None;
                tracing::warn!(%network, error = %format!("{e:#}"), "keep-alive failed; retrying");
                self.status
                    .error(network, format!("keep-alive failed: {e:#}"));
                true
            }
        }
    }
}
