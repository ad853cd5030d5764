//! The read path: guest ranges to host extents, backing reads and decompression.

use crate::compress;
use crate::error::{Error, Result};
use crate::format::tables::L2Entry;
use crate::image::BlockStatus;

use super::Qcow2;

impl Qcow2 {
    /// Reads guest bytes; the caller checked the range.
    pub(super) fn read_guest(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let first = off / cs;
            let last = (offset + buf.len() as u64 - 1) / cs;
            let entries = self.lookup_run(first, last - first + 1)?;
            let mut k = 0;
            while k < entries.len() {
                // Extend over clusters that can be served by one I/O.
                let mut run = 1;
                while k + run < entries.len()
                    && continues(entries[k + run - 1], entries[k + run], cs)
                {
                    run += 1;
                }
                let off = offset + pos as u64;
                let in_cluster = off % cs;
                let end = ((first + (k + run) as u64) * cs).min(offset + buf.len() as u64);
                let len = (end - off) as usize;
                let chunk = &mut buf[pos..pos + len];
                match entries[k] {
                    L2Entry::Unallocated => self.read_backing(chunk, off)?,
                    L2Entry::Zero { .. } => chunk.fill(0),
                    L2Entry::Normal { host, .. } => self
                        .data_storage()
                        .read_at(chunk, host + in_cluster)
                        .map_err(|e| {
                            Error::io(format!("reading data at host offset 0x{host:x}"), e)
                        })?,
                    L2Entry::Compressed { host, len: clen } => {
                        let mut cluster = vec![0u8; cs as usize];
                        self.read_compressed(host, clen, &mut cluster)?;
                        chunk.copy_from_slice(
                            &cluster[in_cluster as usize..in_cluster as usize + len],
                        );
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

    /// Allocation status of the run starting at `offset` (this layer only).
    pub(super) fn status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let cs = self.geo.cluster_size();
        let len = len.min(self.size - offset).max(1);
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let entries = self.lookup_run(first, last - first + 1)?;
        let mut run = 1;
        while run < entries.len() && same_status(entries[run - 1], entries[run], cs) {
            run += 1;
        }
        let end = ((first + run as u64) * cs).min(offset + len);
        let in_cluster = offset % cs;
        let mut st = BlockStatus {
            len: end - offset,
            allocated: true,
            zero: false,
            data: false,
            compressed: false,
            host_offset: None,
        };
        match entries[0] {
            L2Entry::Unallocated => st.allocated = false,
            L2Entry::Zero { host, .. } => {
                st.zero = true;
                st.host_offset = host.map(|h| h + in_cluster);
            }
            L2Entry::Normal { host, .. } => {
                st.data = true;
                st.host_offset = Some(host + in_cluster);
            }
            L2Entry::Compressed { .. } => {
                st.data = true;
                st.compressed = true;
            }
        }
        Ok(st)
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

/// Whether two neighbouring clusters report the same block status.
fn same_status(prev: L2Entry, next: L2Entry, cs: u64) -> bool {
    match (prev, next) {
        (L2Entry::Zero { host: None, .. }, L2Entry::Zero { host: None, .. }) => true,
        (L2Entry::Zero { host: Some(a), .. }, L2Entry::Zero { host: Some(b), .. }) => a + cs == b,
        (L2Entry::Compressed { .. }, L2Entry::Compressed { .. }) => true,
        _ => continues(prev, next, cs),
    }
}
