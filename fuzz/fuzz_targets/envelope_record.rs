//! Any bytes as the value of a Kafka record, decoded the way the projector does it (anything that
//! fails goes to the dead-letter store). Nothing may panic, and a record that decodes must encode
//! back to a record that decodes to the same envelope, every field of it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = touchline_proto::decode_envelope(Some(data)) else { return };
    let again = touchline_proto::decode_envelope(Some(&touchline_proto::encode_envelope(&envelope)));
    match again {
        // The whole envelope, compared as printed (a float attribute may be NaN, which no
        // comparison of values takes as equal to itself; printed, it is `NaN` both times).
        Ok(again) => assert_eq!(
            format!("{again:?}"),
            format!("{envelope:?}"),
            "the envelope changed through a record"
        ),
        Err(error) => panic!("a decoded envelope does not decode after re-encoding: {error}"),
    }
});
