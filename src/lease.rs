//! Subnet-lease mode (`"subnetLease": true`): the node agent leases this node's pod subnet
//! from `clusterRange` through etcd and writes it to `<store>/<network>/<node>/subnet.json`;
//! the plugin hands IPAM that subnet as its only range. Until the agent has written it, ADD
//! answers 11 (try again later) and STATUS 50.

use std::path::Path;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use crate::cni::{Error, NetConf, Result};

pub const SUBNET_FILE: &str = "subnet.json";

#[derive(serde::Deserialize)]
struct SubnetFile {
    schema: u32,
    subnets: Vec<IpNetwork>,
    /// Set by the agent while another node claims these subnets and pods here use them.
    #[serde(default)]
    conflict: Option<String>,
}

fn read(store_root: &Path, network: &str, node: &str) -> Option<SubnetFile> {
    let path = store_root.join(network).join(node).join(SUBNET_FILE);
    let text = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<SubnetFile>(&text) {
        Ok(file) if file.schema == 1 && !file.subnets.is_empty() => Some(file),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable subnet lease");
            None
        }
    }
}

/// The subnets the agent leased to `node`, if it has.
pub fn leased_subnets(store_root: &Path, network: &str, node: &str) -> Option<Vec<IpNetwork>> {
    read(store_root, network, node).map(|file| file.subnets)
}

/// Replace the IPAM ranges with the leased subnets (one range set each, as host-local takes
/// them). Without a lease: code 11, the agent has not leased one yet; nor while another node
/// claims the subnet this node's pods use (the agent says so in `subnet.json`).
pub fn substitute(conf: &mut NetConf, node: &str) -> Result<()> {
    let file = read(&conf.store, &conf.name, node).ok_or_else(|| {
        Error::TryAgainLater(format!(
            "no pod subnet leased to node {node} in network {} yet: is `wg-cni agent` running on this node?",
            conf.name
        ))
    })?;
    if let Some(conflict) = file.conflict {
        return Err(Error::TryAgainLater(format!(
            "network {}: {conflict}",
            conf.name
        )));
    }
    let subnets = file.subnets;
    let ranges: Vec<Value> = subnets
        .iter()
        .map(|s| json!([{ "subnet": s.to_string() }]))
        .collect();
    let ipam = conf
        .raw
        .get_mut("ipam")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| Error::config("ipam", "is required"))?;
    ipam.insert("ranges".into(), Value::Array(ranges));
    Ok(())
}
