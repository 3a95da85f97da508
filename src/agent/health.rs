//! The agent's shared status and what `/healthz` and `/readyz` answer from it (`server` serves
//! them): `/healthz` says the agent's supervisor is alive (it restarts failed network loops);
//! `/readyz` says, per network, whether the node holds its lease and claim and has synced,
//! with the last sync and the last error. The status also carries the counters `/metrics`
//! reports (`metrics::Counters`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use ipnetwork::IpNetwork;

/// One network's state as the health endpoints and the reconciler see it.
#[derive(Debug, Clone, Default)]
pub struct NetStatus {
    pub first_sync_done: bool,
    pub lease_held: bool,
    pub subnets: Option<Vec<IpNetwork>>,
    /// Why the subnet is not usable (claim lost, nothing free, etcd error).
    pub subnet_error: Option<String>,
    pub stale_nodes: BTreeSet<String>,
    /// What the membership layer refused of other nodes' keys, by reason.
    pub refused: BTreeMap<super::membership::Refusal, u64>,
    /// When the mirror last matched etcd (unix seconds): a full list or a watch event applied.
    pub last_sync: Option<u64>,
    /// The last thing that went wrong, and when (unix seconds).
    pub last_error: Option<(u64, String)>,
    /// The other nodes' pods and gateways this node's links peer with.
    pub remote_peers: usize,
    /// Jobs the reconciler thread ran for this network, and how long the last one took.
    pub reconciles: u64,
    pub last_reconcile_ms: u64,
}

impl NetStatus {
    /// Why the network is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(e) = &self.subnet_error {
            return Some(e.clone());
        }
        if self.subnets.is_none() {
            return Some("subnet not known yet".into());
        }
        if !self.lease_held {
            return Some("liveness lease not held".into());
        }
        if !self.first_sync_done {
            return Some("first sync not done".into());
        }
        None
    }

    fn describe(&self, now: u64) -> String {
        let mut text = match self.not_ready() {
            None => "ready".to_string(),
            Some(reason) => format!("not ready: {reason}"),
        };
        if let Some(subnets) = &self.subnets {
            text += &format!("; subnets {subnets:?}");
        }
        text += if self.lease_held {
            "; lease held"
        } else {
            "; no lease"
        };
        match self.last_sync {
            Some(at) => text += &format!("; last sync {}s ago", now.saturating_sub(at)),
            None => text += "; never synced",
        }
        text += &format!("; {} remote peers", self.remote_peers);
        if self.reconciles > 0 {
            text += &format!(
                "; {} reconciles, the last {} ms",
                self.reconciles, self.last_reconcile_ms
            );
        }
        if let Some((at, error)) = &self.last_error {
            text += &format!("; last error {}s ago: {error}", now.saturating_sub(*at));
        }
        text
    }
}

/// Shared by the network loops, the health server and whoever embeds the agent.
#[derive(Debug, Default)]
pub struct AgentStatus {
    networks: Mutex<BTreeMap<String, NetStatus>>,
    /// When the supervisor last went round (unix seconds); 0 before it started.
    supervisor_seen: std::sync::atomic::AtomicU64,
    /// What the agent's parts count as they work (`/metrics`).
    pub counters: super::metrics::Counters,
}

/// The supervisor goes round every second: silent this long, it is stuck or gone.
const SUPERVISOR_SILENCE: u64 = 30;

impl AgentStatus {
    /// Whether the network's first complete list of etcd has been mirrored: before that the
    /// mirror may lack records, so no peer may be removed on its evidence.
    pub fn first_sync_done(&self, network: &str) -> bool {
        self.get(network).is_some_and(|s| s.first_sync_done)
    }

    /// Every served network's status, by name.
    pub fn networks(&self) -> Vec<(String, NetStatus)> {
        self.networks
            .lock()
            .unwrap()
            .iter()
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect()
    }

    pub fn get(&self, network: &str) -> Option<NetStatus> {
        self.networks.lock().unwrap().get(network).cloned()
    }

    pub fn update(&self, network: &str, change: impl FnOnce(&mut NetStatus)) {
        change(
            self.networks
                .lock()
                .unwrap()
                .entry(network.to_string())
                .or_default(),
        );
    }

    /// A network is no longer served: it leaves the status.
    pub fn forget(&self, network: &str) {
        self.networks.lock().unwrap().remove(network);
    }

    /// Note a failure of a network's loop (shown by `/readyz`).
    pub fn error(&self, network: &str, error: String) {
        self.update(network, |s| {
            s.last_error = Some((crate::host::now_unix(), error))
        });
    }

    /// The supervisor went round.
    pub fn supervisor_alive(&self) {
        self.supervisor_seen.store(
            crate::host::now_unix(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// `Ok` while the supervisor goes round (it restarts network loops that end).
    pub fn liveness(&self) -> std::result::Result<(), String> {
        let seen = self
            .supervisor_seen
            .load(std::sync::atomic::Ordering::Relaxed);
        let silent = crate::host::now_unix().saturating_sub(seen);
        match seen {
            0 => Ok(()), // starting: connecting to etcd is not a failure of the agent
            _ if silent > SUPERVISOR_SILENCE => {
                Err(format!("the supervisor has been silent for {silent}s"))
            }
            _ => Ok(()),
        }
    }

    /// `Ok` when every served network is synced, holds its lease and knows its subnet; the
    /// text has one line per network either way.
    pub fn readiness(&self) -> std::result::Result<String, String> {
        let networks = self.networks.lock().unwrap();
        if networks.is_empty() {
            return Err("no wg-cni network for this store in the CNI conf dir".into());
        }
        let now = crate::host::now_unix();
        let lines: String = networks
            .iter()
            .map(|(name, s)| format!("network {name}: {}\n", s.describe(now)))
            .collect();
        match networks.values().all(|s| s.not_ready().is_none()) {
            true => Ok(lines),
            false => Err(lines),
        }
    }
}

/// The answer to a GET of `/healthz` or `/readyz` (`server` routes them here).
pub fn respond(path: &str, status: &AgentStatus) -> (u16, String) {
    match path {
        "/healthz" => match status.liveness() {
            Ok(()) => (200, "ok\n".into()),
            Err(reason) => (503, format!("{reason}\n")),
        },
        _ => match status.readiness() {
            Ok(lines) => (200, lines),
            Err(lines) => (503, lines),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_synced_leased_and_subnet_known() {
        let s = AgentStatus::default();
        assert_eq!(respond("/healthz", &s).0, 200);
        assert_eq!(respond("/readyz", &s).0, 503);
        s.update("net", |n| {
            n.subnets = Some(vec!["10.0.0.0/24".parse().unwrap()])
        });
        s.update("net", |n| n.lease_held = true);
        let (code, body) = respond("/readyz", &s);
        assert_eq!(code, 503);
        assert!(body.contains("first sync"), "{body}");
        assert!(!s.first_sync_done("net"));
        s.update("net", |n| n.first_sync_done = true);
        assert!(s.first_sync_done("net"));
        let (code, body) = respond("/readyz", &s);
        assert_eq!(code, 200);
        assert!(body.starts_with("network net: ready; subnets"), "{body}");
        s.error("net", "etcd unreachable".into());
        let (_, body) = respond("/readyz", &s);
        assert!(
            body.contains("last error 0s ago: etcd unreachable"),
            "{body}"
        );
        // A second network not ready yet: not ready as a whole, both named.
        s.update("other", |_| {});
        let (code, body) = respond("/readyz", &s);
        assert_eq!(code, 503);
        assert!(body.contains("network net: ready") && body.contains("network other: not ready"));
        s.forget("other");
        assert_eq!(respond("/readyz", &s).0, 200);
        // Liveness: the supervisor going round.
        s.supervisor_alive();
        assert_eq!(respond("/healthz", &s).0, 200);
        s.supervisor_seen
            .store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(respond("/healthz", &s).0, 503);
    }
}
