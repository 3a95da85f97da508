//! Relayed-flow detection: the listener of the relay watch's NFLOG group
//! (`nat::relay_watch_rules`). A `FlowWatch` binds the group on a NETLINK_NETFILTER socket of
//! the calling thread's network namespace and yields each logged packet's prefix (the gateway
//! link that relayed it) and its source and destination addresses, read off the copied IPv4 or
//! IPv6 header. The netlink framing and the NFLOG messages are netlink-packet-netfilter's;
//! only the two addresses are read here. A leaf module: blocking calls, for a thread of its own.
//!
//! No PF_BIND: the NFLOG target names its logger (nfnetlink_log) itself, and binding a family
//! would make nfnetlink_log the namespace's default logger for it, taking over other users'
//! log lines (conntrack's "invalid" logging, for one).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use netlink_packet_core_09::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::constants::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};

/// Bytes of each packet asked for: an IPv6 header (the rule's `--nflog-size` may ask less).
const COPY_RANGE: u32 = 40;
/// The socket's receive buffer: room for bursts of small log messages (~150 bytes each).
const SOCKET_BUFFER: usize = 1 << 20;
/// One datagram: the kernel batches log messages up to a page or so.
const DATAGRAM: usize = 64 * 1024;

/// One logged packet of a relayed flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedFlow {
    /// The rule's `--nflog-prefix`: the gateway link that relayed it.
    pub prefix: String,
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// The listener of one NFLOG group in one network namespace (the one the thread that opened
/// it was in). Only one socket may bind a group: a second `open` fails (EPERM). Dropping
/// it closes the socket, which releases the group.
pub struct FlowWatch {
    socket: Socket,
    buffer: Vec<u8>,
    pending: VecDeque<RelayedFlow>,
    timeout: Option<Duration>,
}

impl FlowWatch {
    /// Bind NFLOG `group` in the calling thread's network namespace: copy mode packet (the
    /// first `COPY_RANGE` bytes), each message sent at once (queue threshold 1).
    pub fn open(group: u16) -> io::Result<FlowWatch> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A larger buffer is an optimisation: without the privilege (SO_RCVBUFFORCE) the
        // kernel's default holds a few hundred messages.
        let _ = socket.set_rx_buf_sz(SOCKET_BUFFER);
        let mut watch = FlowWatch {
            socket,
            buffer: vec![0; DATAGRAM],
            pending: VecDeque::new(),
            timeout: None,
        };
        watch.configure(
            group,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(COPY_RANGE).into(),
                ConfigNla::QThresh(1),
            ],
        )?;
        Ok(watch)
    }

    /// The next relayed flow; blocks until one is logged.
    pub fn recv(&mut self) -> io::Result<RelayedFlow> {
        loop {
            if let Some(flow) = self.pending.pop_front() {
                return Ok(flow);
            }
            self.fill(None)?;
        }
    }

    /// The next relayed flow, or `None` once `timeout` passed without one.
    pub fn recv_timeout(&mut self, timeout: Duration) -> io::Result<Option<RelayedFlow>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(flow) = self.pending.pop_front() {
                return Ok(Some(flow));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.fill(Some(left))? {
                return Ok(None);
            }
        }
    }

    /// Send one config message for `group` and wait for the kernel's answer.
    fn configure(&mut self, group: u16, nlas: Vec<ConfigNla>) -> io::Result<()> {
        let request = config_request(NetfilterProtoFamily::Unspec, group, nlas);
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        self.set_timeout(Some(Duration::from_secs(5)))?;
        loop {
            let received = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            for message in messages(&self.buffer[..received]) {
                match message.map(|m| m.payload) {
                    Ok(NetlinkPayload::Error(e)) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Read one datagram into `pending`; false when `timeout` passed without one. A socket
    /// overrun (ENOBUFS: the kernel dropped messages) loses flows, not the watch: the busy
    /// pairs are logged again within a second.
    fn fill(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.set_timeout(timeout)?;
        let received = match self.socket.recv(&mut &mut self.buffer[..], 0) {
            Ok(received) => received,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                tracing::warn!("the relayed-flow log overran its socket: some flows were lost");
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) if timeout.is_some() && is_timeout(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        for message in messages(&self.buffer[..received]) {
            match message {
                Ok(message) => self.pending.extend(flow_of(&message)),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable NFLOG message"),
            }
        }
        Ok(true)
    }

    /// SO_RCVTIMEO (none: block), set only when it changes.
    fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero SO_RCVTIMEO means "block forever": wait at least a microsecond.
        let timeout = timeout.map(|t| t.max(Duration::from_micros(1)));
        if timeout == self.timeout {
            return Ok(());
        }
        let timeout_or_none = timeout.unwrap_or_default();
        let value = nix::sys::time::TimeVal::new(
            timeout_or_none.as_secs() as nix::libc::time_t,
            timeout_or_none.subsec_micros() as nix::libc::suseconds_t,
        );
        nix::sys::socket::setsockopt(
            &self.socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &value,
        )?;
        self.timeout = timeout;
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The netlink messages of one datagram, in order; one that does not parse ends the walk
/// (its length cannot be trusted).
fn messages(datagram: &[u8]) -> impl Iterator<Item = io::Result<NetlinkMessage<NetfilterMessage>>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= datagram.len() {
            return None;
        }
        match NetlinkMessage::<NetfilterMessage>::deserialize(&datagram[offset..]) {
            Ok(message) => {
                let length = message.header.length as usize;
                offset = match length {
                    0 => datagram.len(),
                    length => offset + length.next_multiple_of(4),
                };
                Some(Ok(message))
            }
            Err(e) => {
                offset = datagram.len();
                Some(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
            }
        }
    })
}

/// The flow of an NFLOG packet message: its prefix and its packet's addresses. `None` for any
/// other message, or a packet without a prefix or too short to hold its addresses.
fn flow_of(message: &NetlinkMessage<NetfilterMessage>) -> Option<RelayedFlow> {
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
        ..
    }) = &message.payload
    else {
        return None;
    };
    let prefix = nlas.iter().find_map(|nla| match nla {
        PacketNla::Prefix(prefix) => Some(prefix.to_string_lossy().into_owned()),
        _ => None,
    })?;
    let (src, dst) = nlas.iter().find_map(|nla| match nla {
        PacketNla::Payload(payload) => addresses(payload),
        _ => None,
    })?;
    Some(RelayedFlow { prefix, src, dst })
}

/// Source and destination of the IPv4 or IPv6 header at the start of `packet`.
fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 header from `src` to `dst` (only the fields read here are real).
    fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut header = vec![0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0];
        header.extend_from_slice(&src);
        header.extend_from_slice(&dst);
        header
    }

    fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut header = vec![0x60, 0, 0, 0, 0, 64, 58, 64];
        header.extend_from_slice(&src.octets());
        header.extend_from_slice(&dst.octets());
        header
    }

    /// One attribute as the kernel writes it: length, type, value, padding to 4 bytes.
    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    /// An NFULNL_MSG_PACKET as nfnetlink_log sends it for group 30567: packet header,
    /// out interface, prefix (NUL-terminated) and the copied bytes of the packet.
    fn log_message(family: u8, prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![family, 0];
        body.extend_from_slice(&30567u16.to_be_bytes());
        body.extend(attribute(1, &[0x08, 0x00, 4, 0])); // NFULA_PACKET_HDR: ETH_P_IP, hook 4
        body.extend(attribute(5, &7u32.to_be_bytes())); // NFULA_IFINDEX_OUTDEV
        let mut text = prefix.as_bytes().to_vec();
        text.push(0);
        body.extend(attribute(10, &text)); // NFULA_PREFIX
        body.extend(attribute(9, payload)); // NFULA_PAYLOAD
        let mut message = Vec::new();
        message.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        message.extend_from_slice(&0x0400u16.to_ne_bytes()); // NFNL_SUBSYS_ULOG, MSG_PACKET
        message.extend_from_slice(&[0; 10]); // flags, sequence, port
        message.extend(body);
        message
    }

    fn flows(datagram: &[u8]) -> Vec<RelayedFlow> {
        messages(datagram)
            .filter_map(|m| flow_of(&m.unwrap()))
            .collect()
    }

    #[test]
    fn a_logged_ipv4_packet_is_its_prefix_and_addresses() {
        let message = log_message(
            2,
            "wgg0123456789ab",
            &ipv4_header([10, 66, 1, 2], [10, 66, 2, 3]),
        );
        assert_eq!(
            flows(&message),
            vec![RelayedFlow {
                prefix: "wgg0123456789ab".into(),
                src: "10.66.1.2".parse().unwrap(),
                dst: "10.66.2.3".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn a_logged_ipv6_packet_and_a_batch_of_two_in_one_datagram() {
        let (a, b): (Ipv6Addr, Ipv6Addr) =
            ("fd66:1::2".parse().unwrap(), "fd66:2::3".parse().unwrap());
        let mut datagram = log_message(10, "wggaa", &ipv6_header(a, b));
        datagram.extend(log_message(
            2,
            "wggbb",
            &ipv4_header([10, 0, 0, 1], [10, 0, 0, 2]),
        ));
        let got = flows(&datagram);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].prefix.as_str(), got[0].src, got[0].dst),
            ("wggaa", a.into(), b.into())
        );
        assert_eq!(got[1].prefix, "wggbb");
        assert_eq!(got[1].dst, "10.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn short_or_foreign_payloads_and_other_messages_are_no_flow() {
        assert_eq!(
            addresses(&ipv4_header([1, 2, 3, 4], [5, 6, 7, 8])[..19]),
            None
        );
        let v6 = ipv6_header(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST);
        assert_eq!(addresses(&v6[..39]), None);
        assert_eq!(addresses(&[0x20; 40]), None, "not IP");
        assert_eq!(addresses(&[]), None);
        assert!(flows(&log_message(2, "wgg", &[0x45; 12])).is_empty());
        // An ack (NLMSG_ERROR, code 0) carries no flow.
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&2u16.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&[0; 20]);
        assert!(flows(&ack).is_empty());
    }

    #[test]
    fn a_packet_without_a_prefix_is_no_flow() {
        let mut message = log_message(2, "x", &ipv4_header([1, 1, 1, 1], [2, 2, 2, 2]));
        // Turn the prefix attribute into an unknown one (type 60).
        let at = message
            .windows(4)
            .position(|w| w == [6, 0, 10, 0])
            .expect("the prefix attribute");
        message[at + 2] = 60;
        assert!(flows(&message).is_empty());
    }
}
