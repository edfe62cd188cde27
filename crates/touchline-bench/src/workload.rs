//! The benchmark's records: N touchpoints spread over C customers, about 300 bytes each once in
//! a Kafka record, the same for the ceilings and the pipeline. A hundredth of the customers (the
//! ones the readers read, spread over the whole key space) get 60 events first, so that their
//! timelines hold a page of 50.

use std::collections::BTreeMap;

use touchline_core::{
    Channel, CustomerId, Envelope, EventId, EventType, JourneyStage, Outcome, PartnerId, Sentiment,
    Touchpoint, UnixNanos,
};
use touchline_proto::v1;

/// Events each of the [`read_customers`] gets first, before the others are spread over every
/// customer: so that the readers' `GetTimeline` pages of 50 are full from early in a run on (with
/// N/C = 10 for the presets, a customer of the round-robin has about 10 entries).
pub const READ_CUSTOMER_EVENTS: usize = 60;

/// How many customers the readers read: a hundredth of them, at least one (see
/// [`read_customer`]). Each gets [`READ_CUSTOMER_EVENTS`] events first, then its share of the rest.
#[must_use]
pub fn read_customers(customers: usize) -> usize {
    (customers / 100).max(1)
}

/// The number of the `k`th customer the readers read: every hundredth customer, so that the
/// pages read are spread over the store's whole key space (and its cache), between customers
/// being written, rather than side by side in a few leaves that stay cached.
#[must_use]
pub fn read_customer(k: usize, customers: usize) -> usize {
    k * (customers / read_customers(customers)).max(1)
}

/// The customer of event `index`: the first events go round the [`read_customers`], the rest
/// round every customer.
#[must_use]
pub fn customer_of(index: usize, customers: usize) -> usize {
    let read = read_customers(customers);
    if index < read * READ_CUSTOMER_EVENTS {
        read_customer(index % read, customers)
    } else {
        index % customers.max(1)
    }
}

/// The id of customer `number`.
#[must_use]
pub fn customer_id(number: usize) -> String {
    format!("bench-customer-{number:07}")
}

/// The wire touchpoint of event `index`.
#[must_use]
pub fn touchpoint(index: usize, customers: usize, base_seconds: i64) -> v1::Touchpoint {
    let stage = JourneyStage::ALL[index % JourneyStage::ALL.len()];
    v1::Touchpoint {
        event_id: format!("bench-{index:09}"),
        customer_id: customer_id(customer_of(index, customers)),
        r#type: "delivery.completed".to_owned(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: base_seconds + i64::try_from(index).unwrap_or_default() % 86_400,
            nanos: 0,
        }),
        channel: Channel::Doorstep.number(),
        stage: stage.number(),
        outcome: Some(v1::Outcome {
            sentiment: Sentiment::Positive.number(),
            score: Some(87.0),
        }),
        attributes: [
            ("order".to_owned(), format!("ord-{index:09}")),
            ("carrier".to_owned(), "swift-courier-same-day".to_owned()),
            ("depot".to_owned(), format!("depot-{:03}", index % 97)),
            (
                "note".to_owned(),
                "left with the neighbour at number 12, signed by J. Doe".to_owned(),
            ),
        ]
        .into(),
        payload: Vec::new(),
    }
}

/// The same event as a domain envelope and its Kafka record value, for the ceilings.
#[must_use]
pub fn record(index: usize, customers: usize, base_seconds: i64) -> (String, Vec<u8>, Envelope) {
    let wire = touchpoint(index, customers, base_seconds);
    let envelope = Envelope {
        partner_id: PartnerId::parse("bench-partner").expect("valid by construction"),
        touchpoint: Touchpoint {
            event_id: EventId::parse(wire.event_id.clone()).expect("valid by construction"),
            customer_id: CustomerId::parse(wire.customer_id.clone())
                .expect("valid by construction"),
            event_type: EventType::parse(wire.r#type.clone()).expect("valid by construction"),
            // The wire event's own time, as the pipeline stores it.
            occurred_at: wire
                .occurred_at
                .as_ref()
                .map_or(UnixNanos(0), |at| UnixNanos(at.seconds * 1_000_000_000)),
            channel: Channel::Doorstep,
            stage: JourneyStage::ALL[index % JourneyStage::ALL.len()],
            outcome: Some(Outcome {
                sentiment: Sentiment::Positive,
                score: Some(87.0),
            }),
            attributes: wire
                .attributes
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            payload: Vec::new(),
        },
        received_at: UnixNanos::now(),
    };
    let value = touchline_proto::encode_envelope(&envelope);
    (wire.customer_id, value, envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_customers_hold_a_page_of_50_and_every_customer_has_events() {
        for (events, customers) in [(2_000, 200), (100_000, 10_000), (1_000_000, 100_000)] {
            let mut per_customer = vec![0_usize; customers];
            for index in 0..events {
                per_customer[customer_of(index, customers)] += 1;
            }
            let read: Vec<usize> = (0..read_customers(customers))
                .map(|k| read_customer(k, customers))
                .collect();
            assert!(
                read.iter().all(|customer| per_customer[*customer] >= 50),
                "{events} events"
            );
            // Spread over the key space: the last one read is among the last hundredth.
            assert!(read.last().is_some_and(|last| last + 100 >= customers));
            assert!(read.windows(2).all(|pair| pair[0] < pair[1]));
            assert!(per_customer.iter().all(|count| *count > 0));
        }
    }
}
