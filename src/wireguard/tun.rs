//! A TUN device made right inside a pod's namespace, for wg-cni-wgd to adopt (`WG_TUN_FD`).
//! Creating it where it will live spares the move into the pod, which costs the kernel an
//! RCU grace period (15-25 ms here, most of a userspace ADD). The device carries virtio-net
//! headers (the daemon turns on TSO/USO offloads), is named as the pod sees it, has its MTU,
//! and is down until the pod side is configured.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use crate::cni::{Error, Result};
use crate::netns::Netns;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags` or `ifr_mtu` (both at the start of the union).
    value: libc::c_int,
    _pad: [u8; 20],
}

impl IfReq {
    fn named(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            value: 0,
            _pad: [0; 20],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// Create TUN `ifname` with `mtu` inside `pod`; the answer is its only descriptor (the device
/// goes away when every copy is closed).
pub fn create_in(pod: &Netns, ifname: &str, mtu: u32) -> Result<OwnedFd> {
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        Error::netlink(format!("{what} TUN {ifname} in the pod"), e)
    };
    pod.run(|| {
        // SAFETY: open(2) with a constant path; the descriptor is owned right away.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(fail("opening /dev/net/tun for"));
        }
        // SAFETY: just opened, owned by nothing else.
        let tun = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::named(ifname);
        req.value = libc::c_int::from(IFF_TUN | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes an ifreq that outlives the call.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(fail("creating"));
        }
        set_mtu(ifname, mtu).map_err(|e| Error::netlink(format!("MTU of {ifname}"), e))?;
        Ok(tun)
    })
}

/// SIOCSIFMTU through a datagram socket of the current namespace.
fn set_mtu(ifname: &str, mtu: u32) -> std::io::Result<()> {
    // SAFETY: socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq::named(ifname);
    req.value = libc::c_int::try_from(mtu).map_err(std::io::Error::other)?;
    // SAFETY: SIOCSIFMTU reads an ifreq that outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
