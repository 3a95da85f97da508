//! The mirror: what etcd holds for a network (kept from list + watch events) → the trusted
//! set of remote records → one file per record in `<store>/<net>/<remote node>/`.
//! This node's own directory is never touched; a mirror directory is only swept if it holds
//! the marker file this agent wrote there.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{EventType, KeyValue, WatchResponse};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::keys::{KeyKind, Keys, LinkName};
use super::publish::{read_small, to_json};
use super::subnet::{ClaimValue, write_atomic};
use super::trust::{self, Candidate, Claim, Liveness, Verdict};
use crate::store::{GatewayRecord, Record, State};

/// A directory holding this file is a mirror this agent may sweep.
pub const MARKER_FILE: &str = ".wg-cni-mirror";
/// What the mirror knows about a remote node (not a record: readers skip it).
pub const NODE_FILE: &str = "node.json";

/// `<store>/<net>/<remote node>/node.json`: the node key as last seen, its owned subnets and
/// whether it is stale (node key missing, inside the grace period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFile {
    pub schema: u32,
    pub node: String,
    pub endpoints: Vec<std::net::IpAddr>,
    pub boot_id: Option<String>,
    pub subnets: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub stale: bool,
    /// Unix seconds when this agent first saw the node key missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<u64>,
}

/// The node key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub endpoints: Vec<std::net::IpAddr>,
    pub boot_id: String,
    pub subnets: Vec<IpNetwork>,
    pub mtu: u32,
    pub agent_version: String,
}

#[derive(Debug, Clone)]
struct Kv {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
}

/// The outcome of one evaluation.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Remote node → file name → body (records, and `node.json` for nodes with records).
    pub trusted: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Nodes without a node key, inside the grace period.
    pub stale: BTreeSet<String>,
    /// Whether this node's own claim wins (None: no claim seen).
    pub own_claim_wins: Option<bool>,
}

pub struct Mirror {
    keys: Keys,
    own_node: String,
    network_dir: PathBuf,
    kvs: BTreeMap<String, Kv>,
    /// The etcd revision the mirror reflects.
    revision: i64,
    /// When this agent first saw each node without a node key (clock, unix seconds).
    missing_since: BTreeMap<String, (Instant, u64)>,
    /// The last node key seen per node (kept while it is stale).
    last_info: BTreeMap<String, NodeInfo>,
    /// (key, mod_revision, reason) already logged, so each bad record warns once.
    logged: HashSet<(String, i64)>,
    reported_stale: BTreeSet<String>,
    reported_gone: BTreeSet<String>,
}

impl Mirror {
    pub fn new(keys: Keys, own_node: &str, network_dir: PathBuf) -> Mirror {
        Mirror {
            keys,
            own_node: own_node.to_string(),
            network_dir,
            kvs: BTreeMap::new(),
            revision: 0,
            missing_since: BTreeMap::new(),
            last_info: BTreeMap::new(),
            logged: HashSet::new(),
            reported_stale: BTreeSet::new(),
            reported_gone: BTreeSet::new(),
        }
    }

    /// Replace everything with a full listing (mark and sweep happens at the next write).
    pub fn replace_all(&mut self, kvs: Vec<KeyValue>, revision: i64) {
        self.revision = revision;
        self.kvs.clear();
        for kv in kvs {
            self.put(&kv);
        }
    }

    fn put(&mut self, kv: &KeyValue) {
        if let Ok(key) = kv.key_str() {
            self.kvs.insert(
                key.to_string(),
                Kv {
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                },
            );
        }
    }

    /// Apply a watch response's events; returns whether anything changed.
    pub fn apply(&mut self, resp: &WatchResponse) -> bool {
        if let Some(header) = resp.header() {
            self.revision = self.revision.max(header.revision());
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => self.put(kv),
                EventType::Delete => {
                    if let Ok(key) = kv.key_str() {
                        self.kvs.remove(key);
                    }
                }
            }
            changed = true;
        }
        changed
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Work out the trusted set at `now`.
    pub fn evaluate(&mut self, now: Instant, grace: Duration) -> Evaluation {
        let mut claims = Vec::new();
        let mut infos: BTreeMap<String, NodeInfo> = BTreeMap::new();
        let mut links: Vec<(String, LinkName, &Kv)> = Vec::new();
        let mut nodes: BTreeSet<String> = BTreeSet::new();
        for (key, kv) in &self.kvs {
            let Some(kind) = self.keys.parse(key) else {
                continue;
            };
            match kind {
                KeyKind::Claim { node } => {
                    if let Ok(v) = serde_json::from_slice::<ClaimValue>(&kv.value) {
                        claims.push(Claim {
                            node: node.clone(),
                            subnets: v.subnets,
                            create_revision: kv.create_revision,
                        });
                    }
                    nodes.insert(node);
                }
                KeyKind::NodeInfo { node } => {
                    if let Ok(info) = serde_json::from_slice::<NodeInfo>(&kv.value) {
                        infos.insert(node.clone(), info);
                    }
                    nodes.insert(node);
                }
                KeyKind::Link { node, name } => {
                    nodes.insert(node.clone());
                    links.push((node, name, kv));
                }
            }
        }
        let owners = trust::owners(&claims);
        let mut evaluation = Evaluation {
            own_claim_wins: claims
                .iter()
                .any(|c| c.node == self.own_node)
                .then(|| owners.contains_key(&self.own_node)),
            ..Evaluation::default()
        };

        let mut liveness = BTreeMap::new();
        for node in nodes.iter().filter(|n| **n != self.own_node) {
            let state = match infos.get(node) {
                Some(info) => {
                    self.missing_since.remove(node);
                    if self.reported_stale.remove(node) | self.reported_gone.remove(node) {
                        tracing::info!(%node, "node key is back: node is live again");
                    }
                    Liveness::Alive {
                        boot_id: info.boot_id.clone(),
                    }
                }
                None => {
                    let (since, _) = *self
                        .missing_since
                        .entry(node.clone())
                        .or_insert((now, unix_now()));
                    if now.duration_since(since) < grace {
                        if self.reported_stale.insert(node.clone()) {
                            tracing::warn!(%node, grace = ?grace, "node key missing: node is stale; its records stay until the grace period ends");
                        }
                        evaluation.stale.insert(node.clone());
                        Liveness::Stale
                    } else {
                        if self.reported_gone.insert(node.clone()) {
                            tracing::warn!(%node, "node stale for longer than the grace period: its records are removed from the mirror");
                        }
                        Liveness::Gone
                    }
                }
            };
            liveness.insert(node.clone(), state);
        }
        self.missing_since.retain(|n, _| nodes.contains(n));
        for (node, info) in &infos {
            self.last_info.insert(node.clone(), info.clone());
        }
        self.last_info.retain(|n, _| nodes.contains(n));

        // Decode the remote records; undecodable ones are ignored (and logged once).
        let mut candidates = Vec::new();
        let mut bodies = Vec::new();
        let mut ignored: Vec<(String, i64, String)> = Vec::new();
        for (node, name, kv) in links.iter().filter(|(n, _, _)| *n != self.own_node) {
            let key = self.keys.link(node, name);
            match decode(self.keys.prefix(), node, name, &kv.value) {
                Ok((candidate_addresses, boot_id, body)) => {
                    candidates.push(Candidate {
                        node: node.clone(),
                        addresses: candidate_addresses,
                        boot_id,
                        mod_revision: kv.mod_revision,
                    });
                    bodies.push((key, node.clone(), name.file_name(), body, kv.mod_revision));
                }
                Err(reason) => ignored.push((key, kv.mod_revision, reason)),
            }
        }
        for (key, rev, reason) in ignored {
            self.log_ignored(&key, rev, &reason);
        }
        let verdicts = trust::judge(&candidates, &owners, &liveness);
        for ((key, node, file, body, rev), verdict) in bodies.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Trusted => {
                    evaluation
                        .trusted
                        .entry(node)
                        .or_default()
                        .insert(file, body);
                }
                Verdict::Ignored(reason) => self.log_ignored(&key, rev, &reason),
            }
        }
        for (node, files) in evaluation.trusted.iter_mut() {
            let info = self.last_info.get(node);
            let file = NodeFile {
                schema: 1,
                node: node.clone(),
                endpoints: info.map(|i| i.endpoints.clone()).unwrap_or_default(),
                boot_id: info.map(|i| i.boot_id.clone()),
                subnets: owners.get(node).cloned().unwrap_or_default(),
                mtu: info.map(|i| i.mtu),
                stale: !infos.contains_key(node),
                stale_since: self.missing_since.get(node).map(|(_, unix)| *unix),
            };
            files.insert(NODE_FILE.to_string(), to_json(&file));
        }
        evaluation
    }

    fn log_ignored(&mut self, key: &str, mod_revision: i64, reason: &str) {
        if self.logged.insert((key.to_string(), mod_revision)) {
            tracing::warn!(%key, %reason, "ignoring a remote record");
        }
    }

    /// Whether a stale node has crossed the grace period since the last evaluation.
    pub fn grace_expired(&self, now: Instant, grace: Duration) -> bool {
        self.missing_since.iter().any(|(node, (since, _))| {
            now.duration_since(*since) >= grace && !self.reported_gone.contains(node)
        })
    }

    /// Make the mirror directories say exactly `trusted`; returns whether a file changed.
    pub fn write(&self, trusted: &BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> bool {
        let mut changed = false;
        let mut dirs: BTreeSet<String> = trusted.keys().cloned().collect();
        dirs.extend(self.marked_dirs());
        for node in dirs {
            if node == self.own_node {
                continue;
            }
            let dir = self.network_dir.join(&node);
            let empty = BTreeMap::new();
            let wanted = trusted.get(&node).unwrap_or(&empty);
            if !wanted.is_empty() && !dir.join(MARKER_FILE).exists() {
                if dir.is_dir() && has_records(&dir) {
                    tracing::error!(dir = %dir.display(), "a node directory without the mirror marker holds records: not mirroring into it");
                    continue;
                }
                if let Err(e) = write_atomic(&dir, MARKER_FILE, b"") {
                    tracing::warn!(error = %format!("{e:#}"), "cannot create a mirror directory");
                    continue;
                }
            }
            changed |= sync_dir(&dir, wanted);
        }
        changed
    }

    /// Mirror directories (holding the marker) of other nodes.
    fn marked_dirs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.network_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(MARKER_FILE).exists())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| *n != self.own_node)
            .collect()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn has_records(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| LinkName::from_file_name(n).is_some())
        })
    })
}

/// Write changed files (atomically) and remove record files that are not wanted.
fn sync_dir(dir: &Path, wanted: &BTreeMap<String, Vec<u8>>) -> bool {
    let mut changed = false;
    for (file, body) in wanted {
        if read_small(&dir.join(file)).as_deref() == Some(body.as_slice()) {
            continue;
        }
        match write_atomic(dir, file, body) {
            Ok(()) => changed = true,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "writing a mirror record"),
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let is_record = LinkName::from_file_name(&name).is_some() || name == NODE_FILE;
            if is_record
                && !wanted.contains_key(&name)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                changed = true;
            }
        }
    }
    changed
}

/// A remote record's addresses, boot id and canonical body; `Err` says why it is unusable.
fn decode(
    prefix: &str,
    node: &str,
    name: &LinkName,
    value: &[u8],
) -> Result<(Vec<IpNetwork>, String, Vec<u8>), String> {
    let network = prefix
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    match name {
        LinkName::Pod {
            container_id,
            ifname,
        } => {
            let r: Record =
                serde_json::from_slice(value).map_err(|e| format!("not a record: {e}"))?;
            if r.schema != crate::store::SCHEMA_VERSION {
                return Err(format!("schema {}", r.schema));
            }
            if !r.is_attachment(container_id, ifname) || r.node != node || r.network != network {
                return Err("network, node, containerId or ifname differ from its key".into());
            }
            if r.state != State::Ready {
                return Err("state is not ready".into());
            }
            Ok((r.addresses.clone(), r.boot_id.clone(), to_json(&r)))
        }
        LinkName::Gateway => {
            let g: GatewayRecord =
                serde_json::from_slice(value).map_err(|e| format!("not a gateway record: {e}"))?;
            if g.schema != crate::store::SCHEMA_VERSION {
                return Err(format!("schema {}", g.schema));
            }
            if g.node != node || g.network != network {
                return Err("network or node differ from its key".into());
            }
            // Only the gateway's own addresses: what other nodes' pods route to it.
            Ok((g.addresses.clone(), g.boot_id.clone(), to_json(&g)))
        }
    }
}
