//! Where the agent's userspace daemons live: a DaemonSet's agent container is a cgroup the
//! runtime kills as a whole when the pod stops (an upgrade, a restart), and the node gateway's
//! daemon must outlive it, or every pod on the node loses the host and the other nodes until
//! the new agent makes the gateway again. With `--daemon-cgroup DIR` (a cgroup v2 directory,
//! in Kubernetes the host's root cgroup as `/proc/1/root/sys/fs/cgroup` with host PID), each
//! daemon the agent starts moves itself there between fork and exec, so it is never in the
//! container's cgroup when it runs. In a private cgroup namespace a process may only move into
//! cgroups inside it, so the child first enters pid 1's cgroup namespace (the host's, with
//! host PID). The plugin never sets this: its daemons stay in the runtime's cgroup (README).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use crate::cni::{Error, Result};

struct Target {
    /// `DIR/cgroup.procs`, for `open(2)` in the child.
    procs: CString,
    /// Pid 1's cgroup namespace when it is not ours (a container's private one).
    host_cgroupns: Option<OwnedFd>,
}

static TARGET: OnceLock<Target> = OnceLock::new();

/// cgroup v2's `statfs` magic: cgroup v1 directories have `cgroup.procs` too, and moving a
/// process in one hierarchy of v1 leaves it in the others.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// From now on, daemons this process starts join the cgroup v2 directory `dir`.
pub fn move_daemons_to(dir: &Path) -> Result<()> {
    let bad = |reason: String| Error::config("--daemon-cgroup", reason);
    let procs = dir.join("cgroup.procs");
    let fs = match nix::sys::statfs::statfs(dir) {
        Ok(fs) => fs,
        // A host fact too: `/proc/1/root` is refused even to root when pid 1 is not dumpable
        // (some sandboxes' and VMs' init). A missing directory is a mistake in the flag.
        Err(e @ (nix::errno::Errno::EACCES | nix::errno::Errno::EPERM)) => {
            tracing::warn!(
                dir = %dir.display(),
                "--daemon-cgroup cannot be read ({e}; pid 1's root is refused on this host): gateway daemons stay in the agent's cgroup and stop with its container"
            );
            return Ok(());
        }
        Err(e) => return Err(bad(format!("{}: {e}", dir.display()))),
    };
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC || !procs.is_file() {
        // A host fact, not a mistake in the flag: one DaemonSet serves cgroup v1 and v2 hosts.
        tracing::warn!(
            dir = %dir.display(),
            "--daemon-cgroup is not a cgroup v2 directory (a cgroup v1 host): gateway daemons stay in the agent's cgroup and stop with its container"
        );
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| bad(format!("{}: {e}", procs.display())))?;
    let procs =
        CString::new(procs.as_os_str().as_bytes()).map_err(|_| bad("holds a NUL byte".into()))?;
    let target = Target {
        procs,
        host_cgroupns: host_cgroupns(),
    };
    if TARGET.set(target).is_err() {
        tracing::warn!("--daemon-cgroup was set already; keeping the first");
    }
    Ok(())
}

/// Pid 1's cgroup namespace, open, when it differs from ours.
fn host_cgroupns() -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    if ino("/proc/1/ns/cgroup")? == ino("/proc/self/ns/cgroup")? {
        return None;
    }
    std::fs::File::open("/proc/1/ns/cgroup")
        .ok()
        .map(OwnedFd::from)
}

/// In a forked child before exec: join the target cgroup (writing 0 moves the writer). Only
/// async-signal-safe calls; a failure leaves the child where it is (`check_moved` says so).
pub fn enter_in_child() {
    let Some(target) = TARGET.get() else {
        return;
    };
    // SAFETY: setns, open, write and close on valid pointers and descriptors.
    unsafe {
        if let Some(ns) = &target.host_cgroupns {
            nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWCGROUP);
        }
        let fd = nix::libc::open(
            target.procs.as_ptr(),
            nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
        );
        if fd >= 0 {
            nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            nix::libc::close(fd);
        }
    }
}

/// After the spawn: warn when the daemon did not land in the target cgroup.
pub fn check_moved(pid: u32, name: &str) {
    let Some(target) = TARGET.get() else {
        return;
    };
    let path = Path::new(std::ffi::OsStr::from_bytes(target.procs.as_bytes()));
    let moved = std::fs::read_to_string(path)
        .is_ok_and(|pids| pids.lines().any(|l| l.trim() == pid.to_string()));
    if !moved {
        tracing::warn!(daemon = name, pid, cgroup = %path.display(), "the daemon could not join --daemon-cgroup: it stops with the agent's container");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cgroup_v2_directory_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        move_daemons_to(dir.path()).expect("not cgroup v2: a warning, daemons stay");
        assert!(TARGET.get().is_none());
        let e = move_daemons_to(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--daemon-cgroup"), "{e}");
        assert!(TARGET.get().is_none());
    }
}
