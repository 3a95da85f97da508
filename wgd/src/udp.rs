//! The UDP side: one dual-stack socket bound in the daemon's namespace, sendmmsg with UDP GSO
//! (runs of same-size datagrams to one endpoint leave as one UDP_SEGMENT message), recvmmsg
//! with UDP GRO, and large socket buffers. Received cookie-bearing handshake initiations pass
//! through `limit` (per source address and port, under load) before the device sees them.
//!
//! Binding is done ahead of time for UAPI `listen_port`: a taken port is answered as
//! `errno=98` (EADDRINUSE) without touching the running device; the socket bound there is
//! handed to the device when it rebinds. A rebind on the same port (e.g. a new private key)
//! reuses the live socket. Knobs: WGD_UDP_GSO=0, WGD_UDP_GRO=0, WGD_SOCKBUF=bytes.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use bytes::BytesMut;
use gotatun::packet::{Packet, PacketBufPool};
use gotatun::udp::{UdpRecv, UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use tokio::io::Interest;

use crate::limit::Limiter;
use crate::stats;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Datagrams handed over per send call.
const SEND_BATCH: usize = 256;
/// Segments per GSO message (the kernel allows 64) and bytes per message.
const GSO_SEGMENTS: usize = 64;
const GSO_BYTES: usize = 65_000;
/// Messages per recvmmsg and the room for each (a GRO message holds up to 64 KiB).
const RECV_MSGS: usize = 16;
const RECV_SLOT: usize = 65_536;
const DEFAULT_SOCKBUF: libc::c_int = 4 << 20;

fn env_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

/// State shared by the factory, its sockets and the UAPI server.
pub struct Shared {
    /// The socket of the running device (a duplicate), by port.
    current: Mutex<Option<(u16, OwnedFd)>>,
    /// A socket bound ahead for a `listen_port` request.
    prebound: Mutex<Option<(u16, OwnedFd)>>,
    /// The last bind error of the factory (a UAPI `set` that failed reports its errno).
    bind_error: Mutex<Option<io::Error>>,
    port: AtomicU16,
    has_key: AtomicBool,
    gso: AtomicBool,
    gro: bool,
    sockbuf: libc::c_int,
}

impl Shared {
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Whether the device has a private key (told by the UAPI server).
    pub fn has_key(&self) -> bool {
        self.has_key.load(Ordering::Relaxed)
    }

    pub fn set_has_key(&self, has: bool) {
        self.has_key.store(has, Ordering::Relaxed);
    }

    /// Bind `port` now, for the device to take on its next bind.
    pub fn prebind(&self, port: u16) -> io::Result<()> {
        let fd = bind_socket(port, self.sockbuf)?;
        *self.prebound.lock().unwrap_or_else(|e| e.into_inner()) = Some((port, fd));
        Ok(())
    }

    pub fn take_bind_error(&self) -> Option<io::Error> {
        self.bind_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

pub struct Factory {
    shared: Arc<Shared>,
}

impl Factory {
    pub fn new() -> Self {
        let sockbuf = std::env::var("WGD_SOCKBUF")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SOCKBUF);
        Self {
            shared: Arc::new(Shared {
                current: Mutex::new(None),
                prebound: Mutex::new(None),
                bind_error: Mutex::new(None),
                port: AtomicU16::new(0),
                has_key: AtomicBool::new(false),
                gso: AtomicBool::new(!env_off("WGD_UDP_GSO")),
                gro: !env_off("WGD_UDP_GRO"),
                sockbuf,
            }),
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    fn socket_for(&self, port: u16) -> io::Result<OwnedFd> {
        if port != 0 {
            let mut pre = self
                .shared
                .prebound
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((p, _)) = pre.as_ref()
                && *p == port
                && let Some((_, fd)) = pre.take()
            {
                return Ok(fd);
            }
            drop(pre);
            let cur = self
                .shared
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((p, fd)) = cur.as_ref()
                && *p == port
            {
                return fd.try_clone();
            }
        }
        bind_socket(port, self.shared.sockbuf)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option by pointer and size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A dual-stack UDP socket on `[::]:port` (IPv4 only where IPv6 is off), buffers sized.
pub fn bind_socket(port: u16, sockbuf: libc::c_int) -> io::Result<OwnedFd> {
    let open = |family| {
        // SAFETY: creating a socket; the result is owned right away.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a fresh descriptor owned by nothing else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    };
    let fd = match open(libc::AF_INET6) {
        Ok(fd) => {
            setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
            // SAFETY: binding to an in6 address of the right size.
            let r = unsafe {
                let mut sa: libc::sockaddr_in6 = zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = port.to_be();
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let fd = open(libc::AF_INET)?;
            // SAFETY: binding to an in address of the right size.
            let r = unsafe {
                let mut sa: libc::sockaddr_in = zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = port.to_be();
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        }
        Err(e) => return Err(e),
    };
    let raw = fd.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, sockbuf).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, sockbuf);
        }
    }
    Ok(fd)
}

impl UdpTransportFactory for Factory {
    type Send = Udp;
    type Recv = UdpRx;

    async fn bind(&mut self, params: &UdpTransportFactoryParams) -> io::Result<(Udp, UdpRx)> {
        let fd = match self.socket_for(params.port) {
            Ok(fd) => fd,
            Err(e) => {
                let copy = io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EINVAL));
                *self
                    .shared
                    .bind_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(copy);
                return Err(e);
            }
        };
        if let Some(mark) = params.fwmark {
            setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                mark as libc::c_int,
            )?;
        }
        if self.shared.gro {
            let _ = setsockopt_int(fd.as_raw_fd(), SOL_UDP, UDP_GRO, 1);
        }
        let dup = fd.try_clone()?;
        let std = std::net::UdpSocket::from(fd);
        let local = std.local_addr()?;
        let sock = tokio::net::UdpSocket::from_std(std)?;
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((local.port(), dup));
        self.shared.port.store(local.port(), Ordering::Relaxed);
        let udp = Udp {
            sock: Arc::new(sock),
            v6: local.is_ipv6(),
            shared: Arc::clone(&self.shared),
        };
        let rx = UdpRx {
            sock: Arc::clone(&udp.sock),
            limit: Limiter::new(),
        };
        Ok((udp, rx))
    }
}

/// The sending side (gotatun clones it for its tasks).
#[derive(Clone)]
pub struct Udp {
    sock: Arc<tokio::net::UdpSocket>,
    v6: bool,
    shared: Arc<Shared>,
}

/// The receiving side: one per socket, read by one task, so the limiter needs no lock.
pub struct UdpRx {
    sock: Arc<tokio::net::UdpSocket>,
    limit: Limiter,
}

impl Udp {
    fn map_dst(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            a => a,
        }
    }
}

fn map_src(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => SocketAddr::V6(a),
        },
        a => a,
    }
}

fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is large and aligned enough for either address type.
    unsafe {
        match addr {
            SocketAddr::V4(a) => {
                let sa = &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                let sa = &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = a.port().to_be();
                sa.sin6_flowinfo = 0;
                sa.sin6_addr.s6_addr = a.ip().octets();
                sa.sin6_scope_id = a.scope_id();
                size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }
}

fn from_storage(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family tells which address type the kernel wrote.
    unsafe {
        match i32::from(sa.ss_family) {
            libc::AF_INET => {
                let a = &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(map_src(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    0,
                    a.sin6_scope_id,
                ))))
            }
            _ => None,
        }
    }
}

/// Room for one UDP_SEGMENT / UDP_GRO control message (an int, padded).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Cmsg([u8; 32]);

/// Scratch space for sendmmsg. The raw pointers in it are only valid during one call.
#[derive(Default)]
pub struct SendBuf {
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<Cmsg>,
    /// (first packet, packet count, segment size or 0) per message.
    groups: Vec<(usize, usize, usize)>,
}

// SAFETY: the pointers are rebuilt before every use and never dereferenced elsewhere.
unsafe impl Send for SendBuf {}
// SAFETY: as above.
unsafe impl Sync for SendBuf {}

impl SendBuf {
    fn build(&mut self, packets: &[(Packet, SocketAddr)], udp: &Udp, gso: bool) {
        self.groups.clear();
        let mut i = 0;
        while i < packets.len() {
            let (first, dst) = (&packets[i].0, packets[i].1);
            let size = first.len();
            let mut n = 1;
            if gso && size > 0 {
                let max = GSO_SEGMENTS.min(GSO_BYTES / size);
                while i + n < packets.len() && n < max {
                    let (p, d) = (&packets[i + n].0, packets[i + n].1);
                    if d != dst || p.len() > size || p.is_empty() {
                        break;
                    }
                    n += 1;
                    if p.len() < size {
                        break; // a shorter datagram may only end a run
                    }
                }
            }
            self.groups.push((i, n, if n > 1 { size } else { 0 }));
            i += n;
        }
        self.iov.clear();
        for (p, _) in packets {
            self.iov.push(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
        }
        let m = self.groups.len();
        // SAFETY: all-zero is a valid value for these C structs.
        self.msgs.resize(m, unsafe { zeroed() });
        // SAFETY: as above.
        self.addrs.resize(m, unsafe { zeroed() });
        self.cmsgs.resize(m, Cmsg([0; 32]));
        for (k, &(first, n, seg)) in self.groups.iter().enumerate() {
            let len = to_storage(udp.map_dst(packets[first].1), &mut self.addrs[k]);
            let hdr = &mut self.msgs[k].msg_hdr;
            hdr.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = len;
            // SAFETY: the iovec slice covers packets first..first+n.
            hdr.msg_iov = unsafe { self.iov.as_mut_ptr().add(first) };
            hdr.msg_iovlen = n;
            if seg > 0 {
                let c = &mut self.cmsgs[k];
                hdr.msg_control = c.0.as_mut_ptr().cast();
                // SAFETY: CMSG macros on a control buffer of sufficient size.
                unsafe {
                    hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
                    let cm = libc::CMSG_FIRSTHDR(hdr);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), seg as u16);
                }
            } else {
                hdr.msg_control = std::ptr::null_mut();
                hdr.msg_controllen = 0;
            }
            hdr.msg_flags = 0;
            self.msgs[k].msg_len = 0;
        }
    }
}

impl UdpSend for Udp {
    type SendManyBuf = SendBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.sock
            .send_to(&packet, self.map_dst(destination))
            .await?;
        Ok(())
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        SEND_BATCH
    }

    async fn send_many_to(
        &self,
        buf: &mut SendBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let gso = self.shared.gso.load(Ordering::Relaxed);
        buf.build(packets, self, gso);
        stats::add(&stats::UDP_SEND_PKTS, packets.len());
        stats::add(&stats::UDP_SEND_MSGS, buf.msgs.len());
        let fd = self.sock.as_raw_fd();
        let total = buf.msgs.len();
        let mut next = 0;
        while next < total {
            // An address, not a reference: the raw headers themselves are not Send.
            let msgs = buf.msgs.as_mut_ptr() as usize;
            let sent = self
                .sock
                .async_io(Interest::WRITABLE, || {
                    // SAFETY: the headers point at live packets, addresses and control data.
                    let r = unsafe {
                        libc::sendmmsg(
                            fd,
                            (msgs as *mut libc::mmsghdr).add(next),
                            (total - next) as u32,
                            0,
                        )
                    };
                    if r < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(r as usize)
                    }
                })
                .await;
            stats::add(&stats::UDP_SENDMMSG, 1);
            match sent {
                Ok(n) => next += n.max(1),
                Err(e) => {
                    let seg = buf.groups[next].2;
                    if seg > 0
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                        )
                    {
                        // No UDP GSO on this path: send one by one from now on.
                        self.shared.gso.store(false, Ordering::Relaxed);
                    }
                    next += 1; // drop this message, as a NIC would
                }
            }
        }
        packets.clear();
        Ok(())
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.sock.local_addr().map(Some)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        setsockopt_int(
            self.sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    }
}

/// Scratch space for recvmmsg: RECV_MSGS slots of 64 KiB (untouched pages cost no memory
/// until traffic uses them). A GRO train received into a slot is handed out as views of it
/// (no copy) and the slot gets a fresh allocation.
#[derive(Default)]
pub struct RecvBuf {
    slots: Vec<BytesMut>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<Cmsg>,
}

// SAFETY: the pointers are rebuilt before every use and never dereferenced elsewhere.
unsafe impl Send for RecvBuf {}
// SAFETY: as above.
unsafe impl Sync for RecvBuf {}

impl RecvBuf {
    fn prepare(&mut self) {
        if self.slots.is_empty() {
            self.slots = (0..RECV_MSGS).map(|_| BytesMut::new()).collect();
            // SAFETY: all-zero is a valid value for these C structs.
            self.msgs = vec![unsafe { zeroed() }; RECV_MSGS];
            // SAFETY: as above.
            self.addrs = vec![unsafe { zeroed() }; RECV_MSGS];
            self.cmsgs = vec![Cmsg([0; 32]); RECV_MSGS];
            self.iov = Vec::with_capacity(RECV_MSGS);
        }
        self.iov.clear();
        for slot in &mut self.slots {
            if slot.capacity() < RECV_SLOT {
                *slot = BytesMut::with_capacity(RECV_SLOT);
            }
            slot.clear();
            self.iov.push(libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: RECV_SLOT,
            });
        }
        for k in 0..RECV_MSGS {
            let hdr = &mut self.msgs[k].msg_hdr;
            hdr.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: iov has RECV_MSGS entries.
            hdr.msg_iov = unsafe { self.iov.as_mut_ptr().add(k) };
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[k].0.as_mut_ptr().cast();
            hdr.msg_controllen = 32;
            hdr.msg_flags = 0;
            self.msgs[k].msg_len = 0;
        }
    }

    /// The GRO segment size of message `k`, if the kernel coalesced it.
    fn gro_size(&mut self, k: usize) -> Option<usize> {
        let hdr = &self.msgs[k].msg_hdr;
        // SAFETY: walking the control messages the kernel wrote into our buffer.
        unsafe {
            let mut cm = libc::CMSG_FIRSTHDR(hdr);
            while !cm.is_null() {
                if (*cm).cmsg_level == SOL_UDP && (*cm).cmsg_type == UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<libc::c_int>());
                    return usize::try_from(v).ok().filter(|v| *v > 0);
                }
                cm = libc::CMSG_NXTHDR(hdr, cm);
            }
        }
        None
    }
}

fn push_datagram(
    data: &[u8],
    src: SocketAddr,
    pool: &PacketBufPool,
    out: &mut Vec<(Packet, SocketAddr)>,
) {
    let mut p = pool.get();
    let b = p.buf_mut();
    b.clear();
    b.extend_from_slice(data);
    out.push((p, src));
}

impl UdpRecv for UdpRx {
    type RecvManyBuf = RecvBuf;

    async fn recv_from(&mut self, pool: &mut PacketBufPool) -> io::Result<(Packet, SocketAddr)> {
        loop {
            let mut p = pool.get();
            let (n, src) = self.sock.recv_from(&mut p).await?;
            p.truncate(n);
            let src = map_src(src);
            let now = self.limit.now();
            if self.limit.admit(&p, src, now) {
                return Ok((p, src));
            }
            stats::add(&stats::UDP_RECV_DROPPED, 1);
        }
    }

    async fn recv_many_from(
        &mut self,
        buf: &mut RecvBuf,
        pool: &mut PacketBufPool,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let n = self
            .sock
            .async_io(Interest::READABLE, || {
                buf.prepare();
                // SAFETY: RECV_MSGS headers pointing at our own buffers.
                let r = unsafe {
                    libc::recvmmsg(
                        fd,
                        buf.msgs.as_mut_ptr(),
                        RECV_MSGS as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            })
            .await?;
        stats::add(&stats::UDP_RECVMMSG, 1);
        let before = packets.len();
        let now = self.limit.now();
        let mut dropped = 0;
        for k in 0..n {
            let len = (buf.msgs[k].msg_len as usize).min(RECV_SLOT);
            let Some(src) = from_storage(&buf.addrs[k]) else {
                continue;
            };
            let gro = buf.gro_size(k);
            let slot = &mut buf.slots[k];
            // SAFETY: the kernel wrote `len` bytes at the start of this slot's capacity.
            unsafe { slot.set_len(len) };
            match gro {
                Some(seg) if seg < len => {
                    // A train of one source's same-size datagrams: a flood's initiations come
                    // this way too, and are limited one by one.
                    let mut train = slot.split_to(len);
                    while !train.is_empty() {
                        let part = train.split_to(seg.min(train.len()));
                        if self.limit.admit(&part, src, now) {
                            packets.push((Packet::from_bytes(part), src));
                        } else {
                            dropped += 1;
                        }
                    }
                }
                _ if self.limit.admit(slot, src, now) => push_datagram(slot, src, pool, packets),
                _ => dropped += 1,
            }
        }
        stats::add(&stats::UDP_RECV_PKTS, packets.len() - before);
        stats::add(&stats::UDP_RECV_DROPPED, dropped);
        Ok(())
    }
}
