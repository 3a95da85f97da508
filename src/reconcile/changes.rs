//! One-peer changes: what a change elsewhere in the network (a remote pod added, removed or
//! re-addressed, a remote gateway replaced) means for this node's links, as updates that are
//! written without reading the devices. The node agent computes them from its index; the
//! links they concern get exactly these peers written, and nothing else.

use std::collections::HashMap;

use wireguard_control::Key;

use crate::wireguard::{Peer, Update};

/// Whose peer it is, which decides the links that get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A remote pod this node's pods peer with directly: every link.
    Pod,
    /// Another node's gateway, for its own and its node's addresses: the gateway, and the pod
    /// links of a node that has a gateway of its own.
    RemoteGateway,
    /// Another on-demand node's gateway, for its whole subnets: this node's gateway only.
    Relay,
}

/// A peer to add or rewrite.
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub peer: Peer,
    pub kind: PeerKind,
    /// The links did not have it before this change.
    pub new: bool,
    /// Its endpoint moved (its node was re-addressed): the endpoint is written even where
    /// WireGuard roamed.
    pub moved: bool,
}

/// The peers one change adds, rewrites and removes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PeerChanges {
    pub upsert: Vec<Upsert>,
    pub remove: Vec<Key>,
    /// Another node's gateway came, went or changed (this node's routes to node addresses
    /// follow the gateways).
    pub gateways_changed: bool,
}

impl PeerChanges {
    /// The changes that take the peers `before` to `after` (each keyed by public key): new
    /// peers, peers whose settings differ, peers that are gone. A peer whose only difference
    /// is nothing at all (a liveness flap, a rewritten file) is no change.
    pub fn between(
        before: &HashMap<Key, (Peer, PeerKind)>,
        after: &HashMap<Key, (Peer, PeerKind)>,
    ) -> PeerChanges {
        let mut changes = PeerChanges::default();
        for (key, (peer, kind)) in after {
            let old = before.get(key);
            if old.is_some_and(|(p, k)| p == peer && k == kind) {
                continue;
            }
            changes.upsert.push(Upsert {
                peer: peer.clone(),
                kind: *kind,
                new: old.is_none(),
                moved: old.is_some_and(|(p, _)| p.endpoint != peer.endpoint),
            });
        }
        let gateway = |kind: &PeerKind| *kind != PeerKind::Pod;
        for (key, (_, kind)) in before.iter().filter(|(key, _)| !after.contains_key(*key)) {
            changes.remove.push(key.clone());
            changes.gateways_changed |= gateway(kind);
        }
        changes.gateways_changed |= changes.upsert.iter().any(|u| gateway(&u.kind));
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }

    /// Append `later`'s changes (applied after these).
    pub fn extend(&mut self, later: PeerChanges) {
        let touched = |key: &Key| {
            later.remove.contains(key) || later.upsert.iter().any(|u| &u.peer.public_key == key)
        };
        self.upsert.retain(|u| !touched(&u.peer.public_key));
        self.remove.retain(|k| !touched(k));
        self.upsert.extend(later.upsert);
        self.remove.extend(later.remove);
        self.gateways_changed |= later.gateways_changed;
    }

    /// The update for one of this node's pod links; `has_gateway`: the node has a gateway,
    /// so its pods peer with the other nodes' gateways.
    pub fn for_pod_link(&self, has_gateway: bool) -> Update<'static> {
        self.update(|kind| match kind {
            PeerKind::Pod => true,
            PeerKind::RemoteGateway => has_gateway,
            PeerKind::Relay => false,
        })
    }

    /// The update for this node's gateway (every remote pod and gateway is its peer).
    pub fn for_gateway(&self) -> Update<'static> {
        self.update(|_| true)
    }

    /// The remote pods a pod link gains: it starts handshakes with them at once.
    pub fn new_pods(&self) -> Vec<Peer> {
        self.upsert
            .iter()
            .filter(|u| u.new && u.kind == PeerKind::Pod)
            .map(|u| u.peer.clone())
            .collect()
    }

    fn update(&self, wanted: impl Fn(PeerKind) -> bool) -> Update<'static> {
        let peers = self
            .upsert
            .iter()
            .filter(|u| wanted(u.kind))
            .map(|u| Peer {
                // Rewriting an endpoint that did not move would undo WireGuard's roaming.
                endpoint: if u.new || u.moved {
                    u.peer.endpoint
                } else {
                    None
                },
                ..u.peer.clone()
            })
            .collect();
        Update {
            peers,
            remove_peers: self.remove.clone(),
            ..Update::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    fn peer(ip: &str, port: u16) -> Peer {
        Peer {
            public_key: KeyPair::generate().public().clone(),
            endpoint: Some(format!("192.0.2.1:{port}").parse().unwrap()),
            allowed_ips: vec![ip.parse().unwrap()],
            keepalive: None,
            preshared_key: None,
        }
    }

    fn set(peers: &[(&Peer, PeerKind)]) -> HashMap<Key, (Peer, PeerKind)> {
        peers
            .iter()
            .map(|(p, k)| (p.public_key.clone(), ((*p).clone(), *k)))
            .collect()
    }

    #[test]
    fn only_what_differs_is_written() {
        let (a, b, c) = (
            peer("10.0.1.2/32", 1),
            peer("10.0.1.3/32", 2),
            peer("10.0.1.4/32", 3),
        );
        let mut a_moved = a.clone();
        a_moved.endpoint = Some("192.0.2.7:1".parse().unwrap());
        let mut b_wider = b.clone();
        b_wider.allowed_ips.push("10.0.1.5/32".parse().unwrap());
        let gw = peer("10.0.9.1/32", 4);
        let before = set(&[
            (&a, PeerKind::Pod),
            (&b, PeerKind::Pod),
            (&c, PeerKind::Pod),
        ]);
        let same = PeerChanges::between(&before, &before);
        assert!(same.is_empty(), "nothing changed: nothing to write");

        let after = set(&[
            (&a_moved, PeerKind::Pod),
            (&b_wider, PeerKind::Pod),
            (&gw, PeerKind::RemoteGateway),
        ]);
        let changes = PeerChanges::between(&before, &after);
        assert_eq!(changes.remove, vec![c.public_key.clone()]);
        let pod = changes.for_pod_link(false);
        assert_eq!(
            pod.peers.len(),
            2,
            "no gateway here: no remote gateway peer"
        );
        let written = |key: &Key| pod.peers.iter().find(|p| &p.public_key == key).unwrap();
        assert_eq!(written(&a.public_key).endpoint, a_moved.endpoint);
        assert_eq!(
            written(&b.public_key).endpoint,
            None,
            "an endpoint that did not move is left to roam"
        );
        assert_eq!(changes.for_gateway().peers.len(), 3);
        assert_eq!(changes.for_pod_link(true).peers.len(), 3);
        assert!(changes.new_pods().is_empty(), "the gateway is no pod");
        assert!(changes.gateways_changed);
    }

    #[test]
    fn later_changes_win_over_earlier_ones() {
        let a = peer("10.0.1.2/32", 1);
        let mut first = PeerChanges::between(&HashMap::new(), &set(&[(&a, PeerKind::Pod)]));
        let gone = PeerChanges::between(&set(&[(&a, PeerKind::Pod)]), &HashMap::new());
        first.extend(gone);
        assert!(first.upsert.is_empty());
        assert_eq!(first.remove, vec![a.public_key.clone()]);
    }
}
