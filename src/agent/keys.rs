//! The etcd key layout under `/wg-cni/v1/<network>/`, and the names of record files.
//!
//! Every per-node key lives under a prefix that ends in `/` (`nodes/<node>/`, `links/<node>/`,
//! `subnets/<node>/`), so an etcd role granted one node's prefixes never covers another node
//! whose name merely starts the same way (`node1` vs `node10`).

use std::net::IpAddr;

use crate::cni::is_identifier;

/// The versioned root of everything wg-cni keeps in etcd.
pub const ROOT: &str = "/wg-cni/v1/";
/// The node gateway's link key name and record file.
pub const GATEWAY: &str = "gateway";
pub const GATEWAY_FILE: &str = "gateway.json";

/// One attachment's name in etcd and (with `.json`) on disk. ':' can be in neither part.
pub fn attachment_key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}:{ifname}")
}

/// Which record a link key or a record file names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkName {
    Pod {
        container_id: String,
        ifname: String,
    },
    Gateway,
}

impl LinkName {
    /// The last component of a link key: `<containerID>:<ifname>` or `gateway`.
    pub fn parse(text: &str) -> Option<LinkName> {
        if text == GATEWAY {
            return Some(LinkName::Gateway);
        }
        let (container_id, ifname) = text.split_once(':')?;
        (is_identifier(container_id, 256) && is_ifname(ifname)).then(|| LinkName::Pod {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    }

    /// A record file name in a node directory (`*:*.json` or `gateway.json`); anything else
    /// (`.lock`, `.tmp-*`, `subnet.json`) is not a record.
    pub fn from_file_name(name: &str) -> Option<LinkName> {
        if name == GATEWAY_FILE {
            return Some(LinkName::Gateway);
        }
        match name.strip_suffix(".json").and_then(LinkName::parse) {
            Some(pod @ LinkName::Pod { .. }) => Some(pod),
            _ => None,
        }
    }

    pub fn key_part(&self) -> String {
        match self {
            LinkName::Pod {
                container_id,
                ifname,
            } => attachment_key(container_id, ifname),
            LinkName::Gateway => GATEWAY.to_string(),
        }
    }

    pub fn file_name(&self) -> String {
        format!("{}.json", self.key_part())
    }
}

/// Interface names as CNI_IFNAME validation accepts them.
fn is_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Node names become directory names: the same alphabet as network names.
pub fn is_node_name(name: &str) -> bool {
    is_identifier(name, 253)
}

/// What a key under a network's prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    NodeInfo {
        node: String,
    },
    /// The node's last sign of life (Unix seconds), never on a lease.
    Heartbeat {
        node: String,
    },
    /// The node's persistent claim on one of its addresses (`nodes/<node>/endpoints/<ip>`).
    EndpointClaim {
        node: String,
        address: IpAddr,
    },
    Link {
        node: String,
        name: LinkName,
    },
    Claim {
        node: String,
    },
}

/// The keys of one network.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(network: &str) -> Keys {
        Keys {
            prefix: format!("{ROOT}{network}/"),
        }
    }

    /// `/wg-cni/v1/<network>/`: everything of the network (list and watch this).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node key (on the liveness lease).
    pub fn node_info(&self, node: &str) -> String {
        format!("{}nodes/{node}/info", self.prefix)
    }

    /// The node's heartbeat: renewed with the lease, kept when the lease lapses, so every agent
    /// (a restarted one too) computes how long the node has been gone.
    pub fn heartbeat(&self, node: &str) -> String {
        format!("{}nodes/{node}/heartbeat", self.prefix)
    }

    /// `nodes/<node>/endpoints/`: the node's address claims.
    pub fn endpoint_claims_prefix(&self, node: &str) -> String {
        format!("{}nodes/{node}/endpoints/", self.prefix)
    }

    /// The node's claim on `address` (never on the liveness lease; created only where absent,
    /// so its create revision says since when the node has held the address).
    pub fn endpoint_claim(&self, node: &str, address: IpAddr) -> String {
        format!("{}{address}", self.endpoint_claims_prefix(node))
    }

    /// `links/<node>/`: the node's records (never on a lease).
    pub fn links_prefix(&self, node: &str) -> String {
        format!("{}links/{node}/", self.prefix)
    }

    pub fn link(&self, node: &str, name: &LinkName) -> String {
        format!("{}{}", self.links_prefix(node), name.key_part())
    }

    /// The node's subnet claim (never on a lease; created only where absent).
    pub fn claim(&self, node: &str) -> String {
        format!("{}subnets/{node}/claim", self.prefix)
    }

    /// The prefixes a node's role may write (each ends in '/').
    pub fn node_write_prefixes(&self, node: &str) -> [String; 3] {
        [
            format!("{}nodes/{node}/", self.prefix),
            self.links_prefix(node),
            format!("{}subnets/{node}/", self.prefix),
        ]
    }

    /// Classify a key; `None` for anything outside the layout (ignored, never trusted).
    pub fn parse(&self, key: &str) -> Option<KeyKind> {
        let rest = key.strip_prefix(&self.prefix)?;
        let mut parts = rest.split('/');
        let (kind, node, last) = (parts.next()?, parts.next()?, parts.next()?);
        let extra = parts.next();
        if parts.next().is_some() || !is_node_name(node) {
            return None;
        }
        let node = node.to_string();
        if let Some(address) = extra {
            return match (kind, last) {
                ("nodes", "endpoints") => Some(KeyKind::EndpointClaim {
                    node,
                    address: address.parse().ok()?,
                }),
                _ => None,
            };
        }
        match (kind, last) {
            ("nodes", "info") => Some(KeyKind::NodeInfo { node }),
            ("nodes", "heartbeat") => Some(KeyKind::Heartbeat { node }),
            ("subnets", "claim") => Some(KeyKind::Claim { node }),
            ("links", name) => Some(KeyKind::Link {
                node,
                name: LinkName::parse(name)?,
            }),
            _ => None,
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let k = Keys::new("wgnet");
        let pod = LinkName::Pod {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(k.link("n1", &pod), "/wg-cni/v1/wgnet/links/n1/abc123:eth0");
        assert_eq!(
            k.link("n1", &LinkName::Gateway),
            "/wg-cni/v1/wgnet/links/n1/gateway"
        );
        assert_eq!(
            k.parse(&k.link("n1", &pod)),
            Some(KeyKind::Link {
                node: "n1".into(),
                name: pod.clone()
            })
        );
        assert_eq!(
            k.parse(&k.node_info("n1")),
            Some(KeyKind::NodeInfo { node: "n1".into() })
        );
        assert_eq!(
            k.parse(&k.claim("n1")),
            Some(KeyKind::Claim { node: "n1".into() })
        );
        assert_eq!(
            k.parse(&k.heartbeat("n1")),
            Some(KeyKind::Heartbeat { node: "n1".into() })
        );
        for address in ["192.0.2.1", "2001:db8::1"] {
            let address: IpAddr = address.parse().unwrap();
            assert_eq!(
                k.parse(&k.endpoint_claim("n1", address)),
                Some(KeyKind::EndpointClaim {
                    node: "n1".into(),
                    address
                })
            );
            assert!(
                k.endpoint_claim("n1", address)
                    .starts_with(&k.node_write_prefixes("n1")[0])
            );
        }
        assert_eq!(pod.file_name(), "abc123:eth0.json");
        assert_eq!(LinkName::from_file_name("abc123:eth0.json"), Some(pod));
    }

    #[test]
    fn role_prefixes_end_in_a_slash() {
        let k = Keys::new("wgnet");
        for p in k.node_write_prefixes("node1") {
            assert!(p.ends_with("/node1/"), "{p}");
            assert!(!k.link("node10", &LinkName::Gateway).starts_with(&p));
            assert!(!k.node_info("node10").starts_with(&p));
        }
        assert!(
            k.node_info("node1")
                .starts_with(&k.node_write_prefixes("node1")[0])
        );
        assert!(
            k.claim("node1")
                .starts_with(&k.node_write_prefixes("node1")[2])
        );
    }

    #[test]
    fn foreign_keys_and_files_are_not_records() {
        let k = Keys::new("wgnet");
        for key in [
            "/wg-cni/v1/other/links/n1/a:eth0",
            "/wg-cni/v1/wgnet/links/n1/a:eth0/x",
            "/wg-cni/v1/wgnet/links/../a:eth0",
            "/wg-cni/v1/wgnet/links/n1/a-eth0",
            "/wg-cni/v1/wgnet/links/n1/a:",
            "/wg-cni/v1/wgnet/links/n1/:eth0",
            "/wg-cni/v1/wgnet/links/n1/a:b:c",
            "/wg-cni/v1/wgnet/links/n1/a:..",
            "/wg-cni/v1/wgnet/nodes/n1",
            "/wg-cni/v1/wgnet/nodes/n1/other",
            "/wg-cni/v1/wgnet/subnets/.x/claim",
            "/wg-cni/v1/wgnet/stuff/n1/claim",
            "/wg-cni/v1/wgnet/nodes/n1/endpoints/not-an-ip",
            "/wg-cni/v1/wgnet/nodes/n1/info/x",
            "/wg-cni/v1/wgnet/links/n1/gateway/x",
        ] {
            assert_eq!(k.parse(key), None, "{key}");
        }
        for name in [
            ".lock",
            ".tmp-1-a:eth0.json",
            "subnet.json",
            "a-eth0.json",
            "gateway",
            "a:eth0",
        ] {
            assert_eq!(LinkName::from_file_name(name), None, "{name}");
        }
        assert_eq!(
            LinkName::from_file_name("gateway.json"),
            Some(LinkName::Gateway)
        );
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
