//! The network configuration on stdin: parsed, type-checked field by field, nothing resolved
//! against the host yet (defaults that depend on the host live in `host.rs`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use super::error::{Error, Result};
use super::version::Version;

pub const DEFAULT_STORE: &str = "/var/lib/cni/wg-cni";
/// Refuse absurd stdin early: a real config with a prevResult is a few KiB.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Kernel,
    Userspace,
}

/// Which userspace WireGuard daemon runs a userspace link (`userspaceDaemon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserspaceDaemon {
    /// Unset: wg-cni-wgd when installed, else wireguard-go.
    Default,
    /// wg-cni's own (`wg-cni-wgd`): TUN offloads, UDP GSO/GRO.
    Wgd,
    /// Debian's `wireguard-go`.
    WireguardGo,
}

/// An inclusive host UDP port range, `"A-B"` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(text: &str) -> Option<PortRange> {
        let (a, b) = text.split_once('-')?;
        let first: u16 = a.trim().parse().ok()?;
        let last: u16 = b.trim().parse().ok()?;
        (first >= 1 && first <= last).then_some(PortRange { first, last })
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `maxDirectPeers` when unset.
pub const DEFAULT_MAX_DIRECT_PEERS: usize = 64;
const MAX_DIRECT_PEERS_LIMIT: u64 = 4096;
/// `idlePeerTimeout` when unset (Tailscale trims idle peers after the same).
pub const DEFAULT_IDLE_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How a network's pods peer (`peering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Peering {
    /// Every pod peers with every pod of the network (O(pods) peers per link).
    Mesh,
    /// A pod link peers with its node gateway (and the static peers); gateways relay
    /// between nodes. Toward a node in mesh mode a node behaves as mesh.
    OnDemand,
}

impl Peering {
    pub fn label(self) -> &'static str {
        match self {
            Peering::Mesh => "mesh",
            Peering::OnDemand => "on-demand",
        }
    }
}

/// A peer from the config (an egress gateway, a VPN concentrator): every pod link gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPeer {
    /// base64, as `wg` prints it.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    /// A file holding a base64 preshared key (read at ADD, never logged).
    pub preshared_key_file: Option<PathBuf>,
}

/// One attachment named in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub ipam_type: String,
    pub backend: BackendChoice,
    pub userspace_daemon: UserspaceDaemon,
    pub store: PathBuf,
    pub mtu: Option<u32>,
    pub endpoint: Option<IpAddr>,
    pub listen_ports: Option<PortRange>,
    pub persistent_keepalive: Option<u16>,
    /// A WireGuard link in the host namespace that routes host ↔ pods (probes, Services, egress).
    pub host_gateway: bool,
    /// Masquerade pod traffic leaving the host (needs the host gateway).
    pub ip_masq: bool,
    pub static_peers: Vec<StaticPeer>,
    /// Overrides the host name as this node's name in the store.
    pub node_name: Option<String>,
    /// `clusterRange`: the whole pod range of the network (every node's subnet lies inside),
    /// one CIDR per family; empty when not configured.
    pub cluster_range: Vec<IpNetwork>,
    /// `serviceRange`: the Service IPs (at most one range per family). No pod subnet and no
    /// node endpoint may lie there.
    pub service_range: Vec<IpNetwork>,
    /// `nodeRange`: where node addresses lie; where set, a node endpoint outside it is refused.
    pub node_range: Vec<IpNetwork>,
    /// `subnetLease`: the node agent leases this node's subnet from `clusterRange` through etcd
    /// (instead of the IPAM ranges naming it).
    pub subnet_lease: bool,
    pub peering: Peering,
    /// `maxDirectPeers` (on-demand): direct peers a pod link holds at most; traffic to any
    /// further pod stays relayed.
    pub max_direct_peers: usize,
    /// `idlePeerTimeout` (on-demand, seconds): a direct peer with no data in either direction
    /// for this long goes back to the relay.
    pub idle_peer_timeout: std::time::Duration,
    /// `keyRotation` (e.g. `"24h"`): the node agent gives each pod a fresh key once its key is
    /// this old (`crate::rotate`); off when unset. Needs the agent (`clusterRange`).
    pub key_rotation: Option<std::time::Duration>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The config exactly as received, for delegation to IPAM.
    pub raw: Map<String, Value>,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(Error::decode(
                "network configuration on stdin",
                format!("is larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::decode("network configuration on stdin is not valid JSON", e))?;
        let Value::Object(raw) = value else {
            return Err(Error::decode(
                "network configuration on stdin",
                "must be a JSON object",
            ));
        };

        let version_text = raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config("cniVersion", "is required and must be a string"))?;
        let cni_version = Version::parse_supported(version_text)?;

        let fields = Fields(&raw);
        let name = fields.required_str("name")?;
        validate_name("name", &name)?;

        let ipam = match raw.get("ipam") {
            Some(Value::Object(map)) => map.clone(),
            Some(_) => return Err(Error::config("ipam", "must be an object")),
            None => {
                return Err(Error::config(
                    "ipam",
                    "is required, e.g. {\"type\": \"host-local\", \"ranges\": [[{\"subnet\": \"10.66.0.0/24\"}]]}",
                ));
            }
        };
        let ipam_type = match ipam.get("type") {
            Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => t.clone(),
            _ => {
                return Err(Error::config(
                    "ipam.type",
                    "must name an IPAM plugin binary in CNI_PATH, e.g. \"host-local\"",
                ));
            }
        };

        let backend = match fields.optional_str("backend")?.as_deref() {
            None | Some("auto") => BackendChoice::Auto,
            Some("kernel") => BackendChoice::Kernel,
            Some("userspace") => BackendChoice::Userspace,
            Some(other) => {
                return Err(Error::config(
                    "backend",
                    format!("\"{other}\" is not one of \"auto\", \"kernel\", \"userspace\""),
                ));
            }
        };

        let userspace_daemon = match fields.optional_str("userspaceDaemon")?.as_deref() {
            None => UserspaceDaemon::Default,
            Some("wg-cni-wgd") => UserspaceDaemon::Wgd,
            Some("wireguard-go") => UserspaceDaemon::WireguardGo,
            Some(other) => {
                return Err(Error::config(
                    "userspaceDaemon",
                    format!("\"{other}\" is not one of \"wg-cni-wgd\", \"wireguard-go\""),
                ));
            }
        };

        let store = match fields.optional_str("store")? {
            Some(path) if path.starts_with('/') => PathBuf::from(path),
            Some(path) => {
                return Err(Error::config(
                    "store",
                    format!("\"{path}\" must be an absolute path"),
                ));
            }
            None => PathBuf::from(DEFAULT_STORE),
        };

        let mtu = fields
            .optional_uint("mtu")?
            .map(|mtu| {
                if (576..=65535).contains(&mtu) {
                    Ok(mtu as u32)
                } else {
                    Err(Error::config(
                        "mtu",
                        format!("{mtu} is not between 576 and 65535"),
                    ))
                }
            })
            .transpose()?;

        let endpoint = fields
            .optional_str("endpoint")?
            .map(|text| {
                text.parse::<IpAddr>().map_err(|_| {
                    Error::config(
                        "endpoint",
                        format!(
                            "\"{text}\" is not an IP address (peers reach this node's pods at it)"
                        ),
                    )
                })
            })
            .transpose()?;

        let listen_ports = fields
            .optional_str("listenPorts")?
            .map(|text| {
                PortRange::parse(&text).ok_or_else(|| {
                    Error::config(
                        "listenPorts",
                        format!("\"{text}\" is not a range \"A-B\" with 1 <= A <= B <= 65535"),
                    )
                })
            })
            .transpose()?;

        let persistent_keepalive = fields
            .optional_uint("persistentKeepalive")?
            .map(|secs| {
                u16::try_from(secs).map_err(|_| {
                    Error::config("persistentKeepalive", "must be between 0 and 65535 seconds")
                })
            })
            .transpose()?
            .filter(|secs| *secs > 0);

        let host_gateway = fields.optional_bool("hostGateway")?.unwrap_or(true);
        let ip_masq = fields.optional_bool("ipMasq")?.unwrap_or(false);
        if ip_masq && !host_gateway {
            return Err(Error::config(
                "ipMasq",
                "needs \"hostGateway\": true (pod traffic leaves the host through the gateway)",
            ));
        }
        let static_peers = parse_static_peers(raw.get("peers"))?;
        check_dns(raw.get("dns"))?;

        let node_name = fields.optional_str("nodeName")?;
        if let Some(node) = &node_name {
            validate_name("nodeName", node)?;
        }

        let cluster_range = parse_cluster_range(raw.get("clusterRange"))?;
        let service_range = parse_ranges("serviceRange", raw.get("serviceRange"), true)?;
        let node_range = parse_ranges("nodeRange", raw.get("nodeRange"), false)?;
        let subnet_lease = fields.optional_bool("subnetLease")?.unwrap_or(false);
        if subnet_lease && cluster_range.is_empty() {
            return Err(Error::config(
                "subnetLease",
                "needs \"clusterRange\": the range node subnets are leased from",
            ));
        }

        let peering = match fields.optional_str("peering")?.as_deref() {
            // Agent-served networks (a cluster range the gateways can relay) scale by default;
            // networks without the gateway or the range keep the full mesh they need.
            None if host_gateway && !cluster_range.is_empty() => Peering::OnDemand,
            None | Some("mesh") => Peering::Mesh,
            Some("on-demand") => Peering::OnDemand,
            Some(other) => {
                return Err(Error::config(
                    "peering",
                    format!("\"{other}\" is not one of \"on-demand\", \"mesh\""),
                ));
            }
        };
        if peering == Peering::OnDemand {
            if !host_gateway {
                return Err(Error::config(
                    "peering",
                    "\"on-demand\" needs \"hostGateway\": true (the node gateways relay between pods)",
                ));
            }
            if cluster_range.is_empty() {
                return Err(Error::config(
                    "peering",
                    "\"on-demand\" needs \"clusterRange\" (gateways relay the whole pod range)",
                ));
            }
            for (i, peer) in static_peers.iter().enumerate() {
                let overlap = peer.allowed_ips.iter().find_map(|ip| {
                    cluster_range
                        .iter()
                        .find(|r| {
                            r.is_ipv4() == ip.is_ipv4()
                                && (r.contains(ip.network()) || ip.contains(r.network()))
                        })
                        .map(|r| (ip, r))
                });
                if let Some((ip, range)) = overlap {
                    return Err(Error::config(
                        format!("peers[{i}].allowedIPs"),
                        format!(
                            "{ip} overlaps clusterRange {range}: with \"peering\": \"on-demand\" (the default where clusterRange is set) the pod range goes through the node gateways; set \"peering\": \"mesh\" to keep such a peer"
                        ),
                    ));
                }
            }
        }

        let max_direct_peers = fields
            .optional_uint("maxDirectPeers")?
            .map(|n| match n {
                0..=MAX_DIRECT_PEERS_LIMIT => Ok(n as usize),
                _ => Err(Error::config(
                    "maxDirectPeers",
                    format!("must be between 0 and {MAX_DIRECT_PEERS_LIMIT}"),
                )),
            })
            .transpose()?
            .unwrap_or(DEFAULT_MAX_DIRECT_PEERS);
        let idle_peer_timeout = fields
            .optional_uint("idlePeerTimeout")?
            .map(|secs| match secs {
                1..=86_400 => Ok(std::time::Duration::from_secs(secs)),
                _ => Err(Error::config(
                    "idlePeerTimeout",
                    "must be between 1 and 86400 seconds",
                )),
            })
            .transpose()?
            .unwrap_or(DEFAULT_IDLE_PEER_TIMEOUT);
        let key_rotation = fields
            .optional_str("keyRotation")?
            .map(|text| parse_key_rotation(&text, &cluster_range))
            .transpose()?;

        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => return Err(Error::config("prevResult", "must be an object")),
        };

        // libcni before 1.3 (#1101) also sent the list as `cni.dev/attachments`.
        let valid_attachments = match raw.get(VALID_ATTACHMENTS) {
            Some(list) => parse_attachments(VALID_ATTACHMENTS, Some(list))?,
            None => parse_attachments(ATTACHMENTS_ALIAS, raw.get(ATTACHMENTS_ALIAS))?,
        };

        Ok(NetConf {
            cni_version,
            name,
            ipam_type,
            backend,
            userspace_daemon,
            store,
            mtu,
            endpoint,
            listen_ports,
            persistent_keepalive,
            host_gateway,
            ip_masq,
            static_peers,
            node_name,
            cluster_range,
            service_range,
            node_range,
            subnet_lease,
            peering,
            max_direct_peers,
            idle_peer_timeout,
            key_rotation,
            prev_result,
            valid_attachments,
            raw,
        })
    }
}

/// The shortest `keyRotation`: a rotation costs every holder of the key a write, and remote
/// holders learn the new key through etcd (which takes well under a second).
const MIN_KEY_ROTATION: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest: a year.
const MAX_KEY_ROTATION: std::time::Duration = std::time::Duration::from_secs(366 * 86_400);

/// `keyRotation`: a number and a unit (`s`, `m`, `h`, `d`), e.g. `"24h"`, between a minute and
/// a year. The node agent rotates the keys, so the network must be one it serves
/// (`clusterRange`).
fn parse_key_rotation(text: &str, cluster_range: &[IpNetwork]) -> Result<std::time::Duration> {
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let seconds_per = match unit {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86_400),
        _ => None,
    };
    let period = number
        .parse::<u64>()
        .ok()
        .zip(seconds_per)
        .and_then(|(n, per)| n.checked_mul(per))
        .map(std::time::Duration::from_secs)
        .filter(|p| (MIN_KEY_ROTATION..=MAX_KEY_ROTATION).contains(p))
        .ok_or_else(|| {
            Error::config(
                "keyRotation",
                format!("\"{text}\" must be a period between 10s and 366d: a number and s, m, h or d, e.g. \"24h\""),
            )
        })?;
    if cluster_range.is_empty() {
        return Err(Error::config(
            "keyRotation",
            "needs the node agent, which serves networks with \"clusterRange\": set it, or rotate keys with `wg-cni rotate`",
        ));
    }
    Ok(period)
}

/// Names become directory names in the store: keep them to the spec's network-name alphabet.
fn validate_name(field: &str, name: &str) -> Result<()> {
    if super::is_identifier(name, 253) {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!("\"{name}\" {}", super::IDENTIFIER_RULE),
        ))
    }
}

/// `clusterRange`: one CIDR string, or an array of them (at most one per family).
fn parse_cluster_range(value: Option<&Value>) -> Result<Vec<IpNetwork>> {
    parse_ranges("clusterRange", value, true)
}

/// A CIDR string or a non-empty array of them, each without host bits; `one_per_family`: at
/// most one IPv4 and one IPv6 range.
fn parse_ranges(
    field: &str,
    value: Option<&Value>,
    one_per_family: bool,
) -> Result<Vec<IpNetwork>> {
    let items: Vec<&Value> = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        Some(_) => {
            return Err(Error::config(
                field,
                "must be a CIDR string or a non-empty array of CIDR strings",
            ));
        }
    };
    let mut ranges: Vec<IpNetwork> = Vec::new();
    for item in items {
        let net = item
            .as_str()
            .filter(|text| text.contains('/'))
            .and_then(|text| text.parse::<IpNetwork>().ok())
            .ok_or_else(|| Error::config(field, format!("{item} is not a CIDR")))?;
        if net.ip() != net.network() {
            return Err(Error::config(
                field,
                format!(
                    "{net} has host bits set; write {}/{}",
                    net.network(),
                    net.prefix()
                ),
            ));
        }
        if one_per_family && ranges.iter().any(|r| r.is_ipv4() == net.is_ipv4()) {
            return Err(Error::config(
                field,
                "holds at most one CIDR per address family",
            ));
        }
        ranges.push(net);
    }
    Ok(ranges)
}

fn parse_static_peers(value: Option<&Value>) -> Result<Vec<StaticPeer>> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = value
        .as_array()
        .ok_or_else(|| Error::config("peers", "must be an array of peer objects"))?;
    list.iter()
        .enumerate()
        .map(|(i, peer)| parse_static_peer(i, peer))
        .collect()
}

fn parse_static_peer(index: usize, value: &Value) -> Result<StaticPeer> {
    let bad =
        |field: &str, reason: String| Error::config(format!("peers[{index}].{field}"), reason);
    let obj = value
        .as_object()
        .ok_or_else(|| Error::config(format!("peers[{index}]"), "must be an object"))?;
    let public_key = match obj.get("publicKey") {
        Some(Value::String(k)) if is_wireguard_key(k) => k.clone(),
        Some(Value::String(k)) => {
            return Err(bad(
                "publicKey",
                format!(
                    "\"{k}\" is not a base64 WireGuard key (44 characters, as `wg pubkey` prints)"
                ),
            ));
        }
        _ => return Err(bad("publicKey", "is required and must be a string".into())),
    };
    let endpoint = match obj.get("endpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => Some(e.parse::<SocketAddr>().map_err(|_| {
            bad(
                "endpoint",
                format!("\"{e}\" is not IP:port (IPv6 as [addr]:port)"),
            )
        })?),
        Some(_) => return Err(bad("endpoint", "must be a string \"IP:port\"".into())),
    };
    let allowed_ips = match obj.get("allowedIPs") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| {
                let text = item.as_str().unwrap_or_default();
                text.parse::<IpNetwork>()
                    .map_err(|_| bad("allowedIPs", format!("{item} is not a CIDR")))
            })
            .collect::<Result<Vec<_>>>()?,
        _ => {
            return Err(bad(
                "allowedIPs",
                "is required: a non-empty array of CIDRs".into(),
            ));
        }
    };
    let preshared_key_file = match obj.get("presharedKeyFile") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p.starts_with('/') => Some(PathBuf::from(p)),
        Some(_) => {
            return Err(bad(
                "presharedKeyFile",
                "must be an absolute path to a file holding a base64 key".into(),
            ));
        }
    };
    Ok(StaticPeer {
        public_key,
        endpoint,
        allowed_ips,
        preshared_key_file,
    })
}

/// 32 bytes in standard base64: 43 characters and one `=`.
pub fn is_wireguard_key(text: &str) -> bool {
    text.len() == 44
        && text.ends_with('=')
        && text[..43]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}

/// `dns` is copied into the result: its shape must be the spec's (code 7 naming the field).
fn check_dns(value: Option<&Value>) -> Result<()> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let dns = value
        .as_object()
        .ok_or_else(|| Error::config("dns", "must be an object"))?;
    for list in ["nameservers", "search", "options"] {
        let ok = match dns.get(list) {
            None | Some(Value::Null) => true,
            Some(Value::Array(items)) => items.iter().all(Value::is_string),
            Some(_) => false,
        };
        if !ok {
            return Err(Error::config(
                format!("dns.{list}"),
                "must be an array of strings",
            ));
        }
    }
    if dns
        .get("domain")
        .is_some_and(|d| !d.is_null() && !d.is_string())
    {
        return Err(Error::config("dns.domain", "must be a string"));
    }
    Ok(())
}

const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
const ATTACHMENTS_ALIAS: &str = "cni.dev/attachments";

fn parse_attachments(field: &str, value: Option<&Value>) -> Result<Option<Vec<Attachment>>> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = value
        .as_array()
        .ok_or_else(|| Error::config(field, "must be an array"))?;
    list.iter()
        .map(|entry| {
            let id = entry.get("containerID").and_then(Value::as_str);
            let ifname = entry.get("ifname").and_then(Value::as_str);
            match (id, ifname) {
                (Some(id), Some(ifname)) => Ok(Attachment {
                    container_id: id.to_string(),
                    ifname: ifname.to_string(),
                }),
                _ => Err(Error::config(
                    field,
                    "every entry needs string fields \"containerID\" and \"ifname\"",
                )),
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Typed access to top-level fields with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn required_str(&self, field: &str) -> Result<String> {
        self.optional_str(field)?
            .ok_or_else(|| Error::config(field, "is required"))
    }

    fn optional_str(&self, field: &str) -> Result<Option<String>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::config(
                field,
                format!("must be a string, not {}", type_name(other)),
            )),
        }
    }

    fn optional_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Error::config(
                field,
                format!("must be true or false, not {}", type_name(other)),
            )),
        }
    }

    fn optional_uint(&self, field: &str) -> Result<Option<u64>> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                Error::config(field, format!("{n} is not a non-negative whole number"))
            }),
            Some(other) => Err(Error::config(
                field,
                format!("must be a number, not {}", type_name(other)),
            )),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "wgnet",
            "type": "wg-cni",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.66.0.0/24"}]]},
        })
    }

    fn parse(v: &Value) -> Result<NetConf> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn field_error(field: &str, value: Value) -> Error {
        let mut v = base();
        v[field] = value;
        parse(&v).unwrap_err()
    }

    #[test]
    fn peering_defaults_to_on_demand_where_the_gateways_can_relay() {
        let mut v = base();
        assert_eq!(parse(&v).unwrap().peering, Peering::Mesh, "no clusterRange");
        v["clusterRange"] = json!("10.66.0.0/16");
        assert_eq!(parse(&v).unwrap().peering, Peering::OnDemand);
        v["hostGateway"] = json!(false);
        assert_eq!(parse(&v).unwrap().peering, Peering::Mesh, "no gateway");
        v["hostGateway"] = json!(true);
        v["peering"] = json!("mesh");
        assert_eq!(parse(&v).unwrap().peering, Peering::Mesh, "asked for");
    }

    #[test]
    fn direct_peer_limits_default_and_are_bounded() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.max_direct_peers, DEFAULT_MAX_DIRECT_PEERS);
        assert_eq!(c.idle_peer_timeout, DEFAULT_IDLE_PEER_TIMEOUT);
        let mut v = base();
        v["maxDirectPeers"] = json!(0);
        v["idlePeerTimeout"] = json!(30);
        let c = parse(&v).unwrap();
        assert_eq!(c.max_direct_peers, 0, "0: every pair stays relayed");
        assert_eq!(c.idle_peer_timeout, std::time::Duration::from_secs(30));
        for (field, value) in [
            ("maxDirectPeers", json!(5000)),
            ("maxDirectPeers", json!(-1)),
            ("idlePeerTimeout", json!(0)),
            ("idlePeerTimeout", json!("5m")),
        ] {
            let e = field_error(field, value.clone());
            assert_eq!(e.code(), 7, "{field}={value}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn key_rotation_is_a_period_of_the_agents_networks() {
        let mut v = base();
        v["clusterRange"] = "10.66.0.0/16".into();
        assert_eq!(parse(&v).unwrap().key_rotation, None, "off by default");
        for (text, seconds) in [("24h", 86_400), ("10s", 10), ("90m", 5400), ("7d", 604_800)] {
            v["keyRotation"] = text.into();
            let period = parse(&v).unwrap().key_rotation;
            assert_eq!(
                period,
                Some(std::time::Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for bad in [
            json!("9s"),
            json!("367d"),
            json!("24"),
            json!("h"),
            json!("1.5h"),
            json!(24),
        ] {
            v["keyRotation"] = bad.clone();
            let e = parse(&v).unwrap_err();
            assert_eq!(e.code(), 7, "{bad}");
            assert!(e.to_string().contains("keyRotation"), "{e}");
        }
        // Without clusterRange no agent serves the network: nobody would rotate.
        let e = field_error("keyRotation", "24h".into());
        assert_eq!(e.code(), 7);
        assert!(
            e.to_string().contains("keyRotation") && e.to_string().contains("clusterRange"),
            "{e}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.store, PathBuf::from(DEFAULT_STORE));
        assert_eq!(c.ipam_type, "host-local");
        assert!(c.mtu.is_none() && c.endpoint.is_none() && c.persistent_keepalive.is_none());
    }

    #[test]
    fn full_config_parses() {
        let mut v = base();
        v["mtu"] = json!(1400);
        v["endpoint"] = json!("127.0.0.1");
        v["listenPorts"] = json!("52000-52010");
        v["backend"] = json!("userspace");
        v["persistentKeepalive"] = json!(25);
        v["unknownRuntimeField"] = json!({"x": 1});
        let c = parse(&v).unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(
            c.listen_ports,
            Some(PortRange {
                first: 52000,
                last: 52010
            })
        );
        assert_eq!(c.persistent_keepalive, Some(25));
        assert_eq!(c.backend, BackendChoice::Userspace);
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (field, value) in [
            ("mtu", json!("1420")),
            ("mtu", json!(100)),
            ("mtu", json!(-1)),
            ("endpoint", json!("not-an-ip")),
            ("endpoint", json!(5)),
            ("listenPorts", json!("9-1")),
            ("listenPorts", json!("0-10")),
            ("listenPorts", json!("1-70000")),
            ("backend", json!("magic")),
            ("store", json!("relative/path")),
            ("persistentKeepalive", json!(70000)),
            ("name", json!("../escape")),
            ("ipam", json!("host-local")),
            ("nodeName", json!("a/b")),
            ("prevResult", json!([1])),
            ("hostGateway", json!("yes")),
            ("peers", json!({"publicKey": "x"})),
        ] {
            let e = field_error(field, value.clone());
            assert_eq!(e.code(), 7, "{field}={value}: {e}");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn bad_json_is_code_6_and_bad_version_code_1() {
        assert_eq!(NetConf::parse(b"{\"cniVersion\":").unwrap_err().code(), 6);
        assert_eq!(NetConf::parse(b"[1,2]").unwrap_err().code(), 6);
        let mut v = base();
        v["cniVersion"] = json!("0.2.0");
        assert_eq!(parse(&v).unwrap_err().code(), 1);
        let huge = vec![b' '; MAX_CONFIG_BYTES + 1];
        assert_eq!(NetConf::parse(&huge).unwrap_err().code(), 6);
    }

    #[test]
    fn static_peers_are_validated_and_errors_name_the_peer() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let mut v = base();
        v["peers"] = json!([{"publicKey": key, "endpoint": "127.0.0.1:51000", "allowedIPs": ["192.168.50.0/24"]}]);
        let c = parse(&v).unwrap();
        assert_eq!(
            c.static_peers[0].allowed_ips[0].to_string(),
            "192.168.50.0/24"
        );
        assert!(c.host_gateway && !c.ip_masq);
        for (peer, field) in [
            (
                json!({"publicKey": "short", "allowedIPs": ["10.0.0.0/8"]}),
                "peers[0].publicKey",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["nope"]}),
                "peers[0].allowedIPs",
            ),
            (
                json!({"publicKey": key, "allowedIPs": []}),
                "peers[0].allowedIPs",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.0.0.0/8"], "endpoint": "host"}),
                "peers[0].endpoint",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.0.0.0/8"], "presharedKeyFile": "rel"}),
                "peers[0].presharedKeyFile",
            ),
        ] {
            let mut v = base();
            v["peers"] = json!([peer]);
            let e = parse(&v).unwrap_err();
            assert_eq!(e.code(), 7);
            assert!(e.to_string().contains(field), "{e}");
        }
        let mut v = base();
        v["ipMasq"] = json!(true);
        v["hostGateway"] = json!(false);
        assert!(parse(&v).unwrap_err().to_string().contains("ipMasq"));
    }

    #[test]
    fn cluster_range_takes_a_string_or_one_cidr_per_family() {
        let c = parse(&base()).unwrap();
        assert!(c.cluster_range.is_empty() && !c.subnet_lease);
        let mut v = base();
        v["clusterRange"] = json!("10.244.0.0/16");
        v["subnetLease"] = json!(true);
        let c = parse(&v).unwrap();
        assert_eq!(c.cluster_range, vec!["10.244.0.0/16".parse().unwrap()]);
        assert!(c.subnet_lease);
        v["clusterRange"] = json!(["10.244.0.0/16", "fd00:244::/48"]);
        assert_eq!(parse(&v).unwrap().cluster_range.len(), 2);
        for bad in [
            json!("10.244.0.0"),
            json!("10.244.0.1/16"),
            json!(["10.0.0.0/8", "10.1.0.0/16"]),
            json!([]),
            json!(16),
            json!(["10.0.0.0/8", 5]),
        ] {
            let e = field_error("clusterRange", bad.clone());
            assert_eq!(e.code(), 7, "{bad}: {e}");
            assert!(e.to_string().contains("clusterRange"), "{bad}: {e}");
        }
        let e = field_error("subnetLease", json!(true));
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("clusterRange"), "{e}");
        assert!(
            field_error("subnetLease", json!("yes"))
                .to_string()
                .contains("subnetLease")
        );
    }

    #[test]
    fn ipam_without_type_is_rejected() {
        let e = field_error("ipam", json!({"ranges": []}));
        assert!(e.to_string().contains("ipam.type"));
    }

    #[test]
    fn valid_attachments_parse() {
        let mut v = base();
        v["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        let c = parse(&v).unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }
}
