//! The agent's key rotation: each pod of this node gets a fresh key once its key is
//! `keyRotation` old (`rotate::due_at` spreads the pods' due times), one pod at a time and at
//! most one per `SPACING`, so a node never rotates all its pods at once; and a rotation that a
//! `kill -9` left half done (the record still names a next key a while later) is finished. The
//! rotation is the command's own (`crate::rotate`); the private key is made and wiped inside it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cni::Result;
use crate::netns::Netns;
use crate::rotate;
use crate::store::{Record, State, Store};

use super::Settings;

/// How often the records are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Between two rotations of this node.
const SPACING: Duration = Duration::from_secs(1);
/// A record that names a next key this long is a rotation that died (one takes milliseconds).
const KILLED_AFTER: Duration = Duration::from_secs(5);

struct Rotator {
    node: String,
    boot_id: String,
    host: Netns,
    cni_conf_dir: PathBuf,
    store: PathBuf,
    /// (network, container ID, ifname, next key) → when first seen.
    pending: HashMap<(String, String, String, String), Instant>,
    last: Option<Instant>,
}

/// Start the rotation thread (it runs as long as the agent).
pub fn spawn(settings: &Settings) -> Result<()> {
    let rotator = Rotator {
        node: settings.node.clone(),
        boot_id: crate::host::boot_id()?,
        host: Netns::host()?,
        cni_conf_dir: settings.cni_conf_dir.clone(),
        store: settings.store.clone(),
        pending: HashMap::new(),
        last: None,
    };
    std::thread::Builder::new()
        .name("rotator".into())
        .spawn(move || rotator.run())
        .map_err(|source| crate::cni::Error::Io {
            context: "starting the key rotation thread".into(),
            source,
        })?;
    Ok(())
}

impl Rotator {
    fn run(mut self) {
        loop {
            std::thread::sleep(TICK);
            self.tick(Instant::now());
        }
    }

    fn tick(&mut self, now: Instant) {
        let Ok(networks) = super::config::read_networks(&self.cni_conf_dir, &self.store) else {
            return;
        };
        let mut seen = HashMap::new();
        for network in networks {
            let conf = &network.conf;
            let Ok(Some(store)) = Store::open_existing(&conf.store, &conf.name, &self.node) else {
                continue;
            };
            let mut records = store.node_records().unwrap_or_default();
            records.retain(|r| r.state == State::Ready && r.boot_id == self.boot_id);
            for record in &records {
                if let Some(next) = &record.next_public_key {
                    let id = (
                        conf.name.clone(),
                        record.container_id.clone(),
                        record.ifname.clone(),
                        next.clone(),
                    );
                    let since = *self.pending.get(&id).unwrap_or(&now);
                    seen.insert(id, since);
                    if now.duration_since(since) >= KILLED_AFTER && self.may_rotate(now) {
                        self.finish_killed(conf, record);
                    }
                } else if let Some(period) = conf.key_rotation
                    && rotate::due_at(record, period) <= crate::host::now_unix()
                    && self.may_rotate(now)
                {
                    self.rotate(conf, record);
                }
            }
        }
        self.pending = seen;
    }

    /// At most one rotation per `SPACING` (counted when it starts).
    fn may_rotate(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < SPACING)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    fn node(&self) -> rotate::Node<'_> {
        rotate::Node {
            name: &self.node,
            boot_id: &self.boot_id,
            host: &self.host,
        }
    }

    fn rotate(&self, conf: &crate::cni::NetConf, record: &Record) {
        match rotate::rotate(&self.node(), conf, &record.container_id, &record.ifname) {
            Ok(r) => {
                tracing::info!(network = %conf.name, container = %r.container_id, ifname = %r.ifname, old = %r.old_key, new = %r.new_key, took_ms = r.took.as_millis() as u64, "key rotated (keyRotation)")
            }
            Err(e) => {
                tracing::warn!(network = %conf.name, container = %record.container_id, ifname = %record.ifname, error = %e, "could not rotate a key; trying again later")
            }
        }
    }

    fn finish_killed(&self, conf: &crate::cni::NetConf, record: &Record) {
        let node = self.node();
        match rotate::finish_killed(&node, conf, &record.container_id, &record.ifname) {
            Ok(Some(r)) => {
                tracing::info!(network = %conf.name, container = %r.container_id, ifname = %r.ifname, new = %r.new_key, "a rotation left half done is finished")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(network = %conf.name, container = %record.container_id, ifname = %record.ifname, error = %e, "could not finish a rotation left half done; trying again later")
            }
        }
    }
}
