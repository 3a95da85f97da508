//! The `set` half of WireGuard's cross-platform UAPI, spoken to wireguard-go's socket.
//! wireguard-control's userspace `apply` is not used: it starts a daemon of its own when the
//! socket is missing, prints errors to stdout (which runtimes parse) and drops the errno we
//! need to tell a taken port from other failures.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use super::Update;

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The request text. It holds the private key when one is set, hence `Zeroizing`.
fn request(update: &Update) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::from("set=1\n"));
    if let Some(keypair) = update.keypair {
        let _ = writeln!(text, "private_key={}", hex(keypair.secret_bytes()));
    }
    if let Some(port) = update.listen_port {
        let _ = writeln!(text, "listen_port={port}");
    }
    if update.replace_peers {
        text.push_str("replace_peers=true\n");
    }
    for peer in &update.peers {
        let _ = writeln!(text, "public_key={}", hex(&peer.public_key.0));
        text.push_str("replace_allowed_ips=true\n");
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(text, "endpoint={endpoint}");
        }
        if let Some(seconds) = peer.keepalive {
            let _ = writeln!(text, "persistent_keepalive_interval={seconds}");
        }
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(text, "preshared_key={}", hex(&psk.0.0));
        }
        for ip in &peer.allowed_ips {
            let _ = writeln!(text, "allowed_ip={}/{}", ip.ip(), ip.prefix());
        }
    }
    for key in &update.remove_peers {
        let _ = writeln!(text, "public_key={}\nremove=true", hex(&key.0));
    }
    text.push('\n');
    text
}

/// Apply `update` over the daemon's socket; a daemon-side failure comes back as its errno.
pub fn set(name: &str, update: &Update) -> io::Result<()> {
    let mut stream = UnixStream::connect(socket_path(name))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request(update).as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "wireguard-go closed the socket without an answer",
            ));
        }
        if let Some(value) = line.trim_end().strip_prefix("errno=") {
            let errno: i32 = value.parse().unwrap_or(-1);
            return match errno.abs() {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(code)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use crate::wireguard::Peer;

    #[test]
    fn request_has_every_field_in_protocol_order() {
        let keys = KeyPair::generate();
        let peer_key = KeyPair::generate();
        let update = Update {
            keypair: Some(&keys),
            listen_port: Some(52001),
            replace_peers: true,
            peers: vec![Peer {
                public_key: peer_key.public().clone(),
                endpoint: Some("127.0.0.1:52002".parse().unwrap()),
                allowed_ips: vec!["10.66.0.3/32".parse().unwrap()],
                keepalive: Some(25),
                preshared_key: None,
            }],
            remove_peers: vec![],
        };
        let text = request(&update);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "set=1");
        assert!(lines[1].starts_with("private_key="));
        assert_eq!(lines[2], "listen_port=52001");
        assert_eq!(lines[3], "replace_peers=true");
        assert_eq!(
            lines[4],
            format!("public_key={}", hex(&peer_key.public().0))
        );
        assert!(text.contains("endpoint=127.0.0.1:52002\n"));
        assert!(text.contains("allowed_ip=10.66.0.3/32\n"));
        assert!(text.ends_with("\n\n"));
    }
}
