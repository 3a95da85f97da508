//! rtnetlink operations, named after what they do. A `Netlink` talks to the namespace of the
//! thread that opened it, so it must be opened (and used) on the thread that runs inside the
//! namespace it is meant for: `Netns::run(|| Netlink::open()?.…)`.

use std::net::IpAddr;
use std::os::fd::RawFd;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{
    Handle, IpVersion, LinkMessageBuilder, LinkUnspec, LinkWireguard, RouteMessageBuilder,
};
use tokio::runtime::Runtime;

use crate::cni::{Error, Result};

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
    runtime: Runtime,
    handle: Handle,
}

impl Netlink {
    /// Open a route netlink socket in the current thread's namespace.
    pub fn open() -> Result<Netlink> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::netlink("starting the netlink runtime", e))?;
        let handle = {
            let _guard = runtime.enter();
            let (connection, handle, _) = rtnetlink::new_connection()
                .map_err(|e| Error::netlink("opening a netlink socket", e))?;
            runtime.spawn(connection);
            handle
        };
        Ok(Netlink { runtime, handle })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        self.runtime.block_on(async {
            let messages: Vec<LinkMessage> = self
                .handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|e| Error::netlink("listing links", e))?;
            Ok(messages.iter().map(link_from_message).collect())
        })
    }

    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Create a WireGuard link named `name` inside the namespace behind `netns_fd`. Sent from
    /// this (host) namespace, the link's UDP socket stays here while the link lives there.
    pub fn create_wireguard_in(&self, name: &str, netns_fd: RawFd, mtu: u32) -> Result<()> {
        let message = LinkWireguard::new(name)
            .mtu(mtu)
            .setns_by_fd(netns_fd)
            .build();
        self.runtime.block_on(async {
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(|e| Error::netlink(format!("creating WireGuard link {name}"), e))
        })
    }

    /// Whether this namespace's kernel can create a `wireguard` link at all.
    pub fn can_create_wireguard(&self, probe_name: &str) -> bool {
        let created = self.runtime.block_on(async {
            self.handle
                .link()
                .add(LinkWireguard::new(probe_name).build())
                .execute()
                .await
        });
        if created.is_err() {
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
        self.runtime.block_on(async {
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(|e| Error::netlink(what, e))
        })
    }

    pub fn delete(&self, index: u32) -> Result<()> {
        self.runtime.block_on(async {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| Error::netlink("deleting the link", e))
        })
    }

    pub fn add_address(&self, index: u32, address: IpNetwork) -> Result<()> {
        self.runtime.block_on(async {
            self.handle
                .address()
                .add(index, address.ip(), address.prefix())
                .execute()
                .await
                .map_err(|e| Error::netlink(format!("adding address {address}"), e))
        })
    }

    /// The addresses on a link, with their prefix lengths (IPv6 link-local ones included).
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        self.runtime.block_on(async {
            let messages: Vec<_> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(|e| Error::netlink("listing addresses", e))?;
            Ok(messages
                .iter()
                .filter(|m| m.header.index == index)
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => {
                            IpNetwork::new(*ip, m.header.prefix_len).ok()
                        }
                        _ => None,
                    })
                })
                .collect())
        })
    }

    /// A device route (`ip route add DST dev LINK`): no gateway, WireGuard links have no ARP.
    /// A device route (no next hop). It never replaces a route another link holds (a
    /// secondary network must not take the primary's default route): then it answers `false`.
    /// A route that is already ours is fine.
    pub fn add_device_route(&self, index: u32, dst: IpNetwork) -> Result<bool> {
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .map_err(|e| Error::netlink(format!("route to {dst}"), e))?
            .output_interface(index)
            .build();
        let added = self
            .runtime
            .block_on(async { self.handle.route().add(message).execute().await });
        if added.is_ok() {
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
        let request = self
            .handle
            .rule()
            .add()
            .input_interface(ifname)
            .table_id(table)
            .priority(priority)
            .action(RuleAction::ToTable);
        self.runtime
            .block_on(async {
                match ipv6 {
                    true => request.v6().execute().await,
                    false => request.v4().execute().await,
                }
            })
            .map_err(|e| Error::netlink(format!("adding the rule iif {ifname} lookup {table}"), e))
    }

    /// Delete every policy rule matching `iif IFNAME` (both families); none is fine.
    pub fn delete_iif_rules(&self, ifname: &str) -> Result<()> {
        for ipv6 in [false, true] {
            for rule in self.iif_rules(ifname, ipv6)? {
                self.runtime
                    .block_on(async { self.handle.rule().del(rule).execute().await })
                    .map_err(|e| Error::netlink(format!("deleting a rule of {ifname}"), e))?;
            }
        }
        Ok(())
    }

    fn iif_rules(&self, ifname: &str, ipv6: bool) -> Result<Vec<RuleMessage>> {
        let version = if ipv6 { IpVersion::V6 } else { IpVersion::V4 };
        let rules: Vec<RuleMessage> = self.runtime.block_on(async {
            self.handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| Error::netlink("listing policy rules", e))
        })?;
        let matches = |m: &RuleMessage| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Iifname(n) if n == ifname))
        };
        Ok(rules.into_iter().filter(matches).collect())
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
        let v4 = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .table_id(table)
            .build();
        let v6 = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .table_id(table)
            .build();
        self.runtime.block_on(async {
            let mut messages = Vec::new();
            for query in [v4, v6] {
                let answer: Vec<RouteMessage> = self
                    .handle
                    .route()
                    .get(query)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| Error::netlink("listing routes", e))?;
                messages.extend(answer);
            }
            Ok(messages)
        })
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
        self.runtime
            .block_on(async {
                match add {
                    true => self.handle.route().add(message).execute().await,
                    false => self.handle.route().del(message).execute().await,
                }
            })
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub oif: Option<u32>,
    pub pref_src: Option<IpAddr>,
    pub has_gateway: bool,
}

const RT_TABLE_MAIN: u8 = 254;

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
        rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
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
