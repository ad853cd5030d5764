//! Persistent dirty bitmaps, changed as QEMU changes them (`qemu-img bitmap`, `resize`):
//! added, removed, cleared, enabled or disabled, merged, and resized with the disk (the bits
//! past a smaller end dropped, a grown disk's new bits clear).
//!
//! Guest writes do not maintain them: writers other than these clear the bitmaps' autoclear
//! bit (see `OpenOptions::keep_bitmaps`). New tables, data clusters and directories are
//! written to new clusters, made durable, then switched to; the old ones are freed after, so
//! a crash leaks at worst. A resize marks the bitmaps in use meanwhile (a crash leaves them
//! inconsistent, which QEMU refuses to use, rather than wrong), and keeps every table large
//! enough for the disk at every step: it grows before the disk does and shrinks after.

use crate::error::{Error, Result};
use crate::format::bitmaps::{
    check_directory, encode_directory, parse_directory, table_entries_needed, table_entry_valid,
    DirEntry, AUTO, DATA_OFFSET, GRANULARITY_BITS, IN_USE, MAX_DIRECTORY_BYTES, MAX_NAME_LEN,
    MAX_TABLE_SIZE,
};
use crate::format::header::{BitmapsExtension, AUTOCLEAR_BITMAPS};

use super::meta::{encode_u64_table, read_u64_table};
use super::overlap::Target;
use super::Qcow2;

/// A table entry without a data cluster whose bits are all set.
const ALL_ONES: u64 = 1;

/// A bitmap's bits, one per `granularity` bytes of a `disk_size`-byte disk, least
/// significant bit first (as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapBits {
    /// Bytes of disk per bit.
    pub granularity: u64,
    /// The disk size the bits cover.
    pub disk_size: u64,
    /// The bits, `ceil(ceil(disk_size / granularity) / 8)` bytes.
    pub bits: Vec<u8>,
}

impl BitmapBits {
    fn len(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity)
    }

    fn get(&self, i: u64) -> bool {
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    fn set(&mut self, i: u64) {
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
    }
}

/// The bitmap directory of an image whose bitmaps are valid (autoclear bit set).
pub(super) struct BitmapDirectory {
    offset: u64,
    entries: Vec<DirEntry>,
    /// Host ranges to free once the directory no longer references them.
    freed: Vec<(u64, u64)>,
}

/// QEMU's refusal of a bitmap a crash left in use.
fn inconsistent(name: &[u8]) -> Error {
    let name = String::from_utf8_lossy(name);
    Error::InvalidOption(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to \
         delete this bitmap from disk"
    ))
}

impl Qcow2 {
    /// Refuses, in QEMU's words, an image whose persistent bitmaps QEMU refuses to open
    /// (`qcow2_load_dirty_bitmaps`): a directory or an entry outside the spec's constraints,
    /// or a bitmap not in use whose table has an invalid entry or does not match the disk's
    /// size, or whose table or bits cannot be read. (Else a check would count what such a
    /// table names as leaked, and free it.)
    pub(super) fn check_bitmaps_at_open(&self) -> Result<()> {
        let header = self.meta().header.clone();
        let Some(ext) = header.bitmaps.as_ref() else {
            return Ok(());
        };
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps() == 0 {
            return Ok(());
        }
        let refuse = |why: String| Error::InvalidHeader(why);
        let cs = self.geo.cluster_size();
        let bytes = self.read_directory(ext)?;
        let entries = check_directory(&bytes, ext.nb_bitmaps(), self.size, cs).map_err(refuse)?;
        for e in entries.iter().filter(|e| e.flags & IN_USE == 0) {
            let name = e.display_name();
            let table = read_u64_table(&*self.file, e.table_offset, e.table_size as usize)
                .map_err(|err| {
                    err.reworded(&format!(
                        "Could not read bitmap_table table from image for bitmap '{name}'"
                    ))
                })?;
            if !table.iter().all(|&t| table_entry_valid(t, cs)) {
                return Err(refuse(format!(
                    "Could not read bitmap_table table from image for bitmap '{name}': \
                     Invalid argument"
                )));
            }
            if table_entries_needed(self.size, e.granularity_bits, cs) != table.len() as u64 {
                return Err(refuse(format!(
                    "Could not read bitmap '{name}' from image: Invalid argument"
                )));
            }
            // QEMU loads the bits too: data it cannot read fails the open.
            let mut cluster = vec![0u8; cs as usize];
            for host in table.iter().map(|&t| t & DATA_OFFSET).filter(|&h| h != 0) {
                self.file.read_at(&mut cluster, host).map_err(|err| {
                    Error::io(format!("Could not read bitmap '{name}' from image"), err)
                })?;
            }
        }
        Ok(())
    }

    /// The bytes of the bitmap directory `ext` names.
    fn read_directory(&self, ext: &BitmapsExtension) -> Result<Vec<u8>> {
        if ext.directory_size() > MAX_DIRECTORY_BYTES {
            return Err(Error::Corrupt(
                "the bitmap directory is larger than 64 MiB".into(),
            ));
        }
        let mut bytes = vec![0u8; ext.directory_size() as usize];
        self.file
            .read_at(&mut bytes, ext.directory_offset())
            .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
        Ok(bytes)
    }

    /// The bitmap directory, if the image has valid persistent bitmaps.
    fn bitmap_directory(&self) -> Result<Option<BitmapDirectory>> {
        let header = self.meta().header.clone();
        let Some(ext) = header.bitmaps.as_ref() else {
            return Ok(None);
        };
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps() == 0 {
            return Ok(None);
        }
        let bytes = self.read_directory(ext)?;
        let entries = parse_directory(&bytes, ext.nb_bitmaps())?;
        let cs = self.geo.cluster_size();
        for e in &entries {
            if !GRANULARITY_BITS.contains(&e.granularity_bits)
                || e.table_offset % cs != 0
                || e.table_size > MAX_TABLE_SIZE
                || e.name.len() > MAX_NAME_LEN
            {
                return Err(Error::Corrupt(format!(
                    "bitmap '{}' has an invalid directory entry",
                    e.display_name()
                )));
            }
        }
        Ok(Some(BitmapDirectory {
            offset: ext.directory_offset(),
            entries,
            freed: Vec::new(),
        }))
    }

    /// The table of bitmap `e`, each entry checked.
    fn bitmap_table(&self, e: &DirEntry) -> Result<Vec<u64>> {
        let table = read_u64_table(&*self.file, e.table_offset, e.table_size as usize)?;
        let cs = self.geo.cluster_size();
        match table.iter().find(|&&t| !table_entry_valid(t, cs)) {
            Some(t) => Err(Error::Corrupt(format!(
                "bitmap '{}' has an invalid table entry 0x{t:x}",
                e.display_name()
            ))),
            None => Ok(table),
        }
    }

    /// The bitmap directory, empty if the image has no bitmaps.
    fn bitmaps_or_none(&self) -> Result<BitmapDirectory> {
        Ok(self.bitmap_directory()?.unwrap_or(BitmapDirectory {
            offset: 0,
            entries: Vec::new(),
            freed: Vec::new(),
        }))
    }

    /// The image's persistent bitmaps (none if a writer that does not maintain them has
    /// invalidated them).
    pub fn bitmaps(&self) -> Result<Vec<DirEntry>> {
        Ok(self.bitmaps_or_none()?.entries)
    }

    /// Writes the entries of `dir` over the directory (whose entries keep their sizes) and
    /// flushes.
    fn write_directory_in_place(&self, dir: &BitmapDirectory) -> Result<()> {
        let bytes = encode_directory(&dir.entries);
        let file = &*self.file;
        let mut m = self.meta_mut();
        m.check_write(file, dir.offset, bytes.len() as u64, Target::New)?;
        file.write_at(&bytes, dir.offset)
            .map_err(|e| Error::io("writing the bitmap directory", e))?;
        file.flush()
            .map_err(|e| Error::io("flushing the bitmap directory", e))
    }

    /// Writes the entries of `dir` as a new directory (none: the bitmaps extension goes, as
    /// QEMU drops it) and points the header to it; then frees the old directory and what
    /// `dir` no longer uses.
    fn replace_directory(&self, dir: BitmapDirectory) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let bytes = encode_directory(&dir.entries);
        let new_offset = match bytes.is_empty() {
            true => 0,
            false => self.write_new_clusters(&bytes, "the bitmap directory")?,
        };
        let mut m = self.meta_mut();
        let old = m.header.bitmaps.clone();
        m.update_header(file, |h| {
            if dir.entries.is_empty() {
                h.bitmaps = None;
                h.autoclear_features &= !AUTOCLEAR_BITMAPS;
            } else {
                let count = u32::try_from(dir.entries.len()).expect("at most 65535 bitmaps");
                h.bitmaps = Some(BitmapsExtension::new(count, bytes.len() as u64, new_offset));
                h.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
        })?;
        // Only a directory that was in use is freed: one whose bitmaps a writer invalidated
        // (its clusters leaked, as QEMU leaves them) may have been reclaimed by a repair.
        if let Some(old) = old.filter(|_| dir.offset != 0) {
            m.free_later(
                old.directory_offset(),
                old.directory_size().next_multiple_of(cs),
            );
        }
        for (offset, len) in dir.freed {
            m.free_later(offset, len);
        }
        m.writeback(file)
    }

    /// Writes `bytes` (padded to whole clusters) to newly allocated clusters, made durable
    /// with their refcounts; returns their offset. `what` names them in errors.
    fn write_new_clusters(&self, bytes: &[u8], what: &str) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let mut m = self.meta_mut();
        let mut padded = bytes.to_vec();
        padded.resize(
            bytes.len().next_multiple_of(cs as usize).max(cs as usize),
            0,
        );
        let offset = m.alloc_contiguous(file, padded.len() as u64 / cs)?;
        m.writeback_before_switch(file)?;
        m.check_write(file, offset, padded.len() as u64, Target::New)?;
        file.write_at(&padded, offset)
            .map_err(|e| Error::io(format!("writing {what} at 0x{offset:x}"), e))?;
        file.flush()
            .map_err(|e| Error::io(format!("flushing {what}"), e))?;
        Ok(offset)
    }

    /// Entries in the table of a bitmap with `granularity` over the current disk.
    fn table_entries(&self, granularity: u64) -> u64 {
        let bits_per_cluster = self.geo.cluster_size() * 8;
        self.size
            .div_ceil(granularity)
            .div_ceil(bits_per_cluster)
            .max(1)
    }

    /// Whether a bitmap of `granularity` bytes per bit can cover a `size`-byte disk within
    /// QEMU's limits (its `check_constraints_on_bitmap`: 512 MiB of bits, a table of
    /// [`MAX_TABLE_SIZE`] entries); QEMU cannot open an image with a bitmap past them.
    fn bitmap_fits(&self, granularity: u64, size: u64) -> bool {
        let bits = size.div_ceil(granularity);
        bits.div_ceil(8) <= 0x2000_0000
            && bits.div_ceil(self.geo.cluster_size() * 8) <= u64::from(MAX_TABLE_SIZE)
    }

    /// Adds an empty bitmap `name` of `granularity` bytes per bit, recording writes
    /// (enabled) or not. QEMU's checks and words.
    pub fn add_bitmap(&self, name: &[u8], granularity: u64, enabled: bool) -> Result<()> {
        let shown = String::from_utf8_lossy(name);
        let refuse = |why: &str| {
            Error::InvalidOption(format!("Can't make bitmap '{shown}' persistent: {why}"))
        };
        if name.is_empty() {
            return Err(Error::InvalidOption("Bitmap name cannot be empty".into()));
        }
        if !(512..=1 << 31).contains(&granularity) || !granularity.is_power_of_two() {
            return Err(Error::InvalidOption(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        if self.version < 3 {
            return Err(refuse("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(refuse("Name length exceeds maximum (1023 characters)"));
        }
        if self.size == 0 {
            return Err(refuse("the disk is empty"));
        }
        if !self.bitmap_fits(granularity, self.size) {
            return Err(refuse(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        let mut dir = self.bitmaps_or_none()?;
        if dir.entries.iter().any(|e| e.name == name) {
            return Err(Error::InvalidOption(format!(
                "Bitmap already exists: {shown}"
            )));
        }
        let entries = self.table_entries(granularity);
        let table = vec![0u64; entries as usize];
        let table_offset = self.write_new_clusters(&encode_u64_table(&table), "a bitmap table")?;
        dir.entries.push(DirEntry {
            table_offset,
            table_size: u32::try_from(entries).expect("a bitmap table fits a u32"),
            flags: if enabled { AUTO } else { 0 },
            granularity_bits: granularity.trailing_zeros() as u8,
            name: name.to_vec(),
            extra: Vec::new(),
        });
        self.replace_directory(dir)
    }

    /// Fails as QEMU fails a bitmap it would write to: `name` missing or inconsistent (in
    /// use: not saved after its last change).
    pub fn check_bitmap_writable(&self, name: &[u8]) -> Result<()> {
        let (dir, i) = self.find_bitmap(name)?;
        match dir.entries[i].flags & IN_USE {
            0 => Ok(()),
            _ => Err(inconsistent(name)),
        }
    }

    /// The directory and the index of bitmap `name` in it.
    fn find_bitmap(&self, name: &[u8]) -> Result<(BitmapDirectory, usize)> {
        let dir = self.bitmaps_or_none()?;
        match dir.entries.iter().position(|e| e.name == name) {
            Some(i) => Ok((dir, i)),
            None => Err(Error::InvalidOption(format!(
                "Dirty bitmap '{}' not found",
                String::from_utf8_lossy(name)
            ))),
        }
    }

    /// The data clusters and table of `e`, to free once nothing references them.
    fn bitmap_clusters(&self, e: &DirEntry) -> Result<Vec<(u64, u64)>> {
        let cs = self.geo.cluster_size();
        let table = self.bitmap_table(e)?;
        let mut out: Vec<(u64, u64)> = table
            .iter()
            .filter(|&&t| t & DATA_OFFSET != 0)
            .map(|&t| (t & DATA_OFFSET, cs))
            .collect();
        if e.table_size > 0 {
            out.push((
                e.table_offset,
                (u64::from(e.table_size) * 8).next_multiple_of(cs),
            ));
        }
        Ok(out)
    }

    /// Removes bitmap `name` (also an inconsistent one) and frees its clusters.
    pub fn remove_bitmap(&self, name: &[u8]) -> Result<()> {
        let (mut dir, i) = self.find_bitmap(name)?;
        let e = dir.entries.remove(i);
        dir.freed = self.bitmap_clusters(&e)?;
        self.replace_directory(dir)
    }

    /// Starts (`true`) or stops recording writes in bitmap `name`.
    pub fn set_bitmap_enabled(&self, name: &[u8], enabled: bool) -> Result<()> {
        let (mut dir, i) = self.find_bitmap(name)?;
        let e = &mut dir.entries[i];
        if e.flags & IN_USE != 0 {
            return Err(inconsistent(name));
        }
        e.flags = if enabled {
            e.flags | AUTO
        } else {
            e.flags & !AUTO
        };
        self.write_directory_in_place(&dir)
    }

    /// The bits of bitmap `name`.
    pub fn bitmap_bits(&self, name: &[u8]) -> Result<BitmapBits> {
        let (dir, i) = self.find_bitmap(name)?;
        let e = &dir.entries[i];
        if e.flags & IN_USE != 0 {
            return Err(inconsistent(name));
        }
        let cs = self.geo.cluster_size() as usize;
        let mut out = BitmapBits {
            granularity: e.granularity(),
            disk_size: self.size,
            bits: Vec::new(),
        };
        let bytes = out.len().div_ceil(8) as usize;
        let table = self.bitmap_table(e)?;
        if table.len() * cs < bytes {
            return Err(Error::Corrupt(format!(
                "the table of bitmap '{}' is too small for the disk",
                e.display_name()
            )));
        }
        let mut bits = vec![0u8; table.len() * cs];
        for (chunk, &t) in bits.chunks_mut(cs).zip(&table) {
            match t & DATA_OFFSET {
                0 if t == ALL_ONES => chunk.fill(0xff),
                0 => {}
                host => self.file.read_at(chunk, host).map_err(|err| {
                    Error::io(format!("reading bitmap '{}'", e.display_name()), err)
                })?,
            }
        }
        bits.truncate(bytes);
        let tail = out.len() % 8;
        if let (Some(last), true) = (bits.last_mut(), tail != 0) {
            *last &= (1u8 << tail) - 1;
        }
        out.bits = bits;
        Ok(out)
    }

    /// Replaces the bits of bitmap `i` of `dir` with `bits` (same size and granularity).
    fn store_bitmap_bits(
        &self,
        mut dir: BitmapDirectory,
        i: usize,
        bits: &BitmapBits,
    ) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let old = self.bitmap_clusters(&dir.entries[i])?;
        let mut table = Vec::new();
        for chunk in bits.bits.chunks(cs) {
            if chunk.iter().all(|&b| b == 0) {
                table.push(0);
            } else {
                table.push(self.write_new_clusters(chunk, "bitmap data")?);
            }
        }
        table.resize(dir.entries[i].table_size as usize, 0);
        dir.entries[i].table_offset =
            self.write_new_clusters(&encode_u64_table(&table), "a bitmap table")?;
        self.write_directory_in_place(&dir)?;
        let mut m = self.meta_mut();
        for (offset, len) in old {
            m.free_later(offset, len);
        }
        m.writeback(&*self.file)
    }

    /// Clears every bit of bitmap `name`.
    pub fn clear_bitmap(&self, name: &[u8]) -> Result<()> {
        self.fill_bitmap(name, false)
    }

    /// Sets every bit of bitmap `name`: the whole disk counts as written (after a writer
    /// that does not track its writes, such as `convert -n`).
    pub fn dirty_whole_bitmap(&self, name: &[u8]) -> Result<()> {
        self.fill_bitmap(name, true)
    }

    /// Sets every bit of bitmap `name` to `value`.
    fn fill_bitmap(&self, name: &[u8], value: bool) -> Result<()> {
        let mut bits = self.bitmap_bits(name)?;
        bits.bits.fill(if value { 0xff } else { 0 });
        let tail = bits.len() % 8;
        if let (Some(last), true) = (bits.bits.last_mut(), tail != 0) {
            *last &= (1u8 << tail) - 1;
        }
        let (dir, i) = self.find_bitmap(name)?;
        self.store_bitmap_bits(dir, i, &bits)
    }

    /// Sets in bitmap `name` the bits of every range dirty in `source` (a bitmap of a disk
    /// of the same size; its granularity may differ).
    pub fn merge_into_bitmap(&self, name: &[u8], source: &BitmapBits) -> Result<()> {
        let mut bits = self.bitmap_bits(name)?;
        if source.disk_size != bits.disk_size {
            return Err(Error::InvalidOption(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) \
                 and can't be merged",
                bits.disk_size, source.disk_size
            )));
        }
        for j in (0..source.len()).filter(|&j| source.get(j)) {
            let start = j * source.granularity;
            let end = ((j + 1) * source.granularity).min(source.disk_size);
            for k in start / bits.granularity..=(end - 1) / bits.granularity {
                bits.set(k);
            }
        }
        let (dir, i) = self.find_bitmap(name)?;
        self.store_bitmap_bits(dir, i, &bits)
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
            return Err(inconsistent(&e.name));
        }
        // Damaged tables, and bitmaps QEMU could not load at the new size, are refused
        // before anything changes.
        for e in &dir.entries {
            self.bitmap_table(e)?;
            if !self.bitmap_fits(e.granularity(), new) {
                return Err(Error::InvalidOption(format!(
                    "Bitmap '{}' cannot cover the new size: Too much space will be occupied \
                     by the bitmap. Use larger granularity",
                    e.display_name()
                )));
            }
        }
        for e in &mut dir.entries {
            e.flags |= IN_USE;
        }
        self.write_directory_in_place(&dir)?;
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
        self.write_directory_in_place(&dir)?;
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
            let granularity = e.granularity();
            let keep_bits = old.min(new).div_ceil(granularity);
            let entries = new.div_ceil(granularity).div_ceil(bits_per_cluster).max(1);
            let mut table = self.bitmap_table(e)?;
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
            let new_offset =
                self.write_new_clusters(&encode_u64_table(&table), "a bitmap table")?;
            if e.table_size > 0 {
                dir.freed.push((
                    e.table_offset,
                    (u64::from(e.table_size) * 8).next_multiple_of(cs),
                ));
            }
            e.table_offset = new_offset;
            e.table_size = u32::try_from(entries).expect("a bitmap table fits a u32");
        }
        self.write_directory_in_place(dir)
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
        match host {
            0 => self.write_new_clusters(&data, "bitmap data"),
            _ if data == before => Ok(entry),
            _ => {
                let file = &*self.file;
                let mut m = self.meta_mut();
                m.check_write(file, host, cs, Target::New)?;
                file.write_at(&data, host)
                    .map_err(|e| Error::io(format!("writing a bitmap cluster at 0x{host:x}"), e))?;
                Ok(entry)
            }
        }
    }
}
