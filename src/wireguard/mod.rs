//! WireGuard backends behind one trait: the kernel module (rtnetlink + wireguard-control) and
//! Debian's wireguard-go (a daemon per link, configured over its UAPI socket). Either way the
//! link ends up in the pod as `CNI_IFNAME` while its UDP socket stays in the host namespace.

pub mod cgroup;
pub mod genl;
pub mod kernel;
pub mod traffic;
mod tun;
mod uapi;
pub mod userspace;

use std::net::SocketAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use wireguard_control::{Device, Key, PeerInfo};

use crate::cni::Result;
use crate::keys::KeyPair;
use crate::netns::Netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

/// A preshared key: secret, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub Key);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

/// A change to an existing device, stated as data.
#[derive(Debug, Default)]
pub struct Update<'a> {
    pub keypair: Option<&'a KeyPair>,
    pub listen_port: Option<u16>,
    pub replace_peers: bool,
    pub peers: Vec<Peer>,
    pub remove_peers: Vec<Key>,
}

impl Update<'_> {
    /// Nothing to add, change or remove: no message needed. (Key and port changes are not
    /// asked here: callers that set them always send.)
    pub fn changes_no_peer(&self) -> bool {
        self.peers.is_empty() && self.remove_peers.is_empty()
    }
}

/// What ADD asks a backend to build.
pub struct LinkSpec<'a> {
    /// Name in the host namespace while the link is set up (userspace), and the UAPI name.
    pub temp_name: &'a str,
    pub ifname: &'a str,
    pub mtu: u32,
    pub listen_port: u16,
    pub keypair: &'a KeyPair,
    pub peers: Vec<Peer>,
    /// Which daemon a userspace link runs under.
    pub daemon: crate::cni::config::UserspaceDaemon,
}

impl LinkSpec<'_> {
    /// The first configuration of a new link: its key, port and whole peer set.
    pub fn initial_update(&self) -> Update<'_> {
        Update {
            keypair: Some(self.keypair),
            listen_port: Some(self.listen_port),
            replace_peers: true,
            peers: self.peers.clone(),
            remove_peers: Vec::new(),
        }
    }
}

/// What a link's device says about itself. Never the private key: the backends' reads never
/// hold it (kernel: zeroed in the netlink answer before it is parsed, `genl`; userspace: its
/// hex is parsed into a wiped buffer, `uapi`).
#[derive(Debug, Default)]
pub struct DeviceState {
    pub public_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerInfo>,
}

impl From<Device> for DeviceState {
    fn from(device: Device) -> Self {
        DeviceState {
            public_key: device.public_key,
            listen_port: device.listen_port,
            fwmark: device.fwmark.filter(|mark| *mark != 0),
            peers: without_zero_preshared_keys(device.peers),
        }
    }
}

/// The kernel reports a peer without a preshared key as 32 zero bytes: that is no key (the
/// userspace read, `uapi`, has it so too), else every such peer differs from what the store
/// wants, and each reconcile rewrote it.
pub fn without_zero_preshared_keys(mut peers: Vec<PeerInfo>) -> Vec<PeerInfo> {
    for peer in &mut peers {
        if peer
            .config
            .preshared_key
            .as_ref()
            .is_some_and(|k| k.0 == [0; 32])
        {
            peer.config.preshared_key = None;
        }
    }
    peers
}

pub struct Created {
    pub daemon_pid: Option<u32>,
}

/// An existing link, as the store knows it.
pub struct LinkRef<'a> {
    pub host_name: &'a str,
    pub ifname: &'a str,
    /// The pod namespace, when it still exists (and is the one recorded).
    pub pod: Option<&'a Netns>,
    pub daemon_pid: Option<u32>,
}

pub trait Backend {
    /// Create the link inside `pod` as `spec.ifname` with its UDP socket in `host`,
    /// configured (key, port, peers, MTU) but not yet addressed or up.
    /// On failure nothing it made is left behind.
    fn create(&self, spec: &LinkSpec, host: &Netns, pod: &Netns) -> Result<Created>;

    fn apply(&self, link: &LinkRef, update: &Update) -> Result<()>;

    fn read(&self, link: &LinkRef) -> Result<DeviceState>;

    /// Whether the link (and its daemon) is there, without reading its peers: cheap enough
    /// for every ADD. `read` proves more (the key).
    fn is_running(&self, link: &LinkRef) -> bool;

    /// Destroy the link (and its daemon) if, and only if, it carries one of `keys` (a
    /// rotation killed midway leaves the link with either of two): a link we cannot prove is
    /// ours is left alone. Gone already is success.
    fn destroy(&self, link: &LinkRef, keys: &[Key], host: &Netns) -> Result<()>;
}

pub fn backend(kind: BackendKind) -> Box<dyn Backend> {
    match kind {
        BackendKind::Kernel => Box::new(kernel::Kernel),
        BackendKind::Userspace => Box::new(userspace::Userspace),
    }
}

/// Allowed IPs for a pod: its own addresses as host prefixes, so it can claim nothing else.
pub fn host_prefixes(addresses: &[IpNetwork]) -> Vec<IpNetwork> {
    addresses.iter().map(|a| host_prefix(a.ip())).collect()
}

/// `ip/32` or `ip/128`.
pub fn host_prefix(ip: std::net::IpAddr) -> IpNetwork {
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(ip, bits).expect("a full-length prefix is valid")
}

/// wireguard-control's name type (it checks the IFNAMSIZ limit).
fn interface_name(name: &str) -> Result<wireguard_control::InterfaceName> {
    name.parse()
        .map_err(|e| crate::cni::Error::netlink(format!("interface name {name}"), format!("{e:?}")))
}

/// wireguard-control's builder form of an update, without its private key (the kernel backend
/// applies it, and sets the key itself: the builder would keep an unwiped copy).
fn device_update(update: &Update) -> wireguard_control::DeviceUpdate {
    let mut builder = wireguard_control::DeviceUpdate::new();
    if let Some(port) = update.listen_port {
        builder = builder.set_listen_port(port);
    }
    if update.replace_peers {
        builder = builder.replace_peers();
    }
    for peer in &update.peers {
        let mut config =
            wireguard_control::PeerConfigBuilder::new(&peer.public_key).replace_allowed_ips();
        if let Some(endpoint) = peer.endpoint {
            config = config.set_endpoint(endpoint);
        }
        if let Some(seconds) = peer.keepalive {
            config = config.set_persistent_keepalive_interval(seconds);
        }
        if let Some(psk) = &peer.preshared_key {
            config = config.set_preshared_key(psk.0.clone());
        }
        for ip in &peer.allowed_ips {
            config = config.add_allowed_ip(ip.ip(), ip.prefix());
        }
        builder = builder.add_peer(config);
    }
    for key in &update.remove_peers {
        builder = builder.remove_peer_by_key(key);
    }
    builder
}
