//! Whole-image changes for qemu-img's resize, commit and rebase.
//!
//! Resizing works the way QEMU's `qcow2_co_truncate` does it: growing moves the L1 table to a
//! larger allocation when needed; shrinking unmaps every cluster past the new end, frees the
//! L2 tables past the new L1 size and truncates the file after its last used cluster.

use crate::create::Preallocation;
use crate::error::{Error, Result};
use crate::format::header::MAX_L1_BYTES;
use crate::format::tables::{L2Entry, OFFSET_MASK};

use super::meta::encode_u64_table;
use super::overlap::Target;
use super::write::ZeroMode;
use super::Qcow2;

impl Qcow2 {
    /// Sets the virtual size to `new_size` bytes, preallocating any added range as `prealloc`
    /// says. Shrinking discards the data past the new end (internal snapshots keep theirs,
    /// as in QEMU 10). Growing an image whose header names a backing file that this handle
    /// did not open (`OpenOptions::no_backing`, or no directory) fails with
    /// [`Error::Backing`]: that file's length decides whether the grown range is zeroed.
    /// Persistent dirty bitmaps, if still valid, are resized too (see `bitmaps.rs`).
    pub fn resize(&mut self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.version < 3 && !self.snapshots.is_empty() {
            return Err(Error::InvalidOption(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let old = self.size;
        if new_size < old && prealloc != Preallocation::Off {
            return Err(Error::InvalidOption(
                "Preallocation can't be used for shrinking an image".into(),
            ));
        }
        let cs = self.geo.cluster_size();
        let new_l1 = new_size.div_ceil(cs * self.geo.l2_entries());
        if new_l1 * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidOption(
                "Failed to grow the L1 table: File too large".into(),
            ));
        }
        let grow = new_size > old;
        let backing_len = match (&self.backing, self.meta().header.backing_file.as_deref()) {
            (Some(b), _) => b.size(),
            (None, Some(name)) if grow => {
                // Its length decides whether the grown range must be zeroed.
                return Err(Error::Backing {
                    path: name.into(),
                    reason: "not opened: growing the image must hide what it holds past the \
                             old end"
                        .into(),
                });
            }
            (None, _) => 0,
        };
        let allocates_data = matches!(prealloc, Preallocation::Falloc | Preallocation::Full);
        if grow && backing_len > old && self.version < 3 && !allocates_data {
            // What the backing file holds past the old end must be hidden by zero clusters,
            // which a v2 image does not have (QEMU: ENOTSUP from qcow2_subcluster_zeroize;
            // falloc and full preallocation write data clusters instead).
            return Err(Error::InvalidOption(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        let bitmaps = self.begin_bitmap_resize(old, new_size)?;
        if new_size < old {
            self.unmap_from(new_size.div_ceil(cs), new_l1)?;
        } else if new_l1 > self.meta().l1.len() as u64 {
            self.grow_l1(new_l1)?;
        }
        // The header takes the new size last, once the metadata for it is durable (as in
        // QEMU): a crash before leaves the old size, never a grown range that shows what
        // the backing file or a shrink's unmapped clusters hold past the old end.
        self.size = new_size;
        let resized = self
            .fill_grown_range(old, prealloc, backing_len)
            .and_then(|()| self.flush_metadata())
            .and_then(|()| {
                self.meta_mut()
                    .update_header(&*self.file, |h| h.size = new_size)
            });
        if let Err(e) = resized {
            if grow {
                // Best effort: the error that stopped the grow is the one to report.
                let _ = self.undo_grow(old);
            }
            self.size = old;
            return Err(e);
        }
        if let Some(dir) = bitmaps {
            self.finish_bitmap_resize(dir, old, new_size)?;
        }
        if new_size < old {
            self.drop_unused_refblocks()?;
            self.truncate_file_tail()?;
            if let Some(d) = &self.data_file {
                // As QEMU: the data file ends with the disk.
                d.set_len(new_size)
                    .map_err(|e| Error::io("shrinking the external data file", e))?;
            }
        }
        Ok(())
    }

    /// After a grow from `old` failed (`self.size` still the new size): unmaps what the
    /// grown range got (preallocated clusters) and truncates the file after its last used
    /// cluster, as QEMU truncates it back: a preallocation that ran out of space gives the
    /// space back.
    fn undo_grow(&self, old: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old_l1 = old.div_ceil(cs * self.geo.l2_entries());
        self.unmap_from(old.div_ceil(cs), old_l1)?;
        self.flush_metadata()?;
        self.drop_unused_refblocks()?;
        self.truncate_file_tail()
    }

    /// After the size grew from `old` (already `self.size`): preallocates the new range as
    /// `prealloc` says, hides what a `backing_len`-byte backing file holds past the old end,
    /// and grows the external data file.
    fn fill_grown_range(&self, old: u64, prealloc: Preallocation, backing_len: u64) -> Result<()> {
        let (cs, new_size) = (self.geo.cluster_size(), self.size);
        if new_size <= old {
            return Ok(());
        }
        // As QEMU: a raw data file stays a standalone image only if every cluster maps
        // onto it.
        let prealloc = match prealloc {
            Preallocation::Off if self.raw_data_file().is_some() => Preallocation::Metadata,
            p => p,
        };
        if prealloc != Preallocation::Off {
            self.preallocate_from(prealloc, old)?;
        }
        if backing_len > old {
            // As in QEMU: what the backing file holds past the old end must not show through
            // the grown disk, which reads as zeros there. Preallocated clusters keep their
            // hosts (zero flags or subcluster zero bits over them); v2 has no zero flag, but
            // its preallocated clusters read as zeros already: only the cluster holding the
            // old end, which preallocation leaves alone, is left.
            let unmap = prealloc == Preallocation::Off;
            let end = match self.version < 3 && !unmap {
                true => old.next_multiple_of(cs).min(new_size),
                false => new_size,
            };
            if end > old {
                self.zero_or_discard(old, end - old, ZeroMode::Zero { unmap })?;
            }
        }
        if let Some(d) = &self.data_file {
            let len = d
                .len()
                .map_err(|e| Error::io("getting the data file size", e))?;
            d.set_len(len.max(new_size)).map_err(Error::ResizeFile)?;
        }
        Ok(())
    }

    /// Removes refcount blocks that describe nothing but themselves from the refcount table
    /// (QEMU's `qcow2_shrink_reftable`), so the file can shrink past them.
    fn drop_unused_refblocks(&self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per_block = self.geo.refblock_entries();
        let order = self.geo.refcount_order;
        let file = &*self.file;
        let mut m = self.meta_mut();
        let mut freed = Vec::new();
        for r in 0..m.reftable.len() {
            let off = m.reftable[r] & !0x1ff;
            if off == 0 {
                continue;
            }
            m.refcount(file, r as u64 * per_block)?; // loads the block
            let block = m.refblocks.get(off).expect("just loaded");
            let own = (off / cs / per_block == r as u64).then(|| (off / cs % per_block) as usize);
            let unused = (0..per_block as usize)
                .filter(|&i| Some(i) != own)
                .all(|i| crate::format::tables::get_refcount(block, order, i) == 0);
            if unused {
                m.set_reftable_entry(r, 0);
                m.refblocks.remove(off);
                if own.is_none() {
                    freed.push(off);
                }
            }
        }
        for off in freed {
            m.free_later(off, cs);
        }
        m.writeback(file)
    }

    /// Makes every guest cluster unallocated, so the image reads as its backing file (QEMU's
    /// `make_empty`, used by qemu-img commit), and truncates the freed tail of the file.
    pub fn make_empty(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.unmap_from(0, 0)?;
        self.flush_metadata()?;
        self.drop_unused_refblocks()?;
        self.truncate_file_tail()
    }

    /// Records a new backing file (or none) in the header. The backing image opened with
    /// this handle does not change; reopen the image to read through the new one.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.meta_mut().update_header(&*self.file, |h| {
            h.backing_file = name.map(Into::into);
            h.backing_format = name.and(format).map(str::to_string);
        })
    }

    /// Makes guest clusters from `first` on unallocated and frees the L2 tables at L1
    /// indexes from `l1_keep` on (the L1 keeps its size, as in QEMU).
    fn unmap_from(&self, first: u64, l1_keep: u64) -> Result<()> {
        let end = self.size.div_ceil(self.geo.cluster_size());
        let per_l2 = self.geo.l2_entries();
        let mut c = first;
        while c < end {
            if !self.has_l2_table(c) {
                // Nothing mapped up to the next table (a grow to petabytes that failed has
                // millions of them).
                c = (c / per_l2 + 1) * per_l2;
                continue;
            }
            let entries = self.lookup_bitmaps(c, end - c)?;
            if entries.iter().any(|&e| e != (L2Entry::Unallocated, 0)) {
                let old: Vec<L2Entry> = entries.iter().map(|&(e, _)| e).collect();
                let words = entries.len() * self.geo.l2_words() as usize;
                self.set_entries(c, &vec![0; words], &old)?;
            }
            c += entries.len() as u64;
        }
        let mut m = self.meta_mut();
        for i in l1_keep as usize..m.l1.len() {
            let off = m.l1[i] & OFFSET_MASK;
            if off != 0 {
                m.free_later(off, self.geo.cluster_size());
                m.l1[i] = 0;
                m.l1_dirty = true;
            }
        }
        Ok(())
    }

    /// Moves the L1 table to a new allocation with `entries` entries (QEMU's
    /// `qcow2_grow_l1_table` with an exact size): the new table is durable before the header
    /// points to it, and the old one is freed afterwards.
    pub(super) fn grow_l1(&self, entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let mut m = self.meta_mut();
        let new_off = m.alloc_contiguous(file, (entries * 8).div_ceil(cs))?;
        m.writeback_before_switch(file)?;
        let mut table = m.l1.clone();
        table.resize(entries as usize, 0);
        // Whole sectors, as QEMU writes it: the rest of the cluster is never read, and on a
        // nearly full file system it may not fit.
        let mut bytes = encode_u64_table(&table);
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        m.check_write(file, new_off, bytes.len() as u64, Target::New)?;
        file.write_at(&bytes, new_off)
            .map_err(|e| Error::io(format!("writing the L1 table at 0x{new_off:x}"), e))?;
        file.flush()
            .map_err(|e| Error::io("flushing the new L1 table", e))?;
        let (old_off, old_len) = (m.header.l1_table_offset, m.header.l1_size as u64 * 8);
        m.header.l1_table_offset = new_off;
        m.header.l1_size = entries as u32;
        m.l1 = table;
        if let Err(e) = m.write_header(&*self.file) {
            return Err(m.stop_writes_after_failed_switch("L1 table", e));
        }
        if old_len > 0 {
            m.free_later(old_off, old_len);
        }
        m.writeback(file)
    }

    /// Truncates the image file after its last cluster with a nonzero refcount.
    fn truncate_file_tail(&self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let len = file
            .len()
            .map_err(|e| Error::io("getting the image size", e))?;
        let mut m = self.meta_mut();
        let mut last = len.div_ceil(cs);
        while last > 0 && m.refcount(file, last - 1)? == 0 {
            last -= 1;
        }
        if last * cs < len {
            // The refcount table must stop pointing past the new end before the end moves.
            file.flush()
                .map_err(|e| Error::io("flushing before truncating the image file", e))?;
            file.set_len(last * cs)
                .map_err(|e| Error::io("truncating the image file", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::image::Image;
    use crate::storage::FileStorage;
    use crate::{check, CreateOptions, OpenOptions};

    /// Opens an image read-write (engine tests share it).
    pub(crate) fn open(path: &std::path::Path) -> Qcow2 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Qcow2::open_storage(Arc::new(FileStorage::new(f)), &OpenOptions::default(), None).unwrap()
    }

    /// Creates `name` in `dir` (`size` bytes, `cluster_size`) and opens it read-write.
    pub(crate) fn create_open(
        dir: &std::path::Path,
        name: &str,
        size: u64,
        cluster_size: u64,
    ) -> (std::path::PathBuf, Qcow2) {
        let p = dir.join(name);
        let o = CreateOptions {
            size,
            cluster_size,
            ..Default::default()
        };
        crate::create(&p, &o).unwrap();
        let img = open(&p);
        (p, img)
    }

    #[test]
    fn grow_past_the_l1_allocation_and_shrink_back_keep_data_and_refcounts() {
        let d = tempfile::tempdir().unwrap();
        // 512-byte clusters: one L1 cluster maps 64 entries * 64 * 512 = 2 MiB.
        let (p, mut img) = create_open(d.path(), "r.qcow2", 1 << 20, 512);
        img.write_at(&[7u8; 1000], 1000).unwrap();
        img.resize(64 << 20, Preallocation::Off).unwrap();
        assert_eq!(img.header().l1_size, 2048);
        img.write_at(&[9u8; 512], (64 << 20) - 512).unwrap();
        img.flush().unwrap();
        let r = check(&img).unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop(img);
        let mut img = open(&p);
        let mut buf = [0u8; 512];
        img.read_at(&mut buf, (64 << 20) - 512).unwrap();
        assert_eq!(buf, [9u8; 512]);
        img.resize(1500, Preallocation::Off).unwrap();
        assert_eq!(img.size(), 1500);
        let r = check(&img).unwrap();
        assert!(r.is_clean(), "{r:?}");
        let mut buf = [0u8; 500];
        img.read_at(&mut buf, 1000).unwrap();
        assert_eq!(buf, [7u8; 500]);
        img.resize(4 << 20, Preallocation::Metadata).unwrap();
        let r = check(&img).unwrap();
        assert!(r.is_clean(), "{r:?}");
        assert!(matches!(
            img.l2_entry((3 << 20) / 512).unwrap(),
            L2Entry::Normal { .. }
        ));
    }

    #[test]
    fn an_l1_table_larger_than_a_refcount_block_range_is_allocated() {
        let d = tempfile::tempdir().unwrap();
        // 512-byte clusters, 16-bit refcounts: one refcount block covers 256 clusters, and
        // 16 GiB needs an L1 of 256 Ki entries = 4096 clusters.
        let (p, mut img) = create_open(d.path(), "big.qcow2", 1 << 20, 512);
        img.write_at(&[3u8; 4096], 0).unwrap();
        img.resize(16 << 30, Preallocation::Off).unwrap();
        img.write_at(&[4u8; 512], (16 << 30) - 512).unwrap();
        img.flush().unwrap();
        let r = check(&img).unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop(img);
        let img = open(&p);
        let mut buf = [0u8; 512];
        img.read_at(&mut buf, (16 << 30) - 512).unwrap();
        assert_eq!(buf, [4u8; 512]);
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [3u8; 512]);
    }

    #[test]
    fn make_empty_and_set_backing_file() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        let top = d.path().join("top.qcow2");
        crate::create(
            &base,
            &CreateOptions {
                size: 4 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let o = CreateOptions {
            size: 4 << 20,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        };
        crate::create(&top, &o).unwrap();
        // As QEMU's make_empty leaves it: header, refcount table and block, L1 table.
        let skeleton = 4 * 65536;
        let img = open(&top);
        img.write_at(&[1u8; 300 << 10], 100).unwrap();
        img.write_zeroes(2 << 20, 64 << 10, false).unwrap();
        img.flush().unwrap();
        img.make_empty().unwrap();
        assert!(check(&img).unwrap().is_clean());
        assert_eq!(std::fs::metadata(&top).unwrap().len(), skeleton);
        for c in 0..64 {
            assert_eq!(img.l2_entry(c).unwrap(), L2Entry::Unallocated);
        }
        img.set_backing_file(Some("other-base.qcow2"), Some("raw"))
            .unwrap();
        drop(img);
        let h = open_read_only(&top).header();
        assert_eq!(h.backing_file.as_deref(), Some("other-base.qcow2".as_ref()));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        let img = open(&top);
        img.set_backing_file(None, Some("raw")).unwrap();
        drop(img);
        let h = open_read_only(&top).header();
        assert_eq!((h.backing_file, h.backing_format), (None, None));
    }

    fn open_read_only(path: &std::path::Path) -> Qcow2 {
        let f = std::fs::File::open(path).unwrap();
        let o = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        Qcow2::open_storage(Arc::new(FileStorage::new(f)), &o, None).unwrap()
    }
}
