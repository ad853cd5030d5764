//! Persistent dirty bitmaps resized with the disk, as QEMU resizes them (`qemu-img resize`,
//! `amend -o size`): the bits past a smaller end are dropped, a grown disk's new bits are
//! clear. While their tables change the bitmaps are marked in use on disk, so a crash leaves
//! them inconsistent (QEMU then refuses to use them) rather than wrong. A table covers at
//! least the disk's size at every step: it grows before the disk does and shrinks after.

use crate::error::{Error, Result};
use crate::format::header::{be16, be32, be64, AUTOCLEAR_BITMAPS};

use super::meta::{encode_u64_table, read_u64_table};
use super::overlap::Target;
use super::Qcow2;

/// Directory entry flag: the bitmap is being changed and may be inconsistent.
const IN_USE: u32 = 1;
/// Bits 9-55 of a bitmap table entry: the host offset of a data cluster.
const DATA_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest bitmap directory QEMU reads.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// One entry of the bitmap directory.
struct Entry {
    /// Byte position of the entry in the directory.
    pos: usize,
    name: String,
    table_offset: u64,
    table_size: u64,
    flags: u32,
    granularity_bits: u32,
}

/// The bitmap directory of an image whose bitmaps are valid (autoclear bit set).
pub(super) struct BitmapDirectory {
    offset: u64,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    /// Host ranges to free once the directory no longer references them.
    freed: Vec<(u64, u64)>,
}

impl Qcow2 {
    /// The bitmap directory, if the image has valid persistent bitmaps.
    fn bitmap_directory(&self) -> Result<Option<BitmapDirectory>> {
        let header = self.meta().header.clone();
        let Some(ext) = header.bitmaps.as_ref() else {
            return Ok(None);
        };
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps() == 0 {
            return Ok(None);
        }
        let corrupt = |what: &str| Error::Corrupt(format!("bitmap directory: {what}"));
        if ext.directory_size() > MAX_DIRECTORY_BYTES {
            return Err(corrupt("larger than 64 MiB"));
        }
        let mut bytes = vec![0u8; ext.directory_size() as usize];
        self.file
            .read_at(&mut bytes, ext.directory_offset())
            .map_err(|e| Error::io("reading the bitmap directory", e))?;
        let mut entries = Vec::new();
        let mut pos = 0;
        for _ in 0..ext.nb_bitmaps() {
            if pos + 24 > bytes.len() {
                return Err(corrupt("truncated"));
            }
            let name_len = usize::from(be16(&bytes, pos + 18));
            let extra = be32(&bytes, pos + 20) as usize;
            let name_at = pos + 24 + extra;
            let name = bytes
                .get(name_at..name_at + name_len)
                .ok_or_else(|| corrupt("truncated"))?;
            entries.push(Entry {
                pos,
                name: String::from_utf8_lossy(name).into_owned(),
                table_offset: be64(&bytes, pos),
                table_size: u64::from(be32(&bytes, pos + 8)),
                flags: be32(&bytes, pos + 12),
                granularity_bits: u32::from(bytes[pos + 17]),
            });
            pos = (name_at + name_len).next_multiple_of(8);
        }
        Ok(Some(BitmapDirectory {
            offset: ext.directory_offset(),
            bytes,
            entries,
            freed: Vec::new(),
        }))
    }

    /// Writes `dir` back in place (its entries keep their sizes) and flushes.
    fn write_bitmap_directory(&self, dir: &mut BitmapDirectory) -> Result<()> {
        for e in &dir.entries {
            let at = e.pos;
            dir.bytes[at..at + 8].copy_from_slice(&e.table_offset.to_be_bytes());
            let size = u32::try_from(e.table_size).expect("tables are sized from a u32");
            dir.bytes[at + 8..at + 12].copy_from_slice(&size.to_be_bytes());
            dir.bytes[at + 12..at + 16].copy_from_slice(&e.flags.to_be_bytes());
        }
        let file = &*self.file;
        let mut m = self.meta_mut();
        m.check_write(file, dir.offset, dir.bytes.len() as u64, Target::New)?;
        file.write_at(&dir.bytes, dir.offset)
            .map_err(|e| Error::io("writing the bitmap directory", e))?;
        file.flush()
            .map_err(|e| Error::io("flushing the bitmap directory", e))
    }

    /// Starts resizing the bitmaps from `old` to `new` bytes: refuses inconsistent ones (as
    /// QEMU), marks them in use and, for a larger disk, grows their tables. `None` when the
    /// image has no valid bitmaps.
    pub(super) fn begin_bitmap_resize(
        &self,
        old: u64,
        new: u64,
    ) -> Result<Option<BitmapDirectory>> {
        let Some(mut dir) = self.bitmap_directory()? else {
            return Ok(None);
        };
        if let Some(e) = dir.entries.iter().find(|e| e.flags & IN_USE != 0) {
            return Err(Error::InvalidOption(format!(
                "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove \
                 to delete this bitmap from disk",
                e.name
            )));
        }
        for e in &mut dir.entries {
            e.flags |= IN_USE;
        }
        self.write_bitmap_directory(&mut dir)?;
        if new > old {
            self.resize_bitmap_tables(&mut dir, old, new)?;
        }
        Ok(Some(dir))
    }

    /// Finishes what [`Self::begin_bitmap_resize`] started once the disk has its new size:
    /// shrinks the tables of a smaller disk, marks the bitmaps consistent again and frees
    /// the clusters they no longer use.
    pub(super) fn finish_bitmap_resize(
        &self,
        mut dir: BitmapDirectory,
        old: u64,
        new: u64,
    ) -> Result<()> {
        if new < old {
            self.resize_bitmap_tables(&mut dir, old, new)?;
        }
        for e in &mut dir.entries {
            e.flags &= !IN_USE;
        }
        self.write_bitmap_directory(&mut dir)?;
        let mut m = self.meta_mut();
        for (offset, len) in dir.freed {
            m.free_later(offset, len);
        }
        m.writeback(&*self.file)
    }

    /// Gives every bitmap of `dir` a new table for a disk of `new` bytes (was `old`), writes
    /// the directory pointing to them and queues the old tables and dropped data clusters
    /// to be freed.
    fn resize_bitmap_tables(&self, dir: &mut BitmapDirectory, old: u64, new: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let bits_per_cluster = cs * 8;
        for e in &mut dir.entries {
            let granularity = 1u64 << e.granularity_bits.min(63);
            let keep_bits = old.min(new).div_ceil(granularity);
            let entries = new.div_ceil(granularity).div_ceil(bits_per_cluster).max(1);
            let mut table = read_u64_table(&*self.file, e.table_offset, e.table_size as usize)?;
            for &t in table.iter().skip(entries as usize) {
                if t & DATA_OFFSET != 0 {
                    dir.freed.push((t & DATA_OFFSET, cs));
                }
            }
            table.resize(entries as usize, 0);
            // The bits past the kept ones, in the cluster holding the last kept bit, were
            // zero padding or are past the new end: clear either way.
            let (k, first) = (
                (keep_bits / bits_per_cluster) as usize,
                keep_bits % bits_per_cluster,
            );
            if first != 0 && k < table.len() {
                table[k] = self.clear_bitmap_bits_from(table[k], first)?;
            }
            let new_offset = self.write_new_table(&table)?;
            if e.table_size > 0 {
                dir.freed
                    .push((e.table_offset, (e.table_size * 8).next_multiple_of(cs)));
            }
            e.table_offset = new_offset;
            e.table_size = entries;
        }
        self.write_bitmap_directory(dir)
    }

    /// The table entry for the data cluster of `entry` with its bits from `first` on clear:
    /// the same cluster changed in place, or a new one for an all-ones entry.
    fn clear_bitmap_bits_from(&self, entry: u64, first: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let host = entry & DATA_OFFSET;
        if entry == 0 {
            return Ok(0);
        }
        let mut data = vec![0xffu8; cs as usize];
        if host != 0 {
            self.file
                .read_at(&mut data, host)
                .map_err(|e| Error::io("reading a bitmap cluster", e))?;
        }
        let byte = (first / 8) as usize;
        let before = data.clone();
        data[byte] &= (1u8 << (first % 8)) - 1;
        data[byte + 1..].fill(0);
        if host != 0 && data == before {
            return Ok(entry);
        }
        let file = &*self.file;
        let mut m = self.meta_mut();
        let target = match host {
            0 => {
                let at = m.alloc_cluster(file)?;
                m.writeback(file)?;
                at
            }
            h => h,
        };
        m.check_write(file, target, cs, Target::New)?;
        file.write_at(&data, target)
            .map_err(|e| Error::io(format!("writing a bitmap cluster at 0x{target:x}"), e))?;
        Ok(target)
    }

    /// Writes `table` to newly allocated clusters (made durable); returns their offset.
    fn write_new_table(&self, table: &[u64]) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let mut m = self.meta_mut();
        let mut bytes = encode_u64_table(table);
        bytes.resize(bytes.len().next_multiple_of(cs as usize), 0);
        let offset = m.alloc_contiguous(file, bytes.len() as u64 / cs)?;
        m.writeback(file)?;
        m.check_write(file, offset, bytes.len() as u64, Target::New)?;
        file.write_at(&bytes, offset)
            .map_err(|e| Error::io(format!("writing a bitmap table at 0x{offset:x}"), e))?;
        file.flush()
            .map_err(|e| Error::io("flushing a bitmap table", e))?;
        Ok(offset)
    }
}
