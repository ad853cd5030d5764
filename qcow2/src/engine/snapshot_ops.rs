//! Internal snapshots: create, apply ("goto") and delete, with QEMU's semantics
//! (`block/qcow2-snapshot.c`) and the engine's crash-safety ordering.
//!
//! Refcounts count paths, as in QEMU: a snapshot adds one reference to every L2 table its L1
//! table names and to every cluster those tables map, so a cluster reached from the active
//! L1 and from one snapshot has refcount 2 even when both reach it through one shared L2
//! table. [`Qcow2::update_tree`] is the one place that walks a tree of tables.
//!
//! Ordering, so that a crash at any point only leaks clusters:
//! - create: the snapshot's L1 copy and the new snapshot table are written to new clusters,
//!   the refcount increments are durable before the COPIED flags are cleared, and those
//!   before the header points at the new table;
//! - apply: the snapshot's tree gets its increments before the active L1 is overwritten
//!   with the snapshot's; the old active tree loses its references after that;
//! - delete: the header points at a table without the snapshot before any of the
//!   snapshot's clusters loses a reference.
//!
//! As in QEMU, COPIED flags follow the refcounts one barrier later: between the two, a
//! crash leaves entries whose COPIED flag disagrees with a refcount that is only too high
//! (create) or just dropped to one (delete), which `qemu-img check -r all` fixes; neither
//! lets a write go in place to a cluster another table still needs.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::create::Preallocation;
use crate::error::{Error, Result};
use crate::format::snapshot::{self, Snapshot, SnapshotRef, MAX_SNAPSHOTS};
use crate::format::tables::{L2Entry, COPIED, OFFSET_MASK};
use crate::open::read_snapshot_l1;
use crate::storage::Storage;

use super::meta::{encode_u64_table, Meta};
use super::overlap::Target;
use super::Qcow2;

/// The host range an L2 entry holds one reference to (compressed data counts every cluster
/// its sectors touch), if any.
pub(super) fn referenced_range(entry: L2Entry, cluster_size: u64) -> Option<(u64, u64)> {
    match entry {
        L2Entry::Compressed { host, len } => {
            let start = host & !511;
            Some((start, len + (host - start)))
        }
        e => e.host_cluster().map(|h| (h, cluster_size)),
    }
}

/// QEMU's next snapshot ID: one more than the largest numeric ID (non-numeric IDs count as
/// 0, as `strtoul` reads them).
fn next_id(table: &[Snapshot]) -> Vec<u8> {
    let numeric = |id: &[u8]| {
        let digits = id.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&id[..digits])
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let max = table.iter().map(|s| numeric(&s.id)).max().unwrap_or(0);
    (max + 1).to_string().into_bytes()
}

impl Qcow2 {
    /// Creates an internal snapshot named `name` of the current disk, as `qemu-img snapshot
    /// -c` does: ID one past the largest numeric ID, the current time, no VM state, VM clock
    /// and icount 0. Names need not be unique (qemu-img does not require it).
    pub fn create_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        self.check_snapshot_support()?;
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidOption(format!(
                "an image holds at most {MAX_SNAPSHOTS} snapshots"
            )));
        }
        self.flush_metadata()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let file = &*self.file;
        let mut m = self.meta_mut();
        let active = m.l1.clone();
        let copy: Vec<u64> = active.iter().map(|e| e & !COPIED).collect();
        let l1_offset = write_new_table(&mut m, file, &encode_u64_table(&copy), "an L1 table")?;
        let snap = Snapshot {
            l1_table_offset: l1_offset,
            l1_size: active.len() as u32,
            id: next_id(&self.snapshots),
            name: name.as_bytes().to_vec(),
            date_sec: now.as_secs() as u32,
            // qemu-img takes the time in microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size),
            icount: Some(0),
            unknown_extra: Vec::new(),
        };
        let mut freed = Vec::new();
        let l1 = self.update_tree(&mut m, &active, 1, &mut freed)?;
        m.set_active_l1(l1);
        let mut table = self.snapshots.clone();
        table.push(snap.clone());
        self.replace_snapshot_table(&mut m, &table, &mut freed)?;
        m.fixed
            .snapshot_l1s
            .push((l1_offset, active.len() as u64 * 8));
        discard_freed(&mut m, file, freed)?;
        drop(m);
        self.snapshots = table;
        self.flush_metadata()?;
        Ok(snap)
    }

    /// Makes the disk what snapshot `r` holds (`qemu-img snapshot -a`, QEMU's
    /// `qcow2_snapshot_goto`): the virtual size becomes the snapshot's, the active L1 table a
    /// copy of the snapshot's, and the current state is dropped. The snapshot stays.
    pub fn apply_snapshot(&mut self, r: &SnapshotRef) -> Result<()> {
        self.check_snapshot_support()?;
        let snap = r
            .find(&self.snapshots)
            .ok_or(Error::SnapshotNotFound)?
            .clone();
        let cs = self.geo.cluster_size();
        let snap_l1 = read_snapshot_l1(&*self.file, &snap, cs)?;
        let size = snap.disk_size.unwrap_or(self.size);
        if size != self.size {
            self.resize(size, Preallocation::Off)?;
        }
        if snap_l1.len() > self.meta().l1.len() {
            self.grow_l1(snap_l1.len() as u64)?;
        }
        self.flush_metadata()?;
        let file = &*self.file;
        let mut m = self.meta_mut();
        let mut new = snap_l1;
        new.resize(m.l1.len(), 0);
        let mut freed = Vec::new();
        let new = self.update_tree(&mut m, &new, 1, &mut freed)?;
        // Increments first, then the switch of the whole table in place.
        let old = std::mem::replace(&mut m.l1, new);
        m.l1_dirty = true;
        m.writeback(file)?;
        file.flush()
            .map_err(|e| Error::io("flushing the new active L1 table", e))?;
        self.update_tree(&mut m, &old, -1, &mut freed)?;
        let active = m.l1.clone();
        let l1 = self.update_tree(&mut m, &active, 0, &mut freed)?;
        m.set_active_l1(l1);
        discard_freed(&mut m, file, freed)?;
        drop(m);
        self.flush_metadata()
    }

    /// Deletes snapshot `r` (`qemu-img snapshot -d`, QEMU's `qcow2_snapshot_delete`): it
    /// leaves the table first, then its clusters lose their references and COPIED flags of
    /// the active tables are set where refcounts fell to one. Returns the deleted snapshot.
    pub fn delete_snapshot(&mut self, r: &SnapshotRef) -> Result<Snapshot> {
        self.check_snapshot_support()?;
        let index = self
            .snapshots
            .iter()
            .position(|s| r.find(&self.snapshots).is_some_and(|f| std::ptr::eq(f, s)))
            .ok_or(Error::SnapshotNotFound)?;
        let snap = self.snapshots[index].clone();
        let cs = self.geo.cluster_size();
        let snap_l1 = read_snapshot_l1(&*self.file, &snap, cs)?;
        self.flush_metadata()?;
        let file = &*self.file;
        let mut m = self.meta_mut();
        let mut table = self.snapshots.clone();
        table.remove(index);
        let mut freed = Vec::new();
        self.replace_snapshot_table(&mut m, &table, &mut freed)?;
        let l1_range = (snap.l1_table_offset, u64::from(snap.l1_size) * 8);
        m.fixed.snapshot_l1s.retain(|&t| t != l1_range);
        self.update_tree(&mut m, &snap_l1, -1, &mut freed)?;
        if l1_range.1 > 0 {
            // QEMU frees the table with qcow2_free_clusters, which only reports a failure
            // (a table past the end of the file, never counted).
            match add_refcount(&mut m, file, l1_range, -1, &mut freed) {
                Err(Error::RefcountUnderflow(what)) => {
                    crate::engine::report_failed_free(&what);
                }
                freed_or_error => freed_or_error?,
            }
        }
        let active = m.l1.clone();
        let l1 = self.update_tree(&mut m, &active, 0, &mut freed)?;
        m.set_active_l1(l1);
        discard_freed(&mut m, file, freed)?;
        drop(m);
        self.snapshots = table;
        self.flush_metadata()?;
        Ok(snap)
    }

    /// Writes `table` as the snapshot table, in new clusters, and frees the old one (a
    /// check's repair of the entries it read).
    /// A failure to free the old table leaves it leaked and is returned beside success, as
    /// QEMU only reports it.
    pub(crate) fn rewrite_snapshot_table(&self, table: &[Snapshot]) -> Result<Option<Error>> {
        let file = &*self.file;
        let mut m = self.meta_mut();
        let Some(old) = self.switch_snapshot_table(&mut m, table)? else {
            return Ok(None);
        };
        let mut freed = Vec::new();
        if let Err(e) = add_refcount(&mut m, file, old, -1, &mut freed) {
            return Ok(Some(e));
        }
        discard_freed(&mut m, file, freed)?;
        Ok(None)
    }

    /// Refuses changes to the snapshot table of an image opened for a check, which has not
    /// read it.
    pub(super) fn refuse_if_opened_for_check(&self) -> Result<()> {
        match self.opened_for_check {
            true => Err(Error::NotSupported(
                "snapshot table changes on an image opened for a check".into(),
            )),
            false => Ok(()),
        }
    }

    /// Refuses snapshot changes QEMU refuses: read-only images, external data files, and
    /// images opened for a check.
    fn check_snapshot_support(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_if_opened_for_check()?;
        if self.data_file.is_some() {
            return Err(Error::NotSupported(
                "internal snapshots of an image with an external data file".into(),
            ));
        }
        Ok(())
    }

    /// [`Qcow2::switch_snapshot_table`], and the old table's clusters freed (into `freed`).
    pub(super) fn replace_snapshot_table(
        &self,
        m: &mut Meta,
        table: &[Snapshot],
        freed: &mut Vec<u64>,
    ) -> Result<()> {
        if let Some(old) = self.switch_snapshot_table(m, table)? {
            add_refcount(m, &*self.file, old, -1, freed)?;
        }
        Ok(())
    }

    /// Writes `table` to new clusters, makes everything so far durable and points the
    /// header at the new table (QEMU's `qcow2_write_snapshots`). Returns where the old
    /// table lies, for the caller to free.
    pub(super) fn switch_snapshot_table(
        &self,
        m: &mut Meta,
        table: &[Snapshot],
    ) -> Result<Option<(u64, u64)>> {
        let file = &*self.file;
        let bytes = snapshot::serialize_table(table, self.size);
        let offset = match bytes.is_empty() {
            true => 0,
            false => write_new_table(m, file, &bytes, "the snapshot table")?,
        };
        m.writeback_before_switch(file)?;
        file.flush()
            .map_err(|e| Error::io("flushing the new snapshot table", e))?;
        let old = m.fixed.snapshot_table;
        m.header.nb_snapshots = table.len() as u32;
        m.header.snapshots_offset = offset;
        if let Err(e) = m.write_header(file) {
            return Err(m.stop_writes_after_failed_switch("snapshot table", e));
        }
        m.fixed.snapshot_table = (!bytes.is_empty()).then_some((offset, bytes.len() as u64));
        Ok(old)
    }

    /// Adds `delta` (1, -1 or 0) to the refcount of every L2 table `l1` names and of every
    /// cluster those tables map, and sets the COPIED flag of each of their entries exactly
    /// where the refcount is now one (QEMU's `qcow2_update_snapshot_refcount`). A table
    /// whose refcount drops to zero is freed as it is. Returns `l1` with its COPIED flags
    /// set the same way; writing it is the caller's business.
    ///
    /// With extended L2 entries, an entry with a host cluster holds one reference to all of
    /// it whatever its subcluster bitmap says (bit 0 is no zero flag there, so QEMU counts
    /// such entries as normal clusters), and bitmaps are left as they are.
    ///
    /// Increments reach the disk before the entries changed here (writeback's order);
    /// decrements must only be asked for once nothing durable references `l1` any more.
    /// Clusters whose refcount drops to zero are added to `freed`.
    fn update_tree(
        &self,
        m: &mut Meta,
        l1: &[u64],
        delta: i64,
        freed: &mut Vec<u64>,
    ) -> Result<Vec<u64>> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let w = self.geo.l2_words() as usize;
        let mut out = Vec::with_capacity(l1.len());
        for (i, &l1e) in l1.iter().enumerate() {
            let table = l1e & OFFSET_MASK;
            if table == 0 {
                out.push(l1e);
                continue;
            }
            let table_rc = m
                .refcount(file, table / cs)?
                .checked_add_signed(delta)
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "the L2 table at {table:#x} (L1 index {i}) has refcount 0"
                    ))
                })?;
            // With extended L2 entries each entry is two words: the entry, whose
            // COPIED flag changes here, and its subcluster bitmap, which stays as it is.
            let words = m.read_l2_table(file, table)?;
            for (j, entry_words) in words.chunks_exact(w).enumerate() {
                let raw = entry_words[0];
                let entry = self.decode_l2(raw);
                if let Some((_, host)) = self.first_unaligned(&[(entry, 0)]) {
                    let e = super::unaligned_entry(host, table, j as u64);
                    return Err(self.fatal_in(m, e));
                }
                if let (Some((off, len)), true) = (referenced_range(entry, cs), delta != 0) {
                    add_refcount(m, file, (off, len), delta, freed)?;
                }
                if table_rc == 0 {
                    continue;
                }
                let copied = match entry.host_cluster() {
                    Some(host) => m.refcount(file, host / cs)? == 1,
                    None => false,
                };
                let new = if copied { raw | COPIED } else { raw & !COPIED };
                if new != raw {
                    let mut changed = entry_words.to_vec();
                    changed[0] = new;
                    m.set_l2_entries(file, table, j as u64, &changed)?;
                }
            }
            if delta != 0 {
                add_refcount(m, file, (table, cs), delta, freed)?;
            }
            if table_rc == 0 {
                m.forget_l2_table(table);
            }
            out.push(if table_rc == 1 {
                l1e | COPIED
            } else {
                l1e & !COPIED
            });
        }
        if delta < 0 {
            // The cluster being filled with compressed data may have been freed.
            m.compressed_tail = None;
        }
        Ok(out)
    }
}

/// Adds `delta` to the refcounts of the clusters of `range` (offset, length), noting those
/// that drop to zero in `freed`.
fn add_refcount(
    m: &mut Meta,
    file: &dyn Storage,
    (offset, len): (u64, u64),
    delta: i64,
    freed: &mut Vec<u64>,
) -> Result<()> {
    m.add_refcount(file, offset, len, delta)?;
    let cs = m.geo.cluster_size();
    for c in offset / cs..=(offset + len - 1) / cs {
        if delta < 0 && m.refcount(file, c)? == 0 {
            freed.push(c);
        }
    }
    Ok(())
}

/// Writes the refcounts back, then punches holes where `freed` clusters (still free) lie, as
/// QEMU passes discards of snapshot clusters down to the file (`pass-discard-snapshot`).
/// A failed discard only leaves the space allocated.
fn discard_freed(m: &mut Meta, file: &dyn Storage, mut freed: Vec<u64>) -> Result<()> {
    m.writeback(file)?;
    freed.sort_unstable();
    freed.dedup();
    let cs = m.geo.cluster_size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for c in freed {
        if m.refcount(file, c)? != 0 {
            continue;
        }
        match runs.last_mut() {
            Some((start, n)) if *start + *n == c => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    for (start, n) in runs {
        if let Err(e) = file.punch_hole(start * cs, n * cs) {
            tracing::debug!("discarding freed clusters at {:#x}: {e}", start * cs);
        }
    }
    Ok(())
}

/// Allocates clusters for `bytes` of new metadata and writes them there; returns the offset.
fn write_new_table(m: &mut Meta, file: &dyn Storage, bytes: &[u8], what: &str) -> Result<u64> {
    let cs = m.geo.cluster_size();
    let len = (bytes.len() as u64).max(1);
    let offset = m.alloc_contiguous(file, len.div_ceil(cs))?;
    m.check_write(file, offset, bytes.len() as u64, Target::New)?;
    file.write_at(bytes, offset)
        .map_err(|e| Error::io(format!("writing {what} at {offset:#x}"), e))?;
    Ok(offset)
}

impl Meta {
    /// Replaces the active L1 table's entries (same length), to be written back.
    fn set_active_l1(&mut self, l1: Vec<u64>) {
        if l1 != self.l1 {
            self.l1 = l1;
            self.l1_dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_id;
    use crate::format::snapshot::test_snapshot;

    #[test]
    fn ids_continue_after_the_largest_number() {
        let snap = |id: &str| test_snapshot(id, "");
        assert_eq!(next_id(&[]), b"1");
        assert_eq!(next_id(&[snap("3"), snap("10"), snap("x")]), b"11");
        assert_eq!(next_id(&[snap("7abc")]), b"8");
    }
}
