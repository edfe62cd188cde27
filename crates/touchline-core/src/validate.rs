//! Validation of touchpoints as partners send them. Each problem has its own [`RejectReason`],
//! mirrored one to one by the contract's `RejectReason` enum, and names the offending field.

use std::collections::{BTreeMap, HashSet};

use crate::ids::IdError;
use crate::{
    Channel, CustomerId, EventId, EventType, JourneyStage, Outcome, Sentiment, Touchpoint,
    UnixNanos,
};

/// Size limits of a touchpoint. Defaults are the documented contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_attributes: usize,
    pub max_attribute_key_len: usize,
    pub max_attribute_value_len: usize,
    pub max_payload_len: usize,
    /// The most bytes of one encoded event, all fields included.
    pub max_event_len: usize,
    /// How far ahead of the server's clock `occurred_at` may be (clock skew allowance).
    pub max_future_skew_nanos: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_attributes: 32,
            max_attribute_key_len: 64,
            max_attribute_value_len: 1024,
            max_payload_len: 16 * 1024,
            max_event_len: 64 * 1024,
            max_future_skew_nanos: 5 * 60 * 1_000_000_000,
        }
    }
}

impl Limits {
    /// No size limits and no clock check: what a consumer checks a record against. The ingest
    /// that accepted the event enforced its configured limits (which may be above the defaults),
    /// and the broker bounds a record's size; a consumer that applied the defaults again would
    /// dead-letter events that were acknowledged under larger limits.
    pub const DECODING: Self = Self {
        max_attributes: usize::MAX,
        max_attribute_key_len: usize::MAX,
        max_attribute_value_len: usize::MAX,
        max_payload_len: usize::MAX,
        max_event_len: usize::MAX,
        max_future_skew_nanos: i64::MAX,
    };
}

/// A touchpoint as received, before validation. The proto crate fills it from the wire message,
/// keeping enum numbers raw so that unknown values can be rejected with their own reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawTouchpoint {
    pub event_id: String,
    pub customer_id: String,
    pub event_type: String,
    /// Seconds and nanos, as in `google.protobuf.Timestamp`; `None` when unset.
    pub occurred_at: Option<(i64, i32)>,
    pub channel: i32,
    pub stage: i32,
    /// Sentiment number and optional score; `None` when no outcome was sent.
    pub outcome: Option<(i32, Option<f64>)>,
    pub attributes: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Why one event was rejected. The numbers are the contract's `RejectReason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    EventIdMissing = 1,
    EventIdTooLong = 2,
    EventIdInvalid = 3,
    CustomerIdMissing = 4,
    CustomerIdTooLong = 5,
    CustomerIdInvalid = 6,
    TypeMissing = 7,
    TypeTooLong = 8,
    TypeInvalid = 9,
    OccurredAtMissing = 10,
    OccurredAtTooOld = 11,
    OccurredAtInFuture = 12,
    OccurredAtInvalid = 13,
    StageMissing = 14,
    StageUnknown = 15,
    ChannelUnknown = 16,
    SentimentUnknown = 17,
    ScoreOutOfRange = 18,
    TooManyAttributes = 19,
    AttributeKeyInvalid = 20,
    AttributeValueInvalid = 21,
    PayloadTooLarge = 22,
    DuplicateInBatch = 23,
    EventTooLarge = 24,
    TypeNotAllowed = 25,
    ChannelNotAllowed = 26,
}

impl RejectReason {
    /// The contract's number.
    #[must_use]
    pub fn number(self) -> i32 {
        self as i32
    }

    /// The stable code, as in the contract without its `REASON_` prefix.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Self::EventIdMissing => "EVENT_ID_MISSING",
            Self::EventIdTooLong => "EVENT_ID_TOO_LONG",
            Self::EventIdInvalid => "EVENT_ID_INVALID",
            Self::CustomerIdMissing => "CUSTOMER_ID_MISSING",
            Self::CustomerIdTooLong => "CUSTOMER_ID_TOO_LONG",
            Self::CustomerIdInvalid => "CUSTOMER_ID_INVALID",
            Self::TypeMissing => "TYPE_MISSING",
            Self::TypeTooLong => "TYPE_TOO_LONG",
            Self::TypeInvalid => "TYPE_INVALID",
            Self::OccurredAtMissing => "OCCURRED_AT_MISSING",
            Self::OccurredAtTooOld => "OCCURRED_AT_TOO_OLD",
            Self::OccurredAtInFuture => "OCCURRED_AT_IN_FUTURE",
            Self::OccurredAtInvalid => "OCCURRED_AT_INVALID",
            Self::StageMissing => "STAGE_MISSING",
            Self::StageUnknown => "STAGE_UNKNOWN",
            Self::ChannelUnknown => "CHANNEL_UNKNOWN",
            Self::SentimentUnknown => "SENTIMENT_UNKNOWN",
            Self::ScoreOutOfRange => "SCORE_OUT_OF_RANGE",
            Self::TooManyAttributes => "TOO_MANY_ATTRIBUTES",
            Self::AttributeKeyInvalid => "ATTRIBUTE_KEY_INVALID",
            Self::AttributeValueInvalid => "ATTRIBUTE_VALUE_INVALID",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::DuplicateInBatch => "DUPLICATE_IN_BATCH",
            Self::EventTooLarge => "EVENT_TOO_LARGE",
            Self::TypeNotAllowed => "TYPE_NOT_ALLOWED",
            Self::ChannelNotAllowed => "CHANNEL_NOT_ALLOWED",
        }
    }
}

/// One rejected event: the reason, the field path and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub field: String,
    pub message: String,
}

impl Rejection {
    /// A rejection of `field` for `reason`, explained by `message`.
    #[must_use]
    pub fn new(reason: RejectReason, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Maps an id problem to one of three reasons (missing, too long, invalid).
fn id_rejection(
    field: &str,
    error: IdError,
    [missing, too_long, invalid]: [RejectReason; 3],
) -> Rejection {
    let reason = match error {
        IdError::Empty => missing,
        IdError::TooLong { .. } => too_long,
        IdError::InvalidCharacter { .. } => invalid,
    };
    Rejection::new(reason, field, format!("{field} {error}"))
}

/// Validates one touchpoint against `limits` and the server clock `now`.
///
/// # Errors
/// The first problem found, in field order.
pub fn validate(
    raw: RawTouchpoint,
    now: UnixNanos,
    limits: &Limits,
) -> Result<Touchpoint, Rejection> {
    use RejectReason as R;
    let event_id = EventId::parse(raw.event_id).map_err(|error| {
        id_rejection(
            "event_id",
            error,
            [R::EventIdMissing, R::EventIdTooLong, R::EventIdInvalid],
        )
    })?;
    let customer_id = CustomerId::parse(raw.customer_id).map_err(|error| {
        id_rejection(
            "customer_id",
            error,
            [
                R::CustomerIdMissing,
                R::CustomerIdTooLong,
                R::CustomerIdInvalid,
            ],
        )
    })?;
    let event_type = EventType::parse(raw.event_type).map_err(|error| {
        id_rejection(
            "type",
            error,
            [R::TypeMissing, R::TypeTooLong, R::TypeInvalid],
        )
    })?;
    let occurred_at = validate_occurred_at(raw.occurred_at, now, limits)?;
    let channel = Channel::from_number(raw.channel).ok_or_else(|| {
        Rejection::new(
            R::ChannelUnknown,
            "channel",
            format!("channel {} is not a known channel", raw.channel),
        )
    })?;
    let stage = match raw.stage {
        0 => {
            return Err(Rejection::new(
                R::StageMissing,
                "stage",
                "stage is required",
            ));
        }
        number => JourneyStage::from_number(number).ok_or_else(|| {
            Rejection::new(
                R::StageUnknown,
                "stage",
                format!("stage {number} is not a known journey stage"),
            )
        })?,
    };
    let outcome = raw.outcome.map(validate_outcome).transpose()?;
    let attributes = validate_attributes(raw.attributes, limits)?;
    if raw.payload.len() > limits.max_payload_len {
        return Err(Rejection::new(
            R::PayloadTooLarge,
            "payload",
            format!(
                "payload is {} bytes, the limit is {}",
                raw.payload.len(),
                limits.max_payload_len
            ),
        ));
    }
    Ok(Touchpoint {
        event_id,
        customer_id,
        event_type,
        occurred_at,
        channel,
        stage,
        outcome,
        attributes,
        payload: raw.payload,
    })
}

fn validate_occurred_at(
    occurred_at: Option<(i64, i32)>,
    now: UnixNanos,
    limits: &Limits,
) -> Result<UnixNanos, Rejection> {
    use RejectReason as R;
    let Some((seconds, nanos)) = occurred_at else {
        return Err(Rejection::new(
            R::OccurredAtMissing,
            "occurred_at",
            "occurred_at is required",
        ));
    };
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(Rejection::new(
            R::OccurredAtInvalid,
            "occurred_at.nanos",
            "nanos must be in 0..=999999999",
        ));
    }
    if seconds < 0 {
        return Err(Rejection::new(
            R::OccurredAtTooOld,
            "occurred_at",
            "occurred_at is before 1970-01-01T00:00:00Z",
        ));
    }
    let latest = now.saturating_add_nanos(limits.max_future_skew_nanos);
    match UnixNanos::from_parts(seconds, nanos) {
        Some(instant) if instant <= latest => Ok(instant),
        _ => Err(Rejection::new(
            R::OccurredAtInFuture,
            "occurred_at",
            format!(
                "occurred_at is more than {}s ahead of the server clock",
                limits.max_future_skew_nanos / 1_000_000_000
            ),
        )),
    }
}

fn validate_outcome((sentiment, score): (i32, Option<f64>)) -> Result<Outcome, Rejection> {
    let sentiment = Sentiment::from_number(sentiment).ok_or_else(|| {
        Rejection::new(
            RejectReason::SentimentUnknown,
            "outcome.sentiment",
            format!("sentiment {sentiment} is not a known sentiment"),
        )
    })?;
    if let Some(score) = score
        && !(score.is_finite() && (0.0..=100.0).contains(&score))
    {
        return Err(Rejection::new(
            RejectReason::ScoreOutOfRange,
            "outcome.score",
            "score must be a number in [0, 100]",
        ));
    }
    Ok(Outcome { sentiment, score })
}

fn validate_attributes(
    attributes: Vec<(String, String)>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, Rejection> {
    use RejectReason as R;
    if attributes.len() > limits.max_attributes {
        return Err(Rejection::new(
            R::TooManyAttributes,
            "attributes",
            format!(
                "{} attributes, the limit is {}",
                attributes.len(),
                limits.max_attributes
            ),
        ));
    }
    let mut validated = BTreeMap::new();
    for (key, value) in attributes {
        let key_ok = !key.is_empty()
            && key.len() <= limits.max_attribute_key_len
            && key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        if !key_ok {
            // The key itself may be hostile: name it only when it is printable and short.
            let field = if key.len() <= limits.max_attribute_key_len
                && key.bytes().all(|byte| (0x20..0x7f).contains(&byte))
            {
                format!("attributes[{key:?}]")
            } else {
                "attributes".to_owned()
            };
            return Err(Rejection::new(
                R::AttributeKeyInvalid,
                field,
                format!(
                    "attribute keys are 1..={} bytes of [A-Za-z0-9._-]",
                    limits.max_attribute_key_len
                ),
            ));
        }
        if value.len() > limits.max_attribute_value_len || value.chars().any(char::is_control) {
            return Err(Rejection::new(
                R::AttributeValueInvalid,
                format!("attributes.{key}"),
                format!(
                    "attribute values are at most {} bytes without control characters",
                    limits.max_attribute_value_len
                ),
            ));
        }
        validated.insert(key, value);
    }
    Ok(validated)
}

/// Validates a whole batch: every event gets its own result, in order. A repeated `event_id` in
/// the same batch is rejected as [`RejectReason::DuplicateInBatch`] after its first occurrence.
#[must_use]
pub fn validate_batch(
    raws: Vec<RawTouchpoint>,
    now: UnixNanos,
    limits: &Limits,
) -> Vec<Result<Touchpoint, Rejection>> {
    let mut results: Vec<_> = raws
        .into_iter()
        .map(|raw| validate(raw, now, limits))
        .collect();
    reject_duplicates_in_batch(&mut results);
    results
}

/// Rejects every valid event whose `event_id` an earlier valid event of the batch already has.
pub fn reject_duplicates_in_batch(results: &mut [Result<Touchpoint, Rejection>]) {
    reject_duplicates_in_batch_by(results, |touchpoint| touchpoint);
}

/// [`reject_duplicates_in_batch`] of results that hold more than the event, each `touchpoint` of.
pub fn reject_duplicates_in_batch_by<T>(
    results: &mut [Result<T, Rejection>],
    touchpoint: impl Fn(&T) -> &Touchpoint,
) {
    let mut seen = HashSet::with_capacity(results.len());
    for result in results.iter_mut() {
        if let Ok(checked) = result
            && !seen.insert(touchpoint(checked).event_id.clone())
        {
            *result = Err(Rejection::new(
                RejectReason::DuplicateInBatch,
                "event_id",
                "an earlier event in this request has the same event_id",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixNanos = UnixNanos(1_800_000_000_000_000_000);

    fn valid() -> RawTouchpoint {
        RawTouchpoint {
            event_id: "evt-1".into(),
            customer_id: "cust-1".into(),
            event_type: "delivery.completed".into(),
            occurred_at: Some((1_799_999_000, 0)),
            channel: Channel::Doorstep.number(),
            stage: JourneyStage::Fulfil.number(),
            outcome: Some((Sentiment::Positive.number(), Some(90.0))),
            attributes: vec![("carrier".into(), "swift".into())],
            payload: b"{}".to_vec(),
        }
    }

    fn reason_of(raw: RawTouchpoint) -> Option<(RejectReason, String)> {
        validate(raw, NOW, &Limits::default())
            .err()
            .map(|rejection| (rejection.reason, rejection.field))
    }

    #[test]
    fn a_valid_touchpoint_passes() {
        let touchpoint = validate(valid(), NOW, &Limits::default());
        assert_eq!(touchpoint.map(|t| t.stage), Ok(JourneyStage::Fulfil));
    }

    #[test]
    fn each_problem_has_its_reason_and_field() {
        use RejectReason as R;
        let cases: Vec<(RawTouchpoint, R, &str)> = vec![
            (
                RawTouchpoint {
                    event_id: String::new(),
                    ..valid()
                },
                R::EventIdMissing,
                "event_id",
            ),
            (
                RawTouchpoint {
                    event_id: "e".repeat(129),
                    ..valid()
                },
                R::EventIdTooLong,
                "event_id",
            ),
            (
                RawTouchpoint {
                    event_id: "e\u{0}".into(),
                    ..valid()
                },
                R::EventIdInvalid,
                "event_id",
            ),
            (
                RawTouchpoint {
                    customer_id: String::new(),
                    ..valid()
                },
                R::CustomerIdMissing,
                "customer_id",
            ),
            (
                RawTouchpoint {
                    customer_id: "c".repeat(1 << 20),
                    ..valid()
                },
                R::CustomerIdTooLong,
                "customer_id",
            ),
            (
                RawTouchpoint {
                    customer_id: "a b".into(),
                    ..valid()
                },
                R::CustomerIdInvalid,
                "customer_id",
            ),
            (
                RawTouchpoint {
                    event_type: String::new(),
                    ..valid()
                },
                R::TypeMissing,
                "type",
            ),
            (
                RawTouchpoint {
                    event_type: "a".repeat(65),
                    ..valid()
                },
                R::TypeTooLong,
                "type",
            ),
            (
                RawTouchpoint {
                    event_type: "Delivery".into(),
                    ..valid()
                },
                R::TypeInvalid,
                "type",
            ),
            (
                RawTouchpoint {
                    occurred_at: None,
                    ..valid()
                },
                R::OccurredAtMissing,
                "occurred_at",
            ),
            (
                RawTouchpoint {
                    occurred_at: Some((-1, 0)),
                    ..valid()
                },
                R::OccurredAtTooOld,
                "occurred_at",
            ),
            (
                RawTouchpoint {
                    occurred_at: Some((1_800_000_301, 0)),
                    ..valid()
                },
                R::OccurredAtInFuture,
                "occurred_at",
            ),
            (
                RawTouchpoint {
                    occurred_at: Some((i64::MAX, 0)),
                    ..valid()
                },
                R::OccurredAtInFuture,
                "occurred_at",
            ),
            (
                RawTouchpoint {
                    occurred_at: Some((1, 1_000_000_000)),
                    ..valid()
                },
                R::OccurredAtInvalid,
                "occurred_at.nanos",
            ),
            (
                RawTouchpoint {
                    stage: 0,
                    ..valid()
                },
                R::StageMissing,
                "stage",
            ),
            (
                RawTouchpoint {
                    stage: 99,
                    ..valid()
                },
                R::StageUnknown,
                "stage",
            ),
            (
                RawTouchpoint {
                    channel: -3,
                    ..valid()
                },
                R::ChannelUnknown,
                "channel",
            ),
            (
                RawTouchpoint {
                    outcome: Some((7, None)),
                    ..valid()
                },
                R::SentimentUnknown,
                "outcome.sentiment",
            ),
            (
                RawTouchpoint {
                    outcome: Some((1, Some(f64::NAN))),
                    ..valid()
                },
                R::ScoreOutOfRange,
                "outcome.score",
            ),
            (
                RawTouchpoint {
                    outcome: Some((1, Some(100.5))),
                    ..valid()
                },
                R::ScoreOutOfRange,
                "outcome.score",
            ),
            (
                RawTouchpoint {
                    attributes: (0..33).map(|i| (format!("k{i}"), String::new())).collect(),
                    ..valid()
                },
                R::TooManyAttributes,
                "attributes",
            ),
            (
                RawTouchpoint {
                    attributes: vec![(String::new(), "v".into())],
                    ..valid()
                },
                R::AttributeKeyInvalid,
                "attributes[\"\"]",
            ),
            (
                RawTouchpoint {
                    attributes: vec![("k".into(), "v\n".into())],
                    ..valid()
                },
                R::AttributeValueInvalid,
                "attributes.k",
            ),
            (
                RawTouchpoint {
                    attributes: vec![("k".into(), "v".repeat(1025))],
                    ..valid()
                },
                R::AttributeValueInvalid,
                "attributes.k",
            ),
            (
                RawTouchpoint {
                    payload: vec![0; 16 * 1024 + 1],
                    ..valid()
                },
                R::PayloadTooLarge,
                "payload",
            ),
        ];
        for (raw, reason, field) in cases {
            assert_eq!(
                reason_of(raw),
                Some((reason, field.to_owned())),
                "expected {reason:?}"
            );
        }
    }

    #[test]
    fn a_repeated_event_id_in_a_batch_is_rejected_after_the_first() {
        let results = validate_batch(vec![valid(), valid()], NOW, &Limits::default());
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().err().map(|rejection| rejection.reason),
            Some(RejectReason::DuplicateInBatch)
        );
    }
}
