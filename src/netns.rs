//! Network namespaces: open one by path (checking it really is one), and run a closure inside
//! it on a dedicated thread, so the calling thread never changes namespace.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::fstatfs;

use crate::cni::{Error, Result};

/// `NSFS_MAGIC` from linux/magic.h: the filesystem of /proc/*/ns/* and their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub struct Netns {
    inner: netns_rs::NetNs,
    inode: u64,
}

/// Why a namespace path could not be used.
#[derive(Debug)]
pub enum OpenError {
    Missing,
    NotANetns,
    Other(std::io::Error),
}

impl Netns {
    pub fn open(path: &Path) -> std::result::Result<Netns, OpenError> {
        let inner = netns_rs::get_from_path(path).map_err(|e| match e {
            netns_rs::Error::OpenNsError(_, io) if io.kind() == std::io::ErrorKind::NotFound => {
                OpenError::Missing
            }
            netns_rs::Error::OpenNsError(_, io) => OpenError::Other(io),
            other => OpenError::Other(std::io::Error::other(other.to_string())),
        })?;
        let fs = fstatfs(inner.file().as_fd()).map_err(|e| OpenError::Other(e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(OpenError::NotANetns);
        }
        let inode = inner.file().metadata().map_err(OpenError::Other)?.ino();
        Ok(Netns { inner, inode })
    }

    /// Open the namespace named by CNI_NETNS, with errors a user can act on (code 4).
    pub fn open_for_env(path: &Path) -> Result<Netns> {
        Netns::open(path).map_err(|e| {
            let reason = match e {
                OpenError::Missing => format!("{} does not exist", path.display()),
                OpenError::NotANetns => {
                    format!("{} is not a network namespace", path.display())
                }
                OpenError::Other(io) => format!("cannot open {}: {io}", path.display()),
            };
            Error::env("CNI_NETNS", reason)
        })
    }

    /// The namespace this process started in. Only the main thread is ever there: every
    /// namespace switch happens on a thread of its own.
    pub fn host() -> Result<Netns> {
        Netns::open(Path::new("/proc/self/ns/net")).map_err(|e| Error::Io {
            context: "opening the host network namespace (/proc/self/ns/net)".into(),
            source: std::io::Error::other(format!("{e:?}")),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn raw_fd(&self) -> RawFd {
        self.inner.file().as_raw_fd()
    }

    /// Run `f` on a fresh thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.inner.enter().map_err(|e| {
                        Error::netlink(
                            format!("entering network namespace {}", self.path().display()),
                            e,
                        )
                    })?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}
