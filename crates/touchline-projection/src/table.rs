//! A table is a key prefix in the store's one sled tree. Everything lives in one tree so that a
//! consumed batch (log appends, dedupe markers, projections, dead letters, positions, counters) is
//! one `apply_batch`: atomic, and several times cheaper than a multi-tree transaction. A versioned
//! projection is one table per version (its prefix is the projection's byte and the version).

use std::ops::Bound;

use sled::IVec;
use touchline_core::StoreError;

/// One table: the tree and its one-byte prefix. Keys given to and returned by a table have no
/// prefix.
#[derive(Debug, Clone)]
pub struct Table {
    tree: sled::Tree,
    prefix: Vec<u8>,
}

impl Table {
    #[must_use]
    pub fn new(tree: sled::Tree, prefix: &[u8]) -> Self {
        Self {
            tree,
            prefix: prefix.to_vec(),
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut prefixed = Vec::with_capacity(key.len() + self.prefix.len());
        prefixed.extend_from_slice(&self.prefix);
        prefixed.extend_from_slice(key);
        prefixed
    }

    fn bound(&self, bound: Bound<Vec<u8>>) -> Bound<Vec<u8>> {
        match bound {
            Bound::Included(key) => Bound::Included(self.key(&key)),
            Bound::Excluded(key) => Bound::Excluded(self.key(&key)),
            Bound::Unbounded => Bound::Unbounded,
        }
    }

    /// # Errors
    /// When sled fails.
    pub fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree.get(self.key(key.as_ref()))
    }

    /// # Errors
    /// When sled fails.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> sled::Result<bool> {
        self.tree.contains_key(self.key(key.as_ref()))
    }

    /// Adds an insert of this table to `batch`.
    pub fn insert(&self, batch: &mut sled::Batch, key: impl AsRef<[u8]>, value: impl Into<IVec>) {
        batch.insert(self.key(key.as_ref()), value);
    }

    /// Inserts at once (outside any batch): for metadata that changes alone.
    ///
    /// # Errors
    /// When sled fails.
    pub fn insert_now(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> sled::Result<()> {
        self.tree.insert(self.key(key.as_ref()), value).map(|_| ())
    }

    /// Adds a removal of this table to `batch`.
    pub fn remove(&self, batch: &mut sled::Batch, key: impl AsRef<[u8]>) {
        batch.remove(self.key(key.as_ref()));
    }

    /// Entries whose key starts with `prefix`, keys without the table prefix.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = sled::Result<(Vec<u8>, IVec)>> + use<> {
        let skip = self.prefix.len();
        self.tree
            .scan_prefix(self.key(prefix))
            .map(move |item| strip(item, skip))
    }

    /// Deletes every entry of the table, `chunk` keys per atomic batch written with `write`;
    /// returns how many, or `None` when `stop` said to stop (checked between batches) before the
    /// table was empty.
    ///
    /// # Errors
    /// When sled fails to read or `write` fails; the entries deleted so far stay deleted.
    pub fn clear(
        &self,
        chunk: usize,
        stop: &dyn Fn() -> bool,
        write: &dyn Fn(sled::Batch, usize) -> Result<(), StoreError>,
    ) -> Result<Option<u64>, StoreError> {
        let mut deleted = 0;
        loop {
            if stop() {
                return Ok(None);
            }
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for item in self
                .tree
                .scan_prefix(&self.prefix)
                .keys()
                .take(chunk.max(1))
            {
                batch.remove(item.map_err(crate::error::backend)?);
                in_batch += 1;
            }
            if in_batch == 0 {
                return Ok(Some(deleted));
            }
            write(batch, usize::try_from(in_batch).unwrap_or(usize::MAX))?;
            deleted += in_batch;
        }
    }

    /// Entries in a key range, keys without the table prefix.
    pub fn range(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
    ) -> impl DoubleEndedIterator<Item = sled::Result<(Vec<u8>, IVec)>> + use<> {
        let skip = self.prefix.len();
        let (start, end) = match (start, end) {
            // Unbounded means the table's own bounds, not the tree's.
            (Bound::Unbounded, end) => (Bound::Included(self.prefix.clone()), self.bound(end)),
            (start, end) => (self.bound(start), self.bound(end)),
        };
        let end = match end {
            Bound::Unbounded => match prefix_end(&self.prefix) {
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            },
            bounded => bounded,
        };
        self.tree
            .range((start, end))
            .map(move |item| strip(item, skip))
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn strip(item: sled::Result<(IVec, IVec)>, skip: usize) -> sled::Result<(Vec<u8>, IVec)> {
    item.map(|(key, value)| (key.get(skip..).unwrap_or_default().to_vec(), value))
}
