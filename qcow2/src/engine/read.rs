//! The read path: guest ranges to host extents, backing reads and decompression.

use crate::compress;
use crate::error::{Error, Result};
use crate::format::tables::L2Entry;
use crate::image::BlockStatus;

use super::{Qcow2, StatusEntries};

impl Qcow2 {
    /// Reads guest bytes; the caller checked the range. Works in units: subclusters with
    /// extended L2 entries, else clusters.
    pub(super) fn read_guest(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let us = self.geo.unit_size();
        let per = self.geo.subclusters();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let first = off / us;
            let last = (offset + buf.len() as u64 - 1) / us;
            let entries = self.lookup_units(first, last - first + 1)?;
            let mut k = 0;
            while k < entries.len() {
                // Extend over units that can be served by one I/O (a compressed cluster's
                // units by one decompression).
                let mut run = 1;
                let unit = first + k as u64;
                while k + run < entries.len()
                    && continues(entries[k + run - 1], entries[k + run], us)
                    && !(matches!(entries[k], L2Entry::Compressed { .. })
                        && (unit + run as u64) % per == 0)
                {
                    run += 1;
                }
                let off = offset + pos as u64;
                let end = ((first + (k + run) as u64) * us).min(offset + buf.len() as u64);
                let len = (end - off) as usize;
                let chunk = &mut buf[pos..pos + len];
                match entries[k] {
                    L2Entry::Unallocated => self.read_backing(chunk, off)?,
                    L2Entry::Zero { .. } => chunk.fill(0),
                    L2Entry::Normal { host, .. } => self
                        .data_storage()
                        .read_at(chunk, host + off % us)
                        .map_err(|e| {
                            Error::io(format!("reading data at host offset 0x{host:x}"), e)
                        })?,
                    L2Entry::Compressed { host, len: clen } => {
                        let mut cluster = vec![0u8; cs as usize];
                        self.read_compressed(host, clen, &mut cluster)?;
                        let in_cluster = (off % cs) as usize;
                        chunk.copy_from_slice(&cluster[in_cluster..in_cluster + len]);
                    }
                }
                pos += len;
                k += run;
            }
        }
        Ok(())
    }

    /// Reads what the backing chain has at `offset`: zeros past its end or without one.
    pub(super) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) if offset < b.size() => {
                let n = (b.size() - offset).min(buf.len() as u64) as usize;
                b.read_at(&mut buf[..n], offset).map_err(|e| match e {
                    Error::Corrupt(what) | Error::UnalignedTable(what) => {
                        Error::BackingCorrupt(what)
                    }
                    e => e,
                })?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Decompresses the cluster whose data starts at byte `host`.
    pub(super) fn read_compressed(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let mut input = vec![0u8; len as usize];
        self.file
            .read_at(&mut input, host)
            .map_err(|e| Error::io(format!("reading compressed cluster at 0x{host:x}"), e))?;
        compress::decompress(self.compression, &input, out).map_err(|reason| Error::Decompress {
            offset: host,
            reason,
        })
    }

    /// The current contents of guest cluster `cluster` given its entry, into `out` (a whole
    /// cluster), except the bytes `skip` (about to be overwritten), which are not read: as
    /// in QEMU's copy-on-write, only the head and the tail around a write are (a compressed
    /// cluster is decompressed whole).
    pub(super) fn read_cluster_around(
        &self,
        cluster: u64,
        entry: L2Entry,
        out: &mut [u8],
        skip: std::ops::Range<usize>,
    ) -> Result<()> {
        if let L2Entry::Compressed { host, len } = entry {
            return self.read_compressed(host, len, out);
        }
        let (head, rest) = out.split_at_mut(skip.start);
        let tail = &mut rest[skip.len()..];
        for (part, at) in [(head, 0), (tail, skip.end as u64)] {
            if part.is_empty() {
                continue;
            }
            match entry {
                L2Entry::Unallocated => {
                    self.read_backing(part, cluster * self.geo.cluster_size() + at)?
                }
                L2Entry::Zero { .. } => part.fill(0),
                L2Entry::Normal { host, .. } => {
                    self.data_storage().read_at(part, host + at).map_err(|e| {
                        Error::io(format!("reading data at host offset 0x{:x}", host + at), e)
                    })?
                }
                L2Entry::Compressed { .. } => unreachable!("decompressed above"),
            }
        }
        Ok(())
    }

    /// Allocation status of the run starting at `offset` (this layer only), in units
    /// (subclusters with extended L2 entries).
    pub(super) fn status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let us = self.geo.unit_size();
        let len = len.min(self.size - offset).max(1);
        let first = offset / us;
        let last = (offset + len - 1) / us;
        let (head, run) = self.status_run(first, last - first + 1)?;
        let end = ((first + run) * us).min(offset + len);
        let in_unit = offset % us;
        let mut st = BlockStatus {
            len: end - offset,
            allocated: true,
            zero: false,
            data: false,
            compressed: false,
            host_offset: None,
        };
        match head {
            (L2Entry::Unallocated, host) => {
                // An unallocated subcluster of an allocated cluster has an offset in QEMU.
                st.allocated = false;
                st.host_offset = host.map(|h| h + in_unit);
            }
            (L2Entry::Zero { host, .. }, _) => {
                st.zero = true;
                st.host_offset = host.map(|h| h + in_unit);
            }
            (L2Entry::Normal { host, .. }, _) => {
                st.data = true;
                st.host_offset = Some(host + in_unit);
            }
            (L2Entry::Compressed { .. }, _) => {
                st.data = true;
                st.compressed = true;
            }
        }
        Ok(st)
    }

    /// The status of unit `unit` and how many of the units `[unit, unit + n)` report the
    /// same (at least one; stopping at the end of an L2 slice). Clusters whose units all
    /// report alike are crossed whole, so a run costs its clusters, not its subclusters.
    fn status_run(&self, unit: u64, n: u64) -> Result<(UnitStatus, u64)> {
        let per = self.geo.subclusters();
        let first = unit / per;
        let per_table = self.geo.l2_entries() * per;
        if !self.has_l2_table(first) {
            let to_table_end = per_table - unit % per_table;
            return Ok(((L2Entry::Unallocated, None), to_table_end.min(n)));
        }
        // Most runs are short: a few clusters are decoded first, the rest of the slice only
        // if the run goes on through them (a map of an image with a run per MiB decoded the
        // whole slice per run).
        let wanted = (unit % per + n).div_ceil(per);
        // A broken entry further on ends the run before it, as in QEMU; only a query that
        // starts at one fails, or one whose run reaches an invalid bitmap.
        let look = self.lookup_for_status(first, wanted.min(FIRST_LOOK))?;
        let found = self.run_to_broken(unit, n, look)?;
        let decoded = found.1;
        if decoded == FIRST_LOOK && decoded < wanted && found.2 {
            let all = self.lookup_for_status(first, wanted)?;
            return self.run_to_broken(unit, n, all).map(|(run, _, _)| run);
        }
        Ok(found.0)
    }

    /// [`Qcow2::run_in`] over what a status lookup found, with how many clusters it
    /// decoded and whether the run went through them all; fails (made fatal) if the run
    /// reaches an entry that fails runs.
    fn run_to_broken(
        &self,
        unit: u64,
        n: u64,
        look: StatusEntries,
    ) -> Result<((UnitStatus, u64), u64, bool)> {
        let per = self.geo.subclusters();
        let first = unit / per;
        let run = self.run_in(unit, n, &look.entries);
        let decoded = look.entries.len() as u64;
        let through = unit + run.1 == (unit + n).min((first + decoded) * per);
        match look.fails_a_run {
            Some(e) if through => Err(self.fatal(e)),
            _ => Ok((run, decoded, through)),
        }
    }

    /// [`Qcow2::status_run`] over the decoded `clusters` from the one holding `unit` on.
    fn run_in(&self, unit: u64, n: u64, clusters: &[(L2Entry, u64)]) -> (UnitStatus, u64) {
        let per = self.geo.subclusters();
        let us = self.geo.unit_size();
        let first = unit / per;
        if per == 1 {
            let same = |w: &[(L2Entry, u64)]| same_status((w[0].0, None), (w[1].0, None), us);
            let run = 1 + clusters.windows(2).take_while(|w| same(w)).count();
            return ((clusters[0].0, None), (run as u64).min(n));
        }
        let end = (unit + n).min((first + clusters.len() as u64) * per);
        let at = |u: u64| {
            let (entry, bitmap) = clusters[(u / per - first) as usize];
            self.unit_status(entry, bitmap, u % per)
        };
        let head = at(unit);
        let (mut prev, mut u) = (head, unit + 1);
        while u < end {
            let c = (u / per - first) as usize;
            let (entry, bitmap) = clusters[c];
            // A uniform cluster without a host, equal to the one before it, reports what the
            // last unit crossed did all through (the common case: a table's empty clusters).
            let repeat = c > 0 && clusters[c - 1] == (entry, bitmap);
            if u % per == 0 && repeat && hostless(entry) && uniform(entry, bitmap, per) {
                u += per.min(end - u);
                continue;
            }
            if !same_status(prev, at(u), us) {
                break;
            }
            let step = match u % per == 0 && uniform(entry, bitmap, per) {
                true => per.min(end - u),
                false => 1,
            };
            prev = at(u + step - 1);
            u += step;
        }
        (head, u - unit)
    }

    /// What unit `i` of a cluster with `entry` and `bitmap` reports: its entry as a
    /// one-unit cluster (see [`L2Entry::subcluster`]), with the host offset of an
    /// unallocated subcluster of an allocated cluster (QEMU reports one).
    fn unit_status(&self, entry: L2Entry, bitmap: u64, i: u64) -> UnitStatus {
        if self.geo.subclusters() == 1 {
            return (entry, None);
        }
        let sc = self.geo.unit_size();
        let unit = entry
            .subcluster(bitmap, i, sc)
            .expect("bitmaps are checked at lookup");
        match (unit, entry) {
            (L2Entry::Unallocated, L2Entry::Normal { host, .. }) => (unit, Some(host + i * sc)),
            _ => (unit, None),
        }
    }
}

/// Clusters [`Qcow2::status_run`] decodes before it knows how long the run is.
const FIRST_LOOK: u64 = 32;

/// A unit's entry, with the host offset of an unallocated subcluster of an allocated
/// cluster.
type UnitStatus = (L2Entry, Option<u64>);

/// Whether all `per` units of a cluster with `entry` and `bitmap` report the same status,
/// host offsets following on: all unallocated, all zero or all allocated, or compressed.
fn uniform(entry: L2Entry, bitmap: u64, per: u64) -> bool {
    let all = (1u64 << per) - 1;
    let (alloc, zero) = (bitmap & all, bitmap >> 32 & all);
    matches!(entry, L2Entry::Compressed { .. })
        || (alloc == 0 && (zero == 0 || zero == all))
        || (zero == 0 && alloc == all)
}

/// Whether `entry` names no host cluster (its units' statuses carry no host offset).
fn hostless(entry: L2Entry) -> bool {
    matches!(
        entry,
        L2Entry::Unallocated | L2Entry::Zero { host: None, .. }
    )
}

/// Whether `next` can be read in the same I/O as `prev`.
fn continues(prev: L2Entry, next: L2Entry, cs: u64) -> bool {
    match (prev, next) {
        (L2Entry::Unallocated, L2Entry::Unallocated) => true,
        (L2Entry::Zero { .. }, L2Entry::Zero { .. }) => true,
        (L2Entry::Normal { host: a, .. }, L2Entry::Normal { host: b, .. }) => a + cs == b,
        _ => false,
    }
}

/// Whether two neighbouring units (with the host offsets of unallocated subclusters)
/// report the same block status.
fn same_status(prev: UnitStatus, next: UnitStatus, cs: u64) -> bool {
    match (prev.1, next.1) {
        (None, None) => {}
        (Some(a), Some(b)) if a + cs == b => {}
        _ => return false,
    }
    let (prev, next) = (prev.0, next.0);
    match (prev, next) {
        (L2Entry::Zero { host: None, .. }, L2Entry::Zero { host: None, .. }) => true,
        (L2Entry::Zero { host: Some(a), .. }, L2Entry::Zero { host: Some(b), .. }) => a + cs == b,
        // A zero cluster that keeps its host cluster reports an offset, one without does not.
        (L2Entry::Zero { .. }, L2Entry::Zero { .. }) => false,
        (L2Entry::Compressed { .. }, L2Entry::Compressed { .. }) => true,
        _ => continues(prev, next, cs),
    }
}
