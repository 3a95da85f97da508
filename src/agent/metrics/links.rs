//! This node's links as a scrape sees them: per link (a pod's or the node gateway's) its
//! bytes, its peers by kind, its newest handshake; per peer only when asked
//! (`--metrics-per-peer`: series grow with pods²).
//!
//! A scrape lists the store without its lock (records are replaced atomically; a link that
//! comes or goes meanwhile is simply in or out) and reads each link's device once, through the
//! backends' reads that never hold a private key (`wireguard::DeviceState`). Reads run on
//! tokio's blocking threads, a few at a time, each bounded by a timeout and all by the
//! scrape's deadline: a hung daemon costs its link's series (`wgcni_link_up` 0), never the
//! scrape.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use prometheus_client::metrics::MetricType;

use wireguard_control::Key;

use super::totals::{Bytes, Totals};
use super::{Labels, Series, Value};
use crate::store::{GatewayRecord, Record, State, Store};
use crate::wireguard::{self, BackendKind, DeviceState};

/// One link's read may take this long.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// All of a scrape's reads end by then (Prometheus' default scrape timeout is 10 s).
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Links read at once.
const PARALLEL_READS: usize = 4;

/// What a peer is to the link holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    /// A pod whose addresses the link routes to it (mesh, an on-demand direct pair, a local
    /// pod on the gateway's link).
    Direct,
    /// A pod peer without addresses: an on-demand pair waiting for its handshake, or cooling.
    Pending,
    /// A node gateway holding no subnet: a pod's own gateway (its default route), or another
    /// node's for its gateway and node addresses.
    Gateway,
    /// Another node's gateway holding its pod subnets: the on-demand relay.
    Relay,
    /// From the network's `staticPeers`.
    Static,
}

const KINDS: [(PeerKind, &str); 5] = [
    (PeerKind::Direct, "direct"),
    (PeerKind::Pending, "pending"),
    (PeerKind::Gateway, "gateway"),
    (PeerKind::Relay, "relay"),
    (PeerKind::Static, "static"),
];

/// The keys of a network that are not pods.
#[derive(Debug, Default)]
struct NotPods {
    gateways: HashSet<Key>,
    statics: HashSet<Key>,
}

impl NotPods {
    fn kind(&self, peer: &wireguard_control::PeerInfo, key: &Key) -> PeerKind {
        let ips = &peer.config.allowed_ips;
        if self.statics.contains(key) {
            PeerKind::Static
        } else if self.gateways.contains(key) {
            let subnet = ips
                .iter()
                .any(|ip| ip.cidr > 0 && ip.cidr < if ip.address.is_ipv4() { 32 } else { 128 });
            match subnet {
                true => PeerKind::Relay,
                false => PeerKind::Gateway,
            }
        } else if ips.is_empty() {
            PeerKind::Pending
        } else {
            PeerKind::Direct
        }
    }
}

/// Which link: its network, its device name (a userspace link's daemon name, or the kernel
/// link's name in its pod) and, for a pod's, the container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LinkId {
    network: String,
    interface: String,
    container: String,
}

/// A link to read.
enum Target {
    Pod(Record),
    Gateway(GatewayRecord),
}

struct Listed {
    id: LinkId,
    /// `namespace` and `pod` from CNI_ARGS, when the runtime sent them.
    pod: (String, String),
    backend: BackendKind,
    target: Target,
    not_pods: std::sync::Arc<NotPods>,
}

impl Listed {
    fn identity(&self) -> Labels {
        vec![
            ("network", self.id.network.clone()),
            ("interface", self.id.interface.clone()),
            ("container", self.id.container.clone()),
            ("namespace", self.pod.0.clone()),
            ("pod", self.pod.1.clone()),
        ]
    }
}

/// What a read found of one peer.
struct PeerRead {
    key: Key,
    kind: PeerKind,
    bytes: Bytes,
    /// Unix seconds.
    handshake: Option<u64>,
}

/// Reads this node's links for a scrape.
pub struct LinkReader {
    node: String,
    boot_id: String,
    store: PathBuf,
    cni_conf_dir: PathBuf,
    per_peer: bool,
    /// One scrape at a time: the totals are its state, and scrapes never pile reads up.
    totals: tokio::sync::Mutex<Totals<LinkId, Key>>,
}

impl LinkReader {
    pub fn new(settings: &super::super::Settings) -> crate::cni::Result<LinkReader> {
        Ok(LinkReader {
            node: settings.node.clone(),
            boot_id: crate::host::boot_id()?,
            store: settings.store.clone(),
            cni_conf_dir: settings.cni_conf_dir.clone(),
            per_peer: settings.metrics_per_peer,
            totals: tokio::sync::Mutex::new(Totals::default()),
        })
    }

    /// Every live link of this node, read.
    pub async fn read(&self) -> Vec<Series> {
        let mut totals = self.totals.lock().await;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + SCRAPE_DEADLINE;
        let (node, boot_id) = (self.node.clone(), self.boot_id.clone());
        let (store, conf_dir) = (self.store.clone(), self.cni_conf_dir.clone());
        let listing = tokio::task::spawn_blocking(move || list(&store, &conf_dir, &node, &boot_id));
        let listed = match tokio::time::timeout_at(deadline, listing).await {
            Ok(Ok(listed)) => listed,
            _ => {
                tracing::warn!("a scrape could not list the store's links in time");
                Vec::new()
            }
        };
        let ids: HashSet<LinkId> = listed.iter().map(|l| l.id.clone()).collect();
        totals.retain(&ids);
        let mut series = Built::new(self.per_peer);
        // Each read goes into the series as it completes: a scrape holds a few links' peers
        // at a time, not every link's.
        let mut reads = futures::stream::iter(listed)
            .map(|link| async move {
                let until = (tokio::time::Instant::now() + READ_TIMEOUT).min(deadline);
                let read = read_link(&link);
                let peers = match tokio::time::timeout_at(until, read).await {
                    Ok(peers) => peers,
                    Err(_) => {
                        tracing::debug!(link = %link.id.interface, "a scrape's link read timed out");
                        None
                    }
                };
                (link, peers)
            })
            .buffer_unordered(PARALLEL_READS);
        while let Some((link, peers)) = reads.next().await {
            series.add(&link, peers.as_deref(), &mut totals);
        }
        let mut took = Series::new(
            "wgcni_scrape_link_reads_seconds",
            "How long this scrape took to list and read the node's links",
            MetricType::Gauge,
        );
        took.push(Vec::new(), Value::Float(started.elapsed().as_secs_f64()));
        let mut all = series.into_series();
        all.push(took);
        // The devices' reads are freed now: off the async workers, hand them back.
        let _ = tokio::task::spawn_blocking(crate::agent::memory::release_freed).await;
        all
    }
}

/// The ready links of this boot in every network of the conf dir served from `store`.
fn list(
    store: &std::path::Path,
    conf_dir: &std::path::Path,
    node: &str,
    boot_id: &str,
) -> Vec<Listed> {
    let networks = super::super::config::read_networks(conf_dir, store).unwrap_or_default();
    let mut listed = Vec::new();
    for net in networks {
        let Ok(Some(store)) = Store::open_existing(&net.conf.store, &net.name, node) else {
            continue;
        };
        let gateway = store
            .gateway()
            .ok()
            .flatten()
            .filter(|gw| gw.boot_id == boot_id);
        let mut not_pods = NotPods {
            statics: net
                .conf
                .static_peers
                .iter()
                .filter_map(|p| Key::from_base64(&p.public_key).ok())
                .collect(),
            gateways: store
                .remote_gateways()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|gw| Key::from_base64(&gw.public_key).ok())
                .collect(),
        };
        not_pods.gateways.extend(
            gateway
                .iter()
                .filter_map(|gw| Key::from_base64(&gw.public_key).ok()),
        );
        let not_pods = std::sync::Arc::new(not_pods);
        // This node's directory only, read as is (no legacy name is migrated by a scrape).
        let records = store
            .records_in(&[node.to_string()], |_| true)
            .unwrap_or_default();
        for record in records
            .into_iter()
            .filter(|r| r.state == State::Ready && r.boot_id == boot_id)
        {
            let pod = record
                .pod
                .as_deref()
                .and_then(|p| p.split_once('/'))
                .map(|(ns, name)| (ns.to_string(), name.to_string()))
                .unwrap_or_default();
            listed.push(Listed {
                id: LinkId {
                    network: net.name.clone(),
                    interface: record.host_name.clone(),
                    container: record.container_id.clone(),
                },
                pod,
                backend: record.backend,
                target: Target::Pod(record),
                not_pods: not_pods.clone(),
            });
        }
        if let Some(gw) = gateway {
            listed.push(Listed {
                id: LinkId {
                    network: net.name.clone(),
                    interface: gw.host_name.clone(),
                    container: String::new(),
                },
                pod: Default::default(),
                backend: gw.backend,
                target: Target::Gateway(gw),
                not_pods,
            });
        }
    }
    listed
}

/// The link's peers, if its device answered and carries the recorded key.
async fn read_link(link: &Listed) -> Option<Vec<PeerRead>> {
    let (record_key, device) = match &link.target {
        Target::Pod(record) => {
            let record = record.clone();
            let key = record.public_key.clone();
            let read = tokio::task::spawn_blocking(move || {
                let pod = record.live_netns(None)?;
                wireguard::backend(record.backend)
                    .read(&record.link(Some(&pod)))
                    .ok()
            });
            (key, read.await.ok().flatten()?)
        }
        Target::Gateway(gw) => {
            let gw = gw.clone();
            let key = gw.public_key.clone();
            let read = tokio::task::spawn_blocking(move || {
                let host = crate::netns::Netns::host().ok()?;
                wireguard::backend(gw.backend).read(&gw.link(&host)).ok()
            });
            (key, read.await.ok().flatten()?)
        }
    };
    peers_of(&device, &record_key, &link.not_pods)
}

fn peers_of(device: &DeviceState, record_key: &str, not_pods: &NotPods) -> Option<Vec<PeerRead>> {
    // A device of that name with another key is not this link (a name reused).
    if device.public_key.as_ref().map(|k| k.to_base64()).as_deref() != Some(record_key) {
        return None;
    }
    Some(
        device
            .peers
            .iter()
            .map(|p| {
                let key = p.config.public_key.clone();
                PeerRead {
                    kind: not_pods.kind(p, &key),
                    key,
                    bytes: Bytes {
                        rx: p.stats.rx_bytes,
                        tx: p.stats.tx_bytes,
                    },
                    handshake: p
                        .stats
                        .last_handshake_time
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                }
            })
            .collect(),
    )
}

/// The series of one scrape, filled link by link.
struct Built {
    info: Series,
    up: Series,
    sent: Series,
    received: Series,
    peers: Series,
    handshake: Series,
    per_peer: Option<[Series; 3]>,
}

impl Built {
    fn new(per_peer: bool) -> Built {
        Built {
            info: Series::new(
                "wgcni_link_info",
                "This node's links (role: pod or gateway) and their WireGuard backend",
                MetricType::Gauge,
            ),
            up: Series::new(
                "wgcni_link_up",
                "1 when the scrape read the link's device in time and it carries the recorded key",
                MetricType::Gauge,
            ),
            sent: Series::new(
                "wgcni_link_sent_bytes",
                "Bytes the link sent to its peers (peers gone keep counting)",
                MetricType::Counter,
            ),
            received: Series::new(
                "wgcni_link_received_bytes",
                "Bytes the link received from its peers (peers gone keep counting)",
                MetricType::Counter,
            ),
            peers: Series::new(
                "wgcni_link_peers",
                "The link's peers by kind: direct, pending, gateway, relay, static",
                MetricType::Gauge,
            ),
            handshake: Series::new(
                "wgcni_link_latest_handshake_seconds",
                "The link's newest handshake with any peer, as a Unix timestamp (0: none yet)",
                MetricType::Gauge,
            ),
            per_peer: per_peer.then(|| {
                [
                    Series::new(
                        "wireguard_sent_bytes",
                        "Bytes sent to the peer",
                        MetricType::Counter,
                    ),
                    Series::new(
                        "wireguard_received_bytes",
                        "Bytes received from the peer",
                        MetricType::Counter,
                    ),
                    Series::new(
                        "wireguard_latest_handshake_seconds",
                        "The peer's latest handshake as a Unix timestamp (0: none yet)",
                        MetricType::Gauge,
                    ),
                ]
            }),
        }
    }

    fn add(&mut self, link: &Listed, peers: Option<&[PeerRead]>, totals: &mut Totals<LinkId, Key>) {
        let identity = link.identity();
        let mut info = identity.clone();
        let role = match link.target {
            Target::Pod(_) => "pod",
            Target::Gateway(_) => "gateway",
        };
        info.push(("role", role.into()));
        info.push(("backend", link.backend.to_string()));
        self.info.push(info, Value::Int(1));
        self.up
            .push(identity.clone(), Value::Int(peers.is_some().into()));
        let Some(peers) = peers else {
            return;
        };
        let bytes = totals.update(
            &link.id,
            peers.iter().map(|p| (p.key.clone(), p.bytes)).collect(),
        );
        self.sent.push(identity.clone(), Value::Int(bytes.tx));
        self.received.push(identity.clone(), Value::Int(bytes.rx));
        for (kind, name) in KINDS {
            let mut labels = identity.clone();
            labels.push(("kind", name.into()));
            let count = peers.iter().filter(|p| p.kind == kind).count();
            self.peers.push(labels, Value::Int(count as u64));
        }
        let newest = peers.iter().filter_map(|p| p.handshake).max().unwrap_or(0);
        self.handshake.push(identity.clone(), Value::Int(newest));
        if let Some([sent, received, handshake]) = self.per_peer.as_mut() {
            for peer in peers {
                let mut labels = identity.clone();
                labels.push(("public_key", peer.key.to_base64()));
                sent.push(labels.clone(), Value::Int(peer.bytes.tx));
                received.push(labels.clone(), Value::Int(peer.bytes.rx));
                handshake.push(labels, Value::Int(peer.handshake.unwrap_or(0)));
            }
        }
    }

    fn into_series(self) -> Vec<Series> {
        let mut all = vec![
            self.info,
            self.up,
            self.sent,
            self.received,
            self.peers,
            self.handshake,
        ];
        all.extend(self.per_peer.into_iter().flatten());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use wireguard_control::{AllowedIp, PeerInfo, PeerStats};

    fn peer(key: &Key, ips: &[&str], rx: u64) -> PeerInfo {
        let mut peer = PeerInfo::from_public_key(key.clone());
        peer.config.allowed_ips = ips
            .iter()
            .map(|ip| ip.parse::<AllowedIp>().unwrap())
            .collect();
        peer.stats = PeerStats {
            last_handshake_time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + rx)),
            rx_bytes: rx,
            tx_bytes: 2 * rx,
        };
        peer
    }

    #[test]
    fn peers_are_told_apart_by_key_and_allowed_ips() {
        let own = KeyPair::generate().public().clone();
        let keys: Vec<_> = (0..6)
            .map(|_| KeyPair::generate().public().clone())
            .collect();
        let not_pods = NotPods {
            gateways: [&keys[0], &keys[1], &keys[2]]
                .into_iter()
                .cloned()
                .collect(),
            statics: [keys[3].clone()].into(),
        };
        let device = DeviceState {
            public_key: Some(own.clone()),
            peers: vec![
                peer(&keys[0], &["0.0.0.0/0"], 1), // own gateway
                peer(&keys[1], &["10.1.2.0/24", "10.250.0.12/32"], 2), // relay
                peer(&keys[2], &["10.250.0.13/32"], 3), // mesh gateway
                peer(&keys[3], &["192.0.2.0/24"], 4), // static
                peer(&keys[4], &["10.1.2.7/32"], 5), // direct pod
                peer(&keys[5], &[], 6),            // pending pod
            ],
            ..DeviceState::default()
        };
        let read = peers_of(&device, &own.to_base64(), &not_pods).unwrap();
        let kinds: Vec<PeerKind> = read.iter().map(|p| p.kind).collect();
        use PeerKind::*;
        assert_eq!(kinds, [Gateway, Relay, Gateway, Static, Direct, Pending]);
        assert_eq!(read[5].handshake, Some(1006));
        assert_eq!(read[5].bytes, Bytes { rx: 6, tx: 12 });
        // A device with another key is not the recorded link.
        let other = KeyPair::generate().public().to_base64();
        assert!(peers_of(&device, &other, &not_pods).is_none());
    }
}
