//! WireGuard's cross-platform UAPI (`get` and `set`), spoken to wireguard-go's socket.
//! wireguard-control's userspace client is not used: its `apply` starts a daemon of its own
//! when the socket is missing, prints errors to stdout (which runtimes parse) and drops the
//! errno we need to tell a taken port from other failures; its `get` waits forever on a daemon
//! that accepts and never answers, and keeps the private key it reads. Here every exchange is
//! bounded, and `get` derives the public key and wipes the private one.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wireguard_control::{AllowedIp, Key, PeerInfo};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{DeviceState, Update};

/// How long one exchange with a daemon may take: a hung daemon must not hang DEL, CHECK or
/// STATUS, nor hold the network lock for long.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::new();
    push_hex(&mut text, bytes);
    text
}

/// Appends in place: the private key's hex goes straight into the zeroized request text,
/// with no temporary copy.
fn push_hex(text: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(text, "{b:02x}");
    }
}

/// An upper bound of the request's length: the text is allocated once and never grows, so no
/// reallocation leaves a copy of the keys it holds behind.
fn request_capacity(update: &Update) -> usize {
    // private_key, listen_port, replace_peers; per peer: public key, replace_allowed_ips,
    // endpoint (an IPv6 one with a zone at most), keepalive, preshared key, and one line per
    // allowed IP; per removal: public key and remove.
    let peers: usize = update
        .peers
        .iter()
        .map(|peer| 400 + 64 * peer.allowed_ips.len())
        .sum();
    160 + peers + 100 * update.remove_peers.len()
}

/// The request text. It holds the private key (and preshared keys) when set, hence
/// `Zeroizing`, allocated once at its final size.
fn request(update: &Update) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(request_capacity(update)));
    text.push_str("set=1\n");
    if let Some(keypair) = update.keypair {
        text.push_str("private_key=");
        push_hex(&mut text, keypair.secret_bytes());
        text.push('\n');
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
            text.push_str("preshared_key=");
            push_hex(&mut text, &psk.0.0);
            text.push('\n');
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

fn connect(name: &str) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(socket_path(name))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// Apply `update` over the daemon's socket; a daemon-side failure comes back as its errno.
pub fn set(name: &str, update: &Update) -> io::Result<()> {
    let mut stream = connect(name)?;
    let text = request(update);
    debug_assert!(
        text.len() <= request_capacity(update),
        "the request outgrew its bound"
    );
    stream.write_all(text.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        read_answer_line(&mut reader, &mut line)?;
        if let Some(value) = line.trim_end().strip_prefix("errno=") {
            return errno_result(value);
        }
    }
}

/// The next line of the daemon's answer into `line` (cleared first); end of stream is an error:
/// every answer ends with `errno=`.
fn read_answer_line(reader: &mut impl BufRead, line: &mut String) -> io::Result<()> {
    line.clear();
    if reader.read_line(line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "wireguard-go closed the socket without an answer",
        ));
    }
    Ok(())
}

fn errno_result(value: &str) -> io::Result<()> {
    match value.parse::<i32>().unwrap_or(-1).abs() {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(code)),
    }
}

/// The longest answer line taken (an allowed IP, an IPv6 endpoint: far less).
const MAX_LINE: usize = 1024;

/// The lines of a `get` answer, whose first lines hold the device's private key in hex: read
/// through a buffer of fixed size that is wiped when dropped, into a line that never grows
/// past its first allocation (a `BufReader`'s buffer, or a `String` that reallocates, would
/// leave the key behind in freed memory).
struct WipedLines<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
}

impl<R: io::Read> WipedLines<R> {
    fn new(inner: R) -> Self {
        WipedLines {
            inner,
            buf: Zeroizing::new(vec![0; 16 * 1024]),
            start: 0,
            end: 0,
        }
    }

    /// The next line, newline included, into `line` (cleared first); end of stream is an error:
    /// every answer ends with `errno=`.
    fn read_line(&mut self, line: &mut Zeroizing<String>) -> io::Result<()> {
        line.clear();
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let text = std::str::from_utf8(&pending[..=at]).map_err(|_| bad("line"))?;
                if text.len() > line.capacity() {
                    return Err(bad("line (too long)"));
                }
                line.push_str(text);
                self.start += at + 1;
                return Ok(());
            }
            if pending.len() > MAX_LINE {
                return Err(bad("line (too long)"));
            }
            // Keep the partial line at the front, then read more behind it.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let end = self.end;
            let n = self.inner.read(&mut self.buf[end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "wireguard-go closed the socket without an answer",
                ));
            }
            self.end += n;
        }
    }
}

/// Read the device over the daemon's socket. The private key is never kept: its public half
/// is derived and every buffer it passed through wiped.
pub fn get(name: &str) -> io::Result<DeviceState> {
    let mut stream = connect(name)?;
    stream.write_all(b"get=1\n\n")?;
    let mut reader = WipedLines::new(stream);
    let mut device = DeviceState::default();
    let mut line = Zeroizing::new(String::with_capacity(MAX_LINE + 1));
    loop {
        reader.read_line(&mut line)?;
        let text = line.trim_end();
        let Some((key, value)) = text.split_once('=') else {
            continue;
        };
        if key == "errno" {
            errno_result(value)?;
            return Ok(device);
        }
        read_field(&mut device, key, value)?;
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("wireguard-go sent a malformed {what}"),
    )
}

/// Hex into `out`, without an intermediate buffer (the private key passes through here).
fn decode_hex(text: &str, out: &mut [u8; 32]) -> Option<()> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    for (i, pair) in digits.chunks(2).enumerate() {
        let high = (pair[0] as char).to_digit(16)?;
        let low = (pair[1] as char).to_digit(16)?;
        out[i] = (high * 16 + low) as u8;
    }
    Some(())
}

fn key_from_hex(value: &str) -> io::Result<Key> {
    Key::from_hex(value).map_err(|_| bad("key"))
}

fn read_field(device: &mut DeviceState, key: &str, value: &str) -> io::Result<()> {
    match key {
        "private_key" => {
            let mut bytes = Zeroizing::new([0u8; 32]);
            decode_hex(value, &mut bytes).ok_or_else(|| bad("key"))?;
            // StaticSecret wipes itself on drop.
            let secret = StaticSecret::from(*bytes);
            device.public_key = Some(Key(PublicKey::from(&secret).to_bytes()));
        }
        "listen_port" => device.listen_port = Some(value.parse().map_err(|_| bad("port"))?),
        "fwmark" => device.fwmark = value.parse().ok().filter(|mark| *mark != 0),
        "public_key" => device
            .peers
            .push(PeerInfo::from_public_key(key_from_hex(value)?)),
        _ => {
            if let Some(peer) = device.peers.last_mut() {
                read_peer_field(peer, key, value)?;
            }
        }
    }
    Ok(())
}

fn read_peer_field(peer: &mut PeerInfo, key: &str, value: &str) -> io::Result<()> {
    let config = &mut peer.config;
    match key {
        "preshared_key" => {
            let psk = key_from_hex(value)?;
            config.preshared_key = (psk.0 != [0; 32]).then_some(psk);
        }
        "endpoint" => config.endpoint = Some(value.parse().map_err(|_| bad("endpoint"))?),
        "persistent_keepalive_interval" => {
            let seconds: u16 = value.parse().map_err(|_| bad("keepalive"))?;
            config.persistent_keepalive_interval = (seconds > 0).then_some(seconds);
        }
        "allowed_ip" => {
            let (address, cidr) = value.split_once('/').ok_or_else(|| bad("allowed_ip"))?;
            config.allowed_ips.push(AllowedIp {
                address: address.parse().map_err(|_| bad("allowed_ip"))?,
                cidr: cidr.parse().map_err(|_| bad("allowed_ip"))?,
            });
        }
        "last_handshake_time_sec" => {
            let seconds: u64 = value.parse().map_err(|_| bad("handshake time"))?;
            peer.stats.last_handshake_time =
                (seconds > 0).then(|| std::time::UNIX_EPOCH + Duration::from_secs(seconds));
        }
        "rx_bytes" => peer.stats.rx_bytes = value.parse().map_err(|_| bad("rx_bytes"))?,
        "tx_bytes" => peer.stats.tx_bytes = value.parse().map_err(|_| bad("tx_bytes"))?,
        _ => {}
    }
    Ok(())
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

    #[test]
    fn get_answers_parse_and_never_keep_the_private_key() {
        let keys = KeyPair::generate();
        let peer = KeyPair::generate();
        let answer = format!(
            "private_key={}\nlisten_port=53001\nfwmark=0\npublic_key={}\nendpoint=127.0.0.1:53002\n\
             persistent_keepalive_interval=0\nallowed_ip=10.66.0.3/32\nrx_bytes=12\ntx_bytes=34\n\
             last_handshake_time_sec=0\nerrno=0\n",
            hex(keys.secret_bytes()),
            hex(&peer.public().0)
        );
        let mut device = DeviceState::default();
        for line in answer.lines() {
            let (key, value) = line.split_once('=').unwrap();
            if key != "errno" {
                read_field(&mut device, key, value).unwrap();
            }
        }
        assert_eq!(device.public_key.as_ref(), Some(keys.public()));
        assert_eq!(device.listen_port, Some(53001));
        assert_eq!(device.fwmark, None);
        let p = &device.peers[0];
        assert_eq!(&p.config.public_key, peer.public());
        assert_eq!(p.config.endpoint.unwrap().to_string(), "127.0.0.1:53002");
        assert_eq!(p.config.persistent_keepalive_interval, None);
        assert_eq!(p.config.allowed_ips.len(), 1);
        assert_eq!((p.stats.rx_bytes, p.stats.tx_bytes), (12, 34));
        assert!(!format!("{device:?}").contains(&hex(keys.secret_bytes())));
        assert!(read_field(&mut device, "listen_port", "x").is_err());
    }

    /// Lines come out whole however the answer is split across reads; a line that would not
    /// fit is an error, not a reallocation.
    #[test]
    fn wiped_lines_read_split_answers_and_refuse_overlong_lines() {
        struct Trickle<'a>(&'a [u8]);
        impl io::Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(out.len()).min(7);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let answer = b"private_key=00ff\nlisten_port=1\nerrno=0\n";
        let mut lines = WipedLines::new(Trickle(answer));
        let mut line = Zeroizing::new(String::with_capacity(MAX_LINE + 1));
        for want in ["private_key=00ff\n", "listen_port=1\n", "errno=0\n"] {
            lines.read_line(&mut line).unwrap();
            assert_eq!(line.as_str(), want);
        }
        assert!(lines.read_line(&mut line).is_err(), "end of stream");
        let long = vec![b'a'; 3 * MAX_LINE];
        let mut lines = WipedLines::new(Trickle(&long));
        assert!(lines.read_line(&mut line).is_err());
    }

    /// The request is allocated once at its bound, whatever the update holds.
    #[test]
    fn the_request_never_outgrows_its_first_allocation() {
        let keys = KeyPair::generate();
        let peers: Vec<Peer> = (0..50)
            .map(|i| Peer {
                public_key: KeyPair::generate().public().clone(),
                endpoint: Some(format!("[fd00::{i}]:65535").parse().unwrap()),
                allowed_ips: (0..5)
                    .map(|j| format!("fd00::{i}:{j}/128").parse().unwrap())
                    .collect(),
                keepalive: Some(65535),
                preshared_key: Some(crate::wireguard::PresharedKey(Key([7; 32]))),
            })
            .collect();
        let update = Update {
            keypair: Some(&keys),
            listen_port: Some(65535),
            replace_peers: true,
            peers,
            remove_peers: (0..20)
                .map(|_| KeyPair::generate().public().clone())
                .collect(),
        };
        let text = request(&update);
        assert_eq!(text.capacity(), request_capacity(&update), "reallocated");
    }
}
