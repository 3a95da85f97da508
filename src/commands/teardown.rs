//! Taking one attachment apart (DEL, GC, and ADD clearing what a reboot or an earlier attempt
//! left behind): the record says `deleting`, its key leaves every other link, its addresses go
//! back to IPAM, its link and daemon go, then its port. Anything already gone counts as done.

use std::path::Path;

use super::context::{self, Context};
use crate::cni::{Peering, Result};
use crate::ipam::{Ipam, Target};
use crate::mesh;
use crate::ports;
use crate::reconcile::{self, NetworkView};
use crate::store::{Record, State, Store};
use crate::wireguard;

/// Take `record`'s attachment apart; the caller holds the network lock and removes the record
/// file afterwards. `withdrawn` runs once every other local link and the node gateway have
/// dropped the key: DEL lets the network lock go there, without waiting for the link (the
/// kernel takes its time with a WireGuard link, more with many peers).
///
/// The record says `deleting` first: no peer set counts it any more, and a crash from here on
/// leaves a record the next DEL or GC finishes. Then three things run side by side, as each is
/// mostly a wait: the link's teardown (from the start), and once the network is read, the
/// IPAM plugin's release and telling the other links.
/// No ADD can join before the network lock is let go, which is after every link dropped the
/// key, so an address handed out again meets no stale peer.
pub fn take_apart(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    record: &Record,
    netns_hint: Option<&Path>,
    withdrawn: impl FnOnce(),
) -> Result<()> {
    let mut deleting = record.clone();
    deleting.state = State::Deleting;
    store.put(&deleting)?;
    let joined = |h: std::thread::ScopedJoinHandle<'_, Result<()>>| {
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    };
    let (destroyed, released) = std::thread::scope(|scope| {
        // It needs nothing from the network: it starts first.
        let destroyed = scope.spawn(|| destroy_link(ctx, &deleting, netns_hint));
        let released = context::network_view(ctx, store).and_then(|view| {
            let released = scope.spawn(|| release_addresses(ipam, &deleting));
            withdraw_key(ctx, store, &view, &deleting);
            withdrawn();
            joined(released)
        });
        (joined(destroyed), released)
    });
    destroyed.and(released)?;
    ports::release(&store.pod_link_name(&deleting.container_id, &deleting.ifname));
    Ok(())
}

/// The other local links and the node gateway drop `record`'s key (told without reading
/// them; a link that refuses is noted for the next resync), after any links an earlier
/// fan-out missed are brought in step.
fn withdraw_key(ctx: &Context, store: &Store, view: &NetworkView, record: &Record) {
    context::resync_out_of_step(ctx, store, view);
    if let Ok(keys) = mesh::keys(record) {
        let gone = wireguard::Update {
            remove_peers: keys,
            ..wireguard::Update::default()
        };
        let others = |r: &Record| !r.is_attachment(&record.container_id, &record.ifname);
        if view.peering == Peering::Mesh {
            context::tell_local_pods(ctx, store, view, others, &gone);
        }
        if let Err(e) = reconcile::tell_gateway(&ctx.local(), view, &gone) {
            tracing::warn!(error = %e, "could not remove the peer from the node gateway");
        }
    }
    tracing::debug!("key withdrawn from the other links");
}

/// The link and its daemon. A record whose key is unreadable cannot prove a link ours: the
/// link is left alone (logged).
fn destroy_link(ctx: &Context, record: &Record, netns_hint: Option<&Path>) -> Result<()> {
    let pod = record.live_netns(netns_hint);
    let link = record.link(pod.as_ref());
    let destroyed = match mesh::keys(record) {
        Ok(keys) => wireguard::backend(record.backend).destroy(&link, &keys, &ctx.host),
        Err(e) => {
            tracing::warn!(container = %record.container_id, error = %e, "cannot prove the link ours: left alone");
            Ok(())
        }
    };
    tracing::debug!("link destroyed");
    destroyed
}

fn release_addresses(ipam: &Ipam, record: &Record) -> Result<()> {
    let target = Target {
        container_id: &record.container_id,
        ifname: &record.ifname,
        netns: None,
    };
    let released = ipam.del(&target, None);
    tracing::debug!("addresses released");
    released
}

/// Undo one attachment completely, the caller holding the network lock throughout.
pub fn teardown(
    ctx: &Context,
    store: &Store,
    ipam: &Ipam,
    record: &Record,
    netns_hint: Option<&Path>,
) -> Result<()> {
    take_apart(ctx, store, ipam, record, netns_hint, || {})?;
    store.remove(&record.container_id, &record.ifname)
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
/// something to clear. Every record is read to look for an earlier boot's until one ADD of this
/// boot found none (`Cleared::NoteIt`: the ADD notes it in the store once it succeeded, so a
/// failed ADD leaves no file; none can come back).
pub fn clear_leftovers(ctx: &Context, store: &Store, ipam: &Ipam) -> Result<Cleared> {
    let mut cleared = Cleared::Noted;
    if !store.earlier_boots_cleared(&ctx.boot_id) {
        let of_earlier_boot = |r: &Record| r.boot_id != ctx.boot_id;
        if store.node_records()?.iter().any(of_earlier_boot) {
            let _lock = store.lock()?;
            reap_earlier_boots(ctx, store, ipam)?;
        } else {
            cleared = Cleared::NoteIt;
        }
    }
    let (container_id, ifname) = (&ctx.env.container_id, &ctx.env.ifname);
    if store.get(container_id, ifname)?.is_some() {
        let _lock = store.lock()?;
        if let Some(stale) = store.get(container_id, ifname)? {
            teardown(ctx, store, ipam, &stale, None)?;
        }
    }
    Ok(cleared)
}

/// Whether the store says already that no record of an earlier boot is left.
pub enum Cleared {
    Noted,
    /// None was found: note it once the ADD succeeded.
    NoteIt,
}

impl Cleared {
    pub fn note(self, ctx: &Context, store: &Store) {
        if let Cleared::NoteIt = self
            && let Err(e) = store.note_earlier_boots_cleared(&ctx.boot_id)
        {
            tracing::warn!(error = %e, "could not note that no record of an earlier boot is left");
        }
    }
}
