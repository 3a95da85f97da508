//! CNI spec types: environment, config, results per version, errors. No I/O besides what the
//! caller hands in.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use config::{NetConf, Peering};
pub use env::{CniEnv, Command};
pub use error::{Error, IoContext, Result};
pub use result::CniResult;
pub use version::Version;

/// The spec's alphabet for network names and container IDs: letters, digits, `_`, `.` and `-`,
/// starting with a letter or digit. Both end up as path components in the store.
pub fn is_identifier(text: &str, max_len: usize) -> bool {
    text.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && text.len() <= max_len
}

pub const IDENTIFIER_RULE: &str =
    "may contain only letters, digits, '_', '.' and '-', starting with a letter or digit";
