//! A request's events checked and encoded: each validated against the limits and the partner's
//! contract (duplicates within the batch included), the accepted ones wrapped in their envelope
//! (the partner from the credential) and encoded as the Kafka record.

use prost::Message as _;
use touchline_core::{
    Envelope, Limits, RejectReason, Rejection, Touchpoint, UnixNanos,
    reject_duplicates_in_batch_by, validate,
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

/// [`check_event`], the event's envelope and its record as it goes to Kafka, refused when it would take more
/// than `max_decoded` bytes once decoded (what the projector would refuse to decode is not
/// acknowledged; only limits raised far past their defaults let such an event through).
fn check_and_encode(
    event: v1::Touchpoint,
    partner: &Authenticated,
    now: UnixNanos,
    limits: &Limits,
    max_decoded: usize,
) -> Result<(Envelope, Vec<u8>), Rejection> {
    let envelope = Envelope {
        partner_id: partner.partner_id.clone(),
        touchpoint: check_event(event, partner, now, limits)?,
        received_at: now,
    };
    let value = touchline_proto::encode_envelope(&envelope);
    let decoded = touchline_proto::codec::decoded_envelope_bytes(&value);
    if decoded > max_decoded {
        return Err(Rejection::new(
            RejectReason::EventTooLarge,
            "",
            format!(
                "the event would take about {decoded} bytes once decoded, more than the {max_decoded} a record may take in the projector"
            ),
        ));
    }
    Ok((envelope, value))
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
    // Each event checked and encoded first, the duplicates rejected after: when an event's first
    // copy is refused (whatever for), the next copy is checked in its place.
    let mut checked: Vec<_> = events
        .into_iter()
        .map(|event| check_and_encode(event, partner, now, limits, max_decoded))
        .collect();
    reject_duplicates_in_batch_by(&mut checked, |(envelope, _)| &envelope.touchpoint);
    let mut envelopes = Vec::new();
    let mut slots = Vec::with_capacity(checked.len());
    for result in checked {
        match result {
            Ok(accepted) => {
                slots.push(Ok(envelopes.len()));
                envelopes.push(accepted);
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

    /// An event of `alice` with `attributes` attributes.
    fn event(id: &str, attributes: usize) -> v1::Touchpoint {
        v1::Touchpoint {
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
        }
    }

    /// Prepared with the projector's bound lowered to 2 KiB (20 attributes pass it, 1 does not).
    fn prepare_2_kib(events: Vec<v1::Touchpoint>) -> Prepared {
        let partner = Authenticated {
            partner_id: touchline_core::PartnerId::parse("courier").expect("valid"),
            contract: std::sync::Arc::default(),
        };
        prepare_within(
            events,
            &partner,
            UnixNanos(2_000_000_000),
            &Limits::default(),
            2048,
        )
    }

    /// An event whose record the projector would refuse to decode (above its bound, here lowered
    /// to 2 KiB) is rejected, not acknowledged; the others of the batch go on.
    #[test]
    fn an_event_the_projector_would_not_decode_is_too_large() {
        let prepared = prepare_2_kib(vec![event("small", 1), event("many", 20)]);
        assert!(prepared.slots[0].is_ok());
        let refused = prepared.slots[1].as_ref().expect_err("refused");
        assert_eq!(refused.reason, RejectReason::EventTooLarge);
        assert!(refused.message.contains("once decoded"), "{refused:?}");
        assert_eq!(prepared.envelopes.len(), 1);
    }

    /// A first copy refused as too large once decoded leaves the next copy of its id to be
    /// checked in its place, as for any other refusal: not refused as a duplicate.
    #[test]
    fn the_copy_after_one_too_large_once_decoded_is_no_duplicate() {
        let prepared = prepare_2_kib(vec![event("x", 20), event("x", 1)]);
        let refused = prepared.slots[0].as_ref().expect_err("refused");
        assert_eq!(refused.reason, RejectReason::EventTooLarge);
        assert_eq!(prepared.slots[1].as_ref().ok(), Some(&0));
        assert_eq!(prepared.envelopes.len(), 1);
        // A copy after an accepted one is a duplicate.
        let prepared = prepare_2_kib(vec![event("y", 1), event("y", 1)]);
        let refused = prepared.slots[1].as_ref().expect_err("refused");
        assert_eq!(refused.reason, RejectReason::DuplicateInBatch);
    }
}
