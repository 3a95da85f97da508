//! The install step's conflist: the agent reads a template (a ConfigMap in Kubernetes), fills
//! in what only the node knows (`nodeName`, `endpoint`) and what the operator passes as flags
//! (`clusterRange`, `serviceRange`), and writes the runtime's conflist only once the network is
//! ready (subnet claimed, lease held, first sync done), as Cilium's write-cni-conf-when-ready:
//! the runtime marks the node ready only when a conflist exists, so no pod is scheduled onto a
//! node that cannot add it. The agent serves the template's network from the start, before the
//! runtime's conflist exists.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::config::{self, Network};

/// The spec version the written conflist says, and the ones it offers: libcni 1.1 (containerd
/// 1.6/1.7, podman 4) reads `cniVersion` and stops at 1.0.0; CNI 1.1 runtimes (containerd 2,
/// CRI-O) pick the highest of `cniVersions` and send STATUS and GC.
pub const CNI_VERSION: &str = "1.0.0";
pub const CNI_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// What the agent renders into the template (`None`: the template's own value stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    pub node: String,
    pub endpoint: Option<std::net::IpAddr>,
    pub cluster_range: Option<Vec<String>>,
    pub service_range: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub path: PathBuf,
    /// The runtime conflist to write.
    pub out: PathBuf,
    pub values: Values,
}

/// A rendered template: the conflist's bytes and the network it holds.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: Vec<u8>,
    pub network: Network,
}

impl Template {
    /// Read the template and render it; an error names the file and what is wrong with it.
    pub fn render(&self, store: &Path) -> Result<Rendered> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("reading --conflist-template {}", self.path.display()))?;
        let template: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("--conflist-template {}: not JSON", self.path.display()))?;
        let value = render(template, &self.values)
            .with_context(|| format!("--conflist-template {}", self.path.display()))?;
        let network = config::network_in(&value, &self.path)
            .and_then(|n| n.context("no plugin of type \"wg-cni\""))
            .with_context(|| format!("--conflist-template {}", self.path.display()))?;
        if network.conf.store != store {
            bail!(
                "--conflist-template {}: its store {} is not the agent's --store {}",
                self.path.display(),
                network.conf.store.display(),
                store.display()
            );
        }
        let mut text = serde_json::to_vec_pretty(&value)?;
        text.push(b'\n');
        Ok(Rendered { text, network })
    }
}

/// Fill the template's wg-cni entry with the node's values and set the spec versions. The
/// template must be a conflist (`plugins`) with exactly one wg-cni entry.
pub fn render(mut template: Value, values: &Values) -> Result<Value> {
    let list = template
        .as_object_mut()
        .context("must be a JSON object (a conflist)")?;
    list.insert("cniVersion".into(), json!(CNI_VERSION));
    list.insert("cniVersions".into(), json!(CNI_VERSIONS));
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .context("must be a conflist: \"plugins\" is missing or not an array")?;
    let mut ours = plugins
        .iter_mut()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("wg-cni"));
    let plugin = ours
        .next()
        .context("no plugin of type \"wg-cni\" in \"plugins\"")?;
    let plugin = plugin
        .as_object_mut()
        .context("the wg-cni plugin entry is not an object")?;
    plugin.insert("nodeName".into(), json!(values.node));
    if let Some(endpoint) = values.endpoint {
        plugin.insert("endpoint".into(), json!(endpoint.to_string()));
    }
    let ranges = [
        ("clusterRange", &values.cluster_range),
        ("serviceRange", &values.service_range),
    ];
    for (field, value) in ranges {
        match value.as_deref() {
            None => {}
            Some([one]) => {
                plugin.insert(field.into(), json!(one));
            }
            Some(many) => {
                plugin.insert(field.into(), json!(many));
            }
        }
    }
    if ours.next().is_some() {
        bail!("more than one plugin of type \"wg-cni\" in \"plugins\"");
    }
    Ok(template)
}

/// Write `text` to `out` if it differs: a temp file in the same directory, fsynced, renamed
/// over `out`, the directory fsynced. The runtime (which watches the conf dir) sees the old
/// file or the new one, never half of one. `Ok(true)` when it wrote.
pub fn write_if_changed(out: &Path, text: &[u8]) -> Result<bool> {
    if std::fs::read(out).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .with_context(|| format!("--conflist-out {}: not a file name", out.display()))?;
    // A dot name without .conf/.conflist: the runtime never loads the temp file.
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(text)?;
        file.sync_all()?;
        std::fs::rename(&temp, out)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        anyhow::Error::new(e).context(format!("writing {}", out.display()))
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Value {
        json!({"cniVersion": "0.4.0", "name": "wgnet", "plugins": [
            {"type": "wg-cni", "store": "/s", "clusterRange": "10.0.0.0/16", "subnetLease": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "auto"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]})
    }

    fn values() -> Values {
        Values {
            node: "n1".into(),
            endpoint: Some("192.0.2.7".parse().unwrap()),
            cluster_range: None,
            service_range: Some(vec!["10.96.0.0/12".into()]),
        }
    }

    #[test]
    fn renders_the_nodes_fields_and_both_spec_versions() {
        let out = render(template(), &values()).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["cniVersions"], json!(["1.0.0", "1.1.0"]));
        let plugin = &out["plugins"][0];
        assert_eq!(plugin["nodeName"], "n1");
        assert_eq!(plugin["endpoint"], "192.0.2.7");
        assert_eq!(
            plugin["clusterRange"], "10.0.0.0/16",
            "the template's stays"
        );
        assert_eq!(plugin["serviceRange"], "10.96.0.0/12");
        assert_eq!(out["plugins"][1]["type"], "portmap", "other plugins stay");

        let mut dual = values();
        dual.endpoint = None;
        dual.cluster_range = Some(vec!["10.1.0.0/16".into(), "fd01::/48".into()]);
        let out = render(template(), &dual).unwrap();
        assert_eq!(
            out["plugins"][0]["clusterRange"],
            json!(["10.1.0.0/16", "fd01::/48"])
        );
        assert!(out["plugins"][0].get("endpoint").is_none());
    }

    #[test]
    fn refuses_what_is_not_one_wg_cni_conflist() {
        let cases = [
            (json!([1]), "JSON object"),
            (json!({"name": "x", "type": "wg-cni"}), "must be a conflist"),
            (
                json!({"name": "x", "plugins": [{"type": "ptp"}]}),
                "no plugin",
            ),
            (
                json!({"name": "x", "plugins": [{"type": "wg-cni"}, {"type": "wg-cni"}]}),
                "more than one",
            ),
        ];
        for (template, says) in cases {
            let e = render(template.clone(), &values()).unwrap_err().to_string();
            assert!(e.contains(says), "{template}: {e}");
        }
    }

    #[test]
    fn a_template_file_renders_to_a_served_network_of_this_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.conflist");
        std::fs::write(&path, template().to_string()).unwrap();
        let t = Template {
            path: path.clone(),
            out: dir.path().join("10-wg.conflist"),
            values: values(),
        };
        let rendered = t.render(Path::new("/s")).unwrap();
        assert_eq!(rendered.network.name, "wgnet");
        assert_eq!(rendered.network.conf.node_name.as_deref(), Some("n1"));
        let e = t.render(Path::new("/other")).unwrap_err().to_string();
        assert!(e.contains("is not the agent's --store /other"), "{e}");
        // A rendered value the plugin refuses is refused here, naming the field.
        let mut bad = values();
        bad.service_range = Some(vec!["not-a-cidr".into()]);
        let e = format!(
            "{:#}",
            Template {
                values: bad,
                ..t.clone()
            }
            .render(Path::new("/s"))
            .unwrap_err()
        );
        assert!(e.contains("serviceRange"), "{e}");
        std::fs::write(&path, "{").unwrap();
        let e = format!("{:#}", t.render(Path::new("/s")).unwrap_err());
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn writes_atomically_and_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("10-wg.conflist");
        assert!(write_if_changed(&out, b"{}\n").unwrap());
        assert!(!write_if_changed(&out, b"{}\n").unwrap());
        assert!(write_if_changed(&out, b"{\"a\":1}\n").unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"{\"a\":1}\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
        let e = write_if_changed(&dir.path().join("missing/x.conflist"), b"{}").unwrap_err();
        assert!(format!("{e:#}").contains("missing/x.conflist"));
    }
}
