//! Where an ADD spends its time, from `strace -f -b execve -ttt -T` of whole ADDs (perf has no
//! hardware counters on these machines). `-b execve` detaches from children when they exec,
//! so the daemon wireguard-go starts is not traced (strace would wait for it forever) and the
//! children's time is seen from the plugin's side: from the fork to the wait (IPAM, iptables)
//! or to the first successful connect to the daemon's UAPI socket (wireguard-go start).
//! Phases are summed per trace, and the median over the traced ADDs is reported, once in an
//! empty network and once with 20 live pods (the newcomer is then added to 20 live links).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{json, Value};

use crate::cni::{self, Plugin};
use crate::stats::summary;
use crate::{ns, Ctx, Res};

#[derive(Debug, Clone)]
struct Sys {
    pid: u32,
    ts: f64,
    name: String,
    args: String,
    ret: String,
    dur: f64,
}

struct Trace {
    calls: Vec<Sys>,
    exits: HashMap<u32, f64>,
    first_ts: f64,
    main: u32,
}

fn parse(text: &str) -> Trace {
    let mut calls = Vec::new();
    let mut exits = HashMap::new();
    let mut pending: HashMap<u32, (String, String, f64)> = HashMap::new();
    let mut first_ts = f64::NAN;
    let mut main = 0;
    for line in text.lines() {
        let mut it = line.splitn(2, char::is_whitespace);
        let Some(pid) = it.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let rest = it.next().unwrap_or("").trim_start();
        let mut it = rest.splitn(2, ' ');
        let Some(ts) = it.next().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        let rest = it.next().unwrap_or("").trim_start();
        if first_ts.is_nan() {
            first_ts = ts;
            main = pid;
        }
        if rest.starts_with("+++") {
            exits.insert(pid, ts);
            continue;
        }
        if rest.starts_with("---") {
            continue;
        }
        let (name, args_part, start_ts) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some(end) = r.find(" resumed>") else {
                continue;
            };
            let name = r[..end].to_string();
            let tail = &r[end + " resumed>".len()..];
            match pending.remove(&pid) {
                Some((n, a, t)) if n == name => (name, format!("{a}{tail}"), t),
                _ => (name, tail.to_string(), ts),
            }
        } else {
            let Some(paren) = rest.find('(') else {
                continue;
            };
            let name = rest[..paren].to_string();
            let tail = &rest[paren + 1..];
            if let Some(before) = tail.strip_suffix("<unfinished ...>") {
                if name == "execve" {
                    // A child detached at exec (-b execve) never resumes: keep the attempt.
                    calls.push(Sys {
                        pid,
                        ts,
                        name: name.clone(),
                        args: before.to_string(),
                        ret: String::new(),
                        dur: 0.0,
                    });
                }
                pending.insert(pid, (name, before.to_string(), ts));
                continue;
            }
            (name, tail.to_string(), ts)
        };
        // "... ) = RET <DUR>"
        let (body, dur) = match args_part.rfind(" <") {
            Some(i) if args_part.ends_with('>') => (
                &args_part[..i],
                args_part[i + 2..args_part.len() - 1].parse().unwrap_or(0.0),
            ),
            _ => (args_part.as_str(), 0.0),
        };
        let (args, ret) = match body.rfind(" = ") {
            Some(i) => (body[..i].to_string(), body[i + 3..].trim().to_string()),
            None => (body.to_string(), String::new()),
        };
        calls.push(Sys {
            pid,
            ts: start_ts,
            name,
            args,
            ret,
            dur,
        });
    }
    Trace {
        calls,
        exits,
        first_ts,
        main,
    }
}

fn ret_num(ret: &str) -> Option<i64> {
    ret.split_whitespace().next()?.parse().ok()
}

fn sock_path(args: &str) -> Option<String> {
    let i = args.find("sun_path=\"")? + "sun_path=\"".len();
    let j = args[i..].find('"')?;
    Some(args[i..i + j].to_string())
}

fn fd_arg(args: &str) -> Option<i64> {
    let digits: String = args
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Phase times (ms) of one traced ADD.
fn phases(t: &Trace, new_link: &str) -> BTreeMap<String, f64> {
    let mut threads: HashSet<u32> = HashSet::from([t.main]);
    let mut children: HashMap<u32, (f64, String)> = HashMap::new(); // pid -> (fork ts, binary)
    for c in &t.calls {
        if c.name.starts_with("clone") {
            if let Some(child) = ret_num(&c.ret) {
                if c.args.contains("CLONE_THREAD") {
                    threads.insert(child as u32);
                } else {
                    children.insert(child as u32, (c.ts, String::new()));
                }
            }
        }
    }
    for c in &t.calls {
        if c.name == "execve" {
            if let Some(ch) = children.get_mut(&c.pid) {
                let path = c.args.split('"').nth(1).unwrap_or("");
                ch.1 = path.rsplit('/').next().unwrap_or(path).to_string();
            }
        }
    }
    let mut p: BTreeMap<String, f64> = BTreeMap::new();
    fn bump(p: &mut BTreeMap<String, f64>, k: &str, ms: f64) {
        *p.entry(k.to_string()).or_default() += ms;
    }
    // -qq hides "+++ exited": the end is the plugin's exit_group (or its last syscall).
    let end = t
        .calls
        .iter()
        .filter(|c| threads.contains(&c.pid))
        .map(|c| c.ts + c.dur)
        .fold(f64::NAN, f64::max);
    let end = t.exits.get(&t.main).copied().unwrap_or(end);
    let total = (end - t.first_ts) * 1000.0;
    // Startup: exec, loader, reading and checking the config, until the first file that is
    // not a library (boot id, namespaces) is opened.
    if let Some(c) = t.calls.iter().find(|c| {
        threads.contains(&c.pid)
            && c.name == "openat"
            && !["\"/etc/ld.so", "\"/lib", "\"/usr/lib"]
                .iter()
                .any(|p| c.args.contains(p))
    }) {
        bump(
            &mut p,
            "startup (exec, loader, config, until the first non-library open)",
            (c.ts - t.first_ts) * 1000.0,
        );
    }
    // Children: fork -> blocking wait4 (IPAM, iptables) or -> UAPI socket up (wireguard-go).
    for (pid, (fork_ts, bin)) in &children {
        let waited = t.calls.iter().find(|c| {
            threads.contains(&c.pid)
                && c.name == "wait4"
                && !c.args.contains("WNOHANG")
                && ret_num(&c.ret) == Some(*pid as i64)
        });
        if bin == "wireguard-go" || bin == "wg-cni-wgd" {
            let up = t.calls.iter().find(|c| {
                threads.contains(&c.pid)
                    && c.name == "connect"
                    && c.ts > *fork_ts
                    && ret_num(&c.ret) == Some(0)
                    && sock_path(&c.args).is_some_and(|s| s.ends_with(".sock"))
            });
            if let Some(up) = up {
                bump(
                    &mut p,
                    "userspace daemon start (fork -> UAPI socket answers)",
                    (up.ts + up.dur - fork_ts) * 1000.0,
                );
            }
        } else if let Some(w) = waited {
            let label = match bin.as_str() {
                "host-local" => "IPAM: host-local exec (VERSION + ADD)".to_string(),
                "iptables" | "ip6tables" | "xtables-nft-multi" | "iptables-save"
                | "iptables-restore" | "ip6tables-save" | "ip6tables-restore" => {
                    "iptables exec (gateway NAT rules)".to_string()
                }
                other => format!("exec {other}"),
            };
            bump(&mut p, &label, (w.ts + w.dur - fork_ts) * 1000.0);
            *p.entry(format!("count: {label}")).or_default() += 1.0;
        }
    }
    // Per-fd spans: UAPI sockets (connect .. close) and netlink I/O.
    let mut fds: HashMap<i64, (String, f64)> = HashMap::new(); // fd -> (kind, since)
    let mut uapi_links: HashSet<String> = HashSet::new();
    for c in t.calls.iter().filter(|c| threads.contains(&c.pid)) {
        match c.name.as_str() {
            "socket" if c.args.starts_with("AF_NETLINK") => {
                if let Some(fd) = ret_num(&c.ret) {
                    let kind = if c.args.contains("NETLINK_GENERIC") {
                        "genl"
                    } else {
                        "rtnl"
                    };
                    fds.insert(fd, (kind.to_string(), c.ts));
                }
            }
            "openat" if c.args.contains(".json\"") && !c.args.contains("/.tmp-") => {
                if let Some(fd) = ret_num(&c.ret).filter(|fd| *fd >= 0) {
                    fds.insert(fd, ("store".to_string(), c.ts));
                    bump(&mut p, "count: store files read", 1.0);
                }
            }
            "read"
                if fd_arg(&c.args)
                    .is_some_and(|fd| fds.get(&fd).is_some_and(|k| k.0 == "store")) =>
            {
                bump(&mut p, "count: read(2) calls on store files", 1.0);
            }
            "connect" if ret_num(&c.ret) == Some(0) => {
                if let (Some(fd), Some(path)) = (fd_arg(&c.args), sock_path(&c.args)) {
                    if path.starts_with("/var/run/wireguard/") {
                        let link = path
                            .rsplit('/')
                            .next()
                            .unwrap()
                            .trim_end_matches(".sock")
                            .to_string();
                        fds.insert(fd, (format!("uapi:{link}"), c.ts));
                    }
                }
            }
            "close" => {
                if let Some(fd) = fd_arg(&c.args) {
                    if let Some((kind, since)) = fds.remove(&fd) {
                        if kind == "store" {
                            bump(
                                &mut p,
                                "store: read record files (open → close)",
                                (c.ts + c.dur - since) * 1000.0,
                            );
                        }
                        if let Some(link) = kind.strip_prefix("uapi:") {
                            let label = if link == new_link {
                                "UAPI: configure the new link (key, port, all peers)"
                            } else if link.starts_with("wgg") {
                                "UAPI: the node gateway link"
                            } else {
                                uapi_links.insert(link.to_string());
                                "UAPI: add the newcomer to other live links"
                            };
                            bump(&mut p, label, (c.ts + c.dur - since) * 1000.0);
                        }
                    }
                }
            }
            "sendto" | "sendmsg" | "recvfrom" | "recvmsg" => {
                if let Some(fd) = fd_arg(&c.args) {
                    if let Some((kind, _)) = fds.get(&fd) {
                        if kind == "rtnl" || kind == "genl" {
                            bump(&mut p, "netlink I/O (rtnetlink, genetlink)", c.dur * 1000.0);
                        }
                    }
                }
            }
            "epoll_wait" | "epoll_pwait" => {
                bump(&mut p, "netlink I/O (rtnetlink, genetlink)", c.dur * 1000.0)
            }
            "fsync" | "fdatasync" => bump(&mut p, "fsync (store records)", c.dur * 1000.0),
            "flock" => bump(&mut p, "flock waits", c.dur * 1000.0),
            "openat" if c.args.contains("\"/proc/") && c.args.contains("/cmdline\"") => {
                *p.entry("count: /proc/*/cmdline reads".into()).or_default() += 1.0;
            }
            "setns" => *p.entry("count: setns".into()).or_default() += 1.0,
            _ => {}
        }
    }
    // A scan of /proc (looking for a daemon by name): first to last cmdline read.
    let scans: Vec<&Sys> = t
        .calls
        .iter()
        .filter(|c| threads.contains(&c.pid) && c.name == "openat" && c.args.contains("/cmdline\""))
        .collect();
    if scans.len() > 20 {
        bump(
            &mut p,
            "/proc scan for daemons (first to last cmdline read)",
            (scans[scans.len() - 1].ts - scans[0].ts) * 1000.0,
        );
    }
    *p.entry("count: other live links updated over UAPI".into())
        .or_default() += uapi_links.len() as f64;
    let accounted: f64 = p
        .iter()
        .filter(|(k, _)| !k.starts_with("count:"))
        .map(|(_, v)| *v)
        .sum();
    p.insert("total (under strace)".into(), total);
    p.insert(
        "rest (CPU, store reads, key generation, thread spawns, …)".into(),
        total - accounted,
    );
    p
}

fn syscall_totals(t: &Trace) -> BTreeMap<String, (f64, f64)> {
    let mut m: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut threads: HashSet<u32> = HashSet::from([t.main]);
    for c in &t.calls {
        if c.name.starts_with("clone") && c.args.contains("CLONE_THREAD") {
            if let Some(tid) = ret_num(&c.ret) {
                threads.insert(tid as u32);
            }
        }
    }
    for c in t.calls.iter().filter(|c| threads.contains(&c.pid)) {
        let e = m.entry(c.name.clone()).or_default();
        e.0 += 1.0;
        e.1 += c.dur * 1000.0;
    }
    m
}

fn traced_add(
    ctx: &Ctx,
    strace: &std::path::Path,
    plugin: &Plugin,
    cid: &str,
    nsname: &str,
    i: usize,
) -> Res<(Trace, f64, Option<Value>)> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let netns = ns::path(nsname);
    let trace_path = ctx.work.join(format!("trace-{i}.txt"));
    let out_path = ctx.work.join(format!("trace-{i}.out"));
    let env = plugin.env(ctx, "ADD", cid, &netns);
    let stdin = plugin.stdin(None);
    // -I 1: with `-o FILE PROG` strace would block SIGTERM, which ends a trace that hangs.
    let mut args: Vec<String> = ["-I", "1", "-f", "-ttt", "-T", "-qq", "-s", "256", "-o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(trace_path.display().to_string());
    // Children are detached when they exec: host-local and iptables run untraced, and the
    // daemon wireguard-go starts does not keep strace alive. (seccomp-bpf filtering would be
    // cheaper but does not combine with -b execve; tracing the Go children costs more.)
    args.extend(["-b".to_string(), "execve".to_string()]);
    args.push("--".into());
    args.push(plugin.bin.display().to_string());
    let err = std::fs::File::create(ctx.work.join("logs").join("strace.err"))
        .map_err(|e| e.to_string())?;
    // stdout to a file: strace holds the pipe too, so a pipe would not end with the plugin.
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(strace)
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("strace: {e}"))?;
    if let Some(mut si) = child.stdin.take() {
        let _ = si.write_all(&stdin);
    }
    let limit = Duration::from_secs(180);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        let text = std::fs::read_to_string(&trace_path).unwrap_or_default();
        let main = text.split_whitespace().next().unwrap_or("").to_string();
        let exited = !main.is_empty()
            && text
                .lines()
                .any(|l| l.starts_with(&format!("{main} ")) && l.contains(" exit_group("));
        if exited || started.elapsed() > limit {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: our own child; SIGTERM makes strace detach from every tracee and exit.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            if !exited {
                return Err("traced ADD did not finish in time".into());
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    let result: Option<Value> = serde_json::from_slice(&stdout).ok();
    let text = std::fs::read_to_string(&trace_path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&trace_path);
    let _ = std::fs::remove_file(&out_path);
    let failed = result.as_ref().is_none_or(|r| r.get("code").is_some())
        || status.is_some_and(|s| !s.success());
    if failed {
        return Err(format!(
            "traced ADD failed: {}",
            String::from_utf8_lossy(&stdout)
        ));
    }
    Ok((parse(&text), wall, result))
}

/// Syscalls as (name, arguments).
pub type Calls = Vec<(String, String)>;

/// One ADD under strace (children detached at exec): each of its syscalls as (name, arguments)
/// and the ADD's result.
pub fn traced_calls(
    ctx: &Ctx,
    strace: &std::path::Path,
    plugin: &Plugin,
    cid: &str,
    nsname: &str,
) -> Res<(Calls, Option<Value>)> {
    let (trace, _, result) = traced_add(ctx, strace, plugin, cid, nsname, 900)?;
    let calls = trace.calls.into_iter().map(|c| (c.name, c.args)).collect();
    Ok((calls, result))
}

/// The temporary (creation) name of the newcomer's userspace link, as the plugin derives it.
fn temp_link_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wgc{:012x}", hash & 0xffff_ffff_ffff)
}

fn profile_set(
    ctx: &Ctx,
    strace: &std::path::Path,
    plugin: &Plugin,
    label: &str,
    k: usize,
) -> Res<Value> {
    let mut per_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut sys: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut walls = Vec::new();
    for i in 0..k {
        let name = "wgbench-pf";
        ns::add(ctx, name)?;
        let cid = format!("probe-{label}-{i}");
        let r = traced_add(ctx, strace, plugin, &cid, name, i);
        let prev = r.as_ref().ok().and_then(|x| x.2.clone());
        let _ = plugin.simple(ctx, "DEL", &cid, &ns::path(name), prev.as_ref());
        ns::del(ctx, name);
        let (trace, wall, _) = r?;
        walls.push(wall);
        for (phase, ms) in phases(&trace, &temp_link_name(&cid, "eth0")) {
            per_phase.entry(phase).or_default().push(ms);
        }
        for (name, (count, ms)) in syscall_totals(&trace) {
            let e = sys.entry(name).or_default();
            e.0.push(count);
            e.1.push(ms);
        }
    }
    let mut phases_out = json!({});
    for (phase, v) in &per_phase {
        // Phases absent from some traces count as 0 there.
        let mut v = v.clone();
        v.resize(k, 0.0);
        phases_out[phase] = summary(&v, 2)["p50"].clone();
    }
    let mut top: Vec<(String, f64, f64)> = sys
        .iter()
        .map(|(n, (c, ms))| {
            (
                n.clone(),
                c.iter().sum::<f64>() / k as f64,
                ms.iter().sum::<f64>() / k as f64,
            )
        })
        .collect();
    top.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
    top.truncate(12);
    Ok(json!({
        "traced_adds": k,
        "wall_ms_under_strace": summary(&walls, 2),
        "phases_ms_p50": phases_out,
        "syscalls_top_by_time": top.iter().map(|(n, c, ms)| json!({"syscall": n, "calls": (c * 10.0).round() / 10.0, "ms": (ms * 100.0).round() / 100.0})).collect::<Vec<_>>(),
    }))
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let Some(strace) = ctx.strace.clone() else {
        return Err("no --strace given".into());
    };
    let k = ctx.opts.num("profile-adds", 10);
    let live_n = ctx.opts.num("profile-live", 20);
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let remote_n = ctx.opts.num("profile-remote", 980);
    let plugin = cni::wg_range(
        ctx,
        "wgbench-prof",
        "10.202.0.0/16",
        Some(("10.202.0.2", "10.202.0.250")),
        "57800-57999",
    );
    // Warm the page cache and the network directory.
    for i in 0..2 {
        let n = ns::add(ctx, "wgbench-pf")?;
        let e = plugin.simple(ctx, "ADD", &format!("prof-warm-{i}"), &n, None)?;
        let _ = plugin.simple(ctx, "DEL", &format!("prof-warm-{i}"), &n, e.json().as_ref());
        ns::del(ctx, "wgbench-pf");
    }
    let empty = profile_set(ctx, &strace, &plugin, "empty", k)?;
    let mut live: Vec<(String, String, Option<Value>)> = Vec::new();
    let outcome = (|| -> Res<(Value, Value)> {
        for j in 0..live_n {
            let name = format!("wgbench-pl{j}");
            let path = ns::add(ctx, &name)?;
            let cid = format!("prof-live-{j}");
            let e = plugin.simple(ctx, "ADD", &cid, &path, None)?;
            if !e.ok() {
                return Err(format!("live pod: {}", e.why()));
            }
            live.push((name, cid, e.json()));
        }
        let with_live = profile_set(ctx, &strace, &plugin, "live", k)?;
        if remote_n == 0 || live.is_empty() {
            return Ok((with_live, Value::Null));
        }
        let template = crate::scale::read_own_record(ctx, "wgbench-prof", &live[0].1)?;
        for j in 0..remote_n {
            crate::scale::write_remote(ctx, "wgbench-prof", "10.202", &template, j)?;
        }
        Ok((with_live, profile_set(ctx, &strace, &plugin, "remote", k)?))
    })();
    for (name, cid, prev) in live.iter().rev() {
        let _ = plugin.simple(ctx, "DEL", cid, &ns::path(name), prev.as_ref());
        ns::del(ctx, name);
    }
    let (with_live, with_remote) = outcome?;
    Ok(json!({
        "backend": ctx.backend,
        "method": "strace -f -b execve -ttt -T on whole ADDs; per-phase medians",
        "empty_network": empty,
        "with_live_pods": with_live,
        "live_pods": live_n,
        "with_remote_records": with_remote,
        "remote_records": remote_n,
    }))
}
