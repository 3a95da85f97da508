//! A key rotation's loss (issue 23), measured inside the `multinode` (mesh) and `direct`
//! (on-demand, the pair direct) phases: a pod on the rotated pod's node and one on the other
//! node ping it every 10 ms (`ping -D -i 0.01`, 1 s timeout) while `wg-cni rotate` runs on its
//! node; per pinger the echo replies lost and the longest gap between two replies.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::stats::summary;
use crate::{ns, Ctx, Res};

/// Pings before the rotation starts and in all (10 ms apart: 1.5 s before, 2.5 s after).
const BEFORE: Duration = Duration::from_millis(1500);
const PINGS: usize = 400;

/// The rotated pod and who pings it.
pub struct Target<'a> {
    pub node: usize,
    pub cid: &'a str,
    pub ip: &'a str,
    /// (label, pod namespace) of each pinger.
    pub pingers: &'a [(&'a str, &'a str)],
}

/// One rotation under pings: per pinger `{lost, max_gap_ms}`, and how long `rotate` took.
pub fn once(ctx: &Ctx, c: &Cluster, t: &Target) -> Res<Value> {
    let mut pings = Vec::new();
    for (label, netns) in t.pingers {
        pings.push((*label, spawn_ping(netns, t.ip)?));
    }
    std::thread::sleep(BEFORE);
    let node = &c.nodes[t.node];
    let started = Instant::now();
    let out = Command::new(&ctx.ip)
        .args(["netns", "exec", &node.netns])
        .arg(&ctx.wg)
        .args(["rotate", "--network", &node.network, "--node", &node.name])
        .args(["--container", t.cid, "--ifname", "eth0"])
        .arg("--store")
        .arg(node.store())
        .arg("--cni-conf-dir")
        .arg(node.conf_dir())
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("wg-cni rotate: {e}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "wg-cni rotate: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut result = json!({"rotate_ms": (took.as_secs_f64() * 1e4).round() / 10.0});
    for (label, child) in pings {
        let out = child.wait_with_output().map_err(|e| format!("ping: {e}"))?;
        result[label] = analyse(&String::from_utf8_lossy(&out.stdout));
    }
    Ok(result)
}

/// `n` rotations (`once`), each after `prepare` (e.g. until a pair is direct again), summed
/// up per pinger: lost replies and longest gaps.
pub fn measure(
    ctx: &Ctx,
    c: &Cluster,
    t: &Target,
    n: usize,
    mut prepare: impl FnMut() -> Res<()>,
) -> Res<Value> {
    let mut runs = Vec::new();
    for _ in 0..n {
        prepare()?;
        runs.push(once(ctx, c, t)?);
    }
    let mut out = json!({"rotations": n, "runs": runs, "ping_interval_ms": 10});
    let rotate_ms: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["rotate_ms"].as_f64())
        .collect();
    out["rotate_ms"] = summary(&rotate_ms, 1);
    for (label, _) in t.pingers {
        let lost: Vec<f64> = runs
            .iter()
            .filter_map(|r| r[label]["lost"].as_f64())
            .collect();
        let gaps: Vec<f64> = runs
            .iter()
            .filter_map(|r| r[label]["max_gap_ms"].as_f64())
            .collect();
        out[*label] = json!({"lost": summary(&lost, 0), "max_gap_ms": summary(&gaps, 1)});
    }
    Ok(out)
}

/// Lost replies and the longest gap between replies (`-D` timestamps) of a ping's output.
fn analyse(text: &str) -> Value {
    let times: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let max_gap = times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0f64, f64::max);
    json!({
        "received": times.len(),
        "lost": PINGS.saturating_sub(times.len()),
        "max_gap_ms": (max_gap * 10.0).round() / 10.0,
    })
}

fn spawn_ping(netns: &str, addr: &str) -> Res<std::process::Child> {
    let fd = ns::open(netns)?;
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new("ping");
    cmd.args([
        "-n",
        "-D",
        "-i",
        "0.01",
        "-W",
        "1",
        "-c",
        &PINGS.to_string(),
        addr,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
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

/// The results.md lines for a phase's `rotation` value.
pub fn report(r: &Value, mode: &str) -> String {
    if let Some(e) = r["error"].as_str() {
        return format!("**Key rotation** ({mode}): failed: {e}\n\n");
    }
    let f = |v: &Value| v.as_f64().map_or("–".into(), |x| format!("{x:.0}"));
    let mut md = format!(
        "**Key rotation** ({mode}; `wg-cni rotate` of one pod, {} times, while a pod on its node \
         and one on the other node ping it every 10 ms, {PINGS} echo requests each; `rotate` \
         took {} ms p50):\n\n| pinger | replies lost p50 / max | longest gap between replies p50 / max (ms) |\n| --- | --- | --- |\n",
        r["rotations"],
        f(&r["rotate_ms"]["p50"])
    );
    for (label, name) in [("same_node", "same node"), ("other_node", "other node")] {
        let s = &r[label];
        md.push_str(&format!(
            "| {name} | {} / {} | {} / {} |\n",
            f(&s["lost"]["p50"]),
            f(&s["lost"]["max"]),
            f(&s["max_gap_ms"]["p50"]),
            f(&s["max_gap_ms"]["max"]),
        ));
    }
    md.push('\n');
    md
}
