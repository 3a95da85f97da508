//! The agent's etcd credential files (CA, client certificate and key, password), watched for
//! change: node provisioning or a Kubernetes Secret replaces them (certificates expire), and
//! the agent connects again with the new ones instead of failing at the next reconnect.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::PathBuf;
use std::time::Duration;

use super::config::Settings;

/// How often the files are looked at (a Secret's update reaches a pod's files within about a
/// minute anyway).
pub const POLL: Duration = Duration::from_secs(10);

/// What the credential files hold now, as one number (their contents are never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u64);

/// The files the connection reads.
fn files(settings: &Settings) -> Vec<PathBuf> {
    [
        &settings.etcd_ca,
        &settings.etcd_cert,
        &settings.etcd_key,
        &settings.etcd_password_file,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

impl Fingerprint {
    /// The files' contents hashed (a missing or unreadable file counts as its error's kind,
    /// so it differs from any content).
    pub fn of(settings: &Settings) -> Fingerprint {
        let mut hasher = DefaultHasher::new();
        for path in files(settings) {
            match std::fs::read(&path) {
                Ok(content) => {
                    let content = zeroize::Zeroizing::new(content);
                    hasher.write_u8(1);
                    hasher.write(&content);
                }
                Err(e) => {
                    hasher.write_u8(0);
                    hasher.write(format!("{:?}", e.kind()).as_bytes());
                }
            }
        }
        Fingerprint(hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_or_missing_file_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "one\n").unwrap();
        let settings = crate::agent::forget::Connection {
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            user: Some("a".into()),
            password_file: Some(password.clone()),
        }
        .settings();
        let first = Fingerprint::of(&settings);
        assert_eq!(first, Fingerprint::of(&settings), "same files, same print");
        std::fs::write(&password, "two\n").unwrap();
        let second = Fingerprint::of(&settings);
        assert_ne!(first, second);
        std::fs::remove_file(&password).unwrap();
        assert_ne!(second, Fingerprint::of(&settings));
    }
}
