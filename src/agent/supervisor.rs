//! The agent follows its config: the networks it serves are the conflists' (re-read when the
//! conf dir changes, and every `CONF_POLL`). A network that appears gets a loop; one whose
//! config changes gets a new loop (the old one is dropped without revoking anything: the new
//! one re-announces on a lease of its own); one that disappears has its loop stopped, which
//! revokes its liveness lease and keeps its subnet claim. A loop that ends (a panic) is
//! restarted with backoff. With a conflist template, its network is served from the start
//! (the template wins the network's name over the conf dir), and the rendered conflist is
//! written into the conf dir once that network is ready.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{self, Network, Settings};
use super::directory::Directories;
use super::health::AgentStatus;
use super::network::NetworkLoop;
use super::reconciler::Reconciler;
use super::template;

/// The conf dir is re-read at least this often (inotify may be unavailable).
pub const CONF_POLL: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One served network.
struct Served {
    network: Network,
    /// The plugin's config as read: a different text is a changed network.
    conf_text: String,
    handle: JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Set when the loop ended unasked: when to start it again, and the next backoff.
    restart_at: Option<Instant>,
    backoff: Duration,
}

pub struct Supervisor {
    settings: Arc<Settings>,
    client: Client,
    boot_id: String,
    status: Arc<AgentStatus>,
    reconciler: Reconciler,
    directories: Arc<Directories>,
    served: BTreeMap<String, Served>,
    warned_empty: bool,
    /// The template as last rendered successfully (a later bad edit keeps this one).
    rendered: Option<template::Rendered>,
}

impl Supervisor {
    pub fn new(
        settings: Arc<Settings>,
        client: Client,
        boot_id: String,
        status: Arc<AgentStatus>,
        reconciler: Reconciler,
        directories: Arc<Directories>,
    ) -> Supervisor {
        Supervisor {
            settings,
            client,
            boot_id,
            status,
            reconciler,
            directories,
            served: BTreeMap::new(),
            warned_empty: false,
            rendered: None,
        }
    }

    fn start(&self, network: &Network) -> (JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.status.update(&network.name, |_| {});
        let worker = NetworkLoop::new(
            self.settings.clone(),
            network.clone(),
            self.client.clone(),
            self.boot_id.clone(),
            self.status.clone(),
            self.reconciler.clone(),
            self.directories.of(&network.name),
        );
        (tokio::spawn(worker.run(stopped)), stop)
    }

    /// Serve exactly the networks the conf dir holds now.
    pub fn follow_conf_dir(&mut self) {
        let networks =
            match config::read_networks(&self.settings.cni_conf_dir, &self.settings.store) {
                Ok(networks) => networks,
                Err(e) => {
                    // A conf dir that cannot be read changes nothing: serving stays as it is.
                    tracing::warn!(error = %format!("{e:#}"), "reading the CNI conf dir");
                    return;
                }
            };
        let mut wanted: BTreeMap<String, Network> =
            networks.into_iter().map(|n| (n.name.clone(), n)).collect();
        if let Some(rendered) = self.render_template() {
            wanted.insert(rendered.network.name.clone(), rendered.network.clone());
        }
        let gone: Vec<String> = self
            .served
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            let mut served = self.served.remove(&name).expect("listed");
            tracing::info!(network = %name, "network left the conflists: no longer served");
            if let Some(stop) = served.stop.take() {
                let _ = stop.send(());
            }
            self.status.forget(&name);
        }
        for (name, network) in wanted {
            let conf_text = serde_json::to_string(&network.conf.raw).unwrap_or_default();
            match self.served.get(&name) {
                Some(served) if served.conf_text == conf_text => continue,
                Some(served) => {
                    tracing::info!(network = %name, source = %network.source.display(), "network config changed: restarting its loop");
                    served.handle.abort();
                }
                None => {
                    tracing::info!(network = %name, source = %network.source.display(), mode = ?network.mode, "serving network");
                }
            }
            let (handle, stop) = self.start(&network);
            self.served.insert(
                name,
                Served {
                    network,
                    conf_text,
                    handle,
                    stop: Some(stop),
                    restart_at: None,
                    backoff: FIRST_BACKOFF,
                },
            );
        }
        if self.served.is_empty() && !self.warned_empty {
            tracing::warn!(dir = %self.settings.cni_conf_dir.display(), store = %self.settings.store.display(), "no wg-cni network for this store in the CNI conf dir");
        }
        self.warned_empty = self.served.is_empty();
    }

    /// The template rendered now, or as last rendered when it cannot be read now.
    fn render_template(&mut self) -> Option<&template::Rendered> {
        let template = self.settings.template.as_ref()?;
        match template.render(&self.settings.store) {
            Ok(rendered) => self.rendered = Some(rendered),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot render the conflist template: serving it as last rendered");
            }
        }
        self.rendered.as_ref()
    }

    /// Write the rendered conflist once its network is ready (and again when the template
    /// changed). Never removed: a stopping or failing agent leaves the node as it is.
    pub fn write_conflist_when_ready(&self) {
        let (Some(template), Some(rendered)) = (&self.settings.template, &self.rendered) else {
            return;
        };
        let ready = self
            .status
            .get(&rendered.network.name)
            .is_some_and(|s| s.not_ready().is_none());
        if !ready {
            return;
        }
        match template::write_if_changed(&template.out, &rendered.text) {
            Ok(true) => {
                tracing::info!(network = %rendered.network.name, conflist = %template.out.display(), "network ready: conflist written")
            }
            Ok(false) => {}
            Err(e) => {
                let text = format!("writing the conflist: {e:#}");
                tracing::warn!(network = %rendered.network.name, error = %text, "retrying");
                self.status.error(&rendered.network.name, text);
            }
        }
    }

    /// Serve every network through `client` from now on (the credentials changed): each loop
    /// starts again, as after a change of its config.
    pub fn use_client(&mut self, client: Client) {
        self.client = client;
        let names: Vec<String> = self.served.keys().cloned().collect();
        for name in names {
            self.served[&name].handle.abort();
            self.restart(&name);
            tracing::info!(network = %name, "network loop restarted with the new etcd connection");
        }
    }

    /// Start the served network's loop anew (the old one ended or was aborted).
    fn restart(&mut self, name: &str) -> &mut Served {
        let network = self.served[name].network.clone();
        let (handle, stop) = self.start(&network);
        let served = self.served.get_mut(name).expect("listed");
        served.handle = handle;
        served.stop = Some(stop);
        served.restart_at = None;
        served
    }

    /// A loop only ends by panicking: note it, and start it again after its backoff.
    pub fn restart_ended_loops(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, served) in self.served.iter_mut() {
            match served.restart_at {
                None if served.handle.is_finished() => {
                    let error = format!("network loop ended; restarting in {:?}", served.backoff);
                    tracing::error!(network = %name, "{error}");
                    self.status.error(name, error);
                    served.restart_at = Some(now + served.backoff);
                }
                Some(at) if now >= at => due.push(name.clone()),
                _ => {}
            }
        }
        for name in due {
            let served = self.restart(&name);
            served.backoff = (served.backoff * 2).min(MAX_BACKOFF);
            tracing::info!(network = %name, "network loop restarted");
        }
    }
}
