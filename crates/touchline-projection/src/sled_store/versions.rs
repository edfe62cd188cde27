//! Versioned projections: a projection (timeline, summary) lives in one table per version; a
//! rebuild folds the append-only log into a new version beside the active one, then switches
//! atomically under the writer; replaced and abandoned versions are dropped. Checksums let ops
//! compare versions.

use tokio_util::sync::CancellationToken;

use super::*;

/// How long dropping a replaced version waits for the reads still running on it.
const READERS_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Keys deleted per atomic batch when a projection version is dropped: small, because sled makes
/// every read wait while it applies a batch.
const DROP_CHUNK: usize = 500;

/// A projection of the log that can be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    /// Every customer's touchpoints in event-time order.
    Timeline,
    /// Every customer's summary.
    Summary,
}

impl Projection {
    pub const ALL: [Self; 2] = [Self::Timeline, Self::Summary];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Timeline => "timeline",
            Self::Summary => "summary",
        }
    }

    /// Parses a projection name as the CLI and the admin API spell it.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|projection| projection.name() == name)
    }

    pub(super) fn table_byte(self) -> u8 {
        match self {
            Self::Timeline => b'T',
            Self::Summary => b'S',
        }
    }

    pub(super) fn meta_key(self) -> Vec<u8> {
        format!("projection/{}", self.name()).into_bytes()
    }
}

impl std::fmt::Display for Projection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The versions of one projection, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionVersions {
    /// The version queries read and the projector updates.
    pub active: u32,
    /// A version being rebuilt from the log, not yet active.
    pub building: Option<u32>,
    /// Versions no longer in use whose entries are being deleted.
    pub dropping: Vec<u32>,
    /// The highest version ever started: numbers are not reused, so logs and checksums of an
    /// abandoned version never get confused with a later one.
    pub highest: u32,
}

impl Default for ProjectionVersions {
    fn default() -> Self {
        Self {
            active: 1,
            building: None,
            dropping: Vec::new(),
            highest: 1,
        }
    }
}

impl ProjectionVersions {
    fn newest(&self) -> u32 {
        self.dropping
            .iter()
            .copied()
            .chain(self.building)
            .fold(self.active.max(self.highest), u32::max)
    }
}

/// The checksum of one table: entries and SHA-256 over every (key, value), in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub entries: u64,
    pub sha256: String,
}

/// What a checksummed table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRole {
    Log,
    Active,
    Building,
}

/// The checksum of the log or of one projection version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionChecksum {
    /// "log" or the projection's name.
    pub name: &'static str,
    /// The projection version (0 for the log).
    pub version: u32,
    pub role: VersionRole,
    pub checksum: Checksum,
}

/// The prefix of a projection version's table: the projection's byte, then the version.
pub(super) fn version_prefix(projection: Projection, version: u32) -> Vec<u8> {
    let mut prefix = vec![projection.table_byte()];
    prefix.extend_from_slice(&version.to_be_bytes());
    prefix
}

impl SledStore {
    pub(super) fn version_table(&self, projection: Projection, version: u32) -> Table {
        Table::new(self.tree.clone(), &version_prefix(projection, version))
    }

    /// Lists the version an interrupted rebuild left behind as dropping, and notes every version
    /// listed as dropping now (an interrupted rebuild's, or one whose deletion a shutdown stopped)
    /// for [`SledStore::drop_leftovers`]. On open: quick, nothing is deleted yet.
    pub(super) fn mark_leftovers(&self) -> Result<(), StoreError> {
        let mut writer = self.lock_writer();
        let mut leftovers = Vec::new();
        for projection in Projection::ALL {
            let Some(versions) = writer.versions.get_mut(&projection) else {
                continue;
            };
            if let Some(building) = versions.building.take() {
                tracing::warn!(%projection, version = building, "the version an interrupted rebuild left behind is dropped in the background; the active version is untouched");
                versions.dropping.push(building);
                self.meta
                    .insert_now(projection.meta_key(), encode(&*versions)?)
                    .map_err(backend)?;
            }
            leftovers.extend(
                versions
                    .dropping
                    .iter()
                    .map(|version| (projection, *version)),
            );
        }
        writer.publish_versions();
        *lock(&self.leftovers) = leftovers;
        Ok(())
    }

    /// Deletes the versions that were listed as dropping when the store opened, in batches beside
    /// the projector; `false` when `stop` was cancelled first (what is left stays listed, and is
    /// deleted by the next call or after the next open).
    ///
    /// # Errors
    /// When the backend fails (the versions stay listed as dropping).
    pub fn drop_leftovers(&self, stop: &CancellationToken) -> Result<bool, StoreError> {
        let mut leftovers = std::mem::take(&mut *lock(&self.leftovers));
        while let Some((projection, version)) = leftovers.first().copied() {
            match self.drop_version(projection, version, &|| stop.is_cancelled()) {
                Ok(true) => {
                    leftovers.remove(0);
                }
                stopped_or_failed => {
                    lock(&self.leftovers).extend(leftovers);
                    return stopped_or_failed;
                }
            }
        }
        Ok(true)
    }

    /// The versions of every projection, as the writer last changed them: without waiting for
    /// the writer.
    #[must_use]
    pub fn projection_versions(&self) -> BTreeMap<Projection, ProjectionVersions> {
        lock(&self.versions).clone()
    }

    /// Starts building a new version of `projection`: returns the version and the log's length
    /// now (the events to fold before catching up).
    ///
    /// # Errors
    /// [`OpsError::RebuildRunning`] when a version is already being built.
    pub fn begin_rebuild(&self, projection: Projection) -> Result<(u32, u64), OpsError> {
        let mut writer = self.lock_writer();
        let log_len = writer.next_sequence.saturating_sub(1);
        let versions = writer.versions.entry(projection).or_default();
        if let Some(version) = versions.building {
            return Err(OpsError::RebuildRunning {
                projection,
                version,
            });
        }
        let version = versions.newest() + 1;
        let mut updated = versions.clone();
        updated.building = Some(version);
        updated.highest = version;
        // A version number is never reused, so a leftover of it cannot exist: start clean anyway.
        self.version_table(projection, version).clear(
            DROP_CHUNK,
            &|| false,
            &|batch, writes| self.write(batch, writes),
        )?;
        self.write_now(&self.meta, projection.meta_key(), encode(&updated)?)?;
        *versions = updated;
        writer.publish_versions();
        Ok((version, log_len))
    }

    /// Folds the log events from `from_sequence` (at most `max` of them) into the version being
    /// built, in one atomic batch; returns the next sequence to fold. Runs beside the projector:
    /// it reads only the log (append-only) and writes only the new version.
    ///
    /// # Errors
    /// [`OpsError::NotBuilding`] when the rebuild was cancelled, or a backend failure.
    pub fn rebuild_step(
        &self,
        projection: Projection,
        version: u32,
        from_sequence: u64,
        max: usize,
    ) -> Result<u64, OpsError> {
        self.lock_writer().check_building(projection, version)?;
        // Only what is in the log now: never a batch the projector is writing meanwhile.
        let end = (self.log_count.load(Ordering::Acquire) + 1)
            .min(from_sequence.saturating_add(u64::try_from(max).unwrap_or(u64::MAX)));
        let mut batch = sled::Batch::default();
        let next = self.fold_log_into(projection, version, from_sequence, end, &mut batch)?;
        // Written under the writer (folded without it, beside the projector): a checksum of the
        // version being built, taken under the writer, sees it between two steps, never half a
        // step; and a rebuild cancelled while this step folded writes nothing more.
        let writer = self.lock_writer();
        writer.check_building(projection, version)?;
        self.write(batch, folded(from_sequence, next))?;
        drop(writer);
        Ok(next)
    }

    /// Folds the rest of the log into the version being built and makes it the active one, under
    /// the writer (so no event is projected in between): the rest in atomic batches of at most
    /// `max` events (the version being built is not served, so a part of it stored is harmless),
    /// the last of them with the switch. The previous version is listed as dropping;
    /// [`SledStore::retire`] deletes it.
    ///
    /// # Errors
    /// [`OpsError::NotBuilding`] when the rebuild was cancelled, or a backend failure (then the
    /// active version stays as it was).
    pub fn finish_rebuild(
        &self,
        projection: Projection,
        version: u32,
        from_sequence: u64,
        max: usize,
    ) -> Result<Switched, OpsError> {
        let previous = {
            let mut writer = self.lock_writer();
            writer.check_building(projection, version)?;
            let end = writer.next_sequence;
            let step = u64::try_from(max.max(1)).unwrap_or(u64::MAX);
            let mut from = from_sequence;
            // A long rest (ingest the rebuild could not outrun) in bounded batches: the memory of
            // one batch does not grow with the log, and readers get sled between them.
            while end.saturating_sub(from) > step {
                let mut batch = sled::Batch::default();
                let next =
                    self.fold_log_into(projection, version, from, from + step, &mut batch)?;
                self.write(batch, folded(from, next))?;
                if next <= from {
                    break;
                }
                from = next;
                std::thread::yield_now();
            }
            let mut batch = sled::Batch::default();
            let next = self.fold_log_into(projection, version, from, end, &mut batch)?;
            let versions = writer.versions.entry(projection).or_default();
            let mut updated = versions.clone();
            let previous = updated.active;
            updated.active = version;
            updated.building = None;
            updated.dropping.push(previous);
            self.meta
                .insert(&mut batch, projection.meta_key(), encode(&updated)?);
            self.write(batch, folded(from, next))?;
            *versions = updated;
            writer.publish_versions();
            let table = Arc::new(self.version_table(projection, version));
            let mut active = self
                .active
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let replaced = match projection {
                Projection::Timeline => std::mem::replace(&mut active.timeline, table),
                Projection::Summary => std::mem::replace(&mut active.summary, table),
            };
            (previous, replaced)
        };
        let (previous, replaced) = previous;
        // The switch is durable before it is reported. A failed flush stops the store's writes
        // and the node (see `failure`): after the restart the switch is there, or the new version
        // is dropped as an interrupted rebuild's and the previous one serves. Either way the
        // switch is made in memory: it is not a failed rebuild whose version can be abandoned.
        // The store's flush (not sled's alone): the durable sequence and the watchers' entries
        // move with it too.
        let unflushed = touchline_core::EventStore::flush(self).err();
        Ok(Switched {
            projection,
            previous,
            replaced,
            unflushed,
        })
    }

    /// Deletes the version a switch replaced, once the reads that started on it have ended (or
    /// after a grace period). The switch is done either way: a failed or stopped drop leaves
    /// garbage, listed as dropping and deleted on the next open, not a failed rebuild. Stops
    /// between batches when `stop` is cancelled (shutdown).
    pub fn retire(&self, switched: Switched, stop: &CancellationToken) {
        let Switched {
            projection,
            previous,
            replaced,
            ..
        } = switched;
        let deadline = std::time::Instant::now() + READERS_GRACE;
        while Arc::strong_count(&replaced) > 1
            && std::time::Instant::now() < deadline
            && !stop.is_cancelled()
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(replaced);
        match self.drop_version(projection, previous, &|| stop.is_cancelled()) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%projection, version = previous, "stopped dropping the replaced version; it is dropped on the next start");
            }
            Err(error) => {
                tracing::warn!(%projection, version = previous, %error, "cannot drop the replaced version now; it is dropped on the next start");
            }
        }
    }

    /// Abandons the version being built and drops what it wrote, until `stop` says to stop (a
    /// shutdown): what is left is dropped after the next open. Returns whether all of it was.
    ///
    /// # Errors
    /// [`OpsError::NotBuilding`] or a backend failure.
    pub fn cancel_rebuild(
        &self,
        projection: Projection,
        version: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, OpsError> {
        self.abandon_rebuild(projection, version)?;
        Ok(self.drop_abandoned(projection, version, stop)?)
    }

    /// Abandons the version being built: from now on it is not built, and it is listed as
    /// dropping (a rebuild of the projection may start), until [`Self::drop_abandoned`] deleted
    /// it, or the next open does.
    ///
    /// # Errors
    /// [`OpsError::NotBuilding`] or a backend failure.
    pub fn abandon_rebuild(&self, projection: Projection, version: u32) -> Result<(), OpsError> {
        let mut writer = self.lock_writer();
        writer.check_building(projection, version)?;
        let versions = writer.versions.entry(projection).or_default();
        let mut updated = versions.clone();
        updated.building = None;
        updated.dropping.push(version);
        self.write_now(&self.meta, projection.meta_key(), encode(&updated)?)?;
        *versions = updated;
        writer.publish_versions();
        Ok(())
    }

    /// Deletes an abandoned version ([`Self::abandon_rebuild`]) until `stop` says to stop (a
    /// shutdown): what is left is dropped after the next open. Returns whether all of it was.
    ///
    /// # Errors
    /// A backend failure.
    pub fn drop_abandoned(
        &self,
        projection: Projection,
        version: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, StoreError> {
        self.drop_version(projection, version, stop)
    }

    /// Folds log events `from_sequence..end` into one version; returns the next to fold.
    fn fold_log_into(
        &self,
        projection: Projection,
        version: u32,
        from_sequence: u64,
        end: u64,
        batch: &mut sled::Batch,
    ) -> Result<u64, StoreError> {
        if from_sequence >= end {
            return Ok(from_sequence);
        }
        let table = self.version_table(projection, version);
        let mut folds = match projection {
            Projection::Timeline => Folds::new(self, Some(table), None),
            Projection::Summary => Folds::new(self, None, Some(table)),
        };
        let mut next = from_sequence;
        log::for_each(&self.log, from_sequence, end, |record| {
            folds.fold(batch, &record.entry()?)?;
            next = record.sequence + 1;
            Ok(())
        })?;
        folds.finish(batch)?;
        Ok(next)
    }

    /// Deletes a version's entries, then forgets it; `false` when `stop` said to stop first (the
    /// version stays listed as dropping).
    fn drop_version(
        &self,
        projection: Projection,
        version: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, StoreError> {
        let Some(deleted) =
            self.version_table(projection, version)
                .clear(DROP_CHUNK, stop, &|batch, writes| self.write(batch, writes))?
        else {
            return Ok(false);
        };
        tracing::info!(%projection, version, deleted, "dropped projection version");
        let mut writer = self.lock_writer();
        let versions = writer.versions.entry(projection).or_default();
        let mut updated = versions.clone();
        updated.dropping.retain(|dropping| *dropping != version);
        self.write_now(&self.meta, projection.meta_key(), encode(&updated)?)?;
        *versions = updated;
        writer.publish_versions();
        Ok(true)
    }
}

impl WriterState {
    /// Publishes `versions` for [`SledStore::projection_versions`]: after each change of them,
    /// under the writer (so copies are published in the order of the changes).
    fn publish_versions(&self) {
        lock(&self.published_versions).clone_from(&self.versions);
    }

    /// Whether `version` of `projection` is the one being built (not cancelled, not replaced).
    fn check_building(&self, projection: Projection, version: u32) -> Result<(), OpsError> {
        match self.versions.get(&projection) {
            Some(versions) if versions.building == Some(version) => Ok(()),
            _ => Err(OpsError::NotBuilding {
                projection,
                version,
            }),
        }
    }
}

/// A switch to a rebuilt version: the version it replaced, still to be deleted
/// ([`SledStore::retire`]).
#[derive(Debug)]
#[must_use = "the replaced version stays on disk until it is retired"]
pub struct Switched {
    projection: Projection,
    /// The version that was active before the switch.
    pub previous: u32,
    /// Held by the reads that started on the previous version.
    replaced: Arc<Table>,
    /// Why the switch could not be flushed: the store has failed, and which version serves
    /// after the restart depends on what reached the disk.
    pub unflushed: Option<StoreError>,
}

/// Events folded by a step from `from_sequence` up to `next`.
fn folded(from_sequence: u64, next: u64) -> usize {
    usize::try_from(next.saturating_sub(from_sequence)).unwrap_or(usize::MAX)
}
