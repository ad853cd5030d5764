//! A small cache of metadata tables (L2 tables, refcount blocks) keyed by host offset.
//!
//! Lookups take `&self` so the read path can use it under a shared lock: recency is an
//! atomic stamp. Insertion and eviction need `&mut self` (the engine's exclusive lock).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// One cached table.
#[derive(Debug)]
pub struct Entry<T> {
    /// The table contents.
    pub table: T,
    /// Modified since it was last written back.
    pub dirty: bool,
    last_used: AtomicU64,
}

/// A cache of tables with least-recently-used eviction.
#[derive(Debug)]
pub struct TableCache<T> {
    entries: HashMap<u64, Entry<T>>,
    capacity: usize,
    clock: AtomicU64,
}

impl<T> TableCache<T> {
    /// Drops every entry, dirty or not.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Creates a cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            entries: HashMap::new(),
            capacity: capacity.max(2),
            clock: AtomicU64::new(0),
        }
    }

    fn touch(&self, e: &Entry<T>) {
        e.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Returns the table at `offset` if cached.
    pub fn get(&self, offset: u64) -> Option<&T> {
        self.entries.get(&offset).map(|e| {
            self.touch(e);
            &e.table
        })
    }

    /// Returns the table at `offset` for modification and marks it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        let stamp = self.clock.fetch_add(1, Ordering::Relaxed);
        self.entries.get_mut(&offset).map(|e| {
            e.last_used.store(stamp, Ordering::Relaxed);
            e.dirty = true;
            &mut e.table
        })
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// Whether the cache is full, so an insert must first evict.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Inserts a table. The caller evicts first when [`TableCache::is_full`] (or, to insert
    /// several tables at once, lets the next insert do it).
    pub fn insert(&mut self, offset: u64, table: T, dirty: bool) {
        let e = Entry {
            table,
            dirty,
            last_used: AtomicU64::new(0),
        };
        self.touch(&e);
        self.entries.insert(offset, e);
    }

    /// The least recently used entry and its offset, left in the cache.
    pub fn lru(&self) -> Option<(u64, &Entry<T>)> {
        self.entries
            .iter()
            .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
            .map(|(&off, e)| (off, e))
    }

    /// Removes the least recently used entry, returning it with its offset.
    pub fn evict_lru(&mut self) -> Option<(u64, Entry<T>)> {
        let (victim, _) = self.lru()?;
        self.entries.remove(&victim).map(|e| (victim, e))
    }

    /// The offset of the least recently used clean entry, if any.
    pub fn lru_clean(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.dirty)
            .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
            .map(|(&offset, _)| offset)
    }

    /// Removes the table at `offset` (used when a table is freed).
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        self.entries.remove(&offset).map(|e| e.table)
    }

    /// Offsets of all dirty tables, sorted.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Marks the table at `offset` clean after it was written back.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_tracks_dirty() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", false);
        assert!(c.get(1).is_some());
        assert!(c.is_full());
        let (off, _) = c.evict_lru().unwrap();
        assert_eq!(off, 2);
        c.insert(3, "c", false);
        *c.get_mut(3).unwrap() = "d";
        assert_eq!(c.dirty_offsets(), vec![3]);
        c.mark_clean(3);
        assert!(c.dirty_offsets().is_empty());
        assert_eq!(c.get(3), Some(&"d"));
    }
}
