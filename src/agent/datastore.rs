//! The datastore that carries membership between nodes, seen from the membership layer: a
//! network's keys listed at one revision, then watched as batches of changes. The mirror and
//! the validation above it know only these types; `EtcdStore` implements them on etcd v3 (the
//! Kubernetes API, with resource versions for revisions, can implement the same trait).
//! Writes (claims, leases, publishing) still speak etcd directly (`subnet`, `publish`).

use std::future::Future;

use anyhow::Result;
use etcd_client::{Client, EventType, WatchOptions, WatchStream};

use super::etcd;

/// One key as the datastore holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// When the key was created (its age: the older claim wins).
    pub create_revision: i64,
    /// When it last changed (the newer record wins an address within a node).
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    Delete(String),
}

/// What a watch delivers next.
#[derive(Debug)]
pub enum Watched {
    /// Changes in order, and the revision the datastore has reached (a batch may be empty: a
    /// progress notification).
    Changes { revision: i64, changes: Vec<Change> },
    /// The datastore cannot continue this watch (history compacted, watch cancelled): list
    /// everything again.
    Restart { reason: String },
    /// The connection is gone; nothing may be concluded from it (nothing is removed).
    Lost(anyhow::Error),
}

/// A network's keys, listed and watched.
pub trait Datastore {
    type Watch: Watch;

    /// Every key under `prefix`, at one revision; and that revision.
    fn list(&mut self, prefix: &str) -> impl Future<Output = Result<(Vec<Entry>, i64)>> + Send;

    /// The changes under `prefix` from revision `from` on.
    fn watch(
        &mut self,
        prefix: &str,
        from: i64,
    ) -> impl Future<Output = Result<Self::Watch>> + Send;
}

pub trait Watch: Send {
    /// The next delivery; cancel-safe (a caller may drop it in a `select!`).
    fn next(&mut self) -> impl Future<Output = Watched> + Send;
}

/// etcd v3 as the datastore.
#[derive(Clone)]
pub struct EtcdStore {
    pub client: Client,
}

pub struct EtcdWatch {
    stream: WatchStream,
}

fn entry(kv: &etcd_client::KeyValue) -> Option<Entry> {
    Some(Entry {
        key: kv.key_str().ok()?.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

impl Datastore for EtcdStore {
    type Watch = EtcdWatch;

    async fn list(&mut self, prefix: &str) -> Result<(Vec<Entry>, i64)> {
        let (kvs, revision) = etcd::list_prefix(&mut self.client, prefix).await?;
        Ok((kvs.iter().filter_map(entry).collect(), revision))
    }

    async fn watch(&mut self, prefix: &str, from: i64) -> Result<EtcdWatch> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let stream = etcd::bounded(self.client.watch(prefix, Some(options))).await?;
        Ok(EtcdWatch { stream })
    }
}

impl Watch for EtcdWatch {
    async fn next(&mut self) -> Watched {
        let resp = match self.stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Watched::Lost(anyhow::anyhow!("watch stream closed")),
            Err(e) => return Watched::Lost(e.into()),
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Watched::Restart {
                reason: format!(
                    "compacted at {}, {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                ),
            };
        }
        let changes = resp
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                match event.event_type() {
                    EventType::Put => entry(kv).map(Change::Put),
                    EventType::Delete => Some(Change::Delete(kv.key_str().ok()?.to_string())),
                }
            })
            .collect();
        Watched::Changes {
            revision: resp.header().map_or(0, |h| h.revision()),
            changes,
        }
    }
}
