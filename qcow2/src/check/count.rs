//! Counting every reference the metadata makes (QEMU's calculate_refcounts): header, L1
//! and L2 tables and what they map, snapshots, bitmaps, refcount table and blocks.

use super::{exceeds_file, strerror, Checker, Failed, Repair, MAX_CLUSTERS};
use crate::engine::overlap::Target;
use crate::error::Error;
use crate::format::bitmaps::table_entry_valid;
use crate::format::header::{be16, be32, be64, AUTOCLEAR_BITMAPS, MAX_L1_BYTES};
use crate::format::tables::{
    L2Entry, ALL_ALLOC, ALL_ZERO, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO,
};

type Outcome<T = ()> = std::result::Result<T, Failed>;

/// How QEMU classifies an L2 entry for the check.
pub(super) enum Kind {
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Compressed data: `len` bytes at byte `host`.
    Compressed {
        host: u64,
        len: u64,
    },
    /// Normal data or a preallocated zero cluster at `host`.
    Allocated(u64),
}

/// QEMU's cluster type of `raw` (offset 0 is a real cluster only in an external data file,
/// and only with COPIED set; with `extended` L2 entries, bit 0 is no zero flag).
pub(super) fn classify(raw: u64, cluster_bits: u32, data_file: bool, extended: bool) -> Kind {
    let host = raw & OFFSET_MASK;
    if let L2Entry::Compressed { host, len } = L2Entry::decode(raw, cluster_bits) {
        Kind::Compressed { host, len }
    } else if raw & ZERO != 0 && !extended {
        match host {
            0 => Kind::ZeroPlain,
            _ => Kind::Allocated(host),
        }
    } else if host == 0 && !(data_file && raw & COPIED != 0) {
        Kind::Unallocated
    } else {
        Kind::Allocated(host)
    }
}

/// Which L1 table is being walked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// The active one: allocation statistics are gathered.
    Active,
    /// A snapshot's.
    Snapshot,
}

impl Checker<'_> {
    /// Counts one reference to every cluster of `[offset, offset + size)` (QEMU's
    /// qcow2_inc_refcounts_imrt). A region a cluster or more past the end of the file is an
    /// error and is not counted.
    pub(super) fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        if exceeds_file(offset, size, self.file_len, self.cs) {
            self.say(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            self.report.corruptions += 1;
            self.past_eof.push((offset, size));
            return;
        }
        let last = (offset + size - 1) / self.cs;
        for c in offset / self.cs..=last {
            let n = self.imrt.get(c);
            if n == self.imrt.max() {
                self.say(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    c * self.cs
                ));
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing",
                );
                self.report.corruptions += 1;
                continue;
            }
            self.imrt.set(c, n + 1);
        }
    }

    /// Counts all references; `mode` repairs what can be repaired on the way.
    pub(super) fn count_all(&mut self, mode: Repair) -> Outcome {
        let h = self.img.header();
        self.inc(0, self.cs);
        self.count_l1(h.l1_table_offset, h.l1_size, Table::Active, mode)?;
        self.count_snapshots(mode)?;
        let snapshot_table = self.img.meta().fixed.snapshot_table;
        if let Some((offset, len)) = snapshot_table {
            self.inc(offset, len);
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) * self.cs;
        self.inc(h.refcount_table_offset, reftable_bytes);
        // Without the autoclear bit, QEMU ignores the bitmaps (and their clusters leak).
        if let Some(bm) = h
            .bitmaps
            .as_ref()
            .filter(|_| h.autoclear_features & AUTOCLEAR_BITMAPS != 0)
        {
            self.count_bitmaps(bm.directory_offset(), bm.directory_size())?;
        }
        self.count_refblocks(mode)
    }

    /// Counts the snapshots' L1 tables and what they map.
    fn count_snapshots(&mut self, mode: Repair) -> Outcome {
        let snapshots = self.snapshots.clone();
        if self.img.has_data_file() && !snapshots.is_empty() {
            self.say(format!(
                "ERROR {} snapshots in image with data file",
                snapshots.len()
            ));
            self.report.corruptions += 1;
        }
        for s in &snapshots {
            // The snapshot's id and name as stored: they need not be UTF-8.
            let what = |rest: String| {
                let mut line = b"ERROR snapshot ".to_vec();
                line.extend_from_slice(&s.id);
                line.extend_from_slice(b" (");
                line.extend_from_slice(&s.name);
                line.extend_from_slice(b") ");
                line.extend_from_slice(rest.as_bytes());
                line
            };
            if s.l1_table_offset % self.cs != 0 {
                self.say(what(format!(
                    "l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry \
                     corrupted",
                    s.l1_table_offset
                )));
                self.report.corruptions += 1;
            } else if u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
                self.say(what(format!(
                    "l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.l1_size
                )));
                self.report.corruptions += 1;
            } else {
                self.count_l1(s.l1_table_offset, s.l1_size, Table::Snapshot, mode)?;
            }
        }
        Ok(())
    }

    /// Reads `entries` big-endian u64s at `offset`; past the end of the file reads zeros.
    pub(super) fn read_u64s(&self, offset: u64, entries: u64) -> std::io::Result<Vec<u64>> {
        let mut buf = vec![0u8; (entries * 8) as usize];
        self.file.read_at(&mut buf, offset)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// [`Checker::read_u64s`] for the counting functions, which fail with QEMU's words.
    fn read_table(&mut self, offset: u64, entries: u64, what: &str) -> Outcome<Vec<u64>> {
        self.read_u64s(offset, entries).map_err(|_| {
            self.say(format!("ERROR: I/O error in {what}"));
            self.report.check_errors += 1;
            Failed::eio()
        })
    }

    /// Counts an L1 table, its L2 tables and what they map (QEMU's check_refcounts_l1).
    fn count_l1(&mut self, offset: u64, entries: u32, table: Table, mode: Repair) -> Outcome {
        if entries == 0 {
            return Ok(());
        }
        self.inc(offset, u64::from(entries) * 8);
        let l1 = self.read_table(offset, entries.into(), "check_refcounts_l1")?;
        for e in l1.into_iter().filter(|&e| e != 0) {
            if e & L1_RESERVED != 0 {
                self.say(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.report.corruptions += 1;
            }
            let l2 = e & OFFSET_MASK;
            self.inc(l2, self.cs);
            if l2 % self.cs != 0 {
                self.say(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.report.corruptions += 1;
            }
            self.count_l2(l2, table, mode)?;
        }
        Ok(())
    }

    /// Counts what an L2 table maps (QEMU's check_refcounts_l2). Fragmentation is counted
    /// within the table: each table starts a new run.
    fn count_l2(&mut self, l2: u64, table: Table, mode: Repair) -> Outcome {
        let words = self.read_table(l2, self.cs / 8, "check_refcounts_l2")?;
        let data_file = self.img.has_data_file();
        let extended = self.words == 2;
        let mut next_contiguous = 0;
        for (i, entry) in words.chunks_exact(self.words as usize).enumerate() {
            let raw = entry[0];
            let bitmap = if extended { entry[1] } else { 0 };
            let kind = classify(raw, self.bits, data_file, extended);
            if !matches!(kind, Kind::Compressed { .. }) && raw & L2_RESERVED != 0 {
                self.say(format!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
                self.report.corruptions += 1;
            }
            match kind {
                Kind::Compressed { host, len } => {
                    self.count_compressed(i, raw, bitmap, host, len, table)
                }
                Kind::Allocated(host) => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.report.corruptions += 1;
                        self.say(format!(
                            "ERROR offset={host:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    let at = l2 + i as u64 * self.words * 8;
                    let has_data = match extended {
                        true => bitmap & ALL_ALLOC != 0,
                        false => raw & ZERO == 0,
                    };
                    if self.check_alignment(l2, at, host, has_data, bitmap, mode)? {
                        continue;
                    }
                    if table == Table::Active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + self.cs;
                    }
                    if !data_file {
                        self.inc(host, self.cs);
                    }
                }
                Kind::Unallocated if bitmap & ALL_ALLOC != 0 => {
                    self.report.corruptions += 1;
                    self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                }
                Kind::Unallocated | Kind::ZeroPlain => {}
            }
        }
        Ok(())
    }

    /// Counts compressed data of `len` bytes at `host` (entry `i` of its table, `raw`, with
    /// subcluster `bitmap`).
    fn count_compressed(
        &mut self,
        i: usize,
        raw: u64,
        bitmap: u64,
        host: u64,
        len: u64,
        table: Table,
    ) {
        if raw & COPIED != 0 {
            self.say(format!(
                "ERROR: coffset=0x{host:x}: copied flag must never be set for compressed \
                 clusters"
            ));
            self.report.corruptions += 1;
        }
        let raw = raw & !COPIED;
        if self.img.has_data_file() {
            self.say(format!(
                "ERROR compressed cluster {i} with data file, entry=0x{raw:x}"
            ));
            self.report.corruptions += 1;
            return;
        }
        if bitmap != 0 {
            self.say(format!(
                "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, \
                 entry=0x{raw:x}"
            ));
            self.report.corruptions += 1;
            return;
        }
        self.inc(host, len);
        if table == Table::Active {
            // Compressed clusters count as fragmented, as in QEMU.
            self.report.allocated_clusters += 1;
            self.report.compressed_clusters += 1;
            self.report.fragmented_clusters += 1;
        }
    }

    /// Reports an entry (at file offset `at` of the L2 table at `l2`, with subcluster
    /// `bitmap`) whose host offset is not cluster aligned. A preallocated cluster without
    /// data loses its allocation if `mode` repairs errors; returns whether it did (the entry
    /// then references nothing).
    fn check_alignment(
        &mut self,
        l2: u64,
        at: u64,
        host: u64,
        has_data: bool,
        bitmap: u64,
        mode: Repair,
    ) -> Outcome<bool> {
        if host % self.cs == 0 {
            return Ok(false);
        }
        self.report.corruptions += 1;
        if has_data {
            self.say(format!(
                "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ));
            return Ok(false);
        }
        let word = if mode.errors() { "Repairing" } else { "ERROR" };
        self.say(format!(
            "{word} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry \
             corrupted."
        ));
        if !mode.errors() {
            return Ok(false);
        }
        // With extended L2 entries: no host cluster, and what was allocated reads as zeros.
        let zeroed = match self.words {
            2 => vec![0, (bitmap | bitmap << 32) & ALL_ZERO],
            _ => vec![ZERO],
        };
        if !self.overwrite_l2_entry(l2, at, &zeroed)? {
            // Still there: still a corruption, and its cluster still counted.
            return Ok(false);
        }
        self.report.corruptions -= 1;
        self.report.corruptions_fixed += 1;
        Ok(true)
    }

    /// Writes one L2 entry (its words) at file offset `at` of the L2 table at `table` (a
    /// repair; the table may be unaligned, as its L1 entry says) and drops the cached table;
    /// returns whether the write succeeded (a failure is reported as a check error).
    fn overwrite_l2_entry(&mut self, table: u64, at: u64, words: &[u64]) -> Outcome<bool> {
        let bytes = crate::engine::meta::encode_u64_table(words);
        let mut m = self.img.meta_mut();
        if let Err(e) = m.check_write(self.file, at, bytes.len() as u64, Target::L2(table)) {
            drop(m);
            if let Error::MarkedCorrupt(what) = &e {
                self.say_marked_corrupt(what);
            }
            self.say("ERROR: Overlap check failed");
            self.report.check_errors += 1;
            return Err(Failed::eio());
        }
        m.forget_l2_table(table);
        let written = self
            .file
            .write_at(&bytes, at)
            .and_then(|()| self.file.flush());
        drop(m);
        if let Err(e) = &written {
            self.say(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                strerror(e)
            ));
            self.report.check_errors += 1;
        }
        Ok(written.is_ok())
    }

    /// Counts the bitmap directory, the bitmap tables and the bitmap data clusters.
    fn count_bitmaps(&mut self, dir_off: u64, dir_size: u64) -> Outcome {
        if dir_size > 64 << 20 {
            self.report.corruptions += 1;
            return Err(Failed("Invalid argument".into()));
        }
        self.inc(dir_off, dir_size);
        let mut dir = vec![0u8; dir_size as usize];
        if self.file.read_at(&mut dir, dir_off).is_err() {
            self.report.corruptions += 1;
            return Err(Failed::eio());
        }
        let mut pos = 0usize;
        while pos + 24 <= dir.len() {
            let table_off = be64(&dir, pos);
            let table_size = u64::from(be32(&dir, pos + 8));
            let name_size = be16(&dir, pos + 18) as usize;
            let extra = be32(&dir, pos + 20) as usize;
            if table_size * 8 > 64 << 20 {
                self.report.corruptions += 1;
                return Err(Failed("Invalid argument".into()));
            }
            self.inc(table_off, table_size * 8);
            let table = self.read_table(table_off, table_size, "the bitmap check")?;
            for e in table {
                if !table_entry_valid(e, self.cs) {
                    self.report.corruptions += 1;
                } else if e & OFFSET_MASK != 0 {
                    self.inc(e & OFFSET_MASK, self.cs);
                }
            }
            pos += (24 + extra + name_size).div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Counts the refcount blocks, checking their table entries (QEMU's check_refblocks):
    /// an unusable entry means a rebuild; a block past the end of the file is repaired by
    /// growing the file if `mode` repairs errors.
    fn count_refblocks(&mut self, mode: Repair) -> Outcome {
        let reftable = self.img.meta().reftable.clone();
        for (i, e) in reftable.into_iter().enumerate() {
            let offset = e & !0x1ff;
            let cluster = offset / self.cs;
            if e & 0x1ff != 0 {
                self.say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
            } else if offset % self.cs != 0 {
                self.say(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
            } else if cluster >= self.imrt.len() {
                self.refblock_outside(i, offset, mode)?;
                continue;
            } else {
                if offset == 0 {
                    continue;
                }
                self.inc(offset, self.cs);
                let n = self.imrt.get(cluster);
                if n == 1 {
                    continue;
                }
                self.say(format!("ERROR refcount block {i} refcount={n}"));
            }
            self.report.corruptions += 1;
            self.rebuild = true;
        }
        Ok(())
    }

    /// A refcount block past the end of the file: an error, or with `mode` repairing
    /// errors, the file grows to hold it (it reads as zeros).
    fn refblock_outside(&mut self, i: usize, offset: u64, mode: Repair) -> Outcome {
        self.report.corruptions += 1;
        let word = if mode.errors() { "Repairing" } else { "ERROR" };
        self.say(format!("{word} refcount block {i} is outside image"));
        if !mode.errors() {
            return Ok(());
        }
        let grown = offset
            .checked_add(self.cs)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|end| self.grow_file(end).map(|()| end));
        match grown {
            Ok(end) => {
                self.file_len = end;
                self.imrt.grow(end.div_ceil(self.cs));
                self.report.corruptions -= 1;
                self.report.corruptions_fixed += 1;
                self.inc(offset, self.cs);
            }
            Err(e) => {
                self.rebuild = true;
                self.say(format!("ERROR could not resize image: {}", strerror(&e)));
            }
        }
        Ok(())
    }

    /// Makes the file `len` bytes long (at most [`MAX_CLUSTERS`] clusters, as in QEMU).
    fn grow_file(&mut self, len: u64) -> std::io::Result<()> {
        let clusters = len.div_ceil(self.cs);
        let grown = if clusters > MAX_CLUSTERS {
            Err(std::io::Error::from_raw_os_error(libc::EFBIG))
        } else if !self.imrt.can_grow(clusters) {
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            self.file.set_len(len)
        };
        if let Err(e) = &grown {
            self.report_error(format!("Could not resize file: {}", strerror(e)));
        }
        grown
    }
}
