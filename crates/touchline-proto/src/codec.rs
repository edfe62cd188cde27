//! The gRPC codec of every Touchline service and client: prost's, with one check before a message
//! is decoded. A protobuf field of two bytes (an empty `Touchpoint` in `PublishRequest.events`,
//! say) decodes into a struct of about 200 bytes: a 4 MiB request of them would take hundreds of
//! MiB of memory before any handler could refuse it. So the fields at a message's top level are
//! counted first, without allocating, and a message with more than [`MAX_TOP_LEVEL_FIELDS`] is
//! refused with `INVALID_ARGUMENT` (`TOO_MANY_FIELDS`). No legitimate message comes near it: a
//! request holds at most `ingest.max-batch-events` events (100,000 at most), a page at most 1,000
//! entries. A partner's `PublishRequest` nests (an event's attributes are fields of the event), so
//! its decoded size is also estimated from its events and their fields, and bounded by
//! [`MAX_DECODED_REQUEST_BYTES`].

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf as _;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::v1;

/// The most fields one message may hold at its top level (a repeated field counts each element).
pub const MAX_TOP_LEVEL_FIELDS: usize = 100_016;

/// Prost's codec with the top-level field count checked before decoding.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U> {
    types: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self { types: PhantomData }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder {
            inner: ProstDecoder::default(),
        }
    }
}

/// Prost's decoder behind the field count.
#[derive(Debug)]
pub struct BoundedDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = buf.chunk();
        if top_level_fields(bytes, MAX_TOP_LEVEL_FIELDS) > MAX_TOP_LEVEL_FIELDS {
            return Err(too_many_fields(format!(
                "the message has more than {MAX_TOP_LEVEL_FIELDS} fields (or repeated elements) at its top level"
            )));
        }
        // A partner's request nests: each event's attributes are fields of the event. Its
        // decoded size is estimated from the events and their fields, and bounded.
        if TypeId::of::<U>() == TypeId::of::<v1::PublishRequest>() {
            let estimate = decoded_publish_request(bytes);
            if estimate > MAX_DECODED_REQUEST_BYTES {
                return Err(too_many_fields(format!(
                    "the request would take about {} MiB once decoded (its events and their fields), more than {} MiB",
                    estimate >> 20,
                    MAX_DECODED_REQUEST_BYTES >> 20
                )));
            }
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// The most memory a `PublishRequest` may take once decoded, as [`decoded_publish_request`]
/// estimates it. A request of 1,000 events with 32 attributes each takes about 5 MiB.
pub const MAX_DECODED_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// What one field nested in an event costs once decoded, beyond its bytes: an attribute is two
/// strings and a slot of a hash map.
const DECODED_FIELD_BYTES: usize = 128;

fn too_many_fields(message: String) -> Status {
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        message,
        ErrorDetails::with_error_info("TOO_MANY_FIELDS", "touchline.dev", []),
    )
}

/// Estimates the memory an encoded `PublishRequest` takes once decoded: its bytes, plus per event
/// a `Touchpoint` and per field of the event [`DECODED_FIELD_BYTES`].
fn decoded_publish_request(bytes: &[u8]) -> usize {
    let mut estimate = bytes.len();
    for field in fields(bytes) {
        if let Field {
            number: 1,
            delimited: Some(event),
        } = field
        {
            estimate = estimate
                .saturating_add(std::mem::size_of::<v1::Touchpoint>())
                .saturating_add(fields(event).count().saturating_mul(DECODED_FIELD_BYTES));
        }
    }
    estimate
}

/// Counts the fields at the top level of an encoded message, stopping past `limit`.
fn top_level_fields(bytes: &[u8], limit: usize) -> usize {
    fields(bytes).take(limit.saturating_add(1)).count()
}

/// One field of an encoded message.
struct Field<'a> {
    number: u64,
    /// The payload of a length-delimited field.
    delimited: Option<&'a [u8]>,
}

/// The fields at the top level of an encoded message, in order. Malformed input ends them where
/// it stops making sense: prost then reports the error.
fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Field<'_>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let tag = varint(&mut bytes)?;
        let (skip, delimited) = match tag & 0b111 {
            // varint
            0 => (varint(&mut bytes).map(|_| 0)?, false),
            // 64-bit
            1 => (8, false),
            // length-delimited
            2 => (usize::try_from(varint(&mut bytes)?).ok()?, true),
            // 32-bit
            5 => (4, false),
            // groups (unused by proto3) and invalid wire types
            _ => return None,
        };
        let payload = bytes.get(..skip)?;
        bytes = bytes.get(skip..)?;
        Some(Field {
            number: tag >> 3,
            delimited: delimited.then_some(payload),
        })
    })
}

/// Reads a varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0_u64;
    for (index, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *bytes = &bytes[index + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_as_prost_encodes_them() {
        let request = v1::PublishRequest {
            events: vec![v1::Touchpoint::default(); 5],
            batch_id: "b-1".to_owned(),
        };
        let bytes = request.encode_to_vec();
        assert_eq!(top_level_fields(&bytes, usize::MAX), 6);
        assert_eq!(top_level_fields(&bytes, 2), 3, "stops past the limit");
        let page = v1::GetTimelineRequest {
            customer_id: "c".to_owned(),
            page_size: 50,
            partner_ids: vec!["a".to_owned(), "b".to_owned()],
            ..v1::GetTimelineRequest::default()
        };
        assert_eq!(top_level_fields(&page.encode_to_vec(), usize::MAX), 4);
        // Malformed: a length past the end, an invalid wire type.
        assert_eq!(top_level_fields(&[0x0a, 0x05, 0x01], usize::MAX), 0);
        assert_eq!(top_level_fields(&[0x08, 0x01, 0x0f], usize::MAX), 1);
    }

    #[test]
    fn a_request_is_estimated_by_its_events_and_their_fields() {
        let event = v1::Touchpoint {
            event_id: "e-1".to_owned(),
            attributes: (0..3).map(|i| (format!("k{i}"), String::new())).collect(),
            ..v1::Touchpoint::default()
        };
        let request = v1::PublishRequest {
            events: vec![event; 10],
            batch_id: String::new(),
        };
        let bytes = request.encode_to_vec();
        // Each event: its id and three attributes.
        let expected =
            bytes.len() + 10 * (std::mem::size_of::<v1::Touchpoint>() + 4 * DECODED_FIELD_BYTES);
        assert_eq!(decoded_publish_request(&bytes), expected);
    }

    /// One event whose attributes are 4 MiB of empty map entries: few top-level fields, but
    /// hundreds of MiB once decoded. Refused before decoding.
    #[test]
    fn a_request_of_tiny_nested_fields_is_refused_before_decoding() {
        let entries: Vec<u8> = [0x42_u8, 0x00].repeat(2 * 1024 * 1024);
        let mut event = Vec::new();
        prost::encoding::encode_varint(
            u64::try_from(entries.len()).unwrap_or_default(),
            &mut event,
        );
        let mut bytes = vec![0x0a];
        bytes.extend(event);
        bytes.extend(entries);
        assert_eq!(top_level_fields(&bytes, usize::MAX), 1);
        assert!(decoded_publish_request(&bytes) > MAX_DECODED_REQUEST_BYTES);
        // A thousand ordinary events stay far below.
        let ordinary = v1::PublishRequest {
            events: vec![
                v1::Touchpoint {
                    event_id: "e".repeat(40),
                    customer_id: "c".repeat(40),
                    attributes: (0..32)
                        .map(|i| (format!("key-{i}"), "v".repeat(100)))
                        .collect(),
                    payload: vec![7; 1024],
                    ..v1::Touchpoint::default()
                };
                1000
            ],
            batch_id: String::new(),
        };
        assert!(decoded_publish_request(&ordinary.encode_to_vec()) < MAX_DECODED_REQUEST_BYTES / 4);
    }
}
