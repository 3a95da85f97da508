//! Publishing this node's records: read the node's own record directory, keep the records
//! that are ready and of this boot, and make `links/<node>/` in etcd say exactly that.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use etcd_client::{Client, PutOptions, TxnOp};
use serde::Serialize;

use super::etcd::{bounded, list_prefix};
use super::keys::{Keys, LinkName};
use crate::store::{GatewayRecord, Record, State, is_readable_schema};

/// etcd refuses a transaction with more operations than `--max-txn-ops` (default 128).
const MAX_TXN_OPS: usize = 120;

/// This node's publishable records: link name → the record's JSON (re-serialized from the
/// typed record's public form, so neither unknown nor local-only fields ever leave the node).
pub type Local = BTreeMap<LinkName, Vec<u8>>;

/// Read `<node_dir>`: `*:*.json` pod records in state ready, and `gateway.json`, whose
/// network, node and boot id are this node's (and whose name matches the file name).
pub fn scan_local(node_dir: &Path, network: &str, node: &str, boot_id: &str) -> Local {
    let mut local = Local::new();
    let Ok(entries) = std::fs::read_dir(node_dir) else {
        return local;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(LinkName::from_file_name) else {
            continue;
        };
        let Some(bytes) = read_small(&entry.path()) else {
            continue;
        };
        let body = match &name {
            LinkName::Pod {
                container_id,
                ifname,
            } => serde_json::from_slice::<Record>(&bytes).ok().and_then(|r| {
                (is_readable_schema(r.schema)
                    && r.state == State::Ready
                    && r.is_attachment(container_id, ifname)
                    && r.network == network
                    && r.node == node
                    && r.boot_id == boot_id)
                    .then(|| to_json(&r.public()))
            }),
            LinkName::Gateway => serde_json::from_slice::<GatewayRecord>(&bytes)
                .ok()
                .and_then(|g| {
                    (is_readable_schema(g.schema)
                        && g.network == network
                        && g.node == node
                        && g.boot_id == boot_id)
                        .then(|| to_json(&g.public()))
                }),
        };
        if let Some(body) = body {
            local.insert(name, body);
        }
    }
    local
}

/// Each pod attachment's public key in `local` (`Local` holds them as JSON).
pub fn pod_keys(local: &Local) -> impl Iterator<Item = (String, String)> + '_ {
    local.iter().filter_map(|(name, body)| {
        let LinkName::Pod {
            container_id,
            ifname,
        } = name
        else {
            return None;
        };
        let record: Record = serde_json::from_slice(body).ok()?;
        Some((
            crate::store::attachment_id(container_id, ifname),
            record.public_key,
        ))
    })
}

/// A regular file of at most 64 KiB, never through a symlink.
pub fn read_small(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The same formatting the store writes.
pub fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("records always serialize")
}

/// The operations that make `links/<node>/` equal `local`: deletions first, then puts.
pub fn diff_ops(
    keys: &Keys,
    node: &str,
    published: &BTreeMap<String, Vec<u8>>,
    local: &Local,
) -> Vec<TxnOp> {
    let wanted: BTreeMap<String, &Vec<u8>> = local
        .iter()
        .map(|(name, body)| (keys.link(node, name), body))
        .collect();
    let deletes = published
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(|k| TxnOp::delete(k.clone(), None));
    let puts = wanted
        .iter()
        .filter(|(k, body)| published.get(*k) != Some(**body))
        .map(|(k, body)| TxnOp::put(k.clone(), (*body).clone(), None));
    deletes.chain(puts).collect()
}

/// What etcd holds under `links/<node>/`.
pub async fn published(
    client: &mut Client,
    keys: &Keys,
    node: &str,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let (kvs, _) = list_prefix(client, &keys.links_prefix(node)).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
        .collect())
}

/// One publish pass; returns the number of keys changed. All operations go in one
/// transaction (deletions first) unless they exceed etcd's per-transaction limit.
pub async fn publish(client: &mut Client, keys: &Keys, node: &str, local: &Local) -> Result<usize> {
    let current = published(client, keys, node).await?;
    let ops = diff_ops(keys, node, &current, local);
    commit(client, ops, None).await
}

/// Make `nodes/<node>/endpoints/` name exactly `endpoints`: a missing claim is created only
/// where absent (its create revision is how long the node has held the address: the oldest
/// holder of an address keeps it), one for an address no longer used is deleted.
pub async fn claim_endpoints(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    endpoints: &[std::net::IpAddr],
) -> Result<()> {
    let (held, _) = list_prefix(client, &keys.endpoint_claims_prefix(node)).await?;
    let wanted: Vec<String> = endpoints
        .iter()
        .map(|ip| keys.endpoint_claim(node, *ip))
        .collect();
    for kv in &held {
        let key = kv.key_str()?;
        if !wanted.iter().any(|w| w == key) {
            bounded(client.delete(key, None)).await?;
        }
    }
    for key in wanted {
        if held.iter().any(|kv| kv.key_str().is_ok_and(|k| k == key)) {
            continue;
        }
        let txn = etcd_client::Txn::new()
            .when([etcd_client::Compare::create_revision(
                key.clone(),
                etcd_client::CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(key.clone(), "{}", None)]);
        bounded(client.txn(txn)).await?;
        tracing::info!(%key, "claimed a node address");
    }
    Ok(())
}

/// Renew the node's heartbeat (never on a lease): how long a node has been silent is read
/// from here by every agent, so an agent that restarts does not see a long-dead node as
/// freshly stale.
pub async fn heartbeat(client: &mut Client, keys: &Keys, node: &str) -> Result<()> {
    let value = serde_json::to_vec(&super::mirror::Heartbeat {
        unix: crate::host::now_unix(),
    })?;
    bounded(client.put(keys.heartbeat(node), value, None)).await?;
    Ok(())
}

/// Put the node key on `lease` together with every link key of this node (and the deletion
/// of stale ones), in one transaction: used when a lease is (re-)granted.
pub async fn announce(
    client: &mut Client,
    keys: &Keys,
    node: &str,
    info: Vec<u8>,
    lease: i64,
    local: &Local,
) -> Result<usize> {
    let current = published(client, keys, node).await?;
    let ops = diff_ops(keys, node, &current, local);
    let node_put = TxnOp::put(
        keys.node_info(node),
        info,
        Some(PutOptions::new().with_lease(lease)),
    );
    commit(client, ops, Some(node_put)).await
}

async fn commit(client: &mut Client, ops: Vec<TxnOp>, first: Option<TxnOp>) -> Result<usize> {
    let count = ops.len();
    let mut ops: Vec<TxnOp> = first.into_iter().chain(ops).collect();
    if ops.len() > MAX_TXN_OPS {
        tracing::warn!(
            ops = ops.len(),
            "more changes than one etcd transaction takes: split"
        );
    }
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(MAX_TXN_OPS));
        let txn = etcd_client::Txn::new().and_then(std::mem::take(&mut ops));
        bounded(client.txn(txn)).await?;
        ops = rest;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_keeps_ready_current_boot_records_of_this_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |id: &str, state: &str, node: &str, boot: &str| {
            serde_json::json!({"schema": 1, "state": state, "network": "net", "node": node,
                "containerId": id, "ifname": "eth0", "publicKey": "k", "addresses": ["10.0.1.2/24"],
                "endpoint": "127.0.0.1", "listenPort": 52000, "netns": "/x", "netnsInode": 1,
                "bootId": boot, "hostName": "wgc0", "backend": "userspace", "mtu": 1420,
                "createdAt": 1})
        };
        let write = |name: &str, v: serde_json::Value| {
            std::fs::write(dir.path().join(name), v.to_string()).unwrap()
        };
        write("a:eth0.json", rec("a", "ready", "n1", "b1"));
        write("c:eth0.json", rec("c", "creating", "n1", "b1"));
        write("d:eth0.json", rec("d", "ready", "n1", "old-boot"));
        write("e:eth0.json", rec("e", "ready", "n2", "b1"));
        write("f:eth0.json", rec("x", "ready", "n1", "b1"));
        write(".tmp-1-g:eth0.json", rec("g", "ready", "n1", "b1"));
        write(
            "subnet.json",
            serde_json::json!({"schema": 1, "subnets": []}),
        );
        let mut with_secret = rec("h", "ready", "n1", "b1");
        with_secret["privateKey"] = serde_json::json!("SECRET");
        write("h:eth0.json", with_secret);
        let local = scan_local(dir.path(), "net", "n1", "b1");
        let names: Vec<String> = local.keys().map(|n| n.key_part()).collect();
        assert_eq!(names, ["a:eth0", "h:eth0"]);
        for body in local.values() {
            assert!(!String::from_utf8_lossy(body).contains("SECRET"));
        }
    }

    /// Other nodes learn only what they need to peer a record: never the netns path and inode
    /// or the daemon's PID. The two netns fields stay present (empty) while readers of schema
    /// 1 that require them may still run in the cluster.
    #[test]
    fn published_records_carry_no_local_only_fields() {
        let dir = tempfile::tempdir().unwrap();
        let record = serde_json::json!({"schema": 1, "state": "ready", "network": "net",
            "node": "n1", "containerId": "a", "ifname": "eth0", "publicKey": "k",
            "addresses": ["10.0.1.2/24"], "endpoint": "192.0.2.1", "listenPort": 52000,
            "netns": "/var/run/netns/secret-pod", "netnsInode": 4026532999u64, "bootId": "b1",
            "hostName": "wgc0", "backend": "userspace", "daemonPid": 4242, "mtu": 1420,
            "createdAt": 1});
        std::fs::write(dir.path().join("a:eth0.json"), record.to_string()).unwrap();
        let gateway = serde_json::json!({"schema": 1, "network": "net", "node": "n1",
            "publicKey": "g", "addresses": ["10.0.1.1/32"], "subnets": ["10.0.1.0/24"],
            "endpoint": "192.0.2.1", "listenPort": 52001, "hostName": "wgg0",
            "backend": "userspace", "daemonPid": 4243, "bootId": "b1", "mtu": 1420,
            "masquerade": false, "createdAt": 1});
        std::fs::write(dir.path().join("gateway.json"), gateway.to_string()).unwrap();
        let local = scan_local(dir.path(), "net", "n1", "b1");
        assert_eq!(local.len(), 2);
        for body in local.values() {
            let text = String::from_utf8_lossy(body);
            for secret in ["secret-pod", "4026532999", "daemonPid", "4242", "4243"] {
                assert!(!text.contains(secret), "{secret} published: {text}");
            }
        }
        let published: serde_json::Value =
            serde_json::from_slice(&local[&LinkName::parse("a:eth0").unwrap()]).unwrap();
        assert_eq!(published["netns"], "", "present for schema-1 readers");
        assert_eq!(published["netnsInode"], 0);
    }

    /// A node still on this version publishes what a node one schema ahead wrote (during a
    /// rolling upgrade the plugin can be newer than the agent).
    #[test]
    fn the_next_schema_is_published_too() {
        let dir = tempfile::tempdir().unwrap();
        let record = serde_json::json!({"schema": crate::store::SCHEMA_VERSION + 1,
            "state": "ready", "network": "net", "node": "n1", "containerId": "a",
            "ifname": "eth0", "publicKey": "k", "addresses": ["10.0.1.2/24"],
            "endpoint": "192.0.2.1", "listenPort": 52000, "bootId": "b1", "hostName": "wgc0",
            "backend": "userspace", "mtu": 1420, "createdAt": 1, "aFieldFromTheFuture": [1]});
        std::fs::write(dir.path().join("a:eth0.json"), record.to_string()).unwrap();
        assert_eq!(scan_local(dir.path(), "net", "n1", "b1").len(), 1);
    }

    #[test]
    fn diff_deletes_first_and_skips_unchanged() {
        let keys = Keys::new("net");
        let a = LinkName::parse("a:eth0").unwrap();
        let b = LinkName::parse("b:eth0").unwrap();
        let mut local = Local::new();
        local.insert(a.clone(), b"A".to_vec());
        local.insert(b.clone(), b"B2".to_vec());
        let mut published = BTreeMap::new();
        published.insert(keys.link("n1", &a), b"A".to_vec());
        published.insert(keys.link("n1", &b), b"B".to_vec());
        published.insert(keys.link("n1", &LinkName::Gateway), b"G".to_vec());
        let ops = diff_ops(&keys, "n1", &published, &local);
        let text = format!("{ops:?}");
        assert_eq!(ops.len(), 2, "{text}");
        let delete_at = text.find("RequestDeleteRange").unwrap();
        let put_at = text.find("RequestPut").unwrap();
        assert!(delete_at < put_at, "{text}");
    }
}
