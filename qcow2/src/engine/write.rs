//! The write path: in-place writes, cluster allocation with copy-on-write, zeroing,
//! discard and compressed writes.

use crate::compress;
use crate::error::{Error, Result};
use crate::format::tables::{self, alloc_bits, L2Entry, ALL_ALLOC, ALL_ZERO, COPIED, OFFSET_MASK};

use super::meta::Meta;
use super::overlap::Target;
use super::Qcow2;

/// What [`Qcow2::zero_or_discard`] does to whole clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ZeroMode {
    /// Make the range read as zeros; `unmap` allows releasing the host clusters.
    Zero {
        /// Release host clusters.
        unmap: bool,
    },
    /// Release the range (QEMU's guest discard semantics).
    Discard,
}

impl Qcow2 {
    /// Writes guest bytes; the caller checked the range and writability.
    pub(super) fn write_guest(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let first = off / cs;
            let in_cluster = off % cs;
            let remaining = buf.len() - pos;
            let whole = if in_cluster == 0 {
                remaining as u64 / cs
            } else {
                0
            };
            if whole == 0 {
                let len = (cs - in_cluster).min(remaining as u64) as usize;
                self.write_partial(first, in_cluster, &buf[pos..pos + len])?;
                pos += len;
            } else {
                let n = self.write_whole(first, whole, &buf[pos..])?;
                pos += (n * cs) as usize;
            }
        }
        Ok(())
    }

    /// Writes part of one cluster, copying the rest from its current contents if the
    /// cluster must be (re)allocated.
    fn write_partial(&self, cluster: u64, in_cluster: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let _busy = self.busy.acquire(cluster, 1);
        if self.geo.extended_l2 {
            return self.write_subclusters(cluster, in_cluster, data);
        }
        let offset = cluster * cs + in_cluster;
        let (entry, _) = self.lookup_for_write(cluster, 1, offset)?[0];
        if let L2Entry::Normal { host, copied: true } = entry {
            return self.write_data(data, host + in_cluster);
        }
        let reads_zeros = match entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if reads_zeros {
            // Nothing to copy: zero the new cluster in place (an unwritten extent on the
            // host) and write only the guest's bytes, instead of a whole cluster of zeros.
            let host = self.target_cluster(cluster, entry)?;
            let written = self
                .check_data_write(host, cs)
                .and_then(|()| {
                    self.data_storage().zero_range(host, cs).map_err(|e| {
                        Error::io(format!("zeroing data at host offset 0x{host:x}"), e)
                    })
                })
                .and_then(|()| self.write_data(data, host + in_cluster));
            self.give_back_unwritten(&written, &[entry], &[host]);
            written?;
            return self.update_l2(cluster, &[entry], &[host]);
        }
        let mut full = vec![0u8; cs as usize];
        let written = in_cluster as usize..in_cluster as usize + data.len();
        self.read_cluster_around(cluster, entry, &mut full, written.clone())?;
        full[written].copy_from_slice(data);
        let host = self.target_cluster(cluster, entry)?;
        let written = self.write_data(&full, host);
        self.give_back_unwritten(&written, &[entry], &[host]);
        written?;
        self.update_l2(cluster, &[entry], &[host])
    }

    /// [`Qcow2::write_partial`] with extended L2 entries (the caller holds the cluster busy),
    /// as QEMU does it: into an unallocated cluster or one writable in place, only the
    /// subclusters written get allocated, and only the partly written ones at the edges are
    /// filled from their current contents (the backing file, or zeros); the others keep
    /// reading as before. A cluster shared with a snapshot is copied from its first to its
    /// last allocated subcluster (and over the write); a compressed one is copied whole. The
    /// data is written before the L2 entry changes.
    fn write_subclusters(&self, cluster: u64, in_cluster: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let sc = self.geo.unit_size();
        let base = cluster * cs;
        let (entry, bitmap) = self.lookup_for_write(cluster, 1, base + in_cluster)?[0];
        let (a, b) = (in_cluster, in_cluster + data.len() as u64);
        let (mut first, mut last) = (a / sc, (b - 1) / sc);
        let in_place = match entry {
            L2Entry::Normal { copied: true, .. } => true,
            L2Entry::Unallocated => false,
            L2Entry::Normal { copied: false, .. } => {
                let alloc = bitmap & ALL_ALLOC;
                if alloc != 0 {
                    first = first.min(u64::from(alloc.trailing_zeros()));
                    last = last.max(63 - u64::from(alloc.leading_zeros()));
                }
                false
            }
            _ => {
                (first, last) = (0, self.geo.subclusters() - 1);
                false
            }
        };
        let allocated = |i: u64| in_place && bitmap & 1 << i != 0;
        // The written range, widened to whole subclusters where they must be filled.
        let start = if first * sc < a && !allocated(first) {
            first * sc
        } else {
            a
        };
        let end = if b < (last + 1) * sc && !allocated(last) {
            (last + 1) * sc
        } else {
            b
        };
        let mut buf = vec![0u8; (end - start) as usize];
        let (head, rest) = buf.split_at_mut((a - start) as usize);
        let (middle, tail) = rest.split_at_mut(data.len());
        self.read_guest(head, base + start)?;
        self.read_guest(tail, base + b)?;
        middle.copy_from_slice(data);
        let host = match entry {
            L2Entry::Normal { host, .. } if in_place => host,
            _ => self.target_cluster(cluster, entry)?,
        };
        let data_written = self.write_data(&buf, host + start);
        if !in_place {
            self.give_back_unwritten(&data_written, &[entry], &[host]);
        }
        data_written?;
        let written = alloc_bits(first, last + 1);
        let new = (bitmap | written) & !(written << 32);
        if in_place && new == bitmap {
            return Ok(());
        }
        self.set_entries(cluster, &[host | COPIED, new], &[entry])
    }

    /// Writes up to `max` whole clusters from `data`; returns how many were written.
    ///
    /// A run is either clusters writable in place with contiguous host offsets (one I/O), or
    /// clusters that all need a new cluster (allocated contiguously, one I/O).
    fn write_whole(&self, first: u64, max: u64, data: &[u8]) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let entries = self.lookup_for_write(first, max, first * cs)?;
        // Written in place: COPIED clusters (with extended L2 entries, their subclusters not
        // allocated yet become so, as in QEMU).
        let in_place = |(e, _): (L2Entry, u64)| matches!(e, L2Entry::Normal { copied: true, .. });
        let full = if self.geo.extended_l2 { ALL_ALLOC } else { 0 };
        let mut n = 1;
        if let L2Entry::Normal { host, copied: true } = entries[0].0 {
            let follows = |k: usize| L2Entry::Normal {
                host: host + k as u64 * cs,
                copied: true,
            };
            while n < entries.len() && entries[n].0 == follows(n) {
                n += 1;
            }
            let _busy = self.busy.acquire(first, n as u64);
            // Re-check under the busy mark: a discard may have raced us.
            if self.lookup_bitmaps(first, n as u64)?[..n] != entries[..n] {
                return Ok(0);
            }
            self.write_data(&data[..n * cs as usize], host)?;
            if entries[..n].iter().any(|&(_, bitmap)| bitmap != full) {
                let old: Vec<L2Entry> = entries[..n].iter().map(|&(e, _)| e).collect();
                let hosts: Vec<u64> = (0..n).map(|k| host + k as u64 * cs).collect();
                self.update_l2(first, &old, &hosts)?;
            }
            return Ok(n as u64);
        }
        while n < entries.len() && !in_place(entries[n]) && !is_zero_alloc(entries[n].0) {
            n += 1;
        }
        let _busy = self.busy.acquire(first, n as u64);
        let entries = self.lookup_run(first, n as u64)?;
        let n = entries.len();
        let bytes = &data[..n * cs as usize];
        if n == 1 || self.data_file.is_some() || entries.iter().any(|&e| is_zero_alloc(e)) {
            let mut hosts = Vec::with_capacity(n);
            for (k, &e) in entries.iter().enumerate() {
                let host = match e {
                    L2Entry::Normal { host, copied: true } => host,
                    _ => self.target_cluster(first + k as u64, e)?,
                };
                hosts.push(host);
                let written = self.write_data(&bytes[k * cs as usize..(k + 1) * cs as usize], host);
                self.give_back_unwritten(&written, &entries[..=k], &hosts);
                written?;
            }
            self.update_l2(first, &entries, &hosts)?;
            return Ok(n as u64);
        }
        let (host, n) = self.reserve_clusters(first, n as u64)?;
        let n = n as usize;
        let hosts: Vec<u64> = (0..n as u64).map(|k| host + k * cs).collect();
        let written = self.write_data(&bytes[..n * cs as usize], host);
        self.give_back_unwritten(&written, &entries[..n], &hosts);
        written?;
        self.update_l2(first, &entries[..n], &hosts)?;
        Ok(n as u64)
    }

    /// Reserves host clusters for whole-cluster writes to guest clusters `first..first + n`
    /// with [`Qcow2::write_reserved`]: makes sure the L2 table covering `first` exists, then
    /// allocates contiguous host clusters (refcount 1) at the first free cluster. Returns the
    /// host offset and how many clusters were reserved: at least one, at most to the end of
    /// that L2 table. Callers that reserve in guest order (and write in any order) get data
    /// laid out in guest order. A reservation never written leaks, as after a crash.
    ///
    /// Not for images with an external data file (guest data there is not allocated).
    pub fn reserve_clusters(&self, first: u64, n: u64) -> Result<(u64, u64)> {
        let cs = self.geo.cluster_size();
        self.check_writable(first * cs, 1)?;
        if self.data_file.is_some() {
            return Err(Error::UnsupportedFeature(
                "reserving clusters in an image with an external data file".into(),
            ));
        }
        let per_l2 = self.geo.l2_entries();
        let n = n.min(per_l2 - first % per_l2).max(1);
        let mut m = self.meta_mut();
        self.l2_for_write(&mut m, (first / per_l2) as usize)?;
        m.alloc_up_to(&*self.file, n)
    }

    /// Writes whole guest clusters from cluster-aligned `offset` into host clusters reserved
    /// by [`Qcow2::reserve_clusters`] at `host`, then maps them (after the data write, so the
    /// crash-safety order holds); whatever the clusters referenced before is released.
    /// `data` is a multiple of the cluster size (or ends at the end of the disk), within one
    /// L2 table and no longer than the reservation.
    /// If the write fails, the reservation is given back ([`Qcow2::release_reserved`]).
    pub fn write_reserved(&self, data: &[u8], offset: u64, host: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.check_writable(offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        let per_l2 = self.geo.l2_entries();
        let first = offset / cs;
        let n = end.div_ceil(cs) - first;
        if data.is_empty()
            || offset % cs != 0
            || host % cs != 0
            || (end % cs != 0 && end != self.size)
            || first % per_l2 + n > per_l2
            || self.data_file.is_some()
        {
            // Misuse: `host` may be no reservation of the caller's; nothing is given back.
            return Err(Error::InvalidOption(format!(
                "reserved writes cover whole clusters of one L2 table (offset {offset}, {} bytes)",
                data.len()
            )));
        }
        let written = self.write_into_reservation(data, first, n, host);
        if written.is_err() {
            self.release_reserved(host, n);
        }
        written
    }

    /// [`Qcow2::write_reserved`] of checked arguments (`n` clusters from guest cluster
    /// `first`), short of giving the reservation back on failure.
    fn write_into_reservation(&self, data: &[u8], first: u64, n: u64, host: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let _busy = self.busy.acquire(first, n);
        let old = self.lookup_all(first, n)?;
        self.write_data(data, host)?;
        let tail = data.len() as u64 % cs;
        if tail != 0 {
            // The disk's last partial cluster: the rest of the host cluster reads as zeros.
            let at = host + data.len() as u64;
            self.data_storage()
                .zero_range(at, cs - tail)
                .map_err(|e| Error::io(format!("zeroing data at host offset 0x{at:x}"), e))?;
        }
        let hosts: Vec<u64> = (0..n).map(|k| host + k * cs).collect();
        self.update_l2(first, &old, &hosts)
    }

    /// Gives back `n` host clusters at `host` that [`Qcow2::reserve_clusters`] reserved and
    /// nothing was written into (a conversion that stopped): they would leak otherwise. Their
    /// file space, which the writer may have allocated for the data, is released first (they
    /// are still only the caller's), so that a full file system has room for the metadata
    /// that maps what was written.
    pub fn release_reserved(&self, host: u64, n: u64) {
        let cs = self.geo.cluster_size();
        // Never over metadata: on a corrupt image a reservation can overlap a live table
        // (the overlap check stopped its write). Only space is at stake otherwise.
        let clear = !self
            .marked_corrupt
            .load(std::sync::atomic::Ordering::SeqCst)
            && self.meta().overlap(host, n * cs, Target::Data).is_none();
        if clear {
            let _ = self.data_storage().punch_hole(host, n * cs);
        }
        self.meta_mut().free_later(host, n * cs);
    }

    /// Maps `n` unallocated guest clusters from `first` to contiguous host clusters at `host`
    /// (their subclusters, with extended L2 entries, stay unallocated, as in QEMU).
    pub(crate) fn map_preallocated(&self, first: u64, n: u64, host: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let hosts: Vec<u64> = (0..n).map(|k| host + k * cs).collect();
        let new = self.entry_words(&hosts, 0);
        self.set_entries(first, &new, &vec![L2Entry::Unallocated; n as usize])
    }

    /// The L2 words mapping guest clusters to `hosts` (COPIED), with subcluster `bitmap`
    /// when entries are extended.
    fn entry_words(&self, hosts: &[u64], bitmap: u64) -> Vec<u64> {
        hosts
            .iter()
            .flat_map(|&h| [h | COPIED, bitmap])
            .step_by(if self.geo.extended_l2 { 1 } else { 2 })
            .collect()
    }

    /// The host cluster a write to `cluster` (currently `entry`) should go to. A new one is
    /// allocated after the L2 table that will map it, as in QEMU, so that images are laid
    /// out as qemu-img lays them out.
    pub(super) fn target_cluster(&self, cluster: u64, entry: L2Entry) -> Result<u64> {
        if self.data_file.is_some() {
            return Ok(cluster * self.geo.cluster_size());
        }
        match entry {
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } => Ok(h),
            _ => {
                let mut m = self.meta_mut();
                self.l2_for_write(&mut m, (cluster / self.geo.l2_entries()) as usize)?;
                m.alloc_cluster(&*self.file)
            }
        }
    }

    /// After a failed data write (`written`) for guest clusters whose entries were `old`:
    /// gives back the host clusters `hosts` allocated for it, never mapped (as QEMU's
    /// `qcow2_alloc_cluster_abort`), instead of leaking them. Clusters the entries already
    /// held (in place, or a reused preallocated zero cluster) stay theirs.
    fn give_back_unwritten(&self, written: &Result<()>, old: &[L2Entry], hosts: &[u64]) {
        if written.is_ok() || self.data_file.is_some() {
            return;
        }
        let cs = self.geo.cluster_size();
        let mut m = self.meta_mut();
        for (e, &host) in old.iter().zip(hosts) {
            let owned =
                matches!(e, L2Entry::Normal { copied: true, .. }) || e.host_cluster() == Some(host);
            if !owned {
                m.free_later(host, cs);
            }
        }
    }

    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.check_data_write(host, data.len() as u64)?;
        self.data_storage()
            .write_at(data, host)
            .map_err(|e| Error::io(format!("writing data at host offset 0x{host:x}"), e))
    }

    /// Points guest clusters `first..` at `hosts` (COPIED, all subclusters allocated),
    /// releasing what `old` referenced.
    pub(super) fn update_l2(&self, first: u64, old: &[L2Entry], hosts: &[u64]) -> Result<()> {
        self.set_entries(first, &self.entry_words(hosts, ALL_ALLOC), old)
    }

    /// Stores raw L2 entries (their words: two per entry when extended) for guest clusters
    /// `first..` and frees what `old` referenced unless the new entry keeps the same host
    /// cluster.
    pub(super) fn set_entries(&self, first: u64, new: &[u64], old: &[L2Entry]) -> Result<()> {
        let per_l2 = self.geo.l2_entries();
        let mut m = self.meta_mut();
        let l1i = (first / per_l2) as usize;
        let l2i = (first % per_l2) as usize;
        let table = self.l2_for_write(&mut m, l1i)?;
        m.set_l2_entries(&*self.file, table, l2i as u64, new)?;
        let w = self.geo.l2_words() as usize;
        for (k, &o) in old.iter().enumerate() {
            let kept = o.host_cluster() == Some(new[k * w] & OFFSET_MASK);
            if !kept {
                self.release(&mut m, o);
            }
        }
        Ok(())
    }

    /// Queues the refcount decrement for whatever `entry` referenced.
    fn release(&self, m: &mut Meta, entry: L2Entry) {
        let in_data_file = self.data_file.is_some() && entry.host_cluster().is_some();
        if let (Some((off, len)), false) = (
            super::snapshot_ops::referenced_range(entry, self.geo.cluster_size()),
            in_data_file,
        ) {
            m.free_later(off, len);
        }
    }

    /// Returns the host offset of the L2 table for L1 index `l1i` that may be modified:
    /// allocates a new table, or copies one shared with a snapshot (into the cache).
    fn l2_for_write(&self, m: &mut Meta, l1i: usize) -> Result<u64> {
        let file = &*self.file;
        let e = *m
            .l1
            .get(l1i)
            .ok_or_else(|| Error::Corrupt(format!("L1 index {l1i} is beyond the L1 table")))?;
        let off = m.l2_table_offset(l1i)?;
        if off != 0 && e & COPIED != 0 {
            return Ok(off);
        }
        let table = if off == 0 {
            None
        } else {
            Some(m.read_l2_table(file, off)?)
        };
        let new = m.alloc_cluster(file)?;
        m.insert_l2_table(file, new, table.as_deref())?;
        if off != 0 {
            m.free_later(off, self.geo.cluster_size());
        }
        m.l1[l1i] = new | COPIED;
        m.l1_dirty = true;
        Ok(new)
    }

    /// Zeroes or discards a range: whole clusters become metadata, partial ones are
    /// written with zeros (zeroing) or left alone (discard). With extended L2 entries,
    /// zeroing works in subclusters: whole subclusters of a partly zeroed cluster get their
    /// zero bits, only partial subclusters are written.
    pub(super) fn zero_or_discard(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let cs = self.geo.cluster_size();
        if self.version < 3 && self.backing.is_some() && mode != ZeroMode::Discard {
            // v2 has no zero flag: an unallocated cluster would show the backing file.
            return self.write_zeros_literally(offset, len);
        }
        // Discards are whole clusters only, as in QEMU.
        let unit = match mode {
            ZeroMode::Discard => cs,
            ZeroMode::Zero { .. } => self.geo.unit_size(),
        };
        let end = offset + len;
        // Whole units: [whole_start, whole_end). The disk's last partial unit counts as
        // whole when the range covers it from its start.
        let whole_start = offset.next_multiple_of(unit);
        let whole_end = if end == self.size {
            end.next_multiple_of(unit)
        } else {
            end / unit * unit
        };
        // The partial units around them: [offset, head_end) and [tail_start, end).
        let head_end = whole_start.min(end);
        let tail_start = whole_end.max(head_end);
        if let Some(raw) = self.raw_data_file() {
            // A raw data file is the disk as a raw image: its bytes are zeroed too, first,
            // as QEMU does (and discards of whole clusters pass down to it); the metadata
            // alone would leave them stale.
            let (from, to) = match mode {
                ZeroMode::Zero { .. } => (offset, end),
                ZeroMode::Discard => (whole_start, whole_end.min(end).max(whole_start)),
            };
            if to > from {
                raw.zero_range(from, to - from)
                    .map_err(|e| Error::io("zeroing the raw external data file", e))?;
            }
        }
        if let ZeroMode::Zero { .. } = mode {
            self.write_zero_bytes(offset, head_end - offset)?;
            if tail_start < end {
                self.write_zero_bytes(tail_start, end - tail_start)?;
            }
        }
        if whole_start >= whole_end {
            return Ok(());
        }
        // Whole subclusters of partly covered clusters, then whole clusters.
        let clusters_start = whole_start.next_multiple_of(cs).min(whole_end);
        let clusters_end = (whole_end / cs * cs).max(clusters_start);
        self.zero_subclusters(whole_start, clusters_start)?;
        self.zero_subclusters(clusters_end, whole_end)?;
        let mut cluster = clusters_start.div_ceil(cs);
        while cluster * cs < clusters_end {
            let count = clusters_end / cs - cluster;
            let _busy = self.busy.acquire(cluster, count.min(self.geo.l2_entries()));
            let entries = self.lookup_bitmaps(cluster, count)?;
            let old: Vec<L2Entry> = entries.iter().map(|&(e, _)| e).collect();
            let mut new = Vec::with_capacity(entries.len() * 2);
            let mut changed = false;
            for &(e, bitmap) in &entries {
                let (word, new_bitmap) = self.zeroed_entry(e, bitmap, mode);
                changed |= (word, new_bitmap) != (raw_of(e), bitmap);
                new.push(word);
                if self.geo.extended_l2 {
                    new.push(new_bitmap);
                }
            }
            if changed {
                self.set_entries(cluster, &new, &old)?;
            }
            cluster += entries.len() as u64;
        }
        Ok(())
    }

    /// Makes the whole subclusters of `[start, end)` (within one cluster, subcluster
    /// aligned; empty without extended L2 entries) read as zeros: their zero bits are set
    /// and allocation bits cleared (QEMU's zero_l2_subclusters). A compressed cluster has no
    /// subclusters: zeros are written into it.
    fn zero_subclusters(&self, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let sc = self.geo.unit_size();
        let cluster = start / cs;
        {
            let _busy = self.busy.acquire(cluster, 1);
            let (entry, bitmap) = self.lookup_bitmaps(cluster, 1)?[0];
            if !matches!(entry, L2Entry::Compressed { .. }) {
                let (from, to) = (start % cs / sc, (end - 1) % cs / sc + 1);
                let new = (bitmap | alloc_bits(from, to) << 32) & !alloc_bits(from, to);
                if new != bitmap {
                    self.set_entries(cluster, &[entry.encode(), new], &[entry])?;
                }
                return Ok(());
            }
        }
        self.write_zeros_literally(start, end - start)
    }

    /// Writes literal zeros into part of a unit (a cluster, or a subcluster with extended L2
    /// entries), unless it already reads as zeros.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let entry = self.lookup_units(offset / self.geo.unit_size(), 1)?[0];
        let reads_zero = match entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if reads_zero {
            return Ok(());
        }
        self.write_guest(&vec![0u8; len as usize], offset)
    }

    fn write_zeros_literally(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_guest(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The raw L2 entry (and subcluster bitmap) a whole cluster gets when zeroed or
    /// discarded; its bitmap is `bitmap` (extended L2 entries only).
    fn zeroed_entry(&self, e: L2Entry, bitmap: u64, mode: ZeroMode) -> (u64, u64) {
        if self.geo.extended_l2 {
            // QEMU's zero_in_l2_slice / discard_in_l2_slice with subclusters.
            return match (mode, e) {
                (ZeroMode::Zero { unmap: false }, L2Entry::Normal { host, copied: true }) => {
                    (host | COPIED, ALL_ZERO)
                }
                (ZeroMode::Discard, L2Entry::Unallocated) if self.backing.is_none() => (0, bitmap),
                _ => (0, ALL_ZERO),
            };
        }
        let v3 = self.version >= 3;
        let word = match (mode, e) {
            (ZeroMode::Zero { unmap: false }, L2Entry::Normal { host, copied: true })
            | (
                ZeroMode::Zero { unmap: false },
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                },
            ) if v3 => host | COPIED | tables::ZERO,
            (ZeroMode::Discard, L2Entry::Unallocated) if self.backing.is_none() => 0,
            _ if v3 => tables::ZERO,
            _ => 0,
        };
        (word, 0)
    }

    /// Writes one whole cluster compressed (falls back to a normal write if it does not
    /// compress). `offset` must be cluster aligned and `data` one cluster long (or the
    /// disk's shorter last cluster).
    pub fn write_compressed(&self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.check_writable(offset, data.len() as u64)?;
        if offset % cs != 0 || (data.len() as u64 != cs && offset + data.len() as u64 != self.size)
        {
            return Err(Error::InvalidOption(format!(
                "compressed writes must cover one whole cluster (offset {offset}, {} bytes)",
                data.len()
            )));
        }
        if self.data_file.is_some() {
            return Err(Error::UnsupportedFeature(
                "compressed writes to an image with an external data file".into(),
            ));
        }
        let mut full;
        let data = if data.len() as u64 != cs {
            full = vec![0u8; cs as usize];
            full[..data.len()].copy_from_slice(data);
            &full[..]
        } else {
            data
        };
        let Some(packed) = compress::compress(self.compression, data) else {
            return self.write_guest(data, offset);
        };
        let cluster = offset / cs;
        let _busy = self.busy.acquire(cluster, 1);
        let old = self.lookup_run(cluster, 1)?[0];
        let host = self.alloc_compressed_bytes(packed.len() as u64)?;
        self.check_data_write(host, packed.len() as u64)?;
        self.file
            .write_at(&packed, host)
            .map_err(|e| Error::io(format!("writing compressed data at 0x{host:x}"), e))?;
        let entry = tables::compressed_entry(host, packed.len() as u64, self.geo.cluster_bits);
        // A compressed cluster has no subclusters: its bitmap is 0.
        let new = [entry, 0];
        self.set_entries(cluster, &new[..self.geo.l2_words() as usize], &[old])
    }

    /// Reserves `len` bytes for compressed data, packing several clusters' data into one
    /// host cluster; every host cluster touched gets one reference.
    fn alloc_compressed_bytes(&self, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        full_cluster_guard(len, cs)?;
        let mut m = self.meta_mut();
        // The tail's cluster is reused only while it has room; a tail at a cluster boundary
        // means that cluster was filled exactly, and the next one is not ours (QEMU's
        // qcow2_alloc_bytes).
        if let Some(tail) = m.compressed_tail.filter(|t| t % cs != 0) {
            let full = m.refcount(&*self.file, tail / cs)?
                >= tables::max_refcount(self.geo.refcount_order);
            if !full && (tail % cs) + len <= cs {
                m.add_refcount(&*self.file, tail, 1, 1)?;
                m.compressed_tail = Some(tail + len);
                return Ok(tail);
            }
        }
        let host = m.alloc_cluster(&*self.file)?;
        m.compressed_tail = Some(host + len);
        Ok(host)
    }
}

fn full_cluster_guard(len: u64, cs: u64) -> Result<()> {
    if len >= cs {
        return Err(Error::InvalidOption(
            "compressed data larger than a cluster".into(),
        ));
    }
    Ok(())
}

fn is_zero_alloc(e: L2Entry) -> bool {
    matches!(
        e,
        L2Entry::Zero {
            host: Some(_),
            copied: true
        }
    )
}

/// The raw value of an existing entry, for "did anything change" comparisons.
fn raw_of(e: L2Entry) -> u64 {
    match e {
        L2Entry::Compressed { .. } => u64::MAX,
        e => e.encode(),
    }
}

#[cfg(test)]
mod tests {
    use crate::check;
    use crate::engine::resize::tests::{create_open, open};
    use crate::image::Image;

    #[test]
    fn reserved_writes_lay_clusters_out_in_reservation_order() {
        let d = tempfile::tempdir().unwrap();
        // 4 KiB clusters: one L2 table maps 512 clusters (2 MiB). The size ends mid-cluster
        // (at a sector boundary: qcow2::create rounds sizes up to 512 bytes).
        let size = (3 << 20) + 1024;
        let (p, img) = create_open(d.path(), "r.qcow2", size, 4096);
        // Reserve 8 clusters at guest cluster 100, 8 at 508 (cut at the L2 end to 4), then
        // write them in reverse order: host offsets follow the reservations.
        let (a, na) = img.reserve_clusters(100, 8).unwrap();
        let (b, nb) = img.reserve_clusters(508, 8).unwrap();
        assert_eq!((na, nb), (8, 4));
        assert_eq!(b, a + 8 * 4096, "contiguous reservations");
        img.write_reserved(&[2u8; 4 * 4096], 508 * 4096, b).unwrap();
        img.write_reserved(&[1u8; 8 * 4096], 100 * 4096, a).unwrap();
        // The disk's last, partial cluster; and an overwrite of an allocated cluster.
        let last = size / 4096;
        let (c, _) = img.reserve_clusters(last, 1).unwrap();
        img.write_reserved(&[3u8; 1024], last * 4096, c).unwrap();
        let (e, _) = img.reserve_clusters(100, 1).unwrap();
        img.write_reserved(&[4u8; 4096], 100 * 4096, e).unwrap();
        // Misuse is refused.
        for (len, at) in [(4096, 10), (8192, 511 * 4096), (100, 0)] {
            let misuse = img.write_reserved(&vec![0u8; len], at, e).unwrap_err();
            assert!(matches!(misuse, crate::Error::InvalidOption(_)), "{misuse}");
        }
        img.flush().unwrap();
        let r = check(&img).unwrap();
        assert!(r.is_clean(), "{r:?}");
        drop(img);
        let img = open(&p);
        let mut buf = vec![0u8; 8 * 4096];
        img.read_at(&mut buf, 100 * 4096).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 4));
        assert!(buf[4096..].iter().all(|&x| x == 1));
        img.read_at(&mut buf[..4 * 4096], 508 * 4096).unwrap();
        assert!(buf[..4 * 4096].iter().all(|&x| x == 2));
        let mut tail = vec![9u8; 1024];
        img.read_at(&mut tail, last * 4096).unwrap();
        assert_eq!(tail, vec![3u8; 1024]);
        let r = check(&img).unwrap();
        assert!(r.is_clean() && r.leaks == 0, "{r:?}");
    }
}
