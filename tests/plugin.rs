//! The plugin's contract, exercised the way runtimes call it: real namespaces, the real
//! binary, the real host-local. Runs serially (`--test-threads=1`): host snapshots compare
//! global state.

mod common;

use common::*;
use serde_json::{Value, json};

fn sandbox_links_are_lo_and_eth0(pod: &Pod) {
    let links: Vec<String> = pod.links().into_iter().collect();
    assert_eq!(
        links,
        vec!["eth0".to_string(), "lo".to_string()],
        "pod links"
    );
}

#[test]
fn two_pods_talk_over_the_tunnel_and_del_removes_everything() {
    let net = Net::new("10.70.0.0/24");
    let (a, b) = (Pod::new(), Pod::new());
    let before = HostSnapshot::take();

    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    // The host gains the network's gateway link and nothing else (no stray empty WireGuard
    // link: the pods' links live in the pods).
    let gateway = net.gateway_record().expect("a gateway record");
    let mut with_gateway = before.links.clone();
    with_gateway.insert(gateway["hostName"].as_str().unwrap().to_string());
    assert_eq!(host_links(), with_gateway, "host links after ADD");
    for pod in [&a, &b] {
        sandbox_links_are_lo_and_eth0(pod);
        let details = pod.link_details("eth0");
        assert!(details.contains(expected_kind()), "{details}");
        assert!(details.contains("mtu 1420"), "{details}");
    }
    assert_eq!(ra["interfaces"][0]["sandbox"], a.netns());
    let (ip_a, ip_b) = (address_of(&ra, false), address_of(&rb, false));
    assert!(a.ping(&ip_b), "a cannot ping b over the tunnel");
    assert!(b.ping(&ip_a), "b cannot ping a over the tunnel");

    // The UDP socket lives in the host namespace, never in the pod.
    let port = net.record_of(&a).unwrap()["listenPort"].as_u64().unwrap() as u16;
    assert!(
        host_udp_ports().contains(&port),
        "port {port} not bound in the host"
    );
    assert!(
        a.udp_ports().is_empty(),
        "pod has UDP sockets: {:?}",
        a.udp_ports()
    );

    // show: both attachments, each with the other pod (recent handshake) and the gateway.
    let show = net.show_json();
    let attachments = show["networks"][0]["attachments"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(attachments.len(), 2);
    for attachment in &attachments {
        let peers = attachment["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{attachment}");
        let pod_peer = peers
            .iter()
            .find(|p| p["publicKey"] != gateway["publicKey"])
            .expect("the other pod");
        let ago = pod_peer["latestHandshakeSecondsAgo"]
            .as_u64()
            .expect("a handshake");
        assert!(ago < 60, "handshake {ago} s ago");
        assert!(pod_peer["rxBytes"].as_u64().unwrap() > 0);
    }
    let text = run_ok(
        binary().to_str().unwrap(),
        &["show", "--store", net.store().to_str().unwrap()],
    );
    assert!(
        text.contains(&net.name) && text.contains("latest handshake"),
        "{text}"
    );

    // CHECK passes, then names the missing address once it is removed.
    net.check(&a, &ra).ok();
    let cidr = ra["ips"][0]["address"].as_str().unwrap();
    a.ip(&["addr", "del", cidr, "dev", "eth0"]);
    let failed = net.check(&a, &ra);
    assert_ne!(failed.code, 0);
    assert!(failed.error_msg().contains(cidr), "{}", failed.error_msg());

    // DEL: link, daemon, record and reservation go; b loses a as a peer.
    let host_name = net.record_of(&a).unwrap()["hostName"]
        .as_str()
        .unwrap()
        .to_string();
    net.del(&a, Some(&ra)).ok();
    assert_eq!(
        a.links().into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()]
    );
    assert_eq!(daemons_named(&host_name), 0);
    assert!(net.record_of(&a).is_none());
    assert!(!net.reservations().contains(&ip_a));
    assert!(!host_udp_ports().contains(&port));
    let show = net.show_json();
    let b_peers = show["networks"][0]["attachments"][0]["peers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(b_peers.len(), 1, "b still has a as a peer: {b_peers:?}");
    assert_eq!(b_peers[0]["publicKey"], gateway["publicKey"]);

    // containerd's second DEL: empty netns, no prevResult.
    net.call("DEL", &a.id, "", &net.conf()).ok();
    net.call("DEL", &a.id, "", &net.conf()).ok();

    net.del(&b, Some(&rb)).ok();
    assert!(net.reservations().is_empty());
    assert_eq!(HostSnapshot::take(), before);
}

#[test]
fn add_into_a_pod_that_has_the_interface_fails_and_del_leaves_it() {
    let net = Net::new("10.71.0.0/24");
    let pod = Pod::new();
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let before = HostSnapshot::take();

    let out = net.add(&pod);
    assert_eq!(out.error_code(), 100);
    assert!(out.error_msg().contains("eth0"), "{}", out.error_msg());
    assert!(net.reservations().is_empty(), "IPAM reservation leaked");
    assert!(net.records().is_empty(), "store record leaked");
    assert_eq!(HostSnapshot::take(), before);

    net.del(&pod, None).ok();
    assert!(
        pod.link_details("eth0").contains("veth"),
        "DEL removed someone else's link"
    );
}

#[test]
fn every_spec_version_gets_its_result_shape() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let mut net = Net::new("10.72.0.0/24");
        net.version = version.into();
        net.extra = json!({"dns": {"nameservers": ["10.72.0.53"], "search": ["svc.local"]}});
        let pod = Pod::new();
        let result = net.add(&pod).ok().json();
        assert_eq!(result["cniVersion"], version);
        // The default route into the tunnel, as a device route (no gateway), and the dns.
        assert_eq!(
            result["routes"],
            json!([{"dst": "0.0.0.0/0"}]),
            "{version}: {result}"
        );
        assert_eq!(
            result["dns"],
            json!({"nameservers": ["10.72.0.53"], "search": ["svc.local"]}),
            "{version}: {result}"
        );
        assert!(
            pod.ip(&["-4", "route", "show", "default"])
                .contains("dev eth0")
        );
        let ip = &result["ips"][0];
        assert_eq!(
            ip.get("version").is_some(),
            version.starts_with("0."),
            "{version}: {result}"
        );
        if version.starts_with("0.") {
            assert_eq!(ip["version"], "4");
        }
        let iface = &result["interfaces"][0];
        assert_eq!(iface["name"], "eth0");
        assert_eq!(
            iface.get("mtu").is_some(),
            version == "1.1.0",
            "{version}: {result}"
        );
        assert_eq!(ip["interface"], 0);
        if version != "0.3.0" && version != "0.3.1" {
            net.check(&pod, &result).ok();
        }
        net.del(&pod, Some(&result)).ok();
        assert!(net.reservations().is_empty());
    }
}

/// With a 1.1.0 config the IPAM plugin (Debian's host-local stops at 1.0.0) is asked VERSION
/// once, not by every command: its answer is remembered until its binary is replaced.
#[test]
fn the_ipam_plugin_is_asked_its_versions_once_not_per_command() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let wrapper = dir.path().join("counting-ipam");
    let install = |body: &str| {
        // A new file renamed into place, as a package upgrade does.
        let new = dir.path().join("counting-ipam.new");
        std::fs::write(&new, body).unwrap();
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, &wrapper).unwrap();
    };
    let script = format!(
        "#!/bin/sh\necho \"$CNI_COMMAND\" >> {}\nexec {}/host-local \"$@\"\n",
        calls.display(),
        plugin_dir().display()
    );
    install(&script);
    let mut net = Net::new("10.73.0.0/24");
    net.version = "1.1.0".into();
    let mut conf = net.conf();
    conf["ipam"]["type"] = "counting-ipam".into();
    let path = format!("{}:{}", dir.path().display(), plugin_dir().display());
    let env = [("CNI_PATH", path.as_str())];
    let called = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    let pods = [Pod::new(), Pod::new()];
    for pod in &pods {
        net.call_env("ADD", pod, &env, &conf).ok();
    }
    for pod in &pods {
        net.call_env("DEL", pod, &env, &conf).ok();
    }
    assert_eq!(called(), ["VERSION", "ADD", "ADD", "DEL", "DEL"]);

    install(&format!("{script}# upgraded\n"));
    net.call_env("ADD", &pods[0], &env, &conf).ok();
    net.call_env("DEL", &pods[0], &env, &conf).ok();
    assert_eq!(called()[5..], ["VERSION", "ADD", "DEL"]);
    assert!(net.reservations().is_empty());
}

/// wg-cni-wgd (the default) and wireguard-go serve pods of one network side by side, and
/// talk to each other: the wire protocol is WireGuard's either way.
#[test]
fn both_userspace_daemons_carry_traffic_between_each_other() {
    only_on("userspace");
    let mut net = Net::new("10.71.0.0/24");
    let (ours, go) = (Pod::new(), Pod::new());
    let r_ours = net.add(&ours).ok().json();
    net.extra = json!({"userspaceDaemon": "wireguard-go"});
    let r_go = net.add(&go).ok().json();
    let daemon_of = |pod: &Pod| {
        let pid = net.record_of(pod).unwrap()["daemonPid"].as_u64().unwrap();
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(daemon_of(&ours), "wg-cni-wgd");
    assert_eq!(daemon_of(&go), "wireguard-go");
    assert!(ours.ping(&address_of(&r_go, false)));
    assert!(go.ping(&address_of(&r_ours, false)));
    net.check(&ours, &r_ours).ok();
    net.check(&go, &r_go).ok();
    net.del(&go, Some(&r_go)).ok();
    net.extra = json!({});
    net.del(&ours, Some(&r_ours)).ok();
}

#[test]
fn dual_stack_pods_get_both_families_and_ping6() {
    let net = Net::with_ranges(json!([
        [{"subnet": "10.73.0.0/24"}],
        [{"subnet": "fd73::/64"}]
    ]));
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    assert_eq!(ra["ips"].as_array().unwrap().len(), 2);
    assert!(
        a.ping(&address_of(&rb, true)),
        "no IPv6 over the tunnel a -> b"
    );
    assert!(
        b.ping(&address_of(&ra, true)),
        "no IPv6 over the tunnel b -> a"
    );
    assert!(a.ping(&address_of(&rb, false)));
    net.check(&a, &ra).ok();
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

#[test]
fn mesh_follows_adds_and_dels() {
    let net = Net::new("10.74.0.0/24");
    let pods = [Pod::new(), Pod::new(), Pod::new()];
    let r0 = net.add(&pods[0]).ok().json();
    let r1 = net.add(&pods[1]).ok().json();
    let peers_of = |net: &Net| -> Vec<usize> {
        net.show_json()["networks"][0]["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["peers"].as_array().unwrap().len())
            .collect()
    };
    // Each pod: the other pods and the gateway.
    assert_eq!(peers_of(&net), vec![2, 2]);
    let r2 = net.add(&pods[2]).ok().json();
    assert_eq!(peers_of(&net), vec![3, 3, 3]);
    // And exactly the right ones: every other pod by its key, allowed only its own /32;
    // the gateway by its key with the default route.
    let shown = net.show_json();
    let attachments = shown["networks"][0]["attachments"]
        .as_array()
        .unwrap()
        .clone();
    let gateway_key = net.gateway_record().unwrap()["publicKey"].clone();
    for me in &attachments {
        for other in attachments
            .iter()
            .filter(|o| o["publicKey"] != me["publicKey"])
        {
            let peer = me["peers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["publicKey"] == other["publicKey"])
                .unwrap_or_else(|| {
                    panic!("{} lacks peer {}", me["containerId"], other["containerId"])
                });
            let own = other["addresses"][0]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap();
            assert_eq!(peer["allowedIps"], json!([format!("{own}/32")]));
        }
        let gateway = me["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["publicKey"] == gateway_key)
            .expect("the gateway peer");
        assert_eq!(gateway["allowedIps"], json!(["0.0.0.0/0"]));
    }
    assert!(
        pods[0].ping(&address_of(&r2, false)),
        "first pod cannot reach the third"
    );
    net.check(&pods[0], &r0).ok();
    net.del(&pods[2], Some(&r2)).ok();
    assert_eq!(peers_of(&net), vec![2, 2]);
    // CHECK compares peers with the store: still consistent after the DEL.
    net.check(&pods[1], &r1).ok();
}

/// Hides a userspace link's control socket while it lives, so the link refuses every update.
struct HiddenSocket(std::path::PathBuf);

impl HiddenSocket {
    fn of(record: &Value) -> HiddenSocket {
        let name = record["hostName"].as_str().unwrap();
        let socket = std::path::PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
        std::fs::rename(&socket, socket.with_extension("hidden")).unwrap();
        HiddenSocket(socket)
    }
}

impl Drop for HiddenSocket {
    fn drop(&mut self) {
        let _ = std::fs::rename(self.0.with_extension("hidden"), &self.0);
    }
}

#[test]
fn a_pod_that_missed_a_new_peer_gets_it_from_the_next_add() {
    only_on("userspace"); // the refusal is staged by hiding a daemon's control socket
    let net = Net::new("10.77.0.0/24");
    let pods = [Pod::new(), Pod::new(), Pod::new()];
    let r0 = net.add(&pods[0]).ok().json();
    let record = net.record_of(&pods[0]).unwrap();
    let hidden = HiddenSocket::of(&record);
    // Pod 0 refuses the newcomer: the ADD still succeeds (the gateway took it).
    let r1 = net.add(&pods[1]).ok().json();
    drop(hidden);
    assert!(
        !pods[1].ping(&address_of(&r0, false)),
        "pod 0 answers a peer it was never given"
    );
    let check = net.check(&pods[0], &r0);
    assert_ne!(check.code, 0, "CHECK missed the lacking peer");
    // The message says whose key is missing, so a person knows which pod to look at.
    let newcomer = net.record_of(&pods[1]).unwrap();
    assert!(
        check.error_msg().contains(&format!(
            "{} (pod test, container {}:eth0 on ",
            newcomer["publicKey"].as_str().unwrap(),
            newcomer["containerId"].as_str().unwrap()
        )),
        "CHECK does not name the missing peer's pod: {}",
        check.error_msg()
    );

    let r2 = net.add(&pods[2]).ok().json();
    net.check(&pods[0], &r0).ok();
    // Pod 1's handshake was dropped before: WireGuard retries it after 5 s.
    let answered = pods[1].exec(&["ping", "-c", "1", "-w", "8", &address_of(&r0, false)]);
    assert!(
        answered.status.success(),
        "the next ADD did not give pod 0 the peer it missed"
    );
    for (pod, result) in pods.iter().zip([&r0, &r1, &r2]) {
        net.del(pod, Some(result)).ok();
    }
}

#[test]
fn a_failure_after_the_link_exists_rolls_everything_back() {
    // IPv6 disabled in the pod: adding the IPv6 address fails after link and daemon exist.
    let net = Net::with_ranges(json!([
        [{"subnet": "10.75.0.0/24"}],
        [{"subnet": "fd75::/64"}]
    ]));
    let pod = Pod::new();
    pod.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    pod.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    let before = HostSnapshot::take();
    let out = net.add(&pod);
    assert_ne!(out.code, 0, "ADD should fail: {}", out.stdout);
    assert!(out.error_msg().contains("fd75"), "{}", out.error_msg());
    assert_eq!(
        pod.links().into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()]
    );
    assert!(net.reservations().is_empty(), "IPAM reservation leaked");
    assert!(net.records().is_empty(), "record leaked");
    assert_eq!(HostSnapshot::take(), before);
}

#[test]
fn a_full_port_range_is_code_11_and_rolls_back_ipam() {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let mut net = Net::new("10.76.0.0/24");
    net.extra = json!({"listenPorts": format!("{port}-{port}")});
    let pod = Pod::new();
    let before = HostSnapshot::take();
    let out = net.add(&pod);
    assert_eq!(out.error_code(), 11);
    assert!(
        out.error_msg().contains("listenPorts"),
        "{}",
        out.error_msg()
    );
    assert!(net.reservations().is_empty());
    assert!(net.records().is_empty());
    assert_eq!(HostSnapshot::take(), before);
}

#[test]
fn a_1_1_0_config_works_with_debians_host_local() {
    let mut net = Net::new("10.77.0.0/24");
    net.version = "1.1.0".into();
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][0]["mtu"], 1420);
    assert!(a.ping(&address_of(&rb, false)));
    net.call("STATUS", "", "", &net.conf()).ok();
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

#[test]
fn status_is_50_when_the_ipam_plugin_is_missing() {
    let mut net = Net::new("10.78.0.0/24");
    net.version = "1.1.0".into();
    let empty = tempfile::tempdir().unwrap();
    let out = cni_raw(
        &[
            ("CNI_COMMAND", "STATUS"),
            ("CNI_PATH", empty.path().to_str().unwrap()),
        ],
        net.conf().to_string().as_bytes(),
    );
    assert_eq!(out.error_code(), 50);
    assert!(
        out.error_msg().contains("host-local"),
        "{}",
        out.error_msg()
    );
}

#[test]
fn gc_removes_unlisted_attachments_and_leaves_other_nodes_alone() {
    let mut net = Net::new("10.79.0.0/24");
    net.version = "1.1.0".into();
    let (keep, stale) = (Pod::new(), Pod::new());
    let rk = net.add(&keep).ok().json();
    let rs = net.add(&stale).ok().json();
    let rs_key = net.record_of(&stale).unwrap()["publicKey"].clone();

    // A record another node's agent synced into the store.
    let mine = net.record_of(&keep).unwrap();
    let mut foreign = mine.clone();
    foreign["node"] = "other-node".into();
    foreign["containerId"] = "remote-pod".into();
    foreign["addresses"] = json!(["10.79.0.200/24"]);
    let foreign_dir = net.store().join(&net.name).join("other-node");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let foreign_file = foreign_dir.join("remote-pod:eth0.json");
    std::fs::write(&foreign_file, foreign.to_string()).unwrap();

    let mut conf = net.conf();
    conf["cni.dev/valid-attachments"] = json!([{"containerID": keep.id, "ifname": "eth0"}]);
    let path = plugin_dir();
    cni_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", path.to_str().unwrap())],
        conf.to_string().as_bytes(),
    )
    .ok();

    assert!(net.record_of(&stale).is_none(), "stale record kept");
    assert_eq!(
        stale.links().into_iter().collect::<Vec<_>>(),
        vec!["lo".to_string()]
    );
    assert!(!net.reservations().contains(&address_of(&rs, false)));
    assert!(net.record_of(&keep).is_some());
    assert!(foreign_file.exists(), "GC touched another node's record");
    assert_eq!(keep.links().len(), 2);
    // The kept pod still works, and neither it nor the gateway still lists the stale peer.
    net.check(&keep, &rk).ok();
    let stale_key = net.show_json()["networks"][0]["attachments"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["publicKey"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let gone = rs_key.as_str().unwrap();
    assert!(
        !stale_key.iter().any(|k| k == gone),
        "the kept pod still peers with the stale one"
    );
    let gateway = net.gateway_record().unwrap();
    let gateway_peers = run_ok(
        "wg",
        &["show", gateway["hostName"].as_str().unwrap(), "peers"],
    );
    assert!(
        !gateway_peers.contains(gone),
        "the gateway still peers with the stale pod"
    );
    assert!(gateway_peers.contains(net.record_of(&keep).unwrap()["publicKey"].as_str().unwrap()));
    std::fs::remove_file(&foreign_file).unwrap();
    net.del(&keep, Some(&rk)).ok();
}

#[test]
fn bad_input_gets_the_right_code_and_changes_nothing() {
    let net = Net::new("10.80.0.0/24");
    let pod = Pod::new();
    let path = plugin_dir();
    let path = path.to_str().unwrap();
    let good = net.conf();
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        c[field] = value;
        c.to_string()
    };
    let env = |netns: &str, ifname: &str| {
        vec![
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", pod.id.clone()),
            ("CNI_NETNS", netns.to_string()),
            ("CNI_IFNAME", ifname.to_string()),
            ("CNI_PATH", path.to_string()),
        ]
    };
    // (what, env, stdin, expected code, text the message must name)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "truncated JSON",
            env(pod.netns(), "eth0"),
            good.to_string()[..20].to_string(),
            6,
            "JSON",
        ),
        (
            "unknown cniVersion",
            env(pod.netns(), "eth0"),
            with("cniVersion", json!("9.9.9")),
            1,
            "9.9.9",
        ),
        (
            "mtu as string",
            env(pod.netns(), "eth0"),
            with("mtu", json!("big")),
            7,
            "mtu",
        ),
        (
            "bad endpoint",
            env(pod.netns(), "eth0"),
            with("endpoint", json!("nowhere")),
            7,
            "endpoint",
        ),
        (
            "bad port range",
            env(pod.netns(), "eth0"),
            with("listenPorts", json!("9-1")),
            7,
            "listenPorts",
        ),
        (
            "missing netns",
            env("/var/run/netns/does-not-exist", "eth0"),
            good.to_string(),
            4,
            "CNI_NETNS",
        ),
        (
            "netns is a file",
            env("/etc/hostname", "eth0"),
            good.to_string(),
            4,
            "CNI_NETNS",
        ),
        (
            "ifname too long",
            env(pod.netns(), "abcdefghijklmnop"),
            good.to_string(),
            4,
            "CNI_IFNAME",
        ),
        (
            "unknown ipam",
            env(pod.netns(), "eth0"),
            with("ipam", json!({"type": "nope"})),
            7,
            "ipam.type",
        ),
    ];
    let before = HostSnapshot::take();
    for (what, env, stdin, code, names) in cases {
        let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = cni_raw(&env_refs, stdin.as_bytes());
        assert_eq!(out.error_code(), code, "{what}: {}", out.stdout);
        assert!(
            out.error_msg().contains(names),
            "{what}: {}",
            out.error_msg()
        );
    }
    assert_eq!(HostSnapshot::take(), before);
    assert!(net.records().is_empty() && net.reservations().is_empty());
    assert_eq!(pod.links().len(), 1);
}

#[test]
fn version_lists_every_supported_version() {
    let out = cni_raw(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#);
    let v = out.ok().json();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn records_from_an_earlier_boot_are_reaped_with_their_reservation() {
    let net = Net::new("10.81.0.0/24");
    let (first, second) = (Pod::new(), Pod::new());
    let r1 = net.add(&first).ok().json();

    // A pod of an earlier boot: host-local still holds its address, its record is on disk.
    let mut ipam_conf = net.conf();
    ipam_conf["type"] = "host-local".into();
    let ghost = other_plugin(
        "host-local",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ghost"),
            ("CNI_NETNS", "/var/run/netns/gone"),
            ("CNI_IFNAME", "eth0"),
        ],
        &ipam_conf,
    );
    let ghost_ip = address_of(&ghost, false);
    assert!(net.reservations().contains(&ghost_ip));
    let mut record = net.record_of(&first).unwrap();
    record["containerId"] = "ghost".into();
    record["bootId"] = "an-earlier-boot".into();
    record["netns"] = "/var/run/netns/gone".into();
    record["hostName"] = "wgc000000000000".into();
    record["daemonPid"] = serde_json::Value::Null;
    record["publicKey"] = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into();
    record["addresses"] = json!([format!("{ghost_ip}/24")]);
    let node = record["node"].as_str().unwrap().to_string();
    let node_dir = net.store().join(&net.name).join(node);
    // Filed under the name versions before 0.2 used: an upgrade must still reap it.
    let file = node_dir.join("ghost-eth0.json");
    std::fs::write(&file, record.to_string()).unwrap();
    // ADD looks for records of an earlier boot until one of this boot found none; it noted so,
    // and a reboot leaves that note of the boot before.
    let note = node_dir.join(".cleared-boot.json");
    assert!(
        note.exists(),
        "the first ADD noted that no earlier boot is left"
    );
    std::fs::write(&note, "\"an-earlier-boot\"").unwrap();

    let r2 = net.add(&second).ok().json();
    assert!(!file.exists(), "the earlier boot's record was not reaped");
    assert!(
        !net.reservations().contains(&ghost_ip),
        "its reservation was not released"
    );
    assert!(first.ping(&address_of(&r2, false)));
    net.del(&first, Some(&r1)).ok();
    net.del(&second, Some(&r2)).ok();
}

/// The agent rewrites whole peers (each resync) and turns a new remote peer's keepalive on and
/// off again to start its handshake at once. Both must behave as the kernel's `wg set` does,
/// on every backend: turning keepalive on sends right away, and rewriting a peer with a live
/// session keeps the session (a daemon that re-creates the peer drops its keys, counters and
/// handshake, and the next packet waits for a new one).
#[test]
fn a_rewritten_peer_keeps_its_session_and_keepalive_on_starts_a_handshake() {
    let net = Net::new("10.74.0.0/24");
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    let host_a = net.record_of(&a).unwrap()["hostName"]
        .as_str()
        .unwrap()
        .to_string();
    let key_b = net.record_of(&b).unwrap()["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let handshake = || wg_value(&a, &host_a, "latest-handshakes", &key_b).expect("a has b");
    assert_eq!(handshake(), "0", "no traffic yet, no handshake");

    wg(
        &a,
        &host_a,
        &["set", "peer", &key_b, "persistent-keepalive", "1"],
    );
    wg(
        &a,
        &host_a,
        &["set", "peer", &key_b, "persistent-keepalive", "0"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while handshake() == "0" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_ne!(
        handshake(),
        "0",
        "turning keepalive on started no handshake within 5 s"
    );

    assert!(a.ping(&address_of(&rb, false)));
    let (shook, transfer) = (
        handshake(),
        wg_value(&a, &host_a, "transfer", &key_b).unwrap(),
    );
    let allowed = wg_value(&a, &host_a, "allowed-ips", &key_b)
        .unwrap()
        .replace(' ', ",");
    let endpoint = wg_value(&a, &host_a, "endpoints", &key_b).unwrap();
    wg(
        &a,
        &host_a,
        &[
            "set",
            "peer",
            &key_b,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "0",
        ],
    );
    assert_eq!(handshake(), shook, "the rewrite dropped the session");
    assert_eq!(
        wg_value(&a, &host_a, "transfer", &key_b).unwrap(),
        transfer,
        "the rewrite reset the peer's counters"
    );
    assert!(a.ping(&address_of(&rb, false)));
    assert_eq!(
        handshake(),
        shook,
        "traffic after the rewrite needed a new handshake"
    );
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}
