//! The mirror: what etcd holds for a network (kept from list + watch events) → the trusted
//! set of remote records → one file per record in `<store>/<net>/<remote node>/`.
//! This node's own directory is never touched; a mirror directory is only swept if it holds
//! the marker file this agent wrote there.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::datastore::{Change, Entry};
use super::keys::{KeyKind, Keys, LinkName};
use super::membership::{
    self, Candidate, Claim, EndpointClaim, Liveness, Policy, Refusal, Verdict,
};
use super::publish::to_json;
use super::subnet::ClaimValue;
use crate::cni::Peering;
use crate::store::{GatewayRecord, Record, State};

/// A directory holding this file is a mirror this agent may sweep.
pub const MARKER_FILE: &str = ".wg-cni-mirror";
/// What the mirror knows about a remote node (not a record: readers skip it).
pub const NODE_FILE: &str = "node.json";
/// No value a node publishes is larger (a record is ~600 bytes): larger ones are refused and
/// not kept.
pub const MAX_VALUE_BYTES: usize = 4096;
/// A node's records are capped at the addresses of its claim (plus its gateway), and at this.
const MAX_RECORDS_PER_NODE: u128 = 65536;

/// `<store>/<net>/<remote node>/node.json`: the node as the membership layer accepted it: its
/// accepted addresses, owned subnets, an MTU the network can run on, and whether it is stale
/// (node key missing, inside the grace period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFile {
    pub schema: u32,
    pub node: String,
    pub endpoints: Vec<IpAddr>,
    pub boot_id: Option<String>,
    pub subnets: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub stale: bool,
    /// Unix seconds of the node's last heartbeat (or when this agent first saw it missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<u64>,
    /// How the node's pods peer (agents before `peering` are mesh).
    #[serde(default = "mesh")]
    pub peering: Peering,
}

fn mesh() -> Peering {
    Peering::Mesh
}

/// The node key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub endpoints: Vec<IpAddr>,
    pub boot_id: String,
    pub subnets: Vec<IpNetwork>,
    pub mtu: u32,
    pub agent_version: String,
    #[serde(default = "mesh")]
    pub peering: Peering,
}

/// The heartbeat key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub unix: u64,
}

#[derive(Debug, Clone)]
struct Kv {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    /// A link key's node and name, parsed once.
    link: Option<(String, LinkName)>,
    /// A remote link key's record, decoded once when it arrives.
    record: Option<Result<Decoded, String>>,
}

/// What a node's verdicts depend on besides its own records: when none of it changed and no
/// record of the node did, the node is not judged again.
#[derive(Debug, Clone, PartialEq)]
struct NodeInputs {
    owned: Option<Vec<IpNetwork>>,
    liveness: Option<Liveness>,
    endpoints: Vec<IpAddr>,
    info: Option<NodeInfo>,
    has_key: bool,
    silent_since: Option<u64>,
}

/// What trust and the mirror need from a remote record.
#[derive(Debug, Clone)]
struct Decoded {
    addresses: Vec<IpNetwork>,
    boot_id: String,
    /// The canonical body written to the mirror file.
    body: Vec<u8>,
}

/// The outcome of one evaluation.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Remote node → file name → body (records, and `node.json` for nodes with records), for
    /// the nodes judged anew: every other node's trusted set is what the last evaluation
    /// said. An empty map: the node has nothing trusted (any more).
    pub trusted: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Nodes without a node key, inside the grace period.
    pub stale: BTreeSet<String>,
    /// Whether this node's own claim wins (None: no claim seen).
    pub own_claim_wins: Option<bool>,
    /// The agent instance this node's claim names.
    pub own_claim_agent: Option<String>,
}

pub struct Mirror {
    keys: Keys,
    own_node: String,
    /// The network's address plan (this node's conflist): what other nodes are held to.
    policy: Policy,
    kvs: BTreeMap<String, Kv>,
    /// Link keys kept, per node (the cap is checked against it).
    links_by_node: BTreeMap<String, BTreeSet<String>>,
    /// Every key that is no link key (claims, node keys, heartbeats, endpoint claims).
    others: BTreeSet<String>,
    /// Nodes with a link key changed since the last evaluation.
    dirty: BTreeSet<String>,
    /// What each node's last judgement depended on.
    judged: BTreeMap<String, NodeInputs>,
    /// Each node's record cap, from its claim: computed once per claim, not per record.
    caps: BTreeMap<String, usize>,
    /// Nodes whose records were dropped at the cap: a re-list is due when their claim grows.
    capped: BTreeSet<String>,
    /// A capped node's claim changed: the caller should re-list.
    relist_wanted: bool,
    /// The etcd revision the mirror reflects.
    revision: i64,
    /// When this agent first saw each node without a node key (unix seconds): only for nodes
    /// without a heartbeat key (agents before heartbeats).
    missing_since: BTreeMap<String, u64>,
    /// Since when each stale node has been silent (unix seconds), as of the last evaluation.
    silent_since: BTreeMap<String, u64>,
    /// The last node key seen per node (kept while it is stale).
    last_info: BTreeMap<String, NodeInfo>,
    /// (key, mod_revision) already refused or ignored, so each warns and counts once.
    logged: HashSet<(String, i64)>,
    /// What was refused, by reason (each key version once).
    refusals: BTreeMap<Refusal, u64>,
    reported_stale: BTreeSet<String>,
    reported_gone: BTreeSet<String>,
}

impl Mirror {
    pub fn new(keys: Keys, own_node: &str, policy: Policy) -> Mirror {
        Mirror {
            keys,
            own_node: own_node.to_string(),
            policy,
            kvs: BTreeMap::new(),
            links_by_node: BTreeMap::new(),
            others: BTreeSet::new(),
            dirty: BTreeSet::new(),
            judged: BTreeMap::new(),
            caps: BTreeMap::new(),
            capped: BTreeSet::new(),
            relist_wanted: false,
            revision: 0,
            missing_since: BTreeMap::new(),
            silent_since: BTreeMap::new(),
            last_info: BTreeMap::new(),
            logged: HashSet::new(),
            refusals: BTreeMap::new(),
            reported_stale: BTreeSet::new(),
            reported_gone: BTreeSet::new(),
        }
    }

    /// Replace everything with a full listing (mark and sweep happens at the next write).
    /// Claims go in before records: a node's record cap comes from its claim.
    pub fn replace_all(&mut self, kvs: Vec<Entry>, revision: i64) {
        self.revision = revision;
        self.kvs.clear();
        self.links_by_node.clear();
        self.others.clear();
        // Every node is judged again (those gone too: they leave the trusted set).
        self.dirty.extend(self.judged.keys().cloned());
        self.caps.clear();
        self.capped.clear();
        self.relist_wanted = false;
        let is_link = |kv: &Entry| {
            self.keys
                .parse(&kv.key)
                .is_some_and(|kind| matches!(kind, KeyKind::Link { .. }))
        };
        let (links, others): (Vec<Entry>, Vec<Entry>) = kvs.into_iter().partition(is_link);
        for kv in others.iter().chain(&links) {
            self.put(kv);
        }
    }

    /// Whether a claim of a node whose records hit the cap changed since the last listing:
    /// the dropped records are only seen again by listing anew.
    pub fn take_relist_wanted(&mut self) -> bool {
        std::mem::take(&mut self.relist_wanted)
    }

    /// What was refused so far, by reason.
    pub fn refusals(&self) -> &BTreeMap<Refusal, u64> {
        &self.refusals
    }

    fn put(&mut self, kv: &Entry) {
        let key = kv.key.as_str();
        let kind = self.keys.parse(key);
        if kv.value.len() > MAX_VALUE_BYTES {
            self.remove(key);
            let reason = format!("{} bytes, more than {MAX_VALUE_BYTES}", kv.value.len());
            self.refuse(key, kv.mod_revision, Refusal::RecordTooLarge, &reason);
            return;
        }
        let record = match &kind {
            Some(KeyKind::Link { node, name }) if *node != self.own_node => {
                if !self.kvs.contains_key(key) {
                    let cap = match self.caps.get(node) {
                        Some(cap) => *cap,
                        None => {
                            let cap = self.record_cap(node);
                            self.caps.insert(node.clone(), cap);
                            cap
                        }
                    };
                    let kept = self.links_by_node.get(node).map_or(0, BTreeSet::len);
                    if kept >= cap {
                        self.capped.insert(node.clone());
                        let reason = format!(
                            "node {node} already has {cap} records, as many as its claim has addresses"
                        );
                        self.refuse(key, kv.mod_revision, Refusal::TooManyRecords, &reason);
                        return;
                    }
                }
                Some(decode(self.keys.prefix(), node, name, &kv.value))
            }
            Some(KeyKind::Claim { node }) => {
                self.caps.remove(node);
                self.relist_wanted |= self.capped.remove(node);
                None
            }
            _ => None,
        };
        let link = match kind {
            Some(KeyKind::Link { node, name }) => {
                self.links_by_node
                    .entry(node.clone())
                    .or_default()
                    .insert(key.to_string());
                self.dirty.insert(node.clone());
                Some((node, name))
            }
            _ => {
                self.others.insert(key.to_string());
                None
            }
        };
        self.kvs.insert(
            key.to_string(),
            Kv {
                value: kv.value.clone(),
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                link,
                record,
            },
        );
    }

    fn remove(&mut self, key: &str) {
        if self.kvs.remove(key).is_none() {
            return;
        }
        self.others.remove(key);
        match self.keys.parse(key) {
            Some(KeyKind::Link { node, .. }) => {
                if let Some(keys) = self.links_by_node.get_mut(&node) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.links_by_node.remove(&node);
                    }
                }
                self.dirty.insert(node);
            }
            Some(KeyKind::Claim { node }) => {
                self.caps.remove(&node);
            }
            _ => {}
        }
    }

    /// How many records a node may have kept: one per address of its claim, plus its gateway.
    fn record_cap(&self, node: &str) -> usize {
        let addresses: u128 = self
            .kvs
            .get(&self.keys.claim(node))
            .and_then(|kv| serde_json::from_slice::<ClaimValue>(&kv.value).ok())
            .map(|claim| {
                claim
                    .subnets
                    .iter()
                    .map(|s| {
                        let host_bits = if s.is_ipv4() { 32 } else { 128 } - u32::from(s.prefix());
                        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
                    })
                    .fold(0u128, u128::saturating_add)
            })
            .unwrap_or(0);
        addresses.min(MAX_RECORDS_PER_NODE) as usize + 1
    }

    /// Apply a watched batch of changes; returns whether anything changed that an evaluation
    /// reads (a heartbeat alone does not: it matters once a node key is missing, and the clock
    /// decides then).
    pub fn apply(&mut self, revision: i64, changes: &[Change]) -> bool {
        self.revision = self.revision.max(revision);
        let mut changed = false;
        for change in changes {
            let key = match change {
                Change::Put(entry) => &entry.key,
                Change::Delete(key) => key,
            };
            let heartbeat = self
                .keys
                .parse(key)
                .is_some_and(|kind| matches!(kind, KeyKind::Heartbeat { .. }));
            match change {
                Change::Put(entry) => self.put(entry),
                Change::Delete(key) => self.remove(key),
            }
            changed |= !heartbeat;
        }
        changed
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Work out the trusted set at `now` (unix seconds). The node-level keys (claims, node
    /// keys, heartbeats, endpoint claims) are evaluated every time; a node's records only when
    /// one of them changed or what their verdicts depend on did (`NodeInputs`), so an event
    /// costs the records of its own node, not the network's.
    pub fn evaluate(&mut self, now: u64, grace: Duration) -> Evaluation {
        let mut claims = Vec::new();
        let mut claim_revisions: BTreeMap<String, i64> = BTreeMap::new();
        let mut endpoint_claims = Vec::new();
        let mut heartbeats: BTreeMap<String, u64> = BTreeMap::new();
        let mut own_claim_agent = None;
        let mut infos: BTreeMap<String, (NodeInfo, i64)> = BTreeMap::new();
        let mut nodes: BTreeSet<String> = self.links_by_node.keys().cloned().collect();
        for key in &self.others {
            let (Some(kind), Some(kv)) = (self.keys.parse(key), self.kvs.get(key)) else {
                continue;
            };
            match kind {
                KeyKind::Claim { node } => {
                    if let Ok(v) = serde_json::from_slice::<ClaimValue>(&kv.value) {
                        if node == self.own_node {
                            own_claim_agent = v.agent.clone();
                        }
                        claim_revisions.insert(node.clone(), kv.mod_revision);
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
                        infos.insert(node.clone(), (info, kv.mod_revision));
                    }
                    nodes.insert(node);
                }
                KeyKind::Heartbeat { node } => {
                    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&kv.value) {
                        heartbeats.insert(node, beat.unix);
                    }
                }
                KeyKind::EndpointClaim { node, address } => {
                    endpoint_claims.push(EndpointClaim {
                        node,
                        address,
                        create_revision: kv.create_revision,
                    });
                }
                KeyKind::Link { .. } => {}
            }
        }
        let owners = membership::owners(&claims, &self.policy);
        let mut refused: Vec<(String, i64, Refusal, String)> = owners
            .refused
            .iter()
            .filter(|(node, _)| **node != self.own_node)
            .map(|(node, (refusal, reason))| {
                let rev = claim_revisions.get(node).copied().unwrap_or(0);
                (self.keys.claim(node), rev, *refusal, reason.clone())
            })
            .collect();
        let mut evaluation = Evaluation {
            own_claim_wins: claims
                .iter()
                .any(|c| c.node == self.own_node)
                .then(|| owners.of(&self.own_node).is_some()),
            own_claim_agent,
            ..Evaluation::default()
        };

        let mut liveness = BTreeMap::new();
        self.silent_since.clear();
        for node in nodes.iter().filter(|n| **n != self.own_node) {
            let state = match infos.get(node) {
                Some((info, _)) => {
                    self.missing_since.remove(node);
                    if self.reported_stale.remove(node) | self.reported_gone.remove(node) {
                        tracing::info!(%node, "node key is back: node is live again");
                    }
                    Liveness::Alive {
                        boot_id: info.boot_id.clone(),
                    }
                }
                None => {
                    // From the node's own heartbeat (persisted: a restarted agent agrees),
                    // never from the future; else from when this agent noticed.
                    let noticed = *self.missing_since.entry(node.clone()).or_insert(now);
                    let since = heartbeats
                        .get(node)
                        .map_or(noticed, |beat| (*beat).min(now));
                    self.silent_since.insert(node.clone(), since);
                    if now.saturating_sub(since) < grace.as_secs() {
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
        for (node, (info, _)) in &infos {
            self.last_info.insert(node.clone(), info.clone());
        }
        self.last_info.retain(|n, _| nodes.contains(n));

        // The addresses each node speaks for: its node key's (or the last one seen), else the
        // addresses it claims (a node whose key lapsed before this agent ever saw it).
        let mut published: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for node in nodes.iter().filter(|n| **n != self.own_node) {
            let addresses = match self.last_info.get(node) {
                Some(info) => info.endpoints.clone(),
                None => endpoint_claims
                    .iter()
                    .filter(|c| c.node == *node)
                    .map(|c| c.address)
                    .collect(),
            };
            published.insert(node.clone(), addresses);
        }
        let (accepted, refused_endpoints) =
            membership::endpoints(&published, &endpoint_claims, &owners, &self.policy);
        for (node, address, refusal, reason) in refused_endpoints {
            let rev = infos.get(&node).map_or(0, |(_, rev)| *rev);
            let key = format!("{}#{address}", self.keys.node_info(&node));
            refused.push((key, rev, refusal, reason));
        }

        // Judge again the nodes whose records or inputs changed; a node gone entirely leaves
        // an empty trusted set.
        let gone: Vec<String> = self
            .judged
            .keys()
            .filter(|n| !nodes.contains(*n))
            .cloned()
            .collect();
        for node in gone {
            self.judged.remove(&node);
            evaluation.trusted.insert(node, BTreeMap::new());
        }
        for node in nodes.iter().filter(|n| **n != self.own_node) {
            let inputs = NodeInputs {
                owned: owners.of(node).cloned(),
                liveness: liveness.get(node).cloned(),
                endpoints: accepted.get(node).cloned().unwrap_or_default(),
                info: self.last_info.get(node).cloned(),
                has_key: infos.contains_key(node),
                silent_since: self.silent_since.get(node).copied(),
            };
            if !self.dirty.contains(node) && self.judged.get(node) == Some(&inputs) {
                continue;
            }
            let files = self.judge_node(node, &inputs, &owners, &liveness, &infos, &mut refused);
            evaluation.trusted.insert(node.clone(), files);
            self.judged.insert(node.clone(), inputs);
        }
        self.dirty.clear();
        for (key, rev, refusal, reason) in refused {
            self.refuse(&key, rev, refusal, &reason);
        }
        evaluation
    }

    /// One node's trusted files: its records that pass, and its `node.json` when any does.
    fn judge_node(
        &self,
        node: &str,
        inputs: &NodeInputs,
        owners: &membership::Owners,
        liveness: &BTreeMap<String, Liveness>,
        infos: &BTreeMap<String, (NodeInfo, i64)>,
        refused: &mut Vec<(String, i64, Refusal, String)>,
    ) -> BTreeMap<String, Vec<u8>> {
        // Decode the records; undecodable ones are refused (and logged once).
        let mut candidates = Vec::new();
        let mut bodies = Vec::new();
        let keys = self.links_by_node.get(node).into_iter().flatten();
        for (key, kv) in keys.filter_map(|k| Some((k, self.kvs.get(k)?))) {
            let Some((_, name)) = &kv.link else {
                continue;
            };
            match &kv.record {
                Some(Ok(decoded)) => {
                    candidates.push(Candidate {
                        node: node.to_string(),
                        addresses: decoded.addresses.clone(),
                        boot_id: decoded.boot_id.clone(),
                        mod_revision: kv.mod_revision,
                    });
                    bodies.push((key, name.file_name(), &decoded.body, kv.mod_revision));
                }
                Some(Err(reason)) => refused.push((
                    key.clone(),
                    kv.mod_revision,
                    Refusal::RecordUndecodable,
                    reason.clone(),
                )),
                None => {}
            }
        }
        let mut files = BTreeMap::new();
        let verdicts = membership::judge(&candidates, owners, liveness);
        for ((key, file, body, rev), verdict) in bodies.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Trusted if inputs.endpoints.is_empty() => {
                    let reason = format!("node {node} has no address that may be used");
                    refused.push((key.clone(), rev, Refusal::RecordWithoutEndpoint, reason));
                }
                Verdict::Trusted => {
                    files.insert(file, at_node_endpoint(body.clone(), &inputs.endpoints));
                }
                Verdict::Ignored(refusal, reason) => {
                    refused.push((key.clone(), rev, refusal, reason))
                }
            }
        }
        if files.is_empty() {
            return files;
        }
        let info = inputs.info.as_ref();
        let subnets = inputs.owned.clone().unwrap_or_default();
        let mtu = info.map(|i| i.mtu).filter(|mtu| {
            let admitted = self.policy.admits_mtu(*mtu, &subnets);
            if !admitted {
                let key = format!("{}#mtu", self.keys.node_info(node));
                let rev = infos.get(node).map_or(0, |(_, rev)| *rev);
                let reason = format!("MTU {mtu} is below what the network's families need");
                refused.push((key, rev, Refusal::MtuBelowFloor, reason));
            }
            admitted
        });
        let file = NodeFile {
            schema: 1,
            node: node.to_string(),
            endpoints: inputs.endpoints.clone(),
            boot_id: info.map(|i| i.boot_id.clone()),
            subnets,
            mtu,
            stale: !inputs.has_key,
            stale_since: inputs.silent_since,
            peering: info.map_or(Peering::Mesh, |i| i.peering),
        };
        files.insert(NODE_FILE.to_string(), to_json(&file));
        files
    }

    /// Log and count a refusal, once per key version.
    fn refuse(&mut self, key: &str, mod_revision: i64, refusal: Refusal, reason: &str) {
        if self.logged.insert((key.to_string(), mod_revision)) {
            *self.refusals.entry(refusal).or_default() += 1;
            tracing::warn!(%key, refusal = refusal.label(), %reason, "refusing what a node published");
        }
    }

    /// Whether a stale node has crossed the grace period since the last evaluation.
    pub fn grace_expired(&self, now: u64, grace: Duration) -> bool {
        self.silent_since.iter().any(|(node, since)| {
            now.saturating_sub(*since) >= grace.as_secs() && !self.reported_gone.contains(node)
        })
    }
}

/// A record's endpoint comes from its node key: a node that moved (a new address re-detected
/// by its agent) is reached at the new address by every record it published before. A record
/// whose endpoint the node key lists is left as it is; otherwise it gets the node's first
/// address of the same family, else its first.
fn at_node_endpoint(body: Vec<u8>, endpoints: &[std::net::IpAddr]) -> Vec<u8> {
    let Ok(mut record) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    let Some(current) = record["endpoint"]
        .as_str()
        .and_then(|e| e.parse::<std::net::IpAddr>().ok())
    else {
        return body;
    };
    if endpoints.is_empty() || endpoints.contains(&current) {
        return body;
    }
    let chosen = endpoints
        .iter()
        .find(|e| e.is_ipv4() == current.is_ipv4())
        .unwrap_or(&endpoints[0]);
    record["endpoint"] = serde_json::Value::String(chosen.to_string());
    to_json(&record)
}

/// A remote record's addresses, boot id and canonical body; `Err` says why it is unusable.
fn decode(prefix: &str, node: &str, name: &LinkName, value: &[u8]) -> Result<Decoded, String> {
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
            if !crate::store::is_readable_schema(r.schema) {
                return Err(format!("schema {}", r.schema));
            }
            if !r.is_attachment(container_id, ifname) || r.node != node || r.network != network {
                return Err("network, node, containerId or ifname differ from its key".into());
            }
            if r.state != State::Ready {
                return Err("state is not ready".into());
            }
            Ok(Decoded {
                addresses: r.addresses.clone(),
                boot_id: r.boot_id.clone(),
                body: to_json(&r.public()),
            })
        }
        LinkName::Gateway => {
            let g: GatewayRecord =
                serde_json::from_slice(value).map_err(|e| format!("not a gateway record: {e}"))?;
            if !crate::store::is_readable_schema(g.schema) {
                return Err(format!("schema {}", g.schema));
            }
            if g.node != node || g.network != network {
                return Err("network or node differ from its key".into());
            }
            // Only the gateway's own addresses: what other nodes' pods route to it.
            Ok(Decoded {
                addresses: g.addresses.clone(),
                boot_id: g.boot_id.clone(),
                body: to_json(&g.public()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_reached_where_its_node_key_says() {
        let body = br#"{"endpoint": "10.0.0.1", "listenPort": 52000}"#.to_vec();
        let moved = at_node_endpoint(body.clone(), &["10.0.0.9".parse().unwrap()]);
        let moved: serde_json::Value = serde_json::from_slice(&moved).unwrap();
        assert_eq!(moved["endpoint"], "10.0.0.9");
        assert_eq!(moved["listenPort"], 52000);
        let listed = ["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        assert_eq!(
            at_node_endpoint(body.clone(), &listed),
            body,
            "listed: kept"
        );
        assert_eq!(
            at_node_endpoint(body.clone(), &[]),
            body,
            "no node key: kept"
        );
        let v6_first = ["fd00::1".parse().unwrap(), "10.0.0.7".parse().unwrap()];
        let same_family: serde_json::Value =
            serde_json::from_slice(&at_node_endpoint(body, &v6_first)).unwrap();
        assert_eq!(same_family["endpoint"], "10.0.0.7");
    }

    /// Readers tolerate the next version: schema N+1, unknown fields, and no local-only fields
    /// (netns path and inode are not published any more); N+2 is refused.
    #[test]
    fn decode_accepts_the_next_schema_and_refuses_the_one_after() {
        let name = LinkName::parse("a:eth0").unwrap();
        let record = |schema: u32| {
            serde_json::json!({"schema": schema, "state": "ready", "network": "net",
                "node": "n2", "containerId": "a", "ifname": "eth0", "publicKey": "k",
                "addresses": ["10.0.2.2/24"], "endpoint": "192.0.2.2", "listenPort": 52000,
                "bootId": "b2", "hostName": "wgc0", "backend": "userspace", "mtu": 1420,
                "createdAt": 1, "rotation": {"next": "x"}})
            .to_string()
        };
        let next = crate::store::SCHEMA_VERSION + 1;
        let decoded = decode("/wg-cni/v1/net/", "n2", &name, record(next).as_bytes());
        let decoded = decoded.expect("schema N+1 without netns fields");
        assert_eq!(decoded.addresses, vec!["10.0.2.2/24".parse().unwrap()]);
        assert!(decode("/wg-cni/v1/net/", "n2", &name, record(next + 1).as_bytes()).is_err());
        let gateway = serde_json::json!({"schema": next, "network": "net", "node": "n2",
            "publicKey": "g", "addresses": ["10.0.2.1/32"], "subnets": ["10.0.2.0/24"],
            "endpoint": "192.0.2.2", "listenPort": 52001, "hostName": "wgg0",
            "backend": "userspace", "bootId": "b2", "mtu": 1420, "masquerade": false,
            "createdAt": 1, "peering": "on-demand"});
        let gateway = gateway.to_string();
        assert!(
            decode(
                "/wg-cni/v1/net/",
                "n2",
                &LinkName::Gateway,
                gateway.as_bytes()
            )
            .is_ok()
        );
    }
}
