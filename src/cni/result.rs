//! The CNI result: one internal shape, read from any spec version an IPAM plugin answers in,
//! written in the version the caller asked for.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{Map, Value, json};

use super::error::{Error, Result};
use super::version::Version;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// Read a result of any supported version (0.3.0 to 1.1.0); `what` names its origin in errors.
    pub fn parse(value: &Value, what: &str) -> Result<CniResult> {
        let bad = |reason: String| Error::decode(what, reason);
        let obj = value
            .as_object()
            .ok_or_else(|| bad("is not a JSON object".into()))?;

        let interfaces = array(obj, "interfaces")
            .map_err(bad)?
            .iter()
            .map(|i| {
                Ok(Interface {
                    name: str_field(i, "name").unwrap_or_default(),
                    mac: str_field(i, "mac"),
                    mtu: i.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                    sandbox: str_field(i, "sandbox"),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let ips = array(obj, "ips")
            .map_err(bad)?
            .iter()
            .map(|ip| {
                let address = str_field(ip, "address")
                    .ok_or_else(|| bad("an entry of \"ips\" has no \"address\"".into()))?;
                Ok(IpConfig {
                    address: address
                        .parse()
                        .map_err(|_| bad(format!("\"{address}\" in \"ips\" is not a CIDR")))?,
                    gateway: parse_opt_ip(ip, "gateway").map_err(bad)?,
                    interface: ip
                        .get("interface")
                        .and_then(Value::as_u64)
                        .map(|i| i as usize),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let routes = array(obj, "routes")
            .map_err(bad)?
            .iter()
            .map(|r| {
                let dst = str_field(r, "dst")
                    .ok_or_else(|| bad("an entry of \"routes\" has no \"dst\"".into()))?;
                Ok(Route {
                    dst: dst
                        .parse()
                        .map_err(|_| bad(format!("route \"{dst}\" is not a CIDR")))?,
                    gw: parse_opt_ip(r, "gw").map_err(bad)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let dns = obj.get("dns").map(parse_dns).unwrap_or_default();
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            dns,
        })
    }

    /// The JSON a caller of `version` expects.
    pub fn to_json(&self, version: Version) -> Value {
        let legacy = version < Version::V1_0_0;
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = Map::new();
                v.insert("name".into(), i.name.clone().into());
                if let Some(mac) = &i.mac {
                    v.insert("mac".into(), mac.clone().into());
                }
                if let (Some(mtu), true) = (i.mtu, version >= Version::V1_1_0) {
                    v.insert("mtu".into(), mtu.into());
                }
                if let Some(sandbox) = &i.sandbox {
                    v.insert("sandbox".into(), sandbox.clone().into());
                }
                Value::Object(v)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = Map::new();
                if legacy {
                    let family = if ip.address.is_ipv4() { "4" } else { "6" };
                    v.insert("version".into(), family.into());
                }
                v.insert("address".into(), ip.address.to_string().into());
                if let Some(gw) = ip.gateway {
                    v.insert("gateway".into(), gw.to_string().into());
                }
                if let Some(index) = ip.interface {
                    v.insert("interface".into(), index.into());
                }
                Value::Object(v)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| match r.gw {
                Some(gw) => json!({"dst": r.dst.to_string(), "gw": gw.to_string()}),
                None => json!({"dst": r.dst.to_string()}),
            })
            .collect();

        let mut out = Map::new();
        out.insert("cniVersion".into(), version.to_string().into());
        if !interfaces.is_empty() {
            out.insert("interfaces".into(), interfaces.into());
        }
        out.insert("ips".into(), ips.into());
        if !routes.is_empty() {
            out.insert("routes".into(), routes.into());
        }
        out.insert("dns".into(), dns_json(&self.dns));
        Value::Object(out)
    }
}

fn array<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a [Value], String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(format!("\"{key}\" is not an array")),
    }
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_string)
}

fn parse_opt_ip(value: &Value, key: &str) -> std::result::Result<Option<IpAddr>, String> {
    match str_field(value, key) {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| format!("\"{key}\": \"{text}\" is not an IP address")),
    }
}

fn string_list(value: &Value, key: &str) -> Vec<String> {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Parse the `dns` object of a result or a config.
pub fn parse_dns(value: &Value) -> Dns {
    Dns {
        nameservers: string_list(value, "nameservers"),
        domain: str_field(value, "domain"),
        search: string_list(value, "search"),
        options: string_list(value, "options"),
    }
}

fn dns_json(dns: &Dns) -> Value {
    let mut v = Map::new();
    if !dns.nameservers.is_empty() {
        v.insert("nameservers".into(), dns.nameservers.clone().into());
    }
    if let Some(domain) = &dns.domain {
        v.insert("domain".into(), domain.clone().into());
    }
    if !dns.search.is_empty() {
        v.insert("search".into(), dns.search.clone().into());
    }
    if !dns.options.is_empty() {
        v.insert("options".into(), dns.options.clone().into());
    }
    Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::version::SUPPORTED;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: None,
                mtu: Some(1420),
                sandbox: Some("/var/run/netns/p1".into()),
            }],
            ips: vec![
                IpConfig {
                    address: "10.66.0.2/24".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd66::2/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn every_version_has_its_shape() {
        for version in SUPPORTED {
            let v = sample().to_json(version);
            assert_eq!(v["cniVersion"], version.to_string());
            let has_ip_version = v["ips"][0].get("version").is_some();
            assert_eq!(has_ip_version, version < Version::V1_0_0, "{version}");
            if version < Version::V1_0_0 {
                assert_eq!(v["ips"][1]["version"], "6");
            }
            let has_mtu = v["interfaces"][0].get("mtu").is_some();
            assert_eq!(has_mtu, version >= Version::V1_1_0, "{version}");
            assert_eq!(v["interfaces"][0]["sandbox"], "/var/run/netns/p1");
            // Round trip through our own reader.
            let back = CniResult::parse(&v, "test").unwrap();
            assert_eq!(back.ips, sample().ips);
        }
    }

    #[test]
    fn reads_host_local_0_4_result() {
        let v = serde_json::json!({
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.66.0.5/24", "gateway": "10.66.0.1"}],
            "dns": {}
        });
        let r = CniResult::parse(&v, "host-local").unwrap();
        assert_eq!(r.ips[0].gateway, Some("10.66.0.1".parse().unwrap()));
        assert!(r.interfaces.is_empty());
    }

    #[test]
    fn bad_result_is_decode_error() {
        let v = serde_json::json!({"ips": [{"address": "nope"}]});
        assert_eq!(CniResult::parse(&v, "x").unwrap_err().code(), 6);
    }
}
