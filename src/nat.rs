//! iptables rules of a network's gateway, run through the iptables binaries as the reference
//! plugins do: the hairpin masquerade (pod range → gateway → pod range, so a pod reached
//! through a Service sees the gateway as source and WireGuard's source check passes) and the
//! optional `ipMasq` masquerade of pod traffic leaving the host. Every rule carries a comment
//! naming the network, so removal finds exactly ours.

use std::process::Command;

use ipnetwork::IpNetwork;

use crate::cni::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    ipv6: bool,
    args: Vec<String>,
}

impl Rule {
    fn new(subnet: &IpNetwork, args: Vec<String>) -> Rule {
        Rule {
            ipv6: subnet.is_ipv6(),
            args,
        }
    }

    fn binary(&self) -> &'static str {
        if self.ipv6 { "ip6tables" } else { "iptables" }
    }

    fn run(&self, action: &str) -> Result<bool> {
        let output = Command::new(self.binary())
            .args(["-w", "5", "-t", "nat", action, "POSTROUTING"])
            .args(&self.args)
            .output()
            .map_err(|e| Error::Io {
                context: format!("running {} (apt-get install iptables)", self.binary()),
                source: e,
            })?;
        Ok(output.status.success())
    }

    /// Append the rule unless it is there already.
    pub fn ensure(&self) -> Result<()> {
        if self.run("-C")? || self.run("-A")? {
            return Ok(());
        }
        Err(Error::Io {
            context: format!("{} could not add {:?}", self.binary(), self.args),
            source: std::io::Error::other("iptables failed"),
        })
    }

    /// Delete every copy of the rule; absent is fine.
    pub fn remove(&self) -> Result<()> {
        for _ in 0..16 {
            if !self.run("-D")? {
                break;
            }
        }
        Ok(())
    }
}

/// The comment names the network and the gateway link (whose name is scoped to store and
/// node), so two stores using one network name never remove each other's rules.
fn comment(kind: &str, network: &str, gateway: &str) -> Vec<String> {
    ["-m", "comment", "--comment"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("wg-cni {kind} {network} {gateway}")])
        .collect()
}

/// Pod-range traffic the gateway sends back into the pod range leaves with its address.
pub fn hairpin(network: &str, gateway: &str, subnet: &IpNetwork) -> Rule {
    let range = subnet.to_string();
    let mut args: Vec<String> = ["-s", &range, "-d", &range, "-o", gateway]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(comment("hairpin", network, gateway));
    args.extend(["-j".to_string(), "MASQUERADE".to_string()]);
    Rule::new(subnet, args)
}

/// `ipMasq`: pod-range traffic to anywhere outside the range is masqueraded.
pub fn masquerade(network: &str, gateway: &str, subnet: &IpNetwork) -> Rule {
    let range = subnet.to_string();
    let mut args: Vec<String> = ["-s", &range, "!", "-d", &range, "!", "-o", gateway]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(comment("ipMasq", network, gateway));
    args.extend(["-j".to_string(), "MASQUERADE".to_string()]);
    Rule::new(subnet, args)
}

/// Pod traffic that this host routes back out of the gateway toward another node's address
/// (a DNAT here to a node address) leaves with the gateway's address (`node_paths`).
pub fn to_other_nodes(network: &str, gateway: &str, range: &IpNetwork) -> Rule {
    let range_text = range.to_string();
    let mut args: Vec<String> = ["-s", &range_text, "!", "-d", &range_text, "-o", gateway]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(comment("nodes", network, gateway));
    args.extend(["-j".to_string(), "MASQUERADE".to_string()]);
    Rule::new(range, args)
}

/// Turn on forwarding for the families in use, as the ptp plugin does.
pub fn enable_forwarding(subnets: &[IpNetwork]) -> Result<()> {
    let mut knobs = Vec::new();
    if subnets.iter().any(IpNetwork::is_ipv4) {
        knobs.push("/proc/sys/net/ipv4/ip_forward");
    }
    if subnets.iter().any(IpNetwork::is_ipv6) {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for knob in knobs {
        let on = std::fs::read_to_string(knob).is_ok_and(|v| v.trim() == "1");
        if !on {
            std::fs::write(knob, "1").map_err(|e| Error::Io {
                context: format!("enabling forwarding in {knob}"),
                source: e,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_network_and_pick_the_family() {
        let v4: IpNetwork = "10.66.0.0/24".parse().unwrap();
        let rule = hairpin("wgnet", "wgg0123", &v4);
        assert_eq!(rule.binary(), "iptables");
        let text = rule.args.join(" ");
        assert_eq!(
            text,
            "-s 10.66.0.0/24 -d 10.66.0.0/24 -o wgg0123 -m comment --comment wg-cni hairpin wgnet wgg0123 -j MASQUERADE"
        );
        let v6: IpNetwork = "fd66::/64".parse().unwrap();
        let masq = masquerade("wgnet", "wgg0123", &v6);
        assert_eq!(masq.binary(), "ip6tables");
        assert!(masq.args.join(" ").contains("! -d fd66::/64 ! -o wgg0123"));
    }
}
