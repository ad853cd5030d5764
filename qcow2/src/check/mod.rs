//! Consistency check and repair: recount every reference from the metadata, compare with
//! the stored refcounts and fix what the repair mode allows, as `qemu-img check [-r]` does
//! (same steps, same messages, same counts).
//!
//! The steps: count references into an in-memory refcount table (`imrt`, `count`);
//! compare it with the stored refcounts, fixing them in place where allowed; if a stored
//! refcount is zero for a cluster in use (or a refcount block is unusable), rebuild the
//! refcount structures (`rebuild`) and recount; last, check the COPIED flags (`copied`).

mod copied;
mod count;
mod imrt;
mod rebuild;
mod snapshots;

use std::collections::BTreeMap;

use crate::engine::meta::Meta;
use crate::engine::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::format::snapshot::Snapshot;
use crate::image::Image;
use crate::storage::Storage;

use imrt::Imrt;
use snapshots::TableFindings;

/// What a check found (QEMU's `BdrvCheckResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references and other errors in the metadata.
    pub corruptions: u64,
    /// Refcounts higher than the references (wasted space only).
    pub leaks: u64,
    /// Problems that stopped parts of the check (unreadable tables, failed repairs).
    pub check_errors: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed.
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active L1 (normal, compressed, preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem or repair, in QEMU's wording and order.
    pub messages: Vec<Message>,
    /// Why the check stopped early (QEMU's "Check failed: ..."): no report is shown then.
    pub failure: Option<String>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// A line a check prints on stderr.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// Printed as it is ("ERROR cluster 5 refcount=0 reference=1"); bytes, because a
    /// snapshot name in it need not be UTF-8.
    Line(Vec<u8>),
    /// An error report, which qemu-img prints after its name ("qemu-img: Could not resize
    /// file: File too large").
    Error(String),
}

/// Lines as text (bytes that are not UTF-8 replaced), so that reports read well in
/// assertion messages.
impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line(s) => f
                .debug_tuple("Line")
                .field(&String::from_utf8_lossy(s))
                .finish(),
            Message::Error(s) => f.debug_tuple("Error").field(s).finish(),
        }
    }
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line(s) => f.write_str(&String::from_utf8_lossy(s)),
            Message::Error(s) => f.write_str(s),
        }
    }
}

/// What a check may repair (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    #[default]
    Nothing,
    /// Refcounts that are too high, and COPIED flags if nothing else is wrong.
    Leaks,
    /// Everything: also refcounts that are too low, rebuilding the refcount structures if
    /// needed.
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::Nothing
    }
    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// Why a check stopped: the text qemu-img prints after "Check failed: ".
struct Failed(String);

impl Failed {
    /// QEMU's -EIO.
    fn eio() -> Failed {
        Failed("Input/output error".into())
    }
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        match e {
            Error::Io { error, .. } => Failed(strerror(&error)),
            e => Failed(e.to_string()),
        }
    }
}

/// An I/O error as C's strerror words it (without Rust's " (os error N)").
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(at) => s[..at].to_string(),
        None => s,
    }
}

/// Most clusters a check handles (QEMU's limit: `INT_MAX`).
const MAX_CLUSTERS: u64 = i32::MAX as u64;

/// State of one check run.
struct Checker<'a> {
    img: &'a Qcow2,
    file: &'a dyn Storage,
    cs: u64,
    bits: u32,
    /// 64-bit words per L2 entry (2 with extended L2 entries).
    words: u64,
    file_len: u64,
    /// The refcounts the metadata implies.
    imrt: Imrt,
    /// Regions referenced past the end of the file, which QEMU does not count:
    /// (offset, size). A rebuild keeps clear of them.
    past_eof: Vec<(u64, u64)>,
    /// The refcount structures must be rebuilt.
    rebuild: bool,
    /// The snapshots as the check read them (an image opened for a check has none).
    snapshots: Vec<Snapshot>,
    /// What the snapshot table's check found, added to the report at the end.
    snapshot_findings: TableFindings,
    report: CheckReport,
    messages: Vec<Message>,
    /// What the check may repair.
    mode: Repair,
    /// A corruption event was reported (QEMU reports the first one only).
    signaled: bool,
}

/// Checks the image's refcounts and flags against its metadata, changing nothing. A check
/// that could not finish is an error.
pub fn check(img: &Qcow2) -> Result<CheckReport> {
    let report = check_and_repair(img, Repair::Nothing);
    match &report.failure {
        Some(why) => Err(Error::Corrupt(format!("the check failed: {why}"))),
        None => Ok(report),
    }
}

/// Checks the image and repairs what `mode` allows (the image must be open for writing
/// unless `mode` is [`Repair::Nothing`]), as `qemu-img check -r` does. If a repair leaves
/// no corruption, the dirty and corrupt bits are cleared. A check that could not finish
/// says why in [`CheckReport::failure`].
pub fn check_and_repair(img: &Qcow2, mode: Repair) -> CheckReport {
    let mut lazy = None;
    if mode.leaks() {
        // Repairs write refcounts through at once, whatever the image's lazy refcounts.
        lazy = Some(std::mem::replace(&mut img.meta_mut().lazy_refcounts, false));
    }
    let (mut report, messages) = match Checker::new(img, mode) {
        Ok(mut c) => {
            if let Err(f) = c.run() {
                c.report.failure = Some(f.0);
            }
            (c.report, c.messages)
        }
        Err(f) => (
            CheckReport {
                failure: Some(f.0),
                ..Default::default()
            },
            Vec::new(),
        ),
    };
    report.messages = messages;
    let clean = report.failure.is_none() && report.check_errors == 0 && report.corruptions == 0;
    if mode.leaks() && clean {
        if let Err(e) = mark_clean(img) {
            report.failure = Some(Failed::from(e).0);
        }
    }
    if let Some(lazy) = lazy {
        img.meta_mut().lazy_refcounts = lazy;
    }
    report
}

/// Repairs a dirty image (lazy refcounts after a crash) on a writable open, as QEMU does,
/// and returns what the repair found.
pub(crate) fn repair_dirty(img: &Qcow2) -> Result<CheckReport> {
    let report = check_and_repair(img, Repair::All);
    for m in &report.messages {
        tracing::debug!("repairing the dirty image: {m}");
    }
    tracing::info!(
        "repaired the dirty image: {} corruptions and {} leaks fixed",
        report.corruptions_fixed,
        report.leaks_fixed
    );
    match report.failure {
        Some(f) => Err(Error::DirtyRepairFailed(f)),
        // A repair that could not write a fix (QEMU's `check_errors`) failed too.
        None if report.check_errors > 0 => {
            Err(Error::DirtyRepairFailed("Input/output error".into()))
        }
        None => Ok(report),
    }
}

/// Clears the dirty and corrupt bits after a successful repair.
fn mark_clean(img: &Qcow2) -> Result<()> {
    img.flush()?;
    let mut m = img.meta_mut();
    let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
    if m.header.incompatible_features & bits == 0 {
        return Ok(());
    }
    m.header.incompatible_features &= !bits;
    let file = &**img.file();
    // The incompatible feature bits are at byte 72 (version 3 headers only have them).
    file.write_at(&m.header.incompatible_features.to_be_bytes(), 72)
        .and_then(|()| file.flush())
        .map_err(|e| Error::io("clearing the dirty and corrupt bits", e))
}

impl<'a> Checker<'a> {
    fn new(img: &'a Qcow2, mode: Repair) -> std::result::Result<Checker<'a>, Failed> {
        img.flush()?;
        let file = &**img.file();
        let cs = img.cluster_size();
        let file_len = file_len(file)?;
        if file_len.div_ceil(cs) > MAX_CLUSTERS {
            return Err(Failed("File too large".into()));
        }
        let geo = img.meta().geo;
        Ok(Checker {
            img,
            file,
            cs,
            bits: geo.cluster_bits,
            words: geo.l2_words(),
            file_len,
            imrt: Imrt::new(geo, file_len.div_ceil(cs)),
            past_eof: Vec::new(),
            rebuild: false,
            snapshots: Vec::new(),
            snapshot_findings: TableFindings::default(),
            report: CheckReport {
                total_clusters: img.size().div_ceil(cs),
                ..Default::default()
            },
            messages: Vec::new(),
            mode,
            signaled: false,
        })
    }

    fn say(&mut self, line: impl Into<Vec<u8>>) {
        self.messages.push(Message::Line(line.into()));
    }

    fn report_error(&mut self, error: String) {
        self.messages.push(Message::Error(error));
    }

    /// The whole check (QEMU's qcow2_co_check_locked): the snapshot table, the refcounts,
    /// and the snapshot table's repair.
    fn run(&mut self) -> std::result::Result<(), Failed> {
        let mode = self.mode;
        let outcome = self
            .read_snapshot_table(mode)
            .and_then(|()| self.check_refcounts(mode))
            .and_then(|()| self.fix_snapshot_table(mode));
        let found = std::mem::take(&mut self.snapshot_findings);
        let r = &mut self.report;
        r.corruptions += found.corruptions;
        r.corruptions_fixed += found.corruptions_fixed;
        r.check_errors += found.check_errors;
        outcome
    }

    /// The refcounts and COPIED flags (QEMU's qcow2_check_refcounts).
    fn check_refcounts(&mut self, mode: Repair) -> std::result::Result<(), Failed> {
        self.count_all(mode)?;
        let before_compare = self.report.clone();
        let mut highest = self.compare(Repair::Nothing)?;
        if self.rebuild && mode.errors() {
            highest = self.rebuild_and_recount()?;
        } else if mode.leaks() {
            if self.rebuild {
                self.say("ERROR need to rebuild refcount structures");
                self.report.check_errors += 1;
                return Err(Failed::eio());
            }
            if self.report.leaks > 0 || self.report.corruptions > 0 {
                self.report = before_compare;
                highest = self.compare(mode)?;
            }
        }
        self.check_copied(mode)?;
        self.report.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Rebuilds the refcount structures, recounts, and frees what the old ones held;
    /// returns the highest cluster in use.
    fn rebuild_and_recount(&mut self) -> std::result::Result<u64, Failed> {
        let before = self.report.clone();
        self.say("Rebuilding refcount structure");
        self.rebuild_refcounts()?;
        self.report.corruptions = 0;
        self.report.leaks = 0;
        self.rebuild = false;
        self.imrt.clear();
        self.past_eof.clear();
        self.file_len = file_len(self.file)?;
        self.count_all(Repair::Nothing)?;
        // The old structures are leaked now: free them. Leaks left were made by the rebuild.
        let saved = std::mem::take(&mut self.report);
        let highest = self.compare(Repair::Leaks)?;
        if self.rebuild {
            self.say("ERROR rebuilt refcount structure is still broken");
        }
        let fresh_leaks = self.report.leaks;
        self.report = saved;
        let r = &mut self.report;
        r.corruptions_fixed += before.corruptions.saturating_sub(r.corruptions);
        r.leaks_fixed += before.leaks.saturating_sub(r.leaks);
        r.leaks += fresh_leaks;
        Ok(highest)
    }

    /// Compares stored with counted refcounts (QEMU's compare_refcounts), fixing what
    /// `mode` allows: a zero stored refcount needs a rebuild instead. Returns the highest
    /// cluster in use.
    fn compare(&mut self, mode: Repair) -> std::result::Result<u64, Failed> {
        let (mut highest, mut fixed_any) = (0, false);
        let img = self.img;
        let mut m = img.meta_mut();
        let per_block = self.imrt.per_block();
        let mut c = 0;
        while c < self.imrt.len() {
            if c % per_block == 0 && self.nothing_in_range(&m, c) {
                c += per_block;
                continue;
            }
            match stored_refcount(&mut m, self.file, self.file_len, c) {
                Ok(stored) => {
                    let counted = self.imrt.get(c);
                    if stored > 0 || counted > 0 {
                        highest = c;
                    }
                    if stored != counted {
                        fixed_any |= self.mismatch(&mut m, c, stored, counted, mode);
                    }
                }
                Err(e) => {
                    if let Error::Corrupt(what) | Error::UnalignedTable(what) = e {
                        self.signal_corruption(&mut m, what);
                    }
                    self.say(format!(
                        "Can't get refcount for cluster {c}: Input/output error"
                    ));
                    self.report.check_errors += 1;
                }
            }
            c += 1;
        }
        if fixed_any {
            m.writeback(self.file)?;
        }
        Ok(highest)
    }

    /// Reports corruption the check's reads ran into as QEMU's qcow2 driver does, the first
    /// time only: on an image open for writing, it is marked corrupt (unless the check is
    /// to rebuild the refcounts, which QEMU's mark would then refuse: qimg repairs it
    /// instead); on a read-only one, the line says it goes on.
    fn signal_corruption(&mut self, m: &mut Meta, what: String) {
        match self.mode {
            Repair::Nothing if !std::mem::replace(&mut self.signaled, true) => self.say(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be \
                 suppressed"
            )),
            Repair::Leaks if !self.signaled => {
                self.say_marked_corrupt(&what);
                m.set_corrupt_bit(self.file);
            }
            _ => {}
        }
    }

    /// Says that the image was marked corrupt (a write the overlap check refused, say), as
    /// QEMU's driver does for the first corruption event only.
    fn say_marked_corrupt(&mut self, what: &str) {
        if !std::mem::replace(&mut self.signaled, true) {
            self.say(format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be \
                 suppressed"
            ));
        }
    }

    /// Whether the refcount block range starting at cluster `first` holds no refcount,
    /// stored or counted (so the comparison can skip it).
    fn nothing_in_range(&self, m: &Meta, first: u64) -> bool {
        let per_block = self.imrt.per_block();
        stored_block(m, self.file_len, first).is_none()
            && self.imrt.block_is_zero(first / per_block)
    }

    /// Reports (and if `mode` allows, fixes) cluster `c`'s stored refcount that differs
    /// from the counted one; returns whether it was fixed.
    fn mismatch(&mut self, m: &mut Meta, c: u64, stored: u64, counted: u64, mode: Repair) -> bool {
        self.rebuild |= stored == 0;
        let allowed = if stored > counted {
            mode.leaks()
        } else {
            mode.errors()
        };
        let fixing = allowed && stored != 0;
        let word = match (fixing, stored < counted) {
            (true, _) => "Repairing",
            (false, true) => "ERROR",
            (false, false) => "Leaked",
        };
        self.say(format!(
            "{word} cluster {c} refcount={stored} reference={counted}"
        ));
        if fixing && set_refcount(m, self.file, self.cs, c, stored, counted).is_ok() {
            match stored > counted {
                true => self.report.leaks_fixed += 1,
                false => self.report.corruptions_fixed += 1,
            }
            return true;
        }
        match stored < counted {
            true => self.report.corruptions += 1,
            false => self.report.leaks += 1,
        }
        false
    }
}

/// The file's length.
fn file_len(file: &dyn Storage) -> Result<u64> {
    file.len()
        .map_err(|e| Error::io("getting the file size", e))
}

/// Refcount of `cluster` as stored; a refcount block past the end of the file reads as
/// zeros, as QEMU reads it.
fn stored_refcount(m: &mut Meta, file: &dyn Storage, file_len: u64, cluster: u64) -> Result<u64> {
    // An unaligned block fails before the end of the file is looked at, as in QEMU.
    m.refblock_offset(cluster)?;
    match stored_block(m, file_len, cluster) {
        Some(_) => m.refcount(file, cluster),
        None => Ok(0),
    }
}

/// The refcount block that holds `cluster`'s stored refcount, if there is one inside the
/// file.
fn stored_block(m: &Meta, file_len: u64, cluster: u64) -> Option<u64> {
    let r = cluster / m.geo.refblock_entries();
    let block = m.reftable.get(r as usize).map_or(0, |e| e & !0x1ff);
    (block != 0 && block < file_len.next_multiple_of(m.geo.cluster_size())).then_some(block)
}

/// Changes the stored refcount of `cluster` from `stored` to `counted`; a cluster left
/// unreferenced is discarded.
fn set_refcount(
    m: &mut Meta,
    file: &dyn Storage,
    cs: u64,
    cluster: u64,
    stored: u64,
    counted: u64,
) -> Result<()> {
    let delta = i64::try_from(counted as i128 - stored as i128)
        .map_err(|_| Error::Corrupt(format!("refcount of cluster {cluster} is out of range")))?;
    m.add_refcount(file, cluster * cs, cs, delta)?;
    if counted == 0 {
        // Nothing refers to it: its space goes back to the file system, as QEMU discards
        // the clusters a repair frees (a failed discard only leaves the space allocated).
        if let Err(e) = file.punch_hole(cluster * cs, cs) {
            tracing::debug!("discarding freed cluster {cluster}: {e}");
        }
    }
    Ok(())
}

/// Regions past the end of the file by a cluster or more, as QEMU tells them apart.
fn exceeds_file(offset: u64, size: u64, file_len: u64, cs: u64) -> bool {
    offset as i128 + size as i128 - file_len as i128 >= cs as i128
}

/// Counts of each cluster the `regions` touch.
fn clusters_of(regions: &[(u64, u64)], cs: u64) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for &(offset, size) in regions {
        let last = offset.saturating_add(size - 1) / cs;
        for c in offset / cs..=last {
            *out.entry(c).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::format::header::Header;
    use crate::storage::MemStorage;
    use crate::{CreateOptions, OpenOptions};

    /// A 1 MiB image with 512-byte clusters and `refcount_bits`-bit refcounts whose
    /// refcount table entry 1 is `entry`, in memory.
    fn with_reftable_entry(refcount_bits: u32, entry: u64) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.qcow2");
        let o = CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            refcount_bits,
            ..Default::default()
        };
        crate::create(&p, &o).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = Header::parse(&bytes).unwrap().refcount_table_offset as usize + 8;
        bytes[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        bytes
    }

    #[test]
    fn repairing_a_refcount_block_far_past_the_end_allocates_boundedly() {
        // Cluster 2^30: the file would grow to 512 GiB and the in-memory refcounts (64-bit)
        // to 8 GiB; the repair refuses, as when memory runs out, before growing the file.
        let bytes = with_reftable_entry(64, 1 << 39);
        let storage = Arc::new(MemStorage::new(&bytes));
        let opts = OpenOptions {
            check: true,
            ..Default::default()
        };
        let img = Qcow2::open_storage(storage.clone(), &opts, None).unwrap();
        let report = check_and_repair(&img, Repair::All);
        let lines: Vec<String> = report.messages.iter().map(|m| m.to_string()).collect();
        assert!(
            lines.contains(&"Repairing refcount block 1 is outside image".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"Could not resize file: Cannot allocate memory".to_string()),
            "{lines:?}"
        );
        assert!(storage.len().unwrap() < 1 << 20, "the file grew");
    }

    #[test]
    fn an_image_opened_for_a_check_refuses_snapshot_table_changes() {
        // Such an open has not read the table: a new one would drop the snapshots in it.
        let bytes = with_reftable_entry(16, 0);
        let storage = Arc::new(MemStorage::new(&bytes));
        let opts = OpenOptions {
            check: true,
            ..Default::default()
        };
        let mut img = Qcow2::open_storage(storage, &opts, None).unwrap();
        assert!(matches!(
            img.create_snapshot("s"),
            Err(Error::NotSupported(_))
        ));
        assert!(matches!(img.upgrade_to_v3(), Err(Error::NotSupported(_))));
    }
}
