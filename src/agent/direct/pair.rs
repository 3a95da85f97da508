//! One pod pair's way from the relay to a direct peer and back, as a state machine without
//! I/O: it is told what happened (relayed traffic seen, what the device says of the peer, the
//! time) and answers what to write. The promoter does the writes.
//!
//! - **Pending**: the peer is on the local link with its key and endpoint and no allowed IPs
//!   (traffic still goes through the gateway). The end with the lower key starts the
//!   handshake, and starts it over on a growing schedule (the other end may not hold our key
//!   yet: its agent sees the flow a moment later), so initiations never cross. No handshake
//!   within `PENDING_TIMEOUT`: the peer is removed and the pair backs off.
//! - **Direct**: the handshake completed; the pod's addresses moved to the peer. Idle (no data
//!   in either direction) for the network's `idlePeerTimeout`: the addresses go back to the
//!   gateway. Relayed traffic seen for the pair after `SWITCH_GRACE` means the other end does
//!   not send directly (it trimmed, restarted, timed out). An end that trimmed with its session
//!   live routes again the moment it sees its pair relayed, so the pair is first *in doubt*
//!   for `DOUBT`: data received directly in that time keeps it direct (whatever this end sent
//!   to the relay meanwhile would only be dropped twice); none, and the addresses go back, so
//!   no pair stays cut off.
//! - **Cooling**: key kept without addresses for `COOLDOWN`, so the other end, which trims a
//!   little later or not at all yet, is still understood: data from it restores the route.
//!   Relayed traffic promotes again (a live session routes at once, without waiting for a
//!   read of the device: the other end, still direct, drops what the relay brings it until
//!   then), but after a demotion for
//!   relayed traffic only once `BACKOFF` passed: the other end's agent may be gone in the
//!   middle of a promotion, and the pair must not flap. Then the peer is removed.

use std::time::{Duration, Instant};

use crate::wireguard::traffic::carried_data;

/// A pending peer without a handshake for this long is removed.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// After a pending peer timed out, relayed traffic does not promote the pair for this long.
pub const BACKOFF: Duration = Duration::from_secs(30);
/// Relayed packets still in flight when both ends switched are not a sign of trouble.
pub const SWITCH_GRACE: Duration = Duration::from_secs(2);
/// How long a demoted peer's key stays (longest: shorter idle timeouts shorten it).
pub const COOLDOWN: Duration = Duration::from_secs(15);
/// Both ends give the pair its addresses this long after their own handshake: the two
/// handshake times lie half a round trip apart (each read off its own device, so no clock is
/// compared between nodes), and so do the two switches, however the polls fall. WireGuard
/// drops a packet whose source belongs to another peer: whatever is sent between the two
/// switches is lost. Longer than a pending poll and its read.
pub const SWITCH_DELAY: Duration = Duration::from_millis(40);
/// How long after a demotion for relayed traffic the peer is read as often as a pending one.
const FAST_COOLING: Duration = Duration::from_millis(500);
/// How long a direct pair seen relayed waits for data from the other end before it goes back
/// to the relay: the other end, if it trimmed with a live session, routes again on seeing the
/// same flow, within a pending poll or two of its relay watch.
pub const DOUBT: Duration = Duration::from_millis(100);
/// A switch due this soon is done now.
const SWITCH_SLACK: Duration = Duration::from_millis(1);
/// A session this young is live: WireGuard rekeys every two minutes while data flows.
pub const SESSION_ALIVE: Duration = Duration::from_secs(120);
/// When the initiating end starts the handshake over, counted from the promotion: every
/// 250 ms or less in the first second (the other end's agent may hear of the pair up to a
/// second later, when the relay watch logs the pair again, and drops every initiation until
/// then), then less often.
const RESTARTS: [Duration; 8] = [
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(500),
    Duration::from_millis(750),
    Duration::from_millis(1000),
    Duration::from_millis(1500),
    Duration::from_millis(2500),
    Duration::from_millis(4000),
];

/// A write the promoter does for the pair, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The peer with key and endpoint, no allowed IPs.
    AddPending,
    /// Start a handshake now.
    Kick,
    /// Remove and add the pending peer again (a clean handshake state), then kick.
    Restart,
    /// Give the peer the remote pod's addresses.
    Route,
    /// Take them back (the gateway carries the pair again).
    Unroute,
    /// Remove the peer.
    Remove,
    /// Delete this node's conntrack entries of the pair (the path changed).
    ForgetConntrack,
}

/// What the local device says of the pair's peer.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub handshake_age: Option<Duration>,
    pub rx: u64,
    pub tx: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    Pending {
        since: Instant,
        restarts: usize,
        /// When to switch, once the handshake is seen.
        route_at: Option<Instant>,
    },
    Direct {
        since: Instant,
        last_active: Instant,
        rx: u64,
        tx: u64,
        /// Relayed traffic was seen: the other end may not send directly any more.
        doubt: Option<Doubt>,
    },
    Cooling {
        since: Instant,
        /// When the session last shook hands, as last read (`None`: not read yet).
        shook: Option<Instant>,
        /// The received bytes counted when cooling began (`None`: read at the next look; the
        /// promoter's last reading may be a second old, and data received since then would
        /// read as the other end still sending directly).
        rx: Option<u64>,
        /// Relayed traffic does not promote the pair again before this (set when the other
        /// end was seen not direct: its agent may be gone mid-promotion).
        hold_until: Option<Instant>,
    },
    Backoff {
        until: Instant,
    },
    /// Removed; the promoter forgets the pair.
    Done,
}

/// A direct pair's wait for data from the other end after relayed traffic was seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Doubt {
    until: Instant,
    /// The received bytes when the doubt began (`None`: read at the next look; the last
    /// reading may be a second old).
    rx: Option<u64>,
}

impl Phase {
    /// Direct from `now` on, the counters as `seen`.
    fn direct(now: Instant, seen: Seen) -> Phase {
        Phase::Direct {
            since: now,
            last_active: now,
            rx: seen.rx,
            tx: seen.tx,
            doubt: None,
        }
    }

    /// Cooling from `now` on, the device as `seen`.
    fn cooling(now: Instant, seen: Seen) -> Phase {
        Phase::Cooling {
            since: now,
            shook: shook(now, seen),
            rx: Some(seen.rx),
            hold_until: None,
        }
    }
}

/// When the peer's session shook hands, if it is live.
fn shook(now: Instant, seen: Seen) -> Option<Instant> {
    seen.handshake_age
        .filter(|age| *age < SESSION_ALIVE)
        .and_then(|age| now.checked_sub(age))
}

#[derive(Debug, Clone)]
pub struct Pair {
    pub phase: Phase,
    /// This end starts the handshakes (its key is the lower one).
    pub initiator: bool,
}

impl Pair {
    /// A pair seen relayed for the first time.
    pub fn promote(now: Instant, initiator: bool) -> (Pair, Vec<Action>) {
        let mut actions = vec![Action::AddPending];
        if initiator {
            actions.push(Action::Kick);
        }
        let pair = Pair {
            phase: Phase::Pending {
                since: now,
                restarts: 0,
                route_at: None,
            },
            initiator,
        };
        (pair, actions)
    }

    /// A peer found on the link (after a restart of the agent): taken as it is.
    pub fn adopt(now: Instant, initiator: bool, routed: bool, seen: Seen) -> Pair {
        let phase = match routed {
            true => Phase::direct(now, seen),
            false => Phase::cooling(now, seen),
        };
        Pair { phase, initiator }
    }

    /// Whether the pair counts against the link's `maxDirectPeers`.
    pub fn holds_a_peer(&self) -> bool {
        !matches!(self.phase, Phase::Backoff { .. } | Phase::Done)
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.phase, Phase::Pending { .. })
    }

    pub fn is_cooling(&self) -> bool {
        matches!(self.phase, Phase::Cooling { .. })
    }

    /// Whether the promoter should read the peer as often as it can: waiting for a handshake,
    /// in doubt after relayed traffic, or just demoted for it (the other end, which sent it,
    /// commonly goes direct again at once, and whatever it sends directly is dropped here
    /// until this end routes).
    pub fn wants_fast_reads(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Pending { .. } => true,
            Phase::Direct { doubt, .. } => doubt.is_some(),
            Phase::Cooling {
                since,
                rx,
                hold_until,
                ..
            } => rx.is_none() || (hold_until.is_some() && now.duration_since(since) < FAST_COOLING),
            _ => false,
        }
    }

    /// When a pending pair with its handshake done switches (the promoter looks then).
    pub fn route_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Pending { route_at, .. } => route_at,
            _ => None,
        }
    }

    /// Relayed traffic between the two pods passed this node's gateway at `now`.
    pub fn relayed(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Pending { .. } => Vec::new(),
            Phase::Direct { since, .. } if now.duration_since(since) < SWITCH_GRACE => Vec::new(),
            Phase::Direct { doubt: Some(_), .. } => Vec::new(),
            Phase::Direct {
                since,
                last_active,
                rx,
                tx,
                doubt: None,
            } => {
                self.phase = Phase::Direct {
                    since,
                    last_active,
                    rx,
                    tx,
                    doubt: Some(Doubt {
                        until: now + DOUBT,
                        rx: None,
                    }),
                };
                Vec::new()
            }
            Phase::Cooling {
                hold_until: Some(until),
                ..
            } if now < until => Vec::new(),
            // Read before this end trimmed: the other end's, which was not direct then.
            Phase::Cooling { since, .. } if now < since => Vec::new(),
            Phase::Cooling {
                shook: Some(shook),
                rx,
                ..
            } if now.duration_since(shook) < SESSION_ALIVE => {
                let rx = rx.unwrap_or_default();
                self.phase = Phase::Direct {
                    since: now,
                    last_active: now,
                    rx,
                    tx: 0,
                    doubt: None,
                };
                vec![Action::Route, Action::ForgetConntrack]
            }
            Phase::Cooling { .. } => {
                self.phase = Phase::Pending {
                    since: now,
                    restarts: 0,
                    route_at: None,
                };
                match self.initiator {
                    true => vec![Action::Kick],
                    false => Vec::new(),
                }
            }
            Phase::Backoff { until } if now < until => Vec::new(),
            Phase::Backoff { .. } | Phase::Done => {
                let (pair, actions) = Pair::promote(now, self.initiator);
                *self = pair;
                actions
            }
        }
    }

    /// What the device says now (`None`: the link no longer has the peer). `idle_timeout` is
    /// the network's; `stale_remote`: the other pod's node agent is silent (no trim then: a
    /// stale node cannot take its end back, and would drop the relayed packets).
    pub fn observe(
        &mut self,
        now: Instant,
        seen: Option<Seen>,
        idle_timeout: Duration,
        stale_remote: bool,
    ) -> Vec<Action> {
        let Some(seen) = seen else {
            // Removed under us (the pod's link went, or a resync): nothing left to undo.
            if !matches!(self.phase, Phase::Backoff { .. }) {
                self.phase = Phase::Done;
            }
            return Vec::new();
        };
        match self.phase {
            Phase::Pending {
                since, restarts, ..
            } => {
                if let Some(age) = seen.handshake_age.filter(|age| *age < SESSION_ALIVE) {
                    let route_at = now
                        .checked_sub(age)
                        .map_or(now, |shook| shook + SWITCH_DELAY);
                    if route_at > now + SWITCH_SLACK {
                        self.phase = Phase::Pending {
                            since,
                            restarts,
                            route_at: Some(route_at),
                        };
                        return Vec::new();
                    }
                    self.phase = Phase::direct(now, seen);
                    return vec![Action::Route, Action::ForgetConntrack];
                }
                let waited = now.duration_since(since);
                if waited >= PENDING_TIMEOUT {
                    self.phase = Phase::Backoff {
                        until: now + BACKOFF,
                    };
                    return vec![Action::Remove];
                }
                if self.initiator && RESTARTS.get(restarts).is_some_and(|at| waited >= *at) {
                    self.phase = Phase::Pending {
                        since,
                        restarts: restarts + 1,
                        route_at: None,
                    };
                    return vec![Action::Restart];
                }
                Vec::new()
            }
            Phase::Direct {
                since,
                last_active,
                rx,
                tx,
                doubt,
            } => {
                let last_active = match carried_data(rx, seen.rx) || carried_data(tx, seen.tx) {
                    true => now,
                    false => last_active,
                };
                let doubt = match doubt {
                    Some(Doubt { rx: None, until }) => Some(Doubt {
                        until,
                        rx: Some(seen.rx),
                    }),
                    // The other end sends directly.
                    Some(Doubt { rx: Some(rx), .. }) if carried_data(rx, seen.rx) => None,
                    Some(Doubt { until, .. }) if now >= until => {
                        self.phase = Phase::Cooling {
                            since: now,
                            shook: None,
                            rx: None,
                            hold_until: Some(now + BACKOFF),
                        };
                        return vec![Action::Unroute, Action::ForgetConntrack];
                    }
                    doubt => doubt,
                };
                self.phase = Phase::Direct {
                    since,
                    last_active,
                    rx: seen.rx,
                    tx: seen.tx,
                    doubt,
                };
                if !stale_remote && now.duration_since(last_active) >= idle_timeout {
                    self.phase = Phase::cooling(now, seen);
                    return vec![Action::Unroute, Action::ForgetConntrack];
                }
                Vec::new()
            }
            Phase::Cooling {
                since,
                rx: None,
                hold_until,
                ..
            } => {
                self.phase = Phase::Cooling {
                    since,
                    shook: shook(now, seen),
                    rx: Some(seen.rx),
                    hold_until,
                };
                Vec::new()
            }
            Phase::Cooling {
                since,
                rx: Some(rx),
                hold_until,
                ..
            } => {
                let shook = shook(now, seen);
                if carried_data(rx, seen.rx) && shook.is_some() {
                    // The other end still sends directly: take it back before its data is lost.
                    self.phase = Phase::direct(now, seen);
                    return vec![Action::Route, Action::ForgetConntrack];
                }
                if now.duration_since(since) >= COOLDOWN.min(idle_timeout) {
                    self.phase = match hold_until {
                        Some(until) if until > now => Phase::Backoff { until },
                        _ => Phase::Done,
                    };
                    return vec![Action::Remove];
                }
                self.phase = Phase::Cooling {
                    since,
                    shook,
                    rx: Some(rx),
                    hold_until,
                };
                Vec::new()
            }
            Phase::Backoff { .. } | Phase::Done => Vec::new(),
        }
    }

    /// The pair's backoff ended or it was removed: nothing to keep.
    pub fn is_over(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Done => true,
            Phase::Backoff { until } => now >= until,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(300);

    fn seen(handshake_ms: Option<u64>, rx: u64, tx: u64) -> Option<Seen> {
        Some(Seen {
            handshake_age: handshake_ms.map(Duration::from_millis),
            rx,
            tx,
        })
    }

    #[test]
    fn the_lower_key_kicks_and_restarts_the_other_waits() {
        let t0 = Instant::now();
        let (mut initiator, actions) = Pair::promote(t0, true);
        assert_eq!(actions, [Action::AddPending, Action::Kick]);
        let (mut responder, actions) = Pair::promote(t0, false);
        assert_eq!(actions, [Action::AddPending]);
        let at = t0 + Duration::from_millis(200);
        assert_eq!(
            initiator.observe(at, seen(None, 0, 0), IDLE, false),
            [Action::Restart]
        );
        assert!(
            initiator
                .observe(at, seen(None, 0, 0), IDLE, false)
                .is_empty()
        );
        assert!(
            responder
                .observe(at, seen(None, 0, 0), IDLE, false)
                .is_empty()
        );
    }

    #[test]
    fn a_handshake_routes_and_idleness_trims_after_a_cooldown() {
        let t0 = Instant::now();
        let (mut pair, _) = Pair::promote(t0, false);
        let t1 = t0 + Duration::from_millis(30);
        assert!(
            pair.observe(t1, seen(Some(5), 148, 92), IDLE, false)
                .is_empty(),
            "the switch waits for SWITCH_DELAY after the handshake"
        );
        assert_eq!(
            pair.route_at(),
            Some(t1 - Duration::from_millis(5) + SWITCH_DELAY)
        );
        let t1 = t1 + SWITCH_DELAY;
        assert_eq!(
            pair.observe(t1, seen(Some(45), 148, 92), IDLE, false),
            [Action::Route, Action::ForgetConntrack]
        );
        let busy = t1 + Duration::from_secs(200);
        assert!(
            pair.observe(busy, seen(Some(5), 9000, 9000), IDLE, false)
                .is_empty()
        );
        let idle = busy + IDLE;
        assert!(
            pair.observe(idle, seen(Some(5), 9000, 9000), IDLE, true)
                .is_empty(),
            "no trim toward a stale node"
        );
        assert_eq!(
            pair.observe(idle, seen(Some(5), 9000, 9000), IDLE, false),
            [Action::Unroute, Action::ForgetConntrack]
        );
        let later = idle + COOLDOWN;
        assert_eq!(
            pair.observe(later, seen(Some(5), 9000, 9000), IDLE, false),
            [Action::Remove]
        );
        assert!(pair.is_over(later));
    }

    #[test]
    fn data_from_the_other_end_while_cooling_restores_the_route() {
        let t0 = Instant::now();
        let mut pair = Pair::adopt(t0, true, false, seen(Some(5), 10, 10).unwrap());
        assert_eq!(
            pair.observe(t0, seen(Some(5), 200, 10), IDLE, false),
            [Action::Route, Action::ForgetConntrack]
        );
    }

    /// Direct from `t0`, the counters at zero.
    fn direct_pair(t0: Instant) -> Pair {
        let (mut pair, _) = Pair::promote(t0, true);
        pair.observe(t0, seen(Some(50), 0, 0), IDLE, false);
        assert!(matches!(pair.phase, Phase::Direct { .. }));
        pair
    }

    #[test]
    fn relayed_traffic_while_direct_unroutes_after_the_switch_grace_and_a_doubt() {
        let t0 = Instant::now();
        let mut pair = direct_pair(t0);
        assert!(pair.relayed(t0 + Duration::from_millis(500)).is_empty());
        assert!(!pair.wants_fast_reads(t0));
        let late = t0 + SWITCH_GRACE + Duration::from_millis(1);
        assert!(pair.relayed(late).is_empty(), "in doubt first");
        assert!(pair.wants_fast_reads(late), "read while in doubt");
        let look = late + Duration::from_millis(10);
        assert!(
            pair.observe(look, seen(Some(50), 0, 96), IDLE, false)
                .is_empty()
        );
        assert!(
            pair.observe(look + DOUBT / 2, seen(Some(50), 0, 192), IDLE, false)
                .is_empty(),
            "sent, nothing received: still in doubt"
        );
        assert_eq!(
            pair.observe(late + DOUBT, seen(Some(50), 0, 288), IDLE, false),
            [Action::Unroute, Action::ForgetConntrack]
        );
        let late = late + DOUBT;
        assert!(
            pair.relayed(late + BACKOFF / 2).is_empty(),
            "the other end may be gone mid-promotion: no flapping"
        );
        assert_eq!(
            pair.relayed(late + BACKOFF),
            [Action::Kick],
            "cooling, no session read: promoted again"
        );
        assert!(pair.is_pending());
    }

    #[test]
    fn data_from_the_other_end_ends_the_doubt() {
        let t0 = Instant::now();
        let mut pair = direct_pair(t0);
        let late = t0 + SWITCH_GRACE + Duration::from_millis(1);
        assert!(pair.relayed(late).is_empty());
        let look = late + Duration::from_millis(10);
        pair.observe(look, seen(Some(50), 1000, 0), IDLE, false);
        assert!(
            pair.observe(
                look + Duration::from_millis(10),
                seen(Some(50), 1096, 0),
                IDLE,
                false
            )
            .is_empty()
        );
        assert!(!pair.wants_fast_reads(look), "no doubt left");
        assert!(
            pair.observe(late + DOUBT * 2, seen(Some(50), 1096, 0), IDLE, false)
                .is_empty(),
            "stays direct past the doubt"
        );
        assert!(matches!(pair.phase, Phase::Direct { .. }));
    }

    #[test]
    fn an_end_that_trimmed_with_a_live_session_routes_at_once_when_traffic_resumes() {
        let t0 = Instant::now();
        let mut pair = direct_pair(t0);
        let idle = t0 + IDLE;
        assert_eq!(
            pair.observe(idle, seen(Some(1000), 0, 0), IDLE, false),
            [Action::Unroute, Action::ForgetConntrack]
        );
        assert!(
            pair.relayed(idle - Duration::from_millis(5)).is_empty(),
            "read before the trim: the other end's"
        );
        assert_eq!(
            pair.relayed(idle + Duration::from_millis(5)),
            [Action::Route, Action::ForgetConntrack],
            "no read of the device first"
        );
        assert!(matches!(pair.phase, Phase::Direct { .. }));

        let mut pair = direct_pair(t0);
        let old = SESSION_ALIVE + Duration::from_secs(1);
        pair.observe(idle, seen(Some(old.as_millis() as u64), 0, 0), IDLE, false);
        assert_eq!(
            pair.relayed(idle + Duration::from_millis(5)),
            [Action::Kick],
            "a dead session needs a handshake"
        );
    }

    #[test]
    fn data_read_after_a_relay_demotion_counts_only_from_the_next_look() {
        let t0 = Instant::now();
        let mut pair = direct_pair(t0);
        pair.observe(t0, seen(Some(50), 1000, 1000), IDLE, false);
        let late = t0 + SWITCH_GRACE + Duration::from_millis(1);
        assert!(pair.relayed(late).is_empty());
        pair.observe(late, seen(Some(50), 1000, 1000), IDLE, false);
        assert_eq!(
            pair.observe(late + DOUBT, seen(Some(50), 1000, 1000), IDLE, false),
            [Action::Unroute, Action::ForgetConntrack]
        );
        // Received directly before the other end went to the relay, after the last reading.
        let look = late + DOUBT + Duration::from_millis(50);
        assert!(
            pair.observe(look, seen(Some(50), 5000, 1000), IDLE, false)
                .is_empty(),
            "data from before the demotion is no sign the other end still sends directly"
        );
        assert_eq!(
            pair.observe(
                look + Duration::from_millis(50),
                seen(Some(50), 5096, 1000),
                IDLE,
                false
            ),
            [Action::Route, Action::ForgetConntrack],
            "data after it is"
        );
    }

    #[test]
    fn a_pending_peer_without_handshake_times_out_and_backs_off() {
        let t0 = Instant::now();
        let (mut pair, _) = Pair::promote(t0, false);
        let timeout = t0 + PENDING_TIMEOUT;
        assert_eq!(
            pair.observe(timeout, seen(None, 0, 0), IDLE, false),
            [Action::Remove]
        );
        assert!(!pair.holds_a_peer());
        assert!(pair.relayed(timeout + Duration::from_secs(1)).is_empty());
        let after = timeout + BACKOFF;
        assert!(pair.is_over(after));
        assert_eq!(pair.relayed(after), [Action::AddPending]);
    }
}
