//! Overlap checks before guest-data writes (QEMU's default "cached" level): a write whose
//! host range would land on the header, the active or a snapshot's L1 table, an active L2
//! table, the refcount table, a refcount block or the snapshot table means the metadata
//! pointing there is corrupt. The write is refused, the image is marked corrupt (so QEMU and
//! we open it read-only from then on) and no further writes are accepted.

use std::sync::atomic::Ordering;

use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::INCOMPAT_CORRUPT;
use crate::format::tables::OFFSET_MASK;

/// Refcount table entries keep the block offset in bits 9..63.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

impl Qcow2 {
    /// Fails with [`Error::Corrupt`], marking the image corrupt, if `len` bytes of guest data
    /// at host `offset` would overwrite metadata, or if an earlier check already did.
    pub(super) fn check_data_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.marked_corrupt.load(Ordering::SeqCst) {
            return Err(Error::Corrupt(
                "the image was marked corrupt; no more writes are accepted".into(),
            ));
        }
        if self.data_file.is_some() {
            return Ok(());
        }
        let overlap = {
            let m = self.meta();
            self.metadata_overlap(&m, offset, len)
        };
        match overlap {
            None => Ok(()),
            Some(what) => {
                self.marked_corrupt.store(true, Ordering::SeqCst);
                let mut m = self.meta_mut();
                m.header.incompatible_features |= INCOMPAT_CORRUPT;
                let marked = self.write_header(&m);
                tracing::error!(
                    "qcow2: Marking image as corrupt: Preventing invalid write on metadata \
                     (overlaps with {what}) at host offset {offset:#x}"
                );
                marked?;
                Err(Error::Corrupt(format!(
                    "preventing invalid write on metadata at host offset {offset:#x} \
                     ({len} bytes overlap with {what}); the image is marked corrupt"
                )))
            }
        }
    }

    /// The metadata structure `[offset, offset + len)` would overwrite, if any.
    fn metadata_overlap(&self, m: &Meta, offset: u64, len: u64) -> Option<&'static str> {
        let cs = m.geo.cluster_size();
        let end = offset.saturating_add(len);
        let hits = |start: u64, size: u64| start < end && offset < start.saturating_add(size);
        if hits(0, cs) {
            return Some("qcow2_header");
        }
        if hits(m.header.l1_table_offset, m.l1.len() as u64 * 8) {
            return Some("active L1 table");
        }
        let reftable_len = u64::from(m.header.refcount_table_clusters) * cs;
        if hits(m.header.refcount_table_offset, reftable_len) {
            return Some("refcount table");
        }
        if self.snapshot_table_len > 0 && hits(m.header.snapshots_offset, self.snapshot_table_len) {
            return Some("snapshot table");
        }
        if self
            .snapshots
            .iter()
            .any(|s| hits(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if m.l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .any(|l2| l2 != 0 && hits(l2, cs))
        {
            return Some("active L2 table");
        }
        if m.reftable
            .iter()
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .any(|block| block != 0 && hits(block, cs))
        {
            return Some("refcount block");
        }
        None
    }
}
