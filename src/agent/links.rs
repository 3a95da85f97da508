//! The agent's link writer: every live WireGuard link of this node (its pods and its node
//! gateway) gets the peers the network has for it, with the views and updates the CNI
//! commands use (`crate::reconcile`). A change (one remote pod or gateway) is written to each
//! link without reading it; a resync reads each device and writes the difference from the
//! store's peer set. Per link it takes the network's flock, re-checks under it that the
//! attachment is still ready and its namespace the recorded one, and never holds the lock
//! across links. A node with a subnet keeps its node gateway whether or not it has pods
//! (control-plane nodes must reach webhooks in pods): the resync creates it when missing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use wireguard_control::Key;

use ipnetwork::IpNetwork;

use crate::cni::{NetConf, Peering, Result};
use crate::gateway;
use crate::host;
use crate::lease;
use crate::netns::Netns;
use crate::node_paths;
use crate::reconcile::{self, DirectCandidates, NetworkView, PeerChanges, Prune};
use crate::store::{Record, State, Store};
use crate::wireguard;

use super::LinkReconciler;
use super::directory::SharedDirectory;
use super::handshakes;

/// At most this many peers added to one link in one reconcile get an immediate handshake.
const HANDSHAKE_KICK_LIMIT: usize = 16;

pub struct LinkSync {
    node: String,
    boot_id: String,
    host: Netns,
    /// The endpoint each peer was last given: a record whose endpoint differs from it was
    /// re-addressed (its node moved) and is reset on every link; any other difference is
    /// WireGuard roaming and is left alone (`reconcile::diff`). Per network.
    last_endpoints: Mutex<HashMap<String, HashMap<Key, SocketAddr>>>,
}

/// What one reconcile gave each peer, and which of them were re-addressed since the last.
struct Endpoints {
    remembered: HashMap<Key, SocketAddr>,
    given: HashMap<Key, SocketAddr>,
}

impl Endpoints {
    /// The peers of `desired` whose endpoint differs from what the last reconcile gave them.
    fn moved(&mut self, desired: &[wireguard::Peer]) -> Vec<Key> {
        let mut moved = Vec::new();
        for peer in desired {
            let Some(endpoint) = peer.endpoint else {
                continue;
            };
            if self
                .remembered
                .get(&peer.public_key)
                .is_some_and(|last| *last != endpoint)
            {
                moved.push(peer.public_key.clone());
            }
            self.given.insert(peer.public_key.clone(), endpoint);
        }
        moved
    }
}

impl LinkSync {
    pub fn new(settings: &super::Settings) -> Result<LinkSync> {
        Ok(LinkSync {
            node: settings.node.clone(),
            boot_id: host::boot_id()?,
            host: Netns::host()?,
            last_endpoints: Mutex::new(HashMap::new()),
        })
    }

    fn local(&self) -> reconcile::Node<'_> {
        reconcile::Node {
            name: &self.node,
            boot_id: &self.boot_id,
            host: &self.host,
        }
    }

    /// The node's gateway exists and serves its subnets (as leased or claimed by the agent,
    /// in `subnet.json`); the gateway address is the one the conflist's IPAM range names for
    /// the subnet, else the subnet's first, as host-local's default.
    fn ensure_gateway(&self, conf: &NetConf, store: &Store) -> Result<()> {
        let Some(subnets) = lease::leased_subnets(&conf.store, &conf.name, &self.node) else {
            return Ok(());
        };
        let named = gateway::expected_plan(conf);
        let addresses = subnets
            .iter()
            .filter_map(|subnet| {
                let from_ipam = named.as_ref().and_then(|plan| {
                    let i = plan.subnets.iter().position(|s| s == subnet)?;
                    plan.addresses.get(i).map(|a| a.ip())
                });
                from_ipam.or_else(|| first_host(subnet))
            })
            .map(wireguard::host_prefix)
            .collect();
        let plan = gateway::Plan {
            addresses,
            subnets,
            cluster_ranges: conf.cluster_range.clone(),
        };
        let mut settings = host::resolve_link_settings(conf)?;
        settings.agree_mtu(conf, store);
        let _lock = store.lock()?;
        let wanted = gateway::Wanted {
            boot_id: &self.boot_id,
            settings: &settings,
            plan: &plan,
            keepalive: conf.persistent_keepalive,
            masquerade: conf.ip_masq,
        };
        let ensured = gateway::ensure(&self.host, store, &wanted)?;
        if ensured.created {
            tracing::info!(network = %conf.name, link = %ensured.record.host_name, "node gateway created");
        }
        Ok(())
    }

    /// Every live link to its whole desired peer set (`Prune::Everything`). The network is
    /// read once; per link, under the lock, this node's own records are read again (an ADD
    /// that joined meanwhile has told every link of its pod, and must not be pruned), the
    /// device is read and the difference written.
    fn resync(&self, conf: &NetConf, directory: &SharedDirectory) -> Result<()> {
        let Some(store) = Store::open_existing(&conf.store, &conf.name, &self.node)? else {
            return Ok(());
        };
        if conf.host_gateway
            && let Err(e) = self.ensure_gateway(conf, &store)
        {
            tracing::warn!(network = %conf.name, error = %e, "could not make the node gateway");
        }
        let (mut updated, mut failed) = (0, 0);
        let mut endpoints = Endpoints {
            remembered: self.remembered(&conf.name),
            given: HashMap::new(),
        };
        // Remote records come from the mirror, which only this thread writes: read once.
        let mut view = NetworkView::read_complete(&store, conf)?;
        view.records.retain(|r| r.node != self.node);
        let remote = view.records.len();
        // On-demand: the promoter's direct peers stay as they are (it removes them itself
        // when their record goes): this node's pods and the directory's.
        let direct = match conf.peering {
            Peering::OnDemand => Some(direct_candidates(&store, directory)?),
            Peering::Mesh => None,
        };
        let keep_direct = |peer: &wireguard_control::PeerInfo| {
            direct.as_ref().is_some_and(|d| d.accepts(&peer.config))
        };
        // Listed under the lock, as every writer writes: a record half-way through a join (or
        // a legacy name being migrated) is seen in one state, never between two.
        let records = {
            let _lock = store.lock()?;
            store.node_records()?
        };
        crate::failpoint::pause_once("resync-pause", std::time::Duration::from_secs(3));
        for record in records {
            if !self.is_live_here(&record) {
                tracing::debug!(container = %record.container_id, state = ?record.state, "resync: not a live link of this boot");
                continue;
            }
            // Before the flock (a plugin command never waits behind a follow-up's read).
            let _followups = handshakes::exclude_followups();
            let _lock = store.lock()?;
            let Some((current, pod)) = self.still_live(&store, &record)? else {
                tracing::debug!(container = %record.container_id, "resync: the link went meanwhile, or its namespace is not visible here");
                continue;
            };
            view.records.truncate(remote);
            view.records.extend(store.node_records()?);
            view.gateway = match conf.host_gateway {
                true => store.gateway()?,
                false => None,
            };
            let link = current.link(Some(&pod));
            let outcome = view.desired_for_pod(&current).and_then(|desired| {
                let moved = endpoints.moved(&desired);
                let added = reconcile::apply_and_report(
                    current.backend,
                    &link,
                    &desired,
                    Prune::EverythingBut(&keep_direct),
                    &moved,
                )?;
                if let Some(added) = &added {
                    self.kick(conf, &current, &link, added)?;
                }
                Ok(added.is_some())
            });
            match outcome {
                Ok(true) => updated += 1,
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    tracing::warn!(network = %conf.name, container = %current.container_id, error = %e, "could not reconcile a pod link");
                }
            }
        }
        if conf.host_gateway {
            let _lock = store.lock()?;
            view.records.truncate(remote);
            view.records.extend(store.node_records()?);
            view.gateway = store.gateway()?;
            view.moved = endpoints.moved(&view.desired_for_gateway());
            let live = view
                .gateway
                .as_ref()
                .is_some_and(|gw| gw.boot_id == self.boot_id);
            if live && let Err(e) = reconcile::gateway(&self.local(), &view, Prune::Everything) {
                failed += 1;
                tracing::warn!(network = %conf.name, error = %e, "could not reconcile the node gateway");
            }
            if let Some(gateway) = view.gateway.as_ref().filter(|_| live) {
                let nodes: Vec<_> = view.remote_gateways.iter().map(|g| g.endpoint).collect();
                if let Err(e) = node_paths::sync(&self.host, gateway, &nodes) {
                    failed += 1;
                    tracing::warn!(network = %conf.name, error = %e, "could not route other nodes' addresses through the gateway");
                }
            }
        }
        if let Ok(mut last) = self.last_endpoints.lock() {
            last.insert(conf.name.clone(), endpoints.given);
        }
        tracing::debug!(network = %conf.name, updated, failed, "links resynced");
        Ok(())
    }

    /// Write one change's peers to every live link of this node, one link per lock hold,
    /// without reading the devices.
    fn apply_changes(&self, conf: &NetConf, changes: &PeerChanges) -> Result<()> {
        let Some(store) = Store::open_existing(&conf.store, &conf.name, &self.node)? else {
            return Ok(());
        };
        let (records, gateway) = {
            let _lock = store.lock()?;
            let gateway = match conf.host_gateway {
                true => store.gateway()?.filter(|gw| gw.boot_id == self.boot_id),
                false => None,
            };
            (store.node_records()?, gateway)
        };
        let for_pods = changes.for_pod_link(gateway.is_some());
        let new_pods = changes.new_pods();
        let mut failed = 0;
        for record in records {
            if !self.is_live_here(&record) {
                continue;
            }
            let _followups = handshakes::exclude_followups();
            let _lock = store.lock()?;
            let Some((current, pod)) = self.still_live(&store, &record)? else {
                continue;
            };
            let link = current.link(Some(&pod));
            let written = wireguard::backend(current.backend)
                .apply(&link, &for_pods)
                .and_then(|()| self.kick(conf, &current, &link, &new_pods));
            if let Err(e) = written {
                failed += 1;
                tracing::warn!(network = %conf.name, container = %current.container_id, error = %e, "could not update a pod link; the next resync repairs it");
            }
        }
        if let Some(gateway) = gateway {
            let _lock = store.lock()?;
            if let Err(e) =
                reconcile::tell_gateway_link(&self.host, &gateway, &changes.for_gateway())
            {
                failed += 1;
                tracing::warn!(network = %conf.name, error = %e, "could not update the node gateway; the next resync repairs it");
            }
            if changes.gateways_changed {
                let nodes: Vec<_> = store
                    .remote_gateways()?
                    .iter()
                    .map(|g| g.endpoint)
                    .collect();
                if let Err(e) = node_paths::sync(&self.host, &gateway, &nodes) {
                    failed += 1;
                    tracing::warn!(network = %conf.name, error = %e, "could not route other nodes' addresses through the gateway");
                }
            }
        }
        self.remember(&conf.name, changes);
        tracing::debug!(network = %conf.name, upserted = changes.upsert.len(), removed = changes.remove.len(), failed, "peer changes written");
        Ok(())
    }

    /// A ready link of this boot, as listed (checked again under the lock: `still_live`).
    fn is_live_here(&self, record: &Record) -> bool {
        record.state == State::Ready && record.boot_id == self.boot_id
    }

    /// Under the lock: the record of `listed` and its pod's namespace, if it is still there,
    /// still ready, still the same link (the same key, or one a rotation replaced it with
    /// meanwhile: a rotation changes no peer), and its namespace still the recorded one.
    fn still_live(&self, store: &Store, listed: &Record) -> Result<Option<(Record, Netns)>> {
        let current = store.get(&listed.container_id, &listed.ifname)?;
        Ok(current
            .filter(|c| c.state == State::Ready && c.keys().any(|k| k == listed.public_key))
            .and_then(|c| c.live_netns(None).map(|pod| (c, pod))))
    }

    /// A few new remote pods: start their handshakes now. Not a first sync of thousands of
    /// peers: that would flood the daemon (and the network) with handshakes.
    fn kick(
        &self,
        conf: &NetConf,
        record: &Record,
        link: &wireguard::LinkRef,
        added: &[wireguard::Peer],
    ) -> Result<()> {
        if added.is_empty() || added.len() > HANDSHAKE_KICK_LIMIT {
            return Ok(());
        }
        reconcile::start_handshakes(record.backend, link, added)?;
        handshakes::follow_up(handshakes::Followup {
            conf: conf.clone(),
            node: self.node.clone(),
            container_id: record.container_id.clone(),
            ifname: record.ifname.clone(),
            peers: added.iter().map(|p| p.public_key.clone()).collect(),
        });
        Ok(())
    }

    fn remembered(&self, network: &str) -> HashMap<Key, SocketAddr> {
        self.last_endpoints
            .lock()
            .ok()
            .and_then(|m| m.get(network).cloned())
            .unwrap_or_default()
    }

    /// The endpoints a change gave (or took): the next resync compares with them.
    fn remember(&self, network: &str, changes: &PeerChanges) {
        let Ok(mut last) = self.last_endpoints.lock() else {
            return;
        };
        let given = last.entry(network.to_string()).or_default();
        for upsert in changes.upsert.iter().filter(|u| u.new || u.moved) {
            if let Some(endpoint) = upsert.peer.endpoint {
                given.insert(upsert.peer.public_key.clone(), endpoint);
            }
        }
        for key in &changes.remove {
            given.remove(key);
        }
    }
}

impl LinkReconciler for LinkSync {
    fn resync(&self, conf: &NetConf, directory: &SharedDirectory) {
        if let Err(e) = LinkSync::resync(self, conf, directory) {
            tracing::warn!(network = %conf.name, error = %e, "resync failed");
        }
    }

    fn apply(&self, conf: &NetConf, changes: &PeerChanges) {
        if let Err(e) = self.apply_changes(conf, changes) {
            tracing::warn!(network = %conf.name, error = %e, "writing peer changes failed; the next resync repairs it");
        }
    }
}

/// The subnet's first host address (`.1`), where host-local puts the gateway by default.
fn first_host(subnet: &IpNetwork) -> Option<std::net::IpAddr> {
    subnet.iter().nth(1)
}

/// The pods a direct peer may be for: this node's and the directory's relayed remote pods
/// (every record of the network, read from the store, while the directory is not complete).
fn direct_candidates(store: &Store, directory: &SharedDirectory) -> Result<DirectCandidates> {
    let directory = directory.read().unwrap_or_else(|p| p.into_inner());
    if !directory.is_complete() {
        return Ok(DirectCandidates::of(&store.all_records()?));
    }
    let mut candidates = DirectCandidates::of(&store.node_records()?);
    for pod in directory.pods().filter(|p| p.relayed) {
        candidates.add(&pod.peer);
    }
    Ok(candidates)
}
