//! Test harness: real network namespaces, the real wg-cni binary and the real host-local.
//! The same tests run on this host (userspace backend) and inside the QEMU guest (kernel and
//! auto backends): `WG_CNI_TEST_BACKEND` picks the backend, `WG_CNI_BIN` the binary,
//! `CNI_PLUGIN_DIR` the directory holding host-local.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process: `<prefix><pid%10000>x<n>`.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 10000)
}

pub fn binary() -> PathBuf {
    std::env::var_os("WG_CNI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wg-cni")))
}

pub fn plugin_dir() -> PathBuf {
    std::env::var_os("CNI_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

pub fn backend() -> String {
    std::env::var("WG_CNI_TEST_BACKEND").unwrap_or_else(|_| "userspace".into())
}

/// Which backend records should show: `auto` resolves to what the machine has.
pub fn expected_backend() -> &'static str {
    match backend().as_str() {
        "kernel" => "kernel",
        "userspace" => "userspace",
        _ if Path::new("/sys/module/wireguard").exists() => "kernel",
        _ => "userspace",
    }
}

/// A test that applies to `backend` only (`kernel` or `userspace`, as `expected_backend`
/// answers). The runners skip it on the other backend (tests/backend-only.txt lists it); run
/// there anyway, it fails: an early return would count as a pass that tested nothing.
pub fn only_on(backend: &str) {
    assert_eq!(
        expected_backend(),
        backend,
        "this test applies to the {backend} backend only: the runner must skip it \
         (list it in tests/backend-only.txt)"
    );
}

/// The link kind a pod's interface should have.
pub fn expected_kind() -> &'static str {
    match expected_backend() {
        "kernel" => "wireguard",
        _ => "tun",
    }
}

pub fn ip() -> &'static str {
    if Path::new("/usr/sbin/ip").exists() {
        "/usr/sbin/ip"
    } else {
        "/sbin/ip"
    }
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wg ARGS[0] DEVICE ARGS[1..]` on a pod's link: `eth0` inside the pod with the kernel
/// backend, the daemon's UAPI name `host_name` (its record's `hostName`) in the host with the
/// userspace one.
pub fn wg(pod: &Pod, host_name: &str, args: &[&str]) -> String {
    let kernel = expected_backend() == "kernel";
    let device = if kernel { "eth0" } else { host_name };
    let mut full = vec!["wg", args[0], device];
    full.extend_from_slice(&args[1..]);
    let out = if kernel {
        pod.exec(&full)
    } else {
        run(full[0], &full[1..])
    };
    assert!(
        out.status.success(),
        "{full:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wg show DEVICE WHAT`: one `key value` pair per peer.
pub fn wg_show(pod: &Pod, host_name: &str, what: &str) -> Vec<(String, String)> {
    wg(pod, host_name, &["show", what])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

pub fn wg_value(pod: &Pod, host_name: &str, what: &str, peer: &str) -> Option<String> {
    wg_show(pod, host_name, what)
        .into_iter()
        .find(|(k, _)| k == peer)
        .map(|(_, v)| v)
}

/// A network namespace standing in for a pod; deleted on drop.
pub struct Pod {
    pub name: String,
    pub path: PathBuf,
    pub id: String,
}

impl Pod {
    pub fn new() -> Pod {
        let name = unique("wgt");
        run_ok(ip(), &["netns", "add", &name]);
        Pod {
            path: PathBuf::from(format!("/var/run/netns/{name}")),
            id: format!("ctr-{name}"),
            name,
        }
    }

    pub fn netns(&self) -> &str {
        self.path.to_str().unwrap()
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(ip(), &full)
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec![ip()];
        full.extend_from_slice(args);
        let out = self.exec(&full);
        assert!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Link names in the pod.
    pub fn links(&self) -> BTreeSet<String> {
        link_names(&self.ip(&["-o", "link", "show"]))
    }

    /// `ip -d link` line of one interface.
    pub fn link_details(&self, ifname: &str) -> String {
        self.ip(&["-d", "-o", "link", "show", "dev", ifname])
    }

    pub fn ping(&self, address: &str) -> bool {
        self.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", address])
            .status
            .success()
    }

    /// UDP ports bound inside the pod namespace.
    pub fn udp_ports(&self) -> BTreeSet<u16> {
        let out = self.exec(&["cat", "/proc/net/udp", "/proc/net/udp6"]);
        udp_ports_of(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = run(ip(), &["netns", "del", &self.name]);
    }
}

pub fn link_names(ip_o_link: &str) -> BTreeSet<String> {
    ip_o_link
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .collect()
}

pub fn udp_ports_of(proc_net_udp: &str) -> BTreeSet<u16> {
    proc_net_udp
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|local| local.rsplit(':').next())
        .filter_map(|hex| u16::from_str_radix(hex, 16).ok())
        .collect()
}

/// UDP ports bound in the host namespace (this process's).
pub fn host_udp_ports() -> BTreeSet<u16> {
    let mut text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text += &std::fs::read_to_string("/proc/net/udp6").unwrap_or_default();
    udp_ports_of(&text)
}

pub fn host_links() -> BTreeSet<String> {
    link_names(&run_ok(ip(), &["-o", "link", "show"]))
}

/// Whether argv[0] is a userspace WireGuard daemon the plugin runs (wg-cni-wgd, wireguard-go).
pub fn is_daemon_binary(argv0: &[u8]) -> bool {
    argv0.ends_with(b"wg-cni-wgd") || argv0.ends_with(b"wireguard-go")
}

/// Count of userspace daemons serving `name`.
pub fn daemons_named(name: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| is_daemon_binary(a)) && args.contains(&name.as_bytes())
        })
        .count()
}

/// Count of all userspace daemons.
pub fn all_daemons() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.split(|b| *b == 0).next().is_some_and(is_daemon_binary))
        .count()
}

/// What a CNI invocation printed and how it ended.
#[derive(Debug)]
pub struct CniOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: {} / {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The CNI error code of a failed call.
    pub fn error_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("error has a code")
    }

    pub fn error_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// Run the plugin with `env` and `stdin`.
pub fn cni_raw(env: &[(&str, &str)], stdin: &[u8]) -> CniOutput {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn wg-cni");
    {
        let mut stdin_pipe = child.stdin.take().unwrap();
        let _ = stdin_pipe.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait wg-cni");
    CniOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A wg-cni network of its own: unique name, store and IPAM data directory; every attachment
/// still in its store is deleted on drop, so a failing test leaves nothing behind.
pub struct Net {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub ranges: Value,
    pub extra: Value,
    pub version: String,
}

impl Net {
    pub fn new(subnet: &str) -> Net {
        Net::with_ranges(json!([[{"subnet": subnet}]]))
    }

    pub fn with_ranges(ranges: Value) -> Net {
        Net {
            name: unique("wgnet"),
            dir: tempfile::tempdir().unwrap(),
            ranges,
            extra: json!({}),
            version: "1.0.0".into(),
        }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    pub fn conf(&self) -> Value {
        let mut conf = json!({
            "cniVersion": self.version,
            "name": self.name,
            "type": "wg-cni",
            "ipam": {
                "type": "host-local",
                "ranges": self.ranges,
                "dataDir": self.ipam_dir(),
            },
            "backend": backend(),
            "store": self.store(),
            "endpoint": "127.0.0.1",
            "mtu": 1420,
            "listenPorts": "53000-53999",
        });
        for (k, v) in self.extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf
    }

    pub fn call(&self, command: &str, id: &str, netns: &str, conf: &Value) -> CniOutput {
        self.call_as(command, id, "eth0", netns, conf)
    }

    /// `call` with extra environment variables (e.g. WG_CNI_FAILPOINT).
    pub fn call_env(
        &self,
        command: &str,
        pod: &Pod,
        extra: &[(&str, &str)],
        conf: &Value,
    ) -> CniOutput {
        let path = plugin_dir();
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.id.as_str()),
            ("CNI_NETNS", pod.netns()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", path.to_str().unwrap()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=test"),
        ];
        env.extend_from_slice(extra);
        cni_raw(&env, conf.to_string().as_bytes())
    }

    /// `call` with an interface name other than eth0.
    pub fn call_as(
        &self,
        command: &str,
        id: &str,
        ifname: &str,
        netns: &str,
        conf: &Value,
    ) -> CniOutput {
        let path = plugin_dir();
        cni_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", path.to_str().unwrap()),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=test"),
            ],
            conf.to_string().as_bytes(),
        )
    }

    pub fn add(&self, pod: &Pod) -> CniOutput {
        self.call("ADD", &pod.id, pod.netns(), &self.conf())
    }

    pub fn with_prev(&self, prev: &Value) -> Value {
        let mut conf = self.conf();
        conf["prevResult"] = prev.clone();
        conf
    }

    pub fn del(&self, pod: &Pod, prev: Option<&Value>) -> CniOutput {
        let conf = prev
            .map(|p| self.with_prev(p))
            .unwrap_or_else(|| self.conf());
        self.call("DEL", &pod.id, pod.netns(), &conf)
    }

    pub fn check(&self, pod: &Pod, prev: &Value) -> CniOutput {
        self.call("CHECK", &pod.id, pod.netns(), &self.with_prev(prev))
    }

    /// Records of this node (one JSON file each).
    pub fn records(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let Ok(nodes) = std::fs::read_dir(self.store().join(&self.name)) else {
            return out;
        };
        for node in nodes.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
            for file in std::fs::read_dir(node.path())
                .unwrap()
                .filter_map(|e| e.ok())
            {
                let name = file.file_name().to_string_lossy().into_owned();
                // Pod records only: the gateway's record is read by `gateway_record`.
                if name.ends_with(".json") && !name.starts_with('.') && name != "gateway.json" {
                    let text = std::fs::read_to_string(file.path()).unwrap();
                    out.push(serde_json::from_str(&text).unwrap());
                }
            }
        }
        out
    }

    /// This node's gateway record for the network, if any.
    pub fn gateway_record(&self) -> Option<Value> {
        let nodes = std::fs::read_dir(self.store().join(&self.name)).ok()?;
        nodes
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("gateway.json"))
            .find(|p| p.exists())
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    }

    pub fn record_of(&self, pod: &Pod) -> Option<Value> {
        self.records()
            .into_iter()
            .find(|r| r["containerId"] == pod.id.as_str())
    }

    /// Addresses host-local has reserved in this network.
    pub fn reservations(&self) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(self.ipam_dir().join(&self.name)) else {
            return BTreeSet::new();
        };
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    pub fn show_json(&self) -> Value {
        let out = run_ok(
            binary().to_str().unwrap(),
            &[
                "show",
                "--json",
                "--store",
                self.store().to_str().unwrap(),
                "--network",
                &self.name,
            ],
        );
        serde_json::from_str(&out).unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for record in self.records() {
            let id = record["containerId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let netns = record["netns"].as_str().unwrap_or_default().to_string();
            let _ = self.call("DEL", &id, &netns, &self.conf());
        }
    }
}

/// Run another CNI plugin (host-local, ptp) from the plugin directory and parse its result.
pub fn other_plugin(name: &str, env: &[(&str, &str)], conf: &Value) -> Value {
    let mut child = Command::new(plugin_dir().join(name))
        .envs(env.iter().copied())
        .env("CNI_PATH", plugin_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The first address of a result in the given family.
pub fn address_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| a.contains(':') == v6)
        .map(|a| a.split('/').next().unwrap().to_string())
        .expect("address of that family")
}

/// What the host looks like, for "left exactly as it was" assertions.
#[derive(Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    pub links: BTreeSet<String>,
    pub namespaces: BTreeSet<String>,
    pub daemons: usize,
    pub udp_ports: BTreeSet<u16>,
}

impl HostSnapshot {
    /// Store records and IPAM reservations are per network: see `Net::records` and
    /// `Net::reservations`.
    pub fn take() -> HostSnapshot {
        HostSnapshot {
            links: host_links(),
            namespaces: namespaces(),
            daemons: all_daemons(),
            udp_ports: host_udp_ports(),
        }
    }
}

/// Named network namespaces (`ip netns list`).
pub fn namespaces() -> BTreeSet<String> {
    run_ok(ip(), &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Ping from the host namespace.
pub fn host_ping(address: &str) -> bool {
    run("ping", &["-c", "3", "-i", "0.2", "-W", "2", address])
        .status
        .success()
}

/// The host's nat table, as `iptables -S` prints it.
pub fn nat_rules() -> String {
    run_ok("iptables", &["-t", "nat", "-S"])
}

/// Run `f` on a thread inside the namespace at `netns` (`None`: the host's).
pub fn in_netns<T: Send + 'static>(
    netns: Option<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
}

/// A TCP server in `netns` that answers one connection and reports the source it saw.
/// It gives up after 15 s, so a failing test never hangs.
pub fn serve_once(netns: &Path) -> (u16, std::thread::JoinHandle<Option<std::net::SocketAddr>>) {
    use std::io::Write;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = in_netns(Some(netns.to_path_buf()), move || {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        tx.send(listener.local_addr().unwrap().port()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.write_all(b"hello from wg-cni\n");
                    return Some(peer);
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        None
    });
    (rx.recv().unwrap(), handle)
}

/// Connect from `netns` (or the host) and read the greeting.
pub fn fetch(netns: Option<&Path>, to: std::net::SocketAddr) -> Result<String, String> {
    use std::io::Read;
    let timeout = std::time::Duration::from_secs(4);
    in_netns(netns.map(Path::to_path_buf), move || {
        let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)
            .map_err(|e| format!("connect {to}: {e}"))?;
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| format!("read from {to}: {e}"))?;
        Ok(text)
    })
    .join()
    .unwrap()
}

/// A key in the forms a leak would take: base64, hex and raw bytes (the leak search).
pub fn forms_of(base64_key: &str) -> Vec<Vec<u8>> {
    let key = wireguard_control::Key::from_base64(base64_key).unwrap();
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        base64_key.as_bytes().to_vec(),
        hex.into_bytes(),
        key.0.to_vec(),
    ]
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
