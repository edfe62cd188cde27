//! The sled implementation of [`EventStore`](touchline_core::EventStore): the append-only event log, the dedupe index, the
//! versioned timeline and summary projections, dead letters and consumer positions, each a table
//! (key prefix) of one sled tree, written together in atomic batches of at most
//! [`RECORDS_PER_WRITE`] consumed records, each with the positions it covers.
//!
//! Projections are versioned so that one can be rebuilt from the log without downtime: a rebuild
//! writes a new version next to the active one (which keeps serving and being updated), catches up
//! with the log, and becomes active in the same atomic batch that projects the last events. An
//! interrupted rebuild leaves its version behind as garbage, deleted in the background after the
//! next open ([`SledStore::drop_leftovers`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::broadcast;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use touchline_core::{ConsumedRecord, RecordContent, StoreError, TimelineEntry, UnixNanos};

use crate::error::backend;
use crate::table::Table;

mod apply;
mod backup;
mod dead_letters;
mod event_store;
mod failure;
mod log;
mod verify;
mod versions;

use apply::Folds;
pub use backup::{
    BackupCut, DeadLetteredRecord, DeadLettersAtCut, LogReader, LoggedEvent, MAX_DEAD_LETTER_ID,
    RestoreError, StreamPosition,
};
pub use dead_letters::{DeadLetter, Requeued};
pub use failure::WritesRefused;
pub use log::LogHasher;
use log::LogRecord;
use versions::version_prefix;
pub use versions::{
    Checksum, Projection, ProjectionVersions, Switched, VersionChecksum, VersionRole,
};

/// The most records one atomic write covers. sled 0.34 holds a process-wide lock while it applies
/// a batch, and every read (each step of a scan) waits for it: a consumer batch of 1,000 records
/// (about 4,000 writes) in one piece kept `GetTimeline` waiting for milliseconds (p99 9.5 ms
/// against 4 ms now, BENCHMARKS.md). Smaller writes, each atomic with the positions it covers,
/// bound that wait, and are cheaper per write in sled.
pub const RECORDS_PER_WRITE: usize = 32;

/// The most timeline entries one page request reads. A selective filter on a long timeline
/// returns a short (even empty) page with a cursor rather than scanning without bound.
pub const MAX_SCAN_PER_PAGE: usize = 10_000;

/// The most bytes of stored entries one page holds (at least one entry): pages of large events
/// end early with a cursor, so that an answer stays well under the 4 MiB gRPC clients accept by
/// default whatever the page size asked for.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

const NEXT_SEQUENCE: &[u8] = b"next_sequence";
const NEXT_DEAD_LETTER: &[u8] = b"next_dead_letter";
const DEAD_LETTER_COUNT: &[u8] = b"dead_letter_count";
/// The ids of dead letters whose clear a backup deferred (`WriterState::deferred_clears`), one
/// big-endian u64 each; absent when there are none.
const DEFERRED_CLEARS: &[u8] = b"deferred_clears";
/// The key layout of the store. Absent in an empty store; a store with data and another format
/// is refused rather than misread, but format 3 is migrated when opened. 2: versioned
/// projections; 3: summaries refer to their first and last touch instead of copying them; 4: the
/// log is stored in chunks of consecutive events, one key per write ([`log`]).
const FORMAT: &[u8] = b"format";
const FORMAT_VERSION: u64 = 4;
/// The file a restore keeps in the store's folder until it has finished: a store with it is
/// refused when opened (half restored).
pub const RESTORE_MARKER: &str = "touchline-restore-incomplete";
/// The log's identity ([`touchline_core::EventStore::log_id`]), drawn at random when a store
/// without one is opened.
const LOG_ID: &[u8] = b"log_id";

/// Why a rebuild step or a dead-letter operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("a rebuild of {projection} (version {version}) is already running")]
    RebuildRunning {
        projection: Projection,
        version: u32,
    },
    #[error("version {version} of {projection} is not being built (cancelled, or replaced)")]
    NotBuilding {
        projection: Projection,
        version: u32,
    },
    #[error("no dead letter has id {0}")]
    DeadLetterNotFound(u64),
    #[error("dead letter {id} still cannot be decoded: {reason}")]
    StillUndecodable { id: u64, reason: String },
    #[error(
        "a cancelled rebuild of {projection} is still ending (its current batch): start again once it has ended"
    )]
    RebuildEnding { projection: Projection },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error(
        "a backup is reading the dead letters: requeue or discard once it has read them (right after it starts, before it reads the log)"
    )]
    BackupReading,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters and versions that only the single writer changes; kept in memory, persisted with each
/// batch that changes them.
#[derive(Debug)]
struct WriterState {
    next_sequence: u64,
    next_dead_letter: u64,
    dead_letters: u64,
    versions: BTreeMap<Projection, ProjectionVersions>,
    /// A copy of `versions`, published by [`WriterState::publish_versions`] after each change,
    /// for readers that must not wait for the writer ([`SledStore::projection_versions`]: the
    /// status and every `/metrics` scrape, while a verification holds the writer for its
    /// summaries' scan, say).
    published_versions: Arc<Mutex<BTreeMap<Projection, ProjectionVersions>>>,
    /// Per (stream, partition) key ([`crate::keys::position`]), the lowest and highest offset of a
    /// record ever dead-lettered there: an event read again within it may be a dead letter's
    /// record that decodes now (see `apply`). New records come above it, and cost no look-up.
    dead_lettered: HashMap<Vec<u8>, (i64, i64)>,
    /// Dead letters whose record was read again and decoded (its event appended, or in the log
    /// already) while a backup read its cut's dead letters, which must stay as they were at the
    /// cut: taken off the list by the first write after the backup has read them, or by the next
    /// backup's cut, or the next open ([`SledStore::settle_deferred_clears`]). Stored
    /// ([`DEFERRED_CLEARS`]) with the write that defers them.
    deferred_clears: Vec<u64>,
}

impl WriterState {
    /// Notes a record dead-lettered at `record_key` ([`crate::keys::record`]).
    fn note_dead_lettered(&mut self, record_key: &[u8]) {
        let Some((place, offset)) = crate::keys::split_record(record_key) else {
            return;
        };
        self.dead_lettered
            .entry(place.to_vec())
            .and_modify(|(low, high)| {
                *low = (*low).min(offset);
                *high = (*high).max(offset);
            })
            .or_insert((offset, offset));
    }

    /// Whether a record may have been dead-lettered at `offset` of `place`.
    fn maybe_dead_lettered(&self, place: &[u8], offset: i64) -> bool {
        self.dead_lettered
            .get(place)
            .is_some_and(|(low, high)| (*low..=*high).contains(&offset))
    }
}

/// The tables of the active projection versions. A reader holds its version's `Arc` while it
/// reads, so a replaced version is dropped only once no reader uses it.
#[derive(Debug, Clone)]
struct Active {
    timeline: Arc<Table>,
    summary: Arc<Table>,
}

/// The event log and projections in one sled database, one tree, one table (key prefix) each.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    log: Table,
    dedupe: Table,
    positions: Table,
    dead_letters: Table,
    /// (stream, partition, offset) of each dead letter -> its id: a record re-read (replay, a
    /// new incarnation) is dead-lettered once.
    dead_letter_index: Table,
    meta: Table,
    active: RwLock<Active>,
    writer: Mutex<WriterState>,
    /// The writer's `published_versions`.
    versions: Arc<Mutex<BTreeMap<Projection, ProjectionVersions>>>,
    /// This log's identity (see [`LOG_ID`]).
    log_id: u64,
    /// Events in the log and dead letters, readable without waiting for the writer.
    log_count: AtomicU64,
    dead_letter_count: AtomicU64,
    /// Backups reading the dead letters of their cut: requeues and discards wait for them
    /// (refused, [`OpsError::BackupReading`]), so that each cut's dead letters are read as they
    /// were at the cut without being held in memory.
    backup_readers: AtomicUsize,
    /// The log sequence up to which every event is durable (flushed).
    durable_count: AtomicU64,
    /// The highest log sequence a read may see written: raised before each atomic write that
    /// appends, so that a reader that saw the write sees it raised too.
    visible_count: AtomicU64,
    /// Entries appended since the last flush, in log order: kept whether or not anyone watches
    /// (a watcher that subscribes before the flush gets them), sent to the watchers by the flush.
    unflushed: Mutex<Vec<TimelineEntry>>,
    /// Entries as they become durable, one message per flush, in log order.
    watchers: broadcast::Sender<ProjectedEntries>,
    /// Flushes one at a time, so that entries reach watchers in log order.
    flushing: Mutex<()>,
    /// The versions listed as dropping when the store opened: what [`SledStore::drop_leftovers`]
    /// deletes (a version a rebuild replaces later is its rebuild's to delete).
    leftovers: Mutex<Vec<(Projection, u32)>>,
    /// The first failed write or flush: every later one is refused (fail-stop).
    failure: failure::Failure,
}

/// Entries that one flush made durable, in log order.
pub type ProjectedEntries = Arc<[TimelineEntry]>;

/// How many flushes a slow watcher may fall behind before it is told it lagged.
pub const WATCH_BUFFER: usize = 1024;

/// A random, nonzero 64-bit identity: the standard library's hasher keys come from the operating
/// system's randomness, mixed with the clock.
fn draw_log_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(backend)
}

fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    key: &[u8],
    bytes: &'a [u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        what,
        key: format!("{key:02x?}"),
        reason: error.to_string(),
    })
}

/// The cursor (event time, log sequence) at the end of a stored timeline key.
fn stored_timeline_cursor(key: &[u8]) -> Result<touchline_core::TimelineCursor, StoreError> {
    crate::keys::timeline_cursor(key).ok_or_else(|| StoreError::Corrupt {
        what: "timeline key",
        key: format!("{key:02x?}"),
        reason: "shorter than its event time and sequence".to_owned(),
    })
}

/// Two `u64`s big-endian, one after the other: a position (next offset, fingerprint of the record
/// before it) or a dead-letter index entry (dead letter id, fingerprint of its record).
fn u64_pair(first: u64, second: u64) -> Vec<u8> {
    let mut value = first.to_be_bytes().to_vec();
    value.extend_from_slice(&second.to_be_bytes());
    value
}

/// The two `u64`s of a [`u64_pair`] value (`what`, at `key`, for the error when it is not one).
fn read_u64_pair(what: &'static str, key: &[u8], value: &[u8]) -> Result<(u64, u64), StoreError> {
    Ok((
        read_u64(what, key, value.get(..8).unwrap_or_default())?,
        read_u64(what, key, value.get(8..).unwrap_or_default())?,
    ))
}

fn read_u64(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        key: format!("{key:02x?}"),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// Big-endian u64s one after the other.
fn read_ids(key: &[u8], bytes: &[u8]) -> Result<Vec<u64>, StoreError> {
    let (ids, []) = bytes.as_chunks::<8>() else {
        return Err(StoreError::Corrupt {
            what: "dead-letter ids",
            key: format!("{key:02x?}"),
            reason: format!("{} bytes, not a multiple of 8", bytes.len()),
        });
    };
    Ok(ids.iter().map(|id| u64::from_be_bytes(*id)).collect())
}

/// sled's page cache unless configured otherwise. sled's resident memory runs well above it (it
/// counts serialized sizes), so it is kept modest; see BENCHMARKS.md (memory).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The sled configuration of the store (the bench's sled ceiling uses it too, so that the two are
/// compared like for like): the cache size, sled's defaults otherwise. (The high-throughput mode
/// without the periodic background flush was measured: +12% end-to-end throughput, but a worse
/// ingest-to-queryable tail; see BENCHMARKS.md.)
#[must_use]
pub fn sled_config(path: &Path, cache_bytes: u64) -> sled::Config {
    sled::Config::new().path(path).cache_capacity(cache_bytes)
}

impl SledStore {
    /// Opens (or creates) the store in `path`.
    ///
    /// # Errors
    /// When sled cannot open the folder or a stored counter is corrupt.
    pub fn open(path: &Path) -> crate::Result<Self> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `path` with a page cache of `cache_bytes`.
    ///
    /// # Errors
    /// When sled cannot open the folder or a stored counter is corrupt.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> crate::Result<Self> {
        if path.join(RESTORE_MARKER).exists() {
            return Err(crate::Error::Format(format!(
                "{} holds a store whose restore did not finish ({RESTORE_MARKER} is there): restore the backup again (`touchline restore` starts it over)",
                path.display()
            )));
        }
        let store = Self::open_unchecked(path, cache_bytes)?;
        // Again under sled's lock: a restore that marked the folder after the check above finds
        // the store locked and leaves it alone; one that marked it before is refused here.
        if path.join(RESTORE_MARKER).exists() {
            return Err(crate::Error::Format(format!(
                "a restore into {} began while the store was opened: restore the backup again once it is done (`touchline restore` starts it over)",
                path.display()
            )));
        }
        Ok(store)
    }

    /// Opens the store in `path` whatever it holds: for a restore, which marks the folder with
    /// [`RESTORE_MARKER`] while it runs.
    ///
    /// # Errors
    /// When sled cannot open the folder or a stored counter is corrupt.
    pub fn open_for_restore(path: &Path, cache_bytes: u64) -> crate::Result<Self> {
        Self::open_unchecked(path, cache_bytes)
    }

    fn open_unchecked(path: &Path, cache_bytes: u64) -> crate::Result<Self> {
        let db =
            sled_config(path, cache_bytes)
                .open()
                .map_err(|source| crate::Error::OpenStore {
                    path: path.display().to_string(),
                    source,
                })?;
        Self::from_db(db)
    }

    /// Opens the store's tables, and lists the version an interrupted rebuild left behind as
    /// dropping ([`SledStore::drop_leftovers`] deletes it). Private: two stores on one database
    /// would be two writers.
    ///
    /// # Errors
    /// When a tree cannot be opened, the store has another format or a stored counter is corrupt.
    fn from_db(db: sled::Db) -> crate::Result<Self> {
        let tree = db.open_tree("touchline").map_err(backend)?;
        let table = |prefix: &[u8]| Table::new(tree.clone(), prefix);
        let meta = table(b"M");
        match meta.get(FORMAT).map_err(backend)? {
            Some(bytes) if read_u64("format", FORMAT, &bytes)? == FORMAT_VERSION => {}
            Some(bytes) if read_u64("format", FORMAT, &bytes)? == 3 => {
                let moved = log::migrate_format_3(&tree)?;
                meta.insert_now(FORMAT, &FORMAT_VERSION.to_be_bytes())
                    .map_err(backend)?;
                tracing::info!(
                    events = moved,
                    "migrated the store from format 3 to {FORMAT_VERSION}: the log is now stored in chunks"
                );
            }
            Some(bytes) => {
                return Err(crate::Error::Format(format!(
                    "the store has format {}, this Touchline reads format {FORMAT_VERSION}; move it aside and let the projector rebuild it from Kafka",
                    read_u64("format", FORMAT, &bytes)?
                )));
            }
            None if tree.is_empty() => {
                tree.insert([b"M", FORMAT].concat(), &FORMAT_VERSION.to_be_bytes())
                    .map_err(backend)?;
            }
            None => {
                return Err(crate::Error::Format(
                    "the store was written by an earlier Touchline (unversioned projections); move it aside and let the projector rebuild it from Kafka".to_owned(),
                ));
            }
        }
        let counter = |key: &[u8], default: u64| -> Result<u64, StoreError> {
            match meta.get(key).map_err(backend)? {
                Some(bytes) => read_u64("counter", key, &bytes),
                None => Ok(default),
            }
        };
        let mut versions = BTreeMap::new();
        for projection in Projection::ALL {
            let key = projection.meta_key();
            let stored: ProjectionVersions = match meta.get(&key).map_err(backend)? {
                Some(bytes) => decode("projection versions", &key, &bytes)?,
                None => ProjectionVersions::default(),
            };
            versions.insert(projection, stored);
        }
        let log_id = match meta.get(LOG_ID).map_err(backend)? {
            Some(bytes) => read_u64("log id", LOG_ID, &bytes)?,
            None => {
                let drawn = draw_log_id();
                meta.insert_now(LOG_ID, &drawn.to_be_bytes())
                    .map_err(backend)?;
                db.flush().map_err(backend)?;
                drawn
            }
        };
        let next_dead_letter = counter(NEXT_DEAD_LETTER, 1)?;
        let mut writer = WriterState {
            next_sequence: counter(NEXT_SEQUENCE, 1)?,
            next_dead_letter,
            dead_letters: counter(DEAD_LETTER_COUNT, next_dead_letter.saturating_sub(1))?,
            published_versions: Arc::new(Mutex::new(versions.clone())),
            versions,
            dead_lettered: HashMap::new(),
            deferred_clears: match meta.get(DEFERRED_CLEARS).map_err(backend)? {
                Some(bytes) => read_ids(DEFERRED_CLEARS, &bytes)?,
                None => Vec::new(),
            },
        };
        // Keys only, one entry per record ever dead-lettered.
        for item in table(b"Y").scan_prefix(&[]) {
            writer.note_dead_lettered(&item.map_err(backend)?.0);
        }
        let version_table = |projection: Projection, version: u32| {
            Table::new(tree.clone(), &version_prefix(projection, version))
        };
        let active = Active {
            timeline: Arc::new(version_table(
                Projection::Timeline,
                writer.versions[&Projection::Timeline].active,
            )),
            summary: Arc::new(version_table(
                Projection::Summary,
                writer.versions[&Projection::Summary].active,
            )),
        };
        let log_count = writer.next_sequence.saturating_sub(1);
        let store = Self {
            log: table(log::PREFIX),
            dedupe: table(b"D"),
            positions: table(b"P"),
            dead_letters: table(b"X"),
            dead_letter_index: table(b"Y"),
            meta,
            active: RwLock::new(active),
            log_count: AtomicU64::new(log_count),
            dead_letter_count: AtomicU64::new(writer.dead_letters),
            backup_readers: AtomicUsize::new(0),
            durable_count: AtomicU64::new(log_count),
            visible_count: AtomicU64::new(log_count),
            unflushed: Mutex::new(Vec::new()),
            watchers: broadcast::channel(WATCH_BUFFER).0,
            flushing: Mutex::new(()),
            leftovers: Mutex::new(Vec::new()),
            failure: failure::Failure::default(),
            versions: Arc::clone(&writer.published_versions),
            writer: Mutex::new(writer),
            log_id,
            tree,
            db,
        };
        store.mark_leftovers()?;
        store.settle_deferred_clears(&mut store.lock_writer())?;
        Ok(store)
    }

    fn lock_writer(&self) -> MutexGuard<'_, WriterState> {
        lock(&self.writer)
    }

    /// Holds the writer until the guard is dropped: for tests of what must not wait for it.
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> impl Drop + '_ {
        self.lock_writer()
    }

    /// Entries as they become durable (after each flush), in log order: the feed of live
    /// timelines. Never slows the writer: a receiver more than [`WATCH_BUFFER`] flushes behind
    /// gets `Lagged`.
    #[must_use]
    pub fn watch_sender(&self) -> broadcast::Sender<ProjectedEntries> {
        self.watchers.clone()
    }

    fn active(&self) -> Active {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Events in the log.
    #[must_use]
    pub fn log_len(&self) -> usize {
        usize::try_from(self.log_count.load(Ordering::Acquire)).unwrap_or(usize::MAX)
    }

    /// Bytes the database takes on disk.
    ///
    /// # Errors
    /// When the backend cannot tell.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }

    /// Reads the event stored under `sequence` in the log: (partition, offset, raw record value).
    ///
    /// # Errors
    /// When the backend fails or the log value is shorter than its header.
    pub fn log_record(&self, sequence: u64) -> Result<Option<(i32, i64, Vec<u8>)>, StoreError> {
        log::get(&self.log, sequence)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
