//! Wire <-> domain conversions. Nothing else in the workspace builds domain types from wire
//! messages or the reverse.

use prost::Message as _;
use touchline_core::{
    CustomerSummary, Envelope, JourneyStage, Limits, LogPosition, Outcome, PartnerId,
    RawTouchpoint, Rejection, TimelineEntry, TimelineEntryView, Touchpoint, TouchpointView,
    UnixNanos,
};

use crate::v1;

/// The envelope format version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// Why a Kafka record could not be decoded as an envelope. The text is what the dead-letter store
/// keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    MissingValue,
    #[error("record value is not a protobuf envelope: {0}")]
    Protobuf(String),
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u32),
    #[error("envelope has an invalid partner_id: {0}")]
    InvalidPartner(String),
    #[error("envelope has no touchpoint")]
    MissingTouchpoint,
    #[error("envelope touchpoint is invalid: {} in {}: {}", .0.reason.code(), .0.field, .0.message)]
    InvalidTouchpoint(Rejection),
}

pub fn timestamp(instant: UnixNanos) -> prost_types::Timestamp {
    let (seconds, nanos) = instant.to_parts();
    prost_types::Timestamp { seconds, nanos }
}

/// The wire timestamp as a domain instant; `None` when it is out of range.
#[must_use]
pub fn instant(timestamp: &prost_types::Timestamp) -> Option<UnixNanos> {
    UnixNanos::from_parts(timestamp.seconds, timestamp.nanos)
}

/// A wire touchpoint as the raw input that `touchline_core::validate` checks.
#[must_use]
pub fn raw_touchpoint(touchpoint: v1::Touchpoint) -> RawTouchpoint {
    RawTouchpoint {
        event_id: touchpoint.event_id,
        customer_id: touchpoint.customer_id,
        event_type: touchpoint.r#type,
        occurred_at: touchpoint.occurred_at.map(|at| (at.seconds, at.nanos)),
        channel: touchpoint.channel,
        stage: touchpoint.stage,
        outcome: touchpoint
            .outcome
            .map(|outcome| (outcome.sentiment, outcome.score)),
        attributes: touchpoint.attributes.into_iter().collect(),
        payload: touchpoint.payload,
    }
}

/// A validated touchpoint on the wire.
#[must_use]
pub fn wire_touchpoint(touchpoint: &Touchpoint) -> v1::Touchpoint {
    into_wire_touchpoint(touchpoint.clone())
}

/// The same, taking the touchpoint's strings rather than copying them (what a read serves).
#[must_use]
pub fn into_wire_touchpoint(touchpoint: Touchpoint) -> v1::Touchpoint {
    v1::Touchpoint {
        event_id: touchpoint.event_id.into_string(),
        customer_id: touchpoint.customer_id.into_string(),
        r#type: touchpoint.event_type.into_string(),
        occurred_at: Some(timestamp(touchpoint.occurred_at)),
        channel: touchpoint.channel.number(),
        stage: touchpoint.stage.number(),
        outcome: touchpoint.outcome.map(wire_outcome),
        attributes: touchpoint.attributes.into_iter().collect(),
        payload: touchpoint.payload,
    }
}

fn wire_outcome(outcome: Outcome) -> v1::Outcome {
    v1::Outcome {
        sentiment: outcome.sentiment.number(),
        score: outcome.score,
    }
}

/// Writes timeline entries in the protobuf encoding of `touchline.v1.TimelineEntry`, from views
/// of the stored entries: the bytes that [`into_wire_timeline_entry`] of the same entry encodes
/// to (checked below), without building the message, so without copying a string. What
/// `GetTimeline` serves. Reuse one for a page: it keeps its scratch buffer.
#[derive(Debug, Default)]
pub struct TimelineEntryEncoder {
    touchpoint: Vec<u8>,
}

impl TimelineEntryEncoder {
    /// Appends the encoding of `entry` to `buf`.
    pub fn encode(&mut self, entry: &TimelineEntryView<'_>, buf: &mut Vec<u8>) {
        use prost::encoding::message;
        // Fields in tag order, and proto3's defaults left out, as prost writes them.
        self.touchpoint.clear();
        encode_touchpoint(&entry.touchpoint, &mut self.touchpoint);
        put_bytes(1, entry.partner_id.as_bytes(), buf);
        put_delimited(2, &self.touchpoint, buf);
        message::encode(3, &wire_position(entry.position), buf);
        message::encode(4, &timestamp(entry.received_at), buf);
    }
}

/// A touchpoint's fields, as `v1::Touchpoint` encodes them (see [`into_wire_touchpoint`]).
fn encode_touchpoint(touchpoint: &TouchpointView<'_>, buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, int32, message};
    put_bytes(1, touchpoint.event_id.as_bytes(), buf);
    put_bytes(2, touchpoint.customer_id.as_bytes(), buf);
    put_bytes(3, touchpoint.event_type.as_bytes(), buf);
    message::encode(4, &timestamp(touchpoint.occurred_at), buf);
    for (tag, number) in [
        (5, touchpoint.channel.number()),
        (6, touchpoint.stage.number()),
    ] {
        if number != 0 {
            int32::encode(tag, &number, buf);
        }
    }
    if let Some(outcome) = touchpoint.outcome {
        message::encode(7, &wire_outcome(outcome), buf);
    }
    // A map entry is a message of the key (1) and the value (2), each left out when empty.
    for (key, value) in &touchpoint.attributes {
        encode_key(8, WireType::LengthDelimited, buf);
        encode_varint(
            (bytes_len(1, key.as_bytes()) + bytes_len(2, value.as_bytes())) as u64,
            buf,
        );
        put_bytes(1, key.as_bytes(), buf);
        put_bytes(2, value.as_bytes(), buf);
    }
    put_bytes(9, touchpoint.payload, buf);
}

/// A length-delimited field (string or bytes), left out when empty (proto3's default).
fn put_bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    if !value.is_empty() {
        put_delimited(tag, value, buf);
    }
}

/// A length-delimited field written whatever it holds: an encoded message that is present.
fn put_delimited(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// What [`put_bytes`] writes, in bytes.
fn bytes_len(tag: u32, value: &[u8]) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

/// Encodes an envelope as the value of a Kafka record: the bytes prost writes for the
/// `v1::Envelope` of it (checked below), written from the envelope's fields without copying
/// them into a message first (ingest encodes every event it accepts).
#[must_use]
pub fn encode_envelope(envelope: &Envelope) -> Vec<u8> {
    use prost::encoding::{message, uint32};
    let mut touchpoint = Vec::new();
    encode_touchpoint(&envelope.touchpoint.view(), &mut touchpoint);
    let mut value = Vec::with_capacity(touchpoint.len() + envelope.partner_id.as_str().len() + 32);
    uint32::encode(1, &ENVELOPE_VERSION, &mut value);
    put_bytes(2, envelope.partner_id.as_str().as_bytes(), &mut value);
    put_delimited(3, &touchpoint, &mut value);
    message::encode(4, &timestamp(envelope.received_at), &mut value);
    value
}

/// Decodes the value of a Kafka record. The touchpoint is validated again (anyone with write
/// access to the topic can produce to it), except for the clock check (an event accepted long ago
/// is replayed long after) and the size limits ([`Limits::DECODING`]): ingest enforced its
/// configured limits, which may be above the defaults, before it acknowledged the event.
///
/// # Errors
/// A [`DecodeError`] that says what is wrong, for the dead-letter store.
pub fn decode_envelope(value: Option<&[u8]>) -> Result<Envelope, DecodeError> {
    let value = value.ok_or(DecodeError::MissingValue)?;
    let envelope =
        v1::Envelope::decode(value).map_err(|error| DecodeError::Protobuf(error.to_string()))?;
    if envelope.version != ENVELOPE_VERSION {
        return Err(DecodeError::UnsupportedVersion(envelope.version));
    }
    let partner_id = PartnerId::parse(envelope.partner_id)
        .map_err(|error| DecodeError::InvalidPartner(error.to_string()))?;
    let touchpoint = envelope.touchpoint.ok_or(DecodeError::MissingTouchpoint)?;
    let touchpoint = touchline_core::validate(
        raw_touchpoint(touchpoint),
        UnixNanos(i64::MAX),
        &Limits::DECODING,
    )
    .map_err(DecodeError::InvalidTouchpoint)?;
    let received_at = envelope
        .received_at
        .as_ref()
        .and_then(instant)
        .unwrap_or(touchpoint.occurred_at);
    Ok(Envelope {
        partner_id,
        touchpoint,
        received_at,
    })
}

/// A timeline entry on the wire.
#[must_use]
pub fn wire_timeline_entry(entry: &TimelineEntry) -> v1::TimelineEntry {
    into_wire_timeline_entry(entry.clone())
}

/// The same, taking the entry's strings rather than copying them (what a read serves).
#[must_use]
pub fn into_wire_timeline_entry(entry: TimelineEntry) -> v1::TimelineEntry {
    v1::TimelineEntry {
        partner_id: entry.partner_id.into_string(),
        touchpoint: Some(into_wire_touchpoint(entry.touchpoint)),
        position: Some(wire_position(entry.position)),
        received_at: Some(timestamp(entry.received_at)),
    }
}

fn wire_position(position: LogPosition) -> v1::LogPosition {
    v1::LogPosition {
        partition: position.partition,
        offset: position.offset,
        sequence: position.sequence,
    }
}

/// A customer summary on the wire.
#[must_use]
pub fn wire_summary(
    summary: &CustomerSummary,
    first_touch: Option<&TimelineEntry>,
    last_touch: Option<&TimelineEntry>,
) -> v1::CustomerSummary {
    v1::CustomerSummary {
        customer_id: summary.customer_id.to_string(),
        first_touch: first_touch.map(wire_timeline_entry),
        last_touch: last_touch.map(wire_timeline_entry),
        total_touchpoints: summary.total,
        by_stage: summary
            .by_stage
            .iter()
            .map(|(stage, count)| (stage.name().to_owned(), *count))
            .collect(),
        by_sentiment: summary
            .by_sentiment
            .iter()
            .map(|(sentiment, count)| (sentiment.name().to_owned(), *count))
            .collect(),
        by_partner: summary
            .by_partner
            .iter()
            .map(|(partner, count)| (partner.to_string(), *count))
            .collect(),
        current_stage: summary.current_stage().number(),
    }
}

/// A journey stage from its wire number, for query filters.
#[must_use]
pub fn journey_stage(number: i32) -> Option<JourneyStage> {
    JourneyStage::from_number(number)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use touchline_core::{Channel, CustomerId, EventId, EventType, Outcome, Sentiment};

    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            partner_id: PartnerId::parse("courier").expect("valid partner"),
            touchpoint: Touchpoint {
                event_id: EventId::parse("e-1").expect("valid id"),
                customer_id: CustomerId::parse("c-1").expect("valid id"),
                event_type: EventType::parse("delivery.completed").expect("valid type"),
                occurred_at: UnixNanos(1_700_000_000_000_000_001),
                channel: Channel::Doorstep,
                stage: JourneyStage::Fulfil,
                outcome: Some(Outcome {
                    sentiment: Sentiment::Negative,
                    score: Some(12.5),
                }),
                attributes: BTreeMap::from([("order".to_owned(), "o-9".to_owned())]),
                payload: vec![1, 2, 3],
            },
            received_at: UnixNanos(1_700_000_000_500_000_000),
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let original = envelope();
        let decoded = decode_envelope(Some(&encode_envelope(&original)));
        assert_eq!(decoded, Ok(original));
    }

    /// Ingest may run with limits above the defaults; what it acknowledged must decode.
    #[test]
    fn events_over_the_default_limits_decode() {
        let defaults = Limits::default();
        let mut original = envelope();
        original.touchpoint.payload = vec![7; defaults.max_payload_len * 4];
        original.touchpoint.attributes = (0..=defaults.max_attributes)
            .map(|index| {
                (
                    format!("k{index:0width$}", width = defaults.max_attribute_key_len),
                    "v".repeat(defaults.max_attribute_value_len + 1),
                )
            })
            .collect();
        let decoded = decode_envelope(Some(&encode_envelope(&original)));
        assert_eq!(decoded, Ok(original));
    }

    #[test]
    fn undecodable_records_say_why() {
        assert_eq!(decode_envelope(None), Err(DecodeError::MissingValue));
        assert!(matches!(
            decode_envelope(Some(b"\xff\xff\xff")),
            Err(DecodeError::Protobuf(_))
        ));
        let wrong_version = v1::Envelope {
            version: 9,
            ..v1::Envelope::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_envelope(Some(&wrong_version)),
            Err(DecodeError::UnsupportedVersion(9))
        );
        let no_touchpoint = v1::Envelope {
            version: 1,
            partner_id: "p".into(),
            ..v1::Envelope::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_envelope(Some(&no_touchpoint)),
            Err(DecodeError::MissingTouchpoint)
        );
    }

    fn entries() -> impl proptest::strategy::Strategy<Value = TimelineEntry> {
        use proptest::prelude::*;
        let touchpoint = (
            (
                "[!-~]{1,12}",
                "[!-~]{1,12}",
                "[a-z][a-z0-9._-]{0,10}",
                any::<i64>(),
            ),
            (
                prop::sample::select(Channel::ALL),
                prop::sample::select(JourneyStage::ALL),
                prop::option::of((
                    prop::sample::select(Sentiment::ALL),
                    prop::option::of(any::<f64>()),
                )),
            ),
            // Empty keys and values too: proto3 leaves them out of a map entry.
            prop::collection::btree_map("[a-z]{0,3}", "\\PC{0,6}", 0..4),
            prop::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(
                |(
                    (event_id, customer_id, event_type, at),
                    (channel, stage, outcome),
                    attributes,
                    payload,
                )| {
                    Touchpoint {
                        event_id: EventId::parse(event_id).expect("a valid id"),
                        customer_id: CustomerId::parse(customer_id).expect("a valid id"),
                        event_type: EventType::parse(event_type).expect("a valid type"),
                        occurred_at: UnixNanos(at),
                        channel,
                        stage,
                        outcome: outcome.map(|(sentiment, score)| Outcome { sentiment, score }),
                        attributes,
                        payload,
                    }
                },
            );
        (
            "[!-~]{1,12}",
            touchpoint,
            any::<i64>(),
            // Zeros too: proto3 leaves them out.
            (0..3_i32, prop_oneof![Just(0_i64), any::<i64>()], 0..3_u64),
        )
            .prop_map(
                |(partner, touchpoint, received_at, (partition, offset, sequence))| TimelineEntry {
                    partner_id: PartnerId::parse(partner).expect("a valid partner"),
                    touchpoint,
                    received_at: UnixNanos(received_at),
                    position: LogPosition {
                        partition,
                        offset,
                        sequence,
                    },
                },
            )
    }

    proptest::proptest! {
        /// What `GetTimeline` serves is what a client decodes as the entry: the encoder writes
        /// the bytes prost writes for the converted message, entry after entry (its scratch
        /// buffer reused).
        #[test]
        fn an_entry_is_encoded_as_prost_encodes_its_wire_message(
            first in entries(),
            second in entries(),
        ) {
            let mut encoder = TimelineEntryEncoder::default();
            let mut encoded = Vec::new();
            encoder.encode(&first.view(), &mut encoded);
            let end_of_first = encoded.len();
            encoder.encode(&second.view(), &mut encoded);
            let first_wire = into_wire_timeline_entry(first.clone()).encode_to_vec();
            proptest::prop_assert_eq!(&encoded[..end_of_first], first_wire.as_slice());
            let second_wire = into_wire_timeline_entry(second.clone()).encode_to_vec();
            proptest::prop_assert_eq!(&encoded[end_of_first..], second_wire.as_slice());
            // A page of them, as `GetTimeline` answers it, is a `GetTimelineResponse`.
            let page = crate::encoded::TimelinePage {
                entries: vec![
                    encoded[..end_of_first].to_vec().into(),
                    encoded[end_of_first..].to_vec().into(),
                ],
                next_page_token: "next".to_owned(),
            }
            .encode_to_vec();
            let decoded = v1::GetTimelineResponse::decode(page.as_slice())
                .expect("a GetTimelineResponse");
            let wire = v1::GetTimelineResponse {
                entries: vec![into_wire_timeline_entry(first), into_wire_timeline_entry(second)],
                next_page_token: "next".to_owned(),
            };
            proptest::prop_assert_eq!(decoded, wire);
        }

        /// A Kafka record's value is the envelope as prost encodes its message.
        #[test]
        fn an_envelope_is_encoded_as_prost_encodes_its_message(entry in entries()) {
            let envelope = Envelope {
                partner_id: entry.partner_id,
                touchpoint: entry.touchpoint,
                received_at: entry.received_at,
            };
            let wire = v1::Envelope {
                version: ENVELOPE_VERSION,
                partner_id: envelope.partner_id.to_string(),
                touchpoint: Some(wire_touchpoint(&envelope.touchpoint)),
                received_at: Some(timestamp(envelope.received_at)),
            };
            proptest::prop_assert_eq!(encode_envelope(&envelope), wire.encode_to_vec());
        }
    }
}
