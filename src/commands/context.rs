//! What every command that touches attachments shares: the settings resolved against this
//! host, the store, and the teardown of one attachment (used by DEL, GC and the reaping of
//! records a reboot left behind).

use std::path::Path;

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

/// Bring every ready local link but `except` to its desired peer set (reading each device).
pub fn reconcile_local_pods(
    ctx: &Context,
    store: &Store,
    view: &NetworkView,
    except: Option<&Record>,
    prune: Prune,
) {
    let which = |r: &Record| except.is_none_or(|e| !r.is_attachment(&e.container_id, &e.ifname));
    let refused = reconcile::local_pods(&ctx.local(), view, which, prune);
    note_out_of_step(store, &refused);
}

/// A fan-out (ADD's newcomers, DEL's gone key) to the ready local links `which` selects, sent
/// without reading the devices. A link that refuses is noted in the store, and the next ADD,
/// DEL or GC brings it to its whole desired peer set (`resync_out_of_step`).
pub fn tell_local_pods(
    ctx: &Context,
    store: &Store,
    view: &NetworkView,
    which: impl Fn(&Record) -> bool,
    update: &wireguard::Update,
) {
    let refused = reconcile::tell_local_pods(&ctx.local(), view, which, update);
    note_out_of_step(store, &refused);
}

/// The links an earlier fan-out missed get their desired peer sets (under the lock). What
/// they lack is added; a peer they should have dropped stays (its pod is gone, nothing
/// answers with its key, and an address handed out again moves to the new pod's peer).
pub fn resync_out_of_step(ctx: &Context, store: &Store, view: &NetworkView) {
    let noted = store.take_out_of_step();
    if noted.is_empty() {
        return;
    }
    let which = |r: &Record| noted.iter().any(|(c, i)| r.is_attachment(c, i));
    let refused = reconcile::local_pods(&ctx.local(), view, which, Prune::Nothing);
    note_out_of_step(store, &refused);
}

fn note_out_of_step(store: &Store, refused: &[&Record]) {
    if refused.is_empty() {
        return;
    }
    if let Err(e) = store.note_out_of_step(refused) {
        tracing::warn!(error = %e, "could not note the links a fan-out missed");
    }
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
/// local links and the node gateway drop its key (told without reading them).
pub fn withdraw(ctx: &Context, store: &Store, record: &Record) -> Result<Record> {
    let mut withdrawn = record.clone();
    withdrawn.state = State::Deleting;
    store.put(&withdrawn)?;
    let view = network_view(ctx, store)?;
    resync_out_of_step(ctx, store, &view);
    if let Ok(key) = mesh::public_key(record) {
        let gone = reconcile::gone(key);
        let others = |r: &Record| !r.is_attachment(&record.container_id, &record.ifname);
        tell_local_pods(ctx, store, &view, others, &gone);
        if let Err(e) = reconcile::tell_gateway(&ctx.local(), &view, &gone) {
            tracing::warn!(error = %e, "could not remove the peer from the node gateway");
        }
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
    let destroy_link = || match mesh::public_key(record) {
        Ok(key) => wireguard::backend(record.backend).destroy(&link, &key, &ctx.host),
        Err(e) => {
            tracing::warn!(container = %record.container_id, error = %e, "cannot prove the link ours: left alone");
            Ok(())
        }
    };
    let release_addresses = || {
        let target = Target {
            container_id: &record.container_id,
            ifname: &record.ifname,
            netns: None,
        };
        ipam.del(&target, None)
    };
    // Side by side: the IPAM plugin's exec and the link's teardown (a daemon's exit, the
    // kernel's grace period) are both waits; the withdrawn key is no peer anywhere, so the
    // address may be handed out again before the old link is gone.
    let (destroyed, released) = std::thread::scope(|scope| {
        let destroyed = scope.spawn(destroy_link);
        let released = release_addresses();
        let destroyed = destroyed
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (destroyed, released)
    });
    destroyed.and(released)?;
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
