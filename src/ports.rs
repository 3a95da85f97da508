//! Host UDP ports for pod links: a node-wide resource shared by every network, so they are
//! allocated under a node-wide lock, from a range outside the host's ephemeral range and
//! Kubernetes' NodePort range, and a port counts as free only if it is free in IPv4 and IPv6.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use nix::fcntl::{Flock, FlockArg};

use crate::cni::config::PortRange;
use crate::cni::{Error, IoContext, Result};

const LOCK_DIR: &str = "/run/wg-cni";
const LOCK_PATH: &str = "/run/wg-cni/ports.lock";
const NODE_PORTS: PortRange = PortRange {
    first: 30000,
    last: 32767,
};
/// Tried in order for the default range; the first clear of both reserved ranges wins.
const DEFAULT_CANDIDATES: [PortRange; 2] = [
    PortRange {
        first: 24000,
        last: 24999,
    },
    PortRange {
        first: 61000,
        last: 61999,
    },
];

/// Held from choosing a port until the link listens on it.
pub struct PortLock {
    _lock: Flock<File>,
}

pub fn lock() -> Result<PortLock> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .io(|| format!("creating {LOCK_DIR}"))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(LOCK_PATH)
        .io(|| format!("opening {LOCK_PATH}"))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| Error::Io {
        context: format!("locking {LOCK_PATH}"),
        source: errno.into(),
    })?;
    Ok(PortLock { _lock: lock })
}

/// The kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_range() -> PortRange {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some(PortRange {
                first: parts.next()??,
                last: parts.next()??,
            })
        })
        .unwrap_or(PortRange {
            first: 32768,
            last: 60999,
        })
}

/// The default `listenPorts`: the first candidate overlapping neither reserved range.
pub fn default_range(ephemeral: PortRange) -> Result<PortRange> {
    DEFAULT_CANDIDATES
        .into_iter()
        .find(|r| !r.overlaps(&ephemeral) && !r.overlaps(&NODE_PORTS))
        .ok_or_else(|| {
            Error::config(
                "listenPorts",
                format!(
                    "no default range is clear of the ephemeral range {ephemeral} and NodePorts {NODE_PORTS}; set one"
                ),
            )
        })
}

/// Whether nobody holds `port` in IPv4 or IPv6 right now.
pub fn is_free(port: u16) -> bool {
    let v4 = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    // A dual-stack [::] socket would collide with the v4 one we hold; ask v6-only.
    let v6 = bind_v6_only(port);
    v4.is_ok() && v6
}

fn bind_v6_only(port: u16) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn6, bind, setsockopt, socket, sockopt,
    };
    let Ok(fd) = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        // No IPv6 on this host: nothing can hold the port there.
        return true;
    };
    let _ = setsockopt(&fd, sockopt::Ipv6V6Only, &true);
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).is_ok()
}

/// Free ports of `range`, lowest first, skipping `taken`.
pub fn free_ports(range: PortRange, taken: &[u16]) -> impl Iterator<Item = u16> + '_ {
    (range.first..=range.last).filter(move |p| !taken.contains(p) && is_free(*p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_range_avoids_reserved_ranges() {
        let linux_default = PortRange {
            first: 32768,
            last: 60999,
        };
        assert_eq!(default_range(linux_default).unwrap().first, 24000);
        let high = PortRange {
            first: 10000,
            last: 29999,
        };
        assert_eq!(default_range(high).unwrap().first, 61000);
        let wide = PortRange {
            first: 1024,
            last: 65535,
        };
        assert_eq!(default_range(wide).unwrap_err().code(), 7);
    }

    #[test]
    fn a_bound_port_is_not_free() {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!is_free(port));
        drop(socket);
        let range = PortRange {
            first: port,
            last: port,
        };
        assert_eq!(free_ports(range, &[port]).next(), None);
    }
}
