//! The gRPC codec of every Touchline service and client: prost's, with one check before a message
//! is decoded. A protobuf field of two bytes (an empty `Touchpoint` in `PublishRequest.events`,
//! say) decodes into a struct of about 200 bytes: a 4 MiB request of them would take hundreds of
//! MiB of memory before any handler could refuse it. So the fields at a message's top level are
//! counted first, without allocating, and a message with more than [`MAX_TOP_LEVEL_FIELDS`] is
//! refused with `INVALID_ARGUMENT` (`TOO_MANY_FIELDS`). No legitimate message comes near it: a
//! request holds at most `ingest.max-batch-events` events (100,000 at most), a page at most 1,000
//! entries.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf as _;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt as _};

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

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if top_level_fields(buf.chunk(), MAX_TOP_LEVEL_FIELDS) > MAX_TOP_LEVEL_FIELDS {
            return Err(Status::with_error_details(
                tonic::Code::InvalidArgument,
                format!(
                    "the message has more than {MAX_TOP_LEVEL_FIELDS} fields (or repeated elements) at its top level"
                ),
                ErrorDetails::with_error_info("TOO_MANY_FIELDS", "touchline.dev", []),
            ));
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Counts the fields at the top level of an encoded message, stopping past `limit`. Malformed
/// input ends the count where it stops making sense: prost then reports the error.
fn top_level_fields(mut bytes: &[u8], limit: usize) -> usize {
    let mut fields = 0;
    while !bytes.is_empty() && fields <= limit {
        let Some(tag) = varint(&mut bytes) else {
            break;
        };
        let skip = match tag & 0b111 {
            // varint
            0 => varint(&mut bytes).map(|_| 0),
            // 64-bit
            1 => Some(8),
            // length-delimited
            2 => varint(&mut bytes).and_then(|length| usize::try_from(length).ok()),
            // 32-bit
            5 => Some(4),
            // groups (unused by proto3) and invalid wire types
            _ => None,
        };
        let Some(skip) = skip else { break };
        let Some(rest) = bytes.get(skip..) else {
            break;
        };
        bytes = rest;
        fields += 1;
    }
    fields
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
    use crate::v1;

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
}
