//! The node gateway: the host reaches pods (kubelet probes), a Service's DNAT works between
//! pods (hairpin), pods reach the outside through `ipMasq`, static peers, a gone gateway (CHECK fails, STATUS does not) and the
//! gateway's life cycle. Runs serially like tests/plugin.rs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wireguard_control::Key;

fn ip_of(result: &Value) -> IpAddr {
    address_of(result, false).parse().unwrap()
}

/// An iptables rule added by a test, removed on drop.
struct TestRule(Vec<String>);

impl TestRule {
    fn add(args: &[&str]) -> TestRule {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut add = vec!["-t".to_string(), "nat".into(), "-A".into()];
        add.extend(args.iter().cloned());
        let refs: Vec<&str> = add.iter().map(String::as_str).collect();
        run_ok("iptables", &refs);
        TestRule(args)
    }
}

impl Drop for TestRule {
    fn drop(&mut self) {
        let mut del = vec!["-t".to_string(), "nat".into(), "-D".into()];
        del.extend(self.0.iter().cloned());
        let refs: Vec<&str> = del.iter().map(String::as_str).collect();
        let _ = run("iptables", &refs);
    }
}

/// A link the test made in the host namespace, deleted on drop.
struct HostLink(String);

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = run(ip(), &["link", "del", &self.0]);
    }
}

#[test]
fn the_host_reaches_pods_and_a_service_dnat_hairpins_between_pods() {
    let net = Net::new("10.90.0.0/24");
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    assert!(
        ra["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0"),
        "{ra}"
    );

    // kubelet's probe path: ping and TCP from the host namespace.
    assert!(host_ping(&ip_of(&rb).to_string()), "host cannot ping pod b");
    let (port, server) = serve_once(&b.path);
    let got = fetch(None, SocketAddr::new(ip_of(&rb), port));
    assert_eq!(got.as_deref(), Ok("hello from wg-cni\n"));
    server.join().unwrap().expect("b saw the host's connection");

    // A ClusterIP stand-in: pod a → 10.96.90.10:80 → DNAT to b. b must see the gateway as the
    // source (hairpin SNAT), or WireGuard would drop a's address arriving from the gateway.
    let (port, server) = serve_once(&b.path);
    let target = format!("{}:{port}", ip_of(&rb));
    let comment = format!("wg-cni-test {}", net.name);
    let _dnat = TestRule::add(&[
        "PREROUTING",
        "-d",
        "10.96.90.10/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "DNAT",
        "--to-destination",
        &target,
    ]);
    let got = fetch(Some(&a.path), "10.96.90.10:80".parse().unwrap());
    assert_eq!(got.as_deref(), Ok("hello from wg-cni\n"));
    let seen = server.join().unwrap().expect("b saw a's connection");
    assert_eq!(
        seen.ip(),
        "10.90.0.1".parse::<IpAddr>().unwrap(),
        "not hairpin-masqueraded"
    );

    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

#[test]
fn pods_reach_the_outside_only_through_ip_masq() {
    // An "outside" host: a namespace behind a veth pair from the host.
    let outside = Pod::new();
    let host_end = unique("wgo");
    // Deleted explicitly (a namespace's links die asynchronously with it).
    let _veth = HostLink(host_end.clone());
    run_ok(
        ip(),
        &[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "out0",
            "netns",
            &outside.name,
        ],
    );
    run_ok(ip(), &["addr", "add", "10.252.0.1/30", "dev", &host_end]);
    run_ok(ip(), &["link", "set", &host_end, "up"]);
    outside.ip(&["addr", "add", "10.252.0.2/30", "dev", "out0"]);
    outside.ip(&["link", "set", "out0", "up"]);
    let server_addr = |port| SocketAddr::new("10.252.0.2".parse().unwrap(), port);

    // Without ipMasq the outside has no route back to the pod range.
    let plain = Net::new("10.91.0.0/24");
    let pod = Pod::new();
    let r = plain.add(&pod).ok().json();
    let (port, server) = serve_once(&outside.path);
    assert!(
        fetch(Some(&pod.path), server_addr(port)).is_err(),
        "reached outside without ipMasq"
    );
    drop(server); // it gives up on its own
    plain.del(&pod, Some(&r)).ok();

    let mut masq = Net::new("10.92.0.0/24");
    masq.extra = json!({"ipMasq": true});
    let pod = Pod::new();
    let r = masq.add(&pod).ok().json();
    assert!(nat_rules().contains(&format!("wg-cni ipMasq {}", masq.name)));
    let (port, server) = serve_once(&outside.path);
    let got = fetch(Some(&pod.path), server_addr(port));
    assert_eq!(got.as_deref(), Ok("hello from wg-cni\n"));
    let seen = server.join().unwrap().expect("outside saw the pod");
    assert_eq!(
        seen.ip(),
        "10.252.0.1".parse::<IpAddr>().unwrap(),
        "not masqueraded"
    );
    masq.del(&pod, Some(&r)).ok();
    assert!(!nat_rules().contains(&masq.name), "NAT rules left behind");
}

#[test]
fn a_pods_peers_are_the_other_pods_the_gateway_and_the_static_peers() {
    let static_key = Key::generate_private().get_public().to_base64();
    let psk = Key::generate_preshared().to_base64();
    let dir = tempfile::tempdir().unwrap();
    let psk_file = dir.path().join("psk");
    std::fs::write(&psk_file, &psk).unwrap();

    let mut net = Net::new("10.93.0.0/24");
    net.extra = json!({"peers": [{
        "publicKey": static_key,
        "endpoint": "127.0.0.1:59999",
        "allowedIPs": ["192.168.77.0/24"],
        "presharedKeyFile": psk_file,
    }]});
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    let gateway = net.gateway_record().unwrap();
    let b_key = net.record_of(&b).unwrap()["publicKey"].clone();
    let show = net.show_json();
    let a_view = show["networks"][0]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["containerId"] == a.id.as_str())
        .unwrap()
        .clone();
    let mut keys: Vec<String> = a_view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["publicKey"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    let mut want = vec![
        b_key.as_str().unwrap().to_string(),
        gateway["publicKey"].as_str().unwrap().to_string(),
        static_key.clone(),
    ];
    want.sort();
    assert_eq!(keys, want);

    // The preshared key reached the device (compared in memory: keys are never printed).
    let record = net.record_of(&a).unwrap();
    let shown = if expected_backend() == "kernel" {
        a.exec(&["wg", "show", "eth0", "preshared-keys"])
    } else {
        run(
            "wg",
            &[
                "show",
                record["hostName"].as_str().unwrap(),
                "preshared-keys",
            ],
        )
    };
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(&static_key) && l.ends_with(&psk)),
        "PSK not set"
    );

    net.check(&a, &ra).ok();
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

#[test]
fn static_peers_that_claim_pod_addresses_or_the_default_route_are_rejected() {
    let key = Key::generate_private().get_public().to_base64();
    for (allowed, says) in [
        ("10.94.0.128/25", "pod range"),
        ("0.0.0.0/0", "default route"),
    ] {
        let mut net = Net::new("10.94.0.0/24");
        net.extra = json!({"peers": [{"publicKey": key, "allowedIPs": [allowed]}]});
        let pod = Pod::new();
        let before = HostSnapshot::take();
        let out = net.add(&pod);
        assert_eq!(out.error_code(), 7, "{allowed}");
        let msg = out.error_msg();
        assert!(
            msg.contains("peers[0].allowedIPs") && msg.contains(says),
            "{msg}"
        );
        assert!(net.reservations().is_empty() && net.records().is_empty());
        assert!(net.gateway_record().is_none());
        assert_eq!(HostSnapshot::take(), before);
    }
}

#[test]
fn a_gone_gateway_fails_check_not_status_and_the_next_add_restores_it() {
    let mut net = Net::new("10.95.0.0/24");
    net.version = "1.1.0".into();
    let (a, b) = (Pod::new(), Pod::new());
    let ra = net.add(&a).ok().json();
    let status = |net: &Net| net.call("STATUS", "", "", &net.conf());
    status(&net).ok();

    let gateway = net.gateway_record().unwrap();
    let name = gateway["hostName"].as_str().unwrap();
    match gateway["daemonPid"].as_i64() {
        Some(pid) => {
            run_ok("kill", &["-9", &pid.to_string()]);
            let deadline = Instant::now() + Duration::from_secs(5);
            while host_links().contains(name) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        None => {
            run_ok(ip(), &["link", "del", name]);
        }
    }
    assert!(
        !host_ping(&ip_of(&ra).to_string()),
        "host still reaches the pod"
    );
    // STATUS stays green (an ADD would work and repairs it); CHECK of the pod names the cause.
    status(&net).ok();
    let check = net.check(&a, &ra);
    assert_eq!(
        check.error_code(),
        103,
        "CHECK passed with the gateway gone"
    );
    assert!(
        check.error_msg().contains("gateway"),
        "{}",
        check.error_msg()
    );

    let rb = net.add(&b).ok().json();
    status(&net).ok();
    assert_ne!(
        net.gateway_record().unwrap()["publicKey"],
        gateway["publicKey"]
    );
    assert!(
        host_ping(&ip_of(&ra).to_string()),
        "the old pod was not re-peered"
    );
    assert!(host_ping(&ip_of(&rb).to_string()));
    net.check(&a, &ra).ok();
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

#[test]
fn the_gateway_goes_with_the_last_attachment_and_gc() {
    let mut net = Net::new("10.96.0.0/24");
    net.version = "1.1.0".into();
    let pod = Pod::new();
    let before = HostSnapshot::take();
    let r = net.add(&pod).ok().json();
    let name = net.gateway_record().unwrap()["hostName"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(host_links().contains(&name));
    assert!(nat_rules().contains(&format!("wg-cni hairpin-dnat {}", net.name)));
    let forward = || run_ok("iptables", &["-S", "FORWARD"]);
    assert!(forward().contains(&format!("wg-cni forward-in {}", net.name)));
    assert!(forward().contains(&format!("wg-cni forward-out {}", net.name)));
    net.del(&pod, Some(&r)).ok();
    assert!(net.gateway_record().is_none());
    assert!(!nat_rules().contains(&net.name));
    assert!(!forward().contains(&net.name));
    assert_eq!(HostSnapshot::take(), before);

    // GC of the last attachment takes the gateway too.
    net.add(&pod).ok();
    let mut conf = net.conf();
    conf["cni.dev/valid-attachments"] = json!([]);
    let path = plugin_dir();
    cni_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", path.to_str().unwrap())],
        conf.to_string().as_bytes(),
    )
    .ok();
    assert!(net.gateway_record().is_none() && net.records().is_empty());
    assert_eq!(HostSnapshot::take(), before);
}

#[test]
fn without_the_gateway_pods_have_only_each_other() {
    let mut net = Net::new("10.97.0.0/24");
    net.extra = json!({"hostGateway": false, "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}});
    let (a, b) = (Pod::new(), Pod::new());
    let before = HostSnapshot::take();
    let ra = net.add(&a).ok().json();
    let rb = net.add(&b).ok().json();
    assert_eq!(ra["dns"]["nameservers"], json!(["10.96.0.10"]));
    assert_eq!(ra["dns"]["search"], json!(["svc.cluster.local"]));
    assert!(net.gateway_record().is_none());
    assert_eq!(host_links(), before.links);
    assert!(!host_ping(&ip_of(&ra).to_string()));
    assert!(a.ping(&ip_of(&rb).to_string()));
    net.check(&a, &ra).ok();
    net.del(&a, Some(&ra)).ok();
    net.del(&b, Some(&rb)).ok();
}

/// An on-demand network's gateway logs relayed flows (the relay watch: an NFLOG rule per
/// family in mangle POSTROUTING, named after network and link; tests/flows.rs tests what it
/// logs), and its rules go with the gateway; a mesh network's gateway has none.
#[test]
fn an_on_demand_gateway_watches_the_relay_and_its_rules_go_with_it() {
    let watch = |v6: bool| {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        run_ok(tool, &["-t", "mangle", "-S", "POSTROUTING"])
    };
    let mut net =
        Net::with_ranges(json!([[{"subnet": "10.98.1.0/24"}], [{"subnet": "fd98:0:0:1::/64"}]]));
    net.extra = json!({"clusterRange": ["10.98.0.0/16", "fd98::/48"], "peering": "on-demand"});
    let pod = Pod::new();
    let r = net.add(&pod).ok().json();
    let gateway = net.gateway_record().unwrap();
    assert_eq!(gateway["peering"], "on-demand");
    let link = gateway["hostName"].as_str().unwrap();
    let comment = format!("wg-cni relay-watch {} {link}", net.name);
    for (v6, range) in [(false, "10.98.0.0/16"), (true, "fd98::/48")] {
        let rules = watch(v6);
        let rule = rules
            .lines()
            .find(|l| l.contains(&comment))
            .unwrap_or_else(|| panic!("no relay watch (IPv6: {v6}): {rules}"));
        for part in [
            format!("-s {range} -d {range} -o {link}"),
            "! --ctstate DNAT".to_string(),
            format!("--hashlimit-name {link}"),
            format!("--nflog-prefix {link}"),
            "--nflog-group 30567".to_string(),
        ] {
            assert!(rule.contains(&part), "{part} missing: {rule}");
        }
    }
    net.del(&pod, Some(&r)).ok();
    assert!(net.gateway_record().is_none());
    assert!(!watch(false).contains(&net.name) && !watch(true).contains(&net.name));

    let mesh = Net::new("10.98.2.0/24");
    let pod = Pod::new();
    let r = mesh.add(&pod).ok().json();
    assert!(mesh.gateway_record().unwrap().get("peering").is_none());
    assert!(
        !watch(false).contains(&mesh.name),
        "a mesh gateway watches the relay"
    );
    mesh.del(&pod, Some(&r)).ok();
}
