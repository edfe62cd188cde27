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
