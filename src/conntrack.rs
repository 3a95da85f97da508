//! Conntrack entries of a pod pair, over ctnetlink: counted, and deleted when a pair moves
//! between the relay and a direct peer (a long stream that returns to the relay must not meet
//! kube-proxy's `--ctstate INVALID -j DROP` with a TCP window from before). As
//! `conntrack -D -s A -d B` does it: dump the entries whose original tuple goes from one end
//! to the other, then delete each by its full original tuple, zone and id. IPv4 dumps are
//! filtered in the kernel where it can (CTA_FILTER, Linux 5.8 on); IPv6 dumps are not (Linux
//! 6.18 accepted an IPv6 filter and ignored it, and the IPv6 compare of some versions' filter
//! code reads inverted); every entry is checked here whatever the kernel did.
//! A delete without a tuple would flush the whole table: every request here carries one.
//! The messages are netlink-packet-netfilter's. A leaf module; the calling thread's network
//! namespace is the one acted on.

use std::io;
use std::net::IpAddr;

use netlink_packet_core_09::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, Tuple};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::constants::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};

const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// CTA_FILTER_F_CTA_IP_SRC | CTA_FILTER_F_CTA_IP_DST (the kernel's nf_internals.h).
const FILTER_ON_ADDRESSES: u32 = 0b11;
const DATAGRAM: usize = 64 * 1024;
const NLMSG_HEADER: usize = 16;
const NFGEN_HEADER: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;

/// Delete every conntrack entry whose original tuple goes from `a` to `b` or from `b` to `a`
/// (every protocol and zone); answers how many were deleted. An entry that went away
/// meanwhile is not counted.
pub fn forget_pair(a: IpAddr, b: IpAddr) -> io::Result<usize> {
    let socket = Ctnetlink::open()?;
    let mut deleted = 0;
    for entry in socket.pair_entries(a, b)? {
        let request = ConntrackMessage::Delete(entry);
        match socket.exchange(family_of(a), request, NLM_F_REQUEST | NLM_F_ACK, |_| {}) {
            Ok(()) => deleted += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// How many conntrack entries have an original tuple from `a` to `b` or from `b` to `a`.
pub fn count_pair(a: IpAddr, b: IpAddr) -> io::Result<usize> {
    Ok(Ctnetlink::open()?.pair_entries(a, b)?.len())
}

struct Ctnetlink {
    socket: Socket,
    sequence: std::cell::Cell<u32>,
}

impl Ctnetlink {
    fn open() -> io::Result<Ctnetlink> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Ctnetlink {
            socket,
            sequence: std::cell::Cell::new(1),
        })
    }

    /// What identifies each entry of the pair to a delete: its original tuple, its zone and
    /// its id (so an entry that was replaced meanwhile is left alone).
    fn pair_entries(&self, a: IpAddr, b: IpAddr) -> io::Result<Vec<Vec<ConntrackAttribute>>> {
        if a.is_ipv4() != b.is_ipv4() {
            return Ok(Vec::new());
        }
        let family = family_of(a);
        let mut entries = Vec::new();
        let directions: &[(IpAddr, IpAddr)] = match (a.is_ipv4(), a == b) {
            (false, _) => &[],
            (true, true) => &[(a, b)],
            (true, false) => &[(a, b), (b, a)],
        };
        let mut filtered = directions
            .iter()
            .try_for_each(|&(src, dst)| self.dump(family, Some((src, dst)), &mut entries));
        // A kernel that refuses the filter (before 5.8), and IPv6: one dump of the family.
        if directions.is_empty() || filtered.as_ref().is_err_and(refused_filter) {
            entries.clear();
            filtered = self.dump(family, None, &mut entries);
        }
        filtered?;
        Ok(entries
            .into_iter()
            .filter(|attributes| {
                orig_addresses(attributes).is_some_and(|ends| ends == (a, b) || ends == (b, a))
            })
            .map(|attributes| identity(&attributes))
            .collect())
    }

    /// Dump the entries of `family` (those of `filter`'s original source and destination
    /// when given: the kernel may ignore it) into `into`.
    fn dump(
        &self,
        family: NetfilterProtoFamily,
        filter: Option<(IpAddr, IpAddr)>,
        into: &mut Vec<Vec<ConntrackAttribute>>,
    ) -> io::Result<()> {
        let attributes = filter.map_or_else(Vec::new, |(src, dst)| filter_attributes(src, dst));
        let request = ConntrackMessage::Get(attributes);
        self.exchange(family, request, NLM_F_REQUEST | NLM_F_DUMP, |message| {
            if let ConntrackMessage::New(attributes) = message {
                into.push(attributes);
            }
        })
    }

    /// Send `message` and hand every conntrack answer to `each` until the kernel acks or ends
    /// the dump; an error answer is the error.
    fn exchange(
        &self,
        family: NetfilterProtoFamily,
        message: ConntrackMessage,
        flags: u16,
        mut each: impl FnMut(ConntrackMessage),
    ) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let sequence = self.sequence.get();
        self.sequence.set(sequence.wrapping_add(1));
        header.sequence_number = sequence;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                message,
            )),
        );
        request.finalize();
        let mut buffer = vec![0; DATAGRAM.max(request.buffer_len())];
        request.serialize(&mut buffer[..request.buffer_len()]);
        mark_nested(
            &mut buffer[NLMSG_HEADER + NFGEN_HEADER..request.buffer_len()],
            CTA_FILTER,
        );
        self.socket.send(&buffer[..request.buffer_len()], 0)?;
        loop {
            let received = self.socket.recv(&mut &mut buffer[..], 0)?;
            let mut offset = 0;
            while offset < received {
                let answer =
                    NetlinkMessage::<NetfilterMessage>::deserialize(&buffer[offset..received])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let length = answer.header.length as usize;
                if answer.header.sequence_number != sequence {
                    // Not ours (an answer to an earlier request that timed out): skip it.
                } else {
                    match answer.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(()),
                                Some(_) => Err(e.to_io()),
                            };
                        }
                        NetlinkPayload::Done(_) => return Ok(()),
                        NetlinkPayload::InnerMessage(NetfilterMessage {
                            inner: NetfilterMessageInner::Conntrack(message),
                            ..
                        }) => each(message),
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
            }
        }
    }
}

fn family_of(address: IpAddr) -> NetfilterProtoFamily {
    match address {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    }
}

/// Whether a dump failed for its filter (a kernel before CTA_FILTER's tuple matching).
fn refused_filter(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EOPNOTSUPP) | Some(nix::libc::EINVAL)
    )
}

/// A dump request's filter: original source `src`, original destination `dst`.
fn filter_attributes(src: IpAddr, dst: IpAddr) -> Vec<ConntrackAttribute> {
    let tuple = ConntrackAttribute::CtaTupleOrig(vec![Tuple::Ip(vec![
        IPTuple::SourceAddress(src),
        IPTuple::DestinationAddress(dst),
    ])]);
    // CTA_FILTER { CTA_FILTER_ORIG_FLAGS: u32 in host order }, nested.
    let mut flags = Vec::with_capacity(8);
    flags.extend_from_slice(&8u16.to_ne_bytes());
    flags.extend_from_slice(&CTA_FILTER_ORIG_FLAGS.to_ne_bytes());
    flags.extend_from_slice(&FILTER_ON_ADDRESSES.to_ne_bytes());
    let filter = ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER, flags));
    vec![tuple, filter]
}

/// Set NLA_F_NESTED on the top-level attributes of type `kind` in `attributes` (a request's,
/// as serialized). The kernel parses CTA_FILTER strictly and refuses it without the flag
/// (EINVAL), but netlink-packet-core's `DefaultNla`, the only way to send an attribute the
/// crate does not name, always emits its type without flags.
fn mark_nested(attributes: &mut [u8], kind: u16) {
    let mut at = 0;
    while at + 4 <= attributes.len() {
        let length = u16::from_ne_bytes([attributes[at], attributes[at + 1]]) as usize;
        let found = u16::from_ne_bytes([attributes[at + 2], attributes[at + 3]]);
        if length < 4 || at + length > attributes.len() {
            return;
        }
        if found & !NLA_F_NESTED == kind {
            attributes[at + 2..at + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        }
        at += length.next_multiple_of(4);
    }
}

/// The source and destination of an entry's original tuple.
fn orig_addresses(attributes: &[ConntrackAttribute]) -> Option<(IpAddr, IpAddr)> {
    let tuple = attributes.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleOrig(tuple) => Some(tuple),
        _ => None,
    })?;
    let ip = tuple.iter().find_map(|t| match t {
        Tuple::Ip(ip) => Some(ip),
        _ => None,
    })?;
    let src = ip.iter().find_map(|a| match a {
        IPTuple::SourceAddress(a) => Some(*a),
        _ => None,
    })?;
    let dst = ip.iter().find_map(|a| match a {
        IPTuple::DestinationAddress(a) => Some(*a),
        _ => None,
    })?;
    Some((src, dst))
}

/// The attributes of a dumped entry that name it to a delete: the original tuple (always
/// there: `orig_addresses` found it), the zone and the id.
fn identity(attributes: &[ConntrackAttribute]) -> Vec<ConntrackAttribute> {
    attributes
        .iter()
        .filter(|a| match a {
            ConntrackAttribute::CtaTupleOrig(_) => true,
            ConntrackAttribute::Other(nla) => {
                use netlink_packet_core_09::Nla;
                matches!(nla.kind(), CTA_ZONE | CTA_ID)
            }
            _ => false,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use netlink_packet_core_09::{Emitable, Parseable};
    use netlink_packet_netfilter::conntrack::{ProtoTuple, Protocol};

    use super::*;

    fn entry(src: &str, dst: &str) -> Vec<ConntrackAttribute> {
        let tuple = |src: &str, dst: &str| {
            vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(src.parse().unwrap()),
                    IPTuple::DestinationAddress(dst.parse().unwrap()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Icmp),
                    // CTA_PROTO_ICMP_ID, which the crate does not name: kept as it came.
                    ProtoTuple::Other(DefaultNla::new(4, 0x1234u16.to_be_bytes().to_vec())),
                ]),
            ]
        };
        vec![
            ConntrackAttribute::CtaTupleOrig(tuple(src, dst)),
            ConntrackAttribute::CtaTupleReply(tuple(dst, src)),
            ConntrackAttribute::CtaTimeout(30),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, 77u32.to_be_bytes().to_vec())),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, 5u16.to_be_bytes().to_vec())),
        ]
    }

    #[test]
    fn an_entry_is_named_to_a_delete_by_its_original_tuple_zone_and_id() {
        let attributes = entry("10.66.1.2", "10.66.2.3");
        let ends = orig_addresses(&attributes).unwrap();
        assert_eq!(ends.0, "10.66.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(ends.1, "10.66.2.3".parse::<IpAddr>().unwrap());
        let identity = identity(&attributes);
        assert_eq!(identity.len(), 3, "{identity:?}");
        assert_eq!(
            identity[0], attributes[0],
            "the original tuple, unknown parts and all"
        );
        assert_eq!(&identity[1..], &attributes[3..]);
        assert_eq!(orig_addresses(&attributes[1..]), None, "no original tuple");
    }

    #[test]
    fn the_original_tuple_survives_emitting_and_parsing() {
        let tuple = &entry("fd66:1::2", "fd66:2::3")[0];
        let mut bytes = vec![0; tuple.buffer_len()];
        tuple.emit(&mut bytes);
        let parsed =
            ConntrackAttribute::parse(&netlink_packet_core_09::NlaBuffer::new(&bytes)).unwrap();
        assert_eq!(&parsed, tuple);
    }

    #[test]
    fn the_dump_filter_matches_the_original_source_and_destination() {
        let filter = filter_attributes("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(
            orig_addresses(&filter),
            Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()))
        );
        let mut bytes = vec![0; filter.as_slice().buffer_len()];
        filter.as_slice().emit(&mut bytes);
        mark_nested(&mut bytes, CTA_FILTER);
        let tuple_length = filter[0].buffer_len();
        assert_eq!(
            &bytes[2..4],
            &(1u16 | NLA_F_NESTED).to_ne_bytes(),
            "the tuple as it was"
        );
        // CTA_FILTER (nested) { CTA_FILTER_ORIG_FLAGS: IP_SRC | IP_DST }
        let mut want = Vec::new();
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&(25u16 | NLA_F_NESTED).to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&3u32.to_ne_bytes());
        assert_eq!(&bytes[tuple_length..], &want[..]);
    }
}
