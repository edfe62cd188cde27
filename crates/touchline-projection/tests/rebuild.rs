//! Versioned projections on a real sled in a temporary directory: a rebuild from the log while the
//! projector keeps applying equals the incrementally built projection (same checksum), becomes
//! active atomically, and an interrupted rebuild leaves the active version untouched. Dead letters
//! are kept once, and can be requeued or discarded (a damaged one too).

use touchline_core::{
    ConsumedRecord, CustomerId, Envelope, EventStore as _, JourneyStage, RecordContent, StoreError,
    StreamIdentity, TimelineFilter, TimelineQuery,
};
use touchline_projection::{OpsError, Projection, Requeued, SledStore};

mod support;

fn stream() -> StreamIdentity {
    support::stream("c")
}

/// Event `i`: three partners, seven customers, every stage, event times out of order on purpose
/// (late events land in their place).
fn envelope(i: u64) -> Envelope {
    let stage = JourneyStage::ALL[usize::try_from(i).unwrap_or_default() % JourneyStage::ALL.len()];
    support::envelope(
        &format!("partner-{}", i % 3),
        &format!("e{i}"),
        &format!("cust-{}", i % 7),
        i64::try_from((i * 7919) % 1000).unwrap_or_default(),
        stage,
    )
}

fn records(range: std::ops::Range<u64>) -> Vec<ConsumedRecord> {
    range
        .map(|i| {
            support::record(
                i32::try_from(i % 2).unwrap_or_default(),
                i64::try_from(i).unwrap_or_default(),
                envelope(i),
            )
        })
        .collect()
}

fn garbage(offset: i64) -> ConsumedRecord {
    ConsumedRecord {
        partition: 0,
        offset,
        content: RecordContent::Undecodable {
            reason: "not an envelope".to_owned(),
            key: None,
            value: Some(vec![0xff, 0x01]),
        },
    }
}

fn checksums(store: &SledStore) -> Vec<(String, u64, String)> {
    store
        .projection_versions()
        .into_iter()
        .map(|(projection, versions)| {
            let checksum = store
                .checksum(projection, versions.active)
                .expect("checksums");
            (projection.to_string(), checksum.entries, checksum.sha256)
        })
        .collect()
}

fn whole_timeline(store: &SledStore, customer: &str) -> Vec<String> {
    store
        .timeline(&TimelineQuery {
            customer_id: CustomerId::parse(customer).expect("valid"),
            page_size: 1000,
            after: None,
            filter: TimelineFilter::default(),
            up_to_sequence: None,
        })
        .expect("reads")
        .entries
        .iter()
        .map(|entry| entry.touchpoint.event_id.to_string())
        .collect()
}

#[test]
fn a_rebuild_beside_the_projector_equals_the_incremental_projection_and_swaps_atomically() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    store.apply(&stream(), records(0..300)).expect("applies");
    let before = checksums(&store);
    let timeline_before = whole_timeline(&store, "cust-3");

    let mut applied_during = 300;
    for projection in Projection::ALL {
        let (version, total) = store.begin_rebuild(projection).expect("begins");
        assert_eq!((version, total), (2, applied_during));
        assert!(matches!(
            store.begin_rebuild(projection),
            Err(OpsError::RebuildRunning { version: 2, .. })
        ));
        let mut next = 1;
        while next <= total {
            next = store
                .rebuild_step(projection, version, next, 64)
                .expect("steps");
            // The projector goes on meanwhile; queries read the active version.
            store
                .apply(&stream(), records(applied_during..applied_during + 10))
                .expect("applies during the rebuild");
            applied_during += 10;
            assert_eq!(
                store.projection_versions()[&projection].active,
                1,
                "the old version stays active while building"
            );
        }
        let switched = store
            .finish_rebuild(projection, version, next, usize::MAX)
            .expect("finishes");
        assert_eq!(switched.previous, 1);
        let versions = &store.projection_versions()[&projection];
        assert_eq!(versions.active, 2, "active from the switch");
        assert_eq!(
            versions.dropping,
            [1],
            "the old version waits to be retired"
        );
        store.retire(switched, &tokio_util::sync::CancellationToken::new());
        let versions = &store.projection_versions()[&projection];
        assert_eq!((versions.active, versions.building), (2, None));
        assert!(versions.dropping.is_empty(), "the old version is dropped");
        assert_eq!(
            store.checksum(projection, 1).expect("checksums").entries,
            0,
            "nothing of the old version is left"
        );
    }

    // The projector goes on after the switches: it folds into the new versions (the writer's
    // cached summaries were the old version's).
    store
        .apply(&stream(), records(applied_during..applied_during + 30))
        .expect("applies after the switches");

    // Compare with a store that only ever projected incrementally, fed the same log.
    let incremental_dir = tempfile::tempdir().expect("temp dir");
    let incremental = SledStore::open(incremental_dir.path()).expect("opens");
    let total = u64::try_from(store.log_len()).expect("fits");
    incremental
        .apply(&stream(), records(0..total))
        .expect("applies");
    let rebuilt = checksums(&store);
    let expected = checksums(&incremental);
    assert_eq!(
        rebuilt, expected,
        "rebuilt projections equal incremental ones"
    );
    assert_ne!(before, rebuilt, "later events changed the projections");
    assert!(
        whole_timeline(&store, "cust-3").len() > timeline_before.len(),
        "queries read the new version"
    );
    assert_eq!(
        store.log_checksum().expect("checksums"),
        incremental.log_checksum().expect("checksums")
    );
}

/// A rebuild that could not outrun ingest switches with a long rest of the log to fold: it is
/// folded in batches of the rebuild's size, not one batch as large as the log, and the result is
/// the same.
#[test]
fn a_rebuild_finished_with_the_whole_log_left_folds_it_in_bounded_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    store.apply(&stream(), records(0..250)).expect("applies");
    let before = checksums(&store);
    assert_eq!(store.durable_sequence(), 0, "applied, not flushed");
    for projection in Projection::ALL {
        let (version, _) = store.begin_rebuild(projection).expect("begins");
        // Nothing folded yet: all 250 events are left, in batches of 7 (the last one partial).
        let switched = store
            .finish_rebuild(projection, version, 1, 7)
            .expect("finishes");
        assert!(switched.unflushed.is_none(), "the switch is durable");
        store.retire(switched, &tokio_util::sync::CancellationToken::new());
        assert_eq!(store.projection_versions()[&projection].active, version);
        // The switch's flush is the store's: what it made durable is counted as durable (a
        // read waiting for it, or a watcher, goes on without waiting for another flush).
        assert_eq!(store.durable_sequence(), 250);
    }
    assert_eq!(
        checksums(&store),
        before,
        "the same projections as incrementally"
    );
    // The projector goes on into the rebuilt versions.
    store.apply(&stream(), records(250..260)).expect("applies");
    let incremental_dir = tempfile::tempdir().expect("temp dir");
    let incremental = SledStore::open(incremental_dir.path()).expect("opens");
    incremental
        .apply(&stream(), records(0..260))
        .expect("applies");
    assert_eq!(checksums(&store), checksums(&incremental));
}

#[test]
fn an_interrupted_rebuild_leaves_the_active_version_intact_and_a_new_one_starts_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let before = {
        let store = SledStore::open(dir.path()).expect("opens");
        store.apply(&stream(), records(0..200)).expect("applies");
        let (version, _) = store.begin_rebuild(Projection::Timeline).expect("begins");
        store
            .rebuild_step(Projection::Timeline, version, 1, 50)
            .expect("steps");
        store.flush().expect("flushes");
        checksums(&store)
        // Dropped here without finishing: a crash as far as the store can tell.
    };
    let store = support::open_when_released(dir.path());
    let versions = &store.projection_versions()[&Projection::Timeline];
    assert_eq!((versions.active, versions.building), (1, None));
    assert_eq!(
        versions.dropping,
        [2],
        "listed for deletion when the store opened"
    );
    assert_eq!(checksums(&store), before, "the active version is untouched");
    // A stopped deletion leaves it listed; the next one deletes it.
    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    assert!(!store.drop_leftovers(&stopped).expect("stops"));
    assert_eq!(
        store.projection_versions()[&Projection::Timeline].dropping,
        [2]
    );
    assert!(
        store
            .drop_leftovers(&tokio_util::sync::CancellationToken::new())
            .expect("drops")
    );
    assert!(
        store.projection_versions()[&Projection::Timeline]
            .dropping
            .is_empty()
    );
    assert_eq!(
        store
            .checksum(Projection::Timeline, 2)
            .expect("checksums")
            .entries,
        0,
        "the interrupted version was dropped"
    );

    let (version, total) = store.begin_rebuild(Projection::Timeline).expect("begins");
    assert_eq!(version, 3, "version numbers are not reused");
    store
        .rebuild_step(Projection::Timeline, version, 1, 10)
        .expect("steps");
    store
        .cancel_rebuild(Projection::Timeline, version, &|| false)
        .expect("cancels");
    assert!(matches!(
        store.rebuild_step(Projection::Timeline, version, 11, 10),
        Err(OpsError::NotBuilding { .. })
    ));
    assert_eq!(checksums(&store), before);
    // A cancel during shutdown: the deletion stops, the version is left to drop after the next
    // open.
    let (version, _) = store.begin_rebuild(Projection::Timeline).expect("begins");
    store
        .rebuild_step(Projection::Timeline, version, 1, 10)
        .expect("steps");
    assert!(
        !store
            .cancel_rebuild(Projection::Timeline, version, &|| true)
            .expect("cancels"),
        "the deletion stopped"
    );
    assert_eq!(
        store.projection_versions()[&Projection::Timeline].dropping,
        [version]
    );
    assert_eq!(checksums(&store), before, "the active version is untouched");
    let switched = support::rebuild_timeline(&store);
    assert_eq!(store.log_len(), usize::try_from(total).unwrap_or_default());
    store.retire(switched, &tokio_util::sync::CancellationToken::new());
    assert_eq!(checksums(&store), before, "same log, same projection");
}

#[test]
fn a_replaced_version_whose_deletion_stopped_is_deleted_after_the_next_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    store.apply(&stream(), records(0..40)).expect("applies");
    let before = checksums(&store);
    let switched = support::rebuild_timeline(&store);
    // Shutdown came first: the deletion stops before it starts.
    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    store.retire(switched, &stopped);
    let versions = &store.projection_versions()[&Projection::Timeline];
    assert_eq!((versions.active, versions.dropping.clone()), (2, vec![1]));
    assert_eq!(
        store
            .checksum(Projection::Timeline, 1)
            .expect("checksums")
            .entries,
        40,
        "nothing of the old version was deleted"
    );
    assert_eq!(checksums(&store), before, "the new version serves the same");
    drop(store);

    let store = support::open_when_released(dir.path());
    let versions = &store.projection_versions()[&Projection::Timeline];
    assert_eq!(
        (versions.active, versions.dropping.clone()),
        (2, vec![1]),
        "opening does not wait for the deletion"
    );
    assert!(
        store
            .drop_leftovers(&tokio_util::sync::CancellationToken::new())
            .expect("drops")
    );
    let versions = &store.projection_versions()[&Projection::Timeline];
    assert_eq!((versions.active, versions.dropping.clone()), (2, vec![]));
    assert_eq!(
        store
            .checksum(Projection::Timeline, 1)
            .expect("checksums")
            .entries,
        0,
        "deleted after the store opened"
    );
    assert_eq!(checksums(&store), before);
}

/// A page of dead letters stops before the one that would take it past its byte budget (a dead
/// letter holds its whole Kafka record), and always holds one, however large: paging by the last
/// id reads them all.
#[test]
fn a_page_of_dead_letters_stays_within_its_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let large = |offset: i64| {
        let mut record = garbage(offset);
        if let RecordContent::Undecodable { value, .. } = &mut record.content {
            *value = Some(vec![0xff; 600 * 1024]);
        }
        record
    };
    store
        .apply(&stream(), vec![large(1), large(2), large(3), garbage(4)])
        .expect("applies");
    let budget = 1 << 20;
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = store.dead_letter_page(after, 100, budget).expect("lists");
        let Some(last) = page.last() else { break };
        after = last.id;
        pages.push(page.iter().map(|d| d.offset).collect::<Vec<_>>());
    }
    assert_eq!(pages, [vec![1], vec![2], vec![3, 4]]);
    assert_eq!(
        store.dead_letter_page(0, 100, 1).expect("lists").len(),
        1,
        "a page holds one dead letter whatever its size"
    );
    assert_eq!(
        store
            .dead_letter_page(0, 2, usize::MAX)
            .expect("lists")
            .len(),
        2
    );
}

/// A dead letter whose stored form was damaged (a disk that lost bytes) does not hide the others
/// from the admin API: it is listed as damaged, with its stored bytes, and can be discarded; a
/// backup refuses it rather than leave it out.
#[test]
fn a_damaged_dead_letter_is_listed_as_such_and_can_be_discarded() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = SledStore::open(dir.path()).expect("opens");
        store
            .apply(&stream(), vec![garbage(5), garbage(6), garbage(7)])
            .expect("applies");
        store.flush().expect("flushes");
    }
    // The second one's stored form damaged in place (the store's tree, table `X`, key its id).
    {
        let db = support::when_released(|| sled::open(dir.path()));
        let tree = db.open_tree("touchline").expect("the store's tree");
        let key = [b"X".as_slice(), &2_u64.to_be_bytes()].concat();
        assert!(
            tree.get(&key).expect("reads").is_some(),
            "dead letter 2 is where the test damages it"
        );
        tree.insert(key, vec![0xff; 3]).expect("writes");
        db.flush().expect("flushes");
    }
    let store = support::open_when_released(dir.path());
    let listed = store.dead_letters(10).expect("the others still list");
    assert_eq!(
        listed
            .iter()
            .map(|dead| (dead.id, dead.offset))
            .collect::<Vec<_>>(),
        [(1, 5), (2, -1), (3, 7)]
    );
    assert!(listed[1].reason.contains("damaged"), "{}", listed[1].reason);
    assert_eq!(listed[1].value.as_deref(), Some([0xff; 3].as_slice()));
    assert!(
        matches!(
            store.requeue_dead_letter(2),
            Err(OpsError::StillUndecodable { id: 2, .. })
        ),
        "nothing to decode again"
    );
    // A backup does not copy it (its restore could not decode it): the cut's dead letters are
    // refused, with what is damaged, rather than written without it.
    {
        let mut cut = store.backup_cut().expect("a cut");
        let refused = cut
            .dead_letters
            .next_page(1 << 20)
            .expect_err("the damaged dead letter is refused");
        assert!(
            matches!(&refused, StoreError::Corrupt { what, .. } if what.contains("dead letter")),
            "{refused}"
        );
    }
    assert_eq!(store.discard_dead_letter(2).expect("discards").id, 2);
    // Without it, a backup reads the others.
    let mut cut = store.backup_cut().expect("a cut");
    let copied = cut.dead_letters.next_page(1 << 20).expect("reads");
    assert_eq!(
        copied.iter().map(|dead| dead.id).collect::<Vec<_>>(),
        [1, 3]
    );
    drop(cut);
    assert_eq!(store.dead_letter_count(), 2);
    assert_eq!(
        store
            .dead_letters(10)
            .expect("lists")
            .iter()
            .map(|dead| dead.offset)
            .collect::<Vec<_>>(),
        [5, 7]
    );
}

#[test]
fn dead_letters_are_kept_once_and_can_be_discarded_or_requeued() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    store
        .apply(&stream(), vec![garbage(5), garbage(5), garbage(6)])
        .expect("applies");
    // Read again (a replay): still one dead letter per record.
    store
        .apply_replayed(&stream(), vec![garbage(5), garbage(6)])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 2);
    let listed = store.dead_letters(10).expect("lists");
    assert_eq!(listed.iter().map(|d| d.offset).collect::<Vec<_>>(), [5, 6]);
    // Another record at a known place (a wiped broker that kept its cluster id) is not the same
    // record: it becomes a dead letter of its own.
    let mut other = garbage(6);
    if let RecordContent::Undecodable { value, .. } = &mut other.content {
        *value = Some(b"another bad record".to_vec());
    }
    store.apply(&stream(), vec![other]).expect("applies");
    assert_eq!(store.dead_letter_count(), 3);
    let newest = store.dead_letters(10).expect("lists")[2].id;
    store.discard_dead_letter(newest).expect("discards");
    assert_eq!(store.dead_letter_count(), 2);

    assert!(matches!(
        store.requeue_dead_letter(listed[0].id),
        Err(OpsError::StillUndecodable { .. })
    ));
    assert_eq!(
        store.dead_letter_count(),
        2,
        "a failed requeue changes nothing"
    );
    assert!(matches!(
        store.discard_dead_letter(999),
        Err(OpsError::DeadLetterNotFound(999))
    ));
    store.discard_dead_letter(listed[0].id).expect("discards");
    assert_eq!(store.dead_letter_count(), 1);
    assert_eq!(
        store
            .dead_letters_after(listed[0].id, 10)
            .expect("lists")
            .len(),
        1
    );

    // A record that a newer decoder understands (here: one that always decoded, dead-lettered
    // by hand) is appended and projected when requeued, once.
    let good = touchline_proto::encode_envelope(&envelope(1));
    store
        .apply(
            &stream(),
            vec![ConsumedRecord {
                partition: 1,
                offset: 9,
                content: RecordContent::Undecodable {
                    reason: "decoder too old".to_owned(),
                    key: None,
                    value: Some(good),
                },
            }],
        )
        .expect("applies");
    let id = store.dead_letters(10).expect("lists")[1].id;
    assert_eq!(
        store.requeue_dead_letter(id).expect("requeues"),
        Requeued::Appended { sequence: 1 }
    );
    assert_eq!(store.log_len(), 1);
    assert_eq!(store.dead_letter_count(), 1);
    assert_eq!(whole_timeline(&store, "cust-1"), ["e1"]);
    assert!(matches!(
        store.requeue_dead_letter(id),
        Err(OpsError::DeadLetterNotFound(_))
    ));

    // The counters are written only by the writes that change them: what a restart reads back.
    store.apply(&stream(), records(2..4)).expect("applies");
    store.flush().expect("flushes");
    drop(store);
    let store = support::open_when_released(dir.path());
    assert_eq!(store.dead_letter_count(), 1);
    assert_eq!(store.log_len(), 3);
    store.apply(&stream(), vec![garbage(20)]).expect("applies");
    let ids: Vec<u64> = store
        .dead_letters(10)
        .expect("lists")
        .iter()
        .map(|dead| dead.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[1] > id, "dead letter ids are never reused: {ids:?}");
}

/// A dead letter's record that decodes when it is read again (a newer Touchline replaying the
/// topic) is appended and projected, and its dead letter taken off the list in the same write,
/// also after a restart; another record at the same place (a wiped broker) leaves it listed; a
/// backup reading its cut's dead letters meanwhile leaves it listed until the first write after.
/// Before, the event was appended and the dead letter stayed, counted, and its requeue answered
/// that the event was already in the log.
#[test]
fn a_dead_letters_record_that_decodes_when_read_again_takes_it_off_the_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let good = support::record(1, 9, envelope(1));
    let RecordContent::Event { raw, .. } = &good.content else {
        unreachable!("an event record")
    };
    let undecodable_then = ConsumedRecord {
        partition: 1,
        offset: 9,
        content: RecordContent::Undecodable {
            reason: "decoder too old".to_owned(),
            key: None,
            value: Some(raw.clone()),
        },
    };
    store
        .apply(&stream(), vec![garbage(5), undecodable_then])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 2);

    // While a backup reads its cut's dead letters they stay as they were: appended, still listed.
    let cut = store.backup_cut().expect("a cut");
    let outcome = store
        .apply_replayed(&stream(), vec![good.clone()])
        .expect("applies");
    assert_eq!(outcome.appended, 1);
    assert_eq!(whole_timeline(&store, "cust-1"), ["e1"]);
    assert_eq!(store.dead_letter_count(), 2, "left as it was at the cut");
    // Another write while the backup reads: still as at the cut.
    store
        .apply(&stream(), vec![support::record(2, 0, envelope(4))])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 2, "left as it was at the cut");
    drop(cut);
    // The first write after the backup read them takes it off the list: the record itself is
    // not read again (the positions are past it).
    store
        .apply(&stream(), vec![support::record(2, 1, envelope(5))])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 1);
    let listed = store.dead_letters(10).expect("lists");
    assert_eq!(listed.iter().map(|d| d.offset).collect::<Vec<_>>(), [5]);
    // Read again after it: already in the log, and nothing changes.
    let outcome = store
        .apply_replayed(&stream(), vec![good.clone()])
        .expect("applies");
    assert_eq!((outcome.appended, outcome.duplicates), (0, 1));
    assert_eq!(store.dead_letter_count(), 1);

    // Another record at the dead letter's place is not its record: it stays listed.
    let other = support::record(0, 5, envelope(2));
    store
        .apply_replayed(&stream(), vec![other])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 1);

    // After a restart (the places of dead letters are read back), the record itself decoding
    // takes it off; reading the first one again changes nothing.
    store.flush().expect("flushes");
    drop(store);
    let store = support::open_when_released(dir.path());
    assert_eq!(store.dead_letter_count(), 1);
    let mut decodes_now = support::record(0, 5, envelope(3));
    if let RecordContent::Event { raw, .. } = &mut decodes_now.content {
        *raw = vec![0xff, 0x01];
    }
    store
        .apply_replayed(&stream(), vec![decodes_now, good])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 0);
    assert!(store.dead_letters(10).expect("lists").is_empty());
    drop(store);
    let store = support::open_when_released(dir.path());
    assert_eq!(store.dead_letter_count(), 0, "the count was written");
}

/// The event record of `envelope(i)` at `offset` of partition 1, and the same record as a dead
/// letter (undecodable by an older Touchline).
fn decodes_later(i: u64, offset: i64) -> (ConsumedRecord, ConsumedRecord) {
    let good = support::record(1, offset, envelope(i));
    let RecordContent::Event { raw, .. } = &good.content else {
        unreachable!("an event record")
    };
    let then = ConsumedRecord {
        partition: 1,
        offset,
        content: RecordContent::Undecodable {
            reason: "decoder too old".to_owned(),
            key: None,
            value: Some(raw.clone()),
        },
    };
    (good, then)
}

/// A dead letter whose record decoded while a backup read the dead letters stays listed until
/// the first write after, as above; with no write before a restart, the next start takes it off
/// (the deferral is stored), and with none before the next backup, that backup's cut does: it does
/// not copy as listed a dead letter whose event it copies.
#[test]
fn a_deferred_dead_letter_clear_outlives_a_restart_and_comes_before_the_next_cut() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let (first, first_then) = decodes_later(1, 9);
    let (second, second_then) = decodes_later(8, 10);
    store
        .apply(&stream(), vec![garbage(5), first_then, second_then])
        .expect("applies");
    assert_eq!(store.dead_letter_count(), 3);
    let listed_offsets = |store: &SledStore| {
        store
            .dead_letters(10)
            .expect("lists")
            .iter()
            .map(|dead_letter| dead_letter.offset)
            .collect::<Vec<_>>()
    };

    let cut = store.backup_cut().expect("a cut");
    let outcome = store
        .apply_replayed(&stream(), vec![first])
        .expect("applies");
    assert_eq!(outcome.appended, 1);
    drop(cut);
    // No write after the backup: a restart.
    store.flush().expect("flushes");
    drop(store);
    let store = support::open_when_released(dir.path());
    assert_eq!(store.dead_letter_count(), 2);
    assert_eq!(listed_offsets(&store), [5, 10]);
    drop(store);
    let store = support::open_when_released(dir.path());
    assert_eq!(store.dead_letter_count(), 2, "the count was written");

    let cut = store.backup_cut().expect("a cut");
    let outcome = store
        .apply_replayed(&stream(), vec![second])
        .expect("applies");
    assert_eq!(outcome.appended, 1);
    assert_eq!(store.dead_letter_count(), 2, "as at the cut");
    drop(cut);
    // The next backup's cut, before any write.
    let mut cut = store.backup_cut().expect("a cut");
    assert_eq!(cut.dead_letters.count, 1);
    let page = cut.dead_letters.next_page(1 << 20).expect("reads");
    assert_eq!(
        page.iter()
            .map(|dead_letter| dead_letter.offset)
            .collect::<Vec<_>>(),
        [5]
    );
    drop(cut);
    assert_eq!(listed_offsets(&store), [5]);
}

#[test]
fn the_leftover_deletion_leaves_a_version_a_later_rebuild_replaced_to_that_rebuild() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = SledStore::open(dir.path()).expect("opens");
        store.apply(&stream(), records(0..60)).expect("applies");
        let (version, _) = store.begin_rebuild(Projection::Timeline).expect("begins");
        store
            .rebuild_step(Projection::Timeline, version, 1, 10)
            .expect("steps");
        store.flush().expect("flushes");
        // Dropped without finishing: version 2 of the timeline is a leftover.
    }
    let store = support::open_when_released(dir.path());
    // Before the leftovers are deleted, a rebuild of the summary switches: its replaced version 1
    // is listed as dropping too, and readers may still be on it until it is retired.
    let (version, _) = store.begin_rebuild(Projection::Summary).expect("begins");
    let next = store
        .rebuild_step(Projection::Summary, version, 1, usize::MAX)
        .expect("steps");
    let switched = store
        .finish_rebuild(Projection::Summary, version, next, usize::MAX)
        .expect("finishes");
    let replaced_entries = store
        .checksum(Projection::Summary, 1)
        .expect("checksums")
        .entries;
    assert!(replaced_entries > 0);

    assert!(
        store
            .drop_leftovers(&tokio_util::sync::CancellationToken::new())
            .expect("drops")
    );
    assert_eq!(
        store
            .checksum(Projection::Timeline, 2)
            .expect("checksums")
            .entries,
        0,
        "the leftover is gone"
    );
    assert_eq!(
        store
            .checksum(Projection::Summary, 1)
            .expect("checksums")
            .entries,
        replaced_entries,
        "the replaced version is its rebuild's to delete"
    );
    store.retire(switched, &tokio_util::sync::CancellationToken::new());
    assert_eq!(
        store
            .checksum(Projection::Summary, 1)
            .expect("checksums")
            .entries,
        0
    );
    assert!(
        store
            .projection_versions()
            .values()
            .all(|versions| versions.dropping.is_empty())
    );
}
