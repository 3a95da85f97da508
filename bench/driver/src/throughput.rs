//! iperf3 TCP, one stream, pod to pod: over wg-cni, over the same WireGuard implementation
//! configured by hand with ip/wg between two namespaces (wireguard-go natively, the kernel
//! module in the guest), and over ptp (two pods on a ptp network, routed through the host
//! namespace by the host side of their veths). Natively wg-cni runs twice: with its default
//! daemon (wg-cni-wgd) and with `userspaceDaemon: "wireguard-go"`. Runs interleave the paths.
//! Tunnel endpoints are 127.0.0.1; servers bind the pod address. Natively the CPU time
//! (utime + stime) of both pods' WireGuard daemons is sampled around each run: CPU-seconds
//! per Gbit transferred.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cni::{self, first_ip, Plugin};
use crate::exec::{self, sh, Background, Spec};
use crate::stats::summary;
use crate::{ns, Ctx, Res};

/// wg-cni with `userspaceDaemon: "wireguard-go"` (native only).
pub const WG_GO: &str = "wg-cni (wireguard-go)";

struct Pair {
    name: &'static str,
    ns: [String; 2],
    addr: [String; 2],
    /// CNI pods (plugin, container ids, ADD results) to DEL at the end.
    cni: Option<(Plugin, [String; 2], [Option<Value>; 2])>,
    daemons: Vec<Background>,
    /// Both pods' userspace WireGuard daemons (none for ptp and the kernel backend).
    daemon_pids: Vec<i32>,
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm) ": state is field 3 → index 0; utime 14 → 11, stime 15 → 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A process's name (/proc/<pid>/comm).
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Summed CPU ticks of all `pids`; None when one of them is gone.
fn ticks_of(pids: &[i32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

fn path_env() -> Vec<(String, String)> {
    vec![(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
    )]
}

fn cni_pair(ctx: &Ctx, name: &'static str, plugin: Plugin, tag: &str) -> Res<Pair> {
    let mut pair = Pair {
        name,
        ns: [format!("wgbench-{tag}1"), format!("wgbench-{tag}2")],
        addr: [String::new(), String::new()],
        cni: None,
        daemons: Vec::new(),
        daemon_pids: Vec::new(),
    };
    let mut results = [None, None];
    let cids = [format!("tput-{tag}-0"), format!("tput-{tag}-1")];
    for i in 0..2 {
        let path = ns::add(ctx, &pair.ns[i])?;
        let e = plugin.simple(ctx, "ADD", &cids[i], &path, None)?;
        if !e.ok() {
            return Err(format!("{name} ADD: {}", e.why()));
        }
        let r = e.json().ok_or("ADD printed no JSON")?;
        pair.addr[i] = first_ip(&r).ok_or("ADD result without an address")?;
        results[i] = Some(r);
        // Registered as soon as one pod exists, so that teardown DELs it on a later error.
        pair.cni = Some((plugin.clone(), cids.clone(), results.clone()));
        if plugin.kind == "wg-cni" && ctx.backend == "userspace" {
            let network = plugin.conf["name"].as_str().unwrap_or_default();
            let record = cni::own_record(ctx, network, &cids[i])?;
            let pid = record["daemonPid"]
                .as_u64()
                .ok_or_else(|| format!("{name}: record of {} without daemonPid", cids[i]))?;
            pair.daemon_pids.push(pid as i32);
        }
    }
    Ok(pair)
}

fn wait_for(path: &Path, limit: Duration) -> Res<()> {
    let t0 = Instant::now();
    while !path.exists() {
        if t0.elapsed() > limit {
            return Err(format!("{} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Two namespaces joined by WireGuard links made by hand, as an admin would with ip and wg.
#[allow(clippy::needless_range_loop)] // i and 1 - i index the two sides
fn hand_pair(ctx: &Ctx) -> Res<Pair> {
    let mut pair = Pair {
        name: "hand-wg",
        ns: ["wgbench-th1".into(), "wgbench-th2".into()],
        addr: ["10.200.11.2".into(), "10.200.11.3".into()],
        cni: None,
        daemons: Vec::new(),
        daemon_pids: Vec::new(),
    };
    let links = ["wgbh1", "wgbh2"];
    let ports = ["57600", "57601"];
    let mut keys = Vec::new();
    for i in 0..2 {
        ns::add(ctx, &pair.ns[i])?;
        let private = sh(&ctx.wgtool, &["genkey"], None)?;
        let public = sh(&ctx.wgtool, &["pubkey"], Some(private.as_bytes()))?;
        let file = ctx.work.join(format!("{}.key", links[i]));
        std::fs::write(&file, private.trim()).map_err(|e| e.to_string())?;
        keys.push((file, public.trim().to_string()));
    }
    for i in 0..2 {
        let (link, other) = (links[i], 1 - i);
        if ctx.backend == "kernel" {
            sh(&ctx.ip, &["link", "add", link, "type", "wireguard"], None)?;
        } else {
            let args = vec!["-f".to_string(), link.to_string()];
            let env = path_env();
            let log = ctx.work.join("logs").join(format!("{link}.log"));
            let mut spec = Spec::new(&ctx.wireguard_go, &args, &log);
            spec.env = &env;
            let daemon = exec::spawn(&spec, ctx)?;
            pair.daemon_pids.push(daemon.pid());
            pair.daemons.push(daemon);
            wait_for(
                &Path::new("/var/run/wireguard").join(format!("{link}.sock")),
                Duration::from_secs(5),
            )?;
        }
        let allowed = format!("{}/32", pair.addr[other]);
        let endpoint = format!("127.0.0.1:{}", ports[other]);
        let key_file = keys[i].0.display().to_string();
        sh(
            &ctx.wgtool,
            &[
                "set",
                link,
                "private-key",
                &key_file,
                "listen-port",
                ports[i],
                "peer",
                &keys[other].1,
                "allowed-ips",
                &allowed,
                "endpoint",
                &endpoint,
            ],
            None,
        )?;
        sh(&ctx.ip, &["link", "set", link, "mtu", "1420"], None)?;
        sh(&ctx.ip, &["link", "set", link, "netns", &pair.ns[i]], None)?;
        let cidr = format!("{}/24", pair.addr[i]);
        sh(
            &ctx.ip,
            &["-n", &pair.ns[i], "addr", "add", &cidr, "dev", link],
            None,
        )?;
        sh(
            &ctx.ip,
            &["-n", &pair.ns[i], "link", "set", link, "up"],
            None,
        )?;
    }
    Ok(pair)
}

fn teardown(ctx: &Ctx, pair: Pair) {
    if let Some((plugin, cids, results)) = &pair.cni {
        for i in 0..2 {
            let _ = plugin.simple(
                ctx,
                "DEL",
                &cids[i],
                &ns::path(&pair.ns[i]),
                results[i].as_ref(),
            );
        }
    }
    for n in &pair.ns {
        ns::del(ctx, n);
    }
    for d in pair.daemons {
        d.finish(Duration::from_secs(3));
    }
}

/// One iperf3 run: server in pod 2, client in pod 1. Gbit/s received, retransmits, seconds
/// measured. A run that ends without a result (seen once under TCG) is tried again, up to
/// three times.
fn iperf(ctx: &Ctx, pair: &Pair, seconds: usize) -> Res<(f64, u64, f64)> {
    let mut last = Err("iperf3 never ran".to_string());
    for _ in 0..3 {
        last = iperf_once(ctx, pair, seconds);
        if last.is_ok() {
            break;
        }
    }
    last
}

fn iperf_once(ctx: &Ctx, pair: &Pair, seconds: usize) -> Res<(f64, u64, f64)> {
    use std::os::fd::AsRawFd;
    let env = path_env();
    let server_args: Vec<String> = ["-s", "-1", "-B", &pair.addr[1], "-p", "5201"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ns2 = ns::open(&pair.ns[1])?;
    let ns1 = ns::open(&pair.ns[0])?;
    let log = ctx.work.join("logs").join("iperf3-server.log");
    let mut spec = Spec::new(&ctx.iperf3, &server_args, &log);
    spec.env = &env;
    spec.netns = Some(ns2.as_raw_fd());
    let server = exec::spawn(&spec, ctx)?;
    let t = seconds.to_string();
    let client_args: Vec<String> = ["-c", &pair.addr[1], "-p", "5201", "-t", &t, "-J"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let clog = ctx.work.join("logs").join("iperf3-client.log");
    let mut result = Err("iperf3 never ran".to_string());
    // Until the server listens: connection refused, retried (bounded).
    for _attempt in 0..40 {
        let mut c = Spec::new(&ctx.iperf3, &client_args, &clog);
        c.env = &env;
        c.netns = Some(ns1.as_raw_fd());
        let e = exec::run(&c)?;
        let v = e.json().unwrap_or(Value::Null);
        if e.ok() {
            result = match v["end"]["sum_received"]["bits_per_second"].as_f64() {
                Some(bps) => Ok((
                    bps / 1e9,
                    v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
                    v["end"]["sum_received"]["seconds"]
                        .as_f64()
                        .unwrap_or(seconds as f64),
                )),
                None => {
                    let text = String::from_utf8_lossy(&e.stdout);
                    let tail: String = text
                        .chars()
                        .rev()
                        .take(400)
                        .collect::<String>()
                        .chars()
                        .rev()
                        .collect();
                    Err(format!(
                        "iperf3 ({}) without end.sum_received: {}",
                        pair.name,
                        tail.replace('\n', " ")
                    ))
                }
            };
            break;
        }
        let err = v["error"].as_str().unwrap_or("").to_string();
        result = Err(format!("iperf3 client ({}): {err} {}", pair.name, e.why()));
        if !(err.contains("refused") || err.contains("unable to connect")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    server.finish(Duration::from_secs(5));
    result
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let runs = ctx.opts.num("tput-runs", 3);
    let seconds = ctx.opts.num("tput-seconds", 10);
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let mut pairs: Vec<Pair> = Vec::new();
    let setup = (|| -> Res<()> {
        let wg = cni::wg(ctx, "wgbench-tput", "10.200.10.0/24", "57500-57599");
        pairs.push(cni_pair(ctx, "wg-cni", wg, "tw")?);
        if ctx.backend == "userspace" {
            let go = cni::wg_daemon(
                ctx,
                "wgbench-tputgo",
                "10.200.13.0/24",
                "57610-57649",
                "wireguard-go",
            );
            pairs.push(cni_pair(ctx, WG_GO, go, "tg")?);
        }
        pairs.push(hand_pair(ctx)?);
        let ptp = cni::ptp(ctx, "wgbench-tputptp", "10.200.12.0/24");
        pairs.push(cni_pair(ctx, "ptp", ptp, "tp")?);
        Ok(())
    })();
    let n = pairs.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut retrans: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut cpu_s: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpu_per_gbit: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut errors: Vec<String> = Vec::new();
    let tck = clock_ticks();
    let daemons: Vec<Vec<String>> = pairs
        .iter()
        .map(|p| p.daemon_pids.iter().map(|d| comm(*d)).collect())
        .collect();
    if setup.is_ok() {
        for r in 0..runs {
            for j in 0..pairs.len() {
                let k = (r + j) % pairs.len();
                let before = ticks_of(&pairs[k].daemon_pids);
                let result = iperf(ctx, &pairs[k], seconds);
                let after = ticks_of(&pairs[k].daemon_pids);
                match result {
                    Ok((gbps, re, secs)) => {
                        samples[k].push(gbps);
                        retrans[k].push(re);
                        if let (Some(b), Some(a)) = (before, after) {
                            let cpu = a.saturating_sub(b) as f64 / tck;
                            cpu_s[k].push(cpu);
                            if gbps > 0.0 && secs > 0.0 {
                                cpu_per_gbit[k].push(cpu / (gbps * secs));
                            }
                        }
                    }
                    Err(e) => errors.push(e),
                }
                crate::log(format!(
                    "[{}] throughput: run {r} {} done",
                    ctx.label, pairs[k].name
                ));
            }
        }
    }
    let names: Vec<&str> = pairs.iter().map(|p| p.name).collect();
    for p in pairs {
        teardown(ctx, p);
    }
    setup?;
    let mut out = json!({
        "backend": ctx.backend,
        "runs": runs,
        "seconds": seconds,
        "hand_impl": if ctx.backend == "kernel" { "kernel wireguard (ip link add type wireguard)" } else { "wireguard-go (started by hand)" },
        "ptp_path": "pod -> veth -> host namespace (routes to the other pod's veth) -> veth -> pod",
        "errors": errors,
        "gbps": {},
    });
    for (k, name) in names.iter().enumerate() {
        out["gbps"][*name] = summary(&samples[k], 3);
        out["gbps"][*name]["runs"] = json!(samples[k]);
        out["gbps"][*name]["retransmits"] = json!(retrans[k]);
        if !daemons[k].is_empty() {
            // CPU-seconds (utime + stime) of both pods' daemons per Gbit received.
            out["gbps"][*name]["daemons"] = json!(daemons[k]);
            out["gbps"][*name]["daemon_cpu_s"] = json!(cpu_s[k]);
            out["gbps"][*name]["cpu_s_per_gbit"] = summary(&cpu_per_gbit[k], 4);
            out["gbps"][*name]["cpu_s_per_gbit"]["runs"] = json!(cpu_per_gbit[k]);
        }
    }
    let wg = out["gbps"]["wg-cni"]["p50"].as_f64();
    let hand = out["gbps"]["hand-wg"]["p50"].as_f64();
    let ptp = out["gbps"]["ptp"]["p50"].as_f64();
    if let (Some(w), Some(h)) = (wg, hand) {
        out["ratio_to_hand"] = json!((w / h * 1000.0).round() / 1000.0);
    }
    if let (Some(w), Some(p)) = (wg, ptp) {
        out["ratio_to_ptp"] = json!((w / p * 1000.0).round() / 1000.0);
    }
    if let (Some(w), Some(g)) = (wg, out["gbps"][WG_GO]["p50"].as_f64()) {
        // wg-cni on wg-cni-wgd ÷ wg-cni on wireguard-go (native only).
        out["ratio_wgd_to_wireguard_go"] = json!((w / g * 1000.0).round() / 1000.0);
    }
    Ok(out)
}
