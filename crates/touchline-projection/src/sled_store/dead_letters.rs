//! Dead letters: records that could not be decoded (or events of customers the node does not
//! serve), kept once each with their reason, listed,
//! requeued (decoded again and appended) or discarded.

use super::*;

/// A Kafka record that could not be decoded or projected where it was read, kept with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub dead_lettered_at: UnixNanos,
}

impl DeadLetter {
    /// A stored dead letter of id `id` whose stored form does not decode: its stored bytes as its
    /// value, its place and time unknown (stream empty, partition and offset -1, time 0, which
    /// the admin API sends as none).
    #[must_use]
    pub fn corrupt(id: u64, stored: &[u8], error: &StoreError) -> Self {
        Self {
            id,
            stream: String::new(),
            partition: -1,
            offset: -1,
            reason: format!("the stored dead letter is damaged and cannot be read: {error}"),
            key: None,
            value: Some(stored.to_vec()),
            dead_lettered_at: UnixNanos(0),
        }
    }
}

/// The id a dead letter is stored under; `None` for a key of another length.
fn dead_letter_id(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// What a listing of dead letters does with one whose stored form does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Damaged {
    /// Listed as [`DeadLetter::corrupt`] (the admin API: the others stay reachable).
    Listed,
    /// The listing fails (a backup copies dead letters as they are stored, or not at all).
    Refused,
}

/// What requeueing a dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// The record now decodes and was appended to the log and projected.
    Appended { sequence: u64 },
    /// The record now decodes, but its event was already in the log.
    Duplicate,
}

impl SledStore {
    /// Records in the dead-letter store.
    #[must_use]
    pub fn dead_letter_count(&self) -> usize {
        usize::try_from(self.dead_letter_count.load(Ordering::Acquire)).unwrap_or(usize::MAX)
    }

    /// The oldest `limit` dead letters (see [`SledStore::dead_letter_page`]).
    ///
    /// # Errors
    /// When the backend fails.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_after(0, limit)
    }

    /// Up to `limit` dead letters with an id above `after`, oldest first (see
    /// [`SledStore::dead_letter_page`]).
    ///
    /// # Errors
    /// When the backend fails.
    pub fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letter_page(after, limit, usize::MAX)
    }

    /// Up to `limit` dead letters with an id above `after`, oldest first, stopping before the one
    /// that would take their stored size past `max_bytes` (the first one is always included): a
    /// page of large records stays within what a response can carry. A dead letter whose stored
    /// form does not decode (a damaged store) is listed as [`DeadLetter::corrupt`], so that the
    /// others can still be listed and it can be discarded.
    ///
    /// # Errors
    /// When the backend fails.
    pub fn dead_letter_page(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_between(after, u64::MAX, limit, max_bytes, Damaged::Listed)
    }

    /// [`SledStore::dead_letter_page`] of the ids above `after` and below `before`, with a
    /// damaged dead letter listed or refused as `damaged` says.
    pub(super) fn dead_letters_between(
        &self,
        after: u64,
        before: u64,
        limit: usize,
        max_bytes: usize,
        damaged: Damaged,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        use std::ops::Bound::Excluded;
        let mut page = Vec::new();
        let mut bytes = 0_usize;
        for item in self.dead_letters.range(
            Excluded(after.to_be_bytes().to_vec()),
            Excluded(before.to_be_bytes().to_vec()),
        ) {
            if page.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(backend)?;
            bytes = bytes.saturating_add(value.len());
            if !page.is_empty() && bytes > max_bytes {
                break;
            }
            page.push(match (decode("dead letter", &key, &value), damaged) {
                (Ok(dead_letter), _) => dead_letter,
                (Err(error), Damaged::Listed) => {
                    let Some(id) = dead_letter_id(&key) else {
                        // Not a key the store writes: no id to list it under, or discard it by.
                        tracing::error!(key = ?key, "a dead letter's key is not an id: left out");
                        continue;
                    };
                    DeadLetter::corrupt(id, &value, &error)
                }
                (Err(error), Damaged::Refused) => return Err(error),
            });
        }
        Ok(page)
    }

    /// `Err` while a backup reads its cut's dead letters (checked under the writer, which the cut
    /// takes too).
    fn no_backup_reading(&self) -> Result<(), OpsError> {
        if self
            .backup_readers
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
        {
            return Err(OpsError::BackupReading);
        }
        Ok(())
    }

    /// Decodes a dead letter again (a newer Touchline may understand it) and, when it decodes,
    /// appends it to the log and projects it, removing the dead letter in the same batch.
    ///
    /// # Errors
    /// [`OpsError::DeadLetterNotFound`], [`OpsError::StillUndecodable`] (nothing changes),
    /// [`OpsError::BackupReading`] (nothing changes), or a
    /// backend failure.
    pub fn requeue_dead_letter(&self, id: u64) -> Result<Requeued, OpsError> {
        let mut writer = self.lock_writer();
        self.no_backup_reading()?;
        let dead_letter = match self.dead_letter(id)? {
            Ok(dead_letter) => dead_letter,
            // Nothing to decode again: the stored form itself is damaged.
            Err((StoreError::Corrupt { reason, .. }, _)) => {
                return Err(OpsError::StillUndecodable {
                    id,
                    reason: format!(
                        "the stored dead letter is damaged and cannot be read: {reason}"
                    ),
                });
            }
            Err((other, _)) => return Err(other.into()),
        };
        let envelope =
            touchline_proto::decode_envelope(dead_letter.value.as_deref()).map_err(|error| {
                OpsError::StillUndecodable {
                    id,
                    reason: error.to_string(),
                }
            })?;
        let mut batch = sled::Batch::default();
        self.remove_dead_letter(&mut batch, &dead_letter);
        writer.dead_letters = writer.dead_letters.saturating_sub(1);
        self.meta.insert(
            &mut batch,
            DEAD_LETTER_COUNT,
            &writer.dead_letters.to_be_bytes(),
        );
        let record = ConsumedRecord {
            partition: dead_letter.partition,
            offset: dead_letter.offset,
            content: RecordContent::Event {
                envelope: Box::new(envelope),
                raw: dead_letter.value.clone().unwrap_or_default(),
            },
        };
        let sequence = writer.next_sequence;
        let result = self.apply_locked(
            &mut writer,
            &dead_letter.stream,
            vec![record],
            false,
            batch,
            Some(id),
        );
        if result.is_err() {
            writer.dead_letters += 1;
        }
        Ok(if result?.appended == 1 {
            Requeued::Appended { sequence }
        } else {
            Requeued::Duplicate
        })
    }

    /// Deletes a dead letter for good (also one whose stored form does not decode: it is
    /// returned as [`DeadLetter::corrupt`]).
    ///
    /// # Errors
    /// [`OpsError::DeadLetterNotFound`], [`OpsError::BackupReading`] (nothing changes) or a
    /// backend failure.
    pub fn discard_dead_letter(&self, id: u64) -> Result<DeadLetter, OpsError> {
        let mut writer = self.lock_writer();
        self.no_backup_reading()?;
        let dead_letter = self.dead_letter(id)?.unwrap_or_else(|(_, damaged)| damaged);
        let mut batch = sled::Batch::default();
        self.remove_dead_letter(&mut batch, &dead_letter);
        let remaining = writer.dead_letters.saturating_sub(1);
        self.meta
            .insert(&mut batch, DEAD_LETTER_COUNT, &remaining.to_be_bytes());
        self.write(batch, 2)?;
        writer.dead_letters = remaining;
        self.dead_letter_count.store(remaining, Ordering::Release);
        Ok(dead_letter)
    }

    /// The dead letter of id `id`; when its stored form does not decode, why, with it as
    /// [`DeadLetter::corrupt`].
    fn dead_letter(
        &self,
        id: u64,
    ) -> Result<Result<DeadLetter, (StoreError, DeadLetter)>, OpsError> {
        let key = id.to_be_bytes();
        let bytes = self
            .dead_letters
            .get(key)
            .map_err(backend)?
            .ok_or(OpsError::DeadLetterNotFound(id))?;
        Ok(decode("dead letter", &key, &bytes).map_err(|error| {
            let damaged = DeadLetter::corrupt(id, &bytes, &error);
            (error, damaged)
        }))
    }

    /// Removes the dead letter but keeps its index entry, so that reading the record again does
    /// not make it a dead letter again.
    fn remove_dead_letter(&self, batch: &mut sled::Batch, dead_letter: &DeadLetter) {
        self.dead_letters
            .remove(batch, dead_letter.id.to_be_bytes());
    }
}
