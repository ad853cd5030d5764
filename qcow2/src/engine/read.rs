//! The read path: guest ranges to host extents, backing reads and decompression.

use crate::compress;
use crate::error::{Error, Result};
use crate::format::tables::L2Entry;
use crate::image::BlockStatus;

use super::Qcow2;

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
                b.read_at(&mut buf[..n], offset)?;
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

    /// The whole current contents of guest cluster `cluster` given its entry.
    pub(super) fn read_cluster(&self, cluster: u64, entry: L2Entry, out: &mut [u8]) -> Result<()> {
        match entry {
            L2Entry::Unallocated => self.read_backing(out, cluster * self.geo.cluster_size()),
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => self
                .data_storage()
                .read_at(out, host)
                .map_err(|e| Error::io(format!("reading data at host offset 0x{host:x}"), e)),
            L2Entry::Compressed { host, len } => self.read_compressed(host, len, out),
        }
    }

    /// Allocation status of the run starting at `offset` (this layer only), in units
    /// (subclusters with extended L2 entries).
    pub(super) fn status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let us = self.geo.unit_size();
        let len = len.min(self.size - offset).max(1);
        let first = offset / us;
        let last = (offset + len - 1) / us;
        let entries = self.status_units(first, last - first + 1)?;
        let mut run = 1;
        while run < entries.len() && same_status(entries[run - 1], entries[run], us) {
            run += 1;
        }
        let end = ((first + run as u64) * us).min(offset + len);
        let in_unit = offset % us;
        let mut st = BlockStatus {
            len: end - offset,
            allocated: true,
            zero: false,
            data: false,
            compressed: false,
            host_offset: None,
        };
        match entries[0] {
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

    /// [`Qcow2::lookup_units`], with the host offset of each unallocated subcluster of an
    /// allocated cluster.
    fn status_units(&self, unit: u64, n: u64) -> Result<Vec<(L2Entry, Option<u64>)>> {
        let per = self.geo.subclusters();
        if per == 1 {
            return Ok(self
                .lookup_run(unit, n)?
                .into_iter()
                .map(|e| (e, None))
                .collect());
        }
        let first = unit / per;
        let clusters = self.lookup_bitmaps(first, (unit % per + n).div_ceil(per))?;
        let units = self.expand_units(first, &clusters, unit, n);
        let sc = self.geo.unit_size();
        Ok((unit..)
            .zip(units)
            .map(|(u, e)| match (e, clusters[(u / per - first) as usize].0) {
                (L2Entry::Unallocated, L2Entry::Normal { host, .. }) => {
                    (e, Some(host + u % per * sc))
                }
                _ => (e, None),
            })
            .collect())
    }
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
fn same_status(prev: (L2Entry, Option<u64>), next: (L2Entry, Option<u64>), cs: u64) -> bool {
    match (prev.1, next.1) {
        (None, None) => {}
        (Some(a), Some(b)) if a + cs == b => {}
        _ => return false,
    }
    let (prev, next) = (prev.0, next.0);
    match (prev, next) {
        (L2Entry::Zero { host: None, .. }, L2Entry::Zero { host: None, .. }) => true,
        (L2Entry::Zero { host: Some(a), .. }, L2Entry::Zero { host: Some(b), .. }) => a + cs == b,
        (L2Entry::Compressed { .. }, L2Entry::Compressed { .. }) => true,
        _ => continues(prev, next, cs),
    }
}
