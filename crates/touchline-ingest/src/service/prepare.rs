//! A request's events checked and encoded: each validated against the limits and the partner's
//! contract (duplicates within the batch included), the accepted ones wrapped in their envelope
//! (the partner from the credential) and encoded as the Kafka record.

use prost::Message as _;
use touchline_core::{
    Envelope, Limits, RejectReason, Rejection, Touchpoint, UnixNanos, reject_duplicates_in_batch,
    validate,
};
use touchline_proto::convert::raw_touchpoint;
use touchline_proto::v1;

use crate::auth::Authenticated;

/// Validates one event: fields first (each problem has its own reason), then the whole encoded
/// size, then the partner's contract.
fn check_event(
    event: v1::Touchpoint,
    partner: &Authenticated,
    now: UnixNanos,
    limits: &Limits,
) -> Result<Touchpoint, Rejection> {
    let size = event.encoded_len();
    let touchpoint = validate(raw_touchpoint(event), now, limits)?;
    if size > limits.max_event_len {
        return Err(Rejection::new(
            RejectReason::EventTooLarge,
            "",
            format!(
                "the event is {size} bytes encoded, the limit is {}",
                limits.max_event_len
            ),
        ));
    }
    partner.contract.check(&touchpoint)?;
    Ok(touchpoint)
}

/// A batch checked and encoded, ready to produce.
pub(super) struct Prepared {
    /// The events' ids as given (truncated), for the answers.
    pub(super) event_ids: Vec<String>,
    /// Per event: its place in `envelopes`, or why it was rejected.
    pub(super) slots: Vec<Result<usize, Rejection>>,
    /// The accepted events and their encoded records.
    pub(super) envelopes: Vec<(Envelope, Vec<u8>)>,
}

/// Validates every event of a batch (duplicates within it included) and encodes the accepted ones.
pub(super) fn prepare(
    events: Vec<v1::Touchpoint>,
    partner: &Authenticated,
    now: UnixNanos,
    limits: &Limits,
) -> Prepared {
    prepare_within(
        events,
        partner,
        now,
        limits,
        touchline_proto::codec::MAX_DECODED_RECORD_BYTES,
    )
}

/// [`prepare`], refusing an event whose record would take more than `max_decoded` bytes once
/// decoded (the projector's bound: what it would dead-letter is not acknowledged).
fn prepare_within(
    events: Vec<v1::Touchpoint>,
    partner: &Authenticated,
    now: UnixNanos,
    limits: &Limits,
    max_decoded: usize,
) -> Prepared {
    let event_ids = events
        .iter()
        .map(|event| touchline_core::ids::echoed_id(&event.event_id).to_owned())
        .collect();
    let mut checked: Vec<Result<Touchpoint, Rejection>> = events
        .into_iter()
        .map(|event| check_event(event, partner, now, limits))
        .collect();
    reject_duplicates_in_batch(&mut checked);
    let mut envelopes = Vec::new();
    let mut slots = Vec::with_capacity(checked.len());
    for result in checked {
        match result {
            Ok(touchpoint) => {
                let envelope = Envelope {
                    partner_id: partner.partner_id.clone(),
                    touchpoint,
                    received_at: now,
                };
                let value = touchline_proto::encode_envelope(&envelope);
                // What the projector would refuse to decode is not acknowledged (only limits
                // raised far past their defaults let such an event through).
                let decoded = touchline_proto::codec::decoded_envelope_bytes(&value);
                if decoded > max_decoded {
                    slots.push(Err(Rejection::new(
                        RejectReason::EventTooLarge,
                        "",
                        format!(
                            "the event would take about {decoded} bytes once decoded, more than the {max_decoded} a record may take in the projector"
                        ),
                    )));
                    continue;
                }
                slots.push(Ok(envelopes.len()));
                envelopes.push((envelope, value));
            }
            Err(rejection) => slots.push(Err(rejection)),
        }
    }
    Prepared {
        event_ids,
        slots,
        envelopes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event whose record the projector would refuse to decode (above its bound, here lowered
    /// to 2 KiB) is rejected, not acknowledged; the others of the batch go on.
    #[test]
    fn an_event_the_projector_would_not_decode_is_too_large() {
        let event = |id: &str, attributes: usize| v1::Touchpoint {
            event_id: id.to_owned(),
            customer_id: "alice".to_owned(),
            r#type: "parcel.scanned".to_owned(),
            occurred_at: Some(touchline_proto::convert::timestamp(UnixNanos(
                1_000_000_000,
            ))),
            channel: v1::Channel::Web as i32,
            stage: v1::JourneyStage::Fulfil as i32,
            attributes: (0..attributes)
                .map(|n| (format!("k{n}"), "v".to_owned()))
                .collect(),
            ..v1::Touchpoint::default()
        };
        let partner = Authenticated {
            partner_id: touchline_core::PartnerId::parse("courier").expect("valid"),
            contract: std::sync::Arc::default(),
        };
        let prepared = prepare_within(
            vec![event("small", 1), event("many", 20)],
            &partner,
            UnixNanos(2_000_000_000),
            &Limits::default(),
            2048,
        );
        assert!(prepared.slots[0].is_ok());
        let refused = prepared.slots[1].as_ref().expect_err("refused");
        assert_eq!(refused.reason, RejectReason::EventTooLarge);
        assert!(refused.message.contains("once decoded"), "{refused:?}");
        assert_eq!(prepared.envelopes.len(), 1);
    }
}
