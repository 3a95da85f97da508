//! GC (CNI 1.1): remove this node's attachments that the runtime no longer lists in
//! `cni.dev/valid-attachments` (or its older alias `cni.dev/attachments`). Other nodes'
//! records are never touched: the list covers one runtime on one node. Without a list
//! (libcni sends none when its caller passed none, having just DEL'd every cached attachment
//! itself), only what is provably dead goes: records of an earlier boot, and records whose
//! pod namespace is gone.

use super::context::{self, Context};
use super::teardown;
use crate::cni::{Result, Version};
use crate::gateway;
use crate::store::Store;

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "GC")?;
    let ipam = ctx.ipam()?;
    if let Some(store) = Store::open_existing(&conf.store, &conf.name, &ctx.node)? {
        // ADDs under way finish first: their links exist before their records are ready.
        let _no_adding = store.no_adding()?;
        let _lock = store.lock()?;
        teardown::reap_earlier_boots(ctx, &store, &ipam)?;
        store.remove_orphan_temp_files()?;
        match &conf.valid_attachments {
            Some(valid) => teardown::reap(ctx, &store, &ipam, "not in the runtime's list", |r| {
                !valid
                    .iter()
                    .any(|a| r.is_attachment(&a.container_id, &a.ifname))
            })?,
            None => teardown::reap(ctx, &store, &ipam, "its pod namespace is gone", |r| {
                r.live_netns(None).is_none()
            })?,
        };
        if store.has_out_of_step() {
            context::resync_out_of_step(ctx, &store, &context::network_view(ctx, &store)?);
        }
        gateway::remove_if_unused(&ctx.host, &store)?;
    }
    // An IPAM that speaks 1.1 cleans its own leftovers; for older ones the IPAM DEL of each
    // stale attachment above did the work.
    ipam.forward_v1_1("GC")?;
    Ok(())
}
