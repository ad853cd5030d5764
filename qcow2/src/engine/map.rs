//! Mapping guest ranges to host extents for callers that do their own I/O (zero copy).

use std::sync::atomic::Ordering;

use crate::format::tables::L2Entry;
use crate::image::{check_range, Extent, IoMapping};

use super::Qcow2;

impl Qcow2 {
    /// See [`crate::Image::map_io`]: reads of data, zero and (without a backing file)
    /// unallocated clusters; writes to clusters writable in place, which stay reserved
    /// against allocating writes and discards while the returned mapping lives.
    pub(super) fn map_guest(&self, offset: u64, len: u64, write: bool) -> Option<IoMapping> {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return None;
        }
        if write && (self.read_only || self.marked_corrupt.load(Ordering::SeqCst)) {
            return None;
        }
        let cs = self.geo.cluster_size();
        let first = offset / cs;
        let count = (offset + len - 1) / cs - first + 1;
        let entries = self.lookup_all(first, count).ok()?;
        let busy = if write {
            let guard = self.busy.try_acquire(first, count)?;
            // Re-check under the busy mark: a discard or copy-on-write may have raced us.
            if self.lookup_all(first, count).ok()? != entries {
                return None;
            }
            Some(guard)
        } else {
            None
        };
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for (cluster, entry) in (first..).zip(entries) {
            let end = ((cluster + 1) * cs).min(offset + len);
            let piece = end - pos;
            let extent = match entry {
                L2Entry::Normal { host, copied } if copied || !write => Extent::Data {
                    host: host + pos % cs,
                    len: piece,
                },
                L2Entry::Zero { .. } if !write => Extent::Zero { len: piece },
                L2Entry::Unallocated if !write && self.backing.is_none() => {
                    Extent::Zero { len: piece }
                }
                _ => return None,
            };
            push_merged(&mut extents, extent);
            pos = end;
        }
        if write {
            for e in &extents {
                if let Extent::Data { host, len } = *e {
                    self.check_data_write(host, len).ok()?;
                }
            }
        }
        Some(IoMapping::new(self.data_storage().clone(), extents, busy))
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
