//! The records this process has already read, by file identity. A record file is only ever
//! replaced by a rename, so a file with the same inode, size and change time holds the same
//! record: one command (or one agent scan) that looks at the network several times parses each
//! file once, and a look under the lock after one without it re-reads only what changed.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Record;

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

#[derive(Default)]
pub struct RecordCache {
    records: Mutex<HashMap<PathBuf, (FileIdentity, Record)>>,
}

impl RecordCache {
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
}
