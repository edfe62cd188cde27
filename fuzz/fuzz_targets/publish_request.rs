//! Any bytes as a `PublishRequest`, decoded and validated the way ingest does it. Nothing may
//! panic, and every event that passes validation must survive the trip through a Kafka record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use touchline_core::{Envelope, Limits, PartnerId, UnixNanos, reject_duplicates_in_batch, validate};
use touchline_proto::convert::raw_touchpoint;
use touchline_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = v1::PublishRequest::decode(data) else { return };
    let now = UnixNanos(1_800_000_000_000_000_000);
    let limits = Limits::default();
    let mut results: Vec<_> = request.events.into_iter().map(|event| validate(raw_touchpoint(event), now, &limits)).collect();
    reject_duplicates_in_batch(&mut results);
    let partner = PartnerId::parse("fuzz-partner").expect("a valid partner id");
    for touchpoint in results.into_iter().flatten() {
        let envelope = Envelope { partner_id: partner.clone(), touchpoint, received_at: now };
        let bytes = touchline_proto::encode_envelope(&envelope);
        let decoded = touchline_proto::decode_envelope(Some(&bytes)).expect("a validated event decodes");
        assert_eq!(decoded.partner_id, envelope.partner_id);
        assert_eq!(decoded.touchpoint.event_id, envelope.touchpoint.event_id);
        assert_eq!(decoded.touchpoint.occurred_at, envelope.touchpoint.occurred_at);
        assert_eq!(decoded.touchpoint.attributes, envelope.touchpoint.attributes);
    }
});
