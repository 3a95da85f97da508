//! Reliability under abuse: ADDs killed at random moments, parallel storms, a long soak, and
//! faults in the life cycle. Every test compares host snapshots before and after.
//! Round counts scale with WG_CNI_ABUSE_SCALE (default 1.0) for slow machines.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn scaled(rounds: usize) -> usize {
    let scale: f64 = std::env::var("WG_CNI_ABUSE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((rounds as f64 * scale).ceil() as usize).max(1)
}

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn from_time() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        println!("random seed {seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Start an ADD and SIGKILL it after `delay` (if it is still running).
fn add_killed_after(net: &Net, pod: &Pod, delay: Duration) -> bool {
    let path = plugin_dir();
    let mut child = Command::new(binary())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", pod.netns())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(net.conf().to_string().as_bytes())
        .unwrap();
    std::thread::sleep(delay);
    let killed = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let _ = child.wait();
    killed
}

#[test]
fn adds_killed_at_random_moments_leave_nothing_after_del() {
    let net = Net::new("10.110.0.0/24");
    let mut rng = Rng::from_time();
    // Kill within the time a whole ADD takes here, so nearly every round interrupts one.
    let probe = Pod::new();
    let before = HostSnapshot::take();
    let started = Instant::now();
    let r = net.add(&probe).ok().json();
    let add_ms = started.elapsed().as_millis() as u64 + 1;
    net.del(&probe, Some(&r)).ok();
    println!("one ADD takes {add_ms} ms here");
    let rounds = scaled(100);
    let mut killed_mid_add = 0;
    for round in 0..rounds {
        let pod = Pod::new();
        let delay = Duration::from_millis(rng.below(add_ms));
        if add_killed_after(&net, &pod, delay) {
            killed_mid_add += 1;
        }
        net.del(&pod, None).ok();
        let state = (
            pod.links(),
            net.records().len(),
            net.reservations().len(),
            net.gateway_record().is_some(),
        );
        assert_eq!(
            state,
            (BTreeSet::from(["lo".to_string()]), 0, 0, false),
            "round {round} (killed after {delay:?}) leaked"
        );
        // The same container can be added again, and deleted.
        let again = net.add(&pod).ok().json();
        net.del(&pod, Some(&again)).ok();
        drop(pod);
        assert_eq!(
            HostSnapshot::take(),
            before,
            "round {round} (killed after {delay:?})"
        );
    }
    println!("{rounds} rounds, {killed_mid_add} killed while ADD was running");
    assert!(
        killed_mid_add * 2 >= rounds,
        "most rounds should interrupt ADD"
    );
    drop(probe);
}

#[test]
fn fifty_parallel_adds_then_fifty_parallel_dels() {
    let net = Net::new("10.111.0.0/24");
    let pods: Vec<Pod> = (0..50).map(|_| Pod::new()).collect();
    let before = HostSnapshot::take();
    let results: Vec<CniOutput> = std::thread::scope(|s| {
        let handles: Vec<_> = pods.iter().map(|p| s.spawn(|| net.add(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        r.ok();
    }
    let records = net.records();
    assert_eq!(records.len(), 50);
    let ips: BTreeSet<String> = records
        .iter()
        .map(|r| r["addresses"][0].as_str().unwrap().to_string())
        .collect();
    let ports: BTreeSet<u64> = records
        .iter()
        .map(|r| r["listenPort"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (ips.len(), ports.len()),
        (50, 50),
        "duplicate address or port"
    );

    // Every live link's peers: exactly the 49 other pods and the gateway.
    let gateway = net.gateway_record().unwrap()["publicKey"].clone();
    let keys: BTreeMap<String, String> = records
        .iter()
        .map(|r| {
            (
                r["containerId"].as_str().unwrap().to_string(),
                r["publicKey"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for attachment in net.show_json()["networks"][0]["attachments"]
        .as_array()
        .unwrap()
    {
        let me = attachment["containerId"].as_str().unwrap();
        let have: BTreeSet<&str> = attachment["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["publicKey"].as_str().unwrap())
            .collect();
        let mut want: BTreeSet<&str> = keys
            .iter()
            .filter(|(id, _)| id.as_str() != me)
            .map(|(_, k)| k.as_str())
            .collect();
        want.insert(gateway.as_str().unwrap());
        assert_eq!(have, want, "peers of {me}");
    }

    std::thread::scope(|s| {
        let handles: Vec<_> = pods.iter().map(|p| s.spawn(|| net.del(p, None))).collect();
        for h in handles {
            h.join().unwrap().ok();
        }
    });
    assert!(net.records().is_empty() && net.reservations().is_empty());
    assert!(net.gateway_record().is_none());
    assert_eq!(HostSnapshot::take(), before);
}

fn fd_count(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_thousand_add_del_cycles_leave_the_host_flat() {
    let net = Net::new("10.112.0.0/24");
    let resident = Pod::new();
    let pod = Pod::new();
    let before = HostSnapshot::take();
    let r = net.add(&resident).ok().json();
    // The long-lived processes: the resident pod's daemon and the gateway's (userspace only).
    let long_lived: Vec<u64> = [
        net.record_of(&resident).unwrap()["daemonPid"].as_u64(),
        net.gateway_record().unwrap()["daemonPid"].as_u64(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let cycles = scaled(1000);
    let measure = || -> Vec<(usize, u64)> {
        long_lived
            .iter()
            .map(|pid| (fd_count(*pid), rss_kib(*pid)))
            .collect()
    };
    let mut baseline = Vec::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        let added = net.add(&pod).ok().json();
        net.del(&pod, Some(&added)).ok();
        if cycle == cycles / 10 {
            baseline = measure(); // after warm-up
        }
    }
    let end = measure();
    println!(
        "{cycles} cycles in {:?}; long-lived (fds, RSS KiB): {baseline:?} -> {end:?}",
        started.elapsed()
    );
    for ((fds0, rss0), (fds1, rss1)) in baseline.iter().zip(&end) {
        assert_eq!(fds0, fds1, "a long-lived daemon leaks fds");
        assert!(
            *rss1 < rss0 + 8 * 1024,
            "a long-lived daemon grew from {rss0} to {rss1} KiB"
        );
    }
    assert_eq!(net.records().len(), 1);
    assert_eq!(net.reservations().len(), 1);
    net.check(&resident, &r).ok();
    net.del(&resident, Some(&r)).ok();
    assert_eq!(HostSnapshot::take(), before);
}

#[test]
fn an_add_killed_between_move_and_rename_is_cleaned_by_del() {
    only_on("userspace"); // only the userspace path has a temporary name and a move
    let net = Net::new("10.113.0.0/24");
    let pod = Pod::new();
    let before = HostSnapshot::take();
    // Make an ADD succeed once to learn the names, then rebuild its mid-ADD state by hand:
    // the daemon running, its TUN moved into the pod under the temporary name, the record
    // still `creating`.
    let r = net.add(&pod).ok().json();
    let record = net.record_of(&pod).unwrap();
    let temp = record["hostName"].as_str().unwrap().to_string();
    net.del(&pod, Some(&r)).ok();

    let ipam = {
        let mut conf = net.conf();
        conf["type"] = "host-local".into();
        conf
    };
    let reserved = other_plugin(
        "host-local",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &pod.id),
            ("CNI_NETNS", pod.netns()),
            ("CNI_IFNAME", "eth0"),
        ],
        &ipam,
    );
    let daemon = Command::new("wireguard-go")
        .args(["-f", &temp])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = format!("/var/run/wireguard/{temp}.sock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::path::Path::new(&socket).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    run_ok(ip(), &["link", "set", &temp, "netns", &pod.name]);
    let mut crashed = record.clone();
    crashed["state"] = "creating".into();
    crashed["daemonPid"] = Value::Null;
    crashed["addresses"] = json!([reserved["ips"][0]["address"]]);
    let file = net
        .store()
        .join(&net.name)
        .join(record["node"].as_str().unwrap())
        .join(format!("{}:eth0.json", pod.id));
    std::fs::write(&file, crashed.to_string()).unwrap();
    assert!(pod.links().contains(&temp));

    net.call("DEL", &pod.id, "", &net.conf()).ok();
    let mut daemon = daemon;
    let _ = daemon.wait(); // it exits once DEL stops it
    assert_eq!(pod.links(), BTreeSet::from(["lo".to_string()]));
    assert_eq!(daemons_named(&temp), 0);
    assert!(net.records().is_empty() && net.reservations().is_empty());
    assert_eq!(HostSnapshot::take(), before);
}
