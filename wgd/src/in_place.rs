//! Peer changes applied to the live peers, as the kernel and wireguard-go apply them.
//!
//! gotatun's own `set` handler removes a named peer and adds a new one built from the old
//! one's settings: the session keys, the handshake state and the transfer counters go with
//! it, so every rewrite of an existing peer (wg-cni rewrites peers whole: each resync, each
//! handshake kick) costs a new handshake and the packets queued meanwhile. Here a `set` that
//! only adds, changes or removes peers is applied in place instead. Requests that touch the
//! device itself (private key, port, fwmark, `replace_peers`) still go to gotatun's handler:
//! a new key voids every session anyway.
//!
//! Like the kernel (`wg_set_peer`) and wireguard-go, turning a peer's persistent keepalive on
//! sends at once rather than at the first interval: wg-cni relies on that to start the
//! handshake toward a new remote pod before the pod's first packet would.

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use gotatun::device::uapi::command::{Set, SetPeer, SetUnset};
use gotatun::device::{Device, DeviceTransports, Peer};
use gotatun::x25519::PublicKey;

/// How long a handshake started by turning keepalive on is waited for (REKEY_TIMEOUT plus
/// its jitter: gotatun retries on its own after that).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(6);

/// A `set` that changes peers only.
pub fn applies(set: &Set) -> bool {
    set.private_key.is_none()
        && set.listen_port.is_none()
        && set.fwmark.is_none()
        && !set.replace_peers
}

/// Apply the peers of `set` (see `applies`) to the live device; answers the UAPI errno.
pub async fn apply<T: DeviceTransports>(set: Set, device: &Weak<Device<T>>) -> i32 {
    if let Err(errno) = validate(&set) {
        return errno;
    }
    let Some(device) = device.upgrade() else {
        return libc::ENODEV;
    };
    let written = device
        .write(async |device| {
            let mut starting = Vec::new();
            for peer in set.peers {
                if let Some(key) = apply_peer(device, peer).await {
                    starting.push(key);
                }
            }
            starting
        })
        .await;
    let Ok(starting) = written else {
        return libc::EIO;
    };
    for key in starting {
        let device = std::sync::Arc::downgrade(&device);
        tokio::spawn(async move {
            let Some(device) = device.upgrade() else {
                return;
            };
            // Returns at once when a session is live; otherwise sends an initiation now.
            let _ = tokio::time::timeout(HANDSHAKE_WAIT, device.force_handshake(&key)).await;
        });
    }
    0
}

/// One peer of the request; answers its key when its keepalive was turned on.
async fn apply_peer<T: DeviceTransports>(
    device: &mut gotatun::device::configure::DeviceWrite<'_, T>,
    set: SetPeer,
) -> Option<PublicKey> {
    let key = PublicKey::from(set.peer.public_key.0);
    if set.remove {
        device.remove_peer(&key).await;
        return None;
    }
    let keepalive = set.peer.persistent_keepalive_interval;
    let turns_keepalive_on = keepalive.is_some_and(|seconds| seconds > 0);
    let psk = set.peer.preshared_key.map(|psk| match psk {
        SetUnset::Set(psk) => Some(psk.0),
        SetUnset::Unset => None,
    });
    let endpoint = set.peer.endpoint;
    let allowed_ips = set.peer.allowed_ip;
    let replace_allowed_ips = set.replace_allowed_ips;
    let exists = device
        .modify_peer(&key, |peer| {
            if replace_allowed_ips {
                peer.clear_allowed_ips();
            }
            peer.add_allowed_ips(allowed_ips.iter().copied());
            if let Some(endpoint) = endpoint {
                peer.set_endpoint(Some(endpoint));
            }
            if let Some(seconds) = keepalive {
                peer.set_keepalive(Some(seconds).filter(|s| *s > 0));
            }
            if let Some(psk) = psk {
                peer.set_preshared_key(psk);
            }
        })
        .await;
    if !exists {
        if set.update_only {
            return None;
        }
        let mut peer = Peer::new(key);
        peer.endpoint = endpoint;
        peer.allowed_ips = allowed_ips;
        peer.keepalive = keepalive.filter(|s| *s > 0);
        peer.preshared_key = psk.flatten();
        device.add_peer(peer);
    }
    // A peer whose keepalive was on already is sending anyway; starting a handshake where a
    // session is live does nothing, so "turned on" needs no read of the old value.
    turns_keepalive_on.then_some(key)
}

/// What gotatun's handler checks first: protocol version 1, no key named twice.
fn validate(set: &Set) -> Result<(), i32> {
    if set.protocol_version.as_deref().is_some_and(|v| v != "1") {
        return Err(libc::EINVAL);
    }
    let mut keys = HashSet::with_capacity(set.peers.len());
    if set.peers.iter().any(|p| !keys.insert(p.peer.public_key.0)) {
        return Err(libc::EINVAL);
    }
    Ok(())
}
