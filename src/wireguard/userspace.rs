//! Userspace WireGuard: wg-cni's own daemon `wg-cni-wgd` (TUN offloads, UDP GSO/GRO; built from
//! `wgd/`) or Debian's wireguard-go, as `userspaceDaemon` says; both speak the same command
//! line (`-f NAME`) and UAPI. The plugin starts one daemon per link from
//! the host namespace (children inherit the namespace of the thread that forks them, and only
//! the main thread stays in the host), detached and with no inherited stdio (a runtime reads
//! our stdout until EOF). The daemon's TUN is configured, given its MTU, then moved into the
//! pod and renamed; the daemon and its UDP socket stay in the host. Killing the daemon
//! destroys its TUN wherever it is.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wireguard_control::Key;

use super::{Backend, Created, DeviceState, LinkRef, LinkSpec, Update, uapi};
use crate::cni::config::UserspaceDaemon;
use crate::cni::{Error, Result};
use crate::link::Netlink;
use crate::netns::Netns;

pub struct Userspace;

const WGD: &str = "wg-cni-wgd";
const WIREGUARD_GO: &str = "wireguard-go";
/// Every daemon a userspace link may run under (a record made before the default changed
/// must still be stopped).
const DAEMONS: [&str; 2] = [WGD, WIREGUARD_GO];
/// The descriptor a daemon adopts its TUN on.
const TUN_FD: i32 = 3;
const SOCKET_WAIT: Duration = Duration::from_secs(5);
const EXIT_WAIT: Duration = Duration::from_secs(3);

/// A daemon binary: next to the plugin (CNI bin dirs hold both), then `$PATH`, then where
/// Debian and admins put binaries.
fn find_binary(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain(["/usr/local/bin", "/usr/bin", "/usr/sbin"].map(PathBuf::from));
    beside
        .into_iter()
        .chain(dirs)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The daemon `choice` names: unset means wg-cni-wgd when installed, else wireguard-go.
pub fn daemon_path(choice: UserspaceDaemon) -> Result<PathBuf> {
    let missing = |name: &str, install: &str| {
        Error::NotAvailable(format!(
            "{name} is not installed ({install}) and the kernel has no WireGuard"
        ))
    };
    match choice {
        UserspaceDaemon::Wgd => {
            find_binary(WGD).ok_or_else(|| missing(WGD, "make install-wgd puts it next to wg-cni"))
        }
        UserspaceDaemon::WireguardGo => find_binary(WIREGUARD_GO)
            .ok_or_else(|| missing(WIREGUARD_GO, "apt-get install wireguard-go")),
        UserspaceDaemon::Default => find_binary(WGD)
            .or_else(|| find_binary(WIREGUARD_GO))
            .ok_or_else(|| missing(WGD, "or wireguard-go")),
    }
}

pub fn available() -> bool {
    DAEMONS.iter().any(|d| find_binary(d).is_some()) && Path::new("/dev/net/tun").exists()
}

/// Start `DAEMON -f NAME` detached and wait for its UAPI socket. With `tun`, the daemon
/// adopts that device (as its descriptor 3, `WG_TUN_FD=3`) instead of creating one.
fn start_daemon(name: &str, binary: &Path, tun: Option<OwnedFd>) -> Result<u32> {
    let daemon = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut command = Command::new(binary);
    command
        .arg("-f")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // With LOG_LEVEL set the daemon logs to the (null) stdio; keep it quiet and simple.
        .env_remove("LOG_LEVEL")
        .env_remove("WG_TUN_FD")
        .env_remove("WG_UAPI_FD");
    let tun_fd = tun.as_ref().map(|t| t.as_raw_fd());
    if tun_fd.is_some() {
        command.env("WG_TUN_FD", TUN_FD.to_string());
    }
    // SAFETY: setsid, dup2, fcntl and close_range are async-signal-safe, and so is what
    // cgroup::enter_in_child does (setns, open, write, close). setsid detaches the daemon from
    // the runtime's session; the TUN lands on descriptor 3 without close-on-exec.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            super::cgroup::enter_in_child();
            if let Some(fd) = tun_fd {
                if fd != TUN_FD && nix::libc::dup2(fd, TUN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if nix::libc::fcntl(TUN_FD, nix::libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else the plugin inherited (a make jobserver pipe, a runtime's
            // descriptors) may live on in a long-lived daemon.
            let first = if tun_fd.is_some() { TUN_FD + 1 } else { 3 };
            nix::libc::syscall(nix::libc::SYS_close_range, first as u32, u32::MAX, 0);
            Ok(())
        });
    }
    let spawned = command.spawn();
    // The daemon holds the device now (or nobody does, and it is gone).
    drop(tun);
    let mut child =
        spawned.map_err(|e| Error::wireguard(format!("starting {}", binary.display()), e))?;
    let pid = child.id();
    super::cgroup::check_moved(pid, name);
    let socket = uapi::socket_path(name);
    let started = Instant::now();
    while started.elapsed() < SOCKET_WAIT {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::wireguard(
                format!("{daemon} {name} exited at start ({status}); is /dev/net/tun available?"),
                std::io::Error::other("daemon exited"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(Error::wireguard(
        format!("{daemon} {name} did not open {} in time", socket.display()),
        std::io::Error::from(std::io::ErrorKind::TimedOut),
    ))
}

/// Whether `pid` is a userspace daemon serving `name` (guards against a reused pid).
fn is_our_daemon(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let is_daemon = args
        .next()
        .is_some_and(|a| DAEMONS.iter().any(|d| a.ends_with(d.as_bytes())));
    is_daemon && args.any(|a| a == name.as_bytes())
}

/// Whether a daemon's UAPI socket for `name` is there (both daemons make it at start).
pub fn has_socket(name: &str) -> bool {
    uapi::socket_path(name).exists()
}

/// Stop whatever daemon serves `name` (a deterministic name only wg-cni uses), without
/// asking for a key: for leftovers of a crash that left no record.
pub fn stop_daemon_named(name: &str) {
    // Without its socket there is no daemon to stop (both daemons make it at start): spare
    // the /proc scan on the common path (every gateway creation and removal).
    if !uapi::socket_path(name).exists() {
        return;
    }
    if let Some(pid) = find_daemon(name) {
        stop_daemon(pid, name);
    }
    let _ = fs::remove_file(uapi::socket_path(name));
}

/// Find the daemon for `name` when the record has no pid (an ADD that crashed early).
fn find_daemon(name: &str) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_our_daemon(*pid, name))
}

fn stop_daemon(pid: u32, name: &str) {
    if !is_our_daemon(pid, name) {
        return;
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    if !wait_exited(pid, EXIT_WAIT) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        wait_exited(pid, EXIT_WAIT);
    }
}

/// Wait until `pid` has finished exiting, every thread of it, so its UDP port and its TUN are
/// closed: a pidfd becomes readable only then (a zombie group leader, or an empty command
/// line, can come earlier while other threads still hold the descriptors).
fn wait_exited(pid: u32, limit: Duration) -> bool {
    use nix::libc;
    // SAFETY: pidfd_open(2) takes a pid and flags; the descriptor is owned right away.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return true; // no such process
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd that outlives the call.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout) } > 0;
    // A daemon we started in this very process stays a zombie until reaped.
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(pid as i32),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
    ready
}

/// Everything after the daemon is up: configure, set the MTU, move, rename.
fn configure_and_move(spec: &LinkSpec, pod: &Netns) -> Result<()> {
    uapi::set(spec.temp_name, &spec.initial_update())
        .map_err(|e| Error::wireguard(format!("configuring {}", spec.temp_name), e))?;

    let host = Netlink::open()?;
    let tun = host.link_by_name(spec.temp_name)?.ok_or_else(|| {
        Error::netlink(
            format!("TUN {}", spec.temp_name),
            "wireguard-go did not create it",
        )
    })?;
    // wireguard-go tracks the MTU by name in its own namespace: set it before the move.
    host.set_mtu(tun.index, spec.mtu)?;
    host.move_to_netns(tun.index, pod.raw_fd())?;
    pod.run(|| {
        let netlink = Netlink::open()?;
        let moved = netlink.link_by_name(spec.temp_name)?.ok_or_else(|| {
            Error::netlink(
                format!("TUN {}", spec.temp_name),
                "vanished while moving into the pod",
            )
        })?;
        netlink.set_down(moved.index)?;
        netlink.rename(moved.index, spec.ifname)
    })
}

impl Backend for Userspace {
    fn create(&self, spec: &LinkSpec, _host: &Netns, pod: &Netns) -> Result<Created> {
        let binary = daemon_path(spec.daemon)?;
        // wg-cni-wgd adopts a TUN made right in the pod; wireguard-go finds its device by
        // name in its own namespace, so its TUN is made in the host and moved.
        let adopts = binary.file_name().is_some_and(|n| n == WGD);
        let tun = match adopts {
            true => Some(super::tun::create_in(pod, spec.ifname, spec.mtu)?),
            false => None,
        };
        let pid = start_daemon(spec.temp_name, &binary, tun)?;
        crate::failpoint::crash("after-link-created");
        let configured = match adopts {
            true => uapi::set(spec.temp_name, &spec.initial_update())
                .map_err(|e| Error::wireguard(format!("configuring {}", spec.temp_name), e)),
            false => configure_and_move(spec, pod),
        };
        if let Err(e) = configured {
            stop_daemon(pid, spec.temp_name);
            let _ = fs::remove_file(uapi::socket_path(spec.temp_name));
            return Err(e);
        }
        Ok(Created {
            daemon_pid: Some(pid),
        })
    }

    fn apply(&self, link: &LinkRef, update: &Update) -> Result<()> {
        uapi::set(link.host_name, update)
            .map_err(|e| Error::wireguard(format!("configuring {}", link.ifname), e))
    }

    fn read(&self, link: &LinkRef) -> Result<DeviceState> {
        // Reading never starts a daemon (only wireguard-control's `apply` would).
        if !uapi::socket_path(link.host_name).exists() {
            return Err(Error::wireguard(
                format!("reading {}", link.ifname),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("its daemon ({}) is not running", link.host_name),
                ),
            ));
        }
        uapi::get(link.host_name)
            .map_err(|e| Error::wireguard(format!("reading {}", link.ifname), e))
    }

    fn is_running(&self, link: &LinkRef) -> bool {
        uapi::socket_path(link.host_name).exists()
            && link
                .daemon_pid
                .is_some_and(|pid| is_our_daemon(pid, link.host_name))
    }

    fn destroy(&self, link: &LinkRef, keys: &[Key], _host: &Netns) -> Result<()> {
        // The pid the record names, still serving this attachment's name: ours, whatever key
        // it holds now (a pod with CAP_NET_ADMIN may have changed it; left running, a daemon
        // whose TUN was made in the pod would keep that namespace alive).
        let recorded = link
            .daemon_pid
            .filter(|pid| is_our_daemon(*pid, link.host_name));
        let pid = match recorded {
            Some(pid) => pid,
            None => {
                let Some(pid) = find_daemon(link.host_name) else {
                    // No daemon: its TUN is gone with it. Clear a socket file it may have left.
                    let _ = fs::remove_file(uapi::socket_path(link.host_name));
                    return Ok(());
                };
                // Found by name only: a *different* key proves it is not ours; one that has no
                // key yet, or cannot answer, is an ADD that died early.
                let ours = self
                    .read(link)
                    .map(|d| d.public_key.as_ref().is_none_or(|k| keys.contains(k)))
                    .unwrap_or(true);
                if !ours {
                    tracing::warn!(
                        name = link.host_name,
                        "daemon holds another key: left alone"
                    );
                    return Ok(());
                }
                pid
            }
        };
        stop_daemon(pid, link.host_name);
        let _ = fs::remove_file(uapi::socket_path(link.host_name));
        Ok(())
    }
}
