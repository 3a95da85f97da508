//! Handshakes that must not wait for WireGuard's 5-second retry.
//!
//! When the agent gives a pod link a new remote peer it starts a handshake toward it at once
//! (`reconcile::start_handshakes`). The new pod often starts one toward us at the same moment
//! (its first packet). The two initiations then cross: each side answers the other's and
//! drops the answer to its own, so neither has a confirmed session and traffic waits for the
//! retry (measured by `make bench`: ~5 s for a few pods in 30). A follow-up looks a moment
//! later and, for each peer still without a handshake, starts over from a clean slate: under
//! the network lock, if the peer is still wanted, it is removed and added again (dropping the
//! half-done handshake state) and kicked once more; at growing, jittered intervals so that
//! two agents doing the same do not cross again. Bounded: a few tries, one short-lived thread
//! per kicked batch.

use std::time::{Duration, Instant};

use wireguard_control::Key;

use crate::cni::{NetConf, Result};
use crate::reconcile::{self, NetworkView};
use crate::store::{State, Store};
use crate::wireguard::{self, Peer, Update};

/// When to look again, after the kick (the jitter is added to each).
const LOOKS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(600),
    Duration::from_millis(1200),
];
const JITTER_MS: u64 = 120;

/// One pod link's kicked peers to confirm.
pub struct Followup {
    pub conf: NetConf,
    pub node: String,
    pub container_id: String,
    pub ifname: String,
    pub peers: Vec<Key>,
}

/// Confirm the handshakes on a thread of its own (the reconcile goes on meanwhile).
pub fn spawn(followup: Followup) {
    let spawned = std::thread::Builder::new()
        .name("handshakes".into())
        .spawn(move || followup.run());
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the handshake follow-up");
    }
}

impl Followup {
    fn run(mut self) {
        let kicked = Instant::now();
        for look in LOOKS {
            let at = look + Duration::from_millis(jitter(JITTER_MS));
            if let Some(wait) = at.checked_sub(kicked.elapsed()) {
                std::thread::sleep(wait);
            }
            match self.restart_silent() {
                Ok(0) => return,
                Ok(n) => {
                    tracing::debug!(container = %self.container_id, peers = n, "handshakes started over")
                }
                Err(e) => {
                    tracing::debug!(container = %self.container_id, error = %e, "handshake follow-up ended");
                    return;
                }
            }
        }
    }

    /// Start over with every peer that still has no handshake; answers how many. Peers that
    /// completed one, or are no longer wanted, are dropped from the follow-up.
    fn restart_silent(&mut self) -> Result<usize> {
        let Some(store) = Store::open_existing(&self.conf.store, &self.conf.name, &self.node)?
        else {
            return Ok(0);
        };
        let _lock = store.lock()?;
        let Some(record) = store.get(&self.container_id, &self.ifname)? else {
            return Ok(0);
        };
        let Some(pod) = record.live_netns(None) else {
            return Ok(0);
        };
        if record.state != State::Ready {
            return Ok(0);
        }
        let link = record.link(Some(&pod));
        let backend = wireguard::backend(record.backend);
        let device = backend.read(&link)?;
        let silent = |key: &Key| {
            device
                .peers
                .iter()
                .any(|p| &p.config.public_key == key && p.stats.last_handshake_time.is_none())
        };
        let desired = NetworkView::read(&store, &self.conf)?.desired_for_pod(&record)?;
        let again: Vec<Peer> = desired
            .into_iter()
            .filter(|p| self.peers.contains(&p.public_key) && silent(&p.public_key))
            .collect();
        self.peers = again.iter().map(|p| p.public_key.clone()).collect();
        if again.is_empty() {
            return Ok(0);
        }
        backend.apply(
            &link,
            &Update {
                remove_peers: self.peers.clone(),
                ..Update::default()
            },
        )?;
        backend.apply(
            &link,
            &Update {
                peers: again.clone(),
                ..Update::default()
            },
        )?;
        reconcile::start_handshakes(record.backend, &link, &again)?;
        Ok(again.len())
    }
}

/// A few milliseconds of jitter, from the clock's low bits (no need for a random source).
fn jitter(max_ms: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max_ms.max(1)
}
