//! Phase `direct` (issue 21, benchmark items 2 and 3): on-demand peering's switches between
//! the relay (pod → node gateway → other node's gateway → pod) and a direct pod-to-pod peer,
//! measured natively on two simulated nodes (bench/driver/src/cluster.rs with
//! `peering: "on-demand"`, each node's `wg-cni agent` promoting and trimming):
//!
//! 1. **First packet to a never-contacted pod** (`--dir-pairs` fresh pairs, one pod on each
//!    node, both known to both agents before the first packet; the direction alternates):
//!    `ping -i 0.01` for `--dir-ping-count` packets while the driver reads both pod links
//!    over their UAPI sockets every `--dir-poll-ms`: the first echo's RTT (relay), the RTT once
//!    both ends are direct, the time from the first echo request until each end, and both,
//!    hold the other as a routed (direct) peer, and the echo requests lost across that switch.
//!    Then `--dir-at-once-pairs` more where the ping starts as soon as the second pod's ADD
//!    returns (the other node's agent may not know that pod yet).
//! 2. **Loss per direct → relay switch** (the first `--dir-trims` pairs of 1, after their
//!    run): the pair idles until the first end trims (`idlePeerTimeout` `--dir-idle-timeout`
//!    seconds), then `ping -i 0.01` for `--dir-trim-count` packets starts at once: from the end
//!    that trimmed first, from the end still direct, or (third kind) only after both trimmed.
//!    Traffic brings the pair back to direct: the run spans that switch too.
//!    Then (2b) `--dir-rotations` key rotations of a pod direct with one on node 2, each
//!    after the pair went direct again (`crate::rotation`).
//! 3. **First packet after `--dir-idle-seconds` (200) of idle**: pairs made direct before the
//!    idle; `--dir-idle-pairs` of them with the short `idlePeerTimeout` (trimmed long before:
//!    the relay carries the packet, its sessions kept by the 25 s keepalive), as many with the
//!    default 300 s (still direct; the direct session, which has no keepalive, expired after
//!    180 s). The whole cluster is idle meanwhile; then one ping each.
//! 4. **iperf3**, one TCP stream, `--dir-tput-seconds` each: relay (`maxDirectPeers: 0`
//!    written into the conflists, so nothing is promoted) vs direct (a pair made direct first).
//!    CPU of the four WireGuard daemons on the path (two pods, two gateways).
//! 5. **The agents' RSS** sampled every 500 ms through the phase (and their CPU).
//! 6. **A cluster of `--dir-cluster-pods` (10,000) pods** on `--dir-cluster-nodes` (100): the
//!    other nodes fake, on-demand, put straight into etcd (as in phase `agent`); once both
//!    agents mirror every record: their RSS, the gateway daemons' (a relay peer per node), and
//!    a new pair's promotion and pod daemons' RSS.
//!
//! Namespaces `wgbench-dr-*`, addresses as the `multinode` phase's (one runs at a time).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{
    b64, clk_tck, cpu_ticks, proc_status_kb, random, unb64, wait_until, Cluster, FakeNode, Layout,
};
use crate::exec::{self, Spec};
use crate::stats::{percentile, summary};
use crate::{ns, uapi, Ctx, Res};

const NETWORK: &str = "wgbench-dr";
/// The default `idlePeerTimeout` (README): the idle pairs of the second kind run with it.
const DEFAULT_IDLE_TIMEOUT: u64 = 300;

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

/// A pod of the phase: its link as the store records it.
struct Pod {
    node: usize,
    cid: String,
    netns: String,
    ip: String,
    host: String,
    key_hex: String,
    daemon: Option<i32>,
    result: Option<Value>,
}

/// What one pod link holds for another pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// No peer with its key.
    Absent,
    /// Its key, without its address (pending, or cooling after a trim).
    Unrouted,
    /// Its key with its address: the direct path.
    Routed,
    /// The link could not be read.
    Unknown,
}

impl Hold {
    fn name(self) -> &'static str {
        match self {
            Hold::Absent => "absent",
            Hold::Unrouted => "unrouted",
            Hold::Routed => "routed",
            Hold::Unknown => "unknown",
        }
    }
}

/// One peer of a UAPI `get`: what this phase looks at.
#[derive(Debug, Default, Clone)]
struct PeerInfo {
    allowed: Vec<String>,
    handshake_sec: u64,
    rx: u64,
    tx: u64,
}

fn read_peers(host: &str) -> Res<HashMap<String, PeerInfo>> {
    let text = uapi::get_text(host)?;
    let mut peers = HashMap::new();
    let mut current: Option<(String, PeerInfo)> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "public_key" => {
                if let Some((k, p)) = current.take() {
                    peers.insert(k, p);
                }
                current = Some((value.to_string(), PeerInfo::default()));
            }
            "allowed_ip" => {
                if let Some((_, p)) = current.as_mut() {
                    p.allowed.push(value.to_string());
                }
            }
            "rx_bytes" => {
                if let Some((_, p)) = current.as_mut() {
                    p.rx = value.parse().unwrap_or(0);
                }
            }
            "tx_bytes" => {
                if let Some((_, p)) = current.as_mut() {
                    p.tx = value.parse().unwrap_or(0);
                }
            }
            "last_handshake_time_sec" => {
                if let Some((_, p)) = current.as_mut() {
                    p.handshake_sec = value.parse().unwrap_or(0);
                }
            }
            "errno" if value != "0" => return Err(format!("UAPI get on {host}: errno {value}")),
            _ => {}
        }
    }
    if let Some((k, p)) = current.take() {
        peers.insert(k, p);
    }
    Ok(peers)
}

/// What `holder`'s link holds for `other`.
fn hold(holder: &Pod, other: &Pod) -> Hold {
    look(holder, other).0
}

/// What `holder`'s link holds for `other`, and the byte counters (rx, tx) of that peer and of
/// the gateway peer (the one with the default route).
fn look(holder: &Pod, other: &Pod) -> (Hold, [u64; 4]) {
    match read_peers(&holder.host) {
        Err(_) => (Hold::Unknown, [0; 4]),
        Ok(peers) => {
            let gw = peers
                .values()
                .find(|p| p.allowed.iter().any(|a| a == "0.0.0.0/0"))
                .map_or((0, 0), |p| (p.rx, p.tx));
            let (hold, direct) = match peers.get(&other.key_hex) {
                None => (Hold::Absent, (0, 0)),
                Some(p) if p.allowed.iter().any(|a| *a == format!("{}/32", other.ip)) => {
                    (Hold::Routed, (p.rx, p.tx))
                }
                Some(p) => (Hold::Unrouted, (p.rx, p.tx)),
            };
            (hold, [direct.0, direct.1, gw.0, gw.1])
        }
    }
}

/// Peers of `pod`'s link that are pods (not its gateway: the one with the default route).
fn pod_peers(pod: &Pod) -> usize {
    read_peers(&pod.host)
        .map(|peers| {
            peers
                .values()
                .filter(|p| !p.allowed.iter().any(|a| a == "0.0.0.0/0"))
                .count()
        })
        .unwrap_or(0)
}

/// Whether `pod`'s session with its gateway has had a handshake.
fn gateway_session(pod: &Pod) -> bool {
    read_peers(&pod.host).is_ok_and(|peers| {
        peers
            .values()
            .any(|p| p.allowed.iter().any(|a| a == "0.0.0.0/0") && p.handshake_sec > 0)
    })
}

/// Both ends' states over time: end 0 is what the node-1 pod holds for the node-2 pod, end 1
/// the reverse. Only changes are kept (the first sample too), stamped with the time the read
/// returned.
#[derive(Default)]
struct Timeline {
    ends: [Vec<(f64, Hold)>; 2],
    samples: usize,
    /// With `--dir-diagnose 1`: each end's byte counters when they changed (direct peer rx,
    /// tx, gateway peer rx, tx).
    counters: Option<[Vec<Counted>; 2]>,
}

/// A time and the byte counters seen then.
type Counted = (f64, [u64; 4]);

impl Timeline {
    fn new(diagnose: bool) -> Timeline {
        Timeline {
            counters: diagnose.then(Default::default),
            ..Timeline::default()
        }
    }
    fn sample(&mut self, pods: [&Pod; 2]) -> [Hold; 2] {
        let looks = [look(pods[0], pods[1]), look(pods[1], pods[0])];
        let states = [looks[0].0, looks[1].0];
        let t = now();
        self.samples += 1;
        for (e, state) in states.iter().enumerate() {
            if self.ends[e].last().map(|(_, s)| s) != Some(state) {
                self.ends[e].push((t, *state));
            }
            if let Some(counters) = self.counters.as_mut() {
                if counters[e].last().map(|(_, c)| c) != Some(&looks[e].1) {
                    counters[e].push((t, looks[e].1));
                }
            }
        }
        states
    }
    /// The first time at or after `after` that `end` was seen in `state`.
    fn first(&self, end: usize, state: Hold, after: f64) -> Option<f64> {
        self.ends[end]
            .iter()
            .find(|(t, s)| *t >= after && *s == state)
            .map(|(t, _)| *t)
    }
    /// The spells `end` spent in `state`: (first seen, first seen otherwise or None).
    fn spells(&self, end: usize, state: Hold) -> Vec<(f64, Option<f64>)> {
        let e = &self.ends[end];
        e.iter()
            .enumerate()
            .filter(|(_, (_, s))| *s == state)
            .map(|(i, (t, _))| (*t, e.get(i + 1).map(|(t, _)| *t)))
            .collect()
    }
    /// The first time at or after `after` that `end` was seen other than `state`.
    fn first_not(&self, end: usize, state: Hold, after: f64) -> Option<f64> {
        self.ends[end]
            .iter()
            .find(|(t, s)| *t >= after && *s != state)
            .map(|(t, _)| *t)
    }
    fn json(&self, since: f64) -> Value {
        let end = |e: usize| -> Value {
            json!(self.ends[e]
                .iter()
                .map(|(t, s)| json!([ms(t - since), s.name()]))
                .collect::<Vec<_>>())
        };
        let mut v = json!({"node1_pod": end(0), "node2_pod": end(1), "samples": self.samples});
        if let Some(counters) = &self.counters {
            let c = |e: usize| -> Value {
                json!(counters[e]
                    .iter()
                    .map(|(t, c)| json!([ms(t - since), c]))
                    .collect::<Vec<_>>())
            };
            v["counters_direct_rx_tx_gateway_rx_tx"] =
                json!({"node1_pod": c(0), "node2_pod": c(1)});
        }
        v
    }
}

/// A finished `ping -D`: replies by sequence number (receive time, RTT in ms).
struct PingOut {
    spawned: f64,
    interval: f64,
    sent: u32,
    replies: BTreeMap<u32, (f64, f64)>,
}

impl PingOut {
    fn parse(text: &str, spawned: f64, interval: f64) -> PingOut {
        let mut replies = BTreeMap::new();
        let mut sent = 0;
        for line in text.lines() {
            if let Some(i) = line.find(" packets transmitted") {
                sent = line[..i].trim().parse().unwrap_or(0);
                continue;
            }
            let ts = line
                .strip_prefix('[')
                .and_then(|l| l.split_once(']'))
                .and_then(|(t, _)| t.parse::<f64>().ok());
            let field = |name: &str| -> Option<f64> {
                let rest = &line[line.find(name)? + name.len()..];
                rest.split_whitespace().next()?.parse().ok()
            };
            if let (Some(ts), Some(seq), Some(rtt)) = (ts, field("icmp_seq="), field("time=")) {
                // A duplicate keeps the first answer.
                replies.entry(seq as u32).or_insert((ts, rtt));
            }
        }
        let sent = sent.max(replies.keys().last().copied().unwrap_or(0));
        PingOut {
            spawned,
            interval,
            sent,
            replies,
        }
    }
    fn received(&self) -> usize {
        self.replies.len()
    }
    fn lost(&self) -> Vec<u32> {
        (1..=self.sent)
            .filter(|s| !self.replies.contains_key(s))
            .collect()
    }
    fn rtt(&self, seq: u32) -> Option<f64> {
        self.replies.get(&seq).map(|r| r.1)
    }
    /// When an answered echo request left.
    fn answered_at(&self, seq: u32) -> Option<f64> {
        self.replies.get(&seq).map(|(t, rtt)| t - rtt / 1000.0)
    }
    /// The mean time between two echo requests (s), from the answered ones (`-i 0.01` asks
    /// for 0.01; they leave less often).
    fn spacing(&self) -> f64 {
        let first = self.replies.keys().next().copied();
        let last = self.replies.keys().last().copied();
        match (first, last) {
            (Some(f), Some(l)) if l > f => {
                let (tf, tl) = (
                    self.answered_at(f).unwrap_or(0.0),
                    self.answered_at(l).unwrap_or(0.0),
                );
                (tl - tf) / f64::from(l - f)
            }
            _ => self.interval,
        }
    }
    /// When echo request `seq` left: from its reply, else between its answered neighbours (the
    /// first request, unanswered, left when ping started), else at the measured spacing.
    fn sent_at(&self, seq: u32) -> f64 {
        if let Some(t) = self.answered_at(seq) {
            return t;
        }
        if seq == 1 {
            return self.spawned;
        }
        let spacing = self.spacing();
        let below = self
            .replies
            .range(..seq)
            .next_back()
            .and_then(|(s, _)| Some((*s, self.answered_at(*s)?)))
            .or(Some((1, self.spawned)));
        let above = self
            .replies
            .range(seq..)
            .next()
            .and_then(|(s, _)| Some((*s, self.answered_at(*s)?)));
        match (below, above) {
            (Some((b, tb)), Some((a, ta))) => {
                tb + (ta - tb) * f64::from(seq - b) / f64::from(a - b)
            }
            (Some((b, tb)), None) => tb + f64::from(seq - b) * spacing,
            (None, Some((a, ta))) => ta - f64::from(a - seq) * spacing,
            (None, None) => self.spawned + f64::from(seq - 1) * spacing,
        }
    }
    /// The mean time between two echo requests (ms).
    fn spacing_ms(&self) -> Option<f64> {
        (self.replies.len() > 1).then(|| ms(self.spacing()))
    }
    /// RTTs (ms) of the echo requests sent after `after`.
    fn rtts_after(&self, after: f64) -> Vec<f64> {
        self.replies
            .iter()
            .filter(|(seq, _)| self.sent_at(**seq) > after)
            .map(|(_, (_, rtt))| *rtt)
            .collect()
    }
    /// When the first echo request left.
    fn start(&self) -> f64 {
        match self.replies.get(&1) {
            Some(_) => self.sent_at(1),
            None => self.spawned,
        }
    }
}

/// `ping -n -D -i INTERVAL -c COUNT -W 1 addr` inside `netns`, its output into `out`.
fn spawn_ping(netns: &str, addr: &str, count: usize, interval: f64, out: &PathBuf) -> Res<Child> {
    let fd = ns::open(netns)?;
    let raw = fd.as_raw_fd();
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut cmd = Command::new("ping");
    cmd.args([
        "-n",
        "-D",
        "-i",
        &format!("{interval}"),
        "-c",
        &count.to_string(),
        "-W",
        "1",
        addr,
    ])
    .stdin(Stdio::null())
    .stdout(file)
    .stderr(Stdio::null());
    // SAFETY: setns is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("ping: {e}"))?;
    drop(fd);
    Ok(child)
}

struct Phase<'a, 'c> {
    ctx: &'a Ctx,
    c: &'a mut Cluster<'c>,
    poll: Duration,
    interval: f64,
    next_pod: usize,
    logs: PathBuf,
    diagnose: bool,
}

impl Phase<'_, '_> {
    fn add_pod(&mut self, node: usize) -> Res<Pod> {
        let k = self.next_pod;
        self.next_pod += 1;
        let netns = format!("wgbench-dr-p{k}");
        self.c.pod_ns(&netns)?;
        let cid = format!("dr-pod-{k}");
        let e = self.c.cni(node, "ADD", &cid, &netns, None)?;
        if !e.ok() {
            return Err(format!("ADD {cid} on node {}: {}", node + 1, e.why()));
        }
        self.c.note_daemons();
        let result = e.json();
        let ip = result
            .as_ref()
            .and_then(crate::cni::first_ip)
            .ok_or("pod: no IP")?;
        let (record, key) = self.record_of(node, &cid)?;
        Ok(Pod {
            node,
            cid,
            netns,
            ip,
            host: record["hostName"]
                .as_str()
                .ok_or("record without hostName")?
                .to_string(),
            key_hex: uapi::hex(&key),
            daemon: record["daemonPid"].as_u64().map(|p| p as i32),
            result,
        })
    }

    fn del_pod(&mut self, pod: Pod) {
        let _ = self
            .c
            .cni(pod.node, "DEL", &pod.cid, &pod.netns, pod.result.as_ref());
    }

    /// Whether node `on`'s agent mirrors `pod` (its in-memory directory is updated before the
    /// mirror file is written).
    fn mirrored(&self, pod: &Pod, on: usize) -> bool {
        self.c.nodes[on]
            .store()
            .join(NETWORK)
            .join(&self.c.nodes[pod.node].name)
            .join(format!("{}:eth0.json", pod.cid))
            .exists()
    }

    /// The pod's record on its node, and the public key it names.
    fn record_of(&self, node: usize, cid: &str) -> Res<(Value, Vec<u8>)> {
        let path = self.c.nodes[node]
            .own_dir()
            .join(format!("{cid}:eth0.json"));
        let record: Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| format!("{}: no record", path.display()))?;
        let key = record["publicKey"]
            .as_str()
            .and_then(unb64)
            .ok_or("record without a public key")?;
        Ok((record, key))
    }

    /// `pod` with its key as its record says now (after a rotation).
    fn reread(&self, pod: &Pod) -> Res<Pod> {
        let (_, key) = self.record_of(pod.node, &pod.cid)?;
        Ok(Pod {
            node: pod.node,
            cid: pod.cid.clone(),
            netns: pod.netns.clone(),
            ip: pod.ip.clone(),
            host: pod.host.clone(),
            key_hex: uapi::hex(&key),
            daemon: pod.daemon,
            result: pod.result.clone(),
        })
    }

    /// A pod on each node, each mirrored on the other node.
    fn pair(&mut self) -> Res<(Pod, Pod)> {
        let a = self.add_pod(0)?;
        let b = self.add_pod(1)?;
        wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
            self.mirrored(&a, 1) && self.mirrored(&b, 0)
        })
        .ok_or("a new pod was not mirrored on the other node in 30 s")?;
        Ok((a, b))
    }

    /// Ping `to` from `from` (`count` echo requests every `interval`) while reading both ends
    /// of the pair (`pods`: node-1 pod, node-2 pod); reading goes on after the ping until
    /// `more` says no (bounded: twice the ping's time plus 15 s).
    fn ping_watch(
        &self,
        from: &Pod,
        to: &Pod,
        count: usize,
        pods: [&Pod; 2],
        tl: &mut Timeline,
        mut more: impl FnMut([Hold; 2]) -> bool,
    ) -> Res<PingOut> {
        let out = self.logs.join("ping.out");
        let limit = self.limit(count);
        let spawned = now();
        let started = Instant::now();
        let mut child = spawn_ping(&from.netns, &to.ip, count, self.interval, &out)?;
        let mut done = false;
        loop {
            let states = tl.sample(pods);
            if !done {
                match child.try_wait() {
                    Ok(Some(_)) => done = true,
                    Ok(None) => {}
                    Err(e) => return Err(format!("ping: {e}")),
                }
            }
            if done && !more(states) {
                break;
            }
            if started.elapsed() > limit {
                if !done {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                break;
            }
            std::thread::sleep(self.poll);
        }
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        Ok(PingOut::parse(&text, spawned, self.interval))
    }

    fn limit(&self, count: usize) -> Duration {
        Duration::from_secs_f64(count as f64 * self.interval * 2.0 + 15.0)
    }
}

/// What one relay → direct switch looked like.
fn analyse_promotion(p: &PingOut, tl: &Timeline, a: &Pod, b: &Pod, from: &Pod) -> Value {
    let t0 = p.start();
    let pend = [
        tl.first_not(0, Hold::Absent, t0),
        tl.first_not(1, Hold::Absent, t0),
    ];
    let routed = [tl.first(0, Hold::Routed, t0), tl.first(1, Hold::Routed, t0)];
    let both = match routed {
        [Some(x), Some(y)] => Some(x.max(y)),
        _ => None,
    };
    let first_direct = routed.iter().flatten().copied().reduce(f64::min);
    let mut relay = Vec::new();
    let mut direct = Vec::new();
    for (&seq, &(_, rtt)) in &p.replies {
        let at = p.sent_at(seq);
        if seq > 1 && first_direct.is_none_or(|t| at < t) {
            relay.push(rtt);
        }
        if both.is_some_and(|t| at > t + 0.02) {
            direct.push(rtt);
        }
    }
    let lost = p.lost();
    let lost_in_switch = lost
        .iter()
        .filter(|s| {
            let at = p.sent_at(**s);
            first_direct.is_some_and(|f| at >= f - 0.05) && both.is_none_or(|t| at <= t + 0.05)
        })
        .count();
    let med = |v: &mut Vec<f64>| -> Value {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        match v.is_empty() {
            true => Value::Null,
            false => json!((percentile(v, 50.0) * 1000.0).round() / 1000.0),
        }
    };
    let since = |t: Option<f64>| t.map(|t| ms(t - t0));
    let initiator = if a.key_hex < b.key_hex {
        "node1"
    } else {
        "node2"
    };
    json!({
        "from": if from.node == 0 { "node1" } else { "node2" },
        "pods": [a.ip, b.ip],
        "initiator": initiator,
        "first_rtt_ms": p.rtt(1),
        "first_lost": !p.replies.contains_key(&1),
        "relay_rtt_ms": med(&mut relay),
        "direct_rtt_ms": med(&mut direct),
        "peer_seen_ms": [since(pend[0]), since(pend[1])],
        "routed_ms": [since(routed[0]), since(routed[1])],
        "both_direct_ms": since(both),
        "sent": p.sent,
        "spacing_ms": p.spacing_ms(),
        "received": p.received(),
        "lost": lost.len(),
        "lost_in_switch": lost_in_switch,
        "lost_seqs": lost,
        "timeline": tl.json(t0),
    })
}

fn summary_of(values: &[Value], key: &str, digits: i32) -> Value {
    let v: Vec<f64> = values.iter().filter_map(|x| x[key].as_f64()).collect();
    summary(&v, digits)
}

/// Summaries of a series of promotions.
fn promotions(runs: &[Value]) -> Value {
    // Per role: the end with the lower key starts the handshake.
    let role = |initiator: bool| -> Value {
        let mut seen = Vec::new();
        let mut routed = Vec::new();
        for r in runs {
            for (end, node) in [(0usize, "node1"), (1, "node2")] {
                if (r["initiator"] == node) == initiator {
                    seen.extend(r["peer_seen_ms"][end].as_f64());
                    routed.extend(r["routed_ms"][end].as_f64());
                }
            }
        }
        json!({"peer_seen_ms": summary(&seen, 2), "routed_ms": summary(&routed, 2)})
    };
    json!({
        "pairs": runs.len(),
        "first_rtt_ms": summary_of(runs, "first_rtt_ms", 3),
        "first_lost": runs.iter().filter(|r| r["first_lost"] == true).count(),
        "relay_rtt_ms": summary_of(runs, "relay_rtt_ms", 3),
        "direct_rtt_ms": summary_of(runs, "direct_rtt_ms", 3),
        "both_direct_ms": summary_of(runs, "both_direct_ms", 2),
        "never_direct": runs.iter().filter(|r| r["both_direct_ms"].is_null()).count(),
        "over_1s": runs.iter().filter(|r| r["both_direct_ms"].as_f64().is_some_and(|x| x > 1000.0)).count(),
        "lost": summary_of(runs, "lost", 0),
        "lost_in_switch": summary_of(runs, "lost_in_switch", 0),
        "lost_from_node1": summary_of(&runs.iter().filter(|r| r["from"] == "node1").cloned().collect::<Vec<_>>(), "lost", 0),
        "lost_from_node2": summary_of(&runs.iter().filter(|r| r["from"] == "node2").cloned().collect::<Vec<_>>(), "lost", 0),
        "lost_from_initiator": summary_of(&runs.iter().filter(|r| r["from"] == r["initiator"]).cloned().collect::<Vec<_>>(), "lost", 0),
        "lost_from_responder": summary_of(&runs.iter().filter(|r| r["from"] != r["initiator"]).cloned().collect::<Vec<_>>(), "lost", 0),
        "spacing_ms": summary_of(runs, "spacing_ms", 2),
        "initiator_end": role(true),
        "responder_end": role(false),
        "runs": runs,
    })
}

/// iperf3 from `from` to `to`, one TCP stream: (Gbit/s, retransmits).
fn iperf3(
    ctx: &Ctx,
    logs: &std::path::Path,
    from: &Pod,
    to: &Pod,
    seconds: usize,
) -> Res<(f64, u64)> {
    let env = vec![(
        "PATH".to_string(),
        "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    )];
    let server_args: Vec<String> = ["-s", "-1", "-B", &to.ip, "-p", "5201"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ns_to = ns::open(&to.netns)?;
    let ns_from = ns::open(&from.netns)?;
    let log = logs.join("iperf3-server.log");
    let mut spec = Spec::new(&ctx.iperf3, &server_args, &log);
    spec.env = &env;
    spec.netns = Some(ns_to.as_raw_fd());
    let server = exec::spawn(&spec, ctx)?;
    let t = seconds.to_string();
    let client_args: Vec<String> = ["-c", &to.ip, "-p", "5201", "-t", &t, "-J"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let clog = logs.join("iperf3-client.log");
    let mut result = Err("iperf3 never ran".to_string());
    for _ in 0..40 {
        let mut spec = Spec::new(&ctx.iperf3, &client_args, &clog);
        spec.env = &env;
        spec.netns = Some(ns_from.as_raw_fd());
        let e = exec::run(&spec)?;
        let v = e.json().unwrap_or(Value::Null);
        if e.ok() {
            result = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|bps| {
                    (
                        bps / 1e9,
                        v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
                    )
                })
                .ok_or_else(|| "iperf3 without end.sum_received".to_string());
            break;
        }
        let err = v["error"].as_str().unwrap_or("").to_string();
        result = Err(format!("iperf3 client: {err} {}", e.why()));
        if !(err.contains("refused") || err.contains("unable to connect")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    server.finish(Duration::from_secs(5));
    result
}

/// VmRSS of the agents, sampled every 500 ms on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<u64>>>,
}

impl Sampler {
    fn start(pids: Vec<i32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut samples = vec![Vec::new(); pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (k, pid) in pids.iter().enumerate() {
                    if let Some(kb) = proc_status_kb(*pid, "VmRSS:") {
                        samples[k].push(kb);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        });
        Sampler { stop, handle }
    }
    fn finish(self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let n_pairs = ctx.opts.num("dir-pairs", 30);
    let n_at_once = ctx.opts.num("dir-at-once-pairs", 10);
    let n_trims = ctx.opts.num("dir-trims", 12);
    let trim_kinds: Vec<usize> = ctx
        .opts
        .str("dir-trim-kinds", "0,1,2")
        .split(',')
        .filter_map(|k| k.trim().parse().ok())
        .filter(|k| *k < TRIM_KINDS.len())
        .collect();
    let ping_count = ctx.opts.num("dir-ping-count", 150);
    let trim_count = ctx.opts.num("dir-trim-count", 200);
    let idle_timeout = ctx.opts.num("dir-idle-timeout", 3) as u64;
    let idle_s = ctx.opts.num("dir-idle-seconds", 200) as u64;
    let idle_pairs = ctx.opts.num("dir-idle-pairs", 2);
    let tput_s = ctx.opts.num("dir-tput-seconds", 10);
    let cluster_pods = ctx.opts.num("dir-cluster-pods", 10_000);
    let cluster_nodes = ctx.opts.num("dir-cluster-nodes", 100).clamp(3, 100);
    let poll = Duration::from_millis(ctx.opts.num("dir-poll-ms", 5) as u64);
    let interval = 0.01;
    let mut c = Cluster::new(
        ctx,
        Layout {
            tag: "dr",
            network: NETWORK,
            node_prefix: "drnode",
            nodes: 2,
            dir: "direct",
            peering: "on-demand",
        },
    )?;
    c.set_plugin_fields(&json!({"idlePeerTimeout": idle_timeout}))?;
    let logs = c.dir.join("logs");
    // Agents on two hosts never start in the same millisecond: started together, their
    // promoters' timers (a sweep every 5 s, counters read every second) would stay in step.
    c.start_agent(0)?;
    std::thread::sleep(Duration::from_millis(
        ctx.opts.num("dir-agent-offset-ms", 1370) as u64,
    ));
    c.start_agent(1)?;
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(60))
            .ok_or_else(|| format!("agent of node {} not ready in 60 s", i + 1))?;
    }
    let agents: Vec<i32> = c.nodes.iter().filter_map(|n| n.agent_pid).collect();
    let tck = clk_tck();
    let agent_cpu0: Vec<Option<u64>> = agents.iter().map(|p| cpu_ticks(*p)).collect();
    let sampler = Sampler::start(agents.clone());
    let started = Instant::now();
    let mut out = json!({
        "backend": "userspace",
        "nodes": 2,
        "idle_peer_timeout_s": idle_timeout,
        "poll_ms": poll.as_millis() as u64,
        "ping_interval_ms": interval * 1000.0,
        "agent_flags": if c.agent_flags.is_empty() { "their default flags".to_string() } else { c.agent_flags.join(" ") },
    });
    let mut ph = Phase {
        ctx,
        c: &mut c,
        poll,
        interval,
        next_pod: 0,
        logs,
        diagnose: ctx.opts.num("dir-diagnose", 0) == 1,
    };
    let result = measure(
        &mut ph,
        &mut out,
        Params {
            n_pairs,
            n_at_once,
            n_trims,
            trim_kinds,
            ping_count,
            trim_count,
            idle_timeout,
            idle_s,
            idle_pairs,
            tput_s,
            cluster_pods,
            cluster_nodes,
            rotations: ctx.opts.num("dir-rotations", 5),
        },
    );
    let elapsed = started.elapsed().as_secs_f64();
    let samples = sampler.finish();
    let agent_cpu1: Vec<Option<u64>> = agents.iter().map(|p| cpu_ticks(*p)).collect();
    let mut per_agent = Vec::new();
    for (k, pid) in agents.iter().enumerate() {
        let s: Vec<f64> = samples
            .get(k)
            .map(|v| v.iter().map(|kb| *kb as f64 / 1024.0).collect())
            .unwrap_or_default();
        let cpu = match (agent_cpu0[k], agent_cpu1[k]) {
            (Some(a), Some(b)) => json!(((b - a) as f64 / tck * 100.0).round() / 100.0),
            _ => Value::Null,
        };
        per_agent.push(json!({
            "node": k + 1,
            "rss_mib": summary(&s, 1),
            "hwm_mib": proc_status_kb(*pid, "VmHWM:").map(|kb| (kb as f64 / 102.4).round() / 10.0),
            "cpu_seconds": cpu,
            "over_seconds": (elapsed * 10.0).round() / 10.0,
        }));
    }
    out["agents"] = json!(per_agent);
    drop(ph);
    drop(c);
    result.map(|_| out)
}

struct Params {
    n_pairs: usize,
    n_at_once: usize,
    n_trims: usize,
    /// Which kinds of trim runs, in turn (`TRIM_KINDS`).
    trim_kinds: Vec<usize>,
    ping_count: usize,
    trim_count: usize,
    idle_timeout: u64,
    idle_s: u64,
    idle_pairs: usize,
    tput_s: usize,
    /// Pods of the big cluster (5), all nodes' together; 0: not measured.
    cluster_pods: usize,
    /// Nodes of it, the two real ones included.
    cluster_nodes: usize,
    /// Key rotations of a pod direct with one on the other node (2b).
    rotations: usize,
}

/// Step 2b: `n` key rotations of a pod on node 1 whose pair with a pod on node 2 is direct
/// (made so again before each), both that pod and one of node 1 pinging it.
fn rotation(ph: &mut Phase, n: usize) -> Res<Value> {
    let (a, b) = ph.pair()?;
    let local = ph.add_pod(0)?;
    let pingers = [
        ("same_node", local.netns.as_str()),
        ("other_node", b.netns.as_str()),
    ];
    let target = crate::rotation::Target {
        node: 0,
        cid: &a.cid,
        ip: &a.ip,
        pingers: &pingers,
    };
    let ph_ref = &*ph;
    let direct_again = || {
        // The rotated key: the driver's view of `a` is refreshed from its record.
        let a = ph_ref.reread(&a)?;
        let mut tl = Timeline::new(false);
        ph_ref.ping_watch(&b, &a, 300, [&a, &b], &mut tl, |s| {
            s != [Hold::Routed, Hold::Routed]
        })?;
        Ok(())
    };
    let measured = crate::rotation::measure(ph.ctx, ph.c, &target, n, direct_again);
    ph.del_pod(local);
    ph.del_pod(a);
    ph.del_pod(b);
    measured
}

fn measure(ph: &mut Phase, out: &mut Value, p: Params) -> Res<()> {
    let label = ph.ctx.label.clone();
    let log = |m: String| crate::log(format!("[{label}] direct: {m}"));
    // Both gateways mirrored and their relay session up.
    wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        (0..2).all(|i| relay_up(ph.c, i))
    })
    .ok_or("the gateways' relay sessions were not up in 30 s")?;

    // ------------------------------------------------------------ 1 + 2
    let mut mirrored = Vec::new();
    let mut trims = Vec::new();
    for k in 0..p.n_pairs {
        let (a, b) = ph.pair()?;
        let (from, to) = if k % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let sessions = [gateway_session(&a), gateway_session(&b)];
        let mut tl = Timeline::new(ph.diagnose);
        let run = ph.ping_watch(from, to, p.ping_count, [&a, &b], &mut tl, |s| {
            s != [Hold::Routed, Hold::Routed]
        })?;
        let mut r = analyse_promotion(&run, &tl, &a, &b, from);
        r["gateway_sessions_before"] = json!(sessions);
        log(format!(
            "pair {k}: first {:?} ms, both direct after {:?} ms, lost {}",
            r["first_rtt_ms"].as_f64(),
            r["both_direct_ms"].as_f64(),
            r["lost"]
        ));
        mirrored.push(r);
        if k < p.n_trims && !p.trim_kinds.is_empty() {
            let kind = p.trim_kinds[k % p.trim_kinds.len()];
            trims.push(trim(ph, &a, &b, kind, p.trim_count, p.idle_timeout)?);
        }
        ph.del_pod(a);
        ph.del_pod(b);
    }
    out["first_packet"] = promotions(&mirrored);
    out["trims"] = trim_summary(&trims);

    let mut at_once = Vec::new();
    for k in 0..p.n_at_once {
        let a = ph.add_pod(0)?;
        wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
            ph.mirrored(&a, 1)
        })
        .ok_or("a new pod was not mirrored on node 2 in 30 s")?;
        let b = ph.add_pod(1)?;
        // The new pod (b) pings first in even runs, the older one in odd runs.
        let (from, to) = if k % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let mut tl = Timeline::new(ph.diagnose);
        let run = ph.ping_watch(from, to, p.ping_count, [&a, &b], &mut tl, |s| {
            s != [Hold::Routed, Hold::Routed]
        })?;
        let mut r = analyse_promotion(&run, &tl, &a, &b, from);
        r["new_pod_pings"] = json!(k % 2 == 0);
        log(format!(
            "at once {k}: first {:?} ms, both direct after {:?} ms, lost {}",
            r["first_rtt_ms"].as_f64(),
            r["both_direct_ms"].as_f64(),
            r["lost"]
        ));
        at_once.push(r);
        ph.del_pod(a);
        ph.del_pod(b);
    }
    out["first_packet_at_once"] = promotions(&at_once);

    // ------------------------------------------------------------ 2b: key rotation
    if p.rotations > 0 {
        out["rotation"] = rotation(ph, p.rotations).unwrap_or_else(|e| json!({"error": e}));
        log("key rotation measured".into());
    }

    // ------------------------------------------------------------ 4: iperf3
    if p.tput_s > 0 {
        out["throughput"] = throughput(ph, p.tput_s, &log)?;
    }

    // ------------------------------------------------------------ 3: idle
    if p.idle_pairs > 0 {
        out["idle"] = idle(ph, &p, &log)?;
    }

    // ------------------------------------------------------------ 5: a big cluster
    if p.cluster_pods > 0 {
        out["cluster"] = big_cluster(ph, &p, &log)?;
    }
    Ok(())
}

/// Step 5: the two agents in a cluster of `cluster_pods` pods on `cluster_nodes` nodes: the
/// other nodes are fake (on-demand node keys, claims, gateways and pod records put straight
/// into etcd, as in phase `agent`; their endpoints answer nothing). Measured once every
/// record is mirrored on both nodes: each agent's RSS, the gateway daemon's (one relay peer
/// per node) and a new pair's pod daemons' (gateway + one direct peer), and that pair's
/// promotion.
fn big_cluster(ph: &mut Phase, p: &Params, log: &dyn Fn(String)) -> Res<Value> {
    let fakes: Vec<FakeNode> = (0..p.cluster_nodes - 2)
        .map(|k| {
            let mut fake = FakeNode::new(
                NETWORK,
                &format!("drfake{k}"),
                &format!("10.252.{}.0/24", 10 + k),
                &format!("10.253.0.{}", 101 + k),
            )?;
            fake.peering = "on-demand";
            Ok(fake)
        })
        .collect::<Res<_>>()?;
    let remote = p.cluster_pods.saturating_sub(2);
    let lease = ph.c.grant_lease(3600)?;
    let started = Instant::now();
    for (k, fake) in fakes.iter().enumerate() {
        fake.announce(ph.c, &lease, Some(&b64(&random(32)?)))?;
        let n = remote / fakes.len() + usize::from(k < remote % fakes.len());
        fake.put_records(ph.c, 0..n, 2, |j| format!("drrec{k}x{j:03}"))?;
    }
    let put_s = started.elapsed().as_secs_f64();
    let expected = |k: usize| remote / fakes.len() + usize::from(k < remote % fakes.len());
    let mirrored = |i: usize| {
        fakes
            .iter()
            .enumerate()
            .all(|(k, fake)| ph.c.nodes[i].mirror_count(&fake.name) >= expected(k))
    };
    wait_until(Duration::from_secs(300), Duration::from_secs(1), || {
        mirrored(0) && mirrored(1)
    })
    .ok_or("the fake nodes' records were not mirrored on both nodes in 300 s")?;
    let mirrored_s = started.elapsed().as_secs_f64();
    log(format!(
        "{remote} records of {} fake nodes mirrored on both nodes after {mirrored_s:.1} s",
        fakes.len()
    ));
    // Settled: the mirror writes done, the relay peers configured.
    std::thread::sleep(Duration::from_secs(5));
    let mib = |kb: Option<u64>| kb.map(|kb| (kb as f64 / 102.4).round() / 10.0);
    let agents: Vec<Value> =
        ph.c.nodes
            .iter()
            .map(|n| {
                let pid = n.agent_pid.unwrap_or(0);
                json!({"rss_mib": mib(proc_status_kb(pid, "VmRSS:")),
                "hwm_mib": mib(proc_status_kb(pid, "VmHWM:"))})
            })
            .collect();
    let gateways: Vec<Value> = (0..2)
        .map(|i| {
            let pid = ph.c.gateway_daemon(i).unwrap_or(0);
            let peers = gateway_host(ph.c, i)
                .and_then(|h| uapi::get_text(&h).ok())
                .map(|t| t.matches("public_key=").count());
            json!({"rss_mib": mib(proc_status_kb(pid, "VmRSS:")), "peers": peers})
        })
        .collect();
    let (a, b) = ph.pair()?;
    let mut tl = Timeline::new(ph.diagnose);
    let run = ph.ping_watch(&a, &b, p.ping_count, [&a, &b], &mut tl, |s| {
        s != [Hold::Routed, Hold::Routed]
    })?;
    let promotion = analyse_promotion(&run, &tl, &a, &b, &a);
    let pods: Vec<Option<f64>> = [&a, &b]
        .iter()
        .map(|pod| mib(pod.daemon.and_then(|pid| proc_status_kb(pid, "VmRSS:"))))
        .collect();
    log(format!(
        "at {} pods: agents {agents:?}, gateways {gateways:?}, pair both direct after {:?} ms",
        p.cluster_pods,
        promotion["both_direct_ms"].as_f64()
    ));
    ph.del_pod(a);
    ph.del_pod(b);
    Ok(json!({
        "pods": p.cluster_pods,
        "nodes": p.cluster_nodes,
        "fake_nodes": fakes.len(),
        "records_put_seconds": (put_s * 10.0).round() / 10.0,
        "mirrored_on_both_seconds": (mirrored_s * 10.0).round() / 10.0,
        "agents": agents,
        "gateways": gateways,
        "pair_pod_daemons_rss_mib": pods,
        "pair": promotion,
    }))
}

/// Node `i`'s gateway link (its host-side name).
fn gateway_host(c: &Cluster, i: usize) -> Option<String> {
    let path = c.nodes[i].own_dir().join("gateway.json");
    let record: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    record["hostName"].as_str().map(str::to_string)
}

/// Node `i`'s gateway holds the other node's gateway with its subnet and a handshake.
fn relay_up(c: &Cluster, i: usize) -> bool {
    let other = c.nodes[1 - i].subnet();
    let Some(host) = gateway_host(c, i) else {
        return false;
    };
    read_peers(&host).is_ok_and(|peers| {
        peers
            .values()
            .any(|p| p.allowed.contains(&other) && p.handshake_sec > 0)
    })
}

const TRIM_KINDS: [&str; 3] = [
    "from the end that trimmed first",
    "from the end still direct",
    "after both trimmed",
];

/// A direct pair idles until one end trims; then a ping starts at once (kind 0: from the end
/// that trimmed first; 1: from the end still direct; 2: only once both trimmed, from the
/// node-1 pod).
fn trim(ph: &Phase, a: &Pod, b: &Pod, kind: usize, count: usize, idle: u64) -> Res<Value> {
    let pods = [a, b];
    let mut tl = Timeline::new(ph.diagnose);
    let idle_from = now();
    let limit = Duration::from_secs(idle + 20);
    let started = Instant::now();
    let mut first = None;
    while started.elapsed() < limit {
        let s = tl.sample(pods);
        if let Some(end) = s.iter().position(|h| *h != Hold::Routed) {
            first.get_or_insert((end, now()));
            if kind != 2 || !s.contains(&Hold::Routed) {
                break;
            }
        }
        std::thread::sleep(ph.poll);
    }
    let Some((end, trimmed_at)) = first else {
        return Err(format!("a direct pair did not trim in {limit:?} of idle"));
    };
    let from = match kind {
        0 => pods[end],
        1 => pods[1 - end],
        _ => a,
    };
    let to = if std::ptr::eq(from, a) { b } else { a };
    let both_trimmed = tl.first_not(1 - end, Hold::Routed, trimmed_at);
    let run = ph.ping_watch(from, to, count, pods, &mut tl, |_| false)?;
    let t0 = run.start();
    let back = match [tl.first(0, Hold::Routed, t0), tl.first(1, Hold::Routed, t0)] {
        [Some(x), Some(y)] => Some(ms(x.max(y) - t0)),
        _ => None,
    };
    let lost = run.lost();
    let rtts: Value = match ph.diagnose {
        true => json!((1..=run.sent)
            .map(|s| json!([ms(run.sent_at(s) - t0), run.rtt(s)]))
            .collect::<Vec<_>>()),
        false => Value::Null,
    };
    // The last lost request and the spell of an end holding the pair unrouted around it: the
    // losses of a switch end when that end routes the pair again.
    let last_lost = lost.last().map(|s| run.sent_at(*s));
    let spell = last_lost.and_then(|at| {
        (0..2).find_map(|e| {
            tl.spells(e, Hold::Unrouted)
                .into_iter()
                .find(|(from, to)| *from <= at + 0.05 && to.is_none_or(|to| to >= at - 0.05))
                .map(|(from, to)| (e, from, to))
        })
    });
    Ok(json!({
        "last_lost_ms": last_lost.map(|t| ms(t - t0)),
        "unrouted_end_at_last_loss": spell.map(|(e, _, _)| if e == 0 { "node1" } else { "node2" }),
        "unrouted_spell_ms": spell.map(|(_, from, to)| json!([ms(from - t0), to.map(|t| ms(t - t0))])),
        "rtts_ms": rtts,
        "kind": TRIM_KINDS[kind],
        "kind_index": kind,
        "first_trim": if end == 0 { "node1" } else { "node2" },
        "idle_until_first_trim_ms": ms(trimmed_at - idle_from),
        "other_end_trimmed_after_ms": both_trimmed.map(|t| ms(t - trimmed_at)),
        "ping_started_after_first_trim_ms": ms(t0 - trimmed_at),
        "from": if from.node == 0 { "node1" } else { "node2" },
        "sent": run.sent,
        "lost": lost.len(),
        "lost_ms": lost.iter().map(|s| ms(run.sent_at(*s) - t0)).collect::<Vec<_>>(),
        "direct_again_ms": back,
        "timeline": tl.json(t0),
    }))
}

fn trim_summary(trims: &[Value]) -> Value {
    let mut by_kind = Vec::new();
    for kind in 0..3 {
        let runs: Vec<Value> = trims
            .iter()
            .filter(|t| t["kind_index"] == kind)
            .cloned()
            .collect();
        if runs.is_empty() {
            continue;
        }
        by_kind.push(json!({
            "kind": runs[0]["kind"],
            "switches": runs.len(),
            "lost": summary_of(&runs, "lost", 0),
            "direct_again_ms": summary_of(&runs, "direct_again_ms", 1),
            "over_3": runs.iter().filter(|r| r["lost"].as_u64().is_some_and(|l| l > 3)).count(),
        }));
    }
    // Switches that lost more than 3: how long the end that held the pair unrouted did so, and
    // how far the last loss was from its routing the pair again.
    let over: Vec<&Value> = trims
        .iter()
        .filter(|r| r["lost"].as_u64().is_some_and(|l| l > 3))
        .collect();
    let mut held = Vec::new();
    let mut gap = Vec::new();
    for r in &over {
        let spell = &r["unrouted_spell_ms"];
        if let (Some(from), Some(to)) = (spell[0].as_f64(), spell[1].as_f64()) {
            held.push(to - from);
            if let Some(last) = r["last_lost_ms"].as_f64() {
                gap.push(to - last);
            }
        }
    }
    json!({"switches": trims.len(), "by_kind": by_kind, "lost": summary_of(trims, "lost", 0),
        "over_3": {"switches": over.len(), "unrouted_ms": summary(&held, 1),
            "reroute_after_last_loss_ms": summary(&gap, 1)},
        "runs": trims})
}

/// CPU ticks of the given processes, summed (None: one is gone).
fn ticks(pids: &[i32]) -> Option<u64> {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

fn throughput(ph: &mut Phase, seconds: usize, log: &dyn Fn(String)) -> Res<Value> {
    let mut out = json!({"seconds": seconds});
    let gateways: Vec<i32> = (0..2).filter_map(|i| ph.c.gateway_daemon(i)).collect();
    let tck = clk_tck();
    for path in ["relay", "direct"] {
        let limit = match path {
            "relay" => json!(0),
            _ => Value::Null,
        };
        ph.c.set_plugin_fields(&json!({"maxDirectPeers": limit}))?;
        // The agents follow the conf dir at once (inotify) and the promoter reads it every 5 s.
        std::thread::sleep(Duration::from_secs(6));
        for i in 0..2 {
            ph.c.wait_ready(i, Duration::from_secs(30))
                .ok_or("agent not ready after the conflist changed")?;
        }
        let (a, b) = ph.pair()?;
        let mut tl = Timeline::new(ph.diagnose);
        // 100 echo requests: promoted (direct) or kept on the relay (relay).
        let pre = ph.ping_watch(&a, &b, 100, [&a, &b], &mut tl, |s| {
            path == "direct" && s != [Hold::Routed, Hold::Routed]
        })?;
        let before = [hold(&a, &b), hold(&b, &a)];
        // RTTs of the warm-up: every one on the relay; once both ends are direct on direct.
        let rtts = match path {
            "relay" => pre.rtts_after(0.0),
            _ => match [
                tl.first(0, Hold::Routed, 0.0),
                tl.first(1, Hold::Routed, 0.0),
            ] {
                [Some(x), Some(y)] => pre.rtts_after(x.max(y) + 0.02),
                _ => Vec::new(),
            },
        };
        let mut pids: Vec<i32> = [a.daemon, b.daemon].into_iter().flatten().collect();
        pids.extend(&gateways);
        let cpu0 = ticks(&pids);
        let result = iperf3(ph.ctx, &ph.logs, &a, &b, seconds);
        let cpu1 = ticks(&pids);
        let after = [hold(&a, &b), hold(&b, &a)];
        let peers = [pod_peers(&a), pod_peers(&b)];
        let (gbps, retransmits) = result?;
        let cpu = match (cpu0, cpu1) {
            (Some(x), Some(y)) => Some((y - x) as f64 / tck),
            _ => None,
        };
        log(format!(
            "iperf3 {path}: {gbps:.2} Gbit/s, pod peers after {peers:?}"
        ));
        out[path] = json!({
            "gbps": (gbps * 1000.0).round() / 1000.0,
            "retransmits": retransmits,
            "before": [before[0].name(), before[1].name()],
            "after": [after[0].name(), after[1].name()],
            "pod_peers_after": peers,
            "warm_up_lost": pre.lost().len(),
            "warm_up_rtt_ms": summary(&rtts, 3),
            "daemons_cpu_seconds": cpu.map(|x| (x * 100.0).round() / 100.0),
            "cpu_s_per_gbit": cpu.map(|x| (x / (gbps * seconds as f64) * 1000.0).round() / 1000.0),
        });
        ph.del_pod(a);
        ph.del_pod(b);
    }
    if let (Some(r), Some(d)) = (
        out["relay"]["gbps"].as_f64(),
        out["direct"]["gbps"].as_f64(),
    ) {
        out["direct_over_relay"] = json!((d / r * 100.0).round() / 100.0);
    }
    out["maxDirectPeers_restored"] = json!(true);
    Ok(out)
}

/// Pairs made direct, the whole cluster idle for `idle_s`, then one ping each.
fn idle(ph: &mut Phase, p: &Params, log: &dyn Fn(String)) -> Res<Value> {
    let mut pairs: Vec<(&'static str, Pod, Pod)> = Vec::new();
    // Trimmed kind: direct under the short timeout, then trimmed and removed on both ends.
    for _ in 0..p.idle_pairs {
        let (a, b) = ph.pair()?;
        let mut tl = Timeline::new(ph.diagnose);
        ph.ping_watch(&a, &b, 50, [&a, &b], &mut tl, |s| {
            s != [Hold::Routed, Hold::Routed]
        })?;
        pairs.push(("trimmed", a, b));
    }
    let gone = Duration::from_secs(p.idle_timeout * 2 + 30);
    wait_until(gone, Duration::from_millis(50), || {
        pairs
            .iter()
            .all(|(_, a, b)| hold(a, b) == Hold::Absent && hold(b, a) == Hold::Absent)
    })
    .ok_or("idle pairs kept their direct peers")?;
    // Default timeout for the next ones (the promoter reads the conflist every 5 s).
    ph.c.set_plugin_fields(&json!({"idlePeerTimeout": Value::Null}))?;
    std::thread::sleep(Duration::from_secs(6));
    for i in 0..2 {
        ph.c.wait_ready(i, Duration::from_secs(30))
            .ok_or("agent not ready after the conflist changed")?;
    }
    for _ in 0..p.idle_pairs {
        let (a, b) = ph.pair()?;
        let mut tl = Timeline::new(ph.diagnose);
        ph.ping_watch(&a, &b, 50, [&a, &b], &mut tl, |s| {
            s != [Hold::Routed, Hold::Routed]
        })?;
        pairs.push(("direct", a, b));
    }
    let at_start: Vec<[Hold; 2]> = pairs
        .iter()
        .map(|(_, a, b)| [hold(a, b), hold(b, a)])
        .collect();
    let quiet_from = Instant::now();
    let agents: Vec<i32> = ph.c.nodes.iter().filter_map(|n| n.agent_pid).collect();
    let cpu0 = ticks(&agents);
    log(format!("{} pairs idle for {} s", pairs.len(), p.idle_s));
    std::thread::sleep(Duration::from_secs(p.idle_s));
    let idle_for = quiet_from.elapsed().as_secs_f64();
    let cpu1 = ticks(&agents);
    let mut runs = Vec::new();
    for (k, (kind, a, b)) in pairs.iter().enumerate() {
        let before = [hold(a, b), hold(b, a)];
        let handshake_age = read_peers(&a.host)
            .ok()
            .and_then(|peers| peers.get(&b.key_hex).map(|p| p.handshake_sec))
            .filter(|s| *s > 0)
            .map(|s| crate::cluster::now_unix().saturating_sub(s));
        let (from, to) = if k % 2 == 0 { (a, b) } else { (b, a) };
        let mut tl = Timeline::new(ph.diagnose);
        let run = ph.ping_watch(from, to, 5, [a, b], &mut tl, |_| false)?;
        runs.push(json!({
            "kind": kind,
            "from": if from.node == 0 { "node1" } else { "node2" },
            "held_at_idle_start": [at_start[k][0].name(), at_start[k][1].name()],
            "held_before": [before[0].name(), before[1].name()],
            "direct_session_age_s": handshake_age,
            "first_rtt_ms": run.rtt(1),
            "rtts_ms": (1..=run.sent).map(|s| run.rtt(s)).collect::<Vec<_>>(),
            "lost": run.lost().len(),
        }));
        log(format!(
            "after idle, {kind} pair {k}: first RTT {:?} ms",
            run.rtt(1)
        ));
    }
    for (_, a, b) in pairs {
        ph.del_pod(a);
        ph.del_pod(b);
    }
    let kind = |k: &str| -> Value {
        let v: Vec<Value> = runs.iter().filter(|r| r["kind"] == k).cloned().collect();
        json!({"pairs": v.len(), "first_rtt_ms": summary_of(&v, "first_rtt_ms", 3),
            "lost": v.iter().map(|r| r["lost"].as_u64().unwrap_or(0)).sum::<u64>()})
    };
    let tck = clk_tck();
    Ok(json!({
        "idle_seconds": (idle_for * 10.0).round() / 10.0,
        "trimmed": kind("trimmed"),
        "direct": kind("direct"),
        "idle_timeouts_s": {"trimmed": p.idle_timeout, "direct": DEFAULT_IDLE_TIMEOUT},
        "agents_cpu_percent_while_idle": match (cpu0, cpu1) {
            (Some(x), Some(y)) => json!(((y - x) as f64 / tck / idle_for * 1000.0).round() / 10.0),
            _ => Value::Null,
        },
        "runs": runs,
    }))
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

/// The largest `lost` of a summary (0 when there was no switch of that kind).
fn max_lost(s: &Value) -> Option<f64> {
    match s["n"].as_u64() {
        Some(0) | None => None,
        _ => s["max"].as_f64(),
    }
}

/// Rows for the targets table: (target, measured, verdict, name when missed).
pub fn targets(v: &Value) -> Vec<(String, String, Option<bool>, String)> {
    let mut out = Vec::new();
    let fp = &v["first_packet"];
    if fp.is_object() {
        let t = &fp["both_direct_ms"];
        let never = fp["never_direct"].as_u64().unwrap_or(0);
        out.push((
            format!(
                "on-demand: first packet to a never-contacted pod on another node until both ends are direct, p99 ≤ 1 s (native, {} pairs)",
                fp["pairs"]
            ),
            format!(
                "p50 {} / p99 {} / max {} ms{}; first packet {} ms through the relay, {} ms once direct (p50)",
                f(&t["p50"], 0),
                f(&t["p99"], 0),
                f(&t["max"], 0),
                if never > 0 { format!(", {never} never direct") } else { String::new() },
                f(&fp["first_rtt_ms"]["p50"], 2),
                f(&fp["direct_rtt_ms"]["p50"], 2),
            ),
            t["p99"].as_f64().map(|p| p <= 1000.0 && never == 0),
            "on-demand time to direct (native)".into(),
        ));
        let up = [
            max_lost(&fp["lost_from_node1"]),
            max_lost(&fp["lost_from_node2"]),
        ];
        let kinds: Vec<(String, Option<f64>)> = v["trims"]["by_kind"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| {
                (
                    k["kind"].as_str().unwrap_or("?").to_string(),
                    max_lost(&k["lost"]),
                )
            })
            .collect();
        let all: Vec<f64> = up
            .iter()
            .flatten()
            .copied()
            .chain(kinds.iter().filter_map(|k| k.1))
            .collect();
        out.push((
            "on-demand: echo requests lost per switch with `ping -i 0.01` ≤ 3, both directions (native)".into(),
            format!(
                "relay → direct: max {} pinging from node 1, {} from node 2 ({} switches); direct → relay: max {} ({} switches)",
                up[0].map_or("–".into(), |x| format!("{x:.0}")),
                up[1].map_or("–".into(), |x| format!("{x:.0}")),
                fp["pairs"],
                kinds
                    .iter()
                    .map(|(k, m)| format!("{} {k}", m.map_or("–".into(), |x| format!("{x:.0}"))))
                    .collect::<Vec<_>>()
                    .join(", "),
                v["trims"]["switches"]
            ),
            (!all.is_empty()).then(|| all.iter().all(|x| *x <= 3.0)),
            "on-demand loss per switch (native)".into(),
        ));
    }
    out
}

/// The results.md section of this phase.
pub fn report(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## On-demand peering: relay and direct paths (native, userspace backend)\n"
    );
    if let Some(e) = v["error"].as_str() {
        let _ = writeln!(md, "The phase failed: {e}\n");
        return md;
    }
    let fp = &v["first_packet"];
    let idle = &v["idle"];
    let _ = writeln!(
        md,
        "Phase `direct` (bench/driver/src/direct.rs; {:.0} s, {:.0} s of it the idle of part 3). \
         Two simulated nodes as in the multi-node phase, `peering: \"on-demand\"`, the agents \
         with {}, `idlePeerTimeout` {} s (so that trims happen within the phase; part 3 also \
         with the default 300 s). The driver reads both pod links over their UAPI sockets every \
         {} ms: a pod holds the other as **routed** (its key with the other's /32: direct), \
         **unrouted** (its key only: pending, or cooling after a trim) or not at all. Pings are \
         `ping -i 0.01` (the echo requests actually left every {} ms, p50); times count from \
         the first echo request.\n",
        v["phase_seconds"].as_f64().unwrap_or(0.0),
        idle["idle_seconds"].as_f64().unwrap_or(0.0),
        v["agent_flags"].as_str().unwrap_or("?"),
        v["idle_peer_timeout_s"],
        v["poll_ms"],
        f(&fp["spacing_ms"]["p50"], 1),
    );
    let _ = writeln!(
        md,
        "**First packet to a never-contacted pod** (fresh pods, one on each node; the \
         direction alternates). *Known*: both pods mirrored by both agents before the first \
         packet. *At once*: the ping starts as soon as the second pod's ADD returns (the other \
         node's agent may not know that pod yet). ms:\n"
    );
    let _ = writeln!(
        md,
        "| pairs | n | first packet RTT p50 / max (relay) | RTT once direct p50 | both ends direct p50 / p90 / p99 / max | > 1 s | never | lost per switch p50 / max |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (label, s) in [("known", fp), ("at once", &v["first_packet_at_once"])] {
        if !s.is_object() {
            continue;
        }
        let t = &s["both_direct_ms"];
        let _ = writeln!(
            md,
            "| {label} | {} | {} / {} | {} | {} / {} / {} / {} | {} | {} | {} / {} |",
            s["pairs"],
            f(&s["first_rtt_ms"]["p50"], 2),
            f(&s["first_rtt_ms"]["max"], 2),
            f(&s["direct_rtt_ms"]["p50"], 2),
            f(&t["p50"], 0),
            f(&t["p90"], 0),
            f(&t["p99"], 0),
            f(&t["max"], 0),
            s["over_1s"],
            s["never_direct"],
            f(&s["lost"]["p50"], 0),
            f(&s["lost"]["max"], 0),
        );
    }
    let _ = writeln!(
        md,
        "\nWhere the time goes (*known* pairs, ms from the first echo request): each end's \
         agent puts the peer on its pod's link (**seen**: the relay-watch logged the flow, \
         the promoter placed both pods) and routes it once the handshake completed \
         (**routed**); the end with the lower key starts the handshake (initiator) and starts \
         it over at 150, 300, 500, 750 ms, 1, 1.5, 2.5 and 4 s after its promotion.\n"
    );
    let _ = writeln!(
        md,
        "| end | seen p50 / p90 / p99 / max | routed p50 / p90 / p99 / max |\n| --- | --- | --- |"
    );
    for (label, key) in [
        ("initiator", "initiator_end"),
        ("responder", "responder_end"),
    ] {
        let e = &fp[key];
        let q = |s: &Value| {
            format!(
                "{} / {} / {} / {}",
                f(&s["p50"], 0),
                f(&s["p90"], 0),
                f(&s["p99"], 0),
                f(&s["max"], 0)
            )
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} |",
            q(&e["peer_seen_ms"]),
            q(&e["routed_ms"])
        );
    }
    let slow: Vec<String> = fp["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            v["first_packet_at_once"]["runs"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter(|r| r["both_direct_ms"].as_f64().is_none_or(|t| t > 500.0))
        .map(|r| {
            format!(
                "from {} (initiator {}): seen {} / {}, routed {} / {} (node 1 / node 2)",
                r["from"].as_str().unwrap_or("?"),
                r["initiator"].as_str().unwrap_or("?"),
                f(&r["peer_seen_ms"][0], 0),
                f(&r["peer_seen_ms"][1], 0),
                f(&r["routed_ms"][0], 0),
                f(&r["routed_ms"][1], 0),
            )
        })
        .collect();
    if !slow.is_empty() {
        let all: Vec<&Value> = fp["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                v["first_packet_at_once"]["runs"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
            .filter(|r| r["both_direct_ms"].as_f64().is_none_or(|t| t > 500.0))
            .collect();
        let late_seen = all
            .iter()
            .filter(|r| (0..2).any(|e| r["peer_seen_ms"][e].as_f64().is_some_and(|t| t > 900.0)))
            .count();
        let waited = all
            .iter()
            .filter(|r| {
                let seen = (0..2)
                    .filter_map(|e| r["peer_seen_ms"][e].as_f64())
                    .reduce(f64::max);
                let routed = r["both_direct_ms"].as_f64();
                matches!((seen, routed), (Some(s), Some(t)) if t - s > 100.0)
            })
            .count();
        let _ = writeln!(
            md,
            "\nPairs not direct within 500 ms (both series): {}. In {late_seen} of these {} an end took the peer only ~1 s after the first packet: the relay watch logs a pair at most once a second, so a first log the agent could not place (a pod of its own node not yet read, the gateway of a network not yet read, or the other pod not yet in its directory) waits for the next one; in {waited} the last end to take the peer routed it more than 100 ms later, at the initiator's next handshake restart.",
            slow.join("; "),
            all.len()
        );
    }
    let tr = &v["trims"];
    let _ = writeln!(
        md,
        "\n**Echo requests lost per switch** (`ping -i 0.01`). Relay → direct: the runs above. \
         Direct → relay: after a *known* pair's run the pair idles until one end trims (after \
         `idlePeerTimeout`, the agents reading counters every second, so the two ends trim up \
         to a second apart), then a ping starts at once, from the end that trimmed first (its \
         packets take the relay to an end that still routes the pair directly), from the end \
         still direct, or once both trimmed. Traffic makes the pair direct again: the run \
         spans that switch too.\n"
    );
    let _ = writeln!(
        md,
        "| switch | ping from | switches | lost p50 / max | > 3 lost | both direct again after (ms) p50 / max |\n| --- | --- | --- | --- | --- | --- |"
    );
    for (label, key) in [("node 1", "lost_from_node1"), ("node 2", "lost_from_node2")] {
        let s = &fp[key];
        let runs: Vec<&Value> = fp["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["from"] == key.trim_start_matches("lost_from_"))
            .collect();
        let _ = writeln!(
            md,
            "| relay → direct | {label} | {} | {} / {} | {} | (above) |",
            s["n"],
            f(&s["p50"], 0),
            f(&s["max"], 0),
            runs.iter()
                .filter(|r| r["lost"].as_u64().is_some_and(|l| l > 3))
                .count()
        );
    }
    for k in tr["by_kind"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| direct → relay (→ direct) | {} | {} | {} / {} | {} | {} / {} |",
            k["kind"].as_str().unwrap_or("?"),
            k["switches"],
            f(&k["lost"]["p50"], 0),
            f(&k["lost"]["max"], 0),
            k["over_3"],
            f(&k["direct_again_ms"]["p50"], 0),
            f(&k["direct_again_ms"]["max"], 0),
        );
    }
    let o = &tr["over_3"];
    if o["switches"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            md,
            "\nIn the {} switches that lost more than 3, one end held the pair **unrouted** (its key without the other's address: every direct packet from the other end dropped) for p50 {} / max {} ms, and the losses ended p50 {} ms before it routed the pair again. An end learns that the other still sends directly from its direct peer's byte counters, which its agent reads once a second while cooling; relayed traffic is what tells the other end to switch, and a pod whose packets are dropped sends none.",
            o["switches"],
            f(&o["unrouted_ms"]["p50"], 0),
            f(&o["unrouted_ms"]["max"], 0),
            f(&o["reroute_after_last_loss_ms"]["p50"], 0),
        );
    }
    let _ = writeln!(
        md,
        "\n**First packet after {:.0} s of idle** (the whole cluster quiet; pairs made direct \
         just before; *trimmed*: `idlePeerTimeout` {} s, so the pair went back to the relay \
         long before, whose sessions the 25 s keepalive keeps; *direct*: the default 300 s, so \
         the pair is still direct, its session without keepalive: the kernel's would have \
         expired after 180 s; wg-cni-wgd (gotatun) re-keys an initiator's session once, on a \
         timer, 120 s after it started, even without traffic, so its age is shown). Agents' CPU \
         while idle: {} % of a core (both).\n",
        idle["idle_seconds"].as_f64().unwrap_or(0.0),
        idle["idle_timeouts_s"]["trimmed"],
        f(&idle["agents_cpu_percent_while_idle"], 2),
    );
    let _ = writeln!(
        md,
        "| pair | ping from | held before (node 1 / node 2) | direct session age (s) | first RTT (ms) | next RTTs (ms) | lost |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in idle["runs"].as_array().into_iter().flatten() {
        let next: Vec<String> = r["rtts_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(1)
            .map(|x| f(x, 2))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} / {} | {} | {} | {} | {} |",
            r["kind"].as_str().unwrap_or("?"),
            r["from"].as_str().unwrap_or("?"),
            r["held_before"][0].as_str().unwrap_or("?"),
            r["held_before"][1].as_str().unwrap_or("?"),
            r["direct_session_age_s"]
                .as_u64()
                .map_or("–".into(), |s| s.to_string()),
            f(&r["first_rtt_ms"], 2),
            next.join(", "),
            r["lost"],
        );
    }
    let t = &v["throughput"];
    let _ = writeln!(
        md,
        "\n**Throughput**, iperf3 one TCP stream for {} s, node-1 pod → node-2 pod. *Relay*: \
         `maxDirectPeers: 0` written into both conflists, so no pair is promoted (pod → its \
         gateway → the other gateway → pod: four WireGuard daemons, each packet encrypted and \
         decrypted twice); *direct*: a pair made direct first. CPU: the four daemons on the path \
         (two pods, two gateways). RTT: 100 echo requests before (for direct: once direct).\n",
        t["seconds"]
    );
    let _ = writeln!(
        md,
        "| path | Gbit/s | retransmits | daemons' CPU-s per Gbit | ping RTT p50 / p99 (ms) | pod peers after |\n| --- | --- | --- | --- | --- | --- |"
    );
    for path in ["relay", "direct"] {
        let p = &t[path];
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} | {} / {} | {} |",
            f(&p["gbps"], 2),
            p["retransmits"],
            f(&p["cpu_s_per_gbit"], 2),
            f(&p["warm_up_rtt_ms"]["p50"], 3),
            f(&p["warm_up_rtt_ms"]["p99"], 3),
            p["pod_peers_after"],
        );
    }
    let _ = writeln!(
        md,
        "\nDirect ÷ relay: {}×.\n",
        f(&t["direct_over_relay"], 2)
    );
    let agents: Vec<String> = v["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "node {}: VmRSS p50 {} / max {} MiB (VmHWM {}), {} CPU-s",
                a["node"],
                f(&a["rss_mib"]["p50"], 1),
                f(&a["rss_mib"]["max"], 1),
                f(&a["hwm_mib"], 1),
                f(&a["cpu_seconds"], 1),
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "**Agents** through the phase (sampled every 500 ms): {}.\n",
        agents.join("; ")
    );
    let big = &v["cluster"];
    if big.is_object() {
        let each = |key: &str, what: &dyn Fn(&Value) -> String| -> String {
            big[key]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, x)| format!("node {}: {}", i + 1, what(x)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            md,
            "**At {} cluster pods** ({} nodes: the two real ones and {} fake on-demand nodes whose \
             keys, claims, gateways and pod records were put straight into etcd: {} s to put, on \
             both nodes' mirrors after {} s): agents {}; gateway daemons {}; the pod daemons of a \
             new pair, once direct, {} MiB; that pair both direct after {} ms (first packet {} ms).\n",
            big["pods"],
            big["nodes"],
            big["fake_nodes"],
            f(&big["records_put_seconds"], 1),
            f(&big["mirrored_on_both_seconds"], 1),
            each("agents", &|a| format!(
                "VmRSS {} MiB (VmHWM {})",
                f(&a["rss_mib"], 1),
                f(&a["hwm_mib"], 1)
            )),
            each("gateways", &|g| format!(
                "{} MiB with {} peers",
                f(&g["rss_mib"], 1),
                g["peers"]
            )),
            big["pair_pod_daemons_rss_mib"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| f(x, 2))
                .collect::<Vec<_>>()
                .join(" / "),
            f(&big["pair"]["both_direct_ms"], 0),
            f(&big["pair"]["first_rtt_ms"], 2),
        );
    }
    if !v["rotation"].is_null() {
        md.push('\n');
        md.push_str(&crate::rotation::report(
            &v["rotation"],
            "on-demand, the rotated pod direct with the other node's pinger before each rotation",
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_is_read_and_lost_requests_are_placed_between_answered_ones() {
        let text = "PING 10.252.2.2 (10.252.2.2) 56(84) bytes of data.\n\
            [100.0210] 64 bytes from 10.252.2.2: icmp_seq=3 ttl=62 time=1.00 ms\n\
            [100.0410] 64 bytes from 10.252.2.2: icmp_seq=5 ttl=62 time=1.00 ms\n\
            [100.0510] 64 bytes from 10.252.2.2: icmp_seq=6 ttl=62 time=1.00 ms\n\
            [100.0520] 64 bytes from 10.252.2.2: icmp_seq=6 ttl=62 time=2.00 ms (DUP!)\n\
            \n--- 10.252.2.2 ping statistics ---\n\
            7 packets transmitted, 3 received, 57.1429% packet loss, time 60ms\n";
        let p = PingOut::parse(text, 100.0, 0.01);
        assert_eq!(p.sent, 7);
        assert_eq!(p.received(), 3);
        assert_eq!(p.lost(), [1, 2, 4, 7]);
        assert_eq!(p.rtt(6), Some(1.0));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(p.spacing(), 0.01));
        assert!(
            close(p.sent_at(1), 100.0),
            "the first request left at the start"
        );
        assert!(
            close(p.sent_at(2), 100.01),
            "between the start and request 3"
        );
        assert!(close(p.sent_at(4), 100.03));
        assert!(
            close(p.sent_at(7), 100.06),
            "after the last answer, at the spacing"
        );
        assert!(close(p.start(), 100.0));
    }
}
