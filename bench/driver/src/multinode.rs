//! Phase `multinode`: two simulated nodes with `wg-cni agent` and a real etcd (Debian's
//! `etcd-server`), as tests/cluster/mod.rs builds them, measuring what issue 10 asks of
//! `make bench`:
//!
//! 1. cross-node reachability after ADD: a resident pod on node 1, N pods added one at a time on
//!    node 2; from the ADD returning until node 1's pod gets an echo reply from the new pod, and
//!    until the new pod gets one from node 1's pod (both pings start together, each is
//!    `ping -c 1 -w 10 -i 0.02`: it sends every 20 ms until the first reply, so the resolution is
//!    ~20 ms plus one exec); then, as a control, `--mn-pods-sequential` more pods where node 1
//!    pings first and the new pod only after that answered (one side starts the handshake);
//!    `--mn-diagnose 1` logs both links' `wg show dump` for every pod slower than 1 s;
//!    then (1b) `--mn-rotations` key rotations of the resident pod (`crate::rotation`);
//! 2. ADD latency on node 1 with its agent running vs stopped (same node and network,
//!    alternating, ABBA order);
//! 3. agent idle RSS/CPU and full resync time with 1,000 and 5,000 remote records of a fake
//!    node (valid records, node key on a lease, heartbeat, address and subnet claims), written
//!    straight into etcd through its JSON gateway (`/v3/kv/txn`, batches of 500 puts).
//!
//! The cluster (bench/driver/src/cluster.rs) lives in namespaces named `wgbench-mn-*`: nodes
//! at 10.253.0.11 and .12 owning 10.252.1.0/24 and 10.252.2.0/24 of clusterRange
//! 10.252.0.0/16; the fake node owns 10.252.32.0/19 with endpoint 10.253.0.99 (no namespace
//! answers there: handshakes toward it stay on the bridge). Agents run with their default lease
//! TTL and resync interval unless `--mn-agent-flags` says otherwise.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{clk_tck, proc_status_kb, proc_usage, wait_until, Cluster, FakeNode, Layout};
use crate::exec;
use crate::stats::{raw_ms, summary_ms};
use crate::{ns, Ctx, Res};

const NETWORK: &str = "wgbench-mn";
const FAKE_NODE: &str = "mnode9";
const FAKE_SUBNET: &str = "10.252.32.0/19";
const FAKE_ENDPOINT: &str = "10.253.0.99";

/// `ping -c 1 -w DEADLINE -i 0.02 addr` from inside `netns`: exits 0 at the first reply.
fn spawn_ping(netns: &str, addr: &str, deadline_s: u64) -> Res<Child> {
    let fd = ns::open(netns)?;
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new("ping");
    cmd.args([
        "-n",
        "-q",
        "-c",
        "1",
        "-i",
        "0.02",
        "-w",
        &deadline_s.to_string(),
        addr,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
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

/// One ping's time until its first reply (None: no reply).
fn ping_one(netns: &str, addr: &str, deadline_s: u64) -> Res<Option<f64>> {
    let started = Instant::now();
    let mut child = spawn_ping(netns, addr, deadline_s)?;
    let limit = Duration::from_secs(deadline_s + 5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(status
                    .success()
                    .then(|| started.elapsed().as_secs_f64() * 1e6))
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("ping: {e}")),
        }
    }
}

/// Both pings started together; each one's time until its first reply (None: no reply).
fn ping_pair(a: (&str, &str), b: (&str, &str), deadline_s: u64) -> Res<[Option<f64>; 2]> {
    let started = Instant::now();
    let mut kids = [
        Some(spawn_ping(a.0, a.1, deadline_s)?),
        Some(spawn_ping(b.0, b.1, deadline_s)?),
    ];
    let mut out = [None, None];
    let limit = Duration::from_secs(deadline_s + 5);
    loop {
        let mut running = false;
        for (k, kid) in kids.iter_mut().enumerate() {
            if let Some(child) = kid {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if status.success() {
                            out[k] = Some(started.elapsed().as_secs_f64() * 1e6);
                        }
                        *kid = None;
                    }
                    Ok(None) => running = true,
                    Err(_) => *kid = None,
                }
            }
        }
        if !running {
            return Ok(out);
        }
        if started.elapsed() > limit {
            for kid in kids.iter_mut().flatten() {
                let _ = kid.kill();
                let _ = kid.wait();
            }
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let n_pods = ctx.opts.num("mn-pods", 30);
    let lat_iters = ctx.opts.num("mn-add-iterations", 40);
    let sizes: Vec<usize> = ctx
        .opts
        .str("mn-records", "1000,5000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let idle_s = ctx.opts.num("mn-idle-seconds", 10) as u64;
    let mut c = Cluster::new(
        ctx,
        Layout {
            tag: "mn",
            network: NETWORK,
            node_prefix: "mnode",
            nodes: 2,
            dir: "multinode",
            peering: "mesh",
        },
    )?;
    let mut out = json!({
        "backend": "userspace",
        "agent_flags": if c.agent_flags.is_empty() { "default flags: --lease-ttl 15, --resync-interval 30, --grace-period 3600".to_string() } else { c.agent_flags.join(" ") },
        "nodes": 2,
    });

    // ------------------------------------------------------------ start
    c.start_agent(0)?;
    c.start_agent(1)?;
    for i in 0..2 {
        let t = c
            .wait_ready(i, Duration::from_secs(60))
            .ok_or_else(|| format!("agent of node {} not ready in 60 s", i + 1))?;
        crate::log(format!(
            "[{}] multinode: agent {} ready after {:.2} s",
            ctx.label,
            i + 1,
            t.as_secs_f64()
        ));
    }
    // Both gateways mirrored on the other node.
    wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        c.nodes[0]
            .store()
            .join(NETWORK)
            .join("mnode2/gateway.json")
            .exists()
            && c.nodes[1]
                .store()
                .join(NETWORK)
                .join("mnode1/gateway.json")
                .exists()
    })
    .ok_or("gateways not mirrored across nodes in 30 s")?;

    // ------------------------------------------------------------ 1: reachability
    c.pod_ns("wgbench-mn-r")?;
    let res = c.cni(0, "ADD", "mn-resident", "wgbench-mn-r", None)?;
    if !res.ok() {
        return Err(format!("resident pod ADD on node 1: {}", res.why()));
    }
    let res_json = res.json();
    c.note_daemons();
    let res_ip = res_json
        .as_ref()
        .and_then(crate::cni::first_ip)
        .ok_or("resident pod: no IP")?;
    wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        c.nodes[1].mirror_count("mnode1") >= 1
    })
    .ok_or("resident pod not mirrored on node 2 in 30 s")?;
    let (mut to_new, mut from_new, mut add_us) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fail_to, mut fail_from) = (0usize, 0usize);
    let mut added: Vec<(String, String, Option<Value>)> = Vec::new();
    let mut per_pod = Vec::new();
    let n_seq = ctx.opts.num("mn-pods-sequential", 20);
    let (mut seq_to, mut seq_from, mut seq_fail) = (Vec::new(), Vec::new(), 0usize);
    for k in 0..n_pods + n_seq {
        let sequential = k >= n_pods;
        let pns = format!("wgbench-mn-p{k}");
        c.pod_ns(&pns)?;
        let cid = format!("mn-pod-{k}");
        let e = c.cni(1, "ADD", &cid, &pns, None)?;
        if !e.ok() {
            return Err(format!("ADD {cid} on node 2: {}", e.why()));
        }
        let result = e.json();
        let ip = result
            .as_ref()
            .and_then(crate::cni::first_ip)
            .ok_or("pod: no IP")?;
        // Diagnostic knob: start pinging this long after ADD returned (default at once).
        let delay = Duration::from_millis(ctx.opts.num("mn-ping-delay-ms", 0) as u64);
        std::thread::sleep(delay);
        let [a, b] = if sequential {
            // Control: node 1 → new first, the other direction only after that answered (so
            // only one side starts a handshake).
            let a = ping_one("wgbench-mn-r", &ip, 10)?;
            let b = ping_one(&pns, &res_ip, 10)?;
            [a, b]
        } else {
            ping_pair(("wgbench-mn-r", &ip), (&pns, &res_ip), 10)?
        };
        let (a, b) = (
            a.map(|u| u + delay.as_secs_f64() * 1e6),
            b.map(|u| u + delay.as_secs_f64() * 1e6),
        );
        add_us.push(e.us);
        per_pod.push(
            json!({"pod": k, "ip": ip, "add_ms": (e.us / 10.0).round() / 100.0,
            "node1_to_new_ms": a.map(|u| (u / 10.0).round() / 100.0),
            "new_to_node1_ms": b.map(|u| (u / 10.0).round() / 100.0)}),
        );
        if a.is_none() || b.is_none() || a.unwrap_or(0.0).max(b.unwrap_or(0.0)) > 1e6 {
            crate::log(format!(
                "[{}] multinode: pod {k} ({ip}): node1→new {a:?} µs, new→node1 {b:?} µs",
                ctx.label
            ));
            if ctx.opts.num("mn-diagnose", 0) == 1 {
                for (node, c_id) in [(0usize, "mn-resident"), (1, cid.as_str())] {
                    let path = c.nodes[node]
                        .store()
                        .join(NETWORK)
                        .join(&c.nodes[node].name)
                        .join(format!("{c_id}:eth0.json"));
                    let rec: Value = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or(Value::Null);
                    let host = rec["hostName"].as_str().unwrap_or("-").to_string();
                    let dump =
                        exec::sh(&ctx.wgtool, &["show", &host, "dump"], None).unwrap_or_else(|e| e);
                    crate::log(format!(
                        "{c_id} ({host}) pubkey {}:\n{dump}",
                        rec["publicKey"]
                    ));
                }
            }
        }
        if sequential {
            match (a, b) {
                (Some(a), Some(b)) => {
                    seq_to.push(a);
                    seq_from.push(b);
                }
                _ => seq_fail += 1,
            }
            added.push((cid, pns, result));
            c.note_daemons();
            continue;
        }
        match a {
            Some(us) => to_new.push(us),
            None => fail_to += 1,
        }
        match b {
            Some(us) => from_new.push(us),
            None => fail_from += 1,
        }
        added.push((cid, pns, result));
        c.note_daemons();
    }
    crate::log(format!(
        "[{}] multinode: reachability of {n_pods} pods measured",
        ctx.label
    ));
    out["reachability"] = json!({
        "pods": n_pods,
        "node1_to_new": summary_ms(&to_new),
        "new_to_node1": summary_ms(&from_new),
        "failures_node1_to_new": fail_to,
        "failures_new_to_node1": fail_from,
        "over_1s_node1_to_new": to_new.iter().filter(|u| **u > 1e6).count(),
        "over_1s_new_to_node1": from_new.iter().filter(|u| **u > 1e6).count(),
        "add_ms_node2": summary_ms(&add_us),
        "samples_ms": {"node1_to_new": raw_ms(&to_new), "new_to_node1": raw_ms(&from_new)},
        "per_pod": per_pod,
        "sequential": {
            "pods": n_seq,
            "node1_to_new": summary_ms(&seq_to),
            "then_new_to_node1": summary_ms(&seq_from),
            "failures": seq_fail,
        },
        "method": "both pings start when ADD returns; ping -c1 -i0.02 -w10 (first reply ends it)",
    });

    // ------------------------------------------------------------ 1b: key rotation
    // The resident pod's key, rotated while a pod of its node and one of node 2 ping it.
    let rotations = ctx.opts.num("mn-rotations", 5);
    if rotations > 0 {
        c.pod_ns("wgbench-mn-rl")?;
        let local = c.cni(0, "ADD", "mn-rot-local", "wgbench-mn-rl", None)?;
        if !local.ok() {
            return Err(format!("ADD mn-rot-local on node 1: {}", local.why()));
        }
        c.note_daemons();
        let remote = added
            .first()
            .map(|(_, pns, _)| pns.clone())
            .ok_or("no pod on node 2")?;
        let pingers = [
            ("same_node", "wgbench-mn-rl"),
            ("other_node", remote.as_str()),
        ];
        let target = crate::rotation::Target {
            node: 0,
            cid: "mn-resident",
            ip: &res_ip,
            pingers: &pingers,
        };
        out["rotation"] = crate::rotation::measure(ctx, &c, &target, rotations, || Ok(()))
            .unwrap_or_else(|e| json!({"error": e}));
        let _ = c.cni(
            0,
            "DEL",
            "mn-rot-local",
            "wgbench-mn-rl",
            local.json().as_ref(),
        );
        crate::log(format!("[{}] multinode: key rotation measured", ctx.label));
    }

    // ------------------------------------------------------------ 2: ADD with/without agent
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut errors = Vec::new();
    c.pod_ns("wgbench-mn-l")?;
    let mut agent_up = true;
    for i in 0..lat_iters * 2 {
        // ABBA: with, without, without, with, ...
        let want_up = matches!(i % 4, 0 | 3);
        if want_up != agent_up {
            if want_up {
                c.start_agent(0)?;
                c.wait_ready(0, Duration::from_secs(60))
                    .ok_or("agent 1 not ready after restart")?;
                // Let its first reconcile settle, as on a node that has run for a while.
                std::thread::sleep(Duration::from_millis(300));
            } else {
                c.stop_agent(0);
            }
            agent_up = want_up;
        }
        let cid = format!("mn-lat-{i}");
        let e = c.cni(0, "ADD", &cid, "wgbench-mn-l", None)?;
        if e.ok() {
            if want_up {
                with.push(e.us)
            } else {
                without.push(e.us)
            }
        } else if errors.len() < 3 {
            errors.push(e.why());
        }
        let prev = e.json();
        let d = c.cni(0, "DEL", &cid, "wgbench-mn-l", prev.as_ref())?;
        if !d.ok() && errors.len() < 3 {
            errors.push(format!("DEL: {}", d.why()));
        }
    }
    if !agent_up {
        c.start_agent(0)?;
        c.wait_ready(0, Duration::from_secs(60))
            .ok_or("agent 1 not ready after restart")?;
    }
    out["add_with_agent"] = json!({
        "node": "mnode1",
        "pods_in_network": n_pods + n_seq + 1,
        "iterations": lat_iters,
        "with_agent": summary_ms(&with),
        "without_agent": summary_ms(&without),
        "errors": errors,
        "samples_ms": {"with": raw_ms(&with), "without": raw_ms(&without)},
    });
    crate::log(format!(
        "[{}] multinode: ADD with/without agent measured",
        ctx.label
    ));

    // Pods of part 1 go (DEL), so that part 3 sees the fake node's records only (plus the
    // resident pod on node 1, which the agent then peers with every fake record).
    for (cid, pns, result) in added.drain(..) {
        let _ = c.cni(1, "DEL", &cid, &pns, result.as_ref());
    }

    // ------------------------------------------------------------ 3: idle and resync
    let fake = FakeNode::new(NETWORK, FAKE_NODE, FAKE_SUBNET, FAKE_ENDPOINT)?;
    let lease = c.grant_lease(7200)?;
    fake.announce(&c, &lease, None)?;
    let mut written = 0usize;
    let mut points = Vec::new();
    let tck = clk_tck();
    for &size in &sizes {
        if size > 8000 {
            return Err("--mn-records: at most 8000 (the fake node's /19)".into());
        }
        c.stop_agent(0);
        let load_started = Instant::now();
        fake.put_records(&c, written..size, 1, |j| format!("fake{j:05}"))?;
        written = written.max(size);
        let load_s = load_started.elapsed().as_secs_f64();
        // A fresh agent and an empty mirror: the full resync.
        let mirror = c.nodes[0].store().join(NETWORK).join(FAKE_NODE);
        let _ = std::fs::remove_dir_all(&mirror);
        let started = Instant::now();
        c.start_agent(0)?;
        let mirrored = wait_until(Duration::from_secs(300), Duration::from_millis(20), || {
            c.nodes[0].mirror_count(FAKE_NODE) >= size
        });
        let ready = c
            .wait_ready(0, Duration::from_secs(60))
            .map(|_| started.elapsed());
        let resync_s = mirrored.map(|d| d.as_secs_f64());
        crate::log(format!(
            "[{}] multinode: {size} records: mirrored in {resync_s:?} s",
            ctx.label
        ));
        // Settle, then idle: RSS and CPU over idle_s seconds.
        std::thread::sleep(Duration::from_secs(5));
        let pid = c.nodes[0].agent_pid.ok_or("no agent pid")?;
        let gw = c.gateway_daemon(0);
        let a0 = proc_usage(pid);
        let g0 = gw.and_then(proc_usage);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(idle_s));
        let a1 = proc_usage(pid);
        let g1 = gw.and_then(proc_usage);
        let dt = t0.elapsed().as_secs_f64();
        let hwm = proc_status_kb(pid, "VmHWM:");
        let cpu = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| match (a, b) {
            (Some(a), Some(b)) => json!(((b.1 - a.1) as f64 / tck / dt * 1000.0).round() / 10.0),
            _ => Value::Null,
        };
        // Peers the agent gave the resident pod's link and the gateway (wg over UAPI).
        let peers = |file: &str| -> Option<usize> {
            let path = c.nodes[0].own_dir().join(file);
            let rec: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
            let wg = ctx.wgtool.display().to_string();
            let host = rec["hostName"].as_str()?;
            // Bounded: a daemon busy with thousands of peers must not hang the phase.
            let t = Instant::now();
            let out = exec::sh(
                Path::new("timeout"),
                &["-k", "2", "10", &wg, "show", host, "peers"],
                None,
            );
            if let Err(e) = &out {
                crate::log(format!(
                    "wg show {host} peers ({file}) after {:.1} s: {e}",
                    t.elapsed().as_secs_f64()
                ));
            }
            let out = out.ok()?;
            Some(out.lines().filter(|l| !l.is_empty()).count())
        };
        points.push(json!({
            "resident_pod_peers": peers("mn-resident:eth0.json"),
            "gateway_peers": peers("gateway.json"),
            "records": size,
            "load_seconds": (load_s * 100.0).round() / 100.0,
            "resync_seconds": resync_s.map(|s| (s * 1000.0).round() / 1000.0),
            "ready_seconds": ready.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
            "agent_rss_mib": a1.map(|u| (u.0 as f64 / 1024.0 * 10.0).round() / 10.0),
            "agent_hwm_mib": hwm.map(|u| (u as f64 / 1024.0 * 10.0).round() / 10.0),
            "agent_cpu_percent": cpu(a0, a1),
            "idle_seconds": (dt * 10.0).round() / 10.0,
            "gateway_daemon_rss_mib": g1.map(|u| (u.0 as f64 / 1024.0 * 10.0).round() / 10.0),
            "gateway_daemon_cpu_percent": cpu(g0, g1),
        }));
    }
    out["remote_records"] = json!({
        "fake_node": FAKE_NODE,
        "points": points,
        "resident_pod_on_node1": true,
        "method": "records put into etcd with node 1's agent stopped; mirror dir emptied; fresh agent started; resync = until the mirror dir holds every record; idle = 5 s settle, then utime+stime and VmRSS over the idle window",
    });
    let _ = c.cni(0, "DEL", "mn-resident", "wgbench-mn-r", res_json.as_ref());
    drop(c);
    Ok(out)
}

/// The results.md section of this phase.
pub fn report(m: &Value) -> String {
    use std::fmt::Write as _;
    let f = |v: &Value, d: usize| match v.as_f64() {
        Some(x) => format!("{x:.d$}"),
        None => "–".to_string(),
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Multi-node: agents and etcd (native, userspace backend)\n"
    );
    if let Some(e) = m["error"].as_str() {
        let _ = writeln!(md, "The phase failed: {e}\n");
        return md;
    }
    let _ = writeln!(
        md,
        "Two simulated nodes (network namespaces on a veth bridge), Debian's etcd in a namespace \
         of its own on that bridge, one `wg-cni agent` per node (agent {}), the plugin exec'd inside \
         the node's namespace. Measured by `wg-cni-bench multinode` (bench/driver/src/multinode.rs).\n",
        m["agent_flags"].as_str().unwrap_or("?")
    );
    let r = &m["reachability"];
    let _ = writeln!(
        md,
        "**Cross-node reachability after ADD** ({} pods added one at a time on node 2, a resident \
         pod on node 1; ms from the ADD returning until the first echo reply; both pings start \
         together and send every 20 ms, so figures include ~20 ms of polling and one exec; \
         ~5,000 ms is WireGuard's handshake retry, REKEY_TIMEOUT):\n",
        r["pods"]
    );
    let _ = writeln!(
        md,
        "| direction | p50 | p90 | p99 | max | > 1 s | never (10 s) |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for (label, key, over, fail) in [
        (
            "node-1 pod → new pod",
            "node1_to_new",
            "over_1s_node1_to_new",
            "failures_node1_to_new",
        ),
        (
            "new pod → node-1 pod",
            "new_to_node1",
            "over_1s_new_to_node1",
            "failures_new_to_node1",
        ),
    ] {
        let s = &r[key];
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            f(&s["p50"], 0),
            f(&s["p90"], 0),
            f(&s["p99"], 0),
            f(&s["max"], 0),
            r[over],
            r[fail]
        );
    }
    let q = &r["sequential"];
    if q["pods"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            md,
            "\nControl, {} more pods: node 1's pod pings the new pod first and the new pod pings \
             back only after that answered, so only one side starts a WireGuard handshake \
             (ms; {} pods never answered):\n",
            q["pods"], q["failures"]
        );
        let _ = writeln!(
            md,
            "| direction | p50 | p90 | p99 | max |\n| --- | --- | --- | --- | --- |"
        );
        for (label, key) in [
            ("node-1 pod → new pod, from ADD returning", "node1_to_new"),
            ("new pod → node-1 pod, afterwards", "then_new_to_node1"),
        ] {
            let s = &q[key];
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} |",
                f(&s["p50"], 0),
                f(&s["p90"], 0),
                f(&s["p99"], 0),
                f(&s["max"], 0)
            );
        }
    }
    let slow = r["over_1s_node1_to_new"].as_u64().unwrap_or(0)
        + r["failures_node1_to_new"].as_u64().unwrap_or(0)
        + r["over_1s_new_to_node1"].as_u64().unwrap_or(0)
        + r["failures_new_to_node1"].as_u64().unwrap_or(0);
    let control_slow = q["failures"].as_u64().unwrap_or(0) > 0
        || q["node1_to_new"]["max"]
            .as_f64()
            .is_some_and(|x| x > 1000.0);
    if slow > 0 && !control_slow && q["pods"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            md,
            "\nThe slow and lost cases come only when both pods start a handshake at once (the \
             new pod's first packet, and node 1's agent-triggered handshake or its pod's first \
             packet): the two initiations cross, each side answers the other's and then drops \
             the answer to its own, and nothing works until WireGuard's 5 s retry (sometimes \
             not even then). When one side goes first (the control), none is slow. \
             `--mn-diagnose 1` logs both links' `wg show dump` for such a pod: two initiations \
             received and two initiations plus two responses sent on each side, no handshake."
        );
    }
    let a = &m["add_with_agent"];
    let _ = writeln!(
        md,
        "\n**Plugin ADD on node 1 with its agent running vs stopped** (same node and network, {} \
         pods in it, {} ADDs each, alternating ABBA, each ADD followed by its DEL; ms):\n",
        a["pods_in_network"], a["iterations"]
    );
    let _ = writeln!(
        md,
        "| agent | p50 | p90 | p99 | n |\n| --- | --- | --- | --- | --- |"
    );
    for (label, key) in [("running", "with_agent"), ("stopped", "without_agent")] {
        let s = &a[key];
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            f(&s["p50"], 1),
            f(&s["p90"], 1),
            f(&s["p99"], 1),
            s["n"]
        );
    }
    let _ = writeln!(
        md,
        "\n**Agent with many remote records** (a fake third node with a node key on a lease, a \
         subnet claim and N valid `ready` records put straight into etcd; node 1 also runs one \
         pod, so its gateway and that pod are each given every record as a peer). Resync: a fresh \
         agent started with the mirror directory emptied, until the mirror holds all N records. \
         Idle: after a 5 s settle, VmRSS and utime+stime over the idle window; the gateway's \
         wireguard-go daemon for context:\n"
    );
    let _ = writeln!(
        md,
        "Peers on node 1's links after each resync (wg over UAPI): {}.\n",
        m["remote_records"]["points"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let n = |v: &Value| match v.as_u64() {
                    Some(n) => n.to_string(),
                    None => "no answer from its daemon's UAPI socket within 10 s".to_string(),
                };
                format!(
                    "{} records: resident pod {}, gateway {}",
                    p["records"],
                    n(&p["resident_pod_peers"]),
                    n(&p["gateway_peers"])
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        md,
        "| remote records | full resync (s) | ready (s) | agent RSS (MiB) | agent peak RSS (MiB) | agent CPU idle (%) | gateway daemon RSS (MiB) | gateway daemon CPU (%) |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for p in m["remote_records"]["points"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p["records"],
            f(&p["resync_seconds"], 2),
            f(&p["ready_seconds"], 2),
            f(&p["agent_rss_mib"], 1),
            f(&p["agent_hwm_mib"], 1),
            f(&p["agent_cpu_percent"], 1),
            f(&p["gateway_daemon_rss_mib"], 1),
            f(&p["gateway_daemon_cpu_percent"], 1),
        );
    }
    let _ = writeln!(md);
    if !m["rotation"].is_null() {
        md.push('\n');
        md.push_str(&crate::rotation::report(&m["rotation"], "mesh"));
    }
    md
}
