//! The one peer logic: the desired peer set of a link, computed from the store and the
//! network's settings, diffed against the live device and applied. ADD's fan-out, DEL, GC and
//! CHECK all go through here, so every link of a network agrees on who its peers are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use wireguard_control::Key;

use crate::cni::{NetConf, Peering, Result};
use crate::gateway;
use crate::mesh;
use crate::netns::Netns;
use crate::store::{GatewayRecord, Record, RemoteNode, State, Store};
use crate::wireguard::{self, DeviceState, LinkRef, Peer, Update};

mod changes;
mod direct;
mod fan_out;

pub use changes::{PeerChanges, PeerKind, Upsert};
pub use direct::DirectCandidates;

pub use fan_out::{
    each_at_once, gone, local_pods, newcomers, tell_gateway, tell_gateway_link, tell_local_pods,
};

/// How long a relay session may stay silent: pods and their gateway, and gateways between
/// on-demand nodes, keep their sessions up, so a first packet never waits for a handshake.
pub const SESSION_KEEPALIVE: u16 = 25;

/// What the peer sets of a network's links are computed from: read once per command, and no
/// more of the network than its caller's peer sets need (see the constructors).
pub struct NetworkView {
    /// This node's name.
    pub node: String,
    /// How this node's pods peer.
    pub peering: Peering,
    /// The records the peer sets need: this node's (unless `read_for_new_link` or
    /// `read_for_join` left some out), and those of every node whose pods are direct peers
    /// here (all nodes in mesh mode; in on-demand mode the mesh-mode nodes').
    pub records: Vec<Record>,
    /// Whether `records` holds every record of this node.
    all_own: bool,
    /// The other nodes as the mirror describes them (on-demand only: mesh needs none).
    pub remote_nodes: BTreeMap<String, RemoteNode>,
    /// This node's gateway, when the network has one.
    pub gateway: Option<GatewayRecord>,
    /// The other nodes' gateways (mirrored by the agent): in on-demand mode, only those of the
    /// nodes this node's pods are meshed with, unless the view was read for the node gateway
    /// (`read_complete`, `read_all_gateways`), which relays to the others.
    pub remote_gateways: Vec<GatewayRecord>,
    /// Whether `remote_gateways` holds every other node's gateway.
    all_gateways: bool,
    /// The config's static peers (already validated against the pod range).
    pub static_peers: Vec<Peer>,
    pub keepalive: Option<u16>,
    /// Peers whose endpoint was re-addressed since the caller last applied it (the agent
    /// remembers; a CNI command knows of none).
    pub moved: Vec<Key>,
}

/// Which of this node's records a view reads (on-demand: mesh reads all).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Own {
    All,
    /// Those of the attachments an ADD or DEL holds now.
    InFlight,
    None,
}

/// The node whose links a reconcile touches: its name, boot and host namespace.
pub struct Node<'a> {
    pub name: &'a str,
    pub boot_id: &'a str,
    pub host: &'a Netns,
}

impl NetworkView {
    /// What this node's pod links need: this node's records, the other nodes' modes, the
    /// records and gateways of the nodes its pods are meshed with (every node in mesh mode:
    /// on-demand, the mesh-mode ones; an on-demand node costs no read of its own files), this
    /// node's gateway, the static peers. A static peer that no longer validates is left out
    /// (logged): it must not stop a DEL or a reconcile.
    pub fn read(store: &Store, conf: &NetConf) -> Result<NetworkView> {
        NetworkView::read_parts(store, conf, Own::All, false)
    }

    /// `read` without this node's own records where a new pod link does not peer with them
    /// (on-demand: they are the gateway's peers): what ADD builds its link with.
    pub fn read_for_new_link(store: &Store, conf: &NetConf) -> Result<NetworkView> {
        NetworkView::read_parts(store, conf, Own::None, false)
    }

    /// What ADD joins its link with, under the lock: `read_for_new_link`, and of this node's
    /// records on-demand only those of the attachments an ADD or DEL holds now
    /// (`Store::records_in_flight`: the links waiting to join are among them). The peer sets
    /// of pod links need no more; the node gateway's and the other local links' do
    /// (`read_own_records`).
    pub fn read_for_join(store: &Store, conf: &NetConf) -> Result<NetworkView> {
        NetworkView::read_parts(store, conf, Own::InFlight, false)
    }

    /// `read`, and every other node's gateway (the node gateway's relay peers), for a caller
    /// that will remove every peer it cannot account for (the agent's `Prune::Everything`):
    /// an unreadable gateway record is an error here, never "no gateway", which would remove
    /// every pod's default route.
    pub fn read_complete(store: &Store, conf: &NetConf) -> Result<NetworkView> {
        if conf.host_gateway {
            store.gateway()?;
        }
        NetworkView::read_parts(store, conf, Own::All, true)
    }

    /// Add the other nodes' gateways `read` left out, before the node gateway's peer set is
    /// computed from this view (`desired_for_gateway`).
    pub fn read_all_gateways(&mut self, store: &Store) -> Result<()> {
        if !self.all_gateways {
            self.remote_gateways = store.remote_gateways()?;
            self.all_gateways = true;
        }
        Ok(())
    }

    /// Read every record of this node, where `read_for_new_link` or `read_for_join` left some
    /// out, before the node gateway's peer set or a fan-out to this node's links is computed
    /// from this view. (Before `treat_as_ready`: the records are read anew.)
    pub fn read_own_records(&mut self, store: &Store) -> Result<()> {
        if !self.all_own {
            self.records.retain(|r| r.node != self.node);
            self.records.extend(store.node_records()?);
            self.all_own = true;
        }
        Ok(())
    }

    fn read_parts(
        store: &Store,
        conf: &NetConf,
        own: Own,
        all_gateways: bool,
    ) -> Result<NetworkView> {
        let static_peers = mesh::static_peers(conf, &[]).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "static peers left out");
            Vec::new()
        });
        let me = store.node_name();
        let names = store.node_names()?;
        // Mesh peers with every node alike: only on-demand needs to know the others' modes.
        let (remote_nodes, records, remote_gateways) = match conf.peering {
            Peering::Mesh => (
                BTreeMap::new(),
                store.records_in(&names, |_| true)?,
                store.remote_gateways_in(&names, |_| true),
            ),
            Peering::OnDemand => {
                let nodes = store.remote_nodes_in(&names);
                let meshed = |node: &str| {
                    node != me && nodes.get(node).is_none_or(|n| n.peering == Peering::Mesh)
                };
                let mut records = store
                    .records_in(&names, |node| meshed(node) || own == Own::All && node == me)?;
                if own == Own::InFlight {
                    records.extend(store.records_in_flight()?);
                }
                let gateways =
                    store.remote_gateways_in(&names, |node| all_gateways || meshed(node));
                (nodes, records, gateways)
            }
        };
        let mesh = conf.peering == Peering::Mesh;
        Ok(NetworkView {
            node: me.to_string(),
            peering: conf.peering,
            records,
            all_own: own == Own::All || mesh,
            remote_nodes,
            gateway: match conf.host_gateway {
                true => store.gateway().ok().flatten(),
                false => None,
            },
            remote_gateways,
            all_gateways: all_gateways || mesh,
            static_peers,
            keepalive: conf.persistent_keepalive,
            moved: Vec::new(),
        })
    }

    /// Count the records `which` picks as ready (a batch joining together: each member's peer
    /// set includes the others before any of them is written ready).
    pub fn treat_as_ready(&mut self, which: impl Fn(&Record) -> bool) {
        for record in self.records.iter_mut().filter(|r| which(r)) {
            record.state = State::Ready;
        }
    }

    /// Whether `node`'s pods are direct peers of this node's pods: every node's in mesh mode;
    /// in on-demand mode only those of nodes in mesh mode (toward them a node behaves as mesh).
    pub fn meshed_with(&self, node: &str) -> bool {
        match self.peering {
            Peering::Mesh => true,
            Peering::OnDemand => {
                node != self.node
                    && self
                        .remote_nodes
                        .get(node)
                        .is_none_or(|n| n.peering == Peering::Mesh)
            }
        }
    }

    /// Whether this node's gateway relays for `node` (both on-demand): it then peers with that
    /// node's gateway for the node's whole subnets, and with none of its pods.
    pub fn relays_to(&self, node: &str) -> bool {
        self.peering == Peering::OnDemand && !self.meshed_with(node)
    }

    /// The keepalive of the peers between this node's gateway and its pods.
    pub fn session_keepalive(&self) -> Option<u16> {
        match self.peering {
            Peering::Mesh => self.keepalive,
            Peering::OnDemand => Some(self.keepalive.unwrap_or(SESSION_KEEPALIVE)),
        }
    }

    /// The peers the pod link of `me` should have: the ready attachments of the nodes it is
    /// meshed with (in mesh mode: every other one), the static peers, this node's gateway for
    /// whatever no more specific peer claims, and the gateways of the meshed nodes for those
    /// gateways' and nodes' addresses.
    pub fn desired_for_pod(&self, me: &Record) -> Result<Vec<Peer>> {
        let mut peers: Vec<Peer> = self
            .records
            .iter()
            .filter(|r| r.state == State::Ready && !r.is_attachment(&me.container_id, &me.ifname))
            .filter(|r| self.meshed_with(&r.node))
            .filter_map(|r| match mesh::peer_of(r, self.keepalive) {
                Ok(peer) => Some(peer),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping peer");
                    None
                }
            })
            .collect();
        // Mesh: the other local pods' next keys (on-demand, local pods meet at the gateway).
        peers.extend(self.next_keys(|r| {
            self.meshed_with(&r.node) && !r.is_attachment(&me.container_id, &me.ifname)
        }));
        peers.extend(self.static_peers.iter().cloned());
        if let Some(gw) = &self.gateway {
            peers.push(gateway::peer_for_pods(gw, self.session_keepalive())?);
            for remote in self
                .remote_gateways
                .iter()
                .filter(|g| self.meshed_with(&g.node))
            {
                match gateway::peer_for_remote_pods(remote, self.keepalive) {
                    Ok(peer) => peers.push(peer),
                    Err(e) => tracing::warn!(node = %remote.node, error = %e, "skipping a gateway"),
                }
            }
        }
        Ok(peers)
    }

    /// The peers this node's gateway should have: this node's ready pods and those of the
    /// nodes it is meshed with (traffic from the host to a remote pod goes straight to it,
    /// encrypted); for each other node's gateway either the relay peer (both on-demand: that
    /// node's subnets and addresses) or that gateway's and node's addresses (`node_paths`: a
    /// DNAT here to another node's address crosses encrypted and is answered back here).
    /// The view must hold every gateway and this node's records (`read_complete`, or
    /// `read_all_gateways` and `read_own_records`).
    pub fn desired_for_gateway(&self) -> Vec<Peer> {
        debug_assert!(
            self.all_gateways && self.all_own,
            "the node gateway's peer set needs every other node's gateway and this node's pods"
        );
        let pods = self
            .records
            .iter()
            .filter(|r| r.state == State::Ready)
            .filter_map(|r| match r.node == self.node {
                true => mesh::peer_of(r, self.session_keepalive()).ok(),
                false if self.meshed_with(&r.node) => mesh::peer_of(r, self.keepalive).ok(),
                false => None,
            });
        let gateways = self.remote_gateways.iter().filter_map(|gw| {
            match self
                .remote_nodes
                .get(&gw.node)
                .filter(|_| self.relays_to(&gw.node))
            {
                Some(node) => gateway::peer_for_relay(gw, node, self.session_keepalive()).ok(),
                None => gateway::peer_for_remote_pods(gw, self.keepalive).ok(),
            }
        });
        // The gateway holds every local pod: it learns their next keys too.
        pods.chain(self.next_keys(|_| true))
            .chain(gateways)
            .collect()
    }

    /// The next keys of this node's ready pods that `which` selects, while `wg-cni rotate`
    /// replaces their keys (`mesh::next_peer_of`: unrouted). Only this node's records are read
    /// for them: the field is never published, and another node must not plant keys here.
    fn next_keys<'v>(
        &'v self,
        which: impl Fn(&Record) -> bool + 'v,
    ) -> impl Iterator<Item = Peer> + 'v {
        self.records
            .iter()
            .filter(|r| r.node == self.node && r.state == State::Ready)
            .filter(move |r| which(r))
            .filter_map(|r| mesh::next_peer_of(r, self.session_keepalive()))
    }
}

/// Which peers a reconcile may remove. Removing is the dangerous half: a peer the store does
/// not (yet) know may still be wanted, so only peers proven gone are removed.
#[derive(Clone, Copy)]
pub enum Prune<'a> {
    /// Add and update only.
    Nothing,
    /// Also remove these keys (a deleted attachment, a replaced gateway).
    Only(&'a [Key]),
    /// Make the device's peer set exactly the desired one: the node agent, once its view of
    /// the network is complete (every peer is then accounted for by a record or the config).
    Everything,
    /// `Everything` but the peers this says to keep (and to leave as they are): on-demand,
    /// the promoter's direct peers (`DirectCandidates`).
    EverythingBut(&'a (dyn Fn(&wireguard_control::PeerInfo) -> bool + Sync)),
}

/// Endpoints the caller knows were re-addressed since it last applied them (a node that moved).
/// Any other endpoint difference is WireGuard roaming and is left alone while it works.
pub type Moved<'a> = &'a [Key];

/// A peer that completed a handshake this recently is talking from where the device says.
const ROAMING_PROOF: Duration = Duration::from_secs(180);

/// The update that turns `device`'s peers into `desired`: new peers and peers whose allowed
/// IPs, keepalive or preshared key differ are (re)written; removals per `prune`.
/// An endpoint is (re)written when the peer is new or has none, when `moved` names it, or
/// when it differs and the peer has not completed a handshake for `ROAMING_PROOF` (the old one
/// is then not proven to work): WireGuard follows a peer that roams, and so do we.
/// An empty update (nothing to do) has no peers and no removals. O(peers): hash lookups.
pub fn diff(device: &DeviceState, desired: &[Peer], prune: Prune, moved: Moved) -> Update<'static> {
    let have: HashMap<&Key, &wireguard_control::PeerInfo> = device
        .peers
        .iter()
        .map(|p| (&p.config.public_key, p))
        .collect();
    let peers: Vec<Peer> = desired
        .iter()
        .filter_map(|want| match have.get(&want.public_key) {
            None => Some(want.clone()),
            Some(info) => {
                let reset = endpoint_to_reset(want, info, moved);
                let endpoint = if reset { want.endpoint } else { None };
                let changed = reset || !same_apart_from_endpoint(want, &info.config);
                changed.then(|| Peer {
                    endpoint,
                    ..want.clone()
                })
            }
        })
        .collect();
    let wanted: HashSet<&Key> = desired.iter().map(|p| &p.public_key).collect();
    let remove_peers = have
        .iter()
        .filter(|(key, _)| !wanted.contains(*key))
        .filter(|(key, info)| match prune {
            Prune::Nothing => false,
            Prune::Only(keys) => keys.contains(key),
            Prune::Everything => true,
            Prune::EverythingBut(keep) => !keep(info),
        })
        .map(|(key, _)| (*key).clone())
        .collect();
    Update {
        peers,
        remove_peers,
        ..Update::default()
    }
}

fn endpoint_to_reset(want: &Peer, have: &wireguard_control::PeerInfo, moved: Moved) -> bool {
    if want.endpoint.is_none() || want.endpoint == have.config.endpoint {
        return false;
    }
    let talking = have
        .stats
        .last_handshake_time
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < ROAMING_PROOF);
    have.config.endpoint.is_none() || moved.contains(&want.public_key) || !talking
}

fn same_apart_from_endpoint(want: &Peer, have: &wireguard_control::PeerConfig) -> bool {
    let mut want_ips: Vec<String> = want.allowed_ips.iter().map(|ip| ip.to_string()).collect();
    let mut have_ips: Vec<String> = have
        .allowed_ips
        .iter()
        .map(|ip| format!("{}/{}", ip.address, ip.cidr))
        .collect();
    want_ips.sort();
    have_ips.sort();
    want_ips == have_ips
        && want.keepalive.filter(|s| *s > 0)
            == have.persistent_keepalive_interval.filter(|s| *s > 0)
        && want.preshared_key.as_ref().map(|k| &k.0) == have.preshared_key.as_ref()
}

/// Read the device behind `link`, diff it against `desired` and apply what differs.
/// Returns whether anything was written.
pub fn apply(
    backend: wireguard::BackendKind,
    link: &LinkRef,
    desired: &[Peer],
    prune: Prune,
    moved: Moved,
) -> Result<bool> {
    apply_and_report(backend, link, desired, prune, moved).map(|added| added.is_some())
}

/// `apply`, answering the peers the device did not have before (`None`: nothing written).
pub fn apply_and_report(
    backend: wireguard::BackendKind,
    link: &LinkRef,
    desired: &[Peer],
    prune: Prune,
    moved: Moved,
) -> Result<Option<Vec<Peer>>> {
    let backend = wireguard::backend(backend);
    let device = backend.read(link)?;
    let update = diff(&device, desired, prune, moved);
    if update.changes_no_peer() {
        return Ok(None);
    }
    backend.apply(link, &update)?;
    let known: HashSet<&Key> = device.peers.iter().map(|d| &d.config.public_key).collect();
    Ok(Some(
        update
            .peers
            .into_iter()
            .filter(|p| !known.contains(&p.public_key))
            .collect(),
    ))
}

/// Make the link start a handshake with `peers` now, instead of when its first packet for
/// them waits: a remote peer that learns of a new pod only through its agent would otherwise
/// drop the new pod's first handshake and leave it to WireGuard's 5-second retry. Turning a
/// persistent keepalive on sends one at once (kernel and wireguard-go alike); it is then set
/// back to what the network configures.
pub fn start_handshakes(
    backend: wireguard::BackendKind,
    link: &LinkRef,
    peers: &[Peer],
) -> Result<()> {
    if peers.is_empty() {
        return Ok(());
    }
    let backend = wireguard::backend(backend);
    let with_keepalive = |seconds: u16| Update {
        peers: peers
            .iter()
            .map(|p| Peer {
                keepalive: Some(p.keepalive.unwrap_or(seconds)),
                ..p.clone()
            })
            .collect(),
        ..Update::default()
    };
    backend.apply(link, &with_keepalive(1))?;
    let restore = Update {
        peers: peers
            .iter()
            .map(|p| Peer {
                keepalive: Some(p.keepalive.unwrap_or(0)),
                ..p.clone()
            })
            .collect(),
        ..Update::default()
    };
    backend.apply(link, &restore)
}

/// The update that takes a link from the peer set `before` (which the caller configured
/// itself, so no read of the device is needed) to `after`.
pub fn between(before: &[Peer], after: &[Peer]) -> Update<'static> {
    let before_by_key: HashMap<&Key, &Peer> = before.iter().map(|p| (&p.public_key, p)).collect();
    let after_keys: std::collections::HashSet<&Key> = after.iter().map(|p| &p.public_key).collect();
    Update {
        peers: after
            .iter()
            .filter(|p| before_by_key.get(&p.public_key) != Some(p))
            .cloned()
            .collect(),
        remove_peers: before
            .iter()
            .filter(|p| !after_keys.contains(&p.public_key))
            .map(|p| p.public_key.clone())
            .collect(),
        ..Update::default()
    }
}

/// Bring this node's gateway to its desired peer set.
pub fn gateway(node: &Node, view: &NetworkView, prune: Prune) -> Result<()> {
    let Some(gateway) = &view.gateway else {
        return Ok(());
    };
    crate::failpoint::fail("gateway-update")?;
    let desired = view.desired_for_gateway();
    let link = gateway.link(node.host);
    apply(gateway.backend, &link, &desired, prune, &view.moved).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use wireguard_control::{AllowedIp, PeerInfo};

    fn peer(ip: &str) -> Peer {
        Peer {
            public_key: KeyPair::generate().public().clone(),
            endpoint: Some("127.0.0.1:53000".parse().unwrap()),
            allowed_ips: vec![ip.parse().unwrap()],
            keepalive: None,
            preshared_key: None,
        }
    }

    fn device_with(peers: &[&Peer]) -> DeviceState {
        let peers = peers
            .iter()
            .map(|p| {
                let mut info = PeerInfo::from_public_key(p.public_key.clone());
                info.config.endpoint = p.endpoint;
                info.config.allowed_ips = p
                    .allowed_ips
                    .iter()
                    .map(|ip| AllowedIp {
                        address: ip.ip(),
                        cidr: ip.prefix(),
                    })
                    .collect();
                info
            })
            .collect();
        DeviceState {
            peers,
            ..DeviceState::default()
        }
    }

    #[test]
    fn an_equal_device_needs_nothing() {
        let (a, b) = (peer("10.0.0.2/32"), peer("10.0.0.3/32"));
        let gone = [a.public_key.clone(), b.public_key.clone()];
        let update = diff(
            &device_with(&[&a, &b]),
            &[a.clone(), b.clone()],
            Prune::Only(&gone),
            &[],
        );
        assert!(update.peers.is_empty() && update.remove_peers.is_empty());
    }

    #[test]
    fn new_and_changed_peers_are_written_and_removal_follows_prune() {
        let (a, b, c) = (
            peer("10.0.0.2/32"),
            peer("10.0.0.3/32"),
            peer("10.0.0.4/32"),
        );
        let mut moved = a.clone();
        moved.endpoint = Some("127.0.0.1:53001".parse().unwrap());
        let device = device_with(&[&a, &c]);
        let desired = [moved.clone(), b.clone()];

        let update = diff(&device, &desired, Prune::Nothing, &[]);
        assert_eq!(update.peers, vec![moved.clone(), b.clone()]);
        assert!(
            update.remove_peers.is_empty(),
            "c is unknown, not proven gone"
        );

        let gone = [c.public_key.clone()];
        assert_eq!(
            diff(&device, &desired, Prune::Only(&gone), &[]).remove_peers,
            gone
        );
        assert_eq!(
            diff(&device, &desired, Prune::Only(&[]), &[]).remove_peers,
            vec![]
        );
    }

    #[test]
    fn a_kernel_peer_without_a_preshared_key_needs_nothing() {
        // The kernel reports "no preshared key" as 32 zero bytes.
        let a = peer("10.0.0.2/32");
        let mut info = device_with(&[&a]).peers.remove(0);
        info.config.preshared_key = Some(Key([0; 32]));
        let raw = DeviceState {
            peers: vec![info.clone()],
            ..DeviceState::default()
        };
        let update = diff(&raw, std::slice::from_ref(&a), Prune::Everything, &[]);
        assert!(
            !update.changes_no_peer(),
            "as the kernel reports it, it differs"
        );
        let device = DeviceState {
            peers: wireguard::without_zero_preshared_keys(vec![info]),
            ..DeviceState::default()
        };
        let update = diff(&device, std::slice::from_ref(&a), Prune::Everything, &[]);
        assert!(update.changes_no_peer(), "{update:?}");
    }

    #[test]
    fn a_roamed_endpoint_that_works_stays_until_the_record_moves() {
        let a = peer("10.0.0.2/32");
        let mut device = device_with(&[&a]);
        device.peers[0].config.endpoint = Some("127.0.0.9:53000".parse().unwrap());
        device.peers[0].stats.last_handshake_time = Some(std::time::SystemTime::now());

        let update = diff(&device, std::slice::from_ref(&a), Prune::Nothing, &[]);
        assert!(update.peers.is_empty(), "roaming is left alone");

        let mut wider = a.clone();
        wider.allowed_ips.push("10.0.1.0/24".parse().unwrap());
        let update = diff(&device, std::slice::from_ref(&wider), Prune::Nothing, &[]);
        assert_eq!(update.peers.len(), 1);
        assert_eq!(
            update.peers[0].endpoint, None,
            "written without touching the endpoint"
        );

        let moved = [a.public_key.clone()];
        let update = diff(&device, std::slice::from_ref(&a), Prune::Nothing, &moved);
        assert_eq!(update.peers, vec![a.clone()], "a moved record resets it");

        device.peers[0].stats.last_handshake_time =
            Some(std::time::SystemTime::now() - Duration::from_secs(600));
        let update = diff(&device, std::slice::from_ref(&a), Prune::Nothing, &[]);
        assert_eq!(
            update.peers,
            vec![a],
            "a silent peer gets the record's endpoint back"
        );
    }
}

/// What a view reads of the store: an on-demand node costs a command no file of its own.
#[cfg(test)]
mod reading {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::keys::KeyPair;
    use crate::store::tests::files_read;

    fn key() -> String {
        KeyPair::generate().public().to_base64()
    }

    fn write(path: &Path, value: &serde_json::Value) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, value.to_string()).unwrap();
    }

    /// A node directory as the agent mirrors it: one ready pod, a gateway, and `node.json`
    /// unless `node_file` is None.
    fn node(net: &Path, name: &str, octet: u8, node_file: Option<&str>) {
        let dir = net.join(name);
        write(
            &dir.join(format!("p-{name}:eth0.json")),
            &json!({"schema": 1, "state": "ready", "network": "net", "node": name,
                "containerId": format!("p-{name}"), "ifname": "eth0", "publicKey": key(),
                "addresses": [format!("10.9.{octet}.2/32")], "endpoint": format!("192.0.2.{octet}"),
                "listenPort": 52000, "bootId": "b", "hostName": "wgc0", "backend": "userspace",
                "mtu": 1420, "createdAt": 1}),
        );
        write(
            &dir.join("gateway.json"),
            &json!({"schema": 1, "network": "net", "node": name, "publicKey": key(),
                "addresses": [format!("10.9.{octet}.1/32")], "subnets": [format!("10.9.{octet}.0/24")],
                "endpoint": format!("192.0.2.{octet}"), "listenPort": 51000, "hostName": "wgg0",
                "backend": "userspace", "bootId": "b", "mtu": 1420, "masquerade": false,
                "createdAt": 1}),
        );
        if let Some(peering) = node_file {
            write(&dir.join("node.json"), &node_json(name, octet, peering));
        }
    }

    fn node_json(name: &str, octet: u8, peering: &str) -> serde_json::Value {
        json!({"schema": 1, "node": name, "endpoints": [format!("192.0.2.{octet}")],
            "subnets": [format!("10.9.{octet}.0/24")], "mtu": 1400 + u32::from(octet),
            "stale": false, "peering": peering})
    }

    fn conf(root: &Path) -> NetConf {
        let text = json!({"cniVersion": "1.0.0", "name": "net", "type": "wg-cni",
            "peering": "on-demand", "clusterRange": "10.9.0.0/16", "store": root,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.9.1.0/24"}]]}});
        NetConf::parse(text.to_string().as_bytes()).unwrap()
    }

    fn under<'a>(read: &'a [std::path::PathBuf], dir: &Path) -> Vec<&'a std::path::PathBuf> {
        read.iter().filter(|p| p.starts_with(dir)).collect()
    }

    fn nodes_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut nodes: Vec<String> = names.into_iter().map(str::to_string).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// The nodes whose records the view holds.
    fn record_nodes(view: &NetworkView) -> Vec<String> {
        nodes_of(view.records.iter().map(|r| r.node.as_str()))
    }

    /// The nodes whose gateways the view holds.
    fn gateway_nodes(view: &NetworkView) -> Vec<String> {
        nodes_of(view.remote_gateways.iter().map(|g| g.node.as_str()))
    }

    #[test]
    fn an_on_demand_view_reads_no_file_of_an_on_demand_node() {
        let root = tempfile::tempdir().unwrap();
        let net = root.path().join("net");
        node(&net, "me", 1, None);
        let other = std::fs::read_to_string(net.join("me/p-me:eth0.json")).unwrap();
        let other = other.replace("\"p-me\"", "\"p-other\"");
        std::fs::write(net.join("me/p-other:eth0.json"), other).unwrap();
        // Named by nodes.json: on-demand (its own node.json would say mesh: never read), and
        // a mesh-mode node whose pods and gateway are direct peers.
        node(&net, "od", 2, Some("mesh"));
        node(&net, "m", 3, Some("mesh"));
        // Not named by it: an on-demand node mirrored a moment ago, and records put there by
        // hand (no node.json: mesh).
        node(&net, "new", 4, Some("on-demand"));
        node(&net, "hand", 5, None);
        let summary = json!({"schema": 1, "nodes": {
            "od": node_json("od", 2, "on-demand"), "m": node_json("m", 3, "mesh"),
            "gone": node_json("gone", 6, "mesh")}});
        write(&net.join("nodes.json"), &summary);
        let store = Store::open(root.path(), "net", "me").unwrap();
        let conf = conf(root.path());

        files_read();
        let view = NetworkView::read(&store, &conf).unwrap();
        let read = files_read();
        assert_eq!(
            under(&read, &net.join("od")),
            Vec::<&std::path::PathBuf>::new()
        );
        assert_eq!(
            under(&read, &net.join("new")),
            vec![&net.join("new/node.json")]
        );
        assert!(read.contains(&net.join("m/gateway.json")), "{read:?}");
        assert_eq!(record_nodes(&view), ["hand", "m", "me"]);
        assert_eq!(gateway_nodes(&view), ["hand", "m"]);
        let modes: Vec<_> = view
            .remote_nodes
            .iter()
            .map(|(name, n)| (name.as_str(), n.peering))
            .collect();
        assert_eq!(
            modes,
            [
                ("hand", Peering::Mesh),
                ("m", Peering::Mesh),
                ("new", Peering::OnDemand),
                ("od", Peering::OnDemand)
            ],
            "a node without a directory is none"
        );
        assert_eq!(store.published_mtus(), [1403, 1404, 1402]);

        // A new link needs no record of this node (they are its gateway's peers) ...
        files_read();
        let view = NetworkView::read_for_new_link(&store, &conf).unwrap();
        let read = files_read();
        assert_eq!(
            under(&read, &net.join("me")),
            vec![&net.join("me/gateway.json")]
        );
        assert_eq!(record_nodes(&view), ["hand", "m"]);

        // ... and joins with those of this node's records whose ADD or DEL is under way.
        let joining = Store::open(root.path(), "net", "me").unwrap();
        let _adding = joining.attachment_lock("p-me", "eth0").unwrap().unwrap();
        files_read();
        let view = NetworkView::read_for_join(&store, &conf).unwrap();
        let read = files_read();
        assert_eq!(record_nodes(&view), ["hand", "m", "me"]);
        assert!(
            !read.contains(&net.join("me/p-other:eth0.json")),
            "{read:?}"
        );
        let mut view = view;
        view.read_own_records(&store).unwrap();
        assert_eq!(view.records.len(), 4, "no record twice");

        // ... and the node gateway, which relays to every on-demand node, needs every gateway.
        let all = ["hand", "m", "new", "od"];
        let complete = NetworkView::read_complete(&store, &conf).unwrap();
        assert_eq!(gateway_nodes(&complete), all);
        let mut view = NetworkView::read(&store, &conf).unwrap();
        view.read_all_gateways(&store).unwrap();
        assert_eq!(gateway_nodes(&view), all);
        assert_eq!(
            view.desired_for_gateway().len(),
            4 + 4,
            "pods of me (2), m, hand; gateways"
        );
    }

    #[test]
    fn without_nodes_json_every_node_json_is_read_and_a_bad_one_changes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let net = root.path().join("net");
        node(&net, "me", 1, None);
        node(&net, "od", 2, Some("on-demand"));
        node(&net, "m", 3, Some("mesh"));
        let store = Store::open(root.path(), "net", "me").unwrap();
        let conf = conf(root.path());
        let read = || record_nodes(&NetworkView::read(&store, &conf).unwrap());
        assert_eq!(read(), ["m", "me"]);

        std::fs::write(net.join("nodes.json"), "{not json").unwrap();
        assert_eq!(read(), ["m", "me"]);

        // A summary that changes is read again (a new file, as the agent renames it in).
        let replace = |m: &str| {
            let temp = net.join(".tmp-nodes.json");
            write(
                &temp,
                &json!({"schema": 1, "nodes": {"m": node_json("m", 3, m)}}),
            );
            std::fs::rename(&temp, net.join("nodes.json")).unwrap();
        };
        replace("mesh");
        assert_eq!(read(), ["m", "me"]);
        files_read();
        assert_eq!(read(), ["m", "me"]);
        assert!(
            !files_read().contains(&net.join("nodes.json")),
            "parsed once"
        );
        replace("on-demand");
        assert_eq!(read(), ["me"]);
    }
}
