//! Handshakes that must not wait for WireGuard's 5-second retry.
//!
//! When the agent gives a pod link a new remote peer it starts a handshake toward it at once
//! (`reconcile::start_handshakes`). The new pod often starts one toward us at the same moment
//! (its first packet). The two initiations then cross: each side answers the other's and
//! drops the answer to its own, so neither has a confirmed session and traffic waits for the
//! retry (measured by `make bench`: ~5 s for a few pods in 30). A follow-up looks a moment
//! later and, for each peer still without a handshake, starts over from a clean slate: a peer
//! the device still has, with no handshake, is removed and added again exactly as the device
//! had it (dropping the half-done handshake state) and kicked once
//! more; at growing, jittered intervals so that two agents doing the same do not cross again.
//! A peer with a handshake, or one the device no longer has, is never touched. Bounded per
//! link: one follow-up at a time (peers kicked meanwhile join it), a few tries each.
//! Never under the network's flock, so no ADD waits behind a follow-up's read of a whole
//! device: the reconciler thread (which removes remote peers) is excluded instead, and a
//! plugin command that writes a remote pod's peer writes it as the store has it, which is
//! what the follow-up writes back.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wireguard_control::Key;

use crate::cni::{NetConf, Result};
use crate::netns::Netns;
use crate::reconcile;
use crate::store::{Record, State, Store};
use crate::wireguard::{self, LinkRef, Peer, PresharedKey, Update};

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

/// Held by a follow-up around its read and rewrite of a link, and by the reconciler thread
/// around each link write (taken before the network's flock, never inside it).
static REMOTE_PEER_WRITES: Mutex<()> = Mutex::new(());

pub fn exclude_followups() -> std::sync::MutexGuard<'static, ()> {
    REMOTE_PEER_WRITES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Links with a follow-up running, and the peers kicked on them since it started.
static RUNNING: Mutex<BTreeMap<String, Vec<Key>>> = Mutex::new(BTreeMap::new());

fn running() -> std::sync::MutexGuard<'static, BTreeMap<String, Vec<Key>>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Confirm the handshakes on a thread of its own (the reconcile goes on meanwhile); a link
/// with a follow-up running hands it the peers instead.
pub fn follow_up(followup: Followup) {
    let id = followup.link_id();
    {
        let mut running = running();
        if let Some(joining) = running.get_mut(&id) {
            joining.extend(followup.peers);
            return;
        }
        running.insert(id.clone(), Vec::new());
    }
    let spawned = std::thread::Builder::new()
        .name("handshakes".into())
        .spawn(move || followup.run());
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the handshake follow-up");
        running().remove(&id);
    }
}

impl Followup {
    fn link_id(&self) -> String {
        format!("{}/{}/{}", self.conf.name, self.container_id, self.ifname)
    }

    /// Peers kicked on this link since the last look (`done`: the follow-up ends now).
    fn take_joined(&mut self, done: bool) {
        let id = self.link_id();
        let mut running = running();
        let joined = match done {
            true => running.remove(&id),
            false => running.get_mut(&id).map(std::mem::take),
        };
        let mut seen: HashSet<Key> = self.peers.iter().cloned().collect();
        for key in joined.unwrap_or_default() {
            if seen.insert(key.clone()) {
                self.peers.push(key);
            }
        }
    }

    fn run(mut self) {
        self.looks();
        self.take_joined(true);
    }

    fn looks(&mut self) {
        let kicked = Instant::now();
        for look in LOOKS {
            let at = look + Duration::from_millis(jitter(JITTER_MS));
            if let Some(wait) = at.checked_sub(kicked.elapsed()) {
                std::thread::sleep(wait);
            }
            self.take_joined(false);
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
    /// completed one, or that the device no longer has, are dropped from the follow-up.
    fn restart_silent(&mut self) -> Result<usize> {
        let Some(store) = Store::open_existing(&self.conf.store, &self.conf.name, &self.node)?
        else {
            return Ok(0);
        };
        // A first look without the lock: usually every handshake has completed by now, and
        // then no ADD waits behind this read of the whole device.
        let Some((record, pod)) = self.ready_link(&store)? else {
            return Ok(0);
        };
        if self.silent(&record, &record.link(Some(&pod)))?.is_empty() {
            self.peers.clear();
            return Ok(0);
        }
        // Not the network's flock (see the module's doc).
        let _reconciler = exclude_followups();
        // Again, right before the rewrite: a handshake completed since the first look keeps
        // its peer out of it, and a peer the reconciler removed meanwhile stays removed.
        let Some((record, pod)) = self.ready_link(&store)? else {
            return Ok(0);
        };
        let link = record.link(Some(&pod));
        let again = self.silent(&record, &link)?;
        self.peers = again.iter().map(|p| p.public_key.clone()).collect();
        if again.is_empty() {
            return Ok(0);
        }
        let backend = wireguard::backend(record.backend);
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

    /// The followed link's record and pod, while it is ready.
    fn ready_link(&self, store: &Store) -> Result<Option<(Record, Netns)>> {
        let Some(record) = store.get(&self.container_id, &self.ifname)? else {
            return Ok(None);
        };
        if record.state != State::Ready {
            return Ok(None);
        }
        Ok(record.live_netns(None).map(|pod| (record, pod)))
    }

    /// The followed peers the link still has without a handshake, as configured.
    fn silent(&self, record: &Record, link: &LinkRef) -> Result<Vec<Peer>> {
        let device = wireguard::backend(record.backend).read(link)?;
        let followed: HashSet<&Key> = self.peers.iter().collect();
        Ok(device
            .peers
            .iter()
            .filter(|p| followed.contains(&p.config.public_key))
            .filter(|p| p.stats.last_handshake_time.is_none())
            .map(|p| as_configured(&p.config))
            .collect())
    }
}

/// The peer exactly as the device has it configured (re-added unchanged).
fn as_configured(config: &wireguard_control::PeerConfig) -> Peer {
    Peer {
        public_key: config.public_key.clone(),
        endpoint: config.endpoint,
        allowed_ips: config
            .allowed_ips
            .iter()
            .filter_map(|ip| ipnetwork::IpNetwork::new(ip.address, ip.cidr).ok())
            .collect(),
        keepalive: config.persistent_keepalive_interval.filter(|s| *s > 0),
        preshared_key: config.preshared_key.clone().map(PresharedKey),
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
