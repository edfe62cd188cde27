//! Records the topic's retention deleted while the projector runs, before it read them.
//!
//! A consumer whose next offset was deleted (a projector that fell further behind than the
//! retention allows) is moved by librdkafka to the oldest record left (`auto.offset.reset`),
//! silently: the records in between never reach the log. The projector notes, per partition, the
//! offset it reads next; a record further on is a gap, and the part of the gap below the
//! partition's oldest offset, asked of the broker once the gap is seen, was deleted unread. A gap
//! above the oldest offset is not a loss: transaction markers and aborted transactions of another
//! producer leave gaps that `read_committed` consumers never read.
//!
//! The loss is counted once the batch after the gap is applied, with the position past it: a
//! projector stopped or failing before that leaves its stored position before the gap, and the
//! next start counts the loss instead (`resume::check_position` finds records lost below a stored
//! position; the projector stores the position past them, then counts them, so that a later start
//! does not count them again). A process that dies between that write and its flush counts the
//! loss again at its next start.
//!
//! Limits: the oldest offset is asked after the gap is seen, and a consumer may hold up to
//! 20,000 records fetched ahead: if retention passes a transaction marker of another producer
//! within that read-ahead meanwhile, its offset is counted as lost (Touchline's own producer
//! writes no transactions). If the broker cannot be asked, the gap is logged and not counted.

use std::collections::BTreeMap;
use std::ops::Range;

/// The offset each partition's next record should have. It is told of the records past those
/// read again before a resume point (`resume::Rereads` drops those first).
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    expected: BTreeMap<i32, i64>,
}

impl Gaps {
    /// Starting from the positions the projector resumes at (partitions read from their start
    /// have none: their first record sets it).
    pub(crate) fn new(resume_at: &BTreeMap<i32, i64>) -> Self {
        Self {
            expected: resume_at.clone(),
        }
    }

    /// Notes the record at `offset` of `partition`: the offsets skipped before it, if any. A
    /// record below the expected offset (read again after a rewind) is followed from there on.
    pub(crate) fn observe(&mut self, partition: i32, offset: i64) -> Option<Range<i64>> {
        let expected = self.expected.insert(partition, offset.saturating_add(1))?;
        (offset > expected).then_some(expected..offset)
    }
}

/// Of the `skipped` offsets, how many were deleted before they were read: those below `oldest`,
/// the partition's oldest offset after the gap was seen (it only grows).
pub(crate) fn lost(skipped: &Range<i64>, oldest: i64) -> u64 {
    u64::try_from(oldest.min(skipped.end) - skipped.start).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_past_the_expected_offset_is_a_gap() {
        let mut gaps = Gaps::new(&BTreeMap::from([(0, 100)]));
        assert_eq!(gaps.observe(0, 100), None, "the resume point");
        assert_eq!(gaps.observe(0, 101), None);
        assert_eq!(gaps.observe(0, 150), Some(102..150));
        assert_eq!(gaps.observe(0, 151), None, "followed from the new offset");
        // A partition read from its start: its first record sets where it is.
        assert_eq!(gaps.observe(1, 40), None);
        assert_eq!(gaps.observe(1, 42), Some(41..42));
    }

    #[test]
    fn offsets_skipped_among_the_records_read_again_are_no_gap() {
        use super::super::resume::{Rereads, Resume};
        let mut rereads = Rereads::default();
        rereads.insert(
            0,
            Resume {
                fetch_from: 95,
                next: 100,
                lost: 0,
            },
        );
        let mut gaps = Gaps::new(&BTreeMap::from([(0, 100)]));
        // As the projector reads: records read again are dropped before the gaps are looked at.
        let mut observe = |offset| {
            if rereads.drop_reread(0, offset) {
                None
            } else {
                gaps.observe(0, offset)
            }
        };
        // Read again from 95 (applied before): a marker at 97 is skipped.
        assert_eq!(observe(95), None);
        assert_eq!(observe(96), None);
        assert_eq!(observe(98), None, "below the resume point");
        // A gap across the resume point counts from it.
        assert_eq!(observe(103), Some(100..103));
        assert_eq!(observe(105), Some(104..105));
    }

    #[test]
    fn a_record_read_again_is_no_gap_and_is_followed_from_there() {
        let mut gaps = Gaps::new(&BTreeMap::from([(0, 100)]));
        // The verified record before the resume point, read again.
        assert_eq!(gaps.observe(0, 99), None);
        assert_eq!(gaps.observe(0, 100), None);
        // A rewind (a wiped broker): offsets start again, and go on without gaps.
        assert_eq!(gaps.observe(0, 0), None);
        assert_eq!(gaps.observe(0, 1), None);
        assert_eq!(gaps.observe(0, 3), Some(2..3));
    }

    #[test]
    fn only_the_skipped_offsets_below_the_oldest_are_lost() {
        // Retention deleted everything up to the record read after the gap.
        assert_eq!(lost(&(100..5_000), 5_000), 4_900);
        // And more since: only the gap's offsets count, not records read before they went.
        assert_eq!(lost(&(100..5_000), 9_000), 4_900);
        // Part of the gap deleted, the rest aborted records or markers.
        assert_eq!(lost(&(100..5_000), 4_000), 3_900);
        // A transaction marker: nothing deleted.
        assert_eq!(lost(&(100..101), 20), 0);
        assert_eq!(lost(&(100..101), 100), 0);
    }
}
