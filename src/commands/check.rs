//! CHECK: the live link must still be what ADD made: addresses, routes, MTU, key, port,
//! gateway, peers (against the store, read under the lock), daemon alive; then IPAM CHECK.

use std::collections::{HashMap, HashSet};

use wireguard_control::Key;

use super::context::{self, Context};
use crate::cni::{CniResult, Error, NetConf, Peering, Result, Version};
use crate::gateway;
use crate::link::Netlink;
use crate::mesh;
use crate::netns::Netns;
use crate::reconcile::{self, DirectCandidates, NetworkView, Prune};
use crate::store::{Record, Store};
use crate::wireguard::{self, BackendKind, DeviceState};

pub fn run(ctx: &Context) -> Result<()> {
    let env = ctx.env;
    let conf = ctx.conf;
    super::require_version(conf, Version::V0_4_0, "CHECK")?;
    let prev_value = conf.prev_result.as_ref().ok_or_else(|| {
        Error::config("prevResult", "CHECK needs the result of ADD as prevResult")
    })?;
    let prev = CniResult::parse(prev_value, "prevResult")?;
    let pod = Netns::open_for_env(env.netns.as_deref().expect("CHECK requires CNI_NETNS"))?;

    let store = Store::open_existing(&conf.store, &conf.name, &ctx.node)?
        .ok_or_else(|| Error::Check(format!("network {} has no key store", conf.name)))?;
    let lock = store.lock()?;
    let record = store.get(&env.container_id, &env.ifname)?.ok_or_else(|| {
        Error::Check(format!(
            "no store record for {}/{}: the attachment was never added or was deleted",
            env.container_id, env.ifname
        ))
    })?;
    if record.netns_inode != pod.inode() {
        return Err(Error::Check(format!(
            "{} is not the namespace this attachment was added to",
            pod.path().display()
        )));
    }

    let mut routes: Vec<_> = prev.routes.iter().map(|r| r.dst).collect();
    for dst in super::cluster_routes(conf, &record.addresses) {
        if !routes.contains(&dst) {
            routes.push(dst);
        }
    }
    check_link(
        &pod,
        &env.ifname,
        record.backend,
        record.mtu,
        &prev,
        &routes,
    )?;
    let device = wireguard::backend(record.backend)
        .read(&record.link(Some(&pod)))
        .map_err(|e| Error::Check(format!("cannot read the WireGuard device: {e}")))?;
    check_device(conf, &record, &device)?;

    let mut view = context::network_view(ctx, &store)?;
    view.static_peers = mesh::static_peers(conf, &record.addresses)?;
    check_gateway(ctx, &view)?;
    check_peers(ctx, &view, &record, &device)?;
    drop(lock); // IPAM's own state needs no network lock

    ctx.ipam()?.check(&prev)
}

/// The key and port ADD gave the link, and no fwmark.
fn check_device(conf: &NetConf, record: &Record, device: &DeviceState) -> Result<()> {
    let ifname = &record.ifname;
    let key = device.public_key.as_ref().map(|k| k.to_base64());
    if key.is_some() && key == record.next_public_key {
        return Err(Error::Check(format!(
            "{ifname} carries its next key, but the rotation that gave it did not finish: run `wg-cni rotate` for it again"
        )));
    }
    if key.as_deref() != Some(record.public_key.as_str()) {
        return Err(Error::Check(format!(
            "{ifname}'s public key is not the one recorded at ADD"
        )));
    }
    if device.listen_port != Some(record.listen_port) {
        let range = crate::host::resolve_link_settings(conf)
            .map(|s| s.ports)
            .ok();
        let outside = match (device.listen_port, range) {
            (Some(port), Some(r)) if port < r.first || port > r.last => {
                format!(" (outside listenPorts {r}: the pod moved its host UDP port)")
            }
            _ => String::new(),
        };
        return Err(Error::Check(format!(
            "{ifname} listens on port {:?}, ADD gave it {}{outside}",
            device.listen_port, record.listen_port
        )));
    }
    if let Some(mark) = device.fwmark {
        // Only a pod with CAP_NET_ADMIN can set it: its UDP would then carry a host mark.
        return Err(Error::Check(format!(
            "{ifname} has fwmark {mark:#x}; ADD sets none (the pod changed its link)"
        )));
    }
    Ok(())
}

/// The node gateway the pod's default route leads to is recorded and alive.
fn check_gateway(ctx: &Context, view: &NetworkView) -> Result<()> {
    let conf = ctx.conf;
    if let Some(gateway) = &view.gateway
        && (gateway.boot_id != ctx.boot_id || !gateway::is_live(&ctx.host, gateway))
    {
        return Err(Error::Check(format!(
            "the node gateway {} of network {} is gone: the pod cannot reach the host until the next ADD on this node recreates it",
            gateway.host_name, conf.name
        )));
    }
    if conf.host_gateway && view.gateway.is_none() {
        return Err(Error::Check("the node gateway has no record".into()));
    }
    Ok(())
}

/// The device's peers are the ones the store wants for it. Peers of other nodes are the node
/// agent's to bring (and may lag behind the store): one missing from the device is no failure
/// here, but one present must match its record. "Match" is the reconciler's own rule
/// (`reconcile::diff`): CHECK fails exactly where a reconcile would write, so an endpoint the
/// agent keeps (a peer that roamed and keeps completing handshakes) passes.
fn check_peers(
    ctx: &Context,
    view: &NetworkView,
    record: &Record,
    device: &DeviceState,
) -> Result<()> {
    let remote: HashSet<&str> = view
        .records
        .iter()
        .filter(|r| r.node != ctx.node)
        .map(|r| r.public_key.as_str())
        .chain(view.remote_gateways.iter().map(|g| g.public_key.as_str()))
        .collect();
    let present: HashSet<&Key> = device.peers.iter().map(|p| &p.config.public_key).collect();
    let on_device = |key: &Key| present.contains(key);
    let desired: Vec<_> = view
        .desired_for_pod(record)?
        .into_iter()
        .filter(|p| !remote.contains(p.public_key.to_base64().as_str()) || on_device(&p.public_key))
        .collect();
    let mut update = reconcile::diff(device, &desired, Prune::Everything, &[]);
    if !update.remove_peers.is_empty() && view.peering == Peering::OnDemand {
        // Peers beyond the desired set: on-demand, direct peers of current pods are right.
        let direct = DirectCandidates::of(&ctx.store()?.all_records()?);
        let keep = |peer: &wireguard_control::PeerInfo| direct.accepts(&peer.config);
        update = reconcile::diff(device, &desired, Prune::EverythingBut(&keep), &[]);
    }
    if update.changes_no_peer() {
        return Ok(());
    }
    let (changed, missing): (Vec<_>, Vec<_>) = update
        .peers
        .iter()
        .map(|p| &p.public_key)
        .partition(|key| on_device(key));
    let owners = owners(ctx, view);
    let name = |key: &Key| {
        let owner = owners
            .get(&key.to_base64())
            .map_or("of no current record", String::as_str);
        // What the link holds for it: why it was refused.
        let held = device.peers.iter().find(|p| &p.config.public_key == key);
        let held = held.map_or(String::new(), |p| {
            let allowed: Vec<String> = (p.config.allowed_ips.iter())
                .map(|ip| format!("{}/{}", ip.address, ip.cidr))
                .collect();
            let keepalive = p.config.persistent_keepalive_interval.unwrap_or(0);
            format!("; on the link: allowed IPs {allowed:?}, keepalive {keepalive}")
        });
        format!("{} ({owner}{held})", key.to_base64())
    };
    Err(Error::Check(peer_difference(
        &missing,
        &update.remove_peers,
        &changed,
        &name,
    )))
}

/// Who each key of the network belongs to, for a CHECK error a person can act on.
fn owners(ctx: &Context, view: &NetworkView) -> HashMap<String, String> {
    let mut owners = HashMap::new();
    let records = ctx
        .store()
        .and_then(|s| s.all_records())
        .unwrap_or_default();
    for r in records.iter().chain(&view.records) {
        let pod = r
            .pod
            .as_ref()
            .map_or(String::new(), |p| format!("pod {p}, "));
        let owner = format!(
            "{pod}container {}:{} on {}",
            r.container_id, r.ifname, r.node
        );
        for key in r.keys() {
            owners.insert(key.to_string(), owner.clone());
        }
    }
    for gw in view.gateway.iter().chain(&view.remote_gateways) {
        owners.insert(gw.public_key.clone(), format!("the gateway of {}", gw.node));
    }
    for peer in &view.static_peers {
        owners.insert(peer.public_key.to_base64(), "a static peer".to_string());
    }
    owners
}

fn check_link(
    pod: &Netns,
    ifname: &str,
    backend: BackendKind,
    mtu: u32,
    prev: &CniResult,
    routes: &[ipnetwork::IpNetwork],
) -> Result<()> {
    pod.run(|| {
        let netlink = Netlink::open()?;
        let links = netlink.links()?;
        let link = links
            .iter()
            .find(|l| l.name == ifname)
            .ok_or_else(|| Error::Check(format!("interface {ifname} is missing from the pod")))?;
        let kind = match backend {
            BackendKind::Kernel => "wireguard",
            BackendKind::Userspace => "tun",
        };
        if link.kind.as_deref() != Some(kind) {
            return Err(Error::Check(format!(
                "{ifname} is a {} link, expected {kind}",
                link.kind.as_deref().unwrap_or("plain")
            )));
        }
        let extra: Vec<_> = links
            .iter()
            .filter(|l| l.name != ifname && l.name != "lo")
            .map(|l| l.name.as_str())
            .collect();
        if !extra.is_empty() {
            return Err(Error::Check(format!(
                "the pod has links besides lo and {ifname}: {}",
                extra.join(", ")
            )));
        }
        if !link.up {
            return Err(Error::Check(format!("{ifname} is down")));
        }
        if link.mtu != mtu {
            return Err(Error::Check(format!(
                "{ifname} has MTU {}, ADD set {mtu}",
                link.mtu
            )));
        }
        let addresses = netlink.addresses(link.index)?;
        for ip in &prev.ips {
            if !addresses.contains(&ip.address) {
                return Err(Error::Check(format!(
                    "address {} from prevResult is missing on {ifname}",
                    ip.address
                )));
            }
        }
        let present = netlink.routes()?;
        for dst in routes {
            if !present
                .iter()
                .any(|r| r.dst == *dst && r.oif == Some(link.index))
            {
                let from = match prev.routes.iter().any(|r| r.dst == *dst) {
                    true => "from prevResult",
                    false => "for the clusterRange (no host gateway)",
                };
                return Err(Error::Check(format!(
                    "route {from} to {dst} is missing on {ifname}"
                )));
            }
        }
        Ok(())
    })
}

fn peer_difference(
    missing: &[&Key],
    unexpected: &[Key],
    changed: &[&Key],
    name: &dyn Fn(&Key) -> String,
) -> String {
    let names = |keys: &mut dyn Iterator<Item = &Key>| -> Vec<String> { keys.map(name).collect() };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing peers {:?}",
            names(&mut missing.iter().copied())
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "unexpected peers {:?}",
            names(&mut unexpected.iter())
        ));
    }
    if !changed.is_empty() {
        parts.push(format!(
            "peers with changed allowed IPs, endpoint, keepalive or preshared key {:?}",
            names(&mut changed.iter().copied())
        ));
    }
    format!(
        "WireGuard peers differ from the key store: {}",
        parts.join("; ")
    )
}
