//! Places a peer address holds at once, of something the node serves to anyone who can reach it
//! (`/metrics` connections, health watches): so that one peer cannot take all of them. A refusal
//! is counted in `touchline_peer_limit_refusals_total{limit}` and logged as a warning once a
//! minute (with the count since).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{debug, warn};

use crate::node::Throttle;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// Refusals by the limit they were past.
static REFUSED: LazyLock<Family<LimitLabel, Counter>> = LazyLock::new(Family::default);

/// Registers `touchline_peer_limit_refusals_total{limit}`.
pub(crate) fn register_metrics(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "touchline_peer_limit_refusals",
        "/metrics connections and Health.Watch streams refused for a limit of the node's (limit: metrics-connections-per-peer, health-watches, health-watches-per-peer); behind a proxy or NAT every client counts as its address",
        REFUSED.clone(),
    );
    // Every series from the start, at 0, for alerts on their increase.
    for limit in [
        "metrics-connections-per-peer",
        "health-watches",
        "health-watches-per-peer",
    ] {
        drop(REFUSED.get_or_create(&LimitLabel { limit }));
    }
}

/// Counts a refusal for `limit`, and logs it (a warning once a minute, with the count since).
pub(crate) fn refused(limit: &'static str, throttle: &Mutex<Throttle>, peer: Option<IpAddr>) {
    REFUSED.get_or_create(&LimitLabel { limit }).inc();
    let due = throttle
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .note();
    match due {
        Some(refused) => warn!(
            ?peer,
            limit,
            refused,
            "refused for a limit of the node's (logged once a minute, with the count since)"
        ),
        None => debug!(?peer, limit, "refused for a limit of the node's"),
    }
}

/// At most `max` places per peer address (an IPv4 client of a dual-stack listener is one peer,
/// whichever way it is written; each IPv6 address is a peer of its own).
#[derive(Debug, Clone)]
pub(crate) struct PerPeer {
    max: usize,
    /// The refusals' label.
    limit: &'static str,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    throttle: Arc<Mutex<Throttle>>,
}

/// A place of one peer, given back when dropped.
#[derive(Debug)]
pub(crate) struct PeerPlace {
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PerPeer {
    pub(crate) fn new(max: usize, limit: &'static str) -> Self {
        Self {
            max,
            limit,
            held: Arc::default(),
            throttle: Arc::default(),
        }
    }

    /// A place for `peer`, unless it holds `max` already (then counted and logged as refused).
    pub(crate) fn take(&self, peer: IpAddr) -> Option<PeerPlace> {
        let peer = peer.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(peer).or_insert(0);
        if *count >= self.max {
            if *count == 0 {
                held.remove(&peer);
            }
            drop(held);
            refused(self.limit, &self.throttle, Some(peer));
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
        let places = PerPeer::new(2, "test-per-peer");
        let refusals = || {
            REFUSED
                .get_or_create(&LimitLabel {
                    limit: "test-per-peer",
                })
                .get()
        };
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
        assert_eq!(refusals(), 2, "each refusal is counted");
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
