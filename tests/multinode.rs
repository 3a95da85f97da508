//! Pods on different nodes talk: three simulated nodes (namespaces on a bridge), each with
//! its own store, conflist directory and `wg-cni agent`, a real etcd from Debian in its own
//! namespace, the plugin exec'd inside the node's namespace, two pods per node. Runs serially.

mod cluster;
mod common;

use std::time::Duration;

use cluster::{CLUSTER_RANGE, Cluster, ping_once, wait_for};
use common::*;
use serde_json::Value;

/// How long a change may take to reach every node (agents sync, then reconcile).
const CONVERGE: Duration = Duration::from_secs(30);

struct PodOn {
    pod: Pod,
    node: usize,
    ip: String,
}

fn add(cluster: &Cluster, node: usize) -> PodOn {
    let pod = Pod::new();
    let result = cluster.cni(node, "ADD", &pod).ok().json();
    let ip = address_of(&result, false);
    PodOn { pod, node, ip }
}

fn all_pairs_ping(pods: &[PodOn]) -> Vec<(String, String)> {
    let mut failing = Vec::new();
    for a in pods {
        for b in pods {
            if a.ip != b.ip && !ping_once(&a.pod, &b.ip) {
                failing.push((a.ip.clone(), b.ip.clone()));
            }
        }
    }
    failing
}

fn converge_all_pairs(pods: &[PodOn]) {
    let mut failing = Vec::new();
    let ok = wait_for(CONVERGE, || {
        failing = all_pairs_ping(pods);
        failing.is_empty()
    });
    assert!(ok, "pairs that cannot ping after {CONVERGE:?}: {failing:?}");
}

/// Public keys of the peers of a pod's link, as `wg-cni show` on its node reports them.
fn peer_keys(cluster: &Cluster, node: usize) -> Vec<Value> {
    let n = &cluster.nodes[node];
    let out = n.exec(&[
        binary().to_str().unwrap(),
        "show",
        "--json",
        "--store",
        n.store.to_str().unwrap(),
        "--node",
        &n.name,
    ]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    shown["networks"][0]["attachments"]
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

#[test]
fn pods_on_three_nodes_talk_and_follow_adds_and_dels() {
    let mut cluster = Cluster::new(3);
    cluster.write_conflists();
    cluster.start_agents();
    let mut pods: Vec<PodOn> = Vec::new();
    for node in 0..3 {
        for _ in 0..2 {
            pods.push(add(&cluster, node));
        }
    }
    // Every pod pings every other pod: 30 ordered pairs.
    converge_all_pairs(&pods);

    // A pod added later is reachable from the others and reaches them.
    let late = add(&cluster, 2);
    let reached = wait_for(CONVERGE, || {
        pods.iter()
            .all(|p| ping_once(&p.pod, &late.ip) && ping_once(&late.pod, &p.ip))
    });
    assert!(reached, "the late pod is not reachable both ways");

    // The host namespace of node 1 reaches a pod on node 2 (kubelet-style probes to remote
    // pods, NodePorts), and a pod on node 1 reaches node 3's own address.
    let remote = &pods[2];
    assert!(remote.node == 1);
    assert!(
        wait_for(CONVERGE, || cluster.nodes[0]
            .exec(&["ping", "-c", "1", "-W", "1", &remote.ip])
            .status
            .success()),
        "node 1's host cannot reach a pod on node 2"
    );
    assert!(
        wait_for(CONVERGE, || ping_once(&pods[0].pod, &cluster.nodes[2].addr)),
        "a pod on node 1 cannot reach node 3's address"
    );

    // DEL removes the late pod's peer everywhere: links, mirrors, etcd.
    let late_key = public_key_of(&cluster, &late);
    cluster.cni(2, "DEL", &late.pod).ok();
    let gone = wait_for(CONVERGE, || {
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
    assert!(CLUSTER_RANGE.starts_with("10.251."));

    for p in &pods {
        cluster.cni(p.node, "DEL", &p.pod).ok();
    }
}

/// `kill -9` of an agent: pods keep talking (the links are the kernel's or the daemons',
/// not the agent's); restarted, it changes nothing.
#[test]
fn killing_an_agent_does_not_cut_its_pods_off() {
    let mut cluster = Cluster::new(2);
    cluster.write_conflists();
    cluster.start_agents();
    let pods = vec![add(&cluster, 0), add(&cluster, 1)];
    converge_all_pairs(&pods);
    cluster.nodes[0].kill_agent();
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
    cluster.cni_with(0, "STATUS", &early, &status_conf).ok();
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
