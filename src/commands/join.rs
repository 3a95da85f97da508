//! The serialised half of ADD, under the network lock: a built link joins the network. An ADD
//! builds its link (daemon, TUN, addresses, routes) without the lock and records it as
//! `joining`; whichever ADD holds the lock next joins *every* link waiting then, as one batch:
//! each gets its whole peer set (the others of the batch included), the gateway gets all of
//! them in one message, and every ready local link gets all of them in one message. An ADD
//! whose link a batch already joined finds its record ready and is done. Under a burst of ADDs
//! this turns one message per link per ADD into one per link per batch.

use super::context::{self, Context};
use crate::cni::{Peering, Result};
use crate::gateway;
use crate::host::LinkSettings;
use crate::netns::Netns;
use crate::reconcile::{self, NetworkView, Prune};
use crate::store::{GatewayRecord, Record, State, Store};
use crate::wireguard::{self, Peer};

/// What this ADD brings to the join. (`'a`: the command's context and store; `'b`: this ADD's
/// own values.)
pub struct Joining<'a, 'b> {
    pub ctx: &'a Context<'a>,
    pub store: &'a Store,
    pub settings: &'b LinkSettings,
    pub gateway_plan: Option<&'b gateway::Plan>,
    /// The peers the link was created with (the network as read before the lock).
    pub built_with: &'b [Peer],
    pub static_peers: Vec<Peer>,
    /// This ADD made the gateway already (beside building the link): it needs the network.
    pub gateway_created: bool,
}

impl<'a> Joining<'a, '_> {
    /// Join `record`'s link (and every other one waiting) to the network: the gateway; the
    /// peers each link lacks; the newcomers added to the gateway (or the ADD fails: kubelet
    /// probes go that way), then ready; the other local links told of them (one that refuses
    /// is noted and repaired later). The caller holds the network lock.
    pub fn join(self, pod: &Netns, record: &mut Record) -> Result<()> {
        let (ctx, store) = (self.ctx, self.store);
        // Its own record first: after a burst most ADDs find they were taken along, and need
        // not read the whole network to learn it.
        if let Some(joined) = store.get(&record.container_id, &record.ifname)?
            && joined.state == State::Ready
            && joined.public_key == record.public_key
        {
            *record = joined;
            tracing::debug!("an earlier batch joined this link to the network");
            return Ok(());
        }
        let mut view = NetworkView::read_for_join(store, ctx.conf)?;
        view.static_peers = self.static_peers;
        if store.has_out_of_step() {
            view.read_own_records(store)?;
            context::resync_out_of_step(ctx, store, &view);
        }
        let mut gateway_created = self.gateway_created;
        if let Some(plan) = self.gateway_plan {
            let (gateway, created) = ensure_gateway(ctx, store, self.settings, plan)?;
            view.gateway = Some(gateway);
            gateway_created = created || self.gateway_created;
        }
        if gateway_created {
            // A new gateway starts from this node's pods: it needs the whole network.
            view.read_own_records(store)?;
            view.read_all_gateways(store)?;
        }

        // Everyone in the batch counts as ready for the others' peer sets.
        let waiting = others_waiting(ctx, &view, record);
        view.treat_as_ready(|r| is_same(r, record) || waiting.iter().any(|w| is_same(r, w)));
        let catch_up = reconcile::between(self.built_with, &view.desired_for_pod(record)?);
        if !catch_up.changes_no_peer() {
            wireguard::backend(record.backend).apply(&record.link(Some(pod)), &catch_up)?;
        }
        // One that cannot is left waiting: its own ADD tries (and answers) for itself.
        let missed = reconcile::each_at_once(waiting.iter().collect(), |other| {
            bring_in_step(&view, other)
        });
        let mut batch = vec![record.clone()];
        batch.extend(
            waiting
                .iter()
                .filter(|w| !missed.iter().any(|m| is_same(m, w)))
                .cloned(),
        );

        let newcomers = reconcile::newcomers(&view, &batch)?;
        match gateway_created {
            true => reconcile::gateway(&ctx.local(), &view, Prune::Nothing)?,
            false => reconcile::tell_gateway(&ctx.local(), &view, &newcomers)?,
        }
        for joined in &mut batch {
            joined.state = State::Ready;
            store.put(joined)?;
        }
        tracing::debug!(links = batch.len(), gateway_created, "joined the network");
        *record = batch[0].clone();
        let outside_batch = |r: &Record| !batch.iter().any(|b| is_same(r, b));
        // On-demand, local pods reach each other through the gateway: only it learns of them.
        if view.peering == Peering::Mesh {
            context::tell_local_pods(ctx, store, &view, outside_batch, &newcomers);
        }
        Ok(())
    }
}

fn is_same(a: &Record, b: &Record) -> bool {
    a.is_attachment(&b.container_id, &b.ifname)
}

/// The other links of this node built and waiting to join, whose pods and links still exist
/// (an ADD killed while waiting leaves a `joining` record its DEL removes).
fn others_waiting(ctx: &Context, view: &NetworkView, me: &Record) -> Vec<Record> {
    view.records
        .iter()
        .filter(|r| r.node == ctx.node && r.boot_id == ctx.boot_id)
        .filter(|r| r.state == State::Joining && !is_same(r, me))
        .filter(|r| {
            r.live_netns(None)
                .is_some_and(|pod| wireguard::backend(r.backend).is_running(&r.link(Some(&pod))))
        })
        .cloned()
        .collect()
}

/// A waiting link gets exactly its desired peer set (nothing but its own ADD has configured
/// it, so whatever else it has is a peer that left while it was built).
fn bring_in_step(view: &NetworkView, other: &Record) -> Result<()> {
    let pod = other.live_netns(None).ok_or_else(|| {
        crate::cni::Error::netlink(
            format!("link of {}", other.container_id),
            "its pod namespace is gone",
        )
    })?;
    let desired = view.desired_for_pod(other)?;
    let link = other.link(Some(&pod));
    reconcile::apply(other.backend, &link, &desired, Prune::Everything, &[]).map(|_| ())
}

/// Make sure the node gateway serves this pod's range; if it had to be replaced, the local pods
/// swap its old key for the new one. Answers the gateway and whether it was created now. The
/// caller holds the network lock; ADD registers the gateway's undo before it starts.
pub fn ensure_gateway(
    ctx: &Context,
    store: &Store,
    settings: &LinkSettings,
    plan: &gateway::Plan,
) -> Result<(GatewayRecord, bool)> {
    let wanted = gateway::Wanted {
        boot_id: &ctx.boot_id,
        settings,
        plan,
        keepalive: ctx.conf.persistent_keepalive,
        masquerade: ctx.conf.ip_masq,
    };
    let ensured = gateway::ensure(&ctx.host, store, &wanted)?;
    if ensured.created {
        let replaced: Vec<_> = ensured.replaced_key.into_iter().collect();
        let mut view = context::network_view(ctx, store)?;
        view.gateway = Some(ensured.record.clone());
        context::reconcile_local_pods(ctx, store, &view, None, Prune::Only(&replaced));
    }
    Ok((ensured.record, ensured.created))
}
