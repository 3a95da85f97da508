//! Pods on different nodes talk: three simulated nodes (namespaces on a bridge), each with
//! its own store, conflist directory and `wg-cni agent`, a real etcd from Debian in its own
//! namespace, the plugin exec'd inside the node's namespace, two pods per node. Runs serially.

mod cluster;
mod common;
mod etcd_filler;

use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use cluster::{Cluster, UNDERLAY_NOWHERE, ping_once, wait_for};
use common::*;
use serde_json::Value;

/// How long a change may take to reach every node (agents sync, then reconcile).
const CONVERGE: Duration = Duration::from_secs(30);

struct PodOn {
    pod: Pod,
    node: usize,
    ip: String,
    /// What ADD answered (CHECK's prevResult).
    result: Value,
}

struct PodRef<'a> {
    pod: &'a Pod,
    ip: &'a str,
}

/// `nodes` simulated nodes with their conflists written and their agents started.
fn running(nodes: usize) -> Cluster {
    let mut cluster = Cluster::new(nodes);
    cluster.write_conflists();
    cluster.start_agents();
    cluster
}

/// How long a change may take through the event path alone (publish on inotify, etcd watch,
/// mirror, reconcile): natively 10 s; the kernel backend runs in an emulated guest.
fn event_path_limit() -> Duration {
    match backend().as_str() {
        "kernel" => Duration::from_secs(60),
        _ => Duration::from_secs(10),
    }
}

/// `running`, but the agents never resync on their own (`--resync-interval 3600`): whatever
/// reaches a link got there through events, not through polling that heals a missed one.
/// `peering`: every node's, else as `WG_CNI_TEST_PEERING` says.
fn running_on_events(nodes: usize, peering: Option<&'static str>) -> Cluster {
    let mut cluster = Cluster::new(nodes);
    if peering.is_some() {
        cluster.peerings = vec![peering; nodes];
    }
    cluster.agent_flags = [
        "--lease-ttl",
        "3",
        "--grace-period",
        "20",
        "--resync-interval",
        "3600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cluster.write_conflists();
    cluster.start_agents();
    cluster
}

/// `running`, every node in mesh mode whatever `WG_CNI_TEST_PEERING` says: for tests about
/// the peer sets of mesh mode (pods holding remote pods).
fn running_mesh(nodes: usize) -> Cluster {
    let mut cluster = Cluster::new(nodes);
    cluster.peerings = vec![Some("mesh"); nodes];
    cluster.write_conflists();
    cluster.start_agents();
    cluster
}

fn add(cluster: &Cluster, node: usize) -> PodOn {
    let pod = Pod::new();
    let result = cluster.cni(node, "ADD", &pod).ok().json();
    let ip = address_of(&result, false);
    PodOn {
        pod,
        node,
        ip,
        result,
    }
}

fn all_pairs_ping<P: AsPod>(pods: &[P]) -> Vec<(String, String)> {
    let mut failing = Vec::new();
    for a in pods {
        for b in pods {
            if a.ip() != b.ip() && !ping_once(a.pod(), b.ip()) {
                failing.push((a.ip().to_string(), b.ip().to_string()));
            }
        }
    }
    failing
}

trait AsPod {
    fn pod(&self) -> &Pod;
    fn ip(&self) -> &str;
}

impl AsPod for PodOn {
    fn pod(&self) -> &Pod {
        &self.pod
    }
    fn ip(&self) -> &str {
        &self.ip
    }
}

impl AsPod for PodRef<'_> {
    fn pod(&self) -> &Pod {
        self.pod
    }
    fn ip(&self) -> &str {
        self.ip
    }
}

fn converge_all_pairs<P: AsPod>(pods: &[P]) {
    let mut failing = Vec::new();
    let ok = wait_for(CONVERGE, || {
        failing = all_pairs_ping(pods);
        failing.is_empty()
    });
    assert!(ok, "pairs that cannot ping after {CONVERGE:?}: {failing:?}");
}

/// `wg-cni show --json` of the network on a node (Null when it fails).
fn show(cluster: &Cluster, node: usize) -> Value {
    let n = &cluster.nodes[node];
    let out = n.exec(&[
        binary().to_str().unwrap(),
        "show",
        "--json",
        "--store",
        n.store.to_str().unwrap(),
        "--node",
        &n.name,
        "--cni-conf-dir",
        n.conf_dir.to_str().unwrap(),
    ]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    shown["networks"][0].clone()
}

/// The attachments of a node, with their peers, as `wg-cni show` reports them.
fn peer_keys(cluster: &Cluster, node: usize) -> Vec<Value> {
    show(cluster, node)["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn public_key_of(cluster: &Cluster, pod: &PodOn) -> String {
    let dir = cluster.nodes[pod.node]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[pod.node].name);
    let file = dir.join(format!("{}:eth0.json", pod.pod.id));
    let record: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    record["publicKey"].as_str().unwrap().to_string()
}

/// Through the event path alone (no periodic resync): pods on three nodes talk, a pod added
/// later reaches and is reached by all within `event_path_limit`, and its DEL leaves every
/// link, mirror and etcd within it too.
#[test]
fn pods_on_three_nodes_talk_and_follow_adds_and_dels() {
    let cluster = running_on_events(3, None);
    let mut pods: Vec<PodOn> = Vec::new();
    for node in 0..3 {
        for _ in 0..2 {
            pods.push(add(&cluster, node));
        }
    }
    // Every pod pings every other pod: 30 ordered pairs.
    converge_all_pairs(&pods);
    // `wg-cni show` tells what each peer is.
    let shown = peer_keys(&cluster, 0);
    // Unset: the default, on-demand (the cluster has a clusterRange).
    let on_demand = |i: usize| cluster.peerings[i] != Some("mesh");
    let node_index = |name: &str| cluster.nodes.iter().position(|n| n.name == name);
    let kinds: std::collections::BTreeSet<String> = shown[0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        // The pings made direct peers between on-demand pods: the promoter's, not the mesh's.
        .filter(|p| {
            let promoted = p["path"].is_string()
                && on_demand(0)
                && p["node"]
                    .as_str()
                    .and_then(node_index)
                    .is_some_and(on_demand);
            !promoted
        })
        .map(|p| {
            format!(
                "{} {}",
                p["kind"].as_str().unwrap(),
                p["node"].as_str().unwrap_or("")
            )
        })
        .collect();
    // Mesh: every pod and gateway; on-demand: the own gateway, and toward mesh nodes as mesh.
    let mut want = std::collections::BTreeSet::from(["local gateway node1".to_string()]);
    if !on_demand(0) {
        want.insert("local pod node1".to_string());
    }
    for i in 1..3 {
        if !on_demand(0) || !on_demand(i) {
            want.insert(format!("remote pod node{}", i + 1));
            want.insert(format!("remote gateway node{}", i + 1));
        }
    }
    assert_eq!(kinds, want, "peer kinds in wg-cni show");

    // A pod added later is reachable from the others and reaches them.
    let late = add(&cluster, 2);
    let reached = wait_for(event_path_limit(), || {
        pods.iter()
            .all(|p| ping_once(&p.pod, &late.ip) && ping_once(&late.pod, &p.ip))
    });
    assert!(reached, "the late pod is not reachable both ways");

    // The host namespace of node 1 reaches a pod on node 2 (kubelet-style probes to remote
    // pods, NodePorts), and a pod on node 1 reaches node 3's own address.
    let remote = &pods[2];
    assert!(remote.node == 1);
    let host_reaches = wait_for(CONVERGE, || {
        cluster.nodes[0]
            .exec(&["ping", "-c", "1", "-W", "1", &remote.ip])
            .status
            .success()
    });
    if !host_reaches {
        // Seen once in a full run (never alone): what node 1's host routes, and where.
        let text = |out: Output| String::from_utf8_lossy(&out.stdout).into_owned();
        let route = text(cluster.nodes[0].exec(&["ip", "route", "get", &remote.ip]));
        let rules = text(cluster.nodes[0].exec(&["ip", "rule"]));
        // Not `dump`: it prints private keys.
        let peers = text(cluster.nodes[0].exec(&["wg", "show", "all", "allowed-ips"]))
            + &text(cluster.nodes[0].exec(&["wg", "show", "all", "latest-handshakes"]));
        panic!(
            "node 1's host cannot reach a pod on node 2 ({}): route {route}rules:\n{rules}node 1's WireGuard links:\n{peers}",
            remote.ip
        );
    }
    assert!(
        wait_for(CONVERGE, || ping_once(&pods[0].pod, &cluster.nodes[2].addr)),
        "a pod on node 1 cannot reach node 3's address"
    );

    // DEL removes the late pod's peer everywhere: links, mirrors, etcd.
    let late_key = public_key_of(&cluster, &late);
    cluster.cni(2, "DEL", &late.pod).ok();
    let gone = wait_for(event_path_limit(), || {
        let in_links = (0..3).any(|n| {
            peer_keys(&cluster, n).iter().any(|a| {
                a["peers"]
                    .as_array()
                    .is_some_and(|peers| peers.iter().any(|p| p["publicKey"] == late_key.as_str()))
            })
        });
        let in_mirrors = (0..2).any(|n| {
            cluster
                .mirror_of(n, 2)
                .iter()
                .any(|f| f.starts_with(&late.pod.id))
        });
        let in_etcd = cluster.etcd_keys().iter().any(|k| k.contains(&late.pod.id));
        !in_links && !in_mirrors && !in_etcd
    });
    assert!(gone, "the deleted pod is still a peer, mirrored or in etcd");
    converge_all_pairs(&pods);

    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Every WireGuard link of a node (its pods' and its gateway's) as the device reports it:
/// link → one line per peer with what a write sets (key, endpoint, allowed IPs); handshakes
/// and counters left out. Pod links through `wg-cni show` (a kernel link lives in its pod's
/// namespace), the gateway through `wg show dump` in the node.
fn link_dumps(
    cluster: &Cluster,
    node: usize,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let line = |key: &str, endpoint: &str, mut ips: Vec<String>| {
        ips.sort();
        format!("{key} {endpoint} {}", ips.join(","))
    };
    let shown = show(cluster, node);
    let mut links = std::collections::BTreeMap::new();
    for attachment in shown["attachments"].as_array().into_iter().flatten() {
        let peers = attachment["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let ips = p["allowedIps"].as_array().into_iter().flatten();
                line(
                    p["publicKey"].as_str().unwrap_or_default(),
                    p["endpoint"].as_str().unwrap_or("(none)"),
                    ips.map(|ip| ip.as_str().unwrap_or_default().to_string())
                        .collect(),
                )
            });
        let link = attachment["link"].as_str().unwrap_or_default().to_string();
        links.insert(link, peers.collect());
    }
    if let Some(gateway) = shown["gateway"]["link"].as_str() {
        let out = cluster.nodes[node].exec(&["wg", "show", gateway, "dump"]);
        assert!(out.status.success(), "wg show {gateway}: {out:?}");
        let peers = String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let endpoint = match f.get(2) {
                    Some(&"(none)") | None => "(none)",
                    Some(e) => e,
                };
                let ips = f
                    .get(3)
                    .unwrap_or(&"")
                    .split(',')
                    .map(str::to_string)
                    .collect();
                line(f[0], endpoint, ips)
            })
            .collect();
        links.insert(gateway.to_string(), peers);
    }
    links
}

/// Through the event path alone: a pod added on node 2 adds exactly its peer to every link
/// of node 1 and changes nothing else there; node 2's key flapping (its agent paused past the
/// lease TTL, then back) changes nothing on node 1; the pod's DEL removes exactly its peer.
#[test]
fn remote_changes_write_only_the_peers_they_concern() {
    let cluster = running_on_events(2, Some("mesh"));
    let pods = vec![
        add(&cluster, 0),
        add(&cluster, 0),
        add(&cluster, 1),
        add(&cluster, 1),
    ];
    converge_all_pairs(&pods);
    let before = link_dumps(&cluster, 0);
    assert_eq!(before.len(), 3, "two pod links and the gateway: {before:?}");
    assert!(before.values().all(|peers| peers.len() >= 4), "{before:?}");

    let late = add(&cluster, 1);
    let late_key = public_key_of(&cluster, &late);
    let has_late =
        |dumps: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>| {
            dumps
                .values()
                .all(|peers| peers.iter().any(|l| l.starts_with(&late_key)))
        };
    let mut after = before.clone();
    assert!(
        wait_for(event_path_limit(), || {
            after = link_dumps(&cluster, 0);
            has_late(&after)
        }),
        "node 1's links did not all gain the new pod: {after:?}"
    );
    for (link, peers) in &after {
        let others: std::collections::BTreeSet<String> = peers
            .iter()
            .filter(|l| !l.starts_with(&late_key))
            .cloned()
            .collect();
        assert_eq!(
            others, before[link],
            "{link}: more changed than the new peer"
        );
        assert_eq!(peers.len(), before[link].len() + 1, "{link}");
    }

    // The flap: node 2 seen stale on node 1, then live again.
    let stale = |want: bool| {
        show(&cluster, 0)["staleNodes"]
            == serde_json::json!(if want { vec!["node2"] } else { vec![] })
    };
    cluster.nodes[1].signal_agent("STOP");
    let seen_stale = wait_for(Duration::from_secs(20), || stale(true));
    cluster.nodes[1].signal_agent("CONT");
    assert!(seen_stale, "node 2 never seen stale");
    assert!(
        wait_for(Duration::from_secs(20), || stale(false)),
        "node 2 never live again"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        link_dumps(&cluster, 0),
        after,
        "a flap changed a link on node 1"
    );

    cluster.cni(1, "DEL", &late.pod).ok();
    let mut gone = after.clone();
    assert!(
        wait_for(event_path_limit(), || {
            gone = link_dumps(&cluster, 0);
            gone == before
        }),
        "after the DEL node 1's links are not as before: {gone:?}"
    );
    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// `peering: "on-demand"` on two nodes whose FORWARD policy is DROP: every pod link holds
/// only its gateway, each gateway its own pods and the other gateway (the relay). Pods on one
/// node and on two reach each other through it and keep their source addresses; the host
/// reaches a remote pod, a pod reaches the other node's address, a Service DNAT to a remote
/// pod is answered; an ADD on node 2 changes no link on node 1.
#[test]
fn on_demand_pods_talk_through_the_gateway_relay() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("on-demand"); 2];
    // Everything stays relayed: this test is about the relay (direct peers have their own).
    cluster.extra.insert("maxDirectPeers".into(), 0.into());
    cluster.agent_flags = ["--lease-ttl", "3", "--resync-interval", "3600"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for node in &cluster.nodes {
        assert!(
            node.exec(&["iptables", "-P", "FORWARD", "DROP"])
                .status
                .success()
        );
    }
    cluster.write_conflists();
    cluster.start_agents();
    let pods = vec![
        add(&cluster, 0),
        add(&cluster, 0),
        add(&cluster, 1),
        add(&cluster, 1),
    ];
    converge_all_pairs(&pods);

    // Peer sets: O(local pods + nodes), whatever the network's size.
    for node in 0..2 {
        for attachment in peer_keys(&cluster, node) {
            let kinds: Vec<&str> = attachment["peers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["kind"].as_str().unwrap_or_default())
                .collect();
            assert_eq!(kinds, vec!["local gateway"], "node {node}: {attachment}");
        }
        let dumps = link_dumps(&cluster, node);
        let gateway = show(&cluster, node)["gateway"]["link"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            dumps[&gateway].len(),
            3,
            "two pods and the relay: {dumps:?}"
        );
        let relay = dumps[&gateway]
            .iter()
            .find(|l| l.contains(&format!("10.251.{}.0/24", 2 - node)))
            .unwrap_or_else(|| panic!("no relay peer for the other node's subnet: {dumps:?}"));
        assert!(
            relay.contains(&format!("{}/32", cluster.nodes[1 - node].addr)),
            "{relay}"
        );
        let kinds: Vec<String> = show(&cluster, node)["gateway"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["kind"].as_str().unwrap_or_default().to_string())
            .collect();
        let relays = kinds.iter().filter(|k| *k == "relay gateway").count();
        assert_eq!(relays, 1, "wg-cni show marks the relay: {kinds:?}");
    }

    // Relayed traffic keeps its source address, across nodes and on one node.
    for (from, to) in [
        (&pods[0], &pods[2]),
        (&pods[3], &pods[0]),
        (&pods[1], &pods[0]),
    ] {
        let (port, server) = serve_once(&to.pod.path);
        let target = format!("{}:{port}", to.ip).parse().unwrap();
        assert_eq!(
            fetch(Some(&from.pod.path), target).as_deref(),
            Ok("hello from wg-cni\n")
        );
        let seen = server
            .join()
            .unwrap()
            .expect("the server saw the connection");
        assert_eq!(
            seen.ip().to_string(),
            from.ip,
            "relayed traffic lost its source"
        );
    }

    // kubelet-style host → pod, pod → the other node's address.
    assert!(
        cluster.nodes[0]
            .exec(&["ping", "-c", "1", "-W", "2", &pods[2].ip])
            .status
            .success(),
        "node 1's host cannot reach a pod on node 2"
    );
    assert!(ping_once(&pods[0].pod, &cluster.nodes[1].addr));

    // A ClusterIP stand-in on node 1: pod → 10.96.251.10:80 → DNAT to a pod on node 2,
    // answered through the relay (the hairpin masquerade matches DNATed flows).
    let (port, server) = serve_once(&pods[2].pod.path);
    let target = format!("{}:{port}", pods[2].ip);
    let dnat = [
        "PREROUTING",
        "-d",
        "10.96.251.10/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &target,
    ];
    let node1 = &cluster.nodes[0];
    let mut add_rule = vec!["iptables", "-t", "nat", "-A"];
    add_rule.extend(dnat);
    assert!(node1.exec(&add_rule).status.success());
    let got = fetch(Some(&pods[0].pod.path), "10.96.251.10:80".parse().unwrap());
    assert_eq!(got.as_deref(), Ok("hello from wg-cni\n"));
    server
        .join()
        .unwrap()
        .expect("the Service's backend saw the connection");

    // A static peer holding node 2's address would take it from the relay: refused, and the
    // ADD leaves nothing behind.
    let mut conf = cluster.conf(0);
    let key = wireguard_control::Key::generate_private()
        .get_public()
        .to_base64();
    let node2 = format!("{}/32", cluster.nodes[1].addr);
    conf["peers"] = serde_json::json!([{"publicKey": key, "allowedIPs": [node2]}]);
    let refused = Pod::new();
    let out = cluster.cni_with(0, "ADD", &refused, &conf);
    assert_eq!(out.error_code(), 7, "{}", out.error_msg());
    assert!(
        out.error_msg().contains("peers[0].allowedIPs"),
        "{}",
        out.error_msg()
    );
    assert_eq!(
        peer_keys(&cluster, 0).len(),
        2,
        "the refused ADD left a record"
    );

    // An ADD on node 2: node 1's links stay exactly as they are.
    let before = link_dumps(&cluster, 0);
    let late = add(&cluster, 1);
    assert!(wait_for(CONVERGE, || ping_once(&pods[0].pod, &late.ip)));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        link_dumps(&cluster, 0),
        before,
        "an ADD on node 2 changed a link on node 1"
    );

    for p in pods.iter().chain([&late]) {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// `kill -9` of an agent: pods keep talking (the links are the kernel's or the daemons',
/// not the agent's); restarted, it changes nothing.
#[test]
fn killing_an_agent_does_not_cut_its_pods_off() {
    let mut cluster = running(2);
    let pods = vec![add(&cluster, 0), add(&cluster, 1)];
    converge_all_pairs(&pods);
    // On-demand, the pings promoted the pair: the kill finds the promotion done (one the
    // dead agent cannot finish is another case: the other end hands the pair back to the
    // relay, `on_demand_pairs_go_direct_when_traffic_flows_and_back_when_idle`).
    let settled = wait_for(direct_within() * 2, || {
        holds_direct(&cluster, &pods[0], &pods[1]) && holds_direct(&cluster, &pods[1], &pods[0])
    });
    assert!(settled, "promotions still pending");
    cluster.nodes[0].kill_agent();
    // Past the lease TTL (3 s): node 1's key has lapsed and node 2 sees it stale.
    assert!(
        wait_for(CONVERGE, || show(&cluster, 1)["staleNodes"]
            == serde_json::json!(["node1"])),
        "node 1 is never stale on node 2 after its lease TTL"
    );
    assert!(
        all_pairs_ping(&pods).is_empty(),
        "pods stopped talking when an agent died"
    );
    let before: Vec<_> = (0..2)
        .map(|n| peer_keys(&cluster, n))
        .map(keys_only)
        .collect();
    cluster.start_agent(0);
    std::thread::sleep(Duration::from_secs(5));
    let after: Vec<_> = (0..2)
        .map(|n| peer_keys(&cluster, n))
        .map(keys_only)
        .collect();
    assert_eq!(before, after, "the restarted agent churned peers");
    assert!(all_pairs_ping(&pods).is_empty());
    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Peer keys and allowed IPs per attachment (handshakes and counters left out).
fn keys_only(attachments: Vec<Value>) -> Vec<Vec<(String, String)>> {
    attachments
        .iter()
        .map(|a| {
            let mut peers: Vec<(String, String)> = a["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|p| (p["publicKey"].to_string(), p["allowedIps"].to_string()))
                .collect();
            peers.sort();
            peers
        })
        .collect()
}

/// Subnet-lease mode: until the agent has leased the node's subnet, ADD is "try again later"
/// (11) and STATUS 50; then pods on two nodes get addresses from two different leased subnets
/// of the cluster range and talk.
#[test]
fn leased_subnets_come_from_the_agent() {
    let mut cluster = Cluster::new(2);
    cluster.lease = true;
    cluster.write_conflists();
    let early = Pod::new();
    let out = cluster.cni(0, "ADD", &early);
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    let mut status_conf = cluster.conf(0);
    status_conf["cniVersion"] = "1.1.0".into();
    let status = cluster.cni_with(0, "STATUS", &early, &status_conf);
    assert_eq!(status.error_code(), 50, "{}", status.stdout);

    cluster.start_agents();
    let leased = wait_for(CONVERGE, || {
        (0..2).all(|n| {
            cluster.nodes[n]
                .store
                .join(&cluster.network)
                .join(&cluster.nodes[n].name)
                .join("subnet.json")
                .exists()
        })
    });
    assert!(leased, "the agents leased no subnets");
    // STATUS turns green once the agent has also synced (its readiness marker).
    let ready = wait_for(CONVERGE, || {
        cluster.cni_with(0, "STATUS", &early, &status_conf).code == 0
    });
    assert!(ready, "STATUS stayed red after the agent leased its subnet");
    let pods = vec![add(&cluster, 0), add(&cluster, 1)];
    let prefix = |ip: &str| ip.rsplit_once('.').unwrap().0.to_string();
    assert_ne!(
        prefix(&pods[0].ip),
        prefix(&pods[1].ip),
        "two nodes share a subnet"
    );
    assert!(
        pods.iter().all(|p| p.ip.starts_with("10.251.")),
        "outside the cluster range"
    );
    converge_all_pairs(&pods);
    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// A one-shot TCP server in a namespace: answers the first connection with `reply` (no name
/// resolution anywhere). Killed by pid on drop.
struct TcpServer(Child);

impl TcpServer {
    fn start(netns: &str, port: u16, reply: &str) -> TcpServer {
        let code = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port}))\ns.listen(8)\nwhile True:\n c,_=s.accept(); c.sendall(b'{reply}'); c.close()\n"
        );
        let child = Command::new(ip())
            .args(["netns", "exec", netns, "/usr/bin/python3", "-c", &code])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        TcpServer(child)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connect from a namespace to `address:port` and read what the server says.
fn tcp_read(netns: &str, address: &str, port: u16) -> String {
    let code = format!(
        "import socket\ns=socket.create_connection(('{address}',{port}),timeout=3)\nprint(s.recv(100).decode())"
    );
    let out = run(
        ip(),
        &["netns", "exec", netns, "/usr/bin/python3", "-c", &code],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Node A's host reaches a pod on B over TCP; a DNAT rule on A standing in for a ClusterIP
/// whose endpoint is a pod on B works from a pod on A; a pod on A reaches a TCP server on node
/// C's own address. Meanwhile node A's underlay link carries nothing but WireGuard
/// (and the agents' etcd traffic).
#[test]
fn hosts_services_and_node_addresses_across_nodes() {
    let cluster = running(3);
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let capture = tempfile::NamedTempFile::new().unwrap();
    let tcpdump = Command::new(ip())
        .args([
            "netns",
            "exec",
            &cluster.underlay,
            "tcpdump",
            "-i",
            "br0",
            "-Z",
            "root",
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(capture.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut tcpdump = KillOnDrop(Some(tcpdump));
    std::thread::sleep(Duration::from_millis(700));

    let _server = TcpServer::start(&b.pod.name, 8080, "from-pod-b");
    let node_a = cluster.nodes[0].netns.clone();
    let host_to_pod = wait_for(CONVERGE, || tcp_read(&node_a, &b.ip, 8080) == "from-pod-b");
    assert!(host_to_pod, "node A's host cannot open TCP to a pod on B");

    // A ClusterIP on A whose endpoint is the pod on B.
    let dnat = [
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "10.96.0.10",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
    ];
    let to = format!("{}:8080", b.ip);
    let mut args: Vec<&str> = vec!["netns", "exec", &node_a, "iptables"];
    args.extend_from_slice(&dnat);
    args.push(&to);
    run_ok(ip(), &args);
    assert_eq!(
        tcp_read(&a.pod.name, "10.96.0.10", 80),
        "from-pod-b",
        "Service DNAT on A to a pod on B"
    );

    // A server on node C's own (underlay) address, reached from a pod on A directly.
    let node_c = cluster.nodes[2].netns.clone();
    let _node_server = TcpServer::start(&node_c, 8081, "from-node-c");
    let c_addr = cluster.nodes[2].addr.clone();
    let reached = wait_for(CONVERGE, || {
        tcp_read(&a.pod.name, &c_addr, 8081) == "from-node-c"
    });
    assert!(reached, "a pod on A cannot reach node C's address");
    // The same server behind a Service on A (a DNAT to a node address, as a NodePort or the
    // apiserver): crosses encrypted, and the reply comes back through A.
    let to_c = format!("{c_addr}:8081");
    let mut args: Vec<&str> = vec!["netns", "exec", &node_a, "iptables"];
    args.extend_from_slice(&dnat[..5]);
    args.extend_from_slice(&["10.96.0.11", "-p", "tcp", "--dport", "80", "-j", "DNAT"]);
    args.extend_from_slice(&["--to-destination", &to_c]);
    run_ok(ip(), &args);
    let through_dnat = wait_for(CONVERGE, || {
        tcp_read(&a.pod.name, "10.96.0.11", 80) == "from-node-c"
    });
    assert!(
        through_dnat,
        "a Service DNAT on A to node C's address does not answer"
    );
    assert!(ping_once(&a.pod, &b.ip));

    std::thread::sleep(Duration::from_millis(500));
    // SIGTERM, not SIGKILL: tcpdump writes what it still holds before it exits.
    let capturing = tcpdump.0.take().unwrap();
    let _ = run("kill", &["-TERM", &capturing.id().to_string()]);
    let _ = capturing.wait_with_output();
    let pcap = std::fs::read(capture.path()).unwrap();
    let (wireguard, other) = classify_bridge_frames(&pcap);
    assert!(
        wireguard >= 6,
        "too few WireGuard messages captured: {wireguard} in {} bytes",
        pcap.len()
    );
    assert!(
        other.is_empty(),
        "plaintext between nodes on the bridge: {other:?}"
    );
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Pod IP reuse on B before A heard of the DEL: A ends up peering only the new key.
/// A capture that a failing test must not leave running (stopped by pid).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The endpoint `holder`'s link has for the peer `key`, as `wg-cni show` reads the device.
fn endpoint_for(cluster: &Cluster, holder: &PodOn, key: &str) -> Option<String> {
    peer_keys(cluster, holder.node)
        .iter()
        .filter(|a| a["containerId"] == holder.pod.id.as_str())
        .flat_map(|a| a["peers"].as_array().cloned().unwrap_or_default())
        .find(|p| p["publicKey"] == key)
        .and_then(|p| p["endpoint"].as_str().map(str::to_string))
}

#[test]
fn a_node_that_changes_address_is_reached_at_the_new_one() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("mesh"); 2];
    cluster.detect_endpoints = true;
    cluster.write_conflists();
    cluster.start_agents();
    let a = add(&cluster, 0);
    let b = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let b_key = public_key_of(&cluster, &b);
    let node_b = &cluster.nodes[1];
    let (old, new) = (node_b.addr.clone(), "10.250.0.42");
    // The new address first (promoted to primary when the old one goes), then the default
    // route's source: what the agent re-detects.
    node_b.exec(&["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"]);
    node_b.exec(&["ip", "addr", "add", &format!("{new}/24"), "dev", "eth0"]);
    let route = ["ip", "route", "replace", "default", "via", UNDERLAY_NOWHERE];
    node_b.exec(&[&route[..], &["src", new]].concat());
    let at_new = |c: &Cluster| {
        endpoint_for(c, &a, &b_key).is_some_and(|e| e.starts_with(&format!("{new}:")))
    };
    assert!(
        wait_for(CONVERGE, || at_new(&cluster)),
        "node A's pod still sends to B's pod at {:?}",
        endpoint_for(&cluster, &a, &b_key)
    );
    node_b.exec(&["ip", "addr", "del", &format!("{old}/24"), "dev", "eth0"]);
    // A speaks first: only the new address can carry it (B's pod has roamed nowhere).
    assert!(
        wait_for(CONVERGE, || ping_once(&a.pod, &b.ip)),
        "A's pod cannot reach B's pod at B's new address"
    );
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

#[test]
fn a_peer_that_roams_keeps_its_new_endpoint() {
    let cluster = running_mesh(2);
    let a_pod = Pod::new();
    let a_result = cluster.cni(0, "ADD", &a_pod).ok().json();
    let a = PodOn {
        ip: address_of(&a_result, false),
        pod: a_pod,
        node: 0,
        result: a_result.clone(),
    };
    let b = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let b_key = public_key_of(&cluster, &b);
    // From now on B's packets to node A leave from a second address, as behind a NAT whose
    // mapping changed (conntrack flushed so the running flows are translated too).
    let node_b = &cluster.nodes[1];
    let roamed = "10.250.0.43";
    node_b.exec(&["ip", "addr", "add", &format!("{roamed}/24"), "dev", "eth0"]);
    let to_a = &cluster.nodes[0].addr;
    let snat = [
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth0",
        "-p",
        "udp",
        "-d",
        to_a,
        "-j",
        "SNAT",
        "--to-source",
        roamed,
    ];
    assert!(
        node_b.exec(&snat).status.success(),
        "iptables SNAT on node B"
    );
    node_b.exec(&["conntrack", "-F"]);
    // B speaks: A's devices follow it to the new address (WireGuard roaming).
    let roamed_there = |c: &Cluster| {
        endpoint_for(c, &a, &b_key).is_some_and(|e| e.starts_with(&format!("{roamed}:")))
    };
    assert!(
        wait_for(CONVERGE, || ping_once(&b.pod, &a.ip)
            && roamed_there(&cluster)),
        "A's pod did not roam to {roamed}: {:?}",
        endpoint_for(&cluster, &a, &b_key)
    );
    // Quiet (no packet from B) for several resync intervals of the agent (2 s): a reconcile
    // that put the record's endpoint back would show here.
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        roamed_there(&cluster),
        "the agent reset a roamed endpoint: {:?}",
        endpoint_for(&cluster, &a, &b_key)
    );
    assert!(
        ping_once(&a.pod, &b.ip),
        "A's pod cannot reach B's pod at its roamed endpoint"
    );
    // CHECK accepts what the agent keeps: the roamed endpoint of a peer that talks.
    let mut check = cluster.conf(0);
    check["prevResult"] = a_result;
    let checked = cluster.cni_with(0, "CHECK", &a.pod, &check);
    assert_eq!(
        checked.code, 0,
        "CHECK of A's pod fails on B's roamed endpoint: {}",
        checked.stdout
    );
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

#[test]
fn a_reused_pod_address_ends_with_the_new_key_everywhere() {
    let mut cluster = running_mesh(2);
    let a = add(&cluster, 0);
    let old = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&old)]);
    let old_key = public_key_of(&cluster, &old);
    cluster.nodes[0].kill_agent();
    cluster.cni(1, "DEL", &old.pod).ok();
    let fresh = Pod::new();
    let args = format!("IgnoreUnknown=1;IP={}", old.ip);
    let result = cluster
        .cni_args(1, "ADD", &fresh, &cluster.conf(1), &args)
        .ok()
        .json();
    assert_eq!(
        address_of(&result, false),
        old.ip,
        "host-local did not reuse the address"
    );
    let fresh = PodOn {
        pod: fresh,
        node: 1,
        ip: old.ip.clone(),
        result,
    };
    let new_key = public_key_of(&cluster, &fresh);
    cluster.start_agent(0);
    let settled = wait_for(CONVERGE, || {
        let peers: Vec<String> = peer_keys(&cluster, 0)
            .iter()
            .flat_map(|a| a["peers"].as_array().cloned().unwrap_or_default())
            .map(|p| p["publicKey"].as_str().unwrap_or_default().to_string())
            .collect();
        peers.contains(&new_key) && !peers.contains(&old_key)
    });
    assert!(
        settled,
        "node A still peers the old key, or not the new one"
    );
    converge_all_pairs(&[add_marker(&a), add_marker(&fresh)]);
    for p in [&a, &fresh] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// A borrowed view for the pair checks.
fn add_marker(p: &PodOn) -> PodRef<'_> {
    PodRef {
        pod: &p.pod,
        ip: &p.ip,
    }
}

/// Count WireGuard UDP frames and list everything else between node addresses that is
/// neither ARP, IPv6 neighbour discovery, link-local IGMP, nor TCP to etcd.
fn classify_bridge_frames(pcap: &[u8]) -> (usize, Vec<String>) {
    let (mut wireguard, mut other) = (0, Vec::new());
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &pcap[at + 16..(at + 16 + len).min(pcap.len())];
        at += 16 + len;
        if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
            continue; // ARP, IPv6 neighbour discovery
        }
        let ip = &frame[14..];
        let header = usize::from(ip[0] & 0x0f) * 4;
        let ports = |i: usize| u16::from_be_bytes([ip[header + i], ip[header + i + 1]]);
        match ip[9] {
            17 => {
                let payload = &ip[header + 8..];
                let is_wireguard = payload.len() >= 4
                    && (1..=4).contains(&payload[0])
                    && payload[1..4] == [0, 0, 0];
                if is_wireguard {
                    wireguard += 1;
                } else {
                    other.push(format!("UDP {} -> {}", ports(0), ports(2)));
                }
            }
            6 if ports(0) == 23790 || ports(2) == 23790 => {} // agent <-> etcd
            // The kernel's own membership reports when a link comes up (224.0.0.0/24).
            2 if ip[16..19] == [224, 0, 0] => {}
            proto => other.push(format!(
                "IP protocol {proto} {:?} -> {:?}",
                &ip[12..16],
                &ip[16..20]
            )),
        }
    }
    (wireguard, other)
}

/// An agent stopped past its lease TTL: its node is marked stale but its pods stay peers
/// (an agent crash-loop must not cut pods off); past the grace period they are dropped
/// everywhere; when the agent is back, so are they.
#[test]
fn a_stale_node_keeps_its_pods_until_the_grace_period_ends() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("mesh"); 2];
    cluster.agent_flags = [
        "--lease-ttl",
        "2",
        "--grace-period",
        "12",
        "--resync-interval",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cluster.write_conflists();
    cluster.start_agents();
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let b_key = public_key_of(&cluster, &b);
    let a_peers = |cluster: &Cluster| -> Vec<String> {
        peer_keys(cluster, 0)
            .iter()
            .flat_map(|x| x["peers"].as_array().cloned().unwrap_or_default())
            .map(|p| p["publicKey"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let stale_on_a =
        |cluster: &Cluster| show(cluster, 0)["staleNodes"] == serde_json::json!(["node2"]);
    cluster.nodes[1].kill_agent();
    let killed = std::time::Instant::now();
    assert!(
        wait_for(CONVERGE, || stale_on_a(&cluster)),
        "node2 never marked stale"
    );
    assert!(
        ping_once(&a.pod, &b.ip),
        "a stale node's pod was cut off inside the grace period"
    );
    assert!(a_peers(&cluster).contains(&b_key));

    // The observing agent restarts late in the grace period (12 s). Staleness comes from
    // node2's heartbeat in etcd, so the restart does not start the grace period over: the pod
    // is dropped about 5 s after the restart, not 12.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(killed.elapsed()));
    cluster.nodes[0].kill_agent();
    cluster.start_agent(0);
    let restarted = std::time::Instant::now();
    assert!(
        wait_for(CONVERGE, || stale_on_a(&cluster)),
        "node2 not stale on the restarted agent"
    );
    let dropped = wait_for(Duration::from_secs(40), || {
        !a_peers(&cluster).contains(&b_key)
    });
    assert!(dropped, "the stale node's pod outlived the grace period");
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "dropped {:?} after the observer's restart: the restart started the grace period over",
        restarted.elapsed()
    );
    cluster.start_agent(1);
    assert!(
        wait_for(CONVERGE, || a_peers(&cluster).contains(&b_key)),
        "the pod did not return"
    );
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// etcd killed and restarted on its data directory: nothing is cut meanwhile, a pod added
/// while it was down becomes reachable across nodes afterwards.
#[test]
fn an_etcd_restart_loses_nothing_and_catches_up() {
    let mut cluster = running(2);
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    cluster.kill_etcd();
    let c = add(&cluster, 1);
    assert!(
        all_pairs_ping(&[add_marker(&a), add_marker(&b)]).is_empty(),
        "etcd down cut pods off"
    );
    cluster.start_etcd();
    converge_all_pairs(&[add_marker(&a), add_marker(&b), add_marker(&c)]);
    for p in [&a, &b, &c] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Plugin ADDs racing the agent's reconcile on the same links: no peer lost, no link
/// recreated (the early pods keep their daemons).
#[test]
fn adds_racing_the_agents_reconcile_lose_nothing() {
    let cluster = running(2);
    let early = vec![add(&cluster, 0), add(&cluster, 1)];
    converge_all_pairs(&early);
    let daemons = |cluster: &Cluster| -> Vec<Value> {
        early
            .iter()
            .map(|p| {
                let dir = cluster.nodes[p.node]
                    .store
                    .join(&cluster.network)
                    .join(&cluster.nodes[p.node].name);
                let text =
                    std::fs::read_to_string(dir.join(format!("{}:eth0.json", p.pod.id))).unwrap();
                serde_json::from_str::<Value>(&text).unwrap()["daemonPid"].clone()
            })
            .collect()
    };
    let before = daemons(&cluster);
    let late: Vec<PodOn> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let cluster = &cluster;
                scope.spawn(move || add(cluster, i % 2))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = early.iter().map(add_marker).collect::<Vec<_>>();
    all.extend(late.iter().map(add_marker));
    converge_all_pairs(&all);
    assert_eq!(daemons(&cluster), before, "a link was recreated");
    for p in early.iter().chain(&late) {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// R1: the agent's resync lists this node's records, then brings each link to its peer set.
/// A pod whose ADD joins in between (held open here by a failpoint in the resync) was told to
/// every local link by its ADD; the resync must not prune it from them afterwards. Mesh: local
/// pods peer with each other.
#[test]
fn a_resync_never_prunes_a_pod_that_joined_during_it() {
    let mut cluster = Cluster::new(1);
    cluster.peerings = vec![Some("mesh")];
    cluster.agent_flags = ["--resync-interval", "3600"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cluster.agent_env = vec![("WG_CNI_FAILPOINT".into(), "resync-pause".into())];
    cluster.write_conflists();
    let early = add(&cluster, 0);
    // The agent's first resync (after its first sync) pauses once its listing is made.
    cluster.start_agents();
    let log = || std::fs::read_to_string(&cluster.nodes[0].agent_log).unwrap_or_default();
    assert!(
        wait_for(CONVERGE, || log().contains("failpoint: pausing")),
        "the resync never reached the failpoint: {}",
        log()
    );
    let late = add(&cluster, 0);
    let late_key = public_key_of(&cluster, &late);
    assert!(
        !log().contains("failpoint: going on"),
        "the ADD took longer than the pause: no race was staged"
    );
    assert!(wait_for(CONVERGE, || log().contains("failpoint: going on")));
    // Let the resync finish its links (there is no other resync for an hour).
    std::thread::sleep(Duration::from_secs(2));
    let early_key = public_key_of(&cluster, &early);
    let holds_late = peer_keys(&cluster, 0).iter().any(|a| {
        a["publicKey"] == early_key.as_str()
            && a["peers"]
                .as_array()
                .is_some_and(|peers| peers.iter().any(|p| p["publicKey"] == late_key.as_str()))
    });
    assert!(
        holds_late,
        "the resync pruned the pod that joined during it"
    );
    assert!(ping_once(&early.pod, &late.ip));
    for p in [&early, &late] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// One MTU per network: a node whose conflist sets none takes the smallest another node
/// publishes (here node 1's operator-set 1380 over its own default of 1420).
#[test]
fn the_network_mtu_is_the_smallest_any_node_publishes() {
    let mut cluster = Cluster::new(2);
    cluster.mtus = vec![Some(1380), None];
    cluster.write_conflists();
    cluster.start_agents();
    let a = add(&cluster, 0);
    let mirror = cluster.nodes[1]
        .store
        .join(&cluster.network)
        .join("node1")
        .join("node.json");
    let published = wait_for(CONVERGE, || {
        std::fs::read_to_string(&mirror)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v["mtu"] == 1380)
    });
    assert!(published, "node 1's MTU never reached node 2's mirror");
    let b = add(&cluster, 1);
    let link = b.pod.ip(&["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1380"), "node 2's pod link: {link}");
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// The public keys of node `node`'s pod records (not its gateway), as on its disk.
fn pod_keys_on(cluster: &Cluster, node: usize) -> std::collections::BTreeSet<String> {
    peer_keys(cluster, node)
        .iter()
        .filter_map(|a| a["publicKey"].as_str().map(str::to_string))
        .collect()
}

/// The peers `holder`'s link has, without gateways.
fn pod_peers_of(cluster: &Cluster, holder: &PodOn) -> std::collections::BTreeSet<String> {
    peer_keys(cluster, holder.node)
        .iter()
        .filter(|a| a["containerId"] == holder.pod.id.as_str())
        .flat_map(|a| a["peers"].as_array().cloned().unwrap_or_default())
        .filter(|p| !p["kind"].as_str().unwrap_or_default().contains("gateway"))
        .filter_map(|p| p["publicKey"].as_str().map(str::to_string))
        .collect()
}

/// etcd compacts away the history a stopped agent's watch still needed, while 50 records
/// churn on the other node: after SIGCONT the agent re-lists, and its pod ends up peering
/// exactly the other node's live pods (no stale peer, none missing).
#[test]
fn a_compaction_while_an_agent_is_stopped_leaves_no_stale_and_no_missing_peer() {
    let cluster = running_mesh(2);
    let a = add(&cluster, 0);
    let first = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&first)]);

    cluster.nodes[0].signal_agent("STOP");
    cluster.fill_etcd(2500, 8 * 1024);
    // The churn: 30 ADDs and 20 DELs on node B (the first pod among them).
    let mut added: Vec<PodOn> = (0..30).map(|_| add(&cluster, 1)).collect();
    cluster.cni(1, "DEL", &first.pod).ok();
    for gone in added.drain(..19) {
        cluster.cni(1, "DEL", &gone.pod).ok();
    }
    let live = pod_keys_on(&cluster, 1);
    assert_eq!(live.len(), 11);
    let published = wait_for(CONVERGE, || {
        let keys = cluster.etcd_keys();
        let prefix = format!("/wg-cni/v1/{}/links/node2/", cluster.network);
        keys.iter().filter(|k| k.starts_with(&prefix)).count() == 12 // + its gateway
    });
    assert!(published, "node B did not publish its final state");
    let revision = cluster.etcd_revision().to_string();
    assert!(cluster.etcdctl(&["compact", &revision]).status.success());
    cluster.nodes[0].signal_agent("CONT");

    let log = || std::fs::read_to_string(&cluster.nodes[0].agent_log).unwrap_or_default();
    assert!(
        wait_for(CONVERGE, || log().contains("watch cancelled")),
        "the stopped agent's watch was not cancelled by the compaction"
    );
    let mut peers = Default::default();
    let exact = wait_for(CONVERGE, || {
        peers = pod_peers_of(&cluster, &a);
        peers == live
    });
    assert!(
        exact,
        "A's pod peers {} pods, stale {:?}, missing {:?}",
        peers.len(),
        peers.difference(&live).collect::<Vec<_>>(),
        live.difference(&peers).collect::<Vec<_>>()
    );
    let last = added.last().unwrap();
    assert!(wait_for(CONVERGE, || ping_once(&a.pod, &last.ip)));
    for p in added.iter().chain([&a]) {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// A record put straight into etcd under node B's name, claiming pod A's own address: no
/// node's agent mirrors it, no link peers it, and traffic to pod A still reaches pod A.
#[test]
fn a_poison_record_in_etcd_never_becomes_a_peer() {
    let cluster = running(2);
    let a = add(&cluster, 0);
    let b = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let b_file = cluster.nodes[1]
        .store
        .join(&cluster.network)
        .join("node2")
        .join(format!("{}:eth0.json", b.pod.id));
    let mut poison: Value =
        serde_json::from_str(&std::fs::read_to_string(b_file).unwrap()).unwrap();
    let key = run_ok("sh", &["-c", "wg genkey | wg pubkey"])
        .trim()
        .to_string();
    poison["containerId"] = "poison".into();
    poison["publicKey"] = key.clone().into();
    poison["addresses"] = serde_json::json!([format!("{}/24", a.ip)]);
    let etcd_key = format!("/wg-cni/v1/{}/links/node2/poison:eth0", cluster.network);
    let put = cluster.etcdctl(&["put", &etcd_key, &poison.to_string()]);
    assert!(put.status.success(), "etcdctl put");

    let log = || std::fs::read_to_string(&cluster.nodes[0].agent_log).unwrap_or_default();
    assert!(
        wait_for(CONVERGE, || log()
            .contains("refusing what a node published")),
        "node A's agent did not judge the poison record"
    );
    // A few reconciles later, still nowhere.
    std::thread::sleep(Duration::from_secs(5));
    for node in 0..2 {
        let everywhere: Vec<String> = peer_keys(&cluster, node)
            .iter()
            .flat_map(|at| at["peers"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["publicKey"].as_str().map(str::to_string))
            .collect();
        assert!(
            !everywhere.contains(&key),
            "node {node} peers the poison key"
        );
    }
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// One sample of a scrape, as the Prometheus client's parser read it.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The Python with the Prometheus client (`make deps`: scripts/install-deps.sh makes it).
fn metrics_python() -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/metrics-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make deps` (scripts/install-deps.sh makes the venv with prometheus-client)",
        python.display()
    );
    python
}

/// Node `node`'s `/metrics` (its agent's default --metrics-listen, on the node's loopback),
/// parsed by the Prometheus client's parser (tests/tools/scrape.py): a text it cannot parse,
/// a wrong Content-Type or a duplicate series fails the test.
fn scrape(cluster: &Cluster, node: usize) -> Vec<Sample> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/scrape.py");
    let python = metrics_python();
    let out = cluster.nodes[node].exec(&[
        python.to_str().unwrap(),
        script.to_str().unwrap(),
        "http://127.0.0.1:9766/metrics",
    ]);
    assert!(
        out.status.success(),
        "scraping node {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_string(),
            labels: serde_json::from_value(s["labels"].clone()).unwrap(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

/// The samples named `name` whose labels include `labels`, summed (`None`: there is none).
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Issue 23: `/metrics` of a running agent, parsed by the Prometheus client, follows reality
/// on two mesh nodes: a pod link's peers by kind, its bytes (and per peer, with
/// `--metrics-per-peer`) grow by at least the pings sent, its newest handshake is a recent
/// timestamp, the mirror counts the other node's records, and a poison record put into etcd is
/// counted as refused. `/healthz` still answers on its own port. (A rotation counter test
/// comes with key rotation.)
#[test]
fn metrics_follow_traffic_refusals_and_peer_kinds() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("mesh"); 2];
    cluster.agent_flags.push("--metrics-per-peer".into());
    cluster.write_conflists();
    cluster.start_agents();
    let a = add(&cluster, 0);
    let b = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let net = cluster.network.clone();
    let link_a = [("network", net.as_str()), ("container", a.pod.id.as_str())];
    let b_key = public_key_of(&cluster, &b);

    let before = scrape(&cluster, 0);
    assert_eq!(metric(&before, "wgcni_link_up", &link_a), Some(1.0));
    let mut info = link_a.to_vec();
    info.extend([("role", "pod"), ("backend", expected_backend())]);
    assert_eq!(metric(&before, "wgcni_link_info", &info), Some(1.0));
    // Mesh: pod B directly, its own gateway and node 2's.
    for (kind, count) in [
        ("direct", 1.0),
        ("gateway", 2.0),
        ("pending", 0.0),
        ("relay", 0.0),
        ("static", 0.0),
    ] {
        let mut labels = link_a.to_vec();
        labels.push(("kind", kind));
        assert_eq!(
            metric(&before, "wgcni_link_peers", &labels),
            Some(count),
            "{kind} peers of A's link"
        );
    }
    let gateway = [("network", net.as_str()), ("role", "gateway")];
    assert_eq!(
        metric(&before, "wgcni_link_info", &gateway),
        Some(1.0),
        "the node gateway's link"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let handshake = metric(&before, "wgcni_link_latest_handshake_seconds", &link_a).unwrap();
    assert!(
        handshake > now - 300.0 && handshake <= now + 1.0,
        "handshake at {handshake}, now {now}"
    );
    let per_net = [("network", net.as_str())];
    assert_eq!(metric(&before, "wgcni_network_ready", &per_net), Some(1.0));
    assert_eq!(
        metric(&before, "wgcni_records_mirrored", &per_net),
        Some(2.0),
        "pod B and node 2's gateway"
    );
    assert!(metric(&before, "wgcni_watch_events_total", &per_net).unwrap() > 0.0);
    assert!(metric(&before, "wgcni_reconcile_duration_seconds_count", &per_net).unwrap() > 0.0);
    assert!(metric(&before, "wgcni_last_sync_age_seconds", &per_net).is_some());
    assert_eq!(
        metric(&before, "wgcni_lease_losses_total", &per_net),
        Some(0.0)
    );
    assert_eq!(
        metric(&before, "wgcni_key_rotations_observed_total", &per_net),
        Some(0.0)
    );
    assert_eq!(
        metric(&before, "wgcni_records_refused_total", &per_net),
        None,
        "nothing refused yet"
    );

    // Bytes follow a ping: 5 echo requests out, 5 replies in, each > 84 bytes encrypted.
    let pinged = a
        .pod
        .exec(&["ping", "-c", "5", "-i", "0.2", "-W", "2", &b.ip]);
    assert!(pinged.status.success(), "A cannot ping B");
    let after = scrape(&cluster, 0);
    let grew = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels).unwrap() - metric(&before, name, labels).unwrap()
    };
    for name in [
        "wgcni_link_sent_bytes_total",
        "wgcni_link_received_bytes_total",
    ] {
        assert!(
            grew(name, &link_a) >= 5.0 * 84.0,
            "{name} grew by {}",
            grew(name, &link_a)
        );
    }
    let mut peer_b = link_a.to_vec();
    peer_b.push(("public_key", b_key.as_str()));
    for name in [
        "wireguard_sent_bytes_total",
        "wireguard_received_bytes_total",
    ] {
        assert!(
            grew(name, &peer_b) >= 5.0 * 84.0,
            "{name} of peer B grew by {}",
            grew(name, &peer_b)
        );
    }
    assert!(metric(&after, "wireguard_latest_handshake_seconds", &peer_b).unwrap() > 0.0);

    // A poison record under node 2's name claiming pod A's address: refused, and counted.
    let b_file = cluster.nodes[1]
        .store
        .join(&net)
        .join("node2")
        .join(format!("{}:eth0.json", b.pod.id));
    let mut poison: Value =
        serde_json::from_str(&std::fs::read_to_string(b_file).unwrap()).unwrap();
    poison["containerId"] = "poison".into();
    poison["publicKey"] = run_ok("sh", &["-c", "wg genkey | wg pubkey"]).trim().into();
    poison["addresses"] = serde_json::json!([format!("{}/24", a.ip)]);
    let put = cluster.etcdctl(&[
        "put",
        &format!("/wg-cni/v1/{net}/links/node2/poison:eth0"),
        &poison.to_string(),
    ]);
    assert!(put.status.success(), "etcdctl put");
    let mut refused = None;
    let counted = wait_for(CONVERGE, || {
        refused = metric(
            &scrape(&cluster, 0),
            "wgcni_records_refused_total",
            &per_net,
        );
        refused.is_some_and(|n| n >= 1.0)
    });
    assert!(
        counted,
        "the poison record was not counted as refused: {refused:?}"
    );
    assert_eq!(
        metric(&scrape(&cluster, 0), "wgcni_records_mirrored", &per_net),
        Some(2.0),
        "the poison record is not mirrored"
    );

    // The health endpoints stay where they were.
    let healthz = cluster.nodes[0].exec(&[
        metrics_python().to_str().unwrap(),
        "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9765/healthz', timeout=5).status)",
    ]);
    assert_eq!(String::from_utf8_lossy(&healthz.stdout).trim(), "200");
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// R3: an unreadable `gateway.json` (a torn write by hand, a full disk) does not make the agent
/// remove the gateway, every pod's default route, from the node's pod links: a reconcile that
/// cannot account for every peer removes none.
#[test]
fn an_unreadable_gateway_record_removes_no_peer() {
    let cluster = running(1);
    let a = add(&cluster, 0);
    let host = cluster.nodes[0].addr.clone();
    assert!(
        wait_for(CONVERGE, || ping_once(&a.pod, &host)),
        "the pod never reached its node's address"
    );
    let file = cluster.nodes[0]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[0].name)
        .join("gateway.json");
    let good = std::fs::read(&file).unwrap();
    std::fs::write(&file, b"{ torn").unwrap();
    // Several agent resyncs (every 2 s) later:
    std::thread::sleep(Duration::from_secs(6));
    let still = ping_once(&a.pod, &host);
    std::fs::write(&file, good).unwrap();
    assert!(
        still,
        "the pod lost its gateway while gateway.json was unreadable"
    );
    cluster.cni(0, "DEL", &a.pod).ok();
}

/// R5: the gateway the agent makes for a node without pods gets the address the conflist's
/// IPAM range names as its `gateway` (host-local answers pods with that gateway), not `.1`.
#[test]
fn the_agents_gateway_takes_the_address_ipam_names() {
    let mut cluster = Cluster::new(1);
    cluster.write_conflists();
    let node = &cluster.nodes[0];
    let list_file = node.conf_dir.join("10-wg.conflist");
    let mut list: Value =
        serde_json::from_str(&std::fs::read_to_string(&list_file).unwrap()).unwrap();
    let gateway = node.subnet().replace(".0/24", ".254");
    list["plugins"][0]["ipam"]["ranges"][0][0]["gateway"] = gateway.clone().into();
    std::fs::write(&list_file, list.to_string()).unwrap();
    cluster.start_agents();
    let node = &cluster.nodes[0];
    let file = node
        .store
        .join(&cluster.network)
        .join(&node.name)
        .join("gateway.json");
    let record = || -> Value {
        std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    assert!(
        wait_for(CONVERGE, || record().is_object()),
        "the agent made no gateway"
    );
    assert_eq!(
        record()["addresses"],
        serde_json::json!([format!("{gateway}/32")])
    );
    // A pod then gets that gateway from host-local and reaches the node through it.
    let mut conf = cluster.conf(0);
    conf["ipam"]["ranges"][0][0]["gateway"] = gateway.clone().into();
    let pod = Pod::new();
    cluster.cni_with(0, "ADD", &pod, &conf).ok();
    let host = cluster.nodes[0].addr.clone();
    assert!(
        wait_for(CONVERGE, || ping_once(&pod, &host)),
        "the pod cannot reach its node"
    );
    cluster.cni_with(0, "DEL", &pod, &conf).ok();
}

/// T1 on real links: node 3 names a pod of node 2 as its own address. Node addresses become
/// allowed IPs of that node's gateway on every pod, so before the membership layer the pod
/// on node 1 routed that pod's address to node 3. Now node 3's claim on the address is refused
/// (it lies in the cluster range), node 1 keeps the pod's /32 on the pod's own key, and the
/// pods still talk.
#[test]
fn a_node_naming_another_nodes_pod_as_its_address_gets_nothing() {
    let cluster = running(3);
    let a = add(&cluster, 0);
    let b = add(&cluster, 1);
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    let list_file = cluster.nodes[2].conf_dir.join("10-wg.conflist");
    let text = std::fs::read_to_string(&list_file).unwrap();
    let evil = text.replace(
        &format!("\"endpoint\":\"{}\"", cluster.nodes[2].addr),
        &format!("\"endpoint\":\"{}\"", b.ip),
    );
    assert_ne!(text, evil, "node 3's conflist names its endpoint");
    std::fs::write(&list_file, evil).unwrap();
    let log = || std::fs::read_to_string(&cluster.nodes[0].agent_log).unwrap_or_default();
    assert!(
        wait_for(CONVERGE, || log()
            .contains("endpoint_in_pod_or_service_range")),
        "node 1's agent never refused node 3's new address"
    );
    // Several reconciles later: b's address is on b's key only, and a reaches b.
    std::thread::sleep(Duration::from_secs(5));
    let b_key = public_key_of(&cluster, &b);
    let holders: Vec<String> = peer_keys(&cluster, 0)
        .iter()
        .flat_map(|at| at["peers"].as_array().cloned().unwrap_or_default())
        .filter(|p| {
            p["allowedIps"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|ip| ip == &format!("{}/32", b.ip)))
        })
        .filter_map(|p| p["publicKey"].as_str().map(str::to_string))
        .collect();
    assert!(
        holders.iter().all(|k| *k == b_key),
        "b's address routed to another key on node 1: {holders:?}"
    );
    converge_all_pairs(&[add_marker(&a), add_marker(&b)]);
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Without a node gateway (`"hostGateway": false`) a pod has no default route: its link must
/// still route the whole `clusterRange`, not only its own node's subnet, or pods on two nodes
/// never reach each other. CHECK expects those routes.
#[test]
fn pods_without_a_host_gateway_reach_pods_on_other_nodes() {
    let mut cluster = Cluster::new(2);
    // On-demand needs the gateways.
    cluster.peerings = vec![Some("mesh"); 2];
    let confs: Vec<Value> = (0..2)
        .map(|i| {
            let mut conf = cluster.conf(i);
            conf["hostGateway"] = false.into();
            conf
        })
        .collect();
    for (node, conf) in cluster.nodes.iter().zip(&confs) {
        let mut plugin = conf.clone();
        let plugin_fields = plugin.as_object_mut().unwrap();
        plugin_fields.remove("name");
        plugin_fields.remove("cniVersion");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": cluster.network,
            "plugins": [plugin],
        });
        std::fs::create_dir_all(&node.conf_dir).unwrap();
        std::fs::write(node.conf_dir.join("10-wg.conflist"), conflist.to_string()).unwrap();
    }
    cluster.start_agents();
    let pods: Vec<(Pod, Value)> = (0..2)
        .map(|i| {
            let pod = Pod::new();
            let result = cluster.cni_with(i, "ADD", &pod, &confs[i]).ok().json();
            (pod, result)
        })
        .collect();
    let ((a, ra), (b, rb)) = (&pods[0], &pods[1]);
    let (a_ip, b_ip) = (address_of(ra, false), address_of(rb, false));
    let routes = |pod: &Pod| pod.ip(&["route", "show"]);
    let both_ways = || ping_once(a, &b_ip) && ping_once(b, &a_ip);
    assert!(
        wait_for(CONVERGE, both_ways),
        "pods on two nodes without a host gateway cannot ping each other; routes in A's pod:\n{}",
        routes(a)
    );
    for (i, (pod, result)) in pods.iter().enumerate() {
        let mut conf = confs[i].clone();
        conf["prevResult"] = result.clone();
        cluster.cni_with(i, "CHECK", pod, &conf).ok();
    }
    for (i, (pod, _)) in pods.iter().enumerate() {
        cluster.cni_with(i, "DEL", pod, &confs[i]).ok();
    }
}

/// Whether any writable mapping of process `pid` holds `needle`.
fn memory_holds(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue; // guard pages, vsyscall: unreadable
        }
        if region.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

/// A pod link's private key as the device reports it (`wg`), in its three printable forms.
fn private_key_forms(cluster: &Cluster, pod: &PodOn) -> Vec<Vec<u8>> {
    let out = match backend().as_str() {
        "userspace" => {
            let dir = cluster.nodes[pod.node].store.join(&cluster.network);
            let file = dir
                .join(&cluster.nodes[pod.node].name)
                .join(format!("{}:eth0.json", pod.pod.id));
            let record: Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            run(
                "wg",
                &["show", record["hostName"].as_str().unwrap(), "private-key"],
            )
        }
        _ => pod.pod.exec(&["wg", "show", "eth0", "private-key"]),
    };
    let base64 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let key = wireguard_control::Key::from_base64(&base64).expect("a private key from wg");
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    vec![base64.into_bytes(), hex.into_bytes(), key.0.to_vec()]
}

/// `GET path` from node `node`'s agent on its loopback port, from a thread of this process in
/// the node's namespace (no client program needed: the kernel guest has no python); the raw
/// answer, head and body.
fn http_in_node(cluster: &Cluster, node: usize, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let netns = std::fs::File::open(format!("/run/netns/{}", cluster.nodes[node].netns)).unwrap();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("reading the answer");
        answer
    })
    .join()
    .unwrap()
}

/// The agent reads every local link's device at every resync and at every `/metrics` scrape,
/// and a device read carries the link's private key (the kernel always sends it; the UAPI
/// answers it), and the agent's `keyRotation` makes and sets keys itself: after more than 10
/// resyncs, 10 scrapes and a rotation of each pod the agent's writable memory holds no pod's
/// private key in any form, old or new. The same scan of this test process, which holds the
/// keys, finds them (the scan works).
#[test]
fn the_agents_memory_holds_no_pod_private_key_after_10_resyncs_and_scrapes() {
    let mut cluster = Cluster::new(1);
    cluster.agent_flags = ["--lease-ttl", "3", "--resync-interval", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cluster
        .extra
        .insert("keyRotation".into(), Value::from("10s"));
    cluster.write_conflists();
    cluster.start_agents();
    let pods = [add(&cluster, 0), add(&cluster, 0)];
    converge_all_pairs(&pods);
    let first: Vec<String> = pods.iter().map(|p| public_key_of(&cluster, p)).collect();
    let mut keys: Vec<Vec<u8>> = pods
        .iter()
        .flat_map(|p| private_key_forms(&cluster, p))
        .collect();
    // One resync a second: past 10 of them, and 10 scrapes reading both pods' links and the
    // gateway's; each pod's key comes due after 10 s.
    std::thread::sleep(Duration::from_secs(13));
    let limit = event_path_limit() * 2;
    let rotated = wait_for(limit, || {
        pods.iter()
            .zip(&first)
            .all(|(p, key)| public_key_of(&cluster, p) != *key)
    });
    assert!(
        rotated,
        "the agent rotated not every pod's key {limit:?} after it came due"
    );
    keys.extend(pods.iter().flat_map(|p| private_key_forms(&cluster, p)));
    for _ in 0..10 {
        let answer = http_in_node(&cluster, 0, 9766, "/metrics");
        let read = answer
            .lines()
            .filter(|l| l.starts_with("wgcni_link_up{") && l.ends_with(" 1"))
            .count();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(read, 3, "links read in a scrape:\n{answer}");
    }
    let agent = cluster.nodes[0].agent_pid().expect("the agent runs");
    let me = std::process::id();
    for key in &keys {
        assert!(memory_holds(me, key), "the scan cannot find a key it holds");
        assert!(
            !memory_holds(agent, key),
            "the agent's memory holds a pod's private key ({} bytes form)",
            key.len()
        );
    }
    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// How long until both ends of a pair that exchanged a packet hold direct peers (the guest
/// emulates every instruction: ten times looser there).
fn direct_within() -> Duration {
    match expected_backend() {
        "kernel" => Duration::from_secs(30),
        _ => Duration::from_secs(5),
    }
}

/// The peers `pod`'s link holds for other pods, by key, with their path ("direct" or
/// "pending") as `wg-cni show` reports them.
fn pod_peers(cluster: &Cluster, pod: &PodOn) -> BTreeMap<String, String> {
    show(cluster, pod.node)["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["containerId"] == pod.pod.id.as_str())
        .flat_map(|a| a["peers"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            let path = p["path"].as_str()?.to_string();
            Some((p["publicKey"].as_str()?.to_string(), path))
        })
        .collect()
}

/// Remove `pod`'s peer for `other` behind its agent's back (as after a restart that lost it).
fn drop_direct_peer(cluster: &Cluster, pod: &PodOn, other: &PodOn) {
    let key = public_key_of(cluster, other);
    let removed = if expected_backend() == "kernel" {
        pod.pod.exec(&["wg", "set", "eth0", "peer", &key, "remove"])
    } else {
        let link = show(cluster, pod.node)["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["containerId"] == pod.pod.id.as_str())
            .unwrap()["link"]
            .as_str()
            .unwrap()
            .to_string();
        cluster.nodes[pod.node].exec(&["wg", "set", &link, "peer", &key, "remove"])
    };
    assert!(removed.status.success());
}

fn holds_direct(cluster: &Cluster, pod: &PodOn, other: &PodOn) -> bool {
    pod_peers(cluster, pod)
        .get(&public_key_of(cluster, other))
        .map(String::as_str)
        == Some("direct")
}

/// A cluster of `n` on-demand nodes whose hosts drop what FORWARD does not accept and, like
/// kube-proxy, every packet conntrack calls INVALID; idle direct peers go after `idle` s.
fn on_demand_cluster(n: usize, idle: u64) -> Cluster {
    let mut cluster = Cluster::new(n);
    cluster.peerings = vec![Some("on-demand"); n];
    cluster.extra.insert("idlePeerTimeout".into(), idle.into());
    cluster.agent_flags = ["--lease-ttl", "3", "--resync-interval", "3600"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for node in &cluster.nodes {
        for rule in [
            &["iptables", "-P", "FORWARD", "DROP"][..],
            &[
                "iptables",
                "-I",
                "FORWARD",
                "1",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ],
        ] {
            assert!(node.exec(rule).status.success(), "{rule:?}");
        }
    }
    cluster.write_conflists();
    cluster.start_agents();
    cluster
}

/// Both gateways relay (each has its relay peer with a live session): the first packet
/// between two pods then needs nothing else.
fn wait_for_relays(cluster: &Cluster) {
    let ready = wait_for(CONVERGE, || {
        (0..cluster.nodes.len()).all(|node| {
            show(cluster, node)["gateway"]["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["kind"] == "relay gateway")
                .filter(|p| p["latestHandshakeSecondsAgo"].is_u64())
                .count()
                == cluster.nodes.len() - 1
        })
    });
    assert!(ready, "the relays have no sessions after {CONVERGE:?}");
}

/// Issue 23, on-demand: before any traffic a pod link holds only its gateway and the node
/// gateway holds the other node's as its relay (`/metrics` says so, parsed by the Prometheus
/// client); a relayed ping promotes the pair: the pod link holds the other pod direct and the
/// promotion is counted; idle, the direct peer is trimmed and counted too.
#[test]
fn metrics_count_relays_promotions_and_trims_on_demand() {
    let idle = 10;
    let cluster = on_demand_cluster(2, idle);
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    wait_for_relays(&cluster);
    let net = cluster.network.clone();
    let per_net = [("network", net.as_str())];
    let kinds_of_a = |samples: &[Sample]| -> Vec<(String, f64)> {
        ["direct", "pending", "gateway", "relay", "static"]
            .iter()
            .map(|kind| {
                let labels = [
                    ("network", net.as_str()),
                    ("container", a.pod.id.as_str()),
                    ("kind", kind),
                ];
                (
                    kind.to_string(),
                    metric(samples, "wgcni_link_peers", &labels).unwrap_or(-1.0),
                )
            })
            .collect()
    };
    let only = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
        ["direct", "pending", "gateway", "relay", "static"]
            .iter()
            .map(|kind| {
                let n = pairs
                    .iter()
                    .find(|(k, _)| k == kind)
                    .map_or(0.0, |(_, n)| *n);
                (kind.to_string(), n)
            })
            .collect()
    };

    let quiet = scrape(&cluster, 0);
    assert_eq!(
        kinds_of_a(&quiet),
        only(&[("gateway", 1.0)]),
        "A's link before traffic"
    );
    let relay = [("network", net.as_str()), ("role", "gateway")];
    let gateway_link = quiet
        .iter()
        .find(|s| {
            s.name == "wgcni_link_info"
                && relay
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .expect("the gateway's link")
        .labels["interface"]
        .clone();
    let relays = [("interface", gateway_link.as_str()), ("kind", "relay")];
    assert_eq!(
        metric(&quiet, "wgcni_link_peers", &relays),
        Some(1.0),
        "node 2's gateway relays"
    );
    assert_eq!(
        metric(&quiet, "wgcni_direct_peers_promoted_total", &per_net),
        Some(0.0)
    );

    assert!(ping_once(&a.pod, &b.ip), "the first ping went unanswered");
    assert!(
        wait_for(direct_within(), || holds_direct(&cluster, &a, &b)),
        "A holds no direct peer for B after a ping"
    );
    let direct = scrape(&cluster, 0);
    assert_eq!(
        kinds_of_a(&direct),
        only(&[("gateway", 1.0), ("direct", 1.0)]),
        "A's link once direct"
    );
    assert!(metric(&direct, "wgcni_direct_peers_promoted_total", &per_net).unwrap() >= 1.0);

    let mut trimmed = None;
    let went = wait_for(Duration::from_secs(idle) + direct_within() * 3, || {
        let samples = scrape(&cluster, 0);
        trimmed = metric(&samples, "wgcni_direct_peers_trimmed_total", &per_net);
        trimmed.is_some_and(|n| n >= 1.0) && kinds_of_a(&samples) == only(&[("gateway", 1.0)])
    });
    assert!(
        went,
        "the idle direct peer was not trimmed and counted: {trimmed:?}"
    );
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// Issue 21's direct path on three nodes: the first ping to a never-contacted pod is answered
/// through the relay; both ends then hold direct peers (on one node, across two, and between
/// the two other nodes); a pair whose one end lost its direct peer is not cut off (the other
/// end sees the relayed traffic and gives the pair back to the relay); `wg-cni show` counts a
/// quiet direct peer's idle time; idle direct peers go and traffic resumes through the relay.
#[test]
fn on_demand_pairs_go_direct_when_traffic_flows_and_back_when_idle() {
    let idle = 10;
    let cluster = on_demand_cluster(3, idle);
    let (a, a2, b, c) = (
        add(&cluster, 0),
        add(&cluster, 0),
        add(&cluster, 1),
        add(&cluster, 2),
    );
    wait_for_relays(&cluster);
    for pod in [&a, &a2, &b, &c] {
        assert!(
            pod_peers(&cluster, pod).is_empty(),
            "no pod peer before any traffic"
        );
    }

    for (x, y) in [(&a, &a2), (&a, &b), (&b, &c)] {
        assert!(
            ping_once(&x.pod, &y.ip),
            "the first ping {} -> {} went unanswered",
            x.ip,
            y.ip
        );
        let direct = wait_for(direct_within(), || {
            holds_direct(&cluster, x, y) && holds_direct(&cluster, y, x)
        });
        assert!(
            direct,
            "{} and {} hold no direct peers {:?} after a ping: {:?} / {:?}",
            x.ip,
            y.ip,
            direct_within(),
            pod_peers(&cluster, x),
            pod_peers(&cluster, y)
        );
        assert!(ping_once(&x.pod, &y.ip) && ping_once(&y.pod, &x.ip));
    }
    // CHECK takes direct peers of current pods for what they are.
    for pod in [&a, &a2, &b, &c] {
        let mut conf = cluster.conf(pod.node);
        conf["prevResult"] = pod.result.clone();
        cluster.cni_with(pod.node, "CHECK", &pod.pod, &conf).ok();
    }

    // c's DEL takes b's direct peer for c along at once (c's address may be a new pod's
    // soon), not at the promoter's next sweep.
    let key_c = public_key_of(&cluster, &c);
    cluster.cni(c.node, "DEL", &c.pod).ok();
    let within = direct_within() / 2;
    let forgotten = wait_for(within, || !pod_peers(&cluster, &b).contains_key(&key_c));
    assert!(
        forgotten,
        "b still holds a peer for c {within:?} after c's DEL"
    );

    // a loses its direct peer for b (as after a restart without its state): a's packets go
    // through the relay again, b's node sees them and takes b's direct route back at once.
    assert!(holds_direct(&cluster, &b, &a));
    drop_direct_peer(&cluster, &a, &b);
    let answered = wait_for(direct_within(), || ping_once(&a.pod, &b.ip));
    assert!(answered, "a pair with one direct end stayed cut off");

    // Idle: show counts the quiet direct peers' idle time, then both ends' direct peers go
    // and the relay carries the pairs again.
    let quiet = Duration::from_secs(idle) + direct_within() * 3;
    let mut longest_idle = 0;
    let trimmed = wait_for(quiet, || {
        for node in 0..3 {
            for a in show(&cluster, node)["attachments"]
                .as_array()
                .into_iter()
                .flatten()
            {
                for p in a["peers"].as_array().into_iter().flatten() {
                    longest_idle = longest_idle.max(p["idleSeconds"].as_u64().unwrap_or(0));
                }
            }
        }
        [&a, &a2, &b]
            .iter()
            .all(|pod| pod_peers(&cluster, pod).is_empty())
    });
    assert!(
        trimmed,
        "direct peers still there {quiet:?} after the traffic stopped: {:?} {:?} {:?}",
        pod_peers(&cluster, &a),
        pod_peers(&cluster, &a2),
        pod_peers(&cluster, &b)
    );
    assert!(
        longest_idle >= 3,
        "show never reported a quiet direct peer idle for 3 s (longest: {longest_idle} s)"
    );
    assert!(ping_once(&a.pod, &b.ip), "no relay after the trim");
}

/// Datagrams received since `since`: the first one's delay and the longest gap between two
/// (from `since` on).
fn arrivals_after(
    arrivals: &std::sync::Mutex<Vec<std::time::Instant>>,
    since: std::time::Instant,
) -> Option<(Duration, Duration)> {
    let arrivals = arrivals.lock().unwrap();
    let after: Vec<_> = arrivals.iter().filter(|t| **t >= since).collect();
    let first = after.first()?.duration_since(since);
    let gap = after
        .windows(2)
        .map(|w| w[1].duration_since(*w[0]))
        .max()
        .unwrap_or_default();
    Some((first, gap.max(first)))
}

/// A one-way UDP flow between pods on two nodes (no answer ever helps the pair along): it
/// goes direct, pauses until both direct peers are trimmed and resumes through the relay
/// within 5 s; direct again, the sender's end loses its direct peer while the flow runs (as
/// after a restart without its state) and the receiver's node, seeing the flow relayed, gives
/// its pod the relay back: no gap over 5 s.
#[test]
fn a_one_way_udp_flow_recovers_within_5_s_across_trims() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let recover = Duration::from_secs(5);
    let idle = 4;
    let cluster = on_demand_cluster(2, idle);
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    wait_for_relays(&cluster);

    let stop = Arc::new(AtomicBool::new(false));
    let sending = Arc::new(AtomicBool::new(true));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let receiver = {
        let (stop, arrivals) = (stop.clone(), arrivals.clone());
        in_netns(Some(b.pod.path.clone()), move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            port_tx.send(socket.local_addr().unwrap().port()).unwrap();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    arrivals.lock().unwrap().push(Instant::now());
                }
            }
        })
    };
    let to: std::net::SocketAddr = format!("{}:{}", b.ip, port_rx.recv().unwrap())
        .parse()
        .unwrap();
    let sender = {
        let (stop, sending) = (stop.clone(), sending.clone());
        in_netns(Some(a.pod.path.clone()), move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            while !stop.load(Ordering::Relaxed) {
                if sending.load(Ordering::Relaxed) {
                    let _ = socket.send_to(b"one way", to);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let both_direct = || holds_direct(&cluster, &a, &b) && holds_direct(&cluster, &b, &a);
    let outcome = (|| -> Result<(), String> {
        if !wait_for(direct_within() + Duration::from_secs(2), both_direct) {
            return Err("the one-way flow never went direct".into());
        }
        sending.store(false, Ordering::Relaxed);
        let quiet = Duration::from_secs(idle) + direct_within() * 3;
        let trimmed = wait_for(quiet, || {
            pod_peers(&cluster, &a).is_empty() && pod_peers(&cluster, &b).is_empty()
        });
        if !trimmed {
            return Err(format!(
                "direct peers still there {quiet:?} after the flow paused"
            ));
        }
        let resumed = Instant::now();
        sending.store(true, Ordering::Relaxed);
        std::thread::sleep(recover + Duration::from_secs(1));
        match arrivals_after(&arrivals, resumed) {
            Some((first, _)) if first <= recover => {
                println!("resumed after the trim: first datagram after {first:?}")
            }
            other => return Err(format!("resumed after the trim: {other:?} (first, gap)")),
        }

        if !wait_for(direct_within() + Duration::from_secs(2), both_direct) {
            return Err("the resumed flow never went direct again".into());
        }
        let cut = Instant::now();
        drop_direct_peer(&cluster, &a, &b);
        std::thread::sleep(recover + Duration::from_secs(1));
        match arrivals_after(&arrivals, cut) {
            Some((first, gap)) if gap <= recover => println!(
                "sender's direct peer removed: first datagram after {first:?}, longest gap {gap:?}"
            ),
            other => {
                return Err(format!(
                    "sender's direct peer removed: {other:?} (first, gap)"
                ));
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    receiver.join().unwrap();
    for p in [&a, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
    outcome.unwrap();
}

/// A TCP stream between two pods on two nodes across every switch: it starts on the relay,
/// goes direct while it runs (no gap in received bytes over 200 ms, natively), carries
/// 100 MB direct, idles until both direct peers are gone, and goes on through the relay with
/// the hosts' FORWARD policy DROP and kube-proxy's INVALID drop in place (the switches delete
/// the pair's conntrack entries: a stale window would make the returning stream INVALID).
#[test]
fn a_stream_crosses_relay_direct_idle_relay_without_a_gap() {
    use std::io::{Read, Write};
    use std::time::Instant;
    let idle = 4;
    let cluster = on_demand_cluster(2, idle);
    let (a, b) = (add(&cluster, 0), add(&cluster, 1));
    wait_for_relays(&cluster);

    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let server = in_netns(Some(b.pod.path.clone()), move || {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        port_tx.send(listener.local_addr().unwrap().port()).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut reads: Vec<(Instant, usize)> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reads.push((Instant::now(), n)),
            }
        }
        let total: usize = reads.iter().map(|(_, n)| n).sum();
        let _ = stream.write_all(total.to_string().as_bytes());
        reads
    });
    let port = port_rx.recv().unwrap();
    let to: std::net::SocketAddr = format!("{}:{port}", b.ip).parse().unwrap();
    let mut stream = in_netns(Some(a.pod.path.clone()), move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap()
    })
    .join()
    .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let chunk = vec![7u8; 16 << 10];
    let mut sent = 0usize;

    // Relay, then the switch: a steady trickle (16 KiB every 10 ms) until both ends are direct.
    let switch_started = Instant::now();
    let mut direct_at = None;
    let mut round = 0;
    while switch_started.elapsed() < direct_within() + Duration::from_secs(2) {
        stream.write_all(&chunk).unwrap();
        sent += chunk.len();
        std::thread::sleep(Duration::from_millis(10));
        round += 1;
        // Looked at every 100 ms: `wg-cni show` takes a while, and the trickle must go on.
        if direct_at.is_none()
            && round % 10 == 0
            && holds_direct(&cluster, &a, &b)
            && holds_direct(&cluster, &b, &a)
        {
            direct_at = Some(switch_started.elapsed());
        }
        if direct_at.is_some_and(|at| switch_started.elapsed() > at + Duration::from_secs(1)) {
            break;
        }
    }
    let switch_phase = switch_started.elapsed();
    assert!(
        direct_at.is_some(),
        "the stream never went direct within {:?}",
        direct_within()
    );

    // 100 MB direct.
    let big = vec![9u8; 1 << 20];
    for _ in 0..100 {
        stream.write_all(&big).unwrap();
        sent += big.len();
    }
    // Idle until both direct peers are gone, then on through the relay.
    let quiet = Duration::from_secs(idle) + direct_within() * 3;
    let trimmed = wait_for(quiet, || {
        pod_peers(&cluster, &a).is_empty() && pod_peers(&cluster, &b).is_empty()
    });
    assert!(
        trimmed,
        "direct peers still there {quiet:?} after the stream paused"
    );
    for _ in 0..4 {
        stream.write_all(&big).unwrap();
        sent += big.len();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let reads = server.join().unwrap();
    assert_eq!(
        answer,
        sent.to_string(),
        "the server did not receive every byte"
    );

    // The longest stretch without received bytes while the stream switched to direct.
    let first = reads[0].0;
    let gap = reads
        .windows(2)
        .filter(|w| w[1].0.duration_since(first) < switch_phase)
        .map(|w| w[1].0.duration_since(w[0].0))
        .max()
        .unwrap_or_default();
    println!(
        "stream: direct after {:?}, longest gap while switching {gap:?}, {} bytes",
        direct_at.unwrap(),
        sent
    );
    if expected_backend() != "kernel" {
        assert!(
            gap < Duration::from_millis(200),
            "the switch to direct stalled the stream for {gap:?}"
        );
    }
}

/// What a node's host namespace holds that wg-cni may have put there: links, policy rules,
/// routes of every table, and iptables rules of every table and family (`-A` lines only:
/// chain counters move).
fn node_host_objects(cluster: &Cluster, i: usize) -> BTreeMap<&'static str, Vec<String>> {
    let node = &cluster.nodes[i];
    let lines = |args: &[&str]| -> Vec<String> {
        let out = node.exec(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let rules_only = |mut v: Vec<String>| {
        v.retain(|l| l.starts_with("-A "));
        v
    };
    BTreeMap::from([
        (
            "links",
            lines(&["ip", "-o", "link", "show"])
                .iter()
                .map(|l| {
                    l.split(':')
                        .nth(1)
                        .unwrap_or_default()
                        .trim()
                        .split('@')
                        .next()
                        .unwrap()
                        .to_string()
                })
                .collect(),
        ),
        ("rules4", lines(&["ip", "-4", "rule", "show"])),
        ("rules6", lines(&["ip", "-6", "rule", "show"])),
        (
            "routes4",
            lines(&["ip", "-4", "route", "show", "table", "all"]),
        ),
        ("iptables", rules_only(lines(&["iptables-save"]))),
        ("ip6tables", rules_only(lines(&["ip6tables-save"]))),
    ])
}

/// Item 7 of issue 22: `wg-cni uninstall` on a node whose agent is stopped removes the node
/// gateway (link, daemon, policy rules, table routes, iptables rules), the readiness marker
/// and the conflist, keeps the binaries and the runtime dir while a pod remains (saying so),
/// removes them once it is gone; the node's host namespace is then as before wg-cni, and a
/// third run finds nothing. The runtime dir here is a stand-in (`--run-dir`): the real
/// /run/wg-cni is shared by every simulated node and other tests on this machine.
#[test]
fn uninstall_leaves_no_trace_on_the_node_and_keeps_binaries_while_pods_remain() {
    let mut cluster = Cluster::new(2);
    let before = node_host_objects(&cluster, 0);
    let node = &cluster.nodes[0];
    let (bin_dir, run_dir) = (
        node.store.with_file_name("bin"),
        node.store.with_file_name("run"),
    );
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("ports.json"), "{}").unwrap();
    let installed = run(
        binary().to_str().unwrap(),
        &["install", "--cni-bin-dir", bin_dir.to_str().unwrap()],
    );
    assert!(installed.status.success(), "{installed:?}");
    cluster.write_conflists();
    cluster.start_agents();
    let pods = vec![add(&cluster, 0), add(&cluster, 1)];
    converge_all_pairs(&pods);
    let store0 = cluster.nodes[0]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[0].name);
    let gateway: Value =
        serde_json::from_str(&std::fs::read_to_string(store0.join("gateway.json")).unwrap())
            .unwrap();
    let gateway_link = gateway["hostName"].as_str().unwrap().to_string();
    let during = node_host_objects(&cluster, 0);
    assert!(during["links"].contains(&gateway_link));
    assert!(during["iptables"].iter().any(|l| l.contains("wg-cni")));
    assert_ne!(
        during["rules4"], before["rules4"],
        "the gateway's policy rule"
    );
    assert!(store0.join(".agent-ready.json").exists());

    let uninstall = |node: &cluster::Node, args: &[&str]| -> (i32, String) {
        let mut full = vec![
            binary().to_str().unwrap().to_string(),
            "uninstall".into(),
            "--store".into(),
            node.store.display().to_string(),
            "--cni-conf-dir".into(),
            node.conf_dir.display().to_string(),
            "--cni-bin-dir".into(),
            bin_dir.display().to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
            "--node".into(),
            node.name.clone(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let out = node.exec(&full.iter().map(String::as_str).collect::<Vec<_>>());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, text) = uninstall(&cluster.nodes[0], &[]);
    assert_eq!(code, 1, "refused while the agent runs: {text}");
    assert!(text.contains("agent runs on this node"), "{text}");
    assert!(
        store0.join(".agent-ready.json").exists(),
        "nothing removed while the agent runs"
    );
    cluster.nodes[0].kill_agent();
    let (code, text) = uninstall(&cluster.nodes[0], &["--network", "no/such"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("--network"), "{text}");

    // The agent went first (the DaemonSet is deleted); a pod remains.
    let (code, text) = uninstall(&cluster.nodes[0], &[]);
    assert_eq!(code, 0, "{text}");
    for says in [
        "removed network",
        "node gateway",
        "readiness marker",
        "10-wg.conflist",
        "kept 1 pod attachment(s) remain",
        "forget-node node1",
        "ip_forward",
    ] {
        assert!(text.contains(says), "no {says:?} in:\n{text}");
    }
    assert!(
        bin_dir.join("wg-cni").exists() && run_dir.exists(),
        "{text}"
    );
    let after_first = node_host_objects(&cluster, 0);
    assert_eq!(after_first, before, "{text}");
    assert_eq!(daemons_named(&gateway_link), 0, "the gateway's daemon");
    assert!(!cluster.nodes[0].conf_dir.join("10-wg.conflist").exists());
    assert!(!store0.join(".agent-ready.json").exists());
    // The pod's own link is its DEL's: it is still there, and DEL works.
    cluster.cni(0, "DEL", &pods[0].pod).ok();

    let (code, text) = uninstall(&cluster.nodes[0], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "removed binary {}",
            bin_dir.join("wg-cni").display()
        )),
        "{text}"
    );
    assert!(text.contains("removed runtime dir"), "{text}");
    assert!(!bin_dir.join("wg-cni").exists() && !run_dir.exists());
    let (code, text) = uninstall(&cluster.nodes[0], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("nothing of wg-cni left to remove on node node1"),
        "{text}"
    );
    assert!(!text.contains("removed "), "{text}");
    assert_eq!(node_host_objects(&cluster, 0), before);
    cluster.cni(1, "DEL", &pods[1].pod).ok();
}

/// Two cgroups of this test's own under a cgroup v2 mount (no controller enabled, so nothing
/// is accounted differently): `agent` stands for the agent's container, `host` for the host's
/// root cgroup. Every process left in them is killed, and they are removed, on drop.
struct TestCgroups {
    base: std::path::PathBuf,
}

impl TestCgroups {
    fn make() -> TestCgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split_whitespace().nth(4))
            .expect("no cgroup v2 mount on this host");
        let base = std::path::Path::new(mount).join(format!("wgcni-itest-{}", std::process::id()));
        for dir in ["agent", "host"] {
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }
        TestCgroups { base }
    }

    fn dir(&self, which: &str) -> std::path::PathBuf {
        self.base.join(which)
    }

    fn pids(&self, which: &str) -> Vec<u32> {
        std::fs::read_to_string(self.dir(which).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        // A killed process holds its cgroup until it is reaped: rmdir until it goes.
        for which in ["agent", "host"] {
            let _ = std::fs::write(self.dir(which).join("cgroup.kill"), "1");
            wait_for(Duration::from_secs(10), || {
                std::fs::remove_dir(self.dir(which)).is_ok() || !self.dir(which).exists()
            });
        }
        if std::fs::remove_dir(&self.base).is_err() {
            eprintln!("could not remove the test cgroup {}", self.base.display());
        }
    }
}

/// Item 6 of issue 22: with `--daemon-cgroup`, the node gateway's daemon joins that cgroup
/// before it runs, so killing the agent's whole cgroup (what a runtime does when the agent's
/// pod stops for an upgrade) leaves the gateway serving: the host still reaches its pod.
#[test]
fn the_gateway_daemon_outlives_the_agents_cgroup() {
    only_on("userspace");
    let cgroups = TestCgroups::make();
    let mut cluster = Cluster::new(1);
    // `ip netns exec` mounts a sysfs of the node's namespace over /sys: the agent reaches
    // the cgroup through this process's root, as a DaemonSet's agent reaches the host's
    // through /proc/1/root.
    cluster.agent_flags.push("--daemon-cgroup".into());
    cluster.agent_flags.push(format!(
        "/proc/{}/root{}",
        std::process::id(),
        cgroups.dir("host").display()
    ));
    cluster.write_conflists();
    cluster.start_agents();
    // Into the "container" at once: the agent connects to etcd and claims its subnet before
    // it makes the gateway.
    let agent = cluster.nodes[0].agent_pid().unwrap();
    std::fs::write(cgroups.dir("agent").join("cgroup.procs"), agent.to_string()).unwrap();
    // The agent makes the gateway of a node with a subnet (before any pod: the plugin's
    // daemons stay in the runtime's cgroup).
    let gateway_file = cluster.nodes[0]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[0].name)
        .join("gateway.json");
    assert!(
        wait_for(CONVERGE, || gateway_file.exists()),
        "the agent made no gateway"
    );
    let gateway: Value =
        serde_json::from_str(&std::fs::read_to_string(&gateway_file).unwrap()).unwrap();
    let daemon = gateway["daemonPid"].as_u64().expect("a userspace gateway") as u32;
    assert_eq!(
        cgroups.pids("agent"),
        vec![agent],
        "only the agent in its cgroup"
    );
    assert!(
        cgroups.pids("host").contains(&daemon),
        "the gateway daemon {daemon} is not in --daemon-cgroup: {:?}",
        cgroups.pids("host")
    );
    let pod = add(&cluster, 0);
    let host_reaches = |cluster: &Cluster, ip: &str| {
        cluster.nodes[0]
            .exec(&["ping", "-c", "1", "-W", "2", ip])
            .status
            .success()
    };
    assert!(
        wait_for(CONVERGE, || host_reaches(&cluster, &pod.ip)),
        "host → pod before"
    );

    std::fs::write(cgroups.dir("agent").join("cgroup.kill"), "1").unwrap();
    assert!(wait_for(Duration::from_secs(5), || cgroups
        .pids("agent")
        .is_empty()));
    cluster.nodes[0].kill_agent(); // reaps it
    assert!(
        std::path::Path::new(&format!("/proc/{daemon}")).exists(),
        "the gateway daemon died with the agent's cgroup"
    );
    assert!(
        host_reaches(&cluster, &pod.ip),
        "host → pod after the agent's cgroup was killed"
    );
    cluster.cni(0, "DEL", &pod.pod).ok();
}

/// Every public key some link of the cluster holds as a peer (pod links and gateways).
fn keys_on_links(cluster: &Cluster) -> std::collections::BTreeSet<String> {
    (0..cluster.nodes.len())
        .flat_map(|node| {
            let shown = show(cluster, node);
            let mut links: Vec<Value> =
                shown["attachments"].as_array().cloned().unwrap_or_default();
            links.push(shown["gateway"].clone());
            links
        })
        .flat_map(|link| link["peers"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["publicKey"].as_str().map(str::to_string))
        .collect()
}

/// `pod`'s record as its node's store holds it.
fn record_of(cluster: &Cluster, pod: &PodOn) -> Value {
    let file = cluster.nodes[pod.node]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[pod.node].name)
        .join(format!("{}:eth0.json", pod.pod.id));
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// Traffic from one pod to another while a rotation runs: a UDP ping every 10 ms (echoed by
/// the target) and a TCP stream (16 KiB every 10 ms). What arrived and when: the replies at
/// the pinger, the stream's bytes at the target.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    replies: std::thread::JoinHandle<Vec<std::time::Instant>>,
    reads: std::thread::JoinHandle<Vec<std::time::Instant>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(from: &PodOn, to: &PodOn) -> Traffic {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream, UdpSocket};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Instant;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (echo, listener) = in_netns(Some(to.pod.path.clone()), || {
            (
                UdpSocket::bind("0.0.0.0:0").unwrap(),
                TcpListener::bind("0.0.0.0:0").unwrap(),
            )
        })
        .join()
        .unwrap();
        let (echo_port, tcp_port) = (
            echo.local_addr().unwrap().port(),
            listener.local_addr().unwrap().port(),
        );
        let udp_to: std::net::SocketAddr = format!("{}:{echo_port}", to.ip).parse().unwrap();
        let tcp_to: std::net::SocketAddr = format!("{}:{tcp_port}", to.ip).parse().unwrap();
        let (pinger, stream) = in_netns(Some(from.pod.path.clone()), move || {
            let pinger = UdpSocket::bind("0.0.0.0:0").unwrap();
            pinger.connect(udp_to).unwrap();
            let stream = TcpStream::connect_timeout(&tcp_to, Duration::from_secs(10)).unwrap();
            (pinger, stream)
        })
        .join()
        .unwrap();
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            echo.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], peer);
                }
            }
        }));
        let sender = pinger.try_clone().unwrap();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) {
                let _ = sender.send(&seq.to_be_bytes());
                seq += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
        let s = stop.clone();
        let replies = std::thread::spawn(move || {
            pinger
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut arrivals = Vec::new();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if pinger.recv(&mut buf).is_ok() {
                    arrivals.push(Instant::now());
                }
            }
            arrivals
        });
        let s = stop.clone();
        let mut writer = stream;
        threads.push(std::thread::spawn(move || {
            writer
                .set_write_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let chunk = vec![7u8; 16 << 10];
            while !s.load(Ordering::Relaxed) {
                let _ = writer.write_all(&chunk);
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
        let s = stop.clone();
        let reads = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut arrivals = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            while !s.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => arrivals.push(Instant::now()),
                    Err(_) => {}
                }
            }
            arrivals
        });
        Traffic {
            stop,
            replies,
            reads,
            threads,
        }
    }

    /// Stop; the longest gaps (ping replies, stream bytes) among arrivals after `since`.
    fn stop(self, since: std::time::Instant) -> (Duration, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let replies = self.replies.join().unwrap();
        let reads = self.reads.join().unwrap();
        for t in self.threads {
            t.join().unwrap();
        }
        let gap = |arrivals: &[std::time::Instant]| {
            let after: Vec<_> = arrivals.iter().filter(|t| **t >= since).collect();
            let first = after.first().map(|t| t.duration_since(since));
            let between = after
                .windows(2)
                .map(|w| w[1].duration_since(*w[0]))
                .max()
                .unwrap_or_default();
            first.map_or(Duration::MAX, |f| f.max(between))
        };
        (gap(&replies), gap(&reads))
    }
}

/// The longest gap a rotation may cause in traffic between two nodes: natively 500 ms (the
/// issue's bound); the emulated guest is ten times slower.
fn rotation_gap_limit() -> Duration {
    match expected_backend() {
        "kernel" => Duration::from_secs(5),
        _ => Duration::from_millis(500),
    }
}

/// Issue 23: a pod's key is rotated on node 1 while a pod on node 2 and one on node 1 each ping
/// it every 10 ms and stream TCP to it (`on_demand`: each pair direct): none stalls for more than
/// `rotation_gap_limit`; the old key is on no link anywhere afterwards, the new one is
/// recorded; neither private key is in any file, log or output of either node.
fn a_rotation_under_traffic(cluster: Cluster, on_demand: bool) {
    let (a, c, b) = (add(&cluster, 0), add(&cluster, 0), add(&cluster, 1));
    converge_all_pairs(&[&a, &c, &b].map(|p| PodRef {
        pod: &p.pod,
        ip: &p.ip,
    }));
    if on_demand {
        wait_for_relays(&cluster);
    }
    // From the other node (b) and from the same node (c).
    let traffic = Traffic::start(&b, &a);
    let local_traffic = Traffic::start(&c, &a);
    if on_demand {
        let direct = wait_for(direct_within() * 2, || {
            [&b, &c]
                .iter()
                .all(|p| holds_direct(&cluster, &a, p) && holds_direct(&cluster, p, &a))
        });
        assert!(direct, "the pairs never went direct");
    }
    std::thread::sleep(Duration::from_secs(1));
    let old_key = public_key_of(&cluster, &a);
    let old_private = private_key_forms(&cluster, &a);
    let started = std::time::Instant::now();
    let rotated = cluster.rotate(0, &a.pod, &[]);
    assert!(
        rotated.status.success(),
        "rotate failed: {}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let took = started.elapsed();
    std::thread::sleep(rotation_gap_limit() * 2 + Duration::from_secs(2));
    let (ping_gap, stream_gap) = traffic.stop(started - Duration::from_millis(500));
    let (local_ping_gap, local_stream_gap) =
        local_traffic.stop(started - Duration::from_millis(500));
    let record = record_of(&cluster, &a);
    let new_key = record["publicKey"].as_str().unwrap().to_string();
    assert_ne!(new_key, old_key, "the record names the old key still");
    assert!(record.get("nextPublicKey").is_none(), "{record}");
    assert!(
        String::from_utf8_lossy(&rotated.stdout).contains(&new_key),
        "rotate printed no new key: {}",
        String::from_utf8_lossy(&rotated.stdout)
    );
    let mut on_links = keys_on_links(&cluster);
    let gone = wait_for(event_path_limit(), || {
        on_links = keys_on_links(&cluster);
        !on_links.contains(&old_key)
    });
    assert!(gone, "the old key is still on a link");
    assert!(on_links.contains(&new_key), "no link holds the new key");
    converge_all_pairs(&[&a, &c, &b].map(|p| PodRef {
        pod: &p.pod,
        ip: &p.ip,
    }));
    println!(
        "rotation ({}): rotate took {took:?}, longest gap from the other node: ping {ping_gap:?}, stream {stream_gap:?}; from the same node: ping {local_ping_gap:?}, stream {local_stream_gap:?}",
        if on_demand {
            "on-demand, direct"
        } else {
            "mesh"
        }
    );

    // The leak search of the security suite, over both nodes' stores and agent logs and the
    // rotation's own output (trace logs).
    let new_private = private_key_forms(&cluster, &a);
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("rotate stdout".into(), rotated.stdout.clone()),
        ("rotate stderr".into(), rotated.stderr.clone()),
    ];
    for node in &cluster.nodes {
        for file in files_under(&node.store)
            .into_iter()
            .chain([node.agent_log.clone()])
        {
            let bytes = std::fs::read(&file).unwrap_or_default();
            places.push((file.display().to_string(), bytes));
        }
    }
    assert!(
        !rotated.stderr.is_empty(),
        "trace logging produced nothing to search"
    );
    for form in old_private.iter().chain(&new_private) {
        for (place, bytes) in &places {
            assert!(!contains(bytes, form), "a private key leaked into {place}");
        }
    }
    if expected_backend() != "kernel" {
        let gaps = [ping_gap, stream_gap, local_ping_gap, local_stream_gap];
        assert!(
            gaps.iter().all(|g| *g <= rotation_gap_limit()),
            "the rotation stalled traffic (ping, stream from the other node; from the same node): {gaps:?}"
        );
    }
    for p in [&a, &c, &b] {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

#[test]
fn a_rotation_in_mesh_mode_keeps_traffic_flowing() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("mesh"); 2];
    cluster.agent_env = vec![("WG_CNI_LOG".into(), "debug".into())];
    cluster.write_conflists();
    cluster.start_agents();
    a_rotation_under_traffic(cluster, false);
}

#[test]
fn a_rotation_of_a_direct_on_demand_pair_keeps_traffic_flowing() {
    let mut cluster = on_demand_cluster(2, 300);
    // Debug logs, for the leak search.
    cluster.agent_env = vec![("WG_CNI_LOG".into(), "debug".into())];
    for i in 0..cluster.nodes.len() {
        cluster.nodes[i].kill_agent();
        cluster.start_agent(i);
    }
    a_rotation_under_traffic(cluster, true);
}

/// Whether `pod`'s link has gone from its namespace (only `lo` left).
fn has_no_link(pod: &PodOn) -> bool {
    pod.pod.links().iter().all(|l| l == "lo")
}

/// The keys `pod`'s record names (current, next, previous).
fn recorded_keys(cluster: &Cluster, pod: &PodOn) -> Vec<String> {
    let record = record_of(cluster, pod);
    ["publicKey", "nextPublicKey", "previousPublicKey"]
        .iter()
        .filter_map(|field| record[*field].as_str().map(str::to_string))
        .collect()
}

/// After a killed rotation of `pod`: a rotation again succeeds, the pod reaches and is
/// reached by `other`, and none of the keys it had before is on any link.
fn rotates_again_and_is_reachable(
    cluster: &Cluster,
    pod: &PodOn,
    other: &PodOn,
    before: &[String],
) {
    let again = cluster.rotate(pod.node, &pod.pod, &[]);
    assert!(
        again.status.success(),
        "rotate after a killed one failed: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let pair = [pod, other].map(|p| PodRef {
        pod: &p.pod,
        ip: &p.ip,
    });
    converge_all_pairs(&pair);
    let current = public_key_of(cluster, pod);
    let stale = wait_for(event_path_limit(), || {
        let on_links = keys_on_links(cluster);
        !before.iter().any(|k| *k != current && on_links.contains(k))
    });
    assert!(stale, "a key of before the rotations is still on a link");
    assert!(keys_on_links(cluster).contains(&current));
}

/// After a killed rotation of `pod`: DEL succeeds, the link, the record and every key the
/// record named are gone from every link of the cluster.
fn is_cleanly_deleted(cluster: &Cluster, pod: &PodOn, keys: &[String]) {
    cluster.cni(pod.node, "DEL", &pod.pod).ok();
    let file = cluster.nodes[pod.node]
        .store
        .join(&cluster.network)
        .join(&cluster.nodes[pod.node].name)
        .join(format!("{}:eth0.json", pod.pod.id));
    assert!(!file.exists(), "DEL left the record");
    assert!(has_no_link(pod), "DEL left the link: {:?}", pod.pod.links());
    let gone = wait_for(event_path_limit(), || {
        let on_links = keys_on_links(cluster);
        !keys.iter().any(|k| on_links.contains(k))
    });
    assert!(gone, "a key of the deleted pod is still on a link");
}

/// Issue 23: `wg-cni rotate` killed (SIGKILL) at every step of its sequence, and at random
/// instants from outside: the pod stays deletable (DEL removes link, record and every key it
/// had from every link), and a rotation run again finishes or starts afresh and leaves the
/// pod reachable without any of its earlier keys on a link.
#[test]
fn a_rotation_killed_anywhere_leaves_the_pod_reachable_or_cleanly_deletable() {
    use std::os::unix::process::ExitStatusExt;
    let cluster = running(2);
    let other = add(&cluster, 1);
    for point in [
        "rotate-locked",
        "rotate-next-recorded",
        "rotate-prepared",
        "rotate-switched",
        "rotate-recorded",
        "rotate-told",
    ] {
        let (kept, deleted) = (add(&cluster, 0), add(&cluster, 0));
        converge_all_pairs(&[&kept, &deleted, &other].map(|p| PodRef {
            pod: &p.pod,
            ip: &p.ip,
        }));
        let mut before = recorded_keys(&cluster, &kept);
        for pod in [&kept, &deleted] {
            let killed = cluster.rotate(0, &pod.pod, &[("WG_CNI_FAILPOINT", point)]);
            assert_eq!(killed.status.signal(), Some(9), "{point}: not killed");
        }
        // With the next key the killed rotation recorded (and may have given holders).
        before.extend(recorded_keys(&cluster, &kept));
        let reachable = ping_once(&other.pod, &kept.ip);
        println!("killed at {point}: reachable at once: {reachable}");
        rotates_again_and_is_reachable(&cluster, &kept, &other, &before);
        let keys = recorded_keys(&cluster, &deleted);
        is_cleanly_deleted(&cluster, &deleted, &keys);
        cluster.cni(0, "DEL", &kept.pod).ok();
    }

    // From outside, at random instants of a rotation (it takes milliseconds natively).
    let pod = add(&cluster, 0);
    converge_all_pairs(&[&pod, &other].map(|p| PodRef {
        pod: &p.pod,
        ip: &p.ip,
    }));
    let before = recorded_keys(&cluster, &pod);
    let node = &cluster.nodes[0];
    for round in 0..8u64 {
        let mut child = Command::new(ip())
            .args(["netns", "exec", &node.netns])
            .arg(binary())
            .args([
                "rotate",
                "--network",
                &cluster.network,
                "--node",
                &node.name,
            ])
            .args(["--container", &pod.pod.id, "--ifname", "eth0"])
            .arg("--store")
            .arg(&node.store)
            .arg("--cni-conf-dir")
            .arg(&node.conf_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Spread over the rotation's few milliseconds and the process start before it.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        std::thread::sleep(Duration::from_micros((nanos ^ (round * 7919)) % 40_000));
        let _ = child.kill();
        let _ = child.wait();
    }
    rotates_again_and_is_reachable(&cluster, &pod, &other, &before);
    let keys = recorded_keys(&cluster, &pod);
    is_cleanly_deleted(&cluster, &pod, &keys);
    cluster.cni(1, "DEL", &other.pod).ok();
}

/// Issue 23's `keyRotation`: the agent gives each pod a fresh key once its key is due (here
/// every 10 s), the pods of one node at least a second apart; `wg-cni show` tells each key's
/// age and next rotation; traffic goes on and the old keys leave every link.
#[test]
fn the_agent_rotates_keys_as_they_come_due() {
    let mut cluster = Cluster::new(2);
    cluster.peerings = vec![Some("mesh"); 2];
    cluster
        .extra
        .insert("keyRotation".into(), Value::from("10s"));
    cluster.write_conflists();
    cluster.start_agents();
    let pods = [add(&cluster, 0), add(&cluster, 0), add(&cluster, 1)];
    let refs = pods.each_ref().map(|p| PodRef {
        pod: &p.pod,
        ip: &p.ip,
    });
    converge_all_pairs(&refs);
    let first: Vec<String> = pods.iter().map(|p| public_key_of(&cluster, p)).collect();
    let shown = peer_keys(&cluster, 0);
    for a in &shown {
        let (age, next) = (a["keyAgeSeconds"].as_u64(), a["nextRotation"].as_u64());
        let since = a["keyCreatedAt"].as_u64().unwrap();
        assert!(age.is_some_and(|age| age < 15), "{a}");
        assert_eq!(next, Some(since + 10), "{a}");
    }
    let limit = Duration::from_secs(10) + event_path_limit() * 2;
    let rotated = wait_for(limit, || {
        pods.iter()
            .zip(&first)
            .all(|(p, key)| public_key_of(&cluster, p) != *key)
    });
    assert!(rotated, "not every key was rotated within {limit:?}");
    let since: Vec<u64> = pods[..2]
        .iter()
        .map(|p| record_of(&cluster, p)["keyCreatedAt"].as_u64().unwrap())
        .collect();
    assert_ne!(since[0], since[1], "two pods of a node rotated at once");
    // /metrics counts the rotations each agent saw: its own pods' (local) and the other
    // node's (remote). At least these; more may have come due since.
    let net = cluster.network.clone();
    for (node, local, remote) in [(0, 2.0, 1.0), (1, 1.0, 2.0)] {
        let mut seen = (None, None);
        let counted = wait_for(event_path_limit(), || {
            let samples = scrape(&cluster, node);
            let count = |scope| {
                let labels = [("network", net.as_str()), ("scope", scope)];
                metric(&samples, "wgcni_key_rotations_observed_total", &labels)
            };
            seen = (count("local"), count("remote"));
            seen.0.is_some_and(|n| n >= local) && seen.1.is_some_and(|n| n >= remote)
        });
        assert!(
            counted,
            "node {node} counted (local, remote) rotations {seen:?}, want at least ({local}, {remote})"
        );
    }
    converge_all_pairs(&refs);
    let gone = wait_for(event_path_limit(), || {
        let on_links = keys_on_links(&cluster);
        !first.iter().any(|k| on_links.contains(k))
    });
    assert!(gone, "a key of before the rotations is still on a link");
    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}
