//! A table is a key prefix in the store's one sled tree. Everything lives in one tree so that a
//! consumed batch (log appends, dedupe markers, projections, dead letters, positions, counters) is
//! one `apply_batch`: atomic, and several times cheaper than a multi-tree transaction.

use std::ops::Bound;

use sled::IVec;

/// One table: the tree and its one-byte prefix. Keys given to and returned by a table have no
/// prefix.
#[derive(Debug, Clone)]
pub struct Table {
    tree: sled::Tree,
    prefix: u8,
}

impl Table {
    #[must_use]
    pub fn new(tree: sled::Tree, prefix: u8) -> Self {
        Self { tree, prefix }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut prefixed = Vec::with_capacity(key.len() + 1);
        prefixed.push(self.prefix);
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

    /// Entries whose key starts with `prefix`, keys without the table prefix.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = sled::Result<(Vec<u8>, IVec)>> + use<> {
        self.tree.scan_prefix(self.key(prefix)).map(strip)
    }

    /// Entries in a key range, keys without the table prefix.
    pub fn range(
        &self,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
    ) -> impl Iterator<Item = sled::Result<(Vec<u8>, IVec)>> + use<> {
        self.tree
            .range((self.bound(start), self.bound(end)))
            .map(strip)
    }
}

fn strip(item: sled::Result<(IVec, IVec)>) -> sled::Result<(Vec<u8>, IVec)> {
    item.map(|(key, value)| (key.get(1..).unwrap_or_default().to_vec(), value))
}
