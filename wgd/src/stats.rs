//! Counters of syscalls and packets, printed to stderr at exit when WGD_STATS=1 (to see how
//! well reads, writes and sends are batched).

use std::sync::atomic::{AtomicU64, Ordering};

pub static TUN_READS: AtomicU64 = AtomicU64::new(0);
pub static TUN_READ_PKTS: AtomicU64 = AtomicU64::new(0);
pub static TUN_WRITES: AtomicU64 = AtomicU64::new(0);
pub static TUN_WRITE_PKTS: AtomicU64 = AtomicU64::new(0);
pub static UDP_SENDMMSG: AtomicU64 = AtomicU64::new(0);
pub static UDP_SEND_MSGS: AtomicU64 = AtomicU64::new(0);
pub static UDP_SEND_PKTS: AtomicU64 = AtomicU64::new(0);
pub static UDP_RECVMMSG: AtomicU64 = AtomicU64::new(0);
pub static UDP_RECV_PKTS: AtomicU64 = AtomicU64::new(0);
/// Cookie-bearing handshake initiations dropped by the limiter (`limit.rs`).
pub static UDP_RECV_DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

pub fn print() {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "wg-cni-wgd stats: tun reads {} -> {} packets; tun writes {} <- {} packets; \
         sendmmsg {} calls, {} messages, {} datagrams; recvmmsg {} calls -> {} datagrams \
         ({} initiations dropped)",
        g(&TUN_READS),
        g(&TUN_READ_PKTS),
        g(&TUN_WRITES),
        g(&TUN_WRITE_PKTS),
        g(&UDP_SENDMMSG),
        g(&UDP_SEND_MSGS),
        g(&UDP_SEND_PKTS),
        g(&UDP_RECVMMSG),
        g(&UDP_RECV_PKTS),
        g(&UDP_RECV_DROPPED),
    );
}
