//! Whether a peer's byte counters moved for data or only for WireGuard's own messages. A
//! direct peer is idle when no data went either way, yet its counters also move for a passive
//! keepalive (sent 10 s after data was received and none sent: the end that received last
//! sends one, which would restart the other end's idle time) and for handshakes (wg-cni-wgd
//! renews a session on a timer, whether data flows or not).
//!
//! On the wire a keepalive is 32 bytes, a handshake initiation 148 and a response 92; the
//! initiator follows the response with a keepalive. Backends count differently (the kernel
//! counts received messages as sent; wg-cni-wgd counts a received data message by its
//! plaintext, so a received keepalive as 0), but each reading of an idle peer moves a counter
//! by one of a few sums. Data can make the same sum once; an idle time of minutes needs a
//! counter that moved in none of its readings (a second apart).

/// What one reading of a counter can move by without data: nothing, a keepalive, a response,
/// a response and a keepalive, an initiation, an initiation and a keepalive.
const WITHOUT_DATA: [u64; 6] = [0, 32, 92, 92 + 32, 148, 148 + 32];

/// Whether a counter that went from `before` to `after` counted data, not only keepalives and
/// handshake messages. A counter that went back (the peer was added anew) counted none.
pub fn carried_data(before: u64, after: u64) -> bool {
    after > before && !WITHOUT_DATA.contains(&(after - before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_and_handshakes_are_no_data() {
        assert!(!carried_data(1000, 1000));
        assert!(!carried_data(1000, 1032), "one keepalive");
        assert!(!carried_data(1000, 1148), "an initiation");
        assert!(!carried_data(1000, 1092), "a response");
        assert!(
            !carried_data(1000, 1000 + 148 + 32),
            "an initiation and the keepalive after it (kernel, responder's rx)"
        );
        assert!(
            !carried_data(5, 4),
            "a counter that went back (a new peer) is read as none"
        );
    }

    #[test]
    fn data_is_data() {
        assert!(carried_data(0, 48), "the smallest data message");
        assert!(carried_data(0, 84), "a ping's plaintext (wg-cni-wgd's rx)");
        assert!(carried_data(0, 32 + 1424), "a full one");
        assert!(carried_data(0, 2 * 32 + 2 * 96), "two pings");
    }
}
