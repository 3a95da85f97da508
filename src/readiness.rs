//! The node agent's readiness marker, the one thing the plugin's STATUS reads of the agent:
//! `<store>/<network>/<node>/.agent-ready.json`, written atomically by the agent once the
//! network's subnet is known, its lease held and its first full sync of etcd done. It names
//! the boot it was written in, so a marker left from before a reboot does not count: after a
//! reboot STATUS answers 50 until the agent has synced again. The agent never removes it, so
//! a later agent outage (crash, upgrade) never fails STATUS: ADD works from the mirror.
//! A leaf module: the plugin reads it without linking any of the agent.

use std::path::Path;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// A dot file: the store's record readers skip it.
pub const READY_FILE: &str = ".agent-ready.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub schema: u32,
    pub boot_id: String,
    /// The node's subnets when it became ready (for people; the plugin reads `subnet.json`).
    pub subnets: Vec<IpNetwork>,
    /// When (unix seconds).
    pub since: u64,
}

impl Marker {
    pub fn new(boot_id: &str, subnets: &[IpNetwork], since: u64) -> Marker {
        Marker {
            schema: 1,
            boot_id: boot_id.to_string(),
            subnets: subnets.to_vec(),
            since,
        }
    }
}

/// The marker in a node's store directory, if there is a readable one. A later schema is
/// read for the fields this one knows (unknown fields are ignored): during a rolling upgrade
/// a newer agent may write it before the plugin on the host is replaced.
pub fn read(node_dir: &Path) -> Option<Marker> {
    let bytes = std::fs::read(node_dir.join(READY_FILE)).ok()?;
    serde_json::from_slice::<Marker>(&bytes)
        .ok()
        .filter(|m| m.schema >= 1)
}

/// `Ok` when the agent serving `network` has been ready on `node` in boot `boot_id`; else
/// what is missing, in words an operator can act on.
pub fn check(
    store_root: &Path,
    network: &str,
    node: &str,
    boot_id: &str,
) -> std::result::Result<(), String> {
    let node_dir = store_root.join(network).join(node);
    match read(&node_dir) {
        Some(marker) if marker.boot_id == boot_id => Ok(()),
        Some(_) => Err(format!(
            "network {network}: the node agent has not completed its first sync on node {node} since this host booted (is wg-cni-agent running with --node {node}? its /readyz says why not)"
        )),
        None => Err(format!(
            "network {network}: no node agent has completed its first sync on node {node} (clusterRange is set, so wg-cni-agent serves this network: is it running with --node {node} and --store {}? its /readyz says why not)",
            store_root.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_marker_of_this_boot_counts() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("net/n1");
        std::fs::create_dir_all(&dir).unwrap();
        let missing = check(root.path(), "net", "n1", "boot-2").unwrap_err();
        assert!(missing.contains("no node agent") && missing.contains("--node n1"));

        let marker = Marker::new("boot-1", &["10.0.1.0/24".parse().unwrap()], 7);
        std::fs::write(dir.join(READY_FILE), serde_json::to_vec(&marker).unwrap()).unwrap();
        assert_eq!(read(&dir), Some(marker));
        let earlier = check(root.path(), "net", "n1", "boot-2").unwrap_err();
        assert!(earlier.contains("since this host booted"), "{earlier}");
        assert_eq!(check(root.path(), "net", "n1", "boot-1"), Ok(()));
        // Another node's marker says nothing about this one.
        assert!(check(root.path(), "net", "n2", "boot-1").is_err());

        // Unreadable: not ready. A later schema with the fields this one knows: read.
        std::fs::write(dir.join(READY_FILE), "{").unwrap();
        assert!(check(root.path(), "net", "n1", "boot-1").is_err());
        let later = serde_json::json!({"schema": 2, "bootId": "boot-1", "subnets": [],
            "since": 1, "more": true});
        std::fs::write(dir.join(READY_FILE), later.to_string()).unwrap();
        assert_eq!(check(root.path(), "net", "n1", "boot-1"), Ok(()));
        let zero = serde_json::json!({"schema": 0, "bootId": "boot-1", "subnets": [], "since": 1});
        std::fs::write(dir.join(READY_FILE), zero.to_string()).unwrap();
        assert!(check(root.path(), "net", "n1", "boot-1").is_err());
    }
}
