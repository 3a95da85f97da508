//! STATUS (CNI 1.1): success whenever an ADD would succeed; 50 when it could not (IPAM
//! plugin missing, store not writable, no WireGuard backend, or, where the node agent serves
//! the network, before the agent's first sync in this boot); forwarded to an IPAM that
//! speaks 1.1. Degraded pods (their node gateway gone) do not fail STATUS: CNI 1.1 runtimes
//! stop sending ADDs while it fails, and the next ADD is what repairs the gateway. They are
//! logged here and reported by CHECK of each affected pod and by `wg-cni show`.

use super::context::Context;
use crate::cni::{Error, Result, Version};
use crate::gateway;
use crate::ipam::Ipam;
use crate::readiness;
use crate::store::Store;

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "STATUS")?;
    let ipam = Ipam::find(ctx.env, conf).map_err(|e| Error::NotAvailable(e.to_string()))?;
    ctx.store()
        .and_then(|store| store.probe_writable())
        .map_err(|e| Error::NotAvailable(format!("cannot add pods: {e}")))?;
    crate::host::choose_backend(conf.backend).map_err(|e| Error::NotAvailable(e.to_string()))?;
    if is_agent_served(conf) {
        // Before the agent's first sync this node lacks the other nodes' peers and may not
        // hold its subnet: pods added now would be cut off. Once synced in this boot, an agent
        // outage no longer matters (ADD works from the mirror), and the marker stays.
        readiness::check(&conf.store, &conf.name, &ctx.node, &ctx.boot_id)
            .map_err(Error::NotAvailable)?;
    }
    if conf.host_gateway {
        warn_if_gateway_gone(ctx);
    }
    ipam.forward_v1_1("STATUS")?;
    Ok(())
}

/// The node agent serves exactly the networks with a `clusterRange` (it refuses others; the
/// README's config table says so): single-node networks without one never wait for it.
fn is_agent_served(conf: &crate::cni::NetConf) -> bool {
    !conf.cluster_range.is_empty()
}

/// Pods of the current boot exist but their gateway does not: say so in the log.
fn warn_if_gateway_gone(ctx: &Context) {
    let Ok(Some(store)) = Store::open_existing(&ctx.conf.store, &ctx.conf.name, &ctx.node) else {
        return;
    };
    let has_live_pods = store
        .node_records()
        .is_ok_and(|records| records.iter().any(|r| r.boot_id == ctx.boot_id));
    if has_live_pods && !gateway::is_live_for_boot(&ctx.host, &store, &ctx.boot_id) {
        tracing::warn!(
            network = %ctx.conf.name,
            "the node gateway is gone: pods here cannot reach the host until the next ADD recreates it"
        );
    }
}
