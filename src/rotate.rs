//! Key rotation of a running pod link (`wg-cni rotate`, and the agent's `keyRotation`): a
//! fresh key from the OS RNG, in this process only (wiped when dropped, never written or
//! printed), and every holder of the old key moved to the new one, without restarting the pod.
//!
//! The sequence, under the attachment's lock and the network's (the lock is held for
//! milliseconds: no device is read but the pod's own):
//! 1. the record names the next key (`nextPublicKey`) beside the current one: from here a DEL
//!    or GC proves the link ours by either key and withdraws both;
//! 2. this node's holders learn the next key, unrouted (key and endpoint, no addresses): the
//!    node gateway, and in mesh mode the other local pods. The pod's first handshake under the
//!    new key is then answered at once, while its addresses still lead to the old key;
//! 3. the switch, one message to the pod's link: the new private key, and on-demand its direct
//!    peers dropped (their other ends hold the old key; the pair goes back to the relay, and
//!    both agents promote it again under the new key when traffic flows);
//! 4. the record names the new key (`publicKey`, `previousPublicKey` = the old one); the node
//!    agent publishes it, and other nodes move their links to it as for any record change;
//! 5. the local holders route the pod's addresses to the new key and drop the old one (on-demand:
//!    the gateway, and the local pods that held it as a direct peer drop it); the pod starts
//!    handshakes with them at once.
//!
//! Killed anywhere (`kill -9`), the pod stays deletable (DEL and GC accept either key and
//! withdraw all of them), and reachable unless the kill fell between 3 and 5; running the
//! rotation again finishes one that switched the link, or starts afresh.

use std::time::Duration;

use wireguard_control::Key;

use crate::cni::{Error, NetConf, Peering, Result};
use crate::failpoint;
use crate::host;
use crate::keys::KeyPair;
use crate::mesh;
use crate::netns::Netns;
use crate::reconcile::{self, NetworkView};
use crate::store::{Record, State, Store};
use crate::wireguard::{self, Update};

/// One attachment rotated: its old and new public keys.
#[derive(Debug, Clone)]
pub struct Rotated {
    pub container_id: String,
    pub ifname: String,
    pub old_key: String,
    pub new_key: String,
    /// How long the locks were held (the switch itself is one message inside).
    pub took: Duration,
}

/// The node whose pods a rotation concerns.
pub struct Node<'a> {
    pub name: &'a str,
    pub boot_id: &'a str,
    pub host: &'a Netns,
}

impl Node<'_> {
    fn local(&self) -> reconcile::Node<'_> {
        reconcile::Node {
            name: self.name,
            boot_id: self.boot_id,
            host: self.host,
        }
    }
}

/// Rotate the key of one attachment of this node.
pub fn rotate(node: &Node, conf: &NetConf, container_id: &str, ifname: &str) -> Result<Rotated> {
    let rotated = rotate_if(node, conf, container_id, ifname, |_| true)?;
    Ok(rotated.expect("asked unconditionally"))
}

/// Finish the rotation a killed `wg-cni rotate` left (the record names a next key): one killed
/// after its switch is completed, one killed before it is done afresh (its next key died with
/// it). Nothing when no next key is left by the time the locks are held (the agent's repair:
/// it must not rotate again a key that a rotation it waited for just replaced).
pub fn finish_killed(
    node: &Node,
    conf: &NetConf,
    container_id: &str,
    ifname: &str,
) -> Result<Option<Rotated>> {
    rotate_if(node, conf, container_id, ifname, |r| {
        r.next_public_key.is_some()
    })
}

/// When `record`'s key is due for rotation under `keyRotation` = `period` (Unix seconds): its
/// age reaches the period less a spread of up to a tenth of it, fixed per attachment, so the
/// pods of a node added together (or all rotated at one start) do not come due together.
pub fn due_at(record: &Record, period: Duration) -> u64 {
    let period = period.as_secs();
    let spread = fnv1a(&[&record.container_id, ":", &record.ifname]) % (period / 10).max(1);
    record.key_since() + period - spread
}

/// FNV-1a: a hash that stays the same across builds and processes (`show` and the agent
/// compute the same due time).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn rotate_if(
    node: &Node,
    conf: &NetConf,
    container_id: &str,
    ifname: &str,
    wanted: impl Fn(&Record) -> bool,
) -> Result<Option<Rotated>> {
    let started = std::time::Instant::now();
    let unknown = || {
        Error::UnknownContainer(format!(
            "network {} has no attachment {container_id}/{ifname} on node {}: check --container, --ifname and --node (`wg-cni show` lists them)",
            conf.name, node.name
        ))
    };
    let store = Store::open_existing(&conf.store, &conf.name, node.name)?.ok_or_else(unknown)?;
    // A DEL of the attachment waits for the rotation, and the other way round.
    let _attachment = store.attachment_lock(container_id, ifname)?;
    let _lock = store.lock()?;
    let record = store.get(container_id, ifname)?.ok_or_else(unknown)?;
    if !wanted(&record) {
        return Ok(None);
    }
    let (pod, carried) = live_key(node, &record)?;
    failpoint::crash("rotate-locked");
    let view = NetworkView::read(&store, conf)?;
    let old_key = record.public_key.clone();
    // A next key of a rotation killed before its switch: its holders drop it at the end.
    let abandoned = match carried {
        Carried::Current => record.next_public_key.clone(),
        Carried::Next => None,
    };
    let switched = match carried {
        Carried::Current => {
            let keypair = KeyPair::generate();
            let rotating = Record {
                next_public_key: Some(keypair.public().to_base64()),
                ..record
            };
            store.put(&rotating)?;
            failpoint::crash("rotate-next-recorded");
            prepare_holders(node, &store, &view, &rotating);
            failpoint::crash("rotate-prepared");
            switch_link(&view, &rotating, &pod, &keypair)?;
            // The private key is wiped here; nothing else ever held it.
            drop(keypair);
            failpoint::crash("rotate-switched");
            rotating
        }
        // A rotation killed after its switch: the link has the next key already.
        Carried::Next => record,
    };
    let rotated = finish(node, &store, &view, switched, abandoned, &pod)?;
    tracing::info!(container = container_id, ifname, old = %old_key, new = %rotated.public_key, "key rotated");
    Ok(Some(Rotated {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        old_key,
        new_key: rotated.public_key,
        took: started.elapsed(),
    }))
}

/// Rotate every ready attachment of this node in the network, one after the other (each
/// under its own locks: ADDs and DELs go on between them). One that fails is reported and the
/// others go on.
pub fn rotate_all(node: &Node, conf: &NetConf) -> Vec<(String, String, Result<Rotated>)> {
    let records = Store::open_existing(&conf.store, &conf.name, node.name)
        .ok()
        .flatten()
        .and_then(|store| store.node_records().ok())
        .unwrap_or_default();
    records
        .into_iter()
        .filter(|r| r.state == State::Ready && r.boot_id == node.boot_id)
        .map(|r| {
            let rotated = rotate(node, conf, &r.container_id, &r.ifname);
            (r.container_id, r.ifname, rotated)
        })
        .collect()
}

/// Which of the record's keys the link carries.
enum Carried {
    Current,
    Next,
}

/// The pod namespace of a ready attachment of this boot, and which recorded key its link
/// carries; any other key means the link is not the one recorded, and it is left alone.
fn live_key(node: &Node, record: &Record) -> Result<(Netns, Carried)> {
    let what = format!("{}/{}", record.container_id, record.ifname);
    if record.state != State::Ready || record.boot_id != node.boot_id {
        return Err(Error::TryAgainLater(format!(
            "{what} is not a ready attachment of this boot (it is being added or deleted, or its pod died with a reboot): nothing rotated"
        )));
    }
    let pod = record.live_netns(None).ok_or_else(|| {
        Error::TryAgainLater(format!(
            "the pod namespace of {what} is gone (its DEL is due): nothing rotated"
        ))
    })?;
    let device = wireguard::backend(record.backend).read(&record.link(Some(&pod)))?;
    let carried = device.public_key.map(|k| k.to_base64());
    match carried {
        Some(key) if key == record.public_key => Ok((pod, Carried::Current)),
        Some(key) if Some(&key) == record.next_public_key.as_ref() => Ok((pod, Carried::Next)),
        _ => Err(Error::Check(format!(
            "the link of {what} carries a key its record does not name (`wg-cni` CHECK reports it): nothing rotated"
        ))),
    }
}

/// Step 2: the next key, unrouted, on this node's other holders of the pod's key.
fn prepare_holders(node: &Node, store: &Store, view: &NetworkView, rotating: &Record) {
    let Some(next) = mesh::next_peer_of(rotating, view.session_keepalive()) else {
        return;
    };
    let prepared = Update {
        peers: vec![next],
        ..Update::default()
    };
    tell_holders(node, store, view, rotating, &prepared);
}

/// Step 3: the new private key on the pod's link; on-demand, its direct peers go with it (the
/// promoters' pairs: anything beyond the link's desired peer set).
fn switch_link(
    view: &NetworkView,
    rotating: &Record,
    pod: &Netns,
    keypair: &KeyPair,
) -> Result<()> {
    let link = rotating.link(Some(pod));
    let backend = wireguard::backend(rotating.backend);
    let remove_peers = match view.peering {
        Peering::OnDemand => {
            let desired: Vec<Key> = view
                .desired_for_pod(rotating)?
                .into_iter()
                .map(|p| p.public_key)
                .collect();
            backend
                .read(&link)?
                .peers
                .into_iter()
                .map(|p| p.config.public_key)
                .filter(|key| !desired.contains(key))
                .collect()
        }
        Peering::Mesh => Vec::new(),
    };
    backend.apply(
        &link,
        &Update {
            keypair: Some(keypair),
            remove_peers,
            ..Update::default()
        },
    )
}

/// Steps 4 and 5: the record names the new key, the local holders route to it and drop the
/// old ones (and `abandoned`, a dead rotation's next key), the pod starts handshakes with them.
fn finish(
    node: &Node,
    store: &Store,
    view: &NetworkView,
    switched: Record,
    abandoned: Option<String>,
    pod: &Netns,
) -> Result<Record> {
    let new_key = switched
        .next_public_key
        .clone()
        .expect("a switched record names its next key");
    // What the holders may still hold: the key replaced now, one an earlier rotation killed
    // before step 5 left, and the next key of one killed before its switch.
    let stale: Vec<Key> = std::iter::once(switched.public_key.as_str())
        .chain(switched.previous_public_key.as_deref())
        .chain(abandoned.as_deref())
        .filter_map(|k| Key::from_base64(k).ok())
        .collect();
    let rotated = Record {
        previous_public_key: Some(switched.public_key.clone()),
        public_key: new_key,
        next_public_key: None,
        key_created_at: Some(host::now_unix()),
        ..switched
    };
    store.put(&rotated)?;
    failpoint::crash("rotate-recorded");
    let routed = Update {
        peers: vec![mesh::peer_of(&rotated, view.session_keepalive())?],
        remove_peers: stale,
        ..Update::default()
    };
    tell_holders(node, store, view, &rotated, &routed);
    failpoint::crash("rotate-told");
    let local: Vec<_> = view
        .desired_for_pod(&rotated)?
        .into_iter()
        .filter(|p| is_local_peer(view, &p.public_key))
        .collect();
    let link = rotated.link(Some(pod));
    if let Err(e) = reconcile::start_handshakes(rotated.backend, &link, &local) {
        tracing::debug!(error = %e, "could not start the handshakes under the new key");
    }
    Ok(rotated)
}

/// This node's gateway, or one of this node's pods.
fn is_local_peer(view: &NetworkView, key: &Key) -> bool {
    let text = key.to_base64();
    view.gateway.as_ref().is_some_and(|g| g.public_key == text)
        || view
            .records
            .iter()
            .any(|r| r.node == view.node && r.public_key == text)
}

/// Send `update` to this node's holders of `record`'s key: the node gateway, and the other
/// local pod links: in mesh mode all of it; on-demand only its removals (a local pod that held
/// the pod as a direct peer drops the old key, its pair goes back to the relay and is promoted
/// again under the new key; one that did not hold it ignores the removal). A link that refuses
/// is noted for the next command's resync (as ADD's and DEL's fan-outs do); the gateway's
/// refusal is logged (the agent's resync repairs it).
fn tell_holders(node: &Node, store: &Store, view: &NetworkView, record: &Record, update: &Update) {
    let removals = Update {
        remove_peers: update.remove_peers.clone(),
        ..Update::default()
    };
    let to_pods = match view.peering {
        Peering::Mesh => Some(update),
        Peering::OnDemand => Some(&removals).filter(|u| !u.remove_peers.is_empty()),
    };
    if let Some(to_pods) = to_pods {
        let others = |r: &Record| !r.is_attachment(&record.container_id, &record.ifname);
        let refused = reconcile::tell_local_pods(&node.local(), view, others, to_pods);
        if !refused.is_empty()
            && let Err(e) = store.note_out_of_step(&refused)
        {
            tracing::warn!(error = %e, "could not note the links a rotation missed");
        }
    }
    if let Err(e) = reconcile::tell_gateway(&node.local(), view, update) {
        tracing::warn!(error = %e, "could not move the node gateway to the rotated key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_spread_over_a_tenth_of_the_period_and_stay_put() {
        let template: Record = serde_json::from_value(serde_json::json!({"schema": 1,
            "state": "ready", "network": "n", "node": "a", "containerId": "c0",
            "ifname": "eth0", "publicKey": "k", "addresses": ["10.0.0.2/32"],
            "endpoint": "192.0.2.1", "listenPort": 52000, "bootId": "b", "hostName": "h",
            "backend": "userspace", "mtu": 1420, "createdAt": 1000}))
        .unwrap();
        let day = Duration::from_secs(86_400);
        let dues: Vec<u64> = (0..100)
            .map(|i| {
                let r = Record {
                    container_id: format!("c{i}"),
                    ..template.clone()
                };
                assert_eq!(due_at(&r, day), due_at(&r, day), "stable");
                due_at(&r, day)
            })
            .collect();
        assert!(
            dues.iter()
                .all(|d| (1000 + 86_400 - 8640..=1000 + 86_400).contains(d))
        );
        let distinct: std::collections::BTreeSet<_> = dues.iter().collect();
        assert!(distinct.len() > 90, "pods added together come due apart");
        let rotated = Record {
            key_created_at: Some(5000),
            ..template
        };
        assert!(
            due_at(&rotated, day) > 5000 + 86_400 - 8640,
            "counted from the key's time"
        );
    }
}
