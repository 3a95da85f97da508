//! `wg-cni show`: the attachments of each network on this node, with their live peers, as a
//! table for people or JSON for scripts. Public keys print exactly as `wg show` prints them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::cni::Result;
use crate::host;
use crate::store::{self, DirectActivity, PeerActivity, Record, Store};
use crate::wireguard;

/// `cni_conf_dir`: where the networks' conflists are, for their `keyRotation` (next rotation
/// times); unreadable, no next rotation is shown.
pub fn run(
    store_root: &Path,
    node: Option<&str>,
    network: Option<&str>,
    as_json: bool,
    cni_conf_dir: &Path,
) -> Result<()> {
    let node = host::node_name(node)?;
    let boot_id = host::boot_id()?;
    let host = crate::netns::Netns::host()?;
    let networks = list_networks(store_root, network);
    let rotations: BTreeMap<String, std::time::Duration> =
        crate::agent::config::read_networks(cni_conf_dir, store_root)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| Some((n.name, n.conf.key_rotation?)))
            .collect();
    let mut out = Vec::new();
    for name in networks {
        let Some(store) = Store::open_existing(store_root, &name, &node)? else {
            continue;
        };
        let kinds = PeerKinds::read(&store, store_root, &name, &node)?;
        let activity = store.direct_activity();
        let attachments: Vec<Value> = store
            .node_records()?
            .iter()
            .map(|r| attachment(r, &kinds, &activity, rotations.get(&name).copied()))
            .collect();
        let gateway = store.gateway()?.map(|gw| {
            let live = gw.boot_id == boot_id && crate::gateway::is_live(&host, &gw);
            let mut value = json!({
                "link": gw.host_name,
                "publicKey": gw.public_key,
                "addresses": gw.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "routed": gw.routed().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "live": live,
            });
            if live {
                let device = wireguard::backend(gw.backend).read(&gw.link(&host));
                add_peers(&mut value, device, &kinds, None);
            }
            value
        });
        let stale: Vec<&String> = kinds.stale_nodes.iter().collect();
        out.push(json!({
            "name": name,
            "node": node,
            "gateway": gateway,
            "staleNodes": stale,
            "attachments": attachments,
        }));
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

/// What each public key of a network is, for labelling peers: a pod here, a pod of another
/// node, this node's gateway, another node's gateway; anything else on a pod link comes from
/// the config (`static`). Remote nodes whose liveness lease lapsed are `stale`.
struct PeerKinds {
    by_key: BTreeMap<String, (&'static str, String)>,
    stale_nodes: BTreeSet<String>,
}

impl PeerKinds {
    fn read(store: &Store, root: &Path, network: &str, node: &str) -> Result<PeerKinds> {
        let mut by_key = BTreeMap::new();
        for r in store.all_records()? {
            let kind = if r.node == node {
                "local pod"
            } else {
                "remote pod"
            };
            by_key.insert(r.public_key.clone(), (kind, r.node.clone()));
        }
        if let Some(gw) = store.gateway()? {
            by_key.insert(gw.public_key, ("local gateway", node.to_string()));
        }
        for gw in store.remote_gateways()? {
            by_key.insert(gw.public_key, ("remote gateway", gw.node));
        }
        let stale_nodes = std::fs::read_dir(root.join(network))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read(e.path().join("node.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| v["stale"] == true)
            })
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        Ok(PeerKinds {
            by_key,
            stale_nodes,
        })
    }

    fn label(&self, key: &str) -> Value {
        match self.by_key.get(key) {
            Some((kind, node)) => json!({
                "kind": kind,
                "node": node,
                "stale": self.stale_nodes.contains(node),
            }),
            None => json!({"kind": "static"}),
        }
    }
}

fn attachment(
    record: &Record,
    kinds: &PeerKinds,
    activity: &DirectActivity,
    key_rotation: Option<std::time::Duration>,
) -> Value {
    let mut value = json!({
        "containerId": record.container_id,
        "ifname": record.ifname,
        "link": record.host_name,
        "pod": record.pod,
        "state": record.state,
        "addresses": record.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "publicKey": record.public_key,
        "keyCreatedAt": record.key_since(),
        "keyAgeSeconds": host::now_unix().saturating_sub(record.key_since()),
        // Unix seconds, when the network has `keyRotation` (the agent rotates then).
        "nextRotation": key_rotation.map(|period| crate::rotate::due_at(record, period)),
        // A rotation is under way, or was killed midway (`wg-cni rotate` finishes it).
        "rotating": record.next_public_key.is_some(),
        "listenPort": record.listen_port,
        "endpoint": record.endpoint.to_string(),
        "backend": record.backend,
        "netns": record.netns,
    });
    let pod = record.live_netns(None);
    let device = wireguard::backend(record.backend).read(&record.link(pod.as_ref()));
    let activity = activity.get(&store::attachment_id(&record.container_id, &record.ifname));
    add_peers(&mut value, device, kinds, activity);
    value
}

/// The link's peers, each labelled with what it is, or the error reading the link; a direct
/// peer with its idle time as the agent last saw it (`activity`).
fn add_peers(
    value: &mut Value,
    device: Result<wireguard::DeviceState>,
    kinds: &PeerKinds,
    activity: Option<&BTreeMap<String, PeerActivity>>,
) {
    let device = match device {
        Ok(device) => device,
        Err(e) => {
            value["peers"] = json!([]);
            value["error"] = e.to_string().into();
            return;
        }
    };
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
            let key = p.config.public_key.to_base64();
            let label = kinds.label(&key);
            // A gateway peer that may speak for whole subnets is the on-demand relay.
            let relays = p.config.allowed_ips.iter().any(|ip| {
                ip.cidr < if ip.address.is_ipv4() { 32 } else { 128 } && ip.cidr > 0
            });
            let kind = match label["kind"].as_str() {
                Some("remote gateway") if relays => json!("relay gateway"),
                _ => label["kind"].clone(),
            };
            // A pod peer without addresses is an on-demand direct peer not (or no longer)
            // carrying the pair's traffic: waiting for its handshake, or cooling after idling.
            let path = match label["kind"].as_str() {
                Some("local pod" | "remote pod") if p.config.allowed_ips.is_empty() => {
                    json!("pending")
                }
                Some("local pod" | "remote pod") => json!("direct"),
                _ => Value::Null,
            };
            let idle = match path.as_str() {
                Some("direct") => activity
                    .and_then(|a| a.get(&key))
                    .map(|seen| idle_seconds(seen, p.stats.rx_bytes, p.stats.tx_bytes, now)),
                _ => None,
            };
            json!({
                "kind": kind,
                "path": path,
                "node": label.get("node"),
                "stale": label.get("stale"),
                "publicKey": key,
                "endpoint": p.config.endpoint.map(|e| e.to_string()),
                "allowedIps": p.config.allowed_ips.iter().map(|ip| format!("{}/{}", ip.address, ip.cidr)).collect::<Vec<_>>(),
                "latestHandshake": handshake,
                "latestHandshakeSecondsAgo": ago,
                "idleSeconds": idle,
                "rxBytes": p.stats.rx_bytes,
                "txBytes": p.stats.tx_bytes,
            })
        })
        .collect();
    value["peers"] = peers.into();
}

/// Seconds since the peer last carried data: since the agent saw its counters move, or 0
/// when they moved after the agent's last look (it writes what it saw every few seconds).
fn idle_seconds(seen: &PeerActivity, rx: u64, tx: u64, now: SystemTime) -> u64 {
    use crate::wireguard::traffic::carried_data;
    if carried_data(seen.rx, rx) || carried_data(seen.tx, tx) {
        return 0;
    }
    let active = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seen.last_active);
    now.duration_since(active).map_or(0, |d| d.as_secs())
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
        if let Some(gw) = network["gateway"].as_object() {
            println!(
                "  node gateway {}  {}  public key {}",
                gw["link"].as_str().unwrap_or(""),
                if gw["live"] == true {
                    "live"
                } else {
                    "GONE: the next ADD recreates it"
                },
                gw["publicKey"].as_str().unwrap_or(""),
            );
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for p in gw["peers"].as_array().into_iter().flatten() {
                *counts.entry(p["kind"].as_str().unwrap_or("")).or_default() += 1;
            }
            if !counts.is_empty() {
                let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
                println!("    peers: {}", counts.join(", "));
            }
        }
        for stale in network["staleNodes"].as_array().into_iter().flatten() {
            println!(
                "  node {} is stale (no liveness lease): its pods stay peers until the grace period ends",
                stale.as_str().unwrap_or("")
            );
        }
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
            let next = match a["nextRotation"].as_u64() {
                Some(at) => format!(
                    "next rotation in {}",
                    human_seconds(at.saturating_sub(host::now_unix()))
                ),
                None => "no keyRotation".into(),
            };
            let rotating = match a["rotating"] == true {
                true => "  ROTATING (a rotation under way, or killed: `wg-cni rotate` finishes it)",
                false => "",
            };
            println!(
                "    public key: {}  key age {}, {next}{rotating}",
                a["publicKey"].as_str().unwrap_or(""),
                human_seconds(a["keyAgeSeconds"].as_u64().unwrap_or(0)),
            );
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
                let kind = match (p["kind"].as_str(), p["node"].as_str()) {
                    (Some(kind), Some(node)) if kind.starts_with("remote") => {
                        let stale = if p["stale"] == true { ", stale" } else { "" };
                        format!("{kind} on {node}{stale}")
                    }
                    (Some(kind), _) => kind.to_string(),
                    _ => String::new(),
                };
                let kind = match (p["path"].as_str(), p["idleSeconds"].as_u64()) {
                    (Some("pending"), _) => format!("{kind}, pending"),
                    (Some("direct"), Some(0)) => format!("{kind}, direct, active"),
                    (Some("direct"), Some(idle)) => format!("{kind}, direct, idle {idle} s"),
                    (Some("direct"), None) => format!("{kind}, direct"),
                    _ => kind,
                };
                println!(
                    "    peer {} ({kind})  endpoint {}  allowed ips {}  latest handshake: {}  transfer: {} B received, {} B sent",
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

/// `90061` → `1d 1h 1m 1s`, leaving out zero parts (`0s` for zero).
fn human_seconds(seconds: u64) -> String {
    let parts = [
        (seconds / 86_400, "d"),
        (seconds % 86_400 / 3600, "h"),
        (seconds % 3600 / 60, "m"),
        (seconds % 60, "s"),
    ];
    let shown: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    match shown.is_empty() {
        true => "0s".into(),
        false => shown.join(" "),
    }
}
