//! The engine's metadata state: L1 table, L2 cache, refcount structures, and the cluster
//! allocator. Everything here runs under the engine's exclusive lock, except lookups.
//!
//! Crash-consistency rules (see `writeback`):
//! 1. refcount increments (and new refcount blocks, before the table that points to them)
//!    are durable before any L2/L1 entry that references the new cluster;
//! 2. guest data is durable before the L2 entry that maps it (same barrier as rule 1);
//! 3. a new L2 table is durable before the L1 entry that points at it (a barrier between
//!    them, only when the L1 table changed);
//! 4. refcount decrements are applied only after the L2/L1 updates that dropped the
//!    reference are durable, so a crash leaks clusters but never frees one in use.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::header::{Header, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::format::tables::{self, OFFSET_MASK};
use crate::storage::Storage;

use super::cache::TableCache;
use super::overlap::{FixedMetadata, Target};

/// Geometry derived from the header, fixed while the image is open.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// log2 refcount width.
    pub refcount_order: u32,
    /// Extended L2 entries: 128 bits, 32 subclusters per cluster.
    pub extended_l2: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// 64-bit words per L2 entry: 2 with extended L2 entries (entry and bitmap), else 1.
    pub fn l2_words(&self) -> u64 {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8 / self.l2_words()
    }
    /// Subclusters per cluster (1 without extended L2 entries).
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2 {
            crate::format::tables::SUBCLUSTERS
        } else {
            1
        }
    }
    /// Bytes of the unit reads and writes are mapped in: the subcluster (the cluster
    /// without extended L2 entries).
    pub fn unit_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }
    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
}

/// Mutable metadata of an open qcow2 image.
pub struct Meta {
    /// Current header (written back when it changes).
    pub header: Header,
    /// The external data file, if any: synced before L2 entries that map into it are written.
    pub data_file: Option<Arc<dyn Storage>>,
    /// Claim file space for new metadata when it is allocated (see [`Meta::claim_space`]).
    pub claims_space: bool,
    /// Clusters freed by the pending frees of a writeback get their file space released
    /// (`OpenOptions::unmap`).
    pub unmap: bool,
    /// The file's length when last asked: tables below it need no new `stat` to be checked
    /// against the end of the file. (Stale after a truncation, a table past the real end
    /// then fails its read instead.)
    pub file_len_seen: u64,
    /// Tables past the end of the file read as zeros, as QEMU reads them (read-only opens;
    /// a writer would write there and refuses them as corrupt).
    pub tables_past_eof_read_as_zeros: bool,
    /// Geometry.
    pub geo: Geometry,
    /// Active L1 table, host-endian.
    pub l1: Vec<u64>,
    /// L1 entries changed since the last writeback.
    pub l1_dirty: bool,
    /// Cache of L2 table slices keyed by host offset (see `l2.rs`).
    pub l2: TableCache<Vec<u64>>,
    /// Refcount table, host-endian.
    pub reftable: Vec<u64>,
    /// Refcount table changed since the last writeback.
    pub reftable_dirty: bool,
    /// Entries of the refcount table past this index are zero (bounds overlap checks).
    pub reftable_used: usize,
    /// Cache of refcount blocks keyed by host offset.
    pub refblocks: TableCache<Vec<u8>>,
    /// Refcount decrements waiting for the L2 updates that justify them: (cluster offset, n).
    pub pending_frees: Vec<(u64, u64)>,
    /// Cluster index where the next free-cluster search starts.
    pub free_hint: u64,
    /// Next free byte in the cluster being filled with compressed data.
    pub compressed_tail: Option<u64>,
    /// Snapshot metadata (moved only by snapshot operations), for overlap checks.
    pub fixed: FixedMetadata,
    /// Set once an overlap check marked the image corrupt (shared with the lock-free paths).
    pub corrupt: Arc<AtomicBool>,
    /// The image has lazy refcounts and is open for writing (see `writeback`).
    pub lazy_refcounts: bool,
    /// Bumped whenever L2 slices are written back or tables freed, so that a slice read
    /// without the lock (by an io_uring ring) is only cached if nothing changed meanwhile.
    pub l2_generation: u64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Reads a table of big-endian u64 entries.
pub fn read_u64_table(file: &dyn Storage, offset: u64, entries: usize) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; entries * 8];
    file.read_at(&mut buf, offset)
        .map_err(io(format!("reading table at 0x{offset:x}")))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// How many leading entries of a table hold every nonzero one.
pub fn used_entries(table: &[u64]) -> usize {
    table.iter().rposition(|&e| e != 0).map_or(0, |i| i + 1)
}

/// Encodes a table of u64 entries big-endian.
pub fn encode_u64_table(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|v| v.to_be_bytes()).collect()
}

impl Meta {
    /// Checks that a metadata table offset is cluster aligned and, unless such tables read
    /// as zeros, inside the file.
    pub fn check_table_offset(&self, what: &str, offset: u64, file_len: u64) -> Result<()> {
        if offset % self.geo.cluster_size() != 0 {
            return Err(Error::Corrupt(format!(
                "{what} offset 0x{offset:x} is not cluster aligned"
            )));
        }
        let end = offset.saturating_add(self.geo.cluster_size());
        if !self.tables_past_eof_read_as_zeros
            && end > file_len.next_multiple_of(self.geo.cluster_size())
        {
            return Err(Error::Corrupt(format!(
                "{what} offset 0x{offset:x} is past the end of the file (0x{file_len:x})"
            )));
        }
        Ok(())
    }

    /// Evicts slices until one more fits: the least recently used clean one, or when all
    /// are dirty, the least recently used after writing dirty metadata back. (Dirty slices
    /// wait for the next flush; and after a failed sync, when no writeback can succeed,
    /// lookups that miss the cache still work.)
    pub fn make_room_l2(&mut self, file: &dyn Storage) -> Result<()> {
        while self.l2.is_full() {
            if let Some(clean) = self.l2.lru_clean() {
                self.l2.remove(clean);
                continue;
            }
            self.writeback(file)?;
            self.l2.evict_lru();
        }
        Ok(())
    }

    /// Points refcount table entry `r` at a refcount block (0: none).
    pub fn set_reftable_entry(&mut self, r: usize, block: u64) {
        self.reftable[r] = block;
        self.reftable_dirty = true;
        if block != 0 {
            self.reftable_used = self.reftable_used.max(r + 1);
        }
    }

    /// Installs a refcount table that is already on disk.
    pub fn replace_reftable(&mut self, table: Vec<u64>) {
        self.reftable_used = used_entries(&table);
        self.reftable = table;
        self.reftable_dirty = false;
    }

    /// Host offset of the refcount block holding `cluster`'s refcount, if there is one; an
    /// unaligned one is corruption, in QEMU's words.
    pub fn refblock_offset(&self, cluster: u64) -> Result<Option<u64>> {
        let r = cluster / self.geo.refblock_entries();
        let block = self.reftable.get(r as usize).map_or(0, |e| e & !0x1ff);
        if block % self.geo.cluster_size() != 0 {
            return Err(Error::UnalignedTable(format!(
                "Refblock offset {block:#x} unaligned (reftable index: {})",
                super::c_hex(r)
            )));
        }
        Ok(Some(block).filter(|&off| off != 0))
    }

    fn load_refblock(&mut self, file: &dyn Storage, offset: u64) -> Result<()> {
        if self.refblocks.contains(offset) {
            return Ok(());
        }
        let len = file.len().map_err(io("getting file size".into()))?;
        self.check_table_offset("refcount block", offset, len)?;
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        file.read_at(&mut block, offset)
            .map_err(io(format!("reading refcount block at 0x{offset:x}")))?;
        while self.refblocks.is_full() {
            let Some((off, dirty)) = self.refblocks.lru().map(|(off, e)| (off, e.dirty)) else {
                break;
            };
            // Written while still cached: if the write fails, its updates are not lost.
            if dirty {
                let len = self.geo.cluster_size();
                self.check_write(file, off, len, Target::RefBlock(off))?;
                let table = self.refblocks.get(off).expect("cached");
                file.write_at(table, off)
                    .map_err(io(format!("writing refcount block at 0x{off:x}")))?;
            }
            self.refblocks.remove(off);
        }
        self.refblocks.insert(offset, block, false);
        Ok(())
    }

    /// Refcount of host cluster index `cluster`.
    pub fn refcount(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let Some(block) = self.refblock_offset(cluster)? else {
            return Ok(0);
        };
        self.load_refblock(file, block)?;
        let idx = (cluster % self.geo.refblock_entries()) as usize;
        let b = self.refblocks.get(block).expect("just loaded");
        Ok(tables::get_refcount(b, self.geo.refcount_order, idx))
    }

    /// Sets the refcount of a cluster whose refcount block exists.
    fn set_refcount(&mut self, file: &dyn Storage, cluster: u64, value: u64) -> Result<()> {
        if value > tables::max_refcount(self.geo.refcount_order) {
            return Err(Error::RefcountOverflow {
                cluster,
                bits: 1 << self.geo.refcount_order,
            });
        }
        let block = self
            .refblock_offset(cluster)?
            .ok_or_else(|| Error::Corrupt(format!("no refcount block for cluster {cluster}")))?;
        self.load_refblock(file, block)?;
        let idx = (cluster % self.geo.refblock_entries()) as usize;
        let order = self.geo.refcount_order;
        let b = self.refblocks.get_mut(block).expect("just loaded");
        tables::set_refcount(b, order, idx, value);
        Ok(())
    }

    /// Adds `delta` to the refcount of every cluster touched by `[offset, offset + len)`.
    pub fn add_refcount(
        &mut self,
        file: &dyn Storage,
        offset: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        for c in first..=last {
            let rc = self.refcount(file, c)?;
            let new = rc.checked_add_signed(delta).ok_or_else(|| {
                Error::RefcountUnderflow(format!(
                    "refcount of cluster at 0x{:x} is {rc}, cannot add {delta}",
                    c * cs
                ))
            })?;
            self.set_refcount(file, c, new)?;
            if new == 0 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Releases the file space of the clusters of `[offset, offset + len)` whose refcount is
    /// 0 (a hole punched; file systems without holes keep the space).
    fn release_unreferenced(&mut self, file: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut run: Option<(u64, u64)> = None;
        for c in offset / cs..=(offset + len - 1) / cs {
            if self.refcount(file, c)? == 0 {
                match &mut run {
                    Some((_, end)) if *end == c => *end += 1,
                    _ => {
                        release(file, run.take(), cs);
                        run = Some((c, c + 1));
                    }
                }
            }
        }
        release(file, run, cs);
        Ok(())
    }

    /// Queues a refcount decrement to apply after the next L2 writeback.
    pub fn free_later(&mut self, offset: u64, len: u64) {
        self.pending_frees.push((offset, len));
    }

    /// Claims the file space of metadata at `offset` (fallocate) before it is cached dirty.
    /// Its writeback then cannot fail for lack of space: on a full file system the request
    /// that needed a new table fails at once, instead of a later flush, which would leave
    /// the data the table maps unreachable.
    pub fn claim_space(&self, file: &dyn Storage, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 || !self.claims_space {
            return Ok(());
        }
        file.allocate(offset, len)
            .map_err(io(format!("reserving space for {what} at 0x{offset:x}")))
    }

    /// Allocates one free cluster with refcount 1; returns its host offset.
    pub fn alloc_cluster(&mut self, file: &dyn Storage) -> Result<u64> {
        Ok(self.alloc_up_to(file, 1)?.0)
    }

    /// Allocates between 1 and `n` contiguous free clusters with refcount 1, starting at the
    /// first free cluster (so the file never gets holes); returns (host offset, count).
    pub fn alloc_up_to(&mut self, file: &dyn Storage, n: u64) -> Result<(u64, u64)> {
        let per_block = self.geo.refblock_entries();
        let mut start = self.free_hint;
        while self.refcount(file, start)? != 0 {
            start += 1;
        }
        self.ensure_refblock(file, start / per_block)?;
        // The new block may have taken `start` itself.
        while self.refcount(file, start)? != 0 {
            start += 1;
            self.ensure_refblock(file, start / per_block)?;
        }
        let mut count = 1;
        while count < n {
            let c = start + count;
            let r = c / per_block;
            let covered = (r as usize) < self.reftable.len() && self.reftable[r as usize] != 0;
            if !covered || self.refcount(file, c)? != 0 {
                break;
            }
            count += 1;
        }
        for c in start..start + count {
            self.set_refcount(file, c, 1)?;
        }
        self.free_hint = start + count;
        Ok((start * self.geo.cluster_size(), count))
    }

    /// Allocates exactly `n` contiguous free clusters with refcount 1 (the first such run
    /// from the search start, as QEMU's allocator picks it); returns the host offset.
    ///
    /// Refcount blocks the run needs go right after it, so runs longer than one refcount
    /// block's range (large L1 tables) are possible.
    pub fn alloc_contiguous(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let per_block = self.geo.refblock_entries();
        // Grow the refcount table first: growing it later could take clusters of the run.
        loop {
            let file_clusters = file
                .len()
                .map_err(io("getting file size".into()))?
                .div_ceil(cs);
            let limit = self.free_hint.max(file_clusters) + 2 * n + 2;
            if ((limit / per_block) as usize) < self.reftable.len() {
                break;
            }
            self.grow_reftable(file, limit / per_block)?;
        }
        let mut start = self.free_hint;
        let blocks = loop {
            if let Some(used) = self.last_used(file, start, n)? {
                start = used + 1;
                continue;
            }
            // Refcount blocks for uncovered ranges of the run (and of the blocks themselves).
            let mut missing = Vec::new();
            loop {
                let last = (start + n + missing.len() as u64 - 1) / per_block;
                let now: Vec<u64> = (start / per_block..=last)
                    .filter(|&r| self.reftable[r as usize] & !0x1ff == 0)
                    .collect();
                if now.len() == missing.len() {
                    break;
                }
                missing = now;
            }
            if !missing.is_empty()
                && self
                    .last_used(file, start + n, missing.len() as u64)?
                    .is_some()
            {
                start += 1;
                continue;
            }
            break missing;
        };
        let end = start + n + blocks.len() as u64;
        // Nothing changes until every step that can fail is behind us, except refcounts
        // raised in existing blocks (leaks at worst): a refcount block never enters the
        // table without the refcounts of the run and of the blocks themselves.
        self.claim_space(
            file,
            (start + n) * cs,
            blocks.len() as u64 * cs,
            "refcount blocks",
        )?;
        for c in start..end {
            if self.refblock_offset(c)?.is_some() {
                self.set_refcount(file, c, 1)?;
            }
        }
        // The new blocks go in together, complete, without evictions in between (the cache
        // holds more than its capacity until its next insert).
        for (i, &r) in blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            let first = r * per_block;
            for c in start.max(first)..end.min(first + per_block) {
                tables::set_refcount(&mut block, self.geo.refcount_order, (c - first) as usize, 1);
            }
            let off = (start + n + i as u64) * cs;
            self.refblocks.insert(off, block, true);
            self.set_reftable_entry(r as usize, off);
        }
        if start == self.free_hint {
            self.free_hint = end;
        }
        Ok(start * cs)
    }

    /// The last cluster in `[start, start + n)` with a nonzero refcount.
    fn last_used(&mut self, file: &dyn Storage, start: u64, n: u64) -> Result<Option<u64>> {
        for c in (start..start + n).rev() {
            if self.refcount(file, c)? != 0 {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Makes sure refcount block `r` exists. A missing block means its whole range is free:
    /// the new block goes at the range's first cluster and describes itself.
    fn ensure_refblock(&mut self, file: &dyn Storage, r: u64) -> Result<()> {
        if r as usize >= self.reftable.len() {
            self.grow_reftable(file, r)?;
        }
        if self.reftable[r as usize] & !0x1ff != 0 {
            return Ok(());
        }
        let off = r * self.geo.refblock_entries() * self.geo.cluster_size();
        while self.refblocks.is_full() {
            self.writeback_refcounts(file)?;
            self.refblocks.evict_lru();
        }
        self.claim_space(file, off, self.geo.cluster_size(), "a refcount block")?;
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        tables::set_refcount(&mut block, self.geo.refcount_order, 0, 1);
        self.refblocks.insert(off, block, true);
        self.set_reftable_entry(r as usize, off);
        Ok(())
    }

    /// Grows the refcount table so it has an entry for refcount block index `needed`.
    ///
    /// The new table and one self-describing refcount block go right after the last
    /// cluster the old table can describe; the old table is freed afterwards.
    fn grow_reftable(&mut self, file: &dyn Storage, needed: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per_block = self.geo.refblock_entries();
        let new_len = (needed + 1).max(self.reftable.len() as u64 * 2);
        let table_clusters = (new_len * 8).div_ceil(cs);
        let new_len = table_clusters * cs / 8;
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::InvalidOption(
                "refcount table would exceed 8 MiB; image is too large".into(),
            ));
        }
        let first = self.reftable.len() as u64 * per_block;
        if 1 + table_clusters > per_block {
            return Err(Error::InvalidOption(
                "refcount table growth does not fit in one refcount block".into(),
            ));
        }
        // Everything referenced by the new table must be on disk before the table.
        self.writeback_refcounts(file)?;
        let mut block = vec![0u8; cs as usize];
        for i in 0..=table_clusters {
            tables::set_refcount(&mut block, self.geo.refcount_order, i as usize, 1);
        }
        let block_off = first * cs;
        let table_off = block_off + cs;
        let mut table = self.reftable.clone();
        table.resize(new_len as usize, 0);
        table[(first / per_block) as usize] = block_off;
        self.check_write(file, block_off, cs * (1 + table_clusters), Target::New)?;
        file.write_at(&block, block_off)
            .map_err(io(format!("writing refcount block at 0x{block_off:x}")))?;
        file.write_at(&encode_u64_table(&table), table_off)
            .map_err(io(format!("writing refcount table at 0x{table_off:x}")))?;
        file.flush()
            .map_err(io("flushing new refcount table".into()))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        let switched = file
            .write_at(&hdr, 48)
            .map_err(io("updating refcount table pointer in the header".into()))
            .and_then(|()| file.flush().map_err(io("flushing header".into())));
        if let Err(e) = switched {
            return Err(self.stop_writes_after_failed_switch("refcount table", e));
        }
        let old_off = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.replace_reftable(table);
        self.refblocks.insert(block_off, block, false);
        self.free_later(old_off, old_clusters * cs);
        Ok(())
    }

    /// Writes dirty refcount blocks, then the refcount table, with a barrier between.
    fn writeback_refcounts(&mut self, file: &dyn Storage) -> Result<()> {
        let dirty = self.refblocks.dirty_offsets();
        for off in &dirty {
            self.check_write(file, *off, self.geo.cluster_size(), Target::RefBlock(*off))?;
        }
        let writes: Vec<(u64, &[u8])> = dirty
            .iter()
            .map(|&off| {
                (
                    off,
                    &self.refblocks.get(off).expect("dirty entry is cached")[..],
                )
            })
            .collect();
        file.write_batch(&writes)
            .map_err(io(format!("writing {} refcount blocks", dirty.len())))?;
        for off in dirty {
            self.refblocks.mark_clean(off);
        }
        if self.reftable_dirty {
            file.flush()
                .map_err(io("flushing refcount blocks".into()))?;
            let len = self.reftable.len() as u64 * 8;
            self.check_write(
                file,
                self.header.refcount_table_offset,
                len,
                Target::RefTable,
            )?;
            file.write_at(
                &encode_u64_table(&self.reftable),
                self.header.refcount_table_offset,
            )
            .map_err(io("writing refcount table".into()))?;
            self.reftable_dirty = false;
        }
        Ok(())
    }

    /// Serialises the header into cluster 0 and flushes.
    pub fn write_header(&self, file: &dyn Storage) -> Result<()> {
        write_header(file, &self.header)
    }

    /// Writes the header with `change` applied and flushes; the header in memory changes
    /// only if that succeeded, so it never claims what the file may not hold.
    pub fn update_header(
        &mut self,
        file: &dyn Storage,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let mut header = self.header.clone();
        change(&mut header);
        write_header(file, &header)?;
        self.header = header;
        Ok(())
    }

    /// Writes all dirty metadata back in crash-safe order (see the module docs).
    ///
    /// `data` is the external data file, if any, which is flushed with the first barrier.
    ///
    /// With lazy refcounts the refcount structures stay in the cache (they are written on
    /// close or eviction) and are not ordered before the L2 tables; the image carries the
    /// dirty bit meanwhile, so a crash is repaired by rebuilding refcounts on the next open.
    pub fn writeback(&mut self, file: &dyn Storage) -> Result<()> {
        let l2_dirty = self.l2.dirty_offsets();
        let changes = !l2_dirty.is_empty() || self.l1_dirty || !self.pending_frees.is_empty();
        if self.lazy_refcounts && changes {
            self.set_dirty_bit(file, true)?;
        }
        if !self.lazy_refcounts {
            self.writeback_refcounts(file)?;
        }
        if !l2_dirty.is_empty() || self.l1_dirty {
            if let Some(d) = &self.data_file {
                d.flush()
                    .map_err(io("flushing external data file".into()))?;
            }
            file.flush()
                .map_err(io("flushing data and refcounts".into()))?;
            self.write_l2_slices(file, &l2_dirty)?;
            if self.l1_dirty {
                // An L1 entry may point at a table just written: the table is durable
                // first (QEMU's l2_allocate), or a crash could keep the entry alone.
                if !l2_dirty.is_empty() {
                    file.flush().map_err(io("flushing new L2 tables".into()))?;
                }
                let len = self.l1.len() as u64 * 8;
                self.check_write(file, self.header.l1_table_offset, len, Target::L1)?;
                file.write_at(&encode_u64_table(&self.l1), self.header.l1_table_offset)
                    .map_err(io("writing L1 table".into()))?;
                self.l1_dirty = false;
            }
        }
        if !self.pending_frees.is_empty() {
            file.flush().map_err(io("flushing L2 tables".into()))?;
            // The cluster being packed with compressed data may be freed and reused.
            self.compressed_tail = None;
            for (off, len) in std::mem::take(&mut self.pending_frees) {
                // A refcount already 0 (two entries sharing a cluster counted once): the
                // cluster is left alone, as QEMU's qcow2_free_clusters leaves it, and the
                // request goes on.
                if let Err(e) = self.add_refcount(file, off, len, -1) {
                    match e {
                        Error::RefcountUnderflow(what) => {
                            crate::engine::report_failed_free(&what);
                            continue;
                        }
                        e => return Err(e),
                    }
                }
                // A freed table must not be served from the cache if the cluster is reused.
                self.forget_l2_table(off & OFFSET_MASK);
                if self.unmap {
                    // Under the metadata lock, before anything can reuse the clusters.
                    self.release_unreferenced(file, off, len)?;
                }
            }
            if !self.lazy_refcounts {
                self.writeback_refcounts(file)?;
            }
        }
        Ok(())
    }

    /// [`Self::writeback`] before the header or the bitmap directory is switched to clusters
    /// allocated since: with lazy refcounts their refcounts are only cached, so the dirty bit
    /// is set first (a crash then leaves an image whose refcounts the next open rebuilds,
    /// not one whose new table the next allocation overwrites).
    pub fn writeback_before_switch(&mut self, file: &dyn Storage) -> Result<()> {
        self.writeback(file)?;
        if self.lazy_refcounts {
            self.set_dirty_bit(file, true)?;
        }
        Ok(())
    }

    /// After a failed write or flush of a header that was to point at a new table: the file
    /// may point at either table now, so any later metadata write could go to the one the
    /// file does not use. Refuses all further writes (as after a corruption, but without
    /// touching the file) and returns `e`.
    pub fn stop_writes_after_failed_switch(&self, table: &str, e: Error) -> Error {
        self.corrupt
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::error!("qcow2: moving the {table} failed half-way ({e}); no more writes");
        e
    }

    /// Sets or clears the dirty bit in the header (durably) if it is not already so.
    pub fn set_dirty_bit(&mut self, file: &dyn Storage, dirty: bool) -> Result<()> {
        if self.header.is_dirty() == dirty {
            return Ok(());
        }
        self.update_header(file, |h| h.incompatible_features ^= INCOMPAT_DIRTY)
    }

    /// Lazy refcounts on close: writes the refcount structures, then clears the dirty bit.
    pub fn close_lazy_refcounts(&mut self, file: &dyn Storage) -> Result<()> {
        if !self.lazy_refcounts || !self.header.is_dirty() {
            return Ok(());
        }
        self.writeback_refcounts(file)?;
        file.flush()
            .map_err(io("flushing refcounts on close".into()))?;
        self.set_dirty_bit(file, false)
    }
}

/// Serialises `header` into cluster 0 and flushes.
fn write_header(file: &dyn Storage, header: &Header) -> Result<()> {
    let bytes = header.serialize()?;
    file.write_at(&bytes, 0)
        .map_err(io("writing the header".into()))?;
    file.flush().map_err(io("flushing the header".into()))
}

/// Punches the clusters `[first, end)` of `run` (cluster numbers) out of `file`. A failure
/// only keeps the space in use (QEMU's discards are optional too): it is logged, and the
/// writeback goes on.
fn release(file: &dyn Storage, run: Option<(u64, u64)>, cs: u64) {
    let Some((first, end)) = run else {
        return;
    };
    if let Err(e) = file.punch_hole(first * cs, (end - first) * cs) {
        if e.kind() != std::io::ErrorKind::Unsupported {
            tracing::warn!("releasing freed clusters at 0x{:x}: {e}", first * cs);
        }
    }
}
