//! wg-cni-wgd: wg-cni's userspace WireGuard daemon, a drop-in for `wireguard-go -f NAME`.
//!
//! It creates the TUN device NAME in the current network namespace (or adopts the one whose
//! descriptor `WG_TUN_FD` names, created elsewhere: wg-cni makes it inside the pod), serves the standard
//! cross-platform UAPI on /var/run/wireguard/NAME.sock (mode 0600) and runs the data path of
//! the `gotatun` crate with our own TUN (virtio-net header offloads) and UDP (GSO/GRO, batched
//! syscalls) layers. The UDP socket is bound in the namespace the daemon was started in and
//! stays there when the TUN is moved into another namespace and renamed. SIGTERM or SIGINT
//! (or the TUN vanishing) stops it: the socket file is removed and the TUN is destroyed with
//! its file descriptor. Private keys live only in memory; nothing about keys is logged.

mod csum;
mod in_place;
mod limit;
mod stats;
mod tun;
mod uapi;
mod udp;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use gotatun::device::uapi::UapiServer;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: wg-cni-wgd [-f|--foreground] INTERFACE-NAME";

fn main() -> ExitCode {
    let mut name = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "-f" | "--foreground" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" => {
                println!("wg-cni-wgd {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            _ if name.is_none() && !arg.starts_with('-') => name = Some(arg),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(name) = name else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) || name == "." {
        eprintln!("wg-cni-wgd: invalid interface name {name:?}");
        return ExitCode::from(2);
    }
    // Keys live in this process's memory: no core dumps, no ptrace by non-root.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // gotatun's UAPI parser builds an eyre error for every `key=value` line it reads (an
    // eager `ok_or`), and eyre captures a backtrace when RUST_BACKTRACE=1 is inherited: 40 %
    // of a 1,000-peer `set` went to stack unwinding. Library backtraces are never wanted here;
    // panics still follow RUST_BACKTRACE.
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    let threads = std::env::var("WGD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .clamp(1, 16);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_stack_size(256 * 1024)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wg-cni-wgd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(&name));
    // Exiting closes every descriptor: the TUN goes away wherever it was moved.
    std::process::exit(code)
}

/// The TUN descriptor `WG_TUN_FD` names (inherited from the plugin, which created the device
/// in the pod's namespace). Taken once: the variable is not passed on.
fn adopt_tun(fd: &str) -> std::io::Result<tun::Tun> {
    use std::os::fd::FromRawFd;
    let fd: i32 =
        fd.parse().ok().filter(|fd| *fd > 2).ok_or_else(|| {
            std::io::Error::other(format!("WG_TUN_FD={fd:?} is not a descriptor"))
        })?;
    // SAFETY: an inherited descriptor nothing else in this process owns (checked by TUNGETIFF).
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    tun::Tun::adopt(owned)
}

async fn run(name: &str) -> i32 {
    // Before the socket exists: a SIGTERM right after the first answer must still clean up.
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("wg-cni-wgd: installing signal handlers failed");
        return 1;
    };
    let tun = match std::env::var("WG_TUN_FD") {
        Ok(fd) => adopt_tun(&fd),
        Err(_) => tun::Tun::open(name),
    };
    let tun = match tun {
        Ok(tun) => tun,
        Err(e) => {
            eprintln!("wg-cni-wgd: creating TUN {name}: {e}");
            return 1;
        }
    };
    let dead = tun.dead_signal();
    let (tun_tx, tun_rx) = tun.split();
    let udp = udp::Factory::new();
    let shared = udp.shared();
    let (client, server) = UapiServer::new();
    let device = match gotatun::device::build()
        .with_udp(udp)
        .with_ip_pair(tun_tx, tun_rx)
        .with_uapi(server)
        .build()
        .await
    {
        Ok(device) => device,
        Err(e) => {
            eprintln!("wg-cni-wgd: starting the device: {e}");
            return 1;
        }
    };
    let listener = match uapi::listen(name) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "wg-cni-wgd: opening {}: {e}",
                uapi::socket_path(name).display()
            );
            return 1;
        }
    };
    let socket = uapi::socket_path(name);
    let device = Arc::new(device);
    let handlers = uapi::Handlers {
        client,
        device: Arc::downgrade(&device),
        shared: Arc::clone(&shared),
    };
    let serving = tokio::spawn(uapi::serve(listener, handlers));

    let code = tokio::select! {
        _ = term.recv() => 0,
        _ = int.recv() => 0,
        _ = dead.notified() => {
            eprintln!("wg-cni-wgd: TUN {name} is gone, exiting");
            0
        }
    };
    let _ = std::fs::remove_file(&socket);
    if std::env::var("WGD_STATS").is_ok_and(|v| v == "1") {
        stats::print();
    }
    serving.abort();
    // A request or handshake in flight may hold the device a moment: then dropping it stops
    // it (and the process exits right after either way).
    if let Ok(device) = Arc::try_unwrap(device) {
        let _ = tokio::time::timeout(Duration::from_secs(1), device.stop()).await;
    }
    code
}
