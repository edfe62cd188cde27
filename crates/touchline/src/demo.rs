//! The demo demand chain of `touchline dev --demo`: a retailer, a same-day courier, a support
//! contractor and an installer acting on a few hundred customers across the journey, published
//! through the real ingest path, each partner with its own token and its own pace (so events of
//! one customer arrive out of event-time order, as they do in real life).

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use touchline_core::{Channel, CustomerId, JourneyStage, PartnerId, Sentiment, UnixNanos};
use touchline_ingest::PartnerRegistry;
use touchline_proto::v1;

/// The demo partners and their dev-only tokens.
pub const DEMO_PARTNERS: [(&str, &str); 4] = [
    ("northwind-retail", "dev-token-northwind-retail"),
    ("swift-courier", "dev-token-swift-courier"),
    ("helpdesk-co", "dev-token-helpdesk-co"),
    ("fixit-installers", "dev-token-fixit-installers"),
];

const RETAILER: usize = 0;
const COURIER: usize = 1;
const SUPPORT: usize = 2;
const INSTALLER: usize = 3;

/// The registry of demo partners.
#[must_use]
pub fn demo_registry() -> PartnerRegistry {
    PartnerRegistry::from_tokens(
        DEMO_PARTNERS
            .iter()
            .filter_map(|(id, token)| PartnerId::parse(*id).ok().map(|id| (id, *token))),
    )
}

/// The id of demo customer `index`.
#[must_use]
pub fn demo_customer(index: usize) -> String {
    format!("cust-{index:04}")
}

const MINUTE: i64 = 60 * 1_000_000_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

struct Journey<'a> {
    customer: &'a str,
    events: [Vec<v1::Touchpoint>; 4],
    clock: i64,
}

impl Journey<'_> {
    #[allow(clippy::too_many_arguments)]
    fn touch(
        &mut self,
        partner: usize,
        event_type: &str,
        after: i64,
        channel: Channel,
        stage: JourneyStage,
        sentiment: Sentiment,
        score: Option<f64>,
        attributes: &[(&str, String)],
    ) {
        self.clock += after;
        let number = self.events.iter().map(Vec::len).sum::<usize>();
        let (seconds, nanos) = UnixNanos(self.clock).to_parts();
        self.events[partner].push(v1::Touchpoint {
            event_id: format!("{}-{number}", self.customer),
            customer_id: self.customer.to_owned(),
            r#type: event_type.to_owned(),
            occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
            channel: channel.number(),
            stage: stage.number(),
            outcome: Some(v1::Outcome {
                sentiment: sentiment.number(),
                score,
            }),
            attributes: attributes
                .iter()
                .map(|(key, value)| ((*key).to_owned(), value.clone()))
                .collect(),
            payload: Vec::new(),
        });
    }
}

/// Generates the demo touchpoints of `customers` customers, grouped by partner (in the order of
/// [`DEMO_PARTNERS`]). Deterministic for a given `seed` and `now`; every event is in the past.
#[must_use]
pub fn generate(customers: usize, seed: u64, now: UnixNanos) -> [Vec<v1::Touchpoint>; 4] {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_partner: [Vec<v1::Touchpoint>; 4] = Default::default();
    for index in 0..customers {
        let customer = demo_customer(index);
        let mut journey = Journey {
            customer: &customer,
            events: Default::default(),
            clock: now.0 - rng.random_range(15 * DAY..45 * DAY),
        };
        let order = format!("ord-{index:05}");
        journey.touch(
            RETAILER,
            "product.viewed",
            0,
            Channel::Web,
            JourneyStage::Discover,
            Sentiment::Neutral,
            None,
            &[("sku", format!("sku-{}", rng.random_range(100..140)))],
        );
        let purchase_channel = if rng.random_bool(0.7) {
            Channel::Web
        } else {
            Channel::Store
        };
        journey.touch(
            RETAILER,
            "order.placed",
            rng.random_range(10 * MINUTE..2 * DAY),
            purchase_channel,
            JourneyStage::Purchase,
            Sentiment::Positive,
            None,
            &[("order", order.clone())],
        );
        journey.touch(
            COURIER,
            "parcel.picked-up",
            rng.random_range(HOUR..6 * HOUR),
            Channel::Other,
            JourneyStage::Fulfil,
            Sentiment::Neutral,
            None,
            &[("order", order.clone())],
        );
        journey.touch(
            COURIER,
            "delivery.out-for-delivery",
            rng.random_range(HOUR..4 * HOUR),
            Channel::Sms,
            JourneyStage::Fulfil,
            Sentiment::Neutral,
            None,
            &[("order", order.clone())],
        );
        let roll: f64 = rng.random();
        if roll < 0.1 {
            journey.touch(
                COURIER,
                "delivery.failed",
                rng.random_range(HOUR..5 * HOUR),
                Channel::Doorstep,
                JourneyStage::Fulfil,
                Sentiment::Negative,
                Some(10.0),
                &[
                    ("order", order.clone()),
                    ("reason", "customer-absent".to_owned()),
                ],
            );
            journey.touch(
                COURIER,
                "delivery.completed",
                rng.random_range(20 * HOUR..30 * HOUR),
                Channel::Doorstep,
                JourneyStage::Fulfil,
                Sentiment::Neutral,
                Some(55.0),
                &[("order", order.clone()), ("attempt", "2".to_owned())],
            );
        } else if roll < 0.3 {
            journey.touch(
                COURIER,
                "delivery.late",
                rng.random_range(5 * HOUR..9 * HOUR),
                Channel::Doorstep,
                JourneyStage::Fulfil,
                Sentiment::Negative,
                Some(30.0),
                &[
                    ("order", order.clone()),
                    ("minutes-late", rng.random_range(30..240).to_string()),
                ],
            );
        } else {
            journey.touch(
                COURIER,
                "delivery.completed",
                rng.random_range(HOUR..4 * HOUR),
                Channel::Doorstep,
                JourneyStage::Fulfil,
                Sentiment::Positive,
                Some(rng.random_range(70.0..100.0_f64).round()),
                &[("order", order.clone())],
            );
        }
        if rng.random_bool(0.4) {
            journey.touch(
                INSTALLER,
                "installation.scheduled",
                rng.random_range(HOUR..DAY),
                Channel::Phone,
                JourneyStage::Fulfil,
                Sentiment::Neutral,
                None,
                &[("order", order.clone())],
            );
            let good = rng.random_bool(0.8);
            let (sentiment, score) = if good {
                (Sentiment::Positive, 90.0)
            } else {
                (Sentiment::Negative, 25.0)
            };
            journey.touch(
                INSTALLER,
                "installation.completed",
                rng.random_range(DAY..3 * DAY),
                Channel::Doorstep,
                JourneyStage::Use,
                sentiment,
                Some(score),
                &[
                    ("order", order.clone()),
                    ("technician", format!("tech-{}", rng.random_range(1..20))),
                ],
            );
        }
        if rng.random_bool(0.35) {
            let ticket = format!("tkt-{index:05}");
            journey.touch(
                SUPPORT,
                "ticket.opened",
                rng.random_range(HOUR..2 * DAY),
                Channel::Chat,
                JourneyStage::Support,
                Sentiment::Negative,
                None,
                &[("ticket", ticket.clone())],
            );
            let score = rng.random_range(40.0..100.0_f64).round();
            let sentiment = if score >= 70.0 {
                Sentiment::Positive
            } else {
                Sentiment::Neutral
            };
            journey.touch(
                SUPPORT,
                "ticket.solved",
                rng.random_range(10 * MINUTE..DAY),
                Channel::Chat,
                JourneyStage::Support,
                sentiment,
                Some(score),
                &[("ticket", ticket)],
            );
        }
        if rng.random_bool(0.5) {
            let stars: u8 = rng.random_range(1..=5);
            let sentiment = match stars {
                1 | 2 => Sentiment::Negative,
                3 => Sentiment::Neutral,
                _ => Sentiment::Positive,
            };
            journey.touch(
                RETAILER,
                "review.posted",
                rng.random_range(HOUR..3 * DAY),
                Channel::Web,
                JourneyStage::Advocate,
                sentiment,
                Some(f64::from(stars) * 20.0),
                &[("stars", stars.to_string())],
            );
        }
        for (partner, events) in journey.events.into_iter().enumerate() {
            by_partner[partner].extend(events);
        }
    }
    // Each partner reports its own touches in its own order; shuffle them a little so that late
    // arrivals happen within a partner too.
    for events in &mut by_partner {
        for i in (1..events.len()).rev() {
            if rng.random_bool(0.2) {
                let j = rng.random_range(i.saturating_sub(20)..=i);
                events.swap(i, j);
            }
        }
    }
    debug_assert!(
        by_partner
            .iter()
            .flatten()
            .all(|event| CustomerId::parse(event.customer_id.clone()).is_ok())
    );
    by_partner
}

/// Events per demo request, unless the node takes fewer (`ingest.max-batch-events`).
pub const DEMO_BATCH: usize = 100;

/// Publishes the demo through the ingest service at `endpoint`, every partner concurrently, in
/// requests of `batch_size` events.
///
/// # Errors
/// When a partner's stream fails.
pub async fn publish_demo(
    endpoint: &crate::Target,
    customers: usize,
    batch_size: usize,
    seed: u64,
) -> anyhow::Result<crate::stream_client::PublishReport> {
    let by_partner = generate(customers, seed, UnixNanos::now());
    let mut tasks = tokio::task::JoinSet::new();
    for (partner, events) in by_partner.into_iter().enumerate() {
        let endpoint = endpoint.clone();
        let token = DEMO_PARTNERS[partner].1;
        let numbered: Vec<_> = events.into_iter().enumerate().map(Ok).collect();
        let options = crate::stream_client::PublishOptions {
            batch_size,
            ..Default::default()
        };
        tasks.spawn(async move {
            crate::stream_client::publish(&endpoint, token, numbered, &options).await
        });
    }
    let mut total = crate::stream_client::PublishReport::default();
    while let Some(report) = tasks.join_next().await {
        let report = report??;
        total.accepted += report.accepted;
        total.rejected += report.rejected;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_is_deterministic_past_and_multi_partner() {
        let now = UnixNanos(1_800_000_000_000_000_000);
        let first = generate(50, 7, now);
        assert_eq!(first, generate(50, 7, now));
        assert!(first.iter().all(|events| !events.is_empty()));
        let all: Vec<_> = first.iter().flatten().collect();
        assert!(all.iter().all(|event| {
            event
                .occurred_at
                .is_some_and(|at| at.seconds < now.to_parts().0)
        }));
        let ids: std::collections::HashSet<_> = all.iter().map(|event| &event.event_id).collect();
        assert_eq!(ids.len(), all.len(), "event ids are unique");
    }
}
