//! Floods and malicious pods, measured (issue 19 item 6).
//!
//! Handshake-initiation floods with a valid mac1 (anyone can compute it: the victim's public
//! key is public) against a pod's link: from (a) a namespace on the underlay standing in for an
//! outside attacker, from one address and then from 230, and (b) the address of another node,
//! which is what a pod there with CAP_NET_ADMIN over a kernel link makes its node send: the
//! UDP leaves from the node's address, the one every pod of that node shares, and the kernel
//! answers cookie replies as WireGuard requires, so (b) runs once without and once with the
//! cookies echoed. During each flood a legitimate peer whose session was cleared (on another
//! node; in (b) the node the flood comes from) must handshake again within 10 s, under every
//! flood; the victim daemon's CPU and RSS are reported. Then a pod's SYN flood against a second
//! pod on the same node while two other pods exchange pings and TCP, and a pod in a user
//! namespace (`hostUsers: false`) that tries to change its link. Every flood is bounded in rate and time and stops by itself;
//! everything is removed on drop, also when a test fails. Figures are printed (`--nocapture`)
//! and quoted in the README's threat model.

// Shared with the multinode suite, which uses all of them.
#[allow(dead_code)]
mod cluster;
mod common;
#[allow(dead_code)]
mod etcd_filler;
mod flooder;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cluster::{Cluster, ping_once, wait_for};
use common::*;
use flooder::{FloodStats, HandshakeFlood, SynFlood, handshake_flood, syn_flood};
use serde_json::Value;

/// Initiations per second: a ceiling the generator never exceeds (natively; the guest, where
/// TCG emulates every instruction, gets a tenth: figures only, see `kernel`).
const HANDSHAKE_RATE: u32 = 20_000;
/// The flood runs this long before the legitimate peer's session is cleared.
const WARM_UP: Duration = Duration::from_secs(2);
/// The pass criterion: a cleared session handshakes again within this, under flood.
const HANDSHAKE_BOUND: Duration = Duration::from_secs(10);
/// How long a re-handshake is watched: past the bound, so that a miss is measured (and
/// printed) rather than cut off at the bound.
const HANDSHAKE_WATCH: Duration = Duration::from_secs(15);
/// Long enough that the flood still runs when the watch ends (warm-up, clearing the session,
/// watch).
const FLOOD_TIME: Duration = Duration::from_secs(18);
/// The least a run must reach to count as a flood (for handshakes, 50 times the daemon's
/// per-address limit).
const MIN_RATE: f64 = 5_000.0;
/// Last octets of the spraying attacker's addresses on the underlay (10.250.0.0/24; nodes
/// are .11-.13, etcd .2): 230 of them, under 100 initiations per second each even at the
/// ceiling.
const SPRAY: std::ops::Range<u8> = 20..250;
const SYN_RATE: u32 = 20_000;
const SYN_TIME: Duration = Duration::from_secs(12);
/// Linux's USER_HZ: the unit of utime/stime in /proc/<pid>/stat.
const TICKS_PER_SECOND: f64 = 100.0;

/// Kernel links (the QEMU guest): no daemon to measure and a machine emulated instruction by
/// instruction, so the flood is scaled down, CPU is the whole guest's and the test reports
/// what happens instead of holding the native bounds.
fn kernel() -> bool {
    expected_backend() == "kernel"
}

fn handshake_rate() -> u32 {
    if kernel() {
        HANDSHAKE_RATE / 10
    } else {
        HANDSHAKE_RATE
    }
}

/// A namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(ip(), &["netns", "del", &self.0]);
    }
}

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

fn record(cluster: &Cluster, pod: &PodOn) -> Value {
    let node = &cluster.nodes[pod.node];
    let file = node
        .store
        .join(&cluster.network)
        .join(&node.name)
        .join(format!("{}:eth0.json", pod.pod.id));
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

fn raw_key(base64: &str) -> [u8; 32] {
    wireguard_control::Key::from_base64(base64).unwrap().0
}

/// CPU ticks (user + system) and resident memory of a process.
struct Usage {
    ticks: u64,
    at: Instant,
}

/// The whole machine's busy ticks (all CPUs), from /proc/stat.
fn system_usage() -> Usage {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    let ticks = fields.iter().take(8).sum::<u64>() - fields[3] - fields[4];
    Usage {
        ticks,
        at: Instant::now(),
    }
}

/// A daemon's usage, or the whole machine's when there is no daemon (kernel links).
fn usage_of(pid: Option<u32>) -> Usage {
    pid.map_or_else(system_usage, usage)
}

fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon alive");
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    Usage {
        ticks,
        at: Instant::now(),
    }
}

fn cpu_percent(from: &Usage, to: &Usage) -> f64 {
    (to.ticks - from.ticks) as f64 / TICKS_PER_SECOND / (to.at - from.at).as_secs_f64() * 100.0
}

/// `RcvbufErrors` of UDP in a namespace's /proc/net/snmp.
fn udp_receive_buffer_errors(netns: &str) -> u64 {
    let out = run_ok(ip(), &["netns", "exec", netns, "cat", "/proc/net/snmp"]);
    let udp: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let column = udp[0].iter().position(|h| *h == "RcvbufErrors").unwrap();
    udp[1][column].parse().unwrap()
}

/// `VmRSS` or `VmHWM` (peak) of a process, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `wg ARGS` on a pod's link: over the daemon's socket (userspace, by the link's host name),
/// or inside the pod on `eth0` (kernel).
/// Clear the session `from` holds with `to` (the peer is removed and added again with the
/// same endpoint and allowed IPs), start pinging `to`, and time the new handshake: `None`
/// when none completed within `HANDSHAKE_WATCH`.
fn rehandshake(cluster: &Cluster, from: &PodOn, to: &PodOn) -> Option<Duration> {
    let host_name = record(cluster, from)["hostName"]
        .as_str()
        .unwrap()
        .to_string();
    let key = record(cluster, to)["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let pod = &from.pod;
    let endpoint = wg_value(pod, &host_name, "endpoints", &key).expect("peer has an endpoint");
    let allowed = wg_value(pod, &host_name, "allowed-ips", &key).expect("peer has allowed IPs");
    let allowed = allowed.split_whitespace().collect::<Vec<_>>().join(",");
    // The node's agent may notice the peer missing between the two requests, put it back and
    // start a handshake itself (it does that for peers it adds): then clear it again. (One
    // request removing and adding the peer is refused by wg-cni-wgd's UAPI, EINVAL.)
    let cleared = (0..5).any(|_| {
        wg(pod, &host_name, &["set", "peer", &key, "remove"]);
        wg(
            pod,
            &host_name,
            &[
                "set",
                "peer",
                &key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        );
        wg_value(pod, &host_name, "latest-handshakes", &key).as_deref() == Some("0")
    });
    assert!(cleared, "the session could not be cleared");
    let start = Instant::now();
    let deadline = HANDSHAKE_WATCH.as_secs().to_string();
    let mut ping = Command::new(ip())
        .args(["netns", "exec", &from.pod.name, "ping", "-q", "-i", "0.2"])
        .args(["-W", "1", "-w", &deadline, &to.ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut took = None;
    while start.elapsed() < HANDSHAKE_WATCH {
        if wg_value(pod, &host_name, "latest-handshakes", &key).is_some_and(|v| v != "0") {
            took = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = ping.kill();
    let _ = ping.wait();
    took
}

/// What one flood did.
struct Figures {
    stats: FloodStats,
    handshake: Option<Duration>,
    /// Of one core: the victim's daemon, or the whole machine with kernel links.
    cpu: f64,
    /// KiB of the victim's daemon: before, during, after the flood (and a ping between the
    /// pair), peak; none with kernel links.
    rss: Option<[u64; 4]>,
    /// Datagrams the victim node's kernel dropped because a UDP socket's buffer was full.
    dropped: u64,
}

impl Figures {
    fn print(&self, name: &str) {
        let handshake = self.handshake.map_or_else(
            || format!("none within {HANDSHAKE_WATCH:?}"),
            |d| format!("{:.2} s", d.as_secs_f64()),
        );
        let usage = match self.rss {
            Some([before, during, after, peak]) => format!(
                "victim daemon CPU {:.0} %, RSS {before} -> {during} -> {after} KiB (before, \
                 during, after; peak {peak} KiB)",
                self.cpu
            ),
            None => format!("whole machine CPU {:.0} % of a core", self.cpu),
        };
        println!(
            "flood {name}: {} initiations in {:.1} s ({:.0}/s, {} send errors), {} cookie replies \
             ({} opened), {} handshake responses; legit re-handshake {handshake}; {usage}; {} \
             datagrams dropped on the victim's node (socket buffer full)",
            self.stats.sent,
            self.stats.elapsed.as_secs_f64(),
            self.stats.rate(),
            self.stats.send_errors,
            self.stats.cookie_replies,
            self.stats.cookies_opened,
            self.stats.responses,
            self.dropped,
        );
    }
}

/// Flood `victim` from `source` while `legit` clears its session with it and handshakes again.
fn flood_phase(
    cluster: &Cluster,
    victim: &PodOn,
    legit: &PodOn,
    source: &Path,
    echo_cookies: bool,
    sources: &[Ipv4Addr],
) -> Figures {
    let rec = record(cluster, victim);
    let pid = rec["daemonPid"].as_u64().map(|p| p as u32);
    assert_eq!(
        pid.is_none(),
        kernel(),
        "a daemon pid exactly for userspace links"
    );
    let rss = |field| pid.map_or(0, |pid| memory_kib(pid, field));
    let target = SocketAddr::new(
        rec["endpoint"].as_str().unwrap().parse().unwrap(),
        rec["listenPort"].as_u64().unwrap() as u16,
    );
    let victim_node = &cluster.nodes[victim.node];
    let dropped_before = udp_receive_buffer_errors(&victim_node.netns);
    let rss_before = rss("VmRSS");
    let before = usage_of(pid);
    let flood = handshake_flood(HandshakeFlood {
        netns: source.to_path_buf(),
        target,
        victim: raw_key(rec["publicKey"].as_str().unwrap()),
        rate: handshake_rate(),
        duration: FLOOD_TIME,
        echo_cookies,
        sources: sources.to_vec(),
    });
    std::thread::sleep(WARM_UP);
    let handshake = rehandshake(cluster, legit, victim);
    let rss_during = rss("VmRSS");
    let stats = flood.finish();
    let after = usage_of(pid);
    let dropped = udp_receive_buffer_errors(&victim_node.netns) - dropped_before;
    let peak = rss("VmHWM");
    // The flood is over: the pair talks (whatever happened during it).
    assert!(
        wait_for(Duration::from_secs(15), || ping_once(
            &legit.pod, &victim.ip
        )),
        "the legitimate peer cannot reach the victim after the flood"
    );
    Figures {
        cpu: cpu_percent(&before, &after),
        rss: pid.map(|_| [rss_before, rss_during, rss("VmRSS"), peak]),
        dropped,
        stats,
        handshake,
    }
}

/// Handshake floods with a valid mac1 against a pod on node 1: from outside, then from node
/// 2's address (which the legitimate peer on node 2 shares), first without and then with the
/// cookies echoed.
#[test]
fn handshake_floods_with_a_valid_mac1() {
    let mut cluster = Cluster::new(2);
    // The legitimate peer must stay a peer of the victim's link for the whole test: in mesh
    // it always is (on-demand would make the pair's promoter add and remove it as well).
    cluster.peerings = vec![Some("mesh"); 2];
    cluster.write_conflists();
    cluster.start_agents();
    let outsider = Netns(unique("wga"));
    cluster.attach(&outsider.0, "atk", "10.250.0.19");
    let victim = add(&cluster, 0);
    let legit = add(&cluster, 1);
    assert!(
        wait_for(Duration::from_secs(30), || ping_once(
            &legit.pod, &victim.ip
        )),
        "the pods on the two nodes never reached each other"
    );

    let quiet = rehandshake(&cluster, &legit, &victim).expect("handshake without a flood");
    println!("no flood: legit re-handshake {:.2} s", quiet.as_secs_f64());

    // (a) An outside attacker: its own source address, never an answer to a cookie.
    let outside = flood_phase(&cluster, &victim, &legit, &outsider.path(), false, &[]);
    outside.print("(a) outside address");
    // (a) from many addresses (an attacker on the underlay can have or spoof them): the
    // daemon counts initiations per source address, so none of them reaches 100 per second
    // and nothing asks for a cookie.
    let many: Vec<Ipv4Addr> = SPRAY.map(|i| Ipv4Addr::new(10, 250, 0, i)).collect();
    let batch: String = many
        .iter()
        .map(|a| format!("addr add {a}/32 dev eth0\n"))
        .collect();
    let mut ip_batch = Command::new(ip())
        .args(["-n", &outsider.0, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    ip_batch
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(ip_batch.wait().unwrap().success());
    let sprayed = flood_phase(&cluster, &victim, &legit, &outsider.path(), false, &many);
    sprayed.print(&format!("(a) {} outside addresses", many.len()));
    // (b) From node 2's address, shared with the legitimate peer: the per-source-address
    // counter of the victim's daemon sees the flood and the peer as one source.
    let node2 = PathBuf::from(format!("/run/netns/{}", cluster.nodes[1].netns));
    let shared = flood_phase(&cluster, &victim, &legit, &node2, false, &[]);
    shared.print("(b) node 2's address");
    // (b) again, echoing cookies as a kernel link does by itself.
    let echoed = flood_phase(&cluster, &victim, &legit, &node2, true, &[]);
    echoed.print("(b) node 2's address, cookies echoed");

    let all = [
        ("(a)", &outside),
        ("(a) spray", &sprayed),
        ("(b)", &shared),
        ("(b) echo", &echoed),
    ];
    for (name, figures) in all {
        let stats = &figures.stats;
        // The generator held its rate: never above the ceiling, and a flood all the same
        // (how much of the ceiling it reaches depends on the machine's load).
        assert!(
            stats.rate() <= handshake_rate() as f64 * 1.01,
            "{name}: {}",
            stats.rate()
        );
        // Nobody that cannot prove a key completes a handshake.
        assert_eq!(
            stats.responses, 0,
            "{name}: the flood got handshake responses"
        );
    }
    if kernel() {
        println!("kernel links (guest, scaled down): figures only");
        return;
    }
    for (name, figures) in all {
        let rate = figures.stats.rate();
        assert!(rate >= MIN_RATE, "{name}: only {rate:.0}/s");
    }
    // Under 100 initiations per second and address: (almost) no cookie asked for.
    assert!(sprayed.stats.cookie_replies < sprayed.stats.sent / 100);
    for (name, figures) in [("(a)", &outside), ("(b)", &shared), ("(b) echo", &echoed)] {
        let stats = &figures.stats;
        // Beyond 100 initiations per second and source address, the daemon asks for mac2:
        // cookie replies, which open with the victim's public key and the packet's mac1.
        assert!(stats.cookie_replies > 0, "{name}: no cookie replies");
        assert_eq!(
            stats.cookies_opened,
            stats.cookie_replies.min(flooder::SAMPLE),
            "{name}"
        );
    }
    // An echoing flood is answered with a cookie only until it carries the cookie.
    assert!(echoed.stats.cookie_replies < shared.stats.cookie_replies / 10);

    // The pass criterion: a cleared session handshakes again within 10 s under every flood,
    // the one from its own node's address that echoes cookies included...
    for (name, figures) in all {
        let took = figures.handshake;
        assert!(
            took.is_some_and(|d| d <= HANDSHAKE_BOUND),
            "{name}: legitimate re-handshake {took:?}, bound {HANDSHAKE_BOUND:?}"
        );
    }
    // ...and a flood from one address costs a peer elsewhere nothing. A peer sharing the flood's
    // address (a pod on the flooding node) is asked for a cookie while the flood carries no
    // mac2 and completes on WireGuard's retry, 5 s later (the limitation the README states;
    // printed, not asserted: now and then its first initiation passes). A flood that echoes
    // cookies is held by wg-cni-wgd to 20 initiations a second per source port, which keeps
    // the address under gotatun's 100 a second: nobody is asked for a cookie and the peer's
    // first initiation completes.
    assert!(outside.handshake.unwrap() < Duration::from_secs(2));
    let echoed_took = echoed.handshake.unwrap();
    assert!(
        echoed_took < Duration::from_secs(2),
        "(b) echo: {echoed_took:?}: does wg-cni-wgd still limit cookie-bearing initiations?"
    );
}

/// A thread in a pod's namespace serving TCP until stopped: echoes what it reads.
struct EchoServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(pod: &Pod, port: u16) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let listener = listen_in(pod, port);
        listener.set_nonblocking(true).unwrap();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 4096];
                        if let Ok(n) = conn.read(&mut buf) {
                            let _ = conn.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoServer {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A listening TCP socket bound inside a pod's namespace (made by a thread that entered it).
fn listen_in(pod: &Pod, port: u16) -> TcpListener {
    let path = pod.path.clone();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind(("0.0.0.0", port)).unwrap()
    })
    .join()
    .unwrap()
}

/// From inside `pod`: connect to `to`, send 1 KiB, read it back. Each exchange's time, or
/// `None` for one that failed within 3 s; one every 250 ms for `time`.
fn tcp_exchanges(pod: &Pod, to: SocketAddr, time: Duration) -> JoinHandle<Vec<Option<Duration>>> {
    let path = pod.path.clone();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < time {
            let began = Instant::now();
            let exchange = || -> std::io::Result<()> {
                let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
                conn.set_read_timeout(Some(Duration::from_secs(3)))?;
                let data = [0x5au8; 1024];
                conn.write_all(&data)?;
                let mut back = [0u8; 1024];
                conn.read_exact(&mut back)?;
                if back == data {
                    Ok(())
                } else {
                    Err(std::io::Error::other("echo differs"))
                }
            };
            out.push(exchange().ok().map(|_| began.elapsed()));
            std::thread::sleep(Duration::from_millis(250));
        }
        out
    })
}

/// `ping -c COUNT -i 0.2` from a pod: (received, average RTT ms, maximum RTT ms).
fn ping_figures(pod: &Pod, address: &str, count: u32) -> (u32, f64, f64) {
    let out = pod.exec(&[
        "ping",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        address,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let received = text
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" received")?.parse().ok())
        .unwrap_or(0);
    // rtt min/avg/max/mdev = 0.071/0.093/0.120/0.015 ms
    let rtts: Vec<f64> = text
        .lines()
        .find_map(|l| l.split_once(" = "))
        .map(|(_, v)| {
            v.trim_end_matches(" ms")
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (
        received,
        rtts.get(1).copied().unwrap_or(f64::NAN),
        rtts.get(2).copied().unwrap_or(f64::NAN),
    )
}

/// The pod's daemon (none for kernel links).
fn daemon_pid(net: &Net, pod: &Pod) -> Option<u32> {
    net.record_of(pod).unwrap()["daemonPid"]
        .as_u64()
        .map(|p| p as u32)
}

/// A pod floods a second pod of its node with new TCP connections (SYNs from its own
/// address, through its tunnel); two other pods of the node keep pinging and exchanging TCP.
#[test]
fn a_syn_flood_between_two_pods_leaves_a_third_pods_traffic_alone() {
    let net = Net::new("10.93.0.0/24");
    let pods: Vec<Pod> = (0..4).map(|_| Pod::new()).collect();
    let ips: Vec<String> = pods
        .iter()
        .map(|p| address_of(&net.add(p).ok().json(), false))
        .collect();
    let (flooder, target, client, server) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    for (pod, other) in [(flooder, &ips[1]), (client, &ips[3])] {
        assert!(
            wait_for(Duration::from_secs(10), || ping_once(pod, other)),
            "pods cannot talk before the flood"
        );
    }
    let _target_listener = listen_in(target, 8080);
    let _echo = EchoServer::start(server, 8081);
    let echo_at = SocketAddr::new(ips[3].parse().unwrap(), 8081);

    let (quiet_received, quiet_avg, quiet_max) = ping_figures(client, &ips[3], 10);
    let quiet = tcp_exchanges(client, echo_at, Duration::from_secs(1))
        .join()
        .unwrap();
    println!(
        "no flood: ping {quiet_received}/10, avg {quiet_avg:.2} ms, max {quiet_max:.2} ms; \
         TCP exchanges {quiet:?}"
    );

    let pids: Vec<Option<u32>> = pods.iter().map(|p| daemon_pid(&net, p)).collect();
    let before: Vec<Usage> = pids.iter().map(|p| usage_of(*p)).collect();
    let flood = syn_flood(SynFlood {
        netns: flooder.path.clone(),
        source: ips[0].parse::<Ipv4Addr>().unwrap(),
        target: ips[1].parse().unwrap(),
        port: 8080,
        rate: SYN_RATE,
        duration: SYN_TIME,
    });
    std::thread::sleep(Duration::from_secs(1));
    let exchanges = tcp_exchanges(client, echo_at, Duration::from_secs(9));
    let (received, avg, max) = ping_figures(client, &ips[3], 45);
    let exchanges = exchanges.join().unwrap();
    let stats = flood.finish();
    let after: Vec<Usage> = pids.iter().map(|p| usage_of(*p)).collect();
    let cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| cpu_percent(b, a))
        .collect();
    let done: Vec<f64> = exchanges
        .iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let worst = done.iter().copied().fold(0.0, f64::max);
    println!(
        "SYN flood: {} SYNs in {:.1} s ({:.0}/s, {} send errors); daemons' CPU: flooder {:.0} %, \
         target {:.0} %, client {:.0} %, server {:.0} %; meanwhile ping {received}/45, avg \
         {avg:.2} ms, max {max:.2} ms; TCP exchanges {}/{} completed, slowest {worst:.1} ms",
        stats.sent,
        stats.elapsed.as_secs_f64(),
        stats.rate(),
        stats.send_errors,
        cpu[0],
        cpu[1],
        cpu[2],
        cpu[3],
        done.len(),
        exchanges.len(),
    );
    assert!(stats.rate() <= SYN_RATE as f64 * 1.01);
    assert!(stats.rate() >= MIN_RATE, "only {:.0} SYNs/s", stats.rate());
    // The target's daemon really carried the flood.
    assert!(cpu[1] > 5.0, "the flood did not reach the target: {cpu:?}");
    assert!(received >= 40, "ping between the other pods: {received}/45");
    assert_eq!(
        done.len(),
        exchanges.len(),
        "TCP exchanges between the other pods failed: {exchanges:?}"
    );
}

/// `hostUsers: false`: a pod's root in a user namespace of its own has CAP_NET_ADMIN only
/// there, not over the network namespace the runtime made (owned by the host's user
/// namespace), so it cannot change its link (with the kernel backend: not `wg set` either,
/// WireGuard's netlink needs CAP_NET_ADMIN over the link's namespace). Root of the host's user
/// namespace inside the pod can.
#[test]
fn a_pod_in_a_user_namespace_cannot_change_its_link() {
    let net = Net::new("10.94.0.0/24");
    let pod = Pod::new();
    let result = net.add(&pod).ok().json();
    let set_mtu = [ip(), "link", "set", "eth0", "mtu", "1420"];
    let out = pod.exec(&set_mtu);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut in_userns = vec!["unshare", "--user", "--map-root-user"];
    in_userns.extend_from_slice(&set_mtu);
    let out = pod.exec(&in_userns);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "changed the link from a user namespace"
    );
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let mut route = vec!["unshare", "--user", "--map-root-user"];
    route.extend_from_slice(&[ip(), "route", "add", "10.95.0.0/24", "dev", "eth0"]);
    assert!(!pod.exec(&route).status.success());
    net.check(&pod, &result).ok();
    net.del(&pod, Some(&result)).ok();
}
