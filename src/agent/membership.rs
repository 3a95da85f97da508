//! The membership layer: which of the things other nodes publish count. Pure functions over
//! what the datastore holds (no I/O, no clock): a node speaks only for itself, and everything it
//! publishes is checked here before it can become a peer, an allowed IP or a network setting.
//!
//! - Subnet claims must lie inside `clusterRange` and off the Service and node ranges; among
//!   valid overlapping claims the oldest (lowest `create_revision`) wins, and a claim that
//!   loses or is refused blocks nothing.
//! - A node endpoint is a node address every pod routes to that node's gateway: it must be a
//!   unicast address outside every pod and Service range and inside `nodeRange` where set, and
//!   an address claimed by several nodes belongs to the oldest claim.
//! - An MTU below what the network's families need is ignored, never obeyed.
//! - A record counts if its node is alive (node key present, same boot id) or stale inside the
//!   grace period, and every address it holds lies inside the subnets its node owns; within
//!   one node, two records holding one address: the larger `mod_revision` wins.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// Why something a node published is refused: logged once per key and version, and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    ClaimOutsideClusterRange,
    ClaimInServiceOrNodeRange,
    ClaimLoses,
    EndpointNotUnicast,
    EndpointOutsideNodeRange,
    EndpointInPodOrServiceRange,
    EndpointHeldByAnotherNode,
    MtuBelowFloor,
    RecordTooLarge,
    TooManyRecords,
    RecordUndecodable,
    RecordOutsideSubnets,
    RecordWithoutEndpoint,
    RecordOfUnknownNode,
    RecordOfAnotherBoot,
    RecordAddressTaken,
}

impl Refusal {
    /// A stable label (logs now, metrics later).
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ClaimOutsideClusterRange => "claim_outside_cluster_range",
            Refusal::ClaimInServiceOrNodeRange => "claim_in_service_or_node_range",
            Refusal::ClaimLoses => "claim_loses",
            Refusal::EndpointNotUnicast => "endpoint_not_unicast",
            Refusal::EndpointOutsideNodeRange => "endpoint_outside_node_range",
            Refusal::EndpointInPodOrServiceRange => "endpoint_in_pod_or_service_range",
            Refusal::EndpointHeldByAnotherNode => "endpoint_held_by_another_node",
            Refusal::MtuBelowFloor => "mtu_below_floor",
            Refusal::RecordTooLarge => "record_too_large",
            Refusal::TooManyRecords => "too_many_records",
            Refusal::RecordUndecodable => "record_undecodable",
            Refusal::RecordOutsideSubnets => "record_outside_subnets",
            Refusal::RecordWithoutEndpoint => "record_without_endpoint",
            Refusal::RecordOfUnknownNode => "record_of_unknown_node",
            Refusal::RecordOfAnotherBoot => "record_of_another_boot",
            Refusal::RecordAddressTaken => "record_address_taken",
        }
    }
}

/// The network's address plan as this node's conflist states it; every node is held to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `clusterRange`: where every pod subnet lies.
    pub cluster_ranges: Vec<IpNetwork>,
    /// `serviceRange`: Service IPs (never a pod subnet, never a node endpoint).
    pub service_ranges: Vec<IpNetwork>,
    /// `nodeRange`: where node addresses lie, when the operator says so.
    pub node_ranges: Vec<IpNetwork>,
}

/// The smallest MTU a network of these ranges can run on.
pub fn mtu_floor(ranges: &[IpNetwork]) -> u32 {
    crate::host::mtu_floor(ranges.iter().any(IpNetwork::is_ipv6))
}

impl Policy {
    /// Why a claim of `subnets` cannot be, if it cannot.
    pub fn refuses_claim(&self, subnets: &[IpNetwork]) -> Option<(Refusal, String)> {
        if subnets.is_empty() {
            return Some((Refusal::ClaimOutsideClusterRange, "claims nothing".into()));
        }
        for subnet in subnets {
            if !self.cluster_ranges.iter().any(|r| covers(r, subnet)) {
                return Some((
                    Refusal::ClaimOutsideClusterRange,
                    format!(
                        "{subnet} lies outside clusterRange {:?}",
                        self.cluster_ranges
                    ),
                ));
            }
            if let Some(range) = self
                .service_ranges
                .iter()
                .chain(&self.node_ranges)
                .find(|r| overlaps(r, subnet))
            {
                return Some((
                    Refusal::ClaimInServiceOrNodeRange,
                    format!("{subnet} overlaps the Service or node range {range}"),
                ));
            }
        }
        None
    }

    /// Why `address` cannot be a node endpoint, before claims are compared.
    pub fn refuses_endpoint(
        &self,
        address: IpAddr,
        pod_subnets: &[IpNetwork],
    ) -> Option<(Refusal, String)> {
        if !is_unicast(address) {
            return Some((
                Refusal::EndpointNotUnicast,
                format!("{address} is loopback, link-local, multicast or unspecified"),
            ));
        }
        if !self.node_ranges.is_empty() && !self.node_ranges.iter().any(|r| r.contains(address)) {
            return Some((
                Refusal::EndpointOutsideNodeRange,
                format!("{address} lies outside nodeRange {:?}", self.node_ranges),
            ));
        }
        if let Some(range) = self
            .cluster_ranges
            .iter()
            .chain(&self.service_ranges)
            .chain(pod_subnets)
            .find(|r| r.contains(address))
        {
            return Some((
                Refusal::EndpointInPodOrServiceRange,
                format!("{address} lies in the pod or Service range {range}"),
            ));
        }
        None
    }

    /// The MTU a node publishes, if the network can run on it.
    pub fn admits_mtu(&self, mtu: u32, node_subnets: &[IpNetwork]) -> bool {
        let ranges: Vec<IpNetwork> = self
            .cluster_ranges
            .iter()
            .chain(node_subnets)
            .copied()
            .collect();
        mtu >= mtu_floor(&ranges)
    }
}

/// Neither loopback, link-local, multicast, unspecified nor broadcast (nor such an address
/// written as IPv4-mapped IPv6).
pub fn is_unicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 0)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_unicast(IpAddr::V4(v4)),
            None => {
                !(v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || v6.is_unicast_link_local())
            }
        },
    }
}

/// A node's subnet claim as the datastore holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    pub subnets: Vec<IpNetwork>,
    pub create_revision: i64,
}

pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// `inner` lies entirely inside `outer`.
pub fn covers(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

/// The outcome of judging every claim.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// The winning claims, by node.
    pub subnets: BTreeMap<String, Vec<IpNetwork>>,
    /// Claims that do not count: node → why.
    pub refused: BTreeMap<String, (Refusal, String)>,
}

impl Owners {
    pub fn of(&self, node: &str) -> Option<&Vec<IpNetwork>> {
        self.subnets.get(node)
    }

    /// Every winning subnet.
    pub fn all_subnets(&self) -> Vec<IpNetwork> {
        self.subnets.values().flatten().copied().collect()
    }
}

/// Judge the claims: oldest first (lower create_revision; node name breaks a tie etcd cannot
/// produce), a claim the policy refuses is dropped, and a valid claim wins unless it overlaps
/// an older *winning* one. A refused or losing claim blocks nothing.
pub fn owners(claims: &[Claim], policy: &Policy) -> Owners {
    let mut sorted: Vec<&Claim> = claims.iter().collect();
    sorted.sort_by(|a, b| (a.create_revision, &a.node).cmp(&(b.create_revision, &b.node)));
    let mut result = Owners::default();
    for claim in sorted {
        if let Some(refusal) = policy.refuses_claim(&claim.subnets) {
            result.refused.insert(claim.node.clone(), refusal);
            continue;
        }
        let older = result.subnets.iter().find(|(node, subnets)| {
            **node != claim.node
                && subnets
                    .iter()
                    .any(|a| claim.subnets.iter().any(|b| overlaps(a, b)))
        });
        match older {
            Some((node, subnets)) => {
                let reason = format!("loses to node {node}'s older claim {subnets:?}");
                result
                    .refused
                    .insert(claim.node.clone(), (Refusal::ClaimLoses, reason));
            }
            None => {
                result
                    .subnets
                    .insert(claim.node.clone(), claim.subnets.clone());
            }
        }
    }
    result
}

/// A node's persistent claim on one of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointClaim {
    pub node: String,
    pub address: IpAddr,
    pub create_revision: i64,
}

/// An address a node published and may not use: the node, the address, why.
pub type RefusedEndpoint = (String, IpAddr, Refusal, String);

/// Each node's accepted endpoints (in the order it published them), and the refused ones.
/// An address claimed by several nodes belongs to the oldest claim; an address nobody claims
/// (a node whose agent predates endpoint claims) is accepted on the policy alone.
pub fn endpoints(
    published: &BTreeMap<String, Vec<IpAddr>>,
    claims: &[EndpointClaim],
    owners: &Owners,
    policy: &Policy,
) -> (BTreeMap<String, Vec<IpAddr>>, Vec<RefusedEndpoint>) {
    let mut holder: BTreeMap<IpAddr, (i64, &str)> = BTreeMap::new();
    for claim in claims {
        let entry = holder
            .entry(claim.address)
            .or_insert((claim.create_revision, &claim.node));
        if (claim.create_revision, claim.node.as_str()) < (entry.0, entry.1) {
            *entry = (claim.create_revision, &claim.node);
        }
    }
    let pod_subnets = owners.all_subnets();
    let mut accepted: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut refused = Vec::new();
    for (node, addresses) in published {
        let mut mine = Vec::new();
        for &address in addresses {
            let verdict = policy.refuses_endpoint(address, &pod_subnets).or_else(|| {
                match holder.get(&address) {
                    Some((_, owner)) if *owner != node => Some((
                        Refusal::EndpointHeldByAnotherNode,
                        format!("{address} belongs to node {owner}'s older claim"),
                    )),
                    _ => None,
                }
            });
            match verdict {
                None if !mine.contains(&address) => mine.push(address),
                None => {}
                Some((refusal, reason)) => refused.push((node.clone(), address, refusal, reason)),
            }
        }
        accepted.insert(node.clone(), mine);
    }
    (accepted, refused)
}

/// What this agent knows about a remote node's liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The node key is present.
    Alive { boot_id: String },
    /// The node key is missing, for less than the grace period.
    Stale,
    /// The node key has been missing for longer than the grace period.
    Gone,
}

/// One remote record, reduced to what trust needs.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node: String,
    /// Every address the record makes its node speak for (pod addresses; a gateway's own
    /// addresses and the subnets it routes).
    pub addresses: Vec<IpNetwork>,
    pub boot_id: String,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    Ignored(Refusal, String),
}

/// Judge every candidate (same order as given).
pub fn judge(
    candidates: &[Candidate],
    owners: &Owners,
    liveness: &BTreeMap<String, Liveness>,
) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = candidates
        .iter()
        .map(|c| judge_one(c, owners, liveness))
        .collect();
    // Newest wins per address within a node: only between records that pass on their own.
    let mut newest: BTreeMap<(&str, IpAddr), (i64, usize)> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        if verdicts[i] != Verdict::Trusted {
            continue;
        }
        for ip in distinct_ips(c) {
            let slot = newest.entry((&c.node, ip)).or_insert((c.mod_revision, i));
            if c.mod_revision > slot.0 {
                *slot = (c.mod_revision, i);
            }
        }
    }
    for (i, c) in candidates.iter().enumerate() {
        if verdicts[i] != Verdict::Trusted {
            continue;
        }
        if let Some(ip) = distinct_ips(c)
            .into_iter()
            .find(|ip| newest[&(c.node.as_str(), *ip)].1 != i)
        {
            verdicts[i] = Verdict::Ignored(
                Refusal::RecordAddressTaken,
                format!(
                    "address {ip} is also held by a newer record of node {}",
                    c.node
                ),
            );
        }
    }
    verdicts
}

/// Single addresses a record holds (a routed subnet is not an address anyone else can hold).
fn distinct_ips(c: &Candidate) -> BTreeSet<IpAddr> {
    c.addresses
        .iter()
        .filter(|a| a.prefix() == if a.is_ipv4() { 32 } else { 128 } || !is_network(a))
        .map(|a| a.ip())
        .collect()
}

/// `10.0.0.0/24` is a subnet; `10.0.0.5/24` an address written with its range's prefix.
fn is_network(a: &IpNetwork) -> bool {
    a.ip() == a.network()
}

fn judge_one(c: &Candidate, owners: &Owners, liveness: &BTreeMap<String, Liveness>) -> Verdict {
    let Some(owned) = owners.of(&c.node) else {
        return Verdict::Ignored(
            Refusal::RecordOfUnknownNode,
            format!("node {} holds no winning subnet claim", c.node),
        );
    };
    match liveness.get(&c.node) {
        Some(Liveness::Alive { boot_id }) if *boot_id != c.boot_id => {
            return Verdict::Ignored(
                Refusal::RecordOfAnotherBoot,
                format!(
                    "boot id {} differs from node {}'s boot id {boot_id}",
                    c.boot_id, c.node
                ),
            );
        }
        Some(Liveness::Alive { .. }) | Some(Liveness::Stale) => {}
        Some(Liveness::Gone) | None => {
            return Verdict::Ignored(
                Refusal::RecordOfUnknownNode,
                format!(
                    "node {} has had no node key for longer than the grace period",
                    c.node
                ),
            );
        }
    }
    if c.addresses.is_empty() {
        return Verdict::Ignored(
            Refusal::RecordOutsideSubnets,
            "the record holds no address".into(),
        );
    }
    for address in &c.addresses {
        let inside = if is_network(address) && !is_host(address) {
            owned.iter().any(|s| covers(s, address))
        } else {
            owned.iter().any(|s| s.contains(address.ip()))
        };
        if !inside {
            return Verdict::Ignored(
                Refusal::RecordOutsideSubnets,
                format!("{address} lies outside node {}'s subnets", c.node),
            );
        }
    }
    Verdict::Trusted
}

fn is_host(a: &IpNetwork) -> bool {
    a.prefix() == if a.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn claim(node: &str, subnet: &str, rev: i64) -> Claim {
        Claim {
            node: node.into(),
            subnets: vec![net(subnet)],
            create_revision: rev,
        }
    }

    fn cand(node: &str, addr: &str, rev: i64) -> Candidate {
        Candidate {
            node: node.into(),
            addresses: vec![net(addr)],
            boot_id: "boot".into(),
            mod_revision: rev,
        }
    }

    fn alive(nodes: &[&str]) -> BTreeMap<String, Liveness> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Liveness::Alive {
                        boot_id: "boot".into(),
                    },
                )
            })
            .collect()
    }

    /// The address plan the tests share: pods in 10.0.0.0/8, Services in 10.96.0.0/12 (inside
    /// it, as a careless plan might have it), nodes in 192.0.2.0/24.
    fn policy() -> Policy {
        Policy {
            cluster_ranges: vec![net("10.0.0.0/8"), net("fd00::/48")],
            service_ranges: vec![net("10.96.0.0/12")],
            node_ranges: vec![net("192.0.2.0/24")],
        }
    }

    fn refused(owners: &Owners, node: &str) -> Option<Refusal> {
        owners.refused.get(node).map(|(r, _)| *r)
    }

    #[test]
    fn older_claim_wins_overlaps_and_disjoint_claims_both_win() {
        let claims = [
            claim("a", "10.0.1.0/24", 5),
            claim("b", "10.0.0.0/16", 9),
            claim("c", "10.1.0.0/24", 12),
            claim("d", "fd00::/64", 13),
        ];
        let o = owners(&claims, &policy());
        assert!(o.of("a").is_some() && o.of("c").is_some() && o.of("d").is_some());
        assert_eq!(refused(&o, "b"), Some(Refusal::ClaimLoses));
        assert!(o.refused["b"].1.contains("node a"), "{:?}", o.refused);
    }

    #[test]
    fn claims_outside_the_cluster_range_or_on_services_or_nodes_are_refused() {
        let claims = [
            claim("everything", "0.0.0.0/0", 1),
            claim("half", "0.0.0.0/1", 2),
            claim("services", "10.96.0.0/24", 3),
            claim("nodes", "192.0.2.0/25", 4),
            claim("whole", "10.0.0.0/8", 5),
            claim("ok", "10.0.7.0/24", 6),
        ];
        let o = owners(&claims, &policy());
        assert_eq!(
            refused(&o, "everything"),
            Some(Refusal::ClaimOutsideClusterRange)
        );
        assert_eq!(refused(&o, "half"), Some(Refusal::ClaimOutsideClusterRange));
        assert_eq!(
            refused(&o, "services"),
            Some(Refusal::ClaimInServiceOrNodeRange)
        );
        assert_eq!(
            refused(&o, "nodes"),
            Some(Refusal::ClaimOutsideClusterRange)
        );
        // The whole cluster range overlaps the Service range inside it.
        assert_eq!(
            refused(&o, "whole"),
            Some(Refusal::ClaimInServiceOrNodeRange)
        );
        assert_eq!(o.of("ok"), Some(&vec![net("10.0.7.0/24")]));
        let empty = Claim {
            subnets: Vec::new(),
            ..claim("empty", "10.0.8.0/24", 7)
        };
        assert!(owners(&[empty], &policy()).of("empty").is_none());
    }

    /// T3: a claim that loses (or is refused) blocks nobody: only winners count.
    #[test]
    fn a_losing_claim_blocks_nothing() {
        let claims = [
            claim("first", "10.0.5.0/24", 1),
            claim("loser", "10.0.4.0/22", 2),
            claim("late", "10.0.4.0/24", 3),
        ];
        let o = owners(&claims, &policy());
        assert_eq!(refused(&o, "loser"), Some(Refusal::ClaimLoses));
        assert_eq!(o.of("late"), Some(&vec![net("10.0.4.0/24")]));
        let mut all = o.all_subnets();
        all.sort();
        assert_eq!(all, vec![net("10.0.4.0/24"), net("10.0.5.0/24")]);
    }

    #[test]
    fn endpoints_are_unicast_node_addresses_outside_pods_and_services() {
        let p = policy();
        let pods = [net("10.0.1.0/24")];
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "ff02::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(
                p.refuses_endpoint(ip(bad), &pods).map(|r| r.0),
                Some(Refusal::EndpointNotUnicast),
                "{bad}"
            );
        }
        assert_eq!(
            p.refuses_endpoint(ip("198.51.100.1"), &pods).map(|r| r.0),
            Some(Refusal::EndpointOutsideNodeRange)
        );
        let no_node_range = Policy {
            node_ranges: Vec::new(),
            ..policy()
        };
        for inside in ["10.0.1.5", "10.96.0.10", "fd00::5"] {
            assert_eq!(
                no_node_range
                    .refuses_endpoint(ip(inside), &pods)
                    .map(|r| r.0),
                Some(Refusal::EndpointInPodOrServiceRange),
                "{inside}"
            );
        }
        // A claimed pod subnet outside the cluster range (an operator range): refused too.
        let outside = [net("172.16.0.0/24")];
        assert!(
            no_node_range
                .refuses_endpoint(ip("172.16.0.9"), &outside)
                .is_some()
        );
        assert!(p.refuses_endpoint(ip("192.0.2.7"), &pods).is_none());
    }

    #[test]
    fn an_address_claimed_by_several_nodes_is_the_oldest_claims() {
        let published: BTreeMap<String, Vec<IpAddr>> = [
            ("a".to_string(), vec![ip("192.0.2.10")]),
            ("b".to_string(), vec![ip("192.0.2.11")]),
            (
                "thief".to_string(),
                vec![ip("192.0.2.10"), ip("192.0.2.12"), ip("192.0.2.13")],
            ),
        ]
        .into();
        let claims = [
            EndpointClaim {
                node: "a".into(),
                address: ip("192.0.2.10"),
                create_revision: 4,
            },
            EndpointClaim {
                node: "thief".into(),
                address: ip("192.0.2.10"),
                create_revision: 9,
            },
            EndpointClaim {
                node: "b".into(),
                address: ip("192.0.2.12"),
                create_revision: 2,
            },
        ];
        let (accepted, refused) = endpoints(&published, &claims, &Owners::default(), &policy());
        assert_eq!(accepted["a"], vec![ip("192.0.2.10")]);
        // b publishes .11 (nobody claims it: accepted on the policy alone).
        assert_eq!(accepted["b"], vec![ip("192.0.2.11")]);
        // .10 is a's, .12 is b's (an address b claims but does not publish stays b's).
        assert_eq!(accepted["thief"], vec![ip("192.0.2.13")]);
        let reasons: Vec<Refusal> = refused.iter().map(|r| r.2).collect();
        assert_eq!(reasons, vec![Refusal::EndpointHeldByAnotherNode; 2]);
    }

    #[test]
    fn the_mtu_floor_follows_the_networks_families() {
        let p = policy();
        assert!(!p.admits_mtu(1200, &[]), "the cluster range has IPv6");
        assert!(p.admits_mtu(1280, &[]));
        let v4 = Policy {
            cluster_ranges: vec![net("10.0.0.0/8")],
            ..Policy::default()
        };
        assert!(v4.admits_mtu(1200, &[net("10.0.1.0/24")]));
        assert!(!v4.admits_mtu(1200, &[net("fd00:1::/64")]));
        assert!(!v4.admits_mtu(500, &[]));
    }

    #[test]
    fn addresses_must_lie_in_the_owned_subnet() {
        let o = owners(
            &[claim("a", "10.0.1.0/24", 1), claim("b", "10.0.2.0/24", 2)],
            &policy(),
        );
        let v = judge(
            &[cand("a", "10.0.1.5/24", 3), cand("a", "10.0.2.5/24", 4)],
            &o,
            &alive(&["a", "b"]),
        );
        assert_eq!(v[0], Verdict::Trusted);
        assert!(
            matches!(&v[1], Verdict::Ignored(Refusal::RecordOutsideSubnets, r) if r.contains("outside"))
        );
        // A gateway's routed subnet must be covered, not merely start inside.
        let gw = Candidate {
            addresses: vec![net("10.0.1.1/32"), net("10.0.0.0/16")],
            ..cand("a", "10.0.1.1/32", 5)
        };
        assert!(matches!(
            &judge(&[gw], &o, &alive(&["a"]))[0],
            Verdict::Ignored(..)
        ));
    }

    #[test]
    fn losing_claim_ignores_all_records_of_that_node() {
        let o = owners(
            &[claim("a", "10.0.0.0/16", 1), claim("b", "10.0.2.0/24", 2)],
            &policy(),
        );
        let v = judge(&[cand("b", "10.0.2.5/24", 3)], &o, &alive(&["a", "b"]));
        assert!(matches!(&v[0], Verdict::Ignored(_, r) if r.contains("claim")));
    }

    #[test]
    fn liveness_and_boot_id() {
        let o = owners(&[claim("a", "10.0.1.0/24", 1)], &policy());
        let c = [cand("a", "10.0.1.5/24", 3)];
        let mut live = BTreeMap::new();
        live.insert("a".to_string(), Liveness::Stale);
        assert_eq!(judge(&c, &o, &live)[0], Verdict::Trusted);
        live.insert("a".to_string(), Liveness::Gone);
        assert!(matches!(judge(&c, &o, &live)[0], Verdict::Ignored(..)));
        assert!(matches!(
            judge(&c, &o, &BTreeMap::new())[0],
            Verdict::Ignored(..)
        ));
        live.insert(
            "a".to_string(),
            Liveness::Alive {
                boot_id: "other".into(),
            },
        );
        assert!(
            matches!(&judge(&c, &o, &live)[0], Verdict::Ignored(Refusal::RecordOfAnotherBoot, r) if r.contains("boot"))
        );
    }

    #[test]
    fn newest_record_wins_a_shared_address_and_flips_back_when_it_goes() {
        let o = owners(&[claim("a", "10.0.1.0/24", 1)], &policy());
        let live = alive(&["a"]);
        let old = cand("a", "10.0.1.5/24", 10);
        let new = cand("a", "10.0.1.5/24", 20);
        let other = cand("a", "10.0.1.6/24", 5);
        let v = judge(&[old.clone(), new, other], &o, &live);
        assert!(matches!(&v[0], Verdict::Ignored(_, r) if r.contains("newer")));
        assert_eq!(v[1], Verdict::Trusted);
        assert_eq!(v[2], Verdict::Trusted);
        assert_eq!(judge(&[old], &o, &live)[0], Verdict::Trusted);
        // A poison record elsewhere never outranks a valid one.
        let poison = cand("a", "10.9.9.9/24", 99);
        let v = judge(&[cand("a", "10.0.1.5/24", 1), poison], &o, &live);
        assert_eq!(v[0], Verdict::Trusted);
    }

    #[test]
    fn overlap_and_cover() {
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.3.0/24")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
        assert!(!overlaps(&net("10.0.0.0/8"), &net("fd00::/8")));
        assert!(covers(&net("10.0.0.0/16"), &net("10.0.3.0/24")));
        assert!(!covers(&net("10.0.3.0/24"), &net("10.0.0.0/16")));
    }
}
