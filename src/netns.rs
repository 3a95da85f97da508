//! Network namespaces: open one by path (checking it really is one), and run a closure inside
//! it. The calling thread enters the namespace and returns to where it was before `run`
//! answers (a guard returns it even when the closure panics; a thread that cannot return is
//! in a namespace nobody asked for, so the process aborts). A thread per call cost more than
//! the work it did: a netlink request is microseconds, a thread start is not (much less in a
//! slow VM). Children forked inside the closure would start in the pod: nothing forks there.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
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

    /// Run `f` on this thread inside this namespace, then return the thread to its own.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let entering = |e: &dyn std::fmt::Display| {
            Error::netlink(
                format!("entering network namespace {}", self.path().display()),
                e.to_string(),
            )
        };
        let back = ReturnTo::current().map_err(|e| entering(&e))?;
        setns(self.inner.file().as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| entering(&e))?;
        let answer = f();
        drop(back);
        answer
    }
}

/// The namespace a thread was in: dropping it takes the thread back there.
struct ReturnTo(std::fs::File);

impl ReturnTo {
    fn current() -> std::io::Result<ReturnTo> {
        std::fs::File::open("/proc/thread-self/ns/net").map(ReturnTo)
    }
}

impl Drop for ReturnTo {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Carrying on would create links, sockets and children in a pod's namespace.
            eprintln!("wg-cni: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}
