//! STATUS (CNI 1.1): success whenever an ADD would succeed; 50 when it could not (IPAM
//! plugin missing, store not writable, no WireGuard backend); forwarded to an IPAM that
//! speaks 1.1. Degraded pods (their node gateway gone) do not fail STATUS: CNI 1.1 runtimes
//! stop sending ADDs while it fails, and the next ADD is what repairs the gateway. They are
//! logged here and reported by CHECK of each affected pod and by `wg-cni show`.

use super::context::Context;
use crate::cni::{Error, Result, Version};
use crate::gateway;
use crate::ipam::Ipam;
use crate::store::Store;

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "STATUS")?;
    let ipam = Ipam::find(ctx.env, conf).map_err(|e| Error::NotAvailable(e.to_string()))?;
    ctx.store()
        .and_then(|store| store.probe_writable())
        .map_err(|e| Error::NotAvailable(format!("cannot add pods: {e}")))?;
    crate::host::choose_backend(conf.backend).map_err(|e| Error::NotAvailable(e.to_string()))?;
    if conf.host_gateway {
        warn_if_gateway_gone(ctx);
    }
    ipam.forward_v1_1("STATUS")?;
    Ok(())
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
