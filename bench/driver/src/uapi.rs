//! Userspace WireGuard daemons (wg-cni-wgd, wireguard-go) over their UAPI socket,
//! /var/run/wireguard/<link>.sock: one request and its answer, and a `get` read into each
//! peer's configuration (what `wg show <link> dump` prints, without the exec).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::Res;

/// One UAPI exchange: send `request`, read the answer up to its blank line.
pub fn exchange(host: &str, request: &str) -> Res<String> {
    let path = format!("/var/run/wireguard/{host}.sock");
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{path}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("{path}: writing: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 65536];
    while !answer.ends_with(b"\n\n") {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("{path}: reading: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A `set` of `body` (lines `key=value\n`); fails unless the daemon answers errno=0.
pub fn set(host: &str, body: &str) -> Res<()> {
    let answer = exchange(host, &format!("set=1\n{body}\n"))?;
    if answer.lines().any(|l| l == "errno=0") {
        Ok(())
    } else {
        Err(format!(
            "UAPI set on {host}: answer {:?}",
            answer.trim().chars().take(200).collect::<String>()
        ))
    }
}

/// The raw answer to `get=1`.
pub fn get_text(host: &str) -> Res<String> {
    exchange(host, "get=1\n\n")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a peer is configured with (what the agent writes): endpoint, allowed IPs (sorted),
/// persistent keep-alive. Handshake times and counters are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConf {
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub keepalive: u32,
}

/// A device's peers by public key (hex, as UAPI spells it).
pub type Peers = HashMap<String, PeerConf>;

/// Peers of a `get=1` answer.
pub fn parse(text: &str) -> Res<Peers> {
    let mut peers = Peers::new();
    let mut current: Option<(String, PeerConf)> = None;
    let mut errno = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "public_key" => {
                if let Some((k, mut conf)) = current.take() {
                    conf.allowed_ips.sort();
                    peers.insert(k, conf);
                }
                current = Some((
                    value.to_string(),
                    PeerConf {
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        keepalive: 0,
                    },
                ));
            }
            "endpoint" => {
                if let Some((_, conf)) = current.as_mut() {
                    conf.endpoint = Some(value.to_string());
                }
            }
            "allowed_ip" => {
                if let Some((_, conf)) = current.as_mut() {
                    conf.allowed_ips.push(value.to_string());
                }
            }
            "persistent_keepalive_interval" => {
                if let Some((_, conf)) = current.as_mut() {
                    conf.keepalive = value.parse().unwrap_or(0);
                }
            }
            "errno" => errno = Some(value.to_string()),
            _ => {}
        }
    }
    if let Some((k, mut conf)) = current.take() {
        conf.allowed_ips.sort();
        peers.insert(k, conf);
    }
    match errno.as_deref() {
        Some("0") => Ok(peers),
        other => Err(format!("UAPI get answered errno {other:?}")),
    }
}

/// How many (peer) configurations differ between two reads of one device: a peer added or
/// removed, or one whose endpoint, allowed IPs or keep-alive changed, counts once.
pub fn differences(before: &Peers, after: &Peers) -> usize {
    let gone = before.keys().filter(|k| !after.contains_key(*k)).count();
    let changed = after
        .iter()
        .filter(|(k, conf)| before.get(*k) != Some(conf))
        .count();
    gone + changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_answer_is_read_into_peer_configurations() {
        let text = "private_key=aa\nlisten_port=1\npublic_key=01\nendpoint=10.0.0.1:5\n\
                    last_handshake_time_sec=9\nallowed_ip=10.1.0.2/32\nallowed_ip=10.1.0.1/32\n\
                    persistent_keepalive_interval=0\npublic_key=02\nallowed_ip=10.1.0.3/32\n\
                    persistent_keepalive_interval=25\nerrno=0\n\n";
        let peers = parse(text).unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers["01"].endpoint.as_deref(), Some("10.0.0.1:5"));
        assert_eq!(peers["01"].allowed_ips, ["10.1.0.1/32", "10.1.0.2/32"]);
        assert_eq!(peers["02"].keepalive, 25);
        let mut after = peers.clone();
        assert_eq!(differences(&peers, &after), 0);
        after.remove("01");
        after.get_mut("02").unwrap().keepalive = 0;
        after.insert("03".into(), peers["01"].clone());
        assert_eq!(differences(&peers, &after), 3);
        assert!(parse("errno=1\n\n").is_err());
    }
}
