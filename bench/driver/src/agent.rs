//! Phase `agent` (issue 20): one node's `wg-cni agent` with many mirrored records and many
//! local links, driven by etcd events (native only, userspace backend, wg-cni-wgd).
//!
//! One node (the cluster of bench/driver/src/cluster.rs, namespaces `wgbench-ag-*`) runs its
//! agent with `--resync-interval 3600` (only events act) and `--ag-links` pods (100) ADDed by
//! the plugin: 101 links with the node gateway. Fake remote nodes (`--ag-remote-nodes`, at
//! least one per 1,000 records) exist only in etcd: a /21 claim each
//! (10.252.32.0/21, .40.0/21, ...), a node key on a lease, a heartbeat, an address claim
//! (10.253.0.101, .102, ...), a gateway record, and `--ag-records` (2,000) pod records between
//! them, all put straight into etcd. Every link then holds every remote record as a peer.
//!
//! The remote pods of measured events answer: node 1's address is a namespace on the
//! underlay running `--ag-responders` wg-cni-wgd devices (ports 51821...), each with every
//! local link as a peer, and before a record is put one of them takes its private key. So the
//! handshake the agent starts toward a new remote pod completes, as with a live pod. Node 2's
//! address answers nothing (the `silent` events: a remote pod that never answers).
//!
//! 1. Events, one at a time with the agent otherwise quiet: a new record put (ADD), its delete
//!    (DEL), a node key deleted and put again (flap), and ADD/DEL of records whose pod never
//!    answers. Per event: agent CPU (utime+stime of /proc/<pid>/stat from the put until the
//!    agent is quiet: no tick for 500 ms and at least 1.4 s after an ADD, which covers the
//!    handshake follow-ups), split by thread (reconciler, async runtime, other: the handshake
//!    follow-ups, which end with their work); wall time from the put until every link has the
//!    peer (resp. no longer has it), read over UAPI: the gateway, which the agent writes last,
//!    polled, then every other link read (and polled if it is not there yet);
//!    and WireGuard writes read from the links: every link read before and after, (link, peer)
//!    configurations that differ (public key, endpoint, allowed IPs, keep-alive) counted.
//! 2. Agent VmRSS/VmHWM with every record mirrored, and the daemons' RSS for context.
//! 3. Soak: `--ag-soak-rate` events per second (20; ADD and DEL alternate, each ADD's record
//!    deleted 10 ADDs later; never faster than the rate) for `--ag-soak-seconds` (300), while
//!    `/healthz` is probed every `--ag-probe-ms` (100) ms, the network's flock (the one the
//!    plugin's ADD takes, `<store>/<network>/.lock`) is taken and released as often and its
//!    wait recorded, and `--ag-plugin-adds` plugin ADDs (+DEL) run, against as many with the
//!    agent idle before. Afterwards every link's peers are checked, and "liveness lease lost"
//!    counted in the agent's log.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{
    self, b64, cpu_ticks, delete_op, enter, etcd_answer, etcd_post, proc_status_kb, put_op, random,
    unb64, wait_until, Cluster, FakeNode, Layout, HEALTH,
};
use crate::exec::{self, Background, Spec};
use crate::stats::summary;
use crate::uapi::{self, Peers};
use crate::{ns, Ctx, Res};

const NETWORK: &str = "wgbench-ag";
const RESPONDER_NS: &str = "wgbench-ag-r";
const RESPONDER_PORT: u16 = 51821;
/// Records a fake node holds at most (its /21 has 2,048 addresses; events use the rest).
const PER_NODE: usize = 1000;
/// Addresses of event records (node 1: answered; node 2: silent) and of soak records.
const EVENT_BASE: usize = 1100;
const SOAK_BASE: usize = 1500;
/// Soak records alive at once: each soak ADD's record is deleted this many ADDs later.
const SOAK_LIVE: usize = 10;
/// The pod namespace of the plugin ADDs measured idle and during the soak.
const PROBE_POD_NS: &str = "wgbench-ag-q";

struct Knobs {
    records: usize,
    links: usize,
    nodes: usize,
    events: usize,
    flaps: usize,
    silent: usize,
    soak_s: u64,
    rate: f64,
    responders: usize,
    probe: Duration,
    plugin_adds: usize,
}

impl Knobs {
    fn read(ctx: &Ctx) -> Res<Knobs> {
        let records = ctx.opts.num("ag-records", 2000);
        let nodes = ctx
            .opts
            .num("ag-remote-nodes", 4)
            .max(records.div_ceil(PER_NODE))
            .max(2);
        if nodes > 27 {
            return Err(format!(
                "--ag-records {records}: at most {} (27 fake nodes)",
                27 * PER_NODE
            ));
        }
        let links = ctx.opts.num("ag-links", 100);
        if !(1..=250).contains(&links) {
            return Err("--ag-links: 1 to 250 (the node's /24)".into());
        }
        Ok(Knobs {
            records,
            links,
            nodes,
            events: ctx.opts.num("ag-events", 15),
            flaps: ctx.opts.num("ag-flaps", 5),
            silent: ctx.opts.num("ag-silent-events", 3),
            soak_s: ctx.opts.num("ag-soak-seconds", 300) as u64,
            rate: ctx.opts.num("ag-soak-rate", 20).max(1) as f64,
            responders: ctx.opts.num("ag-responders", 20).clamp(1, 99),
            probe: Duration::from_millis(ctx.opts.num("ag-probe-ms", 100).max(10) as u64),
            plugin_adds: ctx.opts.num("ag-plugin-adds", 6),
        })
    }
}

fn fake_node(k: usize) -> Res<FakeNode> {
    FakeNode::new(
        NETWORK,
        &format!("agfake{}", k + 1),
        &format!("10.252.{}.0/21", 32 + 8 * k),
        &format!("10.253.0.{}", 101 + k),
    )
}

/// A WireGuard key pair: (private base64, public base64). The public key from `wg pubkey`.
fn keypair(ctx: &Ctx) -> Res<(String, String)> {
    let mut k = random(32)?;
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    let private = b64(&k);
    let public = exec::sh(
        &ctx.wgtool,
        &["pubkey"],
        Some(format!("{private}\n").as_bytes()),
    )?;
    Ok((private, public.trim().to_string()))
}

fn hex_of(base64: &str) -> Res<String> {
    unb64(base64)
        .filter(|k| k.len() == 32)
        .map(|k| uapi::hex(&k))
        .ok_or_else(|| format!("not a key: {base64}"))
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kb: Option<u64>) -> Value {
    kb.map_or(Value::Null, |kb| json!(round(kb as f64 / 1024.0, 1)))
}

/// The node's links as the agent writes them: its pod links in the order it lists its store
/// directory (`read_dir`), then the node gateway. (host link names, hex public keys)
fn local_links(dir: &Path) -> Res<(Vec<String>, Vec<String>)> {
    let (mut hosts, mut keys) = (Vec::new(), Vec::new());
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.push(dir.join("gateway.json"));
    for (i, path) in files.iter().enumerate() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let is_record = name.ends_with(".json") && !name.starts_with('.') && name.contains(':');
        if !is_record && i + 1 < files.len() {
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
        let record: Value = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        if is_record && record["state"] != "ready" {
            continue;
        }
        let host = record["hostName"]
            .as_str()
            .ok_or("record without hostName")?;
        let key = record["publicKey"].as_str().ok_or("record without key")?;
        hosts.push(host.to_string());
        keys.push(hex_of(key)?);
    }
    Ok((hosts, keys))
}

/// Every link read over UAPI (two readers); with `watch`, also on how many links that peer
/// has had a handshake.
fn snapshot(hosts: &[String], watch: Option<&str>) -> Res<(Vec<Peers>, usize)> {
    let half = hosts.len().div_ceil(2).max(1);
    let parts: Vec<Res<(Vec<Peers>, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .chunks(half)
            .map(|chunk| {
                s.spawn(move || -> Res<(Vec<Peers>, usize)> {
                    let mut out = Vec::new();
                    let mut shaken = 0;
                    for host in chunk {
                        let text = uapi::get_text(host)?;
                        if watch.is_some_and(|key| handshake_done(&text, key)) {
                            shaken += 1;
                        }
                        out.push(uapi::parse(&text).map_err(|e| format!("{host}: {e}"))?);
                    }
                    Ok((out, shaken))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("reader panicked".into())))
            .collect()
    });
    let mut all = Vec::new();
    let mut shaken = 0;
    for part in parts {
        let (peers, n) = part?;
        all.extend(peers);
        shaken += n;
    }
    Ok((all, shaken))
}

/// Whether peer `key` (hex) of a `get=1` answer has had a handshake.
fn handshake_done(text: &str, key: &str) -> bool {
    let needle = format!("public_key={key}\n");
    let Some(at) = text.find(&needle) else {
        return false;
    };
    text[at + needle.len()..]
        .lines()
        .take_while(|l| !l.starts_with("public_key="))
        .any(|l| l.starts_with("last_handshake_time_sec=") && l != "last_handshake_time_sec=0")
}

fn differences(before: &[Peers], after: &[Peers]) -> usize {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| uapi::differences(b, a))
        .sum::<usize>()
        + before.len().abs_diff(after.len())
}

/// CPU ticks of each live thread of `pid`: tid → (name, ticks).
fn thread_ticks(pid: i32) -> HashMap<i32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.insert(tid, (comm.trim().to_string(), ticks));
    }
    out
}

/// Where a process's CPU went between two thread samples (ms): the reconciler thread, the
/// async runtime (tokio workers and the main thread), and the rest (other threads, and those
/// that ended in between: the handshake follow-ups), from the process total.
fn split(
    pid: i32,
    before: &HashMap<i32, (String, u64)>,
    after: &HashMap<i32, (String, u64)>,
    total_ms: f64,
) -> [f64; 3] {
    let tick = 1000.0 / cluster::clk_tck();
    let (mut reconciler, mut runtime) = (0.0, 0.0);
    for (tid, (name, ticks)) in after {
        let delta = ticks.saturating_sub(before.get(tid).map_or(0, |b| b.1)) as f64 * tick;
        if name == "reconciler" {
            reconciler += delta;
        } else if *tid == pid || name.starts_with("tokio") {
            runtime += delta;
        }
    }
    [
        reconciler,
        runtime,
        (total_ms - reconciler - runtime).max(0.0),
    ]
}

/// Samples of what the agent's threads are doing, by kind of thread (reconciler, handshake
/// follow-ups, async runtime, other): waiting for a flock, waiting for a UAPI answer (a unix
/// socket read), running, or waiting for something else (idle).
#[derive(Default)]
struct ThreadStates {
    samples: u64,
    /// kind → [flock, uapi, running, other, thread samples]
    counts: BTreeMap<&'static str, [u64; 5]>,
}

impl ThreadStates {
    fn sample(&mut self, pid: i32) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        self.samples += 1;
        for task in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
            let comm = read("comm");
            let comm = comm.trim();
            let wchan = read("wchan");
            let stat = read("stat");
            let running = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                == Some("R");
            let main = task.file_name().to_str() == Some(&pid.to_string());
            let kind = match comm {
                "reconciler" => "reconciler",
                "handshakes" => "handshake follow-ups",
                c if main || c.starts_with("tokio") => "async runtime",
                _ => "other",
            };
            let state = if wchan.contains("locks_lock") {
                0
            } else if wchan.starts_with("unix_stream") {
                1
            } else if running {
                2
            } else {
                3
            };
            let c = self.counts.entry(kind).or_default();
            c[state] += 1;
            c[4] += 1;
        }
    }

    fn report(&self) -> Value {
        let mut out = json!({ "samples": self.samples });
        for (kind, c) in &self.counts {
            let share = |i: usize| round(c[i] as f64 * 100.0 / c[4].max(1) as f64, 1);
            out[*kind] = json!({
                "threads_mean": round(c[4] as f64 / self.samples.max(1) as f64, 2),
                "flock_wait_percent": share(0),
                "uapi_wait_percent": share(1),
                "running_percent": share(2),
                "other_wait_percent": share(3),
            });
        }
        out
    }
}

/// The agent's default `--metrics-listen`.
const METRICS: &str = "127.0.0.1:9766";
/// Scrapes timed, one after the other, with the agent otherwise idle.
const SCRAPES: usize = 20;

struct Scrapes {
    ms: Vec<f64>,
    bytes: usize,
    links: usize,
    /// The fewest links a scrape read in time (`wgcni_link_up 1`).
    read: usize,
}

/// The links a scrape reads: every pod link listed, and the gateway.
fn links_expected(hosts: &[String]) -> usize {
    hosts.len()
}

/// Time `SCRAPES` scrapes of the agent's `/metrics` (each lists the store and reads every
/// link's device); each must answer 200. Counts the links each read in time.
fn scrape_metrics(c: &Cluster, links: usize) -> Res<Scrapes> {
    let mut out = Scrapes {
        ms: Vec::new(),
        bytes: 0,
        links,
        read: links,
    };
    for _ in 0..SCRAPES {
        let t = Instant::now();
        let (status, body) = cluster::in_netns(&c.nodes[0].netns, || {
            cluster::http(METRICS, "GET", "/metrics", "", Duration::from_secs(10))
        })??;
        out.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let up = body
            .lines()
            .filter(|l| l.starts_with("wgcni_link_up{") && l.ends_with(" 1"))
            .count();
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        // A link not read within the scrape's bounds is a figure, not a failure.
        out.read = out.read.min(up);
        out.bytes = body.len();
    }
    Ok(out)
}

/// The agent's /readyz figures: (reconciler jobs, the last one's ms, remote peers).
fn readyz(c: &Cluster) -> Res<(u64, u64, u64)> {
    let (_, body) = c.agent_http(0, "/readyz")?;
    let number_before = |marker: &str| -> Option<u64> {
        let at = body.find(marker)?;
        body[..at].split_whitespace().last()?.parse().ok()
    };
    let last_ms = body
        .find("reconciles, the last ")
        .and_then(|at| body[at + 21..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((
        number_before(" reconciles").unwrap_or(0),
        last_ms,
        number_before(" remote peers").unwrap_or(0),
    ))
}

/// Wait until the agent is quiet: no CPU tick for 500 ms, at least `min` after `t0` (20 s at
/// most). Its ticks then.
fn settle(pid: i32, t0: Instant, min: Duration) -> Res<u64> {
    let mut last = cpu_ticks(pid).ok_or("agent gone")?;
    let mut still = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu_ticks(pid).ok_or("agent gone")?;
        if now != last {
            last = now;
            still = Instant::now();
        }
        if (t0.elapsed() >= min && still.elapsed() >= Duration::from_millis(500))
            || t0.elapsed() > Duration::from_secs(20)
        {
            return Ok(last);
        }
    }
}

/// Until every link's `get` answer satisfies `done`: (ms from `t0` until the last link was
/// seen to, links that were not yet when the last-written one was), None after 60 s.
///
/// A `get` of a link with thousands of peers takes tens of ms, so reading every link in turn
/// would measure the reads. The agent writes its links in order, the gateway (the last of
/// `hosts`) last: that one is polled (every 2 ms at first, then every 5 % of the time waited,
/// so that polling does not compete with the agent for the CPU), then every other link is
/// read once, and one not there yet is polled until it is.
fn until_all(
    hosts: &[String],
    t0: Instant,
    done: impl Fn(&str) -> bool,
) -> Res<Option<(f64, usize)>> {
    let poll = |host: &str| -> Res<Option<f64>> {
        loop {
            if done(&uapi::get_text(host)?) {
                return Ok(Some(ms(t0.elapsed())));
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Ok(None);
            }
            std::thread::sleep((t0.elapsed() / 20).max(Duration::from_millis(2)));
        }
    };
    let Some((gateway, pods)) = hosts.split_last() else {
        return Ok(Some((0.0, 0)));
    };
    let Some(mut last) = poll(gateway)? else {
        return Ok(None);
    };
    let mut late = 0;
    for host in pods {
        if !done(&uapi::get_text(host)?) {
            late += 1;
            match poll(host)? {
                Some(t) => last = last.max(t),
                None => return Ok(None),
            }
        }
    }
    Ok(Some((last, late)))
}

enum Expect {
    Has(String),
    Lacks(String),
}

/// One event's figures.
#[derive(Default, Clone)]
struct Sample {
    put_ms: f64,
    wall_ms: Option<f64>,
    cpu_ms: f64,
    split: [f64; 3],
    writes: usize,
    jobs: u64,
    last_job_ms: u64,
    handshakes: usize,
    /// Links without the change when the gateway (written last) had it.
    late_links: usize,
    /// From the put until the agent was quiet; reading every link afterwards (bench costs).
    settled_ms: f64,
    read_ms: f64,
}

struct Bench<'c, 'a> {
    c: &'c Cluster<'a>,
    pid: i32,
    hosts: Vec<String>,
    state: Vec<Peers>,
    tick_ms: f64,
}

impl Bench<'_, '_> {
    /// Apply `steps` (each a transaction, then a wait for what it should do), then wait for
    /// quiet, then read every link again.
    fn event(
        &mut self,
        steps: Vec<(Vec<Value>, Expect)>,
        min: Duration,
        watch: Option<&str>,
    ) -> Res<Sample> {
        let (jobs0, _, _) = readyz(self.c)?;
        let threads0 = thread_ticks(self.pid);
        let ticks0 = cpu_ticks(self.pid).ok_or("agent gone")?;
        let t0 = Instant::now();
        let mut sample = Sample::default();
        for (i, (ops, expect)) in steps.into_iter().enumerate() {
            let t = Instant::now();
            self.c.txn(ops)?;
            if i == 0 {
                sample.put_ms = ms(t.elapsed());
            }
            let seen = match expect {
                Expect::Has(key) => {
                    let needle = format!("public_key={key}\n");
                    until_all(&self.hosts, t0, |text| text.contains(&needle))?
                }
                Expect::Lacks(key) => {
                    let needle = format!("public_key={key}\n");
                    until_all(&self.hosts, t0, |text| !text.contains(&needle))?
                }
            };
            sample.wall_ms = seen.map(|(wall, _)| wall);
            sample.late_links = seen.map_or(0, |(_, late)| late);
        }
        let ticks1 = settle(self.pid, t0, min)?;
        let threads1 = thread_ticks(self.pid);
        sample.cpu_ms = (ticks1 - ticks0) as f64 * self.tick_ms;
        sample.split = split(self.pid, &threads0, &threads1, sample.cpu_ms);
        sample.settled_ms = ms(t0.elapsed());
        let read = Instant::now();
        let (after, shaken) = snapshot(&self.hosts, watch)?;
        sample.read_ms = ms(read.elapsed());
        sample.writes = differences(&self.state, &after);
        sample.handshakes = shaken;
        self.state = after;
        let (jobs1, last_ms, _) = readyz(self.c)?;
        sample.jobs = jobs1 - jobs0;
        sample.last_job_ms = last_ms;
        Ok(sample)
    }
}

/// Per event kind: summaries of a list of samples.
fn summarize(samples: &[Sample], expected_writes: usize) -> Value {
    let pick = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { samples.iter().map(f).collect() };
    let cpu = pick(&|s| s.cpu_ms);
    let walls: Vec<f64> = samples.iter().filter_map(|s| s.wall_ms).collect();
    let writes: Vec<usize> = samples.iter().map(|s| s.writes).collect();
    let n = samples.len().max(1) as f64;
    json!({
        "n": samples.len(),
        "cpu_ms": summary(&cpu, 1),
        "cpu_ms_mean": round(cpu.iter().sum::<f64>() / n, 1),
        "cpu_split_ms_mean": {
            "reconciler": round(samples.iter().map(|s| s.split[0]).sum::<f64>() / n, 1),
            "runtime": round(samples.iter().map(|s| s.split[1]).sum::<f64>() / n, 1),
            "other": round(samples.iter().map(|s| s.split[2]).sum::<f64>() / n, 1),
        },
        "wall_ms": summary(&walls, 1),
        "wall_timeouts": samples.iter().filter(|s| s.wall_ms.is_none()).count(),
        "links_late_after_gateway": samples.iter().map(|s| s.late_links).sum::<usize>(),
        "put_ms": summary(&pick(&|s| s.put_ms), 1),
        "writes": {
            "expected": expected_writes,
            "min": writes.iter().min(),
            "max": writes.iter().max(),
            "all_as_expected": writes.iter().all(|w| *w == expected_writes),
        },
        "reconciler_jobs": summary(&pick(&|s| s.jobs as f64), 0),
        "agent_last_job_ms": summary(&pick(&|s| s.last_job_ms as f64), 0),
        "handshakes_done_links": summary(&pick(&|s| s.handshakes as f64), 0),
        "settled_s": summary(&pick(&|s| s.settled_ms / 1000.0), 1),
        "read_all_links_ms": summary(&pick(&|s| s.read_ms), 0),
        "samples": samples.iter().map(|s| json!({
            "cpu_ms": s.cpu_ms, "wall_ms": s.wall_ms.map(|w| round(w, 1)),
            "put_ms": round(s.put_ms, 1), "writes": s.writes, "jobs": s.jobs,
            "last_job_ms": s.last_job_ms, "handshakes": s.handshakes, "late_links": s.late_links,
            "settled_ms": round(s.settled_ms, 0), "read_ms": round(s.read_ms, 0),
            "split_ms": s.split,
        })).collect::<Vec<_>>(),
    })
}

/// wg-cni-wgd devices that answer handshakes for the remote pods of measured events.
struct Responders {
    hosts: Vec<String>,
    daemons: Vec<Background>,
}

impl Responders {
    fn start(c: &mut Cluster, n: usize, peers: &[String]) -> Res<Responders> {
        c.attach(RESPONDER_NS, "r0", "10.253.0.101")?;
        let bin = crate::find_tool("wg-cni-wgd", &["/usr/local/bin/wg-cni-wgd"]);
        let env = vec![(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        let fd = ns::open(RESPONDER_NS)?;
        let mut r = Responders {
            hosts: Vec::new(),
            daemons: Vec::new(),
        };
        for j in 0..n {
            // Fixed names: scripts/bench.sh removes their sockets if it had to kill them.
            let host = format!("wgbagr{j:02}");
            let args = vec!["-f".to_string(), host.clone()];
            let log = c.dir.join(format!("logs/responder{j}.log"));
            let mut spec = Spec::new(&bin, &args, &log);
            spec.env = &env;
            spec.netns = Some(fd.as_raw_fd());
            r.daemons.push(exec::spawn(&spec, c.ctx)?);
            r.hosts.push(host.clone());
            let sock = PathBuf::from(format!("/var/run/wireguard/{host}.sock"));
            wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                sock.exists()
            })
            .ok_or_else(|| format!("responder {host}: no UAPI socket in 10 s"))?;
            c.ip(&["-n", RESPONDER_NS, "link", "set", &host, "up"])?;
            let mut body = format!(
                "private_key={}\nlisten_port={}\nreplace_peers=true\n",
                uapi::hex(&random(32)?),
                RESPONDER_PORT + j as u16
            );
            for key in peers {
                body.push_str(&format!("public_key={key}\n"));
            }
            uapi::set(&host, &body)?;
        }
        Ok(r)
    }

    /// Responder `j` speaks for the pod whose private key is `private` (base64).
    fn take_key(&self, j: usize, private: &str) -> Res<()> {
        uapi::set(
            &self.hosts[j],
            &format!("private_key={}\n", hex_of(private)?),
        )
    }
}

impl Drop for Responders {
    fn drop(&mut self) {
        for d in &self.daemons {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(d.pid(), libc::SIGTERM) };
        }
        for d in self.daemons.drain(..) {
            d.finish(Duration::from_secs(3));
        }
    }
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    if ctx.backend != "userspace" {
        return Err("userspace backend only (native)".into());
    }
    let k = Knobs::read(ctx)?;
    let mut c = Cluster::new(
        ctx,
        Layout {
            tag: "ag",
            network: NETWORK,
            node_prefix: "agnode",
            nodes: 1,
            dir: "agent",
            peering: "mesh",
        },
    )?;
    if c.agent_flags.is_empty() {
        c.agent_flags = vec!["--resync-interval".into(), "3600".into()];
    }
    let phase_started = Instant::now();
    let mut out = json!({
        "backend": "userspace",
        "daemon": "wg-cni-wgd",
        "agent_flags": c.agent_flags.join(" "),
        "records": k.records,
        "remote_nodes": k.nodes,
        "local_pods": k.links,
        "links": k.links + 1,
        "probe_ms": k.probe.as_millis() as u64,
    });
    c.start_agent(0)?;
    c.wait_ready(0, Duration::from_secs(60))
        .ok_or("agent not ready in 60 s")?;
    let pid = c.nodes[0].agent_pid.ok_or("no agent pid")?;

    // ------------------------------------------------------------ setup
    let fakes: Vec<FakeNode> = (0..k.nodes).map(fake_node).collect::<Res<_>>()?;
    let lease = c.grant_lease(3600)?;
    for fake in &fakes {
        fake.announce(&c, &lease, Some(&b64(&random(32)?)))?;
    }
    let mut add_ms = Vec::new();
    for p in 0..k.links {
        let pns = format!("wgbench-ag-p{p}");
        c.pod_ns(&pns)?;
        let e = c.cni(0, "ADD", &format!("agpod{p:03}"), &pns, None)?;
        if !e.ok() {
            return Err(format!("ADD of local pod {p}: {}", e.why()));
        }
        add_ms.push(e.us / 1000.0);
        c.note_daemons();
    }
    crate::log(format!(
        "[{}] agent: {} local pods added",
        ctx.label, k.links
    ));
    let load_started = Instant::now();
    for (i, fake) in fakes.iter().enumerate() {
        let n = k.records / k.nodes + usize::from(i < k.records % k.nodes);
        fake.put_records(&c, 0..n, 2, |j| format!("agrec{i}x{j:04}"))?;
    }
    let put_s = load_started.elapsed().as_secs_f64();
    let (hosts, keys) = local_links(&c.nodes[0].own_dir())?;
    if hosts.len() != k.links + 1 {
        return Err(format!(
            "{} local links found, {} expected",
            hosts.len(),
            k.links + 1
        ));
    }
    // A pod link: the other pods, the gateway, every record and every remote gateway; the
    // gateway: every pod, every record, every remote gateway. As many either way.
    let per_link = k.links + k.records + k.nodes;
    let load_limit = ctx.opts.num("ag-load-timeout", 600) as u64;
    let loaded = wait_until(
        Duration::from_secs(load_limit),
        Duration::from_secs(1),
        || {
            hosts.iter().all(|h| {
                uapi::get_text(h)
                    .map(|t| t.matches("public_key=").count() >= per_link)
                    .unwrap_or(false)
            })
        },
    );
    let Some(_) = loaded else {
        let counts: Vec<usize> = hosts
            .iter()
            .map(|h| {
                uapi::get_text(h)
                    .map(|t| t.matches("public_key=").count())
                    .unwrap_or(0)
            })
            .collect();
        let (_, readyz) = c.agent_http(0, "/readyz")?;
        return Err(format!(
            "the links did not get every record's peer in {load_limit} s: {per_link} expected, \
             links have {counts:?}; /readyz: {}",
            readyz.trim()
        ));
    };
    let load_s = load_started.elapsed().as_secs_f64();
    crate::log(format!(
        "[{}] agent: {} records on every link after {load_s:.1} s",
        ctx.label, k.records
    ));
    let t = Instant::now();
    settle(pid, t, Duration::from_secs(2))?;
    let idle_t0 = cpu_ticks(pid).ok_or("agent gone")?;
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu = (cpu_ticks(pid).ok_or("agent gone")? - idle_t0) as f64
        / cluster::clk_tck()
        / idle_started.elapsed().as_secs_f64()
        * 100.0;
    let daemons: Vec<f64> = c
        .recorded_daemons()
        .iter()
        .filter_map(|(p, _)| proc_status_kb(*p as i32, "VmRSS:"))
        .map(|kb| kb as f64 / 1024.0)
        .collect();
    let (_, _, remote_peers) = readyz(&c)?;
    let rss_before_scrapes = proc_status_kb(pid, "VmRSS:");
    let threads_before_scrapes = proc_status_kb(pid, "Threads:");
    let scrapes = scrape_metrics(&c, links_expected(&hosts))?;
    out["steady"] = json!({
        "local_pod_add_ms": summary(&add_ms, 1),
        "records_put_seconds": round(put_s, 2),
        "records_on_every_link_seconds": round(load_s, 1),
        "peers_per_link": per_link,
        "agent_remote_peers": remote_peers,
        "agent_rss_mib": mib(rss_before_scrapes),
        "agent_threads": threads_before_scrapes,
        "agent_rss_after_scrapes_mib": mib(proc_status_kb(pid, "VmRSS:")),
        "agent_hwm_mib": mib(proc_status_kb(pid, "VmHWM:")),
        "agent_cpu_idle_percent": round(idle_cpu, 2),
        "daemons": daemons.len(),
        "daemon_rss_mib": summary(&daemons, 1),
        "daemons_rss_gib_total": round(daemons.iter().sum::<f64>() / 1024.0, 2),
        "metrics_scrape_ms": summary(&scrapes.ms, 1),
        "metrics_scrape_kib": round(scrapes.bytes as f64 / 1024.0, 1),
        "metrics_links": scrapes.links,
        "metrics_links_read_min": scrapes.read,
    });

    // ------------------------------------------------------------ events
    let setup_s = phase_started.elapsed().as_secs_f64();
    let events_started = Instant::now();
    c.pod_ns(PROBE_POD_NS)?;
    let responders = Responders::start(&mut c, k.responders, &keys)?;
    let c = &c;
    let mut b = Bench {
        c,
        pid,
        state: snapshot(&hosts, None)?.0,
        hosts,
        tick_ms: 1000.0 / cluster::clk_tck(),
    };
    let links = b.hosts.len();
    let (mut adds, mut dels, mut flaps) = (Vec::new(), Vec::new(), Vec::new());
    let (mut silent_adds, mut silent_dels) = (Vec::new(), Vec::new());
    let add_window = Duration::from_millis(1400);
    let del_window = Duration::from_millis(300);
    let event = |b: &mut Bench,
                 fake: &FakeNode,
                 i: usize,
                 responder: Option<usize>|
     -> Res<(Sample, Sample)> {
        let (private, public) = keypair(ctx)?;
        let port = match responder {
            Some(j) => {
                responders.take_key(j, &private)?;
                RESPONDER_PORT + j as u16
            }
            None => 51820,
        };
        let cid = format!("agev{i:03}");
        let record = fake.record(&cid, &fake.address(EVENT_BASE + i)?, &public, port);
        let key = hex_of(&public)?;
        let add = b.event(
            vec![(
                vec![put_op(&fake.link_key(&cid), &record, None)],
                Expect::Has(key.clone()),
            )],
            add_window,
            Some(&key),
        )?;
        let del = b.event(
            vec![(vec![delete_op(&fake.link_key(&cid))], Expect::Lacks(key))],
            del_window,
            None,
        )?;
        Ok((add, del))
    };
    for i in 0..k.events {
        let (add, del) = event(&mut b, &fakes[0], i, Some(i % k.responders))?;
        adds.push(add);
        dels.push(del);
    }
    crate::log(format!(
        "[{}] agent: {} ADD/DEL events measured",
        ctx.label, k.events
    ));
    for i in 0..k.silent {
        let (add, del) = event(&mut b, &fakes[1], i, None)?;
        silent_adds.push(add);
        silent_dels.push(del);
    }
    let flapped = &fakes[1];
    let node_file = c.nodes[0]
        .store()
        .join(NETWORK)
        .join(&flapped.name)
        .join("node.json");
    let stale = |want: bool| {
        wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
            std::fs::read_to_string(&node_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["stale"].as_bool() == Some(want))
        })
        .is_some()
    };
    let mut flap_misses = 0;
    for _ in 0..k.flaps {
        let (jobs0, _, _) = readyz(c)?;
        let threads0 = thread_ticks(pid);
        let ticks0 = cpu_ticks(pid).ok_or("agent gone")?;
        let t0 = Instant::now();
        c.txn(vec![delete_op(&flapped.info_key())])?;
        flap_misses += usize::from(!stale(true));
        c.txn(vec![flapped.info_op(&lease)])?;
        flap_misses += usize::from(!stale(false));
        let wall = ms(t0.elapsed());
        let ticks1 = settle(pid, t0, Duration::from_millis(300))?;
        let threads1 = thread_ticks(pid);
        let cpu_ms = (ticks1 - ticks0) as f64 * b.tick_ms;
        let (after, _) = snapshot(&b.hosts, None)?;
        let writes = differences(&b.state, &after);
        b.state = after;
        let (jobs1, last_ms, _) = readyz(c)?;
        flaps.push(Sample {
            put_ms: 0.0,
            wall_ms: Some(wall),
            cpu_ms,
            split: split(pid, &threads0, &threads1, cpu_ms),
            writes,
            jobs: jobs1 - jobs0,
            last_job_ms: last_ms,
            handshakes: 0,
            late_links: 0,
            settled_ms: ms(t0.elapsed()),
            read_ms: 0.0,
        });
    }
    crate::log(format!(
        "[{}] agent: {} silent events and {} node key flaps measured",
        ctx.label, k.silent, k.flaps
    ));
    out["events"] = json!({
        "add": summarize(&adds, links),
        "del": summarize(&dels, links),
        "silent_add": summarize(&silent_adds, links),
        "silent_del": summarize(&silent_dels, links),
        "flap": summarize(&flaps, 0),
        "flap_wall_is": "from the delete until the mirror's node.json says stale, and after the put again live (the mirror, not the links)",
        "flap_node_file_misses": flap_misses,
    });

    // ------------------------------------------------------------ plugin ADD, idle
    let plugin_add = |tag: &str, i: usize| -> Res<(f64, f64)> {
        let cid = format!("ag{tag}{i:02}");
        let e = c.cni(0, "ADD", &cid, PROBE_POD_NS, None)?;
        if !e.ok() {
            return Err(format!("plugin ADD {cid}: {}", e.why()));
        }
        c.note_daemons();
        let d = c.cni(0, "DEL", &cid, PROBE_POD_NS, e.json().as_ref())?;
        if !d.ok() {
            return Err(format!("plugin DEL {cid}: {}", d.why()));
        }
        Ok((e.us / 1000.0, d.us / 1000.0))
    };
    let (mut idle_add, mut idle_del) = (Vec::new(), Vec::new());
    for i in 0..k.plugin_adds {
        let (a, d) = plugin_add("idle", i)?;
        idle_add.push(a);
        idle_del.push(d);
        settle(pid, Instant::now(), Duration::from_millis(200))?;
    }

    // ------------------------------------------------------------ soak
    let events_s = events_started.elapsed().as_secs_f64();
    let soak_started = Instant::now();
    let mut soak = soak(c, &k, &fakes, &responders, &b.hosts, pid, &plugin_add)?;
    soak["plugin_add_ms"]["idle"] = summary(&idle_add, 1);
    soak["plugin_add_ms"]["idle_samples"] = json!(idle_add);
    soak["plugin_del_ms"]["idle"] = summary(&idle_del, 1);
    out["soak"] = soak;
    out["timings_s"] = json!({
        "setup": round(setup_s, 1),
        "events_and_idle_adds": round(events_s, 1),
        "soak_with_keys_and_check": round(soak_started.elapsed().as_secs_f64(), 1),
    });

    // ------------------------------------------------------------ the agent's log
    let log = c.nodes[0]
        .agent_log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines().map(strip_ansi) {
        // The message without timestamp and fields: after the level, up to the first field.
        let Some((_, text)) = line
            .split_once(" WARN ")
            .or_else(|| line.split_once(" ERROR "))
        else {
            continue;
        };
        let message: Vec<&str> = text
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect();
        *kinds.entry(message.join(" ")).or_default() += 1;
    }
    out["log"] = json!({
        "lease_lost": log.matches("liveness lease lost").count(),
        "warnings_and_errors": kinds.values().sum::<usize>(),
        "kinds": kinds.iter().take(10).map(|(m, n)| json!({"count": n, "line": m})).collect::<Vec<_>>(),
    });
    out["method"] = json!(
        "events one at a time, agent otherwise quiet; CPU = utime+stime of /proc/<pid>/stat \
         (10 ms ticks) from the put until no tick for 500 ms (at least 1.4 s after an ADD, 0.3 s \
         after a DEL); wall = from the put until every link has the peer / no longer has it, \
         read over UAPI: the gateway (written last) polled, then every other link read, and \
         polled if not there yet; writes = (link, peer) configurations that \
         differ between UAPI reads of every link before and after"
    );
    out["run_seconds"] = json!(round(phase_started.elapsed().as_secs_f64(), 1));
    drop(responders);
    Ok(out)
}

/// A plugin ADD and its DEL (a tag for the container ID, a number): their ms.
type PluginAdd<'a> = dyn Fn(&str, usize) -> Res<(f64, f64)> + Sync + 'a;

/// A log line without colour escapes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The soak: events at a bounded rate, with health, lock and plugin probes alongside.
fn soak(
    c: &Cluster,
    k: &Knobs,
    fakes: &[FakeNode],
    responders: &Responders,
    hosts: &[String],
    pid: i32,
    plugin_add: &PluginAdd<'_>,
) -> Res<Value> {
    let fake = &fakes[0];
    let adds_needed = (k.rate * k.soak_s as f64 / 2.0).ceil() as usize + SOAK_LIVE + 2;
    let keys_started = Instant::now();
    let keys: Vec<(String, String)> = (0..adds_needed)
        .map(|_| keypair(c.ctx))
        .collect::<Res<_>>()?;
    crate::log(format!(
        "[{}] agent: {adds_needed} soak keys made in {:.1} s",
        c.ctx.label,
        keys_started.elapsed().as_secs_f64()
    ));
    let ring = 2 * SOAK_LIVE + 2;
    let record_of = |n: usize| -> Res<(String, Value, usize)> {
        let cid = format!("agsoak{n:05}");
        let j = n % responders.hosts.len();
        let record = fake.record(
            &cid,
            &fake.address(SOAK_BASE + n % ring)?,
            &keys[n].1,
            RESPONDER_PORT + j as u16,
        );
        Ok((cid, record, j))
    };
    // The records alive at the start.
    for (n, (private, _)) in keys.iter().enumerate().take(SOAK_LIVE) {
        let (cid, record, j) = record_of(n)?;
        responders.take_key(j, private)?;
        c.txn(vec![put_op(&fake.link_key(&cid), &record, None)])?;
    }
    let last = hex_of(&keys[SOAK_LIVE - 1].1)?;
    let needle = format!("public_key={last}\n");
    until_all(hosts, Instant::now(), |t| t.contains(&needle))?
        .ok_or("the soak's first records did not reach every link in 60 s")?;
    settle(pid, Instant::now(), Duration::from_millis(1500))?;

    let stop = AtomicBool::new(false);
    let period = Duration::from_secs_f64(1.0 / k.rate);
    let soak_for = Duration::from_secs(k.soak_s);
    let lock_path = c.nodes[0].store().join(NETWORK).join(".lock");
    let node_ns = c.nodes[0].netns.clone();
    let etcd_ns = c.etcd_ns();
    let rss_max = std::sync::Mutex::new(0u64);
    let started = Instant::now();
    let ticks0 = cpu_ticks(pid).ok_or("agent gone")?;
    let (events, health, lock, plugin, split_ms, states) = std::thread::scope(|s| {
        // Events: ADD n, DEL n - SOAK_LIVE, alternating; never faster than the rate.
        let ev = s.spawn(|| -> Res<Value> {
            let file = ns::open(&etcd_ns)?;
            enter(&file, &etcd_ns)?;
            let beats: Vec<Value> = fakes.iter().map(FakeNode::heartbeat_op).collect();
            let (mut next, mut next_beat) =
                (Instant::now(), Instant::now() + Duration::from_secs(60));
            let (mut n_add, mut n_del) = (SOAK_LIVE, 0usize);
            let (mut op_ms, mut late_ms, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            let mut count = 0usize;
            while started.elapsed() < soak_for && !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                }
                let t = Instant::now();
                late_ms.push(ms(t.saturating_duration_since(next)));
                let result = if count.is_multiple_of(2) {
                    record_of(n_add).and_then(|(cid, record, j)| {
                        responders.take_key(j, &keys[n_add].0)?;
                        let body =
                            json!({"success": [put_op(&fake.link_key(&cid), &record, None)]});
                        let (status, text) = etcd_post("/v3/kv/txn", &body.to_string())?;
                        etcd_answer("/v3/kv/txn", status, &text)?;
                        n_add += 1;
                        Ok(())
                    })
                } else {
                    let cid = format!("agsoak{n_del:05}");
                    let body = json!({"success": [delete_op(&fake.link_key(&cid))]});
                    etcd_post("/v3/kv/txn", &body.to_string())
                        .and_then(|(status, text)| etcd_answer("/v3/kv/txn", status, &text))
                        .map(|_| n_del += 1)
                };
                op_ms.push(ms(t.elapsed()));
                if let Err(e) = result {
                    errors.push(e);
                    if errors.len() > 20 {
                        break;
                    }
                }
                count += 1;
                next = (next + period).max(t);
                if t >= next_beat {
                    next_beat = t + Duration::from_secs(60);
                    let body = json!({ "success": beats });
                    let _ = etcd_post("/v3/kv/txn", &body.to_string());
                }
            }
            Ok(json!({
                "events": count,
                "adds": n_add - SOAK_LIVE,
                "dels": n_del,
                "live_from": n_del,
                "live_to": n_add,
                "rate_achieved": round(count as f64 / started.elapsed().as_secs_f64(), 2),
                "etcd_op_ms": summary(&op_ms, 1),
                "late_ms": summary(&late_ms, 1),
                "errors": errors.iter().take(3).collect::<Vec<_>>(),
                "error_count": errors.len(),
            }))
        });
        // /healthz every probe interval, from inside the node's namespace.
        let hp = s.spawn(|| -> Res<(Vec<f64>, usize)> {
            let file = ns::open(&node_ns)?;
            enter(&file, &node_ns)?;
            let (mut lat, mut failures) = (Vec::new(), 0);
            let mut next = Instant::now();
            while started.elapsed() < soak_for && !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match cluster::http(HEALTH, "GET", "/healthz", "", Duration::from_secs(2)) {
                    Ok((200, _)) => lat.push(ms(t.elapsed())),
                    _ => failures += 1,
                }
                next += k.probe;
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            Ok((lat, failures))
        });
        // The network's flock, as the plugin's ADD takes it.
        let lp = s.spawn(|| -> Res<Vec<f64>> {
            let mut waits = Vec::new();
            let mut next = Instant::now();
            while started.elapsed() < soak_for && !stop.load(Ordering::Relaxed) {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| format!("{}: {e}", lock_path.display()))?;
                let t = Instant::now();
                // SAFETY: flock on a file we hold open.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    return Err(format!("flock: {}", std::io::Error::last_os_error()));
                }
                waits.push(ms(t.elapsed()));
                // SAFETY: as above.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
                drop(file);
                next += k.probe;
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            Ok(waits)
        });
        // What the agent's threads are doing, every 10 ms.
        let sp = s.spawn(|| {
            let mut states = ThreadStates::default();
            while started.elapsed() < soak_for && !stop.load(Ordering::Relaxed) {
                states.sample(pid);
                std::thread::sleep(Duration::from_millis(10));
            }
            states
        });
        // Here: plugin ADDs spread over the soak, and where the agent's CPU goes.
        let mut adds = (Vec::new(), Vec::new(), Vec::new());
        let mut split_ms = [0.0f64; 3];
        let mut threads = thread_ticks(pid);
        let mut total = cpu_ticks(pid).unwrap_or(0);
        let mut done_adds = 0;
        while started.elapsed() < soak_for {
            std::thread::sleep(Duration::from_secs(1));
            let due = soak_for.mul_f64((done_adds + 1) as f64 / (k.plugin_adds + 1) as f64);
            if done_adds < k.plugin_adds && started.elapsed() >= due {
                match plugin_add("soak", done_adds) {
                    Ok((a, d)) => {
                        adds.0.push(a);
                        adds.1.push(d);
                    }
                    Err(e) => adds.2.push(e),
                }
                done_adds += 1;
            }
            let now_threads = thread_ticks(pid);
            let now_total = cpu_ticks(pid).unwrap_or(total);
            let part = split(
                pid,
                &threads,
                &now_threads,
                (now_total - total) as f64 * 1000.0 / cluster::clk_tck(),
            );
            for (sum, x) in split_ms.iter_mut().zip(part) {
                *sum += x;
            }
            threads = now_threads;
            total = now_total;
            if let Some(kb) = proc_status_kb(pid, "VmRSS:") {
                let mut max = rss_max.lock().unwrap();
                *max = (*max).max(kb);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let join = |r: std::thread::Result<Res<Value>>| {
            r.unwrap_or_else(|_| Err("soak thread panicked".into()))
        };
        (
            join(ev.join()),
            hp.join().unwrap_or_else(|_| Err("probe panicked".into())),
            lp.join().unwrap_or_else(|_| Err("probe panicked".into())),
            adds,
            split_ms,
            sp.join().unwrap_or_default(),
        )
    });
    let soak_s = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(pid).ok_or("agent gone")? - ticks0) as f64 / cluster::clk_tck();
    let events = events?;
    let (health, health_failures) = health?;
    let lock = lock?;
    // Afterwards: quiet, then every link holds exactly the records alive.
    settle(pid, Instant::now(), Duration::from_secs(2))?;
    let live_from = events["live_from"].as_u64().unwrap_or(0) as usize;
    let live_to = events["live_to"].as_u64().unwrap_or(0) as usize;
    let live = live_to - live_from;
    let mut mismatches = Vec::new();
    let (state, _) = snapshot(hosts, None)?;
    let base = k.links + k.records + k.nodes;
    let gone: Vec<String> = (live_from.saturating_sub(3)..live_from)
        .filter_map(|n| hex_of(&keys[n].1).ok())
        .collect();
    let alive: Vec<String> = (live_from..live_to)
        .filter_map(|n| hex_of(&keys[n].1).ok())
        .collect();
    for (host, peers) in hosts.iter().zip(&state) {
        let want = base + live;
        if peers.len() != want
            || alive.iter().any(|key| !peers.contains_key(key))
            || gone.iter().any(|key| peers.contains_key(key))
        {
            mismatches.push(format!("{host}: {} peers, {want} expected", peers.len()));
        }
    }
    let (add_ms, del_ms, add_errors) = plugin;
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    Ok(json!({
        "seconds": round(soak_s, 1),
        "rate_target": k.rate,
        "events": events,
        "healthz_ms": summary(&health, 2),
        "healthz_max_ms": round(max(&health), 2),
        "healthz_probes": health.len() + health_failures,
        "healthz_failures": health_failures,
        "lock_wait_ms": summary(&lock, 2),
        "lock_wait_max_ms": round(max(&lock), 2),
        "lock_probes": lock.len(),
        "plugin_add_ms": {"soak": summary(&add_ms, 1), "soak_samples": add_ms},
        "plugin_del_ms": {"soak": summary(&del_ms, 1)},
        "plugin_errors": add_errors,
        "agent_cpu_percent": round(cpu_s / soak_s * 100.0, 1),
        "agent_cpu_split_percent": {
            "reconciler": round(split_ms[0] / 10.0 / soak_s, 1),
            "runtime": round(split_ms[1] / 10.0 / soak_s, 1),
            "other": round(split_ms[2] / 10.0 / soak_s, 1),
        },
        "agent_rss_mib_max": mib(Some(*rss_max.lock().unwrap())),
        "agent_rss_mib_end": mib(proc_status_kb(pid, "VmRSS:")),
        "agent_hwm_mib_end": mib(proc_status_kb(pid, "VmHWM:")),
        "links_consistent_after": mismatches.is_empty(),
        "link_mismatches": mismatches.iter().take(5).collect::<Vec<_>>(),
        "link_mismatch_count": mismatches.len(),
        "live_soak_records_after": live,
        "thread_states": states.report(),
    }))
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".to_string(),
    }
}

/// Issue 20's bars: (target, measured, met, short name for the missed list).
pub fn targets(a: &Value) -> Vec<(String, String, Option<bool>, String)> {
    let mut out = Vec::new();
    let s = &a["soak"];
    let p99 = s["healthz_ms"]["p99"].as_f64();
    let failures = s["healthz_failures"].as_u64().unwrap_or(0);
    out.push((
        format!(
            "agent `/healthz` p99 < 100 ms under {} remote events/s (native, {} records, {} links)",
            f(&s["rate_target"], 0),
            a["records"],
            a["links"]
        ),
        format!(
            "{} ms (max {} ms, {failures} of {} probes failed)",
            f(&s["healthz_ms"]["p99"], 1),
            f(&s["healthz_max_ms"], 1),
            s["healthz_probes"]
        ),
        p99.map(|x| x < 100.0 && failures == 0),
        "agent healthz under events".to_string(),
    ));
    let lost = a["log"]["lease_lost"].as_u64();
    out.push((
        "no liveness lease lost during the agent phase (soak included)".to_string(),
        lost.map(|n| format!("{n} lost")).unwrap_or("–".into()),
        lost.map(|n| n == 0),
        "agent lease".to_string(),
    ));
    let e = &a["events"];
    let range = |kind: &str| {
        let w = &e[kind]["writes"];
        if w["min"] == w["max"] {
            format!("{kind} {}", w["min"])
        } else {
            format!("{kind} {}–{}", w["min"], w["max"])
        }
    };
    let kinds = ["add", "del", "silent_add", "silent_del", "flap"];
    let ok = kinds
        .iter()
        .filter(|k| e[**k]["n"].as_u64().unwrap_or(0) > 0)
        .map(|k| e[*k]["writes"]["all_as_expected"].as_bool())
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().all(|b| *b));
    out.push((
        format!(
            "WireGuard writes read from the links: one per link ({}) per remote pod ADD or DEL, none per node key flap",
            a["links"]
        ),
        kinds
            .iter()
            .filter(|k| e[**k]["n"].as_u64().unwrap_or(0) > 0)
            .map(|k| range(k))
            .collect::<Vec<_>>()
            .join(", "),
        ok,
        "agent writes per event".to_string(),
    ));
    out
}

/// The results.md section of this phase.
pub fn report(a: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## One agent under remote events (native, userspace backend)\n"
    );
    if let Some(e) = a["error"].as_str() {
        let _ = writeln!(md, "The phase failed: {e}\n");
        return md;
    }
    let st = &a["steady"];
    let _ = writeln!(
        md,
        "Issue 20's case: one node's `wg-cni agent` ({}) with {} local pods on wg-cni-wgd plus \
         its node gateway ({} links), mirroring {} remote pod records of {} fake nodes (each a \
         claim, a node key on a lease, a heartbeat, an address claim and a gateway record, put \
         straight into etcd), so every link holds {} peers. **2,000 records, not 10,000**: a \
         wg-cni-wgd link keeps ~26 KiB per peer, so 101 links × 10,000 peers would need ~26 GB \
         of daemon memory, more than this machine has; here the daemons hold {} GiB. Measured by \
         `wg-cni-bench agent` (bench/driver/src/agent.rs) in {} s.\n",
        a["agent_flags"].as_str().unwrap_or("?"),
        a["local_pods"],
        a["links"],
        a["records"],
        a["remote_nodes"],
        st["peers_per_link"],
        f(&st["daemons_rss_gib_total"], 1),
        f(&a["phase_seconds"], 0),
    );
    let e = &a["events"];
    let _ = writeln!(
        md,
        "**Per event**, one at a time with the agent otherwise quiet. CPU: the agent's \
         utime+stime (/proc/<pid>/stat, 10 ms ticks) from the etcd put until it is quiet (no \
         tick for 500 ms, at least 1.4 s after an ADD: the handshake follow-ups), split by \
         thread (reconciler; async runtime; other, mostly the handshake follow-up threads). \
         Wall: from the put until every link has the peer (DEL: no longer has it), read over \
         UAPI (the gateway, which the agent writes last, polled; then every other link read, \
         and polled if not there yet). Writes: every link read before and after, (link, \
         peer) configurations that differ (key, endpoint, allowed IPs, keep-alive). A remote pod \
         that answers: a wg-cni-wgd device on its node's address holds the pod's key.\n"
    );
    let _ = writeln!(
        md,
        "| event | n | agent CPU ms p50 / p99 (mean) | CPU ms reconciler / runtime / other (mean) | wall ms p50 / p99 (max) | writes (expected) | reconciler jobs p50 | links whose handshake with the new pod completed (p50) |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, key) in [
        ("remote pod ADD (pod answers)", "add"),
        ("remote pod DEL", "del"),
        ("remote pod ADD (pod never answers)", "silent_add"),
        ("its DEL", "silent_del"),
        ("node key flap (delete, put again)", "flap"),
    ] {
        let x = &e[key];
        if x["n"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let w = &x["writes"];
        let writes = if w["min"] == w["max"] {
            format!("{} ({})", w["min"], w["expected"])
        } else {
            format!("{}–{} ({})", w["min"], w["max"], w["expected"])
        };
        let wall = if key == "flap" {
            "–".to_string()
        } else {
            format!(
                "{} / {} ({})",
                f(&x["wall_ms"]["p50"], 0),
                f(&x["wall_ms"]["p99"], 0),
                f(&x["wall_ms"]["max"], 0)
            )
        };
        let handshakes = if key.ends_with("add") {
            f(&x["handshakes_done_links"]["p50"], 0)
        } else {
            "–".into()
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} / {} ({}) | {} / {} / {} | {wall} | {writes} | {} | {handshakes} |",
            x["n"],
            f(&x["cpu_ms"]["p50"], 0),
            f(&x["cpu_ms"]["p99"], 0),
            f(&x["cpu_ms_mean"], 1),
            f(&x["cpu_split_ms_mean"]["reconciler"], 1),
            f(&x["cpu_split_ms_mean"]["runtime"], 1),
            f(&x["cpu_split_ms_mean"]["other"], 1),
            f(&x["reconciler_jobs"]["p50"], 0),
        );
    }
    let _ = writeln!(
        md,
        "\nThe agent's own account (/readyz, \"the last X ms\"): its reconciler job for one ADD \
         took p50 {} ms, for one DEL p50 {} ms.\n",
        f(&e["add"]["agent_last_job_ms"]["p50"], 0),
        f(&e["del"]["agent_last_job_ms"]["p50"], 0),
    );
    let _ = writeln!(
        md,
        "**Memory** with every record mirrored: agent VmRSS {} MiB ({} threads; before the \
         scrapes below), idle CPU {} %; the {} links' daemons hold p50 {} MiB each, {} GiB \
         together. Records put in {} s; on every link {} s after the first put (the local pods \
         were added before, {} ms p50 each).\n",
        f(&st["agent_rss_mib"], 1),
        st["agent_threads"],
        f(&st["agent_cpu_idle_percent"], 2),
        st["daemons"],
        f(&st["daemon_rss_mib"]["p50"], 1),
        f(&st["daemons_rss_gib_total"], 2),
        f(&st["records_put_seconds"], 1),
        f(&st["records_on_every_link_seconds"], 1),
        f(&st["local_pod_add_ms"]["p50"], 0),
    );
    let _ = writeln!(
        md,
        "**`/metrics`** at {} links (every local pod's and the gateway's, read in each scrape; \
         per link only): a scrape took p50 {} ms, p99 {} ms ({} scrapes, {} KiB each; the \
         fewest links one read in time: {}); the agent's VmRSS after them {} MiB (VmHWM {} \
         MiB).\n",
        st["metrics_links"],
        f(&st["metrics_scrape_ms"]["p50"], 1),
        f(&st["metrics_scrape_ms"]["p99"], 1),
        st["metrics_scrape_ms"]["n"],
        f(&st["metrics_scrape_kib"], 1),
        st["metrics_links_read_min"],
        f(&st["agent_rss_after_scrapes_mib"], 1),
        f(&st["agent_hwm_mib"], 1),
    );
    let s = &a["soak"];
    let ev = &s["events"];
    let _ = writeln!(
        md,
        "**Soak**: {} s of remote events at {} per second (achieved {}: {} ADDs and {} DELs, \
         each ADD's record deleted 10 ADDs later; etcd put p99 {} ms), while `/healthz` was \
         probed and the network's flock (the one the plugin's ADD takes) taken and released \
         every {} ms, and plugin ADDs (+DEL) ran, as many as with the agent idle before:\n",
        f(&s["seconds"], 0),
        f(&s["rate_target"], 0),
        f(&ev["rate_achieved"], 1),
        ev["adds"],
        ev["dels"],
        f(&ev["etcd_op_ms"]["p99"], 1),
        a["probe_ms"].as_u64().unwrap_or(100),
    );
    let _ = writeln!(md, "| figure | p50 | p99 | max | n |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let row = |md: &mut String, label: &str, v: &Value, max: &Value, digits: usize| {
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            f(&v["p50"], digits),
            f(&v["p99"], digits),
            f(max, digits),
            v["n"]
        );
    };
    row(
        &mut md,
        "`/healthz` latency (ms)",
        &s["healthz_ms"],
        &s["healthz_max_ms"],
        1,
    );
    row(
        &mut md,
        "wait for the network's flock (ms)",
        &s["lock_wait_ms"],
        &s["lock_wait_max_ms"],
        1,
    );
    row(
        &mut md,
        "plugin ADD, agent idle (ms)",
        &s["plugin_add_ms"]["idle"],
        &s["plugin_add_ms"]["idle"]["max"],
        0,
    );
    row(
        &mut md,
        "plugin ADD during the soak (ms)",
        &s["plugin_add_ms"]["soak"],
        &s["plugin_add_ms"]["soak"]["max"],
        0,
    );
    row(
        &mut md,
        "plugin DEL, agent idle (ms)",
        &s["plugin_del_ms"]["idle"],
        &s["plugin_del_ms"]["idle"]["max"],
        0,
    );
    row(
        &mut md,
        "plugin DEL during the soak (ms)",
        &s["plugin_del_ms"]["soak"],
        &s["plugin_del_ms"]["soak"]["max"],
        0,
    );
    let split = &s["agent_cpu_split_percent"];
    let _ = writeln!(
        md,
        "\n`/healthz` failures: {}. Liveness leases lost (agent log): {}. Agent CPU during the \
         soak {} % of one core (reconciler {} %, runtime {} %, other {} %), VmRSS at most {} MiB \
         (VmHWM {} MiB). After the soak every link held exactly the live records: {}.\n",
        s["healthz_failures"],
        a["log"]["lease_lost"],
        f(&s["agent_cpu_percent"], 1),
        f(&split["reconciler"], 1),
        f(&split["runtime"], 1),
        f(&split["other"], 1),
        f(&s["agent_rss_mib_max"], 1),
        f(&s["agent_hwm_mib_end"], 1),
        if s["links_consistent_after"].as_bool() == Some(true) {
            "yes".to_string()
        } else {
            format!("**no**, {} links differ", s["link_mismatch_count"])
        },
    );
    let ts = &s["thread_states"];
    if ts["samples"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            md,
            "What the agent's threads did during the soak ({} samples, one every 10 ms; share \
             of each kind's thread samples; a UAPI wait is a read of a daemon's answer):\n",
            ts["samples"]
        );
        let _ = writeln!(
            md,
            "| threads | how many (mean) | waiting for the flock | waiting for a UAPI answer | running | waiting otherwise |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
        for kind in [
            "reconciler",
            "handshake follow-ups",
            "async runtime",
            "other",
        ] {
            let k = &ts[kind];
            if k.is_null() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {kind} | {} | {} % | {} % | {} % | {} % |",
                f(&k["threads_mean"], 1),
                f(&k["flock_wait_percent"], 0),
                f(&k["uapi_wait_percent"], 0),
                f(&k["running_percent"], 0),
                f(&k["other_wait_percent"], 0),
            );
        }
        let _ = writeln!(md);
    }
    let shaken = e["add"]["handshakes_done_links"]["p50"].as_f64();
    let pods = a["local_pods"].as_f64();
    if let (Some(h), Some(p)) = (shaken, pods) {
        if h < p / 2.0 {
            let _ = writeln!(
                md,
                "Handshakes: although the new remote pod answers, its handshake had completed on \
                 {h:.0} of {p:.0} pod links (p50) once the agent was quiet. wg-cni-wgd (gotatun \
                 0.10) applies a UAPI `set` that names an existing peer by removing the peer and \
                 adding a new one (handshake state, session and counters lost), so the agent's \
                 kick (keep-alive 1 s, then at once back to 0) undoes itself: the second write \
                 drops the first one's due keep-alive, or the session the answer completed. \
                 Every pod link's follow-up then takes the network's lock, reads the whole \
                 device ({} peers) and re-adds the peer, at 250 ms, 600 ms and 1.2 s: up to {} \
                 reads of a whole device per ADD, one after another under one lock. That is the \
                 \"other\" CPU of an ADD above, and keeps the agent busy for {} s (p50) after \
                 one ADD (the reconciler's own job: p50 {} ms, max {} ms). Under the soak's \
                 stream of ADDs they fill the network's lock: of {} follow-up threads alive on \
                 average, {} were waiting for the flock, and the reconciler waited for it {} % \
                 of the time (thread states above); a plugin ADD waits behind them.\n",
                st["peers_per_link"],
                3 * a["local_pods"].as_u64().unwrap_or(0),
                f(&e["add"]["settled_s"]["p50"], 1),
                f(&e["add"]["agent_last_job_ms"]["p50"], 0),
                f(&e["add"]["agent_last_job_ms"]["max"], 0),
                f(&ts["handshake follow-ups"]["threads_mean"], 0),
                ts["handshake follow-ups"]["threads_mean"]
                    .as_f64()
                    .zip(ts["handshake follow-ups"]["flock_wait_percent"].as_f64())
                    .map_or("–".to_string(), |(n, p)| format!("{:.0}", n * p / 100.0)),
                f(&ts["reconciler"]["flock_wait_percent"], 0),
            );
        }
    }
    let runtime = e["del"]["cpu_split_ms_mean"]["runtime"].as_f64();
    if let Some(r) = runtime {
        let _ = writeln!(
            md,
            "Where the soak's CPU goes: a DEL costs the async runtime {r:.0} ms on average (the \
             watch event, `Mirror::evaluate` of the node-level keys and of the records of the \
             node the event touched, and the index diff of that node), so {} events/s cost about \
             {:.0} % of a core there; the soak measured {} % in the runtime threads.\n",
            f(&s["rate_target"], 0),
            r * s["rate_target"].as_f64().unwrap_or(0.0) / 10.0,
            f(&s["agent_cpu_split_percent"]["runtime"], 1),
        );
    }
    let kinds = a["log"]["kinds"].as_array().cloned().unwrap_or_default();
    if !kinds.is_empty() {
        let _ = writeln!(
            md,
            "Warnings and errors in the agent's log: {}.\n",
            kinds
                .iter()
                .map(|k| format!("{}× \"{}\"", k["count"], k["line"].as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    md
}
