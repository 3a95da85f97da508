//! One network's loop: claim the subnet, hold the liveness lease (kept alive by a task of its
//! own), publish this node's records, keep the mirror and the index in step with etcd (list,
//! then watch) and send what changed to the reconciler thread, never waiting for it.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_client::Client;
use ipnetwork::IpNetwork;

use super::config::{Network, Settings};
use super::datastore::{Datastore, EtcdStore, EtcdWatch, Watch, Watched};
use super::directory::SharedDirectory;
use super::health::AgentStatus;
use super::index::Index;
use super::keys::Keys;
use super::liveness::Lease;
use super::metrics::{KeyWatch, Scope};
use super::mirror::{Mirror, NodeInfo};
use super::reconciler::{Files, Job, Reconciler, Work};
use super::{etcd, publish, subnet};
use crate::cni::config::NetConf;

/// Everything one network needs; one task, one loop: no locks between its parts.
pub(super) struct NetworkLoop {
    settings: Arc<Settings>,
    net: Network,
    /// `net.conf`, shared with the reconciler thread's jobs.
    conf: Arc<NetConf>,
    keys: Keys,
    client: Client,
    boot_id: String,
    network_dir: PathBuf,
    node_dir: PathBuf,
    status: Arc<AgentStatus>,
    reconciler: Reconciler,
    mirror: Mirror,
    /// The trusted remote records as last sent to the reconciler thread.
    index: Index,
    /// This node's attachments' keys as last published (rotations seen).
    local_keys: KeyWatch,
    /// The reconciler thread could not write a mirror file: read them all back.
    verify_wanted: Arc<AtomicBool>,
    subnets: Option<Vec<IpNetwork>>,
    /// The revision at which our claim was seen winning: the mirror is not up to date on our
    /// claim before it has seen that revision.
    claim_revision: i64,
    /// This agent instance's id (kept in the node's store directory).
    agent_id: String,
    /// Since when another agent's claim for this node name is seen without its node key.
    foreign_since: Option<Instant>,
    /// The subnets the node key on the current lease announces.
    announced: Vec<IpNetwork>,
    /// The node key's value as last put.
    announced_info: Vec<u8>,
    /// The address this node is reached at, as last detected.
    endpoint: Option<std::net::IpAddr>,
    lease: Option<Lease>,
    watch: Option<EtcdWatch>,
    synced: bool,
    /// The readiness marker for the plugin's STATUS is written (once per loop).
    ready_marked: bool,
    next_ready_try: Instant,
    next_subnet_try: Instant,
    next_lease_try: Instant,
    next_heartbeat: Instant,
    /// The lease a leased subnet's claim rides on (0: none), and when to renew it.
    claim_lease: i64,
    next_claim_renewal: Instant,
    next_sync_try: Instant,
    next_scan: Instant,
    next_reconcile: Instant,
    sync_delay: Duration,
}

impl NetworkLoop {
    pub(super) fn new(
        settings: Arc<Settings>,
        net: Network,
        client: Client,
        boot_id: String,
        status: Arc<AgentStatus>,
        reconciler: Reconciler,
        directory: SharedDirectory,
    ) -> NetworkLoop {
        let keys = Keys::new(&net.name);
        status.counters.network_served(&net.name);
        let network_dir = settings.store.join(&net.name);
        let node_dir = network_dir.join(&settings.node);
        let now = Instant::now();
        NetworkLoop {
            mirror: Mirror::new(keys.clone(), &settings.node, net.policy()),
            index: Index::new(net.conf.persistent_keepalive, net.conf.peering, directory),
            local_keys: KeyWatch::default(),
            verify_wanted: Arc::default(),
            network_dir,
            settings,
            conf: Arc::new(net.conf.clone()),
            net,
            keys,
            client,
            boot_id,
            node_dir,
            status,
            reconciler,
            subnets: None,
            claim_revision: 0,
            agent_id: String::new(),
            foreign_since: None,
            announced: Vec::new(),
            announced_info: Vec::new(),
            endpoint: None,
            lease: None,
            watch: None,
            synced: false,
            ready_marked: false,
            next_ready_try: now,
            next_subnet_try: now,
            next_lease_try: now,
            next_heartbeat: now,
            claim_lease: 0,
            next_claim_renewal: now,
            next_sync_try: now,
            next_scan: now,
            next_reconcile: now,
            sync_delay: Duration::from_millis(500),
        }
    }

    fn name(&self) -> &str {
        &self.net.name
    }

    /// Run until `stop` fires (the network left the conflists): then revoke the liveness
    /// lease, so the node key goes at once; the subnet claim and the records stay.
    pub(super) async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        crate::failpoint::panic_once("network-loop-panic");
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.node_dir)
        {
            tracing::error!(dir = %self.node_dir.display(), error = %e, "cannot create this node's store directory");
        }
        tracing::debug!(network = %self.net.name, prefixes = ?self.keys.node_write_prefixes(&self.settings.node), "this node's etcd role needs readwrite on these prefixes");
        let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(1);
        // This node's own record directory (never the mirror): any change triggers a publish
        // pass; the periodic scan publishes without inotify.
        let _watcher = super::dir_watch::watch_dir(&self.node_dir, "record directory", tx);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                asked = &mut stop => {
                    // Asked: the network left the conflists. A sender dropped unasked means
                    // the agent itself is stopping (or the loop is being replaced): the
                    // lease is then left to lapse, as after a crash.
                    if asked.is_ok() {
                        self.release().await;
                    }
                    return;
                }
                message = next_message(&mut self.watch) => self.on_watch(message).await,
                () = lease_lost(&mut self.lease) => self.lease = None,
                Some(()) = changes.recv() => {
                    // Let a burst of writes settle, then publish once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changes.try_recv().is_ok() {}
                    self.publish().await;
                }
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    async fn release(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let id = lease.id;
        drop(lease); // its keeper first
        match etcd::bounded(self.client.lease_revoke(id)).await {
            Ok(_) => {
                tracing::info!(network = %self.net.name, "no longer served: liveness lease revoked (the subnet claim stays)")
            }
            Err(e) => {
                tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "no longer served: the liveness lease lapses on its own")
            }
        }
    }

    /// Log a failure and show it on `/readyz`.
    fn failed(&self, what: &str, e: &anyhow::Error) {
        let text = format!("{what}: {e:#}");
        tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "{what}; retrying");
        self.status.error(&self.net.name, text);
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if self.subnets.is_none() && now >= self.next_subnet_try {
            self.claim_subnet().await;
        }
        if self.subnets.is_some() {
            if self.lease.is_none() && now >= self.next_lease_try {
                self.grant_lease().await;
            }
            if self.lease.is_some() && now >= self.next_heartbeat {
                self.heartbeat().await;
            }
            if self.claim_lease != 0 && now >= self.next_claim_renewal {
                self.renew_claim().await;
            }
        }
        if self.watch.is_none() && now >= self.next_sync_try {
            self.full_sync().await;
        }
        if now >= self.next_scan {
            self.publish().await;
        }
        if self
            .mirror
            .grace_expired(crate::host::now_unix(), self.settings.grace_period)
        {
            // Stale nodes cross the grace period on the clock, not on an event.
            self.mirror_changed(false).await;
        }
        if !self.ready_marked && now >= self.next_ready_try {
            self.mark_ready();
        }
        let verify = self.verify_wanted.swap(false, Ordering::Relaxed);
        if self.synced && (now >= self.next_reconcile || verify) {
            // Periodically: read the mirror back (someone may have touched it) and resync.
            self.mirror_changed(true).await;
        }
    }

    /// Once the network is ready as `/readyz` says (subnet known, lease held, first full sync
    /// done), tell the plugin: its STATUS answers 50 until this boot has the marker.
    fn mark_ready(&mut self) {
        let Some(status) = self.status.get(&self.net.name) else {
            return;
        };
        let (Some(subnets), None) = (status.subnets.as_ref(), status.not_ready()) else {
            return;
        };
        if crate::readiness::read(&self.node_dir).is_some_and(|m| m.boot_id == self.boot_id) {
            self.ready_marked = true;
            return;
        }
        let marker = crate::readiness::Marker::new(&self.boot_id, subnets, crate::host::now_unix());
        let written = serde_json::to_vec_pretty(&marker)
            .map_err(anyhow::Error::from)
            .and_then(|body| {
                subnet::write_atomic(&self.node_dir, crate::readiness::READY_FILE, &body)
            });
        match written {
            Ok(()) => {
                tracing::info!(network = %self.net.name, "ready: pods may be added (readiness marker written)");
                self.ready_marked = true;
            }
            Err(e) => {
                self.failed("writing the readiness marker", &e);
                self.next_ready_try = Instant::now() + Duration::from_secs(5);
            }
        }
    }

    async fn claim_subnet(&mut self) {
        if self.agent_id.is_empty() {
            match subnet::agent_id(&self.node_dir) {
                Ok(id) => self.agent_id = id,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot keep an agent id in the store");
                    self.next_subnet_try = Instant::now() + Duration::from_secs(5);
                    return;
                }
            }
        }
        // Another agent's claim for this node name is taken over only after its node key has
        // stayed away for a whole lease TTL (a starting competitor announces within that).
        let takeover = self.foreign_since.is_some_and(|since| {
            since.elapsed() > self.settings.lease_ttl + Duration::from_secs(1)
        });
        let previous = self.previous();
        let result = subnet::ensure_claim(
            &mut self.client,
            &self.keys,
            &self.settings.node,
            &self.net.mode,
            &self.agent_id,
            takeover,
            &self.net.policy(),
            &previous,
            self.settings.subnet_lease_ttl,
        )
        .await;
        match &result {
            Err(e) => match e.downcast_ref::<subnet::ForeignAgent>() {
                Some(foreign) if !foreign.alive => {
                    self.foreign_since.get_or_insert_with(Instant::now);
                }
                _ => self.foreign_since = None,
            },
            Ok(_) => self.foreign_since = None,
        }
        match result {
            Ok(settled) => {
                let subnets = settled.subnets;
                tracing::info!(network = %self.name(), subnets = ?subnets, "subnet known");
                self.claim_revision = settled.revision;
                self.claim_lease = settled.lease;
                self.next_claim_renewal = Instant::now() + self.claim_renewal_interval();
                if let Err(e) = subnet::write_subnet_file(&self.node_dir, &subnets, None) {
                    tracing::error!(error = %format!("{e:#}"), "writing subnet.json");
                }
                self.status.update(&self.net.name, |s| {
                    s.subnets = Some(subnets.clone());
                    s.subnet_error = None;
                });
                // The node key carries the subnets: re-announce when they changed; the
                // gateway follows them at the next resync, due now.
                if self.announced != subnets {
                    self.lease = None;
                    self.next_reconcile = Instant::now();
                }
                self.subnets = Some(subnets);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(network = %self.name(), error = %reason, "no usable subnet");
                if let Some(conflict) = e.downcast_ref::<subnet::Conflict>() {
                    // The plugin reads it there: ADD answers 11 and STATUS 50 with the reason.
                    let written = subnet::write_subnet_file(
                        &self.node_dir,
                        &conflict.subnets,
                        Some(reason.clone()),
                    );
                    if let Err(e) = written {
                        tracing::error!(error = %format!("{e:#}"), "writing subnet.json");
                    }
                }
                self.status
                    .update(&self.net.name, |s| s.subnet_error = Some(reason));
                let retry = if self.foreign_since.is_some() { 1 } else { 5 };
                self.next_subnet_try = Instant::now() + Duration::from_secs(retry);
            }
        }
    }

    /// What this node had before claiming: `subnet.json`'s subnets, and whether pods of this
    /// boot have addresses there.
    fn previous(&self) -> subnet::Previous {
        let live_pods = crate::store::Store::open_existing(
            &self.settings.store,
            &self.net.name,
            &self.settings.node,
        )
        .ok()
        .flatten()
        .and_then(|store| store.node_records().ok())
        .is_some_and(|records| records.iter().any(|r| r.boot_id == self.boot_id));
        subnet::Previous {
            subnets: subnet::read_subnet_file(&self.node_dir).map(|f| f.subnets),
            live_pods,
        }
    }

    fn claim_renewal_interval(&self) -> Duration {
        (self.settings.subnet_lease_ttl / 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(3600))
    }

    /// Keep a leased subnet's claim alive; a lease that is gone took the claim with it.
    async fn renew_claim(&mut self) {
        self.next_claim_renewal = Instant::now() + self.claim_renewal_interval();
        match subnet::renew(&mut self.client, self.claim_lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(network = %self.net.name, "the subnet claim's lease lapsed: claiming again");
                self.claim_lease = 0;
                self.subnets = None;
                self.status.update(&self.net.name, |s| s.subnets = None);
            }
            Err(e) => {
                self.failed("renewing the subnet claim's lease failed", &e);
                self.next_claim_renewal = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    fn local(&self) -> publish::Local {
        publish::scan_local(
            &self.node_dir,
            &self.net.name,
            &self.settings.node,
            &self.boot_id,
        )
    }

    /// The address other nodes reach this node at: the conflist's `endpoint`, else the source
    /// address of the default route, re-detected at every scan (a node whose address changes
    /// republishes it, and every mirror moves this node's records there).
    async fn detect_endpoint(&mut self) {
        let detected = match self.net.conf.endpoint {
            Some(ip) => Some(ip),
            None => tokio::task::spawn_blocking(crate::host::default_route)
                .await
                .ok()
                .and_then(|r| r.ok().flatten())
                .and_then(|route| route.source),
        };
        if detected.is_some() && detected != self.endpoint {
            tracing::info!(network = %self.net.name, address = ?detected, "node address detected");
            self.endpoint = detected;
        }
    }

    fn node_info(&self, local: &publish::Local) -> NodeInfo {
        // Without a detected address, the addresses this node's records were made with.
        let mut endpoints: Vec<std::net::IpAddr> = self.endpoint.into_iter().collect();
        let mut mtu = self.net.conf.mtu;
        for body in local.values() {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if self.endpoint.is_none()
                && let Some(ip) = value["endpoint"].as_str().and_then(|s| s.parse().ok())
                && !endpoints.contains(&ip)
            {
                endpoints.push(ip);
            }
            if let Some(m) = value["mtu"].as_u64() {
                mtu = Some(mtu.map_or(m as u32, |old| old.min(m as u32)));
            }
        }
        NodeInfo {
            endpoints,
            boot_id: self.boot_id.clone(),
            subnets: self.subnets.clone().unwrap_or_default(),
            mtu: mtu.unwrap_or(crate::host::FALLBACK_MTU),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            peering: self.net.conf.peering,
        }
    }

    /// The node's addresses are claimed before the node key names them (so another node
    /// cannot take one over in between), and the heartbeat starts with the lease.
    async fn claim_addresses(&mut self, info: &NodeInfo) -> Result<()> {
        publish::claim_endpoints(
            &mut self.client,
            &self.keys,
            &self.settings.node,
            &info.endpoints,
        )
        .await
    }

    fn heartbeat_interval(&self) -> Duration {
        // Staleness is read to this precision; the grace period is what it is compared with.
        (self.settings.grace_period / 10).clamp(self.keepalive_interval(), Duration::from_secs(60))
    }

    async fn heartbeat(&mut self) {
        match publish::heartbeat(&mut self.client, &self.keys, &self.settings.node).await {
            Ok(()) => self.next_heartbeat = Instant::now() + self.heartbeat_interval(),
            Err(e) => {
                tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "renewing the heartbeat failed; retrying");
                self.next_heartbeat = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Grant a lease and put the node key on it with all this node's link keys, in one
    /// transaction.
    async fn grant_lease(&mut self) {
        let ttl = self.settings.lease_ttl.as_secs().max(2) as i64;
        self.detect_endpoint().await;
        let local = self.local();
        let node_info = self.node_info(&local);
        let info = serde_json::to_vec(&node_info).expect("node info serializes");
        let result = async {
            self.claim_addresses(&node_info).await?;
            let id = etcd::bounded(self.client.lease_grant(ttl, None))
                .await?
                .id();
            let changed = publish::announce(
                &mut self.client,
                &self.keys,
                &self.settings.node,
                info.clone(),
                id,
                &local,
            )
            .await?;
            anyhow::Ok((id, changed))
        }
        .await;
        match result {
            Ok((id, changed)) => {
                self.announced = self.subnets.clone().unwrap_or_default();
                self.announced_info = info;
                tracing::info!(network = %self.name(), lease = id, links_changed = changed, "node key announced on a new lease");
                self.lease = Some(Lease::keep(
                    self.client.clone(),
                    id,
                    Duration::from_secs(ttl as u64),
                    self.net.name.clone(),
                    self.status.clone(),
                ));
                self.status.update(&self.net.name, |s| s.lease_held = true);
                self.heartbeat().await;
            }
            Err(e) => {
                self.failed("cannot grant the liveness lease", &e);
                self.next_lease_try = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    fn keepalive_interval(&self) -> Duration {
        (self.settings.lease_ttl / 3).max(Duration::from_millis(500))
    }

    async fn publish(&mut self) {
        self.next_scan = Instant::now() + self.settings.resync_interval;
        // Only the holder of this node name's claim speaks for the node (a second agent under
        // the same name must not replace the first one's records).
        if self.subnets.is_none() {
            return;
        }
        let local = self.local();
        let changed = self.local_keys.observe(publish::pod_keys(&local));
        self.status
            .counters
            .keys_changed(&self.net.name, Scope::Local, changed);
        match publish::publish(&mut self.client, &self.keys, &self.settings.node, &local).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(network = %self.net.name, changed = n, "published this node's records")
            }
            Err(e) => {
                self.failed("publishing failed", &e);
                self.next_scan = Instant::now() + Duration::from_secs(1);
                return;
            }
        }
        // The node's address and the MTU can change: refresh the node key when they do.
        self.detect_endpoint().await;
        let node_info = self.node_info(&local);
        let info = serde_json::to_vec(&node_info).expect("node info serializes");
        if self.lease.is_some() && info != self.announced_info {
            if let Err(e) = self.claim_addresses(&node_info).await {
                tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "claiming the node's addresses failed; retrying");
                self.next_scan = Instant::now() + Duration::from_secs(1);
                return;
            }
        }
        if let Some(lease) = self.lease.as_ref().filter(|_| info != self.announced_info) {
            let put = self.client.put(
                self.keys.node_info(&self.settings.node),
                info.clone(),
                Some(etcd_client::PutOptions::new().with_lease(lease.id)),
            );
            match etcd::bounded(put).await {
                Ok(_) => {
                    tracing::info!(network = %self.net.name, "node key updated");
                    self.announced_info = info;
                }
                Err(e) => {
                    tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "updating the node key failed; retrying");
                    self.next_scan = Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }

    /// List everything at one revision, replace the mirror (mark and sweep), then watch from
    /// the next revision.
    async fn full_sync(&mut self) {
        let prefix = self.keys.prefix().to_string();
        let mut store = EtcdStore {
            client: self.client.clone(),
        };
        let result = async {
            let (entries, revision) = store.list(&prefix).await?;
            let watch = store.watch(&prefix, revision + 1).await?;
            anyhow::Ok((entries, revision, watch))
        }
        .await;
        match result {
            Ok((entries, revision, watch)) => {
                tracing::info!(network = %self.net.name, keys = entries.len(), revision, "full sync");
                self.mirror.replace_all(entries, revision);
                self.watch = Some(watch);
                self.sync_delay = Duration::from_millis(500);
                self.synced = true;
                self.status.update(&self.net.name, |s| {
                    s.first_sync_done = true;
                    s.last_sync = Some(crate::host::now_unix());
                });
                self.mirror_changed(true).await;
            }
            Err(e) => {
                self.failed("listing etcd failed (the mirror stays as it is)", &e);
                self.next_sync_try = Instant::now() + self.sync_delay;
                self.sync_delay = (self.sync_delay * 2).min(Duration::from_secs(10));
            }
        }
    }

    /// Apply a watch delivery and every further one already waiting (a burst of events
    /// costs one evaluation), then re-evaluate once.
    async fn on_watch(&mut self, first: Watched) {
        use futures::FutureExt;
        let mut changed = false;
        let mut message = Some(first);
        let mut drained = 0;
        while let Some(next) = message.take() {
            match next {
                Watched::Restart { reason } => {
                    tracing::warn!(network = %self.net.name, %reason, "watch cancelled: re-listing");
                    self.watch = None;
                    self.next_sync_try = Instant::now();
                }
                Watched::Changes { revision, changes } => {
                    self.status
                        .counters
                        .watch_events(&self.net.name, changes.len());
                    changed |= self.mirror.apply(revision, &changes);
                    self.status.update(&self.net.name, |s| {
                        s.last_sync = Some(crate::host::now_unix())
                    });
                }
                Watched::Lost(e) => {
                    tracing::warn!(network = %self.net.name, error = %format!("{e:#}"), "watch lost: re-listing when etcd answers (nothing is removed meanwhile)");
                    self.watch = None;
                    self.next_sync_try = Instant::now() + self.sync_delay;
                }
            }
            drained += 1;
            if drained < 1000 {
                if let Some(watch) = self.watch.as_mut() {
                    // Cancel-safe: the select loop drops pending `next()` futures too.
                    message = watch.next().now_or_never();
                }
            }
        }
        if self.mirror.take_relist_wanted() {
            tracing::info!(network = %self.net.name, "a node whose records hit its cap changed its claim: re-listing");
            self.watch = None;
            self.next_sync_try = Instant::now();
        }
        // Applied events count even when the watch ended after them; a re-list follows.
        if changed {
            self.mirror_changed(false).await;
        }
    }

    /// Re-evaluate trust, take the index to the trusted set and send the reconciler thread
    /// what changed: files to write and one-peer changes. `full`: after a full sync or on the
    /// resync interval: the mirror files are read back and every link resynced.
    async fn mirror_changed(&mut self, full: bool) {
        let mut evaluation = self
            .mirror
            .evaluate(crate::host::now_unix(), self.settings.grace_period);
        let delta = self.index.update(std::mem::take(&mut evaluation.trusted));
        self.status
            .counters
            .keys_changed(&self.net.name, Scope::Remote, delta.keys_changed);
        let stale = evaluation.stale.clone();
        let refused = self.mirror.refusals().clone();
        let peers = self.index.peers();
        self.status.update(&self.net.name, |s| {
            s.stale_nodes = stale;
            s.refused = refused;
            s.remote_peers = peers;
        });
        if let Some(other) = evaluation.own_claim_agent.as_ref().filter(|a| {
            self.subnets.is_some()
                && **a != self.agent_id
                && self.mirror.revision() >= self.claim_revision
        }) {
            tracing::error!(network = %self.net.name, agent = %other, "another agent took over this node name's subnet claim: this agent stops speaking for the node");
            self.subnets = None;
            self.status.update(&self.net.name, |s| s.subnets = None);
        }
        match evaluation.own_claim_wins {
            Some(false) => {
                self.status.update(&self.net.name, |s| {
                    s.subnet_error =
                        Some("this node's subnet claim loses to an older overlapping claim".into())
                });
                if self.subnets.is_some() {
                    tracing::error!(network = %self.net.name, "this node's subnet claim loses to an older overlapping claim: every record of this node is ignored");
                    self.subnets = None;
                    self.status.update(&self.net.name, |s| s.subnets = None);
                }
            }
            None if self.subnets.is_some() && self.mirror.revision() >= self.claim_revision => {
                tracing::warn!(network = %self.net.name, "this node's subnet claim disappeared from etcd: claiming again");
                self.subnets = None;
                self.status.update(&self.net.name, |s| s.subnets = None);
            }
            _ => {}
        }
        // Only after a complete sync may the reconciler act on (and remove) peers.
        if !self.synced || !self.status.first_sync_done(&self.net.name) {
            return;
        }
        self.index.mark_complete();
        let (files, work) = if full {
            self.next_reconcile = Instant::now() + self.settings.resync_interval;
            (Files::Verify(self.index.snapshot()), Work::Resync)
        } else if delta.is_empty() {
            return;
        } else {
            (Files::Changes(delta.files), Work::Changes(delta.peers))
        };
        self.reconciler.send(Job {
            conf: self.conf.clone(),
            network_dir: self.network_dir.clone(),
            files,
            work,
            verify_wanted: self.verify_wanted.clone(),
            directory: self.index.directory(),
        });
    }
}

async fn lease_lost(lease: &mut Option<Lease>) {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

async fn next_message(watch: &mut Option<EtcdWatch>) -> Watched {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
