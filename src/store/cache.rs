//! The files this process has already read, by file identity. A store file is only ever
//! replaced by a rename, so a file with the same inode, size and change time holds the same
//! content: one command (or one agent scan) that looks at the network several times parses
//! each file once, and a look under the lock after one without it re-reads only what changed.
//! A path never read costs no extra stat: the first look opens it straight away.

use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Record, RemoteNode};

/// What tells two versions of a file apart (an inode number alone may be reused by the next
/// rename's temporary file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl From<&Metadata> for FileIdentity {
    fn from(meta: &Metadata) -> Self {
        FileIdentity {
            ino: meta.ino(),
            size: meta.size(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// The other nodes as the network's `nodes.json` describes them.
pub type RemoteNodes = Arc<BTreeMap<String, RemoteNode>>;

#[derive(Default)]
pub struct RecordCache {
    records: Mutex<HashMap<PathBuf, (FileIdentity, Record)>>,
    nodes: Mutex<Option<(FileIdentity, RemoteNodes)>>,
}

impl RecordCache {
    /// Whether a record was read from `path` before (only then is a stat worth it).
    pub fn knows(&self, path: &Path) -> bool {
        self.records
            .lock()
            .is_ok_and(|records| records.contains_key(path))
    }

    /// The record last read from `path`, if the file there is still that version.
    pub fn get(&self, path: &Path, now: FileIdentity) -> Option<Record> {
        let records = self.records.lock().ok()?;
        let (identity, record) = records.get(path)?;
        (*identity == now).then(|| record.clone())
    }

    pub fn insert(&self, path: &Path, identity: FileIdentity, record: &Record) {
        if let Ok(mut records) = self.records.lock() {
            records.insert(path.to_path_buf(), (identity, record.clone()));
        }
    }

    /// The identity of the `nodes.json` read last, if any.
    pub fn nodes_identity(&self) -> Option<FileIdentity> {
        self.nodes
            .lock()
            .ok()?
            .as_ref()
            .map(|(identity, _)| *identity)
    }

    /// The nodes last read from `nodes.json`, if the file is still that version.
    pub fn nodes(&self, now: FileIdentity) -> Option<RemoteNodes> {
        let nodes = self.nodes.lock().ok()?;
        let (identity, nodes) = nodes.as_ref()?;
        (*identity == now).then(|| nodes.clone())
    }

    pub fn insert_nodes(&self, identity: FileIdentity, nodes: &RemoteNodes) {
        if let Ok(mut cached) = self.nodes.lock() {
            *cached = Some((identity, nodes.clone()));
        }
    }
}
