//! Fail-stop: after one failed write or flush, the store refuses every later write and flush.
//!
//! sled 0.34 applies a batch key by key in memory and makes it atomic only on disk, at recovery.
//! A batch that fails half-way can leave part of it readable in this process (a dedupe marker, a
//! summary) while none of it survives a restart. A later write in the same process that read
//! that part would build on what is not stored: an event deduplicated against a marker that is
//! then gone is never projected, and its position is stored all the same. A flush that failed
//! leaves unknown what reached the disk. So the store stops writing at the first failure, and
//! the node stops (see [`SledStore::failed`]); a restart recovers the store to its last durable
//! write, and the projector reads again from the positions stored with it (invariant 6).

use std::sync::OnceLock;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use touchline_core::StoreError;

use super::SledStore;
use crate::error::backend;
use crate::table::Table;

/// The first failure of a store's writes, once there was one.
#[derive(Debug, Default)]
pub(super) struct Failure {
    reason: OnceLock<String>,
    failed: CancellationToken,
}

/// A write or flush refused because an earlier one failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the store refuses writes since one failed ({0}); the node stops, and a restart recovers the store to its last durable write"
)]
pub struct WritesRefused(pub String);

impl SledStore {
    /// Applies `batch` (about `writes` inserts and removes) as one atomic write of the store.
    ///
    /// # Errors
    /// When an earlier write failed ([`WritesRefused`]) or sled fails this one.
    pub(super) fn write(&self, batch: sled::Batch, writes: usize) -> Result<(), StoreError> {
        self.writable()?;
        self.guarded(|| crate::garbage::apply_batch(&self.tree, batch, writes))
    }

    /// Inserts one key of `table` at once, outside any batch (metadata that changes alone).
    ///
    /// # Errors
    /// As [`Self::write`].
    pub(super) fn write_now(
        &self,
        table: &Table,
        key: impl AsRef<[u8]>,
        value: impl Into<sled::IVec>,
    ) -> Result<(), StoreError> {
        self.writable()?;
        self.guarded(|| table.insert_now(key, value))
    }

    /// Runs one sled write or flush: when it fails, or panics (sled may have applied part of a
    /// batch in memory before it did), the store fails as after any failed write. A panic then
    /// goes on unwinding.
    ///
    /// # Errors
    /// sled's error, once the store failed with it.
    pub(super) fn guarded<T>(&self, op: impl FnOnce() -> sled::Result<T>) -> Result<T, StoreError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(op)) {
            Ok(result) => result.map_err(|error| self.fail(error)),
            Err(panic) => {
                self.record_failure(format!(
                    "a store write panicked: {}",
                    crate::panic_message(panic.as_ref())
                ));
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// `Ok` while no write or flush has failed.
    ///
    /// # Errors
    /// [`WritesRefused`] once one has.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match self.failure.reason.get() {
            Some(reason) => Err(backend(WritesRefused(reason.clone()))),
            None => Ok(()),
        }
    }

    /// Records that a write or flush failed with `error` (the first failure is kept), and returns
    /// the error to report.
    pub(super) fn fail(&self, error: sled::Error) -> StoreError {
        self.record_failure(error.to_string());
        backend(error)
    }

    /// Refuses every later write and flush for `reason`, unless an earlier failure was recorded.
    fn record_failure(&self, reason: String) {
        if self.failure.reason.set(reason).is_ok() {
            tracing::error!(
                error = self.failure().unwrap_or_default(),
                "a store write failed: the store refuses every later write, and the node stops"
            );
            self.failure.failed.cancel();
        }
    }

    /// Why the store refuses writes: the first failed write or flush, if any.
    #[must_use]
    pub fn failure(&self) -> Option<&str> {
        self.failure.reason.get().map(String::as_str)
    }

    /// Resolves once a write or flush has failed: the node that owns the store should stop.
    pub fn failed(&self) -> WaitForCancellationFutureOwned {
        self.failure.failed.clone().cancelled_owned()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use touchline_core::{
        Channel, ConsumedRecord, CustomerId, Envelope, EventId, EventStore as _, EventType,
        JourneyStage, PartnerId, RecordContent, StreamIdentity, Touchpoint, UnixNanos,
    };

    use super::*;

    /// An event of customer `alice` at `offset` of partition 0 (event id `e{offset}`).
    pub(in crate::sled_store) fn record(offset: i64) -> ConsumedRecord {
        let envelope = Envelope {
            partner_id: PartnerId::parse("courier").expect("valid partner"),
            touchpoint: Touchpoint {
                event_id: EventId::parse(format!("e{offset}")).expect("valid event id"),
                customer_id: CustomerId::parse("alice").expect("valid customer"),
                event_type: EventType::parse("parcel.delivered").expect("valid type"),
                occurred_at: UnixNanos(offset),
                channel: Channel::Web,
                stage: JourneyStage::Fulfil,
                outcome: None,
                attributes: BTreeMap::new(),
                payload: Vec::new(),
            },
            received_at: UnixNanos(offset),
        };
        ConsumedRecord {
            partition: 0,
            offset,
            content: RecordContent::Event {
                raw: touchline_proto::encode_envelope(&envelope),
                envelope: Box::new(envelope),
            },
        }
    }

    pub(in crate::sled_store) fn stream() -> StreamIdentity {
        StreamIdentity {
            cluster_id: "c".to_owned(),
            topic: "touchpoints".to_owned(),
        }
    }

    fn is_refused(error: &StoreError) -> bool {
        matches!(error, StoreError::Backend(source) if source.downcast_ref::<WritesRefused>().is_some())
    }

    #[tokio::test]
    async fn after_a_failed_write_the_store_refuses_every_write_and_a_restart_recovers_it()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        store.apply(&stream(), (0..3).map(record).collect())?;
        store.flush()?;
        assert!(store.failure().is_none());

        crate::garbage::FAIL_NEXT_BATCH.set(true);
        let failed = store
            .apply(&stream(), (3..8).map(record).collect())
            .expect_err("the injected failure");
        assert!(!is_refused(&failed), "the failure itself: {failed}");
        assert!(
            store
                .failure()
                .is_some_and(|reason| reason.contains("injected")),
            "{:?}",
            store.failure()
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), store.failed()).await?;
        // Nothing of it is durable, and nothing will be: a read of what it may have left in
        // memory waits for a durability that never comes.
        assert_eq!(store.durable_sequence(), 3);
        let raised = store.visible_sequence();
        assert!(raised >= 3, "{raised}");

        // Every later write is refused, whatever it is, and so is a flush.
        let refused = store
            .apply(&stream(), (3..5).map(record).collect())
            .expect_err("refused");
        assert!(is_refused(&refused), "{refused}");
        assert!(refused.to_string().contains("injected"), "{refused}");
        assert!(is_refused(&store.flush().expect_err("refused")));
        // What is durable stays readable: a flush through it is not needed, one past it is refused.
        store.flush_through(3)?;
        assert!(is_refused(&store.flush_through(4).expect_err("refused")));
        assert!(store.begin_rebuild(crate::Projection::Timeline).is_err());
        assert_eq!(store.log_len(), 3);
        assert_eq!(store.visible_sequence(), raised);
        assert_eq!(store.durable_sequence(), 3);
        drop(store);

        // A restart: the durable writes are there, and the store writes again.
        let reopened = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                match SledStore::open(dir.path()) {
                    Ok(store) => break store,
                    // sled lets go of its lock from a background thread: polled.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })
        .await?;
        assert!(reopened.failure().is_none());
        assert_eq!(reopened.log_len(), 3);
        let outcome = reopened.apply(&stream(), (3..8).map(record).collect())?;
        assert_eq!(outcome.appended, 5);
        assert_eq!(outcome.next_offsets.get(&0), Some(&8));
        assert_eq!(reopened.log_len(), 8);
        Ok(())
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_the_store() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path())?;
        store.apply(&stream(), (0..3).map(record).collect())?;
        store.flush()?;

        crate::garbage::PANIC_NEXT_BATCH.set(true);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.apply(&stream(), (3..8).map(record).collect())
        }));
        assert!(panicked.is_err(), "the panic goes on unwinding");
        assert_eq!(
            store.failure(),
            Some("a store write panicked: injected write panic")
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), store.failed()).await?;

        // As after a failed write: every later write and flush is refused.
        let refused = store
            .apply(&stream(), (3..5).map(record).collect())
            .expect_err("refused");
        assert!(is_refused(&refused), "{refused}");
        assert!(is_refused(&store.flush().expect_err("refused")));
        assert_eq!(store.log_len(), 3);
        assert_eq!(store.durable_sequence(), 3);
        Ok(())
    }
}
