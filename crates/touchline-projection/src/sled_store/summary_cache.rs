//! The writer's cache of the active summary version's summaries, as last written.
//!
//! Every event folds into its customer's summary: without the cache, each fold read the summary
//! back from sled and decoded it (8% of the writer's time in the bench's busy phase, a sled read
//! under its process-wide lock and a postcard decode of three maps). The writer is the only one
//! that writes the active summaries, so what it wrote last is what sled holds: a fold takes the
//! summary out of the cache, and the summaries a write folded go back in once the write is
//! applied. A write that fails leaves them out, so they are read from sled again.
//!
//! Bounded: two generations of at most [`GENERATION`] summaries each. Summaries go into the young
//! one; when it is full it becomes the old one and the previous old one is dropped, so the cache
//! holds between one and two generations of the customers most recently written.

use std::collections::HashMap;

use touchline_core::{CustomerId, CustomerSummary};

/// Summaries per generation: at most twice as many are cached (a few hundred bytes each).
pub(super) const GENERATION: usize = 16_384;

#[derive(Debug, Default)]
pub(super) struct SummaryCache {
    /// The prefix of the summary version the cached summaries belong to.
    table: Vec<u8>,
    young: HashMap<CustomerId, CustomerSummary>,
    old: HashMap<CustomerId, CustomerSummary>,
}

impl SummaryCache {
    /// Takes the summary of `customer` in the version `table` out of the cache: `None` when it is
    /// not cached (read it from the store).
    pub(super) fn take(&mut self, table: &[u8], customer: &CustomerId) -> Option<CustomerSummary> {
        if self.table != table {
            return None;
        }
        self.young
            .remove(customer)
            .or_else(|| self.old.remove(customer))
    }

    /// Puts the summaries just written to version `table` in the cache. A cache of another version
    /// (the active one was switched by a rebuild) is emptied first.
    pub(super) fn put(
        &mut self,
        table: &[u8],
        summaries: impl IntoIterator<Item = (CustomerId, CustomerSummary)>,
    ) {
        if self.table != table {
            self.young.clear();
            self.old.clear();
            table.clone_into(&mut self.table);
        }
        for (customer, summary) in summaries {
            if self.young.len() >= GENERATION {
                self.old = std::mem::take(&mut self.young);
            }
            self.young.insert(customer, summary);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use touchline_core::{EventId, JourneyStage, PartnerId, TouchRef, UnixNanos};

    use super::*;

    fn customer(index: usize) -> CustomerId {
        CustomerId::parse(format!("customer-{index}")).expect("valid id")
    }

    fn summary(index: usize, total: u64) -> CustomerSummary {
        let touch = TouchRef {
            occurred_at: UnixNanos(0),
            partner_id: PartnerId::parse("partner").expect("valid id"),
            event_id: EventId::parse("event").expect("valid id"),
            sequence: 1,
            stage: JourneyStage::Discover,
        };
        CustomerSummary {
            customer_id: customer(index),
            first_touch: touch.clone(),
            last_touch: touch,
            total,
            by_stage: BTreeMap::new(),
            by_sentiment: BTreeMap::new(),
            by_partner: BTreeMap::new(),
        }
    }

    #[test]
    fn a_summary_is_taken_once_and_only_from_its_version() {
        let mut cache = SummaryCache::default();
        cache.put(b"S1", [(customer(1), summary(1, 3))]);
        assert_eq!(cache.take(b"S2", &customer(1)), None, "another version");
        assert_eq!(cache.take(b"S1", &customer(1)), Some(summary(1, 3)));
        assert_eq!(cache.take(b"S1", &customer(1)), None, "taken out");
    }

    #[test]
    fn summaries_of_a_replaced_version_are_dropped() {
        let mut cache = SummaryCache::default();
        cache.put(b"S1", [(customer(1), summary(1, 3))]);
        cache.put(b"S2", [(customer(2), summary(2, 1))]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.take(b"S1", &customer(1)), None);
        assert_eq!(cache.take(b"S2", &customer(2)), Some(summary(2, 1)));
    }

    #[test]
    fn the_cache_holds_at_most_two_generations_and_keeps_the_latest() {
        let mut cache = SummaryCache::default();
        let count = GENERATION * 3 + 5;
        cache.put(
            b"S1",
            (0..count).map(|index| (customer(index), summary(index, 1))),
        );
        assert!(cache.len() <= 2 * GENERATION, "{} cached", cache.len());
        assert_eq!(
            cache.take(b"S1", &customer(count - 1)),
            Some(summary(count - 1, 1)),
            "the latest is kept"
        );
        assert_eq!(cache.take(b"S1", &customer(0)), None, "the oldest is gone");
    }
}
