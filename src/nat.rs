//! iptables rules of a network's gateway, run through the iptables binaries as the reference
//! plugins do: the hairpin masquerade (a DNATed flow pod range → gateway → pod range, so a pod
//! reached through a Service sees the gateway as source and answers through it; relayed
//! pod-to-pod traffic keeps its source), the optional `ipMasq` masquerade of pod traffic
//! leaving the host, and FORWARD accepts for the gateway's traffic (hosts whose FORWARD
//! policy is DROP exist: Docker, hardened images), and, for on-demand peering, the relay
//! watch (NFLOG of relayed pod-to-pod flows, read by `flows`). Every rule carries a comment
//! naming the network and the gateway link, so removal finds exactly ours. A gateway's rules
//! are converged in one `iptables-save` and at most one `iptables-restore` per family and table.

use std::process::Command;

use ipnetwork::IpNetwork;

use crate::cni::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    ipv6: bool,
    table: &'static str,
    chain: &'static str,
    args: Vec<String>,
}

impl Rule {
    fn new(subnet: &IpNetwork, args: Vec<String>) -> Rule {
        Rule {
            ipv6: subnet.is_ipv6(),
            table: "nat",
            chain: "POSTROUTING",
            args,
        }
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

/// A DNATed flow (a Service) the gateway sends back into the pod range leaves with its
/// address: the backend pod answers through the gateway, where the DNAT is undone. Other
/// pod-range traffic through the gateway (the relay) keeps its source.
pub fn hairpin(network: &str, gateway: &str, subnet: &IpNetwork) -> Rule {
    let range = subnet.to_string();
    let mut args: Vec<String> = ["-s", &range, "-d", &range, "-o", gateway]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["-m", "conntrack", "--ctstate", "DNAT"].map(String::from));
    args.extend(comment("hairpin-dnat", network, gateway));
    args.extend(["-j".to_string(), "MASQUERADE".to_string()]);
    Rule::new(subnet, args)
}

/// The hairpin rule as earlier versions wrote it (every pod-range flow masqueraded): dropped.
pub fn legacy_hairpin(network: &str, gateway: &str, subnet: &IpNetwork) -> Rule {
    let range = subnet.to_string();
    let mut args: Vec<String> = ["-s", &range, "-d", &range, "-o", gateway]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(comment("hairpin", network, gateway));
    args.extend(["-j".to_string(), "MASQUERADE".to_string()]);
    Rule::new(subnet, args)
}

/// Traffic into (`incoming`) or out of the gateway link is forwarded whatever the FORWARD
/// policy: the relay, host-to-pod and pod-to-node traffic all cross FORWARD.
pub fn forward(network: &str, gateway: &str, family: &IpNetwork, incoming: bool) -> Rule {
    let (flag, kind) = match incoming {
        true => ("-i", "forward-in"),
        false => ("-o", "forward-out"),
    };
    let mut args: Vec<String> = vec![flag.to_string(), gateway.to_string()];
    args.extend(comment(kind, network, gateway));
    args.extend(["-j".to_string(), "ACCEPT".to_string()]);
    Rule {
        ipv6: family.is_ipv6(),
        table: "filter",
        chain: "FORWARD",
        args,
    }
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

/// The NFLOG group the relay watch logs to (`flows::FlowWatch::open` binds it). NFLOG groups
/// are per network namespace and one listener holds a group: any fixed number no other tool
/// on the node uses will do (ulogd defaults to 0, Calico's policy logs use 1 and 2).
pub const RELAY_NFLOG_GROUP: u16 = 30567;

/// Bytes of each logged packet the kernel copies: the IPv6 header (the IPv4 header's addresses
/// end at byte 20). `flows` reads the two addresses and nothing else.
pub const RELAY_COPY_BYTES: u16 = 40;

/// The relay watch: pod-to-pod traffic the host sends back out of the gateway link (on-demand
/// peering relays every pair without a direct peer that way, on both nodes) is logged to NFLOG
/// `group`, at most once a second per (source, destination), with the gateway link's name as
/// the prefix; the node agent promotes pairs it sees to direct peers.
///
/// In mangle POSTROUTING, because that hook runs after every filter hook: a packet the host
/// drops in FORWARD (a network policy) never gets here, so a pair the host forbids is never
/// promoted. DNATed flows (Services) are left out: their ends are not the pair that talks.
/// Host-originated packets to pods (kubelet probes from the gateway address) pass here too;
/// their source is not a pod, and the agent ignores flows whose ends are not pod records.
/// hashlimit's table is named after the gateway link (at most 15 bytes, as hashlimit wants;
/// the kernel keeps one table per name and family), and capped in size and entry life: a full
/// table drops the packets of new pairs.
pub fn relay_watch_rules(
    network: &str,
    gateway: &str,
    cluster_range: &[IpNetwork],
    group: u16,
) -> Vec<Rule> {
    cluster_range
        .iter()
        .map(|range| {
            let range_text = range.to_string();
            let mut args: Vec<String> = ["-s", &range_text, "-d", &range_text, "-o", gateway]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["-m", "conntrack", "!", "--ctstate", "DNAT"].map(String::from));
            args.extend(
                [
                    "-m",
                    "hashlimit",
                    "--hashlimit-upto",
                    "1/sec",
                    "--hashlimit-burst",
                    "1",
                    "--hashlimit-mode",
                    "srcip,dstip",
                    "--hashlimit-name",
                    gateway,
                    "--hashlimit-htable-max",
                    "131072",
                    "--hashlimit-htable-expire",
                    "5000",
                ]
                .map(String::from),
            );
            args.extend(comment("relay-watch", network, gateway));
            args.extend(["-j", "NFLOG", "--nflog-group"].map(String::from));
            args.push(group.to_string());
            args.extend(["--nflog-prefix".to_string(), gateway.to_string()]);
            args.extend(["--nflog-size".to_string(), RELAY_COPY_BYTES.to_string()]);
            Rule {
                ipv6: range.is_ipv6(),
                table: "mangle",
                chain: "POSTROUTING",
                args,
            }
        })
        .collect()
}

/// Make a gateway's rules what `want` says and remove the `drop` ones, in one pass per family:
/// one `iptables-save -t TABLE` to see which are there, then one `iptables-restore --noflush`
/// for whatever differs (nothing when all is in place). A rule counts as there when a line
/// carries its comment (kind, network, gateway link) and its source range.
pub fn converge(want: &[Rule], drop: &[Rule]) -> Result<()> {
    for (ipv6, table) in [
        (false, "nat"),
        (false, "filter"),
        (false, "mangle"),
        (true, "nat"),
        (true, "filter"),
        (true, "mangle"),
    ] {
        let ours = |r: &&Rule| r.ipv6 == ipv6 && r.table == table;
        let want: Vec<&Rule> = want.iter().filter(ours).collect();
        let drop: Vec<&Rule> = drop.iter().filter(ours).collect();
        if want.is_empty() && drop.is_empty() {
            continue;
        }
        let tool = if ipv6 { "ip6tables" } else { "iptables" };
        let saved = run_tool(&format!("{tool}-save"), &["-t", table], None)?;
        let mut batch = format!("*{table}\n");
        for rule in &want {
            if rule.saved_line(&saved).is_none() {
                batch.push_str(&format!("-A {} {}\n", rule.chain, rule.restore_args()));
            }
        }
        for rule in &drop {
            if let Some(line) = rule.saved_line(&saved) {
                batch.push_str(&format!("-D{}\n", &line["-A".len()..]));
            }
        }
        if batch.lines().count() == 1 {
            continue;
        }
        restore(tool, batch)?;
    }
    Ok(())
}

/// Apply a batch of `-A`/`-D` lines for one table (opened by `*TABLE`), leaving the rest.
fn restore(tool: &str, mut batch: String) -> Result<()> {
    batch.push_str("COMMIT\n");
    run_tool(
        &format!("{tool}-restore"),
        &["--noflush", "-w", "5"],
        Some(&batch),
    )?;
    Ok(())
}

/// Uninstall: delete every rule whose comment names this gateway link (any kind, any network:
/// the link's name is scoped to store, network and node, and rules of older releases carry it
/// too), in every table and family. Returns how many went.
pub fn remove_naming(gateway: &str) -> Result<usize> {
    let mut removed = 0;
    for ipv6 in [false, true] {
        let tool = if ipv6 { "ip6tables" } else { "iptables" };
        for table in ["nat", "filter", "mangle"] {
            let saved = run_tool(&format!("{tool}-save"), &["-t", table], None)?;
            let lines = lines_naming(&saved, gateway);
            if lines.is_empty() {
                continue;
            }
            let mut batch = format!("*{table}\n");
            for line in &lines {
                batch.push_str(&format!("-D{}\n", &line["-A".len()..]));
            }
            restore(tool, batch)?;
            removed += lines.len();
        }
    }
    Ok(removed)
}

/// The `-A` lines of `iptables-save` output whose comment is `wg-cni … <gateway>`.
fn lines_naming<'a>(saved: &'a str, gateway: &str) -> Vec<&'a str> {
    let suffix = format!(" {gateway}");
    saved
        .lines()
        .filter(|line| line.starts_with("-A "))
        .filter(|line| {
            line.split_once("--comment \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .is_some_and(|(comment, _)| {
                    comment.starts_with("wg-cni ") && comment.ends_with(&suffix)
                })
        })
        .collect()
}

impl Rule {
    /// The line of `iptables-save` output that is this rule, if any.
    fn saved_line<'a>(&self, saved: &'a str) -> Option<&'a str> {
        let comment = self.comment();
        let source = self.source();
        saved.lines().find(|line| {
            line.starts_with(&format!("-A {} ", self.chain))
                && line.contains(&format!("--comment \"{comment}\""))
                && (source.is_empty() || line.contains(&format!("-s {source} ")))
        })
    }

    fn comment(&self) -> &str {
        let at = self.args.iter().position(|a| a == "--comment");
        at.and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
            .unwrap_or("")
    }

    fn source(&self) -> &str {
        let at = self.args.iter().position(|a| a == "-s");
        at.and_then(|i| self.args.get(i + 1))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The arguments as one `iptables-restore` line (the comment quoted).
    fn restore_args(&self) -> String {
        self.args
            .iter()
            .map(|a| match a.contains(' ') {
                true => format!("\"{a}\""),
                false => a.clone(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn run_tool(binary: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let io_error = |e: std::io::Error| Error::Io {
        context: format!("running {binary} (apt-get install iptables)"),
        source: e,
    };
    let mut child = Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io_error)?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .map_err(io_error)?;
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().map_err(io_error)?;
    if !output.status.success() {
        return Err(Error::Io {
            context: format!(
                "{binary} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            source: std::io::Error::other("iptables failed"),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
    fn uninstall_finds_every_rule_naming_the_gateway_and_no_other() {
        let saved = "*nat\n\
            -A POSTROUTING -s 10.66.0.0/24 -d 10.66.0.0/24 -o wgg0123 -m conntrack --ctstate DNAT -m comment --comment \"wg-cni hairpin-dnat wgnet wgg0123\" -j MASQUERADE\n\
            -A POSTROUTING -s 10.66.0.0/24 -o wgg0123 -m comment --comment \"wg-cni hairpin wgnet wgg0123\" -j MASQUERADE\n\
            -A POSTROUTING -s 10.67.0.0/24 -o wgg01234 -m comment --comment \"wg-cni hairpin wgnet wgg01234\" -j MASQUERADE\n\
            -A POSTROUTING -o wgg0123 -m comment --comment \"someone else wgg0123\" -j MASQUERADE\n\
            -A POSTROUTING -o wgg0123 -j MASQUERADE\n\
            COMMIT\n";
        let found = lines_naming(saved, "wgg0123");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|l| l.contains("wgnet wgg0123\"")));
    }

    #[test]
    fn rules_name_the_network_and_pick_the_family() {
        let v4: IpNetwork = "10.66.0.0/24".parse().unwrap();
        let rule = hairpin("wgnet", "wgg0123", &v4);
        assert!(!rule.ipv6);
        let text = rule.args.join(" ");
        assert_eq!(
            text,
            "-s 10.66.0.0/24 -d 10.66.0.0/24 -o wgg0123 -m conntrack --ctstate DNAT -m comment --comment wg-cni hairpin-dnat wgnet wgg0123 -j MASQUERADE"
        );
        let v6: IpNetwork = "fd66::/64".parse().unwrap();
        let masq = masquerade("wgnet", "wgg0123", &v6);
        assert!(masq.ipv6);
        assert!(masq.args.join(" ").contains("! -d fd66::/64 ! -o wgg0123"));
        let forward = forward("wgnet", "wgg0123", &v6, true);
        assert!(forward.ipv6 && forward.table == "filter" && forward.chain == "FORWARD");
        assert_eq!(
            forward.restore_args(),
            "-i wgg0123 -m comment --comment \"wg-cni forward-in wgnet wgg0123\" -j ACCEPT"
        );
    }

    #[test]
    fn a_saved_rule_is_found_by_comment_and_source_and_restores_quoted() {
        let v4: IpNetwork = "10.66.0.0/24".parse().unwrap();
        let rule = hairpin("wgnet", "wgg0123", &v4);
        let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n\
            -A POSTROUTING -s 10.66.0.0/24 -d 10.66.0.0/24 -o wgg0123 -m conntrack --ctstate DNAT -m comment --comment \"wg-cni hairpin-dnat wgnet wgg0123\" -j MASQUERADE\n\
            -A POSTROUTING -s 10.67.0.0/24 -d 10.67.0.0/24 -o wgg0123 -m comment --comment \"wg-cni hairpin wgnet wgg0123\" -j MASQUERADE\n";
        assert!(rule.saved_line(saved).unwrap().contains("10.66.0.0/24 -d"));
        let other: IpNetwork = "10.67.0.0/24".parse().unwrap();
        assert!(
            hairpin("wgnet", "wgg0123", &other)
                .saved_line(saved)
                .is_none(),
            "the legacy rule is not the new one"
        );
        assert!(
            legacy_hairpin("wgnet", "wgg0123", &other)
                .saved_line(saved)
                .is_some()
        );
        assert!(
            rule.restore_args()
                .contains("--comment \"wg-cni hairpin-dnat wgnet wgg0123\" -j")
        );
        let filter = "*filter\n-A FORWARD -o wgg0123 -m comment --comment \"wg-cni forward-out wgnet wgg0123\" -j ACCEPT\n";
        assert!(
            forward("wgnet", "wgg0123", &v4, false)
                .saved_line(filter)
                .is_some()
        );
        assert!(
            forward("wgnet", "wgg0123", &v4, true)
                .saved_line(filter)
                .is_none()
        );
    }

    #[test]
    fn relay_watch_rules_log_pod_pairs_out_of_the_gateway_per_family() {
        let ranges: Vec<IpNetwork> = vec![
            "10.66.0.0/16".parse().unwrap(),
            "fd66::/48".parse().unwrap(),
        ];
        let rules = relay_watch_rules("wgnet", "wgg0123", &ranges, RELAY_NFLOG_GROUP);
        assert_eq!(rules.len(), 2);
        assert!(!rules[0].ipv6 && rules[1].ipv6);
        assert!(
            rules
                .iter()
                .all(|r| r.table == "mangle" && r.chain == "POSTROUTING")
        );
        assert_eq!(
            rules[0].restore_args(),
            "-s 10.66.0.0/16 -d 10.66.0.0/16 -o wgg0123 -m conntrack ! --ctstate DNAT \
             -m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 1 --hashlimit-mode srcip,dstip \
             --hashlimit-name wgg0123 --hashlimit-htable-max 131072 --hashlimit-htable-expire 5000 \
             -m comment --comment \"wg-cni relay-watch wgnet wgg0123\" \
             -j NFLOG --nflog-group 30567 --nflog-prefix wgg0123 --nflog-size 40"
        );
        assert!(
            rules[1]
                .args
                .join(" ")
                .starts_with("-s fd66::/48 -d fd66::/48 -o wgg0123")
        );
        // As ip6tables-save prints it back (the NFLOG options in its own order).
        let saved = "*mangle\n-A POSTROUTING -s fd66::/48 -d fd66::/48 -o wgg0123 -m conntrack ! --ctstate DNAT -m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 1 --hashlimit-mode srcip,dstip --hashlimit-name wgg0123 --hashlimit-htable-max 131072 --hashlimit-htable-expire 5000 -m comment --comment \"wg-cni relay-watch wgnet wgg0123\" -j NFLOG --nflog-prefix wgg0123 --nflog-group 30567 --nflog-size 40\n";
        assert!(rules[1].saved_line(saved).is_some());
        assert!(
            relay_watch_rules("other", "wgg0123", &ranges, RELAY_NFLOG_GROUP)[1]
                .saved_line(saved)
                .is_none()
        );
    }
}
