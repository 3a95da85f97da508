//! results.json (every part, plus the machine) and results.md (tables, targets, profile).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::throughput::WG_GO;
use crate::{Ctx, Res};

const ENVS: [(&str, &str); 2] = [
    ("native", "native, userspace backend (wg-cni-wgd)"),
    ("guest", "QEMU guest, kernel backend"),
];

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

fn ratio3(r: &Value) -> String {
    format!(
        "{} / {} / {}",
        f(&r["p50"], 2),
        f(&r["p90"], 2),
        f(&r["p99"], 2)
    )
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn load_parts(dir: &PathBuf) -> Res<BTreeMap<String, Value>> {
    let mut parts = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(key) = name.strip_suffix(".json") else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        parts.insert(key.to_string(), v);
    }
    Ok(parts)
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let dir = PathBuf::from(ctx.opts.str("parts", "parts"));
    let mut parts = load_parts(&dir)?;
    let mut machine: Value = ctx
        .opts
        .opt("machine")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(json!({}));
    // Which run measured each part: this one, or (`--previous results.json`) an earlier one
    // whose parts this run did not measure again.
    let run_of = |m: &Value| json!({"commit": m["commit"], "date": m["date"], "total": m["total"]});
    let mut provenance: BTreeMap<String, Value> = parts
        .keys()
        .map(|k| (k.clone(), run_of(&machine)))
        .collect();
    let previous: Option<Value> = ctx
        .opts
        .opt("previous")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(prev) = &previous {
        for (k, v) in prev["parts"].as_object().into_iter().flatten() {
            if parts.contains_key(k) {
                continue;
            }
            parts.insert(k.clone(), v.clone());
            let from = match &prev["provenance"][k] {
                Value::Null => run_of(&prev["machine"]),
                p => p.clone(),
            };
            provenance.insert(k.clone(), from);
        }
        // What this run could not see (no guest here: its kernel and QEMU) comes from there.
        for field in ["qemu", "guest_kernel"] {
            let unknown = machine[field].as_str().is_none_or(|v| v == "?");
            if unknown && prev["machine"][field].is_string() {
                machine[field] = prev["machine"][field].clone();
            }
        }
    }
    let get = |env: &str, phase: &str| parts.get(&format!("{env}.{phase}")).cloned();
    let mut md = String::new();
    let m = &machine;
    let _ = writeln!(md, "# wg-cni benchmarks\n");
    let _ = writeln!(
        md,
        "Measured by `make bench` (scripts/bench.sh driving bench/driver) on {} at commit `{}`.\n",
        m["date"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?")
    );
    let mut runs: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (part, from) in &provenance {
        let this = from["commit"] == m["commit"] && from["date"] == m["date"];
        if !this {
            let label = format!(
                "at commit `{}` on {} (that whole `make bench`: {})",
                from["commit"].as_str().unwrap_or("?"),
                from["date"].as_str().unwrap_or("?"),
                from["total"].as_str().unwrap_or("?")
            );
            runs.entry(label).or_default().push(part);
        }
    }
    let this_run = if runs.is_empty() {
        format!(
            "**Whole `make bench`:** {}.",
            m["total"].as_str().unwrap_or("(see the end of the run)")
        )
    } else {
        let mine: Vec<&str> = provenance
            .iter()
            .filter(|(_, from)| from["commit"] == m["commit"] && from["date"] == m["date"])
            .map(|(part, _)| part.as_str())
            .collect();
        let earlier: Vec<String> = runs
            .iter()
            .map(|(label, parts)| format!("{} {label}", parts.join(", ")))
            .collect();
        format!(
            "**This run** measured {} in {}; the other parts are kept from earlier runs: {}.",
            mine.join(", "),
            m["total"].as_str().unwrap_or("?"),
            earlier.join("; ")
        )
    };
    let _ = writeln!(
        md,
        "**Machine:** `nproc` = {}, {}, kernel {}, {} GiB RAM. **Guest:** QEMU {} (TCG: software \
         emulation, {} vCPUs, no KVM), Debian kernel {} with `wireguard.ko`. {this_run}\n",
        m["nproc"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_gib"].as_str().unwrap_or("?"),
        m["qemu"].as_str().unwrap_or("?"),
        m["guest_cpus"].as_str().unwrap_or("2"),
        m["guest_kernel"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Native: this host; wg-cni uses its userspace backend (the host kernel has no WireGuard). \
         Guest: the same binaries in a QEMU guest, wg-cni with its kernel backend and ptp in the \
         same guest (everything there runs ~10× slower under TCG; compare ratios, not \
         milliseconds). Baseline: the reference `ptp` plugin + `host-local` from Debian's \
         containernetworking-plugins (`ipMasq: false`). Every figure is p50 / p90 / p99; a ratio \
         is wg-cni ÷ baseline of the same percentile, both measured **interleaved** in the same \
         run (alternating invocations, alternating which goes first). Latency is the whole \
         plugin process as a runtime runs it: fork/exec, config on stdin, result read, wait4; \
         each ADD into a fresh netns made with `ip netns add`. wg-cni runs with its defaults \
         (node gateway on, `ipMasq` off), `endpoint` 127.0.0.1, `mtu` 1420.\n"
    );

    // ---------------------------------------------------------------- targets
    let mut targets = String::new();
    let _ = writeln!(targets, "## Targets\n");
    let _ = writeln!(
        targets,
        "| target | measured | verdict |\n| --- | --- | --- |"
    );
    let mut missed = Vec::new();
    let lat_ratio = |env: &str, cmd: &str| -> Option<f64> {
        get(env, "latency")?["commands"][cmd]["ratio"]["p50"].as_f64()
    };
    // Issue 11's targets: the native userspace backend and the guest's kernel backend each
    // against ptp in the same run.
    let latency_targets = [
        (
            "native",
            "native userspace",
            [("ADD", 2.0), ("DEL", 1.0), ("CHECK", 1.0)],
        ),
        (
            "guest",
            "guest kernel",
            [("ADD", 0.8), ("DEL", 0.8), ("CHECK", 1.0)],
        ),
    ];
    for (env, label, limits) in latency_targets {
        for (cmd, limit) in limits {
            let r = lat_ratio(env, cmd);
            let ok = r.map(|x| x <= limit);
            let _ = writeln!(
                targets,
                "| {cmd} p50 ≤ {limit:.1}× ptp ({label}) | {}× | {} |",
                r.map(|x| format!("{x:.2}")).unwrap_or("–".into()),
                verdict(ok)
            );
            if ok == Some(false) {
                missed.push(format!("{cmd} p50 vs ptp ({env})"));
            }
        }
    }
    if let Some(l) = get("native", "latency") {
        let first = l["first_pod"]["ADD"]["wg-cni"]["p50"].as_f64();
        let steady = l["commands"]["ADD"]["wg-cni"]["p50"].as_f64();
        if let (Some(first), Some(steady)) = (first, steady) {
            let r = first / steady;
            let _ = writeln!(
                targets,
                "| first-pod ADD (creates the node gateway) ≤ 1.5× a steady ADD (native) | {r:.2}× ({first:.1} vs {steady:.1} ms) | {} |",
                verdict(Some(r <= 1.5))
            );
            if r > 1.5 {
                missed.push("first-pod ADD (native)".into());
            }
        }
    }
    if let Some(p) = get("native", "parallel") {
        let total = |plugin: &str| -> Option<f64> {
            let walls = p[plugin]["add_wall_ms"].as_array()?;
            Some(walls.iter().filter_map(Value::as_f64).sum())
        };
        if let (Some(w), Some(b)) = (total("wg-cni"), total("ptp")) {
            let failures = p["wg-cni"]["add_failures"].as_u64().unwrap_or(0);
            let r = w / b;
            let ok = r <= 3.0 && failures == 0;
            let _ = writeln!(
                targets,
                "| {} concurrent ADDs: wall ≤ 3× ptp's, no failure (native) | {r:.2}× (all rounds: {:.2} vs {:.2} s), {failures} failures, ADD p99 {} ms | {} |",
                p["n"],
                w / 1000.0,
                b / 1000.0,
                f(&p["wg-cni"]["add"]["p99"], 0),
                verdict(Some(ok))
            );
            if !ok {
                missed.push("concurrent ADDs (native)".into());
            }
        }
    }
    let scale_ratio = |env: &str| -> Option<(f64, Option<f64>)> {
        let s = get(env, "scale")?;
        let points = s["points"].as_array()?;
        let big = points
            .iter()
            .max_by_key(|p| p["attachments"].as_u64().unwrap_or(0))?;
        let one = points.iter().find(|p| p["attachments"].as_u64() == Some(1));
        let vs_one =
            one.and_then(|o| Some(big["add"]["p50"].as_f64()? / o["add"]["p50"].as_f64()?));
        Some((big["add_ratio"]["p50"].as_f64()?, vs_one))
    };
    for (env, _) in ENVS {
        if let Some((r, vs_one)) = scale_ratio(env) {
            let ok = r <= 1.5;
            let _ = writeln!(
                targets,
                "| ADD at 1000 attachments ≤ 1.5× ADD into an empty network ({env}) | {r:.2}× (vs a network with 1 pod, whose gateway exists: {}) | {} |",
                vs_one.map(|x| format!("{x:.2}×")).unwrap_or("–".into()),
                verdict(Some(ok))
            );
            if !ok {
                missed.push(format!("scale ({env})"));
            }
        }
    }
    for (env, _) in ENVS {
        if let Some(t) = get(env, "throughput") {
            if let Some(r) = t["ratio_to_hand"].as_f64() {
                let ok = r >= 0.95;
                let _ = writeln!(
                    targets,
                    "| throughput ≥ 95 % of hand-configured WireGuard ({env}) | {:.1} % | {} |",
                    r * 100.0,
                    verdict(Some(ok))
                );
                if !ok {
                    missed.push(format!("throughput ({env})"));
                }
            }
        }
    }
    if let Some(t) = get("native", "throughput").filter(|t| t["error"].is_null()) {
        let w = t["gbps"]["wg-cni"]["p50"].as_f64();
        let r = t["ratio_wgd_to_wireguard_go"].as_f64();
        let ok = match (w, r) {
            (Some(w), Some(r)) => Some(w >= 2.0 && r >= 3.0),
            _ => None,
        };
        let _ = writeln!(
            targets,
            "| userspace throughput ≥ 2.0 Gbit/s and ≥ 3× wireguard-go (native) | {} Gbit/s, {}× wg-cni on wireguard-go | {} |",
            w.map(|x| format!("{x:.2}")).unwrap_or("–".into()),
            r.map(|x| format!("{x:.2}")).unwrap_or("–".into()),
            verdict(ok)
        );
        if ok == Some(false) {
            missed.push("userspace throughput (native)".into());
        }
    }
    if let Some(m) = get("native", "memory") {
        let at10 = |daemon: &str| -> Option<f64> {
            m["daemons"][daemon]["points"]
                .as_array()?
                .iter()
                .find(|p| p["peers"].as_u64() == Some(10))?["rss_kb"]
                .as_f64()
        };
        let w = at10("wg-cni-wgd");
        let ok = w.map(|kb| kb <= 4096.0);
        let _ = writeln!(
            targets,
            "| per-pod daemon RSS ≤ 4 MB at 10 peers (wg-cni-wgd) | {} MiB (wireguard-go: {} MiB) | {} |",
            w.map(|kb| format!("{:.2}", kb / 1024.0)).unwrap_or("–".into()),
            at10("wireguard-go")
                .map(|kb| format!("{:.2}", kb / 1024.0))
                .unwrap_or("–".into()),
            verdict(ok)
        );
        if ok == Some(false) {
            missed.push("per-pod daemon RSS (native)".into());
        }
    }
    if let Some(r) = get("native", "latency")
        .and_then(|l| l["wireguard_go"]["ADD"]["wgd_to_wireguard_go"]["p50"].as_f64())
    {
        let ok = r <= 1.0;
        let _ = writeln!(
            targets,
            "| userspace ADD on wg-cni-wgd not slower than on wireguard-go (native, p50) | {r:.2}× | {} |",
            verdict(Some(ok))
        );
        if !ok {
            missed.push("userspace ADD vs wireguard-go (native)".into());
        }
    }
    for (env, _) in ENVS {
        if let Some(l) = get(env, "latency") {
            let w = l["rss_kb"]["ADD"]["wg-cni"]["p50"].as_f64();
            let p = l["rss_kb"]["ADD"]["ptp"]["p50"].as_f64();
            if let (Some(w), Some(p)) = (w, p) {
                let ok = w <= p;
                let _ = writeln!(
                    targets,
                    "| peak RSS ≤ ptp's, ADD ({env}) | {:.1} MiB vs {:.1} MiB | {} |",
                    w / 1024.0,
                    p / 1024.0,
                    verdict(Some(ok))
                );
                if !ok {
                    missed.push(format!("RSS ({env})"));
                }
            }
        }
    }
    if let Some(m) = get("native", "multinode") {
        let r = &m["reachability"];
        let a = r["node1_to_new"]["p99"].as_f64();
        let b = r["new_to_node1"]["p99"].as_f64();
        let (fa, fb) = (
            r["failures_node1_to_new"].as_u64().unwrap_or(0),
            r["failures_new_to_node1"].as_u64().unwrap_or(0),
        );
        let failed = fa + fb;
        let ok = match (a, b) {
            (Some(a), Some(b)) => Some(a <= 1000.0 && b <= 1000.0 && failed == 0),
            _ => None,
        };
        let _ = writeln!(
            targets,
            "| cross-node reachability after ADD, p99 ≤ 1 s both directions (native, {} pods) | \
             {} ms / {} ms{} | {} |",
            r["pods"],
            f(&r["node1_to_new"]["p99"], 0),
            f(&r["new_to_node1"]["p99"], 0),
            if failed > 0 {
                format!(" (never answered in 10 s: {fa} / {fb})")
            } else {
                String::new()
            },
            verdict(ok)
        );
        if ok == Some(false) {
            missed.push("cross-node reachability".into());
        }
    }
    if let Some(a) = get("native", "agent").filter(|a| a["error"].is_null()) {
        for (target, measured, ok, name) in crate::agent::targets(&a) {
            let _ = writeln!(targets, "| {target} | {measured} | {} |", verdict(ok));
            if ok == Some(false) {
                missed.push(name);
            }
        }
    }
    if let Some(o) = get("native", "scale-ondemand").filter(|o| o["error"].is_null()) {
        for (target, measured, ok, name) in crate::ondemand::targets(&o) {
            let _ = writeln!(targets, "| {target} | {measured} | {} |", verdict(ok));
            if ok == Some(false) {
                missed.push(name);
            }
        }
    }
    if let Some(d) = get("native", "direct").filter(|d| d["error"].is_null()) {
        for (target, measured, ok, name) in crate::direct::targets(&d) {
            let _ = writeln!(targets, "| {target} | {measured} | {} |", verdict(ok));
            if ok == Some(false) {
                missed.push(name);
            }
        }
    }
    let _ = writeln!(targets);
    md.push_str(&targets);

    // ---------------------------------------------------------------- latency
    let _ = writeln!(md, "## ADD, CHECK, DEL latency (ms)\n");
    for (env, title) in ENVS {
        let Some(l) = get(env, "latency") else {
            continue;
        };
        if let Some(e) = l["error"].as_str() {
            let _ = writeln!(md, "{title}: not measured ({e})\n");
            continue;
        }
        let _ = writeln!(
            md,
            "**{title}**, {} interleaved iterations (+{} warm-up){}:\n",
            l["iterations"],
            l["warmup"],
            if l["anchor"].as_bool() == Some(true) {
                ", one anchor pod kept in the wg-cni network (its gateway exists, as on a node with pods)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "| command | wg-cni p50 / p90 / p99 | ptp p50 / p90 / p99 | wg-cni ÷ ptp | host-local alone p50 | failures wg-cni / ptp |\n| --- | --- | --- | --- | --- | --- |"
        );
        for cmd in ["ADD", "CHECK", "DEL"] {
            let c = &l["commands"][cmd];
            let _ = writeln!(
                md,
                "| {cmd} | {} | {} | {} | {} | {} / {} |",
                ppp(&c["wg-cni"], 1),
                ppp(&c["ptp"], 1),
                ratio3(&c["ratio"]),
                f(&c["host-local"]["p50"], 1),
                c["wg-cni"]["failures"],
                c["ptp"]["failures"]
            );
        }
        if let Some(first) = l["first_pod"].as_object() {
            let _ = writeln!(
                md,
                "\nFirst pod of a network (wg-cni creates the node gateway on ADD and removes it on DEL), same iterations: ADD {} ms (÷ ptp {}), DEL {} ms (÷ ptp {}).",
                ppp(&first["ADD"]["wg-cni"], 1),
                ratio3(&first["ADD"]["ratio"]),
                ppp(&first["DEL"]["wg-cni"], 1),
                ratio3(&first["DEL"]["ratio"]),
            );
        }
        if let Some(go) = l["wireguard_go"].as_object() {
            let _ = writeln!(
                md,
                "\nThe same with `userspaceDaemon: \"wireguard-go\"` (its own anchored network, same iterations): ADD {} ms (÷ ptp {}; wg-cni-wgd ÷ wireguard-go {}), CHECK {} ms, DEL {} ms (÷ ptp {}; wg-cni-wgd ÷ wireguard-go {}).",
                ppp(&go["ADD"]["wg-cni"], 1),
                ratio3(&go["ADD"]["ratio"]),
                ratio3(&go["ADD"]["wgd_to_wireguard_go"]),
                ppp(&go["CHECK"]["wg-cni"], 1),
                ppp(&go["DEL"]["wg-cni"], 1),
                ratio3(&go["DEL"]["ratio"]),
                ratio3(&go["DEL"]["wgd_to_wireguard_go"]),
            );
        }
        for cmd in ["ADD", "CHECK", "DEL"] {
            for kind in ["wg-cni", "ptp"] {
                if let Some(errs) = l["commands"][cmd][kind]["errors"].as_array() {
                    for e in errs.iter().take(1) {
                        let _ =
                            writeln!(md, "\n{cmd} {kind} failure: `{}`", e.as_str().unwrap_or(""));
                    }
                }
            }
        }
        let _ = writeln!(md);
    }

    // ---------------------------------------------------------------- RSS
    let _ = writeln!(md, "## Peak RSS (MiB, ru_maxrss from wait4)\n");
    let _ = writeln!(
        md,
        "ru_maxrss of a waited child is the largest RSS of the plugin **or of a child it waited \
         for** (host-local for both plugins, iptables for wg-cni's gateway), so host-local alone \
         is shown too: a plugin whose figure equals host-local's is itself smaller.\n"
    );
    let _ = writeln!(
        md,
        "| env | command | wg-cni p50 / max | ptp p50 / max | host-local alone p50 |\n| --- | --- | --- | --- | --- |"
    );
    for (env, _) in ENVS {
        let Some(l) = get(env, "latency") else {
            continue;
        };
        for cmd in ["ADD", "CHECK", "DEL"] {
            let r = &l["rss_kb"][cmd];
            let mib = |v: &Value| {
                v.as_f64()
                    .map(|x| format!("{:.1}", x / 1024.0))
                    .unwrap_or("–".into())
            };
            let _ = writeln!(
                md,
                "| {env} | {cmd} | {} / {} | {} / {} | {} |",
                mib(&r["wg-cni"]["p50"]),
                mib(&r["wg-cni"]["max"]),
                mib(&r["ptp"]["p50"]),
                mib(&r["ptp"]["max"]),
                mib(&l["rss_kb"][if cmd == "DEL" { "DEL" } else { "ADD" }]["host-local"]["p50"])
            );
        }
    }
    let _ = writeln!(md);

    // ---------------------------------------------------------------- scale
    let _ = writeln!(md, "## Scale: ADD as the network grows (ms)\n");
    for (env, title) in ENVS {
        let Some(s) = get(env, "scale") else { continue };
        if let Some(e) = s["error"].as_str() {
            let _ = writeln!(md, "{title}: not measured ({e})\n");
            continue;
        }
        let _ = writeln!(
            md,
            "**{title}**, {} probe ADD+DEL per point, each interleaved with a probe into an empty \
             network. Attachments = live local pods (real ADDs, up to 20) + records of simulated \
             remote pods on {} other nodes (same JSON schema as this node's records). The probe's \
             link gets every other attachment as a peer; the live local links get the probe.\n",
            s["reps"], s["remote_nodes"]
        );
        let _ = writeln!(
            md,
            "| attachments | live local | remote records | ADD p50 / p90 / p99 | ADD into empty network p50 | ÷ empty (p50 / p90 / p99) | DEL p50 / p90 / p99 | DEL ÷ empty p50 | failures |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        let empty_all: Vec<f64> = s["points"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["add_empty"]["p50"].as_f64())
                    .collect()
            })
            .unwrap_or_default();
        for p in s["points"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p["attachments"],
                p["live"],
                p["remote"],
                ppp(&p["add"], 1),
                f(&p["add_empty"]["p50"], 1),
                ratio3(&p["add_ratio"]),
                ppp(&p["del"], 1),
                f(&p["del_ratio"]["p50"], 2),
                p["failures"]
            );
        }
        // Growth: live links (peer added to N live links) and remote records.
        let pts: Vec<&Value> = s["points"]
            .as_array()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let one = pts
            .iter()
            .find(|p| p["attachments"].as_u64() == Some(1))
            .and_then(|p| p["add"]["p50"].as_f64());
        if let Some(one) = one {
            let live_pts: Vec<String> = pts
                .iter()
                .filter(|p| p["remote"].as_u64() == Some(0) && p["live"].as_u64().unwrap_or(0) > 1)
                .filter_map(|p| {
                    let n = p["live"].as_f64()?;
                    let d = p["add"]["p50"].as_f64()? - one;
                    Some(format!(
                        "N={n}: {d:+.1} ms ({:+.2} ms per link)",
                        d / (n - 1.0)
                    ))
                })
                .collect();
            if !live_pts.is_empty() {
                let _ = writeln!(
                    md,
                    "\nTime to add the newcomer as a peer to N live links, as ADD p50 with N live pods \
                     minus ADD p50 with 1 (both with the gateway up; not interleaved with each other): {}.",
                    live_pts.join(", ")
                );
            }
        }
        let with_remote: Vec<&&Value> = pts
            .iter()
            .filter(|p| p["remote"].as_u64().unwrap_or(0) > 0)
            .collect();
        if with_remote.len() >= 2 {
            let a = with_remote[0];
            let b = with_remote[with_remote.len() - 1];
            if let (Some(ya), Some(yb), Some(xa), Some(xb)) = (
                a["add"]["p50"].as_f64(),
                b["add"]["p50"].as_f64(),
                a["remote"].as_f64(),
                b["remote"].as_f64(),
            ) {
                let dy = b["del"]["p50"].as_f64().unwrap_or(f64::NAN)
                    - a["del"]["p50"].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(
                    md,
                    "Growth with remote records: ADD {:+.2} ms and DEL {:+.2} ms per 100 records \
                     (p50 from {} to {} attachments): linear in the size of the network.",
                    (yb - ya) / (xb - xa) * 100.0,
                    dy / (xb - xa) * 100.0,
                    a["attachments"],
                    b["attachments"]
                );
            }
        }
        if env == "guest" {
            let big_del = pts
                .iter()
                .filter_map(|p| p["del_ratio"]["p50"].as_f64())
                .fold(0.0, f64::max);
            if big_del > 3.0 {
                let _ = writeln!(
                    md,
                    "DEL in the guest grows with the probe's peer count because the kernel tears down a \
                     WireGuard link peer by peer: a separate `ip link del` of a kernel WireGuard link took \
                     2.1 s with 100 peers and 17.7 s with 1000 peers in this TCG guest (no plugin involved); \
                     natively (wireguard-go) DEL stays flat."
                );
            }
        }
        if !empty_all.is_empty() {
            let mut e = empty_all.clone();
            e.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let _ = writeln!(
                md,
                "Empty-network ADD p50 across points: {:.1}–{:.1} ms (stable: the interleaving \
                 keeps the baseline honest).",
                e[0],
                e[e.len() - 1]
            );
        }
        let _ = writeln!(md);
    }

    if let Some(o) = get("native", "scale-ondemand") {
        md.push_str(&crate::ondemand::report(&o));
    }

    // ---------------------------------------------------------------- parallel
    let _ = writeln!(
        md,
        "## Parallel: concurrent ADDs on one network, then DELs\n"
    );
    for (env, title) in ENVS {
        let Some(p) = get(env, "parallel") else {
            continue;
        };
        if let Some(e) = p["error"].as_str() {
            let _ = writeln!(md, "{title}: not measured ({e})\n");
            continue;
        }
        let _ = writeln!(
            md,
            "**{title}**: {} ADDs started at once (behind a barrier; any still running after {} s \
             is killed and counted as a failure), then {} DELs at once; {} rounds per plugin, \
             alternating wg-cni and ptp.\n",
            p["n"], p["deadline_s"], p["n"], p["rounds"]
        );
        let _ = writeln!(
            md,
            "| plugin | ADD wall (s), per round | ADD latency p50 / p90 / p99 (ms) | ADD failures | DEL wall (s) | DEL latency p50 / p90 / p99 (ms) | DEL failures |\n| --- | --- | --- | --- | --- | --- | --- |"
        );
        for kind in ["wg-cni", "ptp"] {
            let k = &p[kind];
            let walls = |v: &Value| {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| format!("{:.2}", x.as_f64().unwrap_or(0.0) / 1000.0))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let _ = writeln!(
                md,
                "| {kind} | {} | {} | {} | {} | {} | {} |",
                walls(&k["add_wall_ms"]),
                ppp(&k["add"], 0),
                k["add_failures"],
                walls(&k["del_wall_ms"]),
                ppp(&k["del"], 0),
                k["del_failures"]
            );
        }
        for kind in ["wg-cni", "ptp"] {
            if let Some(e) = p[kind]["errors"].as_array().and_then(|a| a.first()) {
                let _ = writeln!(md, "\n{kind} failure: `{}`", e.as_str().unwrap_or(""));
            }
        }
        let _ = writeln!(md);
    }

    // ---------------------------------------------------------------- throughput
    let _ = writeln!(
        md,
        "## Throughput: iperf3 TCP, one stream, pod to pod (Gbit/s)\n"
    );
    for (env, title) in ENVS {
        let Some(t) = get(env, "throughput") else {
            continue;
        };
        if let Some(e) = t["error"].as_str() {
            let _ = writeln!(md, "{title}: not measured ({e})\n");
            continue;
        }
        let _ = writeln!(
            md,
            "**{title}**: {} runs of {} s each, interleaved. Hand-configured WireGuard: {}, two \
             namespaces, `ip`/`wg` only, same MTU 1420, endpoints 127.0.0.1. ptp: two pods on a \
             ptp network, {}.{}\n",
            t["runs"],
            t["seconds"],
            t["hand_impl"].as_str().unwrap_or(""),
            t["ptp_path"].as_str().unwrap_or(""),
            if t["gbps"][WG_GO].is_object() {
                " wg-cni runs with its default daemon and, as a path of its own, with \
                 `userspaceDaemon: \"wireguard-go\"`. Daemon CPU: utime + stime of both pods' \
                 WireGuard daemons (/proc/<pid>/stat before and after each run) per Gbit \
                 received (Gbit/s × seconds)."
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "| path | p50 | runs | TCP retransmits per run | daemon CPU-s per Gbit p50 (runs) |\n| --- | --- | --- | --- | --- |"
        );
        for kind in ["wg-cni", WG_GO, "hand-wg", "ptp"] {
            let g = &t["gbps"][kind];
            if !g.is_object() {
                continue;
            }
            let runs = g["runs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| format!("{:.3}", x.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let re = g["retransmits"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let c = &g["cpu_s_per_gbit"];
            let cpu = match c["runs"].as_array() {
                Some(a) if !a.is_empty() => format!(
                    "{} ({})",
                    f(&c["p50"], 3),
                    a.iter()
                        .map(|x| format!("{:.3}", x.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => "–".into(),
            };
            // Which daemon a wg-cni path ran (its first pod's process name).
            let label = match g["daemons"][0].as_str() {
                Some(d) if kind == "wg-cni" => format!("{kind} ({d})"),
                _ => kind.to_string(),
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {runs} | {re} | {cpu} |",
                f(&g["p50"], 3)
            );
        }
        let _ = writeln!(
            md,
            "\nwg-cni ÷ hand-configured: {}; wg-cni ÷ ptp: {}{}.",
            t["ratio_to_hand"]
                .as_f64()
                .map(|x| format!("{:.1} %", x * 100.0))
                .unwrap_or("–".into()),
            t["ratio_to_ptp"]
                .as_f64()
                .map(|x| format!("{:.1} %", x * 100.0))
                .unwrap_or("–".into()),
            t["ratio_wgd_to_wireguard_go"]
                .as_f64()
                .map(|x| format!("; wg-cni ÷ wg-cni (wireguard-go): {x:.2}×"))
                .unwrap_or_default()
        );
        if let Some(errs) = t["errors"].as_array() {
            for e in errs.iter().take(2) {
                let _ = writeln!(md, "\nerror: `{}`", e.as_str().unwrap_or(""));
            }
        }
        let _ = writeln!(md);
    }

    // ---------------------------------------------------------------- memory
    if let Some(m) = get("native", "memory") {
        md.push_str(&memory_section(&m));
    }

    // ---------------------------------------------------------------- profile
    let _ = writeln!(md, "## Profile: where ADD spends its time\n");
    let _ = writeln!(
        md,
        "`perf stat -e instructions true` reports `<not supported>` here (no hardware counters), \
         so the profile comes from `strace -f -b execve -ttt -T` of whole ADDs: children are \
         timed from the plugin's side (fork → wait4, or fork → the UAPI socket answering), \
         UAPI sockets from connect to close, netlink as the time spent in its syscalls and \
         epoll. strace slows syscalls down, so the total is higher than the latency above; the \
         shares are what matters. Median per phase over the traced ADDs.\n"
    );
    for (env, title) in ENVS {
        let Some(p) = get(env, "profile") else {
            continue;
        };
        if let Some(e) = p["error"].as_str() {
            let _ = writeln!(md, "{title}: not profiled ({e})\n");
            continue;
        }
        let _ = writeln!(
            md,
            "**{title}** ({} traced ADDs per column):\n",
            p["empty_network"]["traced_adds"]
        );
        let has_remote = p["with_remote_records"]["phases_ms_p50"].is_object();
        let _ = writeln!(
            md,
            "| phase | empty network (ms) | {} live pods (ms) |{}\n| --- | --- | --- |{}",
            p["live_pods"],
            if has_remote {
                format!(
                    " {} live pods + {} remote records (ms) |",
                    p["live_pods"], p["remote_records"]
                )
            } else {
                String::new()
            },
            if has_remote { " --- |" } else { "" }
        );
        let a = &p["empty_network"]["phases_ms_p50"];
        let b = &p["with_live_pods"]["phases_ms_p50"];
        let c = &p["with_remote_records"]["phases_ms_p50"];
        let mut keys: Vec<String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .chain(c.as_object())
            .flat_map(|o| o.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        keys.sort_by_key(|k| {
            (
                k.starts_with("count:"),
                k.starts_with("total"),
                k.starts_with("rest"),
            )
        });
        for k in keys {
            let third = if has_remote {
                format!(" {} |", f(&c[&k], 1))
            } else {
                String::new()
            };
            let _ = writeln!(md, "| {k} | {} | {} |{third}", f(&a[&k], 1), f(&b[&k], 1));
        }
        let top = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .take(6)
                        .map(|s| {
                            format!(
                                "{} {}× {} ms",
                                s["syscall"].as_str().unwrap_or(""),
                                s["calls"],
                                s["ms"]
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            md,
            "\nPlugin syscalls by time (mean per ADD, empty network): {}.\n",
            top(&p["empty_network"]["syscalls_top_by_time"])
        );
    }
    if let Some(m) = get("native", "multinode") {
        md.push_str(&crate::multinode::report(&m));
    }
    if let Some(d) = get("native", "direct") {
        md.push_str(&crate::direct::report(&d));
    }
    if let Some(a) = get("native", "agent") {
        md.push_str(&crate::agent::report(&a));
    }
    md.push_str(&findings(&get));
    if let Some(s) = ctx
        .opts
        .opt("summary")
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        let _ = writeln!(md, "{}", s.trim());
        let _ = writeln!(md);
    }

    let _ = writeln!(
        md,
        "## Reproduce\n\n`make bench` as root on a Debian 12 machine (installs iperf3, strace, \
         QEMU and Debian's kernel itself). Knobs: `BENCH_QUICK=1` for a short smoke run; raw \
         samples are in results.json."
    );

    let mut all = json!({ "machine": machine, "missed_targets": missed, "parts": {},
        "provenance": {} });
    for (k, v) in &parts {
        all["parts"][k] = v.clone();
    }
    for (k, v) in &provenance {
        all["provenance"][k] = v.clone();
    }
    if let Some(out) = ctx.opts.opt("out-json") {
        std::fs::write(&out, serde_json::to_string_pretty(&all).unwrap())
            .map_err(|e| format!("{out}: {e}"))?;
    }
    if let Some(out) = ctx.opts.opt("out-md") {
        std::fs::write(&out, &md).map_err(|e| format!("{out}: {e}"))?;
    }
    println!("{md}");
    Ok(all)
}

/// Per-pod daemon RSS with N peers (native, userspace backend).
fn memory_section(m: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Per-pod daemon memory (native)\n");
    if let Some(e) = m["error"].as_str() {
        let _ = writeln!(md, "Not measured ({e})\n");
        return md;
    }
    let sizes: Vec<u64> = m["peer_counts"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let counts = sizes
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" / ");
    let _ = writeln!(
        md,
        "One pod ADDed into a fresh wg-cni network per daemon (`userspaceDaemon` set), its link \
         then given {counts} peers in total (random public keys, one /32 allowed IP each, set \
         straight over the daemon's UAPI socket); VmRSS of the pod's daemon a second after each \
         step, then DEL.\n"
    );
    let _ = writeln!(
        md,
        "per-pod daemon RSS (MiB) with {counts} peers:\n\n| daemon | after ADD (peers) | {} | UAPI set time (ms) |\n| --- | --- |{} --- |",
        sizes
            .iter()
            .map(|n| format!("{n} peers"))
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(sizes.len())
    );
    for daemon in ["wg-cni-wgd", "wireguard-go"] {
        let d = &m["daemons"][daemon];
        if !d.is_object() {
            let _ = writeln!(
                md,
                "| {daemon} | not measured |{}  |",
                " |".repeat(sizes.len())
            );
            continue;
        }
        let point = |n: u64| {
            d["points"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["peers"].as_u64() == Some(n)))
        };
        let cells: Vec<String> = sizes
            .iter()
            .map(|n| point(*n).map(|p| f(&p["rss_mib"], 2)).unwrap_or("–".into()))
            .collect();
        let sets: Vec<String> = sizes
            .iter()
            .map(|n| point(*n).map(|p| f(&p["set_ms"], 1)).unwrap_or("–".into()))
            .collect();
        let _ = writeln!(
            md,
            "| {daemon} | {} ({}) | {} | {} |",
            f(&d["rss_after_add_mib"], 2),
            d["peers_after_add"],
            cells.join(" | "),
            sets.join(" / ")
        );
    }
    if let Some(errs) = m["errors"].as_array() {
        for e in errs.iter().take(2) {
            let _ = writeln!(md, "\nerror: `{}`", e.as_str().unwrap_or(""));
        }
    }
    let _ = writeln!(md);
    md
}

/// What the numbers say about the plugin, computed from them (so a rerun updates it).
fn findings(get: &dyn Fn(&str, &str) -> Option<Value>) -> String {
    let mut out = Vec::new();
    if let Some(p) = get("native", "profile") {
        let live = &p["with_live_pods"]["phases_ms_p50"];
        let files = live["count: store files read"].as_f64();
        let reads = live["count: read(2) calls on store files"].as_f64();
        if let (Some(files), Some(reads)) = (files, reads) {
            // A file read whole takes two read(2) calls (its bytes, then end of file).
            if files > 0.0 && reads / files > 3.0 {
                let slope = get("native", "scale").and_then(|s| {
                    let pts = s["points"].as_array()?.clone();
                    let r: Vec<&Value> = pts
                        .iter()
                        .filter(|p| p["remote"].as_u64().unwrap_or(0) > 0)
                        .collect();
                    let (a, b) = (r.first()?, r.last()?);
                    Some(
                        (b["add"]["p50"].as_f64()? - a["add"]["p50"].as_f64()?)
                            / (b["remote"].as_f64()? - a["remote"].as_f64()?)
                            * 100.0,
                    )
                });
                out.push(format!(
                    "- **Store reads byte by byte.** An ADD with {} live pods opens {files:.0} record files and \
                     issues {reads:.0} read(2) calls on them: {:.0} per file, i.e. one per byte \
                     (`serde_json::from_reader` on an unbuffered `File` in `store.rs`/`read_json`). This node's \
                     records are read about three times per ADD (reaping, all records, local peers). \
                     It is what makes ADD grow with the network{}: reading each file whole \
                     (`fs::read` + `from_slice`, the size is already checked) and reading the directory once per \
                     command would remove most of it.",
                    p["live_pods"],
                    reads / files,
                    slope
                        .filter(|x| x.is_finite())
                        .map(|x| format!(" ({x:.1} ms per 100 remote records natively)"))
                        .unwrap_or_default()
                ));
            }
        }
        let empty = &p["empty_network"]["phases_ms_p50"];
        // One read is checking a known daemon's pid; a scan reads every process's.
        if let Some(n) = empty["count: /proc/*/cmdline reads"]
            .as_f64()
            .filter(|n| *n > 2.0)
        {
            out.push(format!(
                "- **A /proc scan when the gateway is created**: {n:.0} `/proc/*/cmdline` reads (looking \
                 for a daemon by name) in an ADD into an empty network; {} ms under strace. Cheap natively, \
                 but it grows with the number of processes on the node.",
                f(&empty["/proc scan for daemons (first to last cmdline read)"], 1)
            ));
        }
        if let Some(n) = empty["count: IPAM: host-local exec (VERSION + ADD)"]
            .as_f64()
            .filter(|n| *n > 1.0)
        {
            let hl = get("native", "latency")
                .and_then(|l| l["commands"]["ADD"]["host-local"]["p50"].as_f64());
            let hlg = get("guest", "latency")
                .and_then(|l| l["commands"]["ADD"]["host-local"]["p50"].as_f64());
            out.push(format!(
                "- **{n:.0} IPAM execs per ADD**: a VERSION probe, then ADD. One host-local exec costs {} ms \
                 natively and {} ms in the guest (host-local alone, measured interleaved), so the probe \
                 alone is a large part of the gap to ptp, which execs host-local once. The answer is \
                 meant to be remembered across commands (`/run/wg-cni/ipam-versions.json`): a probe per \
                 ADD means it is not.",
                hl.map(|x| format!("{x:.1}")).unwrap_or("–".into()),
                hlg.map(|x| format!("{x:.0}")).unwrap_or("–".into()),
            ));
        }
    }
    if let Some(l) = get("native", "latency") {
        let a = l["commands"]["ADD"]["wg-cni"]["p50"].as_f64();
        let fa = l["first_pod"]["ADD"]["wg-cni"]["p50"].as_f64();
        let d = l["commands"]["DEL"]["wg-cni"]["p50"].as_f64();
        let fd = l["first_pod"]["DEL"]["wg-cni"]["p50"].as_f64();
        if let (Some(a), Some(fa), Some(d), Some(fd)) = (a, fa, d, fd) {
            let ipt = get("native", "profile").and_then(|p| {
                p["empty_network"]["phases_ms_p50"]["iptables exec (gateway NAT rules)"].as_f64()
            });
            out.push(format!(
                "- **The node gateway's first and last pod.** Natively the first ADD of a network costs \
                 {:.1} ms more than an ADD into a network whose gateway is up (a second userspace daemon, \
                 iptables execs{}), and the last DEL {:.1} ms more (tearing it down). A runtime \
                 that churns the only pod of a network pays this every time.",
                fa - a,
                ipt.map(|x| format!(", {x:.0} ms of them under strace")).unwrap_or_default(),
                fd - d
            ));
        }
    }
    if let (Some(m), Some(sc)) = (get("native", "memory"), get("native", "scale")) {
        let set_ms = |daemon: &str| {
            m["daemons"][daemon]["points"]
                .as_array()?
                .iter()
                .find(|p| p["peers"].as_u64() == Some(1000))?["set_ms"]
                .as_f64()
        };
        let biggest = sc["points"].as_array().and_then(|p| p.last().cloned());
        if let (Some(wgd), Some(go), Some(point)) =
            (set_ms("wg-cni-wgd"), set_ms("wireguard-go"), biggest)
        {
            if let (Some(add), Some(empty)) = (
                point["add"]["p50"].as_f64(),
                point["add_empty"]["p50"].as_f64(),
            ) {
                out.push(format!(
                    "- **A full mesh gives a new link one peer per attachment.** Setting 1000 peers on a \
                     fresh link takes {wgd:.0} ms on wg-cni-wgd and {go:.0} ms on wireguard-go (UAPI, memory \
                     phase): {:.1}–{:.1}× an ADD into an empty network ({empty:.1} ms) before the plugin does \
                     anything; ADD at {} attachments takes {add:.0} ms. Each implementation (the kernel's \
                     too) computes one x25519 per peer when the peer is added, so a bound near 1.5× at \
                     1000 attachments needs links that do not peer with every attachment, or peers \
                     applied after ADD returns.",
                    go.min(wgd) / empty,
                    go.max(wgd) / empty,
                    point["attachments"]
                ));
            }
        }
    }
    if let Some(p) = get("native", "parallel") {
        let w = &p["wg-cni"];
        if let (Some(walls), Some(n)) = (w["add_wall_ms"].as_array(), p["n"].as_f64()) {
            if let Some(wall) = walls.iter().filter_map(Value::as_f64).reduce(f64::max) {
                out.push(format!(
                    "- **Concurrent ADDs are serialised** by the network lock and each updates every live \
                     link: {n:.0} ADDs take up to {:.1} s wall ({:.0} ms per ADD), against {} s for ptp.",
                    wall / 1000.0,
                    wall / n,
                    p["ptp"]["add_wall_ms"]
                        .as_array()
                        .and_then(|a| a.iter().filter_map(Value::as_f64).reduce(f64::max))
                        .map(|x| format!("{:.2}", x / 1000.0))
                        .unwrap_or("–".into())
                ));
            }
        }
    }
    if out.is_empty() {
        return String::new();
    }
    format!(
        "## Findings (computed from the figures above)\n\n{}\n\n",
        out.join("\n")
    )
}
