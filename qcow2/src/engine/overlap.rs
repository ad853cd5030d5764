//! Overlap checks before every write (QEMU's default "cached" level): a write whose host
//! range would land on the header, the active or a snapshot's L1 table, an active L2 table,
//! the refcount table, a refcount block or the snapshot table — other than the structure
//! being written — means the metadata pointing there is corrupt. The write is refused, the
//! image is marked corrupt (so QEMU and we open it read-only from then on) and no further
//! writes are accepted.

use std::sync::atomic::Ordering;

use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::INCOMPAT_CORRUPT;
use crate::format::tables::OFFSET_MASK;
use crate::storage::Storage;

/// Refcount table entries keep the block offset in bits 9..63.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// What a write is meant to update; that structure itself is not an overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Guest data (or compressed guest data): nothing may be hit.
    Data,
    /// A new structure not referenced yet (a table being moved or grown).
    New,
    /// The active L1 table.
    L1,
    /// The active L2 table at this offset.
    L2(u64),
    /// The refcount table.
    RefTable,
    /// The refcount block at this offset.
    RefBlock(u64),
}

/// Host ranges of metadata that only snapshot operations change: the snapshot table and
/// the snapshots' L1 tables.
#[derive(Debug, Default)]
pub struct FixedMetadata {
    /// The snapshot table: (offset, length).
    pub snapshot_table: Option<(u64, u64)>,
    /// The snapshots' L1 tables: (offset, length).
    pub snapshot_l1s: Vec<(u64, u64)>,
}

impl Meta {
    /// The metadata structure, other than `target`, that `[offset, offset + len)` would
    /// overwrite, if any.
    pub fn overlap(&self, offset: u64, len: u64, target: Target) -> Option<&'static str> {
        let cs = self.geo.cluster_size();
        let end = offset.saturating_add(len);
        let hits = |start: u64, size: u64| start < end && offset < start.saturating_add(size);
        if hits(0, cs) {
            return Some("qcow2_header");
        }
        if target != Target::L1 && hits(self.header.l1_table_offset, self.l1.len() as u64 * 8) {
            return Some("active L1 table");
        }
        let reftable_len = u64::from(self.header.refcount_table_clusters) * cs;
        if target != Target::RefTable && hits(self.header.refcount_table_offset, reftable_len) {
            return Some("refcount table");
        }
        if let Some((start, size)) = self.fixed.snapshot_table {
            if hits(start, size) {
                return Some("snapshot table");
            }
        }
        if self.fixed.snapshot_l1s.iter().any(|&(s, n)| hits(s, n)) {
            return Some("inactive L1 table");
        }
        if self
            .l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .any(|l2| l2 != 0 && target != Target::L2(l2) && hits(l2, cs))
        {
            return Some("active L2 table");
        }
        if self.reftable[..self.reftable_used]
            .iter()
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .any(|b| b != 0 && target != Target::RefBlock(b) && hits(b, cs))
        {
            return Some("refcount block");
        }
        None
    }

    /// Fails, marking the image corrupt, if the write is refused (see the module docs).
    pub fn check_write(
        &mut self,
        file: &dyn Storage,
        offset: u64,
        len: u64,
        target: Target,
    ) -> Result<()> {
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(Error::WritesStopped);
        }
        match self.overlap(offset, len, target) {
            None => Ok(()),
            Some(what) => Err(self.mark_corrupt(file, what, offset, len)),
        }
    }

    /// Sets the corrupt bit (in memory and on disk) after a refused write and returns the
    /// error to report, in QEMU's words.
    pub fn mark_corrupt(&mut self, file: &dyn Storage, what: &str, offset: u64, len: u64) -> Error {
        tracing::warn!(
            "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps \
             with {what}) at host offset {offset:#x} ({len} bytes)"
        );
        self.set_corrupt_bit(file);
        Error::MarkedCorrupt(format!(
            "Preventing invalid write on metadata (overlaps with {what})"
        ))
    }

    /// Sets the corrupt bit, in memory and in the header (QEMU's qcow2_mark_corrupt): no
    /// more writes, and QEMU opens the image read-only until it is repaired.
    pub fn set_corrupt_bit(&mut self, file: &dyn Storage) {
        self.corrupt.store(true, Ordering::SeqCst);
        self.header.incompatible_features |= INCOMPAT_CORRUPT;
        if let Err(e) = self.write_header(file) {
            tracing::error!("qcow2: could not set the corrupt bit: {e}");
        }
    }
}

impl Qcow2 {
    /// Fails with [`Error::Corrupt`], marking the image corrupt, if `len` bytes of guest data
    /// at host `offset` would overwrite metadata, or if an earlier check already failed.
    pub(super) fn check_data_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.marked_corrupt.load(Ordering::SeqCst) {
            return Err(Error::WritesStopped);
        }
        if self.data_file.is_some() {
            return Ok(());
        }
        let Some(what) = self.meta().overlap(offset, len, Target::Data) else {
            return Ok(());
        };
        Err(self.meta_mut().mark_corrupt(&*self.file, what, offset, len))
    }
}
