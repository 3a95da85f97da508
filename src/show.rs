//! `wg-cni show`: the attachments of each network on this node, with their live peers, as a
//! table for people or JSON for scripts. Public keys print exactly as `wg show` prints them.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::cni::Result;
use crate::host;
use crate::store::{Record, Store};
use crate::wireguard;

pub fn run(
    store_root: &Path,
    node: Option<&str>,
    network: Option<&str>,
    as_json: bool,
) -> Result<()> {
    let node = host::node_name(node)?;
    let networks = list_networks(store_root, network);
    let mut out = Vec::new();
    for name in networks {
        let Some(store) = Store::open_existing(store_root, &name, &node)? else {
            continue;
        };
        let attachments: Vec<Value> = store.node_records()?.iter().map(attachment).collect();
        out.push(json!({"name": name, "node": node, "attachments": attachments}));
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"networks": out})).expect("json")
        );
    } else {
        print_table(&out);
    }
    Ok(())
}

fn list_networks(root: &Path, only: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| only.is_none_or(|o| o == n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn attachment(record: &Record) -> Value {
    let mut value = json!({
        "containerId": record.container_id,
        "ifname": record.ifname,
        "pod": record.pod,
        "state": record.state,
        "addresses": record.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "publicKey": record.public_key,
        "listenPort": record.listen_port,
        "endpoint": record.endpoint.to_string(),
        "backend": record.backend,
        "netns": record.netns,
    });
    let pod = record.live_netns(None);
    match wireguard::backend(record.backend).read(&record.link(pod.as_ref())) {
        Ok(device) => {
            let now = SystemTime::now();
            let peers: Vec<Value> = device
                .peers
                .iter()
                .map(|p| {
                    let handshake = p
                        .stats
                        .last_handshake_time
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    let ago = p
                        .stats
                        .last_handshake_time
                        .and_then(|t| now.duration_since(t).ok())
                        .map(|d| d.as_secs());
                    json!({
                        "publicKey": p.config.public_key.to_base64(),
                        "endpoint": p.config.endpoint.map(|e| e.to_string()),
                        "allowedIps": p.config.allowed_ips.iter().map(|ip| format!("{}/{}", ip.address, ip.cidr)).collect::<Vec<_>>(),
                        "latestHandshake": handshake,
                        "latestHandshakeSecondsAgo": ago,
                        "rxBytes": p.stats.rx_bytes,
                        "txBytes": p.stats.tx_bytes,
                    })
                })
                .collect();
            value["peers"] = peers.into();
        }
        Err(e) => {
            value["peers"] = json!([]);
            value["error"] = e.to_string().into();
        }
    }
    value
}

fn print_table(networks: &[Value]) {
    if networks.is_empty() {
        println!("no wg-cni networks on this node");
        return;
    }
    for network in networks {
        println!(
            "network {} (node {})",
            network["name"].as_str().unwrap_or(""),
            network["node"].as_str().unwrap_or("")
        );
        for a in network["attachments"].as_array().into_iter().flatten() {
            let addresses: Vec<&str> = a["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "  {}{} {}  addresses {}  port {}  backend {}  {}",
                a["pod"]
                    .as_str()
                    .map(|p| format!("pod {p}, container "))
                    .unwrap_or_else(|| "container ".into()),
                a["containerId"].as_str().unwrap_or(""),
                a["ifname"].as_str().unwrap_or(""),
                addresses.join(","),
                a["listenPort"],
                a["backend"].as_str().unwrap_or(""),
                a["state"].as_str().unwrap_or(""),
            );
            println!("    public key: {}", a["publicKey"].as_str().unwrap_or(""));
            if let Some(error) = a["error"].as_str() {
                println!("    link: {error}");
            }
            for p in a["peers"].as_array().into_iter().flatten() {
                let handshake = match p["latestHandshakeSecondsAgo"].as_u64() {
                    Some(s) => format!("{s} seconds ago"),
                    None => "never".to_string(),
                };
                let ips: Vec<&str> = p["allowedIps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "    peer {}  endpoint {}  allowed ips {}  latest handshake: {}  transfer: {} B received, {} B sent",
                    p["publicKey"].as_str().unwrap_or(""),
                    p["endpoint"].as_str().unwrap_or("(none)"),
                    ips.join(","),
                    handshake,
                    p["rxBytes"],
                    p["txBytes"],
                );
            }
        }
    }
}
