//! `wg-cni uninstall`: remove what wg-cni put on this host, for an operator who is done with
//! it (refused while an agent runs on the store: it would make its node's gateway again).
//! Per network of the store: the node gateway (link or daemon, its policy rules and routing
//! table, NAT, FORWARD and relay-watch rules) and the agent's readiness marker; the conflists
//! of the store's networks in the conf dir. Then, only when no pod attachment remains on this
//! node (a pod's DEL needs the plugin, and its port in the ledger), the binaries in the CNI bin
//! dir and the runtime dir. Pods' own links stay for their DEL; `ip_forward` stays as it is
//! (other software may rely on it); the store stays (pod records, the agent's instance id),
//! and etcd is `wg-cni-agent forget-node`'s. Running it twice is harmless: the second run says
//! there is nothing left.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cni::{Error, Result};
use crate::gateway;
use crate::install::BINARIES;
use crate::netns::Netns;
use crate::readiness;
use crate::store::Store;

pub struct Options {
    pub store: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Only this network (the node-wide binaries and runtime dir then stay).
    pub network: Option<String>,
    pub node: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

pub fn run(host: &Netns, options: &Options) -> Result<Report> {
    if crate::agent_presence::agent_runs(&options.store)? {
        return Err(Error::TryAgainLater(format!(
            "a wg-cni agent runs on this node (it holds {}): stop it first (in Kubernetes, delete \
             the wg-cni DaemonSet and wait for its pod to go), or it makes the node gateway again",
            options
                .store
                .join(crate::agent_presence::LOCK_FILE)
                .display()
        )));
    }
    let mut report = Report::default();
    let networks = match &options.network {
        Some(name) => vec![name.clone()],
        None => networks_in(&options.store)?,
    };
    let mut pods = 0;
    for network in &networks {
        let Some(store) = Store::open_existing(&options.store, network, &options.node)? else {
            continue;
        };
        if gateway::remove_for_uninstall(host, &store)? {
            report.removed.push(format!(
                "network {network}: node gateway {} (link, daemon, policy rules, routing table, iptables rules)",
                gateway::link_name(&store)
            ));
        }
        let marker = options
            .store
            .join(network)
            .join(&options.node)
            .join(readiness::READY_FILE);
        if remove_file(&marker)? {
            report.removed.push(format!(
                "network {network}: the agent's readiness marker {}",
                marker.display()
            ));
        }
        pods += store.node_records()?.len();
    }
    // Pods of networks not being uninstalled still need the node-wide pieces too.
    if options.network.is_some() {
        for network in networks_in(&options.store)? {
            if let Some(store) = Store::open_existing(&options.store, &network, &options.node)? {
                if !networks.contains(&network) {
                    pods += store.node_records()?.len();
                }
            }
        }
    }
    for conflist in conflists_of(&options.cni_conf_dir, &options.store, &options.network)? {
        if remove_file(&conflist)? {
            report
                .removed
                .push(format!("conflist {}", conflist.display()));
        }
    }
    if pods > 0 {
        report.kept.push(format!(
            "{pods} pod attachment(s) remain on node {}: their links stay, and so do the binaries in {} and {} (a pod's DEL needs them); delete the pods, then run uninstall again",
            options.node,
            options.cni_bin_dir.display(),
            options.run_dir.display()
        ));
    } else if options.network.is_some() {
        report.kept.push(format!(
            "the binaries in {} and {} (only one network was uninstalled; run without --network for the rest)",
            options.cni_bin_dir.display(),
            options.run_dir.display()
        ));
    } else {
        for name in BINARIES {
            let binary = options.cni_bin_dir.join(name);
            if remove_file(&binary)? {
                report.removed.push(format!("binary {}", binary.display()));
            }
        }
        if remove_dir(&options.run_dir)? {
            report
                .removed
                .push(format!("runtime dir {}", options.run_dir.display()));
        }
    }
    Ok(report)
}

/// The networks a store root holds (its directories).
fn networks_in(store: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(store) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                context: format!("reading the store {}", store.display()),
                source: e,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// The conflists (and `.conf`s) in `dir` that run wg-cni with this store (and network).
fn conflists_of(dir: &Path, store: &Path, network: &Option<String>) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                context: format!("reading --cni-conf-dir {}", dir.display()),
                source: e,
            });
        }
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|ext| ext == "conflist" || ext == "conf")
        })
        .filter(|p| {
            fs::read(p)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .is_some_and(|v| runs_wg_cni(&v, store, network.as_deref()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Whether a conflist (or `.conf`) has a wg-cni plugin on `store` (default store when it
/// names none), of `network` when given.
fn runs_wg_cni(value: &serde_json::Value, store: &Path, network: Option<&str>) -> bool {
    use serde_json::Value;
    if network.is_some_and(|n| value.get("name").and_then(Value::as_str) != Some(n)) {
        return false;
    }
    let on_store = |p: &Value| {
        p.get("type").and_then(Value::as_str) == Some("wg-cni")
            && Path::new(
                p.get("store")
                    .and_then(Value::as_str)
                    .unwrap_or(crate::cni::config::DEFAULT_STORE),
            ) == store
    };
    match value.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins.iter().any(on_store),
        None => on_store(value),
    }
}

fn remove_file(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<bool> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // Its contents are gone, the directory cannot go: a volume mounted right there (a
        // container mounting the host's /run/wg-cni itself).
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => Err(Error::config(
            "--run-dir",
            format!(
                "{} is a mount point and cannot be removed: mount its parent (the host's /run) and name the directory inside it",
                path.display()
            ),
        )),
        Err(e) => Err(Error::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_conflists_of_this_store_and_network_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: serde_json::Value| {
            fs::write(dir.path().join(name), v.to_string()).unwrap()
        };
        write(
            "10-wg.conflist",
            json!({"name": "a", "plugins": [{"type": "wg-cni", "store": "/s"}, {"type": "portmap"}]}),
        );
        write(
            "20-b.conf",
            json!({"name": "b", "type": "wg-cni", "store": "/s"}),
        );
        write(
            "30-other.conflist",
            json!({"name": "c", "plugins": [{"type": "wg-cni", "store": "/t"}]}),
        );
        write(
            "40-ptp.conflist",
            json!({"name": "d", "plugins": [{"type": "ptp"}]}),
        );
        write(
            "50-wg.json",
            json!({"name": "a", "type": "wg-cni", "store": "/s"}),
        );
        fs::write(dir.path().join("60-bad.conflist"), "{").unwrap();
        let names = |network: Option<&str>| -> Vec<String> {
            conflists_of(dir.path(), Path::new("/s"), &network.map(String::from))
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(None), ["10-wg.conflist", "20-b.conf"]);
        assert_eq!(names(Some("b")), ["20-b.conf"]);
        assert!(
            conflists_of(&dir.path().join("nope"), Path::new("/s"), &None)
                .unwrap()
                .is_empty()
        );
        // Without "store", the default store.
        let default = json!({"name": "x", "type": "wg-cni"});
        assert!(runs_wg_cni(
            &default,
            Path::new(crate::cni::config::DEFAULT_STORE),
            None
        ));
    }
}
