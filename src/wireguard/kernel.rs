//! Kernel WireGuard. The link is created straight into the pod by a netlink socket of the
//! host namespace, so the kernel opens its UDP socket in the host namespace: no move. It is
//! created under its temporary name and renamed inside the pod: the kernel looks a new link's
//! name up in the *caller's* namespace first, so creating `eth0` from a host that has an
//! `eth0` (most nodes) fails with "File exists". Port and peers are set with wireguard-control,
//! the private key over our own generic netlink request (`genl`), from a thread inside the pod
//! namespace, and only once the link exists there (wireguard-control's `apply` would otherwise
//! create a fresh, empty link in whatever namespace the calling thread is in).

use netlink_packet_wireguard::nlas::WgDeviceAttrs;
use wireguard_control::{Backend as WgBackend, Device, DeviceUpdate, InterfaceName, Key};

use super::{
    Backend, Created, DeviceState, LinkRef, LinkSpec, Update, device_update, interface_name,
};
use crate::cni::{Error, Result};
use crate::link::Netlink;
use crate::netns::Netns;

pub struct Kernel;

/// Runs `f` inside the pod namespace after checking the link there is a WireGuard link.
fn in_pod<T: Send>(
    link: &LinkRef,
    f: impl FnOnce(&InterfaceName) -> Result<T> + Send,
) -> Result<T> {
    let pod = link.pod.ok_or_else(|| {
        Error::netlink(
            format!("link {}", link.ifname),
            "its pod network namespace is gone",
        )
    })?;
    let name = interface_name(link.ifname)?;
    pod.run(|| {
        let found = Netlink::open()?.link_by_name(link.ifname)?;
        match found {
            Some(l) if l.kind.as_deref() == Some("wireguard") => f(&name),
            Some(_) => Err(Error::netlink(
                format!("link {}", link.ifname),
                "is not a WireGuard link",
            )),
            None => Err(Error::netlink(
                format!("link {}", link.ifname),
                "does not exist in the pod namespace",
            )),
        }
    })
}

/// Apply `update` to the link `name` of the calling thread's namespace: port and peers through
/// wireguard-control, then the private key, if any, through `genl` (which keeps no copy of
/// it). Peers first: a rotation's dropped direct peers are gone before the key changes, so
/// their traffic takes the gateway, which still knows the old key, and never the new key
/// toward a pod that does not know it yet.
fn configure_here(name: &InterfaceName, update: &Update) -> Result<()> {
    let failed = |e| Error::wireguard(format!("configuring WireGuard link {name}"), e);
    device_update(update)
        .apply(name, WgBackend::Kernel)
        .map_err(failed)?;
    if let Some(keypair) = update.keypair {
        super::genl::set_private_key(&name.to_string(), keypair.secret_bytes()).map_err(failed)?;
    }
    Ok(())
}

impl Backend for Kernel {
    fn create(&self, spec: &LinkSpec, host: &Netns, pod: &Netns) -> Result<Created> {
        let _ = host; // created from this thread, which is in the host namespace
        Netlink::open()?.create_wireguard_in(spec.temp_name, pod.raw_fd(), spec.mtu)?;
        crate::failpoint::crash("after-link-created");
        // One visit to the pod: the final name, then key, port and peers.
        let update = spec.initial_update();
        let configured = pod.run(|| {
            rename_here(&Netlink::open()?, spec.temp_name, spec.ifname)?;
            configure_here(&interface_name(spec.ifname)?, &update)
        });
        if let Err(e) = configured {
            let _ = pod.run(|| {
                let netlink = Netlink::open()?;
                for name in [spec.ifname, spec.temp_name] {
                    if let Some(l) = netlink.link_by_name(name)?
                        && l.kind.as_deref() == Some("wireguard")
                    {
                        netlink.delete(l.index)?;
                    }
                }
                Ok(())
            });
            return Err(e);
        }
        Ok(Created { daemon_pid: None })
    }

    fn apply(&self, link: &LinkRef, update: &Update) -> Result<()> {
        in_pod(link, |name| configure_here(name, update))
    }

    fn read(&self, link: &LinkRef) -> Result<DeviceState> {
        in_pod(link, |_| {
            read_here(link.ifname)
                .map_err(|e| Error::wireguard(format!("reading WireGuard link {}", link.ifname), e))
        })
    }

    fn is_running(&self, link: &LinkRef) -> bool {
        let Some(netns) = link.pod else {
            return false;
        };
        netns
            .run(|| Netlink::open()?.link_by_name(link.ifname))
            .is_ok_and(|found| found.is_some_and(|l| l.kind.as_deref() == Some("wireguard")))
    }

    fn destroy(&self, link: &LinkRef, keys: &[Key], _host: &Netns) -> Result<()> {
        let Some(pod) = link.pod else {
            // The namespace is gone, and a kernel link dies with it.
            return Ok(());
        };
        pod.run(|| {
            let netlink = Netlink::open()?;
            // Its final name, or still the temporary one (an ADD killed before the rename).
            let found = match netlink.link_by_name(link.ifname)? {
                Some(found) => Some((found, link.ifname)),
                None => netlink
                    .link_by_name(link.host_name)?
                    .map(|found| (found, link.host_name)),
            };
            let Some((found, name)) = found else {
                return Ok(());
            };
            if found.kind.as_deref() != Some("wireguard") {
                tracing::warn!(ifname = link.ifname, "not a WireGuard link: left alone");
                return Ok(());
            }
            // The record (written before the link) names it ours; only a *different* key
            // proves otherwise. No key yet is an ADD killed between creating and keying it.
            let device = read_here(name);
            match device {
                Ok(d) if d.public_key.as_ref().is_none_or(|k| keys.contains(k)) => {
                    remove_peers_first(&interface_name(name)?, &d);
                    netlink.delete(found.index)
                }
                _ => {
                    tracing::warn!(ifname = link.ifname, "link has another key: left alone");
                    Ok(())
                }
            }
        })
    }
}

/// Peers removed per netlink message before a link is deleted: each message holds the RTNL
/// lock while the kernel frees its peers, so other links' changes interleave between them.
const PEERS_PER_REMOVAL: usize = 16;

/// Drop a link's peers before the link goes. Freed inside a netlink set, under the RTNL lock,
/// a peer costs an expedited RCU grace period; freed by the link's destructor (which runs
/// without that lock) it costs a normal one, and those made the kernel's deletion the
/// longest part of a DEL (in the TCG guest: 130-160 ms for a pod link with two peers, 50-75 ms
/// for a link without peers). Best effort: the deletion removes whatever is left.
fn remove_peers_first(name: &InterfaceName, device: &DeviceState) {
    for chunk in device.peers.chunks(PEERS_PER_REMOVAL) {
        let update = chunk.iter().fold(DeviceUpdate::new(), |update, peer| {
            update.remove_peer_by_key(&peer.config.public_key)
        });
        if update.apply(name, WgBackend::Kernel).is_err() {
            return;
        }
    }
}

/// The WireGuard link `ifname` of the calling thread's namespace, read without its private
/// key ever being held (`genl`): the kernel's answer carries it, zeroed before it is parsed,
/// and its attribute is dropped here.
pub fn read_here(ifname: &str) -> std::io::Result<DeviceState> {
    let mut attributes = super::genl::device_attributes(ifname)?;
    attributes.retain(|a| !matches!(a, WgDeviceAttrs::PrivateKey(_)));
    Device::try_from(&attributes[..]).map(DeviceState::from)
}

/// Rename the (down) link `from` to `to` in the namespace `netlink` talks to; the same name
/// is nothing to do.
fn rename_here(netlink: &Netlink, from: &str, to: &str) -> Result<()> {
    if from == to {
        return Ok(());
    }
    let link = netlink
        .link_by_name(from)?
        .ok_or_else(|| Error::netlink(format!("link {from}"), "vanished from the pod namespace"))?;
    netlink.rename(link.index, to)
}

/// Whether the running kernel can create WireGuard links (for `backend: auto` and STATUS).
/// Loaded or built in (`/sys/module/wireguard`, `modules.builtin`) answers without touching
/// anything; only a module that exists but is not loaded yet is probed with a link, which
/// loads it, so the next call finds it in /sys/module. No module at all: no probe.
pub fn available() -> bool {
    if std::path::Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules = std::path::Path::new("/lib/modules").join(release);
    let lists = |name: &str| {
        std::fs::read_to_string(modules.join(name))
            .map(|text| text.lines().any(|l| l.contains("/wireguard.ko")))
    };
    match (lists("modules.builtin"), lists("modules.dep")) {
        (Ok(true), _) => true,
        (Ok(false), Ok(false)) => false,
        // A loadable module, or no module lists to go by: creating a link tells.
        _ => {
            let probe = format!("wgcprobe{}", std::process::id() % 100_000);
            Netlink::open().is_ok_and(|n| n.can_create_wireguard(&probe))
        }
    }
}
