//! The shared key store: one JSON record per attachment under
//! `<store>/<network>/<node>/<containerID>:<ifname>.json`, a network-wide lock, atomic writes.
//! ':' is in neither alphabet (container IDs and interface names are validated), so two
//! attachments can never share a file; every read also checks the record's own identity.
//! Only public material is stored. The directory is an interface to the outside (a node agent
//! may sync other nodes' records into it), so nothing here assumes it is the only writer.

mod cache;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cni::{Error, IoContext, Peering, Result};
use crate::netns::Netns;
use crate::wireguard::{BackendKind, LinkRef};
use cache::{FileIdentity, RecordCache};

pub const SCHEMA_VERSION: u32 = 1;

/// Readers accept the schema they write and the next one: a cluster upgrades node by node, so
/// a record written by a newer plugin or agent must still be peered (its unknown fields are
/// ignored, new fields are optional). The schema after that is refused.
pub fn is_readable_schema(schema: u32) -> bool {
    schema == SCHEMA_VERSION || schema == SCHEMA_VERSION + 1
}
const LOCK_FILE: &str = ".lock";
/// Shared by the ADDs under way, taken whole by GC (see `Store::adding`).
const ADDING_FILE: &str = ".adding";
/// In a node's directory: the local links a fan-out could not update (see `note_out_of_step`).
const OUT_OF_STEP_FILE: &str = ".out-of-step.json";
/// In a node's directory: the boot in which no record of an earlier boot was left
/// (`note_earlier_boots_cleared`).
const CLEARED_BOOT_FILE: &str = ".cleared-boot.json";
/// In a node's directory: when the agent last saw data on each on-demand direct peer
/// (`DirectActivity`), for `wg-cni show`.
const DIRECT_ACTIVITY_FILE: &str = ".direct-activity.json";
const TEMP_PREFIX: &str = ".tmp-";
/// An attachment's lock file: `.lock-<containerID>:<ifname>`, never `.json` (a lock is no
/// record). Releases before this name added a record's `.json`; GC removes those.
const ATTACHMENT_LOCK_PREFIX: &str = ".lock-";
/// Never a pod record's name: those always hold a ':' between container ID and ifname.
const GATEWAY_FILE: &str = "gateway.json";
/// The agent's description of a remote node in its mirror directory.
const NODE_FILE: &str = "node.json";
/// In the network's directory: every mirrored node's `node.json` in one file (`NodesFile`),
/// written by the agent beside the mirror directories.
pub const NODES_FILE: &str = "nodes.json";
/// The most a record file may hold.
const RECORD_LIMIT: u64 = 64 * 1024;
/// The most `NODES_FILE` may hold (a node takes ~250 bytes).
const NODES_FILE_LIMIT: u64 = 16 * 1024 * 1024;
/// Between container ID and ifname in a record's name: a character neither may contain.
const SEPARATOR: char = ':';

/// `creating` while an ADD is in flight (the public key is already known, so a DEL after a
/// crash can prove which link is ours); `ready` once the attachment is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Creating,
    /// The link is built (in the pod, addressed, up) and waits to join the network under the
    /// lock (`commands::join`): the ADD that joins next takes it along.
    Joining,
    Ready,
    /// DEL under way: the link is being torn down outside the network lock.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub schema: u32,
    pub state: State,
    pub network: String,
    pub node: String,
    pub container_id: String,
    pub ifname: String,
    /// `namespace/name` from CNI_ARGS when a runtime sends it (for people reading `show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// base64, as `wg show` prints it.
    pub public_key: String,
    /// While `wg-cni rotate` replaces the key: the key the link is about to get (the link
    /// carries one of the two). Local only (`Record::public` drops it), so another node can
    /// never plant a key through it; only this node's records are read for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// The key the last rotation replaced, until the next one: the other local links drop it
    /// (a rotation killed before it told them all leaves it there). Local only, like
    /// `next_public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_public_key: Option<String>,
    /// When the link got `public_key` (Unix seconds), when a rotation gave it; else
    /// `created_at` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created_at: Option<u64>,
    pub addresses: Vec<IpNetwork>,
    /// The node address peers send this pod's UDP to.
    pub endpoint: IpAddr,
    pub listen_port: u16,
    /// Local only (`Record::public` empties it): other nodes need not know the pod's namespace.
    #[serde(default)]
    pub netns: PathBuf,
    #[serde(default)]
    pub netns_inode: u64,
    pub boot_id: String,
    /// The name the link had when created in the host namespace (the userspace daemon's
    /// UAPI socket keeps this name); equal to `ifname` for the kernel backend.
    pub host_name: String,
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_pid: Option<u32>,
    pub mtu: u32,
    pub created_at: u64,
}

impl Record {
    pub fn endpoint_addr(&self) -> SocketAddr {
        SocketAddr::new(self.endpoint, self.listen_port)
    }

    pub fn file_name(container_id: &str, ifname: &str) -> String {
        format!("{container_id}{SEPARATOR}{ifname}.json")
    }

    /// The name versions before 0.2 used: ambiguous (`a-b` + `eth0` = `a` + `b-eth0`), so it
    /// is only read when the record inside names this very attachment, and then migrated.
    fn legacy_file_name(container_id: &str, ifname: &str) -> String {
        format!("{container_id}-{ifname}.json")
    }

    /// Where this attachment's link is, for a backend; `pod` must be the recorded namespace.
    pub fn link<'a>(&'a self, pod: Option<&'a Netns>) -> LinkRef<'a> {
        LinkRef {
            host_name: &self.host_name,
            ifname: &self.ifname,
            pod,
            daemon_pid: self.daemon_pid,
        }
    }

    /// The pod namespace of this record, only if it is still the very namespace recorded (a
    /// path like /proc/<pid>/ns/net can be reused by another pod). `hint` is tried first.
    pub fn live_netns(&self, hint: Option<&Path>) -> Option<Netns> {
        let candidates = hint
            .into_iter()
            .chain(std::iter::once(self.netns.as_path()));
        for path in candidates {
            if let Ok(ns) = Netns::open(path)
                && ns.inode() == self.netns_inode
            {
                return Some(ns);
            }
        }
        None
    }

    /// Every key the attachment's link may carry or other links may still hold for it: the
    /// current one, and while or after a rotation the next or the previous one. DEL and GC
    /// prove a link ours by any of them and withdraw all of them.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.public_key.as_str())
            .chain(self.next_public_key.as_deref())
            .chain(self.previous_public_key.as_deref())
    }

    /// When the link got its current key (Unix seconds).
    pub fn key_since(&self) -> u64 {
        self.key_created_at.unwrap_or(self.created_at)
    }

    pub fn is_attachment(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }

    /// What other nodes may learn: the record without the pod's namespace and the daemon's PID.
    /// `netns` and `netnsInode` stay present (empty, 0) because readers of schema 1 before
    /// 0.2 require them; readers since tolerate their absence.
    pub fn public(&self) -> Record {
        Record {
            netns: PathBuf::new(),
            netns_inode: 0,
            daemon_pid: None,
            next_public_key: None,
            previous_public_key: None,
            ..self.clone()
        }
    }
}

/// What this node's plugin needs of another node, from the mirror's `node.json` (written by
/// the agent after the membership layer accepted it; see `agent::mirror::NodeFile`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNode {
    /// The node's addresses as accepted.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
    /// The subnets its claim owns.
    #[serde(default)]
    pub subnets: Vec<IpNetwork>,
    #[serde(default = "mesh")]
    pub peering: Peering,
    /// The MTU it publishes (the network's links agree on the smallest).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Its agent is silent (its records stay for the grace period).
    #[serde(default)]
    pub stale: bool,
}

impl Default for RemoteNode {
    fn default() -> RemoteNode {
        RemoteNode {
            endpoints: Vec::new(),
            subnets: Vec::new(),
            peering: Peering::Mesh,
            mtu: None,
            stale: false,
        }
    }
}

/// `<network>/nodes.json`: the `node.json` of every node the agent mirrors, by node name, in
/// one file, so that a command learns every node's mode and addresses with one read instead
/// of one per node. Written by the agent's mirror writer (`agent::mirror_files`) right after
/// the `node.json` files themselves, atomically. A node directory it does not name (an older
/// agent, records written by hand, a node mirrored a moment ago) is read from its own
/// `node.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesFile<T> {
    pub schema: u32,
    pub nodes: BTreeMap<String, T>,
}

/// What the agent last saw of a direct peer's traffic: the counters as they were when they
/// last moved, and when (Unix seconds). Counters still equal to these mean the peer has been
/// idle since `last_active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerActivity {
    pub last_active: u64,
    pub rx: u64,
    pub tx: u64,
}

/// Direct peers' activity by attachment (`attachment_id`), then peer public key.
pub type DirectActivity = BTreeMap<String, BTreeMap<String, PeerActivity>>;

/// An attachment's name in `DirectActivity`: `<containerID>:<ifname>`.
pub fn attachment_id(container_id: &str, ifname: &str) -> String {
    format!("{container_id}{SEPARATOR}{ifname}")
}

fn mesh() -> Peering {
    Peering::Mesh
}

/// The public record of this node's gateway link for a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRecord {
    pub schema: u32,
    pub network: String,
    pub node: String,
    pub public_key: String,
    /// The gateway's own addresses (full-length prefixes) on its host link.
    pub addresses: Vec<IpNetwork>,
    /// This node's pod ranges.
    pub subnets: Vec<IpNetwork>,
    /// The network's whole pod range over all nodes (`clusterRange`), when set: the host routes
    /// it into the gateway and hairpin SNAT matches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ranges: Vec<IpNetwork>,
    pub endpoint: IpAddr,
    pub listen_port: u16,
    pub host_name: String,
    pub backend: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_pid: Option<u32>,
    pub boot_id: String,
    pub mtu: u32,
    pub masquerade: bool,
    /// The network's peering: an on-demand gateway also logs relayed flows for the agent
    /// (`nat::relay_watch_rules`). Records written before it read as mesh; the next ensure
    /// brings the gateway in line.
    #[serde(default = "mesh", skip_serializing_if = "is_mesh")]
    pub peering: Peering,
    pub created_at: u64,
}

fn is_mesh(peering: &Peering) -> bool {
    *peering == Peering::Mesh
}

impl GatewayRecord {
    /// What the host routes into the gateway: the cluster range, or this node's ranges.
    pub fn routed(&self) -> &[IpNetwork] {
        match self.cluster_ranges.is_empty() {
            true => &self.subnets,
            false => &self.cluster_ranges,
        }
    }

    /// What other nodes may learn: the record without the daemon's PID.
    pub fn public(&self) -> GatewayRecord {
        GatewayRecord {
            daemon_pid: None,
            ..self.clone()
        }
    }

    pub fn link<'a>(&'a self, host: &'a Netns) -> LinkRef<'a> {
        LinkRef {
            host_name: &self.host_name,
            ifname: &self.host_name,
            pod: Some(host),
            daemon_pid: self.daemon_pid,
        }
    }
}

/// One network's directory in the store, seen from one node.
pub struct Store {
    network_dir: PathBuf,
    node: String,
    cache: RecordCache,
}

/// A lock on one of the store's lock files: the network's (held while ADD, DEL or GC changes
/// it), the adding gate, or one attachment's. Dropping it unlocks.
pub struct StoreLock {
    _lock: Flock<File>,
}

impl StoreLock {
    /// Whether `path` still names the file this lock holds (not removed, nor replaced).
    fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self._lock.metadata(), fs::symlink_metadata(path)) {
            (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
            _ => false,
        }
    }
}

/// One attachment's lock (`Store::attachment_lock`). Dropping it removes its file, then
/// unlocks: however the ADD or DEL that held it ends (done, or failed), it leaves no file. Only
/// a killed process leaves one, which the next DEL of the attachment, or GC, removes.
pub struct AttachmentLock {
    lock: StoreLock,
    path: PathBuf,
}

impl AttachmentLock {
    /// The descriptor that holds the lock (handed down to the IPAM plugin).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.lock._lock.as_fd()
    }
}

impl Drop for AttachmentLock {
    /// Unlinked while still locked: a process waiting on the old file finds, once it has the
    /// lock, that the path no longer names its file, and locks the path anew
    /// (`Store::attachment_lock`), so two holders never overlap.
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Store {
    /// Open (creating with mode 0700 where missing) `<root>/<network>/<node>`.
    pub fn open(root: &Path, network: &str, node: &str) -> Result<Store> {
        let network_dir = root.join(network);
        for dir in [
            root.to_path_buf(),
            network_dir.clone(),
            network_dir.join(node),
        ] {
            ensure_private_dir(&dir)?;
        }
        Ok(Store {
            network_dir,
            node: node.to_string(),
            cache: RecordCache::default(),
        })
    }

    /// Open for reading only: `None` when the network has no directory yet.
    pub fn open_existing(root: &Path, network: &str, node: &str) -> Result<Option<Store>> {
        let network_dir = root.join(network);
        match fs::symlink_metadata(&network_dir) {
            Ok(meta) if meta.is_dir() => Ok(Some(Store {
                network_dir,
                node: node.to_string(),
                cache: RecordCache::default(),
            })),
            Ok(_) => Err(not_a_directory(&network_dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                context: format!("reading the key store at {}", network_dir.display()),
                source: e,
            }),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn network(&self) -> &str {
        self.network_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// `wgc` + 12 hex digits of (store, network, node, attachment): the userspace link's name
    /// in the host namespace (and its UAPI socket's), deterministic so a DEL after a crash
    /// finds link and daemon, distinct across stores and nodes, at most 15 bytes.
    pub fn pod_link_name(&self, container_id: &str, ifname: &str) -> String {
        let key = format!("{}\0{container_id}\0{ifname}", self.scope());
        format!(
            "wgc{:012x}",
            crate::gateway::fnv1a(key.as_bytes()) & 0xffff_ffff_ffff
        )
    }

    /// What names derived for this store's links hash: store path, network and node, so two
    /// stores (or two simulated nodes) on one host never derive the same name.
    pub fn scope(&self) -> String {
        format!("{}\0{}", self.network_dir.display(), self.node)
    }

    fn node_dir(&self) -> PathBuf {
        self.network_dir.join(&self.node)
    }

    /// Take the network-wide lock. The fd is O_CLOEXEC (std's default), so a daemon we start
    /// never inherits it.
    pub fn lock(&self) -> Result<StoreLock> {
        self.flock(LOCK_FILE, FlockArg::LockExclusive)
    }

    /// Held by every ADD from start to end, shared with the other ADDs: an ADD builds its
    /// link before it takes the network lock to join, and GC (which takes this whole, before
    /// the network lock) must not judge an attachment that is still being made.
    pub fn adding(&self) -> Result<StoreLock> {
        self.flock(ADDING_FILE, FlockArg::LockShared)
    }

    /// Wait until no ADD is under way, and keep new ones waiting (GC).
    pub fn no_adding(&self) -> Result<StoreLock> {
        self.flock(ADDING_FILE, FlockArg::LockExclusive)
    }

    /// One attachment's own lock, in this node's directory. ADD holds it throughout and hands
    /// it down to the IPAM plugin (`Ipam::add`); DEL takes it first. A DEL after an ADD that
    /// was killed while its IPAM plugin ran thus waits for that plugin to finish: otherwise
    /// the plugin could reserve an address after the DEL released none.
    /// `None` when this node has no directory in the network (nothing of it to wait for).
    pub fn attachment_lock(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AttachmentLock>> {
        if !self.node_dir().is_dir() {
            return Ok(None);
        }
        let name = format!("{ATTACHMENT_LOCK_PREFIX}{container_id}{SEPARATOR}{ifname}");
        let path = self.node_dir().join(name);
        // The holder before us may have removed the file we waited on (see the Drop): then
        // the lock we got is on a file nobody else will find, and the path is locked anew.
        for _ in 0..100 {
            let lock = self.flock_at(&path, FlockArg::LockExclusive)?;
            if lock.is_at(&path) {
                return Ok(Some(AttachmentLock { lock, path }));
            }
        }
        Err(Error::Io {
            context: format!("locking {}", path.display()),
            source: std::io::Error::other("its lock file kept being replaced"),
        })
    }

    fn flock(&self, name: &str, how: FlockArg) -> Result<StoreLock> {
        self.flock_at(&self.network_dir.join(name), how)
    }

    fn flock_at(&self, path: &Path, how: FlockArg) -> Result<StoreLock> {
        let path = path.to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .io(|| format!("opening the store lock {}", path.display()))?;
        let lock = Flock::lock(file, how).map_err(|(_, errno)| Error::Io {
            context: format!("locking {}", path.display()),
            source: errno.into(),
        })?;
        Ok(StoreLock { _lock: lock })
    }

    /// Every record of the network, all nodes. Unreadable or foreign files are skipped with a
    /// warning: one bad file from a sync agent must not take the network down.
    pub fn all_records(&self) -> Result<Vec<Record>> {
        self.records_where(|_| true)
    }

    /// The names of the network's node directories, this node's included: one listing, for
    /// the `…_in` readers (a network directory is listed once per look at the network).
    pub fn node_names(&self) -> Result<Vec<String>> {
        Ok(node_dirs(&self.network_dir)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// The records of the nodes `which` selects by name, this node's included (one directory
    /// read per selected node: an on-demand network reads no record of an on-demand node).
    pub fn records_where(&self, which: impl Fn(&str) -> bool) -> Result<Vec<Record>> {
        self.records_in(&self.node_names()?, which)
    }

    /// `records_where` among `nodes` (`node_names`).
    pub fn records_in(
        &self,
        nodes: &[String],
        which: impl Fn(&str) -> bool,
    ) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        for name in nodes.iter().filter(|n| which(n)) {
            let dir = self.network_dir.join(name);
            records.extend(self.read_records(&dir)?.into_iter().map(|(_, r)| r));
        }
        Ok(records)
    }

    /// The other nodes as the agent's mirror describes them: from the network's `nodes.json`
    /// (one read for all of them), and for a node directory it does not name, from that
    /// directory's `node.json`. A node directory with neither (records written by hand, an
    /// older agent) is a mesh node with nothing else known.
    pub fn remote_nodes(&self) -> Result<BTreeMap<String, RemoteNode>> {
        Ok(self.remote_nodes_in(&self.node_names()?))
    }

    /// `remote_nodes` among `nodes` (`node_names`).
    pub fn remote_nodes_in(&self, nodes: &[String]) -> BTreeMap<String, RemoteNode> {
        let summary = self.nodes_file();
        let mut remote = BTreeMap::new();
        for name in nodes.iter().filter(|n| **n != self.node) {
            let node = match summary.as_ref().and_then(|s| s.get(name)) {
                Some(node) => node.clone(),
                None => read_file(&self.network_dir.join(name).join(NODE_FILE), RECORD_LIMIT)
                    .ok()
                    .and_then(|(body, _)| serde_json::from_slice::<RemoteNode>(&body).ok())
                    .unwrap_or_default(),
            };
            remote.insert(name.clone(), node);
        }
        remote
    }

    /// The nodes `nodes.json` describes (parsed once per version of the file); `None` when
    /// there is none (an agent before it, or none) or it is unreadable (logged).
    fn nodes_file(&self) -> Option<cache::RemoteNodes> {
        let path = self.network_dir.join(NODES_FILE);
        if self.cache.nodes_identity().is_some()
            && let Ok(meta) = fs::symlink_metadata(&path)
            && let Some(nodes) = self.cache.nodes(FileIdentity::from(&meta))
        {
            return Some(nodes);
        }
        let parsed = read_file(&path, NODES_FILE_LIMIT).and_then(|(body, meta)| {
            let file: NodesFile<RemoteNode> =
                serde_json::from_slice(&body).map_err(|e| ReadError::Invalid(e.to_string()))?;
            if !is_readable_schema(file.schema) {
                return Err(ReadError::Invalid(format!("schema {}", file.schema)));
            }
            Ok((std::sync::Arc::new(file.nodes), meta))
        });
        match parsed {
            Ok((nodes, meta)) => {
                self.cache.insert_nodes(FileIdentity::from(&meta), &nodes);
                Some(nodes)
            }
            Err(ReadError::Missing) => None,
            Err(ReadError::Invalid(reason)) => {
                tracing::warn!(path = %path.display(), %reason, "reading every node's node.json instead of an unreadable summary");
                None
            }
        }
    }

    /// The MTUs the other nodes publish (their node keys, mirrored by the agent).
    pub fn published_mtus(&self) -> Vec<u32> {
        self.remote_nodes()
            .map(|nodes| nodes.values().filter_map(|n| n.mtu).collect())
            .unwrap_or_default()
    }

    /// Whether the node agent wrote this node's subnet (it serves the network here).
    pub fn has_subnet_file(&self) -> bool {
        self.node_dir().join(crate::lease::SUBNET_FILE).exists()
    }

    /// The gateway records of the other nodes (mirrored by the node agent).
    pub fn remote_gateways(&self) -> Result<Vec<GatewayRecord>> {
        self.remote_gateways_where(|_| true)
    }

    /// The gateway records of the other nodes `which` selects by name.
    pub fn remote_gateways_where(
        &self,
        which: impl Fn(&str) -> bool,
    ) -> Result<Vec<GatewayRecord>> {
        Ok(self.remote_gateways_in(&self.node_names()?, which))
    }

    /// `remote_gateways_where` among `nodes` (`node_names`).
    pub fn remote_gateways_in(
        &self,
        nodes: &[String],
        which: impl Fn(&str) -> bool,
    ) -> Vec<GatewayRecord> {
        let mut gateways = Vec::new();
        for name in nodes.iter().filter(|n| **n != self.node && which(n)) {
            let dir = self.network_dir.join(name);
            match read_json::<GatewayRecord>(&dir.join(GATEWAY_FILE)) {
                Ok(gateway) => gateways.push(gateway),
                Err(ReadError::Missing) => {}
                Err(ReadError::Invalid(reason)) => {
                    tracing::warn!(dir = %dir.display(), %reason, "skipping an unreadable gateway record");
                }
            }
        }
        gateways
    }

    /// This node's records of the attachments whose ADD or DEL is under way (or was killed):
    /// those whose attachment lock file is there (`attachment_lock`), one listing and a read
    /// per such attachment. A link waiting to join the network is among them: its ADD holds
    /// the lock from before its record is written until after it is ready.
    pub fn records_in_flight(&self) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        for path in list_dir(&self.node_dir())? {
            let attachment =
                file_name_of(&path).and_then(|n| n.strip_prefix(ATTACHMENT_LOCK_PREFIX));
            let Some((container_id, ifname)) = attachment.and_then(|a| a.split_once(SEPARATOR))
            else {
                continue;
            };
            records.extend(self.get(container_id, ifname)?);
        }
        Ok(records)
    }

    /// Whether a command of boot `boot_id` found no record of an earlier boot left in this
    /// node's directory (`note_earlier_boots_cleared`): then none can come back, as every
    /// record is written with the boot of its writer, and ADD need not read every record to
    /// look for them.
    pub fn earlier_boots_cleared(&self, boot_id: &str) -> bool {
        read_file(&self.node_dir().join(CLEARED_BOOT_FILE), 1024)
            .ok()
            .and_then(|(body, _)| serde_json::from_slice::<String>(&body).ok())
            .is_some_and(|cleared| cleared == boot_id)
    }

    /// Note that this node's directory holds no record of a boot before `boot_id`.
    pub fn note_earlier_boots_cleared(&self, boot_id: &str) -> Result<()> {
        self.write_json(CLEARED_BOOT_FILE, &boot_id)
    }

    /// This node's records only. Legacy-named files are migrated on the way (callers that
    /// change the store hold the lock; a reader racing a migration sees one name or the other).
    pub fn node_records(&self) -> Result<Vec<Record>> {
        let records = self.read_records(&self.node_dir())?;
        for (path, record) in &records {
            if !is_current_name(path, record) {
                self.migrate(path, record);
            }
        }
        Ok(records.into_iter().map(|(_, r)| r).collect())
    }

    /// This node's record of one attachment. A file that is unreadable, or that names another
    /// attachment, is no record of this one (logged, never fatal: one bad file must not block
    /// the node). A record under the legacy name is moved to the current one.
    pub fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Record>> {
        let dir = self.node_dir();
        let current = dir.join(Record::file_name(container_id, ifname));
        if let Some(record) = read_record_of(&current, container_id, ifname) {
            return Ok(Some(record));
        }
        let legacy = dir.join(Record::legacy_file_name(container_id, ifname));
        let Some(record) = read_record_of(&legacy, container_id, ifname) else {
            return Ok(None);
        };
        self.migrate(&legacy, &record);
        Ok(Some(record))
    }

    /// Move a legacy-named record to its current name (best effort: reading works either way).
    fn migrate(&self, legacy: &Path, record: &Record) {
        let target = self
            .node_dir()
            .join(Record::file_name(&record.container_id, &record.ifname));
        if let Err(e) = fs::rename(legacy, &target) {
            tracing::warn!(path = %legacy.display(), error = %e, "could not migrate a legacy store record");
        }
    }

    /// The records in one node directory, with the file each came from. A file whose name does
    /// not match the attachment inside (current or legacy form) is skipped: it could shadow
    /// another attachment.
    fn read_records(&self, dir: &Path) -> Result<Vec<(PathBuf, Record)>> {
        let mut records = Vec::new();
        let mut legacy_seen = false;
        for path in list_dir(dir)? {
            // Pod records hold a ':' (legacy ones a '-'); gateway.json, and the agent's
            // subnet.json and node.json, are other files.
            let is_record = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.ends_with(".json")
                    && !n.starts_with('.')
                    && (n.contains(SEPARATOR) || n.contains('-'))
            });
            if !is_record {
                continue;
            }
            match self.read_record_file(&path) {
                Ok(record) if is_current_name(&path, &record) => records.push((path, record)),
                Ok(record) if is_legacy_name(&path, &record) => {
                    legacy_seen = true;
                    records.push((path, record))
                }
                Ok(record) => {
                    tracing::warn!(path = %path.display(), container = %record.container_id, ifname = %record.ifname, "skipping a store record filed under another attachment's name");
                }
                Err(ReadError::Missing) => {}
                Err(ReadError::Invalid(reason)) => {
                    tracing::warn!(path = %path.display(), %reason, "skipping unreadable store record");
                }
            }
        }
        if legacy_seen {
            keep_current_of_twins(&mut records);
        }
        // Borrowed keys: a network of thousands of records sorts without an allocation.
        records.sort_unstable_by(|(_, a), (_, b)| {
            (a.created_at, &a.container_id, &a.ifname).cmp(&(
                b.created_at,
                &b.container_id,
                &b.ifname,
            ))
        });
        Ok(records)
    }

    /// One record file, parsed once per version (see `cache`).
    fn read_record_file(&self, path: &Path) -> std::result::Result<Record, ReadError> {
        if self.cache.knows(path)
            && let Ok(meta) = fs::symlink_metadata(path)
            && let Some(record) = self.cache.get(path, FileIdentity::from(&meta))
        {
            return Ok(record);
        }
        let (record, meta) = read_json_with_meta::<Record>(path)?;
        self.cache.insert(path, FileIdentity::from(&meta), &record);
        Ok(record)
    }

    /// Note links that refused a fan-out (the caller holds the lock), as (container ID,
    /// ifname): the next command that holds the lock brings them in step.
    pub fn note_out_of_step(&self, records: &[&Record]) -> Result<()> {
        let mut noted = self.out_of_step();
        for record in records {
            let attachment = (record.container_id.clone(), record.ifname.clone());
            if !noted.contains(&attachment) {
                noted.push(attachment);
            }
        }
        self.write_json(OUT_OF_STEP_FILE, &noted)
    }

    /// The links noted by `note_out_of_step`, forgotten from the store as they are answered.
    pub fn take_out_of_step(&self) -> Vec<(String, String)> {
        let noted = self.out_of_step();
        if !noted.is_empty() {
            let _ = fs::remove_file(self.node_dir().join(OUT_OF_STEP_FILE));
        }
        noted
    }

    /// Whether an earlier fan-out noted links it missed (without reading the note).
    pub fn has_out_of_step(&self) -> bool {
        self.node_dir().join(OUT_OF_STEP_FILE).exists()
    }

    fn out_of_step(&self) -> Vec<(String, String)> {
        fs::read(self.node_dir().join(OUT_OF_STEP_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Replace what the agent saw of direct peers' activity (see `DirectActivity`).
    pub fn put_direct_activity(&self, activity: &DirectActivity) -> Result<()> {
        self.write_json(DIRECT_ACTIVITY_FILE, activity)
    }

    /// What the agent last wrote of direct peers' activity; empty without a readable file.
    pub fn direct_activity(&self) -> DirectActivity {
        fs::read(self.node_dir().join(DIRECT_ACTIVITY_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Write atomically (see `write_json`).
    pub fn put(&self, record: &Record) -> Result<()> {
        self.write_json(
            &Record::file_name(&record.container_id, &record.ifname),
            record,
        )
    }

    pub fn gateway(&self) -> Result<Option<GatewayRecord>> {
        let path = self.node_dir().join(GATEWAY_FILE);
        match read_json::<GatewayRecord>(&path) {
            Ok(record) => Ok(Some(record)),
            Err(ReadError::Missing) => Ok(None),
            Err(ReadError::Invalid(reason)) => Err(Error::decode(
                format!("gateway record {}", path.display()),
                reason,
            )),
        }
    }

    pub fn put_gateway(&self, record: &GatewayRecord) -> Result<()> {
        self.write_json(GATEWAY_FILE, record)
    }

    pub fn remove_gateway(&self) -> Result<()> {
        remove_file_if_present(&self.node_dir().join(GATEWAY_FILE))
    }

    /// Atomic (temp file, rename: a reader sees the old file or the new one, never half of
    /// one), not durable: nothing here outlives the boot that wrote it (every record of an
    /// earlier boot is reaped, gateways and links die with the boot), and a process that dies
    /// leaves its writes in the page cache. An fsync of file and directory cost more than a
    /// whole pod link in the kernel (several ms each on this class of disk, more when many
    /// ADDs write at once).
    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let dir = self.node_dir();
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
        let target = dir.join(name);
        let body = serde_json::to_vec_pretty(value).expect("records always serialize");
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc_o_nofollow())
                .open(&temp)?;
            file.write_all(&body)?;
            fs::rename(&temp, &target)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::Io {
                context: format!("writing store record {}", target.display()),
                source: e,
            }
        })
    }

    /// Remove a record; a missing one is fine. A legacy-named file goes too, but only when
    /// it holds this very attachment.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<()> {
        let dir = self.node_dir();
        remove_file_if_present(&dir.join(Record::file_name(container_id, ifname)))?;
        let legacy = dir.join(Record::legacy_file_name(container_id, ifname));
        if read_record_of(&legacy, container_id, ifname).is_some() {
            remove_file_if_present(&legacy)?;
        }
        Ok(())
    }

    /// Remove temp files a crashed writer left in this node's directory, and the lock files of
    /// attachments nobody holds (a killed ADD's, or one named by an earlier release).
    pub fn remove_orphan_temp_files(&self) -> Result<usize> {
        let mut removed = 0;
        for path in list_dir(&self.node_dir())? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(TEMP_PREFIX) {
                removed += usize::from(fs::remove_file(&path).is_ok());
            } else if name.starts_with(ATTACHMENT_LOCK_PREFIX) {
                // Removed only under its lock, as a holder's Drop removes it.
                let free = self.flock_at(&path, FlockArg::LockExclusiveNonblock);
                if free.is_ok_and(|lock| lock.is_at(&path)) {
                    removed += usize::from(fs::remove_file(&path).is_ok());
                }
            }
        }
        Ok(removed)
    }

    /// Whether the store directory accepts writes (STATUS).
    pub fn probe_writable(&self) -> Result<()> {
        let probe = self
            .node_dir()
            .join(format!("{TEMP_PREFIX}{}-probe", std::process::id()));
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .io(|| {
                format!(
                    "the key store {} is not writable",
                    self.node_dir().display()
                )
            })
    }
}

/// Create `dir` with mode 0700 if missing; refuse a symlink or a non-directory in its place.
fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(Error::Io {
            context: format!(
                "key store directory {} is a symbolic link; remove it (wg-cni never follows links in its store)",
                dir.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(not_a_directory(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let created = fs::DirBuilder::new().mode(0o700).create(dir);
            match created {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::Io {
                    context: format!("creating key store directory {}", dir.display()),
                    source: e,
                }),
                _ => {
                    // The umask may have narrowed the mode; make sure it is exactly 0700.
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                        .io(|| format!("setting mode 0700 on {}", dir.display()))
                }
            }
        }
        Err(e) => Err(Error::Io {
            context: format!("reading key store directory {}", dir.display()),
            source: e,
        }),
    }
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            context: format!("removing store record {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn not_a_directory(path: &Path) -> Error {
    Error::Io {
        context: format!("{} should be a key store directory", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_entries(dir)?.into_iter().map(|e| e.path()).collect())
}

fn list_entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    #[cfg(test)]
    tests::note_read(dir);
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io {
            context: format!("listing {}", dir.display()),
            source: e,
        }),
    }
}

/// The node directories in a network's directory, by name: its subdirectories, never a
/// symbolic link (the type comes with the listing: no stat per entry).
fn node_dirs(network_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(list_entries(network_dir)?
        .into_iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect())
}

fn file_name_of(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

/// A legacy file and its migrated twin (a crash between the two names): keep the current one.
fn keep_current_of_twins(records: &mut Vec<(PathBuf, Record)>) {
    records.sort_by_cached_key(|(path, r)| {
        (
            r.container_id.clone(),
            r.ifname.clone(),
            !is_current_name(path, r),
        )
    });
    records.dedup_by(|b, a| a.1.is_attachment(&b.1.container_id, &b.1.ifname));
}

fn is_current_name(path: &Path, record: &Record) -> bool {
    file_name_of(path) == Some(&Record::file_name(&record.container_id, &record.ifname))
}

fn is_legacy_name(path: &Path, record: &Record) -> bool {
    file_name_of(path)
        == Some(&Record::legacy_file_name(
            &record.container_id,
            &record.ifname,
        ))
}

/// The record at `path` if it is readable and names exactly this attachment.
fn read_record_of(path: &Path, container_id: &str, ifname: &str) -> Option<Record> {
    match read_json::<Record>(path) {
        Ok(record) if record.is_attachment(container_id, ifname) => Some(record),
        Ok(record) => {
            tracing::warn!(path = %path.display(), container = %record.container_id, ifname = %record.ifname, "store record names another attachment: ignored");
            None
        }
        Err(ReadError::Missing) => None,
        Err(ReadError::Invalid(reason)) => {
            tracing::warn!(path = %path.display(), %reason, "skipping unreadable store record");
            None
        }
    }
}

enum ReadError {
    Missing,
    Invalid(String),
}

/// Both record kinds carry a schema version.
trait Versioned {
    fn schema(&self) -> u32;
}

impl Versioned for Record {
    fn schema(&self) -> u32 {
        self.schema
    }
}

impl Versioned for GatewayRecord {
    fn schema(&self) -> u32 {
        self.schema
    }
}

/// Read one record without following symlinks; the schema version must be one we know.
fn read_json<T: DeserializeOwned + Versioned>(path: &Path) -> std::result::Result<T, ReadError> {
    read_json_with_meta(path).map(|(value, _)| value)
}

/// `read_json`, answering also the metadata of the very file it read.
fn read_json_with_meta<T: DeserializeOwned + Versioned>(
    path: &Path,
) -> std::result::Result<(T, fs::Metadata), ReadError> {
    let (bytes, meta) = read_file(path, RECORD_LIMIT)?;
    let record: T =
        serde_json::from_slice(&bytes).map_err(|e| ReadError::Invalid(e.to_string()))?;
    if !is_readable_schema(record.schema()) {
        return Err(ReadError::Invalid(format!(
            "schema version {} (this wg-cni reads {SCHEMA_VERSION} and {})",
            record.schema(),
            SCHEMA_VERSION + 1
        )));
    }
    Ok((record, meta))
}

/// A regular file of at most `limit` bytes, whole, without following symlinks, and the
/// metadata of the very file read. Four system calls (open, stat, read, close): the read stops
/// at the size the stat gave, as every writer of the store replaces a file by a rename rather
/// than changing it (a file written in place meanwhile reads as a part, which fails to parse
/// like any half-written file). A network of thousands of records reads thousands of files.
fn read_file(path: &Path, limit: u64) -> std::result::Result<(Vec<u8>, fs::Metadata), ReadError> {
    #[cfg(test)]
    tests::note_read(path);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(ReadError::Invalid(e.to_string())),
    };
    let meta = file
        .metadata()
        .map_err(|e| ReadError::Invalid(e.to_string()))?;
    if !meta.is_file() || meta.len() > limit {
        return Err(ReadError::Invalid(format!(
            "not a regular file of at most {} KiB",
            limit / 1024
        )));
    }
    let mut bytes = vec![0; meta.len() as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Invalid(e.to_string())),
        }
    }
    bytes.truncate(filled);
    Ok((bytes, meta))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// The files and directories this thread's store calls opened (`files_read`).
        static READ: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn note_read(path: &Path) {
        READ.with(|read| read.borrow_mut().push(path.to_path_buf()));
    }

    /// What this thread's store calls opened since the last call (test code only).
    pub(crate) fn files_read() -> Vec<PathBuf> {
        READ.with(|read| std::mem::take(&mut *read.borrow_mut()))
    }

    fn record(id: &str, node: &str) -> Record {
        Record {
            schema: SCHEMA_VERSION,
            state: State::Ready,
            network: "net".into(),
            node: node.into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            pod: None,
            public_key: "x".into(),
            next_public_key: None,
            previous_public_key: None,
            key_created_at: None,
            addresses: vec!["10.0.0.2/24".parse().unwrap()],
            endpoint: "127.0.0.1".parse().unwrap(),
            listen_port: 52000,
            netns: "/var/run/netns/x".into(),
            netns_inode: 1,
            boot_id: "b".into(),
            host_name: "wgc0".into(),
            backend: BackendKind::Userspace,
            daemon_pid: None,
            mtu: 1420,
            created_at: 1,
        }
    }

    #[test]
    fn an_attachment_lock_is_no_record_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let files = || -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(dir.path().join("net/n1"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let held = store.attachment_lock("a", "eth0").unwrap().unwrap();
        assert_eq!(files(), [".lock-a:eth0"]);
        // A second holder waits on the file the first one removes as it lets go, and then
        // locks the path anew: both hold it in turn, never together.
        let waiter = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                let lock = store.attachment_lock("a", "eth0").unwrap().unwrap();
                let seen = files();
                drop(lock);
                seen
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
            waiting.join().unwrap()
        });
        assert_eq!(waiter, [".lock-a:eth0"]);
        assert_eq!(files(), Vec::<String>::new());

        // Left by a killed process (or named by an earlier release): GC removes it unless held.
        fs::write(dir.path().join("net/n1/.lock-b:eth0.json"), "").unwrap();
        let _held = store.attachment_lock("c", "eth0").unwrap().unwrap();
        assert_eq!(store.remove_orphan_temp_files().unwrap(), 1);
        assert_eq!(files(), [".lock-c:eth0"]);
    }

    #[test]
    fn a_cleared_boot_is_noted_beside_the_records_and_is_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        store.put(&record("a", "n1")).unwrap();
        assert!(!store.earlier_boots_cleared("b"));
        store.note_earlier_boots_cleared("b").unwrap();
        assert!(store.earlier_boots_cleared("b"));
        assert!(!store.earlier_boots_cleared("after-a-reboot"));
        assert_eq!(store.node_records().unwrap().len(), 1);
        assert_eq!(store.remove_orphan_temp_files().unwrap(), 0);
    }

    #[test]
    fn records_in_flight_are_those_whose_attachment_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        store.put(&record("a", "n1")).unwrap();
        store.put(&record("b", "n1")).unwrap();
        assert!(store.records_in_flight().unwrap().is_empty());
        let held = store.attachment_lock("b", "eth0").unwrap().unwrap();
        let _no_record = store.attachment_lock("c", "eth0").unwrap().unwrap();
        assert_eq!(store.records_in_flight().unwrap(), vec![record("b", "n1")]);
        drop(held);
        assert!(store.records_in_flight().unwrap().is_empty());
    }

    #[test]
    fn put_get_remove_roundtrip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let _lock = store.lock().unwrap();
        store.put(&record("a", "n1")).unwrap();
        assert_eq!(store.get("a", "eth0").unwrap().unwrap(), record("a", "n1"));
        let file = dir.path().join("net/n1/a:eth0.json");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let node_dir = dir.path().join("net/n1");
        assert_eq!(
            fs::metadata(&node_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        store.remove("a", "eth0").unwrap();
        store.remove("a", "eth0").unwrap();
        assert!(store.get("a", "eth0").unwrap().is_none());
    }

    #[test]
    fn all_records_spans_nodes_and_node_records_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let n1 = Store::open(dir.path(), "net", "n1").unwrap();
        let n2 = Store::open(dir.path(), "net", "n2").unwrap();
        n1.put(&record("a", "n1")).unwrap();
        n2.put(&record("b", "n2")).unwrap();
        assert_eq!(n1.all_records().unwrap().len(), 2);
        assert_eq!(n1.node_records().unwrap().len(), 1);
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let outside = dir.path().join("outside.json");
        fs::write(&outside, serde_json::to_vec(&record("z", "n1")).unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("net/n1/z:eth0.json")).unwrap();
        assert!(store.node_records().unwrap().is_empty());
        assert!(store.get("z", "eth0").unwrap().is_none());

        let target = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(target.path(), dir.path().join("linked")).unwrap();
        assert!(Store::open(dir.path(), "linked", "n1").is_err());
    }

    /// A mirrored record of the next schema (written by a newer agent, without the local-only
    /// netns fields and with fields this version does not know) is read, not skipped.
    #[test]
    fn records_of_the_next_schema_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let mut next = serde_json::to_value(record("f", "n2")).unwrap();
        next["schema"] = (SCHEMA_VERSION + 1).into();
        next["newField"] = serde_json::json!({"x": 1});
        let map = next.as_object_mut().unwrap();
        map.remove("netns");
        map.remove("netnsInode");
        fs::create_dir_all(dir.path().join("net/n2")).unwrap();
        fs::write(dir.path().join("net/n2/f:eth0.json"), next.to_string()).unwrap();
        let ids: Vec<_> = store
            .all_records()
            .unwrap()
            .into_iter()
            .map(|r| r.container_id)
            .collect();
        assert_eq!(ids, vec!["f"]);
    }

    #[test]
    fn unknown_schema_and_garbage_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let mut future = record("f", "n1");
        future.schema = 99;
        fs::write(
            dir.path().join("net/n1/f:eth0.json"),
            serde_json::to_vec(&future).unwrap(),
        )
        .unwrap();
        fs::write(dir.path().join("net/n1/g:eth0.json"), b"{not json").unwrap();
        store.put(&record("a", "n1")).unwrap();
        let ids: Vec<_> = store
            .node_records()
            .unwrap()
            .into_iter()
            .map(|r| r.container_id)
            .collect();
        assert_eq!(ids, vec!["a"]);
    }

    #[test]
    fn attachments_whose_legacy_names_collide_keep_separate_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let first = record("a-b", "n1");
        let mut second = record("a", "n1");
        second.ifname = "b-eth0".into();
        store.put(&first).unwrap();
        store.put(&second).unwrap();
        assert_eq!(store.get("a-b", "eth0").unwrap().unwrap(), first);
        assert_eq!(store.get("a", "b-eth0").unwrap().unwrap(), second);
        assert_eq!(store.node_records().unwrap().len(), 2);
        store.remove("a", "b-eth0").unwrap();
        assert_eq!(store.get("a-b", "eth0").unwrap().unwrap(), first);
    }

    #[test]
    fn a_file_naming_another_attachment_is_no_record_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        fs::write(
            dir.path().join("net/n1/a:eth0.json"),
            serde_json::to_vec(&record("b", "n1")).unwrap(),
        )
        .unwrap();
        assert!(store.get("a", "eth0").unwrap().is_none());
        assert!(store.node_records().unwrap().is_empty());
    }

    #[test]
    fn legacy_records_are_read_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net", "n1").unwrap();
        let old = record("pod1", "n1");
        let legacy = dir.path().join("net/n1/pod1-eth0.json");
        fs::write(&legacy, serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(store.node_records().unwrap(), vec![old.clone()]);
        assert!(!legacy.exists());
        assert!(dir.path().join("net/n1/pod1:eth0.json").exists());

        fs::write(&legacy, serde_json::to_vec(&old).unwrap()).unwrap();
        fs::remove_file(dir.path().join("net/n1/pod1:eth0.json")).unwrap();
        assert_eq!(store.get("pod1", "eth0").unwrap().unwrap(), old);
        assert!(!legacy.exists());
        store.remove("pod1", "eth0").unwrap();
        assert!(store.node_records().unwrap().is_empty());
    }

    #[test]
    fn pod_link_names_are_short_stable_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let n1 = Store::open(dir.path(), "net", "n1").unwrap();
        let n2 = Store::open(dir.path(), "net", "n2").unwrap();
        let a = n1.pod_link_name("abc", "eth0");
        assert_eq!(a, n1.pod_link_name("abc", "eth0"));
        assert_ne!(a, n1.pod_link_name("abc", "eth1"));
        assert_ne!(a, n1.pod_link_name("ab", "ceth0"));
        assert_ne!(a, n2.pod_link_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("wgc"));
    }
}
