//! Userspace WireGuard daemons (wg-cni-wgd, wireguard-go) over their UAPI socket,
//! /var/run/wireguard/<link>.sock: one request and its answer.

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
