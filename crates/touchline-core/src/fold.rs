//! The projection folds: pure functions from a state and one event to the next state
//! (invariant 5: rebuilding from the log gives exactly what incremental updates gave).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    CustomerId, EventId, JourneyStage, PartnerId, Sentiment, TimelineCursor, TimelineEntry,
    UnixNanos,
};

/// A reference to one touch of a customer's timeline: enough to order touches by identity and to
/// read the entry from the timeline. The summary keeps references, not copies of entries, so that
/// rewriting it on every event stays cheap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchRef {
    pub occurred_at: UnixNanos,
    pub partner_id: PartnerId,
    pub event_id: EventId,
    /// Its log sequence: with `occurred_at`, its place in the timeline.
    pub sequence: u64,
    pub stage: JourneyStage,
}

impl TouchRef {
    #[must_use]
    pub fn of(entry: &TimelineEntry) -> Self {
        Self {
            occurred_at: entry.touchpoint.occurred_at,
            partner_id: entry.partner_id.clone(),
            event_id: entry.touchpoint.event_id.clone(),
            sequence: entry.position.sequence,
            stage: entry.touchpoint.stage,
        }
    }

    /// See [`TimelineEntry::identity_order`].
    #[must_use]
    pub fn identity_order(&self) -> (UnixNanos, &str, &str) {
        (
            self.occurred_at,
            self.partner_id.as_str(),
            self.event_id.as_str(),
        )
    }

    /// Where the touch sits in the customer's timeline.
    #[must_use]
    pub fn cursor(&self) -> TimelineCursor {
        TimelineCursor {
            occurred_at: self.occurred_at,
            sequence: self.sequence,
        }
    }
}

/// A customer's experience at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerSummary {
    pub customer_id: CustomerId,
    /// The earliest touch by event time (ties: partner id, then event id).
    pub first_touch: TouchRef,
    /// The latest touch by event time (ties: partner id, then event id).
    pub last_touch: TouchRef,
    pub total: u64,
    pub by_stage: BTreeMap<JourneyStage, u64>,
    pub by_sentiment: BTreeMap<Sentiment, u64>,
    pub by_partner: BTreeMap<PartnerId, u64>,
}

impl CustomerSummary {
    /// The stage of the latest touch.
    #[must_use]
    pub fn current_stage(&self) -> JourneyStage {
        self.last_touch.stage
    }
}

/// Folds one new (not duplicate) event into a customer's summary. The result does not depend on
/// the order events are folded in: counts commute, and first/last use an order that ignores
/// delivery ([`TimelineEntry::identity_order`]).
#[must_use]
pub fn apply_summary(summary: Option<CustomerSummary>, entry: &TimelineEntry) -> CustomerSummary {
    let mut summary = summary.unwrap_or_else(|| CustomerSummary {
        customer_id: entry.touchpoint.customer_id.clone(),
        first_touch: TouchRef::of(entry),
        last_touch: TouchRef::of(entry),
        total: 0,
        by_stage: BTreeMap::new(),
        by_sentiment: BTreeMap::new(),
        by_partner: BTreeMap::new(),
    });
    if entry.identity_order() < summary.first_touch.identity_order() {
        summary.first_touch = TouchRef::of(entry);
    }
    if entry.identity_order() > summary.last_touch.identity_order() {
        summary.last_touch = TouchRef::of(entry);
    }
    summary.total += 1;
    *summary.by_stage.entry(entry.touchpoint.stage).or_default() += 1;
    *summary
        .by_sentiment
        .entry(entry.touchpoint.sentiment())
        .or_default() += 1;
    *summary
        .by_partner
        .entry(entry.partner_id.clone())
        .or_default() += 1;
    summary
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashSet};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        Channel, CustomerId, EventId, EventType, LogPosition, Outcome, Touchpoint, UnixNanos,
    };

    pub(crate) fn entry(
        partner: &str,
        event: &str,
        occurred_at: i64,
        stage: JourneyStage,
        sequence: u64,
    ) -> TimelineEntry {
        TimelineEntry {
            partner_id: PartnerId::parse(partner).expect("valid partner"),
            touchpoint: Touchpoint {
                event_id: EventId::parse(event).expect("valid event id"),
                customer_id: CustomerId::parse("cust-1").expect("valid customer"),
                event_type: EventType::parse("delivery.completed").expect("valid type"),
                occurred_at: UnixNanos(occurred_at),
                channel: Channel::Web,
                stage,
                outcome: Some(Outcome {
                    sentiment: Sentiment::Positive,
                    score: None,
                }),
                attributes: BTreeMap::new(),
                payload: Vec::new(),
            },
            received_at: UnixNanos(occurred_at),
            position: LogPosition {
                partition: 0,
                offset: i64::try_from(sequence).unwrap_or_default(),
                sequence,
            },
        }
    }

    #[test]
    fn summary_counts_and_tracks_first_and_last_touch() {
        let events = [
            entry("courier", "e1", 200, JourneyStage::Fulfil, 1),
            entry("retailer", "e2", 100, JourneyStage::Purchase, 2),
            entry("support", "e3", 300, JourneyStage::Support, 3),
        ];
        let summary = events
            .iter()
            .fold(None, |state, event| Some(apply_summary(state, event)));
        let summary = summary.expect("three events folded");
        assert_eq!(summary.total, 3);
        assert_eq!(summary.first_touch.event_id.as_str(), "e2");
        assert_eq!(summary.last_touch.event_id.as_str(), "e3");
        assert_eq!(summary.first_touch.cursor().sequence, 2);
        assert_eq!(summary.current_stage(), JourneyStage::Support);
        assert_eq!(summary.by_stage.get(&JourneyStage::Fulfil), Some(&1));
        assert_eq!(summary.by_sentiment.get(&Sentiment::Positive), Some(&3));
        assert_eq!(summary.by_partner.len(), 3);
    }

    #[test]
    fn a_late_event_does_not_move_the_current_stage_back() {
        let events = [
            entry("retailer", "e1", 100, JourneyStage::Purchase, 1),
            entry("support", "e2", 300, JourneyStage::Support, 2),
            entry("courier", "e3", 200, JourneyStage::Fulfil, 3),
        ];
        let summary = events
            .iter()
            .fold(None, |state, event| Some(apply_summary(state, event)));
        assert_eq!(
            summary.map(|s| s.current_stage()),
            Some(JourneyStage::Support)
        );
    }

    /// The consumer's job in miniature: drop duplicates of (partner, event id), then fold.
    fn project(deliveries: &[TimelineEntry]) -> Option<CustomerSummary> {
        let mut seen = HashSet::new();
        deliveries
            .iter()
            .filter(|entry| {
                seen.insert((entry.partner_id.clone(), entry.touchpoint.event_id.clone()))
            })
            .fold(None, |state, entry| Some(apply_summary(state, entry)))
    }

    fn arbitrary_events() -> impl Strategy<Value = Vec<TimelineEntry>> {
        prop::collection::vec((0..3_usize, 0..40_u32, 0..50_i64, 1..=6_i32), 1..40).prop_map(
            |specs| {
                let mut seen = HashSet::new();
                specs
                    .into_iter()
                    .filter(|(partner, event, _, _)| seen.insert((*partner, *event)))
                    .enumerate()
                    .map(|(sequence, (partner, event, time, stage))| {
                        let stage = JourneyStage::from_number(stage).unwrap_or(JourneyStage::Use);
                        entry(
                            &format!("partner-{partner}"),
                            &format!("evt-{event}"),
                            time,
                            stage,
                            sequence as u64,
                        )
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn delivery_order_and_duplication_do_not_change_the_summary(
            events in arbitrary_events(),
            shuffle_seed in any::<u64>(),
            duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let clean = project(&events);
            let mut deliveries = events.clone();
            deliveries.extend(duplicates.iter().map(|index| index.get(&events).clone()));
            // A deterministic Fisher-Yates shuffle driven by the seed.
            let mut state = shuffle_seed | 1;
            for i in (1..deliveries.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                deliveries.swap(i, (state % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(project(&deliveries), clean);
        }
    }
}
