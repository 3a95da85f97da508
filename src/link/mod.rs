//! Route-netlink operations, named after what they do, over a blocking socket (see `socket`).
//!
//! A `Netlink` acts on the namespace of the thread that opened it: the kernel binds a netlink
//! socket to its creator's namespace for good. So open it on the thread that runs inside the
//! namespace it is meant for: `Netns::run(|| Netlink::open()?.…)`.
//!
//! rtnetlink's builders still build the messages: they are plain structs and need no runtime.

mod socket;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkMessageBuilder, LinkUnspec, LinkWireguard, RouteMessageBuilder,
};

use crate::cni::{Error, Result};
use socket::RouteSocket;

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `wireguard`, `tun`, `veth`, … (`None` for kinds without link info, like `lo`).
    pub kind: Option<String>,
    pub mtu: u32,
    pub up: bool,
}

pub struct Netlink {
    socket: RouteSocket,
}

/// The longest interface name the kernel holds (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

impl Netlink {
    /// Open a route netlink socket in the current thread's namespace.
    pub fn open() -> Result<Netlink> {
        let socket =
            RouteSocket::open().map_err(|e| Error::netlink("opening a netlink socket", e))?;
        Ok(Netlink { socket })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        let answer = self
            .socket
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(|e| Error::netlink("listing links", e))?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_from_message(link)),
                _ => None,
            })
            .collect())
    }

    /// The link named `name`, asked for by name (a dump of every link costs far more on a
    /// host with many pods). ENODEV means there is none.
    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        // A longer name could not exist; the kernel would refuse the question (EINVAL).
        if name.len() > IFNAME_MAX {
            return Ok(None);
        }
        let mut request = LinkMessage::default();
        request
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        let reply = match self.socket.get(RouteNetlinkMessage::GetLink(request)) {
            Ok(reply) => reply,
            Err(e) if e.refused_with() == Some(nix::libc::ENODEV) => return Ok(None),
            Err(e) => return Err(Error::netlink("listing links", e)),
        };
        let link = match reply {
            RouteNetlinkMessage::NewLink(link) => link_from_message(&link),
            other => {
                let reason = format!("unexpected answer {:?}", other.message_type());
                return Err(Error::netlink("listing links", reason));
            }
        };
        // The kernel also finds a link by an alternative name; callers mean the real one.
        Ok(Some(link).filter(|l| l.name == name))
    }

    /// Create a WireGuard link named `name` inside the namespace behind `netns_fd`. Sent from
    /// this (host) namespace, the link's UDP socket stays here while the link lives there.
    pub fn create_wireguard_in(&self, name: &str, netns_fd: RawFd, mtu: u32) -> Result<()> {
        let message = LinkWireguard::new(name)
            .mtu(mtu)
            .setns_by_fd(netns_fd)
            .build();
        self.socket
            .create(RouteNetlinkMessage::NewLink(message))
            .map_err(|e| Error::netlink(format!("creating WireGuard link {name}"), e))
    }

    /// Whether this namespace's kernel can create a `wireguard` link at all.
    pub fn can_create_wireguard(&self, probe_name: &str) -> bool {
        let probe = LinkWireguard::new(probe_name).build();
        if self
            .socket
            .create(RouteNetlinkMessage::NewLink(probe))
            .is_err()
        {
            return false;
        }
        if let Ok(Some(link)) = self.link_by_name(probe_name) {
            let _ = self.delete(link.index);
        }
        true
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.set(index, |b| b.mtu(mtu), "setting the MTU")
    }

    pub fn move_to_netns(&self, index: u32, netns_fd: RawFd) -> Result<()> {
        self.set(
            index,
            |b| b.setns_by_fd(netns_fd),
            "moving the link into the pod namespace",
        )
    }

    pub fn rename(&self, index: u32, name: &str) -> Result<()> {
        self.set(index, |b| b.name(name), "renaming the link")
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set(index, |b| b.up(), "bringing the link up")
    }

    pub fn set_down(&self, index: u32) -> Result<()> {
        self.set(index, |b| b.down(), "bringing the link down")
    }

    fn set(
        &self,
        index: u32,
        change: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
        what: &str,
    ) -> Result<()> {
        let message = change(LinkUnspec::new_with_index(index)).build();
        self.socket
            .change(RouteNetlinkMessage::SetLink(message))
            .map_err(|e| Error::netlink(what, e))
    }

    pub fn delete(&self, index: u32) -> Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.socket
            .change(RouteNetlinkMessage::DelLink(message))
            .map_err(|e| Error::netlink("deleting the link", e))
    }

    pub fn add_address(&self, index: u32, address: IpNetwork) -> Result<()> {
        let message = match address.ip() {
            IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(ip, address.prefix())
                .build(),
            IpAddr::V6(ip) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(ip, address.prefix())
                .build(),
        };
        self.socket
            .create(RouteNetlinkMessage::NewAddress(message))
            .map_err(|e| Error::netlink(format!("adding address {address}"), e))
    }

    /// The addresses on a link, with their prefix lengths (IPv6 link-local ones included).
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        // The kernel dumps every link's addresses (it filters only under strict checking).
        let answer = self
            .socket
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(|e| Error::netlink("listing addresses", e))?;
        Ok(answer
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => Some(a),
                _ => None,
            })
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNetwork::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// A device route (`ip route add DST dev LINK`): no gateway, WireGuard links have no ARP.
    /// It never replaces a route another link holds (a secondary network must not take the
    /// primary's default route): then it answers `false`. A route that is already ours is fine.
    pub fn add_device_route(&self, index: u32, dst: IpNetwork) -> Result<bool> {
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .map_err(|e| Error::netlink(format!("route to {dst}"), e))?
            .output_interface(index)
            .build();
        if self
            .socket
            .create(RouteNetlinkMessage::NewRoute(message))
            .is_ok()
        {
            return Ok(true);
        }
        let routes = self.routes()?;
        Ok(routes.iter().any(|r| r.dst == dst && r.oif == Some(index)))
    }

    /// A device route in the host namespace: never replaces a route someone else owns.
    pub fn add_host_route(&self, index: u32, dst: IpNetwork) -> Result<()> {
        if self.add_device_route(index, dst)? {
            return Ok(());
        }
        Err(Error::netlink(
            format!("adding host route to {dst}"),
            "another route to that range exists; remove it or pick another subnet",
        ))
    }

    /// The policy rule `iif IFNAME lookup TABLE` (at `priority`), in one family; added
    /// unless present.
    pub fn ensure_iif_rule(
        &self,
        ifname: &str,
        table: u32,
        priority: u32,
        ipv6: bool,
    ) -> Result<()> {
        let present = self
            .iif_rules(ifname, ipv6)?
            .iter()
            .any(|m| rule_table(m) == table);
        if present {
            return Ok(());
        }
        self.socket
            .create(RouteNetlinkMessage::NewRule(iif_rule(
                ifname, table, priority, ipv6,
            )))
            .map_err(|e| Error::netlink(format!("adding the rule iif {ifname} lookup {table}"), e))
    }

    /// Delete every policy rule matching `iif IFNAME` (both families); none is fine.
    pub fn delete_iif_rules(&self, ifname: &str) -> Result<()> {
        for ipv6 in [false, true] {
            for rule in self.iif_rules(ifname, ipv6)? {
                self.socket
                    .change(RouteNetlinkMessage::DelRule(rule))
                    .map_err(|e| Error::netlink(format!("deleting a rule of {ifname}"), e))?;
            }
        }
        Ok(())
    }

    fn iif_rules(&self, ifname: &str, ipv6: bool) -> Result<Vec<RuleMessage>> {
        let mut request = RuleMessage::default();
        request.header.family = family(ipv6);
        let answer = self
            .socket
            .dump(RouteNetlinkMessage::GetRule(request))
            .map_err(|e| Error::netlink("listing policy rules", e))?;
        let matches = |m: &RuleMessage| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Iifname(n) if n == ifname))
        };
        Ok(answer
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(rule) if matches(&rule) => Some(rule),
                _ => None,
            })
            .collect())
    }

    /// The routes of routing table `table` through link `index`, both families.
    pub fn table_routes(&self, table: u32, index: u32) -> Result<Vec<IpNetwork>> {
        Ok(self
            .route_messages(table)?
            .iter()
            .filter(|m| route_table(m) == table)
            .filter_map(route_fields)
            .filter(|r| r.oif == Some(index))
            .map(|r| r.dst)
            .collect())
    }

    /// A dump of both families' routes (the kernel answers every table; callers filter).
    fn route_messages(&self, table: u32) -> Result<Vec<RouteMessage>> {
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .build();
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table)
            .build();
        let mut messages = Vec::new();
        for query in [v4, v6] {
            let answer = self
                .socket
                .dump(RouteNetlinkMessage::GetRoute(query))
                .map_err(|e| Error::netlink("listing routes", e))?;
            messages.extend(answer.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            }));
        }
        Ok(messages)
    }

    /// Add (`add: true`) or delete the device route `dst dev index` in table `table`.
    pub fn change_table_route(
        &self,
        index: u32,
        dst: IpNetwork,
        table: u32,
        add: bool,
    ) -> Result<()> {
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .map_err(|e| Error::netlink(format!("route to {dst}"), e))?
            .output_interface(index)
            .table_id(table)
            .build();
        match add {
            true => self.socket.create(RouteNetlinkMessage::NewRoute(message)),
            false => self.socket.change(RouteNetlinkMessage::DelRoute(message)),
        }
        .map_err(|e| Error::netlink(format!("route to {dst} in table {table}"), e))
    }

    /// All routes of the main table, both families.
    pub fn routes(&self) -> Result<Vec<Route>> {
        Ok(self
            .route_messages(RT_TABLE_MAIN as u32)?
            .iter()
            .filter_map(route_from_message)
            .collect())
    }
}

fn family(ipv6: bool) -> AddressFamily {
    match ipv6 {
        true => AddressFamily::Inet6,
        false => AddressFamily::Inet,
    }
}

/// `iif IFNAME lookup TABLE priority PRIORITY`, as `ip rule add` builds it: a table id past
/// 255 does not fit the header, so the header says RT_TABLE_UNSPEC and the attribute rules.
fn iif_rule(ifname: &str, table: u32, priority: u32, ipv6: bool) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family(ipv6);
    rule.header.table = u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC);
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::Iifname(ifname.to_string()),
        RuleAttribute::Table(table),
        RuleAttribute::Priority(priority),
    ];
    rule
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub oif: Option<u32>,
    pub pref_src: Option<IpAddr>,
    pub has_gateway: bool,
}

const RT_TABLE_MAIN: u8 = 254;
const RT_TABLE_UNSPEC: u8 = 0;

fn route_from_message(m: &RouteMessage) -> Option<Route> {
    if m.header.table != RT_TABLE_MAIN {
        return None;
    }
    route_fields(m)
}

/// A route's table: the header's, or the attribute for ids past 255.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

fn rule_table(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

fn route_fields(m: &RouteMessage) -> Option<Route> {
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut dst = None;
    let mut oif = None;
    let mut pref_src = None;
    let mut has_gateway = false;
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Destination(a) => dst = ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(a) => pref_src = ip(a),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => has_gateway = true,
            _ => {}
        }
    }
    let unspecified = match m.header.address_family {
        AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
        _ => IpAddr::from([0u8; 4]),
    };
    let dst = IpNetwork::new(
        dst.unwrap_or(unspecified),
        m.header.destination_prefix_length,
    )
    .ok()?;
    Some(Route {
        dst,
        oif,
        pref_src,
        has_gateway,
    })
}

fn link_from_message(m: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut kind = None;
    let mut mtu = 0;
    for attribute in &m.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(InfoKind::Wireguard) => Some("wireguard".to_string()),
                    LinkInfo::Kind(InfoKind::Tun) => Some("tun".to_string()),
                    LinkInfo::Kind(other) => Some(other.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Link {
        index: m.header.index,
        name,
        kind,
        mtu,
        up: m.header.flags.contains(LinkFlags::Up),
    }
}
