//! Lets a page of reads run whole between two writes.
//!
//! sled 0.34 takes its process-wide lock once per step of an iterator, and that lock lets a
//! waiting writer go first. So a timeline page of 50 entries read during ingest could wait behind
//! the projector's write pieces up to once per entry, where a page of 10 waited a fifth as often
//! (`GetTimeline` (50) p99 during half-rate ingest on the quick bench: 5.6-8.0 ms, against 1.5 ms
//! after ingest). Here a page takes this gate for reading once, for all of its steps, and every
//! batch write of the store takes it for writing: a page waits for at most the write under way
//! when it starts, and a write for the pages under way (a fraction of a millisecond each: a page
//! holds the gate for at most 128 keys, then lets a waiting write in). The gate orders nothing that sled does not already make consistent; it only
//! schedules. Long scans (checksums, backups, rebuild reads) do not take it, so as not to hold
//! the writer back, and a page takes its first step before it takes the gate, so that a leaf
//! out of sled's cache is read in during that step alone rather than while the page holds the
//! gate.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::new(());

/// Held while a bounded page of reads runs.
pub(crate) fn page() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(PoisonError::into_inner)
}

/// Held while a batch is applied.
pub(crate) fn write() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(PoisonError::into_inner)
}
