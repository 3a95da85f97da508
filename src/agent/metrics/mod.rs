//! `/metrics`: the agent's Prometheus series, in the Prometheus text format (0.0.4) through
//! `prometheus-client`. Three sources: counters and histograms the agent's parts bump as they
//! work (`Counters`, kept in `AgentStatus`), what `/readyz` also reports (per network: records
//! mirrored and refused, last sync), and this node's links, read at each scrape (`links`).

mod links;
mod totals;

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::health::AgentStatus;

pub use links::LinkReader;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A series' labels, in order; a label without a value is left out.
pub type Labels = Vec<(&'static str, String)>;

type ByNetwork = Family<Labels, Counter>;

fn network(name: &str) -> Labels {
    vec![("network", name.to_string())]
}

/// Where a key change was observed: one of this node's attachments, or another node's.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    Local,
    Remote,
}

/// Each attachment's public key as last seen, to count the changes (`Scope::Local`: this
/// node's records, scanned before each publish).
#[derive(Debug, Default)]
pub struct KeyWatch {
    keys: std::collections::HashMap<String, String>,
}

impl KeyWatch {
    /// Take in every attachment's current key (attachments absent are forgotten: a pod that
    /// went and came back under its name is a new pod); answer how many changed.
    pub fn observe(&mut self, current: impl IntoIterator<Item = (String, String)>) -> usize {
        let current: std::collections::HashMap<String, String> = current.into_iter().collect();
        let changed = current
            .iter()
            .filter(|(attachment, key)| self.keys.get(*attachment).is_some_and(|k| k != *key))
            .count();
        self.keys = current;
        changed
    }
}

fn rotation_labels(network_name: &str, scope: Scope) -> Labels {
    let mut labels = network(network_name);
    let scope = match scope {
        Scope::Local => "local",
        Scope::Remote => "remote",
    };
    labels.push(("scope", scope.into()));
    labels
}

/// What the agent counts as it works. Cheap to clone (the families are shared); every method
/// is a few atomic operations, fine on any path.
#[derive(Debug, Clone)]
pub struct Counters {
    watch_events: ByNetwork,
    reconciles: Family<Labels, Histogram, fn() -> Histogram>,
    lease_losses: ByNetwork,
    promoted: ByNetwork,
    trimmed: ByNetwork,
    rotations: ByNetwork,
}

fn reconcile_histogram() -> Histogram {
    // 1 ms to ~33 s: a one-peer change takes milliseconds, a resync of thousands of peers
    // seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            watch_events: Family::default(),
            reconciles: Family::new_with_constructor(reconcile_histogram),
            lease_losses: Family::default(),
            promoted: Family::default(),
            trimmed: Family::default(),
            rotations: Family::default(),
        }
    }
}

impl Counters {
    /// A network is served: its series start at 0 (an absent series has no first increase).
    pub fn network_served(&self, network_name: &str) {
        let labels = network(network_name);
        for family in [
            &self.watch_events,
            &self.lease_losses,
            &self.promoted,
            &self.trimmed,
        ] {
            drop(family.get_or_create(&labels));
        }
        for work in ["changes", "resync"] {
            let mut labels = labels.clone();
            labels.push(("work", work.into()));
            drop(self.reconciles.get_or_create(&labels));
        }
        for scope in [Scope::Local, Scope::Remote] {
            drop(
                self.rotations
                    .get_or_create(&rotation_labels(network_name, scope)),
            );
        }
    }

    /// A watch delivery of `events` key changes was applied to the mirror.
    pub fn watch_events(&self, network_name: &str, events: usize) {
        self.watch_events
            .get_or_create(&network(network_name))
            .inc_by(events as u64);
    }

    /// The reconciler thread ran one job (`resync`: whole peer sets; else one-peer changes).
    pub fn reconciled(&self, network_name: &str, resync: bool, took: Duration) {
        let mut labels = network(network_name);
        labels.push(("work", if resync { "resync" } else { "changes" }.into()));
        self.reconciles
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The network's liveness lease was lost (the agent grants a new one).
    pub fn lease_lost(&self, network_name: &str) {
        self.lease_losses
            .get_or_create(&network(network_name))
            .inc();
    }

    /// The promoter routed a pair's traffic onto a direct peer.
    pub fn direct_promoted(&self, network_name: &str) {
        self.promoted.get_or_create(&network(network_name)).inc();
    }

    /// The promoter removed a direct peer (idle, or its remote end gone).
    pub fn direct_trimmed(&self, network_name: &str) {
        self.trimmed.get_or_create(&network(network_name)).inc();
    }

    /// `count` attachments were seen with another public key than before.
    pub fn keys_changed(&self, network_name: &str, scope: Scope, count: usize) {
        if count > 0 {
            self.rotations
                .get_or_create(&rotation_labels(network_name, scope))
                .inc_by(count as u64);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "wgcni_watch_events",
            "Key changes the etcd watch delivered and the mirror applied",
            self.watch_events.clone(),
        );
        registry.register(
            "wgcni_reconcile_duration_seconds",
            "Jobs of the reconciler thread (work: changes or resync) and how long each took",
            self.reconciles.clone(),
        );
        registry.register(
            "wgcni_lease_losses",
            "Times the network's liveness lease was lost",
            self.lease_losses.clone(),
        );
        registry.register(
            "wgcni_direct_peers_promoted",
            "On-demand pairs whose traffic moved from the relay onto a direct peer",
            self.promoted.clone(),
        );
        registry.register(
            "wgcni_direct_peers_trimmed",
            "On-demand direct peers removed (idle, or their remote pod gone)",
            self.trimmed.clone(),
        );
        registry.register(
            "wgcni_key_rotations_observed",
            "Attachments seen with a new public key (scope: local or remote)",
            self.rotations.clone(),
        );
    }
}

/// A value of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

/// One metric family built at scrape time: its samples are encoded as they are.
#[derive(Debug)]
pub struct Series {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    pub samples: Vec<(Labels, Value)>,
}

impl Series {
    pub fn new(name: &'static str, help: &'static str, kind: MetricType) -> Series {
        Series {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, labels: Labels, value: Value) {
        self.samples.push((labels, value));
    }
}

/// Series built for one scrape, encoded once.
#[derive(Debug)]
struct Built(Vec<Series>);

impl Collector for Built {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for series in &self.0 {
            let mut metric =
                encoder.encode_descriptor(series.name, series.help, None, series.kind)?;
            for (labels, value) in &series.samples {
                let labels: Labels = labels
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .cloned()
                    .collect();
                let mut sample = metric.encode_family(&labels)?;
                match (series.kind, value) {
                    (MetricType::Counter, Value::Int(v)) => {
                        sample.encode_counter::<NoLabelSet, _, u64>(v, None)?
                    }
                    (MetricType::Counter, Value::Float(v)) => {
                        sample.encode_counter::<NoLabelSet, _, f64>(v, None)?
                    }
                    (_, Value::Int(v)) => sample.encode_gauge(v)?,
                    (_, Value::Float(v)) => sample.encode_gauge(v)?,
                }
            }
        }
        Ok(())
    }
}

/// Per network, what `/readyz` also says.
fn network_series(status: &AgentStatus) -> Vec<Series> {
    let now = crate::host::now_unix();
    let mut ready = Series::new(
        "wgcni_network_ready",
        "1 when the network is ready as /readyz says (subnet, lease, first sync)",
        MetricType::Gauge,
    );
    let mut mirrored = Series::new(
        "wgcni_records_mirrored",
        "Other nodes' records (pods and gateways) trusted and mirrored",
        MetricType::Gauge,
    );
    let mut refused = Series::new(
        "wgcni_records_refused",
        "What other nodes published and the membership layer refused, by reason (each key version once)",
        MetricType::Counter,
    );
    let mut stale = Series::new(
        "wgcni_stale_nodes",
        "Other nodes whose liveness lease lapsed (their pods stay peers for the grace period)",
        MetricType::Gauge,
    );
    let mut sync_age = Series::new(
        "wgcni_last_sync_age_seconds",
        "Seconds since the mirror last matched etcd (a full list or an applied watch event)",
        MetricType::Gauge,
    );
    for (name, s) in status.networks() {
        let labels = network(&name);
        ready.push(labels.clone(), Value::Int(s.not_ready().is_none().into()));
        mirrored.push(labels.clone(), Value::Int(s.remote_peers as u64));
        stale.push(labels.clone(), Value::Int(s.stale_nodes.len() as u64));
        for (reason, count) in &s.refused {
            let mut labels = labels.clone();
            labels.push(("reason", reason.label().into()));
            refused.push(labels, Value::Int(*count));
        }
        if let Some(at) = s.last_sync {
            sync_age.push(labels, Value::Int(now.saturating_sub(at)));
        }
    }
    vec![ready, mirrored, refused, stale, sync_age]
}

/// The whole answer to a scrape: the counters, the networks' state and `links` (read by
/// `LinkReader::read`).
pub fn render(status: &AgentStatus, links: Vec<Series>) -> String {
    let mut registry = Registry::default();
    status.counters.register(&mut registry);
    let mut series = network_series(status);
    series.extend(links);
    registry.register_collector(Box::new(Built(series)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::membership::Refusal;

    #[test]
    fn a_key_change_of_one_attachment_counts_once() {
        let mut watch = KeyWatch::default();
        let keys = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, k)| (a.to_string(), k.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(watch.observe(keys(&[("a", "k1"), ("b", "k2")])), 0);
        assert_eq!(watch.observe(keys(&[("a", "k1"), ("b", "k3")])), 1);
        assert_eq!(watch.observe(keys(&[("a", "k1"), ("b", "k3")])), 0);
        assert_eq!(watch.observe(keys(&[("a", "k1")])), 0, "b went");
        assert_eq!(
            watch.observe(keys(&[("a", "k1"), ("b", "k4")])),
            0,
            "a new b"
        );
    }

    #[test]
    fn counters_and_network_state_render_as_prometheus_text() {
        let status = AgentStatus::default();
        status.update("net", |s| {
            s.remote_peers = 7;
            s.refused.insert(Refusal::RecordAddressTaken, 2);
            s.last_sync = Some(crate::host::now_unix());
        });
        status.counters.watch_events("net", 3);
        status
            .counters
            .reconciled("net", true, Duration::from_millis(3));
        status.counters.keys_changed("net", Scope::Remote, 1);
        status.counters.keys_changed("net", Scope::Local, 0);
        let mut links = Series::new("wgcni_link_up", "test", MetricType::Gauge);
        links.push(
            vec![("network", "net".into()), ("pod", String::new())],
            Value::Int(1),
        );
        let text = render(&status, vec![links]);
        for line in [
            "# TYPE wgcni_watch_events_total counter",
            "wgcni_watch_events_total{network=\"net\"} 3",
            "wgcni_reconcile_duration_seconds_count{network=\"net\",work=\"resync\"} 1",
            "wgcni_key_rotations_observed_total{network=\"net\",scope=\"remote\"} 1",
            "wgcni_records_mirrored{network=\"net\"} 7",
            "wgcni_records_refused_total{network=\"net\",reason=\"record_address_taken\"} 2",
            "wgcni_last_sync_age_seconds{network=\"net\"} 0",
            "wgcni_network_ready{network=\"net\"} 0",
            // An empty label is left out.
            "wgcni_link_up{network=\"net\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("scope=\"local\""),
            "a zero count adds no series"
        );
        // A served network's counters are there from the start.
        status.counters.network_served("other");
        let text = render(&status, Vec::new());
        for line in [
            "wgcni_lease_losses_total{network=\"other\"} 0",
            "wgcni_key_rotations_observed_total{network=\"other\",scope=\"local\"} 0",
            "wgcni_reconcile_duration_seconds_count{network=\"other\",work=\"changes\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }
}
