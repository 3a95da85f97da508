//! Defects a review found in live use (issue 9): attachments whose record names collided,
//! STATUS wedging a node after a reboot, ports handed out twice, one bad record or one hung
//! daemon blocking a node, names shared between stores. Real namespaces, the real binary,
//! the real host-local and wireguard-go. Runs serially: host snapshots compare global state.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// `a-b` + `eth0` and `a` + `b-eth0` were one file (`a-b-eth0.json`): the second ADD tore the
/// first pod's link down. Both must live side by side, and a DEL of one must spare the other.
#[test]
fn attachments_whose_names_once_collided_live_side_by_side() {
    let net = Net::new("10.140.0.0/24");
    let (first, second) = (Pod::new(), Pod::new());
    let r1 = net
        .call_as("ADD", "a-b", "eth0", first.netns(), &net.conf())
        .ok()
        .json();
    let r2 = net
        .call_as("ADD", "a", "b-eth0", second.netns(), &net.conf())
        .ok()
        .json();
    assert!(first.links().contains("eth0"), "first pod lost its link");
    assert!(second.links().contains("b-eth0"));
    assert!(first.ping(&address_of(&r2, false)), "first → second");
    assert!(second.ping(&address_of(&r1, false)), "second → first");
    assert_eq!(net.records().len(), 2);

    net.call_as("DEL", "a", "b-eth0", second.netns(), &net.conf())
        .ok();
    assert!(
        first.links().contains("eth0"),
        "DEL of the other attachment removed this link"
    );
    let mut conf = net.with_prev(&r1);
    conf["cniVersion"] = "1.0.0".into();
    net.call_as("CHECK", "a-b", "eth0", first.netns(), &conf)
        .ok();
    net.call_as("DEL", "a-b", "eth0", first.netns(), &net.conf())
        .ok();
    assert!(net.records().is_empty());
}

/// After a reboot the records of the earlier boot remain and the gateway is gone. STATUS
/// must still succeed (an ADD would work), or CNI 1.1 runtimes never send that ADD.
#[test]
fn status_succeeds_after_a_reboot_left_records_and_no_gateway() {
    let mut net = Net::new("10.141.0.0/24");
    net.version = "1.1.0".into();
    let pod = Pod::new();
    net.add(&pod).ok();
    // Simulate the reboot: every record claims another boot, and the daemons are gone.
    pretend_earlier_boot(&net);
    stop_daemons_of(&net);
    net.call("STATUS", "", "", &net.conf()).ok();

    // The ADD that STATUS let through reaps the old records and recreates the gateway.
    let fresh = Pod::new();
    let result = net.add(&fresh).ok().json();
    assert_eq!(
        net.records().len(),
        1,
        "the earlier boot's record was not reaped"
    );
    let gateway_ip = result["ips"][0]["gateway"].as_str().map(str::to_string);
    let gateway_ip = gateway_ip.unwrap_or_else(|| "10.141.0.1".into());
    assert!(fresh.ping(&gateway_ip), "the gateway was not recreated");
    net.call("STATUS", "", "", &net.conf()).ok();
    net.del(&fresh, None).ok();
}

/// Rewrite every record of the network as written by another boot.
fn pretend_earlier_boot(net: &Net) {
    for file in record_files(net) {
        let mut record: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        record["bootId"] = "00000000-0000-0000-0000-000000000000".into();
        std::fs::write(&file, record.to_string()).unwrap();
        note_cleared_boot_before(file.parent().unwrap());
    }
}

/// The note of the boot whose ADDs found no record of an earlier boot left, as a reboot
/// leaves it: of the boot before (records of an earlier boot appear here without one).
fn note_cleared_boot_before(node_dir: &std::path::Path) {
    let note = node_dir.join(".cleared-boot.json");
    if note.exists() {
        std::fs::write(note, "\"00000000-0000-0000-0000-000000000000\"").unwrap();
    }
}

fn record_files(net: &Net) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for node in std::fs::read_dir(net.store().join(&net.name)).unwrap() {
        let node = node.unwrap().path();
        if !node.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&node).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.starts_with('.') {
                files.push(path);
            }
        }
    }
    files
}

/// Stop the wireguard-go daemons of the network's records (pods and gateway), as a reboot does.
fn stop_daemons_of(net: &Net) {
    for file in record_files(net) {
        let record: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        if let Some(pid) = record["daemonPid"].as_u64() {
            kill_daemon(pid);
        }
    }
}

fn kill_daemon(pid: u64) {
    let _ = run("kill", &["-9", &pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports: a link binds its port only when it comes up (wireguard-go up to a second after ADD
/// returns), so the node-wide ledger, not a bind probe, must keep two concurrent ADDs of two
/// networks from choosing one port.
#[test]
fn concurrent_adds_in_two_networks_never_share_a_port() {
    const PODS: usize = 20;
    // Two rounds; one where the suites run scaled down (the QEMU guest, under TCG).
    let scale: f64 = std::env::var("WG_CNI_ABUSE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let rounds = if scale < 1.0 { 1 } else { 2 };
    for round in 0..rounds {
        let nets = [Net::new("10.143.0.0/24"), Net::new("10.144.0.0/24")];
        let pods: Vec<Vec<Pod>> = (0..2)
            .map(|_| (0..PODS).map(|_| Pod::new()).collect())
            .collect();
        std::thread::scope(|scope| {
            for (net, pods) in nets.iter().zip(&pods) {
                for pod in pods {
                    scope.spawn(move || {
                        net.add(pod).ok();
                    });
                }
            }
        });
        let mut ports: Vec<u64> = Vec::new();
        for net in &nets {
            ports.extend(
                net.records()
                    .iter()
                    .map(|r| r["listenPort"].as_u64().unwrap()),
            );
            ports.push(
                net.gateway_record().unwrap()["listenPort"]
                    .as_u64()
                    .unwrap(),
            );
        }
        assert_eq!(ports.len(), 2 * PODS + 2);
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "round {round}: a port was handed out twice: {ports:?}"
        );
        // Every link really listens on its port once it is up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let unbound = || {
            let bound = host_udp_ports();
            ports
                .iter()
                .filter(|p| !bound.contains(&(**p as u16)))
                .count()
        };
        while unbound() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            unbound(),
            0,
            "round {round}: some links never bound their port"
        );
        std::thread::scope(|scope| {
            for (net, pods) in nets.iter().zip(&pods) {
                for pod in pods {
                    scope.spawn(move || {
                        net.del(pod, None).ok();
                    });
                }
            }
        });
        for net in &nets {
            assert!(net.records().is_empty());
            assert!(net.gateway_record().is_none());
        }
    }
}

/// An ADD killed between creating the link and keying it leaves a key-less link (kernel) or
/// daemon (userspace) and a `creating` record: DEL must remove all of it.
#[test]
fn an_add_killed_before_the_key_is_set_is_cleaned_by_del() {
    let net = Net::new("10.145.0.0/24");
    let (resident, pod) = (Pod::new(), Pod::new());
    // The gateway exists already: the failpoint must hit the pod's link, not the gateway's.
    net.add(&resident).ok();
    let before = HostSnapshot::take();
    let out = net.call_env(
        "ADD",
        &pod,
        &[("WG_CNI_FAILPOINT", "after-link-created")],
        &net.conf(),
    );
    assert_ne!(out.code, 0, "the ADD was meant to die");
    assert!(
        out.stdout.is_empty(),
        "a killed ADD prints nothing: {}",
        out.stdout
    );
    assert_eq!(
        net.records().len(),
        2,
        "the creating record proves the link ours"
    );
    net.del(&pod, None).ok();
    assert_eq!(
        pod.links().into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()],
        "DEL left the key-less link in the pod"
    );
    assert_eq!(net.records().len(), 1);
    assert_eq!(net.reservations().len(), 1);
    wait_until(|| HostSnapshot::take() == before);
    assert_eq!(HostSnapshot::take(), before);
    net.del(&resident, None).ok();
}

/// Adding the newcomer to the node gateway fails: the ADD must fail and undo everything,
/// not report success while kubelet probes cannot reach the pod.
#[test]
fn an_add_whose_gateway_update_fails_rolls_back() {
    let net = Net::new("10.146.0.0/24");
    let (resident, pod) = (Pod::new(), Pod::new());
    net.add(&resident).ok();
    let records = net.records().len();
    let reserved = net.reservations();
    let out = net.call_env(
        "ADD",
        &pod,
        &[("WG_CNI_FAILPOINT", "gateway-update")],
        &net.conf(),
    );
    assert_eq!(out.error_code(), 102, "{}", out.stdout);
    assert_eq!(
        pod.links().into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()]
    );
    assert_eq!(net.records().len(), records);
    assert_eq!(net.reservations(), reserved);
    let r = net.add(&pod).ok().json();
    assert!(
        host_ping(&address_of(&r, false)),
        "the host cannot reach the pod after a clean ADD"
    );
    net.del(&pod, None).ok();
    net.del(&resident, None).ok();
}

/// One unreadable or invalid record (garbage, a bad key, a bad address) must not block ADD,
/// DEL, GC or `show` on the node.
#[test]
fn bad_records_are_skipped_not_fatal() {
    let mut net = Net::new("10.147.0.0/24");
    net.version = "1.1.0".into();
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let node_dir = record_files(&net)
        .into_iter()
        .find(|p| !p.ends_with("gateway.json"))
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let good = net.record_of(&a).unwrap();
    std::fs::write(node_dir.join("junk:eth0.json"), b"{not json").unwrap();
    let mut bad_key = good.clone();
    bad_key["containerId"] = "badkey".into();
    bad_key["publicKey"] = "not-a-key".into();
    bad_key["bootId"] = "00000000-0000-0000-0000-000000000000".into();
    std::fs::write(node_dir.join("badkey:eth0.json"), bad_key.to_string()).unwrap();
    note_cleared_boot_before(&node_dir);
    let mut bad_address = good.clone();
    bad_address["containerId"] = "badaddr".into();
    bad_address["addresses"] = json!(["300.1.2.3/24"]);
    std::fs::write(node_dir.join("badaddr:eth0.json"), bad_address.to_string()).unwrap();

    let rb = net.add(&b).ok().json();
    assert!(a.ping(&address_of(&rb, false)) && b.ping(&address_of(&ra, false)));
    assert!(
        !node_dir.join("badkey:eth0.json").exists(),
        "the earlier boot's record was not reaped"
    );
    let shown = net.show_json();
    assert_eq!(
        shown["networks"][0]["attachments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    net.del(&b, None).ok();
    let mut conf = net.conf();
    conf["cni.dev/valid-attachments"] = json!([{"containerID": a.id, "ifname": "eth0"}]);
    net.call("GC", "", "", &conf).ok();
    net.check(&a, &ra).ok();
    net.del(&a, None).ok();
    std::fs::remove_file(node_dir.join("junk:eth0.json")).unwrap();
    std::fs::remove_file(node_dir.join("badaddr:eth0.json")).unwrap();
}

/// A daemon that accepts on its UAPI socket and never answers (here: stopped with SIGSTOP)
/// must not hang DEL, CHECK or STATUS; DEL of it still cleans up.
#[test]
fn a_hung_daemon_hangs_nothing() {
    only_on("userspace"); // the kernel backend has no daemon
    let mut net = Net::new("10.148.0.0/24");
    net.version = "1.1.0".into();
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    net.add(&b).ok();
    let pid = net.record_of(&a).unwrap()["daemonPid"]
        .as_u64()
        .unwrap()
        .to_string();
    run_ok("kill", &["-STOP", &pid]);
    let bounded = |what: &str, f: &dyn Fn() -> CniOutput| {
        let started = Instant::now();
        let out = f();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} took {:?}",
            started.elapsed()
        );
        out
    };
    bounded("DEL of the other pod", &|| net.del(&b, None)).ok();
    let check = bounded("CHECK", &|| net.check(&a, &ra));
    assert_eq!(check.error_code(), 103, "{}", check.stdout);
    bounded("STATUS", &|| net.call("STATUS", "", "", &net.conf())).ok();
    bounded("DEL of the hung pod", &|| net.del(&a, None)).ok();
    let _ = run("kill", &["-CONT", &pid]);
    assert!(net.records().is_empty());
    wait_until(|| !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()));
    assert!(
        !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()),
        "the hung daemon survived its DEL"
    );
}

/// Two stores on one host using the same network name (two runtimes, two simulated nodes)
/// must not share gateway names, NAT rules or attachments.
#[test]
fn two_stores_with_one_network_name_stay_apart() {
    let mut first = Net::new("10.149.0.0/24");
    first.version = "1.1.0".into();
    let mut second = Net::new("10.150.0.0/24");
    second.version = "1.1.0".into();
    second.name = first.name.clone();
    let (a, b) = (Pod::new(), Pod::new());
    let ra = first.add(&a).ok().json();
    let rb = second.add(&b).ok().json();
    let (ga, gb) = (
        first.gateway_record().unwrap(),
        second.gateway_record().unwrap(),
    );
    assert_ne!(ga["hostName"], gb["hostName"]);
    assert!(
        host_ping(&address_of(&ra, false)),
        "the second store's ADD broke the first's gateway"
    );
    assert!(host_ping(&address_of(&rb, false)));

    // GC of the first store with an empty list, then its last DEL: the second is untouched.
    let mut conf = first.conf();
    conf["cni.dev/valid-attachments"] = json!([]);
    first.call("GC", "", "", &conf).ok();
    assert!(first.gateway_record().is_none());
    assert!(
        host_ping(&address_of(&rb, false)),
        "GC of one store broke the other"
    );
    assert!(nat_rules().contains(gb["hostName"].as_str().unwrap()));
    second.del(&b, None).ok();
}

/// libcni 1.3's GC sends no `cni.dev/valid-attachments` when its caller passes none (and the
/// old alias `cni.dev/attachments`). Neither may fail; without a list only the provably dead
/// go. (libcni 1.3 is not packaged for Debian 12: the test sends the same JSON it sends.)
#[test]
fn gc_without_a_list_removes_only_the_dead_and_accepts_the_alias() {
    let mut net = Net::new("10.151.0.0/24");
    net.version = "1.1.0".into();
    let (a, b, c) = (Pod::new(), Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    net.add(&b).ok();
    net.add(&c).ok();
    run_ok(ip(), &["netns", "del", &b.name]);
    net.call("GC", "", "", &net.conf()).ok();
    let kept: Vec<String> = net
        .records()
        .iter()
        .map(|r| r["containerId"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kept.contains(&a.id) && kept.contains(&c.id),
        "GC removed a live pod: {kept:?}"
    );
    assert!(!kept.contains(&b.id), "GC kept the pod whose netns is gone");

    let mut conf = net.conf();
    conf["cni.dev/attachments"] = json!([{"containerID": a.id, "ifname": "eth0"}]);
    net.call("GC", "", "", &conf).ok();
    assert_eq!(net.records().len(), 1);
    net.check(&a, &ra).ok();
    net.del(&a, None).ok();
}

/// Small ones: a secondary network does not take the pod's default route; an MTU below 1280
/// with IPv6 addresses and a mistyped `dns` are config errors. (A fwmark or a port outside
/// listenPorts set by the pod: security.rs, CHECK reports tampering.)
#[test]
fn small_config_and_route_defects() {
    // The pod already has a default route through another link (its primary network).
    let net = Net::new("10.152.0.0/24");
    let pod = Pod::new();
    // (a veth pair inside the pod: this host's kernel has no dummy links)
    pod.ip(&[
        "link", "add", "primary0", "type", "veth", "peer", "name", "primary1",
    ]);
    pod.ip(&["link", "set", "primary0", "up"]);
    pod.ip(&["addr", "add", "192.0.2.2/24", "dev", "primary0"]);
    pod.ip(&["route", "add", "default", "dev", "primary0"]);
    let r = net.add(&pod).ok().json();
    let routes = pod.ip(&["-4", "route", "show", "default"]);
    assert!(
        routes.contains("primary0") && !routes.contains("eth0"),
        "default route taken: {routes}"
    );
    let result_routes = r["routes"].as_array().cloned().unwrap_or_default();
    assert!(
        !result_routes.iter().any(|x| x["dst"] == "0.0.0.0/0"),
        "{r}"
    );
    net.del(&pod, None).ok();
    assert!(
        pod.ip(&["-4", "route", "show", "default"])
            .contains("primary0")
    );

    let v6 = Net::new("fd52::/64");
    let mut conf = v6.conf();
    conf["mtu"] = json!(1200);
    let pod6 = Pod::new();
    let out = v6.call("ADD", &pod6.id, pod6.netns(), &conf);
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert!(out.error_msg().contains("mtu"), "{}", out.error_msg());
    assert!(v6.reservations().is_empty() && v6.records().is_empty());

    let mut conf = net.conf();
    conf["dns"] = json!({"nameservers": "10.0.0.10"});
    let out = net.call("ADD", &pod6.id, pod6.netns(), &conf);
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert!(out.error_msg().contains("dns"), "{}", out.error_msg());
}

fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}
