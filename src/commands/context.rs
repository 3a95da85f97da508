//! What every command that touches attachments shares: the settings resolved against this
//! host, the store, and the teardown of one attachment (used by DEL, GC and the reaping of
//! records a reboot left behind).

use std::path::Path;

use wireguard_control::Key;

use crate::cni::{CniEnv, NetConf, Result};
use crate::host;
use crate::ipam::{Ipam, Target};
use crate::mesh;
use crate::netns::Netns;
use crate::ports;
use crate::reconcile::{self, NetworkView, Prune};
use crate::store::{Record, State, Store};
use crate::wireguard;

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

impl Context<'_> {
    /// This node as the reconcile mechanism sees it.
    pub fn local(&self) -> reconcile::Node<'_> {
        reconcile::Node {
            name: &self.node,
            boot_id: &self.boot_id,
            host: &self.host,
        }
    }
}

pub fn network_view(ctx: &Context, store: &Store) -> Result<NetworkView> {
    NetworkView::read(store, ctx.conf)
}

pub fn reconcile_local_pods(
    ctx: &Context,
    view: &NetworkView,
    except: Option<&Record>,
    prune: Prune,
) -> usize {
    reconcile::local_pods(&ctx.local(), view, except, prune)
}

pub fn reconcile_gateway(ctx: &Context, view: &NetworkView, prune: Prune) -> Result<()> {
    reconcile::gateway(&ctx.local(), view, prune)
}

/// Undo one attachment completely (the caller holds the network lock throughout): see
/// `withdraw`, `dismantle`, then the record goes.
pub fn teardown(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    record: &Record,
    netns_hint: Option<&Path>,
) -> Result<()> {
    let withdrawn = withdraw(ctx, store, record)?;
    dismantle(ctx, store, ipam, &withdrawn, netns_hint)?;
    store.remove(&record.container_id, &record.ifname)
}

/// Step one, under the network lock: the record says `deleting` (no peer set counts it any
/// more, and a crash from here on leaves a record the next DEL or GC finishes), and the other
/// local links and the node gateway drop its key.
pub fn withdraw(ctx: &Context, store: &Store, record: &Record) -> Result<Record> {
    let mut withdrawn = record.clone();
    withdrawn.state = State::Deleting;
    store.put(&withdrawn)?;
    let gone: Vec<Key> = mesh::public_key(record).ok().into_iter().collect();
    let view = network_view(ctx, store)?;
    reconcile_local_pods(ctx, &view, None, Prune::Only(&gone));
    if let Err(e) = reconcile_gateway(ctx, &view, Prune::Only(&gone)) {
        tracing::warn!(error = %e, "could not remove the peer from the node gateway");
    }
    Ok(withdrawn)
}

/// Step two, which needs no network lock: the link and its daemon (a link with many peers
/// keeps the kernel busy for a while), the IPAM reservation and the port. Everything already
/// gone counts as done. A record whose key is unreadable cannot prove a link ours: the link
/// is left alone (logged), the rest is still undone.
pub fn dismantle(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    record: &Record,
    netns_hint: Option<&Path>,
) -> Result<()> {
    let pod = record.live_netns(netns_hint);
    let link = record.link(pod.as_ref());
    match mesh::public_key(record) {
        Ok(key) => wireguard::backend(record.backend).destroy(&link, &key, &ctx.host)?,
        Err(e) => {
            tracing::warn!(container = %record.container_id, error = %e, "cannot prove the link ours: left alone");
        }
    }
    ipam.del(
        &Target {
            container_id: &record.container_id,
            ifname: &record.ifname,
            netns: None,
        },
        None,
    )?;
    ports::release(&store.pod_link_name(&record.container_id, &record.ifname));
    Ok(())
}

/// Tear down every record `is_dead` selects. One record that cannot be torn down (a failing
/// IPAM DEL, a hung daemon) is logged and skipped: it must not block the node.
pub fn reap(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    why: &str,
    is_dead: impl Fn(&Record) -> bool,
) -> Result<usize> {
    let mut reaped = 0;
    for record in store.node_records()? {
        if !is_dead(&record) {
            continue;
        }
        tracing::info!(container = %record.container_id, ifname = %record.ifname, why, "removing an attachment");
        match teardown(ctx, store, ipam, &record, None) {
            Ok(()) => reaped += 1,
            Err(e) => {
                tracing::warn!(container = %record.container_id, ifname = %record.ifname, error = %e, "could not remove an attachment: skipped")
            }
        }
    }
    Ok(reaped)
}

/// Tear down this node's records left by an earlier boot (their pods died with it). The
/// caller holds the network lock.
pub fn reap_earlier_boots(ctx: &Context, store: &Store, ipam: &Ipam) -> Result<usize> {
    reap(ctx, store, ipam, "left by an earlier boot", |r| {
        r.boot_id != ctx.boot_id
    })
}

/// Before ADD builds a link: the records of an earlier boot (their addresses go back to IPAM
/// first), and a leftover of an earlier attempt at this very attachment (its interface is not
/// in the pod, ADD checked), each under the network lock, which is taken only when there is
/// something to clear. (The records read here are parsed once: ADD's later reads of the
/// network find them in the store's cache.)
pub fn clear_leftovers(ctx: &Context, store: &Store, ipam: &Ipam) -> Result<()> {
    let of_earlier_boot = |r: &Record| r.boot_id != ctx.boot_id;
    if store.node_records()?.iter().any(of_earlier_boot) {
        let _lock = store.lock()?;
        reap_earlier_boots(ctx, store, ipam)?;
    }
    let (container_id, ifname) = (&ctx.env.container_id, &ctx.env.ifname);
    if store.get(container_id, ifname)?.is_some() {
        let _lock = store.lock()?;
        if let Some(stale) = store.get(container_id, ifname)? {
            teardown(ctx, store, ipam, &stale, None)?;
        }
    }
    Ok(())
}
