//! The reconciler thread: the one place the agent writes mirror files and links. Network
//! loops send it jobs over a channel and never wait for them (netlink, UAPI and fsync block;
//! keep-alives and `/healthz` must not wait behind them). Jobs run in order per network; a
//! queue that grew while a job ran is worked off at once: consecutive changes merge into one
//! job, and a resync makes every job of its network before it redundant.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use super::LinkReconciler;
use super::directory::SharedDirectory;
use super::health::AgentStatus;
use super::index::{FileChange, Snapshot};
use super::mirror_files::MirrorFiles;
use crate::cni::config::NetConf;
use crate::reconcile::PeerChanges;

/// What a job does to the mirror directories.
pub enum Files {
    /// Write and remove these files.
    Changes(Vec<FileChange>),
    /// Make the directories say exactly this, reading them back.
    Verify(Snapshot),
}

/// What a job does to the links.
pub enum Work {
    /// One-peer changes on the links they concern.
    Changes(PeerChanges),
    /// Whole peer sets, from the store.
    Resync,
}

pub struct Job {
    /// The network's config as its loop serves it: a template's rendering before the
    /// conflist is written (the conf dir may still hold an older one then).
    pub conf: Arc<NetConf>,
    pub network_dir: PathBuf,
    pub files: Files,
    pub work: Work,
    /// Set by the thread when a mirror write failed: the network loop then sends a resync.
    pub verify_wanted: Arc<AtomicBool>,
    /// The network's remote pods (a resync keeps the promoter's direct peers for them).
    pub directory: SharedDirectory,
}

impl Job {
    fn network(&self) -> &str {
        &self.conf.name
    }
}

/// The sending end: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Reconciler {
    jobs: mpsc::Sender<Job>,
}

impl Reconciler {
    /// Start the thread; it ends when every sender is dropped.
    pub fn spawn(
        node: String,
        links: Arc<dyn LinkReconciler>,
        status: Arc<AgentStatus>,
    ) -> std::io::Result<Reconciler> {
        let (jobs, queue) = mpsc::channel();
        let mut thread = Thread {
            node,
            links,
            status,
            files: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("reconciler".into())
            .spawn(move || thread.run(queue))?;
        Ok(Reconciler { jobs })
    }

    pub fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            tracing::error!("the reconciler thread is gone: links are not updated");
        }
    }
}

struct Thread {
    node: String,
    links: Arc<dyn LinkReconciler>,
    status: Arc<AgentStatus>,
    files: HashMap<String, MirrorFiles>,
}

impl Thread {
    fn run(&mut self, queue: mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            batch.extend(queue.try_iter());
            for job in coalesce(batch) {
                let network = job.network().to_string();
                let resync = matches!(job.work, Work::Resync);
                let started = Instant::now();
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_job(job)));
                if ran.is_err() {
                    tracing::error!(%network, "a reconcile job panicked; the next resync repairs what it left");
                    self.status
                        .error(&network, "a reconcile job panicked".to_string());
                }
                let took = started.elapsed();
                self.status.update(&network, |s| {
                    s.reconciles += 1;
                    s.last_reconcile_ms = took.as_millis() as u64;
                });
                self.status.counters.reconciled(&network, resync, took);
            }
        }
    }

    fn run_job(&mut self, job: Job) {
        let files = self
            .files
            .entry(job.network().to_string())
            .or_insert_with(|| MirrorFiles::new(&self.node, job.network_dir.clone()));
        match &job.files {
            Files::Changes(changes) => {
                files.apply(changes);
            }
            Files::Verify(snapshot) => {
                files.verify(snapshot);
            }
        }
        if files.needs_verify() {
            job.verify_wanted.store(true, Ordering::Relaxed);
        }
        match &job.work {
            Work::Changes(changes) if changes.is_empty() => {}
            Work::Changes(changes) => self.links.apply(&job.conf, changes),
            Work::Resync => self.links.resync(&job.conf, &job.directory),
        }
    }
}

/// The jobs of a batch that still need to run, in order: per network, nothing before its
/// last resync (which reads everything back), and runs of changes merged into one.
fn coalesce(batch: Vec<Job>) -> Vec<Job> {
    let mut last_resync: HashMap<String, usize> = HashMap::new();
    for (i, job) in batch.iter().enumerate() {
        if matches!(job.work, Work::Resync) {
            last_resync.insert(job.network().to_string(), i);
        }
    }
    let mut out: Vec<Job> = Vec::new();
    for (i, job) in batch.into_iter().enumerate() {
        if last_resync.get(job.network()).is_some_and(|last| i < *last) {
            continue;
        }
        if let Some(previous) = out.last_mut().filter(|p| p.network() == job.network()) {
            if let (Files::Changes(files), Work::Changes(peers)) =
                (&mut previous.files, &mut previous.work)
                && let (Files::Changes(more), Work::Changes(later)) = (&job.files, &job.work)
            {
                files.extend(more.iter().cloned());
                peers.extend(later.clone());
                continue;
            }
        }
        out.push(job);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use crate::reconcile::{PeerKind, Upsert};
    use crate::wireguard::Peer;

    fn conf(network: &str) -> NetConf {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "wg-cni",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.66.0.0/24"}]]},
        });
        NetConf::parse(conf.to_string().as_bytes()).unwrap()
    }

    fn job(network: &str, work: Work) -> Job {
        Job {
            conf: Arc::new(conf(network)),
            network_dir: PathBuf::from("/nonexistent"),
            files: match work {
                Work::Resync => Files::Verify(Snapshot::new()),
                Work::Changes(_) => Files::Changes(Vec::new()),
            },
            work,
            verify_wanted: Arc::default(),
            directory: SharedDirectory::default(),
        }
    }

    fn one_new_peer() -> PeerChanges {
        PeerChanges {
            upsert: vec![Upsert {
                peer: Peer {
                    public_key: KeyPair::generate().public().clone(),
                    endpoint: None,
                    allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                    keepalive: None,
                    preshared_key: None,
                },
                kind: PeerKind::Pod,
                new: true,
                moved: false,
            }],
            ..PeerChanges::default()
        }
    }

    #[test]
    fn a_resync_absorbs_what_came_before_it_and_changes_merge() {
        let batch = vec![
            job("a", Work::Changes(one_new_peer())),
            job("b", Work::Changes(one_new_peer())),
            job("a", Work::Resync),
            job("a", Work::Changes(one_new_peer())),
            job("a", Work::Changes(one_new_peer())),
        ];
        let kept = coalesce(batch);
        let shape: Vec<(&str, usize)> = kept
            .iter()
            .map(|j| {
                let peers = match &j.work {
                    Work::Changes(c) => c.upsert.len(),
                    Work::Resync => 0,
                };
                (j.network(), peers)
            })
            .collect();
        assert_eq!(shape, vec![("b", 1), ("a", 0), ("a", 2)]);
    }
}
