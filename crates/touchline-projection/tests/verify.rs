//! `verify` is taken at one point of the log, though the writer goes on while it reads the log and
//! the active timeline: run over and over while batches are applied on another thread, each of its
//! answers equals the checksums of a store that applied exactly that many events; run beside
//! rebuilds that switch the timeline, each answer lists one version per role, and the active
//! timeline's checksum is the same whichever version it is. Real sled stores on temporary
//! directories.

use std::collections::BTreeMap;

use touchline_core::{ConsumedRecord, EventStore as _, JourneyStage};
use touchline_projection::{SledStore, VersionChecksum};

mod support;

/// Events `from..to`: forty customers, event times out of order on purpose (late events land
/// between entries a scan may already have passed).
fn records(from: i64, to: i64) -> Vec<ConsumedRecord> {
    (from..to)
        .map(|i| {
            support::record(
                0,
                i,
                support::envelope(
                    &format!("partner-{}", i % 3),
                    &format!("e{i}"),
                    &format!("cust-{:02}", i % 40),
                    (i * 7919) % 100_000,
                    JourneyStage::ALL[usize::try_from(i).unwrap_or_default() % 6],
                ),
            )
        })
        .collect()
}

const HISTORY: i64 = 8_000;
const BATCH: i64 = 100;
const BATCHES: i64 = 40;

#[test]
fn verify_under_a_running_writer_answers_for_one_point_of_the_log() {
    let stream = support::stream("c");
    // The reference: the same batches applied one after the other, verified after each.
    let reference_dir = tempfile::tempdir().expect("temp dir");
    let reference = support::open_when_released(reference_dir.path());
    reference
        .apply(&stream, records(0, HISTORY))
        .expect("applies");
    let mut expected: BTreeMap<u64, Vec<VersionChecksum>> = BTreeMap::new();
    let (events, checksums) = reference.verify().expect("verifies");
    expected.insert(events, checksums);
    for batch in 0..BATCHES {
        let from = HISTORY + batch * BATCH;
        reference
            .apply(&stream, records(from, from + BATCH))
            .expect("applies");
        let (events, checksums) = reference.verify().expect("verifies");
        expected.insert(events, checksums);
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let store: SledStore = support::open_when_released(dir.path());
    store.apply(&stream, records(0, HISTORY)).expect("applies");
    let start = std::sync::Barrier::new(2);
    let answers = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            start.wait();
            for batch in 0..BATCHES {
                let from = HISTORY + batch * BATCH;
                store
                    .apply(&stream, records(from, from + BATCH))
                    .expect("applies");
                // The verifier waiting for the writer gets its turn between batches.
                std::thread::yield_now();
            }
        });
        let mut answers = Vec::new();
        start.wait();
        while !writer.is_finished() {
            answers.push(store.verify().expect("verifies"));
        }
        writer.join().expect("the writer thread ends");
        answers.push(store.verify().expect("verifies"));
        answers
    });

    for (events, checksums) in &answers {
        let Some(reference) = expected.get(events) else {
            panic!("verify answered at {events} events, not at a batch's end");
        };
        assert_eq!(checksums, reference, "at {events} events");
    }
    let all = u64::try_from(HISTORY + BATCHES * BATCH).unwrap_or_default();
    assert_eq!(answers.last().map(|(events, _)| *events), Some(all));
    assert!(
        answers.iter().any(|(events, _)| *events < all),
        "verify ran while the writer was applying ({} answers)",
        answers.len()
    );
}

#[test]
fn verify_beside_rebuilds_of_the_timeline_answers_for_one_version_at_one_point() {
    use touchline_projection::{Projection, VersionRole};
    let stream = support::stream("c");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = support::open_when_released(dir.path());
    store.apply(&stream, records(0, HISTORY)).expect("applies");
    let (events, before) = store.verify().expect("verifies");
    let timeline = |checksums: &[VersionChecksum]| {
        checksums
            .iter()
            .find(|c| c.name == "timeline" && c.role == VersionRole::Active)
            .map(|c| c.checksum.clone())
    };
    const REBUILDS: usize = 6;
    let start = std::sync::Barrier::new(2);
    let answers = std::thread::scope(|scope| {
        let rebuilder = scope.spawn(|| {
            start.wait();
            for _ in 0..REBUILDS {
                let switched = support::rebuild_timeline(&store);
                // Deleting the replaced version waits for the verification reading it.
                store.retire(switched, &tokio_util::sync::CancellationToken::new());
            }
        });
        let mut answers = Vec::new();
        start.wait();
        while !rebuilder.is_finished() {
            answers.push(store.verify().expect("verifies"));
        }
        rebuilder.join().expect("the rebuilder ends");
        answers
    });
    assert!(!answers.is_empty());
    for (at, checksums) in &answers {
        assert_eq!(*at, events, "no event was applied");
        // Projections are folds of the log: every version holds what the first one held.
        assert_eq!(timeline(checksums), timeline(&before));
        let mut versions: Vec<(&str, u32)> =
            checksums.iter().map(|c| (c.name, c.version)).collect();
        let listed = versions.len();
        versions.sort_unstable();
        versions.dedup();
        assert_eq!(
            versions.len(),
            listed,
            "a version listed twice: {checksums:?}"
        );
        for projection in ["timeline", "summary"] {
            let active = checksums
                .iter()
                .filter(|c| c.name == projection && c.role == VersionRole::Active)
                .count();
            assert_eq!(active, 1, "one active {projection}: {checksums:?}");
            let building = checksums
                .iter()
                .filter(|c| c.name == projection && c.role == VersionRole::Building)
                .count();
            assert!(
                building <= 1,
                "at most one building {projection}: {checksums:?}"
            );
        }
    }
    let versions = &store.projection_versions()[&Projection::Timeline];
    assert_eq!(
        versions.active,
        1 + u32::try_from(REBUILDS).unwrap_or_default()
    );
}
