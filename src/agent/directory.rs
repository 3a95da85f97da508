//! Remote pods by address and by key, for one network: where the promoter looks up the ends
//! of a relayed flow and checks that a direct peer is still a current record. The network's
//! index keeps it in step with the trusted records (so nothing a node publishes reaches it
//! unvalidated); the promoter thread reads it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use wireguard_control::Key;

use crate::wireguard::Peer;

/// A ready pod of another node, as a direct peer would be written: its key, its node's
/// endpoint and port, its addresses as allowed IPs, no keepalive.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePod {
    pub node: String,
    pub peer: Peer,
    /// Its node is on-demand too (traffic to it is relayed until promoted); otherwise the pod
    /// is a mesh peer of every link already and never promoted.
    pub relayed: bool,
}

#[derive(Default)]
pub struct Directory {
    by_address: HashMap<IpAddr, Arc<RemotePod>>,
    by_key: HashMap<Key, Arc<RemotePod>>,
    /// Nodes whose agent is silent (inside the grace period): their direct peers are kept.
    stale: HashSet<String>,
    /// Filled from a complete list of the network: until then a pod missing here may only
    /// not be listed yet, and no direct peer is removed for it.
    complete: bool,
    /// Keys removed or rewritten since the promoter last took them (`take_changed`), so a
    /// pod's DEL or new address reaches its direct peers at once, not at the next sweep.
    changed: Vec<Key>,
    /// More changes than `CHANGED_MAX` came: the promoter checks every pair instead.
    changed_overflow: bool,
    /// Wakes the promoter when keys changed (`wake_if_changed`): a direct peer whose remote
    /// pod left or took a new key (a rotation) must go at once, not at the promoter's next
    /// poll up to a second later, while the pair's packets are dropped.
    waker: Option<Waker>,
}

/// What wakes the promoter thread (its event channel).
pub type Waker = std::sync::mpsc::SyncSender<crate::agent::direct::Event>;

/// Changed keys kept for the promoter; beyond, it checks all its pairs.
const CHANGED_MAX: usize = 4096;

pub type SharedDirectory = Arc<RwLock<Directory>>;

impl Directory {
    pub fn by_address(&self, address: &IpAddr) -> Option<Arc<RemotePod>> {
        self.by_address.get(address).cloned()
    }

    pub fn by_key(&self, key: &Key) -> Option<Arc<RemotePod>> {
        self.by_key.get(key).cloned()
    }

    pub fn is_stale(&self, node: &str) -> bool {
        self.stale.contains(node)
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The network's records were listed in full (the index holds them all).
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// Empty again (a restarted network loop lists anew), still waking the same promoter.
    pub fn clear(&mut self) {
        let waker = self.waker.take();
        *self = Directory {
            waker,
            ..Directory::default()
        };
    }

    /// Wake the promoter if keys changed since it last took them.
    pub fn wake_if_changed(&self) {
        if let Some(waker) = &self.waker
            && (self.changed_overflow || !self.changed.is_empty())
        {
            // Full: it is awake already, and takes every change when it looks.
            let _ = waker.try_send(crate::agent::direct::Event::DirectoryChanged);
        }
    }

    /// The keys changed since the last call, or `None` when too many did to keep (check all).
    pub fn take_changed(&mut self) -> Option<Vec<Key>> {
        if std::mem::take(&mut self.changed_overflow) {
            self.changed.clear();
            return None;
        }
        Some(std::mem::take(&mut self.changed))
    }

    pub fn pods(&self) -> impl Iterator<Item = &RemotePod> {
        self.by_key.values().map(|p| p.as_ref())
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn insert(&mut self, pod: RemotePod) {
        self.remove(&pod.peer.public_key);
        let pod = Arc::new(pod);
        for ip in &pod.peer.allowed_ips {
            self.by_address.insert(ip.ip(), Arc::clone(&pod));
        }
        self.by_key.insert(pod.peer.public_key.clone(), pod);
    }

    pub fn remove(&mut self, key: &Key) {
        let Some(pod) = self.by_key.remove(key) else {
            return;
        };
        match self.changed.len() < CHANGED_MAX {
            true => self.changed.push(key.clone()),
            false => self.changed_overflow = true,
        }
        for ip in &pod.peer.allowed_ips {
            // Only if the address still names this pod (a newer record may hold it).
            if self
                .by_address
                .get(&ip.ip())
                .is_some_and(|p| Arc::ptr_eq(p, &pod))
            {
                self.by_address.remove(&ip.ip());
            }
        }
    }

    pub fn set_stale(&mut self, node: &str, stale: bool) {
        match stale {
            true => self.stale.insert(node.to_string()),
            false => self.stale.remove(node),
        };
    }
}

/// Every served network's directory, shared by the network loops (writers) and the promoter,
/// which each directory wakes when it changed.
#[derive(Default)]
pub struct Directories {
    all: Mutex<HashMap<String, SharedDirectory>>,
    waker: Option<Waker>,
}

impl Directories {
    pub fn new(waker: Waker) -> Directories {
        Directories {
            all: Mutex::default(),
            waker: Some(waker),
        }
    }

    pub fn of(&self, network: &str) -> SharedDirectory {
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        let directory = all.entry(network.to_string()).or_insert_with(|| {
            Arc::new(RwLock::new(Directory {
                waker: self.waker.clone(),
                ..Directory::default()
            }))
        });
        Arc::clone(directory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    fn pod(node: &str, address: &str) -> RemotePod {
        RemotePod {
            node: node.into(),
            peer: Peer {
                public_key: Key::from_base64(&KeyPair::generate().public().to_base64()).unwrap(),
                endpoint: Some("192.0.2.2:52000".parse().unwrap()),
                allowed_ips: vec![address.parse().unwrap()],
                keepalive: None,
                preshared_key: None,
            },
            relayed: true,
        }
    }

    #[test]
    fn removed_keys_wait_for_the_promoter_and_too_many_ask_for_a_full_check() {
        let mut directory = Directory::default();
        let gone = pod("n2", "10.0.2.5/32");
        directory.insert(gone.clone());
        assert_eq!(
            directory.take_changed(),
            Some(vec![]),
            "an insert is no change"
        );
        directory.remove(&gone.peer.public_key);
        assert_eq!(
            directory.take_changed(),
            Some(vec![gone.peer.public_key.clone()])
        );
        assert_eq!(directory.take_changed(), Some(vec![]), "taken once");
        for _ in 0..=CHANGED_MAX {
            let p = pod("n2", "10.0.2.6/32");
            directory.insert(p.clone());
            directory.remove(&p.peer.public_key);
        }
        assert_eq!(directory.take_changed(), None);
        assert_eq!(directory.take_changed(), Some(vec![]));
    }

    #[test]
    fn an_address_taken_over_by_a_newer_record_stays_with_it() {
        let mut directory = Directory::default();
        let old = pod("n2", "10.0.2.5/32");
        let new = pod("n2", "10.0.2.5/32");
        directory.insert(old.clone());
        directory.insert(new.clone());
        directory.remove(&old.peer.public_key);
        let ip: IpAddr = "10.0.2.5".parse().unwrap();
        assert_eq!(
            directory.by_address(&ip).map(|p| p.peer.public_key.clone()),
            Some(new.peer.public_key.clone())
        );
        directory.remove(&new.peer.public_key);
        assert!(directory.by_address(&ip).is_none());
        assert_eq!(directory.len(), 0);
    }
}
