//! The agent's settings (from its flags) and the wg-cni networks it serves (from the same
//! conflists the container runtime reads).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::membership::Policy;
use super::subnet::{self, Mode};
use crate::cni::NetConf;

#[derive(Debug, Clone)]
pub struct Settings {
    pub etcd_endpoints: Vec<String>,
    pub store: PathBuf,
    pub node: String,
    pub cni_conf_dir: PathBuf,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    pub lease_ttl: Duration,
    pub grace_period: Duration,
    /// The TTL of a leased subnet's claim (renewed while the agent runs).
    pub subnet_lease_ttl: Duration,
    pub resync_interval: Duration,
    pub health_listen: SocketAddr,
    /// Where `/metrics` answers (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Series per peer besides per link (they grow with pods²).
    pub metrics_per_peer: bool,
    /// Render this conflist template for this node and write it to `out` once ready.
    pub template: Option<super::template::Template>,
}

/// One wg-cni network this agent serves.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    pub conf: NetConf,
    pub mode: Mode,
    /// The conflist file it came from (for logs).
    pub source: PathBuf,
}

/// Every wg-cni network in `dir` whose store is `store`; files that do not parse are logged
/// and skipped (the runtime would refuse them too). The first file (by name) wins a name.
pub fn read_networks(dir: &Path, store: &Path) -> Result<Vec<Network>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading --cni-conf-dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|ext| ext == "conflist" || ext == "conf")
        })
        .collect();
    files.sort();
    let mut networks: Vec<Network> = Vec::new();
    for file in files {
        match network_in_file(&file) {
            Ok(Some(net)) if net.conf.store == store => {
                if networks.iter().all(|n| n.name != net.name) {
                    networks.push(net);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "skipping conflist")
            }
        }
    }
    Ok(networks)
}

fn network_in_file(file: &Path) -> Result<Option<Network>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let value: Value = serde_json::from_slice(&bytes).context("not JSON")?;
    network_in(&value, file)
}

/// The wg-cni network a conflist (or `.conf`) holds, if any, checked as the agent needs it.
pub fn network_in(value: &Value, file: &Path) -> Result<Option<Network>> {
    let Some(plugin) = wg_cni_plugin(value) else {
        return Ok(None);
    };
    let conf = NetConf::parse(plugin.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Every node is held to the address plan: without a cluster range a node could claim any
    // subnet (0.0.0.0/1 included) and every other node would route it there.
    anyhow::ensure!(
        !conf.cluster_range.is_empty(),
        "network {}: the agent serves only networks with \"clusterRange\" (the range every node's pod subnet lies in)",
        conf.name
    );
    let mode = if conf.subnet_lease {
        Mode::Lease(conf.cluster_range.clone())
    } else {
        let subnets = subnet::operator_subnets(conf.raw.get("ipam"));
        anyhow::ensure!(
            !subnets.is_empty(),
            "network {}: no ipam.ranges[][].subnet names this node's subnet (or set \"subnetLease\": true)",
            conf.name
        );
        if let Some((_, reason)) = network_policy(&conf).refuses_claim(&subnets) {
            anyhow::bail!("network {}: ipam.ranges: {reason}", conf.name);
        }
        Mode::Operator(subnets)
    };
    Ok(Some(Network {
        name: conf.name.clone(),
        conf,
        mode,
        source: file.to_path_buf(),
    }))
}

/// The address plan a network's conflist states: every node's claims and endpoints are held
/// to it.
pub fn network_policy(conf: &NetConf) -> Policy {
    Policy {
        cluster_ranges: conf.cluster_range.clone(),
        service_ranges: conf.service_range.clone(),
        node_ranges: conf.node_range.clone(),
    }
}

impl Network {
    pub fn policy(&self) -> Policy {
        network_policy(&self.conf)
    }
}

/// Our plugin's config as a single-plugin network config: a `.conflist`'s `wg-cni` entry with
/// the list's `name` and `cniVersion` added, or a `.conf` whose type is `wg-cni`.
fn wg_cni_plugin(value: &Value) -> Option<Value> {
    let is_ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some("wg-cni");
    if let Some(plugins) = value.get("plugins").and_then(Value::as_array) {
        let mut plugin = plugins.iter().find(|p| is_ours(p))?.clone();
        let map = plugin.as_object_mut()?;
        for field in ["name", "cniVersion"] {
            if let Some(v) = value.get(field) {
                map.insert(field.to_string(), v.clone());
            }
        }
        return Some(plugin);
    }
    is_ours(value).then(|| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_plugin_in_conflists_and_confs_for_our_store_only() {
        let dir = tempfile::tempdir().unwrap();
        let list = serde_json::json!({"cniVersion": "1.0.0", "name": "wgnet", "plugins": [
            {"type": "wg-cni", "store": "/s1", "clusterRange": "10.0.0.0/16",
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.1.0/24"}]]}},
            {"type": "portmap"}]});
        std::fs::write(dir.path().join("10-wg.conflist"), list.to_string()).unwrap();
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "leased", "type": "wg-cni",
            "store": "/s1", "clusterRange": "10.244.0.0/16", "subnetLease": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "auto"}]]}});
        std::fs::write(dir.path().join("20-l.conf"), conf.to_string()).unwrap();
        let other = serde_json::json!({"cniVersion": "1.0.0", "name": "other", "type": "wg-cni",
            "store": "/s2", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.9.0/24"}]]}});
        std::fs::write(dir.path().join("30-o.conf"), other.to_string()).unwrap();
        std::fs::write(dir.path().join("40-bad.conflist"), "{").unwrap();
        // Agent-served networks state their cluster range, and their subnets lie inside it.
        let no_range = serde_json::json!({"cniVersion": "1.0.0", "name": "norange", "type": "wg-cni",
            "store": "/s1", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.9.0/24"}]]}});
        std::fs::write(dir.path().join("50-n.conf"), no_range.to_string()).unwrap();
        let outside = serde_json::json!({"cniVersion": "1.0.0", "name": "outside", "type": "wg-cni",
            "store": "/s1", "clusterRange": "10.1.0.0/16",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.9.0/24"}]]}});
        std::fs::write(dir.path().join("60-o.conf"), outside.to_string()).unwrap();
        std::fs::write(dir.path().join("README"), "x").unwrap();
        let nets = read_networks(dir.path(), Path::new("/s1")).unwrap();
        let names: Vec<_> = nets.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["wgnet", "leased"]);
        assert_eq!(
            nets[0].mode,
            Mode::Operator(vec!["10.0.1.0/24".parse().unwrap()])
        );
        assert_eq!(
            nets[1].mode,
            Mode::Lease(vec!["10.244.0.0/16".parse().unwrap()])
        );
    }
}
