//! Limits on the listener's connections before any call on them is authenticated: at most
//! `server.max-connections` open at once, and at most `server.max-connections-per-peer` from one
//! IP address; a connection past either is closed as soon as it is accepted. Without them a
//! client that opens connections and sends nothing holds the node's file descriptors (and, with
//! TLS, its handshake slots) until partners can no longer connect. The third limit, the time a
//! connection has to start HTTP/2 (`server.preface-timeout-ms`), is kept by [`super::cuttable`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::throttle::Throttle;
use crate::config::ServerConfig;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    /// The limit the connection was past: `max-connections` or `max-connections-per-peer`.
    limit: &'static str,
}

/// Connections open on the listeners of the process.
static OPEN: std::sync::LazyLock<Gauge> = std::sync::LazyLock::new(Gauge::default);
/// Connections closed as soon as they were accepted, by the limit they were past.
static REFUSED: std::sync::LazyLock<Family<RefusedLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);
/// Connections closed because they did not start HTTP/2 in time.
static PREFACE_TIMEOUTS: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

/// Registers `touchline_connections_open`, `touchline_connections_refused_total{limit}` and
/// `touchline_connections_preface_timeouts_total`.
pub(crate) fn register_metrics(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "touchline_connections_open",
        "connections open on the gRPC listener (those in their TLS handshake included)",
        OPEN.clone(),
    );
    registry.register(
        "touchline_connections_refused",
        "connections closed as soon as they were accepted, by the limit they were past (server.max-connections, server.max-connections-per-peer)",
        REFUSED.clone(),
    );
    registry.register(
        "touchline_connections_preface_timeouts",
        "connections closed because they did not start HTTP/2 within server.preface-timeout-ms",
        PREFACE_TIMEOUTS.clone(),
    );
}

/// Counts a connection closed for want of its HTTP/2 preface.
pub(super) fn preface_timed_out() {
    PREFACE_TIMEOUTS.inc();
}

/// The listener's connection counts and limits.
#[derive(Debug, Clone)]
pub(super) struct Admission {
    /// 0: no limit.
    max: usize,
    max_per_peer: usize,
    preface_timeout: Option<Duration>,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_peer: HashMap<IpAddr, usize>,
    /// Refusals are logged as a warning once a minute.
    refusals: Throttle,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `server.max-connections` were open.
    Total(usize),
    /// `server.max-connections-per-peer` were open from the connection's address.
    Peer(usize),
}

impl Refusal {
    fn limit(self) -> &'static str {
        match self {
            Self::Total(_) => "max-connections",
            Self::Peer(_) => "max-connections-per-peer",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Total(max) => write!(
                formatter,
                "{max} connections are open (server.max-connections)"
            ),
            Self::Peer(max) => write!(
                formatter,
                "{max} connections are open from its address (server.max-connections-per-peer)"
            ),
        }
    }
}

/// What the node keeps with an admitted connection: its place in the counts, given back when it
/// is dropped (with the connection), and when its HTTP/2 preface is due.
#[derive(Debug)]
pub(super) struct Ticket {
    _slot: Slot,
    /// Counted from the accept: a TLS handshake is within it.
    pub(super) preface_due: Option<Instant>,
}

#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.open = counts.open.saturating_sub(1);
        if let Some(count) = counts.by_peer.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.by_peer.remove(&self.peer);
            }
        }
        OPEN.dec();
    }
}

impl Admission {
    pub(super) fn new(config: &ServerConfig) -> Self {
        Self {
            max: config.max_connections,
            max_per_peer: config.max_connections_per_peer,
            preface_timeout: (config.preface_timeout_ms > 0)
                .then(|| Duration::from_millis(config.preface_timeout_ms)),
            counts: Arc::default(),
        }
    }

    /// A ticket for a connection from `peer` accepted now, or why there is none (counted and
    /// logged: a warning once a minute, with the count since).
    pub(super) fn admit(&self, peer: IpAddr) -> Result<Ticket, Refusal> {
        // An IPv4 client of a dual-stack listener is one peer, whichever way it is written.
        let peer = peer.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let from_peer = counts.by_peer.get(&peer).copied().unwrap_or(0);
        let refusal = if self.max > 0 && counts.open >= self.max {
            Some(Refusal::Total(self.max))
        } else if self.max_per_peer > 0 && from_peer >= self.max_per_peer {
            Some(Refusal::Peer(self.max_per_peer))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            REFUSED
                .get_or_create(&RefusedLabels {
                    limit: refusal.limit(),
                })
                .inc();
            if let Some(refused) = counts.refusals.note() {
                warn!(
                    %peer,
                    refused,
                    "a connection closed as soon as it was accepted: {refusal} (logged once a minute, with the count since)"
                );
            } else {
                debug!(%peer, "a connection closed as soon as it was accepted: {refusal}");
            }
            return Err(refusal);
        }
        counts.open += 1;
        *counts.by_peer.entry(peer).or_insert(0) += 1;
        OPEN.inc();
        Ok(Ticket {
            _slot: Slot {
                counts: Arc::clone(&self.counts),
                peer,
            },
            preface_due: self.preface_timeout.map(|timeout| Instant::now() + timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, max_per_peer: usize) -> Admission {
        Admission::new(&ServerConfig {
            max_connections: max,
            max_connections_per_peer: max_per_peer,
            ..ServerConfig::default()
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn a_peer_past_its_limit_is_refused_and_others_are_not_until_the_total() {
        let limits = admission(3, 2);
        let first = limits.admit(ip("10.0.0.1")).expect("under both limits");
        let second = limits.admit(ip("10.0.0.1")).expect("under both limits");
        assert_eq!(limits.admit(ip("10.0.0.1")).err(), Some(Refusal::Peer(2)));
        // The same address written as IPv4-mapped IPv6 is the same peer.
        assert_eq!(
            limits.admit(ip("::ffff:10.0.0.1")).err(),
            Some(Refusal::Peer(2))
        );
        let other = limits.admit(ip("10.0.0.2")).expect("another peer");
        assert_eq!(limits.admit(ip("10.0.0.3")).err(), Some(Refusal::Total(3)));
        // A connection that ends gives its slot back, to its peer and to the total.
        drop(first);
        let again = limits.admit(ip("10.0.0.1")).expect("a slot came back");
        assert_eq!(limits.admit(ip("10.0.0.3")).err(), Some(Refusal::Total(3)));
        drop((second, other, again));
        let counts = limits.counts.lock().expect("not poisoned");
        assert_eq!(counts.open, 0);
        assert!(counts.by_peer.is_empty(), "{:?}", counts.by_peer);
    }

    #[test]
    fn zero_is_no_limit() {
        let limits = admission(0, 0);
        let slots: Vec<Ticket> = (0..1000)
            .map(|_| limits.admit(ip("10.0.0.1")).expect("no limit"))
            .collect();
        assert_eq!(slots.len(), 1000);
    }
}
