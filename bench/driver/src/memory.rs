//! Standing memory of one pod's userspace WireGuard daemon (native only): for each daemon
//! (wg-cni-wgd, wireguard-go), one pod ADDed into a fresh wg-cni network whose
//! `userspaceDaemon` names it; its link is then given 10 and 1000 peers in total (random public
//! keys, one /32 allowed IP each, written straight to the daemon's UAPI socket), and after a
//! second of rest the daemon's VmRSS is read. DEL and the phase's cleanup remove everything.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cni::{self, Plugin};
use crate::scale::random_bytes;
use crate::throughput::comm;
use crate::{ns, uapi, Ctx, Res};

/// (daemon, network, subnet, ports): ports 57700-57799 are used by nothing else in the bench.
const SETUPS: [(&str, &str, &str, &str); 2] = [
    (
        "wg-cni-wgd",
        "wgbench-memwgd",
        "10.200.14.0/24",
        "57700-57749",
    ),
    (
        "wireguard-go",
        "wgbench-memgo",
        "10.200.15.0/24",
        "57750-57799",
    ),
];
/// Peers at most per UAPI set (one connection each).
const BATCH: usize = 200;

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kb(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn peer_count(host: &str) -> Res<usize> {
    let answer = uapi::get_text(host)?;
    Ok(answer
        .lines()
        .filter(|l| l.starts_with("public_key="))
        .count())
}

/// Add peers `from..to` (random keys, allowed IP 10.204.x.y/32 from the index).
fn add_peers(host: &str, from: usize, to: usize) -> Res<()> {
    let mut j = from;
    while j < to {
        let end = (j + BATCH).min(to);
        let mut req = String::new();
        for k in j..end {
            req.push_str(&format!(
                "public_key={}\nallowed_ip=10.204.{}.{}/32\n",
                uapi::hex(&random_bytes::<32>()),
                k / 250,
                1 + k % 250
            ));
        }
        uapi::set(host, &req)?;
        j = end;
    }
    Ok(())
}

fn mib(kb: u64) -> f64 {
    (kb as f64 / 1024.0 * 100.0).round() / 100.0
}

/// ADD one pod, grow its link's peers, read its daemon's RSS at each size.
fn measure(ctx: &Ctx, plugin: &Plugin, daemon: &str, nsname: &str, sizes: &[usize]) -> Res<Value> {
    let network = plugin.conf["name"].as_str().unwrap_or_default().to_string();
    let cid = format!("mem-{daemon}");
    let path = ns::add(ctx, nsname)?;
    let add = plugin.simple(ctx, "ADD", &cid, &path, None)?;
    if !add.ok() {
        return Err(format!("{daemon} ADD: {}", add.why()));
    }
    let result = add.json();
    let inner = (|| -> Res<Value> {
        let record = cni::own_record(ctx, &network, &cid)?;
        let pid = record["daemonPid"]
            .as_u64()
            .ok_or("record without daemonPid")? as i32;
        let host = record["hostName"]
            .as_str()
            .ok_or("record without hostName")?
            .to_string();
        let running = comm(pid);
        let initial = peer_count(&host)?;
        std::thread::sleep(Duration::from_secs(1));
        let (rss0, _) = rss_kb(pid).ok_or("daemon gone")?;
        let mut points = Vec::new();
        let mut have = initial;
        for &size in sizes {
            let t = Instant::now();
            if size > have {
                add_peers(&host, have, size)?;
            }
            let set_ms = t.elapsed().as_secs_f64() * 1000.0;
            let peers = peer_count(&host)?;
            have = peers;
            std::thread::sleep(Duration::from_secs(1));
            let (rss, hwm) = rss_kb(pid).ok_or("daemon gone")?;
            crate::log(format!(
                "[{}] memory: {daemon} ({running}) {peers} peers: VmRSS {:.2} MiB",
                ctx.label,
                mib(rss)
            ));
            points.push(json!({
                "peers": peers,
                "rss_kb": rss,
                "rss_mib": mib(rss),
                "hwm_mib": mib(hwm),
                "set_ms": (set_ms * 10.0).round() / 10.0,
            }));
        }
        Ok(json!({
            "daemon": daemon,
            "process": running,
            "peers_after_add": initial,
            "rss_after_add_mib": mib(rss0),
            "points": points,
        }))
    })();
    let del = plugin.simple(ctx, "DEL", &cid, &path, result.as_ref());
    ns::del(ctx, nsname);
    let mut v = inner?;
    match del {
        Ok(e) if e.ok() => {}
        Ok(e) => v["del_error"] = json!(e.why()),
        Err(e) => v["del_error"] = json!(e),
    }
    Ok(v)
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    if ctx.backend != "userspace" {
        return Err("userspace backend only (per-pod daemons)".into());
    }
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let sizes: Vec<usize> = ctx
        .opts
        .str("mem-peers", "10,1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut out = json!({ "backend": ctx.backend, "peer_counts": sizes, "daemons": {} });
    let mut errors = Vec::new();
    for (daemon, network, subnet, ports) in SETUPS {
        let plugin = cni::wg_daemon(ctx, network, subnet, ports, daemon);
        let tag = if daemon == "wireguard-go" {
            "go"
        } else {
            "wgd"
        };
        match measure(ctx, &plugin, daemon, &format!("wgbench-mem{tag}"), &sizes) {
            Ok(v) => out["daemons"][daemon] = v,
            Err(e) => {
                crate::log(format!("[{}] memory: {daemon}: {e}", ctx.label));
                errors.push(format!("{daemon}: {e}"));
            }
        }
    }
    out["errors"] = json!(errors);
    Ok(out)
}
