//! ADD: validate → key pair → IPAM (the network's first pod builds the node gateway meanwhile)
//! → port → link in the pod, with the peers the network has now → addresses, routes, up →
//! under the network lock: gateway, the peers added or gone meanwhile, record ready, the
//! newcomer announced to the gateway and the other local links → result. Only the join is
//! serialised: concurrent ADDs build their links side by side.
//! Any failure after IPAM undoes every completed step (one rollback guard; a failure while
//! joining is undone before the lock is let go, so no other command sees a half-joined pod).

use std::os::fd::BorrowedFd;
use std::sync::mpsc;

use serde_json::Value;

use super::context::Context;
use super::join::{self, Joining};
use super::rollback::Rollback;
use super::teardown;
use crate::cni::result::{Interface, parse_dns};
use crate::cni::{CniResult, Error, NetConf, Peering, Result};
use crate::gateway;
use crate::host::{self, LinkSettings};
use crate::ipam::Ipam;
use crate::keys::KeyPair;
use crate::link::Netlink;
use crate::mesh;
use crate::netns::Netns;
use crate::ports;
use crate::reconcile::NetworkView;
use crate::store::{GatewayRecord, Record, SCHEMA_VERSION, State, Store};
use crate::wireguard::{self, LinkSpec};

/// How many taken ports ADD skips before giving up (another process may grab one between our
/// check and the daemon's bind).
const PORT_ATTEMPTS: usize = 5;

pub fn run(ctx: &Context) -> Result<Value> {
    let (env, conf) = (ctx.env, ctx.conf);
    let netns_path = env.netns.as_deref().expect("ADD requires CNI_NETNS");
    let pod = Netns::open_for_env(netns_path)?;
    let mut settings = host::resolve_link_settings(conf)?;
    refuse_existing_interface(&pod, &env.ifname)?;
    let ipam = ctx.ipam()?;

    let store = ctx.store()?;
    settings.agree_mtu(conf, &store);
    let _adding = store.adding()?;
    let earlier_boots = teardown::clear_leftovers(ctx, &store, &ipam)?;

    let backend = wireguard::backend(settings.backend);
    let keypair = KeyPair::generate();
    let attachment = store
        .attachment_lock(&env.container_id, &env.ifname)?
        .ok_or_else(|| Error::Io {
            context: "locking the attachment".into(),
            source: std::io::Error::other("this node's store directory vanished"),
        })?;
    let mut rollback = Rollback::new();
    if conf.host_gateway {
        undo_gateway(ctx, &store, &mut rollback); // last: once nothing uses it
    }
    let link = NewLink {
        ctx,
        store: &store,
        pod: &pod,
        settings: &settings,
        backend: &*backend,
        keypair: &keypair,
    };
    let (built, early_gateway) = link.build_beside_gateway(&ipam, attachment.fd(), &mut rollback);
    let gateway_created = matches!(early_gateway, Some(Ok((_, true))));
    if let Ok(built) = &built {
        undo_link(&mut rollback, &link, &built.record);
    }
    let prepared = built.and_then(|mut built| {
        early_gateway.transpose()?;
        if built.gateway_plan.is_some() {
            add_default_routes(&mut built.ipam_result);
        }
        add_cluster_routes(conf, &mut built.ipam_result);
        configure_pod_side(&pod, &env.ifname, &mut built.ipam_result)?;
        built.record.state = State::Joining;
        store.put(&built.record)?;
        Ok(built)
    });
    let mut built = match prepared {
        Ok(built) => built,
        Err(e) => return Err(undo_under_lock(&store, rollback, e)),
    };

    let lock = store.lock()?;
    let joining = Joining {
        ctx,
        store: &store,
        settings: &settings,
        gateway_plan: built.gateway_plan.as_ref(),
        built_with: &built.peers,
        static_peers: built.static_peers,
        gateway_created,
    };
    if let Err(e) = joining.join(&pod, &mut built.record) {
        drop(rollback); // undone while the lock still hides the pod from everyone else
        drop(lock);
        return Err(e);
    }
    drop(lock);
    rollback.disarm();
    drop(attachment);
    earlier_boots.note(ctx, &store);
    Ok(result_for(ctx, &settings, built.ipam_result))
}

/// The undo of a built link (registered once it exists): the link goes first, then its
/// record and its port (steps run in reverse).
fn undo_link<'a>(rollback: &mut Rollback<'a>, link: &NewLink<'a>, record: &Record) {
    let (ctx, store, pod, backend) = (link.ctx, link.store, link.pod, link.backend);
    let (container_id, ifname) = (&ctx.env.container_id, &ctx.env.ifname);
    rollback.push("store record", move || {
        ports::release(&store.pod_link_name(container_id, ifname));
        store.remove(container_id, ifname)
    });
    let key = link.keypair.public().clone();
    let (host_name, daemon_pid) = (record.host_name.clone(), record.daemon_pid);
    rollback.push("link", move || {
        let link = wireguard::LinkRef {
            host_name: &host_name,
            ifname,
            pod: Some(pod),
            daemon_pid,
        };
        backend.destroy(&link, &[key], &ctx.host)
    });
}

/// The undo of the node gateway, which this ADD may create (beside its link, or in the join
/// when it vanished meanwhile): removed again when no attachment uses it, whoever made it (run
/// under the network lock, like every undo that may touch the gateway).
fn undo_gateway<'a>(ctx: &'a Context, store: &'a Store, rollback: &mut Rollback<'a>) {
    rollback.push("node gateway", || {
        gateway::remove_if_unused(&ctx.host, store)
    });
}

/// Undo what this ADD did so far, under the network lock: a gateway it made must not be
/// judged unused while another ADD joins.
fn undo_under_lock(store: &Store, rollback: Rollback, error: Error) -> Error {
    let _lock = store.lock();
    drop(rollback);
    error
}

/// The result as the runtime expects it: one interface in the sandbox, device routes.
fn result_for(ctx: &Context, settings: &LinkSettings, mut result: CniResult) -> Value {
    let env = ctx.env;
    result.interfaces = vec![Interface {
        name: env.ifname.clone(),
        // A WireGuard link has no hardware address; podman 4 insists on parsing one, and the
        // loopback plugin reports zeros for `lo` in the same situation.
        mac: Some("00:00:00:00:00:00".to_string()),
        mtu: Some(settings.mtu),
        sandbox: env.netns.as_deref().map(|p| p.display().to_string()),
    }];
    for ip in &mut result.ips {
        ip.interface = Some(0);
        // The link has no ARP and no next hop: routes are device routes, so no gateway.
        ip.gateway = None;
    }
    for route in &mut result.routes {
        route.gw = None;
    }
    if let Some(dns) = ctx.conf.raw.get("dns") {
        result.dns = parse_dns(dns);
    }
    result.to_json(ctx.conf.cni_version)
}

/// IPAM must have given addresses, and an IPv6 address needs an MTU of at least 1280.
fn check_addresses(conf: &NetConf, settings: &LinkSettings, result: &CniResult) -> Result<()> {
    if result.ips.is_empty() {
        return Err(Error::config(
            "ipam",
            format!("{} returned no addresses", conf.ipam_type),
        ));
    }
    if settings.mtu < 1280 && result.ips.iter().any(|ip| ip.address.is_ipv6()) {
        return Err(Error::config(
            "mtu",
            format!(
                "{} is below 1280, the IPv6 minimum, and the range gives IPv6 addresses",
                settings.mtu
            ),
        ));
    }
    Ok(())
}

fn new_record(
    ctx: &Context,
    store: &Store,
    pod: &Netns,
    settings: &LinkSettings,
    keypair: &KeyPair,
    addresses: Vec<ipnetwork::IpNetwork>,
) -> Record {
    let env = ctx.env;
    Record {
        schema: SCHEMA_VERSION,
        state: State::Creating,
        network: ctx.conf.name.clone(),
        node: ctx.node.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        pod: pod_name(env),
        public_key: keypair.public().to_base64(),
        next_public_key: None,
        previous_public_key: None,
        key_created_at: None,
        addresses,
        endpoint: settings.endpoint,
        listen_port: 0,
        netns: env.netns.clone().unwrap_or_default(),
        netns_inode: pod.inode(),
        boot_id: ctx.boot_id.clone(),
        // The name the link is created under (either backend), renamed in the pod.
        host_name: store.pod_link_name(&env.container_id, &env.ifname),
        backend: settings.backend,
        daemon_pid: None,
        mtu: settings.mtu,
        created_at: host::now_unix(),
    }
}

/// The gateway ADD made (or found) beside its link, and whether it made it.
type EnsuredGateway = Result<(GatewayRecord, bool)>;

/// A pod link about to be built, with everything building it needs.
struct NewLink<'a> {
    ctx: &'a Context<'a>,
    store: &'a Store,
    pod: &'a Netns,
    settings: &'a LinkSettings,
    backend: &'a dyn wireguard::Backend,
    keypair: &'a KeyPair,
}

/// What ADD built before it joins the network.
struct Built {
    ipam_result: CniResult,
    record: Record,
    /// The peers the link was created with (the network as read before the lock).
    peers: Vec<wireguard::Peer>,
    static_peers: Vec<wireguard::Peer>,
    gateway_plan: Option<gateway::Plan>,
}

impl<'a> NewLink<'a> {
    /// `build`, and meanwhile the node gateway when the network has none running yet (its
    /// first pod), on a second thread that holds the network lock (the link needs none), so
    /// the waits overlap. The gateway starts beside IPAM when host-local's config foretells
    /// the plan, else as soon as IPAM answers. Answers both outcomes.
    fn build_beside_gateway(
        &self,
        ipam: &'a Ipam,
        held: BorrowedFd,
        rollback: &mut Rollback<'a>,
    ) -> (Result<Built>, Option<EnsuredGateway>) {
        let (ctx, store, settings) = (self.ctx, self.store, self.settings);
        let wanted =
            ctx.conf.host_gateway && !gateway::is_running_for_boot(&ctx.host, store, &ctx.boot_id);
        let foretold = wanted.then(|| gateway::expected_plan(ctx.conf)).flatten();
        std::thread::scope(|scope| {
            let (tell_plan, plan) = mpsc::channel();
            let gateway = wanted.then(|| {
                scope.spawn(move || {
                    // No plan comes when IPAM failed: there is nothing to serve.
                    let plan = foretold.or_else(|| plan.recv().ok())?;
                    let ensured = store
                        .lock()
                        .and_then(|_lock| join::ensure_gateway(ctx, store, settings, &plan));
                    Some(ensured)
                })
            });
            let built = self.build(ipam, held, rollback, &tell_plan);
            drop(tell_plan);
            let gateway =
                gateway.and_then(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (built, gateway)
        })
    }

    /// IPAM's addresses (the gateway's plan sent on as soon as they came), the record, and
    /// the link, created with the peers the network has now.
    fn build(
        &self,
        ipam: &'a Ipam,
        held: BorrowedFd,
        rollback: &mut Rollback<'a>,
        tell_plan: &mpsc::Sender<gateway::Plan>,
    ) -> Result<Built> {
        let (ctx, conf, store) = (self.ctx, self.ctx.conf, self.store);
        let ipam_result = ipam.add(held)?;
        rollback.push("IPAM reservation", || ipam.del(&ipam.target_of_env(), None));
        check_addresses(conf, self.settings, &ipam_result)?;
        let gateway_plan = match conf.host_gateway {
            true => Some(gateway::plan(&ipam_result, &conf.cluster_range)?),
            false => None,
        };
        if let Some(plan) = &gateway_plan {
            let _ = tell_plan.send(plan.clone()); // unheard when the plan was foretold
        }
        let addresses = ipam_result.ips.iter().map(|ip| ip.address).collect();
        let mut record = new_record(ctx, store, self.pod, self.settings, self.keypair, addresses);
        let mut view = NetworkView::read_for_new_link(store, conf)?;
        view.static_peers = mesh::static_peers(conf, &record.addresses)?;
        check_static_peers_leave_nodes_to_the_relay(conf, &view)?;
        let peers = view.desired_for_pod(&record)?;
        record.daemon_pid = self.create(&mut record, &peers)?;
        Ok(Built {
            ipam_result,
            record,
            peers,
            static_peers: view.static_peers,
            gateway_plan,
        })
    }

    /// Take a port from the node's ledger, write the `creating` record (so a DEL after a
    /// crash can prove the link ours), create the link; a port taken meanwhile is skipped.
    /// Returns the daemon's pid (userspace). The ledger knows the port by the link's scoped
    /// temporary name, whichever the backend; its lock is held only while choosing.
    fn create(&self, record: &mut Record, peers: &[wireguard::Peer]) -> Result<Option<u32>> {
        let (env, settings) = (self.ctx.env, self.settings);
        let temp_name = self.store.pod_link_name(&env.container_id, &env.ifname);
        let mut taken = Vec::new();
        loop {
            let port = ports::lock()?
                .allocate(settings.ports, &temp_name, &taken)?
                .ok_or_else(|| no_free_port(settings))?;
            record.listen_port = port;
            self.store.put(record)?;
            let spec = LinkSpec {
                temp_name: &temp_name,
                ifname: &env.ifname,
                mtu: settings.mtu,
                listen_port: port,
                keypair: self.keypair,
                peers: peers.to_vec(),
                daemon: settings.userspace_daemon,
            };
            match self.backend.create(&spec, &self.ctx.host, self.pod) {
                Ok(created) => {
                    let peers = peers.len();
                    tracing::debug!(port, peers, link = %temp_name, "link built in the pod");
                    return Ok(created.daemon_pid);
                }
                Err(e) if is_port_taken(&e) && taken.len() + 1 < PORT_ATTEMPTS => {
                    tracing::warn!(port, "port taken meanwhile, trying the next one");
                    taken.push(port);
                }
                Err(e) => {
                    ports::release(&temp_name);
                    let _ = self.store.remove(&env.container_id, &env.ifname);
                    return Err(e);
                }
            }
        }
    }
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

/// Without a node gateway: device routes to the cluster's other pods (`cluster_routes`).
fn add_cluster_routes(conf: &NetConf, result: &mut CniResult) {
    let addresses: Vec<_> = result.ips.iter().map(|ip| ip.address).collect();
    for dst in super::cluster_routes(conf, &addresses) {
        if !result.routes.iter().any(|r| r.dst == dst) {
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

/// Inside the pod: addresses, up, then the routes as device routes. A route another link
/// already holds (this network is a secondary one and the primary has the default route) is
/// left to it and dropped from the result.
fn configure_pod_side(pod: &Netns, ifname: &str, result: &mut CniResult) -> Result<()> {
    let taken = pod.run(|| {
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
        let mut taken = Vec::new();
        for route in &result.routes {
            if !netlink.add_device_route(link.index, route.dst)? {
                taken.push(route.dst);
            }
        }
        Ok(taken)
    })?;
    for dst in &taken {
        tracing::warn!(%dst, "another interface of the pod has a route there: left to it");
    }
    result.routes.retain(|r| !taken.contains(&r.dst));
    Ok(())
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

/// On-demand, node addresses are the gateways' (the relay carries them): a static peer whose
/// allowed IPs hold another node's address would take that node's traffic.
fn check_static_peers_leave_nodes_to_the_relay(conf: &NetConf, view: &NetworkView) -> Result<()> {
    if conf.peering != Peering::OnDemand {
        return Ok(());
    }
    for (i, peer) in conf.static_peers.iter().enumerate() {
        for (node, remote) in &view.remote_nodes {
            let taken = remote
                .endpoints
                .iter()
                .find(|ip| peer.allowed_ips.iter().any(|net| net.contains(**ip)));
            if let Some(ip) = taken {
                return Err(Error::config(
                    format!("peers[{i}].allowedIPs"),
                    format!(
                        "holds node {node}'s address {ip}: with \"peering\": \"on-demand\" node addresses go through the node gateways"
                    ),
                ));
            }
        }
    }
    Ok(())
}
