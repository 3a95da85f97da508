//! DEL: the ADD steps backwards, best effort and repeatable. Anything already gone (netns,
//! link, record, reservation) is success; only a link proven ours is deleted. Under the
//! network lock the record is marked `deleting` and its key removed everywhere, while its
//! addresses go back to IPAM and its link is torn down; those two finish outside the lock,
//! and the record goes under the lock again.

use super::context::Context;
use super::teardown;
use crate::cni::{CniResult, Result};
use crate::gateway;
use crate::store::{State, Store};

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
    // An ADD of this attachment killed while its IPAM plugin ran: that plugin finishes first.
    let attachment = store.attachment_lock(&env.container_id, &env.ifname)?;
    let lock = store.lock()?;
    let Some(record) = store.get(&env.container_id, &env.ifname)? else {
        ipam.del(&ipam.target_of_env(), prev.as_ref())?;
        drop(attachment);
        return gateway::remove_if_unused(&ctx.host, &store);
    };
    // The lock goes once the other links dropped the key: ADDs of other pods need not wait
    // for the link's teardown or IPAM's release.
    let mut lock = Some(lock);
    let netns = env.netns.as_deref();
    teardown::take_apart(ctx, &store, &ipam, &record, netns, || drop(lock.take()))?;
    let _lock = store.lock()?;
    // Still the record this DEL withdrew (a runtime never overlaps ADD and DEL of one
    // attachment, but a record made meanwhile must not go with ours).
    let current = store.get(&env.container_id, &env.ifname)?;
    if current.is_some_and(|r| r.state == State::Deleting && r.public_key == record.public_key) {
        store.remove(&env.container_id, &env.ifname)?;
    }
    drop(attachment);
    gateway::remove_if_unused(&ctx.host, &store)
}
