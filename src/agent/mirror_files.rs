//! The mirror directories: the trusted remote records as files in
//! `<store>/<net>/<remote node>/`, where the plugin reads them. Written on the reconciler's
//! thread (file work stays off the agent's async workers), before the links are told: an ADD
//! that joins after a change sees its files, one that joined before is among the links told.
//! This node's own directory is never touched; a directory is only written or swept if it
//! holds the marker file this agent wrote there.
//! Beside the directories, `<store>/<net>/nodes.json` holds every mirrored `node.json` in one
//! file (`store::NodesFile`), rewritten right after them: a plugin command learns every
//! node's mode and addresses with one read instead of one per node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::index::{Body, FileChange, Snapshot};
use super::keys::LinkName;
use super::mirror::{MARKER_FILE, NODE_FILE};
use super::publish::read_small;
use super::subnet::write_atomic;
use crate::store::{NODES_FILE, NodesFile};

pub struct MirrorFiles {
    own_node: String,
    network_dir: PathBuf,
    /// A write failed: the next job reads the directories back.
    needs_verify: bool,
    /// Each mirror directory's `node.json` as written: what `nodes.json` says (`None` until
    /// read from the directories, at the first change of one or the first read-back).
    nodes: Option<BTreeMap<String, serde_json::Value>>,
    /// `nodes.json` as this agent last wrote it.
    summary: Option<Vec<u8>>,
}

impl MirrorFiles {
    pub fn new(own_node: &str, network_dir: PathBuf) -> MirrorFiles {
        MirrorFiles {
            own_node: own_node.to_string(),
            network_dir,
            needs_verify: false,
            nodes: None,
            summary: None,
        }
    }

    /// Whether a write failed since the last read-back (the caller asks for one).
    pub fn needs_verify(&self) -> bool {
        self.needs_verify
    }

    /// Write and remove the files of one change; answers whether a file changed.
    pub fn apply(&mut self, changes: &[FileChange]) -> bool {
        let mut outcome = Outcome::default();
        let mut ready: BTreeSet<&str> = BTreeSet::new();
        let mut node_files = Vec::new();
        for change in changes {
            let Some(dir) = self.usable_dir(&change.node) else {
                continue;
            };
            let done = match &change.body {
                Some(body) => {
                    if !ready.contains(change.node.as_str()) {
                        if !self.mark(&dir) {
                            continue;
                        }
                        ready.insert(&change.node);
                    }
                    write_one(&dir, &change.file, body, &mut outcome)
                }
                None => remove_one(&dir.join(&change.file), &mut outcome),
            };
            if done && change.file == NODE_FILE {
                node_files.push(change);
            }
        }
        if !node_files.is_empty() {
            match &mut self.nodes {
                Some(nodes) => {
                    for change in node_files {
                        match change.body.as_deref().and_then(parse_node) {
                            Some(node) => nodes.insert(change.node.clone(), node),
                            None => nodes.remove(&change.node),
                        };
                    }
                }
                // Read back whole, the files just written included.
                None => self.nodes = Some(self.read_node_files()),
            }
            outcome.changed |= self.write_summary(false);
        }
        self.needs_verify |= outcome.failed;
        outcome.changed
    }

    /// Make the mirror directories say exactly `trusted`, reading each back (mark and sweep:
    /// after a full sync and every resync interval), and `nodes.json` what their `node.json`
    /// files say; answers whether a file changed.
    pub fn verify(&mut self, trusted: &Snapshot) -> bool {
        self.needs_verify = false;
        let mut outcome = Outcome::default();
        let mut dirs: BTreeSet<String> = trusted.keys().cloned().collect();
        dirs.extend(self.marked_dirs());
        let empty = Default::default();
        for node in dirs {
            let Some(dir) = self.usable_dir(&node) else {
                continue;
            };
            let wanted = trusted.get(&node).unwrap_or(&empty);
            if !wanted.is_empty() && !self.mark(&dir) {
                continue;
            }
            sync_dir(&dir, wanted, &mut outcome);
        }
        self.nodes = Some(self.read_node_files());
        outcome.changed |= self.write_summary(true);
        self.needs_verify |= outcome.failed;
        outcome.changed
    }

    /// The `node.json` of every mirror directory, by node.
    fn read_node_files(&self) -> BTreeMap<String, serde_json::Value> {
        self.marked_dirs()
            .into_iter()
            .filter(|node| self.usable_dir(node).is_some())
            .filter_map(|node| {
                let body = read_small(&self.network_dir.join(&node).join(NODE_FILE))?;
                Some((node, parse_node(&body)?))
            })
            .collect()
    }

    /// Write `nodes.json` if it would say something else than it does (as last written, or
    /// as read back when `read_back`); answers whether it was written. A failure is retried
    /// at the next read-back.
    fn write_summary(&mut self, read_back: bool) -> bool {
        let file = NodesFile {
            schema: 1,
            nodes: self.nodes.clone().unwrap_or_default(),
        };
        let body = serde_json::to_vec(&file).expect("JSON values always serialize");
        if read_back {
            self.summary = std::fs::read(self.network_dir.join(NODES_FILE)).ok();
        }
        if self.summary.as_ref() == Some(&body) {
            return false;
        }
        match write_atomic(&self.network_dir, NODES_FILE, &body) {
            Ok(()) => {
                self.summary = Some(body);
                true
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "writing the mirror's nodes.json");
                self.summary = None;
                self.needs_verify = true;
                false
            }
        }
    }

    /// A remote node's mirror directory, unless it is this node's own or a symbolic link.
    fn usable_dir(&self, node: &str) -> Option<PathBuf> {
        if node == self.own_node {
            return None;
        }
        let dir = self.network_dir.join(node);
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            tracing::error!(dir = %dir.display(), "a mirror directory is a symbolic link: not following it");
            return None;
        }
        Some(dir)
    }

    /// The directory holds the marker (written now if the directory is new or empty of
    /// records); false for a directory someone else keeps records in.
    fn mark(&mut self, dir: &Path) -> bool {
        if dir.join(MARKER_FILE).exists() {
            return true;
        }
        if dir.is_dir() && has_records(dir) {
            tracing::error!(dir = %dir.display(), "a node directory without the mirror marker holds records: not mirroring into it");
            return false;
        }
        if let Err(e) = write_atomic(dir, MARKER_FILE, b"") {
            tracing::warn!(error = %format!("{e:#}"), "cannot create a mirror directory");
            self.needs_verify = true;
            return false;
        }
        true
    }

    /// Mirror directories (holding the marker) of other nodes.
    fn marked_dirs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.network_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(MARKER_FILE).exists())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| *n != self.own_node)
            .collect()
    }
}

fn has_records(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| LinkName::from_file_name(n).is_some())
        })
    })
}

#[derive(Default)]
struct Outcome {
    changed: bool,
    failed: bool,
}

/// Read the directory back: write files that differ, remove record files not wanted.
fn sync_dir(dir: &Path, wanted: &std::collections::BTreeMap<String, Body>, outcome: &mut Outcome) {
    for (file, body) in wanted {
        if read_small(&dir.join(file)).as_deref() != Some(&body[..]) {
            write_one(dir, file, body, outcome);
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let ours = LinkName::from_file_name(&name).is_some() || name == NODE_FILE;
            if ours && !wanted.contains_key(&name) {
                remove_one(&entry.path(), outcome);
            }
        }
    }
}

/// A `node.json` body as `nodes.json` holds it (one that is no JSON object is left out: the
/// plugin then reads that node's own file, as it would without `nodes.json`).
fn parse_node(body: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|v| v.is_object())
}

/// Answers whether the file now holds `body`.
fn write_one(dir: &Path, file: &str, body: &[u8], outcome: &mut Outcome) -> bool {
    match write_atomic(dir, file, body) {
        Ok(()) => {
            outcome.changed = true;
            true
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "writing a mirror record");
            outcome.failed = true;
            false
        }
    }
}

/// Answers whether the file is gone.
fn remove_one(path: &Path, outcome: &mut Outcome) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => {
            outcome.changed = true;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "removing a mirror record");
            outcome.failed = true;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Body> {
        pairs
            .iter()
            .map(|(f, b)| (f.to_string(), Body::from(b.as_bytes())))
            .collect()
    }

    #[test]
    fn write_mirrors_sweeps_and_never_touches_own_or_foreign_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net");
        // This node's own directory, and a foreign directory with records but no marker.
        std::fs::create_dir_all(net.join("me")).unwrap();
        std::fs::write(net.join("me/a:eth0.json"), "mine").unwrap();
        std::fs::create_dir_all(net.join("foreign")).unwrap();
        std::fs::write(net.join("foreign/f:eth0.json"), "theirs").unwrap();
        let mut mirror = MirrorFiles::new("me", net.clone());

        let mut trusted = BTreeMap::new();
        trusted.insert(
            "r".to_string(),
            files(&[("x:eth0.json", "X"), ("y:eth0.json", "Y")]),
        );
        trusted.insert("me".to_string(), files(&[("a:eth0.json", "overwritten?")]));
        trusted.insert("foreign".to_string(), files(&[("g:eth0.json", "G")]));
        assert!(mirror.verify(&trusted));
        assert_eq!(std::fs::read(net.join("r/x:eth0.json")).unwrap(), b"X");
        assert!(net.join("r").join(MARKER_FILE).exists());
        assert_eq!(std::fs::read(net.join("me/a:eth0.json")).unwrap(), b"mine");
        assert!(!net.join("foreign/g:eth0.json").exists());
        assert!(net.join("foreign/f:eth0.json").exists());

        // Nothing changed: nothing written.
        assert!(!mirror.verify(&trusted));
        // A file removed behind the agent's back comes back at the next read-back.
        std::fs::remove_file(net.join("r/y:eth0.json")).unwrap();
        assert!(mirror.verify(&trusted));
        assert!(net.join("r/y:eth0.json").exists());

        // One change: its files only.
        let change = |node: &str, file: &str, body: Option<&str>| FileChange {
            node: node.to_string(),
            file: file.to_string(),
            body: body.map(|b| Body::from(b.as_bytes())),
        };
        std::fs::write(net.join("r/subnet.json"), "{}").unwrap();
        assert!(mirror.apply(&[
            change("r", "x:eth0.json", Some("X2")),
            change("r", "y:eth0.json", None),
            change("me", "a:eth0.json", None),
            change("foreign", "g:eth0.json", Some("G")),
        ]));
        assert_eq!(std::fs::read(net.join("r/x:eth0.json")).unwrap(), b"X2");
        assert!(!net.join("r/y:eth0.json").exists());
        assert!(net.join("me/a:eth0.json").exists());
        assert!(!net.join("foreign/g:eth0.json").exists());
        assert!(
            !mirror.apply(&[change("r", "y:eth0.json", None)]),
            "already gone"
        );

        // Gone from the trusted set: swept, marker and other files stay.
        trusted.remove("r");
        assert!(mirror.verify(&trusted));
        assert!(!net.join("r/x:eth0.json").exists());
        assert!(net.join("r/subnet.json").exists());
        assert!(net.join("r").join(MARKER_FILE).exists());

        // A symlinked node directory is never followed.
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), net.join("s")).unwrap();
        trusted.insert("s".to_string(), files(&[("z:eth0.json", "Z")]));
        mirror.verify(&trusted);
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn nodes_json_says_what_the_node_files_say() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net");
        let mut mirror = MirrorFiles::new("me", net.clone());
        let summary = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(net.join(NODES_FILE)).unwrap()).unwrap()
        };
        let node = |peering: &str| format!(r#"{{"schema":1,"peering":"{peering}"}}"#);
        let change = |node: &str, file: &str, body: Option<&str>| FileChange {
            node: node.to_string(),
            file: file.to_string(),
            body: body.map(|b| Body::from(b.as_bytes())),
        };

        // A record alone changes no node: no summary yet.
        assert!(mirror.apply(&[change("a", "x:eth0.json", Some("X"))]));
        assert!(!net.join(NODES_FILE).exists());
        // The first node.json written: the summary is read from every directory.
        std::fs::write(net.join("a").join(NODE_FILE), node("mesh")).unwrap();
        assert!(mirror.apply(&[change("b", NODE_FILE, Some(&node("on-demand")))]));
        assert_eq!(
            summary(),
            serde_json::json!({"schema": 1, "nodes": {
                "a": {"schema": 1, "peering": "mesh"},
                "b": {"schema": 1, "peering": "on-demand"}}})
        );
        // Then kept from the changes; this node's own and unreadable bodies never count.
        assert!(mirror.apply(&[
            change("a", NODE_FILE, None),
            change("me", NODE_FILE, Some(&node("mesh"))),
            change("c", NODE_FILE, Some("[]")),
        ]));
        assert_eq!(summary()["nodes"].as_object().unwrap().len(), 1);
        assert_eq!(summary()["nodes"]["b"]["peering"], "on-demand");

        // A read-back makes it say the directories again, and writes only when it differs.
        std::fs::remove_file(net.join(NODES_FILE)).unwrap();
        let mut trusted = BTreeMap::new();
        trusted.insert("b".to_string(), files(&[(NODE_FILE, &node("mesh"))]));
        assert!(mirror.verify(&trusted));
        assert_eq!(summary()["nodes"]["b"]["peering"], "mesh");
        assert_eq!(summary()["nodes"].as_object().unwrap().len(), 1, "c swept");
        assert!(!mirror.verify(&trusted));
        trusted.clear();
        assert!(mirror.verify(&trusted));
        assert_eq!(summary()["nodes"], serde_json::json!({}));
    }
}
