//! The plugin's one error type. Every variant maps to a CNI error code, and its `Display`
//! text tells the user what to fix. No variant ever carries key material.

use std::io;

/// CNI spec codes (1-11, 50) and ours (100+). 51 (limited connectivity) is never used: STATUS
/// fails only when ADD could not work (see commands/status.rs).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const INTERFACE_EXISTS: u32 = 100;
    pub const NETLINK: u32 = 101;
    pub const WIREGUARD: u32 = 102;
    pub const CHECK_FAILED: u32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    IncompatibleVersion(String),
    /// No such attachment here (`wg-cni rotate` of a container the store does not know).
    #[error("{0}")]
    UnknownContainer(String),
    #[error("environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    #[error("{context}: {reason}")]
    Decode { context: String, reason: String },
    #[error("config field \"{field}\": {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    TryAgainLater(String),
    #[error("{0}")]
    NotAvailable(String),
    #[error("interface {ifname} already exists in {netns}: pick another CNI_IFNAME or remove it")]
    InterfaceExists { ifname: String, netns: String },
    #[error("{context}: {reason}")]
    Netlink { context: String, reason: String },
    #[error("{context}: {source}")]
    WireGuard {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("CHECK failed: {0}")]
    Check(String),
    /// An error returned by a delegated plugin (IPAM), passed on with its own code.
    #[error("{plugin}: {msg}")]
    Delegated {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Error::UnknownContainer(_) => code::UNKNOWN_CONTAINER,
            Error::InvalidEnv { .. } => code::INVALID_ENV,
            Error::Decode { .. } => code::DECODE,
            Error::InvalidConfig { .. } => code::INVALID_CONFIG,
            Error::Io { .. } => code::IO,
            Error::TryAgainLater(_) => code::TRY_AGAIN_LATER,
            Error::NotAvailable(_) => code::PLUGIN_NOT_AVAILABLE,
            Error::InterfaceExists { .. } => code::INTERFACE_EXISTS,
            Error::Netlink { .. } => code::NETLINK,
            Error::WireGuard { .. } => code::WIREGUARD,
            Error::Check(_) => code::CHECK_FAILED,
            Error::Delegated { code, .. } => *code,
        }
    }

    /// The short message for the CNI `msg` field; `details` carries the rest.
    pub fn details(&self) -> String {
        match self {
            Error::Delegated { details, .. } => details.clone(),
            Error::Io { source, .. } | Error::WireGuard { source, .. } => source.to_string(),
            _ => String::new(),
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn env(var: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidEnv {
            var,
            reason: reason.into(),
        }
    }

    pub fn decode(context: impl Into<String>, reason: impl ToString) -> Self {
        Error::Decode {
            context: context.into(),
            reason: reason.to_string(),
        }
    }

    pub fn netlink(context: impl Into<String>, reason: impl ToString) -> Self {
        Error::Netlink {
            context: context.into(),
            reason: reason.to_string(),
        }
    }

    pub fn wireguard(context: impl Into<String>, source: io::Error) -> Self {
        Error::WireGuard {
            context: context.into(),
            source,
        }
    }
}

/// Attach a human context to an `io::Error` (`file.read().io("reading record")?`).
pub trait IoContext<T> {
    fn io(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn io(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// The error JSON CNI runtimes read from stdout.
pub fn to_json(error: &Error, cni_version: &str) -> serde_json::Value {
    let mut value = serde_json::json!({
        "cniVersion": cni_version,
        "code": error.code(),
        "msg": error.to_string(),
    });
    let details = error.details();
    if !details.is_empty() {
        value["details"] = details.into();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_code_msg_and_version() {
        let e = Error::config("mtu", "must be between 576 and 65535");
        let v = to_json(&e, "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["msg"].as_str().unwrap().contains("\"mtu\""));
        assert!(v.get("details").is_none());
    }

    #[test]
    fn delegated_error_keeps_its_code() {
        let e = Error::Delegated {
            plugin: "host-local".into(),
            code: 11,
            msg: "no IP addresses available".into(),
            details: "range full".into(),
        };
        assert_eq!(e.code(), 11);
        assert_eq!(to_json(&e, "0.4.0")["details"], "range full");
    }
}
