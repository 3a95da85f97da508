//! STATUS (CNI 1.1): 50 when this node could not ADD (IPAM plugin missing, store not
//! writable, no WireGuard backend); forwarded to an IPAM that speaks 1.1.

use super::context::{self, Context};
use crate::cni::{Error, Result, Version};
use crate::gateway;
use crate::ipam::Ipam;
use crate::store::Store;

/// 51 when pods exist on this node but their gateway link is gone (no probes, no egress).
fn check_gateway(ctx: &Context) -> Result<()> {
    let Some(store) = Store::open_existing(&ctx.conf.store, &ctx.conf.name, &ctx.node)? else {
        return Ok(());
    };
    if store.node_records()?.is_empty() {
        return Ok(());
    }
    let live = store
        .gateway()?
        .is_some_and(|gw| gw.boot_id == ctx.boot_id && gateway::is_live(&ctx.host, &gw));
    if live {
        Ok(())
    } else {
        Err(Error::Degraded(format!(
            "the node gateway of network {} is gone: pods here cannot reach the host or leave it until the next ADD recreates it",
            ctx.conf.name
        )))
    }
}

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "STATUS")?;
    let ipam = Ipam::find(ctx.env, conf).map_err(|e| Error::NotAvailable(e.to_string()))?;
    ctx.store()
        .and_then(|store| store.probe_writable())
        .map_err(|e| Error::NotAvailable(format!("cannot add pods: {e}")))?;
    context::choose_backend(conf.backend).map_err(|e| Error::NotAvailable(e.to_string()))?;
    if conf.host_gateway {
        check_gateway(ctx)?;
    }
    ipam.forward_v1_1("STATUS")?;
    Ok(())
}
