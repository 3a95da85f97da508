//! Which peers of an on-demand pod link are direct peers: the promoter's (`agent::direct`) to
//! add, route and remove. The agent's resync leaves them alone and CHECK accepts them, as long
//! as each is a current pod record of the network with that pod's addresses as allowed IPs,
//! or none (pending, or cooling after idleness), and no persistent keepalive.

use std::collections::{HashMap, HashSet};

use ipnetwork::IpNetwork;
use wireguard_control::{Key, PeerConfig};

use crate::mesh;
use crate::store::{Record, State};

pub struct DirectCandidates(HashMap<Key, HashSet<IpNetwork>>);

impl DirectCandidates {
    /// From every record of the network (this node's pods count: pairs on one node promote
    /// too).
    pub fn of(records: &[Record]) -> DirectCandidates {
        DirectCandidates(
            records
                .iter()
                .filter(|r| r.state == State::Ready)
                .filter_map(|r| {
                    let peer = mesh::peer_of(r, None).ok()?;
                    Some((peer.public_key, peer.allowed_ips.into_iter().collect()))
                })
                .collect(),
        )
    }

    /// A pod known as the peer it is when direct (its addresses as allowed IPs).
    pub fn add(&mut self, peer: &crate::wireguard::Peer) {
        self.0.insert(
            peer.public_key.clone(),
            peer.allowed_ips.iter().copied().collect(),
        );
    }

    pub fn accepts(&self, peer: &PeerConfig) -> bool {
        if peer.persistent_keepalive_interval.is_some_and(|s| s > 0) {
            return false;
        }
        let Some(addresses) = self.0.get(&peer.public_key) else {
            return false;
        };
        let allowed: HashSet<IpNetwork> = peer
            .allowed_ips
            .iter()
            .filter_map(|ip| IpNetwork::new(ip.address, ip.cidr).ok())
            .collect();
        allowed.is_empty() || allowed == *addresses
    }
}
