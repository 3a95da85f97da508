//! CNI spec types: environment, config, results per version, errors. No I/O besides what the
//! caller hands in.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use config::NetConf;
pub use env::{CniEnv, Command};
pub use error::{Error, IoContext, Result};
pub use result::CniResult;
pub use version::Version;
