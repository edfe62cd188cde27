//! The sled store on a temporary directory: atomic batches, dedupe, positions per stream, dead
//! letters, timeline order and pagination, log ranges per customer, and the property that delivery
//! order, duplication and crashes between batches do not change the projections.

#![allow(clippy::cast_possible_wrap, reason = "small test indices")]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;
use touchline_core::{
    ConsumedRecord, CustomerId, Envelope, EventStore as _, JourneyStage, PartnerId, RecordContent,
    TimelineCursor, TimelineEntry, TimelineFilter, TimelineQuery, UnixNanos,
};
use touchline_projection::SledStore;
use touchline_projection::sled_store::MAX_SCAN_PER_PAGE;

mod support;

use support::{envelope, record, stream};

fn open(dir: &tempfile::TempDir) -> SledStore {
    support::open_when_released(dir.path())
}

fn customer(id: &str) -> CustomerId {
    CustomerId::parse(id).expect("valid customer")
}

fn query(customer_id: &str, page_size: usize) -> TimelineQuery {
    TimelineQuery {
        customer_id: customer(customer_id),
        page_size,
        after: None,
        filter: TimelineFilter::default(),
        up_to_sequence: None,
    }
}

fn event_ids(store: &SledStore, query: &TimelineQuery) -> Vec<String> {
    store
        .timeline(query)
        .expect("timeline reads")
        .entries
        .iter()
        .map(|entry| entry.touchpoint.event_id.to_string())
        .collect()
}

/// A partition read again from its start within one batch (a broker that lost its records and
/// kept its cluster id: librdkafka starts again from the oldest offset) leaves the position after
/// its last record, with that record's fingerprint, in the store and in what the apply reports,
/// within a write piece and across two. Before, the highest offset of the batch was kept: the
/// store held a position that did not go with its fingerprint, and the projector reported it.
#[test]
fn a_rewind_within_a_batch_leaves_the_position_after_the_last_record() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let event = |id: &str| envelope("courier", id, "alice", 100, JourneyStage::Fulfil);
    // Within one piece of 32, then across pieces (offsets 68 to 99 fill the first).
    for (name, offsets) in [
        ("a", vec![98, 99, 0]),
        ("b", (68..=99).chain([0]).collect::<Vec<i64>>()),
    ] {
        let records = offsets
            .iter()
            .map(|offset| record(0, *offset, event(&format!("{name}-{offset}"))))
            .collect();
        let outcome = store.apply(&stream(name), records).expect("applies");
        assert_eq!(outcome.next_offsets, BTreeMap::from([(0, 1)]), "{name}");
        let positions = store.positions(&stream(name)).expect("reads");
        let last = touchline_proto::encode_envelope(&event(&format!("{name}-0")));
        assert_eq!(
            positions
                .get(&0)
                .map(|position| (position.next_offset, position.last_fingerprint)),
            Some((1, touchline_core::fingerprint(Some(&last)))),
            "{name}"
        );
    }
}

#[test]
fn a_batch_appends_projects_and_stores_its_positions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let outcome = store
        .apply(
            &stream("a"),
            vec![
                record(
                    0,
                    10,
                    envelope("courier", "e1", "alice", 300, JourneyStage::Fulfil),
                ),
                record(
                    1,
                    4,
                    envelope("retailer", "e2", "alice", 100, JourneyStage::Purchase),
                ),
                record(
                    0,
                    11,
                    envelope("retailer", "e3", "bob", 200, JourneyStage::Discover),
                ),
            ],
        )
        .expect("applies");
    assert_eq!(outcome.appended, 3);
    assert_eq!(outcome.next_offsets, BTreeMap::from([(0, 12), (1, 5)]));
    let positions = store.positions(&stream("a")).expect("reads");
    let next: BTreeMap<i32, i64> = positions
        .iter()
        .map(|(partition, position)| (*partition, position.next_offset))
        .collect();
    assert_eq!(next, BTreeMap::from([(0, 12), (1, 5)]));
    let last_on_0 = touchline_proto::encode_envelope(&envelope(
        "retailer",
        "e3",
        "bob",
        200,
        JourneyStage::Discover,
    ));
    assert_eq!(
        positions.get(&0).map(|p| p.last_fingerprint),
        Some(touchline_core::fingerprint(Some(&last_on_0))),
        "the fingerprint of the record before the position"
    );
    assert!(
        store.positions(&stream("b")).expect("reads").is_empty(),
        "positions belong to their stream"
    );
    assert_eq!(event_ids(&store, &query("alice", 10)), ["e2", "e1"]);
    let summary = store
        .summary(&customer("alice"))
        .expect("reads")
        .expect("alice has a summary");
    assert_eq!(summary.total, 2);
    assert_eq!(summary.current_stage(), JourneyStage::Fulfil);
    assert_eq!(store.log_len(), 3);
    let (partition, offset, raw) = store
        .log_record(1)
        .expect("reads")
        .expect("first log record");
    assert_eq!((partition, offset), (0, 10));
    assert_eq!(
        touchline_proto::decode_envelope(Some(&raw)).map(|e| e.touchpoint.event_id.to_string()),
        Ok("e1".to_owned())
    );
}

#[test]
fn a_batch_larger_than_one_write_is_stored_whole_in_order_with_every_position() {
    use touchline_projection::sled_store::RECORDS_PER_WRITE;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    // Several write pieces, two partitions, a duplicate in a later piece of an event in the first.
    let count = RECORDS_PER_WRITE * 3 + 5;
    let mut records: Vec<ConsumedRecord> = (0..count)
        .map(|index| {
            record(
                (index % 2) as i32,
                (index / 2) as i64,
                envelope(
                    "courier",
                    &format!("e{index}"),
                    &format!("cust-{}", index % 7),
                    index as i64,
                    JourneyStage::Fulfil,
                ),
            )
        })
        .collect();
    records.push(record(
        0,
        (count / 2 + 1) as i64,
        envelope("courier", "e0", "cust-0", 0, JourneyStage::Fulfil),
    ));
    let outcome = store.apply(&stream("a"), records).expect("applies");
    assert_eq!(outcome.appended, count as u64);
    assert_eq!(outcome.duplicates, 1, "deduplicated across write pieces");
    let expected_next = BTreeMap::from([(0, (count / 2 + 2) as i64), (1, (count / 2) as i64)]);
    assert_eq!(outcome.next_offsets, expected_next);
    let stored: BTreeMap<i32, i64> = store
        .positions(&stream("a"))
        .expect("reads")
        .into_iter()
        .map(|(partition, position)| (partition, position.next_offset))
        .collect();
    assert_eq!(
        stored, expected_next,
        "the last piece stored the last positions"
    );
    assert_eq!(store.log_len(), count);
    // Each write piece is one chunk of the log: every event is found in its own.
    for sequence in 1..=count as u64 {
        let (partition, offset, _) = store
            .log_record(sequence)
            .expect("reads")
            .expect("in the log");
        let index = sequence as usize - 1;
        assert_eq!(
            (partition, offset),
            ((index % 2) as i32, (index / 2) as i64)
        );
    }
    assert_eq!(store.log_record(count as u64 + 1).expect("reads"), None);
    let summary = store
        .summary(&customer("cust-3"))
        .expect("reads")
        .expect("has a summary");
    assert_eq!(
        summary.total,
        (0..count).filter(|index| index % 7 == 3).count() as u64
    );
}

/// Rewrites a store's chunked log (format 4) as format 3 wrote it: one key per event under `L`,
/// value partition, offset, record.
fn downgrade_to_format_3(db: &sled::Db) {
    let tree = db.open_tree("touchline").expect("tree");
    let chunks: Vec<(sled::IVec, sled::IVec)> = tree
        .scan_prefix(b"C")
        .collect::<Result<_, _>>()
        .expect("chunks read");
    for (key, value) in chunks {
        let mut sequence = u64::from_be_bytes(key[1..].try_into().expect("8-byte key"));
        let mut rest = &value[..];
        while !rest.is_empty() {
            let length = u32::from_be_bytes(rest[12..16].try_into().expect("length")) as usize;
            let mut old = rest[..12].to_vec();
            old.extend_from_slice(&rest[16..16 + length]);
            tree.insert([b"L".as_slice(), &sequence.to_be_bytes()].concat(), old)
                .expect("insert");
            rest = &rest[16 + length..];
            sequence += 1;
        }
        tree.remove(key).expect("remove");
    }
    tree.insert(b"Mformat", &3_u64.to_be_bytes())
        .expect("format");
    db.flush().expect("flush");
}

#[test]
fn a_format_3_store_is_migrated_on_open_and_keeps_every_event() {
    let dir = tempfile::tempdir().expect("temp dir");
    let count = 70;
    let events: Vec<ConsumedRecord> = (0..count)
        .map(|index| {
            record(
                0,
                index as i64,
                envelope(
                    "courier",
                    &format!("e{index}"),
                    "alice",
                    index as i64,
                    JourneyStage::Use,
                ),
            )
        })
        .collect();
    let checksum = {
        let store = open(&dir);
        store.apply(&stream("a"), events).expect("applies");
        store.flush().expect("flushes");
        store.log_checksum().expect("checksum")
    };
    downgrade_to_format_3(&support::when_released(|| sled::open(dir.path())));
    let store = open(&dir);
    assert_eq!(store.log_len(), count);
    assert_eq!(
        store.log_checksum().expect("checksum"),
        checksum,
        "the same events, chunked"
    );
    assert_eq!(
        store
            .log_record(42)
            .expect("reads")
            .map(|(_, offset, _)| offset),
        Some(41)
    );
    let more = record(
        0,
        count as i64,
        envelope("courier", "e-new", "alice", 1_000, JourneyStage::Use),
    );
    let again = record(
        0,
        count as i64 + 1,
        envelope("courier", "e3", "alice", 3, JourneyStage::Use),
    );
    let outcome = store
        .apply(&stream("a"), vec![more, again])
        .expect("applies");
    assert_eq!((outcome.appended, outcome.duplicates), (1, 1));
    assert_eq!(
        store
            .log_record(count as u64 + 1)
            .expect("reads")
            .map(|(_, offset, _)| offset),
        Some(count as i64)
    );
    assert_eq!(
        event_ids(&store, &query("alice", 200)).len(),
        count + 1,
        "the timeline is untouched"
    );
}

#[test]
fn duplicates_are_dropped_within_a_batch_across_batches_and_after_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let event = || envelope("courier", "e1", "alice", 100, JourneyStage::Fulfil);
    {
        let store = open(&dir);
        let outcome = store
            .apply(
                &stream("a"),
                vec![record(0, 0, event()), record(0, 1, event())],
            )
            .expect("applies");
        assert_eq!((outcome.appended, outcome.duplicates), (1, 1));
        let outcome = store
            .apply(&stream("a"), vec![record(0, 2, event())])
            .expect("applies");
        assert_eq!((outcome.appended, outcome.duplicates), (0, 1));
        store.flush().expect("flushes");
    }
    let store = open(&dir);
    // A new broker incarnation redelivers the same event: still once.
    let outcome = store
        .apply(&stream("b"), vec![record(0, 0, event())])
        .expect("applies");
    assert_eq!((outcome.appended, outcome.duplicates), (0, 1));
    // The same event id from another partner is another event.
    let outcome = store
        .apply(
            &stream("b"),
            vec![record(
                0,
                1,
                envelope("retailer", "e1", "alice", 100, JourneyStage::Purchase),
            )],
        )
        .expect("applies");
    assert_eq!(outcome.appended, 1);
    assert_eq!(store.log_len(), 2);
    assert_eq!(
        store
            .summary(&customer("alice"))
            .expect("reads")
            .map(|s| s.total),
        Some(2)
    );
    // Sequences continue after reopening.
    let sequences: Vec<u64> = store
        .timeline(&query("alice", 10))
        .expect("reads")
        .entries
        .iter()
        .map(|e| e.position.sequence)
        .collect();
    assert_eq!(
        sequences.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2])
    );
}

/// A partner that resends an event id with other content (another customer, time and stage)
/// gets the first one kept: the log is not rewritten (invariant 4), and nothing of the second
/// reaches the projections (invariant 3).
#[test]
fn an_event_resent_with_other_content_leaves_the_logged_one_as_it_was() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let first = envelope("courier", "e1", "alice", 100, JourneyStage::Fulfil);
    store
        .apply(&stream("a"), vec![record(0, 0, first.clone())])
        .expect("applies");
    let logged = store
        .log_entries(&customer("alice"), 0, u64::MAX)
        .expect("reads");
    let outcome = store
        .apply(
            &stream("a"),
            vec![record(
                0,
                1,
                envelope("courier", "e1", "bob", 200, JourneyStage::Purchase),
            )],
        )
        .expect("applies");
    assert_eq!((outcome.appended, outcome.duplicates), (0, 1));
    assert_eq!(store.log_len(), 1);
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].touchpoint, first.touchpoint);
    assert_eq!(
        store
            .log_entries(&customer("alice"), 0, u64::MAX)
            .expect("reads"),
        logged,
        "the logged event is as it was"
    );
    assert!(
        store
            .log_entries(&customer("bob"), 0, u64::MAX)
            .expect("reads")
            .is_empty()
    );
    assert_eq!(
        store.timeline(&query("alice", 10)).expect("reads").entries,
        logged
    );
    assert!(
        store
            .timeline(&query("bob", 10))
            .expect("reads")
            .entries
            .is_empty()
    );
    assert_eq!(store.summary(&customer("bob")).expect("reads"), None);
    let summary = store
        .summary(&customer("alice"))
        .expect("reads")
        .expect("a summary");
    assert_eq!(summary.total, 1);
}

#[test]
fn undecodable_records_become_dead_letters_and_the_partition_moves_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let garbage = ConsumedRecord {
        partition: 2,
        offset: 7,
        content: RecordContent::Undecodable {
            reason: "record value is not a protobuf envelope".to_owned(),
            key: Some(b"k".to_vec()),
            value: Some(vec![0xff]),
        },
    };
    let outcome = store
        .apply(
            &stream("a"),
            vec![
                garbage,
                record(
                    2,
                    8,
                    envelope("courier", "e1", "alice", 1, JourneyStage::Use),
                ),
            ],
        )
        .expect("applies");
    assert_eq!((outcome.appended, outcome.dead_lettered), (1, 1));
    assert_eq!(outcome.next_offsets.get(&2), Some(&9));
    let dead = store.dead_letters(10).expect("reads");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].partition, dead[0].offset, dead[0].reason.as_str()),
        (2, 7, "record value is not a protobuf envelope")
    );
    assert_eq!(store.log_len(), 1, "a dead letter is not in the log");
}

/// The page that `timeline_views` hands out (read without copying the entries' strings, what
/// `GetTimeline` serves) is `timeline`'s, entry for entry, field for field, with the same next
/// page.
fn same_views(store: &SledStore, query: &TimelineQuery) {
    let page = store.timeline(query).expect("reads");
    let expected: Vec<_> = page.entries.iter().map(TimelineEntry::view).collect();
    let mut viewed = 0;
    let next = store
        .timeline_views(query, &mut |view| {
            assert_eq!(Some(view), expected.get(viewed), "entry {viewed}");
            viewed += 1;
        })
        .expect("reads");
    assert_eq!(viewed, expected.len());
    assert_eq!(next, page.next);
}

#[test]
fn timelines_page_in_event_time_order_with_late_events_in_place_and_every_filter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let records = (0..25)
        .map(|i| {
            let stage = JourneyStage::ALL[i % JourneyStage::ALL.len()];
            let partner = if i % 2 == 0 { "courier" } else { "retailer" };
            // Arrival order is not event-time order: every third event is "late".
            let occurred_at = if i % 3 == 0 {
                1000 - i as i64
            } else {
                2000 + i as i64
            };
            let mut envelope = envelope(partner, &format!("e{i:02}"), "alice", occurred_at, stage);
            // Every field a stored entry can hold, for the views of it (`same_views`).
            let touchpoint = &mut envelope.touchpoint;
            if i % 4 == 1 {
                touchpoint.attributes = BTreeMap::from([
                    ("order".to_owned(), format!("o-{i}")),
                    ("note".to_owned(), String::new()),
                ]);
                touchpoint.payload = vec![i as u8; i];
            }
            if i % 5 == 0 {
                touchpoint.outcome = None;
            }
            record(0, i as i64, envelope)
        })
        .collect();
    store.apply(&stream("a"), records).expect("applies");
    let all = store.timeline(&query("alice", 100)).expect("reads");
    same_views(&store, &query("alice", 100));
    assert_eq!(all.entries.len(), 25);
    assert!(all.next.is_none());
    let order: Vec<_> = all.entries.iter().map(|e| e.timeline_order()).collect();
    assert!(
        order.windows(2).all(|pair| pair[0] < pair[1]),
        "event-time order"
    );
    assert_eq!(
        all.entries[0].touchpoint.event_id.as_str(),
        "e24",
        "the latest-arriving late event is first"
    );

    // Pages of 7 cover the timeline exactly once, in order.
    let mut paged = Vec::new();
    let mut page_query = query("alice", 7);
    loop {
        let page = store.timeline(&page_query).expect("reads");
        same_views(&store, &page_query);
        assert!(page.entries.len() <= 7);
        paged.extend(
            page.entries
                .iter()
                .map(|e| e.touchpoint.event_id.to_string()),
        );
        match page.next {
            Some(cursor) => page_query.after = Some(cursor),
            None => break,
        }
    }
    let everything: Vec<_> = all
        .entries
        .iter()
        .map(|e| e.touchpoint.event_id.to_string())
        .collect();
    assert_eq!(paged, everything);

    let filtered = |filter: TimelineFilter| {
        let query = TimelineQuery {
            filter,
            ..query("alice", 100)
        };
        same_views(&store, &query);
        store.timeline(&query).expect("reads").entries
    };
    let by_time = filtered(TimelineFilter {
        from: Some(UnixNanos(990)),
        to: Some(UnixNanos(2005)),
        ..TimelineFilter::default()
    });
    assert!(!by_time.is_empty());
    assert!(
        by_time
            .iter()
            .all(|e| (990..2005).contains(&e.touchpoint.occurred_at.0))
    );
    assert_eq!(
        by_time.len(),
        all.entries
            .iter()
            .filter(|e| (990..2005).contains(&e.touchpoint.occurred_at.0))
            .count()
    );
    let by_partner = filtered(TimelineFilter {
        partners: BTreeSet::from([PartnerId::parse("courier").expect("valid")]),
        ..TimelineFilter::default()
    });
    assert_eq!(by_partner.len(), 13);
    // Filtered pages that fill up: each ends after its last match, and the next page goes on
    // from there.
    let mut paged = Vec::new();
    let mut page_query = TimelineQuery {
        filter: TimelineFilter {
            partners: BTreeSet::from([PartnerId::parse("courier").expect("valid")]),
            ..TimelineFilter::default()
        },
        ..query("alice", 4)
    };
    loop {
        same_views(&store, &page_query);
        let page = store.timeline(&page_query).expect("reads");
        assert!(page.entries.len() <= 4);
        paged.extend(page.entries);
        match page.next {
            Some(cursor) => page_query.after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(paged, by_partner);
    assert!(
        by_partner
            .iter()
            .all(|e| e.partner_id.as_str() == "courier")
    );
    let by_stage = filtered(TimelineFilter {
        stages: BTreeSet::from([JourneyStage::Support]),
        ..TimelineFilter::default()
    });
    assert!(
        !by_stage.is_empty()
            && by_stage
                .iter()
                .all(|e| e.touchpoint.stage == JourneyStage::Support)
    );
    let by_type = filtered(TimelineFilter {
        event_types: BTreeSet::from(["use.seen".to_owned()]),
        ..TimelineFilter::default()
    });
    assert!(
        !by_type.is_empty()
            && by_type
                .iter()
                .all(|e| e.touchpoint.event_type.as_str() == "use.seen")
    );
    // A cursor past the end gives an empty last page.
    let after_end = TimelineQuery {
        after: Some(TimelineCursor {
            occurred_at: UnixNanos(i64::MAX),
            sequence: u64::MAX,
        }),
        ..query("alice", 10)
    };
    assert!(
        store
            .timeline(&after_end)
            .expect("reads")
            .entries
            .is_empty()
    );
    assert!(
        store
            .timeline(&query("nobody", 10))
            .expect("reads")
            .entries
            .is_empty()
    );
}

#[test]
fn a_sequence_bound_hides_later_entries_and_still_fills_pages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let fulfil = JourneyStage::Fulfil;
    store
        .apply(
            &stream("a"),
            vec![
                record(0, 0, envelope("courier", "e1", "alice", 100, fulfil)),
                record(0, 1, envelope("courier", "e2", "alice", 300, fulfil)),
            ],
        )
        .expect("applies");
    // Not flushed yet: nothing is durable, so a durable read shows nothing.
    let durable = |store: &SledStore| TimelineQuery {
        up_to_sequence: Some(store.durable_sequence()),
        ..query("alice", 10)
    };
    assert_eq!(store.durable_sequence(), 0);
    assert!(event_ids(&store, &durable(&store)).is_empty());
    store.flush().expect("flushes");
    assert_eq!(event_ids(&store, &durable(&store)), ["e1", "e2"]);

    // Sequences 3 and 4: a late event between the two, and a later one.
    store
        .apply(
            &stream("a"),
            vec![
                record(0, 2, envelope("courier", "e3", "alice", 200, fulfil)),
                record(0, 3, envelope("courier", "e4", "alice", 400, fulfil)),
            ],
        )
        .expect("applies");
    assert_eq!(
        event_ids(&store, &query("alice", 10)),
        ["e1", "e3", "e2", "e4"]
    );
    assert_eq!(event_ids(&store, &durable(&store)), ["e1", "e2"]);
    // Pages of one skip the hidden entry and still hold one entry each, up to the bound.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .timeline(&TimelineQuery {
                after,
                up_to_sequence: Some(2),
                ..query("alice", 1)
            })
            .expect("reads");
        paged.extend(
            page.entries
                .iter()
                .map(|e| e.touchpoint.event_id.to_string()),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, ["e1", "e2"]);
    store.flush().expect("flushes");
    assert_eq!(store.durable_sequence(), 4);
    assert_eq!(
        event_ids(&store, &durable(&store)),
        ["e1", "e3", "e2", "e4"]
    );
}

/// A page that ends at the scan limit inside entries applied but not yet durable ends before
/// them: paged again once they are flushed, they come in their place (its token pointed past them,
/// and a client paging on never saw them).
#[test]
fn a_page_that_ends_at_the_scan_limit_resumes_before_entries_not_yet_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let fulfil = JourneyStage::Fulfil;
    let durable_events = 20_usize;
    let events = |range: std::ops::Range<usize>| -> Vec<_> {
        range
            .map(|number| {
                let at = i64::try_from(number).unwrap_or_default();
                let offset = i64::try_from(number).unwrap_or_default();
                record(
                    0,
                    offset,
                    envelope("courier", &format!("e{number}"), "alice", at, fulfil),
                )
            })
            .collect()
    };
    store
        .apply(&stream("a"), events(0..durable_events))
        .expect("applies");
    store.flush().expect("flushes");
    // More than a page scans, after them in time, applied and not flushed.
    let total = durable_events + MAX_SCAN_PER_PAGE + 100;
    store
        .apply(&stream("a"), events(durable_events..total))
        .expect("applies");

    let page = |after, up_to| {
        store
            .timeline(&TimelineQuery {
                after,
                up_to_sequence: Some(up_to),
                ..query("alice", 1000)
            })
            .expect("reads")
    };
    let first = page(None, store.durable_sequence());
    assert_eq!(first.entries.len(), durable_events);
    let last_durable = first.entries.last().map(|entry| TimelineCursor {
        occurred_at: entry.touchpoint.occurred_at,
        sequence: entry.position.sequence,
    });
    assert_eq!(
        first.next, last_durable,
        "resumes after the last durable entry"
    );

    store.flush().expect("flushes");
    let mut seen = first.entries.len();
    let mut after = first.next;
    while let Some(cursor) = after {
        let next = page(Some(cursor), store.durable_sequence());
        seen += next.entries.len();
        after = next.next;
    }
    assert_eq!(seen, total, "every entry, once flushed");
}

/// Per customer: summary total and timeline as (occurred_at, partner, event id).
type Observed = BTreeMap<String, (u64, Vec<(i64, String, String)>)>;

/// A clean fold: every distinct (partner, event id), applied once in one batch.
fn clean_projection(events: &[Envelope]) -> Observed {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let mut seen = HashSet::new();
    let unique: Vec<_> = events
        .iter()
        .filter(|e| seen.insert((e.partner_id.clone(), e.touchpoint.event_id.clone())))
        .enumerate()
        .map(|(offset, e)| record(0, offset as i64, e.clone()))
        .collect();
    store.apply(&stream("clean"), unique).expect("applies");
    snapshot(&store, events)
}

/// What a client can observe: per customer the summary total and the timeline as
/// (occurred_at, partner, event id), ignoring sequence numbers, which depend on arrival order.
fn snapshot(store: &SledStore, events: &[Envelope]) -> Observed {
    let customers: BTreeSet<_> = events
        .iter()
        .map(|e| e.touchpoint.customer_id.to_string())
        .collect();
    customers
        .into_iter()
        .map(|id| {
            let summary = store
                .summary(&customer(&id))
                .expect("reads")
                .expect("summary exists");
            let mut timeline: Vec<_> = store
                .timeline(&query(&id, 1000))
                .expect("reads")
                .entries
                .iter()
                .map(|e| {
                    (
                        e.touchpoint.occurred_at.0,
                        e.partner_id.to_string(),
                        e.touchpoint.event_id.to_string(),
                    )
                })
                .collect();
            let times: Vec<_> = timeline.iter().map(|t| t.0).collect();
            assert!(
                times.windows(2).all(|pair| pair[0] <= pair[1]),
                "event-time order"
            );
            timeline.sort();
            (id, (summary.total, timeline))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any arrival order, any duplication, batches of any size and a restart (the store dropped
    /// and reopened; sled flushes as it is dropped, so this is no crash: `dev_crash.rs` and
    /// `serve_crash.rs` kill the process) between any two batches give the projection of a clean
    /// fold.
    #[test]
    fn order_duplication_and_restarts_do_not_change_the_projection(
        specs in prop::collection::vec((0..2_usize, 0..30_u32), 1..40),
        redeliveries in prop::collection::vec(any::<prop::sample::Index>(), 0..15),
        batch_sizes in prop::collection::vec(1..8_usize, 1..10),
        crash_after in prop::collection::vec(any::<bool>(), 1..10),
    ) {
        let events: Vec<Envelope> = specs
            .iter()
            .map(|(partner, event)| {
                // A resent event carries the same content, so content follows from the identity.
                let customer = (*event as usize + partner) % 3;
                let time = i64::from(*event % 7) * 10 + *partner as i64;
                envelope(["courier", "retailer"][*partner], &format!("e{event}"), &format!("c{customer}"), time, JourneyStage::Use)
            })
            .collect();
        let clean = clean_projection(&events);

        let mut deliveries = events.clone();
        deliveries.extend(redeliveries.iter().map(|index| index.get(&events).clone()));
        deliveries.reverse();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(&dir);
        let mut offset = 0_i64;
        let mut remaining = deliveries.as_slice();
        let mut round = 0;
        while !remaining.is_empty() {
            let size = batch_sizes[round % batch_sizes.len()].min(remaining.len());
            let (batch, rest) = remaining.split_at(size);
            let records = batch.iter().map(|e| { offset += 1; record(0, offset, e.clone()) }).collect();
            store.apply(&stream("s"), records).expect("applies");
            if crash_after[round % crash_after.len()] {
                drop(store);
                store = open(&dir);
            }
            remaining = rest;
            round += 1;
        }
        prop_assert_eq!(snapshot(&store, &events), clean);
    }
}

#[test]
fn log_entries_are_the_timeline_entries_of_a_log_range_in_log_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let mut with_attributes = envelope("courier", "e1", "alice", 300, JourneyStage::Fulfil);
    with_attributes
        .touchpoint
        .attributes
        .insert("order".to_owned(), "o-1".to_owned());
    store
        .apply(
            &stream("a"),
            vec![
                record(0, 0, with_attributes),
                record(
                    0,
                    1,
                    envelope("courier", "e2", "bob", 100, JourneyStage::Fulfil),
                ),
                record(
                    1,
                    0,
                    envelope("retailer", "e3", "alice", 100, JourneyStage::Purchase),
                ),
                record(
                    1,
                    1,
                    envelope("retailer", "e4", "alice", 200, JourneyStage::Purchase),
                ),
            ],
        )
        .expect("applies");
    let timeline = store.timeline(&query("alice", 10)).expect("reads").entries;
    let all = store
        .log_entries(&customer("alice"), 1, 5)
        .expect("reads the log");
    assert_eq!(
        all.iter()
            .map(|entry| entry.position.sequence)
            .collect::<Vec<_>>(),
        [1, 3, 4],
        "alice's events, in log order"
    );
    let mut sorted = all;
    sorted.sort_by_key(touchline_core::TimelineEntry::timeline_order);
    assert_eq!(sorted, timeline, "the same entries the timeline holds");
    let range = store
        .log_entries(&customer("alice"), 2, 4)
        .expect("reads the log");
    assert_eq!(
        range
            .iter()
            .map(|entry| entry.position.sequence)
            .collect::<Vec<_>>(),
        [3],
        "only sequences in from..end"
    );
    assert!(
        store
            .log_entries(&customer("carol"), 1, 5)
            .expect("reads the log")
            .is_empty()
    );
}

/// What a resuming watcher holds: the last timeline position among the entries up to its cursor,
/// found by reading back from the timeline's end, and no further than a page's scan (then the
/// position of the last entry read, which is after what the watcher holds).
#[test]
fn the_latest_held_position_is_read_back_from_the_end_within_a_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let events = i64::try_from(MAX_SCAN_PER_PAGE).expect("fits") + 5;
    // Sequence n (from 1) occurred at n: timeline order is log order.
    let records = (0..events)
        .map(|offset| {
            let event = format!("e{offset}");
            record(
                0,
                offset,
                envelope("courier", &event, "alice", offset + 1, JourneyStage::Fulfil),
            )
        })
        .collect();
    store.apply(&stream("a"), records).expect("applies");
    let alice = customer("alice");
    let held = |sequence| {
        store
            .latest_held(&alice, sequence)
            .expect("reads")
            .map(|cursor| cursor.sequence)
    };
    assert_eq!(
        held(events.cast_unsigned() + 7),
        Some(events.cast_unsigned())
    );
    assert_eq!(held(10), Some(10), "within the bound: the entry itself");
    assert_eq!(held(5), Some(6), "past the bound: the last entry read");
    assert_eq!(held(0), Some(6));
    assert_eq!(
        store.latest_held(&customer("bob"), 10).expect("reads"),
        None
    );
}

/// Pages of large events end early, with a cursor, whatever page size was asked for: an answer
/// stays under what gRPC clients accept by default, and paging still returns every entry once.
#[test]
fn pages_of_large_events_end_early_and_paging_returns_every_entry_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let records: Vec<ConsumedRecord> = (0..200)
        .map(|i| {
            let mut event = envelope(
                "courier",
                &format!("big-{i:03}"),
                "alice",
                i64::from(i),
                JourneyStage::Fulfil,
            );
            event.touchpoint.payload = vec![7; 16 * 1024];
            record(0, i64::from(i), event)
        })
        .collect();
    store.apply(&stream("a"), records).expect("applies");
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .timeline(&TimelineQuery {
                after,
                ..query("alice", 1000)
            })
            .expect("reads");
        pages.push(
            page.entries
                .iter()
                .map(|entry| entry.touchpoint.event_id.to_string())
                .collect::<Vec<_>>(),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let max = touchline_projection::MAX_PAGE_BYTES / (16 * 1024);
    assert!(
        pages.len() >= 2,
        "200 events of 16 KiB are more than one page"
    );
    assert!(
        pages
            .iter()
            .all(|page| !page.is_empty() && page.len() <= max + 1),
        "each page holds at most about {} bytes: {:?}",
        touchline_projection::MAX_PAGE_BYTES,
        pages.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let all: Vec<String> = pages.concat();
    let expected: Vec<String> = (0..200).map(|i| format!("big-{i:03}")).collect();
    assert_eq!(all, expected, "every entry once, in order");
}

/// A store draws its log identity once: it stays across reopening, and another store has
/// another one (watch cursors name the log whose sequence they hold).
#[test]
fn the_log_identity_is_drawn_once_and_differs_between_stores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = open(&dir).log_id();
    assert_ne!(first, 0);
    assert_eq!(open(&dir).log_id(), first, "the same after reopening");
    let other = tempfile::tempdir().expect("temp dir");
    assert_ne!(open(&other).log_id(), first);
}

/// The log sequence of an event, from its dedupe marker: what a dev-mode acknowledgement waits to
/// be durable.
#[test]
fn an_events_sequence_is_found_by_partner_and_event_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    store
        .apply(
            &stream("a"),
            vec![
                record(
                    0,
                    0,
                    envelope("courier", "e1", "alice", 10, JourneyStage::Fulfil),
                ),
                record(
                    0,
                    1,
                    envelope("courier", "e2", "alice", 20, JourneyStage::Fulfil),
                ),
            ],
        )
        .expect("applies");
    let courier = PartnerId::parse("courier").expect("valid");
    let event = |id: &str| touchline_core::EventId::parse(id.to_owned()).expect("valid");
    assert_eq!(
        store.event_sequence(&courier, &event("e2")).expect("reads"),
        Some(2)
    );
    assert_eq!(
        store.event_sequence(&courier, &event("e1")).expect("reads"),
        Some(1)
    );
    assert_eq!(
        store.event_sequence(&courier, &event("e3")).expect("reads"),
        None
    );
    let other = PartnerId::parse("retailer").expect("valid");
    assert_eq!(
        store.event_sequence(&other, &event("e1")).expect("reads"),
        None
    );
}

/// A backup's frame of events (up to 128 MiB of them) is decoded and applied in pieces, not
/// whole: thousands restore with their sequences, and an event there twice is found across
/// pieces.
#[test]
fn a_frame_of_events_restores_in_pieces_and_a_duplicate_across_them_is_found() {
    use touchline_projection::sled_store::{LoggedEvent, RestoreError};
    let logged = |index: usize, id: usize| LoggedEvent {
        partition: 0,
        offset: i64::try_from(index).expect("small"),
        record: touchline_proto::encode_envelope(&envelope(
            "partner",
            &format!("e{id}"),
            &format!("customer-{}", index % 7),
            i64::try_from(index).expect("small"),
            JourneyStage::Fulfil,
        )),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    store
        .restore_events(1, (0..2500).map(|index| logged(index, index)).collect())
        .expect("restored");
    assert_eq!(store.log_len(), 2500);
    assert_eq!(
        store
            .log_record(2500)
            .expect("reads")
            .map(|(_, offset, _)| offset),
        Some(2499)
    );

    let other = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(other.path()).expect("opens");
    let mut events: Vec<LoggedEvent> = (0..2500).map(|index| logged(index, index)).collect();
    // Event 5 again, in the third piece.
    events[2100] = logged(2100, 5);
    let error = store.restore_events(1, events).expect_err("a duplicate");
    assert!(
        matches!(
            error,
            RestoreError::Duplicate {
                first: 2001,
                last: 2500
            }
        ),
        "{error:?}"
    );
}

/// Events of many small fields take tens of times their size once decoded: a restore decodes them
/// in pieces of at most `MAX_DECODED_PART_BYTES` as the projector estimates it, fewer than 1,000
/// events when they are large (a duplicate is reported within its piece).
#[test]
fn a_frame_of_large_events_restores_in_pieces_of_bounded_decoded_size() {
    use touchline_projection::projector::MAX_DECODED_PART_BYTES;
    use touchline_projection::sled_store::{LoggedEvent, RestoreError};
    let logged = |index: usize, id: usize| {
        let mut event = envelope(
            "partner",
            &format!("e{id}"),
            &format!("customer-{}", index % 7),
            i64::try_from(index).expect("small"),
            JourneyStage::Fulfil,
        );
        event.touchpoint.attributes = (0..1_000)
            .map(|attribute| (format!("a{attribute}"), "v".to_owned()))
            .collect();
        LoggedEvent {
            partition: 0,
            offset: i64::try_from(index).expect("small"),
            record: touchline_proto::encode_envelope(&event),
        }
    };
    let estimate = touchline_proto::codec::decoded_envelope_bytes(&logged(0, 0).record);
    let per_piece = u64::try_from(MAX_DECODED_PART_BYTES / estimate).expect("small");
    assert!(per_piece < 1_000, "large events: {estimate} bytes each");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("opens");
    let mut events: Vec<LoggedEvent> = (0..1_000).map(|index| logged(index, index)).collect();
    // Event 5 again, in the third piece.
    let third = usize::try_from(2 * per_piece).expect("small");
    events[third] = logged(third, 5);
    let error = store.restore_events(1, events).expect_err("a duplicate");
    assert!(
        matches!(
            error,
            RestoreError::Duplicate { first, last }
                if first == 2 * per_piece + 1 && last == (3 * per_piece).min(1_000)
        ),
        "{error:?} (pieces of {per_piece})"
    );
}
