//! ADD (and DEL) latency of wg-cni as the network grows, against ADD into an empty network
//! measured interleaved (probe into the big network, probe into the empty one, alternating).
//!
//! The network holds up to `scale-live` (20) live local pods, made by real ADDs, and records
//! of simulated remote pods: copies of a real record of this network with another node name,
//! container id, key, address and netns, written into the store the way a sync agent would.
//! Points with live pods only give the cost of adding the newcomer as a peer to N live links.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::cni::{self, Plugin};
use crate::latency::Series;
use crate::stats::{ratio, raw_ms, summary_ms};
use crate::{ns, Ctx, Res};

const NETWORK: &str = "wgbench-scale";
const EMPTY: &str = "wgbench-empty";
pub const REMOTE_NODES: usize = 10;

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    b
}

pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

pub fn uuid() -> String {
    let b: [u8; 16] = random_bytes();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The record file of one attachment: `<store>/<network>/<node>/<cid>:<ifname>.json`.
fn record_path(ctx: &Ctx, network: &str, node: &str, cid: &str) -> PathBuf {
    cni::store_root(ctx)
        .join(network)
        .join(node)
        .join(format!("{cid}:eth0.json"))
}

/// Write simulated remote record `j` from a real record of this network.
pub fn write_remote(ctx: &Ctx, network: &str, net16: &str, template: &Value, j: usize) -> Res<()> {
    let node = format!("bench-remote-{}", j % REMOTE_NODES);
    let cid = format!("remote-{j}");
    let mut r = template.clone();
    r["node"] = json!(node);
    r["containerId"] = json!(cid);
    r["state"] = json!("ready");
    r["publicKey"] = json!(base64(&random_bytes::<32>()));
    // NET16.1.1 … : clear of this node's range (NET16.0.x).
    r["addresses"] = json!([format!("{net16}.{}.{}/16", 1 + j / 250, 1 + j % 250)]);
    r["endpoint"] = json!("127.0.0.2");
    r["listenPort"] = json!(56000 + (j % 1000) as u64);
    r["netns"] = json!(format!("/var/run/netns/remote-{j}"));
    r["netnsInode"] = json!(4_026_600_000u64 + j as u64);
    r["bootId"] = json!(uuid());
    r["hostName"] = json!("eth0");
    if let Some(obj) = r.as_object_mut() {
        obj.remove("daemonPid");
        obj.remove("pod");
    }
    let path = record_path(ctx, network, &node, &cid);
    let dir = path.parent().unwrap();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let body = serde_json::to_vec_pretty(&r).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &body))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A real record of this node (an ADD's), to copy: the node directory is the one holding it.
pub fn read_own_record(ctx: &Ctx, network: &str, cid: &str) -> Res<Value> {
    let dir = cni::store_root(ctx).join(network);
    for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
        let f = entry
            .map_err(|e| e.to_string())?
            .path()
            .join(format!("{cid}:eth0.json"));
        if f.is_file() {
            let text = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let node = v["node"].as_str().unwrap_or_default();
            if node.is_empty() || node.starts_with("bench-remote-") {
                return Err(format!("no usable record of this node (node {node:?})"));
            }
            return Ok(v);
        }
    }
    let listing: Vec<String> = walk(&dir);
    Err(format!(
        "no record of {cid} in {}: {listing:?}",
        dir.display()
    ))
}

struct Live {
    ns: String,
    cid: String,
    result: Option<Value>,
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let reps = ctx.opts.num("scale-reps", 30);
    let max_live = ctx.opts.num("scale-live", 20);
    let totals: Vec<usize> = ctx
        .opts
        .str("scale-points", "1,5,10,20,100,500,1000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let big = cni::wg_range(
        ctx,
        NETWORK,
        "10.201.0.0/16",
        Some(("10.201.0.2", "10.201.0.250")),
        "56400-56699",
    );
    let empty = cni::wg(ctx, EMPTY, "10.200.4.0/24", "56200-56399");

    let mut live: Vec<Live> = Vec::new();
    let mut live_add_us: Vec<f64> = Vec::new();
    let mut remote = 0usize;
    let mut template: Option<Value> = None;
    let mut node = String::new();
    let mut points = Vec::new();
    let result = (|| -> Res<()> {
        for &total in &totals {
            let want_live = total.min(max_live);
            while live.len() < want_live {
                let k = live.len();
                let name = format!("wgbench-sl{k}");
                let path = ns::add(ctx, &name)?;
                let cid = format!("scale-live-{k}");
                let e = big.simple(ctx, "ADD", &cid, &path, None)?;
                if !e.ok() {
                    return Err(format!("live pod {k}: {}", e.why()));
                }
                live_add_us.push(e.us);
                live.push(Live {
                    ns: name,
                    cid,
                    result: e.json(),
                });
            }
            if template.is_none() && !live.is_empty() {
                let v = read_own_record(ctx, NETWORK, &live[0].cid)?;
                node = v["node"].as_str().unwrap_or_default().to_string();
                template = Some(v);
            }
            while live.len() + remote < total {
                let t = template.as_ref().ok_or("no record to copy")?;
                write_remote(ctx, NETWORK, "10.201", t, remote)?;
                remote += 1;
            }
            points.push(measure_point(ctx, &big, &empty, reps, live.len(), remote)?);
            crate::log(format!(
                "[{}] scale: {} attachments ({} live, {} remote) done",
                ctx.label,
                live.len() + remote,
                live.len(),
                remote
            ));
        }
        Ok(())
    })();
    // Tear down the live pods (records of remote pods go with the work directory).
    for l in live.iter().rev() {
        let _ = big.simple(ctx, "DEL", &l.cid, &ns::path(&l.ns), l.result.as_ref());
        ns::del(ctx, &l.ns);
    }
    result?;

    Ok(json!({
        "backend": ctx.backend,
        "reps": reps,
        "node": node,
        "remote_nodes": REMOTE_NODES,
        "live_add_ms": raw_ms(&live_add_us),
        "points": points,
    }))
}

fn measure_point(
    ctx: &Ctx,
    big: &Plugin,
    empty: &Plugin,
    reps: usize,
    live: usize,
    remote: usize,
) -> Res<Value> {
    let mut s = [
        Series::default(), // ADD big
        Series::default(), // ADD empty
        Series::default(), // DEL big
        Series::default(), // DEL empty
    ];
    for r in 0..reps {
        let pb = ns::add(ctx, "wgbench-sp")?;
        let pe = ns::add(ctx, "wgbench-se")?;
        let cid_b = format!("scale-probe-{live}-{remote}-{r}");
        let cid_e = format!("empty-probe-{live}-{remote}-{r}");
        let pods: [(&Plugin, &str, &str); 2] = [(big, &pb, &cid_b), (empty, &pe, &cid_e)];
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut results: [Option<Value>; 2] = [None, None];
        for &k in &order {
            let (p, netns, cid) = pods[k];
            let e = p.simple(ctx, "ADD", cid, netns, None)?;
            results[k] = if e.ok() { e.json() } else { None };
            s[k].record(&e, true);
        }
        for &k in &order {
            let (p, netns, cid) = pods[k];
            let e = p.simple(ctx, "DEL", cid, netns, results[k].as_ref())?;
            s[2 + k].record(&e, true);
        }
        ns::del(ctx, "wgbench-sp");
        ns::del(ctx, "wgbench-se");
    }
    let add_big = summary_ms(&s[0].us);
    let add_empty = summary_ms(&s[1].us);
    let del_big = summary_ms(&s[2].us);
    let del_empty = summary_ms(&s[3].us);
    Ok(json!({
        "attachments": live + remote,
        "live": live,
        "remote": remote,
        "add": add_big,
        "add_empty": add_empty,
        "add_ratio": ratio(&add_big, &add_empty),
        "del": del_big,
        "del_empty": del_empty,
        "del_ratio": ratio(&del_big, &del_empty),
        "failures": s.iter().map(|x| x.failures).sum::<usize>(),
        "errors": s.iter().flat_map(|x| x.errors.clone()).take(3).collect::<Vec<_>>(),
        "samples_ms": {
            "add": raw_ms(&s[0].us), "add_empty": raw_ms(&s[1].us),
            "del": raw_ms(&s[2].us), "del_empty": raw_ms(&s[3].us),
        },
    }))
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}
