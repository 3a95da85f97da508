//! The agent's in-memory index of one network: every trusted remote record by node and file
//! (as the mirror writes them), with the peer each one gives this node's links. A new trusted set becomes a `Delta`: the files to write or remove, and
//! the one-peer changes for the links. The store directory stays the plugin's source of
//! truth; the index only saves the agent from reading it back on every event.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use wireguard_control::Key;

use super::directory::{RemotePod, SharedDirectory};
use super::mirror::NODE_FILE;
use crate::cni::Peering;
use crate::gateway;
use crate::mesh;
use crate::reconcile::{PeerChanges, PeerKind, SESSION_KEEPALIVE};
use crate::store::{GatewayRecord, Record, RemoteNode, State};
use crate::wireguard::Peer;

/// A mirror file's body, shared between the index and the jobs that write it.
pub type Body = Arc<[u8]>;
/// Remote node → file name → body: the trusted set as the mirror directories hold it.
pub type Snapshot = BTreeMap<String, BTreeMap<String, Body>>;

const GATEWAY_FILE: &str = "gateway.json";

/// One mirror file to write (`Some`) or remove (`None`).
#[derive(Debug, Clone)]
pub struct FileChange {
    pub node: String,
    pub file: String,
    pub body: Option<Body>,
}

/// What one change of the trusted set means on this node.
#[derive(Debug, Default)]
pub struct Delta {
    pub files: Vec<FileChange>,
    pub peers: PeerChanges,
    /// Remote attachments whose file now names another public key (a rotation, seen).
    pub keys_changed: usize,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.peers.is_empty()
    }
}

struct Indexed {
    body: Body,
    peer: Option<(Peer, PeerKind)>,
    /// The key under which the file's pod is in the directory.
    pod: Option<Key>,
}

/// What the peers of a node's files depend on besides the files themselves: how this node
/// and that one peer, and what the membership layer accepted of it (its `node.json`).
#[derive(Clone)]
struct Context {
    relayed: bool,
    node: RemoteNode,
    /// The node's `node.json` is mirrored: without it the node's peering is not known yet
    /// (taken as mesh until it comes), which is no mesh node turning on-demand.
    described: bool,
}

/// Whether the node's files would give other peers: `described` only tells why.
impl PartialEq for Context {
    fn eq(&self, other: &Context) -> bool {
        self.relayed == other.relayed && self.node == other.node
    }
}

pub struct Index {
    keepalive: Option<u16>,
    peering: Peering,
    /// Remote pods by address and key, for the promoter.
    directory: SharedDirectory,
    nodes: BTreeMap<String, BTreeMap<String, Indexed>>,
    contexts: BTreeMap<String, Context>,
    /// Nodes whose node.json says stale.
    stale: std::collections::BTreeSet<String>,
    /// How many files give a peer.
    peers: usize,
}

impl Index {
    pub fn directory(&self) -> SharedDirectory {
        self.directory.clone()
    }

    /// The network was listed in full and the index took it in: the directory is complete.
    pub fn mark_complete(&self) {
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .mark_complete();
    }

    /// An empty index; `directory` is emptied with it (a restarted loop lists anew).
    pub fn new(keepalive: Option<u16>, peering: Peering, directory: SharedDirectory) -> Index {
        directory.write().unwrap_or_else(|p| p.into_inner()).clear();
        Index {
            keepalive,
            peering,
            directory,
            nodes: BTreeMap::new(),
            contexts: BTreeMap::new(),
            stale: Default::default(),
            peers: 0,
        }
    }

    /// Take the nodes in `trusted` to the files it names (an empty map: the node has none);
    /// other nodes stay as they are. Answers the files that differ and the peers that change.
    /// Cost: one comparison per file of those nodes, one decode per changed file.
    pub fn update(&mut self, trusted: BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Delta {
        let mut delta = Delta::default();
        let mut before = Peers::new();
        let mut after = Peers::new();
        let mut pods = PodChanges::default();
        for (node, files) in trusted {
            let mut context = self.context(&files);
            // Staleness changes no peer (a stale node's pods stay for the grace period): only
            // the directory hears of it.
            let stale = std::mem::take(&mut context.node.stale) && !files.is_empty();
            if stale != self.stale.contains(&node) {
                match stale {
                    true => self.stale.insert(node.clone()),
                    false => self.stale.remove(&node),
                };
                pods.stale.push((node.clone(), stale));
            }
            let known = self.nodes.entry(node.clone()).or_default();
            if self.contexts.get(&node) != Some(&context) {
                // A mesh node turning on-demand (its agent upgraded or reconfigured): each of
                // its pods' peers that the same record still gives as a direct peer stays on
                // the links, for the promoter to adopt and trim when idle. Removed, the pods'
                // traffic would stop until the promoter saw it relayed (about a second).
                let handover = context.relayed
                    && self
                        .contexts
                        .get(&node)
                        .is_some_and(|c| c.described && !c.relayed);
                // How this node is peered changed: every file of it counts as changed.
                for (file, old) in std::mem::take(known) {
                    pods.gone(&old);
                    let direct =
                        |body: &Vec<u8>| remote_pod(&file, body, &node, &context).map(|p| p.peer);
                    let stays_direct = handover
                        && matches!(&old.peer, Some((_, PeerKind::Pod)))
                        && files.get(&file).and_then(direct).as_ref()
                            == old.peer.as_ref().map(|(p, _)| p);
                    if stays_direct {
                        continue;
                    }
                    if files.contains_key(&file) {
                        keep(&mut before, &old.peer);
                    } else {
                        removed(&mut before, &mut delta, &node, file, old);
                    }
                }
                self.contexts.insert(node.clone(), context.clone());
            }
            let unwanted: Vec<String> = known
                .keys()
                .filter(|f| !files.contains_key(*f))
                .cloned()
                .collect();
            for file in unwanted {
                let old = known.remove(&file).expect("listed");
                pods.gone(&old);
                removed(&mut before, &mut delta, &node, file, old);
            }
            for (file, body) in files {
                if known.get(&file).is_some_and(|k| *k.body == *body) {
                    continue;
                }
                let body: Body = body.into();
                let pod = remote_pod(&file, &body, &node, &context);
                let indexed = Indexed {
                    peer: peer_of(&file, &body, &context, self.keepalive),
                    pod: pod.as_ref().map(|p| p.peer.public_key.clone()),
                    body: body.clone(),
                };
                keep(&mut after, &indexed.peer);
                let key = indexed.pod.clone();
                if let Some(old) = known.insert(file.clone(), indexed) {
                    if old.pod.is_some() && key.is_some() && old.pod != key {
                        delta.keys_changed += 1;
                    }
                    pods.gone(&old);
                    keep(&mut before, &old.peer);
                }
                pods.came.extend(pod);
                delta.files.push(FileChange {
                    node: node.clone(),
                    file,
                    body: Some(body),
                });
            }
        }
        self.nodes.retain(|_, files| !files.is_empty());
        let nodes = &self.nodes;
        self.contexts.retain(|node, _| nodes.contains_key(node));
        pods.apply(&self.directory);
        self.peers = (self.peers + after.len()).saturating_sub(before.len());
        delta.peers = PeerChanges::between(&before, &after);
        delta
    }

    /// Every trusted file, for a resync that reads the mirror directories back.
    pub fn snapshot(&self) -> Snapshot {
        self.nodes
            .iter()
            .map(|(node, files)| {
                let files = files
                    .iter()
                    .map(|(f, i)| (f.clone(), i.body.clone()))
                    .collect();
                (node.clone(), files)
            })
            .collect()
    }

    /// How many remote peers (pods and gateways) the index holds.
    pub fn peers(&self) -> usize {
        self.peers
    }
}

type Peers = HashMap<Key, (Peer, PeerKind)>;

/// What one update changes in the directory, applied under one write lock at its end.
#[derive(Default)]
struct PodChanges {
    gone: Vec<Key>,
    came: Vec<RemotePod>,
    stale: Vec<(String, bool)>,
}

impl PodChanges {
    fn gone(&mut self, old: &Indexed) {
        self.gone.extend(old.pod.clone());
    }

    fn apply(self, directory: &SharedDirectory) {
        if self.gone.is_empty() && self.came.is_empty() && self.stale.is_empty() {
            return;
        }
        let mut directory = directory.write().unwrap_or_else(|p| p.into_inner());
        for key in &self.gone {
            directory.remove(key);
        }
        for pod in self.came {
            directory.insert(pod);
        }
        for (node, stale) in &self.stale {
            directory.set_stale(node, *stale);
        }
        directory.wake_if_changed();
    }
}

impl Index {
    /// A node's context from its trusted files (its `node.json`; none: a mesh node).
    fn context(&self, files: &BTreeMap<String, Vec<u8>>) -> Context {
        let described: Option<RemoteNode> = files
            .get(NODE_FILE)
            .and_then(|body| serde_json::from_slice(body).ok());
        let node = described.clone().unwrap_or_default();
        Context {
            relayed: self.peering == Peering::OnDemand && node.peering == Peering::OnDemand,
            node,
            described: described.is_some(),
        }
    }
}

/// A file that leaves the index: removed from the mirror, its peer from the links.
fn removed(before: &mut Peers, delta: &mut Delta, node: &str, file: String, old: Indexed) {
    keep(before, &old.peer);
    delta.files.push(FileChange {
        node: node.to_string(),
        file,
        body: None,
    });
}

fn keep(peers: &mut Peers, peer: &Option<(Peer, PeerKind)>) {
    if let Some((peer, kind)) = peer {
        peers.insert(peer.public_key.clone(), (peer.clone(), *kind));
    }
}

/// The ready pod a mirror file describes, as the directory holds it.
fn remote_pod(file: &str, body: &[u8], node: &str, context: &Context) -> Option<RemotePod> {
    if file == NODE_FILE || file == GATEWAY_FILE {
        return None;
    }
    let record: Record = serde_json::from_slice(body).ok()?;
    if record.state != State::Ready {
        return None;
    }
    Some(RemotePod {
        node: node.to_string(),
        peer: mesh::peer_of(&record, None).ok()?,
        relayed: context.relayed,
    })
}

/// The peer a mirror file gives this node's links, the way `NetworkView` computes it: a
/// ready remote pod (unless its node is relayed), or another node's gateway (the relay for
/// that node's subnets, or its own and its node's addresses). `node.json` and anything
/// unreadable give none.
fn peer_of(
    file: &str,
    body: &[u8],
    context: &Context,
    keepalive: Option<u16>,
) -> Option<(Peer, PeerKind)> {
    if file == NODE_FILE {
        return None;
    }
    if file == GATEWAY_FILE {
        let gateway: GatewayRecord = serde_json::from_slice(body).ok()?;
        if context.relayed {
            let session = Some(keepalive.unwrap_or(SESSION_KEEPALIVE));
            let peer = gateway::peer_for_relay(&gateway, &context.node, session).ok()?;
            return Some((peer, PeerKind::Relay));
        }
        let peer = gateway::peer_for_remote_pods(&gateway, keepalive).ok()?;
        return Some((peer, PeerKind::RemoteGateway));
    }
    if context.relayed {
        return None;
    }
    let record: Record = serde_json::from_slice(body).ok()?;
    if record.state != State::Ready {
        return None;
    }
    let peer = mesh::peer_of(&record, keepalive).ok()?;
    Some((peer, PeerKind::Pod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    fn record(node: &str, id: &str, address: &str, endpoint: &str) -> (String, Vec<u8>) {
        let key = KeyPair::generate().public().to_base64();
        record_with_key(node, id, address, endpoint, &key)
    }

    fn record_with_key(
        node: &str,
        id: &str,
        address: &str,
        endpoint: &str,
        key: &str,
    ) -> (String, Vec<u8>) {
        let body = serde_json::json!({"schema": 1, "state": "ready", "network": "n",
            "node": node, "containerId": id, "ifname": "eth0", "publicKey": key,
            "addresses": [address], "endpoint": endpoint, "listenPort": 52000,
            "bootId": "b", "hostName": "wgc0", "backend": "userspace", "mtu": 1420,
            "createdAt": 1});
        (
            format!("{id}:eth0.json"),
            serde_json::to_vec(&body).unwrap(),
        )
    }

    fn trusted(
        files: &[(&str, &(String, Vec<u8>))],
    ) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        let mut t: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
        for (node, (file, body)) in files {
            t.entry(node.to_string())
                .or_default()
                .insert(file.clone(), body.clone());
        }
        t
    }

    #[test]
    fn one_event_is_one_peer_and_a_rewrite_is_none() {
        let mut index = Index::new(None, Peering::Mesh, SharedDirectory::default());
        let a = record("n2", "a", "10.0.2.2/32", "192.0.2.2");
        let b = record("n2", "b", "10.0.2.3/32", "192.0.2.2");
        let c = record("n3", "c", "10.0.3.2/32", "192.0.2.3");
        let first = index.update(trusted(&[("n2", &a)]));
        assert_eq!(first.files.len(), 1);
        assert_eq!(first.peers.new_pods().len(), 1);

        let untouched = index.update(trusted(&[("n3", &c)]));
        assert_eq!(untouched.peers.upsert.len(), 1, "another node's: n2 stays");
        let second = index.update(trusted(&[("n2", &a), ("n2", &b)]));
        assert_eq!(second.files.len(), 1, "only b's file is written");
        assert_eq!(second.peers.upsert.len(), 1);
        assert!(second.peers.remove.is_empty());
        assert_eq!(index.peers(), 3);

        let same = index.update(trusted(&[("n2", &a), ("n2", &b)]));
        assert!(same.is_empty(), "nothing changed: {same:?}");

        let without_a = index.update(trusted(&[("n2", &b)]));
        assert_eq!(without_a.peers.remove.len(), 1);
        assert!(without_a.peers.upsert.is_empty());
        assert_eq!(index.peers(), 2);

        let empty = index.update(BTreeMap::from([("n2".to_string(), BTreeMap::new())]));
        assert_eq!(
            empty.peers.remove.len(),
            1,
            "a node that leaves takes its peers"
        );
        assert_eq!(index.peers(), 1);
        assert_eq!(index.snapshot().len(), 1);
    }

    #[test]
    fn a_mesh_node_turning_on_demand_leaves_its_pods_peers_for_the_promoter() {
        let directory = SharedDirectory::default();
        let mut index = Index::new(None, Peering::OnDemand, directory.clone());
        let a = record("n2", "a", "10.0.2.2/32", "192.0.2.2");
        let key = KeyPair::generate().public().to_base64();
        let b = record_with_key("n2", "b", "10.0.2.3/32", "192.0.2.2", &key);
        let on_demand = (
            NODE_FILE.to_string(),
            serde_json::to_vec(&serde_json::json!({ "peering": "on-demand" })).unwrap(),
        );
        let mesh_file = (
            NODE_FILE.to_string(),
            serde_json::to_vec(&serde_json::json!({ "peering": "mesh" })).unwrap(),
        );
        let mesh = index.update(trusted(&[("n2", &a), ("n2", &b), ("n2", &mesh_file)]));
        assert_eq!(
            mesh.peers.new_pods().len(),
            2,
            "a mesh node's pods are peers"
        );

        // The node turns on-demand; b moves in the same update.
        let b_moved = record_with_key("n2", "b", "10.0.2.3/32", "192.0.2.9", &key);
        let turned = index.update(trusted(&[("n2", &a), ("n2", &b_moved), ("n2", &on_demand)]));
        assert_eq!(
            turned.peers.remove.len(),
            1,
            "only the moved pod's peer goes: a's stays as a direct peer"
        );
        assert!(turned.peers.upsert.is_empty(), "{:?}", turned.peers);
        assert!(
            directory.read().unwrap().pods().all(|p| p.relayed),
            "the promoter's to adopt"
        );

        let gone = index.update(trusted(&[("n2", &b_moved), ("n2", &on_demand)]));
        assert!(
            gone.peers.remove.is_empty(),
            "a's peer is the promoter's now: it removes it when a goes"
        );
    }

    #[test]
    fn pods_seen_before_their_nodes_file_are_no_mesh_node_turning_on_demand() {
        let mut index = Index::new(None, Peering::OnDemand, SharedDirectory::default());
        let a = record("n2", "a", "10.0.2.2/32", "192.0.2.2");
        let on_demand = (
            NODE_FILE.to_string(),
            serde_json::to_vec(&serde_json::json!({ "peering": "on-demand" })).unwrap(),
        );
        let early = index.update(trusted(&[("n2", &a)]));
        assert_eq!(
            early.peers.new_pods().len(),
            1,
            "peering unknown: taken as mesh"
        );
        let described = index.update(trusted(&[("n2", &a), ("n2", &on_demand)]));
        assert_eq!(
            described.peers.remove.len(),
            1,
            "the node was never described as mesh: its pod's peer goes"
        );
    }

    #[test]
    fn a_node_file_moves_no_peer_and_a_moved_record_is_moved() {
        let mut index = Index::new(None, Peering::Mesh, SharedDirectory::default());
        let key = KeyPair::generate().public().to_base64();
        let a = record_with_key("n2", "a", "10.0.2.2/32", "192.0.2.2", &key);
        let node_file = |stale: bool| {
            (
                NODE_FILE.to_string(),
                serde_json::to_vec(&serde_json::json!({ "stale": stale })).unwrap(),
            )
        };
        index.update(trusted(&[("n2", &a), ("n2", &node_file(false))]));
        let flap = index.update(trusted(&[("n2", &a), ("n2", &node_file(true))]));
        assert_eq!(flap.files.len(), 1, "node.json is rewritten");
        assert!(flap.peers.is_empty(), "but no link is touched");

        let moved = record_with_key("n2", "a", "10.0.2.2/32", "192.0.2.7", &key);
        let delta = index.update(trusted(&[("n2", &moved), ("n2", &node_file(true))]));
        assert_eq!(delta.peers.upsert.len(), 1);
        assert!(delta.peers.upsert[0].moved && !delta.peers.upsert[0].new);
        assert_eq!(delta.keys_changed, 0, "moved, same key");

        // The same attachment with a new key: a rotation seen (and the new key a new peer).
        let rotated = KeyPair::generate().public().to_base64();
        let a2 = record_with_key("n2", "a", "10.0.2.2/32", "192.0.2.7", &rotated);
        let delta = index.update(trusted(&[("n2", &a2), ("n2", &node_file(true))]));
        assert_eq!(delta.keys_changed, 1);
        assert_eq!(delta.peers.remove.len(), 1);
    }

    #[test]
    fn a_second_key_in_a_remote_record_plants_nothing() {
        // A rotation's next key is local only (never published): a node that writes one
        // naming another pod's key gets no peer for it, and the victim's peer stays as it is.
        let mut index = Index::new(None, Peering::Mesh, SharedDirectory::default());
        let victim_key = KeyPair::generate().public().to_base64();
        let victim = record_with_key("n2", "v", "10.0.2.2/32", "192.0.2.2", &victim_key);
        index.update(trusted(&[("n2", &victim)]));
        let (file, body) = record("n3", "x", "10.0.3.2/32", "192.0.2.3");
        let mut forged: serde_json::Value = serde_json::from_slice(&body).unwrap();
        forged["nextPublicKey"] = victim_key.clone().into();
        forged["previousPublicKey"] = victim_key.clone().into();
        let forged = (file, serde_json::to_vec(&forged).unwrap());
        let delta = index.update(trusted(&[("n3", &forged)]));
        assert_eq!(
            delta.peers.upsert.len(),
            1,
            "the forged record's own key only"
        );
        let upsert = &delta.peers.upsert[0].peer;
        assert_ne!(upsert.public_key.to_base64(), victim_key);
        assert_eq!(upsert.allowed_ips, vec!["10.0.3.2/32".parse().unwrap()]);
        assert!(delta.peers.remove.is_empty());
        let directory = index.directory();
        let directory = directory.read().unwrap();
        let key = Key::from_base64(&victim_key).unwrap();
        assert_eq!(directory.by_key(&key).unwrap().node, "n2");
    }
}

#[cfg(test)]
mod directory_tests {
    use super::*;
    use crate::keys::KeyPair;

    fn file(name: &str, body: serde_json::Value) -> (String, Vec<u8>) {
        (name.to_string(), serde_json::to_vec(&body).unwrap())
    }

    fn pod(id: &str, address: &str) -> (String, Vec<u8>) {
        let key = KeyPair::generate().public().to_base64();
        file(
            &format!("{id}:eth0.json"),
            serde_json::json!({"schema": 1, "state": "ready", "network": "n", "node": "n2",
                "containerId": id, "ifname": "eth0", "publicKey": key,
                "addresses": [address], "endpoint": "192.0.2.2", "listenPort": 52000,
                "bootId": "b", "hostName": "wgc0", "backend": "userspace", "mtu": 1420,
                "createdAt": 1}),
        )
    }

    fn set(files: &[&(String, Vec<u8>)]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        let files = files.iter().map(|(f, b)| (f.clone(), b.clone())).collect();
        BTreeMap::from([("n2".to_string(), files)])
    }

    #[test]
    fn the_directory_follows_on_demand_pods_and_stale_nodes() {
        let directory = SharedDirectory::default();
        let mut index = Index::new(None, Peering::OnDemand, directory.clone());
        let node = |stale: bool| {
            file(
                NODE_FILE,
                serde_json::json!({"peering": "on-demand", "stale": stale}),
            )
        };
        let a = pod("a", "10.0.2.2/32");
        let ip: std::net::IpAddr = "10.0.2.2".parse().unwrap();
        let delta = index.update(set(&[&a, &node(false)]));
        assert!(delta.peers.is_empty(), "an on-demand node's pod is no peer");
        {
            let d = directory.read().unwrap();
            let found = d.by_address(&ip).expect("a by address");
            assert!(found.relayed && found.node == "n2");
            assert!(d.by_key(&found.peer.public_key).is_some());
            assert!(!d.is_stale("n2"));
        }
        index.update(set(&[&a, &node(true)]));
        assert!(directory.read().unwrap().is_stale("n2"));
        index.update(set(&[&node(true)]));
        assert!(
            directory.read().unwrap().by_address(&ip).is_none(),
            "a left"
        );
        index.update(BTreeMap::from([("n2".to_string(), BTreeMap::new())]));
        assert!(!directory.read().unwrap().is_stale("n2"), "the node left");
    }
}

/// Not part of the suite (`--ignored`, best with `--release`): what one event costs the
/// network loop in memory work at scale (evaluation of the trusted set, then the index).
#[cfg(test)]
mod cost {
    use super::*;
    use crate::agent::datastore::{Change, Entry};
    use crate::agent::keys::{Keys, LinkName};
    use crate::agent::membership::Policy;
    use crate::agent::mirror::Mirror;
    use crate::keys::KeyPair;

    #[test]
    #[ignore]
    fn one_event_at_ten_thousand_records() {
        let keys = Keys::new("n");
        let policy = Policy {
            cluster_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            ..Policy::default()
        };
        let mut mirror = Mirror::new(keys.clone(), "me", policy);
        let mut entries = Vec::new();
        let mut rev = 1;
        let mut entry = |key: String, value: serde_json::Value| {
            rev += 1;
            Entry {
                key,
                value: serde_json::to_vec(&value).unwrap(),
                create_revision: rev,
                mod_revision: rev,
            }
        };
        let record = |node: &str, id: &str, address: String| {
            let key = KeyPair::generate().public().to_base64();
            serde_json::json!({"schema": 1, "state": "ready", "network": "n", "node": node,
                "containerId": id, "ifname": "eth0", "publicKey": key,
                "addresses": [address], "endpoint": format!("192.0.2.{}", &node[1..]),
                "listenPort": 52000, "bootId": "b", "hostName": "wgc0",
                "backend": "userspace", "mtu": 1420, "createdAt": 1})
        };
        for n in 1..=100 {
            let node = format!("n{n}");
            entries.push(entry(
                keys.claim(&node),
                serde_json::json!({"subnets": [format!("10.{n}.0.0/24")]}),
            ));
            entries.push(entry(
                keys.node_info(&node),
                serde_json::json!({"endpoints": [format!("192.0.2.{n}")], "bootId": "b",
                    "subnets": [format!("10.{n}.0.0/24")], "mtu": 1420, "agentVersion": "t"}),
            ));
            for p in 0..100 {
                let name = LinkName::parse(&format!("p{n}x{p}:eth0")).unwrap();
                let body = record(
                    &node,
                    &format!("p{n}x{p}"),
                    format!("10.{n}.0.{}/24", p + 2),
                );
                entries.push(entry(keys.link(&node, &name), body));
            }
        }
        mirror.replace_all(entries, rev);
        let mut index = Index::new(None, Peering::Mesh, SharedDirectory::default());
        let start = std::time::Instant::now();
        let evaluation = mirror.evaluate(1, std::time::Duration::from_secs(60));
        let first = index.update(evaluation.trusted);
        eprintln!("first: {:?}, {} files", start.elapsed(), first.files.len());
        let name = LinkName::parse("new:eth0").unwrap();
        let body = serde_json::to_vec(&record("n7", "new", "10.7.0.200/24".into())).unwrap();
        let change = Change::Put(Entry {
            key: keys.link("n7", &name),
            value: body,
            create_revision: rev + 1,
            mod_revision: rev + 1,
        });
        let start = std::time::Instant::now();
        mirror.apply(rev + 1, &[change]);
        let applied = start.elapsed();
        let evaluation = mirror.evaluate(1, std::time::Duration::from_secs(60));
        let evaluated = start.elapsed();
        let delta = index.update(evaluation.trusted);
        eprintln!(
            "one event: apply {applied:?}, evaluate {:?}, index {:?}; {} files, {} peers",
            evaluated - applied,
            start.elapsed() - evaluated,
            delta.files.len(),
            delta.peers.upsert.len()
        );
        assert_eq!(delta.peers.upsert.len(), 1);
    }
}
