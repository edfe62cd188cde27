//! Opaque page tokens: the cursor of the last entry of a page, bound to the customer it was
//! issued for, base64url encoded.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use touchline_core::{CustomerId, TimelineCursor, UnixNanos};

const VERSION: u8 = 1;

/// Encodes a cursor for `customer`.
#[must_use]
pub fn encode(customer: &CustomerId, cursor: TimelineCursor) -> String {
    let mut bytes = Vec::with_capacity(17 + customer.as_str().len());
    bytes.push(VERSION);
    bytes.extend_from_slice(&cursor.occurred_at.0.to_be_bytes());
    bytes.extend_from_slice(&cursor.sequence.to_be_bytes());
    bytes.extend_from_slice(customer.as_str().as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a token issued for `customer`; `None` when it is malformed or for someone else.
#[must_use]
pub fn decode(customer: &CustomerId, token: &str) -> Option<TimelineCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    if bytes.len() < 17 || bytes[0] != VERSION || &bytes[17..] != customer.as_str().as_bytes() {
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
    fn tokens_round_trip_and_are_bound_to_their_customer() {
        let alice = CustomerId::parse("alice").expect("valid id");
        let bob = CustomerId::parse("bob").expect("valid id");
        let cursor = TimelineCursor { occurred_at: UnixNanos(-5), sequence: 42 };
        let token = encode(&alice, cursor);
        assert_eq!(decode(&alice, &token), Some(cursor));
        assert_eq!(decode(&bob, &token), None);
        assert_eq!(decode(&alice, "not a token!"), None);
        assert_eq!(decode(&alice, ""), None);
    }
}
