//! Phase `scale-ondemand` (issue 21, benchmark item 1): ADD and DEL in a big cluster whose
//! network says `peering: "on-demand"`, against a steady ADD into a network holding one pod,
//! interleaved; the same in mesh mode at the largest size that fits in memory; and the
//! standing memory of a pod's daemon and of the node gateway's daemon in that cluster.
//!
//! A cluster here is this node's live pods (real ADDs; their links are real daemons) plus
//! simulated other nodes, written into the store as the agent mirrors an accepted node:
//! `<store>/<network>/<node>/node.json` (the node's mode, address, subnet, MTU),
//! `<node>/gateway.json` (its gateway's public record, a copy of this node's with another key,
//! address, subnet and endpoint) and one record per pod (a copy of a real record likewise).
//! They are written before the first live ADD, so every link starts with the peer set an
//! agent would keep: the node gateway is built with the local pods and, on demand, one relay
//! peer per remote gateway (in mesh: every pod and gateway of the cluster), each pod link with
//! its gateway (in mesh: every other pod and every gateway). Each network has a `clusterRange`
//! of its own covering its nodes' /24 subnets; the one-pod baselines are networks of the same
//! mode with one anchor pod and no other node.
//!
//! Traffic: only the on-demand gateway sends (its relay peers keep a 25 s keepalive), WireGuard
//! handshake initiations to the simulated gateways' endpoints, loopback addresses 127.0.2.N on
//! ports 23001.. where nothing listens.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cni::{self, Plugin};
use crate::latency::Series;
use crate::memory::rss_kb;
use crate::scale::{base64, random_bytes, uuid};
use crate::stats::{ratio, raw_ms, summary, summary_ms};
use crate::throughput::comm;
use crate::{ns, uapi, Ctx, Res};

/// What wg-cni-wgd keeps per peer (memory phase: ~26 KiB), with some margin.
const KIB_PER_PEER: u64 = 28;
/// A wg-cni-wgd pod daemon with a few peers.
const KIB_PER_DAEMON: u64 = 3 * 1024;

/// One network of the phase: its name, the second octet of its addresses (`10.O.0.0/16` is
/// its cluster range, `10.O.0.0/24` this node's subnet, `10.O.N.0/24` simulated node N's), its
/// listen ports and its mode.
struct Net {
    name: &'static str,
    octet: u8,
    ports: &'static str,
    peering: &'static str,
}

const OD_BASE: Net = Net {
    name: "wgbench-od1",
    octet: 205,
    ports: "58000-58049",
    peering: "on-demand",
};
const OD_LOCAL: Net = Net {
    name: "wgbench-odl",
    octet: 206,
    ports: "58100-58399",
    peering: "on-demand",
};
const OD_BIG: Net = Net {
    name: "wgbench-od",
    octet: 204,
    ports: "58400-58699",
    peering: "on-demand",
};
const MESH_BASE: Net = Net {
    name: "wgbench-odm1",
    octet: 207,
    ports: "58050-58099",
    peering: "mesh",
};
const MESH_BIG: Net = Net {
    name: "wgbench-odm",
    octet: 208,
    ports: "58700-58999",
    peering: "mesh",
};

fn plugin(ctx: &Ctx, net: &Net) -> Plugin {
    let o = net.octet;
    let mut p = cni::wg(ctx, net.name, &format!("10.{o}.0.0/24"), net.ports);
    p.conf["peering"] = json!(net.peering);
    p.conf["clusterRange"] = json!(format!("10.{o}.0.0/16"));
    cni::remember(ctx, &p);
    p
}

/// What a simulated node's files are copied from: a real record and gateway record of this
/// node (the baseline's anchor pod).
struct Templates {
    record: Value,
    gateway: Value,
}

fn node_dir(ctx: &Ctx, network: &str, node: &str) -> Res<PathBuf> {
    let dir = cni::store_root(ctx).join(network).join(node);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn write_json(path: &Path, value: &Value) -> Res<()> {
    let body = serde_json::to_vec_pretty(value).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &body))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Simulated node `j` (1..=254) of `net` with `pods` pod records, as the agent mirrors it.
fn write_node(ctx: &Ctx, net: &Net, t: &Templates, j: usize, pods: usize) -> Res<()> {
    let o = net.octet;
    let node = format!("bench-node-{j:03}");
    let dir = node_dir(ctx, net.name, &node)?;
    let endpoint = format!("127.0.2.{j}");
    let boot_id = uuid();
    let subnet = format!("10.{o}.{j}.0/24");
    write_json(
        &dir.join("node.json"),
        &json!({
            "schema": 1,
            "node": node,
            "endpoints": [endpoint],
            "bootId": boot_id,
            "subnets": [subnet],
            "mtu": 1420,
            "stale": false,
            "peering": net.peering,
        }),
    )?;
    let mut g = t.gateway.clone();
    g["network"] = json!(net.name);
    g["node"] = json!(node);
    g["publicKey"] = json!(base64(&random_bytes::<32>()));
    g["addresses"] = json!([format!("10.{o}.{j}.1/32")]);
    g["subnets"] = json!([subnet]);
    g["clusterRanges"] = json!([format!("10.{o}.0.0/16")]);
    g["endpoint"] = json!(endpoint);
    g["listenPort"] = json!(23000 + j as u64);
    g["hostName"] = json!(format!("wgg{j:012x}"));
    g["bootId"] = json!(boot_id);
    if let Some(obj) = g.as_object_mut() {
        obj.remove("daemonPid");
    }
    write_json(&dir.join("gateway.json"), &g)?;
    for k in 0..pods {
        let cid = format!("pod-{j}-{k}");
        let mut r = t.record.clone();
        r["network"] = json!(net.name);
        r["node"] = json!(node);
        r["containerId"] = json!(cid);
        r["ifname"] = json!("eth0");
        r["state"] = json!("ready");
        r["publicKey"] = json!(base64(&random_bytes::<32>()));
        r["addresses"] = json!([format!("10.{o}.{j}.{}/24", k + 2)]);
        r["endpoint"] = json!(endpoint);
        r["listenPort"] = json!(23300 + k as u64);
        // What `Record::public` leaves of the local-only fields.
        r["netns"] = json!("");
        r["netnsInode"] = json!(0);
        r["bootId"] = json!(boot_id);
        r["hostName"] = json!(format!("wgc{:012x}", j * 1000 + k));
        if let Some(obj) = r.as_object_mut() {
            obj.remove("daemonPid");
            obj.remove("pod");
        }
        write_json(&dir.join(format!("{cid}:eth0.json")), &r)?;
    }
    Ok(())
}

/// This node's gateway record of `network`.
fn own_gateway(ctx: &Ctx, network: &str, node: &str) -> Res<Value> {
    let path = cni::store_root(ctx)
        .join(network)
        .join(node)
        .join("gateway.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn peer_count(host: &str) -> Res<usize> {
    Ok(uapi::get_text(host)?
        .lines()
        .filter(|l| l.starts_with("public_key="))
        .count())
}

fn mib(kb: f64) -> f64 {
    (kb / 1024.0 * 100.0).round() / 100.0
}

/// A pod kept for a whole point (or the phase).
struct Pod {
    ns: String,
    cid: String,
    result: Option<Value>,
}

fn add_pod(ctx: &Ctx, p: &Plugin, nsname: &str, cid: &str) -> Res<(Pod, f64)> {
    let path = ns::add(ctx, nsname)?;
    let e = p.simple(ctx, "ADD", cid, &path, None)?;
    if !e.ok() {
        ns::del(ctx, nsname);
        return Err(format!("ADD {cid}: {}", e.why()));
    }
    Ok((
        Pod {
            ns: nsname.to_string(),
            cid: cid.to_string(),
            result: e.json(),
        },
        e.us,
    ))
}

fn del_pods(ctx: &Ctx, p: &Plugin, pods: &mut Vec<Pod>) {
    while let Some(pod) = pods.pop() {
        match p.simple(
            ctx,
            "DEL",
            &pod.cid,
            &ns::path(&pod.ns),
            pod.result.as_ref(),
        ) {
            Ok(e) if e.ok() => {}
            Ok(e) => crate::log(format!("DEL {}: {}", pod.cid, e.why())),
            Err(e) => crate::log(format!("DEL {}: {e}", pod.cid)),
        }
        ns::del(ctx, &pod.ns);
    }
}

/// The daemons of this node's links in `network` after a second of rest: VmRSS of each live
/// pod's daemon and of the gateway's, and their peer counts (read over UAPI).
fn memory(ctx: &Ctx, network: &str, node: &str, pods: &[Pod]) -> Res<Value> {
    std::thread::sleep(Duration::from_secs(1));
    let mut rss = Vec::new();
    let mut process = String::new();
    let mut pod_peers = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let record = cni::own_record(ctx, network, &pod.cid)?;
        let pid = record["daemonPid"]
            .as_u64()
            .ok_or("record without daemonPid")? as i32;
        let (kb, _) = rss_kb(pid).ok_or_else(|| format!("daemon {pid} gone"))?;
        rss.push(kb as f64);
        if i == 0 {
            process = comm(pid);
        }
        if i % 10 == 0 {
            let host = record["hostName"]
                .as_str()
                .ok_or("record without hostName")?;
            pod_peers.push(peer_count(host)?);
        }
    }
    let gw = own_gateway(ctx, network, node)?;
    let gw_pid = gw["daemonPid"]
        .as_u64()
        .ok_or("gateway without daemonPid")? as i32;
    let (gw_kb, gw_hwm) = rss_kb(gw_pid).ok_or("gateway daemon gone")?;
    let gw_peers = peer_count(gw["hostName"].as_str().ok_or("gateway without hostName")?)?;
    let rss_mib: Vec<f64> = rss.iter().map(|kb| mib(*kb)).collect();
    Ok(json!({
        "process": process,
        "pod_daemons": pods.len(),
        "pod_rss_mib": summary(&rss_mib, 2),
        "pod_rss_total_mib": mib(rss.iter().sum()),
        "pod_link_peers": pod_peers,
        "gateway_process": comm(gw_pid),
        "gateway_rss_mib": mib(gw_kb as f64),
        "gateway_hwm_mib": mib(gw_hwm as f64),
        "gateway_peers": gw_peers,
    }))
}

/// A cluster to build and measure: `live` local pods of `net`, `nodes` simulated nodes of
/// `per_node` pods each.
struct Point<'a> {
    label: &'static str,
    net: &'a Net,
    live: usize,
    nodes: usize,
    per_node: usize,
}

/// Build `point`, read its memory, measure `reps` probes interleaved with probes into `base`,
/// tear its live pods down.
fn run_point(
    ctx: &Ctx,
    point: &Point,
    base: &Plugin,
    t: &Templates,
    node: &str,
    reps: usize,
) -> Res<Value> {
    let big = plugin(ctx, point.net);
    let started = Instant::now();
    for j in 1..=point.nodes {
        write_node(ctx, point.net, t, j, point.per_node)?;
    }
    let write_s = started.elapsed().as_secs_f64();
    let mut live: Vec<Pod> = Vec::new();
    let mut live_add_us = Vec::new();
    let result = (|| -> Res<Value> {
        for k in 0..point.live {
            let tag = point.net.name.trim_start_matches("wgbench-");
            let (pod, us) = add_pod(
                ctx,
                &big,
                &format!("wgbench-{tag}-{k}"),
                &format!("{tag}-live-{k}"),
            )?;
            live.push(pod);
            live_add_us.push(us);
        }
        let build_s = started.elapsed().as_secs_f64();
        let mem = memory(ctx, point.net.name, node, &live)?;
        crate::log(format!(
            "[{}] scale-ondemand: {} built in {build_s:.1} s: {} live + {} × {} simulated; pod daemon {} MiB, gateway {} MiB with {} peers",
            ctx.label,
            point.label,
            point.live,
            point.nodes,
            point.per_node,
            mem["pod_rss_mib"]["p50"],
            mem["gateway_rss_mib"],
            mem["gateway_peers"]
        ));
        let mut v = measure(ctx, &big, base, reps, point)?;
        let tag = point.net.name.trim_start_matches("wgbench-");
        v["traced_add"] = json!({
            "cluster": traced_files(ctx, &big, node, &format!("{tag}-traced"))?,
            "one_pod": traced_files(ctx, base, node, &format!("{tag}-traced-base"))?,
        });
        v["label"] = json!(point.label);
        v["peering"] = json!(point.net.peering);
        v["attachments"] = json!(point.live + point.nodes * point.per_node);
        v["live"] = json!(point.live);
        v["nodes"] = json!(point.nodes);
        v["per_node"] = json!(point.per_node);
        v["memory"] = mem;
        v["build_seconds"] = json!((build_s * 10.0).round() / 10.0);
        v["write_seconds"] = json!((write_s * 100.0).round() / 100.0);
        v["live_add_ms"] = summary_ms(&live_add_us);
        Ok(v)
    })();
    del_pods(ctx, &big, &mut live);
    let v = result?;
    crate::log(format!(
        "[{}] scale-ondemand: {}: ADD p50 {} ms vs one-pod {} ms ({}×), DEL p50 {} ms",
        ctx.label,
        point.label,
        v["add"]["p50"],
        v["add_base"]["p50"],
        v["add_ratio"]["p50"],
        v["del"]["p50"]
    ));
    Ok(v)
}

/// `reps` rounds: ADD a probe into the big network and one into `base` (alternating which goes
/// first), then DEL both. The first round also reads the probe link's peer count.
fn measure(ctx: &Ctx, big: &Plugin, base: &Plugin, reps: usize, point: &Point) -> Res<Value> {
    let network = big.conf["name"].as_str().unwrap_or_default().to_string();
    let tag = point.net.name.trim_start_matches("wgbench-");
    let mut s = [
        Series::default(), // ADD big
        Series::default(), // ADD base
        Series::default(), // DEL big
        Series::default(), // DEL base
    ];
    let mut probe_peers = Value::Null;
    for r in 0..reps {
        let pb = ns::add(ctx, "wgbench-odp")?;
        let pe = ns::add(ctx, "wgbench-odb")?;
        let cid_b = format!("{tag}-probe-{r}");
        let cid_e = format!("{tag}-base-{r}");
        let pods: [(&Plugin, &str, &str); 2] = [(big, &pb, &cid_b), (base, &pe, &cid_e)];
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut results: [Option<Value>; 2] = [None, None];
        for &k in &order {
            let (p, netns, cid) = pods[k];
            let e = p.simple(ctx, "ADD", cid, netns, None)?;
            results[k] = if e.ok() { e.json() } else { None };
            s[k].record(&e, true);
        }
        if r == 0 && results[0].is_some() {
            probe_peers = match cni::own_record(ctx, &network, &cid_b) {
                Ok(rec) => rec["hostName"]
                    .as_str()
                    .and_then(|h| peer_count(h).ok())
                    .map_or(Value::Null, |n| json!(n)),
                Err(_) => Value::Null,
            };
        }
        for &k in &order {
            let (p, netns, cid) = pods[k];
            let e = p.simple(ctx, "DEL", cid, netns, results[k].as_ref())?;
            s[2 + k].record(&e, true);
        }
        ns::del(ctx, "wgbench-odp");
        ns::del(ctx, "wgbench-odb");
    }
    let add = summary_ms(&s[0].us);
    let add_base = summary_ms(&s[1].us);
    let del = summary_ms(&s[2].us);
    let del_base = summary_ms(&s[3].us);
    Ok(json!({
        "reps": reps,
        "add": add,
        "add_base": add_base,
        "add_ratio": ratio(&add, &add_base),
        "del": del,
        "del_base": del_base,
        "del_ratio": ratio(&del, &del_base),
        "probe_link_peers": probe_peers,
        "failures": s.iter().map(|x| x.failures).sum::<usize>(),
        "errors": s.iter().flat_map(|x| x.errors.clone()).take(3).collect::<Vec<_>>(),
        "samples_ms": {
            "add": raw_ms(&s[0].us), "add_base": raw_ms(&s[1].us),
            "del": raw_ms(&s[2].us), "del_base": raw_ms(&s[3].us),
        },
    }))
}

/// What one ADD into `p` opens and stats, from strace (children detached at exec): syscall
/// counts, and the store files it opens by kind (this node's, and the other nodes' node.json,
/// gateway.json and pod records). None without strace.
fn traced_files(ctx: &Ctx, p: &Plugin, node: &str, cid: &str) -> Res<Value> {
    let Some(strace) = ctx.strace.clone() else {
        return Ok(Value::Null);
    };
    let network = p.conf["name"].as_str().unwrap_or_default().to_string();
    let nsname = "wgbench-odt";
    let path = ns::add(ctx, nsname)?;
    let traced = crate::profile::traced_calls(ctx, &strace, p, cid, nsname);
    let result = traced.as_ref().ok().and_then(|(_, r)| r.clone());
    let del = p.simple(ctx, "DEL", cid, &path, result.as_ref());
    ns::del(ctx, nsname);
    let (calls, _) = traced?;
    if let Ok(e) = &del {
        if !e.ok() {
            crate::log(format!("DEL {cid}: {}", e.why()));
        }
    }
    let count = |names: &[&str]| {
        calls
            .iter()
            .filter(|(n, _)| names.contains(&n.as_str()))
            .count()
    };
    let prefix = format!("/store/{network}/");
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for (_, args) in calls.iter().filter(|(n, _)| n == "openat" || n == "open") {
        let Some(rest) = args.split('"').nth(1).and_then(|p| p.split(&prefix).nth(1)) else {
            continue;
        };
        let (owner, file) = rest.split_once('/').unwrap_or((rest, ""));
        let kind = match (owner == node, file) {
            (_, "") => "network directory",
            (true, _) => "this node's files",
            (false, "node.json") => "other nodes' node.json",
            (false, "gateway.json") => "other nodes' gateway.json",
            (false, f) if f.ends_with(".json") && f.contains(':') => "other nodes' pod records",
            (false, _) => "other nodes' other files",
        };
        *kinds.entry(kind).or_default() += 1;
    }
    Ok(json!({
        "syscalls": calls.len(),
        "openat": count(&["openat", "open"]),
        "stat": count(&["statx", "newfstatat", "fstat", "lstat", "stat"]),
        "read": count(&["read", "pread64"]),
        "getdents64": count(&["getdents64"]),
        "store_opens": kinds,
    }))
}

fn mem_available_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The most simulated nodes (at most `wanted`) whose mesh fits in half the available memory:
/// every live link and the gateway hold a peer per attachment and gateway.
fn mesh_nodes_that_fit(live: usize, per_node: usize, wanted: usize) -> (usize, u64, u64) {
    let avail = mem_available_kb().unwrap_or(0);
    let need = |nodes: usize| -> u64 {
        let peers = (live + nodes * (per_node + 1)) as u64;
        (live as u64 + 2) * peers * KIB_PER_PEER + live as u64 * KIB_PER_DAEMON
    };
    let mut nodes = wanted;
    while nodes > 0 && need(nodes) > avail / 2 {
        nodes -= 1;
    }
    (nodes, need(nodes), avail)
}

/// A one-pod baseline network of `net`'s mode, its anchor pod, and (from the anchor) the
/// templates and this node's name.
fn baseline(ctx: &Ctx, net: &Net) -> Res<(Plugin, Pod, Templates, String)> {
    let p = plugin(ctx, net);
    let tag = net.name.trim_start_matches("wgbench-");
    let (anchor, _) = add_pod(
        ctx,
        &p,
        &format!("wgbench-{tag}a"),
        &format!("{tag}-anchor"),
    )?;
    let record = cni::own_record(ctx, net.name, &anchor.cid)?;
    let node = record["node"].as_str().unwrap_or_default().to_string();
    let gateway = own_gateway(ctx, net.name, &node)?;
    Ok((p, anchor, Templates { record, gateway }, node))
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    if ctx.backend != "userspace" {
        return Err("native only (userspace backend: per-pod daemons)".into());
    }
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let reps = ctx.opts.num("odm-reps", 100);
    let mesh_reps = ctx.opts.num("odm-mesh-reps", 20);
    let live = ctx.opts.num("odm-live", 100).clamp(1, 250);
    let nodes = ctx.opts.num("odm-nodes", 99).min(254);
    let per_node = ctx.opts.num("odm-per-node", 100).clamp(1, 250);
    let mesh_wanted = ctx.opts.num("odm-mesh-nodes", 19).min(254);
    let local_point = ctx.opts.num("odm-local-point", 1) == 1;
    let mut out = json!({
        "backend": ctx.backend,
        "reps": reps,
        "mesh_reps": mesh_reps,
        "live": live,
        "per_node": per_node,
        "points": [],
    });
    let mut points = Vec::new();

    // On demand: the baseline's anchor stays for both on-demand points.
    let (od_base, od_anchor, t, node) = baseline(ctx, &OD_BASE)?;
    out["node"] = json!(node);
    let mut anchors = vec![od_anchor];
    let on_demand = (|| -> Res<()> {
        if local_point {
            let point = Point {
                label: "on-demand, this node only",
                net: &OD_LOCAL,
                live,
                nodes: 0,
                per_node,
            };
            points.push(run_point(ctx, &point, &od_base, &t, &node, reps)?);
        }
        let point = Point {
            label: "on-demand",
            net: &OD_BIG,
            live,
            nodes,
            per_node,
        };
        points.push(run_point(ctx, &point, &od_base, &t, &node, reps)?);
        Ok(())
    })();
    del_pods(ctx, &od_base, &mut anchors);
    on_demand?;

    // Mesh, at the size that fits.
    let (mesh_nodes, need_kb, avail_kb) = mesh_nodes_that_fit(live, per_node, mesh_wanted);
    out["mesh_memory"] = json!({
        "nodes_wanted": mesh_wanted,
        "nodes": mesh_nodes,
        "estimate_gib": (need_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "available_gib": (avail_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kib_per_peer_assumed": KIB_PER_PEER,
    });
    if mesh_nodes < mesh_wanted {
        crate::log(format!(
            "[{}] scale-ondemand: mesh reduced to {mesh_nodes} simulated nodes (of {mesh_wanted}) to fit in memory",
            ctx.label
        ));
    }
    let (mesh_base, mesh_anchor, t, node) = baseline(ctx, &MESH_BASE)?;
    let mut anchors = vec![mesh_anchor];
    let mesh = (|| -> Res<()> {
        let point = Point {
            label: "mesh",
            net: &MESH_BIG,
            live,
            nodes: mesh_nodes,
            per_node,
        };
        points.push(run_point(ctx, &point, &mesh_base, &t, &node, mesh_reps)?);
        Ok(())
    })();
    del_pods(ctx, &mesh_base, &mut anchors);
    mesh?;
    out["points"] = json!(points);
    Ok(out)
}

/// The target rows: (target, measured, verdict, short name).
pub fn targets(v: &Value) -> Vec<(String, String, Option<bool>, String)> {
    let mut out = Vec::new();
    let Some(points) = v["points"].as_array() else {
        return out;
    };
    let Some(od) = points.iter().find(|p| p["label"] == "on-demand") else {
        return out;
    };
    let r = od["add_ratio"]["p50"].as_f64();
    out.push((
        format!(
            "ADD p50 at {} attachments, on-demand ({} live local pods + {} simulated nodes × {}), ≤ 1.2× a steady ADD into a network holding one pod (native)",
            count(&od["attachments"]), od["live"], od["nodes"], od["per_node"]
        ),
        format!(
            "{}× ({} vs {} ms; p99 {} vs {} ms)",
            f(&od["add_ratio"]["p50"], 2),
            f(&od["add"]["p50"], 1),
            f(&od["add_base"]["p50"], 1),
            f(&od["add"]["p99"], 1),
            f(&od["add_base"]["p99"], 1)
        ),
        r.map(|x| x <= 1.2),
        "on-demand ADD at scale (native)".into(),
    ));
    let m = &od["memory"];
    let pod_max = m["pod_rss_mib"]["max"].as_f64();
    out.push((
        format!(
            "pod daemon RSS ≤ 4 MB at {} cluster pods, on-demand (native)",
            count(&od["attachments"])
        ),
        format!(
            "{} MiB p50, {} MiB max of {} pods ({} peer each); gateway daemon {} MiB with {} peers",
            f(&m["pod_rss_mib"]["p50"], 2),
            f(&m["pod_rss_mib"]["max"], 2),
            m["pod_daemons"],
            m["pod_link_peers"][0],
            f(&m["gateway_rss_mib"], 1),
            m["gateway_peers"]
        ),
        pod_max.map(|x| x * 1024.0 * 1024.0 <= 4_000_000.0),
        "on-demand pod daemon RSS (native)".into(),
    ));
    out
}

/// An integer with thousands separators (10,000).
fn count(v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return "–".into();
    };
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

fn ppp(s: &Value, digits: usize) -> String {
    format!(
        "{} / {} / {}",
        f(&s["p50"], digits),
        f(&s["p90"], digits),
        f(&s["p99"], digits)
    )
}

/// The results.md section.
pub fn report(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let pods = v["points"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["label"] == "on-demand"))
        .map_or("–".to_string(), |p| count(&p["attachments"]));
    let _ = writeln!(
        md,
        "## Scale with on-demand peering: ADD in a cluster of {pods} pods (native)\n"
    );
    if let Some(e) = v["error"].as_str() {
        let _ = writeln!(md, "The phase failed: {e}\n");
        return md;
    }
    let _ = writeln!(
        md,
        "Phase `scale-ondemand` (bench/driver/src/ondemand.rs; {:.0} s). A cluster = {} live \
         pods on this node (real ADDs, wg-cni-wgd daemons) + simulated other nodes of {} pods \
         each, mirrored into the store as the agent mirrors an accepted node (`node.json` with \
         the node's mode, address and /24, `gateway.json`, one record per pod), written before \
         the first live ADD so that every link starts with the peers an agent would keep it at. \
         Each network has its own `clusterRange`; **one-pod** is a network of the same mode \
         holding one anchor pod and no other node. {} probe ADD+DEL per on-demand row and {} in \
         mesh, each interleaved with one into the one-pod network (alternating which goes \
         first); fresh netns each.\n",
        v["phase_seconds"].as_f64().unwrap_or(0.0),
        v["live"],
        v["per_node"],
        v["reps"],
        v["mesh_reps"]
    );
    let _ = writeln!(
        md,
        "| cluster | attachments | live local + simulated nodes × pods | ADD p50 / p90 / p99 | one-pod ADD p50 / p90 / p99 | ÷ one-pod (p50 / p90 / p99) | DEL p50 / p90 / p99 | DEL ÷ one-pod p50 | probe link peers | failures |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for p in v["points"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} + {} × {} | {} | {} | {} / {} / {} | {} | {} | {} | {} |",
            p["label"].as_str().unwrap_or("?"),
            count(&p["attachments"]),
            p["live"],
            p["nodes"],
            p["per_node"],
            ppp(&p["add"], 1),
            ppp(&p["add_base"], 1),
            f(&p["add_ratio"]["p50"], 2),
            f(&p["add_ratio"]["p90"], 2),
            f(&p["add_ratio"]["p99"], 2),
            ppp(&p["del"], 1),
            f(&p["del_ratio"]["p50"], 2),
            p["probe_link_peers"],
            p["failures"]
        );
    }
    let _ = writeln!(
        md,
        "\n**Memory** (VmRSS a second after the cluster was built; peers read over UAPI):\n"
    );
    let _ = writeln!(
        md,
        "| cluster | pod daemon p50 / max (MiB) | pod link peers | all {} pod daemons (MiB) | gateway daemon (MiB) | gateway peers | live ADDs while building, p50 / p99 (ms) | built in (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        v["live"]
    );
    for p in v["points"].as_array().into_iter().flatten() {
        let m = &p["memory"];
        let _ = writeln!(
            md,
            "| {} | {} / {} | {} | {} | {} | {} | {} / {} | {} |",
            p["label"].as_str().unwrap_or("?"),
            f(&m["pod_rss_mib"]["p50"], 2),
            f(&m["pod_rss_mib"]["max"], 2),
            m["pod_link_peers"][0],
            f(&m["pod_rss_total_mib"], 0),
            f(&m["gateway_rss_mib"], 2),
            m["gateway_peers"],
            f(&p["live_add_ms"]["p50"], 1),
            f(&p["live_add_ms"]["p99"], 1),
            f(&p["build_seconds"], 1)
        );
    }
    let traced: Vec<&Value> = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["traced_add"]["cluster"].is_object())
        .collect();
    if !traced.is_empty() {
        let _ = writeln!(
            md,
            "\n**What one ADD opens** (one more probe ADD per cluster under `strace -f -b execve`, \
             the plugin only; store files by whose they are):\n"
        );
        let _ = writeln!(
            md,
            "| cluster | syscalls | openat | stat calls | read | this node's store files | other nodes' node.json / gateway.json / pod records | one-pod network: syscalls / openat / stat calls |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for p in traced {
            let c = &p["traced_add"]["cluster"];
            let b = &p["traced_add"]["one_pod"];
            let o = &c["store_opens"];
            let n = |k: &str| o[k].as_u64().unwrap_or(0);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} |",
                p["label"].as_str().unwrap_or("?"),
                c["syscalls"],
                c["openat"],
                c["stat"],
                c["read"],
                n("this node's files"),
                n("other nodes' node.json"),
                n("other nodes' gateway.json"),
                n("other nodes' pod records"),
                b["syscalls"],
                b["openat"],
                b["stat"]
            );
        }
    }
    let mm = &v["mesh_memory"];
    let _ = writeln!(
        md,
        "\nMesh is measured at {} simulated nodes (asked: {}): every live link and the gateway \
         hold a peer per pod of the cluster, ~26 KiB each on wg-cni-wgd, estimated {} GiB for \
         it against {} GiB available (the phase keeps to half). At 10,000 pods the {} live \
         links would need ~{:.0} GiB.\n",
        mm["nodes"],
        mm["nodes_wanted"],
        f(&mm["estimate_gib"], 1),
        f(&mm["available_gib"], 1),
        v["live"],
        (v["live"].as_f64().unwrap_or(0.0) + 2.0) * 10_000.0 * 26.0 / 1048576.0
    );
    if let Some(errs) = v["points"].as_array() {
        for p in errs {
            if let Some(e) = p["errors"].as_array().and_then(|a| a.first()) {
                let _ = writeln!(
                    md,
                    "{} failure: `{}`\n",
                    p["label"].as_str().unwrap_or("?"),
                    e.as_str().unwrap_or("")
                );
            }
        }
    }
    md
}
