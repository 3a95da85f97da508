//! Facts about this node that defaults are derived from: the default route's MTU and source
//! address, the boot id, the node name.

use std::net::IpAddr;

use crate::cni::config::BackendChoice;
use crate::cni::{Error, IoContext, NetConf, Result};
use crate::link::Netlink;
use crate::ports;
use crate::wireguard::{self, BackendKind};

/// WireGuard's overhead over IPv6 (40 + 8 + 32): the MTU that fits either underlay family.
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// What `wg-quick` assumes when it cannot tell: 1500 - 80.
pub const FALLBACK_MTU: u32 = 1420;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    pub mtu: u32,
    pub source: Option<IpAddr>,
}

/// The host's default route (IPv4 preferred), read in the calling thread's namespace.
pub fn default_route() -> Result<Option<DefaultRoute>> {
    let netlink = Netlink::open()?;
    let routes = netlink.routes()?;
    let Some(route) = routes
        .iter()
        .filter(|r| r.dst.prefix() == 0 && r.oif.is_some())
        .min_by_key(|r| r.dst.is_ipv6())
    else {
        return Ok(None);
    };
    let oif = route.oif.expect("filtered on oif");
    let mtu = netlink
        .links()?
        .into_iter()
        .find(|l| l.index == oif)
        .map(|l| l.mtu)
        .unwrap_or(1500);
    let source = match route.pref_src {
        Some(src) => Some(src),
        None => netlink
            .addresses(oif)?
            .into_iter()
            .map(|a| a.ip())
            .find(|ip| ip.is_ipv4() == route.dst.is_ipv4() && !is_link_local(ip)),
    };
    Ok(Some(DefaultRoute { mtu, source }))
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Settings a link needs that may come from the host rather than the config (and the
/// network's peering, which decides the gateway link's rules).
pub struct LinkSettings {
    pub mtu: u32,
    pub endpoint: IpAddr,
    pub ports: crate::cni::config::PortRange,
    pub backend: crate::wireguard::BackendKind,
    pub userspace_daemon: crate::cni::config::UserspaceDaemon,
    pub peering: crate::cni::Peering,
}

pub fn boot_id() -> Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .io(|| "reading /proc/sys/kernel/random/boot_id".to_string())
}

/// The name this node's records are filed under: `nodeName` from the config, else the host name.
pub fn node_name(configured: Option<&str>) -> Result<String> {
    if let Some(name) = configured {
        return Ok(name.to_string());
    }
    let name = nix::unistd::gethostname()
        .map_err(|e| Error::Io {
            context: "reading the host name (or set nodeName)".into(),
            source: e.into(),
        })?
        .to_string_lossy()
        .into_owned();
    // Host names are safe path components, but make sure: the name becomes a directory.
    let safe = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !name.starts_with('.');
    if safe {
        Ok(name)
    } else {
        Err(Error::config(
            "nodeName",
            format!("the host name \"{name}\" cannot name a store directory; set nodeName"),
        ))
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The smallest MTU a network can run on: IPv6 needs 1280 (RFC 8200), IPv4 576.
pub fn mtu_floor(ipv6: bool) -> u32 {
    if ipv6 { 1280 } else { 576 }
}

/// Whether the network holds IPv6 pods: its cluster range or its IPAM ranges say so.
fn has_ipv6(conf: &NetConf) -> bool {
    let ipam_v6 = conf.raw["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set.as_array())
        .flatten()
        .filter_map(|range| range["subnet"].as_str())
        .any(|subnet| subnet.contains(':'));
    ipam_v6 || conf.cluster_range.iter().any(|r| r.is_ipv6())
}

/// The network's MTU on this node: `own` lowered to the smallest MTU another node publishes,
/// where that MTU is one the network can run on (one node cannot make every ADD fail).
fn agreed_mtu(own: u32, published: &[u32], floor: u32) -> u32 {
    published
        .iter()
        .copied()
        .filter(|m| *m >= floor)
        .fold(own, u32::min)
}

impl LinkSettings {
    /// One MTU per network: the operator's (`mtu` in the config), else the smallest of this
    /// node's default and every MTU another node publishes, so no tunnel of the network
    /// carries packets a peer's underlay cannot.
    pub fn agree_mtu(&mut self, conf: &NetConf, store: &crate::store::Store) {
        if conf.mtu.is_some() {
            return;
        }
        let floor = mtu_floor(has_ipv6(conf));
        self.mtu = agreed_mtu(self.mtu, &store.published_mtus(), floor);
    }
}

/// The link settings of a network on this node: the config's, else the host's defaults.
pub fn resolve_link_settings(conf: &NetConf) -> Result<LinkSettings> {
    let route = if conf.mtu.is_none() || conf.endpoint.is_none() {
        default_route()?
    } else {
        None
    };
    let mtu = conf.mtu.unwrap_or_else(|| match &route {
        Some(r) => r.mtu.saturating_sub(WIREGUARD_OVERHEAD).max(1280),
        None => FALLBACK_MTU,
    });
    let endpoint = match conf.endpoint {
        Some(ip) => ip,
        None => route.and_then(|r| r.source).ok_or_else(|| {
            Error::config(
                "endpoint",
                "is required on a host without a default route: set the address peers reach this node at",
            )
        })?,
    };
    let ports = match conf.listen_ports {
        Some(range) => range,
        None => ports::default_range(ports::ephemeral_range())?,
    };
    Ok(LinkSettings {
        mtu,
        endpoint,
        ports,
        backend: choose_backend(conf.backend)?,
        userspace_daemon: conf.userspace_daemon,
        peering: conf.peering,
    })
}

pub fn choose_backend(choice: BackendChoice) -> Result<BackendKind> {
    let kernel = || wireguard::kernel::available();
    let userspace = wireguard::userspace::available;
    match choice {
        BackendChoice::Kernel if kernel() => Ok(BackendKind::Kernel),
        BackendChoice::Kernel => Err(Error::config(
            "backend",
            "\"kernel\": this kernel cannot create WireGuard links (no wireguard module); use \"userspace\" or \"auto\"",
        )),
        BackendChoice::Userspace if userspace() => Ok(BackendKind::Userspace),
        BackendChoice::Auto if kernel() => Ok(BackendKind::Kernel),
        BackendChoice::Auto if userspace() => Ok(BackendKind::Userspace),
        BackendChoice::Userspace | BackendChoice::Auto => Err(Error::config(
            "backend",
            "no WireGuard available: the kernel has no wireguard module and wireguard-go or /dev/net/tun is missing",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// T4: a node publishing an MTU the network's families cannot run on is not obeyed.
    #[test]
    fn a_published_mtu_below_the_floor_is_not_obeyed() {
        assert_eq!(agreed_mtu(1420, &[1380, 1200], 1280), 1380);
        assert_eq!(agreed_mtu(1420, &[1200], 576), 1200);
        assert_eq!(agreed_mtu(1420, &[500], 576), 1420);
        assert_eq!(agreed_mtu(1420, &[], 1280), 1420);
        let dual = crate::cni::NetConf::parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "type": "wg-cni", "ipam": {"type": "host-local",
                "ranges": [[{"subnet": "10.0.1.0/24"}], [{"subnet": "fd00:1::/64"}]]}}"#,
        )
        .unwrap();
        assert!(has_ipv6(&dual));
    }
}
