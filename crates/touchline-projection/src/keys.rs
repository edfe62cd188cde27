//! Key layouts of the sled trees. Big-endian integers (with the sign bit flipped for signed ones)
//! so that byte order is numeric order, and length-prefixed ids so that one id is never a prefix
//! of another's range.

use touchline_core::{CustomerId, EventId, PartnerId, TimelineCursor, UnixNanos};

/// `i64` as bytes that sort numerically.
#[must_use]
pub fn ordered_i64(value: i64) -> [u8; 8] {
    (value.cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

#[must_use]
pub fn from_ordered_i64(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)).cast_signed()
}

/// A length-prefixed id (ids are at most 128 bytes).
fn push_id(key: &mut Vec<u8>, id: &str) {
    key.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    key.extend_from_slice(id.as_bytes());
}

/// `dedupe` tree: (partner, event id) -> log sequence.
#[must_use]
pub fn dedupe(partner: &PartnerId, event: &EventId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + partner.as_str().len() + event.as_str().len());
    push_id(&mut key, partner.as_str());
    push_id(&mut key, event.as_str());
    key
}

/// The prefix of every timeline key of a customer.
#[must_use]
pub fn customer_prefix(customer: &CustomerId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + customer.as_str().len() + 16);
    push_id(&mut key, customer.as_str());
    key
}

/// `timeline` tree: (customer, occurred_at, sequence) -> entry.
#[must_use]
pub fn timeline(customer: &CustomerId, occurred_at: UnixNanos, sequence: u64) -> Vec<u8> {
    let mut key = customer_prefix(customer);
    key.extend_from_slice(&ordered_i64(occurred_at.0));
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The cursor encoded in the tail of a timeline key.
#[must_use]
pub fn timeline_cursor(key: &[u8]) -> Option<TimelineCursor> {
    let tail = key.len().checked_sub(16).map(|start| &key[start..])?;
    let occurred_at = from_ordered_i64(tail[..8].try_into().ok()?);
    let sequence = u64::from_be_bytes(tail[8..].try_into().ok()?);
    Some(TimelineCursor {
        occurred_at: UnixNanos(occurred_at),
        sequence,
    })
}

/// `positions` tree: (stream, partition) -> next offset.
#[must_use]
pub fn position(stream_key: &str, partition: i32) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream_key.len() + 5);
    key.extend_from_slice(stream_key.as_bytes());
    key.push(0);
    key.extend_from_slice(&ordered_i64(i64::from(partition))[4..]);
    key
}

/// One record of a stream: (stream, partition, offset).
#[must_use]
pub fn record(stream_key: &str, partition: i32, offset: i64) -> Vec<u8> {
    record_at(&position(stream_key, partition), offset)
}

/// The record at `offset` of the partition of [`position`] key `place`.
#[must_use]
pub fn record_at(place: &[u8], offset: i64) -> Vec<u8> {
    [place, &ordered_i64(offset)].concat()
}

/// The [`position`] key and the offset of a [`record`] key.
#[must_use]
pub fn split_record(key: &[u8]) -> Option<(&[u8], i64)> {
    let (place, offset) = key.split_at_checked(key.len().checked_sub(8)?)?;
    Some((place, from_ordered_i64(offset.try_into().ok()?)))
}

/// The stream and partition of a [`position`] key.
#[must_use]
pub fn parse_position(key: &[u8]) -> Option<(String, i32)> {
    let (head, partition) = key.split_at_checked(key.len().checked_sub(4)?)?;
    let (stream, zero) = head.split_at_checked(head.len().checked_sub(1)?)?;
    if zero != [0] {
        return None;
    }
    let mut ordered = [0x80, 0, 0, 0, 0, 0, 0, 0];
    ordered[4..].copy_from_slice(partition);
    let partition = i32::try_from(from_ordered_i64(ordered)).ok()?;
    Some((String::from_utf8(stream.to_vec()).ok()?, partition))
}

/// The stream, partition and offset of a [`record`] key.
#[must_use]
pub fn parse_record(key: &[u8]) -> Option<(String, i32, i64)> {
    let (position, offset) = split_record(key)?;
    let (stream, partition) = parse_position(position)?;
    Some((stream, partition, offset))
}

/// The prefix of every position key of a stream.
#[must_use]
pub fn position_prefix(stream_key: &str) -> Vec<u8> {
    let mut key = stream_key.as_bytes().to_vec();
    key.push(0);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_i64_sorts_numerically() {
        let values = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for pair in values.windows(2) {
            assert!(ordered_i64(pair[0]) < ordered_i64(pair[1]));
        }
        assert!(
            values
                .iter()
                .all(|value| from_ordered_i64(ordered_i64(*value)) == *value)
        );
    }

    #[test]
    fn position_and_record_keys_parse_back() {
        for partition in [0, 1, 7, i32::MAX] {
            let key = position("cluster/topic", partition);
            assert_eq!(
                parse_position(&key),
                Some(("cluster/topic".to_owned(), partition))
            );
            for offset in [0, 5, i64::MAX] {
                assert_eq!(
                    parse_record(&record("cluster/topic", partition, offset)),
                    Some(("cluster/topic".to_owned(), partition, offset))
                );
            }
        }
        assert_eq!(parse_position(b"abc"), None);
        assert_eq!(parse_position(b"abcde"), None);
    }

    #[test]
    fn timeline_keys_sort_by_time_then_sequence_and_carry_the_cursor() {
        let customer = CustomerId::parse("c").expect("valid id");
        let early_late_seq = timeline(&customer, UnixNanos(10), 99);
        let late_early_seq = timeline(&customer, UnixNanos(11), 1);
        assert!(early_late_seq < late_early_seq);
        // At the same time, the log position decides (invariant 7); the times before 1970 sort
        // before those after it, and sequences past one byte keep their order.
        assert!(timeline(&customer, UnixNanos(10), 98) < early_late_seq);
        assert!(timeline(&customer, UnixNanos(10), 255) < timeline(&customer, UnixNanos(10), 256));
        assert!(
            timeline(&customer, UnixNanos(-1), u64::MAX) < timeline(&customer, UnixNanos(0), 0)
        );
        assert_eq!(
            timeline_cursor(&late_early_seq),
            Some(TimelineCursor {
                occurred_at: UnixNanos(11),
                sequence: 1
            })
        );
        let other = CustomerId::parse("cc").expect("valid id");
        assert!(!timeline(&other, UnixNanos(0), 0).starts_with(&customer_prefix(&customer)));
    }
}
