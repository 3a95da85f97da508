//! `wg-cni agent` against a real etcd 3.4 (Debian's `etcd-server`), with two or three agents
//! under different `--node` names as simulated nodes (records only, no links).
//!
//! Every test runs on a dedicated thread that first moves into an anonymous network namespace
//! of its own (`unshare(CLONE_NEWNET)`, loopback up): etcd, etcdctl and the agents are spawned
//! from that thread and inherit it, so nothing here binds or sends anything in the host's
//! namespace, and tests can run in parallel on the same ports. Every process is killed by its
//! pid in a Drop guard, also when an assertion fails.

mod etcd_filler;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

const NET: &str = "wgnet";
const CLIENT_PORT: u16 = 23790;
const PEER_PORT: u16 = 23800;
const WAIT: Duration = Duration::from_secs(10);
/// Every node's subnet lies in here (operator-given or leased).
const CLUSTER_RANGE: [&str; 2] = ["10.10.0.0/16", "fd10::/48"];
const SERVICE_RANGE: &str = "10.96.0.0/12";

/// Run `body` on a thread inside a fresh anonymous network namespace with loopback up.
fn in_netns(body: impl FnOnce() + Send + 'static) {
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(up.success());
        body();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Certificates made at test time (never committed).
struct Tls {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Tls {
    fn make(dir: &Path) -> Tls {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        for name in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        Tls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A single-member etcd on 127.0.0.1 inside the test's namespace; killed on drop.
struct Etcd {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    tls: Option<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)>,
    /// `user:password` for etcdctl once auth is enabled.
    auth: Option<String>,
}

impl Etcd {
    fn start(dir: &Path, tls: Option<&Tls>) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            auth: None,
            data: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
            tls: tls.map(|t| {
                (
                    t.ca.clone(),
                    t.server_cert.clone(),
                    t.server_key.clone(),
                    t.client_cert.clone(),
                    t.client_key.clone(),
                )
            }),
        };
        etcd.spawn();
        etcd
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{CLIENT_PORT}")
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{PEER_PORT}");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some((ca, cert, key, _, _)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(cmd.spawn().expect("spawning etcd"));
        wait_for("etcd to answer", WAIT, || {
            self.ctl(&["endpoint", "health"]).status.success()
        });
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as(None, args)
    }

    fn ctl_as(&self, user: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url(), "--command-timeout", "5s"]);
        if let Some((ca, _, _, cert, key)) = &self.tls {
            cmd.arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        if let Some(user) = user.or(self.auth.as_deref()) {
            cmd.args(["--user", user]);
        }
        cmd.args(args).output().expect("etcdctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.ok(&["get", "--prefix", "--keys-only", prefix])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn revision(&self) -> i64 {
        let out: Value = serde_json::from_str(&self.ok(&["get", "/", "-w", "json"])).unwrap();
        out["header"]["revision"].as_i64().unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a simulated node gets its subnet.
#[derive(Clone)]
enum Subnet {
    Operator(&'static str),
    Lease(&'static str),
}

/// One simulated node: its store, conf dir and (while running) its agent.
struct Node {
    name: String,
    store: PathBuf,
    conf_dir: PathBuf,
    log: PathBuf,
    health_port: u16,
    extra: Vec<String>,
    /// Environment the agent gets besides the test's (failpoints).
    env: Vec<(String, String)>,
    endpoint: String,
    child: Option<Child>,
}

impl Node {
    fn new(root: &Path, name: &str, index: u16, subnet: Subnet, extra: &[String]) -> Node {
        let base = root.join(name);
        let store = base.join("store");
        let conf_dir = base.join("net.d");
        fs::create_dir_all(store.join(NET).join(name)).unwrap();
        fs::create_dir_all(&conf_dir).unwrap();
        // No node gateway: these agents sync records only (no links); tests/multinode.rs
        // covers agents that make gateways and reconcile live links.
        // Node addresses are data here (records only, nothing is sent to them): TEST-NET-1.
        let mut plugin = json!({"type": "wg-cni", "store": store, "nodeName": name,
            "endpoint": format!("192.0.2.{}", 10 + index), "hostGateway": false,
            "serviceRange": SERVICE_RANGE});
        match subnet {
            Subnet::Operator(cidr) => {
                plugin["ipam"] = json!({"type": "host-local", "ranges": [[{"subnet": cidr}]]});
                plugin["clusterRange"] = json!(CLUSTER_RANGE);
            }
            Subnet::Lease(cluster) => {
                plugin["ipam"] = json!({"type": "host-local", "ranges": [[{"subnet": "auto"}]]});
                plugin["clusterRange"] = json!(cluster);
                plugin["subnetLease"] = json!(true);
            }
        }
        let list = json!({"cniVersion": "1.0.0", "name": NET, "plugins": [plugin]});
        fs::write(conf_dir.join("10-wg.conflist"), list.to_string()).unwrap();
        Node {
            name: name.to_string(),
            store,
            conf_dir,
            log: base.join("agent.log"),
            health_port: 9765 + index,
            extra: extra.to_vec(),
            env: Vec::new(),
            endpoint: format!("192.0.2.{}", 10 + index),
            child: None,
        }
    }

    fn start(&mut self, etcd_url: &str) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wg-cni"))
            .arg("agent")
            .args(["--etcd-endpoints", etcd_url, "--node", &self.name])
            .arg("--store")
            .arg(&self.store)
            .arg("--cni-conf-dir")
            .arg(&self.conf_dir)
            .args([
                "--health-listen",
                &format!("127.0.0.1:{}", self.health_port),
                // Agents share this namespace: the default metrics port is another's health port.
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.health_port + 100),
            ])
            .args(&self.extra)
            .env("WG_CNI_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning wg-cni agent");
        self.child = Some(child);
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("agent running").id() as i32)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn dir_of(&self, node: &str) -> PathBuf {
        self.store.join(NET).join(node)
    }

    fn write_record(&self, id: &str, address: &str, state: &str) {
        let record = pod_record(&self.name, id, address, state, &self.endpoint);
        fs::write(
            self.dir_of(&self.name).join(format!("{id}:eth0.json")),
            serde_json::to_vec_pretty(&record).unwrap(),
        )
        .unwrap();
    }

    fn remove_record(&self, id: &str) {
        fs::remove_file(self.dir_of(&self.name).join(format!("{id}:eth0.json"))).unwrap();
    }

    /// Whether this node mirrors `node`'s record `id`.
    fn mirrors(&self, node: &str, id: &str) -> bool {
        self.dir_of(node).join(format!("{id}:eth0.json")).exists()
    }

    /// The record files mirrored for `node`.
    fn mirrored(&self, node: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir_of(node))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.ends_with(":eth0.json"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// HTTP status of GET `path` on the health listener (0: no answer).
    fn http(&self, path: &str) -> u16 {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.health_port)) else {
            return 0;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    fn subnets(&self) -> Option<Vec<String>> {
        let text = fs::read_to_string(self.dir_of(&self.name).join("subnet.json")).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        Some(
            value["subnets"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGKILL ends a SIGSTOPped agent too.
        self.kill();
    }
}

fn pod_record(node: &str, id: &str, address: &str, state: &str, endpoint: &str) -> Value {
    json!({"schema": 1, "state": state, "network": NET, "node": node, "containerId": id,
        "ifname": "eth0", "publicKey": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        "addresses": [address], "endpoint": endpoint, "listenPort": 52000,
        "netns": "/var/run/netns/x", "netnsInode": 1, "bootId": boot_id(), "hostName": "wgc0",
        "backend": "userspace", "mtu": 1420, "createdAt": 1})
}

fn link_key(node: &str, id: &str) -> String {
    format!("/wg-cni/v1/{NET}/links/{node}/{id}:eth0")
}

/// Fields drop in declaration order: agents die before etcd, the directory goes last.
struct Cluster {
    nodes: Vec<Node>,
    etcd: Etcd,
    _dir: TempDir,
}

impl Cluster {
    fn start(subnets: &[(&str, Subnet)], extra: &[&str], tls: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| {
            let certs = dir.path().join("certs");
            fs::create_dir_all(&certs).unwrap();
            Tls::make(&certs)
        });
        let etcd = Etcd::start(dir.path(), tls.as_ref());
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(t) = &tls {
            for (flag, path) in [
                ("--etcd-ca", &t.ca),
                ("--etcd-cert", &t.client_cert),
                ("--etcd-key", &t.client_key),
            ] {
                extra.push(flag.into());
                extra.push(path.display().to_string());
            }
        }
        let nodes = subnets
            .iter()
            .enumerate()
            .map(|(i, (name, subnet))| {
                Node::new(dir.path(), name, i as u16, subnet.clone(), &extra)
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            etcd,
            _dir: dir,
        };
        let url = cluster.etcd.url();
        for node in &mut cluster.nodes {
            node.start(&url);
        }
        cluster
    }

    fn wait_ready(&self) {
        for node in &self.nodes {
            wait_for(&format!("{} /readyz 200", node.name), WAIT, || {
                node.http("/readyz") == 200
            });
        }
    }
}

fn two_nodes(extra: &[&str]) -> Cluster {
    Cluster::start(
        &[
            ("a", Subnet::Operator("10.10.1.0/24")),
            ("b", Subnet::Operator("10.10.2.0/24")),
        ],
        extra,
        false,
    )
}

#[test]
fn publish_mirror_delete_skip_creating_and_ignore_poison() {
    in_netns(|| {
        let c = two_nodes(&[]);
        c.wait_ready();
        let (a, b) = (&c.nodes[0], &c.nodes[1]);

        a.write_record("p1", "10.10.1.5/24", "ready");
        a.write_record("p2", "10.10.1.6/24", "creating");
        wait_for("b to mirror a's p1", WAIT, || b.mirrors("a", "p1"));
        let published = c.etcd.keys(&format!("/wg-cni/v1/{NET}/links/a/"));
        assert_eq!(published, vec![link_key("a", "p1")]);
        assert!(!b.mirrors("a", "p2"), "a creating record was mirrored");
        let mirrored: Value =
            serde_json::from_slice(&fs::read(b.dir_of("a").join("p1:eth0.json")).unwrap()).unwrap();
        assert_eq!(mirrored["containerId"], "p1");

        // Ready later: published then.
        a.write_record("p2", "10.10.1.6/24", "ready");
        wait_for("b to mirror p2 once ready", WAIT, || b.mirrors("a", "p2"));

        // Deleted on disk: gone from etcd and from b's mirror.
        a.remove_record("p1");
        wait_for("p1 to leave etcd and b's mirror", WAIT, || {
            !b.mirrors("a", "p1") && c.etcd.keys(&link_key("a", "p1")).is_empty()
        });

        // Poison put straight into etcd: an address outside a's subnet, and a younger node
        // claiming a's subnet.
        let poison = pod_record("a", "evil", "10.10.2.99/24", "ready", "192.0.2.66");
        c.etcd
            .ok(&["put", &link_key("a", "evil"), &poison.to_string()]);
        let thief_claim = json!({"subnets": ["10.10.1.0/25"]}).to_string();
        c.etcd.ok(&[
            "put",
            &format!("/wg-cni/v1/{NET}/subnets/thief/claim"),
            &thief_claim,
        ]);
        let info = json!({"endpoints": ["192.0.2.66"], "bootId": boot_id(),
            "subnets": ["10.10.1.0/25"], "mtu": 1420, "agentVersion": "x"});
        c.etcd.ok(&[
            "put",
            &format!("/wg-cni/v1/{NET}/nodes/thief/info"),
            &info.to_string(),
        ]);
        let thief = pod_record("thief", "t1", "10.10.1.7/24", "ready", "192.0.2.66");
        c.etcd
            .ok(&["put", &link_key("thief", "t1"), &thief.to_string()]);
        // A legitimate record after the poison: once it is mirrored, the poison was seen.
        a.write_record("p3", "10.10.1.8/24", "ready");
        wait_for("b to mirror p3", WAIT, || b.mirrors("a", "p3"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !b.mirrors("a", "evil"),
            "address outside a's subnet was mirrored"
        );
        assert!(
            !b.mirrors("thief", "t1"),
            "a younger claim's record was mirrored"
        );
        assert!(a.mirrored("thief").is_empty());
        let log = b.log();
        assert!(log.contains("outside node a's subnets"), "{log}");
        assert!(log.contains("no winning subnet claim"), "{log}");
        // b's own records reach a as well.
        b.write_record("q1", "10.10.2.5/24", "ready");
        wait_for("a to mirror b's q1", WAIT, || a.mirrors("b", "q1"));
        // The node gateway's record travels as `gateway`.
        let gateway = json!({"schema": 1, "network": NET, "node": "a",
            "publicKey": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            "addresses": ["10.10.1.1/32"], "subnets": ["10.10.1.0/24"], "endpoint": "192.0.2.10",
            "listenPort": 52001, "hostName": "wgg0", "backend": "userspace", "bootId": boot_id(),
            "mtu": 1420, "masquerade": false, "createdAt": 1});
        fs::write(a.dir_of("a").join("gateway.json"), gateway.to_string()).unwrap();
        wait_for("b to mirror a's gateway", WAIT, || {
            b.dir_of("a").join("gateway.json").exists()
        });
        assert_eq!(
            c.etcd.keys(&format!("/wg-cni/v1/{NET}/links/a/gateway")),
            vec![format!("/wg-cni/v1/{NET}/links/a/gateway")]
        );
        // The node key carries the node's address (its conflist's `endpoint`), and a record
        // made with another address is reached at the node key's on other nodes.
        let info_key = format!("/wg-cni/v1/{NET}/nodes/a/info");
        assert!(c.etcd.ok(&["get", &info_key]).contains("192.0.2.10"));
        let moved = pod_record("a", "p4", "10.10.1.11/24", "ready", "192.0.2.77");
        fs::write(a.dir_of("a").join("p4:eth0.json"), moved.to_string()).unwrap();
        wait_for("b to mirror p4", WAIT, || b.mirrors("a", "p4"));
        let mirrored: Value =
            serde_json::from_slice(&fs::read(b.dir_of("a").join("p4:eth0.json")).unwrap()).unwrap();
        assert_eq!(
            mirrored["endpoint"], "192.0.2.10",
            "reached at the node key's address"
        );
        assert!(!c.etcd.ok(&["get", &info_key]).contains("192.0.2.77"));
        fs::remove_file(a.dir_of("a").join("p4:eth0.json")).unwrap();
        wait_for("p4 mirrored and gone again", WAIT, || !b.mirrors("a", "p4"));
        // The agent never writes into its own node directory.
        assert_eq!(a.mirrored("a"), vec!["p2:eth0.json", "p3:eth0.json"]);
        assert!(!a.dir_of("a").join(".wg-cni-mirror").exists());
        assert_eq!(b.mirrored("a"), vec!["p2:eth0.json", "p3:eth0.json"]);
    });
}

#[test]
fn newest_record_wins_a_shared_address_without_flip_flop() {
    in_netns(|| {
        let c = Cluster::start(&[("b", Subnet::Operator("10.10.2.0/24"))], &[], false);
        c.wait_ready();
        let b = &c.nodes[0];
        // Node c, put straight into etcd: its claim, node key and records.
        let prefix = format!("/wg-cni/v1/{NET}/");
        c.etcd.ok(&[
            "put",
            &format!("{prefix}subnets/c/claim"),
            r#"{"subnets":["10.10.3.0/24"]}"#,
        ]);
        let info = json!({"endpoints": ["192.0.2.30"], "bootId": boot_id(),
            "subnets": ["10.10.3.0/24"], "mtu": 1400, "agentVersion": "t"});
        c.etcd
            .ok(&["put", &format!("{prefix}nodes/c/info"), &info.to_string()]);
        let put = |id: &str| {
            let record = pod_record("c", id, "10.10.3.5/24", "ready", "192.0.2.30");
            c.etcd.ok(&["put", &link_key("c", id), &record.to_string()]);
        };
        let only = |id: &str| b.mirrored("c") == vec![format!("{id}:eth0.json")];
        put("old");
        wait_for("b to mirror c's old", WAIT, || only("old"));
        put("new");
        wait_for("the newer holder of 10.10.3.5 to win", WAIT, || only("new"));
        put("old");
        wait_for("the rewritten (now newer) record to win", WAIT, || {
            only("old")
        });
        c.etcd.ok(&["del", &link_key("c", "old")]);
        wait_for("the remaining holder to return", WAIT, || only("new"));
        let node: Value =
            serde_json::from_slice(&fs::read(b.dir_of("c").join("node.json")).unwrap()).unwrap();
        assert_eq!(node["stale"], false);
        assert_eq!(node["mtu"], 1400);
        assert_eq!(node["subnets"], json!(["10.10.3.0/24"]));
    });
}

#[test]
fn a_younger_overlapping_claim_loses_everywhere_and_its_agent_is_not_ready() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        let mut b = Node::new(dir.path(), "b", 1, Subnet::Operator("10.10.2.0/24"), &[]);
        let mut late = Node::new(dir.path(), "late", 2, Subnet::Operator("10.10.1.0/25"), &[]);
        a.start(&etcd.url());
        b.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);
        late.write_record("l1", "10.10.1.9/24", "ready");
        late.start(&etcd.url());
        wait_for("late to log that its claim loses", WAIT, || {
            late.log().contains("loses to node a's older claim")
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            etcd.keys(&link_key("late", "l1")).is_empty(),
            "a node without a winning claim does not publish"
        );
        // Even when its records are in etcd, nobody mirrors them.
        let record = pod_record("late", "l2", "10.10.1.10/24", "ready", "192.0.2.12");
        etcd.ok(&["put", &link_key("late", "l2"), &record.to_string()]);
        assert_eq!(late.http("/readyz"), 503);
        a.write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1", WAIT, || b.mirrors("a", "p1"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            b.mirrored("late").is_empty(),
            "the loser's records were mirrored"
        );
        assert!(a.mirrored("late").is_empty());
        assert_eq!(late.http("/readyz"), 503);
        late.kill();
        b.kill();
        a.kill();
        drop(etcd);
    });
}

#[test]
fn a_second_agent_under_the_same_node_name_loses_until_the_first_is_gone() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let ttl = ["--lease-ttl".to_string(), "2".to_string()];
        let subnet = Subnet::Operator("10.10.1.0/24");
        let mut first = Node::new(&dir.path().join("first"), "a", 0, subnet.clone(), &ttl);
        let mut second = Node::new(&dir.path().join("second"), "a", 1, subnet, &ttl);
        first.write_record("p1", "10.10.1.5/24", "ready");
        first.start(&etcd.url());
        wait_for("first ready", WAIT, || first.http("/readyz") == 200);
        let links = format!("/wg-cni/v1/{NET}/links/a/");
        wait_for("p1 published", WAIT, || {
            etcd.keys(&links) == vec![link_key("a", "p1")]
        });

        second.write_record("q1", "10.10.1.6/24", "ready");
        second.start(&etcd.url());
        wait_for("second to see the claim is another agent's", WAIT, || {
            second
                .log()
                .contains("which is alive: two agents run under one node name")
        });
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(second.http("/readyz"), 503);
        assert_eq!(
            etcd.keys(&links),
            vec![link_key("a", "p1")],
            "second must not publish"
        );

        first.kill();
        wait_for(
            "second to take over once first's node key is gone",
            Duration::from_secs(20),
            || second.http("/readyz") == 200,
        );
        wait_for("second's records replace first's", WAIT, || {
            etcd.keys(&links) == vec![link_key("a", "q1")]
        });
        assert!(second.log().contains("taking over"), "{}", second.log());
        second.kill();
        drop(etcd);
    });
}

#[test]
fn readyz_is_503_until_the_first_sync_then_200() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        // No etcd yet: alive, not ready.
        a.start(&format!("http://127.0.0.1:{CLIENT_PORT}"));
        wait_for("/healthz 200", WAIT, || a.http("/healthz") == 200);
        assert_eq!(a.http("/readyz"), 503);
        let etcd = Etcd::start(dir.path(), None);
        wait_for(
            "/readyz 200 once etcd is there",
            Duration::from_secs(20),
            || a.http("/readyz") == 200,
        );
        assert_eq!(a.http("/nope"), 404);
        // SIGTERM: a clean, prompt exit (the lease is left to lapse, nothing is deleted).
        kill(a.pid(), Signal::SIGTERM).unwrap();
        let mut child = a.child.take().unwrap();
        let mut status = None;
        wait_for("the agent to exit on SIGTERM", WAIT, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(status.unwrap().success());
        assert!(
            !etcd
                .keys(&format!("/wg-cni/v1/{NET}/nodes/a/info"))
                .is_empty()
        );
        drop(etcd);
    });
}

#[test]
fn two_agents_racing_for_one_subnet_lease_different_ones() {
    in_netns(|| {
        let c = Cluster::start(
            &[
                ("a", Subnet::Lease("10.244.0.0/16")),
                ("b", Subnet::Lease("10.244.0.0/16")),
                ("c", Subnet::Lease("10.244.0.0/16")),
            ],
            &[],
            false,
        );
        c.wait_ready();
        let subnets: Vec<Vec<String>> = c.nodes.iter().map(|n| n.subnets().unwrap()).collect();
        for s in &subnets {
            assert_eq!(s.len(), 1);
            assert!(
                s[0].starts_with("10.244.") && s[0].ends_with("/24"),
                "{s:?}"
            );
        }
        assert_ne!(subnets[0], subnets[1]);
        assert_ne!(subnets[0], subnets[2]);
        assert_ne!(subnets[1], subnets[2]);
        let claims = c.etcd.keys(&format!("/wg-cni/v1/{NET}/subnets/"));
        assert_eq!(claims.len(), 3, "{claims:?}");
        // A restarted agent keeps its subnet.
        let mut c = c;
        let url = c.etcd.url();
        c.nodes[0].kill();
        fs::remove_file(c.nodes[0].dir_of("a").join("subnet.json")).unwrap();
        c.nodes[0].start(&url);
        wait_for("a's subnet.json again", WAIT, || {
            c.nodes[0].subnets().is_some()
        });
        assert_eq!(c.nodes[0].subnets().unwrap(), subnets[0]);
    });
}

#[test]
fn killed_agent_stays_mirrored_within_grace_then_goes_then_returns() {
    in_netns(|| {
        let mut c = two_nodes(&["--lease-ttl", "2", "--grace-period", "6"]);
        c.wait_ready();
        c.nodes[0].write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1", WAIT, || c.nodes[1].mirrors("a", "p1"));

        c.nodes[0].kill();
        let info = format!("/wg-cni/v1/{NET}/nodes/a/info");
        wait_for("a's node key to lapse", WAIT, || {
            c.etcd.keys(&info).is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            c.nodes[1].mirrors("a", "p1"),
            "removed inside the grace period"
        );
        wait_for("b to log a as stale", WAIT, || {
            c.nodes[1].log().contains("node is stale")
        });
        let node_file = c.nodes[1].dir_of("a").join("node.json");
        wait_for("b to mark a stale in node.json", WAIT, || {
            fs::read(&node_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| v["stale"] == true && v["staleSince"].is_u64())
        });
        assert!(
            !c.etcd.keys(&link_key("a", "p1")).is_empty(),
            "link keys are not on the lease"
        );
        wait_for("b to drop a's records after the grace period", WAIT, || {
            !c.nodes[1].mirrors("a", "p1")
        });

        let url = c.etcd.url();
        c.nodes[0].start(&url);
        wait_for("a's records to return on b", WAIT, || {
            c.nodes[1].mirrors("a", "p1")
        });
        wait_for("a live again in b's node.json", WAIT, || {
            fs::read(&node_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| v["stale"] == false)
        });
    });
}

/// A node that exists only in etcd (put there with etcdctl, as a compromised or broken node's
/// credentials could): its subnet claim, its node key (unless `alive` is false), and records.
struct FakeNode<'a> {
    etcd: &'a Etcd,
    name: &'a str,
}

impl FakeNode<'_> {
    fn key(&self, rest: &str) -> String {
        format!("/wg-cni/v1/{NET}/{rest}")
    }

    fn claim(&self, subnets: &[&str]) {
        let value = json!({ "subnets": subnets }).to_string();
        self.etcd.ok(&[
            "put",
            &self.key(&format!("subnets/{}/claim", self.name)),
            &value,
        ]);
    }

    fn info(&self, endpoints: &[&str], subnets: &[&str], mtu: u32) {
        let value = json!({"endpoints": endpoints, "bootId": boot_id(), "subnets": subnets,
            "mtu": mtu, "agentVersion": "fake"});
        self.etcd.ok(&[
            "put",
            &self.key(&format!("nodes/{}/info", self.name)),
            &value.to_string(),
        ]);
    }

    /// The persistent claim on one of its addresses (what a live node's agent writes).
    fn endpoint_claim(&self, address: &str) {
        let key = self.key(&format!("nodes/{}/endpoints/{address}", self.name));
        self.etcd.ok(&["put", &key, "{}"]);
    }

    fn heartbeat(&self, seconds_ago: u64) {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - seconds_ago;
        let value = json!({ "unix": unix }).to_string();
        let key = self.key(&format!("nodes/{}/heartbeat", self.name));
        self.etcd.ok(&["put", &key, &value]);
    }

    fn record(&self, id: &str, address: &str, endpoint: &str) {
        let record = pod_record(self.name, id, address, "ready", endpoint);
        self.etcd
            .ok(&["put", &link_key(self.name, id), &record.to_string()]);
    }

    fn gateway(&self, address: &str, subnet: &str, endpoint: &str) {
        let gateway = json!({"schema": 1, "network": NET, "node": self.name,
            "publicKey": "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
            "addresses": [address], "subnets": [subnet], "endpoint": endpoint,
            "listenPort": 52001, "hostName": "wgg0", "backend": "userspace", "bootId": boot_id(),
            "mtu": 1420, "masquerade": false, "createdAt": 1});
        self.etcd.ok(&[
            "put",
            &self.key(&format!("links/{}/gateway", self.name)),
            &gateway.to_string(),
        ]);
    }
}

/// `node.json` as node `observer` mirrors node `node` (Null when absent).
fn node_file(observer: &Node, node: &str) -> Value {
    fs::read(observer.dir_of(node).join("node.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// T1: a node's endpoints become /32 allowed IPs of its gateway on every pod. A node that
/// publishes a pod's address, a Service IP, another node's address or a link-local address as
/// its own gets none of them: only its one legitimate address is mirrored, and its gateway
/// record is reached there.
#[test]
fn node_endpoints_naming_pods_services_or_other_nodes_are_refused() {
    in_netns(|| {
        let c = two_nodes(&[]);
        c.wait_ready();
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        let evil = FakeNode {
            etcd: &c.etcd,
            name: "evil",
        };
        evil.claim(&["10.10.3.0/24"]);
        // A pod of a, a Service, a's node address, the metadata service, loopback, and one
        // address of its own.
        let published = [
            "10.10.1.5",
            "10.96.0.10",
            "192.0.2.10",
            "169.254.169.254",
            "127.0.0.1",
            "192.0.2.30",
        ];
        evil.info(&published, &["10.10.3.0/24"], 1420);
        evil.gateway("10.10.3.1/32", "10.10.3.0/24", "10.10.1.5");
        evil.record("e1", "10.10.3.5/24", "10.96.0.10");
        wait_for("b to mirror evil's gateway and e1", WAIT, || {
            b.dir_of("evil").join("gateway.json").exists() && b.mirrors("evil", "e1")
        });
        let node = node_file(b, "evil");
        assert_eq!(node["endpoints"], json!(["192.0.2.30"]), "{node}");
        let gateway: Value =
            serde_json::from_slice(&fs::read(b.dir_of("evil").join("gateway.json")).unwrap())
                .unwrap();
        assert_eq!(gateway["endpoint"], "192.0.2.30");
        let record: Value =
            serde_json::from_slice(&fs::read(b.dir_of("evil").join("e1:eth0.json")).unwrap())
                .unwrap();
        assert_eq!(record["endpoint"], "192.0.2.30");
        // a's own address stays a's.
        a.write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1", WAIT, || b.mirrors("a", "p1"));
        assert_eq!(node_file(b, "a")["endpoints"], json!(["192.0.2.10"]));
        let log = b.log();
        assert!(log.contains("endpoint_held_by_another_node"), "{log}");
        assert!(log.contains("endpoint_in_pod_or_service_range"), "{log}");
        assert!(log.contains("endpoint_not_unicast"), "{log}");

        // With no legitimate address left, nothing of the node is mirrored at all.
        let worse = FakeNode {
            etcd: &c.etcd,
            name: "worse",
        };
        worse.claim(&["10.10.4.0/24"]);
        worse.info(&["10.10.1.5", "192.0.2.11"], &["10.10.4.0/24"], 1420);
        worse.record("w1", "10.10.4.5/24", "10.10.1.5");
        a.write_record("p9", "10.10.1.9/24", "ready");
        wait_for("b to mirror a's p9 (after worse's keys)", WAIT, || {
            b.mirrors("a", "p9")
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !b.mirrors("worse", "w1"),
            "a record without a usable address"
        );
        assert!(b.log().contains("record_without_endpoint"), "{}", b.log());
    });
}

/// T2, T3: claims are first-come, but only over the cluster range: a claim of the whole IPv4
/// space or of the Service range wins nothing, and a claim that loses blocks nothing.
#[test]
fn claims_outside_the_cluster_range_win_nothing_and_losing_claims_block_nothing() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let fake = |name| FakeNode { etcd: &etcd, name };
        // Older than every real node: the Service range, half the IPv4 space, and a valid
        // claim that loses to a valid older one.
        fake("svc").claim(&["10.96.0.0/12"]);
        fake("svc").info(&["192.0.2.40"], &["10.96.0.0/12"], 1420);
        fake("svc").record("s1", "10.96.0.10/12", "192.0.2.40");
        fake("wide").claim(&["0.0.0.0/1"]);
        fake("first").claim(&["10.10.5.0/24"]);
        fake("loser").claim(&["10.10.4.0/22"]);
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        let mut b = Node::new(dir.path(), "b", 1, Subnet::Operator("10.10.4.0/24"), &[]);
        a.start(&etcd.url());
        b.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);
        wait_for("b ready (loser's claim does not block it)", WAIT, || {
            b.http("/readyz") == 200
        });
        a.write_record("p1", "10.10.1.5/24", "ready");
        b.write_record("q1", "10.10.4.5/24", "ready");
        wait_for("a and b to mirror each other", WAIT, || {
            a.mirrors("b", "q1") && b.mirrors("a", "p1")
        });
        assert!(!a.mirrors("svc", "s1"), "a record in the Service range");
        let log = a.log();
        assert!(log.contains("claim_outside_cluster_range"), "{log}");
        assert!(log.contains("claim_loses"), "{log}");

        // Leasing skips only winning claims.
        let mut c = Node::new(dir.path(), "c", 2, Subnet::Lease("10.10.0.0/16"), &[]);
        c.start(&etcd.url());
        wait_for("c ready", WAIT, || c.http("/readyz") == 200);
        assert_eq!(c.subnets(), Some(vec!["10.10.0.0/24".to_string()]));
        c.kill();
        b.kill();
        a.kill();
        drop(etcd);
    });
}

/// T4: one MTU per network, but a node cannot shrink it below what the network's families
/// need (IPv6: 1280): a published 1200 is not mirrored, so no ADD on this node uses it.
#[test]
fn an_mtu_below_the_networks_floor_is_ignored() {
    in_netns(|| {
        let c = Cluster::start(&[("b", Subnet::Operator("10.10.2.0/24"))], &[], false);
        c.wait_ready();
        let b = &c.nodes[0];
        let small = FakeNode {
            etcd: &c.etcd,
            name: "small",
        };
        small.claim(&["10.10.3.0/24"]);
        small.info(&["192.0.2.30"], &["10.10.3.0/24"], 1200);
        small.record("m1", "10.10.3.5/24", "192.0.2.30");
        wait_for("b to mirror small's m1", WAIT, || b.mirrors("small", "m1"));
        let node = node_file(b, "small");
        assert!(node["mtu"].is_null(), "{node}");
        assert!(b.log().contains("mtu_below_floor"), "{}", b.log());
    });
}

/// L1: staleness is computed from the node's heartbeat in etcd, not from when this agent
/// first noticed: an agent started after a node died long ago does not bring its pods back
/// for another grace period.
#[test]
fn a_restarted_agent_does_not_revive_a_node_dead_past_the_grace_period() {
    in_netns(|| {
        let c = two_nodes(&["--grace-period", "20"]);
        c.wait_ready();
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        // Both nodes' node keys lapsed with their leases; their claims, address claims and
        // records stay in etcd. One was last heard of an hour ago, one 5 s ago.
        let dead = FakeNode {
            etcd: &c.etcd,
            name: "dead",
        };
        let recent = FakeNode {
            etcd: &c.etcd,
            name: "recent",
        };
        for (node, third, ago) in [(&dead, "3", 3600), (&recent, "4", 5)] {
            node.claim(&[&format!("10.10.{third}.0/24")]);
            node.endpoint_claim(&format!("192.0.2.3{third}"));
            node.heartbeat(ago);
            node.record(
                "d1",
                &format!("10.10.{third}.5/24"),
                &format!("192.0.2.3{third}"),
            );
        }
        wait_for(
            "b to mirror recent's d1 (inside the grace period)",
            WAIT,
            || b.mirrors("recent", "d1"),
        );
        a.write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1 (after dead's keys)", WAIT, || {
            b.mirrors("a", "p1")
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.mirrors("dead", "d1"), "a node dead for an hour revived");
    });
}

/// A record over 4 KiB is refused (never mirrored, never kept), whatever it holds.
#[test]
fn records_over_4_kib_are_refused() {
    in_netns(|| {
        let c = two_nodes(&[]);
        c.wait_ready();
        let b = &c.nodes[1];
        let f = FakeNode {
            etcd: &c.etcd,
            name: "f",
        };
        f.claim(&["10.10.3.0/24"]);
        f.info(&["192.0.2.30"], &["10.10.3.0/24"], 1420);
        let mut big = pod_record("f", "big", "10.10.3.7/24", "ready", "192.0.2.30");
        big["pod"] = json!(format!("default/{}", "x".repeat(5000)));
        c.etcd.ok(&["put", &link_key("f", "big"), &big.to_string()]);
        f.record("f1", "10.10.3.5/24", "192.0.2.30");
        wait_for("b to mirror f's f1", WAIT, || b.mirrors("f", "f1"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!b.mirrors("f", "big"));
        assert!(b.log().contains("record_too_large"), "{}", b.log());
    });
}

/// L4: the agent follows its conflists: a changed config is applied (here the node address),
/// a network added later is served, a removed one stops at once (its node key goes with its
/// revoked lease) and keeps its subnet claim; a network loop that dies is started again while
/// `/healthz` stays 200.
#[test]
fn the_agent_follows_its_conflists_and_restarts_a_dead_loop() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        a.env
            .push(("WG_CNI_FAILPOINT".into(), "network-loop-panic".into()));
        a.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);

        // The node's address changes in the conflist: the node key follows.
        let file = a.conf_dir.join("10-wg.conflist");
        let text = fs::read_to_string(&file).unwrap();
        fs::write(&file, text.replace("192.0.2.10", "192.0.2.50")).unwrap();
        let info = format!("/wg-cni/v1/{NET}/nodes/a/info");
        wait_for("the node key to carry the new address", WAIT, || {
            etcd.ok(&["get", &info]).contains("192.0.2.50")
        });

        // A second network appears, then the first one goes.
        let mut second: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        second["name"] = json!("second");
        second["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": "10.10.7.0/24"}]]);
        fs::write(a.conf_dir.join("20-second.conflist"), second.to_string()).unwrap();
        let second_info = "/wg-cni/v1/second/nodes/a/info";
        wait_for("the second network's node key", WAIT, || {
            !etcd.keys(second_info).is_empty()
        });
        fs::remove_file(&file).unwrap();
        wait_for(
            "the removed network's node key to go",
            Duration::from_secs(5),
            || etcd.keys(&info).is_empty(),
        );
        assert_eq!(
            etcd.keys(&format!("/wg-cni/v1/{NET}/subnets/a/claim"))
                .len(),
            1,
            "the subnet claim stays"
        );
        wait_for("a ready on the second network alone", WAIT, || {
            a.http("/readyz") == 200
        });
        // The first network loop died once (the failpoint) and was started again.
        assert!(a.log().contains("network loop restarted"), "{}", a.log());
        assert_eq!(a.http("/healthz"), 200);
        a.kill();
        drop(etcd);
    });
}

/// `forget-node`: a node gone for good leaves etcd and every mirror; a live one is refused.
#[test]
fn forget_node_removes_a_dead_nodes_keys_everywhere_and_refuses_a_live_one() {
    in_netns(|| {
        let mut c = two_nodes(&["--lease-ttl", "2"]);
        c.wait_ready();
        c.nodes[1].write_record("q1", "10.10.2.5/24", "ready");
        wait_for("a to mirror b's q1", WAIT, || c.nodes[0].mirrors("b", "q1"));
        let url = c.etcd.url();
        let forget = |extra: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_wg-cni"))
                .args(["agent", "forget-node", "b", "--etcd-endpoints", &url])
                .args(extra)
                .output()
                .unwrap()
        };
        let refused = forget(&[]);
        assert!(!refused.status.success(), "a live node was forgotten");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("is alive"),
            "{refused:?}"
        );

        c.nodes[1].kill();
        let info = format!("/wg-cni/v1/{NET}/nodes/b/info");
        wait_for("b's node key to lapse", WAIT, || {
            c.etcd.keys(&info).is_empty()
        });
        let done = forget(&[]);
        assert!(done.status.success(), "{done:?}");
        assert!(
            String::from_utf8_lossy(&done.stdout).contains(&format!("network {NET}: deleted")),
            "{done:?}"
        );
        for kind in ["nodes", "links", "subnets"] {
            let prefix = format!("/wg-cni/v1/{NET}/{kind}/b/");
            assert!(c.etcd.keys(&prefix).is_empty(), "{prefix} left");
        }
        assert_eq!(
            c.etcd.keys(&format!("/wg-cni/v1/{NET}/subnets/a/")).len(),
            1,
            "another node's keys"
        );
        wait_for("a's mirror of b to empty", WAIT, || {
            c.nodes[0].mirrored("b").is_empty()
        });
    });
}

/// Run the plugin's STATUS (CNI 1.1) for node `node`'s network config.
fn plugin_status(node: &Node) -> Output {
    plugin_status_from(node, "10-wg.conflist")
}

/// Run the plugin's STATUS (CNI 1.1) for the conflist `file` in node `node`'s conf dir.
fn plugin_status_from(node: &Node, file: &str) -> Output {
    let list: Value =
        serde_json::from_str(&fs::read_to_string(node.conf_dir.join(file)).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = json!(NET);
    conf["cniVersion"] = json!("1.1.0");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wg-cni"))
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Item 5 of issue 22: STATUS answers 50, naming the agent, until the agent serving the
/// network has synced in this boot; then 0, and still 0 once the agent and etcd are gone (ADD
/// works from the mirror). A marker of an earlier boot does not count.
#[test]
fn status_waits_for_the_agents_first_sync_in_this_boot_and_not_after() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        let status_of = |node: &Node| -> (i64, String) {
            let out = plugin_status(node);
            if out.status.success() {
                return (0, String::new());
            }
            let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let msg = body["msg"].as_str().unwrap_or_default().to_string();
            (body["code"].as_i64().unwrap_or(-1), msg)
        };
        let (code, msg) = status_of(&a);
        assert_eq!(code, 50, "{msg}");
        assert!(
            msg.contains("no node agent") && msg.contains("--node a"),
            "{msg}"
        );

        // The agent runs but etcd is not there: not synced, still 50.
        a.start(&format!("http://127.0.0.1:{CLIENT_PORT}"));
        wait_for("/healthz 200", WAIT, || a.http("/healthz") == 200);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(status_of(&a).0, 50);
        assert_eq!(a.http("/readyz"), 503);

        let mut etcd = Etcd::start(dir.path(), None);
        wait_for(
            "STATUS 0 after the first sync",
            Duration::from_secs(20),
            || status_of(&a).0 == 0,
        );
        assert_eq!(a.http("/readyz"), 200, "STATUS went green before /readyz");
        let marker: Value = serde_json::from_str(
            &fs::read_to_string(a.dir_of("a").join(".agent-ready.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(marker["bootId"], json!(boot_id()));
        assert_eq!(marker["subnets"], json!(["10.10.1.0/24"]));

        // An outage of the agent, then of etcd, changes nothing.
        a.kill();
        assert_eq!(status_of(&a), (0, String::new()));
        etcd.kill();
        assert_eq!(status_of(&a), (0, String::new()));

        // After a reboot (a marker of another boot), 50 until the agent has synced again.
        let mut earlier = marker.clone();
        earlier["bootId"] = json!("an-earlier-boot");
        fs::write(a.dir_of("a").join(".agent-ready.json"), earlier.to_string()).unwrap();
        let (code, msg) = status_of(&a);
        assert_eq!(code, 50, "{msg}");
        assert!(msg.contains("since this host booted"), "{msg}");
        etcd.restart();
        a.start(&etcd.url());
        wait_for("STATUS 0 after a new sync", Duration::from_secs(20), || {
            status_of(&a).0 == 0
        });
        a.kill();
        drop(etcd);
    });
}

/// Item 4 of issue 22: the agent serves the network of its conflist template from the start
/// and writes the conflist rendered for the node (nodeName from --node, endpoint from HOST_IP,
/// clusterRange from a flag, both spec versions) into the conf dir only once the network is
/// ready; a stopping agent leaves it. A template that does not render stops the agent at once.
#[test]
fn the_conflist_is_written_from_the_template_only_once_the_network_is_ready() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Lease("10.10.0.0/16"), &[]);
        let hand_written = a.conf_dir.join("10-wg.conflist");
        let mut template: Value =
            serde_json::from_str(&fs::read_to_string(&hand_written).unwrap()).unwrap();
        fs::remove_file(&hand_written).unwrap();
        let plugin = template["plugins"][0].as_object_mut().unwrap();
        for field in ["nodeName", "endpoint", "clusterRange"] {
            plugin.remove(field);
        }
        template["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        let template_path = dir.path().join("template.conflist");
        fs::write(&template_path, template.to_string()).unwrap();

        // Bad input first: a template that is not there, or not a conflist.
        let refuse = |template: &Path, says: &str| {
            let out = Command::new(env!("CARGO_BIN_EXE_wg-cni-agent"))
                .args(["--etcd-endpoints", "http://127.0.0.1:1", "--node", "a"])
                .arg("--store")
                .arg(&a.store)
                .arg("--conflist-template")
                .arg(template)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains(says), "{stderr}");
        };
        refuse(&dir.path().join("nope.conflist"), "nope.conflist");
        let not_a_list = dir.path().join("bad.conflist");
        fs::write(
            &not_a_list,
            json!({"name": NET, "type": "wg-cni"}).to_string(),
        )
        .unwrap();
        refuse(&not_a_list, "must be a conflist");

        a.extra = vec![
            "--conflist-template".into(),
            template_path.display().to_string(),
            "--cluster-range".into(),
            "10.10.0.0/16".into(),
        ];
        a.env = vec![("HOST_IP".into(), "192.0.2.10".into())];
        let out = a.conf_dir.join("10-wg-cni.conflist");
        a.start(&format!("http://127.0.0.1:{CLIENT_PORT}"));
        wait_for("/healthz 200", WAIT, || a.http("/healthz") == 200);
        std::thread::sleep(Duration::from_secs(2));
        assert!(!out.exists(), "written before the network was ready");
        assert_eq!(a.http("/readyz"), 503);

        let etcd = Etcd::start(dir.path(), None);
        wait_for("the conflist", Duration::from_secs(20), || out.exists());
        assert_eq!(a.http("/readyz"), 200, "written before /readyz said ready");
        assert_eq!(a.subnets(), Some(vec!["10.10.0.0/24".to_string()]));
        let conflist: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(conflist["cniVersion"], json!("1.0.0"));
        assert_eq!(conflist["cniVersions"], json!(["1.0.0", "1.1.0"]));
        let plugin = &conflist["plugins"][0];
        assert_eq!(plugin["nodeName"], json!("a"));
        assert_eq!(plugin["endpoint"], json!("192.0.2.10"));
        assert_eq!(plugin["clusterRange"], json!("10.10.0.0/16"));
        assert_eq!(
            plugin["serviceRange"],
            json!(SERVICE_RANGE),
            "the template's stays"
        );
        assert_eq!(conflist["plugins"][1]["type"], json!("portmap"));
        let names: Vec<String> = fs::read_dir(&a.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["10-wg-cni.conflist"], "no temp file left");
        // The plugin takes the rendered conflist, and the node is ready for it.
        let status = plugin_status_from(&a, "10-wg-cni.conflist");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stdout)
        );

        // SIGTERM: the agent leaves the conflist (and everything else) as it is.
        let before = fs::read(&out).unwrap();
        kill(a.pid(), Signal::SIGTERM).unwrap();
        let mut child = a.child.take().unwrap();
        wait_for("the agent to exit on SIGTERM", WAIT, || {
            child.try_wait().unwrap().is_some()
        });
        assert_eq!(fs::read(&out).unwrap(), before);
        drop(etcd);
    });
}

/// L3: a leased claim that disappears comes back as the subnet `subnet.json` names (the node's
/// pods have addresses there), not as the lowest free one. If another node took it meanwhile:
/// with live pods the node says so (ADD 11, STATUS 50, /readyz naming the conflict); without,
/// it leases another subnet and rewrites `subnet.json`.
#[test]
fn a_lost_claim_comes_back_as_its_subnet_or_reports_the_conflict() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let fake = |name| FakeNode { etcd: &etcd, name };
        fake("x").claim(&["10.10.0.0/24"]);
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Lease("10.10.0.0/16"), &[]);
        a.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);
        assert_eq!(a.subnets(), Some(vec!["10.10.1.0/24".to_string()]));
        let claim_of = |node: &str| format!("/wg-cni/v1/{NET}/subnets/{node}/claim");

        // Both claims vanish (x's first): a claims its subnet.json subnet again.
        etcd.ok(&["del", &claim_of("x")]);
        etcd.ok(&["del", &claim_of("a")]);
        wait_for("a's claim back", WAIT, || {
            !etcd.keys(&claim_of("a")).is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(etcd.ok(&["get", &claim_of("a")]).contains("10.10.1.0/24"));
        assert_eq!(a.subnets(), Some(vec!["10.10.1.0/24".to_string()]));

        // With a pod on it, the subnet is taken by y while a is stopped.
        a.write_record("p1", "10.10.1.5/24", "ready");
        kill(a.pid(), Signal::SIGSTOP).unwrap();
        etcd.ok(&["del", &claim_of("a")]);
        fake("y").claim(&["10.10.1.0/24"]);
        kill(a.pid(), Signal::SIGCONT).unwrap();
        let conflict = || {
            let status = plugin_status(&a);
            let stdout: Value = serde_json::from_slice(&status.stdout).unwrap_or(Value::Null);
            stdout["code"] == 50 && stdout["msg"].as_str().is_some_and(|m| m.contains("node y"))
        };
        wait_for("STATUS 50 naming the conflict", WAIT, conflict);
        assert_eq!(a.http("/readyz"), 503);
        assert_eq!(a.subnets(), Some(vec!["10.10.1.0/24".to_string()]), "kept");

        // The pod goes: a leases another subnet and says so in subnet.json.
        a.remove_record("p1");
        wait_for("a ready on another subnet", Duration::from_secs(20), || {
            a.http("/readyz") == 200
        });
        assert_eq!(a.subnets(), Some(vec!["10.10.0.0/24".to_string()]));
        assert!(plugin_status(&a).status.success());
        a.kill();
        drop(etcd);
    });
}

/// A leased subnet's claim rides on a long lease the agent renews (`--subnet-lease-ttl`):
/// it outlives its TTL while the agent runs, and lapses once the node is gone for a TTL, so a
/// dead node's subnet is free again without an administrator.
#[test]
fn a_leased_claim_lapses_only_after_its_node_is_gone_for_its_ttl() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let ttl = ["--subnet-lease-ttl".to_string(), "4".to_string()];
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Lease("10.10.0.0/16"), &ttl);
        a.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);
        let claim = format!("/wg-cni/v1/{NET}/subnets/a/claim");
        assert_ne!(lease_of(&etcd, &claim), 0, "the claim is on a lease");
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(etcd.keys(&claim).len(), 1, "renewed past its TTL");
        a.kill();
        wait_for("the claim to lapse", Duration::from_secs(8), || {
            etcd.keys(&claim).is_empty()
        });
        drop(etcd);
    });
}

/// The lease id (decimal) the key is attached to, 0 if none or absent.
fn lease_of(etcd: &Etcd, key: &str) -> i64 {
    let out: Value = serde_json::from_str(&etcd.ok(&["get", key, "-w", "json"])).unwrap();
    out["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

#[test]
fn stale_own_keys_go_at_start_and_a_revoked_lease_is_regranted() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path(), None);
        let mut a = Node::new(dir.path(), "a", 0, Subnet::Operator("10.10.1.0/24"), &[]);
        // Left over from a previous boot: in etcd, not on disk.
        let mut ghost = pod_record("a", "ghost", "10.10.1.9/24", "ready", "192.0.2.10");
        ghost["bootId"] = json!("previous-boot");
        etcd.ok(&["put", &link_key("a", "ghost"), &ghost.to_string()]);
        a.write_record("p1", "10.10.1.5/24", "ready");
        a.start(&etcd.url());
        wait_for("a ready", WAIT, || a.http("/readyz") == 200);
        wait_for("the ghost key to be deleted and p1 published", WAIT, || {
            etcd.keys(&format!("/wg-cni/v1/{NET}/links/a/")) == vec![link_key("a", "p1")]
        });

        let info = format!("/wg-cni/v1/{NET}/nodes/a/info");
        let lease = lease_of(&etcd, &info);
        assert_ne!(lease, 0, "the node key is on a lease");
        assert_eq!(
            lease_of(&etcd, &link_key("a", "p1")),
            0,
            "link keys are not"
        );
        etcd.ok(&["lease", "revoke", &format!("{lease:x}")]);
        wait_for(
            "a new lease with the node key",
            Duration::from_secs(15),
            || {
                let now = lease_of(&etcd, &info);
                now != 0 && now != lease
            },
        );
        assert_eq!(etcd.keys(&link_key("a", "p1")), vec![link_key("a", "p1")]);
        assert!(a.log().contains("liveness lease lost"), "{}", a.log());
        wait_for("a ready again", WAIT, || a.http("/readyz") == 200);
        a.kill();
        drop(etcd);
    });
}

#[test]
fn etcd_restart_resyncs_and_picks_up_a_record_added_meanwhile() {
    in_netns(|| {
        let mut c = two_nodes(&[]);
        c.wait_ready();
        c.nodes[0].write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1", WAIT, || c.nodes[1].mirrors("a", "p1"));

        c.etcd.kill();
        c.nodes[0].write_record("p2", "10.10.1.6/24", "ready");
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            c.nodes[1].mirrors("a", "p1"),
            "an etcd outage removed a mirror file"
        );
        c.etcd.restart();
        wait_for(
            "b to mirror p2 after the restart",
            Duration::from_secs(20),
            || c.nodes[1].mirrors("a", "p2"),
        );
        assert!(c.nodes[1].mirrors("a", "p1"));
        c.wait_ready();
    });
}

#[test]
fn compaction_while_an_agent_is_stopped_converges_after_sigcont() {
    in_netns(|| {
        let c = two_nodes(&[]);
        c.wait_ready();
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        for i in 0..10 {
            a.write_record(
                &format!("old{i}"),
                &format!("10.10.1.{}/24", 100 + i),
                "ready",
            );
        }
        wait_for("b to mirror the first ten", WAIT, || {
            b.mirrored("a").len() == 10
        });

        kill(b.pid(), Signal::SIGSTOP).unwrap();
        // First enough traffic under the watched prefix (not records: the agents ignore it)
        // that etcd cannot push it all to the stopped agent: its watcher falls behind...
        etcd_filler::fill(&c.etcd.url(), NET, 2500, 8 * 1024);
        // ...then the churn: 30 new records, the ten old ones deleted, five rewritten.
        for i in 0..30 {
            a.write_record(
                &format!("new{i}"),
                &format!("10.10.1.{}/24", 10 + i),
                "ready",
            );
        }
        for i in 0..10 {
            a.remove_record(&format!("old{i}"));
        }
        for i in 0..5 {
            a.write_record(
                &format!("new{i}"),
                &format!("10.10.1.{}/24", 50 + i),
                "ready",
            );
        }
        wait_for("a to publish the final state", WAIT, || {
            let keys = c.etcd.keys(&format!("/wg-cni/v1/{NET}/links/a/"));
            keys.len() == 30 && keys.iter().all(|k| k.contains("/new"))
        });
        std::thread::sleep(Duration::from_millis(300));
        let revision = c.etcd.revision();
        c.etcd.ok(&["compact", &revision.to_string()]);
        kill(b.pid(), Signal::SIGCONT).unwrap();

        let mut want: Vec<String> = (0..30).map(|i| format!("new{i}:eth0.json")).collect();
        want.sort();
        wait_for(
            "b to see its watch cancelled by the compaction",
            WAIT,
            || b.log().contains("watch cancelled"),
        );
        wait_for("b to converge after the compaction", WAIT, || {
            b.mirrored("a") == want
        });
        for i in 0..5 {
            let body: Value = serde_json::from_slice(
                &fs::read(b.dir_of("a").join(format!("new{i}:eth0.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(body["addresses"][0], format!("10.10.1.{}/24", 50 + i));
        }
        c.wait_ready();
    });
}

#[test]
fn per_node_credentials_write_only_their_own_keys() {
    in_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Etcd::start(dir.path(), None);
        let prefix = format!("/wg-cni/v1/{NET}/");
        // Roles and users as the README says: `wg-cni-agent grant-node` per node.
        let url = etcd.url();
        let grant = |node: &str, extra: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_wg-cni-agent"))
                .args(["--etcd-endpoints", &url])
                .args(["grant-node", node, "--network", NET])
                .args(extra)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "grant-node {node}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        };
        for node in ["a", "b"] {
            let pw = dir.path().join(format!("{node}.pw"));
            fs::write(&pw, format!("pw-{node}\n")).unwrap();
            let with_password = ["--password-file", pw.to_str().unwrap()];
            let said = grant(node, &with_password);
            assert!(said.contains(&format!("{prefix}links/{node}/")), "{said}");
            assert!(!said.contains("already there"), "{said}");
            assert!(
                !said.contains(&format!("pw-{node}")),
                "the password is never printed"
            );
            let said = grant(node, &with_password);
            assert!(
                said.contains("already there"),
                "a second run adds nothing: {said}"
            );
        }
        // A node that logs in with a client certificate: a user without a password.
        grant("c", &[]);
        let user = etcd.ok(&["user", "get", "c"]);
        assert!(user.contains("Roles: c"), "{user}");
        etcd.ok(&["user", "add", "root:rootpw"]);
        etcd.ok(&["user", "grant-role", "root", "root"]);
        etcd.ok(&["auth", "enable"]);
        etcd.auth = Some("root:rootpw".into());
        let root_pw = dir.path().join("root.pw");
        fs::write(&root_pw, "rootpw\n").unwrap();
        let said = grant(
            "a",
            &[
                "--etcd-user",
                "root",
                "--etcd-password-file",
                root_pw.to_str().unwrap(),
            ],
        );
        assert!(
            said.contains("already there"),
            "under auth, as root: {said}"
        );
        let refused = Command::new(env!("CARGO_BIN_EXE_wg-cni-agent"))
            .args(["--etcd-endpoints", &url, "grant-node", "d"])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "--network is required");

        let denied = etcd.ctl_as(Some("b:pw-b"), &["put", &link_key("a", "x"), "{}"]);
        assert!(!denied.status.success());
        let err = String::from_utf8_lossy(&denied.stderr);
        assert!(err.contains("permission denied"), "{err}");
        let denied = etcd.ctl_as(
            Some("b:pw-b"),
            &["put", &format!("{prefix}subnets/a/claim"), "{}"],
        );
        assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied"));
        let allowed = etcd.ctl_as(Some("b:pw-b"), &["put", &link_key("b", "x"), "{}"]);
        assert!(
            allowed.status.success(),
            "{}",
            String::from_utf8_lossy(&allowed.stderr)
        );
        etcd.ctl_as(Some("b:pw-b"), &["del", &link_key("b", "x")]);

        // The agents work with exactly these rights.
        let mut nodes: Vec<Node> = [("a", "10.10.1.0/24"), ("b", "10.10.2.0/24")]
            .iter()
            .enumerate()
            .map(|(i, (name, subnet))| {
                let pw = dir.path().join(format!("{name}.pw"));
                fs::write(&pw, format!("pw-{name}\n")).unwrap();
                let extra = vec![
                    "--etcd-user".to_string(),
                    name.to_string(),
                    "--etcd-password-file".to_string(),
                    pw.display().to_string(),
                ];
                Node::new(dir.path(), name, i as u16, Subnet::Operator(subnet), &extra)
            })
            .collect();
        for n in &mut nodes {
            n.start(&etcd.url());
        }
        for n in &nodes {
            wait_for(&format!("{} ready under auth", n.name), WAIT, || {
                n.http("/readyz") == 200
            });
        }
        nodes[0].write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1 under auth", WAIT, || {
            nodes[1].mirrors("a", "p1")
        });
        // A restart invalidates every auth token: the agents authenticate again.
        etcd.restart();
        nodes[0].write_record("p2", "10.10.1.6/24", "ready");
        wait_for(
            "b to mirror p2 after an etcd restart under auth",
            Duration::from_secs(20),
            || nodes[1].mirrors("a", "p2"),
        );
        const UNCONFINED: &str = "may write other nodes' keys";
        for n in &nodes {
            assert!(!n.log().contains(UNCONFINED), "{}", n.log());
        }

        // The credential rotated: new password in etcd, then in a's file. After the next etcd
        // restart only the new one authenticates, and a still publishes.
        let new_pw = dir.path().join("a-new.pw");
        fs::write(&new_pw, "pw-a-2\n").unwrap();
        let said = grant(
            "a",
            &[
                "--password-file",
                new_pw.to_str().unwrap(),
                "--etcd-user",
                "root",
                "--etcd-password-file",
                root_pw.to_str().unwrap(),
            ],
        );
        assert!(said.contains("already there"), "{said}");
        fs::write(dir.path().join("a.pw"), "pw-a-2\n").unwrap();
        wait_for(
            "a to connect again with the new password file",
            Duration::from_secs(25),
            || {
                nodes[0]
                    .log()
                    .contains("etcd credential files changed: connected again")
            },
        );
        etcd.restart();
        nodes[0].write_record("p3", "10.10.1.7/24", "ready");
        wait_for(
            "b to mirror p3, published with a's new password",
            Duration::from_secs(20),
            || nodes[1].mirrors("a", "p3"),
        );

        // An administrator's credential works, and the agent says what it voids.
        nodes[1].kill();
        nodes[1].extra = vec![
            "--etcd-user".to_string(),
            "root".to_string(),
            "--etcd-password-file".to_string(),
            root_pw.display().to_string(),
        ];
        nodes[1].start(&etcd.url());
        wait_for("b warns of its unconfined credential", WAIT, || {
            nodes[1].log().contains(UNCONFINED)
        });
        drop(nodes);
        drop(etcd);
    });
}

#[test]
fn tls_with_client_certificates() {
    in_netns(|| {
        let c = Cluster::start(
            &[
                ("a", Subnet::Operator("10.10.1.0/24")),
                ("b", Subnet::Operator("10.10.2.0/24")),
            ],
            &[],
            true,
        );
        assert!(c.etcd.url().starts_with("https://"));
        c.wait_ready();
        c.nodes[0].write_record("p1", "10.10.1.5/24", "ready");
        wait_for("b to mirror a's p1 over TLS", WAIT, || {
            c.nodes[1].mirrors("a", "p1")
        });
    });
}

/// Not part of the suite (`--ignored`): how long mirroring takes with many remote records.
#[test]
#[ignore]
fn scale_remote_records() {
    in_netns(|| {
        let count: usize = std::env::var("WG_CNI_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000);
        let mut c = Cluster::start(&[("b", Subnet::Operator("10.10.2.0/24"))], &[], false);
        c.wait_ready();
        let prefix = format!("/wg-cni/v1/{NET}/");
        c.etcd.ok(&[
            "put",
            &format!("{prefix}subnets/c/claim"),
            r#"{"subnets":["10.10.64.0/18"]}"#,
        ]);
        let info = json!({"endpoints": ["192.0.2.30"], "bootId": boot_id(),
            "subnets": ["10.10.64.0/18"], "mtu": 1400, "agentVersion": "t"});
        c.etcd
            .ok(&["put", &format!("{prefix}nodes/c/info"), &info.to_string()]);
        // Inside the cluster range: at most 16,383 records.
        assert!(count < 1 << 14, "WG_CNI_SCALE must stay below 16384");
        let address = |i: usize| format!("10.10.{}.{}/18", 64 + i / 256, i % 256);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = c.etcd.url();
        let put_all = |count: usize| {
            runtime.block_on(async {
                let client = etcd_client::Client::connect([url.as_str()], None)
                    .await
                    .unwrap();
                for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
                    let ops: Vec<etcd_client::TxnOp> = chunk
                        .iter()
                        .map(|i| {
                            let id = format!("s{i}");
                            let rec = pod_record("c", &id, &address(*i + 1), "ready", "192.0.2.30");
                            etcd_client::TxnOp::put(link_key("c", &id), rec.to_string(), None)
                        })
                        .collect();
                    client
                        .clone()
                        .txn(etcd_client::Txn::new().and_then(ops))
                        .await
                        .unwrap();
                }
            })
        };
        let start = Instant::now();
        put_all(count);
        let b = &c.nodes[0];
        wait_for("b to mirror everything", Duration::from_secs(120), || {
            b.mirrored("c").len() == count
        });
        eprintln!("SCALE {count}: put+mirror {:?}", start.elapsed());
        let start = Instant::now();
        c.etcd.ok(&["del", &link_key("c", "s0")]);
        wait_for("one deletion", WAIT, || !b.mirrors("c", "s0"));
        eprintln!(
            "SCALE {count}: one change mirrored in {:?}",
            start.elapsed()
        );
        c.nodes[0].kill();
        let start = Instant::now();
        c.nodes[0].start(&url);
        wait_for("b ready again", Duration::from_secs(120), || {
            c.nodes[0].http("/readyz") == 200
        });
        eprintln!(
            "SCALE {count}: restart to ready (full resync) {:?}",
            start.elapsed()
        );
        assert_eq!(
            c.nodes[0].mirrored("c").len(),
            count - 1,
            "the restarted agent's mirror"
        );
        let pid = c.nodes[0].pid();
        std::thread::sleep(Duration::from_secs(3));
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or_default();
        eprintln!("SCALE {count}: idle {rss}");
    });
}
