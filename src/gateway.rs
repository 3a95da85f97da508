//! The node gateway: one WireGuard link per network in the host namespace, with its own key
//! and the range's gateway address. Every local pod has it as the peer for its default route
//! (0.0.0.0/0, ::/0; pod-to-pod stays direct because /32 peers win), it has every local pod as
//! a peer, and the host routes the pod range through it. That is the path of kubelet probes,
//! Services and egress. Created by the first ADD, recreated by an ADD that finds it gone,
//! removed with the network's last local attachment.

use ipnetwork::IpNetwork;
use wireguard_control::Key;

use crate::cni::{CniResult, Error, NetConf, Peering, Result};
use crate::host::{self, LinkSettings};
use crate::keys::KeyPair;
use crate::link::Netlink;
use crate::mesh;
use crate::nat;
use crate::netns::Netns;
use crate::node_paths;
use crate::ports;
use crate::store::{GatewayRecord, RemoteNode, SCHEMA_VERSION, State, Store};
use crate::wireguard::{self, LinkSpec, Peer};

/// `wgg` + 12 hex digits of (store, network, node): stable, at most 15 bytes, and distinct
/// for two stores or two simulated nodes on one host that use the same network name.
pub fn link_name(store: &Store) -> String {
    format!(
        "wgg{:012x}",
        fnv1a(store.scope().as_bytes()) & 0xffff_ffff_ffff
    )
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the gateway serves, read off an IPAM result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The gateway's addresses, as full-length prefixes.
    pub addresses: Vec<IpNetwork>,
    /// This node's pod ranges.
    pub subnets: Vec<IpNetwork>,
    /// The network's ranges over all nodes (`clusterRange`), routed through it when set.
    pub cluster_ranges: Vec<IpNetwork>,
}

pub fn plan(result: &CniResult, cluster_ranges: &[IpNetwork]) -> Result<Plan> {
    let mut plan = Plan {
        addresses: Vec::new(),
        subnets: Vec::new(),
        cluster_ranges: cluster_ranges.to_vec(),
    };
    for ip in &result.ips {
        let gateway = ip.gateway.ok_or_else(|| {
            Error::config(
                "ipam",
                format!(
                    "returned {} without a gateway address; \"hostGateway\" needs one per range (or set \"hostGateway\": false)",
                    ip.address
                ),
            )
        })?;
        let subnet = IpNetwork::new(ip.address.network(), ip.address.prefix())
            .expect("a network of a valid prefix is valid");
        let address = wireguard::host_prefix(gateway);
        if !plan.subnets.contains(&subnet) {
            plan.subnets.push(subnet);
        }
        if !plan.addresses.contains(&address) {
            plan.addresses.push(address);
        }
    }
    Ok(plan)
}

/// The plan host-local's result will give, read off its config before it runs, so that the
/// network's first pod can build the gateway while IPAM runs: per range set of one range, its
/// subnet and its gateway (host-local's default: the subnet's first address). `None` when the
/// result cannot be foretold (another IPAM plugin, a set of several ranges, the legacy
/// `subnet` form): the gateway then waits for the result. The join checks the gateway against
/// the result's plan either way.
pub fn expected_plan(conf: &NetConf) -> Option<Plan> {
    let ipam = conf.raw.get("ipam")?;
    if ipam.get("type")?.as_str()? != "host-local" {
        return None;
    }
    let mut plan = Plan {
        addresses: Vec::new(),
        subnets: Vec::new(),
        cluster_ranges: conf.cluster_range.clone(),
    };
    for set in ipam.get("ranges")?.as_array()? {
        let [range] = set.as_array()?.as_slice() else {
            return None;
        };
        // host-local refuses a subnet with host bits set: nothing to build for.
        let subnet: IpNetwork = range.get("subnet")?.as_str()?.parse().ok()?;
        if subnet.ip() != subnet.network() {
            return None;
        }
        let gateway = match range.get("gateway") {
            Some(gateway) => gateway.as_str()?.parse().ok()?,
            None => subnet.iter().nth(1)?,
        };
        plan.subnets.push(subnet);
        plan.addresses.push(wireguard::host_prefix(gateway));
    }
    (!plan.subnets.is_empty()).then_some(plan)
}

/// The peer a pod gets for another node's gateway: that gateway's own addresses and its
/// node's address, so a pod reaches any node (apiserver, NodePorts) encrypted end to end and
/// the reply is accepted.
pub fn peer_for_remote_pods(gateway: &GatewayRecord, keepalive: Option<u16>) -> Result<Peer> {
    let mut allowed_ips = gateway.addresses.clone();
    let node = wireguard::host_prefix(gateway.endpoint);
    if !allowed_ips.contains(&node) {
        allowed_ips.push(node);
    }
    peer_allowing(gateway, allowed_ips, keepalive)
}

/// The peer a gateway gets for another on-demand node's gateway, the relay between them: that
/// node's accepted subnets and addresses (as the membership layer accepted them, in its
/// `node.json`) and the gateway's own addresses.
pub fn peer_for_relay(
    gateway: &GatewayRecord,
    node: &RemoteNode,
    keepalive: Option<u16>,
) -> Result<Peer> {
    let mut allowed_ips = gateway.addresses.clone();
    let addresses = std::iter::once(gateway.endpoint).chain(node.endpoints.iter().copied());
    for prefix in addresses
        .map(wireguard::host_prefix)
        .chain(node.subnets.iter().copied())
    {
        if !allowed_ips.contains(&prefix) {
            allowed_ips.push(prefix);
        }
    }
    peer_allowing(gateway, allowed_ips, keepalive)
}

/// The peer every pod gets for the gateway: whatever no more specific peer claims.
pub fn peer_for_pods(gateway: &GatewayRecord, keepalive: Option<u16>) -> Result<Peer> {
    let mut allowed_ips = Vec::new();
    if gateway.subnets.iter().any(IpNetwork::is_ipv4) {
        allowed_ips.push("0.0.0.0/0".parse().expect("valid"));
    }
    if gateway.subnets.iter().any(IpNetwork::is_ipv6) {
        allowed_ips.push("::/0".parse().expect("valid"));
    }
    peer_allowing(gateway, allowed_ips, keepalive)
}

/// The gateway as a peer that may speak for `allowed_ips`.
fn peer_allowing(
    gateway: &GatewayRecord,
    allowed_ips: Vec<IpNetwork>,
    keepalive: Option<u16>,
) -> Result<Peer> {
    Ok(Peer {
        public_key: key_of(&gateway.public_key)?,
        endpoint: Some(std::net::SocketAddr::new(
            gateway.endpoint,
            gateway.listen_port,
        )),
        allowed_ips,
        keepalive,
        preshared_key: None,
    })
}

fn key_of(base64: &str) -> Result<Key> {
    Key::from_base64(base64)
        .map_err(|_| Error::decode("gateway record", "\"publicKey\" is not a WireGuard key"))
}

/// Whether the gateway's link is up with the recorded key (its daemon alive, for userspace).
pub fn is_live(host: &Netns, gateway: &GatewayRecord) -> bool {
    wireguard::backend(gateway.backend)
        .read(&gateway.link(host))
        .is_ok_and(|d| d.public_key.map(|k| k.to_base64()).as_deref() == Some(&gateway.public_key))
}

/// Whether the gateway's link (or daemon) still runs, without reading its peers (ADD asks on
/// every call; `is_live` also proves the key).
pub fn is_running(host: &Netns, gateway: &GatewayRecord) -> bool {
    wireguard::backend(gateway.backend).is_running(&gateway.link(host))
}

/// Whether this node's gateway of the store's network runs and is of this boot (`is_running`:
/// what ADD asks before it decides to make one).
pub fn is_running_for_boot(host: &Netns, store: &Store, boot_id: &str) -> bool {
    store
        .gateway()
        .ok()
        .flatten()
        .is_some_and(|gw| gw.boot_id == boot_id && is_running(host, &gw))
}

/// Whether this node's gateway of the store's network is live and of this boot.
pub fn is_live_for_boot(host: &Netns, store: &Store, boot_id: &str) -> bool {
    store
        .gateway()
        .ok()
        .flatten()
        .is_some_and(|gw| gw.boot_id == boot_id && is_live(host, &gw))
}

/// What ADD wants the gateway to be.
pub struct Wanted<'a> {
    pub boot_id: &'a str,
    pub settings: &'a LinkSettings,
    pub plan: &'a Plan,
    pub keepalive: Option<u16>,
    pub masquerade: bool,
}

pub struct Ensured {
    pub record: GatewayRecord,
    /// The key of a gateway that had vanished and was replaced: pods still list it.
    pub replaced_key: Option<Key>,
    /// Made by this call (an ADD that fails afterwards removes it again when unused).
    pub created: bool,
}

/// Make sure the gateway exists, serves `plan` and has every ready local pod as a peer.
/// The caller holds the network lock; the node's port lock is taken only to replace or
/// create the gateway (an ADD into a network whose gateway runs needs no port).
pub fn ensure(host: &Netns, store: &Store, wanted: &Wanted) -> Result<Ensured> {
    let network = store.network();
    let Wanted {
        boot_id,
        settings,
        plan,
        keepalive,
        masquerade,
    } = *wanted;
    let mut replaced_key = None;
    if let Some(existing) = store.gateway()? {
        if existing.boot_id == boot_id && is_running(host, &existing) {
            let serves_plan = plan.subnets.iter().all(|s| existing.subnets.contains(s))
                && existing.cluster_ranges == plan.cluster_ranges
                && existing.masquerade == masquerade
                && existing.peering == settings.peering;
            if serves_plan {
                return Ok(Ensured {
                    record: existing,
                    replaced_key: None,
                    created: false,
                });
            }
            // A range was added, ipMasq or peering changed: rebuild around the same key.
            let mut grown = existing.clone();
            merge_plan(&mut grown, plan);
            grown.masquerade = masquerade;
            grown.peering = settings.peering;
            configure_host_side(host, &grown)?;
            store.put_gateway(&grown)?;
            return Ok(Ensured {
                record: grown,
                replaced_key: None,
                created: false,
            });
        }
        tracing::warn!(network, "the node gateway is gone: recreating it");
        destroy(host, &existing)?;
        ports::release(&existing.host_name);
        replaced_key = key_of(&existing.public_key).ok();
    }

    let name = link_name(store);
    clear_leftovers(host, &name)?;
    let keypair = KeyPair::generate();
    let mut ports = ports::lock()?;
    let port = ports.allocate(settings.ports, &name, &[])?.ok_or_else(|| {
        Error::TryAgainLater(format!(
            "no free UDP port left in listenPorts {} for the node gateway",
            settings.ports
        ))
    })?;
    let local_pods: Vec<Peer> = store
        .node_records()?
        .iter()
        .filter(|r| r.state == State::Ready)
        .filter_map(|r| mesh::peer_of(r, keepalive).ok())
        .collect();
    let mut record = GatewayRecord {
        schema: SCHEMA_VERSION,
        network: network.to_string(),
        node: String::new(),
        public_key: keypair.public().to_base64(),
        addresses: Vec::new(),
        subnets: Vec::new(),
        cluster_ranges: Vec::new(),
        endpoint: settings.endpoint,
        listen_port: port,
        host_name: name.clone(),
        backend: settings.backend,
        daemon_pid: None,
        boot_id: boot_id.to_string(),
        mtu: settings.mtu,
        masquerade,
        peering: settings.peering,
        created_at: host::now_unix(),
    };
    merge_plan(&mut record, plan);
    record.node = store.node_name().to_string();

    let backend = wireguard::backend(settings.backend);
    let spec = LinkSpec {
        temp_name: &name,
        ifname: &name,
        mtu: settings.mtu,
        listen_port: port,
        keypair: &keypair,
        peers: local_pods,
        daemon: settings.userspace_daemon,
    };
    // Created "into" the host namespace itself: the same path as a pod link, minus the move.
    // Forwarding and the NAT rules (which name the link, and need not wait for it) are set
    // meanwhile on a second thread: iptables' execs take as long as the daemon's start.
    let (created, rules) = std::thread::scope(|scope| {
        let rules = scope.spawn(|| forwarding_and_nat(&record));
        let created = backend.create(&spec, host, host);
        let rules = rules
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (created, rules)
    });
    let finish = created.and_then(|created| {
        rules?;
        record.daemon_pid = created.daemon_pid;
        configure_link(host, &record).and_then(|()| store.put_gateway(&record))
    });
    if let Err(e) = finish {
        let _ = destroy(host, &record);
        let _ = ports.release(&name);
        return Err(e);
    }
    Ok(Ensured {
        record,
        replaced_key,
        created: true,
    })
}

fn merge_plan(record: &mut GatewayRecord, plan: &Plan) {
    record.cluster_ranges = plan.cluster_ranges.clone();
    for address in &plan.addresses {
        if !record.addresses.contains(address) {
            record.addresses.push(*address);
        }
    }
    for subnet in &plan.subnets {
        if !record.subnets.contains(subnet) {
            record.subnets.push(*subnet);
        }
    }
}

/// Addresses, up, routes to the pod ranges, forwarding and the NAT rules. Idempotent.
fn configure_host_side(host: &Netns, gateway: &GatewayRecord) -> Result<()> {
    configure_link(host, gateway)?;
    forwarding_and_nat(gateway)
}

/// The gateway link's addresses, up, and its routes to the pod ranges.
fn configure_link(host: &Netns, gateway: &GatewayRecord) -> Result<()> {
    host.run(|| {
        let netlink = Netlink::open()?;
        let link = netlink.link_by_name(&gateway.host_name)?.ok_or_else(|| {
            Error::netlink(
                format!("gateway link {}", gateway.host_name),
                "is missing from the host namespace",
            )
        })?;
        let present = netlink.addresses(link.index)?;
        for address in &gateway.addresses {
            if !present.contains(address) {
                netlink.add_address(link.index, *address)?;
            }
        }
        netlink.set_up(link.index)?;
        for range in gateway.routed() {
            netlink.add_host_route(link.index, *range)?;
        }
        Ok(())
    })
}

fn forwarding_and_nat(gateway: &GatewayRecord) -> Result<()> {
    nat::enable_forwarding(gateway.routed())?;
    let (want, drop) = nat_rules(gateway);
    nat::converge(&want, &drop)?;
    let watch = relay_watch_rules(gateway);
    match gateway.peering {
        Peering::OnDemand => converge_relay_watch(gateway, &watch, &[]),
        Peering::Mesh => converge_relay_watch(gateway, &[], &watch),
    }
    Ok(())
}

/// The relay watch of an on-demand gateway (`nat::relay_watch_rules`): NFLOG of the relayed
/// flows, from which the agent promotes pairs to direct peers.
fn relay_watch_rules(gateway: &GatewayRecord) -> Vec<nat::Rule> {
    let (network, link) = (&gateway.network, &gateway.host_name);
    nat::relay_watch_rules(network, link, gateway.routed(), nat::RELAY_NFLOG_GROUP)
}

/// The relay carries every packet without the watch, only never promotes: a host that cannot
/// have these rules (no xt_NFLOG or xt_hashlimit) gets a warning, not a failed gateway.
fn converge_relay_watch(gateway: &GatewayRecord, want: &[nat::Rule], drop: &[nat::Rule]) {
    if let Err(e) = nat::converge(want, drop) {
        tracing::warn!(
            network = %gateway.network,
            link = %gateway.host_name,
            error = %e,
            "the relay watch rules (NFLOG of relayed flows) could not be set: pairs stay relayed (modprobe xt_NFLOG xt_hashlimit nfnetlink_log)"
        );
    }
}

/// The gateway's NAT rules: those it wants, and those to drop (`ipMasq` turned off).
fn nat_rules(gateway: &GatewayRecord) -> (Vec<nat::Rule>, Vec<nat::Rule>) {
    let (mut want, mut drop) = (Vec::new(), Vec::new());
    let (network, link) = (&gateway.network, &gateway.host_name);
    let mut families: Vec<&IpNetwork> = gateway.routed().iter().collect();
    families.sort_by_key(|s| s.is_ipv4());
    families.dedup_by_key(|s| s.is_ipv4());
    for family in families {
        want.push(nat::forward(network, link, family, true));
        want.push(nat::forward(network, link, family, false));
    }
    for subnet in gateway.routed() {
        want.push(nat::hairpin(network, link, subnet));
        drop.push(nat::legacy_hairpin(network, link, subnet));
        let masquerade = nat::masquerade(network, link, subnet);
        match gateway.masquerade {
            true => want.push(masquerade),
            false => drop.push(masquerade),
        }
    }
    want.extend(node_paths::masquerade_rules(gateway));
    (want, drop)
}

/// Remove the gateway's link (or daemon) and NAT rules; the record and the port's ledger
/// entry stay for the caller (which may hold the port lock already).
pub fn destroy(host: &Netns, gateway: &GatewayRecord) -> Result<()> {
    let (want, drop) = nat_rules(gateway);
    nat::converge(&[], &[want, drop].concat())?;
    converge_relay_watch(gateway, &[], &relay_watch_rules(gateway));
    node_paths::remove_rules(host, &gateway.host_name)?;
    let key = key_of(&gateway.public_key)?;
    wireguard::backend(gateway.backend).destroy(&gateway.link(host), &[key], host)
}

/// The network's last local attachment is gone: so is the gateway, unless the node agent
/// serves the network here (it leased or claimed a subnet): a node with a subnet keeps its
/// gateway.
pub fn remove_if_unused(host: &Netns, store: &Store) -> Result<()> {
    let agent_serves = store.has_subnet_file();
    if agent_serves || !store.node_records()?.is_empty() {
        return Ok(());
    }
    if let Some(gateway) = store.gateway()? {
        destroy(host, &gateway)?;
        store.remove_gateway()?;
        ports::release(&gateway.host_name);
    }
    clear_leftovers(host, &link_name(store))
}

/// Uninstall: the network's gateway on this node goes whether or not pods remain: its link or
/// daemon, policy rules, NAT, FORWARD and relay-watch rules, record and port. A failure on
/// the recorded gateway does not stop the sweep by name that follows. `Ok(true)` when there
/// was something to remove.
pub fn remove_for_uninstall(host: &Netns, store: &Store) -> Result<bool> {
    let name = link_name(store);
    let mut found = false;
    if let Some(gateway) = store.gateway()? {
        if let Err(e) = destroy(host, &gateway) {
            tracing::warn!(gateway = %gateway.host_name, error = %e, "removing the recorded gateway; sweeping by name");
        }
        store.remove_gateway()?;
        ports::release(&gateway.host_name);
        found = true;
    }
    found |= host.run(|| Netlink::open()?.link_by_name(&name))?.is_some();
    found |= wireguard::userspace::has_socket(&name);
    clear_leftovers(host, &name)?;
    found |= nat::remove_naming(&name)? > 0;
    Ok(found)
}

/// A gateway whose creation was killed before its record was written still holds the
/// network's gateway name (a name only wg-cni derives): remove it so it can be made again.
fn clear_leftovers(host: &Netns, name: &str) -> Result<()> {
    wireguard::userspace::stop_daemon_named(name);
    node_paths::remove_rules(host, name)?;
    host.run(|| {
        let netlink = Netlink::open()?;
        if let Some(link) = netlink.link_by_name(name)?
            && link.kind.as_deref() == Some("wireguard")
        {
            netlink.delete(link.index)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::result::IpConfig;

    #[test]
    fn plan_takes_gateways_and_ranges_per_family() {
        let result = CniResult {
            ips: vec![
                IpConfig {
                    address: "10.66.0.7/24".parse().unwrap(),
                    gateway: Some("10.66.0.1".parse().unwrap()),
                    interface: None,
                },
                IpConfig {
                    address: "fd66::7/64".parse().unwrap(),
                    gateway: Some("fd66::1".parse().unwrap()),
                    interface: None,
                },
            ],
            ..CniResult::default()
        };
        let plan = plan(&result, &[]).unwrap();
        assert_eq!(plan.addresses[0].to_string(), "10.66.0.1/32");
        assert_eq!(plan.addresses[1].to_string(), "fd66::1/128");
        assert_eq!(plan.subnets[0].to_string(), "10.66.0.0/24");
        assert_eq!(plan.subnets[1].to_string(), "fd66::/64");
    }

    #[test]
    fn a_range_without_gateway_is_a_config_error() {
        let result = CniResult {
            ips: vec![IpConfig {
                address: "10.66.0.7/24".parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            ..CniResult::default()
        };
        assert_eq!(plan(&result, &[]).unwrap_err().code(), 7);
    }

    /// What `expected_plan` foretells is what the real host-local's result gives.
    #[test]
    fn the_expected_plan_is_host_locals_own() {
        let host_local = std::path::Path::new("/usr/lib/cni/host-local");
        assert!(host_local.exists(), "needs containernetworking-plugins");
        let data = tempfile::tempdir().unwrap();
        let ranges = serde_json::json!([
            [{"subnet": "10.66.3.0/24"}],
            [{"subnet": "fd66:3::/64", "gateway": "fd66:3::fe"}]
        ]);
        let text = serde_json::json!({
            "cniVersion": "1.0.0", "name": "plan", "type": "wg-cni",
            "clusterRange": ["10.66.0.0/16"],
            "ipam": {"type": "host-local", "ranges": ranges, "dataDir": data.path()},
        })
        .to_string();
        let conf = NetConf::parse(text.as_bytes()).unwrap();
        let mut child = std::process::Command::new(host_local)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "plan-test")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let result = CniResult::parse(&answer, "host-local").unwrap();

        let expected = expected_plan(&conf).expect("host-local with one range per set");
        assert_eq!(expected, plan(&result, &conf.cluster_range).unwrap());
        assert_eq!(expected.addresses[0].to_string(), "10.66.3.1/32");
        assert_eq!(expected.addresses[1].to_string(), "fd66:3::fe/128");
    }

    #[test]
    fn no_plan_is_foretold_for_other_ipam_or_several_ranges_per_set() {
        let conf = |ipam: serde_json::Value| {
            let text = serde_json::json!({"cniVersion": "1.0.0", "name": "n", "type": "wg-cni", "ipam": ipam});
            NetConf::parse(text.to_string().as_bytes()).unwrap()
        };
        let two = serde_json::json!([[{"subnet": "10.1.0.0/24"}, {"subnet": "10.2.0.0/24"}]]);
        assert_eq!(
            expected_plan(&conf(
                serde_json::json!({"type": "host-local", "ranges": two})
            )),
            None
        );
        assert_eq!(
            expected_plan(&conf(serde_json::json!({"type": "dhcp"}))),
            None
        );
        let legacy = serde_json::json!({"type": "host-local", "subnet": "10.1.0.0/24"});
        assert_eq!(expected_plan(&conf(legacy)), None);
    }

    #[test]
    fn link_names_fit_ifnamsiz_and_differ_per_store_network_and_node() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let name = |root: &std::path::Path, net: &str, node: &str| {
            link_name(&Store::open(root, net, node).unwrap())
        };
        let base = name(dir.path(), "a-very-long-network-name-indeed", "n1");
        assert_eq!(base.len(), 15);
        assert_eq!(
            base,
            name(dir.path(), "a-very-long-network-name-indeed", "n1")
        );
        assert_ne!(base, name(dir.path(), "another", "n1"));
        assert_ne!(
            base,
            name(dir.path(), "a-very-long-network-name-indeed", "n2")
        );
        assert_ne!(
            base,
            name(other.path(), "a-very-long-network-name-indeed", "n1")
        );
    }
}
