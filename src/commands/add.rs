//! ADD: validate → lock the network → IPAM → key pair → port → link in the pod → addresses,
//! routes, up → record → tell the other local links about the newcomer → result.
//! Any failure after IPAM undoes every completed step (one rollback guard).

use serde_json::Value;

use super::context::{self, Context};
use super::rollback::Rollback;
use crate::cni::result::{Interface, parse_dns};
use crate::cni::{CniResult, Error, Result};
use crate::gateway;
use crate::host::{self, LinkSettings};
use crate::keys::KeyPair;
use crate::link::Netlink;
use crate::mesh;
use crate::netns::Netns;
use crate::ports;
use crate::store::{Record, SCHEMA_VERSION, State};
use crate::wireguard::{self, LinkSpec, Update};

/// How many taken ports ADD skips before giving up (another process may grab one between our
/// check and the daemon's bind).
const PORT_ATTEMPTS: usize = 5;

pub fn run(ctx: &Context) -> Result<Value> {
    let env = ctx.env;
    let conf = ctx.conf;
    let netns_path = env.netns.as_deref().expect("ADD requires CNI_NETNS");
    let pod = Netns::open_for_env(netns_path)?;
    let settings = context::resolve_link_settings(conf)?;
    refuse_existing_interface(&pod, &env.ifname)?;
    let ipam = ctx.ipam()?;

    let store = ctx.store()?;
    let _lock = store.lock()?;
    context::reap_earlier_boots(ctx, &store, &ipam)?;
    if let Some(stale) = store.get(&env.container_id, &env.ifname)? {
        // A leftover of an earlier attempt for this very attachment (its interface is not in
        // the pod, we checked): clear it so the new one starts clean.
        context::teardown(ctx, &store, &ipam, &stale, None)?;
    }

    let backend = wireguard::backend(settings.backend);
    let mut rollback = Rollback::new();
    let mut ipam_result = ipam.add()?;
    rollback.push("IPAM reservation", || ipam.del(&ipam.target_of_env(), None));
    if ipam_result.ips.is_empty() {
        return Err(Error::config(
            "ipam",
            format!("{} returned no addresses", conf.ipam_type),
        ));
    }
    let addresses: Vec<_> = ipam_result.ips.iter().map(|ip| ip.address).collect();
    let static_peers = mesh::static_peers(conf, &addresses)?;
    let gateway_plan = match conf.host_gateway {
        true => Some(gateway::plan(&ipam_result)?),
        false => None,
    };

    let keypair = KeyPair::generate();
    let records = store.all_records()?;
    let mut peers = mesh::peers_of(
        &records,
        &env.container_id,
        &env.ifname,
        conf.persistent_keepalive,
    );
    peers.extend(static_peers);
    let temp_name = temp_link_name(&env.container_id, &env.ifname);
    let host_name = match settings.backend {
        wireguard::BackendKind::Kernel => env.ifname.clone(),
        wireguard::BackendKind::Userspace => temp_name.clone(),
    };

    let mut record = Record {
        schema: SCHEMA_VERSION,
        state: State::Creating,
        network: conf.name.clone(),
        node: ctx.node.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        pod: pod_name(env),
        public_key: keypair.public().to_base64(),
        addresses: addresses.clone(),
        endpoint: settings.endpoint,
        listen_port: 0,
        netns: netns_path.to_path_buf(),
        netns_inode: pod.inode(),
        boot_id: ctx.boot_id.clone(),
        host_name,
        backend: settings.backend,
        daemon_pid: None,
        mtu: settings.mtu,
        created_at: host::now_unix(),
    };

    let gateway_record;
    {
        let _ports = ports::lock()?;
        gateway_record = match &gateway_plan {
            Some(plan) => Some(ensure_gateway(ctx, &store, &settings, plan, &mut rollback)?),
            None => None,
        };
        if let Some(gw) = &gateway_record {
            peers.push(gateway::peer_for_pods(gw, conf.persistent_keepalive)?);
            add_default_routes(&mut ipam_result);
        }
        let mut taken = Vec::new();
        let created = loop {
            let port = ports::free_ports(settings.ports, &taken)
                .next()
                .ok_or_else(|| no_free_port(&settings))?;
            record.listen_port = port;
            // Written before the link exists, so a DEL after a crash can prove the link ours.
            store.put(&record)?;
            let spec = LinkSpec {
                temp_name: &temp_name,
                ifname: &env.ifname,
                mtu: settings.mtu,
                listen_port: port,
                keypair: &keypair,
                peers: peers.clone(),
            };
            match backend.create(&spec, &ctx.host, &pod) {
                Ok(created) => break created,
                Err(e) if is_port_taken(&e) && taken.len() + 1 < PORT_ATTEMPTS => {
                    tracing::warn!(port, "port taken meanwhile, trying the next one");
                    taken.push(port);
                }
                Err(e) => {
                    let _ = store.remove(&env.container_id, &env.ifname);
                    return Err(e);
                }
            }
        };
        record.daemon_pid = created.daemon_pid;
    }
    // Reverse order on failure: the link goes first, then its record.
    rollback.push("store record", || {
        store.remove(&env.container_id, &env.ifname)
    });
    let key = keypair.public().clone();
    let (host_name, daemon_pid) = (record.host_name.clone(), record.daemon_pid);
    let (pod_ref, backend_ref, host_ref) = (&pod, &backend, &ctx.host);
    rollback.push("link", move || {
        let link = wireguard::LinkRef {
            host_name: &host_name,
            ifname: &env.ifname,
            pod: Some(pod_ref),
            daemon_pid,
        };
        backend_ref.destroy(&link, &key, host_ref)
    });

    configure_pod_side(&pod, &env.ifname, &ipam_result)?;

    record.state = State::Ready;
    store.put(&record)?;
    let others = store.node_records()?;
    let newcomer = mesh::peer_of(&record, conf.persistent_keepalive)?;
    context::update_local_peers(&others, Some(&record), || Update {
        peers: vec![newcomer.clone()],
        ..Update::default()
    });
    if gateway_record.is_some() {
        let update = Update {
            peers: vec![newcomer.clone()],
            ..Update::default()
        };
        gateway::update(&ctx.host, &store, &update);
    }
    rollback.disarm();

    ipam_result.interfaces = vec![Interface {
        name: env.ifname.clone(),
        // A WireGuard link has no hardware address; podman 4 insists on parsing one, and the
        // loopback plugin reports zeros for `lo` in the same situation.
        mac: Some("00:00:00:00:00:00".to_string()),
        mtu: Some(settings.mtu),
        sandbox: Some(netns_path.display().to_string()),
    }];
    for ip in &mut ipam_result.ips {
        ip.interface = Some(0);
        // The link has no ARP and no next hop: routes are device routes, so no gateway.
        ip.gateway = None;
    }
    for route in &mut ipam_result.routes {
        route.gw = None;
    }
    if let Some(dns) = conf.raw.get("dns") {
        ipam_result.dns = parse_dns(dns);
    }
    Ok(ipam_result.to_json(conf.cni_version))
}

/// `wgc` + 12 hex digits of a hash of the attachment: deterministic, so a DEL after a crash
/// finds the link and daemon by name, and at most 15 bytes.
pub fn temp_link_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wgc{:012x}", hash & 0xffff_ffff_ffff)
}

/// Make sure the node gateway serves this pod's range; if it had to be replaced, the local pods
/// swap its old key for the new one.
fn ensure_gateway<'a>(
    ctx: &'a Context,
    store: &'a crate::store::Store,
    settings: &LinkSettings,
    plan: &gateway::Plan,
    rollback: &mut Rollback<'a>,
) -> Result<crate::store::GatewayRecord> {
    let wanted = gateway::Wanted {
        network: &ctx.conf.name,
        boot_id: &ctx.boot_id,
        settings,
        plan,
        keepalive: ctx.conf.persistent_keepalive,
        masquerade: ctx.conf.ip_masq,
    };
    let ensured = gateway::ensure(&ctx.host, store, &wanted)?;
    if ensured.created {
        rollback.push("node gateway", || {
            gateway::remove_if_unused(&ctx.host, store, &ctx.conf.name)
        });
        let new_peer = gateway::peer_for_pods(&ensured.record, ctx.conf.persistent_keepalive)?;
        let remove_peers: Vec<_> = ensured.replaced_key.into_iter().collect();
        context::update_local_peers(&store.node_records()?, None, || Update {
            peers: vec![new_peer.clone()],
            remove_peers: remove_peers.clone(),
            ..Update::default()
        });
    }
    Ok(ensured.record)
}

/// With the gateway, a pod's default routes go into the tunnel (and from there to its peer).
fn add_default_routes(result: &mut CniResult) {
    let families: Vec<bool> = result.ips.iter().map(|ip| ip.address.is_ipv4()).collect();
    for (v4, default) in [(true, "0.0.0.0/0"), (false, "::/0")] {
        let dst = default.parse().expect("valid");
        if families.contains(&v4) && !result.routes.iter().any(|r| r.dst == dst) {
            result
                .routes
                .push(crate::cni::result::Route { dst, gw: None });
        }
    }
}

/// `K8S_POD_NAMESPACE/K8S_POD_NAME`, or just the name (podman sends only that).
fn pod_name(env: &crate::cni::CniEnv) -> Option<String> {
    let name = env.arg("K8S_POD_NAME")?;
    Some(match env.arg("K8S_POD_NAMESPACE") {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_string(),
    })
}

fn refuse_existing_interface(pod: &Netns, ifname: &str) -> Result<()> {
    let exists = pod.run(|| Ok(Netlink::open()?.link_by_name(ifname)?.is_some()))?;
    if exists {
        return Err(Error::InterfaceExists {
            ifname: ifname.to_string(),
            netns: pod.path().display().to_string(),
        });
    }
    Ok(())
}

/// Inside the pod: addresses, up, then the IPAM routes as device routes.
fn configure_pod_side(pod: &Netns, ifname: &str, result: &CniResult) -> Result<()> {
    pod.run(|| {
        let netlink = Netlink::open()?;
        let link = netlink.link_by_name(ifname)?.ok_or_else(|| {
            Error::netlink(
                format!("link {ifname}"),
                "is missing from the pod namespace",
            )
        })?;
        for ip in &result.ips {
            netlink.add_address(link.index, ip.address)?;
        }
        netlink.set_up(link.index)?;
        for route in &result.routes {
            netlink.add_device_route(link.index, route.dst)?;
        }
        Ok(())
    })
}

fn is_port_taken(error: &Error) -> bool {
    matches!(error, Error::WireGuard { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
}

fn no_free_port(settings: &LinkSettings) -> Error {
    Error::TryAgainLater(format!(
        "no free UDP port left in listenPorts {}: widen the range or delete pods",
        settings.ports
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_short_stable_and_distinct() {
        let a = temp_link_name("abc", "eth0");
        assert_eq!(a, temp_link_name("abc", "eth0"));
        assert_ne!(a, temp_link_name("abc", "eth1"));
        assert_ne!(a, temp_link_name("ab", "ceth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("wgc"));
    }
}
