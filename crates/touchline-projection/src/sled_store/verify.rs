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
            let cursor = crate::keys::timeline_cursor(&key).ok_or_else(|| StoreError::Corrupt {
                what: "timeline key",
                key: format!("{key:02x?}"),
                reason: "shorter than its event time and sequence".to_owned(),
            })?;
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

/// A checksum of `verify`, computed under the writer or after it.
enum Pending {
    Done(VersionChecksum),
    /// The log, through the log's end.
    Log,
    /// The active timeline version, through the log's end; its table is held, so that a switch
    /// meanwhile waits before deleting it ([`SledStore::retire`]).
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
    /// # Errors
    /// When the backend fails.
    pub fn verify(&self) -> Result<(u64, Vec<VersionChecksum>), StoreError> {
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
        let checksums = pending
            .into_iter()
            .map(|pending| {
                Ok(match pending {
                    Pending::Done(done) => done,
                    Pending::Log => VersionChecksum {
                        name: "log",
                        version: 0,
                        role: VersionRole::Log,
                        checksum: log::checksum(&self.log, log_end)?,
                    },
                    Pending::ActiveTimeline { version, table } => {
                        self.active_timeline_checksum(version, table, log_end)?
                    }
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((log_end, checksums))
    }

    /// The active timeline's checksum through `log_end`, read without the writer. A rebuild that
    /// switches the timeline meanwhile deletes the replaced version once no reader holds it, or
    /// after 30 s whatever holds it: so when the version read is no longer the active one, the
    /// new active version is read instead, which holds the same entries through `log_end`
    /// (projections are folds of the log), and is reported under its own number.
    fn active_timeline_checksum(
        &self,
        mut version: u32,
        mut table: Arc<Table>,
        log_end: u64,
    ) -> Result<VersionChecksum, StoreError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let checksum = checksum(&table, Some(log_end))?;
            let (active, now) = {
                let writer = self.lock_writer();
                let active = writer
                    .versions
                    .get(&Projection::Timeline)
                    .map_or(version, |versions| versions.active);
                (active, self.active().timeline)
            };
            if Arc::ptr_eq(&table, &now) {
                return Ok(VersionChecksum {
                    name: Projection::Timeline.name(),
                    version,
                    role: VersionRole::Active,
                    checksum,
                });
            }
            (version, table) = (active, now);
        }
        Err(StoreError::Backend(Box::new(std::io::Error::other(
            format!(
                "the timeline was switched by a rebuild {ATTEMPTS} times while it was verified; verify again"
            ),
        ))))
    }
}
