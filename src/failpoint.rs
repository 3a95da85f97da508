//! Fault injection for the test suites: `WG_CNI_FAILPOINT=name[,name…]` makes the named
//! point fail (an error, as the real failure would), kill the process (as `kill -9` would,
//! at an instant a test cannot hit reliably from outside), panic or pause once. Unset, every
//! point is a no-op.

use crate::cni::{Error, Result};

const VARIABLE: &str = "WG_CNI_FAILPOINT";

fn armed(name: &str) -> bool {
    std::env::var(VARIABLE).is_ok_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// Return an error at `name` when armed.
pub fn fail(name: &str) -> Result<()> {
    if armed(name) {
        return Err(Error::wireguard(
            format!("failpoint {name}"),
            std::io::Error::other("injected failure"),
        ));
    }
    Ok(())
}

/// Die at `name` as if killed with SIGKILL, when armed: nothing after it runs, no destructor.
pub fn crash(name: &str) {
    if armed(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Panic at `name` when armed, the first time this process passes it (a task that panics
/// once, to prove that whatever supervises it starts it again).
pub fn panic_once(name: &str) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if armed(name) && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        panic!("failpoint {name}");
    }
}

/// Pause at `name` for `pause` when armed, the first time this process passes it (a window in
/// which a test makes something happen that would otherwise race). Logged, so the test knows.
pub fn pause_once(name: &str, pause: std::time::Duration) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if armed(name) && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(failpoint = name, ?pause, "failpoint: pausing");
        std::thread::sleep(pause);
        tracing::warn!(failpoint = name, "failpoint: going on");
    }
}
