//! Who peers with whom, as data: every ready attachment of a network is a peer of every other
//! one, with its own addresses as host prefixes and its node address and port as endpoint.

use wireguard_control::Key;

use ipnetwork::IpNetwork;

use crate::cni::{Error, NetConf, Result};
use crate::store::{Record, State};
use crate::wireguard::{Peer, PresharedKey, host_prefixes};

pub fn public_key(record: &Record) -> Result<Key> {
    Key::from_base64(&record.public_key).map_err(|_| {
        Error::decode(
            format!("store record of {}/{}", record.container_id, record.ifname),
            "\"publicKey\" is not a base64 WireGuard key",
        )
    })
}

/// Every key of `record` (`Record::keys`: the current one, and a rotation's next or previous
/// one), each checked like the first: one that is not a WireGuard key makes the record's keys
/// unreadable, so nothing is proven by it.
pub fn keys(record: &Record) -> Result<Vec<Key>> {
    record
        .keys()
        .map(|text| {
            Key::from_base64(text).map_err(|_| {
                Error::decode(
                    format!("store record of {}/{}", record.container_id, record.ifname),
                    "a key (\"publicKey\", \"nextPublicKey\" or \"previousPublicKey\") is not a base64 WireGuard key",
                )
            })
        })
        .collect()
}

/// The peer other local links hold for `record`'s next key while a rotation is under way:
/// key and endpoint, no addresses (the pod's addresses stay with its current key until the
/// switch), so the pod's first handshake under the new key is answered at once. `None`
/// without a (readable, distinct) next key.
pub fn next_peer_of(record: &Record, keepalive: Option<u16>) -> Option<Peer> {
    let next = Key::from_base64(record.next_public_key.as_deref()?).ok()?;
    (next.to_base64() != record.public_key).then(|| Peer {
        public_key: next,
        endpoint: Some(record.endpoint_addr()),
        allowed_ips: Vec::new(),
        keepalive,
        preshared_key: None,
    })
}

pub fn peer_of(record: &Record, keepalive: Option<u16>) -> Result<Peer> {
    Ok(Peer {
        public_key: public_key(record)?,
        endpoint: Some(record.endpoint_addr()),
        allowed_ips: host_prefixes(&record.addresses),
        keepalive,
        preshared_key: None,
    })
}

/// The peers a link of attachment (`container_id`, `ifname`) should have: every other ready
/// attachment of the network. Records with a bad key are skipped with a warning.
pub fn peers_of(
    records: &[Record],
    container_id: &str,
    ifname: &str,
    keepalive: Option<u16>,
) -> Vec<Peer> {
    records
        .iter()
        .filter(|r| r.state == State::Ready && !r.is_attachment(container_id, ifname))
        .filter_map(|r| match peer_of(r, keepalive) {
            Ok(peer) => Some(peer),
            Err(e) => {
                tracing::warn!(error = %e, "skipping peer");
                None
            }
        })
        .collect()
}

/// The config's static peers as WireGuard peers, after checking that none claims pod
/// addresses or the gateway's default route (WireGuard would silently give an address to the
/// last peer that claims it). Preshared keys are read from their files here.
pub fn static_peers(conf: &NetConf, pod_addresses: &[IpNetwork]) -> Result<Vec<Peer>> {
    let pod_ranges: Vec<IpNetwork> = pod_addresses
        .iter()
        .map(|a| IpNetwork::new(a.network(), a.prefix()).expect("valid"))
        .collect();
    conf.static_peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            for ip in &peer.allowed_ips {
                if conf.host_gateway && ip.prefix() == 0 {
                    return Err(Error::config(
                        format!("peers[{i}].allowedIPs"),
                        format!("{ip} overlaps the node gateway's default route; set \"hostGateway\": false to route everything to this peer"),
                    ));
                }
                if let Some(range) = pod_ranges.iter().find(|r| overlaps(r, ip)) {
                    return Err(Error::config(
                        format!("peers[{i}].allowedIPs"),
                        format!("{ip} overlaps the pod range {range}"),
                    ));
                }
            }
            let preshared_key = peer
                .preshared_key_file
                .as_ref()
                .map(|path| read_preshared_key(i, path))
                .transpose()?;
            Ok(Peer {
                public_key: Key::from_base64(&peer.public_key).map_err(|_| {
                    Error::config(format!("peers[{i}].publicKey"), "is not a WireGuard key")
                })?,
                endpoint: peer.endpoint,
                allowed_ips: peer.allowed_ips.clone(),
                keepalive: conf.persistent_keepalive,
                preshared_key,
            })
        })
        .collect()
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// The key file's content never appears in an error: only its path does.
fn read_preshared_key(index: usize, path: &std::path::Path) -> Result<PresharedKey> {
    let field = format!("peers[{index}].presharedKeyFile");
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(&field, format!("cannot read {}: {e}", path.display())))?;
    let key = Key::from_base64(text.trim()).map_err(|_| {
        Error::config(
            &field,
            format!("{} does not hold a base64 WireGuard key", path.display()),
        )
    })?;
    Ok(PresharedKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use crate::store::SCHEMA_VERSION;
    use crate::wireguard::BackendKind;

    fn record(id: &str, ip: &str, state: State) -> Record {
        Record {
            schema: SCHEMA_VERSION,
            state,
            network: "n".into(),
            node: "a".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            pod: None,
            public_key: KeyPair::generate().public().to_base64(),
            next_public_key: None,
            previous_public_key: None,
            key_created_at: None,
            addresses: vec![ip.parse().unwrap()],
            endpoint: "127.0.0.1".parse().unwrap(),
            listen_port: 52000,
            netns: "/x".into(),
            netns_inode: 1,
            boot_id: "b".into(),
            host_name: "h".into(),
            backend: BackendKind::Userspace,
            daemon_pid: None,
            mtu: 1420,
            created_at: 0,
        }
    }

    #[test]
    fn peers_are_the_other_ready_attachments_with_host_prefixes() {
        let records = vec![
            record("a", "10.0.0.2/24", State::Ready),
            record("b", "10.0.0.3/24", State::Ready),
            record("c", "fd00::4/64", State::Ready),
            record("d", "10.0.0.5/24", State::Creating),
        ];
        let peers = peers_of(&records, "a", "eth0", Some(25));
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].allowed_ips[0].to_string(), "10.0.0.3/32");
        assert_eq!(peers[1].allowed_ips[0].to_string(), "fd00::4/128");
        assert_eq!(peers[0].endpoint.unwrap().to_string(), "127.0.0.1:52000");
        assert_eq!(peers[0].keepalive, Some(25));
    }

    #[test]
    fn a_record_with_a_bad_key_is_skipped() {
        let mut bad = record("b", "10.0.0.3/24", State::Ready);
        bad.public_key = "garbage".into();
        let records = vec![record("a", "10.0.0.2/24", State::Ready), bad];
        assert!(peers_of(&records, "a", "eth0", None).is_empty());
    }

    #[test]
    fn a_rotations_keys_are_all_checked_and_never_published() {
        let mut r = record("a", "10.0.0.2/32", State::Ready);
        let next = KeyPair::generate().public().to_base64();
        assert!(next_peer_of(&r, None).is_none());
        r.next_public_key = Some(next.clone());
        r.previous_public_key = Some(KeyPair::generate().public().to_base64());
        assert_eq!(keys(&r).unwrap().len(), 3);
        let prepared = next_peer_of(&r, Some(25)).unwrap();
        assert_eq!(prepared.public_key.to_base64(), next);
        assert!(
            prepared.allowed_ips.is_empty(),
            "the next key gets no address"
        );
        assert_eq!(prepared.endpoint, Some(r.endpoint_addr()));
        let public = r.public();
        assert!(public.next_public_key.is_none() && public.previous_public_key.is_none());
        r.next_public_key = Some("not a key".into());
        assert!(
            keys(&r).is_err(),
            "a bad second key makes the keys unreadable"
        );
        assert!(next_peer_of(&r, None).is_none());
    }
}
