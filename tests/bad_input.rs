//! Bad input of every kind: each case gets the right CNI error code, a message that names
//! what to fix, and leaves the host, the store and IPAM exactly as they were.

mod common;

use common::*;
use serde_json::{Value, json};

struct Case {
    what: &'static str,
    /// (variable, value); `None` removes the variable.
    env: Vec<(&'static str, Option<String>)>,
    stdin: Vec<u8>,
    code: u64,
    names: &'static str,
}

fn case(what: &'static str, stdin: Vec<u8>, code: u64, names: &'static str) -> Case {
    Case {
        what,
        env: Vec::new(),
        stdin,
        code,
        names,
    }
}

fn env_case(
    what: &'static str,
    var: &'static str,
    value: Option<&str>,
    stdin: &Value,
    code: u64,
    names: &'static str,
) -> Case {
    Case {
        what,
        env: vec![(var, value.map(str::to_string))],
        stdin: stdin.to_string().into_bytes(),
        code,
        names,
    }
}

fn with(conf: &Value, field: &str, value: Value) -> Vec<u8> {
    let mut c = conf.clone();
    c[field] = value;
    c.to_string().into_bytes()
}

fn without(conf: &Value, field: &str) -> Vec<u8> {
    let mut c = conf.clone();
    c.as_object_mut().unwrap().remove(field);
    c.to_string().into_bytes()
}

#[test]
fn every_bad_input_gets_its_code_names_the_problem_and_changes_nothing() {
    let net = Net::new("10.120.0.0/24");
    let pod = Pod::new();
    let good = net.conf();
    let key = wireguard_control::Key::generate_private()
        .get_public()
        .to_base64();
    let peer = |extra: Value| {
        let mut p = json!({"publicKey": key, "allowedIPs": ["192.168.88.0/24"]});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        json!([p])
    };
    let scratch = tempfile::tempdir().unwrap();
    let plain_file = scratch.path().join("file");
    std::fs::write(&plain_file, "not a namespace").unwrap();
    // A symlink planted where the network's store directory would be.
    let planted_root = scratch.path().join("planted");
    std::fs::create_dir(&planted_root).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), planted_root.join(&net.name)).unwrap();
    let mut v1_0 = good.clone();
    v1_0["cniVersion"] = "1.0.0".into();
    let mut v0_3 = good.clone();
    v0_3["cniVersion"] = "0.3.1".into();
    // GC without a list is valid (libcni 1.3 sends none); a list that is not one is not.
    let mut gc_bad_list = good.clone();
    gc_bad_list["cniVersion"] = "1.1.0".into();
    gc_bad_list["cni.dev/valid-attachments"] = json!({"containerID": "x"});

    let mut cases = vec![
        case("empty stdin", Vec::new(), 6, "JSON"),
        case(
            "truncated JSON",
            good.to_string().as_bytes()[..25].to_vec(),
            6,
            "JSON",
        ),
        case("a JSON array", b"[1, 2]".to_vec(), 6, "object"),
        case("a JSON string", b"\"wgnet\"".to_vec(), 6, "object"),
        case("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}'], 6, "JSON"),
        case("10 MB of stdin", vec![b' '; 10 << 20], 6, "larger"),
        case(
            "no cniVersion",
            without(&good, "cniVersion"),
            7,
            "cniVersion",
        ),
        case(
            "cniVersion a number",
            with(&good, "cniVersion", json!(1)),
            7,
            "cniVersion",
        ),
        case(
            "cniVersion 0.2.0",
            with(&good, "cniVersion", json!("0.2.0")),
            1,
            "0.2.0",
        ),
        case(
            "cniVersion 9.9.9",
            with(&good, "cniVersion", json!("9.9.9")),
            1,
            "9.9.9",
        ),
        case("no name", without(&good, "name"), 7, "name"),
        case(
            "name with a slash",
            with(&good, "name", json!("a/b")),
            7,
            "name",
        ),
        case("name a number", with(&good, "name", json!(7)), 7, "name"),
        case("no ipam", without(&good, "ipam"), 7, "ipam"),
        case(
            "ipam a string",
            with(&good, "ipam", json!("host-local")),
            7,
            "ipam",
        ),
        case(
            "ipam without type",
            with(&good, "ipam", json!({"ranges": []})),
            7,
            "ipam.type",
        ),
        case(
            "ipam type is a path",
            with(&good, "ipam", json!({"type": "../bin/sh"})),
            7,
            "ipam.type",
        ),
        case(
            "ipam plugin missing",
            with(&good, "ipam", json!({"type": "no-such-ipam"})),
            7,
            "ipam.type",
        ),
        case(
            "backend unknown",
            with(&good, "backend", json!("magic")),
            7,
            "backend",
        ),
        case(
            "userspace daemon unknown",
            with(&good, "userspaceDaemon", json!("boringtun")),
            7,
            "userspaceDaemon",
        ),
        case(
            "userspace daemon not a string",
            with(&good, "userspaceDaemon", json!(1)),
            7,
            "userspaceDaemon",
        ),
        case("mtu a string", with(&good, "mtu", json!("1420")), 7, "mtu"),
        case("mtu too small", with(&good, "mtu", json!(100)), 7, "mtu"),
        case("mtu negative", with(&good, "mtu", json!(-5)), 7, "mtu"),
        case(
            "mtu fractional",
            with(&good, "mtu", json!(1400.5)),
            7,
            "mtu",
        ),
        case(
            "endpoint not an IP",
            with(&good, "endpoint", json!("nowhere")),
            7,
            "endpoint",
        ),
        case(
            "endpoint a number",
            with(&good, "endpoint", json!(5)),
            7,
            "endpoint",
        ),
        case(
            "listenPorts reversed",
            with(&good, "listenPorts", json!("9-1")),
            7,
            "listenPorts",
        ),
        case(
            "listenPorts words",
            with(&good, "listenPorts", json!("low-high")),
            7,
            "listenPorts",
        ),
        case(
            "listenPorts from 0",
            with(&good, "listenPorts", json!("0-5")),
            7,
            "listenPorts",
        ),
        case(
            "listenPorts a number",
            with(&good, "listenPorts", json!(52000)),
            7,
            "listenPorts",
        ),
        case(
            "persistentKeepalive too big",
            with(&good, "persistentKeepalive", json!(70000)),
            7,
            "persistentKeepalive",
        ),
        case(
            "persistentKeepalive a string",
            with(&good, "persistentKeepalive", json!("25")),
            7,
            "persistentKeepalive",
        ),
        case(
            "store relative",
            with(&good, "store", json!("var/lib/x")),
            7,
            "store",
        ),
        case(
            "hostGateway a string",
            with(&good, "hostGateway", json!("yes")),
            7,
            "hostGateway",
        ),
        case(
            "an unknown peering",
            with(&good, "peering", json!("full")),
            7,
            "peering",
        ),
        case(
            "on-demand without the gateways that relay",
            {
                let mut c = good.clone();
                c["peering"] = json!("on-demand");
                c["clusterRange"] = json!("10.120.0.0/16");
                c["hostGateway"] = json!(false);
                c.to_string().into_bytes()
            },
            7,
            "peering",
        ),
        case(
            "on-demand without clusterRange",
            with(&good, "peering", json!("on-demand")),
            7,
            "clusterRange",
        ),
        case(
            "on-demand with a static peer in the pod range",
            {
                let mut c = good.clone();
                c["peering"] = json!("on-demand");
                c["clusterRange"] = json!("10.120.0.0/16");
                c["peers"] = json!([{"publicKey": key, "allowedIPs": ["10.120.7.0/24"]}]);
                c.to_string().into_bytes()
            },
            7,
            "peers[0].allowedIPs",
        ),
        case(
            "ipMasq without gateway",
            {
                let mut c = good.clone();
                c["ipMasq"] = json!(true);
                c["hostGateway"] = json!(false);
                c.to_string().into_bytes()
            },
            7,
            "ipMasq",
        ),
        case(
            "peers an object",
            with(&good, "peers", json!({"publicKey": key})),
            7,
            "peers",
        ),
        case(
            "peer key invalid",
            with(
                &good,
                "peers",
                json!([{"publicKey": "abc", "allowedIPs": ["10.9.0.0/16"]}]),
            ),
            7,
            "peers[0].publicKey",
        ),
        case(
            "peer CIDR invalid",
            with(&good, "peers", peer(json!({"allowedIPs": ["10.9.0.0/99"]}))),
            7,
            "peers[0].allowedIPs",
        ),
        case(
            "peer endpoint without port",
            with(&good, "peers", peer(json!({"endpoint": "127.0.0.1"}))),
            7,
            "peers[0].endpoint",
        ),
        case(
            "peer PSK path relative",
            with(&good, "peers", peer(json!({"presharedKeyFile": "psk"}))),
            7,
            "peers[0].presharedKeyFile",
        ),
        case(
            "peer PSK file missing",
            with(
                &good,
                "peers",
                peer(json!({"presharedKeyFile": "/nonexistent/psk"})),
            ),
            7,
            "peers[0].presharedKeyFile",
        ),
        case(
            "peer claims the pod range",
            with(
                &good,
                "peers",
                peer(json!({"allowedIPs": ["10.120.0.0/16"]})),
            ),
            7,
            "pod range",
        ),
        case(
            "nodeName with a slash",
            with(&good, "nodeName", json!("a/b")),
            7,
            "nodeName",
        ),
        case(
            "prevResult an array",
            with(&good, "prevResult", json!([])),
            7,
            "prevResult",
        ),
        case(
            "store not writable",
            with(&good, "store", json!("/proc/wg-cni-store")),
            5,
            "/proc/wg-cni-store",
        ),
        case(
            "symlink planted in the store",
            with(&good, "store", json!(planted_root)),
            5,
            "symbolic link",
        ),
        // The network's first pod: the gateway is built while IPAM runs, and must go again.
        case(
            "IPAM range exhausted",
            with(
                &good,
                "ipam",
                json!({"type": "host-local", "dataDir": net.ipam_dir(), "ranges": [[{
                    "subnet": "10.120.0.0/24",
                    "rangeStart": "10.120.0.1",
                    "rangeEnd": "10.120.0.1",
                }]]}),
            ),
            999,
            "no IP addresses available",
        ),
        case(
            "full port range",
            {
                let socket = std::net::UdpSocket::bind("0.0.0.0:53999").ok();
                std::mem::forget(socket); // held for the rest of the test process
                with(&good, "listenPorts", json!("53999-53999"))
            },
            11,
            "listenPorts",
        ),
        env_case(
            "unknown command",
            "CNI_COMMAND",
            Some("FROB"),
            &good,
            4,
            "CNI_COMMAND",
        ),
        env_case(
            "no container id",
            "CNI_CONTAINERID",
            None,
            &good,
            4,
            "CNI_CONTAINERID",
        ),
        env_case(
            "container id with dots and slashes",
            "CNI_CONTAINERID",
            Some("../etc"),
            &good,
            4,
            "CNI_CONTAINERID",
        ),
        env_case("no netns", "CNI_NETNS", None, &good, 4, "CNI_NETNS"),
        env_case(
            "relative netns",
            "CNI_NETNS",
            Some("var/run/netns/x"),
            &good,
            4,
            "CNI_NETNS",
        ),
        env_case(
            "netns missing",
            "CNI_NETNS",
            Some("/var/run/netns/wg-cni-no-such"),
            &good,
            4,
            "CNI_NETNS",
        ),
        env_case(
            "netns a plain file",
            "CNI_NETNS",
            Some(plain_file.to_str().unwrap()),
            &good,
            4,
            "not a network namespace",
        ),
        env_case(
            "netns a directory",
            "CNI_NETNS",
            Some("/tmp"),
            &good,
            4,
            "CNI_NETNS",
        ),
        env_case("no ifname", "CNI_IFNAME", None, &good, 4, "CNI_IFNAME"),
        env_case(
            "ifname over 15 bytes",
            "CNI_IFNAME",
            Some("abcdefghijklmnop"),
            &good,
            4,
            "CNI_IFNAME",
        ),
        env_case(
            "ifname lo",
            "CNI_IFNAME",
            Some("lo"),
            &good,
            4,
            "CNI_IFNAME",
        ),
        env_case(
            "ifname with a slash",
            "CNI_IFNAME",
            Some("et/h0"),
            &good,
            4,
            "CNI_IFNAME",
        ),
        env_case("no CNI_PATH", "CNI_PATH", None, &good, 4, "CNI_PATH"),
        env_case(
            "CNI_PATH without the IPAM",
            "CNI_PATH",
            Some(scratch.path().to_str().unwrap()),
            &good,
            7,
            "ipam.type",
        ),
        env_case(
            "CNI_ARGS malformed",
            "CNI_ARGS",
            Some("K8S_POD_NAME"),
            &good,
            4,
            "CNI_ARGS",
        ),
        env_case(
            "CHECK on 0.3.1",
            "CNI_COMMAND",
            Some("CHECK"),
            &v0_3,
            1,
            "0.4.0",
        ),
        env_case(
            "CHECK without prevResult",
            "CNI_COMMAND",
            Some("CHECK"),
            &good,
            7,
            "prevResult",
        ),
        env_case("GC on 1.0.0", "CNI_COMMAND", Some("GC"), &v1_0, 1, "1.1.0"),
        env_case(
            "GC with valid-attachments not a list",
            "CNI_COMMAND",
            Some("GC"),
            &gc_bad_list,
            7,
            "valid-attachments",
        ),
        env_case(
            "STATUS on 1.0.0",
            "CNI_COMMAND",
            Some("STATUS"),
            &v1_0,
            1,
            "1.1.0",
        ),
    ];
    if !std::path::Path::new("/sys/module/wireguard").exists() {
        cases.push(case(
            "kernel backend without the module",
            with(&good, "backend", json!("kernel")),
            7,
            "backend",
        ));
    }
    assert!(cases.len() >= 40);

    let path = plugin_dir();
    let before = HostSnapshot::take();
    for case in &cases {
        let mut env: Vec<(&str, String)> = vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", pod.id.clone()),
            ("CNI_NETNS", pod.netns().into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_PATH", path.to_str().unwrap().into()),
        ];
        for (var, value) in &case.env {
            env.retain(|(k, _)| k != var);
            if let Some(v) = value {
                env.push((var, v.clone()));
            }
        }
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = cni_raw(&refs, &case.stdin);
        assert_ne!(out.code, 0, "{}: succeeded: {}", case.what, out.stdout);
        assert_eq!(out.error_code(), case.code, "{}: {}", case.what, out.stdout);
        let msg = out.error_msg();
        assert!(
            msg.contains(case.names),
            "{}: message does not name {:?}: {msg}",
            case.what,
            case.names
        );
        assert!(
            out.stdout.lines().count() == 1,
            "{}: stdout is not one JSON object",
            case.what
        );
        assert_eq!(
            HostSnapshot::take(),
            before,
            "{} changed the host",
            case.what
        );
        assert!(
            net.records().is_empty() && net.reservations().is_empty(),
            "{} left state",
            case.what
        );
        assert!(
            net.gateway_record().is_none(),
            "{} left a gateway",
            case.what
        );
        assert_eq!(pod.links().len(), 1, "{} touched the pod", case.what);
    }
    println!("{} bad-input cases", cases.len());
}

/// The files in this network's node directories of the store (records, locks, temp files),
/// but for the node's note that no record of an earlier boot is left (a successful ADD writes
/// it once per boot: no attachment's).
fn node_dir_files(net: &Net) -> Vec<String> {
    let mut files = Vec::new();
    let Ok(nodes) = std::fs::read_dir(net.store().join(&net.name)) else {
        return files;
    };
    for node in nodes.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
        for file in std::fs::read_dir(node.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != ".cleared-boot.json")
        {
            files.push(format!(
                "{}/{}",
                node.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            ));
        }
    }
    files.sort();
    files
}

/// An ADD that fails because its IPAM plugin cannot run (found in CNI_PATH, but its
/// interpreter is gone, as with a plugin removed mid-upgrade), and the DELs after it, leave no
/// file in the store's node directory: no record, and no attachment lock (whose name was a
/// record's, `.json` and all).
#[test]
fn a_failed_add_and_the_dels_after_it_leave_no_lock_or_record_files() {
    let net = Net::new("10.121.0.0/24");
    let pod = Pod::new();
    let bin = tempfile::tempdir().unwrap();
    let gone = bin.path().join("gone-ipam");
    std::fs::write(&gone, "#!/nonexistent/interpreter\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&gone, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut conf = net.conf();
    conf["ipam"]["type"] = "gone-ipam".into();
    let call = |command: &str, conf: &Value| {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.id.as_str()),
            ("CNI_NETNS", pod.netns()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", bin.path().to_str().unwrap()),
        ];
        cni_raw(&env, conf.to_string().as_bytes())
    };
    let before = HostSnapshot::take();

    let add = call("ADD", &conf);
    assert_ne!(add.code, 0, "ADD without a runnable IPAM succeeded");
    assert_eq!(
        node_dir_files(&net),
        Vec::<String>::new(),
        "the failed ADD left files"
    );
    // Its DEL fails the same way (IPAM DEL cannot run): still no lock left.
    call("DEL", &conf);
    assert_eq!(
        node_dir_files(&net),
        Vec::<String>::new(),
        "a failed DEL left files"
    );
    // With the plugin back: an ADD and its DEL.
    let result = net.add(&pod).ok().json();
    net.del(&pod, Some(&result)).ok();
    assert_eq!(
        node_dir_files(&net),
        Vec::<String>::new(),
        "ADD and DEL left files"
    );
    assert!(net.reservations().is_empty());
    assert_eq!(HostSnapshot::take(), before);
}
