//! Handshake initiations that carry a cookie (a non-zero mac2): limited per source address and
//! port while the device is under load, in the receive path, before gotatun pays an X25519.
//!
//! Why: gotatun counts initiations per source *address* (100 a second) and beyond that answers
//! with cookie replies, but it takes up every initiation whose mac2 is valid, unlimited. A flood
//! that echoes the cookies (a kernel WireGuard link does so by itself) then costs the daemon an
//! X25519 per initiation, its socket overflows, and a legitimate peer behind the flood's address
//! (a pod link on the flooding node) queues behind the flood or is lost with the overflow, each
//! loss costing it another 5 s retry. Every pod link has a UDP socket of its own, so that peer
//! and the flood differ in source port: a token bucket per (address, port) lets the peer's
//! initiations through (one per 5 s while it retries, REKEY_TIMEOUT) and the flood's only at a
//! trickle. WireGuard's kernel module limits cookie-bearing initiations per *address* (20 a
//! second, burst 5), which would starve the peer that shares the address; the numbers are its.
//!
//! What this cannot do: mac2 is not checked here (gotatun holds the cookie secret), so a
//! cookie-bearing initiation is charged whether its mac2 is valid or not, and whoever can forge
//! packets from a peer's address *and* port can use up that peer's bucket. Sources beyond the
//! table's room evict each other and get through (as many addresses or ports, each with its own
//! cookie, get past any per-source limit); floods from many sources are the README's spray case.
//!
//! Bounded: one table of `SETS` x `WAYS` buckets, allocated the first time the device is under
//! load and never grown; a source takes its set's free slot, else one that has refilled (as good
//! as absent: that is how entries age out), else the least recently used. Per packet: a keyed
//! hash and a look at `WAYS` slots, no allocation.

use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// A handshake initiation: 148 bytes, mac2 last, message type 1 in the first byte. gotatun reads
/// only that byte (the three reserved ones may hold anything), and so must we: a check of all
/// four would let initiations with a non-zero reserved byte past the limit into gotatun.
const INIT_LEN: usize = 148;
const MAC2_AT: usize = 132;
/// The device is under load while more than `LOAD_PER_WINDOW` initiations (any, with or without
/// mac2) arrive within `LOAD_WINDOW`, and for `LOAD_HOLD` after (WireGuard's "under load" also
/// holds for a second). 500 a second: far above what legitimate peers send (a handshake per peer
/// every two minutes), far below the X25519s a core does (~15,000 a second on this machine).
const LOAD_WINDOW: u64 = 100_000_000;
const LOAD_PER_WINDOW: u32 = 50;
const LOAD_HOLD: u64 = 1_000_000_000;
/// Cookie-bearing initiations per second and source, and the burst (the kernel's numbers).
const PER_SECOND: u64 = 20;
const BURST: u64 = 5;
/// Credit, in nanoseconds: an initiation costs `COST`, credit accrues with time up to `FULL`.
const COST: u64 = 1_000_000_000 / PER_SECOND;
const FULL: u64 = BURST * COST;
/// 4,096 buckets (160 KiB): room for as many sources sending cookie-bearing initiations at once
/// (one source is one remote WireGuard device); 4 ways, so that a few busy sources hashed to one
/// set do not evict each other.
const SETS: usize = 1024;
const WAYS: usize = 4;

/// A source: its address as IPv6 (IPv4 mapped) and its port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Source(u128, u16);

impl Source {
    fn of(addr: SocketAddr) -> Source {
        let ip = match addr.ip() {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        Source(u128::from(ip), addr.port())
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    source: Source,
    used: bool,
    /// Credit in nanoseconds as of `last`.
    credit: u64,
    last: u64,
}

impl Bucket {
    fn credit_at(&self, now: u64) -> u64 {
        (self.credit + now.saturating_sub(self.last)).min(FULL)
    }

    /// Takes one initiation's credit, if there is enough.
    fn take(&mut self, now: u64) -> bool {
        self.credit = self.credit_at(now);
        self.last = now;
        if self.credit >= COST {
            self.credit -= COST;
            true
        } else {
            false
        }
    }
}

pub struct Limiter {
    start: Instant,
    window_start: u64,
    window_count: u32,
    /// Under load until then (nanoseconds since `start`).
    loaded_until: u64,
    /// Keyed (random per limiter): a remote party cannot pick ports that share a set with a
    /// peer's.
    hasher: RandomState,
    table: Option<Box<[Bucket]>>,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter {
            start: Instant::now(),
            window_start: 0,
            window_count: 0,
            loaded_until: 0,
            hasher: RandomState::new(),
            table: None,
        }
    }

    /// The clock `admit` takes (nanoseconds): read once per batch of datagrams.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether a datagram from `src` goes on to the device; false drops it.
    pub fn admit(&mut self, datagram: &[u8], src: SocketAddr, now: u64) -> bool {
        if datagram.len() != INIT_LEN || datagram[0] != 1 {
            return true;
        }
        let loaded = self.count_initiation(now);
        if !loaded || datagram[MAC2_AT..] == [0; INIT_LEN - MAC2_AT] {
            return true;
        }
        self.bucket(Source::of(src), now).take(now)
    }

    /// Counts an arriving initiation; answers whether the device is under load.
    fn count_initiation(&mut self, now: u64) -> bool {
        if now.saturating_sub(self.window_start) >= LOAD_WINDOW {
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count = self.window_count.saturating_add(1);
        if self.window_count > LOAD_PER_WINDOW {
            self.loaded_until = now + LOAD_HOLD;
        }
        now < self.loaded_until
    }

    fn bucket(&mut self, source: Source, now: u64) -> &mut Bucket {
        let set = self.hasher.hash_one(source) as usize % SETS;
        // The one allocation, made once: a daemon never under load never pays for the table.
        let table = self
            .table
            .get_or_insert_with(|| vec![Bucket::default(); SETS * WAYS].into_boxed_slice());
        slot(&mut table[set * WAYS..(set + 1) * WAYS], source, now)
    }

    #[cfg(test)]
    fn buckets_in_use(&self) -> usize {
        self.table
            .as_ref()
            .map_or(0, |t| t.iter().filter(|b| b.used).count())
    }
}

/// `source`'s bucket in its set: its own, else a new one (full) in a free slot, in one that has
/// refilled (a source quiet for `FULL` is as good as absent), or in the least recently used.
fn slot(ways: &mut [Bucket], source: Source, now: u64) -> &mut Bucket {
    if let Some(i) = ways.iter().position(|b| b.used && b.source == source) {
        return &mut ways[i];
    }
    let i = ways
        .iter()
        .position(|b| !b.used || b.credit_at(now) == FULL)
        .unwrap_or_else(|| {
            (0..ways.len())
                .min_by_key(|&i| ways[i].last)
                .expect("a set has slots")
        });
    ways[i] = Bucket {
        source,
        used: true,
        credit: FULL,
        last: now,
    };
    &mut ways[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn initiation(mac2: bool) -> [u8; INIT_LEN] {
        let mut msg = [0x5a; INIT_LEN];
        msg[0] = 1; // the reserved bytes after it stay 0x5a: gotatun ignores them
        if !mac2 {
            msg[MAC2_AT..].fill(0);
        }
        msg
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 250, 0, 12], port))
    }

    /// Puts the limiter under load at `now` (initiations without mac2, from elsewhere).
    fn load(limiter: &mut Limiter, now: u64) {
        for _ in 0..=LOAD_PER_WINDOW {
            assert!(limiter.admit(&initiation(false), at(1), now));
        }
    }

    /// How many of `n` cookie-bearing initiations from `src` at `now` pass.
    fn passed(limiter: &mut Limiter, src: SocketAddr, now: u64, n: usize) -> usize {
        (0..n)
            .filter(|_| limiter.admit(&initiation(true), src, now))
            .count()
    }

    #[test]
    fn under_load_a_source_gets_its_burst_then_its_rate() {
        let mut limiter = Limiter::new();
        load(&mut limiter, 0);
        assert_eq!(passed(&mut limiter, at(40000), 0, 100), BURST as usize);
        // Credit comes back at PER_SECOND: one every 50 ms, never more than the burst.
        assert_eq!(passed(&mut limiter, at(40000), 50 * MS, 100), 1);
        assert_eq!(passed(&mut limiter, at(40000), 60 * MS, 100), 0);
        load(&mut limiter, 900 * MS);
        assert_eq!(
            passed(&mut limiter, at(40000), 900 * MS, 100),
            BURST as usize
        );
    }

    #[test]
    fn a_flood_does_not_use_up_another_port_of_its_address() {
        let mut limiter = Limiter::new();
        for tick in 0..200u64 {
            let now = tick * 10 * MS;
            load(&mut limiter, now);
            passed(&mut limiter, at(40000), now, 100);
            // The legitimate peer: one initiation every 5 s (WireGuard's retry), always passes.
            if tick % 50 == 0 {
                assert_eq!(passed(&mut limiter, at(51820), now, 1), 1, "at {tick}");
            }
        }
    }

    #[test]
    fn without_load_or_without_mac2_nothing_is_dropped() {
        let mut limiter = Limiter::new();
        // LOAD_PER_WINDOW cookie-bearing initiations in a window: not load yet.
        assert_eq!(
            passed(&mut limiter, at(40000), 0, LOAD_PER_WINDOW as usize),
            LOAD_PER_WINDOW as usize
        );
        assert_eq!(limiter.buckets_in_use(), 0, "no table without load");
        load(&mut limiter, 10 * MS);
        for _ in 0..1000 {
            assert!(limiter.admit(&initiation(false), at(40000), 10 * MS));
        }
        // Other messages: a cookie-bearing initiation's bytes in another length or type.
        let init = initiation(true);
        let mut response = init;
        response[0] = 2;
        for _ in 0..1000 {
            assert!(limiter.admit(&init[..92], at(40000), 10 * MS));
            assert!(limiter.admit(&response, at(40000), 10 * MS));
        }
    }

    #[test]
    fn load_ends_a_second_after_the_last_busy_window() {
        let mut limiter = Limiter::new();
        load(&mut limiter, 0);
        assert_eq!(passed(&mut limiter, at(40000), 0, 10), BURST as usize);
        // Still under load just before the hold ends, not after it.
        assert_eq!(
            passed(&mut limiter, at(40000), 999 * MS, 10),
            BURST as usize
        );
        // (20 more in the window that began at 999 ms: not load by themselves.)
        assert_eq!(passed(&mut limiter, at(40000), 1001 * MS, 20), 20);
    }

    #[test]
    fn a_cookie_bearing_flood_alone_puts_the_device_under_load() {
        let mut limiter = Limiter::new();
        let through = passed(&mut limiter, at(40000), 0, 1000);
        assert_eq!(through, LOAD_PER_WINDOW as usize + BURST as usize);
    }

    #[test]
    fn the_table_stays_bounded_under_a_spray_of_sources() {
        let mut limiter = Limiter::new();
        // 200,000 sources, 1,000 every 10 ms: each new one gets a slot (at worst the least
        // recently used one, so a spray gets through: the documented limit) and the table
        // never grows.
        for round in 0..200u64 {
            let now = round * 10 * MS;
            load(&mut limiter, now);
            for k in 0..1000u64 {
                let port = (round * 1000 + k) as u16;
                let addr = SocketAddr::from(([10, 251, round as u8, 1], port));
                assert!(limiter.admit(&initiation(true), addr, now));
            }
        }
        assert_eq!(limiter.buckets_in_use(), SETS * WAYS);
        assert_eq!(limiter.table.as_ref().map(|t| t.len()), Some(SETS * WAYS));
        assert_eq!(passed(&mut limiter, at(51820), 2000 * MS, 1), 1);
    }

    #[test]
    fn a_newcomer_takes_a_refilled_slot_before_a_busy_one() {
        let source = |port| Source::of(at(port));
        let ports = |ways: &[Bucket]| {
            let mut p: Vec<u16> = ways.iter().filter(|b| b.used).map(|b| b.source.1).collect();
            p.sort();
            p
        };
        let mut ways = [Bucket::default(); WAYS];
        // Ports 0, 2 and 3 spend their burst at 0 ms; port 1 sends one at 60 ms.
        for port in [0, 2, 3] {
            for _ in 0..BURST {
                assert!(slot(&mut ways, source(port), 0).take(0));
            }
        }
        assert!(slot(&mut ways, source(1), 60 * MS).take(60 * MS));
        // At 120 ms port 1 has refilled (quiet for a cost's worth): it makes room, though 0, 2
        // and 3 were seen less recently.
        assert!(slot(&mut ways, source(9), 120 * MS).take(120 * MS));
        assert_eq!(ports(&ways), [0, 2, 3, 9]);
        // All busy: the least recently used goes (0, 2 and 3 were last seen at 0 ms; 0 first).
        assert!(slot(&mut ways, source(10), 130 * MS).take(130 * MS));
        assert_eq!(ports(&ways), [2, 3, 9, 10]);
        // A known source keeps its own bucket, spent credit included.
        let own = slot(&mut ways, source(9), 130 * MS);
        assert_eq!((own.credit, own.last), (FULL - COST, 120 * MS));
    }

    #[test]
    fn ipv4_and_its_mapped_ipv6_form_are_one_source() {
        let v4: SocketAddr = "10.250.0.12:40000".parse().unwrap();
        let v6: SocketAddr = "[::ffff:10.250.0.12]:40000".parse().unwrap();
        assert!(Source::of(v4) == Source::of(v6));
        assert!(Source::of(v4) != Source::of(at(40001)));
    }
}
