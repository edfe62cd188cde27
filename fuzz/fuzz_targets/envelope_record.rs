//! Any bytes as the value of a Kafka record, decoded the way the projector does it (anything that
//! fails goes to the dead-letter store). Nothing may panic, and a record that decodes must encode
//! back to a record that decodes to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = touchline_proto::decode_envelope(Some(data)) else { return };
    let again = touchline_proto::decode_envelope(Some(&touchline_proto::encode_envelope(&envelope)));
    match again {
        Ok(again) => {
            assert_eq!(again.partner_id, envelope.partner_id);
            assert_eq!(again.touchpoint.event_id, envelope.touchpoint.event_id);
            assert_eq!(again.touchpoint.customer_id, envelope.touchpoint.customer_id);
            assert_eq!(again.touchpoint.occurred_at, envelope.touchpoint.occurred_at);
            assert_eq!(again.received_at, envelope.received_at);
        }
        Err(error) => panic!("a decoded envelope does not decode after re-encoding: {error}"),
    }
});
