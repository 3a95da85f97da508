//! The agent in-process against a real etcd (Debian's `etcd-server`), with a recording
//! reconciler. etcd, etcdctl and the agent's runtime all live in an anonymous network namespace
//! of the test's own thread. Without `etcd` the test fails (`make deps` installs it): a test
//! that skips itself would count as a pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AgentStatus, LinkReconciler, Settings};
use crate::cni::config::NetConf;

const URL: &str = "http://127.0.0.1:23790";

struct EtcdGuard(Child);

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn etcdctl(args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", URL, "--command-timeout", "5s"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the agent's hook saw at each call.
#[derive(Debug, Clone)]
struct Call {
    network: String,
    first_sync_done: bool,
    mirrored: usize,
    /// None: a resync; else the change's (new or rewritten peers, removed peers).
    changes: Option<(usize, usize)>,
}

struct Recording {
    status: Arc<AgentStatus>,
    mirror_dir: PathBuf,
    calls: Mutex<Vec<Call>>,
}

impl LinkReconciler for Recording {
    fn resync(&self, conf: &NetConf, _: &super::directory::SharedDirectory) {
        self.record(&conf.name, None);
    }

    fn apply(&self, conf: &NetConf, changes: &crate::reconcile::PeerChanges) {
        self.record(
            &conf.name,
            Some((changes.upsert.len(), changes.remove.len())),
        );
    }
}

impl Recording {
    fn record(&self, network: &str, changes: Option<(usize, usize)>) {
        let mirrored = std::fs::read_dir(&self.mirror_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(":eth0.json"))
                    .count()
            })
            .unwrap_or(0);
        self.calls.lock().unwrap().push(Call {
            network: network.to_string(),
            first_sync_done: self.status.first_sync_done(network),
            mirrored,
            changes,
        });
    }
}

fn remote_record(id: &str, address: &str, boot_id: &str) -> String {
    serde_json::json!({"schema": 1, "state": "ready", "network": "wgnet", "node": "remote",
        "containerId": id, "ifname": "eth0",
        "publicKey": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "addresses": [address],
        "endpoint": "192.0.2.9", "listenPort": 52000, "netns": "/x", "netnsInode": 1,
        "bootId": boot_id, "hostName": "wgc0", "backend": "userspace", "mtu": 1420,
        "createdAt": 1})
    .to_string()
}

fn settings(dir: &Path) -> Settings {
    Settings {
        etcd_endpoints: vec![URL.to_string()],
        store: dir.join("store"),
        node: "local".into(),
        cni_conf_dir: dir.join("net.d"),
        etcd_ca: None,
        etcd_cert: None,
        etcd_key: None,
        etcd_user: None,
        etcd_password_file: None,
        lease_ttl: Duration::from_secs(5),
        grace_period: Duration::from_secs(60),
        subnet_lease_ttl: Duration::from_secs(3600),
        resync_interval: Duration::from_secs(30),
        health_listen: "127.0.0.1:9765".parse().unwrap(),
        metrics_listen: None,
        metrics_per_peer: false,
        template: None,
    }
}

#[test]
fn reconcile_hook_runs_after_the_first_sync_and_after_mirror_changes() {
    if let Err(e) = Command::new("etcd").arg("--version").output() {
        panic!("cannot run etcd ({e}): install it with `make deps` (Debian's etcd-server)");
    }
    let handle = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        assert!(
            Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success()
        );
        let dir = tempfile::tempdir().unwrap();
        let peer = "http://127.0.0.1:23800";
        let _etcd = EtcdGuard(
            Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("etcd"))
                .args(["--listen-client-urls", URL, "--advertise-client-urls", URL])
                .args([
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                ])
                .args(["--initial-cluster", &format!("t={peer}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for("etcd", || {
            Command::new("etcdctl")
                .args(["--endpoints", URL, "endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success())
        });

        // A remote node already in etcd, with one record.
        let boot = "remote-boot";
        let prefix = "/wg-cni/v1/wgnet/";
        etcdctl(&[
            "put",
            &format!("{prefix}subnets/remote/claim"),
            r#"{"subnets":["10.20.2.0/24"]}"#,
        ]);
        let info = serde_json::json!({"endpoints": ["192.0.2.9"], "bootId": boot,
            "subnets": ["10.20.2.0/24"], "mtu": 1420, "agentVersion": "t"});
        etcdctl(&[
            "put",
            &format!("{prefix}nodes/remote/info"),
            &info.to_string(),
        ]);
        etcdctl(&[
            "put",
            &format!("{prefix}links/remote/r1:eth0"),
            &remote_record("r1", "10.20.2.5/24", boot),
        ]);

        let settings = settings(dir.path());
        std::fs::create_dir_all(&settings.cni_conf_dir).unwrap();
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "wgnet", "plugins": [
            {"type": "wg-cni", "store": settings.store, "clusterRange": "10.20.0.0/16",
             "ipam": {"type": "host-local",
             "ranges": [[{"subnet": "10.20.1.0/24"}]]}}]});
        std::fs::write(
            settings.cni_conf_dir.join("10-wg.conflist"),
            conf.to_string(),
        )
        .unwrap();

        let status = Arc::new(AgentStatus::default());
        let recording = Arc::new(Recording {
            status: status.clone(),
            mirror_dir: settings.store.join("wgnet/remote"),
            calls: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = {
            let (recording, status) = (recording.clone(), status.clone());
            // Spawned from this thread: the agent's runtime shares the test's namespace.
            std::thread::spawn(move || {
                super::run_until(settings, recording, status, async {
                    let _ = stopped.await;
                })
            })
        };
        let calls = || recording.calls.lock().unwrap().clone();
        wait_for("a reconcile call", || !calls().is_empty());
        let first = &calls()[0];
        assert_eq!(first.network, "wgnet");
        assert!(first.first_sync_done, "{first:?}");
        assert!(
            first.changes.is_none(),
            "the first call is a resync: {first:?}"
        );
        assert_eq!(
            first.mirrored, 1,
            "the mirror is written before the hook runs"
        );

        etcdctl(&[
            "put",
            &format!("{prefix}links/remote/r2:eth0"),
            &remote_record("r2", "10.20.2.6/24", boot),
        ]);
        wait_for("a reconcile call after the mirror changed", || {
            calls().iter().any(|c| c.mirrored == 2)
        });
        let change = calls().into_iter().find(|c| c.mirrored == 2).unwrap();
        assert_eq!(change.changes, Some((1, 0)), "one new peer: {change:?}");
        assert!(calls().iter().all(|c| c.first_sync_done));

        // The remote node's key flaps (lost, then back): its records stay within the grace
        // period, and no link is asked to change.
        let before = calls().len();
        etcdctl(&["del", &format!("{prefix}nodes/remote/info")]);
        wait_for("the node seen stale", || {
            status
                .get("wgnet")
                .is_some_and(|s| s.stale_nodes.contains("remote"))
        });
        etcdctl(&[
            "put",
            &format!("{prefix}nodes/remote/info"),
            &info.to_string(),
        ]);
        wait_for("the node seen live again", || {
            status
                .get("wgnet")
                .is_some_and(|s| s.stale_nodes.is_empty())
        });
        std::thread::sleep(Duration::from_millis(500));
        let after: Vec<Call> = calls().split_off(before);
        assert!(
            after.iter().all(|c| c.changes.is_none()),
            "a flap changes no peer: {after:?}"
        );

        etcdctl(&["del", &format!("{prefix}links/remote/r1:eth0")]);
        wait_for("the removal as a change", || {
            calls()
                .iter()
                .any(|c| c.changes == Some((0, 1)) && c.mirrored == 1)
        });
        assert!(status.readiness().is_ok(), "{:?}", status.readiness());

        let _ = stop.send(());
        agent.join().unwrap().unwrap();

        // Listing pages through more keys than one page holds, all at one revision.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = etcd_client::Client::connect([URL], None).await.unwrap();
            let count = 2 * super::etcd::PAGE_SIZE as usize + 37;
            for chunk in (0..count).collect::<Vec<_>>().chunks(64) {
                let puts = chunk.iter().map(|i| {
                    let mut client = client.clone();
                    async move { client.put(format!("/page-test/{i:05}"), "v", None).await }
                });
                for put in futures::future::join_all(puts).await {
                    put.unwrap();
                }
            }
            let mut client = client;
            let (kvs, revision) = super::etcd::list_prefix(&mut client, "/page-test/")
                .await
                .unwrap();
            assert_eq!(kvs.len(), count);
            assert!(kvs.windows(2).all(|w| w[0].key() < w[1].key()));
            assert!(kvs.iter().all(|kv| kv.mod_revision() <= revision));
        });
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}
