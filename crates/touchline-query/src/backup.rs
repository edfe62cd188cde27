//! Backups of the store as files (`proto/touchline/v1/backup.proto`): [`write()`] makes one from a
//! store (what `AdminService.Backup` streams), [`restore()`] reads one into an empty store (what
//! `touchline restore` runs). Both block: run them off the async threads.

use std::io::Read;

use touchline_core::{EventStore as _, StoreError, UnixNanos};
use touchline_projection::sled_store::{
    BackupCut, DeadLetteredRecord, LogHasher, LoggedEvent, MAX_DEAD_LETTER_ID, RestoreError,
    StreamPosition,
};
use touchline_projection::{Checksum, SledStore};
use touchline_proto::backup::{
    BackupFileError, EVENTS_FRAME_BYTES, FORMAT, FrameReader, FrameWriter,
};
use touchline_proto::convert::{instant, timestamp};
use touchline_proto::v1;
use touchline_proto::v1::backup_frame::Frame;

use crate::admin::{domain_dead_letter, wire_dead_letter};

/// What a backup written whole holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// When the backup's cut was taken.
    pub taken_at: UnixNanos,
    pub events: u64,
    pub bytes: u64,
    /// The log's checksum through its last event, as `VerifyProjections` reports it.
    pub log: Checksum,
}

/// Writes a backup of `store` taken at one point of the log, handing the file's bytes to `sink`
/// in order, in pieces of 1 MiB to about 2 MiB plus one record. `Ok(None)` when `sink` returned `false` (its reader went
/// away): the backup stopped there.
///
/// # Errors
/// When the backend fails or a stored value is corrupt.
pub fn write(
    store: &SledStore,
    mut sink: impl FnMut(Vec<u8>) -> bool,
) -> Result<Option<Written>, StoreError> {
    let mut cut = store.backup_cut()?;
    let mut writer = FrameWriter::new();
    let mut pending = writer.frame(Frame::Header(header(&cut)));
    let mut bytes = 0_u64;
    let mut send = |pending: &mut Vec<u8>, at_least: usize| {
        if pending.len() < at_least {
            return true;
        }
        bytes += pending.len() as u64;
        sink(std::mem::take(pending))
    };
    let frames = cut
        .positions
        .into_iter()
        .map(|position| {
            Frame::Position(v1::BackupPosition {
                stream: position.stream,
                partition: position.partition,
                next_offset: position.position.next_offset,
                last_fingerprint: position.position.last_fingerprint,
            })
        })
        .chain(cut.dead_lettered_records.into_iter().map(|record| {
            Frame::DeadLetteredRecord(v1::DeadLetteredRecord {
                stream: record.stream,
                partition: record.partition,
                offset: record.offset,
                dead_letter_id: record.dead_letter_id,
                fingerprint: record.fingerprint,
            })
        }));
    for frame in frames {
        pending.extend(writer.frame(frame));
        if !send(&mut pending, EVENTS_FRAME_BYTES) {
            return Ok(None);
        }
    }
    // The dead letters a page at a time (they can be many, and each holds a whole record);
    // requeues and discards wait until they are read.
    let mut dead_letters = 0_u64;
    loop {
        let page = cut.dead_letters.next_page(EVENTS_FRAME_BYTES)?;
        if page.is_empty() {
            break;
        }
        dead_letters += page.len() as u64;
        for dead_letter in page {
            pending.extend(writer.frame(Frame::DeadLetter(wire_dead_letter(dead_letter))));
            if !send(&mut pending, EVENTS_FRAME_BYTES) {
                return Ok(None);
            }
        }
    }
    if dead_letters != cut.dead_letters.count {
        // The header promised another count: the file would be refused at its restore.
        return Err(StoreError::Corrupt {
            what: "dead-letter count",
            key: String::new(),
            reason: format!(
                "the store counts {} dead letters, {dead_letters} were read",
                cut.dead_letters.count
            ),
        });
    }
    drop(cut.dead_letters);
    let mut log = store.read_log(cut.events);
    while let Some((first_sequence, events)) = log.next_events(EVENTS_FRAME_BYTES)? {
        pending.extend(
            writer.frame(Frame::Events(v1::BackupEvents {
                first_sequence,
                events: events
                    .into_iter()
                    .map(|event| v1::LoggedEvent {
                        partition: event.partition,
                        offset: event.offset,
                        record: event.record,
                    })
                    .collect(),
            })),
        );
        if !send(&mut pending, EVENTS_FRAME_BYTES) {
            return Ok(None);
        }
    }
    let log = log.checksum();
    pending.extend(writer.trailer(log.entries, log.sha256.clone()));
    if !send(&mut pending, 0) {
        return Ok(None);
    }
    Ok(Some(Written {
        taken_at: cut.taken_at,
        events: log.entries,
        bytes,
        log,
    }))
}

fn header(cut: &BackupCut) -> v1::BackupHeader {
    v1::BackupHeader {
        format: FORMAT.to_owned(),
        events: cut.events,
        positions: u32::try_from(cut.positions.len()).unwrap_or(u32::MAX),
        dead_lettered_records: cut.dead_lettered_records.len() as u64,
        dead_letters: cut.dead_letters.count,
        next_dead_letter: cut.dead_letters.next_dead_letter,
        taken_at: Some(timestamp(cut.taken_at)),
        touchline_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// What a restore put into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub events: u64,
    pub positions: u64,
    pub dead_letters: u64,
    pub dead_lettered_records: u64,
    pub taken_at: Option<UnixNanos>,
    pub touchline_version: String,
    /// The restored log's checksum (the backup's, checked).
    pub log: Checksum,
}

/// Why a backup file was not restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFailure {
    #[error(transparent)]
    File(#[from] BackupFileError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(
        "the backup's {what} do not add up: its header says {stated}, it holds {found}: the backup is damaged"
    )]
    Count {
        what: &'static str,
        stated: u64,
        found: u64,
    },
    #[error(
        "the log checksum of the backup's events ({computed}) is not its trailer's ({stated}): the backup is damaged"
    )]
    LogChecksum { computed: String, stated: String },
    #[error("the backup's dead letter {id} has no valid time")]
    DeadLetterTime { id: u64 },
    #[error("the backup is damaged: {0}")]
    Invalid(String),
}

/// Kafka partitions and offsets are never negative.
fn kafka_place(what: &str, partition: i32, offset: i64) -> Result<(), RestoreFailure> {
    if partition < 0 || offset < 0 {
        return Err(RestoreFailure::Invalid(format!(
            "{what} at partition {partition}, offset {offset}: not a place in Kafka"
        )));
    }
    Ok(())
}

/// A stream's key names it in the store's keys, ended by a zero byte.
fn stream_name(stream: &str) -> Result<(), RestoreFailure> {
    if stream.contains('\0') {
        return Err(RestoreFailure::Invalid(format!(
            "stream {stream:?} has a zero byte"
        )));
    }
    Ok(())
}

/// A dead-letter id of the file: between 1 and [`MAX_DEAD_LETTER_ID`], and one the backup had
/// given, below the header's next id (`None`: no header yet). A backup's dead letters and index
/// entries are all of its cut; an id at or above the next one would be given again by the
/// restored store, to another record, whose dead letter the first record's index entry would
/// then point to.
fn dead_letter_id(id: u64, header: Option<&v1::BackupHeader>) -> Result<(), RestoreFailure> {
    if !(1..=MAX_DEAD_LETTER_ID).contains(&id) {
        return Err(RestoreFailure::Invalid(format!(
            "dead letter id {id} is not between 1 and {MAX_DEAD_LETTER_ID}"
        )));
    }
    let next = header.map_or(0, |header| header.next_dead_letter);
    if id >= next {
        return Err(RestoreFailure::Invalid(format!(
            "dead letter id {id} is not below the backup's next dead-letter id ({next})"
        )));
    }
    Ok(())
}

impl From<StoreError> for RestoreFailure {
    fn from(error: StoreError) -> Self {
        Self::Restore(error.into())
    }
}

/// What a reader of a backup file counted, to check against its header and trailer.
#[derive(Debug, Default)]
struct Tally {
    positions: u64,
    dead_lettered_records: u64,
    dead_letters: u64,
    events: u64,
}

impl Tally {
    fn count(&mut self, frame: &Frame) {
        match frame {
            Frame::Position(_) => self.positions += 1,
            Frame::DeadLetteredRecord(_) => self.dead_lettered_records += 1,
            Frame::DeadLetter(_) => self.dead_letters += 1,
            Frame::Events(events) => self.events += events.events.len() as u64,
            Frame::Header(_) | Frame::Trailer(_) => {}
        }
    }

    /// Whether the counts are the header's and the trailer's.
    fn check(
        &self,
        header: &v1::BackupHeader,
        trailer: &v1::BackupTrailer,
    ) -> Result<(), RestoreFailure> {
        let counts = [
            ("events", header.events, self.events),
            ("events (trailer)", trailer.events, self.events),
            ("positions", u64::from(header.positions), self.positions),
            (
                "dead-lettered records",
                header.dead_lettered_records,
                self.dead_lettered_records,
            ),
            ("dead letters", header.dead_letters, self.dead_letters),
        ];
        for (what, stated, found) in counts {
            if stated != found {
                return Err(RestoreFailure::Count {
                    what,
                    stated,
                    found,
                });
            }
        }
        Ok(())
    }
}

/// What a backup file holds, as [`check()`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub events: u64,
    pub bytes: u64,
    /// The log's checksum, computed from the file's events (and equal to the trailer's).
    pub log_sha256: String,
    pub positions: u64,
    pub dead_letters: u64,
    pub taken_at: Option<UnixNanos>,
    pub touchline_version: String,
}

/// Reads a backup file through and checks it whole, without a store: the frames' order and
/// sizes, the file's checksum, the events' sequences (consecutive from 1), the counts in the
/// header and trailer, and the log's checksum computed from the events against the trailer's.
/// (A restore checks more, as it applies the file: that each event decodes and is there once,
/// and the places, ids and stream names of positions and dead letters.)
///
/// # Errors
/// When the file cannot be read or is not a whole, undamaged backup.
pub fn check(reader: impl Read) -> Result<Checked, RestoreFailure> {
    let mut frames = FrameReader::new(reader);
    let mut header = None;
    let mut tally = Tally::default();
    let mut log = LogHasher::default();
    let mut next = 1_u64;
    while let Some(frame) = frames.next_frame()? {
        tally.count(&frame);
        match frame {
            Frame::Header(read) => header = Some(read),
            Frame::Events(events) => {
                if events.first_sequence != next {
                    return Err(RestoreError::Gap {
                        expected: next,
                        found: events.first_sequence,
                    }
                    .into());
                }
                for event in &events.events {
                    log.add_event(next, event.partition, event.offset, &event.record);
                    next += 1;
                }
            }
            Frame::Trailer(trailer) => {
                // The reader checked the order: a header came first.
                let header = header.take().unwrap_or_default();
                tally.check(&header, &trailer)?;
                let log = log.finish();
                if log.sha256 != trailer.log_sha256 {
                    return Err(RestoreFailure::LogChecksum {
                        computed: log.sha256,
                        stated: trailer.log_sha256,
                    });
                }
                // Nothing may follow the trailer (the reader checks).
                frames.next_frame()?;
                return Ok(Checked {
                    events: log.entries,
                    bytes: frames.offset(),
                    log_sha256: log.sha256,
                    positions: tally.positions,
                    dead_letters: tally.dead_letters,
                    taken_at: header.taken_at.as_ref().and_then(instant),
                    touchline_version: header.touchline_version,
                });
            }
            Frame::Position(_) | Frame::DeadLetteredRecord(_) | Frame::DeadLetter(_) => {}
        }
    }
    Err(BackupFileError::NoTrailer { frames: 0 }.into())
}

/// Record bytes applied between two flushes of a restore: bounds what the store keeps in memory
/// for them.
const RESTORE_FLUSH_BYTES: usize = 32 * 1024 * 1024;

/// Reads the backup file `reader` reads into `store`, which must be empty: the log's events with
/// their sequences, projected as the projector did, the positions and the dead letters. Checks
/// the file (order, sizes, checksum) and, at its end, every count and the restored log's checksum
/// against the backup's. On an error the store holds part of the backup: restore into a store
/// made for it, and delete it on failure (as `touchline restore` does).
///
/// # Errors
/// When the store is not empty, the file is not a whole, undamaged backup, or the store fails.
pub fn restore(reader: impl Read, store: &SledStore) -> Result<Restored, RestoreFailure> {
    store.check_empty()?;
    let mut frames = FrameReader::new(reader);
    let mut header = None;
    let mut tally = Tally::default();
    let mut positions = Vec::new();
    // Record bytes applied since the last flush.
    let mut unflushed = 0_usize;
    while let Some(frame) = frames.next_frame()? {
        tally.count(&frame);
        match frame {
            Frame::Header(read) => header = Some(read),
            Frame::Position(position) => {
                kafka_place("a position", position.partition, position.next_offset)?;
                stream_name(&position.stream)?;
                // Stored last, once the log is whole: a store left half restored has no
                // position, and its projector reads Kafka from the beginning.
                positions.push(StreamPosition {
                    stream: position.stream,
                    partition: position.partition,
                    position: touchline_core::StoredPosition {
                        next_offset: position.next_offset,
                        last_fingerprint: position.last_fingerprint,
                    },
                });
            }
            Frame::DeadLetteredRecord(record) => {
                kafka_place("a dead-lettered record", record.partition, record.offset)?;
                stream_name(&record.stream)?;
                dead_letter_id(record.dead_letter_id, header.as_ref())?;
                store.restore_dead_lettered_record(&DeadLetteredRecord {
                    stream: record.stream,
                    partition: record.partition,
                    offset: record.offset,
                    dead_letter_id: record.dead_letter_id,
                    fingerprint: record.fingerprint,
                })?;
            }
            Frame::DeadLetter(dead_letter) => {
                let id = dead_letter.id;
                dead_letter_id(id, header.as_ref())?;
                kafka_place("a dead letter", dead_letter.partition, dead_letter.offset)?;
                stream_name(&dead_letter.stream)?;
                let dead_letter =
                    domain_dead_letter(dead_letter).ok_or(RestoreFailure::DeadLetterTime { id })?;
                store.restore_dead_letter(&dead_letter)?;
            }
            Frame::Events(events) => {
                for event in &events.events {
                    kafka_place("an event", event.partition, event.offset)?;
                }
                unflushed += events
                    .events
                    .iter()
                    .map(|event| event.record.len())
                    .sum::<usize>();
                store.restore_events(
                    events.first_sequence,
                    events
                        .events
                        .into_iter()
                        .map(|event| LoggedEvent {
                            partition: event.partition,
                            offset: event.offset,
                            record: event.record,
                        })
                        .collect(),
                )?;
                if unflushed >= RESTORE_FLUSH_BYTES {
                    store.flush()?;
                    unflushed = 0;
                    tracing::info!(
                        events = tally.events,
                        of = header.as_ref().map_or(0, |header| header.events),
                        "restoring"
                    );
                }
            }
            Frame::Trailer(trailer) => {
                // The reader checked the order: a header came first.
                let header = header.take().unwrap_or_default();
                tally.check(&header, &trailer)?;
                return finish(store, &header, &trailer, &tally, &positions).and_then(|restored| {
                    // Nothing may follow the trailer.
                    match frames.next_frame()? {
                        None => Ok(restored),
                        Some(_) => Err(BackupFileError::AfterTrailer {
                            offset: frames.offset(),
                        }
                        .into()),
                    }
                });
            }
        }
    }
    Err(BackupFileError::NoTrailer { frames: 0 }.into())
}

fn finish(
    store: &SledStore,
    header: &v1::BackupHeader,
    trailer: &v1::BackupTrailer,
    tally: &Tally,
    positions: &[StreamPosition],
) -> Result<Restored, RestoreFailure> {
    if header.next_dead_letter > MAX_DEAD_LETTER_ID + 1 {
        return Err(RestoreFailure::Invalid(format!(
            "the next dead-letter id {} is above {}",
            header.next_dead_letter,
            MAX_DEAD_LETTER_ID + 1
        )));
    }
    store.restore_next_dead_letter(header.next_dead_letter)?;
    store.flush()?;
    let log = store.log_checksum()?;
    if log.sha256 != trailer.log_sha256 || log.entries != trailer.events {
        return Err(RestoreFailure::LogChecksum {
            computed: log.sha256,
            stated: trailer.log_sha256.clone(),
        });
    }
    for position in positions {
        store.restore_position(position)?;
    }
    store.flush()?;
    Ok(Restored {
        events: tally.events,
        positions: tally.positions,
        dead_letters: tally.dead_letters,
        dead_lettered_records: tally.dead_lettered_records,
        taken_at: header.taken_at.as_ref().and_then(instant),
        touchline_version: header.touchline_version.clone(),
        log,
    })
}
