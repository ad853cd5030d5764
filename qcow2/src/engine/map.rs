//! Mapping guest ranges to host extents for callers that do their own I/O (zero copy).

use std::sync::atomic::Ordering;

use crate::format::tables::{L2Entry, OFFSET_MASK};
use crate::image::{check_range, Allocated, Extent, IoMapping, MapOutcome, MetadataLoad};

use super::Qcow2;

impl Qcow2 {
    /// See [`crate::Image::map_io`]: reads of data, zero and (without a backing file)
    /// unallocated clusters; writes to clusters writable in place, which stay reserved
    /// against allocating writes and discards while the returned mapping lives. Only cached
    /// L2 slices are used; a missing one is asked for as a [`MetadataLoad`].
    pub(super) fn map_guest(&self, offset: u64, len: u64, write: bool) -> MapOutcome {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return MapOutcome::Declined;
        }
        if write && (self.read_only || self.marked_corrupt.load(Ordering::SeqCst)) {
            return MapOutcome::Declined;
        }
        let cs = self.geo.cluster_size();
        let us = self.geo.unit_size();
        let first = offset / cs;
        let count = (offset + len - 1) / cs - first + 1;
        let clusters = match self.lookup_cached(first, count) {
            Ok(entries) => entries,
            Err(load) => return MapOutcome::Load(load),
        };
        if !self.valid_entries(first, &clusters) {
            // The caller's own path reports the corruption.
            return MapOutcome::Declined;
        }
        let busy = if write {
            let Some(guard) = self.busy.try_acquire(first, count) else {
                return MapOutcome::Declined;
            };
            // Re-check under the busy mark: a discard or copy-on-write may have raced us.
            if self.lookup_cached(first, count).ok() != Some(clusters.clone()) {
                return MapOutcome::Declined;
            }
            Some(guard)
        } else {
            None
        };
        let unit = offset / us;
        let entries = self.expand_units(first, &clusters, unit, (offset + len - 1) / us - unit + 1);
        let mut extents: Vec<Extent> = Vec::new();
        let mut allocated = Vec::new();
        let mut zero_first = Vec::new();
        let mut subclusters: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        for (unit, entry) in (unit..).zip(entries) {
            let end = ((unit + 1) * us).min(offset + len);
            let piece = end - pos;
            let extent = match entry {
                L2Entry::Normal { host, copied } if copied || !write => Extent::Data {
                    host: host + pos % us,
                    len: piece,
                },
                // A subcluster of a COPIED cluster that is not allocated: written in place,
                // its bit set once the data is written. Nothing to copy if the write covers
                // it, or if it reads as zeros (the rest is zeroed first).
                _ if write && self.geo.extended_l2 => {
                    let cluster = unit / self.geo.subclusters();
                    let copied = match clusters[(cluster - first) as usize].0 {
                        L2Entry::Normal { host, copied: true } => Some(host),
                        _ => None,
                    };
                    let Some(host) = copied.filter(|_| piece == us || self.reads_zero(entry))
                    else {
                        self.release_allocated(&allocated);
                        return MapOutcome::Declined;
                    };
                    let at = host + unit % self.geo.subclusters() * us;
                    if piece < us {
                        zero_first.push((at, us));
                    }
                    let bit = 1 << (unit % self.geo.subclusters());
                    match subclusters.last_mut() {
                        Some((c, bits)) if *c == cluster => *bits |= bit,
                        _ => subclusters.push((cluster, bit)),
                    }
                    Extent::Data {
                        host: at + pos % us,
                        len: piece,
                    }
                }
                L2Entry::Zero { .. } if !write => Extent::Zero { len: piece },
                L2Entry::Unallocated if !write && self.backing.is_none() => {
                    Extent::Zero { len: piece }
                }
                // Allocation here is per cluster: subclusters go through the engine.
                _ if write
                    && !self.geo.extended_l2
                    && self.reads_zero(entry)
                    && self.data_file.is_none() =>
                {
                    let cluster = unit;
                    let Ok(host) = self.target_cluster(cluster, entry) else {
                        self.release_allocated(&allocated);
                        return MapOutcome::Declined;
                    };
                    allocated.push(Allocated {
                        cluster,
                        old: entry,
                        host,
                    });
                    if piece < cs {
                        zero_first.push((host, cs));
                    }
                    Extent::Data {
                        host: host + pos % cs,
                        len: piece,
                    }
                }
                _ => {
                    self.release_allocated(&allocated);
                    return MapOutcome::Declined;
                }
            };
            push_merged(&mut extents, extent);
            pos = end;
        }
        if write {
            for e in &extents {
                if let Extent::Data { host, len } = *e {
                    if self.check_data_write(host, len).is_err() {
                        self.release_allocated(&allocated);
                        return MapOutcome::Declined;
                    }
                }
            }
        }
        let mut mapping = IoMapping::new(self.data_storage().clone(), extents, busy);
        mapping.allocated = allocated;
        mapping.zero_first = zero_first;
        mapping.subclusters = subclusters;
        MapOutcome::Mapped(mapping)
    }

    /// Whether entries may be used: host offsets aligned, nothing QEMU refuses to read and,
    /// with extended L2 entries, valid bitmaps.
    fn valid_entries(&self, first: u64, entries: &[(L2Entry, u64)]) -> bool {
        self.first_unaligned(entries).is_none()
            && self.first_unreadable(first, entries).is_none()
            && entries.iter().all(|&(e, bitmap)| e.valid_bitmap(bitmap))
    }

    /// Whether a cluster with this entry reads as zeros (so a write may allocate it without
    /// copying anything).
    fn reads_zero(&self, entry: L2Entry) -> bool {
        match entry {
            L2Entry::Zero { .. } => self.version >= 3,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }

    /// See [`crate::Image::finish_io`].
    pub(super) fn finish_mapping(&self, mapping: IoMapping, ok: bool) -> bool {
        if !ok {
            self.release_allocated(&mapping.allocated);
            return false;
        }
        for (k, a) in mapping.allocated.iter().enumerate() {
            if let Err(e) = self.update_l2(a.cluster, &[a.old], &[a.host]) {
                // Never report a write whose data is not mapped as done.
                tracing::warn!("mapping guest cluster {} after its write: {e}", a.cluster);
                self.release_allocated(&mapping.allocated[k..]);
                return false;
            }
        }
        for &(cluster, bits) in &mapping.subclusters {
            if let Err(e) = self.allocate_subclusters(cluster, bits) {
                tracing::warn!("mapping subclusters of guest cluster {cluster}: {e}");
                return false;
            }
        }
        // Dropping the mapping releases the busy mark, after the L2 update.
        true
    }

    /// Marks the subclusters `bits` of COPIED guest cluster `cluster` allocated (the caller
    /// holds the cluster busy and wrote their data).
    fn allocate_subclusters(&self, cluster: u64, bits: u64) -> crate::Result<()> {
        let (entry, bitmap) = self.lookup_bitmaps(cluster, 1)?[0];
        let new = (bitmap | bits) & !(bits << 32);
        self.set_entries(cluster, &[entry.encode(), new], &[entry])
    }

    /// Gives back clusters allocated for a write that did not happen (a preallocated zero
    /// cluster that was reused stays where it is).
    fn release_allocated(&self, allocated: &[Allocated]) {
        let mut m = self.meta_mut();
        for a in allocated {
            if a.old.host_cluster() != Some(a.host) {
                m.free_later(a.host, self.geo.cluster_size());
            }
        }
    }

    /// Entries (with bitmaps) for guest clusters `[first, first + count)` from cached L2
    /// slices only; the first missing slice is returned as the load to do.
    fn lookup_cached(&self, first: u64, count: u64) -> Result<Vec<(L2Entry, u64)>, MetadataLoad> {
        let m = self.meta();
        let per_l2 = self.geo.l2_entries();
        let mut entries = Vec::with_capacity(count as usize);
        while (entries.len() as u64) < count {
            let cluster = first + entries.len() as u64;
            let l2i = cluster % per_l2;
            let left = count - entries.len() as u64;
            let table =
                m.l1.get((cluster / per_l2) as usize)
                    .map_or(0, |e| e & OFFSET_MASK);
            if table == 0 {
                let per_slice = m.l2_slice_entries();
                let n = left.min(per_slice - l2i % per_slice) as usize;
                entries.extend(std::iter::repeat_n((L2Entry::Unallocated, 0), n));
                continue;
            }
            let Some(slice) = self.decode_slice(&m, table, l2i, left) else {
                return Err(MetadataLoad {
                    storage: self.file.clone(),
                    offset: m.l2_slice_key(table, l2i),
                    len: m.l2_slice_bytes() as usize,
                    generation: m.l2_generation,
                });
            };
            entries.extend(slice);
        }
        Ok(entries)
    }

    /// Caches an L2 slice read as `load` asked, unless the L2 state changed since (a slice
    /// was written back or a table freed: the bytes may be stale), the slice got cached
    /// meanwhile, or its table is no longer in the L1 table or fails validation.
    pub(super) fn install_l2_slice(&self, load: &MetadataLoad, bytes: &[u8]) {
        let mut m = self.meta_mut();
        let cs = self.geo.cluster_size();
        let table = load.offset - load.offset % cs;
        let current = m.l2_generation == load.generation
            && !m.l2.contains(load.offset)
            && bytes.len() as u64 == m.l2_slice_bytes()
            && m.l1.iter().any(|e| e & OFFSET_MASK == table);
        let valid = current
            && self
                .file
                .len()
                .is_ok_and(|len| m.check_table_offset("L2 table", table, len).is_ok());
        if !valid || m.make_room_l2(&*self.file).is_err() {
            return;
        }
        let slice = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        m.l2.insert(load.offset, slice, false);
    }
}

/// Appends `next`, merging it into the last extent when they are contiguous.
fn push_merged(extents: &mut Vec<Extent>, next: Extent) {
    match (extents.last_mut(), next) {
        (Some(Extent::Data { host, len }), Extent::Data { host: h, len: l })
            if *host + *len == h =>
        {
            *len += l
        }
        (Some(Extent::Zero { len }), Extent::Zero { len: l }) => *len += l,
        _ => extents.push(next),
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::test_images::create_open;
    use crate::format::tables::COPIED;
    use crate::image::{Image, MapOutcome};

    #[test]
    fn an_allocating_write_whose_clusters_cannot_be_mapped_is_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = create_open(dir.path(), "f.qcow2", 1 << 20, 4096);
        let MapOutcome::Mapped(mapping) = img.map_io(0, 4096, true) else {
            panic!("an allocating write of an empty image maps");
        };
        assert_eq!(mapping.allocated.len(), 1);
        // The L2 table the entry would go into turns out unusable (misaligned).
        img.meta_mut().l1[0] = 0x1234 | COPIED;
        assert!(
            !img.finish_io(mapping, true),
            "reported done without a mapping"
        );
        // A failed I/O is never complete either.
        img.meta_mut().l1[0] = 0;
        let MapOutcome::Mapped(mapping) = img.map_io(8192, 512, true) else {
            panic!("maps");
        };
        assert!(!img.finish_io(mapping, false));
        let MapOutcome::Mapped(mapping) = img.map_io(8192, 512, true) else {
            panic!("the busy mark was released");
        };
        assert!(img.finish_io(mapping, true));
    }
}
