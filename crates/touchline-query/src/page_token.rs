//! Opaque page tokens: the cursor of the last entry of a page, bound to the customer and the
//! filters it was issued for, base64url encoded. A token used with other filters is refused: it
//! would silently skip or repeat entries.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use touchline_core::{CustomerId, TimelineCursor, TimelineFilter, UnixNanos, fingerprint};

const VERSION: u8 = 2;
const HEADER: usize = 1 + 8 + 8 + 8;

/// A fingerprint of the filters, canonical (sets are sorted), so that the same filters in another
/// order match.
#[must_use]
pub fn filter_fingerprint(filter: &TimelineFilter) -> u64 {
    let mut canonical = Vec::new();
    for bound in [filter.from, filter.to] {
        match bound {
            Some(instant) => {
                canonical.push(1);
                canonical.extend_from_slice(&instant.0.to_be_bytes());
            }
            None => canonical.push(0),
        }
    }
    for partner in &filter.partners {
        push_element(&mut canonical, partner.as_str());
    }
    canonical.push(0xff);
    for event_type in &filter.event_types {
        push_element(&mut canonical, event_type);
    }
    canonical.push(0xff);
    for stage in &filter.stages {
        canonical.push(u8::try_from(stage.number()).unwrap_or(u8::MAX));
    }
    fingerprint(Some(&canonical))
}

/// Adds an element of a set to a canonical form. Each ends with a zero byte, and a zero byte inside
/// one is written as 0xfe (a byte UTF-8 never holds), so that {"a", "b"} and {"a\0b"} differ.
/// Strings without a zero byte are written as they were: tokens issued before still match.
fn push_element(canonical: &mut Vec<u8>, element: &str) {
    canonical.extend(
        element
            .bytes()
            .map(|byte| if byte == 0 { 0xfe } else { byte }),
    );
    canonical.push(0);
}

/// Encodes a cursor for `customer` and the filters of fingerprint `filters`.
#[must_use]
pub fn encode(customer: &CustomerId, filters: u64, cursor: TimelineCursor) -> String {
    let mut bytes = Vec::with_capacity(HEADER + customer.as_str().len());
    bytes.push(VERSION);
    bytes.extend_from_slice(&cursor.occurred_at.0.to_be_bytes());
    bytes.extend_from_slice(&cursor.sequence.to_be_bytes());
    bytes.extend_from_slice(&filters.to_be_bytes());
    bytes.extend_from_slice(customer.as_str().as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a token issued for `customer` and the same filters; `None` when it is malformed or
/// was issued for another customer or other filters.
#[must_use]
pub fn decode(customer: &CustomerId, filters: u64, token: &str) -> Option<TimelineCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    if bytes.len() < HEADER
        || bytes[0] != VERSION
        || bytes[17..25] != filters.to_be_bytes()
        || &bytes[HEADER..] != customer.as_str().as_bytes()
    {
        return None;
    }
    let occurred_at = i64::from_be_bytes(bytes[1..9].try_into().ok()?);
    let sequence = u64::from_be_bytes(bytes[9..17].try_into().ok()?);
    Some(TimelineCursor {
        occurred_at: UnixNanos(occurred_at),
        sequence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_fingerprints_tell_filters_apart() {
        let none = TimelineFilter::default();
        let from = TimelineFilter {
            from: Some(UnixNanos(5)),
            ..TimelineFilter::default()
        };
        let to = TimelineFilter {
            to: Some(UnixNanos(5)),
            ..TimelineFilter::default()
        };
        let typed = TimelineFilter {
            event_types: ["a".to_owned()].into(),
            ..TimelineFilter::default()
        };
        let two_types = TimelineFilter {
            event_types: ["a".to_owned(), "b".to_owned()].into(),
            ..TimelineFilter::default()
        };
        let one_with_a_zero = TimelineFilter {
            event_types: ["a\0b".to_owned()].into(),
            ..TimelineFilter::default()
        };
        let fingerprints =
            [&none, &from, &to, &typed, &two_types, &one_with_a_zero].map(filter_fingerprint);
        let distinct: std::collections::BTreeSet<_> = fingerprints.iter().collect();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_customer() {
        let alice = CustomerId::parse("alice").expect("valid id");
        let bob = CustomerId::parse("bob").expect("valid id");
        let cursor = TimelineCursor {
            occurred_at: UnixNanos(-5),
            sequence: 42,
        };
        let filters = filter_fingerprint(&TimelineFilter::default());
        let token = encode(&alice, filters, cursor);
        assert_eq!(decode(&alice, filters, &token), Some(cursor));
        assert_eq!(decode(&bob, filters, &token), None);
        assert_eq!(decode(&alice, filters ^ 1, &token), None, "other filters");
        assert_eq!(decode(&alice, filters, "not a token!"), None);
        assert_eq!(decode(&alice, filters, ""), None);
    }
}
