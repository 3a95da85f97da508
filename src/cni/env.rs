//! The CNI_* environment of one invocation, validated per command.

use std::path::PathBuf;

use super::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    fn parse(text: &str) -> Result<Command> {
        Ok(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            other => {
                return Err(Error::env(
                    "CNI_COMMAND",
                    format!(
                        "unknown command \"{other}\"; expected ADD, DEL, CHECK, GC, STATUS or VERSION"
                    ),
                ));
            }
        })
    }
}

/// Linux limits interface names to IFNAMSIZ - 1 bytes.
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// `None` when CNI_NETNS is unset or empty (allowed for DEL).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// CNI_ARGS as key/value pairs, in the order given.
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Read from the process environment.
    pub fn from_process() -> Result<CniEnv> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<CniEnv> {
        let command_text =
            lookup("CNI_COMMAND").ok_or_else(|| Error::env("CNI_COMMAND", "is not set"))?;
        let command = Command::parse(&command_text)?;
        if command == Command::Version {
            // VERSION reads nothing else; libcni probes it with CNI_NETNS=dummy and friends.
            return Ok(CniEnv {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: Vec::new(),
                path: Vec::new(),
            });
        }
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let needs_path = command != Command::Version;

        let container_id = match lookup("CNI_CONTAINERID") {
            Some(id) if !id.is_empty() => {
                validate_container_id(&id)?;
                id
            }
            _ if needs_container => {
                return Err(Error::env("CNI_CONTAINERID", "is required"));
            }
            _ => String::new(),
        };

        let netns = match lookup("CNI_NETNS").filter(|v| !v.is_empty()) {
            Some(path) => {
                if !path.starts_with('/') {
                    return Err(Error::env(
                        "CNI_NETNS",
                        format!("\"{path}\" must be an absolute path to a network namespace"),
                    ));
                }
                Some(PathBuf::from(path))
            }
            None if needs_netns => return Err(Error::env("CNI_NETNS", "is required")),
            None => None,
        };

        let ifname = match lookup("CNI_IFNAME").filter(|v| !v.is_empty()) {
            Some(name) => {
                validate_ifname(&name)?;
                name
            }
            None if needs_container => return Err(Error::env("CNI_IFNAME", "is required")),
            None => String::new(),
        };

        let path: Vec<PathBuf> = lookup("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if needs_path && path.is_empty() {
            return Err(Error::env(
                "CNI_PATH",
                "is required: a colon-separated list of directories holding the IPAM plugin",
            ));
        }

        let args = parse_args(&lookup("CNI_ARGS").unwrap_or_default())?;
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn validate_container_id(id: &str) -> Result<()> {
    if super::is_identifier(id, 1024) {
        Ok(())
    } else {
        Err(Error::env("CNI_CONTAINERID", super::IDENTIFIER_RULE))
    }
}

fn validate_ifname(name: &str) -> Result<()> {
    let problem = if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "\"{name}\" is {} bytes long; interface names are at most {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some(format!("\"{name}\" is not a valid interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some(format!(
            "\"{name}\" contains '/', ':' or whitespace, which interface names cannot"
        ))
    } else if name == "lo" {
        Some("\"lo\" is the loopback interface; wg-cni never touches it".to_string())
    } else {
        None
    };
    match problem {
        Some(reason) => Err(Error::env("CNI_IFNAME", reason)),
        None => Ok(()),
    }
}

/// `K1=V1;K2=V2`, as runtimes send it.
fn parse_args(text: &str) -> Result<Vec<(String, String)>> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Error::env(
                "CNI_ARGS",
                format!("\"{pair}\" is not KEY=VALUE (pairs are separated by ';')"),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1"),
        ("CNI_NETNS", "/var/run/netns/p1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni:/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
    ];

    #[test]
    fn add_env_parses() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.arg("K8S_POD_NAME"), Some("web"));
    }

    fn with(over: (&str, &str)) -> Vec<(&'static str, String)> {
        ADD.iter()
            .map(|(k, v)| {
                if *k == over.0 {
                    (*k, over.1.to_string())
                } else {
                    (*k, v.to_string())
                }
            })
            .collect()
    }

    fn err_var(over: (&str, &str)) -> String {
        let pairs = with(over);
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let e = env(&refs).unwrap_err();
        assert_eq!(e.code(), 4, "{e}");
        e.to_string()
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert!(err_var(("CNI_IFNAME", "a-very-long-interface")).contains("CNI_IFNAME"));
        assert!(err_var(("CNI_IFNAME", "eth/0")).contains("CNI_IFNAME"));
        assert!(err_var(("CNI_IFNAME", "lo")).contains("CNI_IFNAME"));
        assert!(err_var(("CNI_CONTAINERID", "../etc")).contains("CNI_CONTAINERID"));
        assert!(err_var(("CNI_NETNS", "relative/ns")).contains("CNI_NETNS"));
        assert!(err_var(("CNI_NETNS", "")).contains("CNI_NETNS"));
        assert!(err_var(("CNI_PATH", "")).contains("CNI_PATH"));
        assert!(err_var(("CNI_COMMAND", "FROB")).contains("CNI_COMMAND"));
        assert!(err_var(("CNI_ARGS", "novalue")).contains("CNI_ARGS"));
    }

    #[test]
    fn del_allows_empty_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ])
        .unwrap();
        assert!(e.netns.is_none());
    }

    #[test]
    fn version_needs_nothing_else_and_ignores_the_rest() {
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        // libcni's probe environment.
        let probe = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
        ]);
        assert!(probe.is_ok());
    }
}
