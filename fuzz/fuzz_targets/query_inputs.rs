//! Any string as what a reader hands the query side: a `GetTimeline` page token, a
//! `WatchTimeline` cursor, an RFC 3339 bound (`--from`/`--to` of the CLI). Nothing may panic; a
//! token or cursor that decodes is bound to the customer and filters (or log) it was issued for
//! and decodes again once re-encoded; an instant that parses formats back to itself, to the
//! millisecond.
#![no_main]

use libfuzzer_sys::fuzz_target;
use touchline_core::{CustomerId, UnixNanos};
use touchline_query::{page_token, watch};

const FILTERS: u64 = 0x5eed;
const LOG: u64 = 7;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(customer) = CustomerId::parse("customer-1") else { return };

    if let Some(cursor) = page_token::decode(&customer, FILTERS, text) {
        let again = page_token::encode(&customer, FILTERS, cursor);
        assert_eq!(page_token::decode(&customer, FILTERS, &again), Some(cursor));
        assert_eq!(page_token::decode(&customer, FILTERS + 1, text), None, "other filters");
        if let Ok(other) = CustomerId::parse("customer-2") {
            assert_eq!(page_token::decode(&other, FILTERS, text), None, "another customer");
        }
    }

    if let Ok(sequence) = watch::decode_cursor(&customer, LOG, text) {
        let again = watch::encode_cursor(&customer, LOG, sequence);
        assert_eq!(watch::decode_cursor(&customer, LOG, &again), Ok(sequence));
        assert_eq!(
            watch::decode_cursor(&customer, LOG + 1, &again),
            Err(watch::CursorError::OtherLog)
        );
        if let Ok(other) = CustomerId::parse("customer-2") {
            assert_eq!(
                watch::decode_cursor(&other, LOG, &again),
                Err(watch::CursorError::NotForCustomer)
            );
        }
    }

    if let Some(instant) = UnixNanos::parse_rfc3339(text) {
        // Formatted to the millisecond, rounded down (a parsed instant is of a whole second that
        // `i64` holds, so the rounded one is too).
        let floored = i128::from(instant.0).div_euclid(1_000_000) * 1_000_000;
        let reparsed = UnixNanos::parse_rfc3339(&instant.to_rfc3339());
        assert_eq!(reparsed.map(|again| i128::from(again.0)), Some(floored), "{text}");
    }
});
