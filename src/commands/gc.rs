//! GC (CNI 1.1): remove this node's attachments that the runtime no longer lists in
//! `cni.dev/valid-attachments`. Other nodes' records are never touched: the list covers one
//! runtime on one node.

use super::context::{self, Context};
use crate::cni::{Error, Result, Version};
use crate::gateway;
use crate::store::Store;

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        Error::config(
            "cni.dev/valid-attachments",
            "GC needs the list of attachments to keep",
        )
    })?;
    let ipam = ctx.ipam()?;
    if let Some(store) = Store::open_existing(&conf.store, &conf.name, &ctx.node)? {
        let _lock = store.lock()?;
        context::reap_earlier_boots(ctx, &store, &ipam)?;
        store.remove_orphan_temp_files()?;
        for record in store.node_records()? {
            let keep = valid
                .iter()
                .any(|a| record.is_attachment(&a.container_id, &a.ifname));
            if !keep {
                tracing::info!(container = %record.container_id, ifname = %record.ifname, "GC removes a stale attachment");
                context::teardown(ctx, &store, &ipam, &record, None)?;
            }
        }
        gateway::remove_if_unused(&ctx.host, &store, &ctx.conf.name)?;
    }
    // An IPAM that speaks 1.1 cleans its own leftovers; for older ones the IPAM DEL of each
    // stale attachment above did the work.
    ipam.forward_v1_1("GC")?;
    Ok(())
}
