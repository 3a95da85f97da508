//! The path from this node's pods, through its host, to another node's address.
//!
//! A pod's packets to another node's address normally go straight from the pod's own link to
//! that node's gateway (its peer there allows the node's address). One case passes through
//! this host instead: a DNAT here (a Service) whose endpoint is another node's address (a
//! NodePort, the apiserver). Such a packet must still cross the underlay encrypted, and its
//! reply must come back here, where conntrack undoes the DNAT. So:
//! - a policy rule sends what arrives from the gateway link to a table of that gateway which
//!   routes every other node's address back into the gateway, whose peers include every other
//!   node's gateway for that node's address (the host's own traffic and WireGuard's UDP never
//!   match: they do not arrive on the gateway link);
//! - a masquerade gives those packets the gateway's address, which the other node's gateway
//!   has as a peer address and answers through WireGuard.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::cni::Result;
use crate::gateway::fnv1a;
use crate::link::Netlink;
use crate::nat;
use crate::netns::Netns;
use crate::store::GatewayRecord;
use crate::wireguard;

/// Before the main table's rule (32766), after the local one (0).
const RULE_PRIORITY: u32 = 32000;

/// The gateway's own routing table: an id past 255 derived from its (scoped) link name.
pub fn table_of(gateway_link: &str) -> u32 {
    0x7767_0000 | (fnv1a(gateway_link.as_bytes()) & 0xffff) as u32
}

/// The masquerade of pod traffic the table sends back out of the gateway.
pub fn masquerade_rules(gateway: &GatewayRecord) -> Vec<nat::Rule> {
    gateway
        .cluster_ranges
        .iter()
        .map(|range| nat::to_other_nodes(&gateway.network, &gateway.host_name, range))
        .collect()
}

/// Remove the policy rules of a gateway link, by name (the table's routes go with the link).
pub fn remove_rules(host: &Netns, gateway_link: &str) -> Result<()> {
    host.run(|| Netlink::open()?.delete_iif_rules(gateway_link))
}

/// Route exactly `node_addresses` (the other nodes') in the gateway's table, with the rule
/// that leads there. Only for gateways serving a cluster range (multi-node networks).
pub fn sync(host: &Netns, gateway: &GatewayRecord, node_addresses: &[IpAddr]) -> Result<()> {
    if gateway.cluster_ranges.is_empty() {
        return Ok(());
    }
    let table = table_of(&gateway.host_name);
    let wanted: Vec<IpNetwork> = node_addresses
        .iter()
        .map(|ip| wireguard::host_prefix(*ip))
        .collect();
    host.run(|| {
        let netlink = Netlink::open()?;
        let Some(link) = netlink.link_by_name(&gateway.host_name)? else {
            return Ok(());
        };
        for ipv6 in [false, true] {
            if wanted.iter().any(|w| w.is_ipv6() == ipv6) {
                netlink.ensure_iif_rule(&gateway.host_name, table, RULE_PRIORITY, ipv6)?;
            }
        }
        let present = netlink.table_routes(table, link.index)?;
        for dst in wanted.iter().filter(|w| !present.contains(w)) {
            netlink.change_table_route(link.index, *dst, table, true)?;
        }
        for dst in present.iter().filter(|p| !wanted.contains(p)) {
            netlink.change_table_route(link.index, *dst, table, false)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_past_the_reserved_ids_and_differ_per_gateway() {
        let (a, b) = (table_of("wgg000000000001"), table_of("wgg000000000002"));
        assert!(a > 255 && b > 255);
        assert_ne!(a, b);
    }
}
