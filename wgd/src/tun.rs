//! The TUN device, with virtio-net headers (IFF_VNET_HDR) and TUNSETOFFLOAD so the kernel
//! hands us TCP/UDP super-packets of up to 64 KiB (one read instead of ~45), which we split
//! into MTU-sized segments (computing their checksums) before encryption; toward the TUN,
//! consecutive TCP segments of one flow are coalesced into one GSO write (GRO), with the
//! payloads passed as an iovec list (no copy).
//!
//! The device is created in the daemon's namespace; its descriptor keeps working after the
//! device is moved into another namespace and renamed, and the offload features stay set.
//! Knobs (environment, for measuring): WGD_TUN_OFFLOAD=0 (plain TUN), WGD_TUN_GRO=0.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, watch};

use crate::{csum, stats};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_USO4: libc::c_ulong = 0x20;
const TUN_F_USO6: libc::c_ulong = 0x40;

const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// Largest read: a 64 KiB super-packet and its header.
const READ_BUF: usize = VNET_HDR_LEN + 65_535 + 1;
/// Reads per wake-up before handing packets on.
const READS_PER_WAKE: usize = 8;
/// Packets written per batch (and coalesced at most into one write).
const WRITE_BATCH: usize = 128;
const MAX_COALESCE: usize = 64;
/// Segments of 1368 bytes filling one 64 KiB GSO write.
const FULL_WRITE: usize = 44;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Clone, Copy, Default)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHdr {
    fn parse(b: &[u8]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

struct Inner {
    fd: AsyncFd<OwnedFd>,
    vnet: bool,
    dead: Arc<Notify>,
    /// The kernel refused a coalesced write once: write segments one by one from then on.
    gro_refused: AtomicBool,
}

impl Inner {
    fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    fn check_fatal(&self, e: &io::Error) {
        if matches!(
            e.raw_os_error(),
            Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::EBADF)
        ) {
            self.dead.notify_one();
        }
    }
}

/// An opened TUN; split into its [`IpSend`] and [`IpRecv`] halves with [`Tun::split`].
pub struct Tun {
    inner: Arc<Inner>,
    mtu: watch::Receiver<u16>,
}

fn env_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

impl Tun {
    /// Create the TUN `name` in the current namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        // SAFETY: plain syscalls on a descriptor we own; the ifreq outlives the ioctl.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let want_vnet = !env_off("WGD_TUN_OFFLOAD");
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI | if want_vnet { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::serve(fd, want_vnet)
    }

    /// Adopt a TUN someone else created (`WG_TUN_FD`, as wireguard-go takes it): wg-cni
    /// creates it right inside the pod's namespace, so it never has to be moved there (a move
    /// costs the kernel an RCU grace period, tens of milliseconds). Whether it carries
    /// virtio-net headers is read off the device.
    pub fn adopt(fd: OwnedFd) -> io::Result<Self> {
        let mut req = ifreq();
        // SAFETY: TUNGETIFF fills an ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if req.flags & IFF_TUN == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(io::Error::other(
                "WG_TUN_FD is not an IFF_TUN|IFF_NO_PI device",
            ));
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Self::serve(fd, req.flags & IFF_VNET_HDR != 0)
    }

    /// Offloads, the MTU watch and the async registration of a TUN descriptor.
    fn serve(fd: OwnedFd, want_vnet: bool) -> io::Result<Self> {
        let mut vnet = want_vnet;
        if vnet {
            let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            let uso = unsafe {
                libc::ioctl(
                    fd.as_raw_fd(),
                    TUNSETOFFLOAD,
                    base | TUN_F_USO4 | TUN_F_USO6,
                )
            };
            // SAFETY: as above.
            if uso < 0 && unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, base) } < 0 {
                // No offloads: keep the header (all zero) but nothing else changes.
                // SAFETY: as above.
                unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
                vnet = true;
            }
        }
        let mut probe = MtuProbe;
        let mtu = probe
            .query(fd.as_raw_fd())
            .ok()
            .flatten()
            .unwrap_or(SAFE_MTU);
        let (mtu_tx, mtu_rx) = watch::channel(mtu);
        // SAFETY: the descriptor is owned by the AsyncFd, which deregisters it before closing.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        let inner = Arc::new(Inner {
            fd,
            vnet,
            dead: Arc::new(Notify::new()),
            gro_refused: AtomicBool::new(false),
        });
        // The MTU caps the padding of what we encrypt: it must follow the device, also after
        // it was moved and renamed (often right after start: polled fast at first).
        // The same poll notices a TUN that was destroyed (its namespace deleted) even when
        // no reader is running (an unconfigured device): TUNGETIFF then fails with EBADFD.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            for round in 0u32.. {
                let pause = if round < 100 { 100 } else { 1000 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let Some(inner) = weak.upgrade() else { return };
                match probe.query(inner.raw()) {
                    Ok(Some(m)) => {
                        mtu_tx.send_if_modified(|v| std::mem::replace(v, m) != m);
                    }
                    // Unreadable (no TUNGETDEVNETNS, no setns, a rename in flight): a cap
                    // below the real MTU only pads less, one above it breaks, so be low.
                    Ok(None) => {
                        mtu_tx.send_if_modified(|v| {
                            let low = (*v).min(SAFE_MTU);
                            std::mem::replace(v, low) != low
                        });
                    }
                    Err(e) => inner.check_fatal(&e),
                }
            }
        });
        Ok(Self { inner, mtu: mtu_rx })
    }

    pub fn dead_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.inner.dead)
    }

    pub fn split(self) -> (TunTx, TunRx) {
        let (tx, rx) = mpsc::channel(4 * WRITE_BATCH);
        let gro = self.inner.vnet && !env_off("WGD_TUN_GRO");
        tokio::spawn(writer(Arc::clone(&self.inner), rx, gro));
        (
            TunTx { tx },
            TunRx {
                inner: self.inner,
                mtu: self.mtu,
                buf: vec![0u8; READ_BUF].into_boxed_slice(),
                out: Vec::new(),
            },
        )
    }
}

/// Reads the TUN's MTU wherever the device lives now: a socket opened inside the device's
/// namespace (TUNGETDEVNETNS, entered with setns on a short-lived thread, so the daemon and
/// its UDP socket stay where they are) asks for it by the device's current name, with a
/// socket made for that one query.
struct MtuProbe;

const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;
/// The padding cap while the MTU cannot be read (IPv6's minimum MTU).
const SAFE_MTU: u16 = 1280;

fn ifreq() -> IfReq {
    IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    }
}

impl MtuProbe {
    /// `Err` when the device is gone, `Ok(None)` when the MTU cannot be read.
    fn query(&mut self, tun: RawFd) -> io::Result<Option<u16>> {
        let mut req = ifreq();
        // SAFETY: TUNGETIFF fills an ifreq.
        if unsafe { libc::ioctl(tun, TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNGETDEVNETNS returns a new descriptor, owned right away.
        let ns = unsafe { libc::ioctl(tun, TUNGETDEVNETNS) };
        if ns < 0 {
            return Ok(None);
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        // A socket in the device's namespace for this one query, closed right after: one kept
        // open would keep that namespace (and with it the TUN) alive after the runtime deleted
        // it, and the daemon would never see its device go.
        let sock = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns moves only this short-lived thread; the socket is owned.
                    unsafe {
                        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) < 0 {
                            return None;
                        }
                        let fd =
                            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
                    }
                })
                .join()
                .ok()
                .flatten()
        });
        drop(ns);
        let Some(sock) = sock else { return Ok(None) };
        req.flags = 0;
        req._pad = [0; 22];
        // SAFETY: SIOCGIFMTU reads the name and fills the union.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
            return Ok(None);
        }
        // ifr_mtu is an int at the start of the union.
        let f = req.flags.to_ne_bytes();
        let mtu = i32::from_ne_bytes([f[0], f[1], req._pad[0], req._pad[1]]);
        Ok(u16::try_from(mtu).ok())
    }
}

pub struct TunTx {
    tx: mpsc::Sender<Packet<[u8]>>,
}

impl IpSend for TunTx {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.tx
            .send(packet.into_bytes())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "TUN writer stopped"))
    }
}

pub struct TunRx {
    inner: Arc<Inner>,
    mtu: watch::Receiver<u16>,
    buf: Box<[u8]>,
    out: Vec<Packet<Ip>>,
}

impl IpRecv for TunRx {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.out.clear();
        while self.out.is_empty() {
            let mut guard = self.inner.fd.readable().await?;
            for _ in 0..READS_PER_WAKE {
                let buf = &mut self.buf;
                let read = guard.try_io(|fd| {
                    // SAFETY: reading into our own buffer of the given length.
                    let n =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                match read {
                    Ok(Ok(n)) => {
                        stats::add(&stats::TUN_READS, 1);
                        if self.inner.vnet {
                            split_into(&mut self.buf[..n], pool, &mut self.out);
                        } else if n > 0 {
                            push_copy(&self.buf[..n], pool, &mut self.out);
                        }
                    }
                    Ok(Err(e)) => {
                        self.inner.check_fatal(&e);
                        if self.out.is_empty() {
                            return Err(e);
                        }
                        break;
                    }
                    Err(_would_block) => break,
                }
            }
        }
        stats::add(&stats::TUN_READ_PKTS, self.out.len());
        Ok(self.out.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        MtuWatcher::from(self.mtu.clone())
    }
}

fn push_copy(data: &[u8], pool: &PacketBufPool, out: &mut Vec<Packet<Ip>>) {
    let mut p = pool.get();
    let b = p.buf_mut();
    b.clear();
    b.extend_from_slice(data);
    if let Ok(ip) = p.try_into_ip() {
        out.push(ip);
    }
}

/// One read with its virtio-net header: a plain packet (maybe with a partial checksum to
/// finish) or a TCP/UDP super-packet to cut into segments.
fn split_into(data: &mut [u8], pool: &PacketBufPool, out: &mut Vec<Packet<Ip>>) {
    if data.len() <= VNET_HDR_LEN {
        return;
    }
    let hdr = VnetHdr::parse(&data[..VNET_HDR_LEN]);
    let pkt = &mut data[VNET_HDR_LEN..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                finish_partial_csum(pkt, hdr.csum_start.into(), hdr.csum_offset.into());
            }
            push_copy(pkt, pool, out);
        }
        GSO_TCPV4 | GSO_TCPV6 => split_tcp(pkt, &hdr, pool, out),
        GSO_UDP_L4 => split_udp(pkt, &hdr, pool, out),
        _ => {}
    }
}

fn finish_partial_csum(pkt: &mut [u8], start: usize, offset: usize) {
    let field = start + offset;
    if field + 2 > pkt.len() {
        return;
    }
    // The field holds the pseudo-header sum already.
    let mut c = !csum::fold(csum::sum(&pkt[start..], 0));
    if offset == 6 && c == 0 {
        c = 0xffff; // UDP: zero means "no checksum"
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

fn l4_pseudo(b: &[u8], proto: u8, l4len: usize) -> Option<u64> {
    match b[0] >> 4 {
        4 if b.len() >= 20 => Some(csum::pseudo(&b[12..16], &b[16..20], proto, l4len)),
        6 if b.len() >= 40 => Some(csum::pseudo(&b[8..24], &b[24..40], proto, l4len)),
        _ => None,
    }
}

/// Set the IP length fields of a segment of `total` bytes (and the IPv4 id and checksum).
fn fix_ip(b: &mut [u8], l4: usize, total: usize, index: usize) {
    if b[0] >> 4 == 4 {
        b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let id = u16::from_be_bytes([b[4], b[5]]).wrapping_add(index as u16);
        b[4..6].copy_from_slice(&id.to_be_bytes());
        csum::ipv4_header(&mut b[..l4]);
    } else {
        b[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    }
}

fn split_tcp(pkt: &[u8], hdr: &VnetHdr, pool: &PacketBufPool, out: &mut Vec<Packet<Ip>>) {
    let l4 = usize::from(hdr.csum_start);
    let gso = usize::from(hdr.gso_size);
    if l4 < 20 || l4 + 20 > pkt.len() || gso == 0 {
        return;
    }
    let hlen = l4 + usize::from(pkt[l4 + 12] >> 4) * 4;
    if hlen > pkt.len() {
        return;
    }
    let seq0 = u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]);
    let payload = &pkt[hlen..];
    let count = payload.len().div_ceil(gso).max(1);
    for (i, chunk) in payload.chunks(gso).enumerate() {
        let mut p = pool.get();
        let b = p.buf_mut();
        b.clear();
        b.extend_from_slice(&pkt[..hlen]);
        b.extend_from_slice(chunk);
        let total = b.len();
        fix_ip(b, l4, total, i);
        let seq = seq0.wrapping_add((i * gso) as u32);
        b[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 != count {
            b[l4 + 13] &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i != 0 {
            b[l4 + 13] &= !0x80; // CWR only on the first
        }
        b[l4 + 16] = 0;
        b[l4 + 17] = 0;
        let Some(ps) = l4_pseudo(b, 6, total - l4) else {
            return;
        };
        let c = !csum::fold(csum::sum(&b[l4..], ps));
        b[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        if let Ok(ip) = p.try_into_ip() {
            out.push(ip);
        }
    }
}

fn split_udp(pkt: &[u8], hdr: &VnetHdr, pool: &PacketBufPool, out: &mut Vec<Packet<Ip>>) {
    let l4 = usize::from(hdr.csum_start);
    let gso = usize::from(hdr.gso_size);
    let hlen = l4 + 8;
    if l4 < 20 || hlen > pkt.len() || gso == 0 {
        return;
    }
    for (i, chunk) in pkt[hlen..].chunks(gso).enumerate() {
        let mut p = pool.get();
        let b = p.buf_mut();
        b.clear();
        b.extend_from_slice(&pkt[..hlen]);
        b.extend_from_slice(chunk);
        let total = b.len();
        fix_ip(b, l4, total, i);
        b[l4 + 4..l4 + 6].copy_from_slice(&((total - l4) as u16).to_be_bytes());
        b[l4 + 6] = 0;
        b[l4 + 7] = 0;
        let Some(ps) = l4_pseudo(b, 17, total - l4) else {
            return;
        };
        let mut c = !csum::fold(csum::sum(&b[l4..], ps));
        if c == 0 {
            c = 0xffff;
        }
        b[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        if let Ok(ip) = p.try_into_ip() {
            out.push(ip);
        }
    }
}

/// Writes what the device decrypted, batch by batch.
async fn writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<Packet<[u8]>>, gro: bool) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let yield_first = !env_off("WGD_TUN_YIELD");
    let yields: usize = std::env::var("WGD_TUN_YIELDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    loop {
        // Let the decrypting task queue a few more packets first: bigger GRO writes (and
        // so fewer TCP ACKs coming back through the tunnel). A few yields, no timer.
        if yield_first {
            for _ in 0..yields {
                if rx.len() >= FULL_WRITE {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let n = rx.recv_many(&mut batch, WRITE_BATCH).await;
        if n == 0 {
            return;
        }
        stats::add(&stats::TUN_WRITE_PKTS, n);
        if gro && !inner.gro_refused.load(Ordering::Relaxed) {
            write_coalesced(&inner, &mut batch);
        } else {
            for p in &batch {
                write_one(&inner, p);
            }
        }
        batch.clear();
    }
}

/// Write one packet (or GSO packet); `Err` only for EINVAL (a header the kernel refused).
fn writev(inner: &Inner, iov: &[libc::iovec]) -> Result<(), ()> {
    // SAFETY: every iovec points into a buffer that lives for this call.
    let n = unsafe { libc::writev(inner.raw(), iov.as_ptr(), iov.len() as libc::c_int) };
    stats::add(&stats::TUN_WRITES, 1);
    if n < 0 {
        // A full queue drops the packet, like a NIC; a vanished device ends the daemon.
        let e = io::Error::last_os_error();
        inner.check_fatal(&e);
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(());
        }
    }
    Ok(())
}

fn iov(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

fn write_one(inner: &Inner, p: &[u8]) {
    let _ = if inner.vnet {
        let hdr = [0u8; VNET_HDR_LEN];
        writev(inner, &[iov(&hdr), iov(p)])
    } else {
        writev(inner, &[iov(p)])
    };
}

/// What a TCP segment looks like for coalescing.
struct TcpSeg {
    l4: usize,
    hlen: usize,
    seq: u32,
    flags: u8,
}

fn tcp_seg(p: &[u8]) -> Option<TcpSeg> {
    let l4 = match p.first()? >> 4 {
        4 => {
            // No options, TCP, not a fragment.
            if p.len() < 40
                || p[0] != 0x45
                || p[9] != 6
                || u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0
            {
                return None;
            }
            20
        }
        6 => {
            if p.len() < 60 || p[6] != 6 {
                return None;
            }
            40
        }
        _ => return None,
    };
    let hlen = l4 + usize::from(p[l4 + 12] >> 4) * 4;
    if hlen < l4 + 20 || hlen > p.len() {
        return None;
    }
    Some(TcpSeg {
        l4,
        hlen,
        seq: u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]),
        flags: p[l4 + 13],
    })
}

/// Whether `q` continues the flow of `first` (addresses, ports, ack, window, options, IP
/// fields other than length/id/checksum all equal).
fn same_flow(first: &[u8], f: &TcpSeg, q: &[u8], s: &TcpSeg) -> bool {
    if f.l4 != s.l4 || f.hlen != s.hlen {
        return false;
    }
    let ip_same = if f.l4 == 20 {
        first[1] == q[1] && first[6..10] == q[6..10] && first[12..20] == q[12..20]
    } else {
        first[..4] == q[..4] && first[6..40] == q[6..40]
    };
    let l4 = f.l4;
    ip_same
        && first[l4..l4 + 4] == q[l4..l4 + 4]
        && first[l4 + 8..l4 + 12] == q[l4 + 8..l4 + 12]
        && first[l4 + 12] == q[l4 + 12]
        && first[l4 + 14..l4 + 16] == q[l4 + 14..l4 + 16]
        && first[l4 + 20..f.hlen] == q[l4 + 20..s.hlen]
}

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

fn write_coalesced(inner: &Inner, batch: &mut [Packet<[u8]>]) {
    let mut i = 0;
    while i < batch.len() {
        let Some(first) = tcp_seg(&batch[i]).filter(|s| s.flags == ACK) else {
            write_one(inner, &batch[i]);
            i += 1;
            continue;
        };
        let gso = batch[i].len() - first.hlen;
        if gso == 0 {
            write_one(inner, &batch[i]);
            i += 1;
            continue;
        }
        let mut total = batch[i].len();
        let mut next_seq = first.seq.wrapping_add(gso as u32);
        let mut end = i + 1;
        let mut psh = false;
        while end < batch.len() && end - i < MAX_COALESCE {
            let q = &batch[end];
            let Some(s) = tcp_seg(q) else { break };
            let len = q.len() - s.hlen;
            if s.seq != next_seq
                || len == 0
                || len > gso
                || (s.flags != ACK && s.flags != ACK | PSH)
                || total + len > 65_535
                || !same_flow(&batch[i], &first, q, &s)
            {
                break;
            }
            total += len;
            next_seq = next_seq.wrapping_add(len as u32);
            end += 1;
            if s.flags & PSH != 0 || len < gso {
                psh = s.flags & PSH != 0;
                break;
            }
        }
        if end == i + 1 {
            write_one(inner, &batch[i]);
            i += 1;
            continue;
        }
        let (head, rest) = batch[i..end].split_at_mut(1);
        let b: &mut [u8] = &mut head[0];
        let l4 = first.l4;
        fix_ip(b, l4, total, 0);
        if psh {
            b[l4 + 13] |= PSH;
        }
        // Partial checksum: the field holds the pseudo-header sum, the kernel finishes it.
        let Some(ps) = l4_pseudo(b, 6, total - l4) else {
            i = end;
            continue;
        };
        b[l4 + 16..l4 + 18].copy_from_slice(&csum::fold(ps).to_be_bytes());
        let vh = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if l4 == 20 { GSO_TCPV4 } else { GSO_TCPV6 },
            hdr_len: first.hlen as u16,
            gso_size: gso as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
        }
        .bytes();
        let mut iovs = Vec::with_capacity(end - i + 1);
        iovs.push(iov(&vh));
        iovs.push(iov(&head[0]));
        for q in rest.iter() {
            let hlen = tcp_seg(q).map_or(q.len(), |s| s.hlen);
            iovs.push(iov(&q[hlen..]));
        }
        if writev(inner, &iovs).is_err() {
            // The kernel refused the GSO packet: undo the merge of the first segment's
            // headers, write the segments one by one and coalesce no more.
            drop(iovs);
            let own = head[0].len();
            let b: &mut [u8] = &mut head[0];
            fix_ip(b, l4, own, 0);
            b[l4 + 16] = 0;
            b[l4 + 17] = 0;
            if let Some(ps) = l4_pseudo(b, 6, own - l4) {
                let c = !csum::fold(csum::sum(&b[l4..], ps));
                b[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
            }
            inner.gro_refused.store(true, Ordering::Relaxed);
            for p in batch[i..end].iter() {
                write_one(inner, p);
            }
        }
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(sum: u64) -> bool {
        csum::fold(sum) == 0xffff
    }

    /// An IPv4 TCP super-packet as the kernel hands it over with TSO: headers of the first
    /// segment, the whole payload, the TCP checksum field seeded with the pseudo-header sum.
    fn super_packet(payload: usize, gso: u16, flags: u8) -> Vec<u8> {
        let l4 = 20;
        let thl = 32; // with 12 bytes of options (timestamps)
        let total = l4 + thl + payload;
        let mut p = vec![0u8; VNET_HDR_LEN + total];
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (l4 + thl) as u16,
            gso_size: gso,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        p[..VNET_HDR_LEN].copy_from_slice(&hdr.bytes());
        let b = &mut p[VNET_HDR_LEN..];
        b[0] = 0x45;
        b[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        b[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        b[6] = 0x40; // DF
        b[8] = 64;
        b[9] = 6;
        b[12..16].copy_from_slice(&[10, 0, 0, 1]);
        b[16..20].copy_from_slice(&[10, 0, 0, 2]);
        csum::ipv4_header(&mut b[..20]);
        b[l4..l4 + 2].copy_from_slice(&5201u16.to_be_bytes());
        b[l4 + 2..l4 + 4].copy_from_slice(&40000u16.to_be_bytes());
        b[l4 + 4..l4 + 8].copy_from_slice(&0xffff_ff00u32.to_be_bytes()); // wraps
        b[l4 + 8..l4 + 12].copy_from_slice(&7u32.to_be_bytes());
        b[l4 + 12] = ((thl / 4) as u8) << 4;
        b[l4 + 13] = flags;
        b[l4 + 14..l4 + 16].copy_from_slice(&512u16.to_be_bytes());
        b[l4 + 20..l4 + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        for (i, x) in b[l4 + thl..].iter_mut().enumerate() {
            *x = (i * 31 % 251) as u8;
        }
        let ps = csum::fold(csum::pseudo(&[10, 0, 0, 1], &[10, 0, 0, 2], 6, total - l4));
        b[l4 + 16..l4 + 18].copy_from_slice(&ps.to_be_bytes());
        p
    }

    #[test]
    fn tso_super_packet_splits_into_valid_segments() {
        let pool = PacketBufPool::new(16);
        let mut data = super_packet(5000, 1448, ACK | PSH | 0x01 | 0x80);
        let mut out = Vec::new();
        split_into(&mut data, &pool, &mut out);
        assert_eq!(out.len(), 4);
        let mut seq = 0xffff_ff00u32;
        for (i, p) in out.into_iter().enumerate() {
            let b = p.into_bytes();
            let b: &[u8] = &b;
            let len = if i < 3 { 1448 } else { 5000 - 3 * 1448 };
            assert_eq!(b.len(), 52 + len);
            assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len());
            assert_eq!(u16::from_be_bytes([b[4], b[5]]), 0x1234 + i as u16);
            assert!(valid(csum::sum(&b[..20], 0)), "IPv4 header checksum of {i}");
            let ps = csum::pseudo(&b[12..16], &b[16..20], 6, b.len() - 20);
            assert!(valid(csum::sum(&b[20..], ps)), "TCP checksum of {i}");
            assert_eq!(u32::from_be_bytes([b[24], b[25], b[26], b[27]]), seq);
            seq = seq.wrapping_add(len as u32);
            let f = b[33];
            assert_eq!(f & (PSH | 0x01) != 0, i == 3, "PSH/FIN only last ({i})");
            assert_eq!(f & 0x80 != 0, i == 0, "CWR only first ({i})");
            assert_eq!(
                &b[52..56],
                &[
                    (i * 1448 * 31 % 251) as u8,
                    ((i * 1448 + 1) * 31 % 251) as u8,
                    ((i * 1448 + 2) * 31 % 251) as u8,
                    ((i * 1448 + 3) * 31 % 251) as u8
                ]
            );
        }
    }

    #[test]
    fn partial_checksum_is_finished() {
        let pool = PacketBufPool::new(4);
        let mut data = super_packet(300, 0, ACK);
        data[1] = GSO_NONE;
        let mut out = Vec::new();
        split_into(&mut data, &pool, &mut out);
        assert_eq!(out.len(), 1);
        let b = out.pop().map(|p| p.into_bytes()).unwrap_or_default();
        let ps = csum::pseudo(&b[12..16], &b[16..20], 6, b.len() - 20);
        assert!(valid(csum::sum(&b[20..], ps)));
    }

    #[test]
    fn segments_of_one_flow_coalesce_and_others_do_not() {
        let pool = PacketBufPool::new(16);
        let mut data = super_packet(3 * 1448, 1448, ACK);
        let mut out = Vec::new();
        split_into(&mut data, &pool, &mut out);
        let segs: Vec<Vec<u8>> = out.into_iter().map(|p| p.into_bytes().to_vec()).collect();
        let first = tcp_seg(&segs[0]).expect("a TCP segment");
        for q in &segs[1..] {
            let s = tcp_seg(q).expect("a TCP segment");
            assert!(same_flow(&segs[0], &first, q, &s));
        }
        let mut other = segs[1].clone();
        other[21] ^= 1; // another source port
        let s = tcp_seg(&other).expect("a TCP segment");
        assert!(!same_flow(&segs[0], &first, &other, &s));
    }
}
