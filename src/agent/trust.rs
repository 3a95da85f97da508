//! Which remote records count: pure functions over what etcd holds (no I/O, no clock).
//!
//! - Ownership: for overlapping subnet claims the one with the lower `create_revision` wins; a node
//!   whose claim loses owns nothing, and all its records are ignored.
//! - A record counts if its node is alive (node key present, same boot id) or stale inside the
//!   grace period, and every address it holds lies inside the subnets its node owns.
//! - Within one node, two records holding one address: the larger `mod_revision` wins.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// A node's subnet claim as etcd holds it.
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

/// The claims that win, by node. A claim loses if another node's claim overlaps it and is
/// older (lower create_revision; node name breaks a tie that etcd cannot produce).
pub fn owners(claims: &[Claim]) -> BTreeMap<String, Vec<IpNetwork>> {
    claims
        .iter()
        .filter(|c| older_overlapping(c, claims).is_none())
        .map(|c| (c.node.clone(), c.subnets.clone()))
        .collect()
}

/// The oldest other claim that overlaps `claim` and is older than it, if any.
pub fn older_overlapping<'a>(claim: &Claim, claims: &'a [Claim]) -> Option<&'a Claim> {
    claims
        .iter()
        .filter(|other| other.node != claim.node)
        .filter(|other| (other.create_revision, &other.node) < (claim.create_revision, &claim.node))
        .filter(|other| {
            other
                .subnets
                .iter()
                .any(|a| claim.subnets.iter().any(|b| overlaps(a, b)))
        })
        .min_by_key(|other| other.create_revision)
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
    Ignored(String),
}

/// Judge every candidate (same order as given).
pub fn judge(
    candidates: &[Candidate],
    owners: &BTreeMap<String, Vec<IpNetwork>>,
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
            verdicts[i] = Verdict::Ignored(format!(
                "address {ip} is also held by a newer record of node {}",
                c.node
            ));
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

fn judge_one(
    c: &Candidate,
    owners: &BTreeMap<String, Vec<IpNetwork>>,
    liveness: &BTreeMap<String, Liveness>,
) -> Verdict {
    let Some(owned) = owners.get(&c.node) else {
        return Verdict::Ignored(format!("node {} holds no winning subnet claim", c.node));
    };
    match liveness.get(&c.node) {
        Some(Liveness::Alive { boot_id }) if *boot_id != c.boot_id => {
            return Verdict::Ignored(format!(
                "boot id {} differs from node {}'s boot id {boot_id}",
                c.boot_id, c.node
            ));
        }
        Some(Liveness::Alive { .. }) | Some(Liveness::Stale) => {}
        Some(Liveness::Gone) | None => {
            return Verdict::Ignored(format!(
                "node {} has had no node key for longer than the grace period",
                c.node
            ));
        }
    }
    if c.addresses.is_empty() {
        return Verdict::Ignored("the record holds no address".into());
    }
    for address in &c.addresses {
        let inside = if is_network(address) && !is_host(address) {
            owned.iter().any(|s| covers(s, address))
        } else {
            owned.iter().any(|s| s.contains(address.ip()))
        };
        if !inside {
            return Verdict::Ignored(format!("{address} lies outside node {}'s subnets", c.node));
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

    #[test]
    fn older_claim_wins_overlaps_and_disjoint_claims_both_win() {
        let claims = [
            claim("a", "10.0.1.0/24", 5),
            claim("b", "10.0.0.0/16", 9),
            claim("c", "10.1.0.0/24", 12),
            claim("d", "fd00::/64", 13),
        ];
        let o = owners(&claims);
        assert!(o.contains_key("a") && o.contains_key("c") && o.contains_key("d"));
        assert!(!o.contains_key("b"), "b overlaps the older a");
        assert_eq!(older_overlapping(&claims[1], &claims).unwrap().node, "a");
        assert!(older_overlapping(&claims[0], &claims).is_none());
    }

    #[test]
    fn addresses_must_lie_in_the_owned_subnet() {
        let o = owners(&[claim("a", "10.0.1.0/24", 1), claim("b", "10.0.2.0/24", 2)]);
        let v = judge(
            &[cand("a", "10.0.1.5/24", 3), cand("a", "10.0.2.5/24", 4)],
            &o,
            &alive(&["a", "b"]),
        );
        assert_eq!(v[0], Verdict::Trusted);
        assert!(matches!(&v[1], Verdict::Ignored(r) if r.contains("outside")));
        // A gateway's routed subnet must be covered, not merely start inside.
        let gw = Candidate {
            addresses: vec![net("10.0.1.1/32"), net("10.0.0.0/16")],
            ..cand("a", "10.0.1.1/32", 5)
        };
        assert!(matches!(
            &judge(&[gw], &o, &alive(&["a"]))[0],
            Verdict::Ignored(_)
        ));
    }

    #[test]
    fn losing_claim_ignores_all_records_of_that_node() {
        let o = owners(&[claim("a", "10.0.0.0/16", 1), claim("b", "10.0.2.0/24", 2)]);
        let v = judge(&[cand("b", "10.0.2.5/24", 3)], &o, &alive(&["a", "b"]));
        assert!(matches!(&v[0], Verdict::Ignored(r) if r.contains("claim")));
    }

    #[test]
    fn liveness_and_boot_id() {
        let o = owners(&[claim("a", "10.0.1.0/24", 1)]);
        let c = [cand("a", "10.0.1.5/24", 3)];
        let mut live = BTreeMap::new();
        live.insert("a".to_string(), Liveness::Stale);
        assert_eq!(judge(&c, &o, &live)[0], Verdict::Trusted);
        live.insert("a".to_string(), Liveness::Gone);
        assert!(matches!(judge(&c, &o, &live)[0], Verdict::Ignored(_)));
        assert!(matches!(
            judge(&c, &o, &BTreeMap::new())[0],
            Verdict::Ignored(_)
        ));
        live.insert(
            "a".to_string(),
            Liveness::Alive {
                boot_id: "other".into(),
            },
        );
        assert!(matches!(&judge(&c, &o, &live)[0], Verdict::Ignored(r) if r.contains("boot")));
    }

    #[test]
    fn newest_record_wins_a_shared_address_and_flips_back_when_it_goes() {
        let o = owners(&[claim("a", "10.0.1.0/24", 1)]);
        let live = alive(&["a"]);
        let old = cand("a", "10.0.1.5/24", 10);
        let new = cand("a", "10.0.1.5/24", 20);
        let other = cand("a", "10.0.1.6/24", 5);
        let v = judge(&[old.clone(), new, other], &o, &live);
        assert!(matches!(&v[0], Verdict::Ignored(r) if r.contains("newer")));
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
