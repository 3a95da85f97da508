//! DEL: the ADD steps backwards, best effort and repeatable. Anything already gone (netns,
//! link, record, reservation) is success; only a link proven ours is deleted.

use super::context::{self, Context};
use crate::cni::{CniResult, Result};
use crate::gateway;
use crate::store::Store;

pub fn run(ctx: &Context) -> Result<()> {
    let env = ctx.env;
    let ipam = ctx.ipam()?;
    let prev = ctx
        .conf
        .prev_result
        .as_ref()
        .and_then(|v| CniResult::parse(v, "prevResult").ok());

    let Some(store) = Store::open_existing(&ctx.conf.store, &ctx.conf.name, &ctx.node)? else {
        // Never attached here; an ADD that died before its record may still hold addresses.
        return ipam.del(&ipam.target_of_env(), prev.as_ref());
    };
    let _lock = store.lock()?;
    match store.get(&env.container_id, &env.ifname)? {
        Some(record) => context::teardown(ctx, &store, &ipam, &record, env.netns.as_deref())?,
        None => ipam.del(&ipam.target_of_env(), prev.as_ref())?,
    }
    gateway::remove_if_unused(&ctx.host, &store)
}
