//! Host UDP ports for pod links: a node-wide resource shared by every network, so they are
//! allocated under a node-wide lock, from a range outside the host's ephemeral range and
//! Kubernetes' NodePort range. The lock guards a ledger of handed-out ports: a link binds its
//! port only when it comes up (wireguard-go up to a second after ADD returns), so a bind probe
//! alone could hand one port to two links. A port is free when the ledger does not hold it and
//! it binds in IPv4 and IPv6.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use nix::fcntl::{Flock, FlockArg};

use crate::cni::config::PortRange;
use crate::cni::{Error, IoContext, Result};

const LOCK_DIR: &str = "/run/wg-cni";
const LOCK_PATH: &str = "/run/wg-cni/ports.lock";
const LEDGER_PATH: &str = "/run/wg-cni/ports.json";
/// How long a ledger entry holds its port on its own word. Past it, the entry stands only
/// while the port is really bound (its link may have died without a DEL).
const LEDGER_GRACE_SECS: u64 = 60;
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

/// Held while choosing ports and updating the ledger.
pub struct PortLock {
    _lock: Flock<File>,
    ledger: Ledger,
}

/// Which link holds which port, since when, on which boot (`/run` is emptied at boot, but a
/// bind-mounted or persistent `/run` must not carry entries over).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ledger {
    boot_id: String,
    ports: BTreeMap<u16, LedgerEntry>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LedgerEntry {
    /// The link's host-side name (`wgc…`/`wgg…`): unique per attachment and store.
    owner: String,
    since: u64,
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
    Ok(PortLock {
        _lock: lock,
        ledger: read_ledger(),
    })
}

impl PortLock {
    /// Hand the lowest free port of `range` (not in `skip`) to `owner` and note it in the
    /// ledger; an earlier entry of the same owner is replaced.
    pub fn allocate(&mut self, range: PortRange, owner: &str, skip: &[u16]) -> Result<Option<u16>> {
        self.forget_stale();
        self.ledger.ports.retain(|_, e| e.owner != owner);
        let held = |p: &u16| self.ledger.ports.contains_key(p);
        let port =
            (range.first..=range.last).find(|p| !skip.contains(p) && !held(p) && is_free(*p));
        if let Some(port) = port {
            let since = crate::host::now_unix();
            self.ledger.ports.insert(
                port,
                LedgerEntry {
                    owner: owner.to_string(),
                    since,
                },
            );
        }
        self.write()?;
        Ok(port)
    }

    /// The link `owner` is gone: its port may be handed out again.
    pub fn release(&mut self, owner: &str) -> Result<()> {
        let before = self.ledger.ports.len();
        self.ledger.ports.retain(|_, e| e.owner != owner);
        if self.ledger.ports.len() == before {
            return Ok(());
        }
        self.write()
    }

    /// Drop entries of another boot, and old entries whose port nobody binds (their link
    /// died without a DEL).
    fn forget_stale(&mut self) {
        let boot = crate::host::boot_id().unwrap_or_default();
        if self.ledger.boot_id != boot {
            self.ledger = Ledger {
                boot_id: boot,
                ports: BTreeMap::new(),
            };
        }
        let now = crate::host::now_unix();
        self.ledger
            .ports
            .retain(|port, e| now.saturating_sub(e.since) < LEDGER_GRACE_SECS || !is_free(*port));
    }

    fn write(&self) -> Result<()> {
        let temp = format!("{LEDGER_PATH}.tmp");
        let body = serde_json::to_vec(&self.ledger).expect("the ledger serializes");
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&body)?;
            std::fs::rename(&temp, LEDGER_PATH)
        };
        write().io(|| format!("writing the port ledger {LEDGER_PATH}"))
    }
}

/// Release `owner`'s port under the node's port lock (DEL, GC, rollback). Best effort: an
/// entry left behind expires once its port is no longer bound.
pub fn release(owner: &str) {
    if let Err(e) = lock().and_then(|mut l| l.release(owner)) {
        tracing::warn!(owner, error = %e, "could not release a port in the ledger");
    }
}

/// The ledger as last written; a missing or unreadable one is empty (ports are then only
/// probed, as before the ledger existed).
fn read_ledger() -> Ledger {
    let mut text = Vec::new();
    let read = File::open(LEDGER_PATH).and_then(|mut f| f.read_to_end(&mut text));
    match read {
        Ok(_) => serde_json::from_slice(&text).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the port ledger is unreadable: starting a new one");
            Ledger::default()
        }),
        Err(_) => Ledger::default(),
    }
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
    }
}
