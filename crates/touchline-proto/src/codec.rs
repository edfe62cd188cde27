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
            // One pass over the fields for both estimates.
            let shape = RequestShape::of(bytes, PUBLISH_REQUEST_EVENTS);
            let estimate = shape.map_or(usize::MAX, RequestShape::decoded);
            if estimate > MAX_DECODED_REQUEST_BYTES
                && estimate / MAX_DECODED_PER_ENCODED_BYTE > bytes.len()
            {
                return Err(too_many_fields(format!(
                    "the request would take about {} MiB once decoded (its events and their fields): more than {} MiB and {MAX_DECODED_PER_ENCODED_BYTE} times its size",
                    estimate >> 20,
                    MAX_DECODED_REQUEST_BYTES >> 20
                )));
            }
            // A call served in a budget's scope is charged before it is decoded (see
            // `DecodeBudget`); others (stream messages) are counted by their own windows.
            if let Ok(Err(status)) = BUDGET
                .try_with(|budget| budget.charge(shape.map_or(usize::MAX, RequestShape::charged)))
            {
                return Err(status);
            }
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

tokio::task_local! {
    static BUDGET: DecodeBudget;
}

/// The budgets of bytes that the decoded requests of unary calls hold at once (the ingest
/// service's `max-in-flight-bytes`, and each partner's share of it), charged by the decoder
/// itself: a request is charged what `RequestShape::charged` estimates it takes before it is
/// decoded, so that no decoded request is held uncharged (tonic holds a unary call's decoded
/// message until its body ends). Each call is served in a [`DecodeBudget::scope`] of its own,
/// whose charge the handler takes ([`DecodeBudget::charged`]) and holds as long as the request's
/// memory is in use.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    pools: std::sync::Arc<[BytePool]>,
    /// A permit of each pool, once charged.
    charged: std::sync::Arc<std::sync::Mutex<Vec<tokio::sync::OwnedSemaphorePermit>>>,
    /// The reason of the pool that refused a message of the call, if one did.
    refused: std::sync::Arc<std::sync::Mutex<Option<&'static str>>>,
}

/// One budget a call is charged against, in KiB.
#[derive(Debug)]
pub struct BytePool {
    kib: std::sync::Arc<tokio::sync::Semaphore>,
    /// All of `kib`: a request estimated above it is charged all of it.
    all: u32,
    /// The `ErrorInfo.reason` and the message of a call that does not fit.
    reason: &'static str,
    message: &'static str,
}

impl BytePool {
    /// `all` KiB of `kib`; a call that does not fit is refused with `reason` and `message`.
    #[must_use]
    pub fn new(
        kib: std::sync::Arc<tokio::sync::Semaphore>,
        all: u32,
        reason: &'static str,
        message: &'static str,
    ) -> Self {
        Self {
            kib,
            all: all.max(1),
            reason,
            message,
        }
    }
}

impl DecodeBudget {
    /// A call's scope of `pools`, charged in their order.
    #[must_use]
    pub fn new(pools: Vec<BytePool>) -> Self {
        Self {
            pools: pools.into(),
            charged: std::sync::Arc::default(),
            refused: std::sync::Arc::default(),
        }
    }

    /// The reason the call was refused for want of budget, if it was (for its metrics).
    #[must_use]
    pub fn refused(&self) -> Option<&'static str> {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `call` (the service's handling of one call) in this scope.
    pub async fn scope<F: std::future::Future>(self, call: F) -> F::Output {
        BUDGET.scope(self, call).await
    }

    /// What the call's decoded request was charged; empty before it was decoded, or once taken.
    #[must_use]
    pub fn charged(&self) -> Vec<tokio::sync::OwnedSemaphorePermit> {
        std::mem::take(
            &mut *self
                .charged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Charges `bytes` to each pool (at most all of it), or answers `RESOURCE_EXHAUSTED` with the
    /// reason of the first pool it does not fit (then nothing of this message stays charged).
    /// Every message of the call is charged, and the charges add up: tonic decodes (and drops)
    /// the messages after the first of a unary body too.
    fn charge(&self, bytes: usize) -> Result<(), Status> {
        use std::time::Duration;
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let mut permits = Vec::with_capacity(self.pools.len());
        for pool in self.pools.iter() {
            let permit = std::sync::Arc::clone(&pool.kib)
                .try_acquire_many_owned(kib.min(pool.all))
                .map_err(|_| {
                    *self
                        .refused
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pool.reason);
                    let mut details =
                        ErrorDetails::with_retry_info(Some(Duration::from_millis(200)));
                    details.set_error_info(pool.reason, "touchline.dev", []);
                    Status::with_error_details(
                        tonic::Code::ResourceExhausted,
                        pool.message,
                        details,
                    )
                })?;
            permits.push(permit);
        }
        self.charged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(permits);
        Ok(())
    }
}

/// A `PublishRequest` is refused when `RequestShape::decoded` estimates it above this many
/// bytes once decoded *and* above [`MAX_DECODED_PER_ENCODED_BYTE`] times its encoded size. A
/// request of 1,000 events with 32 attributes each takes about 5 MiB; ordinary events take 2 to 4
/// times their encoded size, events of 32 one-letter attributes about 25 times, empty fields 64
/// to 100 times. Larger legitimate batches (`ingest.max-batch-events` and
/// `ingest.max-message-bytes` raised) stay under the ratio.
pub const MAX_DECODED_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// See [`MAX_DECODED_REQUEST_BYTES`].
pub const MAX_DECODED_PER_ENCODED_BYTE: usize = 32;

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

/// [`RequestShape::decoded`] of `bytes`; `usize::MAX` for a group anywhere (see
/// [`top_level_fields`]).
#[cfg(test)]
fn decoded_publish_request(bytes: &[u8]) -> usize {
    RequestShape::of(bytes, PUBLISH_REQUEST_EVENTS).map_or(usize::MAX, RequestShape::decoded)
}

/// [`RequestShape::charged`] of `bytes`.
#[cfg(test)]
fn charged_publish_request(bytes: &[u8]) -> usize {
    RequestShape::of(bytes, PUBLISH_REQUEST_EVENTS).map_or(usize::MAX, RequestShape::charged)
}

/// What a nested field is charged (see [`RequestShape::charged`]): an attribute's two strings
/// in a B-tree about half full (96 bytes), and an allocation of at least 32 bytes for each.
const CHARGED_FIELD_BYTES: usize = 160;

/// The field of `PublishRequest` that holds its events.
const PUBLISH_REQUEST_EVENTS: u64 = 1;
/// The field of `Envelope` that holds its touchpoint.
const ENVELOPE_TOUCHPOINT: u64 = 3;

/// The most memory one Kafka record may take once decoded, as [`decoded_envelope_bytes`]
/// estimates it: the projector dead-letters a record above it without decoding it, and ingest
/// refuses an event whose record would be above it (`EVENT_TOO_LARGE`), so that what it
/// acknowledges is always projected. Only limits raised far past their defaults come near it (an
/// event of the default 64 KiB takes 5 MiB at most); a record of tiny attributes written by
/// another producer would take about 80 times its size (4 MiB of them, 256 MiB).
pub const MAX_DECODED_RECORD_BYTES: usize = 256 << 20;

/// An estimate of the memory a Kafka record's value takes once decoded as an `Envelope` and
/// converted for validation: its bytes, the envelope and its touchpoint, and
/// 160 bytes for each field of the touchpoint (an attribute is one: its two strings
/// in a B-tree, once in the decoded message and once converted), counted without allocating;
/// `usize::MAX` for a group anywhere (no Touchline message has one).
#[must_use]
pub fn decoded_envelope_bytes(value: &[u8]) -> usize {
    RequestShape::of(value, ENVELOPE_TOUCHPOINT).map_or(usize::MAX, |shape| {
        shape
            .decoded_at(CHARGED_FIELD_BYTES)
            .saturating_add(std::mem::size_of::<v1::Envelope>())
    })
}

/// An encoded `PublishRequest` (or `Envelope`) as its estimates count it: its size, its events
/// (touchpoints) and the fields nested in them.
#[derive(Debug, Clone, Copy)]
struct RequestShape {
    bytes: usize,
    events: usize,
    nested: usize,
}

impl RequestShape {
    /// The shape of `bytes`, whose touchpoints are its fields numbered `touchpoints`; `None` for
    /// a group anywhere.
    fn of(bytes: &[u8], touchpoints: u64) -> Option<Self> {
        let (mut events, mut nested) = (0_usize, 0_usize);
        for field in fields(bytes) {
            match field {
                Field::Group => return None,
                Field::Delimited { number, payload } if number == touchpoints => {
                    events += 1;
                    for field in fields(payload) {
                        if matches!(field, Field::Group) {
                            return None;
                        }
                        nested += 1;
                    }
                }
                Field::Delimited { .. } | Field::Scalar => {}
            }
        }
        Some(Self {
            bytes: bytes.len(),
            events,
            nested,
        })
    }

    /// The memory the request takes once decoded, estimated: its bytes, plus per event a
    /// `Touchpoint` and per field of the event [`DECODED_FIELD_BYTES`] (what the codec's bound
    /// refuses by).
    fn decoded(self) -> usize {
        self.decoded_at(DECODED_FIELD_BYTES)
    }

    /// Its bytes, a `Touchpoint` per event and `field_bytes` per field nested in one.
    fn decoded_at(self, field_bytes: usize) -> usize {
        self.bytes
            .saturating_add(
                self.events
                    .saturating_mul(std::mem::size_of::<v1::Touchpoint>()),
            )
            .saturating_add(self.nested.saturating_mul(field_bytes))
    }

    /// What a unary request is charged of the ingest service's budget as it is decoded: an
    /// estimate meant to be at least [`decoded_request_bytes`] of the decoded request (the event
    /// list grown to a power of two, [`CHARGED_FIELD_BYTES`] a nested field).
    fn charged(self) -> usize {
        // A vector grows to 4, then doubles.
        let list = self
            .events
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX)
            .max(4)
            .saturating_mul(std::mem::size_of::<v1::Touchpoint>());
        self.bytes
            .saturating_add(std::mem::size_of::<v1::PublishRequest>())
            .saturating_add(list)
            .saturating_add(self.nested.saturating_mul(CHARGED_FIELD_BYTES))
    }
}

/// The memory a decoded `PublishRequest` holds: its structures, its strings, payloads and event
/// list (each allocation at least 16 bytes, plus 16 of the allocator's), and each attribute's slot
/// of its map (two strings, in B-tree nodes about half full: prost inserts keys in wire order,
/// and keys sent sorted leave the nodes half full). What the ingest service charges a batch against its budgets of
/// bytes: encoded sizes understate it by up to [`MAX_DECODED_PER_ENCODED_BYTE`] times (an
/// attribute of a few bytes takes a hundred once decoded).
#[must_use]
pub fn decoded_request_bytes(request: &v1::PublishRequest) -> usize {
    const SLOT: usize = 2 * std::mem::size_of::<String>();
    let heap = |capacity: usize| {
        if capacity == 0 {
            0
        } else {
            capacity.max(16) + 16
        }
    };
    let mut bytes = std::mem::size_of::<v1::PublishRequest>()
        .saturating_add(request.batch_id.capacity())
        .saturating_add(
            request
                .events
                .capacity()
                .saturating_mul(std::mem::size_of::<v1::Touchpoint>()),
        );
    for event in &request.events {
        let strings = heap(event.event_id.capacity())
            + heap(event.customer_id.capacity())
            + heap(event.r#type.capacity())
            + heap(event.payload.capacity());
        // A B-tree's nodes hold up to 11 entries of two strings, and are at least half full.
        let slots = event.attributes.len().saturating_mul(2);
        let attributes: usize = event
            .attributes
            .iter()
            .map(|(key, value)| heap(key.capacity()) + heap(value.capacity()))
            .sum();
        bytes = bytes
            .saturating_add(strings)
            .saturating_add(slots.saturating_mul(SLOT))
            .saturating_add(attributes);
    }
    bytes
}

/// Counts the fields at the top level of an encoded message, stopping past `limit`. A group (a
/// proto2 wire type no Touchline message has, which prost skips on an unknown field number) counts
/// as `usize::MAX`: skipped, it would hide the fields after it from the count.
fn top_level_fields(bytes: &[u8], limit: usize) -> usize {
    let mut count = 0_usize;
    for field in fields(bytes) {
        if matches!(field, Field::Group) {
            return usize::MAX;
        }
        count += 1;
        if count > limit {
            break;
        }
    }
    count
}

/// One field of an encoded message.
pub(crate) enum Field<'a> {
    /// A varint or fixed-size field.
    Scalar,
    /// A length-delimited field (a string, bytes, a message, a map entry, a packed array).
    Delimited { number: u64, payload: &'a [u8] },
    /// The start or end of a group: the iteration ends after it.
    Group,
}

/// The fields at the top level of an encoded message, in order. Malformed input (an invalid wire
/// type, a truncated field) ends them where it stops making sense: prost then refuses the
/// message. A group ends them too, after yielding [`Field::Group`].
pub(crate) fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Field<'_>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let tag = varint(&mut bytes)?;
        let field = match tag & 0b111 {
            // varint
            0 => {
                varint(&mut bytes)?;
                Field::Scalar
            }
            // 64-bit
            1 => {
                bytes = bytes.get(8..)?;
                Field::Scalar
            }
            // length-delimited
            2 => {
                let length = usize::try_from(varint(&mut bytes)?).ok()?;
                let payload = bytes.get(..length)?;
                bytes = bytes.get(length..)?;
                Field::Delimited {
                    number: tag >> 3,
                    payload,
                }
            }
            // 32-bit
            5 => {
                bytes = bytes.get(4..)?;
                Field::Scalar
            }
            // start and end of a group
            3 | 4 => {
                bytes = &[];
                Field::Group
            }
            // invalid wire types
            _ => return None,
        };
        Some(field)
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

    /// prost skips a group on an unknown field number and decodes what follows: a group must not
    /// hide the fields after it from the count.
    #[test]
    fn a_group_is_refused_wherever_it_is() {
        let mut bytes = vec![0x7b, 0x7c];
        bytes.extend([0x0a, 0x00].repeat(10));
        assert_eq!(top_level_fields(&bytes, MAX_TOP_LEVEL_FIELDS), usize::MAX);
        assert_eq!(decoded_publish_request(&bytes), usize::MAX);
        // Inside an event, before its attributes.
        let mut event = vec![0x7b, 0x7c];
        event.extend([0x42, 0x00].repeat(10));
        let mut request = vec![0x0a, u8::try_from(event.len()).unwrap_or_default()];
        request.extend(event);
        assert_eq!(decoded_publish_request(&request), usize::MAX);
        // prost does decode such a message: the group is what the count must not skip.
        let decoded = v1::PublishRequest::decode(bytes.as_slice()).expect("prost skips the group");
        assert_eq!(decoded.events.len(), 10);
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

    #[test]
    fn an_envelope_is_estimated_by_its_touchpoint_and_its_fields() {
        let envelope = v1::Envelope {
            version: 1,
            partner_id: "courier".to_owned(),
            touchpoint: Some(v1::Touchpoint {
                event_id: "e-1".to_owned(),
                customer_id: "c-1".to_owned(),
                attributes: (0..3).map(|i| (format!("k{i}"), String::new())).collect(),
                ..v1::Touchpoint::default()
            }),
            received_at: None,
        };
        let bytes = envelope.encode_to_vec();
        // The touchpoint: its id, its customer and three attributes.
        let expected = bytes.len()
            + std::mem::size_of::<v1::Envelope>()
            + std::mem::size_of::<v1::Touchpoint>()
            + 5 * CHARGED_FIELD_BYTES;
        assert_eq!(decoded_envelope_bytes(&bytes), expected);
        // A group inside the touchpoint.
        let mut touchpoint = vec![0x7b, 0x7c];
        touchpoint.extend([0x42, 0x00].repeat(10));
        let mut grouped = vec![0x1a, u8::try_from(touchpoint.len()).unwrap_or_default()];
        grouped.extend(touchpoint);
        assert_eq!(decoded_envelope_bytes(&grouped), usize::MAX);
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

    /// What a decoded request is charged: about its encoded size for ordinary events, many times
    /// it for attributes of a few bytes (which the codec lets through up to its ratio).
    #[test]
    fn a_decoded_request_is_charged_what_it_holds() {
        let ordinary = v1::PublishRequest {
            events: vec![
                v1::Touchpoint {
                    event_id: "e".repeat(40),
                    customer_id: "c".repeat(40),
                    r#type: "parcel.scanned".to_owned(),
                    attributes: (0..4)
                        .map(|i| (format!("key-{i}"), "v".repeat(100)))
                        .collect(),
                    payload: vec![7; 1024],
                    ..v1::Touchpoint::default()
                };
                500
            ],
            batch_id: "b".to_owned(),
        };
        let encoded = ordinary.encoded_len();
        let decoded = decoded_request_bytes(&ordinary);
        assert!(
            decoded > encoded && decoded < 3 * encoded,
            "{decoded} for {encoded}"
        );
        // 100,000 attributes of a three-letter key and an empty value: 7 bytes each on the wire.
        let tiny = v1::PublishRequest {
            events: vec![v1::Touchpoint {
                attributes: (0..100_000)
                    .map(|i| (format!("{i:03x}"), String::new()))
                    .collect(),
                ..v1::Touchpoint::default()
            }],
            batch_id: String::new(),
        };
        let encoded = tiny.encoded_len();
        let decoded = decoded_request_bytes(&tiny);
        assert!(decoded > 8 * encoded, "{decoded} for {encoded}");

        // What a unary call is charged as it is decoded is at least what it then holds.
        let one_letter = v1::PublishRequest {
            events: vec![
                v1::Touchpoint {
                    event_id: "e".to_owned(),
                    attributes: (0..32_u8)
                        .map(|i| (char::from(b'a' + i % 26).to_string(), "v".to_owned()))
                        .collect(),
                    ..v1::Touchpoint::default()
                };
                3
            ],
            batch_id: String::new(),
        };
        let empty_events = |count| v1::PublishRequest {
            events: vec![v1::Touchpoint::default(); count],
            batch_id: String::new(),
        };
        let (one, five) = (empty_events(1), empty_events(5));
        for request in [&ordinary, &tiny, &one_letter, &one, &five] {
            let bytes = request.encode_to_vec();
            let decoded = v1::PublishRequest::decode(bytes.as_slice()).expect("decodes");
            assert!(
                charged_publish_request(&bytes) >= decoded_request_bytes(&decoded),
                "{} charged, {} held",
                charged_publish_request(&bytes),
                decoded_request_bytes(&decoded)
            );
        }
    }

    /// The messages of one call add up in each pool, a message past a pool is refused with its
    /// reason (nothing of it kept), and the charges go back when taken and dropped.
    #[test]
    fn a_calls_charges_add_up_and_a_message_past_a_pool_is_refused() {
        let share = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
        let server = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
        let budget = DecodeBudget::new(vec![
            BytePool::new(std::sync::Arc::clone(&share), 10, "TOO_MANY_CALLS", "share"),
            BytePool::new(std::sync::Arc::clone(&server), 100, "OVERLOADED", "server"),
        ]);
        budget.charge(4 * 1024).expect("fits");
        budget.charge(5 * 1024).expect("fits beside it");
        assert_eq!(
            (share.available_permits(), server.available_permits()),
            (1, 91)
        );
        let refused = budget.charge(2 * 1024).expect_err("past the share");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(budget.refused(), Some("TOO_MANY_CALLS"));
        assert_eq!(
            (share.available_permits(), server.available_permits()),
            (1, 91),
            "nothing of the refused message is kept"
        );
        drop(budget.charged());
        assert_eq!(
            (share.available_permits(), server.available_permits()),
            (10, 100)
        );
    }
}
