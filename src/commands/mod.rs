//! The CNI commands, each a short top-to-bottom flow over the mechanisms.

mod add;
mod check;
mod context;
mod del;
mod gc;
mod join;
mod rollback;
mod status;
mod teardown;

use serde_json::{Value, json};

use crate::cni::version::SUPPORTED;
use crate::cni::{CniEnv, Command, NetConf, Result, Version};
use context::Context;

/// Run one CNI command; `Some` is what goes to stdout.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let mut conf = NetConf::parse(stdin)?;
    if conf.subnet_lease {
        let node = crate::host::node_name(conf.node_name.as_deref())?;
        match (env.command, crate::lease::substitute(&mut conf, &node)) {
            (_, Ok(())) => {}
            (Command::Add, Err(e)) => return Err(e),
            (Command::Status, Err(e)) => {
                return Err(crate::cni::Error::NotAvailable(e.to_string()));
            }
            // DEL, CHECK and GC release or check what IPAM holds by container: no range needed.
            (_, Err(_)) => {}
        }
    }
    let ctx = Context::new(env, &conf)?;
    match env.command {
        Command::Add => add::run(&ctx).map(Some),
        Command::Del => del::run(&ctx).map(|_| None),
        Command::Check => check::run(&ctx).map(|_| None),
        Command::Gc => gc::run(&ctx).map(|_| None),
        Command::Status => status::run(&ctx).map(|_| None),
        Command::Version => unreachable!("answered above"),
    }
}

/// The routes a pod link needs besides its own subnet when the network has no node gateway
/// (hence no default route): every `clusterRange` of a family the pod has an address in, so it
/// reaches pods on other nodes. ADD adds them; CHECK expects them.
fn cluster_routes(conf: &NetConf, addresses: &[ipnetwork::IpNetwork]) -> Vec<ipnetwork::IpNetwork> {
    if conf.host_gateway {
        return Vec::new();
    }
    conf.cluster_range
        .iter()
        .filter(|range| addresses.iter().any(|a| a.is_ipv4() == range.is_ipv4()))
        .copied()
        .collect()
}

/// Refuse a command the config's spec version does not have (CHECK < 0.4.0, GC/STATUS < 1.1.0).
fn require_version(conf: &NetConf, minimum: Version, command: &str) -> Result<()> {
    if conf.cni_version < minimum {
        return Err(crate::cni::Error::IncompatibleVersion(format!(
            "{command} needs cniVersion {minimum} or later; the config says {}",
            conf.cni_version
        )));
    }
    Ok(())
}

/// VERSION answers in the version asked for when we speak it, else in the latest.
fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse::<Version>().ok())
        .filter(|v| v.is_supported())
        .unwrap_or(Version::LATEST);
    json!({
        "cniVersion": asked.to_string(),
        "supportedVersions": SUPPORTED.iter().map(Version::to_string).collect::<Vec<_>>(),
    })
}

/// The version errors are reported in: the config's when it can be read, else the latest.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse::<Version>().ok())
        .filter(|v| v.is_supported())
        .unwrap_or(Version::LATEST)
        .to_string()
}
