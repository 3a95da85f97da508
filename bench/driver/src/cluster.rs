//! The simulated cluster of the `multinode`, `agent` and `direct` phases: nodes with `wg-cni agent` and a
//! real etcd (Debian's `etcd-server`), as tests/cluster/mod.rs builds them, and fake nodes
//! whose claims, node keys, heartbeats and records are written straight into etcd.
//!
//! Layout (all in namespaces named `wgbench-<tag>-*`): an underlay namespace with bridge `br0`
//! (10.253.0.0/24), etcd in its own namespace at 10.253.0.2:23790 (peer URL on that
//! namespace's loopback), node `i` (from 1) at 10.253.0.(10+i) owning 10.252.i.0/24 of
//! clusterRange 10.252.0.0/16. The plugin and the agents run inside the node's namespace (setns
//! before exec, as `ip netns exec` would, without its fork). etcd is reached through its JSON
//! gateway (`/v3/kv/txn`, `/v3/lease/grant`) from a thread inside its namespace. Everything
//! is stopped by pid and removed on drop.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cni::Plugin;
use crate::exec::{self, Background, Spec};
use crate::{ns, Ctx, Res};

pub const ETCD_ADDR: &str = "10.253.0.2";
pub const ETCD_PORT: u16 = 23790;
pub const CLUSTER_RANGE: &str = "10.252.0.0/16";
/// Where each node's agent answers /healthz and /readyz (inside the node's namespace).
pub const HEALTH: &str = "127.0.0.1:9765";

/// What a phase's cluster is called and how big it is.
pub struct Layout {
    /// Namespaces are `wgbench-<tag>-*`; options `--<tag>-agent-flags`, `--<tag>-agent-log`
    /// (default warn) and `--<tag>-keep 1` (keep the work directory) apply.
    pub tag: &'static str,
    /// The wg-cni network (also the namespace of its fake nodes' keys).
    pub network: &'static str,
    /// Node `i` is `<node_prefix><i>`.
    pub node_prefix: &'static str,
    pub nodes: usize,
    /// Under the work directory.
    pub dir: &'static str,
    /// The network's `peering`: `"mesh"` (the `multinode` and `agent` phases measure the full
    /// mesh: pod to pod across nodes, the agent's writes per event) or `"on-demand"` (the
    /// `direct` phase).
    pub peering: &'static str,
}

pub struct Node {
    pub name: String,
    pub netns: String,
    pub addr: String,
    pub index: usize,
    pub dir: PathBuf,
    pub network: String,
    pub agent: Option<Background>,
    pub agent_pid: Option<i32>,
    pub agent_log: Option<PathBuf>,
    pub peering: String,
    /// More fields of the plugin's config (`idlePeerTimeout`, `maxDirectPeers`...).
    pub extra: serde_json::Map<String, Value>,
}

impl Node {
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// This node's own directory in the network's store.
    pub fn own_dir(&self) -> PathBuf {
        self.store().join(&self.network).join(&self.name)
    }
    pub fn subnet(&self) -> String {
        format!("10.252.{}.0/24", self.index)
    }
    fn plugin(&self) -> Value {
        let mut plugin = json!({
            "type": "wg-cni",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet()}]],
                "dataDir": self.dir.join("ipam").display().to_string(),
            },
            "backend": "userspace",
            "store": self.store().display().to_string(),
            "nodeName": self.name,
            "endpoint": self.addr,
            "mtu": 1420,
            "listenPorts": "55000-55999",
            "clusterRange": CLUSTER_RANGE,
            "peering": self.peering,
        });
        for (field, value) in &self.extra {
            plugin[field] = value.clone();
        }
        plugin
    }

    /// The node's conflist, written as an installer would (temp file, rename: the agent
    /// never reads half of it).
    fn write_conflist(&self) -> Res<()> {
        let conflist = json!({"cniVersion": "1.0.0", "name": self.network,
            "plugins": [self.plugin()]});
        let path = self.conf_dir().join("10-wg.conflist");
        let tmp = self.conf_dir().join(".10-wg.conflist.tmp");
        std::fs::write(&tmp, conflist.to_string())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }
    /// Records of node `of` in this node's mirror.
    pub fn mirror_count(&self, of: &str) -> usize {
        count_records(&self.store().join(&self.network).join(of))
    }
}

fn count_records(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.ends_with(".json") && n.contains(':')
                })
                .count()
        })
        .unwrap_or(0)
}

pub struct Cluster<'a> {
    pub ctx: &'a Ctx,
    pub layout: Layout,
    pub dir: PathBuf,
    etcd: Option<Background>,
    pub nodes: Vec<Node>,
    pub agent_flags: Vec<String>,
    /// Pod namespaces made (deleted with the cluster).
    pods: Vec<String>,
    /// Namespaces attached to the underlay (etcd's, the nodes', any other).
    attached: Vec<String>,
}

/// Run `f` on a thread that has entered `netns` (setns affects only the calling thread).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Res<T> {
    let file = ns::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&file, netns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| "thread panicked".to_string())?
    })
}

/// Move the calling thread into the namespace `file` is open on.
pub fn enter(file: &File, netns: &str) -> Res<()> {
    // SAFETY: plain syscall on an open nsfs fd, this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "setns {netns}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// One HTTP/1.0 request (Connection: close), bounded by `limit`; (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    limit: Duration,
) -> Res<(u16, String)> {
    use std::net::{SocketAddr, TcpStream};
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sa, limit).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(limit)).ok();
    s.set_write_timeout(Some(limit)).ok();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 back to bytes (None: not base64).
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

pub fn random(n: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(buf)
}

pub fn wait_until(
    limit: Duration,
    step: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(step);
    }
}

/// (VmRSS kB, utime+stime ticks) of a pid.
pub fn proc_usage(pid: i32) -> Option<(u64, u64)> {
    let rss = proc_status_kb(pid, "VmRSS:")?;
    Some((rss, cpu_ticks(pid)?))
}

/// utime+stime of a process (all its threads, also those that ended), in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm) ": state is field 3 → index 0; utime 14 → 11, stime 15 → 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A `kB` field of /proc/<pid>/status (VmRSS:, VmHWM:, Threads: as a count).
pub fn proc_status_kb(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn clk_tck() -> f64 {
    // SAFETY: plain libc query.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A put in an etcd JSON-gateway transaction.
pub fn put_op(key: &str, value: &Value, lease: Option<&str>) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value.to_string().as_bytes())});
    if let Some(l) = lease {
        p["lease"] = json!(l);
    }
    json!({"requestPut": p})
}

/// A delete in an etcd JSON-gateway transaction.
pub fn delete_op(key: &str) -> Value {
    json!({"requestDeleteRange": {"key": b64(key.as_bytes())}})
}

impl<'a> Cluster<'a> {
    pub fn new(ctx: &'a Ctx, layout: Layout) -> Res<Cluster<'a>> {
        let dir = ctx.work.join(layout.dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let flags = ctx.opts.str(&format!("{}-agent-flags", layout.tag), "");
        let mut c = Cluster {
            ctx,
            dir,
            etcd: None,
            nodes: Vec::new(),
            agent_flags: flags.split_whitespace().map(str::to_string).collect(),
            pods: Vec::new(),
            attached: Vec::new(),
            layout,
        };
        ns::add(ctx, &c.underlay())?;
        c.ip(&["-n", &c.underlay(), "link", "add", "br0", "type", "bridge"])?;
        c.ip(&["-n", &c.underlay(), "link", "set", "br0", "up"])?;
        c.attach(&c.etcd_ns(), "e0", ETCD_ADDR)?;
        for index in 1..=c.layout.nodes {
            let node = Node {
                name: format!("{}{index}", c.layout.node_prefix),
                netns: format!("wgbench-{}-n{index}", c.layout.tag),
                addr: format!("10.253.0.{}", 10 + index),
                index,
                dir: c.dir.join(format!("node{index}")),
                network: c.layout.network.to_string(),
                agent: None,
                agent_pid: None,
                agent_log: None,
                peering: c.layout.peering.to_string(),
                extra: serde_json::Map::new(),
            };
            c.attach(&node.netns, &format!("n{index}"), &node.addr)?;
            std::fs::create_dir_all(node.conf_dir()).map_err(|e| e.to_string())?;
            node.write_conflist()?;
            c.nodes.push(node);
        }
        c.start_etcd()?;
        Ok(c)
    }

    /// Set (or, with `null`, remove) fields of every node's plugin config and rewrite the
    /// conflists: the agents follow their conf dir, the plugin calls of `cni` use them too.
    pub fn set_plugin_fields(&mut self, fields: &Value) -> Res<()> {
        for node in &mut self.nodes {
            for (field, value) in fields.as_object().into_iter().flatten() {
                match value {
                    Value::Null => node.extra.remove(field),
                    v => node.extra.insert(field.clone(), v.clone()),
                };
            }
            node.write_conflist()?;
        }
        Ok(())
    }

    pub fn underlay(&self) -> String {
        format!("wgbench-{}-u", self.layout.tag)
    }

    pub fn etcd_ns(&self) -> String {
        format!("wgbench-{}-e", self.layout.tag)
    }

    pub fn ip(&self, args: &[&str]) -> Res<String> {
        exec::sh(&self.ctx.ip, args, None)
    }

    /// A namespace on the underlay bridge with `addr`/24 on its `eth0` (port `port` on the
    /// bridge side); deleted with the cluster.
    pub fn attach(&mut self, netns: &str, port: &str, addr: &str) -> Res<()> {
        ns::add(self.ctx, netns)?;
        self.attached.push(netns.to_string());
        let underlay = self.underlay();
        self.ip(&[
            "-n", &underlay, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ])?;
        self.ip(&["-n", &underlay, "link", "set", port, "master", "br0", "up"])?;
        self.ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        self.ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        self.ip(&["-n", netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A POST to etcd's JSON gateway, from a thread inside etcd's namespace.
    pub fn etcd_http(&self, path: &str, body: &Value) -> Res<Value> {
        let body = body.to_string();
        let (status, text) = in_netns(&self.etcd_ns(), || etcd_post(path, &body))??;
        etcd_answer(path, status, &text)
    }

    /// One transaction of puts and deletes (etcd takes at most `--max-txn-ops` 1000).
    pub fn txn(&self, ops: Vec<Value>) -> Res<Value> {
        self.etcd_http("/v3/kv/txn", &json!({ "success": ops }))
    }

    /// A lease of `ttl` seconds; its id as the gateway spells it.
    pub fn grant_lease(&self, ttl: u64) -> Res<String> {
        let lease = self.etcd_http("/v3/lease/grant", &json!({ "TTL": ttl }))?;
        lease["ID"]
            .as_str()
            .map(str::to_string)
            .or_else(|| lease["ID"].as_i64().map(|v| v.to_string()))
            .ok_or_else(|| "no lease ID".to_string())
    }

    fn start_etcd(&mut self) -> Res<()> {
        let bin = PathBuf::from("/usr/bin/etcd");
        let url = format!("http://{ETCD_ADDR}:{ETCD_PORT}");
        let peer = "http://127.0.0.1:23800".to_string();
        let args: Vec<String> = [
            "--name",
            "b",
            "--data-dir",
            &self.dir.join("etcd").display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("b={peer}"),
            "--max-txn-ops",
            "1000",
            "--max-request-bytes",
            "8388608",
            "--quota-backend-bytes",
            "1073741824",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = vec![(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        let fd = ns::open(&self.etcd_ns())?;
        let log = self.dir.join("logs/etcd.log");
        let mut spec = Spec::new(&bin, &args, &log);
        spec.env = &env;
        spec.netns = Some(fd.as_raw_fd());
        self.etcd = Some(exec::spawn(&spec, self.ctx)?);
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            self.etcd_http("/v3/kv/range", &json!({"key": b64(b"/")}))
                .is_ok()
        });
        ok.map(|_| ())
            .ok_or_else(|| "etcd did not answer in 20 s".to_string())
    }

    pub fn start_agent(&mut self, i: usize) -> Res<()> {
        let node = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--etcd-endpoints".into(),
            format!("http://{ETCD_ADDR}:{ETCD_PORT}"),
            "--node".into(),
            node.name.clone(),
            "--store".into(),
            node.store().display().to_string(),
            "--cni-conf-dir".into(),
            node.conf_dir().display().to_string(),
            "--health-listen".into(),
            HEALTH.into(),
        ];
        args.extend(self.agent_flags.iter().cloned());
        let level = self
            .ctx
            .opts
            .str(&format!("{}-agent-log", self.layout.tag), "warn");
        let env = vec![
            (
                "PATH".to_string(),
                "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("WG_CNI_LOG".to_string(), level),
        ];
        let fd = ns::open(&node.netns)?;
        let log = self
            .dir
            .join(format!("logs/agent{}-{}.log", i + 1, now_ms()));
        let mut spec = Spec::new(&self.ctx.wg, &args, &log);
        spec.env = &env;
        spec.netns = Some(fd.as_raw_fd());
        let bg = exec::spawn(&spec, self.ctx)?;
        let node = &mut self.nodes[i];
        node.agent_pid = Some(bg.pid());
        node.agent = Some(bg);
        node.agent_log = Some(log);
        Ok(())
    }

    pub fn stop_agent(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(bg) = node.agent.take() {
            // SIGTERM first (a clean stop), SIGKILL after 5 s.
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(bg.pid(), libc::SIGTERM) };
            bg.finish(Duration::from_secs(5));
        }
        node.agent_pid = None;
    }

    /// A GET of the agent's health server on node `i` (status, body).
    pub fn agent_http(&self, i: usize, path: &str) -> Res<(u16, String)> {
        in_netns(&self.nodes[i].netns, || {
            http(HEALTH, "GET", path, "", Duration::from_secs(2))
        })?
    }

    /// Until the agent's /readyz answers 200 (first full sync, lease, subnet).
    pub fn wait_ready(&self, i: usize, limit: Duration) -> Option<Duration> {
        wait_until(limit, Duration::from_millis(20), || {
            self.agent_http(i, "/readyz")
                .is_ok_and(|(status, _)| status == 200)
        })
    }

    pub fn plugin(&self, i: usize) -> Plugin {
        let mut conf = self.nodes[i].plugin();
        conf["name"] = json!(self.layout.network);
        conf["cniVersion"] = json!("1.0.0");
        Plugin {
            kind: "wg-cni",
            bin: self.ctx.wg.clone(),
            conf,
        }
    }

    /// A CNI command of node `i`'s plugin, exec'd inside the node's namespace.
    pub fn cni(
        &self,
        i: usize,
        command: &str,
        cid: &str,
        netns: &str,
        prev: Option<&Value>,
    ) -> Res<exec::Exec> {
        let plugin = self.plugin(i);
        let env = plugin.env(self.ctx, command, cid, &ns::path(netns));
        let stdin = plugin.stdin(prev);
        let args: Vec<String> = Vec::new();
        let stderr = self.dir.join("logs/plugin.err");
        let fd = ns::open(&self.nodes[i].netns)?;
        let mut spec = Spec::new(&self.ctx.wg, &args, &stderr);
        spec.env = &env;
        spec.stdin = &stdin;
        spec.netns = Some(fd.as_raw_fd());
        exec::run(&spec)
    }

    /// A pod namespace, deleted with the cluster.
    pub fn pod_ns(&mut self, name: &str) -> Res<()> {
        ns::add(self.ctx, name)?;
        self.pods.push(name.to_string());
        Ok(())
    }

    /// (daemon pid, link host name) of every record in our nodes' own directories.
    pub fn recorded_daemons(&self) -> Vec<(u64, String)> {
        let mut daemons = Vec::new();
        for node in &self.nodes {
            let Ok(files) = std::fs::read_dir(node.own_dir()) else {
                continue;
            };
            for file in files.flatten() {
                let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                let record: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if let Some(pid) = record["daemonPid"].as_u64() {
                    let host = record["hostName"].as_str().unwrap_or("-").to_string();
                    daemons.push((pid, host));
                }
            }
        }
        daemons
    }

    /// Stop every userspace daemon a record of our stores names (by recorded pid, only if
    /// that pid still runs wireguard-go or wg-cni-wgd for that link).
    pub fn stop_daemons(&self) {
        for (pid, host) in self.recorded_daemons() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if (cmdline.contains("wireguard-go") || cmdline.contains("wg-cni-wgd"))
                && cmdline.contains(&host)
            {
                // SAFETY: a pid checked just above to be that link's daemon.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }

    /// Hand every daemon pid our records name to the wrapper (its cleanup kills userspace
    /// daemons by pid if this process dies without running Drop).
    pub fn note_daemons(&self) {
        for (pid, _) in self.recorded_daemons() {
            self.ctx.note_pid(pid as u32);
        }
    }

    pub fn gateway_daemon(&self, i: usize) -> Option<i32> {
        let path = self.nodes[i].own_dir().join("gateway.json");
        let record: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        record["daemonPid"].as_u64().map(|p| p as i32)
    }
}

/// A POST to etcd's JSON gateway from the calling thread (which must be in a namespace on the
/// underlay): (status, body).
pub fn etcd_post(path: &str, body: &str) -> Res<(u16, String)> {
    let addr = format!("{ETCD_ADDR}:{ETCD_PORT}");
    http(&addr, "POST", path, body, Duration::from_secs(20))
}

pub fn etcd_answer(path: &str, status: u16, text: &str) -> Res<Value> {
    if status != 200 {
        return Err(format!(
            "etcd {path}: HTTP {status}: {}",
            text.trim().chars().take(300).collect::<String>()
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        format!(
            "etcd {path}: {e}: {}",
            text.chars().take(300).collect::<String>()
        )
    })
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_agent(i);
        }
        if let Some(etcd) = self.etcd.take() {
            etcd.finish(Duration::ZERO);
        }
        self.stop_daemons();
        for p in std::mem::take(&mut self.pods) {
            ns::del(self.ctx, &p);
        }
        for netns in std::mem::take(&mut self.attached) {
            ns::del(self.ctx, &netns);
        }
        ns::del(self.ctx, &self.underlay());
        if self.ctx.opts.num(&format!("{}-keep", self.layout.tag), 0) == 0 {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A node that exists only in etcd: a subnet claim, a node key on a lease, a heartbeat, a
/// claim on its address, optionally a gateway record, and pod records, each shaped as a live
/// agent publishes them (so that every agent's membership checks accept them).
pub struct FakeNode {
    pub network: String,
    pub name: String,
    /// The claimed subnet (inside the cluster range); record addresses are taken from it.
    pub subnet: String,
    /// The node's address (its node key's endpoint; every record's endpoint).
    pub endpoint: String,
    pub boot: String,
    /// Its node key's `peering` (`mesh` unless set).
    pub peering: &'static str,
}

impl FakeNode {
    pub fn new(network: &str, name: &str, subnet: &str, endpoint: &str) -> Res<FakeNode> {
        Ok(FakeNode {
            network: network.to_string(),
            name: name.to_string(),
            subnet: subnet.to_string(),
            endpoint: endpoint.to_string(),
            boot: b64(&random(12)?),
            peering: "mesh",
        })
    }

    pub fn key(&self, rest: &str) -> String {
        format!("/wg-cni/v1/{}/{rest}", self.network)
    }

    pub fn info_key(&self) -> String {
        self.key(&format!("nodes/{}/info", self.name))
    }

    pub fn link_key(&self, cid: &str) -> String {
        self.key(&format!("links/{}/{cid}:eth0", self.name))
    }

    /// The node key, on `lease`.
    pub fn info_op(&self, lease: &str) -> Value {
        put_op(
            &self.info_key(),
            &json!({"endpoints": [self.endpoint], "bootId": self.boot,
                "subnets": [self.subnet], "mtu": 1420, "agentVersion": "wgbench-fake",
                "peering": self.peering}),
            Some(lease),
        )
    }

    pub fn heartbeat_op(&self) -> Value {
        put_op(
            &self.key(&format!("nodes/{}/heartbeat", self.name)),
            &json!({ "unix": now_unix() }),
            None,
        )
    }

    /// Claim, node key, heartbeat, address claim (and a gateway record, `gateway_key` its
    /// public key in base64) in one transaction.
    pub fn announce(&self, c: &Cluster, lease: &str, gateway_key: Option<&str>) -> Res<()> {
        let mut ops = vec![
            put_op(
                &self.key(&format!("subnets/{}/claim", self.name)),
                &json!({"subnets": [self.subnet], "agent": "wgbench-fake"}),
                None,
            ),
            self.info_op(lease),
            self.heartbeat_op(),
            put_op(
                &self.key(&format!("nodes/{}/endpoints/{}", self.name, self.endpoint)),
                &json!({}),
                None,
            ),
        ];
        if let Some(key) = gateway_key {
            let address = format!("{}/32", self.address(1)?);
            let gateway = json!({"schema": 1, "network": self.network, "node": self.name,
                "publicKey": key, "addresses": [address], "subnets": [self.subnet],
                "endpoint": self.endpoint, "listenPort": 51820, "hostName": "wgg0",
                "backend": "userspace", "bootId": self.boot, "mtu": 1420,
                "masquerade": false, "createdAt": now_unix()});
            ops.push(put_op(
                &self.key(&format!("links/{}/gateway", self.name)),
                &gateway,
                None,
            ));
        }
        c.txn(ops).map(|_| ())
    }

    /// The subnet's `n`-th address (IPv4).
    pub fn address(&self, n: usize) -> Res<String> {
        let (base, prefix) = self
            .subnet
            .split_once('/')
            .ok_or_else(|| format!("subnet {} without a prefix", self.subnet))?;
        let base: std::net::Ipv4Addr = base.parse().map_err(|e| format!("{base}: {e}"))?;
        let prefix: u32 = prefix.parse().map_err(|e| format!("{prefix}: {e}"))?;
        let size = 1usize << (32 - prefix);
        if n >= size {
            return Err(format!("{} has no address number {n}", self.subnet));
        }
        Ok(std::net::Ipv4Addr::from(u32::from(base) + n as u32).to_string())
    }

    /// A `ready` pod record with address `addr` (a /32), reached at `port`.
    pub fn record(&self, cid: &str, addr: &str, public_key: &str, port: u16) -> Value {
        json!({
            "schema": 1, "state": "ready", "network": self.network, "node": self.name,
            "containerId": cid, "ifname": "eth0", "publicKey": public_key,
            "addresses": [format!("{addr}/32")], "endpoint": self.endpoint, "listenPort": port,
            "netns": "", "netnsInode": 0, "bootId": self.boot,
            "hostName": "wgfake", "backend": "userspace", "mtu": 1420,
            "createdAt": now_unix(),
        })
    }

    /// Put records `cid(j)` for j in `range`, addresses `address(first + j)`, random keys, 500
    /// per transaction. (A gateway record holds address 1.)
    pub fn put_records(
        &self,
        c: &Cluster,
        range: std::ops::Range<usize>,
        first: usize,
        cid: impl Fn(usize) -> String,
    ) -> Res<()> {
        let indices: Vec<usize> = range.collect();
        for chunk in indices.chunks(500) {
            let mut ops = Vec::with_capacity(chunk.len());
            for &j in chunk {
                let id = cid(j);
                let record = self.record(&id, &self.address(first + j)?, &b64(&random(32)?), 51820);
                ops.push(put_op(&self.link_key(&id), &record, None));
            }
            c.txn(ops)?;
        }
        Ok(())
    }
}
