//! The agent's reconcile hook: brings every live WireGuard link of this node (its pods and its
//! node gateway) to the peer set the store describes, with the same view and diff the CNI
//! commands use (`crate::reconcile`). Per link it takes the network's flock around
//! read store → read device → apply, re-checks under the lock that the attachment is still
//! ready and its namespace the recorded one, and never holds the lock across links. A node
//! with a subnet keeps its node gateway whether or not it has pods (control-plane nodes must
//! reach webhooks in pods): the reconcile creates it when it is missing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use wireguard_control::Key;

use ipnetwork::IpNetwork;

use crate::cni::{NetConf, Result};
use crate::gateway;
use crate::host;
use crate::lease;
use crate::netns::Netns;
use crate::node_paths;
use crate::reconcile::{self, NetworkView, Prune};
use crate::store::{State, Store};
use crate::wireguard;

use super::LinkReconciler;
use super::handshakes;

/// At most this many peers added to one link in one reconcile get an immediate handshake.
const HANDSHAKE_KICK_LIMIT: usize = 16;

pub struct LinkSync {
    node: String,
    boot_id: String,
    host: Netns,
    /// Where the network's settings are read from at every reconcile (the runtime's conflists).
    cni_conf_dir: PathBuf,
    store: PathBuf,
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
            cni_conf_dir: settings.cni_conf_dir.clone(),
            store: settings.store.clone(),
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

    fn sync(&self, conf: &NetConf) -> Result<()> {
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
            remembered: self
                .last_endpoints
                .lock()
                .ok()
                .and_then(|m| m.get(&conf.name).cloned())
                .unwrap_or_default(),
            given: HashMap::new(),
        };
        // Listed under the lock, as every writer writes: a record half-way through a join (or
        // a legacy name being migrated) is seen in one state, never between two.
        let records = {
            let _lock = store.lock()?;
            store.node_records()?
        };
        for record in records {
            if record.state != State::Ready || record.boot_id != self.boot_id {
                continue;
            }
            let _lock = store.lock()?;
            // Under the lock: still there, still ready, still in the namespace recorded.
            let Some(current) = store.get(&record.container_id, &record.ifname)? else {
                continue;
            };
            let Some(pod) = current.live_netns(None) else {
                continue;
            };
            if current.state != State::Ready || current.public_key != record.public_key {
                continue;
            }
            let view = NetworkView::read_complete(&store, conf)?;
            let link = current.link(Some(&pod));
            let outcome = view.desired_for_pod(&current).and_then(|desired| {
                let moved = endpoints.moved(&desired);
                let added = reconcile::apply_and_report(
                    current.backend,
                    &link,
                    &desired,
                    Prune::Everything,
                    &moved,
                )?;
                // A few new pods: start their handshakes now. Not a first sync of thousands of
                // peers: that would flood the daemon (and the network) with handshakes.
                if let Some(added) = added.as_ref().filter(|a| a.len() <= HANDSHAKE_KICK_LIMIT) {
                    reconcile::start_handshakes(current.backend, &link, added)?;
                    handshakes::spawn(handshakes::Followup {
                        conf: conf.clone(),
                        node: self.node.clone(),
                        container_id: current.container_id.clone(),
                        ifname: current.ifname.clone(),
                        peers: added.iter().map(|p| p.public_key.clone()).collect(),
                    });
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
            let mut view = NetworkView::read_complete(&store, conf)?;
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
        tracing::debug!(network = %conf.name, updated, failed, "links reconciled");
        Ok(())
    }
}

impl LinkReconciler for LinkSync {
    fn reconcile(&self, network: &str) {
        let networks = super::config::read_networks(&self.cni_conf_dir, &self.store);
        let conf = networks
            .ok()
            .and_then(|nets| nets.into_iter().find(|n| n.name == network))
            .map(|n| n.conf);
        let Some(conf) = conf else {
            tracing::warn!(
                network,
                "no conflist for this network any more: links left as they are"
            );
            return;
        };
        if let Err(e) = self.sync(&conf) {
            tracing::warn!(network, error = %e, "reconcile failed");
        }
    }
}

/// The subnet's first host address (`.1`), where host-local puts the gateway by default.
fn first_host(subnet: &IpNetwork) -> Option<std::net::IpAddr> {
    subnet.iter().nth(1)
}
