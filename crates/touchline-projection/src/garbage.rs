//! Frees the pages sled replaced, at the pace they are replaced.
//!
//! sled 0.34 copies a leaf on every write and hands the old copy to crossbeam-epoch's collector,
//! which frees at most 8 bags (of 64 objects) each time a thread has pinned 128 times. One
//! `apply_batch` replaces thousands of leaves under a single pin, so a writer outpaces the
//! collector and the replaced pages stay resident: measured on this machine, sled alone writing
//! batches of 1,000 records (log + timeline key) grew by about 1 KiB per record without end
//! (1.4 GiB resident after 1.5M records with a 64 MiB cache), and by about 40 bytes per record
//! (sled's page table) when the collector is driven after each batch as here. sled fixed this
//! after 0.34.7 ("dynamic collection", spacejam/sled#1264), in releases we cannot use.

/// Writes whose garbage one collection step is given: a step frees up to 512 objects, and a
/// write leaves one to a few.
const WRITES_PER_STEP: usize = 16;

/// Applies `batch` (about `writes` inserts and removes) to `tree`, then frees what it replaced.
/// Every sled batch of the store goes through here.
///
/// # Errors
/// When sled fails to apply the batch (nothing of it is applied).
pub fn apply_batch(tree: &sled::Tree, batch: sled::Batch, writes: usize) -> sled::Result<()> {
    #[cfg(test)]
    if FAIL_NEXT_BATCH.replace(false) {
        return Err(sled::Error::Io(std::io::Error::other(
            "injected write failure",
        )));
    }
    {
        let _pages_wait = crate::gate::write();
        #[cfg(test)]
        assert!(!PANIC_NEXT_BATCH.replace(false), "injected write panic");
        tree.apply_batch(batch)?;
    }
    collect_after(writes);
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Unit tests: the next batch this thread applies fails, as when the disk does.
    pub(crate) static FAIL_NEXT_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Unit tests: the next batch this thread applies panics, as a bug in sled would.
    pub(crate) static PANIC_NEXT_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs the epoch collector in proportion to `writes` just applied. Cheap when there is nothing
/// to free (an epoch check); off the async runtime.
fn collect_after(writes: usize) {
    for _ in 0..=writes / WRITES_PER_STEP {
        crossbeam_epoch::pin().flush();
    }
}
