//! A blocking route-netlink socket that sends one request at a time and reads the kernel's whole
//! answer before the next. No runtime and no thread: the plugin opens several of these per
//! command, often on a thread that just entered a namespace, and in slow guests a tokio runtime
//! and an rtnetlink connection per open cost more than the requests themselves.
//!
//! The kernel ties a netlink socket to the network namespace of the thread that created it, for
//! good: every request sent on it acts on that namespace, whichever thread sends it later.

use std::cell::Cell;
use std::fmt;
use std::io;

use nix::libc::MSG_TRUNC;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ALIGNTO, NetlinkBuffer,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, SocketAddr};

/// Room for one datagram of a dump. The kernel fills a dump datagram up to about the size of
/// the reader's buffer, capped at 32 KiB; a bigger single message is reported, not cut.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// Why a request failed.
#[derive(Debug)]
pub enum RequestError {
    /// The kernel answered NLMSG_ERROR; the `io::Error` carries its errno (EEXIST, ENODEV, …).
    Refused(io::Error),
    /// Sending or receiving failed, or the answer could not be read.
    Transport(io::Error),
}

impl RequestError {
    /// The errno the kernel refused the request with.
    pub fn refused_with(&self) -> Option<i32> {
        match self {
            RequestError::Refused(e) => e.raw_os_error(),
            RequestError::Transport(_) => None,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // rtnetlink's wording, so users see the messages they saw before.
            RequestError::Refused(e) => write!(f, "Received a netlink error message {e}"),
            RequestError::Transport(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RequestError {}

/// What ends the kernel's answer to a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A dump: messages up to NLMSG_DONE.
    Dump,
    /// A get of one object: its one reply.
    One,
    /// A change: the ACK (NLMSG_ERROR with code 0).
    Ack,
}

pub struct RouteSocket {
    socket: Socket,
    sequence: Cell<u32>,
}

impl RouteSocket {
    /// A socket in the calling thread's namespace. Unbound: the kernel binds it to a free port
    /// on the first send, and unicasts the answers there.
    pub fn open() -> io::Result<RouteSocket> {
        Ok(RouteSocket {
            socket: Socket::new(NETLINK_ROUTE)?,
            sequence: Cell::new(0),
        })
    }

    /// Every message of a dump.
    pub fn dump(
        &self,
        request: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RequestError> {
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP, Answer::Dump)
    }

    /// The one reply to a get.
    pub fn get(&self, request: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, RequestError> {
        self.exchange(request, NLM_F_REQUEST, Answer::One)?
            .pop()
            .ok_or_else(|| transport("the kernel answered a get with nothing"))
    }

    /// Create something that must not exist yet (like `ip … add`): EEXIST otherwise.
    pub fn create(&self, request: RouteNetlinkMessage) -> Result<(), RequestError> {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        self.exchange(request, flags, Answer::Ack).map(drop)
    }

    /// Change or delete something that exists.
    pub fn change(&self, request: RouteNetlinkMessage) -> Result<(), RequestError> {
        self.exchange(request, NLM_F_REQUEST | NLM_F_ACK, Answer::Ack)
            .map(drop)
    }

    fn exchange(
        &self,
        request: RouteNetlinkMessage,
        flags: u16,
        answer: Answer,
    ) -> Result<Vec<RouteNetlinkMessage>, RequestError> {
        let sequence = self.send(request, flags)?;
        let mut replies = Vec::new();
        let mut datagram = Vec::with_capacity(RECEIVE_BUFFER);
        loop {
            self.receive(&mut datagram)?;
            for raw in split(&datagram)? {
                // Leftovers of an earlier request abandoned on error: not ours to read.
                if NetlinkBuffer::new(raw).sequence_number() != sequence {
                    continue;
                }
                let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(raw) {
                    Ok(message) => message,
                    // One object we cannot parse must not hide the rest of a dump.
                    Err(e) if answer == Answer::Dump => {
                        tracing::warn!("skipping a netlink message: {e}");
                        continue;
                    }
                    Err(e) => return Err(transport(e)),
                };
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        replies.push(inner);
                        if answer == Answer::One {
                            return Ok(replies);
                        }
                    }
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(refused(code.get())),
                        None => return Ok(replies),
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Overrun(_) => return Err(transport("netlink overrun")),
                    _ => {}
                }
            }
        }
    }

    /// Send one request; answers to it carry the sequence number this returns.
    fn send(&self, request: RouteNetlinkMessage, flags: u16) -> Result<u32, RequestError> {
        let sequence = self.sequence.get().wrapping_add(1);
        self.sequence.set(sequence);
        let mut message = NetlinkMessage::from(request);
        message.header.flags = flags;
        message.header.sequence_number = sequence;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let kernel = SocketAddr::new(0, 0);
        self.socket
            .send_to(&bytes, &kernel, 0)
            .map_err(RequestError::Transport)?;
        Ok(sequence)
    }

    /// Read one datagram into `datagram` (emptied first). MSG_TRUNC makes the kernel report a
    /// datagram's full length, so one too big for the buffer fails instead of being cut.
    fn receive(&self, datagram: &mut Vec<u8>) -> Result<(), RequestError> {
        datagram.clear();
        let length = loop {
            match self.socket.recv(datagram, MSG_TRUNC) {
                Ok(length) => break length,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RequestError::Transport(e)),
            }
        };
        if length > datagram.len() {
            return Err(transport(format!(
                "a netlink answer of {length} bytes does not fit in {} bytes",
                datagram.len()
            )));
        }
        Ok(())
    }
}

/// The messages of one datagram, each cut to its own length.
fn split(mut datagram: &[u8]) -> Result<Vec<&[u8]>, RequestError> {
    let mut messages = Vec::new();
    while !datagram.is_empty() {
        let length = NetlinkBuffer::new_checked(datagram)
            .map_err(transport)?
            .length() as usize;
        messages.push(&datagram[..length]);
        let aligned = length.next_multiple_of(NLMSG_ALIGNTO as usize);
        datagram = &datagram[aligned.min(datagram.len())..];
    }
    Ok(messages)
}

fn refused(code: i32) -> RequestError {
    // NLMSG_ERROR carries a negative errno.
    RequestError::Refused(io::Error::from_raw_os_error(-code))
}

fn transport(reason: impl ToString) -> RequestError {
    RequestError::Transport(io::Error::new(
        io::ErrorKind::InvalidData,
        reason.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header-only netlink message of `length` bytes (padding included in the datagram).
    fn message(length: u32, sequence: u32) -> Vec<u8> {
        let mut bytes = vec![0; (length as usize).next_multiple_of(4)];
        let mut buffer = NetlinkBuffer::new(&mut bytes[..]);
        buffer.set_length(length);
        buffer.set_sequence_number(sequence);
        bytes
    }

    #[test]
    fn a_datagram_splits_at_aligned_message_lengths() {
        let datagram = [message(18, 1), message(16, 2)].concat();
        let parts = split(&datagram).unwrap();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [18, 16]);
        assert_eq!(NetlinkBuffer::new(parts[1]).sequence_number(), 2);
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_an_error() {
        let mut datagram = message(16, 1);
        NetlinkBuffer::new(&mut datagram[..]).set_length(64);
        assert!(split(&datagram).is_err());
    }

    #[test]
    fn a_refusal_keeps_its_errno_and_rtnetlinks_wording() {
        let error = refused(-nix::libc::EEXIST);
        assert_eq!(error.refused_with(), Some(nix::libc::EEXIST));
        assert_eq!(
            error.to_string(),
            "Received a netlink error message File exists (os error 17)"
        );
        assert_eq!(transport("x").refused_with(), None);
    }
}
