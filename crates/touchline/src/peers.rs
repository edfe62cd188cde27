//! Places a peer address holds at once, of something the node serves to anyone who can reach it
//! (`/metrics` connections, health watches): so that one peer cannot take all of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// At most `max` places per peer address (an IPv4 client of a dual-stack listener is one peer,
/// whichever way it is written).
#[derive(Debug, Clone)]
pub(crate) struct PerPeer {
    max: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A place of one peer, given back when dropped.
#[derive(Debug)]
pub(crate) struct PeerPlace {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PerPeer {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// A place for `peer`, unless it holds `max` already.
    pub(crate) fn take(&self, peer: IpAddr) -> Option<PeerPlace> {
        let peer = peer.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(peer).or_insert(0);
        if *count >= self.max {
            if *count == 0 {
                held.remove(&peer);
            }
            return None;
        }
        *count += 1;
        Some(PeerPlace {
            held: Arc::clone(&self.held),
            peer,
        })
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_places_and_gets_them_back() {
        let places = PerPeer::new(2);
        let peer: IpAddr = "10.0.0.1".parse().expect("an address");
        let first = places.take(peer).expect("a place");
        let second = places.take(peer).expect("a place");
        assert!(places.take(peer).is_none());
        // The same address written as IPv4-mapped IPv6.
        assert!(
            places
                .take("::ffff:10.0.0.1".parse().expect("an address"))
                .is_none()
        );
        assert!(
            places
                .take("10.0.0.2".parse().expect("an address"))
                .is_some()
        );
        drop(first);
        assert!(places.take(peer).is_some());
        drop(second);
        assert!(
            places.held.lock().expect("not poisoned").is_empty(),
            "no count is left behind"
        );
    }
}
