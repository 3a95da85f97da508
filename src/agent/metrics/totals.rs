//! A link's bytes as a counter that only grows. A device counts per peer, and a peer's
//! counters go when the peer goes (an on-demand direct peer trimmed, a remote pod deleted) or
//! start again from 0 when it is removed and added back: summed as read, a link's bytes would
//! fall, and Prometheus would read every fall as a counter reset (a spike in `rate`). So each
//! scrape keeps what it read per peer, and what a peer had when it went is added to the link.
//! Bytes a peer carried between the last scrape and its removal are not counted.

use std::collections::{HashMap, HashSet};

/// Received and sent bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes {
    pub rx: u64,
    pub tx: u64,
}

#[derive(Debug)]
struct Link<P> {
    /// What peers had when they went (or when their counters started again).
    gone: Bytes,
    /// Each peer's counters as last read, by public key.
    peers: HashMap<P, Bytes>,
}

impl<P> Default for Link<P> {
    fn default() -> Self {
        Link {
            gone: Bytes::default(),
            peers: HashMap::new(),
        }
    }
}

/// Per link (K: any key that names one link of this node), per peer (P: its public key; the
/// agent keeps every peer of every link here, so a compact key matters).
#[derive(Debug)]
pub struct Totals<K, P> {
    links: HashMap<K, Link<P>>,
}

impl<K, P> Default for Totals<K, P> {
    fn default() -> Self {
        Totals {
            links: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, P: std::hash::Hash + Eq> Totals<K, P> {
    /// The link's bytes so far, after a read of its peers' counters.
    pub fn update(&mut self, link: &K, peers: HashMap<P, Bytes>) -> Bytes {
        let state = self.links.entry(link.clone()).or_default();
        for (key, before) in &state.peers {
            let now = peers.get(key).copied().unwrap_or_default();
            if now.rx < before.rx {
                state.gone.rx += before.rx;
            }
            if now.tx < before.tx {
                state.gone.tx += before.tx;
            }
        }
        let mut total = state.gone;
        for bytes in peers.values() {
            total.rx += bytes.rx;
            total.tx += bytes.tx;
        }
        state.peers = peers;
        total
    }

    /// Forget the links that are not in `listed` (gone from the store).
    pub fn retain(&mut self, listed: &HashSet<K>) {
        self.links.retain(|link, _| listed.contains(link));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(peers: &[(&str, u64, u64)]) -> HashMap<String, Bytes> {
        peers
            .iter()
            .map(|(k, rx, tx)| (k.to_string(), Bytes { rx: *rx, tx: *tx }))
            .collect()
    }

    #[test]
    fn a_link_counter_never_falls_when_peers_come_go_or_restart() {
        let mut totals = Totals::default();
        let link = "pod-a";
        assert_eq!(
            totals.update(&link, read(&[("gw", 100, 50), ("b", 10, 20)])),
            Bytes { rx: 110, tx: 70 }
        );
        // Peer b trimmed: its bytes stay in the link's.
        assert_eq!(
            totals.update(&link, read(&[("gw", 150, 60)])),
            Bytes { rx: 160, tx: 80 }
        );
        // b back, counting from 0 again.
        assert_eq!(
            totals.update(&link, read(&[("gw", 150, 60), ("b", 5, 5)])),
            Bytes { rx: 165, tx: 85 }
        );
        // b removed and added again between two reads: its counters fell.
        assert_eq!(
            totals.update(&link, read(&[("gw", 150, 60), ("b", 1, 7)])),
            Bytes { rx: 166, tx: 87 },
            "rx fell from 5 to 1: 5 were kept, tx grew from 5 to 7"
        );
        // A link that goes is forgotten; a new link of that name starts at 0.
        totals.retain(&HashSet::new());
        assert_eq!(totals.update(&link, read(&[])), Bytes::default());
    }
}
