//! Whether a node agent runs on a store: the agent holds an exclusive flock on
//! `<store>/.agent.lock` for its whole life (the kernel drops it when the process dies, however
//! it dies, and the daemons it execs do not inherit it: the file is close-on-exec). `wg-cni
//! uninstall` refuses while it is held, since a running agent makes its node's gateway again.
//! A second agent on the same store waits for the first to go (a rolling update's old pod may
//! still be terminating). A leaf module: the plugin's binary reads it without the agent.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::cni::{Error, Result};

/// A dot file: nothing that reads the store takes it for a network.
pub const LOCK_FILE: &str = ".agent.lock";

/// Held while the agent runs.
pub struct Presence {
    _lock: Flock<File>,
}

fn open(store: &Path) -> Result<(File, PathBuf)> {
    let path = store.join(LOCK_FILE);
    std::fs::create_dir_all(store).map_err(|source| Error::Io {
        context: format!("creating the store {}", store.display()),
        source,
    })?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| Error::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
    Ok((file, path))
}

/// Take the store's agent lock, waiting (and saying so once) while another agent holds it.
pub fn hold(store: &Path) -> Result<Presence> {
    let (mut file, path) = open(store)?;
    let mut said = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Presence { _lock: lock }),
            Err((back, Errno::EWOULDBLOCK)) => {
                if !said {
                    tracing::warn!(lock = %path.display(), "another agent runs on this store; waiting for it to stop");
                    said = true;
                }
                file = back;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err((_, errno)) => {
                return Err(Error::Io {
                    context: format!("locking {}", path.display()),
                    source: errno.into(),
                });
            }
        }
    }
}

/// Whether an agent holds the store's lock now (a store without the file has none).
pub fn agent_runs(store: &Path) -> Result<bool> {
    if !store.join(LOCK_FILE).exists() {
        return Ok(false);
    }
    let (file, path) = open(store)?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => Ok(false),
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, errno)) => Err(Error::Io {
            context: format!("testing {}", path.display()),
            source: errno.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_tells_while_held_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!agent_runs(dir.path()).unwrap(), "no file, no agent");
        let presence = hold(dir.path()).unwrap();
        assert!(agent_runs(dir.path()).unwrap());
        drop(presence);
        assert!(!agent_runs(dir.path()).unwrap());
    }
}
