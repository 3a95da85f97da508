//! Plugin invocations as a runtime makes them: one plugin object on stdin (with `name` and
//! `cniVersion`, and `prevResult` for CHECK and DEL), CNI_* in a clean environment.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::exec::{self, Exec, Spec};
use crate::{Ctx, Res};

pub const CNI_VERSION: &str = "1.0.0";

#[derive(Clone)]
pub struct Plugin {
    /// `wg-cni`, `ptp` or `host-local`: how results and tables name it.
    pub kind: &'static str,
    pub bin: PathBuf,
    pub conf: Value,
}

fn ipam(ctx: &Ctx, subnet: &str, range: Option<(&str, &str)>) -> Value {
    let mut r = json!({ "subnet": subnet });
    if let Some((start, end)) = range {
        r["rangeStart"] = json!(start);
        r["rangeEnd"] = json!(end);
    }
    json!({
        "type": "host-local",
        "ranges": [[r]],
        "dataDir": ctx.work.join("ipam").display().to_string(),
    })
}

/// A wg-cni network: endpoint 127.0.0.1 (all tunnel traffic stays on loopback), fixed MTU,
/// its own store and IPAM directories under the work directory.
pub fn wg(ctx: &Ctx, network: &str, subnet: &str, ports: &str) -> Plugin {
    wg_range(ctx, network, subnet, None, ports)
}

pub fn wg_range(
    ctx: &Ctx,
    network: &str,
    subnet: &str,
    range: Option<(&str, &str)>,
    ports: &str,
) -> Plugin {
    let plugin = Plugin {
        kind: "wg-cni",
        bin: ctx.wg.clone(),
        conf: json!({
            "cniVersion": CNI_VERSION,
            "name": network,
            "type": "wg-cni",
            "ipam": ipam(ctx, subnet, range),
            "endpoint": "127.0.0.1",
            "mtu": 1420,
            "listenPorts": ports,
            "backend": ctx.backend,
            "store": store_root(ctx).display().to_string(),
        }),
    };
    remember(ctx, &plugin);
    plugin
}

/// A wg-cni network whose userspace links run the daemon `daemon` (`userspaceDaemon`:
/// `wg-cni-wgd` or `wireguard-go`).
pub fn wg_daemon(ctx: &Ctx, network: &str, subnet: &str, ports: &str, daemon: &str) -> Plugin {
    let mut plugin = wg_range(ctx, network, subnet, None, ports);
    plugin.conf["userspaceDaemon"] = json!(daemon);
    remember(ctx, &plugin);
    plugin
}

/// Remembered on disk, so that `cleanup` (also from another process) can GC the network.
pub fn remember(ctx: &Ctx, plugin: &Plugin) {
    let network = plugin.conf["name"].as_str().unwrap_or_default();
    let dir = ctx.work.join("confs");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{network}.json")), plugin.conf.to_string());
}

/// This node's record of one attachment (`<store>/<network>/<node>/<cid>:eth0.json`; the
/// node directory is whichever holds it).
pub fn own_record(ctx: &Ctx, network: &str, cid: &str) -> Res<Value> {
    let dir = store_root(ctx).join(network);
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let file = entry.path().join(format!("{cid}:eth0.json"));
        if let Ok(text) = std::fs::read_to_string(&file) {
            return serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()));
        }
    }
    Err(format!("no record of {cid} in {}", dir.display()))
}

pub fn store_root(ctx: &Ctx) -> PathBuf {
    ctx.work.join("store")
}

/// The reference ptp plugin with host-local, no ipMasq.
pub fn ptp(ctx: &Ctx, network: &str, subnet: &str) -> Plugin {
    Plugin {
        kind: "ptp",
        bin: ctx.cni_path.join("ptp"),
        conf: json!({
            "cniVersion": CNI_VERSION,
            "name": network,
            "type": "ptp",
            "ipMasq": false,
            "ipam": ipam(ctx, subnet, None),
        }),
    }
}

/// host-local run on its own (what both plugins delegate to): context for latency and RSS.
pub fn host_local(ctx: &Ctx, network: &str, subnet: &str) -> Plugin {
    Plugin {
        kind: "host-local",
        bin: ctx.cni_path.join("host-local"),
        conf: json!({
            "cniVersion": CNI_VERSION,
            "name": network,
            "type": "host-local",
            "ipam": ipam(ctx, subnet, None),
        }),
    }
}

pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub prev: Option<&'a Value>,
    pub stderr: &'a Path,
    pub on_spawn: Option<&'a (dyn Fn(i32) + Sync)>,
}

impl Plugin {
    pub fn stdin(&self, prev: Option<&Value>) -> Vec<u8> {
        let mut conf = self.conf.clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        serde_json::to_vec(&conf).expect("json")
    }

    pub fn env(
        &self,
        ctx: &Ctx,
        command: &str,
        container_id: &str,
        netns: &str,
    ) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), container_id.into()),
            ("CNI_NETNS".into(), netns.into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), ctx.cni_path.display().to_string()),
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ),
        ]
    }

    pub fn call(&self, ctx: &Ctx, call: &Call) -> Res<Exec> {
        let env = self.env(ctx, call.command, call.container_id, call.netns);
        let stdin = self.stdin(call.prev);
        let args: Vec<String> = Vec::new();
        let mut spec = Spec::new(&self.bin, &args, call.stderr);
        spec.env = &env;
        spec.stdin = &stdin;
        spec.on_spawn = call.on_spawn;
        exec::run(&spec)
    }

    /// ADD/CHECK/DEL with the usual defaults.
    pub fn simple(
        &self,
        ctx: &Ctx,
        command: &str,
        container_id: &str,
        netns: &str,
        prev: Option<&Value>,
    ) -> Res<Exec> {
        let stderr = ctx.work.join("logs").join(format!("{}.err", self.kind));
        self.call(
            ctx,
            &Call {
                command,
                container_id,
                netns,
                prev,
                stderr: &stderr,
                on_spawn: None,
            },
        )
    }
}

/// The pod's first IPv4 address (without prefix) from an ADD result.
pub fn first_ip(result: &Value) -> Option<String> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .next()
}
