//! Leave nothing behind: GC every wg-cni network this run used (the plugin's own way to drop
//! this node's attachments and, with the last one, the network's gateway link, daemon, routes
//! and NAT rules), then remove by name whatever a killed run may still have left.

use serde_json::{json, Value};

use crate::cni::Plugin;
use crate::exec::sh;
use crate::{Ctx, Res};

/// The node gateway's host link name, as the plugin derives it from the network name.
fn gateway_link(network: &str) -> String {
    let hash = network.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("wgg{:012x}", hash & 0xffff_ffff_ffff)
}

/// Split an `iptables -S` line, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let mut notes = Vec::new();
    let _ = std::fs::create_dir_all(ctx.work.join("logs"));
    let dir = ctx.work.join("confs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(json!({"networks": 0}));
    };
    let mut networks = Vec::new();
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(mut conf) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let network = conf["name"].as_str().unwrap_or_default().to_string();
        conf["cniVersion"] = json!("1.1.0");
        conf["cni.dev/valid-attachments"] = json!([]);
        let plugin = Plugin {
            kind: "wg-cni",
            bin: ctx.wg.clone(),
            conf,
        };
        match plugin.simple(ctx, "GC", "gc", "", None) {
            Ok(e) if e.ok() => {}
            Ok(e) => notes.push(format!("GC {network}: {}", e.why())),
            Err(e) => notes.push(format!("GC {network}: {e}")),
        }
        networks.push(network);
    }
    // Fallbacks, by name: the gateway link (its daemon exits with it) and NAT rules.
    for network in &networks {
        let link = gateway_link(network);
        if sh(&ctx.ip, &["link", "show", "dev", &link], None).is_ok() {
            notes.push(format!("removed leftover gateway link {link} of {network}"));
            let _ = sh(&ctx.ip, &["link", "del", "dev", &link], None);
        }
    }
    for tool in ["iptables", "ip6tables"] {
        let bin = std::path::PathBuf::from(tool);
        let Ok(rules) = sh(&bin, &["-w", "5", "-t", "nat", "-S", "POSTROUTING"], None) else {
            continue;
        };
        for line in rules.lines() {
            let mine = networks.iter().any(|n| {
                line.contains(&format!("wg-cni hairpin {n}\""))
                    || line.contains(&format!("wg-cni ipMasq {n}\""))
            });
            if mine && line.starts_with("-A ") {
                let mut args: Vec<String> = vec![
                    "-w".into(),
                    "5".into(),
                    "-t".into(),
                    "nat".into(),
                    "-D".into(),
                ];
                args.extend(words(&line[3..]));
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let _ = sh(&bin, &refs, None);
                notes.push(format!("removed leftover rule: {line}"));
            }
        }
    }
    for n in &notes {
        crate::log(n);
    }
    Ok(json!({"networks": networks.len(), "notes": notes}))
}
