//! Checksums of the log and of projection versions, and `verify`: all of them taken at one point
//! of the log while the projector waits only for what can change under it.
//!
//! The log and a timeline only grow, by entries with later log sequences (a timeline key ends with
//! its entry's sequence), so their checksums through the log's end at one instant are computed
//! after the writer is released: the projector goes on meanwhile. Summaries are rewritten by every
//! event, and a building version by its rebuild: those are computed under the writer.

use super::*;

/// The checksum of a table's entries, in key order; with `through`, of the timeline entries
/// whose log sequence is at most that (what the table held when the log ended there).
fn checksum(table: &Table, through: Option<u64>) -> Result<Checksum, StoreError> {
    let mut hasher = Sha256::new();
    let mut entries = 0;
    for item in table.scan_prefix(&[]) {
        let (key, value) = item.map_err(backend)?;
        if let Some(through) = through {
            let cursor = super::stored_timeline_cursor(&key)?;
            if cursor.sequence > through {
                continue;
            }
        }
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(&key);
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(&value);
        entries += 1;
    }
    Ok(Checksum {
        entries,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// How many times [`SledStore::verify`] starts again when a rebuild switched the timeline under it.
const VERIFY_ATTEMPTS: usize = 3;

/// A checksum of `verify`, computed under the writer or after it.
enum Pending {
    Done(VersionChecksum),
    /// The log, through the log's end.
    Log,
    /// The active timeline version, through the log's end; its table is held, so that a switch
    /// meanwhile waits (up to 30 s) before deleting it ([`SledStore::retire`]).
    ActiveTimeline {
        version: u32,
        table: Arc<Table>,
    },
}

impl SledStore {
    /// The checksum of a projection version (default: the active one).
    ///
    /// # Errors
    /// When the backend fails.
    pub fn checksum(&self, projection: Projection, version: u32) -> Result<Checksum, StoreError> {
        checksum(&self.version_table(projection, version), None)
    }

    /// The checksum of the log.
    ///
    /// # Errors
    /// When the backend fails.
    pub fn log_checksum(&self) -> Result<Checksum, StoreError> {
        log::checksum(&self.log, u64::MAX)
    }

    /// Checksums of the log and of every active or building version of every projection, taken
    /// at one point of the log. The writer waits while the summaries and any building version are
    /// read; the log and the active timeline are read after it goes on, through the log's end at
    /// that point. Versions being deleted are left out (half deleted, their checksum means
    /// nothing). Returns the log's length at that point, and the checksums.
    ///
    /// A rebuild that switches the timeline during the unlocked part starts the whole
    /// verification again (the replaced version is deleted after 30 s whatever holds it, and the
    /// answer's building and active versions would no longer belong to one point), at most
    /// `VERIFY_ATTEMPTS` times.
    ///
    /// # Errors
    /// When the backend fails, or the timeline was switched during every attempt.
    pub fn verify(&self) -> Result<(u64, Vec<VersionChecksum>), StoreError> {
        for _ in 0..VERIFY_ATTEMPTS {
            if let Some(verified) = self.verify_once()? {
                return Ok(verified);
            }
        }
        Err(StoreError::Conflict(format!(
            "a rebuild switched the timeline during each of {VERIFY_ATTEMPTS} verifications; verify again"
        )))
    }

    /// One attempt of [`SledStore::verify`]: `None` when a rebuild switched the timeline while it
    /// was read.
    fn verify_once(&self) -> Result<Option<(u64, Vec<VersionChecksum>)>, StoreError> {
        let (log_end, pending) = {
            let writer = self.lock_writer();
            let log_end = writer.next_sequence.saturating_sub(1);
            let active = self.active();
            let mut pending = vec![Pending::Log];
            for (projection, versions) in &writer.versions {
                pending.push(match projection {
                    Projection::Timeline => Pending::ActiveTimeline {
                        version: versions.active,
                        table: Arc::clone(&active.timeline),
                    },
                    Projection::Summary => Pending::Done(VersionChecksum {
                        name: projection.name(),
                        version: versions.active,
                        role: VersionRole::Active,
                        checksum: self.checksum(*projection, versions.active)?,
                    }),
                });
                if let Some(version) = versions.building {
                    pending.push(Pending::Done(VersionChecksum {
                        name: projection.name(),
                        version,
                        role: VersionRole::Building,
                        checksum: self.checksum(*projection, version)?,
                    }));
                }
            }
            (log_end, pending)
        };
        let mut checksums = Vec::with_capacity(pending.len());
        for pending in pending {
            checksums.push(match pending {
                Pending::Done(done) => done,
                Pending::Log => VersionChecksum {
                    name: "log",
                    version: 0,
                    role: VersionRole::Log,
                    checksum: log::checksum(&self.log, log_end)?,
                },
                Pending::ActiveTimeline { version, table } => {
                    let checksum = checksum(&table, Some(log_end))?;
                    if !Arc::ptr_eq(&table, &self.active().timeline) {
                        return Ok(None);
                    }
                    VersionChecksum {
                        name: Projection::Timeline.name(),
                        version,
                        role: VersionRole::Active,
                        checksum,
                    }
                }
            });
        }
        Ok(Some((log_end, checksums)))
    }
}
