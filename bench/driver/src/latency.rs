//! ADD, CHECK and DEL latency and peak RSS of wg-cni vs ptp (+host-local), interleaved: every
//! iteration makes fresh namespaces and runs ADD, CHECK, DEL of each plugin command by
//! command, rotating which plugin goes first. host-local alone runs in the same iterations
//! (its share of both plugins' time and memory).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::cni::{self, Plugin};
use crate::exec::Exec;
use crate::stats::{ratio, raw_ms, summary, summary_ms};
use crate::{ns, Ctx, Res};

#[derive(Default)]
pub struct Series {
    pub us: Vec<f64>,
    pub rss_kb: Vec<f64>,
    pub failures: usize,
    pub errors: Vec<String>,
}

impl Series {
    pub fn record(&mut self, e: &Exec, keep: bool) {
        if !keep {
            return;
        }
        if e.ok() {
            self.us.push(e.us);
            self.rss_kb.push(e.rss_kb as f64);
        } else {
            self.failures += 1;
            if self.errors.len() < 3 {
                self.errors.push(e.why());
            }
        }
    }
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let iterations = ctx.opts.num("latency-iterations", 200);
    let warmup = ctx.opts.num("warmup", 3);
    let with_first = ctx.opts.num("latency-first-pod", 1) == 1;
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let wg = cni::wg(ctx, "wgbench-lat", "10.200.1.0/24", "56000-56099");
    let ptp = cni::ptp(ctx, "wgbench-latptp", "10.200.2.0/24");
    let hl = cni::host_local(ctx, "wgbench-lathl", "10.200.3.0/24");
    let first = cni::wg(ctx, "wgbench-latfirst", "10.200.5.0/24", "56100-56199");
    // Natively, also wg-cni on wireguard-go (anchored the same way), for the daemon comparison.
    let with_go = ctx.backend == "userspace";
    let go = cni::wg_daemon(
        ctx,
        "wgbench-latgo",
        "10.200.6.0/24",
        "56200-56299",
        "wireguard-go",
    );
    // (label, plugin, netns name): the anchored wg-cni network, ptp, and optionally a wg-cni
    // network that is empty before each ADD (its first pod creates the node gateway).
    let mut pods: Vec<(&str, &Plugin, &str)> =
        vec![("wg-cni", &wg, "wgbench-lw"), ("ptp", &ptp, "wgbench-lp")];
    if with_first {
        pods.push(("wg-cni-first", &first, "wgbench-lf"));
    }
    if with_go {
        pods.push(("wg-cni-wireguard-go", &go, "wgbench-lg"));
    }
    let mut series: BTreeMap<(String, String), Series> = BTreeMap::new();
    let commands = ["ADD", "CHECK", "DEL"];

    // The anchor: a pod that stays for the whole phase, so that the measured ADDs and DELs
    // find the network as on a node that already runs pods (gateway up, one peer).
    let anchor_ns = ns::add(ctx, "wgbench-la")?;
    let anchor = wg.simple(ctx, "ADD", "lat-anchor", &anchor_ns, None)?;
    if !anchor.ok() {
        return Err(format!("anchor pod: {}", anchor.why()));
    }
    let anchor_result = anchor.json();
    let go_anchor_ns = ns::add(ctx, "wgbench-lga")?;
    let go_anchor = match with_go {
        true => {
            let e = go.simple(ctx, "ADD", "lat-go-anchor", &go_anchor_ns, None)?;
            if !e.ok() {
                return Err(format!("wireguard-go anchor pod: {}", e.why()));
            }
            e.json()
        }
        false => None,
    };

    let outcome = (|| -> Res<()> {
        for i in 0..warmup + iterations {
            let keep = i >= warmup;
            let n = pods.len();
            let order: Vec<usize> = (0..n).map(|j| (i + j) % n).collect();
            let mut paths = Vec::new();
            for (_, _, name) in &pods {
                paths.push(ns::add(ctx, name)?);
            }
            let mut results: Vec<Option<Value>> = vec![None; n];
            for command in commands {
                for &k in &order {
                    let (label, plugin, _) = pods[k];
                    let cid = format!("lat-{label}-{i}");
                    if command == "CHECK" && results[k].is_none() {
                        continue; // its ADD failed: nothing to check
                    }
                    let e = plugin.simple(ctx, command, &cid, &paths[k], results[k].as_ref())?;
                    if command == "ADD" {
                        results[k] = if e.ok() { e.json() } else { None };
                    }
                    series
                        .entry((command.to_string(), label.to_string()))
                        .or_default()
                        .record(&e, keep);
                }
            }
            // host-local on its own, in the same iteration: same conditions.
            let hl_id = format!("lat-h-{i}");
            let add = hl.simple(ctx, "ADD", &hl_id, &paths[1], None)?;
            let del = hl.simple(ctx, "DEL", &hl_id, &paths[1], None)?;
            series
                .entry(("ADD".into(), "host-local".into()))
                .or_default()
                .record(&add, keep);
            series
                .entry(("DEL".into(), "host-local".into()))
                .or_default()
                .record(&del, keep);
            for (_, _, name) in &pods {
                ns::del(ctx, name);
            }
            if (i + 1) % 50 == 0 {
                crate::log(format!(
                    "[{}] latency: {}/{}",
                    ctx.label,
                    i + 1,
                    warmup + iterations
                ));
            }
        }
        Ok(())
    })();
    let _ = wg.simple(ctx, "DEL", "lat-anchor", &anchor_ns, anchor_result.as_ref());
    ns::del(ctx, "wgbench-la");
    if with_go {
        let _ = go.simple(
            ctx,
            "DEL",
            "lat-go-anchor",
            &go_anchor_ns,
            go_anchor.as_ref(),
        );
    }
    ns::del(ctx, "wgbench-lga");
    outcome?;

    let mut out = json!({
        "backend": ctx.backend,
        "iterations": iterations,
        "warmup": warmup,
        "anchor": true,
        "commands": {},
        "rss_kb": {},
        "samples_ms": {},
    });
    for command in commands {
        let get = |kind: &str| series.get(&(command.to_string(), kind.to_string()));
        let mut entry = json!({});
        let mut rss = json!({});
        for kind in [
            "wg-cni",
            "ptp",
            "host-local",
            "wg-cni-first",
            "wg-cni-wireguard-go",
        ] {
            if let Some(s) = get(kind) {
                entry[kind] = summary_ms(&s.us);
                entry[kind]["failures"] = json!(s.failures);
                entry[kind]["errors"] = json!(s.errors);
                rss[kind] = summary(&s.rss_kb, 0);
                out["samples_ms"][format!("{command}/{kind}")] = raw_ms(&s.us);
            }
        }
        entry["ratio"] = ratio(&entry["wg-cni"], &entry["ptp"]);
        if with_first {
            out["first_pod"][command] = json!({
                "wg-cni": entry["wg-cni-first"].clone(),
                "ratio": ratio(&entry["wg-cni-first"], &entry["ptp"]),
            });
        }
        if with_go {
            out["wireguard_go"][command] = json!({
                "wg-cni": entry["wg-cni-wireguard-go"].clone(),
                "ratio": ratio(&entry["wg-cni-wireguard-go"], &entry["ptp"]),
                "wgd_to_wireguard_go": ratio(&entry["wg-cni"], &entry["wg-cni-wireguard-go"]),
            });
        }
        out["commands"][command] = entry;
        out["rss_kb"][command] = rss;
    }
    Ok(out)
}
