//! This node's pod subnet(s): taken from the conflist's IPAM ranges (operator-given) or leased
//! from `clusterRange` through etcd; claimed with a create-only transaction, and written to
//! `<store>/<net>/<node>/subnet.json` for the plugin.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::etcd::bounded;
use super::keys::{Keys, prefix_end};
use super::membership::{self, Claim, Policy, Refusal};

/// Default size of a leased node subnet.
pub const LEASE_PREFIX_V4: u8 = 24;
pub const LEASE_PREFIX_V6: u8 = 112;
/// Attempts at leasing before giving up for this round (the caller retries later).
const LEASE_ATTEMPTS: usize = 8;
pub const SUBNET_FILE: &str = "subnet.json";
/// The agent instance id, in this node's store directory (not a record).
pub const AGENT_ID_FILE: &str = ".agent-id";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The conflist's IPAM ranges are this node's subnets.
    Operator(Vec<IpNetwork>),
    /// Lease one subnet per family from these cluster ranges.
    Lease(Vec<IpNetwork>),
}

/// The claim value in etcd: `{"subnets": [...], "agent": "<agent id>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValue {
    pub subnets: Vec<IpNetwork>,
    /// The agent instance holding the claim (persisted in the node's store directory, so a
    /// restarted agent is the same one and a second agent for the same node name is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// A claim as listed, with what takeover needs.
#[derive(Debug, Clone)]
pub struct Listed {
    pub claim: Claim,
    pub agent: Option<String>,
    pub mod_revision: i64,
    /// The etcd lease the claim rides on (0: none).
    pub lease: i64,
}

/// Where this node stands before claiming: what it had, and whether pods use it.
pub struct Previous {
    /// The subnets `subnet.json` names (what this node's pods have addresses in).
    pub subnets: Option<Vec<IpNetwork>>,
    /// Pods of this boot hold addresses there.
    pub live_pods: bool,
}

/// A settled claim.
#[derive(Debug, Clone)]
pub struct Settled {
    pub subnets: Vec<IpNetwork>,
    /// The revision at which it was seen winning.
    pub revision: i64,
    /// The lease a leased subnet's claim rides on (0 in operator mode).
    pub lease: i64,
}

/// The subnet this node's pods use is claimed by another node: the node cannot add pods
/// until an operator resolves it (or the pods are gone, and another subnet is leased).
#[derive(Debug)]
pub struct Conflict {
    pub subnets: Vec<IpNetwork>,
    pub holder: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this node's subnet {:?} (subnet.json) is claimed by node {} while pods here have addresses in it: delete those pods, or forget-node {} if it is gone",
            self.subnets, self.holder, self.holder
        )
    }
}

impl std::error::Error for Conflict {}

/// This node's claim is held by another agent instance (two agents for one node name).
#[derive(Debug)]
pub struct ForeignAgent {
    pub agent: String,
    /// Whether the node key exists (that agent looks alive).
    pub alive: bool,
}

impl std::fmt::Display for ForeignAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this node name's subnet claim belongs to another agent ({}){}",
            self.agent,
            if self.alive {
                ", which is alive: two agents run under one node name"
            } else {
                "; taking it over once that agent's node key has stayed away for a lease TTL"
            }
        )
    }
}

impl std::error::Error for ForeignAgent {}

/// `subnet.json` in this node's store directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetFile {
    pub schema: u32,
    pub subnets: Vec<IpNetwork>,
    /// Why pods cannot be added on these subnets now (another node claims them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// `subnet.json` as this node's directory holds it.
pub fn read_subnet_file(node_dir: &Path) -> Option<SubnetFile> {
    let bytes = fs::read(node_dir.join(SUBNET_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `subnet` of every `ipam.ranges[][]` entry that parses as a CIDR (normalised).
pub fn operator_subnets(ipam: Option<&serde_json::Value>) -> Vec<IpNetwork> {
    let mut subnets: Vec<IpNetwork> = Vec::new();
    let ranges = ipam
        .and_then(|i| i.get("ranges"))
        .and_then(|r| r.as_array())
        .cloned()
        .unwrap_or_default();
    for set in ranges {
        for range in set.as_array().cloned().unwrap_or_default() {
            let parsed = range
                .get("subnet")
                .and_then(|s| s.as_str())
                .and_then(|s| s.parse::<IpNetwork>().ok())
                .and_then(|n| IpNetwork::new(n.network(), n.prefix()).ok());
            if let Some(net) = parsed.filter(|n| !subnets.contains(n)) {
                subnets.push(net);
            }
        }
    }
    subnets
}

/// The lowest subnet of the default size inside each cluster range that overlaps none of
/// `taken`; `None` when a range is full.
pub fn pick_free(cluster: &[IpNetwork], taken: &[IpNetwork]) -> Option<Vec<IpNetwork>> {
    cluster
        .iter()
        .map(|range| {
            let size = if range.is_ipv4() {
                LEASE_PREFIX_V4
            } else {
                LEASE_PREFIX_V6
            };
            lowest_free(range, size.max(range.prefix()), taken)
        })
        .collect()
}

fn lowest_free(range: &IpNetwork, prefix: u8, taken: &[IpNetwork]) -> Option<IpNetwork> {
    let bits: u32 = if range.is_ipv4() { 32 } else { 128 };
    let base = to_u128(range.network());
    let step = 1u128 << (bits - u32::from(prefix));
    let count = 1u128 << (u32::from(prefix) - u32::from(range.prefix()));
    // Bounded: a huge range with every early subnet taken is not worth scanning to the end.
    for i in 0..count.min(1 << 20) {
        let candidate = IpNetwork::new(from_u128(base + i * step, range.is_ipv4()), prefix).ok()?;
        if !taken.iter().any(|t| membership::overlaps(t, &candidate)) {
            return Some(candidate);
        }
    }
    None
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

/// Every claim of the network, and the revision of the listing.
pub async fn list_claims(client: &mut Client, keys: &Keys) -> Result<(Vec<Listed>, i64)> {
    let prefix = format!("{}subnets/", keys.prefix());
    let resp = bounded(client.get(
        prefix.clone(),
        Some(GetOptions::new().with_range(prefix_end(&prefix))),
    ))
    .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut claims = Vec::new();
    for kv in resp.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        if let Some(super::keys::KeyKind::Claim { node }) = keys.parse(key) {
            if let Ok(value) = serde_json::from_slice::<ClaimValue>(kv.value()) {
                claims.push(Listed {
                    claim: Claim {
                        node,
                        subnets: value.subnets,
                        create_revision: kv.create_revision(),
                    },
                    agent: value.agent,
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                });
            }
        }
    }
    Ok((claims, revision))
}

/// Make sure this node holds a winning claim; return its subnets. Operator mode: the claim
/// says exactly the conflist's subnets (a changed claim is deleted and created anew, so it
/// ages from now). Lease mode: keep an existing winning claim, else claim the lowest subnet
/// no winning claim overlaps (claims that lose or that the policy refuses block nothing) and
/// re-check; a claim of ours that loses or no longer fits the policy is deleted and retried.
/// In lease mode a node without a claim claims the subnets `subnet.json` names first (its pods
/// have addresses there); if another node holds them, that is a `Conflict` while pods live
/// there, else a new subnet is leased. A leased claim rides on a lease of `lease_ttl` (the
/// caller renews it); an older claim without one is moved onto one, keeping its age.
/// A claim held by another agent instance is an error (`ForeignAgent`) unless `takeover`
/// (the caller has seen that agent's node key stay away for a lease TTL): then it is
/// re-owned, keeping its age.
#[allow(clippy::too_many_arguments)]
pub async fn ensure_claim(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    mode: &Mode,
    agent: &str,
    takeover: bool,
    policy: &Policy,
    previous: &Previous,
    lease_ttl: std::time::Duration,
) -> Result<Settled> {
    let key = keys.claim(node);
    for _ in 0..LEASE_ATTEMPTS {
        let (listed, revision) = list_claims(client, keys).await?;
        if let Some(l) = listed.iter().find(|l| l.claim.node == node) {
            if let Some(other) = l.agent.as_deref().filter(|a| *a != agent) {
                let info = keys.node_info(node);
                let alive = bounded(client.get(info, Some(GetOptions::new().with_count_only())))
                    .await?
                    .count()
                    > 0;
                if alive || !takeover {
                    return Err(ForeignAgent {
                        agent: other.to_string(),
                        alive,
                    }
                    .into());
                }
                tracing::warn!(%node, previous = other, "taking over this node name's subnet claim: its agent's node key is gone");
                let value = serde_json::to_vec(&ClaimValue {
                    subnets: l.claim.subnets.clone(),
                    agent: Some(agent.to_string()),
                })?;
                let options = (l.lease != 0).then(|| PutOptions::new().with_lease(l.lease));
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        l.mod_revision,
                    )])
                    .and_then([TxnOp::put(key.clone(), value, options)]);
                bounded(client.txn(txn)).await?;
                continue;
            }
        }
        let our_listing = listed.iter().find(|l| l.claim.node == node).cloned();
        let claims: Vec<Claim> = listed.into_iter().map(|l| l.claim).collect();
        let owners = membership::owners(&claims, policy);
        let ours = claims.iter().find(|c| c.node == node);
        let wanted = match (mode, ours) {
            (Mode::Operator(subnets), Some(c)) if c.subnets == *subnets => None,
            (Mode::Operator(subnets), _) => Some(subnets.clone()),
            (Mode::Lease(_), Some(_)) => None,
            (Mode::Lease(cluster), None) => Some(lease_anew(cluster, &owners, policy, previous)?),
        };
        if let Some(subnets) = wanted {
            if let Some(old) = ours {
                delete_claim(client, &key, old).await?;
            }
            let value = serde_json::to_vec(&ClaimValue {
                subnets,
                agent: Some(agent.to_string()),
            })?;
            let options = match mode {
                Mode::Lease(_) => {
                    Some(PutOptions::new().with_lease(grant(client, lease_ttl).await?))
                }
                Mode::Operator(_) => None,
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, options)]);
            let created = bounded(client.txn(txn)).await?.succeeded();
            tracing::info!(%key, created, "claimed a subnet");
            continue;
        }
        let ours = ours.expect("a claim exists when nothing is wanted");
        let listing = our_listing.expect("listed with the claims");
        let Some((refusal, reason)) = owners.refused.get(node) else {
            if matches!(mode, Mode::Lease(_)) && listing.lease == 0 {
                // A claim from before leased claims: onto a lease, keeping its age.
                let lease = grant(client, lease_ttl).await?;
                let value = serde_json::to_vec(&ClaimValue {
                    subnets: ours.subnets.clone(),
                    agent: Some(agent.to_string()),
                })?;
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        listing.mod_revision,
                    )])
                    .and_then([TxnOp::put(
                        key.clone(),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                bounded(client.txn(txn)).await?;
                continue;
            }
            return Ok(Settled {
                subnets: ours.subnets.clone(),
                revision,
                lease: listing.lease,
            });
        };
        if matches!(mode, Mode::Lease(_)) {
            tracing::warn!(ours = ?ours.subnets, refusal = refusal.label(), %reason, "our leased subnet does not count; leasing another");
            delete_claim(client, &key, ours).await?;
            continue;
        }
        let what = match refusal {
            Refusal::ClaimLoses => "every record of this node is ignored by every agent",
            _ => "the network's address plan refuses it",
        };
        bail!("subnet claim {:?} {reason}: {what}", ours.subnets);
    }
    bail!("could not settle a subnet claim in {LEASE_ATTEMPTS} attempts")
}

/// The subnets a node without a claim leases: `subnet.json`'s when they are free and fit the
/// policy, else (when no pod uses them) the lowest free ones.
fn lease_anew(
    cluster: &[IpNetwork],
    owners: &membership::Owners,
    policy: &Policy,
    previous: &Previous,
) -> Result<Vec<IpNetwork>> {
    let taken = owners.all_subnets();
    if let Some(subnets) = previous
        .subnets
        .as_ref()
        .filter(|s| policy.refuses_claim(s).is_none())
    {
        let holder = owners.subnets.iter().find(|(_, held)| {
            held.iter()
                .any(|h| subnets.iter().any(|s| membership::overlaps(h, s)))
        });
        match holder {
            None => return Ok(subnets.clone()),
            Some((holder, _)) if previous.live_pods => {
                return Err(Conflict {
                    subnets: subnets.clone(),
                    holder: holder.clone(),
                }
                .into());
            }
            Some((holder, _)) => {
                tracing::warn!(subnets = ?subnets, %holder, "subnet.json's subnet is claimed by another node and no pod uses it here: leasing another");
            }
        }
    }
    match pick_free(cluster, &taken) {
        Some(subnets) => Ok(subnets),
        None => bail!("no free subnet left in clusterRange {cluster:?}"),
    }
}

/// A lease for a leased subnet's claim.
async fn grant(client: &mut Client, ttl: std::time::Duration) -> Result<i64> {
    let ttl = ttl.as_secs().max(2) as i64;
    Ok(bounded(client.lease_grant(ttl, None)).await?.id())
}

/// Renew a claim's lease once; `false` when it is gone (the claim went with it).
pub async fn renew(client: &mut Client, lease: i64) -> Result<bool> {
    let (mut keeper, mut stream) = bounded(client.lease_keep_alive(lease)).await?;
    bounded(keeper.keep_alive()).await?;
    match bounded(stream.message()).await {
        Ok(Some(resp)) => Ok(resp.ttl() > 0),
        Ok(None) => bail!("keep-alive stream closed"),
        Err(e) => match e.downcast_ref::<etcd_client::Error>() {
            Some(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => Ok(false),
            _ => Err(e),
        },
    }
}

/// Delete our claim only if it is still the one we saw (never a newer one).
async fn delete_claim(client: &mut Client, key: &str, seen: &Claim) -> Result<()> {
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.to_string(),
            CompareOp::Equal,
            seen.create_revision,
        )])
        .and_then([TxnOp::delete(key.to_string(), None)]);
    bounded(client.txn(txn)).await?;
    Ok(())
}

/// This agent's instance id for a node directory: `.agent-id` there, created once.
pub fn agent_id(node_dir: &Path) -> Result<String> {
    let path = node_dir.join(AGENT_ID_FILE);
    if let Ok(text) = fs::read_to_string(&path) {
        let id = text.trim();
        if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(id.to_string());
        }
    }
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom")?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_atomic(node_dir, AGENT_ID_FILE, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// Write `subnet.json` atomically (temp file + rename, mode 0600) if its content changes.
pub fn write_subnet_file(
    node_dir: &Path,
    subnets: &[IpNetwork],
    conflict: Option<String>,
) -> Result<()> {
    let body = serde_json::to_vec_pretty(&SubnetFile {
        schema: 1,
        subnets: subnets.to_vec(),
        conflict,
    })?;
    let target = node_dir.join(SUBNET_FILE);
    if fs::read(&target).is_ok_and(|old| old == body) {
        return Ok(());
    }
    write_atomic(node_dir, SUBNET_FILE, &body)
}

/// Temp file `.tmp-<pid>-<name>` (O_EXCL, 0600), fsync, rename over `name`.
pub fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<()> {
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let temp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
    let target = dir.join(name);
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&temp);
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&temp)?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(&temp, &target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        anyhow::Error::new(e).context(format!("writing {}", target.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn operator_subnets_come_from_every_range() {
        let ipam = serde_json::json!({"type": "host-local", "ranges": [
            [{"subnet": "10.0.1.0/24"}, {"subnet": "10.0.1.7/24"}],
            [{"subnet": "fd00:1::/64"}], [{"subnet": "auto"}]]});
        assert_eq!(
            operator_subnets(Some(&ipam)),
            vec![net("10.0.1.0/24"), net("fd00:1::/64")]
        );
        assert!(operator_subnets(None).is_empty());
    }

    #[test]
    fn lowest_free_subnet_per_family() {
        let cluster = [net("10.244.0.0/16"), net("fd00:244::/48")];
        assert_eq!(
            pick_free(&cluster, &[]).unwrap(),
            vec![net("10.244.0.0/24"), net("fd00:244::/112")]
        );
        let taken = [
            net("10.244.0.0/24"),
            net("10.244.1.0/25"),
            net("fd00:244::/112"),
        ];
        assert_eq!(
            pick_free(&cluster, &taken).unwrap(),
            vec![net("10.244.2.0/24"), net("fd00:244::1:0/112")]
        );
        assert!(pick_free(&[net("10.0.0.0/24")], &[net("10.0.0.0/8")]).is_none());
        // A range smaller than the default size is leased whole.
        assert_eq!(
            pick_free(&[net("10.9.0.0/26")], &[]).unwrap(),
            vec![net("10.9.0.0/26")]
        );
    }

    #[test]
    fn subnet_file_is_private_and_atomic() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("net/n1");
        write_subnet_file(&node, &[net("10.0.1.0/24")], None).unwrap();
        let file = node.join(SUBNET_FILE);
        let parsed: SubnetFile = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!(parsed.subnets, vec![net("10.0.1.0/24")]);
        assert_eq!(parsed.schema, 1);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(&node).unwrap().count(), 1, "no temp file left");
        let id = agent_id(&node).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(agent_id(&node).unwrap(), id, "kept across restarts");
    }
}
