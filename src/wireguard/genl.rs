//! The kernel backend's device read and private-key write, over generic netlink, without
//! copies of a private key.
//! The kernel answers WG_CMD_GET_DEVICE with the device's private key, and there is no way to
//! ask it not to. wireguard-control's `Device::get` parses that answer into several copies
//! (the receive buffer, the parsed attributes, a cloned message, `Device::private_key`) and
//! drops them all unwiped: with the node agent reading every pod's link at each resync, the
//! process's freed memory would hold every pod's private key. Here the key's bytes are
//! overwritten with zeros in the receive buffer itself, before anything parses it, so no copy
//! of the key is ever made; the buffer is wiped after use all the same. Setting a key goes the
//! other way: the request is built with a zero key and the key's bytes are written into the
//! serialized request only (wireguard-control's `DeviceUpdate` keeps the key in its
//! attributes and drops it unwiped).

use std::io;
use std::sync::OnceLock;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::constants::WGDEVICE_A_PRIVATE_KEY;
use netlink_packet_wireguard::nlas::WgDeviceAttrs;
use netlink_packet_wireguard::{Wireguard, WireguardCmd};
use netlink_sys::constants::NETLINK_GENERIC;
use netlink_sys::{Socket, SocketAddr};
use zeroize::{Zeroize, Zeroizing};

/// Room for one datagram of a dump (the kernel fills at most a page or 8 KiB per message).
const RECEIVE_BUFFER: usize = 64 * 1024;
/// Netlink message header, then the generic netlink header.
const NLMSG_HEADER: usize = 16;
const GENL_HEADER: usize = 4;
/// Control messages (error, done, ...) have types below this; families above.
const NLMSG_MIN_TYPE: u16 = 0x10;
/// The flag bits of an attribute's type (nested, network byte order).
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

/// The device attributes of the WireGuard link `ifname` in the calling thread's network
/// namespace, as the kernel reports them, except that a `PrivateKey` attribute holds 32 zero
/// bytes (see `scrub_private_keys`).
pub fn device_attributes(ifname: &str) -> io::Result<Vec<WgDeviceAttrs>> {
    let mut request = GenlMessage::from_payload(Wireguard {
        cmd: WireguardCmd::GetDevice,
        nlas: vec![WgDeviceAttrs::IfName(ifname.to_string())],
    });
    request.set_resolved_family_id(family_id()?);
    let mut attributes = Vec::new();
    exchange(
        request,
        NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK,
        |_| {},
        |message| {
            attributes.extend(message.payload.nlas);
        },
    )?;
    Ok(attributes)
}

/// Give the WireGuard link `ifname` of the calling thread's network namespace this private
/// key. Its only copy here is in the request buffer, which is wiped on every path.
pub fn set_private_key(ifname: &str, secret: &[u8; 32]) -> io::Result<()> {
    let mut request = private_key_request(ifname);
    request.set_resolved_family_id(family_id()?);
    let fill = |serialized: &mut [u8]| {
        fill_private_key(serialized, secret);
    };
    exchange(request, NLM_F_REQUEST | NLM_F_ACK, fill, |_| {})
}

/// SET_DEVICE for `ifname` with a private key of zeros (`fill_private_key` writes the real one).
fn private_key_request(ifname: &str) -> GenlMessage<Wireguard> {
    GenlMessage::from_payload(Wireguard {
        cmd: WireguardCmd::SetDevice,
        nlas: vec![
            WgDeviceAttrs::IfName(ifname.to_string()),
            WgDeviceAttrs::PrivateKey([0; 32]),
        ],
    })
}

/// Write `secret` into the private key attribute of a serialized request; answers how many
/// it filled (one).
fn fill_private_key(serialized: &mut [u8], secret: &[u8; 32]) -> usize {
    for_each_private_key(serialized, |value| value.copy_from_slice(secret))
}

/// The wireguard family's id (one for the whole kernel, so asked once per process).
fn family_id() -> io::Result<u16> {
    static ID: OnceLock<u16> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(*id);
    }
    let request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
    });
    let mut id = None;
    exchange(
        request,
        NLM_F_REQUEST | NLM_F_ACK,
        |_| {},
        |message| {
            id = id.or(message.payload.nlas.iter().find_map(|nla| match nla {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            }));
        },
    )?;
    let id = id.ok_or_else(|| io::Error::other("the kernel has no wireguard netlink family"))?;
    Ok(*ID.get_or_init(|| id))
}

/// Send `request` (its serialized bytes first handed to `fill`) and hand every answer to
/// `each` until the kernel says it is done. Each datagram is scrubbed before it is parsed, and
/// the buffer, which held the request too, is wiped on every path.
fn exchange<F>(
    request: GenlMessage<F>,
    flags: u16,
    fill: impl FnOnce(&mut [u8]),
    mut each: impl FnMut(GenlMessage<F>),
) -> io::Result<()>
where
    GenlMessage<F>: NetlinkSerializable + netlink_packet_core::NetlinkDeserializable,
    NetlinkPayload<GenlMessage<F>>: From<GenlMessage<F>>,
    F: std::fmt::Debug,
{
    let mut message = NetlinkMessage::from(request);
    message.header.flags = flags;
    message.finalize();
    let length = message.buffer_len();
    let mut buffer = Zeroizing::new(vec![0u8; RECEIVE_BUFFER.max(length)]);
    message.serialize(&mut buffer[..length]);
    fill(&mut buffer[..length]);
    let socket = Socket::new(NETLINK_GENERIC)?;
    // An error answer would otherwise echo the whole request (a key being set) back, and the
    // parsed error would keep that copy.
    socket.set_cap_ack(true)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buffer[..length], 0)?;
    receive(&socket, &mut buffer, &mut each)
}

fn receive<F>(
    socket: &Socket,
    buffer: &mut [u8],
    each: &mut impl FnMut(GenlMessage<F>),
) -> io::Result<()>
where
    GenlMessage<F>: netlink_packet_core::NetlinkDeserializable,
    F: std::fmt::Debug,
{
    loop {
        let received = socket.recv(&mut &mut buffer[..], 0)?;
        let datagram = &mut buffer[..received];
        scrub_private_keys(datagram);
        let mut offset = 0;
        while offset < received {
            let message = NetlinkMessage::<GenlMessage<F>>::deserialize(&datagram[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.into()),
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(()),
                NetlinkPayload::InnerMessage(inner) => each(inner),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length.next_multiple_of(4);
        }
    }
}

/// Overwrite with zeros the value of every top-level `WGDEVICE_A_PRIVATE_KEY` attribute in
/// `datagram` (generic netlink messages, as received); answers how many it wiped. Malformed
/// lengths end the walk (the parser then refuses the datagram).
pub fn scrub_private_keys(datagram: &mut [u8]) -> usize {
    for_each_private_key(datagram, |value| value.zeroize())
}

/// Hand `each` the value of every top-level `WGDEVICE_A_PRIVATE_KEY` attribute of the
/// wireguard messages in `datagram`; answers how many there were.
fn for_each_private_key(datagram: &mut [u8], mut each: impl FnMut(&mut [u8])) -> usize {
    let mut found = 0;
    let mut offset = 0;
    while offset + NLMSG_HEADER <= datagram.len() {
        let length = u32::from_ne_bytes(datagram[offset..offset + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(datagram[offset + 4..offset + 6].try_into().unwrap());
        if length < NLMSG_HEADER || offset + length > datagram.len() {
            break;
        }
        let message = &mut datagram[offset..offset + length];
        let mut at = NLMSG_HEADER + GENL_HEADER;
        while kind >= NLMSG_MIN_TYPE && at + 4 <= message.len() {
            let nla_length = u16::from_ne_bytes(message[at..at + 2].try_into().unwrap()) as usize;
            let nla_type = u16::from_ne_bytes(message[at + 2..at + 4].try_into().unwrap());
            if nla_length < 4 || at + nla_length > message.len() {
                break;
            }
            if nla_type & NLA_TYPE_MASK == WGDEVICE_A_PRIVATE_KEY {
                each(&mut message[at + 4..at + nla_length]);
                found += 1;
            }
            at += nla_length.next_multiple_of(4);
        }
        offset += length.next_multiple_of(4);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_wireguard::nlas::{WgPeer, WgPeerAttrs};

    /// A GET_DEVICE answer as the kernel sends it: a private key among the attributes.
    fn answer(private: [u8; 32], public: [u8; 32]) -> Vec<u8> {
        let peer = WgPeer(vec![WgPeerAttrs::PublicKey([7; 32])]);
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(GenlMessage::from_payload(Wireguard {
                cmd: WireguardCmd::GetDevice,
                nlas: vec![
                    WgDeviceAttrs::IfIndex(4),
                    WgDeviceAttrs::IfName("eth0".into()),
                    WgDeviceAttrs::PrivateKey(private),
                    WgDeviceAttrs::PublicKey(public),
                    WgDeviceAttrs::ListenPort(53000),
                    WgDeviceAttrs::Peers(vec![peer]),
                ],
            })),
        );
        if let NetlinkPayload::InnerMessage(genl) = &mut message.payload {
            genl.set_resolved_family_id(0x20);
        }
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    #[test]
    fn the_private_key_is_zeros_before_anything_parses_it() {
        let (private, public) = ([0xab; 32], [0xcd; 32]);
        let mut datagram = [answer(private, public), answer(private, public)].concat();
        assert!(datagram.windows(32).any(|w| w == private));
        assert_eq!(scrub_private_keys(&mut datagram), 2);
        assert!(!datagram.windows(32).any(|w| w == private));
        assert_eq!(
            datagram.windows(32).filter(|w| *w == public).count(),
            2,
            "the public key is left alone"
        );
        let parsed = NetlinkMessage::<GenlMessage<Wireguard>>::deserialize(&datagram).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
            panic!("not a wireguard message");
        };
        assert!(
            genl.payload
                .nlas
                .contains(&WgDeviceAttrs::PrivateKey([0; 32]))
        );
        assert!(
            genl.payload
                .nlas
                .contains(&WgDeviceAttrs::ListenPort(53000))
        );
    }

    #[test]
    fn the_key_to_set_is_written_into_the_serialized_request_only() {
        let secret = [0x5a; 32];
        let mut request = private_key_request("eth0");
        request.set_resolved_family_id(0x20);
        let mut message = NetlinkMessage::from(request);
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        assert!(!bytes.windows(32).any(|w| w == secret));
        assert_eq!(fill_private_key(&mut bytes, &secret), 1);
        let parsed = NetlinkMessage::<GenlMessage<Wireguard>>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(genl) = parsed.payload else {
            panic!("not a wireguard message");
        };
        assert_eq!(genl.payload.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            genl.payload.nlas,
            [
                WgDeviceAttrs::IfName("eth0".into()),
                WgDeviceAttrs::PrivateKey(secret)
            ]
        );
    }

    #[test]
    fn malformed_lengths_end_the_walk() {
        let mut datagram = answer([1; 32], [2; 32]);
        datagram[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert_eq!(scrub_private_keys(&mut datagram), 0);
        assert_eq!(scrub_private_keys(&mut [0u8; 7]), 0);
    }
}
