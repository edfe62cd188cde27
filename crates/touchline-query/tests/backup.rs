//! A backup file written from a real sled store restores into an empty one as the same store:
//! the same log, projections, positions and dead letters; damaged files and non-empty stores are
//! refused.

mod support;

use touchline_core::{ConsumedRecord, EventStore as _, RecordContent, StreamIdentity, UnixNanos};
use touchline_projection::sled_store::RestoreError;
use touchline_projection::{Projection, SledStore};
use touchline_query::backup::{self, RestoreFailure};

use support::{apply, event};

fn stream() -> StreamIdentity {
    StreamIdentity {
        cluster_id: "test".to_owned(),
        topic: "touchpoints".to_owned(),
    }
}

/// A record that is no envelope, with `value`.
fn undecodable(offset: i64, value: Vec<u8>) -> ConsumedRecord {
    ConsumedRecord {
        partition: 0,
        offset,
        content: RecordContent::Undecodable {
            reason: "not an envelope".to_owned(),
            key: None,
            value: Some(value),
        },
    }
}

/// The undecodable record the source store has at `offset` (its value depends on the offset).
fn garbage(offset: i64) -> ConsumedRecord {
    undecodable(offset, vec![0xff, 0x00, offset.to_le_bytes()[0]])
}

/// A store with `events` events over 7 customers (some large, so that the file has several
/// events frames), a duplicate, two dead letters (one discarded), flushed.
fn source(dir: &std::path::Path, events: usize) -> SledStore {
    let store = SledStore::open(dir).expect("opens");
    let mut offset = -1;
    for start in (0..events).step_by(100) {
        let batch = (start..(start + 100).min(events))
            .map(|index| {
                let mut envelope = event(
                    &format!("evt-{index}"),
                    &format!("cust-{}", index % 7),
                    i64::try_from(index % 50).expect("small"),
                );
                if index % 10 == 0 {
                    envelope.touchpoint.payload = vec![b'x'; 40_000];
                }
                envelope
            })
            .collect();
        apply(&store, &mut offset, batch, false);
    }
    // A redelivery: dropped as a duplicate.
    apply(
        &store,
        &mut offset,
        vec![event("evt-3", "cust-3", 3)],
        false,
    );
    store
        .apply(&stream(), vec![garbage(offset + 1), garbage(offset + 2)])
        .expect("applies");
    store.discard_dead_letter(1).expect("discards");
    store.flush().expect("flushes");
    store
}

fn backup_bytes(store: &SledStore) -> Vec<u8> {
    let mut file = Vec::new();
    let written = backup::write(store, |bytes| {
        file.extend(bytes);
        true
    })
    .expect("writes")
    .expect("whole");
    assert_eq!(written.bytes, file.len() as u64);
    file
}

fn active_checksums(store: &SledStore) -> Vec<(&'static str, u64, String)> {
    let (_, checksums) = store.verify().expect("verifies");
    checksums
        .into_iter()
        .map(|checksum| {
            (
                checksum.name,
                checksum.checksum.entries,
                checksum.checksum.sha256,
            )
        })
        .collect()
}

#[test]
fn a_restored_store_is_the_store_backed_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = source(&dir.path().join("source"), 450);
    let file = backup_bytes(&store);
    // 45 events of 40 kB: the events come in several frames.
    assert!(
        file.len() > touchline_proto::backup::EVENTS_FRAME_BYTES,
        "{} bytes",
        file.len()
    );

    let restored_store = SledStore::open(&dir.path().join("restored")).expect("opens");
    let restored = backup::restore(file.as_slice(), &restored_store).expect("restores");
    assert_eq!(restored.events, 450);
    assert_eq!(restored.dead_letters, 1);
    assert_eq!(restored.dead_lettered_records, 2);
    assert_eq!(restored.positions, 1);
    assert_eq!(restored.log, store.log_checksum().expect("checksum"));

    // The log, the timeline and the summaries, entry for entry.
    assert_eq!(active_checksums(&restored_store), active_checksums(&store));
    assert_eq!(
        restored_store.positions(&stream()).expect("positions"),
        store.positions(&stream()).expect("positions")
    );
    assert_eq!(
        restored_store.dead_letters(10).expect("lists"),
        store.dead_letters(10).expect("lists")
    );
    assert_eq!(restored_store.dead_letter_count(), 1);

    // It goes on as the source would: the discarded record is not a dead letter again, the next
    // dead letter gets a new id (in a range of the restore's own: the source's next ids may name
    // other records), a redelivered event is still a duplicate, and a new event gets the next
    // sequence.
    let next = |store: &SledStore, offset: i64| {
        store
            .apply(
                &stream(),
                vec![garbage(451), undecodable(offset, vec![0xfe])],
            )
            .expect("applies")
    };
    let source_outcome = next(&store, 460);
    let restored_outcome = next(&restored_store, 460);
    assert_eq!(source_outcome, restored_outcome);
    assert_eq!(restored_outcome.dead_lettered, 1, "only the new record");
    let mut offset = 470;
    apply(
        &restored_store,
        &mut offset,
        vec![event("evt-3", "cust-3", 3), event("evt-new", "cust-1", 9)],
        true,
    );
    assert_eq!(restored_store.log_len(), 451);
    let ids = restored_store
        .dead_letters(10)
        .expect("lists")
        .iter()
        .map(|dead_letter| dead_letter.id)
        .collect::<Vec<_>>();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], 2);
    assert!(ids[1] > 3 && ids[1] % (1 << 24) == 0, "{ids:?}");
    assert_eq!(
        restored_store
            .checksum(Projection::Timeline, 1)
            .expect("checksum")
            .entries,
        451
    );
}

#[test]
fn an_empty_store_backs_up_and_restores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(&dir.path().join("source")).expect("opens");
    let file = backup_bytes(&store);
    let restored_store = SledStore::open(&dir.path().join("restored")).expect("opens");
    let restored = backup::restore(file.as_slice(), &restored_store).expect("restores");
    assert_eq!(restored.events, 0);
    assert_eq!(restored_store.log_len(), 0);
}

#[test]
fn damaged_files_and_stores_with_data_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = source(&dir.path().join("source"), 120);
    let file = backup_bytes(&store);
    let attempt = |name: &str, bytes: &[u8]| {
        let target = SledStore::open(&dir.path().join(name)).expect("opens");
        backup::restore(bytes, &target)
    };

    // Cut anywhere: refused as truncated.
    for (index, end) in [0, 1, 30, file.len() / 2, file.len() - 1]
        .into_iter()
        .enumerate()
    {
        let error = attempt(&format!("cut-{index}"), &file[..end]).expect_err("refused");
        assert!(
            matches!(error, RestoreFailure::File(_)),
            "cut at {end}: {error}"
        );
    }

    // One byte of an event changed: the file's checksum finds it.
    let mut damaged = file.clone();
    let middle = file.len() / 2;
    damaged[middle] ^= 0x01;
    let error = attempt("damaged", &damaged).expect_err("refused");
    assert!(error.to_string().contains("damaged"), "{error}");

    // Into a store that holds events: refused before anything is written.
    let error = backup::restore(file.as_slice(), &store).expect_err("refused");
    assert!(
        matches!(
            error,
            RestoreFailure::Restore(RestoreError::NotEmpty { events: 120, .. })
        ),
        "{error}"
    );
    assert_eq!(store.log_len(), 120);
}

#[test]
fn counters_survive_the_restored_store_being_opened_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = source(&dir.path().join("source"), 30);
    // No dead letter left, two ids given.
    store.discard_dead_letter(2).expect("discards");
    let file = backup_bytes(&store);
    let path = dir.path().join("restored");
    let restored_store = SledStore::open(&path).expect("opens");
    let restored_at = UnixNanos::now();
    backup::restore(file.as_slice(), &restored_store).expect("restores");
    drop(restored_store);
    let reopened = SledStore::open(&path).expect("opens");
    assert_eq!(reopened.dead_letter_count(), 0);
    assert_eq!(reopened.log_len(), 30);
    // The next dead letter gets no id the source gave or could have given after its backup
    // (3, 4, ...: to other records than the restored node reads): the restore started a range
    // of its own, at a multiple of 2^24 no lower than the minute's (below 2^53, which JSON
    // readers keep exactly).
    reopened
        .apply(&stream(), vec![undecodable(99, vec![0xfd])])
        .expect("applies");
    let listed = reopened.dead_letters(10).expect("lists");
    let [dead_letter] = listed.as_slice() else {
        panic!("one dead letter: {listed:?}")
    };
    assert_eq!(dead_letter.id % (1 << 24), 0, "{}", dead_letter.id);
    assert!(
        dead_letter.id >= minute_range(restored_at),
        "{}",
        dead_letter.id
    );
    assert!(dead_letter.id < 1 << 53, "{}", dead_letter.id);
    // Ids go on from there.
    reopened
        .apply(&stream(), vec![undecodable(100, vec![0xfd])])
        .expect("applies");
    let listed = reopened.dead_letters(10).expect("lists");
    assert_eq!(listed[1].id, dead_letter.id + 1);
}

/// The first dead-letter id of the range of a restore at `at`: its minute since 2025 times 2^24.
fn minute_range(at: UnixNanos) -> u64 {
    u64::try_from((at.0 / 1_000_000_000 - 1_735_689_600) / 60).expect("after 2025") << 24
}

#[test]
fn an_event_replayed_past_the_positions_stays_once_after_a_restore() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(&dir.path().join("source")).expect("opens");
    let mut offset = -1;
    apply(
        &store,
        &mut offset,
        (0..10)
            .map(|index| event(&format!("evt-{index}"), "cust-1", index))
            .collect(),
        true,
    );
    // A replay appended the event at offset 20, beyond the stored position (10): positions do
    // not move for a replay.
    let late = event("evt-late", "cust-1", 20);
    let record = |offset| ConsumedRecord {
        partition: 0,
        offset,
        content: RecordContent::Event {
            raw: touchline_proto::encode_envelope(&late),
            envelope: Box::new(late.clone()),
        },
    };
    store
        .apply_replayed(&stream(), vec![record(20)])
        .expect("replays");
    store.flush().expect("flushes");
    let file = backup_bytes(&store);
    let restored_store = SledStore::open(&dir.path().join("restored")).expect("opens");
    backup::restore(file.as_slice(), &restored_store).expect("restores");
    assert_eq!(
        restored_store.positions(&stream()).expect("positions")[&0].next_offset,
        10
    );

    // The projector reads on from offset 10 and meets the record again: a duplicate.
    let outcome = restored_store
        .apply(&stream(), vec![record(20)])
        .expect("applies");
    assert_eq!((outcome.appended, outcome.duplicates), (0, 1));
    assert_eq!(restored_store.log_len(), 11);
}

/// A backup reads its cut's dead letters a page at a time after the cut, not all of them into
/// memory under the writer: meanwhile requeues and discards are refused (`BackupReading`, nothing
/// changes), and a dead letter made meanwhile is not in the file (it has a later id), so the file
/// has the dead letters as they were at the cut; once they are read (while the log is), a discard
/// goes through; and a backup whose caller goes lets them go too.
#[test]
fn dead_letters_are_read_page_by_page_while_requeues_and_discards_wait() {
    use touchline_projection::sled_store::OpsError;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    // Three dead letters of 600 KB each: the backup hands its pieces on while it reads them.
    // An event to requeue one as (a dead letter that decodes now), and a log of about 3 MB after.
    let mut offset = -1;
    store
        .apply(
            &stream(),
            (0..3)
                .map(|number| undecodable(number, vec![0xff; 600_000]))
                .collect(),
        )
        .expect("applied");
    offset += 3;
    let events = (0..3000)
        .map(|index| {
            let mut envelope = event(&format!("log-{index}"), "cust-log", 1);
            envelope.touchpoint.payload = vec![b'x'; 1000];
            envelope
        })
        .collect();
    apply(&store, &mut offset, events, false);
    store.flush().expect("flushed");
    let ids: Vec<u64> = store
        .dead_letters_after(0, 10)
        .expect("listed")
        .iter()
        .map(|dead_letter| dead_letter.id)
        .collect();
    assert_eq!(ids.len(), 3);

    let mut bytes = Vec::new();
    let mut refused = Vec::new();
    let mut discarded_during_the_log = false;
    let mut pieces = 0;
    backup::write(&store, |piece| {
        pieces += 1;
        if pieces == 1 {
            // In the middle of the dead letters: refused, and a new dead letter comes.
            refused.push(store.discard_dead_letter(ids[2]).map(|_| ()));
            refused.push(store.requeue_dead_letter(ids[0]).map(|_| ()));
            store
                .apply(&stream(), vec![undecodable(10_000, vec![0xfe; 10])])
                .expect("applied");
        } else if !discarded_during_the_log {
            // Past the dead letters, while the log is read: goes through.
            discarded_during_the_log = store.discard_dead_letter(ids[2]).is_ok();
        }
        bytes.extend(piece);
        true
    })
    .expect("written")
    .expect("whole");
    assert_eq!(refused.len(), 2);
    assert!(
        refused
            .iter()
            .all(|result| matches!(result, Err(OpsError::BackupReading))),
        "{refused:?}"
    );
    assert!(
        discarded_during_the_log,
        "a discard once the dead letters were read"
    );

    let restored_dir = tempfile::tempdir().expect("temp dir");
    let restored = SledStore::open(restored_dir.path()).expect("opens");
    let summary = backup::restore(bytes.as_slice(), &restored).expect("restored");
    assert_eq!(
        summary.dead_letters, 3,
        "the dead letters of the cut, no other"
    );
    assert_eq!(summary.events, 3000);

    // A backup whose caller goes away in the middle of the dead letters lets them go.
    let before = store.dead_letter_count();
    let stopped = backup::write(&store, |_| false).expect("no store error");
    assert!(stopped.is_none());
    store.discard_dead_letter(ids[1]).expect("discarded");
    assert_eq!(store.dead_letter_count(), before - 1);
}
