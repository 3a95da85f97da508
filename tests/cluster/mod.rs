//! Simulated nodes on one machine: an underlay namespace holding a bridge, one namespace per
//! node (a veth on the bridge, its own store, conflist directory and `wg-cni agent`), and
//! Debian's etcd in a namespace of its own on the bridge (never on 127.0.0.1:2379). The plugin
//! runs inside the node's namespace (`ip netns exec`), which is that node's host namespace.
//! Everything is stopped by pid and removed on drop, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{CniOutput, Pod, binary, ip, plugin_dir, run, run_ok, unique};

pub const ETCD_ADDR: &str = "10.250.0.2";
/// An underlay address nobody has: the next hop of the nodes' default routes.
pub const UNDERLAY_NOWHERE: &str = "10.250.0.254";
const ETCD_PORT: u16 = 23790;
const ETCD_PEER_PORT: u16 = 23800;
/// Pod range of the whole network; node N owns 10.251.N.0/24.
pub const CLUSTER_RANGE: &str = "10.251.0.0/16";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub network: String,
    pub underlay: String,
    pub etcd_ns: String,
    etcd: Option<Child>,
    pub nodes: Vec<Node>,
    /// Agent flags every node gets (TTL, grace period, resync).
    pub agent_flags: Vec<String>,
    /// Environment every agent gets (e.g. `WG_CNI_FAILPOINT`).
    pub agent_env: Vec<(String, String)>,
    /// Subnets leased by the agents from the cluster range instead of given per node.
    pub lease: bool,
    /// `mtu` per node's conflist (`None`: left to the plugin).
    pub mtus: Vec<Option<u32>>,
    /// `peering` per node's conflist (`None`: left to the plugin): by default what
    /// `WG_CNI_TEST_PEERING` says (`mesh`, `on-demand`, or `mixed`: node 1 on-demand, the
    /// others mesh), else unset.
    pub peerings: Vec<Option<&'static str>>,
    /// No `endpoint` in the conflists: nodes are reached at their default route's source
    /// address (each node gets a default route toward the bridge, where nothing answers).
    pub detect_endpoints: bool,
    /// Further fields of every node's plugin config (e.g. `idlePeerTimeout`).
    pub extra: serde_json::Map<String, Value>,
}

pub struct Node {
    pub name: String,
    /// The node's network namespace (its "host").
    pub netns: String,
    pub addr: String,
    pub index: usize,
    pub store: PathBuf,
    pub conf_dir: PathBuf,
    pub ipam_dir: PathBuf,
    agent: Option<Child>,
    pub agent_log: PathBuf,
}

impl Cluster {
    /// `count` nodes on one bridge, etcd running, agents not yet started.
    pub fn new(count: usize) -> Cluster {
        let id = unique("");
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            network: format!("mnet{id}"),
            underlay: format!("wgu{id}"),
            etcd_ns: format!("wge{id}"),
            etcd: None,
            nodes: Vec::new(),
            lease: false,
            mtus: vec![Some(1420); count],
            peerings: (0..count).map(peering_from_env).collect(),
            agent_env: Vec::new(),
            detect_endpoints: false,
            extra: serde_json::Map::new(),
            agent_flags: [
                "--lease-ttl",
                "3",
                "--grace-period",
                "20",
                "--resync-interval",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        run_ok(ip(), &["netns", "add", &cluster.underlay]);
        cluster.in_underlay(&["link", "add", "br0", "type", "bridge"]);
        cluster.in_underlay(&["link", "set", "br0", "up"]);
        let etcd_ns = cluster.etcd_ns.clone();
        cluster.attach(&etcd_ns, "e0", ETCD_ADDR);
        for index in 1..=count {
            let node = Node::new(&cluster, index);
            cluster.attach(&node.netns, &format!("n{index}"), &node.addr);
            cluster.nodes.push(node);
        }
        cluster.start_etcd();
        cluster
    }

    fn in_underlay(&self, args: &[&str]) {
        let mut full = vec!["-n", self.underlay.as_str()];
        full.extend_from_slice(args);
        run_ok(ip(), &full);
    }

    /// A namespace with one veth (`eth0`, `addr`/24) whose other end is on the bridge (created
    /// when missing; the caller deletes a namespace of its own).
    pub fn attach(&self, netns: &str, port: &str, addr: &str) {
        if !run_ok(ip(), &["netns", "list"]).contains(netns) {
            run_ok(ip(), &["netns", "add", netns]);
        }
        self.in_underlay(&[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ]);
        self.in_underlay(&["link", "set", port, "master", "br0", "up"]);
        run_ok(
            ip(),
            &[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        );
        run_ok(ip(), &["-n", netns, "link", "set", "eth0", "up"]);
        run_ok(ip(), &["-n", netns, "link", "set", "lo", "up"]);
    }

    pub fn etcd_url(&self) -> String {
        format!("http://{ETCD_ADDR}:{ETCD_PORT}")
    }

    pub fn start_etcd(&mut self) {
        let data = self.dir.path().join("etcd");
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let child = Command::new(ip())
            .args([
                "netns",
                "exec",
                &self.etcd_ns,
                "etcd",
                "--name",
                "t",
                "--data-dir",
            ])
            .arg(&data)
            .args(["--listen-client-urls", &self.etcd_url()])
            .args(["--advertise-client-urls", &self.etcd_url()])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.etcd = Some(child);
        let ready = wait_for(Duration::from_secs(20), || {
            self.etcdctl(&["endpoint", "health"]).status.success()
        });
        assert!(ready, "etcd did not become healthy");
    }

    /// Kill etcd (SIGKILL, by pid); its data directory stays for a restart.
    pub fn kill_etcd(&mut self) {
        if let Some(mut child) = self.etcd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.etcd_ns, "etcdctl", "--endpoints"];
        let url = self.etcd_url();
        full.push(&url);
        full.extend_from_slice(args);
        run(ip(), &full)
    }

    /// `count` puts of `size` bytes under the network's prefix, on keys the agents ignore
    /// (enough traffic that etcd cannot push it all to a stopped agent's watch), made from
    /// inside etcd's namespace.
    pub fn fill_etcd(&self, count: usize, size: usize) {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.etcd_ns)).unwrap();
        let (url, network) = (self.etcd_url(), self.network.clone());
        let filler = std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            crate::etcd_filler::fill(&url, &network, count, size);
        });
        filler.join().unwrap();
    }

    /// etcd's current revision.
    pub fn etcd_revision(&self) -> i64 {
        let out = self.etcdctl(&["get", "/", "-w", "json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        status["header"]["revision"].as_i64().unwrap()
    }

    /// Keys under the network's prefix in etcd.
    pub fn etcd_keys(&self) -> Vec<String> {
        let prefix = format!("/wg-cni/v1/{}/", self.network);
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", &prefix]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn start_agents(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_agent(i);
        }
    }

    pub fn start_agent(&mut self, i: usize) {
        let url = self.etcd_url();
        let flags = self.agent_flags.clone();
        let env = self.agent_env.clone();
        self.nodes[i].start_agent(&url, &flags, &env);
    }

    /// The network's single-plugin config as node `i` runs it.
    pub fn conf(&self, i: usize) -> Value {
        let node = &self.nodes[i];
        let mut conf = self.plugin(node);
        conf["name"] = self.network.clone().into();
        conf["cniVersion"] = "1.0.0".into();
        conf
    }

    fn plugin(&self, node: &Node) -> Value {
        let mut plugin = json!({
            "type": "wg-cni",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": node.subnet()}]],
                "dataDir": node.ipam_dir,
            },
            "backend": crate::common::backend(),
            "store": node.store,
            "nodeName": node.name,
            "endpoint": node.addr,
            "mtu": 1420,
            "listenPorts": "53000-53999",
            "clusterRange": CLUSTER_RANGE,
        });
        match self.mtus[node.index - 1] {
            Some(mtu) => plugin["mtu"] = mtu.into(),
            None => {
                plugin.as_object_mut().unwrap().remove("mtu");
            }
        }
        if self.detect_endpoints {
            plugin.as_object_mut().unwrap().remove("endpoint");
        }
        if let Some(peering) = self.peerings[node.index - 1] {
            plugin["peering"] = peering.into();
        }
        if self.lease {
            plugin["subnetLease"] = true.into();
            plugin["ipam"]["ranges"] = json!([]);
        }
        for (field, value) in &self.extra {
            plugin[field] = value.clone();
        }
        plugin
    }

    /// Write node `i`'s conflist into its conf dir (as an installer would).
    pub fn write_conflists(&self) {
        for node in &self.nodes {
            if self.detect_endpoints {
                // A default route on the underlay: its source is the node's address. The next
                // hop does not exist, so nothing leaves the bridge.
                node.exec(&["ip", "route", "replace", "default", "via", UNDERLAY_NOWHERE]);
            }
            let conflist = json!({
                "cniVersion": "1.0.0",
                "name": self.network,
                "plugins": [self.plugin(node)],
            });
            std::fs::create_dir_all(&node.conf_dir).unwrap();
            std::fs::write(node.conf_dir.join("10-wg.conflist"), conflist.to_string()).unwrap();
        }
    }

    /// Run a CNI command of the plugin inside node `i`'s namespace.
    pub fn cni(&self, i: usize, command: &str, pod: &Pod) -> CniOutput {
        self.cni_with(i, command, pod, &self.conf(i))
    }

    /// `cni` with a config of the caller's.
    pub fn cni_with(&self, i: usize, command: &str, pod: &Pod, conf: &Value) -> CniOutput {
        self.cni_args(i, command, pod, conf, "IgnoreUnknown=1")
    }

    /// `cni_with` and CNI_ARGS (e.g. `IP=` for host-local).
    pub fn cni_args(
        &self,
        i: usize,
        command: &str,
        pod: &Pod,
        conf: &Value,
        args: &str,
    ) -> CniOutput {
        let node = &self.nodes[i];
        let path = plugin_dir();
        let mut child = Command::new(ip())
            .args(["netns", "exec", &node.netns])
            .arg(binary())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.id)
            .env("CNI_NETNS", pod.netns())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().unwrap();
        CniOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `wg-cni rotate` of `pod`'s attachment on node `i`, inside the node's namespace, with
    /// `env` (e.g. `WG_CNI_FAILPOINT`); trace logs on stderr (searched for keys).
    pub fn rotate(&self, i: usize, pod: &Pod, env: &[(&str, &str)]) -> Output {
        let node = &self.nodes[i];
        Command::new(ip())
            .args(["netns", "exec", &node.netns])
            .arg(binary())
            .args(["rotate", "--network", &self.network, "--node", &node.name])
            .args(["--container", &pod.id, "--ifname", "eth0"])
            .arg("--store")
            .arg(&node.store)
            .arg("--cni-conf-dir")
            .arg(&node.conf_dir)
            .env("WG_CNI_LOG", "trace")
            .envs(env.iter().copied())
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Files the agent of node `i` mirrored for node `j`.
    pub fn mirror_of(&self, i: usize, j: usize) -> Vec<String> {
        let dir = self.nodes[i]
            .store
            .join(&self.network)
            .join(&self.nodes[j].name);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json") && n.contains(':'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Node {
    fn new(cluster: &Cluster, index: usize) -> Node {
        let base = cluster.dir.path().join(format!("node{index}"));
        Node {
            name: format!("node{index}"),
            netns: format!("wgn{index}{}", &cluster.underlay[3..]),
            addr: format!("10.250.0.{}", 10 + index),
            index,
            store: base.join("store"),
            conf_dir: base.join("net.d"),
            ipam_dir: base.join("ipam"),
            agent: None,
            agent_log: base.join("agent.log"),
        }
    }

    pub fn subnet(&self) -> String {
        format!("10.251.{}.0/24", self.index)
    }

    fn start_agent(&mut self, etcd: &str, flags: &[String], env: &[(String, String)]) {
        assert!(self.agent.is_none(), "agent of {} already runs", self.name);
        std::fs::create_dir_all(self.agent_log.parent().unwrap()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .unwrap();
        let child = Command::new(ip())
            .args(["netns", "exec", &self.netns])
            .arg(binary())
            .args(["agent", "--etcd-endpoints", etcd, "--node", &self.name])
            .arg("--store")
            .arg(&self.store)
            .arg("--cni-conf-dir")
            .arg(&self.conf_dir)
            .args(flags)
            .env(
                "WG_CNI_LOG",
                std::env::var("WG_CNI_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    /// Send `signal` (`STOP`, `CONT`, ...) to the agent, by pid.
    pub fn signal_agent(&self, signal: &str) {
        let pid = self.agent.as_ref().expect("agent runs").id().to_string();
        assert!(run("kill", &[&format!("-{signal}"), &pid]).status.success());
    }

    /// The running agent's pid.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// SIGKILL the agent (by pid).
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `ip netns exec` into the node.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.netns];
        full.extend_from_slice(args);
        run(ip(), &full)
    }
}

/// Node `index`'s `peering` as `WG_CNI_TEST_PEERING` asks.
fn peering_from_env(index: usize) -> Option<&'static str> {
    match std::env::var("WG_CNI_TEST_PEERING").as_deref() {
        Ok("mesh") => Some("mesh"),
        Ok("on-demand") => Some("on-demand"),
        Ok("mixed") => Some(if index == 0 { "on-demand" } else { "mesh" }),
        Ok(other) if !other.is_empty() => {
            panic!("WG_CNI_TEST_PEERING={other}: use mesh, on-demand or mixed")
        }
        _ => None,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_agent();
        }
        // A failing test shows what the agents said last (WG_CNI_TEST_AGENT_LOG=debug: more).
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = std::fs::read_to_string(&node.agent_log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!("--- last lines of {}'s agent log:\n{tail}", node.name);
            }
        }
        self.kill_etcd();
        // Pods are the tests' own (deleted with their namespaces, which destroys their links
        // and daemons); what remains per node is its gateway daemon, stopped by its pid.
        for node in &self.nodes {
            stop_node_daemons(&node.store);
            let _ = run(ip(), &["netns", "del", &node.netns]);
        }
        let _ = run(ip(), &["netns", "del", &self.etcd_ns]);
        let _ = run(ip(), &["netns", "del", &self.underlay]);
    }
}

/// Stop the userspace daemons this node's records name (by recorded pid).
fn stop_node_daemons(store: &Path) {
    let Ok(networks) = std::fs::read_dir(store) else {
        return;
    };
    for network in networks.filter_map(|e| e.ok()) {
        let Ok(nodes) = std::fs::read_dir(network.path()) else {
            continue;
        };
        for node in nodes.filter_map(|e| e.ok()) {
            let Ok(files) = std::fs::read_dir(node.path()) else {
                continue;
            };
            for file in files.filter_map(|e| e.ok()) {
                let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                let record: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let Some(pid) = record["daemonPid"].as_u64() else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let host_name = record["hostName"].as_str().unwrap_or("-");
                if String::from_utf8_lossy(&cmdline).contains(host_name) {
                    let _ = run("kill", &[&pid.to_string()]);
                }
            }
        }
    }
}

/// Poll `done` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One ping, short timeout (callers retry within a bounded wait).
pub fn ping_once(pod: &Pod, address: &str) -> bool {
    pod.exec(&["ping", "-c", "1", "-W", "1", address])
        .status
        .success()
}
