//! Changes of an image's format options for `qemu-img amend` (QEMU's `qcow2_amend_options`):
//! the version (upgrade and downgrade), lazy refcounts and the external data file's name.
//! The refcount width has its own module (`refcount_order.rs`); the size is `resize`.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::format::header::{
    default_feature_names, CompressionType, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::format::tables::{L2Entry, COPIED, OFFSET_MASK};
use crate::open::read_snapshot_l1;

use super::meta::Meta;
use super::Qcow2;

impl Qcow2 {
    /// Makes a version 2 image a version 3 one (QEMU's `qcow2_upgrade`): a snapshot table
    /// written by a v2 program gets the extra data v3 requires, then the header changes.
    pub fn upgrade_to_v3(&mut self) -> Result<()> {
        self.check_amendable()?;
        if self.version >= 3 {
            return Ok(());
        }
        self.flush_metadata()?;
        let file = &*self.file;
        let mut m = self.meta_mut();
        if self.snapshots.iter().any(|s| s.disk_size.is_none()) {
            let mut freed = Vec::new();
            self.replace_snapshot_table(&mut m, &self.snapshots, &mut freed)?;
            m.writeback(file)?;
        }
        let old = m.header.clone();
        m.header.version = 3;
        m.header.header_length = V3_HEADER_LEN;
        m.header.feature_names = default_feature_names(self.geo.cluster_size());
        if let Err(e) = m.write_header(file) {
            m.header = old;
            return Err(e);
        }
        drop(m);
        self.version = 3;
        self.reload_snapshot_table()
    }

    /// Makes a version 3 image a version 2 one (QEMU's `qcow2_downgrade`), with QEMU's
    /// refusals; zero clusters become data clusters of zeros (or, without a backing file,
    /// unallocated ones), in the active tables and the snapshots' alike.
    pub fn downgrade_to_v2(&mut self) -> Result<()> {
        self.check_amendable()?;
        if self.version < 3 {
            return Ok(());
        }
        let refuse = |why: String| Err(Error::NotSupported(why));
        if self.geo.refcount_order != 4 {
            return refuse("compat=0.10 requires refcount_bits=16".into());
        }
        if self.data_file.is_some() {
            return refuse("Cannot downgrade an image with a data file".into());
        }
        if self
            .snapshots
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != Some(self.size))
        {
            return refuse("Internal snapshots prevent downgrade of image".into());
        }
        self.flush_metadata()?;
        self.make_clean()?;
        let incompatible = self.meta().header.incompatible_features;
        if incompatible & !INCOMPAT_COMPRESSION != 0 {
            return refuse(format!(
                "Cannot downgrade an image with incompatible features {incompatible:#x} set"
            ));
        }
        // Before any cluster changes (QEMU checks after expanding, and only the active disk).
        if incompatible & INCOMPAT_COMPRESSION != 0 && self.has_compressed_clusters()? {
            return refuse(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters"
                    .into(),
            );
        }
        self.expand_zero_clusters()?;
        let file = &*self.file;
        let mut m = self.meta_mut();
        let old = m.header.clone();
        let h = &mut m.header;
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Deflate;
        h.feature_names.clear();
        // The bitmaps extension stays, as QEMU keeps it: without autoclear bits, later opens
        // find the bitmaps inconsistent and ignore them.
        if let Err(e) = m.write_header(file) {
            m.header = old;
            return Err(e);
        }
        drop(m);
        self.version = 2;
        self.compression = CompressionType::Deflate;
        Ok(())
    }

    /// Turns lazy refcounts on or off (v3 only, as QEMU requires); turning them off writes
    /// the refcounts back and clears the dirty bit first.
    pub fn set_lazy_refcounts(&mut self, on: bool) -> Result<()> {
        self.check_amendable()?;
        if self.meta().header.lazy_refcounts() == on {
            return Ok(());
        }
        if on && self.version < 3 {
            return Err(Error::InvalidOption(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)"
                    .into(),
            ));
        }
        self.flush_metadata()?;
        if !on {
            self.make_clean()?;
        }
        let mut m = self.meta_mut();
        m.header.compatible_features ^= COMPAT_LAZY_REFCOUNTS;
        m.write_header(&*self.file)?;
        m.lazy_refcounts = on;
        Ok(())
    }

    /// Renames the external data file in the header, or sets whether it must stay a valid
    /// raw image (only to off, as QEMU allows), as `-o data_file=...,data_file_raw=...` do.
    pub fn set_data_file(&mut self, name: Option<&str>, raw: Option<bool>) -> Result<()> {
        self.check_amendable()?;
        let mut m = self.meta_mut();
        if !m.header.has_external_data() && name.is_some() {
            return Err(Error::InvalidOption(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if raw == Some(true) && !m.header.data_file_raw() {
            return Err(Error::InvalidOption(
                "data-file-raw cannot be set on existing images".into(),
            ));
        }
        let old = m.header.clone();
        if let Some(name) = name {
            m.header.data_file = (!name.is_empty()).then(|| name.into());
        }
        if raw == Some(false) {
            m.header.autoclear_features &= !crate::format::header::AUTOCLEAR_DATA_FILE_RAW;
        }
        if m.header != old {
            m.write_header(&*self.file)?;
        }
        Ok(())
    }

    /// Refuses amending a read-only handle.
    fn check_amendable(&self) -> Result<()> {
        match self.read_only {
            true => Err(Error::ReadOnly),
            false => self.refuse_if_opened_for_check(),
        }
    }

    /// Writes lazily kept refcounts back, clears the dirty bit (QEMU's `qcow2_mark_clean`)
    /// and keeps refcounts up to date from then on.
    fn make_clean(&self) -> Result<()> {
        let file = &*self.file;
        let mut m = self.meta_mut();
        m.close_lazy_refcounts(file)?;
        m.set_dirty_bit(file, false)?;
        m.lazy_refcounts = false;
        Ok(())
    }

    /// Rereads the snapshot table after the header moved it.
    fn reload_snapshot_table(&mut self) -> Result<()> {
        let file = &*self.file;
        let (offset, count) = {
            let m = self.meta();
            (m.header.snapshots_offset, m.header.nb_snapshots)
        };
        if count == 0 {
            return Ok(());
        }
        self.snapshots = super::read_snapshot_table(file, offset, count, false)?.snapshots;
        Ok(())
    }

    /// Every L2 table of the image (the active one's and the snapshots'), each once.
    fn all_l2_tables(&self) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let mut l1s = vec![self.meta().l1.clone()];
        for s in &self.snapshots {
            l1s.push(read_snapshot_l1(&*self.file, s, cs)?);
        }
        let mut seen = HashSet::new();
        Ok(l1s
            .into_iter()
            .flatten()
            .map(|e| e & OFFSET_MASK)
            .filter(|&t| t != 0 && seen.insert(t))
            .collect())
    }

    /// QEMU's `qcow2_expand_zero_clusters`: every zero entry of every L2 table (active and
    /// snapshots') becomes a cluster of zeros, or unallocated without a backing file.
    /// New clusters get as many references as their table has; zeros and refcounts are
    /// durable before the entries that point at them (writeback's order).
    fn expand_zero_clusters(&self) -> Result<()> {
        let tables = self.all_l2_tables()?;
        let mut m = self.meta_mut();
        for table in tables {
            self.expand_table(&mut m, table)?;
        }
        m.writeback(&*self.file)?;
        drop(m);
        self.flush_metadata()
    }

    /// Expands the zero entries of the L2 table at `table`. A preallocated zero cluster is
    /// zeroed in place only when nothing but this table references it; one shared with
    /// other tables (a snapshot's data) is replaced by a new cluster of zeros, and this
    /// table's references to it are dropped once the new entry is written back.
    fn expand_table(&self, m: &mut Meta, table: u64) -> Result<()> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let table_rc = m.refcount(file, table / cs)?;
        // The header decides, not whether the backing file was opened: an unallocated
        // cluster of an image with a backing file reads that file.
        let backed = m.header.backing_file.is_some();
        let entries = m.read_l2_table(file, table)?;
        for (j, &raw) in entries.iter().enumerate() {
            let L2Entry::Zero { host, .. } = self.decode_l2(raw) else {
                continue;
            };
            let own = match host {
                Some(h) => m.refcount(file, h / cs)? == table_rc,
                None => false,
            };
            let (host, shared) = match host {
                Some(h) if own => (h, None),
                None if !backed => {
                    m.set_l2_entries(file, table, j as u64, &[0])?;
                    continue;
                }
                shared => {
                    let h = m.alloc_cluster(file)?;
                    if table_rc > 1 {
                        m.add_refcount(file, h, cs, table_rc as i64 - 1)?;
                    }
                    (h, shared)
                }
            };
            m.check_write(file, host, cs, super::overlap::Target::Data)?;
            file.write_at(&vec![0u8; cs as usize], host)
                .map_err(|e| Error::io(format!("writing zeros at {host:#x}"), e))?;
            let copied = m.refcount(file, host / cs)? == 1;
            let new = if copied { host | COPIED } else { host };
            m.set_l2_entries(file, table, j as u64, &[new])?;
            if let Some(old) = shared {
                for _ in 0..table_rc {
                    m.free_later(old, cs);
                }
            }
        }
        Ok(())
    }

    /// Whether any L2 table (the active disk's or a snapshot's) maps a compressed cluster.
    fn has_compressed_clusters(&self) -> Result<bool> {
        let tables = self.all_l2_tables()?;
        let step = self.geo.l2_words() as usize;
        let mut m = self.meta_mut();
        for table in tables {
            let entries = m.read_l2_table(&*self.file, table)?;
            if entries
                .iter()
                .step_by(step)
                .any(|&raw| matches!(self.decode_l2(raw), L2Entry::Compressed { .. }))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
