//! The qcow2 I/O engine: an image handle shared by many threads.
//!
//! Metadata lives in [`meta::Meta`] behind a read-write lock: lookups that hit the L2 cache
//! take it shared; cache misses, allocation and table updates take it exclusively, but never
//! across guest-data I/O. Allocating writes mark their guest clusters busy so overlapping
//! writes to the same cluster are serialised; everything else runs in parallel.

mod amend;
mod bitmaps;
pub(crate) mod busy;
pub(crate) mod cache;
mod l2;
mod map;
pub(crate) mod meta;
pub(crate) mod overlap;
mod read;
mod refcount_order;
mod resize;
mod snapshot_ops;
mod write;

pub use bitmaps::BitmapBits;
/// Helpers that create and open scratch images, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) use resize::tests as test_images;

use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::header::{
    CompressionType, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY,
    MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use crate::format::snapshot::{self, PlaceProblem, Snapshot};
use crate::format::tables::{L2Entry, OFFSET_MASK};
use crate::image::{check_range, BlockStatus, Format, Image, IoMapping, MapOutcome, MetadataLoad};
use crate::open::{open_backing, open_data_file, OpenOptions};
use crate::storage::Storage;

use busy::BusyClusters;
use cache::TableCache;
use meta::{read_u64_table, Geometry, Meta};
use overlap::FixedMetadata;

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    data_file: Option<Arc<dyn Storage>>,
    backing: Option<Box<dyn Image>>,
    geo: Geometry,
    size: u64,
    version: u32,
    compression: CompressionType,
    read_only: bool,
    /// Opened with `OpenOptions::metadata_only`: no guest data I/O at all.
    metadata_only: bool,
    snapshots: Vec<Snapshot>,
    meta: RwLock<Meta>,
    busy: Arc<BusyClusters>,
    /// Opened for a check (QEMU's BDRV_O_CHECK): the snapshot table was not read (the
    /// check reads it), so nothing else may rewrite it.
    opened_for_check: bool,
    /// Set once an overlap check marked the image corrupt: no more writes.
    marked_corrupt: Arc<std::sync::atomic::AtomicBool>,
    /// The repair of a dirty image done when it was opened for writing.
    dirty_repair: Option<crate::check::CheckReport>,
    /// The bitmaps extension was left by a writer without bitmap support (its autoclear bit
    /// clear when opened).
    inconsistent_bitmaps: bool,
    /// Corruption found in the metadata marks the image corrupt (opened for writing, not
    /// for a check), as QEMU's fatal corruption events do.
    fatal_corruption: bool,
}

impl Qcow2 {
    /// Opens a qcow2 image from storage. `dir` resolves relative backing file names;
    /// without it (or with `opts.no_backing`) the backing file is not opened.
    pub fn open_storage(
        file: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
    ) -> Result<Qcow2> {
        let read_only_opts;
        let opts = if opts.metadata_only && !opts.read_only {
            read_only_opts = OpenOptions {
                read_only: true,
                ..opts.clone()
            };
            &read_only_opts
        } else {
            opts
        };
        let file_len = file
            .len()
            .map_err(|e| Error::io("getting the image size", e))?;
        // The header cluster, its size read from its first sector (the smallest cluster):
        // nothing past it is read (a sector there may be unreadable). A file that ends
        // inside it reads on as zeros, as QEMU's reads past the end do: cut after the fixed
        // header, the image opens and check reports what the cut took; cut inside it, it is
        // refused with QEMU's words (a cluster size of 2^0, say).
        let read_header = |buf: &mut [u8], at: u64| {
            let present = file_len.saturating_sub(at).min(buf.len() as u64) as usize;
            file.read_at(&mut buf[..present], at)
                .map_err(|e| Error::io("Could not read qcow2 header", e))
        };
        // A read of the rest that fails is redone sector by sector: the header may not need
        // the sectors that fail, as QEMU reads only what it needs.
        let sector = 1usize << MIN_CLUSTER_BITS;
        let mut first = vec![0u8; sector];
        read_header(&mut first, 0)?;
        let cluster_bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
        let mut failed = Vec::new();
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            first.resize(1 << cluster_bits, 0);
            if read_header(&mut first[sector..], sector as u64).is_err() {
                for (k, part) in first.chunks_mut(sector).enumerate().skip(1) {
                    if read_header(part, (k * sector) as u64).is_err() {
                        failed.push(k * sector..(k + 1) * sector);
                    }
                }
            }
        }
        let parsed = Header::parse(&first);
        // A header that does not parse may owe it to the sectors that failed.
        let unreadable = !failed.is_empty()
            && parsed.as_ref().map_or(true, |h| {
                let used = h.ranges_used(&first);
                let overlap = |s: &std::ops::Range<usize>, u: &std::ops::Range<usize>| {
                    u.start < s.end && s.start < u.end
                };
                failed.iter().any(|s| used.iter().any(|u| overlap(s, u)))
            });
        if unreadable {
            let eio = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(Error::io("Could not read qcow2 header", eio));
        }
        let header = parsed?;
        if header.refcount_table_clusters == 0 && !opts.check {
            // QEMU's words; `check` opens the image to report it.
            return Err(Error::InvalidHeader(
                "Image does not contain a reference count table".into(),
            ));
        }
        header.check_supported()?;
        if !opts.metadata_only {
            header.check_unencrypted()?;
        }
        if header.is_corrupt() && !opts.read_only && !opts.check {
            return Err(Error::CorruptBitSet);
        }
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            refcount_order: header.refcount_order,
            extended_l2: header.extended_l2(),
        };
        let cs = geo.cluster_size();
        let within = |what: &str, off: u64, len: u64| {
            if off
                .checked_add(len)
                .is_some_and(|end| end <= file_len.next_multiple_of(cs))
            {
                Ok(())
            } else {
                Err(Error::Corrupt(format!(
                    "{what} at 0x{off:x} ({len} bytes) extends past the end of the file"
                )))
            }
        };
        // A reader sees L1 and refcount tables past the end of the file as zeros, and
        // tables at offset 0 as the header's bytes, as QEMU does (its reads past the end
        // return zeros); a check reports them and its repair moves them, as QEMU's does.
        // Only other writers, which would write them there, refuse them.
        let reftable_bytes = header.refcount_table_clusters as u64 * cs;
        if !opts.read_only && !opts.check {
            header.check_tables_off_header()?;
            let l1_bytes = header.l1_size as u64 * 8;
            within("L1 table", header.l1_table_offset, l1_bytes)?;
            within(
                "refcount table",
                header.refcount_table_offset,
                reftable_bytes,
            )?;
        }
        // QEMU's words for what could not be read.
        let l1 = read_table_within(&*file, header.l1_table_offset, header.l1_size, file_len)
            .map_err(|e| e.reworded("Could not read L1 table"))?;
        let reftable = read_u64_table(
            &*file,
            header.refcount_table_offset,
            (reftable_bytes / 8) as usize,
        )
        .map_err(|e| e.reworded("Could not initialize refcount handling"))?;
        let snapshot_table = match opts.check {
            // A check reads the table itself, to report and repair what it finds (QEMU's
            // check mode too opens without it).
            true => snapshot::Table::default(),
            false => {
                let (offset, count) = (header.snapshots_offset, header.nb_snapshots);
                match snapshot::place_problem(offset, count, cs) {
                    Some(PlaceProblem::TooLarge) => {
                        return Err(Error::InvalidHeader("Snapshot table too large".into()))
                    }
                    Some(PlaceProblem::OffsetInvalid) => {
                        return Err(Error::InvalidHeader("Snapshot table offset invalid".into()))
                    }
                    None => read_snapshot_table(&*file, offset, count, false)?,
                }
            }
        };
        let snapshots = snapshot_table.snapshots;
        let l1 = match &opts.snapshot {
            Some(r) => crate::open::snapshot_l1(&*file, &snapshots, r, opts.read_only, cs)?,
            None => l1,
        };
        // The name alone does not make the data external: without the incompatible bit,
        // QEMU keeps guest data in the image file and only shows the name.
        let data_file = match &header.data_file {
            Some(name) if header.has_external_data() => Some(open_data_file(name, opts)?),
            // Opens without I/O (info) go on without it, as QEMU's.
            None if header.has_external_data() && !opts.metadata_only => {
                return Err(Error::InvalidHeader(
                    "'data-file' is required for this image".into(),
                ))
            }
            _ => None,
        };
        if data_file.is_none() && header.data_file_raw() && !opts.metadata_only {
            return Err(Error::InvalidHeader(
                "data-file-raw requires a data file".into(),
            ));
        }
        let backing = match (&header.backing_file, dir) {
            (Some(name), Some(dir)) if !opts.no_backing => Some(open_backing(
                name,
                header.backing_format.as_deref(),
                dir,
                opts,
            )?),
            _ => None,
        };
        let corrupt = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let meta = Meta {
            data_file: data_file.clone(),
            claims_space: !opts.defer_space_claims,
            unmap: opts.unmap && !header.has_external_data(),
            file_len_seen: file_len,
            tables_past_eof_read_as_zeros: opts.read_only,
            geo,
            l1,
            l1_dirty: false,
            l2: TableCache::new(l2::l2_cache_slices(opts.l2_cache_bytes, header.size, &geo)),
            reftable_used: meta::used_entries(&reftable),
            reftable,
            reftable_dirty: false,
            refblocks: TableCache::new(
                (opts.refcount_cache_bytes.unwrap_or(4 << 20) / cs).max(4) as usize
            ),
            pending_frees: Vec::new(),
            free_hint: 0,
            compressed_tail: None,
            header: header.clone(),
            fixed: FixedMetadata {
                snapshot_table: (snapshot_table.len > 0)
                    .then_some((header.snapshots_offset, snapshot_table.len as u64)),
                snapshot_l1s: snapshots
                    .iter()
                    .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
                    .collect(),
            },
            corrupt: corrupt.clone(),
            lazy_refcounts: header.lazy_refcounts() && !opts.read_only && !opts.check,
            l2_generation: 0,
        };
        let mut img = Qcow2 {
            file,
            data_file,
            backing,
            geo,
            // QEMU counts whole sectors: the tail of a size that is no multiple of 512 is not
            // part of the disk.
            size: header.size / 512 * 512,
            version: header.version,
            compression: header.compression_type,
            read_only: opts.read_only,
            metadata_only: opts.metadata_only,
            opened_for_check: opts.check,
            snapshots,
            marked_corrupt: corrupt,
            meta: RwLock::new(meta),
            busy: Arc::default(),
            dirty_repair: None,
            inconsistent_bitmaps: header.bitmaps.is_some()
                && header.autoclear_features & AUTOCLEAR_BITMAPS == 0,
            fatal_corruption: !opts.read_only && !opts.check,
        };
        let ready = match img.check_bitmaps_at_open() {
            Ok(()) if !opts.read_only => img.prepare_for_writing(opts),
            Ok(()) => Ok(None),
            Err(e) => Err(e),
        };
        match ready {
            Ok(repair) => img.dirty_repair = repair,
            Err(e) => {
                // Nothing is written (as after a corruption): closing would write the
                // refcounts back and clear the dirty bit, and the next open would then skip
                // the repair and allocate from refcounts a crash (or a failed repair) left
                // wrong.
                img.marked_corrupt
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(img)
    }

    /// Repairs a dirty image (returning what the repair found) and clears autoclear bits we
    /// do not maintain (as QEMU does; the bitmaps' bit stays with `keep_bitmaps`), unless
    /// the image is opened for a check (which only fixes refcounts and flags, so bitmaps stay
    /// valid). The L1 and refcount tables, written back in place, get their file space
    /// claimed (an image made with truncate may have holes there).
    fn prepare_for_writing(
        &mut self,
        opts: &crate::OpenOptions,
    ) -> Result<Option<crate::check::CheckReport>> {
        if opts.check {
            return Ok(None);
        }
        let mut m = self.meta_mut();
        let l1 = (m.header.l1_table_offset, m.l1.len() as u64 * 8);
        let reftable = (
            m.header.refcount_table_offset,
            u64::from(m.header.refcount_table_clusters) * self.geo.cluster_size(),
        );
        m.claim_space(&*self.file, l1.0, l1.1, "the L1 table")?;
        m.claim_space(&*self.file, reftable.0, reftable.1, "the refcount table")?;
        let mut header = m.header.clone();
        let mut repair = None;
        if header.is_dirty() {
            drop(m);
            repair = Some(crate::check::repair_dirty(self)?);
            // The repair may have rewritten the snapshot table (incomplete entries).
            let (offset, count) = {
                let h = &self.meta().header;
                (h.snapshots_offset, h.nb_snapshots)
            };
            self.snapshots = read_snapshot_table(&*self.file, offset, count, false)?.snapshots;
            m = self.meta_mut();
            header = m.header.clone();
            header.incompatible_features &= !INCOMPAT_DIRTY;
        }
        let kept = match opts.keep_bitmaps {
            true => AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS,
            false => AUTOCLEAR_DATA_FILE_RAW,
        };
        header.autoclear_features &= kept;
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            // Bitmaps no writer maintains are gone, as QEMU drops their extension (their
            // clusters leak).
            header.bitmaps = None;
        }
        if header != m.header {
            m.header = header;
            m.write_header(&*self.file)?;
        }
        Ok(repair)
    }

    pub(crate) fn meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn meta_mut(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The metadata file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Where guest data lives: the external data file, or the image file itself.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Whether a backing file is open under the image.
    pub fn has_backing_file(&self) -> bool {
        self.backing.is_some()
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    /// The external data file, if it must stay a raw image of the disk (data-file-raw).
    pub(crate) fn raw_data_file(&self) -> Option<&Arc<dyn Storage>> {
        self.data_file
            .as_ref()
            .filter(|_| self.meta().header.data_file_raw())
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta().header.clone()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Subcluster size in bytes: the cluster size without extended L2 entries.
    pub fn subcluster_size(&self) -> u64 {
        self.geo.unit_size()
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The compression algorithm for compressed writes.
    pub fn compression_type(&self) -> CompressionType {
        self.compression
    }

    /// The L2 entry of guest cluster `cluster` (loading its table if needed).
    pub fn l2_entry(&self, cluster: u64) -> Result<L2Entry> {
        Ok(self.lookup_run(cluster, 1)?[0])
    }

    /// Refcount of host cluster index `cluster` (0 past the refcount table).
    pub fn refcount(&self, cluster: u64) -> Result<u64> {
        self.meta_mut().refcount(&*self.file, cluster)
    }

    /// Entries for guest clusters `[cluster, cluster + n)`, stopping at the end of the L2
    /// slice (so possibly fewer than `n`, at least one).
    pub(crate) fn lookup_run(&self, cluster: u64, n: u64) -> Result<Vec<L2Entry>> {
        Ok(self
            .lookup_bitmaps(cluster, n)?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// Whether guest cluster `cluster`'s L2 table is allocated (its L1 entry is set).
    pub(crate) fn has_l2_table(&self, cluster: u64) -> bool {
        let l1i = (cluster / self.geo.l2_entries()) as usize;
        self.meta()
            .l1
            .get(l1i)
            .is_some_and(|e| e & OFFSET_MASK != 0)
    }

    /// [`Qcow2::lookup_run`] with each entry's subcluster bitmap (0 without extended L2
    /// entries). Entries whose bitmap is invalid are refused as corrupt, as QEMU does.
    pub(crate) fn lookup_bitmaps(&self, cluster: u64, n: u64) -> Result<Vec<(L2Entry, u64)>> {
        self.lookup_checked(cluster, n, Check::Read)
    }

    /// [`Qcow2::lookup_bitmaps`] for a write from guest byte `offset` on (in `cluster`): an
    /// unaligned entry is refused with QEMU's words for a write.
    pub(crate) fn lookup_for_write(
        &self,
        cluster: u64,
        n: u64,
        offset: u64,
    ) -> Result<Vec<(L2Entry, u64)>> {
        self.lookup_checked(cluster, n, Check::Write(offset))
    }

    /// [`Qcow2::lookup_bitmaps`] for block status: the entries stop before the first one
    /// QEMU would refuse, which only fails the lookup when it is `cluster`'s own (QEMU's
    /// runs end before a broken entry; the query that starts at it fails). One whose
    /// subcluster bitmap is invalid fails a run that reaches it: the caller gets its error.
    pub(crate) fn lookup_for_status(&self, cluster: u64, n: u64) -> Result<StatusEntries> {
        let (mut entries, broken) = self.lookup_unchecked(cluster, n, Check::Status)?;
        match broken {
            None => Ok(StatusEntries {
                entries,
                fails_a_run: None,
            }),
            Some(b) if b.index > 0 => {
                entries.truncate(b.index);
                Ok(StatusEntries {
                    entries,
                    fails_a_run: b.fails_a_run.then_some(b.error),
                })
            }
            Some(b) => Err(self.fatal(b.error)),
        }
    }

    /// [`Qcow2::lookup_bitmaps`], with the entries checked as `check` says: a broken one
    /// fails the lookup ([`Qcow2::fatal`]).
    fn lookup_checked(&self, cluster: u64, n: u64, check: Check) -> Result<Vec<(L2Entry, u64)>> {
        match self.lookup_unchecked(cluster, n, check)? {
            (entries, None) => Ok(entries),
            (_, Some(b)) => Err(self.fatal(b.error)),
        }
    }

    /// Entries `[cluster, cluster + n)` (at most to the end of their slice, at least one)
    /// and the first of them QEMU refuses for `check`, if any.
    fn lookup_unchecked(&self, cluster: u64, n: u64, check: Check) -> Result<Looked> {
        let per_l2 = self.geo.l2_entries();
        let l1i = (cluster / per_l2) as usize;
        let l2i = cluster % per_l2;
        let unallocated = |m: &Meta| {
            let per = m.l2_slice_entries();
            vec![(L2Entry::Unallocated, 0); n.min(per - l2i % per).max(1) as usize]
        };
        {
            let m = self.meta();
            let table = m.l2_table_offset(l1i)?;
            if table == 0 {
                return Ok((unallocated(&m), None));
            }
            if let Some(entries) = self.decode_slice(&m, table, l2i, n).map(Vec::from_iter) {
                let broken = self.first_broken(cluster, table, &entries, check);
                return Ok((entries, broken));
            }
        }
        let mut m = self.meta_mut();
        let table = m.l2_table_offset(l1i)?;
        if table == 0 {
            return Ok((unallocated(&m), None));
        }
        m.load_l2_slice(&*self.file, table, l2i)?;
        let entries: Vec<_> = self
            .decode_slice(&m, table, l2i, n)
            .expect("just loaded")
            .collect();
        let broken = self.first_broken(cluster, table, &entries, check);
        Ok((entries, broken))
    }

    /// Makes corruption `e` found in the metadata fatal, as QEMU does in an image opened
    /// for writing (not for a check): the image is marked corrupt, in memory and in its
    /// header, and takes no more writes. In a read-only image an [`Error::UnalignedTable`]
    /// becomes plain [`Error::Corrupt`]; other errors pass unchanged.
    fn fatal(&self, e: Error) -> Error {
        match e {
            Error::Corrupt(_) | Error::UnalignedTable(_) if self.fatal_corruption => {
                self.fatal_in(&mut self.meta_mut(), e)
            }
            Error::UnalignedTable(what) => Error::Corrupt(what),
            e => e,
        }
    }

    /// [`Qcow2::fatal`] for what a request returns: only the corruption QEMU makes fatal
    /// wherever it is met ([`Error::UnalignedTable`]); the rest was made fatal where found,
    /// or is not (a table past the end of the file, say).
    fn fatal_request(&self, e: Error) -> Error {
        match e {
            Error::UnalignedTable(_) => self.fatal(e),
            e => e,
        }
    }

    /// [`Qcow2::fatal`] for a caller holding the metadata `m`.
    pub(crate) fn fatal_in(&self, m: &mut Meta, e: Error) -> Error {
        match e {
            Error::Corrupt(what) | Error::UnalignedTable(what) if self.fatal_corruption => {
                if !self
                    .marked_corrupt
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::warn!("qcow2: Marking image as corrupt: {what}");
                    m.set_corrupt_bit(&*self.file);
                }
                Error::MarkedCorrupt(what)
            }
            Error::UnalignedTable(what) => Error::Corrupt(what),
            e => e,
        }
    }

    /// Entries `l2i..` (at most `n`, at least one, to the end of the slice) of the table at
    /// `table` with their bitmaps, if its slice is cached.
    pub(crate) fn decode_slice<'a>(
        &'a self,
        m: &'a Meta,
        table: u64,
        l2i: u64,
        n: u64,
    ) -> Option<impl Iterator<Item = (L2Entry, u64)> + 'a> {
        let per = m.l2_slice_entries();
        let start = (l2i % per) as usize;
        let n = n.min(per - start as u64).max(1) as usize;
        let slice = m.l2.get(m.l2_slice_key(table, l2i))?;
        let w = self.geo.l2_words() as usize;
        Some((start..start + n).map(move |k| {
            let bitmap = if w == 2 { slice[k * 2 + 1] } else { 0 };
            (self.decode_l2(slice[k * w]), bitmap)
        }))
    }

    /// Decodes one of this image's L2 entries (the first word of an extended one). Without
    /// an external data file, an entry with only the COPIED bit (host offset 0, where the
    /// header is) is unallocated, as in QEMU; with one, it maps guest data at the start of
    /// the data file.
    pub(crate) fn decode_l2(&self, raw: u64) -> L2Entry {
        let entry = if self.geo.extended_l2 {
            L2Entry::decode_extended(raw, self.geo.cluster_bits)
        } else {
            L2Entry::decode(raw, self.geo.cluster_bits)
        };
        match entry {
            L2Entry::Normal { host: 0, .. } if self.data_file.is_none() => L2Entry::Unallocated,
            entry => entry,
        }
    }

    /// The first of `entries` QEMU refuses, with QEMU's words: unaligned host offsets
    /// ([`Qcow2::first_unaligned`]), for reads the entries QEMU does not read
    /// ([`Qcow2::first_unreadable`]), and with extended L2 entries invalid bitmaps (a
    /// subcluster both allocated and zero; allocated subclusters without a host cluster).
    /// An entry broken in several ways gets the error QEMU meets first. `first` is the
    /// guest cluster of `entries[0]`, in the table at `table`.
    fn first_broken(
        &self,
        first: u64,
        table: u64,
        entries: &[(L2Entry, u64)],
        check: Check,
    ) -> Option<Broken> {
        let unaligned = self.first_unaligned(entries).map(|(i, host)| {
            let cluster = first + i as u64;
            let error = match check {
                Check::Write(offset) => {
                    let guest = offset.max(cluster * self.geo.cluster_size());
                    unaligned_write(entries[i].0, host, guest)
                }
                // The index in the whole table: QEMU's L2 cache entries are whole tables.
                Check::Read | Check::Status => {
                    unaligned_entry(host, table, cluster % self.geo.l2_entries())
                }
            };
            // A write meets it first; a read after the entry's type and bitmap.
            let rank = if matches!(check, Check::Write(_)) {
                0
            } else {
                2
            };
            (i, rank, error)
        });
        let index = |i: usize| c_hex((first + i as u64) % self.geo.l2_entries());
        let unreadable = match check {
            Check::Write(_) => None,
            Check::Read | Check::Status => self.first_unreadable(first, entries),
        }
        .map(|(i, why)| {
            let index = index(i);
            // QEMU checks the type of an entry before its offset, and the offset's
            // alignment before whether it matches the data file's.
            let rank = match why {
                Unreadable::ZeroInV2 | Unreadable::CompressedWithDataFile => 1,
                Unreadable::MovedInDataFile(_) => 3,
            };
            let what = match why {
                Unreadable::ZeroInV2 => format!(
                    "Zero cluster entry found in pre-v3 image (L2 offset: {}, L2 index: {index})",
                    c_hex(table)
                ),
                Unreadable::CompressedWithDataFile => format!(
                    "Compressed cluster entry found in image with external data file (L2 \
                     offset: {}, L2 index: {index})",
                    c_hex(table)
                ),
                // QEMU's words, unbalanced parenthesis included.
                Unreadable::MovedInDataFile(host) => format!(
                    "External data file host cluster offset {} does not match guest cluster \
                     offset: {}, L2 index: {index})",
                    c_hex(host),
                    c_hex((first + i as u64) * self.geo.cluster_size())
                ),
            };
            (i, rank, Error::Corrupt(what))
        });
        let invalid_bitmap = self
            .geo
            .extended_l2
            .then(|| {
                entries
                    .iter()
                    .position(|&(entry, bitmap)| !entry.valid_bitmap(bitmap))
            })
            .flatten()
            .map(|i| {
                let what = format!(
                    "Invalid cluster entry found  (L2 offset: {}, L2 index: {})",
                    c_hex(table),
                    index(i)
                );
                (i, 0, Error::Corrupt(what))
            });
        let (index, rank, error) = [invalid_bitmap, unreadable, unaligned]
            .into_iter()
            .flatten()
            .min_by_key(|&(i, rank, _)| (i, rank))?;
        Some(Broken {
            index,
            // QEMU's count of a run fails on an invalid bitmap; other entries end the run.
            fails_a_run: rank == 0 && !matches!(check, Check::Write(_)),
            error,
        })
    }

    /// Guest units (subclusters; clusters without extended L2 entries) `[unit, unit + n)`,
    /// each as the entry a cluster of one unit would have (see [`L2Entry::subcluster`]),
    /// stopping at the end of an L2 slice (at least one).
    pub(crate) fn lookup_units(&self, unit: u64, n: u64) -> Result<Vec<L2Entry>> {
        let per = self.geo.subclusters();
        if per == 1 {
            return self.lookup_run(unit, n);
        }
        let first = unit / per;
        let clusters = (unit % per + n).div_ceil(per);
        let entries = self.lookup_bitmaps(first, clusters)?;
        Ok(self.expand_units(first, &entries, unit, n).collect())
    }

    /// The per-unit entries `[unit, unit + n)` of `entries` (clusters from `first` on,
    /// validated), cut at the end of `entries`.
    pub(crate) fn expand_units<'a>(
        &'a self,
        first: u64,
        entries: &'a [(L2Entry, u64)],
        unit: u64,
        n: u64,
    ) -> impl Iterator<Item = L2Entry> + 'a {
        let per = self.geo.subclusters();
        let sc = self.geo.unit_size();
        let end = (unit + n).min((first + entries.len() as u64) * per);
        (unit..end).map(move |u| {
            let (entry, bitmap) = entries[(u / per - first) as usize];
            match per {
                1 => entry,
                _ => entry
                    .subcluster(bitmap, u % per, sc)
                    .expect("bitmaps are checked at lookup"),
            }
        })
    }

    /// Finds entries (with their bitmaps) that map guest clusters to host offsets not
    /// aligned to a cluster: the image is corrupt, and using such an entry would read, write
    /// or free parts of two clusters; QEMU refuses them too. Returns the first one's
    /// position in `entries` and its host offset.
    pub(crate) fn first_unaligned(&self, entries: &[(L2Entry, u64)]) -> Option<(usize, u64)> {
        let cs = self.geo.cluster_size();
        entries
            .iter()
            .enumerate()
            .find_map(|(i, &(entry, _))| match entry {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } if host % cs != 0 => Some((i, host)),
                _ => None,
            })
    }

    /// The first of `entries` (for guest clusters from `first` on) that QEMU refuses to
    /// read as corrupt, and why: a zero cluster in a version 2 image (which has none), a
    /// compressed cluster or a host offset other than the guest offset in an image with an
    /// external data file.
    pub(crate) fn first_unreadable(
        &self,
        first: u64,
        entries: &[(L2Entry, u64)],
    ) -> Option<(usize, Unreadable)> {
        let cs = self.geo.cluster_size();
        let external = self.data_file.is_some();
        if self.version >= 3 && !external {
            return None;
        }
        (first..)
            .zip(entries)
            .enumerate()
            .find_map(|(i, (cluster, &(entry, _)))| {
                let why = match entry {
                    L2Entry::Zero { .. } if self.version < 3 => Unreadable::ZeroInV2,
                    L2Entry::Compressed { .. } if external => Unreadable::CompressedWithDataFile,
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } if external && host != cluster * cs => Unreadable::MovedInDataFile(host),
                    _ => return None,
                };
                Some((i, why))
            })
    }

    /// Entries for guest clusters `[first, first + count)`, across slices and tables.
    pub(crate) fn lookup_all(&self, first: u64, count: u64) -> Result<Vec<L2Entry>> {
        let mut entries = self.lookup_run(first, count)?;
        while (entries.len() as u64) < count {
            let done = entries.len() as u64;
            entries.extend(self.lookup_run(first + done, count - done)?);
        }
        Ok(entries)
    }

    /// Writes all dirty metadata back to the files in crash-safe order (syncing in between
    /// where the order needs it), without the final sync.
    fn write_back(&self) -> Result<()> {
        self.meta_mut().writeback(&*self.file)
    }

    /// Writes back all metadata in crash-safe order and flushes the files.
    pub fn flush_metadata(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_back()?;
        if let Some(d) = &self.data_file {
            d.flush()
                .map_err(|e| Error::io("flushing the external data file", e))?;
        }
        self.file
            .flush()
            .map_err(|e| Error::io("flushing the image file", e))
    }
}

/// L2 entries with their bitmaps, and the first of them QEMU refuses, if any.
type Looked = (Vec<(L2Entry, u64)>, Option<Broken>);

/// The first L2 entry of a lookup that QEMU refuses.
struct Broken {
    /// Its index among the entries looked up.
    index: usize,
    /// A block status run that reaches it fails (an invalid subcluster bitmap); other
    /// broken entries end a run before them.
    fails_a_run: bool,
    /// QEMU's error for it.
    error: Error,
}

/// What [`Qcow2::lookup_for_status`] found: the entries before the first broken one.
pub(crate) struct StatusEntries {
    /// The entries with their bitmaps.
    pub entries: Vec<(L2Entry, u64)>,
    /// The error of the entry right after them, if a run that reaches it fails.
    pub fails_a_run: Option<Error>,
}

/// What L2 entries are looked up for, which decides what is refused and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// A read: every entry must be readable.
    Read,
    /// A write from this guest byte on: unaligned entries are refused in a write's words.
    Write(u64),
    /// A block status query: the entries stop before a broken one.
    Status,
}

/// Why QEMU refuses to read through an L2 entry (see [`Qcow2::first_unreadable`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unreadable {
    /// A zero cluster in a version 2 image.
    ZeroInV2,
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile,
    /// A data cluster at this offset of the external data file, not at its guest offset.
    MovedInDataFile(u64),
}

/// QEMU's error for an unaligned host offset `host` met by a write at guest byte `guest`
/// into a cluster with `entry`.
fn unaligned_write(entry: L2Entry, host: u64, guest: u64) -> Error {
    let kind = match entry {
        L2Entry::Zero { .. } => "Preallocated zero",
        _ => "Data",
    };
    Error::Corrupt(format!(
        "{kind} cluster offset {} unaligned (guest offset: {})",
        c_hex(host),
        c_hex(guest)
    ))
}

/// QEMU's error for an L2 entry (`index` in the table at `table`) whose host offset `host`
/// is not cluster-aligned.
pub(crate) fn unaligned_entry(host: u64, table: u64, index: u64) -> Error {
    Error::Corrupt(format!(
        "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
        c_hex(host),
        c_hex(table),
        c_hex(index)
    ))
}

/// Reports a free that found a refcount already 0 (`what`), which QEMU's
/// qcow2_free_clusters prints on stderr and goes on from.
pub(crate) fn report_failed_free(what: &str) {
    tracing::debug!("freeing clusters: {what}");
    tracing::warn!(target: crate::QEMU_STDERR, "qcow2_free_clusters failed: Invalid argument");
}

/// A number as C's `%#x` prints it (0 without the prefix), for QEMU's messages.
pub(crate) fn c_hex(n: u64) -> String {
    match n {
        0 => "0".into(),
        n => format!("{n:#x}"),
    }
}

/// The `entries`-entry table at `offset` of a `file_len`-byte file; entries past the end of
/// the file read as zeros.
pub(crate) fn read_table_within(
    file: &dyn Storage,
    offset: u64,
    entries: u32,
    file_len: u64,
) -> Result<Vec<u64>> {
    let present = (file_len.saturating_sub(offset) / 8).min(u64::from(entries));
    let mut table = read_u64_table(file, offset, present as usize)?;
    table.resize(entries as usize, 0);
    Ok(table)
}

/// Reads the snapshot table of `count` entries at `offset` (see [`snapshot::read_table`]).
pub(crate) fn read_snapshot_table(
    file: &dyn Storage,
    offset: u64,
    count: u32,
    repair: bool,
) -> Result<snapshot::Table> {
    let mut read = |at: usize, buf: &mut [u8]| {
        file.read_at(buf, offset.saturating_add(at as u64))
            .map_err(|e| Error::io("Failed to read snapshot table", e))
    };
    snapshot::read_table(&mut read, count, repair)
}

impl Drop for Qcow2 {
    /// Writes the metadata back, unless the image was marked corrupt: then, as in QEMU, the
    /// image takes nothing more (the event was reported when it happened).
    fn drop(&mut self) {
        if self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        if let Err(e) = Image::close(self) {
            tracing::error!("flushing qcow2 metadata on close failed: {e}");
        }
    }
}

impl Image for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn dirty_repair(&self) -> Option<&crate::check::CheckReport> {
        self.dirty_repair.as_ref()
    }

    fn open_warnings(&self) -> Vec<crate::OpenWarning> {
        let own = self
            .inconsistent_bitmaps
            .then_some(crate::OpenWarning::InconsistentBitmaps {
                version: self.version,
            });
        let backing = self.backing().map(|b| b.open_warnings());
        own.into_iter()
            .chain(backing.into_iter().flatten())
            .collect()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if self.metadata_only {
            return Err(Error::MetadataOnly);
        }
        self.read_guest(buf, offset)
            .map_err(|e| self.fatal_request(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        self.write_guest(buf, offset)
            .map_err(|e| self.fatal_request(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        self.zero_or_discard(offset, len, write::ZeroMode::Zero { unmap })
            .map_err(|e| self.fatal_request(e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(offset, len)?;
        self.zero_or_discard(offset, len, write::ZeroMode::Discard)
            .map_err(|e| self.fatal_request(e))
    }

    fn flush(&self) -> Result<()> {
        self.flush_metadata().map_err(|e| self.fatal_request(e))
    }

    fn sync_fds(&self) -> Option<Vec<std::os::unix::io::RawFd>> {
        if self.read_only {
            return Some(Vec::new());
        }
        // What `flush_metadata` syncs at the end: the data file, then the image file.
        self.data_file
            .iter()
            .chain(std::iter::once(&self.file))
            .map(|f| f.raw_fd())
            .collect()
    }

    fn prepare_flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for f in self.data_file.iter().chain(std::iter::once(&self.file)) {
            f.check_sync()
                .map_err(|e| Error::io("flushing the image", e))?;
        }
        self.write_back().map_err(|e| self.fatal_request(e))
    }

    fn sync_failed(&self) {
        for f in self.data_file.iter().chain(std::iter::once(&self.file)) {
            f.mark_sync_failed();
        }
    }

    fn close(&self) -> Result<()> {
        self.flush_metadata().map_err(|e| self.fatal_request(e))?;
        if self.read_only {
            return Ok(());
        }
        let closed = self.meta_mut().close_lazy_refcounts(&*self.file);
        closed.map_err(|e| self.fatal_request(e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len.max(1), self.size)?;
        self.status(offset, len).map_err(|e| self.fatal_request(e))
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.backing.as_deref()
    }

    fn map_io(&self, offset: u64, len: u64, write: bool) -> MapOutcome {
        if self.metadata_only {
            return MapOutcome::Declined;
        }
        self.map_guest(offset, len, write)
    }

    fn install_metadata(&self, load: &MetadataLoad, bytes: &[u8]) {
        self.install_l2_slice(load, bytes)
    }

    fn finish_io(&self, mapping: IoMapping, ok: bool) -> bool {
        self.finish_mapping(mapping, ok)
    }

    fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.data_storage().raw_fd()
    }
}

impl Qcow2 {
    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}
