//! One change sent to many links of this node: ADD's newcomers and DEL's gone key, told
//! without reading the devices, and whole peer sets brought to a selection of links. Links
//! are told several at once: each answer waits on a daemon (or the kernel) that does a key
//! agreement per new peer, and a burst of ADDs has many links to tell.

use std::sync::Mutex;

use wireguard_control::Key;

use super::{NetworkView, Node, Prune, apply};
use crate::cni::Result;
use crate::mesh;
use crate::netns::Netns;
use crate::store::{GatewayRecord, Record, State};
use crate::wireguard::{self, Update};

/// How many links a fan-out talks to at once.
const AT_ONCE: usize = 4;
/// Below this many links a fan-out stays on the calling thread.
const WORTH_THREADS: usize = 8;

/// ADD's fan-out: the update that makes `newcomers` (this node's) peers of the gateway and,
/// in mesh mode, of the other local links (the same update for all of them).
pub fn newcomers(view: &NetworkView, newcomers: &[Record]) -> Result<Update<'static>> {
    let peers = newcomers
        .iter()
        .map(|r| mesh::peer_of(r, view.session_keepalive()))
        .collect::<Result<_>>()?;
    Ok(Update {
        peers,
        ..Update::default()
    })
}

/// DEL's fan-out: the update that drops `key` from another link.
pub fn gone(key: Key) -> Update<'static> {
    Update {
        remove_peers: vec![key],
        ..Update::default()
    }
}

/// Send `update` to every ready link of this node that `which` selects, without reading the
/// devices first: one message per link, however many peers it has. Answers the links that
/// refused (logged; CHECK of their pods reports the difference).
pub fn tell_local_pods<'v>(
    node: &Node,
    view: &'v NetworkView,
    which: impl Fn(&Record) -> bool,
    update: &Update,
) -> Vec<&'v Record> {
    let links = ready_local(node, view, which);
    each_at_once(links, |record| {
        let Some(pod) = record.live_netns(None) else {
            return Ok(()); // died without DEL: no link to tell
        };
        wireguard::backend(record.backend).apply(&record.link(Some(&pod)), update)
    })
}

/// Send `update` to this node's gateway without reading it first.
pub fn tell_gateway(node: &Node, view: &NetworkView, update: &Update) -> Result<()> {
    let Some(gateway) = &view.gateway else {
        return Ok(());
    };
    tell_gateway_link(node.host, gateway, update)
}

/// Send `update` to the gateway link `gateway` names (in `host`) without reading it first.
pub fn tell_gateway_link(host: &Netns, gateway: &GatewayRecord, update: &Update) -> Result<()> {
    crate::failpoint::fail("gateway-update")?;
    wireguard::backend(gateway.backend).apply(&gateway.link(host), update)
}

/// Bring the link of every ready attachment on this node that `which` selects to its
/// desired peer set. A pod that died without DEL has no link to update; a link that refuses
/// is logged and stays as it was (CHECK of that pod reports the difference, the next
/// reconcile retries). Returns the links that could not be updated.
pub fn local_pods<'v>(
    node: &Node,
    view: &'v NetworkView,
    which: impl Fn(&Record) -> bool,
    prune: Prune,
) -> Vec<&'v Record> {
    let links = ready_local(node, view, which);
    each_at_once(links, |record| {
        let Some(pod) = record.live_netns(None) else {
            return Ok(()); // died without DEL: no link to update
        };
        let desired = view.desired_for_pod(record)?;
        let link = record.link(Some(&pod));
        apply(record.backend, &link, &desired, prune, &view.moved).map(|_| ())
    })
}

/// This node's ready links of this boot that `which` selects.
fn ready_local<'v>(
    node: &Node,
    view: &'v NetworkView,
    which: impl Fn(&Record) -> bool,
) -> Vec<&'v Record> {
    debug_assert!(
        view.all_own,
        "a fan-out to this node's links needs their records"
    );
    view.records
        .iter()
        .filter(|r| r.node == node.name && r.state == State::Ready && r.boot_id == node.boot_id)
        .filter(|r| which(r))
        .collect()
}

/// Run `work` for every record, `AT_ONCE` at a time when there are enough of them; answers
/// the records whose work failed (each logged).
pub fn each_at_once<'v>(
    records: Vec<&'v Record>,
    work: impl Fn(&Record) -> Result<()> + Sync,
) -> Vec<&'v Record> {
    let failed = Mutex::new(Vec::new());
    let run = |record: &'v Record| {
        if let Err(e) = work(record) {
            tracing::warn!(container = %record.container_id, ifname = %record.ifname, error = %e, "could not update the peers of a local pod");
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(record);
        }
    };
    if records.len() < WORTH_THREADS {
        records.iter().for_each(|r| run(r));
    } else {
        std::thread::scope(|scope| {
            for worker in 0..AT_ONCE {
                let (records, run) = (&records, &run);
                scope.spawn(move || {
                    records
                        .iter()
                        .skip(worker)
                        .step_by(AT_ONCE)
                        .for_each(|r| run(r))
                });
            }
        });
    }
    failed.into_inner().unwrap_or_else(|p| p.into_inner())
}
