//! What every command that touches attachments shares: the settings resolved against this
//! host, the store, the fan-outs to this node's links, and the leftovers ADD clears first.

use crate::cni::{CniEnv, NetConf, Result};
use crate::host;
use crate::ipam::Ipam;
use crate::netns::Netns;
use crate::reconcile::{self, NetworkView, Prune};
use crate::store::{Record, Store};
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
