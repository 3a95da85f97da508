//! The two kernel-facing mechanisms of on-demand peering, on a router of the test's own: a
//! "node" namespace forwarding between two "pod" namespaces over veths. The relay watch rules
//! (`nat::relay_watch_rules`, converged inside the node namespace) and a `FlowWatch` bound
//! there: relayed flows are logged, at most about once a second per pair, never when the node
//! drops them in FORWARD or DNATs them; `conntrack::forget_pair` deletes exactly a pair's
//! entries. NFLOG groups and conntrack tables are per namespace: nothing here sees or touches
//! the host's. Runs serially like the other suites.

mod common;

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use ipnetwork::IpNetwork;
use wg_cni::conntrack;
use wg_cni::flows::{FlowWatch, RelayedFlow};
use wg_cni::nat;

/// Two pods behind a node that forwards between them: pod 1 on `to1`, pod 2 on `to2`. The
/// relay watch is on `to2` (traffic toward pod 2), as on a gateway link; the cluster range is
/// 10.77.0.0/16 and fd77::/48.
struct Router {
    node: Pod,
    pods: [Pod; 2],
}

const GATEWAY: &str = "to2";
const NETWORK: &str = "flowtest";

impl Router {
    fn new() -> Router {
        let router = Router {
            node: Pod::new(),
            pods: [Pod::new(), Pod::new()],
        };
        // No duplicate address detection: the first packets would be lost while it runs.
        for netns in [&router.node, &router.pods[0], &router.pods[1]] {
            set_sysctls(
                netns,
                &["ipv6/conf/all/accept_dad", "ipv6/conf/default/accept_dad"],
                "0",
            );
        }
        let node = &router.node;
        for (i, pod) in router.pods.iter().enumerate() {
            let n = i + 1;
            let link = format!("to{n}");
            node.ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            node.ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", &link]);
            node.ip(&[
                "addr",
                "add",
                &format!("fd77:0:0:{n}::1/64"),
                "dev",
                &link,
                "nodad",
            ]);
            node.ip(&["link", "set", &link, "up"]);
            pod.ip(&["addr", "add", &format!("10.77.{n}.2/24"), "dev", "eth0"]);
            pod.ip(&[
                "addr",
                "add",
                &format!("fd77:0:0:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "default", "via", &format!("10.77.{n}.1")]);
            pod.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd77:0:0:{n}::1"),
            ]);
        }
        set_sysctls(node, &["ipv4/ip_forward", "ipv6/conf/all/forwarding"], "1");
        router
    }

    fn pod(&self, n: usize, v6: bool) -> IpAddr {
        let text = match v6 {
            false => format!("10.77.{n}.2"),
            true => format!("fd77:0:0:{n}::2"),
        };
        text.parse().unwrap()
    }

    /// Run a command in the node namespace; it must succeed.
    fn node_ok(&self, args: &[&str]) -> String {
        let out = self.node.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in the node: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The relay watch rules on `to2`, converged the way a gateway's are, in the node.
    fn watch_relays(&self) {
        let range: Vec<IpNetwork> = vec![
            "10.77.0.0/16".parse().unwrap(),
            "fd77::/48".parse().unwrap(),
        ];
        let rules = nat::relay_watch_rules(NETWORK, GATEWAY, &range, nat::RELAY_NFLOG_GROUP);
        in_netns(Some(self.node.path.clone()), move || {
            nat::converge(&rules, &[])
        })
        .join()
        .unwrap()
        .expect("relay watch rules");
        let saved = self.node_ok(&["iptables-save", "-t", "mangle"]);
        assert!(saved.contains("wg-cni relay-watch flowtest to2"), "{saved}");
    }

    /// A listener of the relay watch's group, bound in the node namespace.
    fn flow_watch(&self) -> FlowWatch {
        in_netns(Some(self.node.path.clone()), || {
            FlowWatch::open(nat::RELAY_NFLOG_GROUP)
        })
        .join()
        .unwrap()
        .expect("binding the NFLOG group in the node")
    }

    /// `ping` from pod `from` with extra arguments; whether a reply came.
    fn ping(&self, from: usize, to: IpAddr, args: &[&str]) -> bool {
        let to = to.to_string();
        let mut full = vec!["ping", "-W", "1"];
        full.extend_from_slice(args);
        full.push(&to);
        self.pods[from - 1].exec(&full).status.success()
    }

    /// Run `f` in the node namespace.
    fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(Some(self.node.path.clone()), f).join().unwrap()
    }
}

/// Write `value` to the sysctls `knobs` (paths under /proc/sys/net) of `netns`.
fn set_sysctls(netns: &Pod, knobs: &[&str], value: &'static str) {
    let knobs: Vec<String> = knobs.iter().map(|k| format!("/proc/sys/net/{k}")).collect();
    in_netns(Some(netns.path.clone()), move || {
        for knob in knobs {
            std::fs::write(&knob, value).unwrap_or_else(|e| panic!("{knob}: {e}"));
        }
    })
    .join()
    .unwrap();
}

/// Every flow between pods logged within `window`. The node's own packets out of the link
/// are logged too (here IPv6 neighbour discovery from the node's address on the veth; on a
/// real node, kubelet probes from the gateway address): the agent discards flows whose ends
/// are not pods, and so does this.
fn flows_within(watch: &mut FlowWatch, window: Duration) -> Vec<RelayedFlow> {
    let deadline = Instant::now() + window;
    let mut flows = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watch.recv_timeout(left).expect("reading the flow log") {
            Some(flow) if is_pod(flow.src) && is_pod(flow.dst) => flows.push(flow),
            Some(_) => {}
            None => return flows,
        }
    }
}

/// The first flow between pods logged within `window`.
fn first_flow_within(watch: &mut FlowWatch, window: Duration) -> Option<RelayedFlow> {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watch.recv_timeout(left).expect("reading the flow log") {
            Some(flow) if is_pod(flow.src) && is_pod(flow.dst) => return Some(flow),
            Some(_) => {}
            None => return None,
        }
    }
}

/// Pods end in ::2 or .2 (the node's side of each veth in ::1 or .1).
fn is_pod(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.octets()[3] == 2,
        IpAddr::V6(v6) => v6.segments()[7] == 2,
    }
}

fn flow(src: IpAddr, dst: IpAddr) -> RelayedFlow {
    RelayedFlow {
        prefix: GATEWAY.to_string(),
        src,
        dst,
    }
}

/// Pod 1 → pod 2 through the node is logged within a second, and a flood of it (100 packets
/// a second for 3 s) about once a second: hashlimit holds each pair to one a second.
fn relayed_flows_are_logged(v6: bool) {
    let router = Router::new();
    router.watch_relays();
    let mut watch = router.flow_watch();
    let (one, two) = (router.pod(1, v6), router.pod(2, v6));
    let second = in_netns(Some(router.node.path.clone()), || {
        FlowWatch::open(nat::RELAY_NFLOG_GROUP).err()
    });
    // The kernel gives a group to one socket: a second listener is refused (EPERM).
    let refused = second
        .join()
        .unwrap()
        .expect("a second listener of the group");
    assert_eq!(refused.raw_os_error(), Some(1), "{refused}");

    // Within 1 s of the ping's end (its start is a process spawn away: slow in the guest).
    assert!(
        router.ping(1, two, &["-c", "1"]),
        "pod 1 cannot reach pod 2"
    );
    let first = first_flow_within(&mut watch, Duration::from_secs(1));
    assert_eq!(first, Some(flow(one, two)), "no flow logged within 1 s");
    // Replies leave toward pod 1, not through the watched link: nothing more.
    assert_eq!(flows_within(&mut watch, Duration::from_millis(300)), vec![]);

    // A flood: the first packet is logged (the pair's entry has expired or is new? either
    // way at most one a second), then one a second.
    std::thread::sleep(Duration::from_millis(1100));
    let flood = std::thread::scope(|scope| {
        let ping = scope.spawn(|| router.ping(1, two, &["-c", "300", "-i", "0.01", "-q"]));
        let flows = flows_within(&mut watch, Duration::from_millis(3500));
        assert!(ping.join().unwrap(), "the flood did not get through");
        flows
    });
    assert!(
        flood.iter().all(|f| *f == flow(one, two)),
        "unexpected flows: {flood:?}"
    );
    assert!(
        (2..=5).contains(&flood.len()),
        "{} flows logged for 3 s of 100 packets a second",
        flood.len()
    );
}

#[test]
fn relayed_ipv4_flows_are_logged_about_once_a_second_per_pair() {
    relayed_flows_are_logged(false);
}

#[test]
fn relayed_ipv6_flows_are_logged_about_once_a_second_per_pair() {
    relayed_flows_are_logged(true);
}

/// A packet the node drops in FORWARD never reaches mangle POSTROUTING, and a DNATed flow (a
/// Service) is not a pair: neither is logged, while the same pair's plain traffic is.
#[test]
fn flows_dropped_in_forward_or_dnated_are_not_logged() {
    let router = Router::new();
    router.watch_relays();
    let mut watch = router.flow_watch();
    for v6 in [false, true] {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let (one, two) = (router.pod(1, v6), router.pod(2, v6));
        let (one_text, two_text) = (one.to_string(), two.to_string());

        let drop = ["FORWARD", "-s", &one_text, "-d", &two_text, "-j", "DROP"];
        router.node_ok(&[&[tool, "-I"][..], &drop[..]].concat());
        assert!(
            !router.ping(1, two, &["-c", "2", "-i", "0.2"]),
            "not dropped"
        );
        assert_eq!(
            flows_within(&mut watch, Duration::from_millis(1500)),
            vec![],
            "a flow dropped in FORWARD was logged ({tool})"
        );
        router.node_ok(&[&[tool, "-D"][..], &drop[..]].concat());

        // A Service stand-in: pod 1 → the "ClusterIP" is DNATed to pod 2.
        let service = if v6 { "fd77:0:0:9::9" } else { "10.77.9.9" };
        let dnat = [
            "PREROUTING",
            "-d",
            service,
            "-j",
            "DNAT",
            "--to-destination",
            &two_text,
        ];
        router.node_ok(&[&[tool, "-t", "nat", "-A"][..], &dnat[..]].concat());
        let service: IpAddr = service.parse().unwrap();
        assert!(
            router.ping(1, service, &["-c", "2", "-i", "0.2"]),
            "no DNAT"
        );
        assert_eq!(
            flows_within(&mut watch, Duration::from_millis(1500)),
            vec![],
            "a DNATed flow was logged ({tool})"
        );
        router.node_ok(&[&[tool, "-t", "nat", "-D"][..], &dnat[..]].concat());

        // The watch works: the same pair, plainly.
        assert!(router.ping(1, two, &["-c", "1"]));
        assert_eq!(
            first_flow_within(&mut watch, Duration::from_secs(1)),
            Some(flow(one, two))
        );
    }
}

/// UDP datagrams from pod `from` to `to`:`port` (the node tracks them as forwarded flows).
fn send_udp(router: &Router, from: usize, to: IpAddr, port: u16) {
    let bind: IpAddr = match to {
        IpAddr::V4(_) => "0.0.0.0".parse().unwrap(),
        IpAddr::V6(_) => "::".parse().unwrap(),
    };
    in_netns(Some(router.pods[from - 1].path.clone()), move || {
        let socket = UdpSocket::bind((bind, 0)).unwrap();
        socket.send_to(b"flow", (to, port)).unwrap();
    })
    .join()
    .unwrap();
}

/// `forget_pair` deletes the entries of both directions of a pair (ICMP and UDP), and only
/// those: the node's entries with pod 1 for another peer stay.
#[test]
fn forget_pair_deletes_both_directions_of_a_pair_and_nothing_else() {
    let router = Router::new();
    // Conntrack runs in a namespace once a rule needs it, as on a node.
    router.watch_relays();
    for v6 in [false, true] {
        let (one, two) = (router.pod(1, v6), router.pod(2, v6));
        let node_address: IpAddr = match v6 {
            false => "10.77.1.1".parse().unwrap(),
            true => "fd77:0:0:1::1".parse().unwrap(),
        };
        assert!(router.ping(1, two, &["-c", "1"]));
        assert!(router.ping(2, one, &["-c", "1"]));
        send_udp(&router, 1, two, 5353);
        send_udp(&router, 2, one, 5354);
        assert!(router.ping(1, node_address, &["-c", "1"]));

        let count = move || router_count(one, two);
        let before = router.in_node(count);
        assert!(
            before >= 4,
            "{before} entries for the pair (two pings, two UDP flows)"
        );
        let other_before = router.in_node(move || router_count(one, node_address));
        assert!(other_before >= 1, "no entry for pod 1 → node");

        let deleted = router
            .in_node(move || conntrack::forget_pair(one, two))
            .expect("forget_pair");
        assert_eq!(deleted, before);
        assert_eq!(router.in_node(count), 0, "entries of the pair left");
        assert_eq!(
            router.in_node(move || router_count(one, node_address)),
            other_before,
            "another pair's entries went too"
        );
        // Nothing left to delete: a second call deletes nothing and says so.
        assert_eq!(
            router
                .in_node(move || conntrack::forget_pair(two, one))
                .unwrap(),
            0
        );
    }
}

fn router_count(a: IpAddr, b: IpAddr) -> usize {
    conntrack::count_pair(a, b).expect("dumping conntrack")
}
