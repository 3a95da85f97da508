//! What every command that touches attachments shares: the settings resolved against this
//! host, the store, and the teardown of one attachment (used by DEL, GC and the reaping of
//! records a reboot left behind).

use std::path::Path;

use crate::cni::config::BackendChoice;
use crate::cni::{CniEnv, Error, NetConf, Result};
use crate::gateway;
use crate::host::{self, LinkSettings};
use crate::ipam::{Ipam, Target};
use crate::mesh;
use crate::netns::Netns;
use crate::ports;
use crate::store::{Record, State, Store};
use crate::wireguard::{self, BackendKind, Update};

pub struct Context<'a> {
    pub env: &'a CniEnv,
    pub conf: &'a NetConf,
    pub node: String,
    pub boot_id: String,
    pub host: Netns,
}

impl<'a> Context<'a> {
    pub fn new(env: &'a CniEnv, conf: &'a NetConf) -> Result<Context<'a>> {
        Ok(Context {
            env,
            conf,
            node: host::node_name(conf.node_name.as_deref())?,
            boot_id: host::boot_id()?,
            host: Netns::host()?,
        })
    }

    pub fn store(&self) -> Result<Store> {
        Store::open(&self.conf.store, &self.conf.name, &self.node)
    }

    pub fn ipam(&self) -> Result<Ipam<'a>> {
        Ipam::find(self.env, self.conf)
    }
}

pub fn resolve_link_settings(conf: &NetConf) -> Result<LinkSettings> {
    let route = if conf.mtu.is_none() || conf.endpoint.is_none() {
        host::default_route()?
    } else {
        None
    };
    let mtu = conf.mtu.unwrap_or_else(|| match &route {
        Some(r) => r.mtu.saturating_sub(host::WIREGUARD_OVERHEAD).max(1280),
        None => host::FALLBACK_MTU,
    });
    let endpoint = match conf.endpoint {
        Some(ip) => ip,
        None => route.and_then(|r| r.source).ok_or_else(|| {
            Error::config(
                "endpoint",
                "is required on a host without a default route: set the address peers reach this node at",
            )
        })?,
    };
    let ports = match conf.listen_ports {
        Some(range) => range,
        None => ports::default_range(ports::ephemeral_range())?,
    };
    Ok(LinkSettings {
        mtu,
        endpoint,
        ports,
        backend: choose_backend(conf.backend)?,
    })
}

pub fn choose_backend(choice: BackendChoice) -> Result<BackendKind> {
    let kernel = || wireguard::kernel::available();
    let userspace = wireguard::userspace::available;
    match choice {
        BackendChoice::Kernel if kernel() => Ok(BackendKind::Kernel),
        BackendChoice::Kernel => Err(Error::config(
            "backend",
            "\"kernel\": this kernel cannot create WireGuard links (no wireguard module); use \"userspace\" or \"auto\"",
        )),
        BackendChoice::Userspace if userspace() => Ok(BackendKind::Userspace),
        BackendChoice::Auto if kernel() => Ok(BackendKind::Kernel),
        BackendChoice::Auto if userspace() => Ok(BackendKind::Userspace),
        BackendChoice::Userspace | BackendChoice::Auto => Err(Error::config(
            "backend",
            "no WireGuard available: the kernel has no wireguard module and wireguard-go or /dev/net/tun is missing",
        )),
    }
}

/// The pod namespace of a record, only if it is still the very namespace recorded (a path
/// like /proc/<pid>/ns/net can be reused by another pod).
pub fn recorded_netns(record: &Record, hint: Option<&Path>) -> Option<Netns> {
    let candidates = hint
        .into_iter()
        .chain(std::iter::once(record.netns.as_path()));
    for path in candidates {
        if let Ok(ns) = Netns::open(path)
            && ns.inode() == record.netns_inode
        {
            return Some(ns);
        }
    }
    None
}

/// Apply `update` to the live link of every other ready attachment on this node.
/// Best effort: a pod that died without DEL has no link to update.
pub fn update_local_peers(
    records: &[Record],
    except: Option<&Record>,
    update: impl Fn() -> Update<'static>,
) {
    for record in records {
        let is_except = except.is_some_and(|e| record.is_attachment(&e.container_id, &e.ifname));
        if is_except || record.state != State::Ready {
            continue;
        }
        let pod = recorded_netns(record, None);
        let link = record.link(pod.as_ref());
        if let Err(e) = wireguard::backend(record.backend).apply(&link, &update()) {
            tracing::warn!(peer = %record.container_id, error = %e, "could not update peer link");
        }
    }
}

/// Undo one attachment completely: link and daemon, peers elsewhere, IPAM, record.
/// Everything already gone counts as done.
pub fn teardown(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    record: &Record,
    netns_hint: Option<&Path>,
) -> Result<()> {
    let pod = recorded_netns(record, netns_hint);
    let link = record.link(pod.as_ref());
    let key = mesh::public_key(record)?;
    wireguard::backend(record.backend).destroy(&link, &key, &ctx.host)?;

    let others = store.node_records()?;
    update_local_peers(&others, Some(record), || Update {
        remove_peers: vec![key.clone()],
        ..Update::default()
    });
    gateway::update(
        &ctx.host,
        store,
        &Update {
            remove_peers: vec![key.clone()],
            ..Update::default()
        },
    );

    ipam.del(
        &Target {
            container_id: &record.container_id,
            ifname: &record.ifname,
            netns: None,
        },
        None,
    )?;
    store.remove(&record.container_id, &record.ifname)
}

/// Tear down this node's records left by an earlier boot (their pods died with it).
pub fn reap_earlier_boots(ctx: &Context, store: &Store, ipam: &Ipam) -> Result<usize> {
    let mut reaped = 0;
    for record in store.node_records()? {
        if record.boot_id != ctx.boot_id {
            tracing::info!(container = %record.container_id, "reaping a record from an earlier boot");
            teardown(ctx, store, ipam, &record, None)?;
            reaped += 1;
        }
    }
    Ok(reaped)
}
