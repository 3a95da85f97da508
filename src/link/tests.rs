use super::*;
use std::os::fd::AsRawFd;

#[test]
fn a_rule_table_past_255_lives_in_the_attribute() {
    let rule = iif_rule("wg0", 1000, 100, true);
    assert_eq!(rule.header.family, AddressFamily::Inet6);
    assert_eq!(rule.header.table, RT_TABLE_UNSPEC);
    assert_eq!(rule.header.action, RuleAction::ToTable);
    assert_eq!(rule_table(&rule), 1000);
    assert!(rule.attributes.contains(&RuleAttribute::Priority(100)));

    let small = iif_rule("wg0", 100, 100, false);
    assert_eq!(small.header.family, AddressFamily::Inet);
    assert_eq!(small.header.table, 100);
    assert_eq!(rule_table(&small), 100);
}

/// Every operation against a real kernel, in namespaces of the test's own: the thread unshares
/// one (needs root), so nothing outside it is touched and the kernel removes all it made when
/// the thread ends. Run with `cargo test --lib link:: -- --ignored`.
#[test]
#[ignore = "needs root: creates network namespaces, links, routes and rules"]
fn every_operation_in_a_namespace_of_its_own() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let netlink = Netlink::open().unwrap();
        check_links(&netlink);
        check_addresses_and_routes(&netlink);
        check_rules(&netlink);
        check_tun(&netlink);
        check_wireguard(&netlink);
        check_move_to_netns();
    })
    .join()
    .unwrap();
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}");
}

fn lo(netlink: &Netlink) -> Link {
    netlink.link_by_name("lo").unwrap().expect("lo")
}

fn check_links(netlink: &Netlink) {
    let lo = lo(netlink);
    assert_eq!(lo.kind, None);
    assert!(!lo.up);
    assert_eq!(netlink.link_by_name("nope").unwrap(), None);
    assert_eq!(netlink.link_by_name("longer-than-15-bytes").unwrap(), None);
    assert_eq!(netlink.links().unwrap(), vec![lo.clone()]);
    netlink.set_up(lo.index).unwrap();
    assert!(self::lo(netlink).up);
}

fn check_addresses_and_routes(netlink: &Netlink) {
    let lo = lo(netlink).index;
    let address: IpNetwork = "10.255.1.1/32".parse().unwrap();
    netlink.add_address(lo, address).unwrap();
    assert!(netlink.addresses(lo).unwrap().contains(&address));
    let again = netlink.add_address(lo, address).unwrap_err().to_string();
    assert_eq!(
        again,
        "adding address 10.255.1.1/32: Received a netlink error message File exists (os error 17)"
    );

    let dst: IpNetwork = "10.255.9.0/24".parse().unwrap();
    assert!(netlink.add_device_route(lo, dst).unwrap());
    assert!(netlink.add_device_route(lo, dst).unwrap(), "ours already");
    let route = netlink.routes().unwrap().into_iter().find(|r| r.dst == dst);
    assert_eq!(
        route.map(|r| (r.oif, r.has_gateway)),
        Some((Some(lo), false))
    );
    netlink.add_host_route(lo, dst).unwrap();

    let table_dst: IpNetwork = "10.255.10.0/24".parse().unwrap();
    for table in [100, 1000] {
        netlink
            .change_table_route(lo, table_dst, table, true)
            .unwrap();
        assert!(
            netlink
                .change_table_route(lo, table_dst, table, true)
                .is_err()
        );
        assert_eq!(netlink.table_routes(table, lo).unwrap(), vec![table_dst]);
        assert!(!netlink.routes().unwrap().iter().any(|r| r.dst == table_dst));
        netlink
            .change_table_route(lo, table_dst, table, false)
            .unwrap();
        assert_eq!(netlink.table_routes(table, lo).unwrap(), vec![]);
    }
}

fn check_rules(netlink: &Netlink) {
    for ipv6 in [false, true] {
        for table in [100, 1000] {
            netlink.ensure_iif_rule("t0", table, 100, ipv6).unwrap();
            netlink.ensure_iif_rule("t0", table, 100, ipv6).unwrap();
        }
        let tables: Vec<u32> = netlink
            .iif_rules("t0", ipv6)
            .unwrap()
            .iter()
            .map(rule_table)
            .collect();
        assert_eq!(tables.len(), 2, "{tables:?}");
        assert!(tables.contains(&100) && tables.contains(&1000));
    }
    netlink.delete_iif_rules("t0").unwrap();
    netlink.delete_iif_rules("t0").unwrap();
    for ipv6 in [false, true] {
        assert_eq!(netlink.iif_rules("t0", ipv6).unwrap(), vec![]);
    }
}

fn check_tun(netlink: &Netlink) {
    ip(&["tuntap", "add", "mode", "tun", "name", "t0"]);
    let t0 = netlink.link_by_name("t0").unwrap().expect("t0");
    assert_eq!(t0.kind.as_deref(), Some("tun"));

    // A route another link holds is not taken: 10.255.9.0/24 is lo's.
    let dst: IpNetwork = "10.255.9.0/24".parse().unwrap();
    assert!(!netlink.add_device_route(t0.index, dst).unwrap());
    assert!(netlink.add_host_route(t0.index, dst).is_err());

    netlink.set_mtu(t0.index, 1400).unwrap();
    netlink.rename(t0.index, "t1").unwrap();
    assert_eq!(netlink.link_by_name("t0").unwrap(), None);
    let t1 = netlink.link_by_name("t1").unwrap().expect("t1");
    assert_eq!((t1.index, t1.mtu), (t0.index, 1400));
    netlink.set_up(t1.index).unwrap();
    netlink.set_down(t1.index).unwrap();
    assert!(!netlink.link_by_name("t1").unwrap().unwrap().up);
    netlink.delete(t1.index).unwrap();
    assert_eq!(netlink.link_by_name("t1").unwrap(), None);
    let gone = netlink.delete(t1.index).unwrap_err().to_string();
    assert!(gone.starts_with("deleting the link: "), "{gone}");
}

fn check_wireguard(netlink: &Netlink) {
    if !netlink.can_create_wireguard("wgprobe0") {
        eprintln!("no wireguard module: its checks are skipped");
        return;
    }
    assert_eq!(netlink.link_by_name("wgprobe0").unwrap(), None);
    let here = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    netlink
        .create_wireguard_in("wg0", here.as_raw_fd(), 1380)
        .unwrap();
    let wg0 = netlink.link_by_name("wg0").unwrap().expect("wg0");
    assert_eq!((wg0.kind.as_deref(), wg0.mtu), (Some("wireguard"), 1380));
    netlink.delete(wg0.index).unwrap();
}

/// A link moves from a second namespace into the first; a socket opened before the switch
/// keeps acting on its own namespace.
fn check_move_to_netns() {
    let first = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    let in_first = Netlink::open().unwrap();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
    let in_second = Netlink::open().unwrap();
    ip(&["tuntap", "add", "mode", "tun", "name", "t2"]);
    let t2 = in_second.link_by_name("t2").unwrap().expect("t2");
    assert_eq!(in_first.link_by_name("t2").unwrap(), None);
    in_second
        .move_to_netns(t2.index, first.as_raw_fd())
        .unwrap();
    assert_eq!(in_second.link_by_name("t2").unwrap(), None);
    let moved = in_first.link_by_name("t2").unwrap().expect("t2 moved");
    in_first.delete(moved.index).unwrap();
}
