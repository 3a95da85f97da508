//! On-demand direct peers: a pod pair whose traffic the node gateway relays gets a direct
//! peer on this node's end, and loses it again when idle (the pair's way: `pair`).
//!
//! Relayed flows arrive from the gateway's packet log (`crate::flows`, fed after every filter
//! hook of the host: a flow the host drops is never promoted), one per pod pair and second at
//! most. Only flows whose two ends are pods of the network are promoted: a gateway, a node
//! address or a Service never is (Services are DNATed and not logged). Each node promotes its
//! own pod only; the other node does the same for its pod on seeing the same flow. Writes go
//! to one peer of one pod link at a time under the network's flock, like the reconciler's
//! (which leaves these peers to this thread: `reconcile::Prune::AllButDirect`).
//!
//! Limits: at most the network's `maxDirectPeers` per pod link, and a node-wide promotion
//! rate; beyond either, traffic stays relayed. Direct peers carry no persistent keepalive.

pub mod pair;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use wireguard_control::Key;

use crate::cni::{NetConf, Peering, Result};
use crate::mesh;
use crate::reconcile;
use crate::store::{self, DirectActivity, PeerActivity, Record, State, Store};
use crate::wireguard::{self, Peer, Update};

use super::Settings;
use super::directory::Directories;
use super::metrics::Counters;
use pair::{Action, Pair, Seen};

/// How often links with a pending peer (or one just demoted for relayed traffic) are read (the
/// two ends' switches land this close).
const PENDING_POLL: Duration = Duration::from_millis(10);
/// How often direct peers' counters are read (idleness).
const ACTIVITY_POLL: Duration = Duration::from_secs(1);
/// How often a cooling peer's counters are read: data from the other end, which still sends
/// directly, is dropped until the route is back.
const COOLING_POLL: Duration = Duration::from_millis(50);
/// How often, at most, the direct peers' activity is written for `wg-cni show`.
const ACTIVITY_WRITE: Duration = Duration::from_secs(5);
/// How often gone records and links are swept, confs re-read, peers on links adopted.
const SWEEP: Duration = Duration::from_secs(5);
/// Node-wide promotions per second, and the burst allowed.
const PROMOTIONS_PER_SECOND: f64 = 20.0;
const PROMOTION_BURST: f64 = 40.0;
/// A flow of an unknown gateway or pod reads the networks again at most this often.
const REREAD: Duration = Duration::from_millis(50);
/// Flows kept for after that read.
const DEFERRED_MAX: usize = 1024;
/// How long an unplaced flow is tried again: the relay watch logs the pair again a second
/// later anyway.
const DEFERRED_FOR: Duration = Duration::from_secs(1);

/// Why a relayed flow could not be placed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unplaced {
    /// Its gateway or this node's pod is not read yet (made a moment ago).
    Local,
    /// The other pod is not in the directory yet (its record is on its way through etcd).
    Remote,
}

/// A relayed flow seen by one of this node's gateways.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The gateway link that relayed it (names the network).
    pub gateway: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// When the relay watch read it: a pair judges relayed traffic by when it was relayed,
    /// not by when this thread got to it (a log read before the pair switched to direct and
    /// handled after `SWITCH_GRACE` must not demote the pair).
    pub seen: Instant,
}

/// What wakes the promoter: a relayed flow, or remote pods that left or changed (their
/// directory wakes it: `directory::Directory::wake_if_changed`).
#[derive(Debug)]
pub enum Event {
    Flow(Flow),
    DirectoryChanged,
}

/// One pod link of this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LinkId {
    network: String,
    container_id: String,
    ifname: String,
}

/// The other end of a pair: its node and the peer it is when direct.
#[derive(Debug, Clone)]
struct Target {
    node: String,
    peer: Peer,
}

impl Target {
    fn key(&self) -> &Key {
        &self.peer.public_key
    }

    /// The peer while pending or cooling: key and endpoint, no addresses.
    fn unrouted(&self) -> Peer {
        Peer {
            allowed_ips: Vec::new(),
            ..self.peer.clone()
        }
    }
}

/// A pod of this node, as its link is found and as other local pods peer with it.
#[derive(Debug, Clone)]
struct Local {
    id: LinkId,
    as_target: Target,
    addresses: Vec<IpNetwork>,
}

struct PairState {
    pair: Pair,
    target: Target,
}

struct Network {
    conf: NetConf,
    /// This node's gateway link of the network (its relayed flows are this network's).
    gateway: Option<String>,
    locals: Locals,
}

/// This node's ready pods of a network, by address, by link and by key.
#[derive(Default)]
struct Locals {
    by_address: HashMap<IpAddr, Arc<Local>>,
    by_link: HashMap<LinkId, Arc<Local>>,
    by_key: HashMap<Key, Arc<Local>>,
}

pub struct Promoter {
    node: String,
    boot_id: String,
    cni_conf_dir: PathBuf,
    store: PathBuf,
    directories: Arc<Directories>,
    networks: HashMap<String, Network>,
    /// When deferred flows were last tried again.
    replayed_at: Instant,
    /// Flows not placed yet.
    deferred: Vec<(Flow, Unplaced)>,
    pairs: HashMap<(LinkId, Key), PairState>,
    tokens: f64,
    tokens_at: Instant,
    next_activity: Instant,
    last_cooling_poll: Instant,
    next_sweep: Instant,
    /// The activity last written per network, and when the next write may be.
    activity_written: HashMap<String, DirectActivity>,
    next_activity_write: Instant,
    counters: Counters,
}

/// Start the promoter thread; it ends when `events` closes.
pub fn spawn(
    settings: &Settings,
    directories: Arc<Directories>,
    events: Receiver<Event>,
    counters: Counters,
) -> Result<()> {
    let now = Instant::now();
    let promoter = Promoter {
        node: settings.node.clone(),
        boot_id: crate::host::boot_id()?,
        cni_conf_dir: settings.cni_conf_dir.clone(),
        store: settings.store.clone(),
        directories,
        networks: HashMap::new(),
        replayed_at: now,
        deferred: Vec::new(),
        pairs: HashMap::new(),
        tokens: PROMOTION_BURST,
        tokens_at: now,
        next_activity: now,
        last_cooling_poll: now,
        next_sweep: now,
        activity_written: HashMap::new(),
        next_activity_write: now,
        counters,
    };
    std::thread::Builder::new()
        .name("promoter".into())
        .spawn(move || promoter.run(events))
        .map_err(|source| crate::cni::Error::Io {
            context: "starting the promoter thread".into(),
            source,
        })?;
    Ok(())
}

impl Promoter {
    fn run(mut self, events: Receiver<Event>) {
        loop {
            let now = Instant::now();
            let mut wake = match self.pairs.values().any(|p| p.pair.wants_fast_reads(now)) {
                true => now + PENDING_POLL,
                false => self.next_activity.min(self.next_sweep),
            };
            if self.pairs.values().any(|p| p.pair.is_cooling()) {
                wake = wake.min(self.last_cooling_poll + COOLING_POLL);
            }
            if !self.deferred.is_empty() {
                wake = wake.min(self.replayed_at + REREAD);
            }
            if let Some(switch) = self.pairs.values().filter_map(|p| p.pair.route_at()).min() {
                wake = wake.min(switch);
            }
            match events.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(event) => {
                    self.on_event(event);
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.tick(Instant::now());
        }
    }

    /// A flow is placed now; a directory change is taken by the tick that follows.
    fn on_event(&mut self, event: Event) {
        if let Event::Flow(flow) = event {
            self.on_flow(flow);
        }
    }

    fn tick(&mut self, now: Instant) {
        self.replay_deferred(now);
        self.follow_directories();
        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now + SWEEP;
        }
        let all = now >= self.next_activity;
        if all {
            self.next_activity = now + ACTIVITY_POLL;
        }
        let cooling = now >= self.last_cooling_poll + COOLING_POLL;
        if cooling {
            self.last_cooling_poll = now;
        }
        self.poll(now, all, cooling);
        self.pairs.retain(|_, p| !p.pair.is_over(now));
        if all && now >= self.next_activity_write {
            self.write_activity(now);
            self.next_activity_write = now + ACTIVITY_WRITE;
        }
    }

    /// Write each network's direct peers' activity where it changed (the file is `wg-cni
    /// show`'s only source of idle times: the devices keep no time of the last data).
    fn write_activity(&mut self, now: Instant) {
        let wall = std::time::SystemTime::now();
        let mut activity: HashMap<String, DirectActivity> = self
            .networks
            .keys()
            .map(|network| (network.clone(), DirectActivity::new()))
            .collect();
        for ((link, key), state) in &self.pairs {
            let pair::Phase::Direct {
                last_active,
                rx,
                tx,
                ..
            } = state.pair.phase
            else {
                continue;
            };
            let last_active = wall - now.duration_since(last_active);
            let last_active = last_active
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            activity
                .entry(link.network.clone())
                .or_default()
                .entry(store::attachment_id(&link.container_id, &link.ifname))
                .or_default()
                .insert(
                    key.to_base64(),
                    PeerActivity {
                        last_active,
                        rx,
                        tx,
                    },
                );
        }
        for (network, activity) in activity {
            if self.activity_written.get(&network) == Some(&activity) {
                continue;
            }
            let Some(conf) = self.networks.get(&network).map(|n| &n.conf) else {
                continue;
            };
            let written =
                Store::open_existing(&conf.store, &conf.name, &self.node).and_then(|store| {
                    match store {
                        Some(store) => store.put_direct_activity(&activity),
                        None => Ok(()),
                    }
                });
            match written {
                Ok(()) => {
                    self.activity_written.insert(network, activity);
                }
                Err(e) => {
                    tracing::debug!(%network, error = %e, "cannot write direct peers' activity")
                }
            }
        }
    }

    fn on_flow(&mut self, flow: Flow) {
        if let Err(unplaced) = self.resolve(&flow)
            && self.deferred.len() < DEFERRED_MAX
        {
            self.deferred.push((flow, unplaced));
        }
    }

    /// Promote the pair of `flow`, or say which end is not known yet.
    fn resolve(&mut self, flow: &Flow) -> std::result::Result<(), Unplaced> {
        let Some(network) = self.network_of(&flow.gateway) else {
            return Err(Unplaced::Local);
        };
        let src = self.local(&network, &flow.src);
        let dst = self.local(&network, &flow.dst);
        tracing::trace!(
            ?flow,
            local_src = src.is_some(),
            local_dst = dst.is_some(),
            "relayed flow"
        );
        match (src, dst) {
            (Some(a), Some(b)) => {
                self.relayed(&a, b.as_target.clone(), flow.seen);
                self.relayed(&b, a.as_target.clone(), flow.seen);
            }
            (Some(local), None) => match self.remote(&network, &flow.dst) {
                Some(target) => self.relayed(&local, target, flow.seen),
                None => return Err(Unplaced::Remote),
            },
            (None, Some(local)) => match self.remote(&network, &flow.src) {
                Some(target) => self.relayed(&local, target, flow.seen),
                None => return Err(Unplaced::Remote),
            },
            (None, None) => return Err(Unplaced::Local),
        }
        Ok(())
    }

    /// Flows that could not be resolved, tried again every `REREAD` for `DEFERRED_FOR` (the
    /// networks and this node's pods read again first when this node's end was unknown).
    fn replay_deferred(&mut self, now: Instant) {
        if self.deferred.is_empty() || now.duration_since(self.replayed_at) < REREAD {
            return;
        }
        self.replayed_at = now;
        if self.deferred.iter().any(|(_, u)| *u == Unplaced::Local) {
            self.read_networks();
        }
        for (flow, _) in std::mem::take(&mut self.deferred) {
            let Err(unplaced) = self.resolve(&flow) else {
                continue;
            };
            match now.duration_since(flow.seen) < DEFERRED_FOR {
                true => self.deferred.push((flow, unplaced)),
                false => {
                    tracing::debug!(?flow, "relayed flow of no pod of an on-demand network here")
                }
            }
        }
    }

    /// The on-demand network whose gateway link is `gateway`.
    fn network_of(&self, gateway: &str) -> Option<String> {
        self.networks
            .iter()
            .find(|(_, n)| n.gateway.as_deref() == Some(gateway))
            .map(|(name, _)| name.clone())
    }

    /// A pod of another on-demand node, as the directory has it (validated records only).
    fn remote(&self, network: &str, ip: &IpAddr) -> Option<Target> {
        let directory = self.directories.of(network);
        let directory = directory.read().unwrap_or_else(|p| p.into_inner());
        let pod = directory.by_address(ip).filter(|p| p.relayed)?;
        Some(Target {
            node: pod.node.clone(),
            peer: pod.peer.clone(),
        })
    }

    /// This node's pod at `ip`, as last read.
    fn local(&self, network: &str, ip: &IpAddr) -> Option<Arc<Local>> {
        self.networks
            .get(network)?
            .locals
            .by_address
            .get(ip)
            .cloned()
    }

    fn read_locals(&mut self, network: &str) {
        let Some(net) = self.networks.get_mut(network) else {
            return;
        };
        let store = Store::open_existing(&net.conf.store, &net.conf.name, &self.node);
        let (records, gateway) = match store {
            Ok(Some(store)) => (
                store.node_records().unwrap_or_default(),
                store.gateway().ok().flatten(),
            ),
            _ => (Vec::new(), None),
        };
        net.gateway = gateway
            .filter(|g| g.boot_id == self.boot_id)
            .map(|g| g.host_name);
        net.locals = Locals::of(network, &self.node, &self.boot_id, records);
    }

    /// Relayed traffic between `local` and `target`: promote the pair, or tell it.
    fn relayed(&mut self, local: &Local, target: Target, seen: Instant) {
        if target.key() == local.as_target.key() {
            return;
        }
        let now = Instant::now();
        let id = (local.id.clone(), target.key().clone());
        let actions = match self.pairs.get_mut(&id) {
            Some(state) => state.pair.relayed(seen),
            None => {
                let Some(conf) = self.networks.get(&local.id.network).map(|n| &n.conf) else {
                    return;
                };
                let held = self
                    .pairs
                    .iter()
                    .filter(|((link, _), p)| *link == local.id && p.pair.holds_a_peer())
                    .count();
                if held >= conf.max_direct_peers || !self.take_token(now) {
                    tracing::debug!(container = %local.id.container_id, held, "promotion skipped: limit reached, the pair stays relayed");
                    return;
                }
                let initiator = local.as_target.key().as_bytes() < target.key().as_bytes();
                let (pair, actions) = Pair::promote(now, initiator);
                self.pairs.insert(
                    id.clone(),
                    PairState {
                        pair,
                        target: target.clone(),
                    },
                );
                actions
            }
        };
        if !actions.is_empty() {
            self.execute(&id.0, &local.addresses, &target, &actions);
        }
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.tokens_at).as_secs_f64() * PROMOTIONS_PER_SECOND;
        self.tokens = (self.tokens + earned).min(PROMOTION_BURST);
        self.tokens_at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Read the links that hold pairs (unless `all`: only those with a pending pair, and a
    /// cooling one if `cooling`) and tell each pair what its peer looks like.
    fn poll(&mut self, now: Instant, all: bool, cooling: bool) {
        let mut links: HashMap<LinkId, Vec<Key>> = HashMap::new();
        for ((link, key), state) in &self.pairs {
            if all || state.pair.wants_fast_reads(now) || (cooling && state.pair.is_cooling()) {
                links.entry(link.clone()).or_default().push(key.clone());
            }
        }
        for (link, keys) in links {
            let Some(net) = self.networks.get(&link.network) else {
                continue;
            };
            let idle = net.conf.idle_peer_timeout;
            let Some(addresses) = net.locals.by_link.get(&link).map(|l| l.addresses.clone()) else {
                // The pod went: its link with it.
                for key in keys {
                    self.pairs.remove(&(link.clone(), key));
                }
                continue;
            };
            let seen = match self.read_link(&net.conf, &link) {
                Ok(Some(seen)) => seen,
                Ok(None) => HashMap::new(),
                Err(e) => {
                    tracing::debug!(container = %link.container_id, error = %e, "cannot read a pod link");
                    continue;
                }
            };
            let directory = self.directories.of(&link.network);
            for key in keys {
                let id = (link.clone(), key);
                let Some(state) = self.pairs.get_mut(&id) else {
                    continue;
                };
                let stale = directory
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_stale(&state.target.node);
                let actions =
                    state
                        .pair
                        .observe(now, seen.get(&id.1).map(|(s, _)| *s), idle, stale);
                if !actions.is_empty() {
                    let target = state.target.clone();
                    self.execute(&link, &addresses, &target, &actions);
                }
            }
        }
    }

    /// What the link's device says of each peer, and whether the peer has allowed IPs; `None`
    /// when the link is not live.
    fn read_link(
        &self,
        conf: &NetConf,
        link: &LinkId,
    ) -> Result<Option<HashMap<Key, (Seen, bool)>>> {
        let Some(store) = Store::open_existing(&conf.store, &conf.name, &self.node)? else {
            return Ok(None);
        };
        let Some((record, pod)) = self.live(&store, link)? else {
            return Ok(None);
        };
        let device = wireguard::backend(record.backend).read(&record.link(Some(&pod)))?;
        Ok(Some(
            device
                .peers
                .iter()
                .map(|p| {
                    let seen = Seen {
                        handshake_age: p.stats.last_handshake_time.and_then(|t| t.elapsed().ok()),
                        rx: p.stats.rx_bytes,
                        tx: p.stats.tx_bytes,
                    };
                    (
                        p.config.public_key.clone(),
                        (seen, !p.config.allowed_ips.is_empty()),
                    )
                })
                .collect(),
        ))
    }

    /// The link's record and pod namespace while it is ready and of this boot.
    fn live(&self, store: &Store, link: &LinkId) -> Result<Option<(Record, crate::netns::Netns)>> {
        let Some(record) = store.get(&link.container_id, &link.ifname)? else {
            return Ok(None);
        };
        if record.state != State::Ready || record.boot_id != self.boot_id {
            return Ok(None);
        }
        Ok(record.live_netns(None).map(|pod| (record, pod)))
    }

    /// Do `actions` on the link, under the network's lock, the link checked live under it.
    fn execute(&self, link: &LinkId, local: &[IpNetwork], target: &Target, actions: &[Action]) {
        let Some(conf) = self.networks.get(&link.network).map(|n| &n.conf) else {
            return;
        };
        let written = (|| -> Result<()> {
            let Some(store) = Store::open_existing(&conf.store, &conf.name, &self.node)? else {
                return Ok(());
            };
            let _lock = store.lock()?;
            let Some((record, pod)) = self.live(&store, link)? else {
                return Ok(());
            };
            let link_ref = record.link(Some(&pod));
            let backend = wireguard::backend(record.backend);
            let write = |peer: Peer| {
                backend.apply(
                    &link_ref,
                    &Update {
                        peers: vec![peer],
                        ..Update::default()
                    },
                )
            };
            let remove = || {
                backend.apply(
                    &link_ref,
                    &Update {
                        remove_peers: vec![target.key().clone()],
                        ..Update::default()
                    },
                )
            };
            let kick =
                || reconcile::start_handshakes(record.backend, &link_ref, &[target.unrouted()]);
            for action in actions {
                match action {
                    Action::AddPending | Action::Unroute => write(target.unrouted())?,
                    Action::Kick => kick()?,
                    Action::Restart => {
                        remove()?;
                        write(target.unrouted())?;
                        kick()?;
                    }
                    Action::Route => write(target.peer.clone())?,
                    Action::Remove => remove()?,
                    Action::ForgetConntrack => forget_conntrack(local, &target.peer.allowed_ips),
                }
            }
            Ok(())
        })();
        match written {
            Ok(()) => {
                for action in actions {
                    match action {
                        Action::Route => self.counters.direct_promoted(&link.network),
                        Action::Remove => self.counters.direct_trimmed(&link.network),
                        _ => {}
                    }
                }
                tracing::debug!(container = %link.container_id, peer = %target.key().to_base64(), ?actions, "direct peer")
            }
            Err(e) => {
                tracing::warn!(container = %link.container_id, error = %e, ?actions, "could not write a direct peer")
            }
        }
    }

    /// Read the confs again; drop pairs whose link or remote record is gone (removing the
    /// peer when the link is still there); adopt direct peers found on links (after a restart
    /// of the agent: they stay, so the pods' traffic never waits for this thread).
    fn sweep(&mut self, now: Instant) {
        self.read_networks();
        let gone: Vec<(LinkId, Key)> = self
            .pairs
            .iter()
            .filter(|((link, key), state)| {
                state.pair.holds_a_peer() && !self.is_current(&link.network, key, &state.target)
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.remove_pairs(gone);
        self.adopt(now);
    }

    /// Forget these pairs, removing their peers from the links still there.
    fn remove_pairs(&mut self, pairs: Vec<(LinkId, Key)>) {
        for id in pairs {
            if let Some(state) = self.pairs.remove(&id) {
                let addresses = self.addresses_of(&id.0).unwrap_or_default();
                self.execute(&id.0, &addresses, &state.target, &[Action::Remove]);
            }
        }
    }

    fn addresses_of(&self, link: &LinkId) -> Option<Vec<IpNetwork>> {
        let net = self.networks.get(&link.network)?;
        net.locals.by_link.get(link).map(|l| l.addresses.clone())
    }

    /// The pair's remote end is still a current record (a stale node's are, for its grace).
    fn is_current(&self, network: &str, key: &Key, target: &Target) -> bool {
        if target.node == self.node {
            return self
                .networks
                .get(network)
                .is_some_and(|n| n.locals.by_key.contains_key(key));
        }
        let directory = self.directories.of(network);
        let directory = directory.read().unwrap_or_else(|p| p.into_inner());
        // Until the network was listed in full, a missing pod may only be unlisted yet.
        !directory.is_complete()
            || directory
                .by_key(key)
                .is_some_and(|p| p.relayed && p.peer == target.peer)
    }

    /// Remove at once the pairs whose remote pod left or changed (a DEL, a new address or
    /// endpoint) since the last look: a removed pod's address may be another pod's soon.
    fn follow_directories(&mut self) {
        let networks: Vec<String> = self.networks.keys().cloned().collect();
        for network in networks {
            let changed = self
                .directories
                .of(&network)
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take_changed();
            if changed.as_ref().is_some_and(Vec::is_empty) {
                continue;
            }
            let changed: Option<HashSet<Key>> = changed.map(|keys| keys.into_iter().collect());
            let gone: Vec<(LinkId, Key)> = self
                .pairs
                .iter()
                .filter(|((link, key), state)| {
                    link.network == network
                        && state.pair.holds_a_peer()
                        && state.target.node != self.node
                        && changed.as_ref().is_none_or(|c| c.contains(key))
                        && !self.is_current(&network, key, &state.target)
                })
                .map(|(id, _)| id.clone())
                .collect();
            self.remove_pairs(gone);
        }
    }

    fn read_networks(&mut self) {
        let Ok(networks) = super::config::read_networks(&self.cni_conf_dir, &self.store) else {
            return;
        };
        let wanted: HashSet<String> = networks
            .iter()
            .filter(|n| n.conf.peering == Peering::OnDemand)
            .map(|n| n.name.clone())
            .collect();
        self.networks.retain(|name, _| wanted.contains(name));
        for network in networks.into_iter().filter(|n| wanted.contains(&n.name)) {
            let entry = self
                .networks
                .entry(network.name.clone())
                .or_insert_with(|| Network {
                    conf: network.conf.clone(),
                    gateway: None,
                    locals: Locals::default(),
                });
            entry.conf = network.conf;
            self.read_locals(&network.name);
        }
        self.pairs
            .retain(|(link, _), _| self.networks.contains_key(&link.network));
    }

    /// Peers on this node's pod links that look direct (a current pod record's key, its
    /// addresses or none) and that no pair holds: taken over as they are.
    fn adopt(&mut self, now: Instant) {
        let links: Vec<(String, Arc<Local>)> = self
            .networks
            .iter()
            .flat_map(|(name, n)| {
                n.locals
                    .by_link
                    .values()
                    .map(move |l| (name.clone(), Arc::clone(l)))
            })
            .collect();
        for (network, local) in links {
            let Some(conf) = self.networks.get(&network).map(|n| n.conf.clone()) else {
                continue;
            };
            let Ok(Some(seen)) = self.read_link(&conf, &local.id) else {
                continue;
            };
            for (key, (peer_seen, routed)) in seen {
                if self.pairs.contains_key(&(local.id.clone(), key.clone())) {
                    continue;
                }
                let Some(target) = self.target_by_key(&network, &key) else {
                    continue;
                };
                let initiator = local.as_target.key().as_bytes() < key.as_bytes();
                tracing::debug!(container = %local.id.container_id, peer = %key.to_base64(), routed, "direct peer adopted");
                self.pairs.insert(
                    (local.id.clone(), key),
                    PairState {
                        pair: Pair::adopt(now, initiator, routed, peer_seen),
                        target,
                    },
                );
            }
        }
    }

    /// A pod of this network by key: another on-demand node's (directory) or this node's.
    fn target_by_key(&self, network: &str, key: &Key) -> Option<Target> {
        if let Some(local) = self.networks.get(network)?.locals.by_key.get(key) {
            return Some(local.as_target.clone());
        }
        let directory = self.directories.of(network);
        let directory = directory.read().unwrap_or_else(|p| p.into_inner());
        let pod = directory.by_key(key).filter(|p| p.relayed)?;
        Some(Target {
            node: pod.node.clone(),
            peer: pod.peer.clone(),
        })
    }
}

impl Locals {
    /// This node's ready pods of this boot among `records`.
    fn of(network: &str, node: &str, boot_id: &str, records: Vec<Record>) -> Locals {
        let mut locals = Locals::default();
        for record in records
            .into_iter()
            .filter(|r| r.state == State::Ready && r.boot_id == boot_id)
        {
            let Ok(peer) = mesh::peer_of(&record, None) else {
                continue;
            };
            let local = Arc::new(Local {
                id: LinkId {
                    network: network.to_string(),
                    container_id: record.container_id.clone(),
                    ifname: record.ifname.clone(),
                },
                as_target: Target {
                    node: node.to_string(),
                    peer,
                },
                addresses: record.addresses.clone(),
            });
            for address in &record.addresses {
                locals.by_address.insert(address.ip(), Arc::clone(&local));
            }
            locals.by_link.insert(local.id.clone(), Arc::clone(&local));
            locals.by_key.insert(local.as_target.key().clone(), local);
        }
        locals
    }
}

/// The pair's conntrack entries on this node, every family both ends have: the path of its
/// flows changed, and a stream must not meet its stale state (kube-proxy drops what
/// conntrack calls INVALID).
fn forget_conntrack(local: &[IpNetwork], remote: &[IpNetwork]) {
    for a in local {
        for b in remote.iter().filter(|b| b.is_ipv4() == a.is_ipv4()) {
            if let Err(e) = crate::conntrack::forget_pair(a.ip(), b.ip()) {
                tracing::debug!(error = %e, "could not delete a pair's conntrack entries");
            }
        }
    }
}
