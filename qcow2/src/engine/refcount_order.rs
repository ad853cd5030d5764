//! Changing the refcount width (`qemu-img amend -o refcount_bits=N`, QEMU's
//! `qcow2_change_refcount_order`): a new refcount table and new refcount blocks of the new
//! width, describing every cluster as before, are written after the end of the file; one
//! header write then switches to them, and the old structures become free clusters. A crash
//! before the switch leaves the old structures in charge of an image that never referenced
//! the new ones.

use crate::error::{Error, Result};
use crate::format::header::MAX_REFTABLE_BYTES;
use crate::format::tables::{self, max_refcount};

use super::meta::encode_u64_table;
use super::overlap::Target;
use super::Qcow2;

impl Qcow2 {
    /// Rebuilds the refcount structures with `1 << order`-bit entries. Fails without a change
    /// if a refcount does not fit the new width (QEMU's words).
    pub fn change_refcount_order(&mut self, order: u32) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if order > 6 {
            return Err(Error::InvalidOption(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if self.version < 3 && order != 4 {
            return Err(Error::InvalidOption(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if order == self.geo.refcount_order {
            return Ok(());
        }
        self.flush_metadata()?;
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let mut m = self.meta_mut();
        m.close_lazy_refcounts(file)?;
        let end = file
            .len()
            .map_err(|e| Error::io("getting the image size", e))?
            .div_ceil(cs);
        let mut counts = (0..end)
            .map(|c| m.refcount(file, c))
            .collect::<Result<Vec<u64>>>()?;
        // The old structures are not carried over.
        let old_table = (
            m.header.refcount_table_offset,
            u64::from(m.header.refcount_table_clusters),
        );
        let old_blocks: Vec<u64> = m.reftable.iter().map(|e| e & !0x1ff).collect();
        let table_clusters = old_table.0 / cs..old_table.0 / cs + old_table.1;
        for c in table_clusters.chain(old_blocks.iter().filter(|&&b| b != 0).map(|b| b / cs)) {
            if let Some(n) = counts.get_mut(c as usize) {
                *n = 0;
            }
        }
        let max = max_refcount(order);
        if let Some(c) = counts.iter().position(|&n| n > max) {
            return Err(Error::InvalidOption(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a \
                 refcount of {}",
                1u32 << order,
                c as u64 * cs,
                counts[c]
            )));
        }
        let layout = Layout::plan(&counts, end, cs, order)?;
        let table_bytes = layout.table_clusters * cs;
        let mut table = vec![0u64; (table_bytes / 8) as usize];
        let mut writes = Vec::new();
        for (i, &r) in layout.blocks.iter().enumerate() {
            let at = (end + layout.table_clusters + i as u64) * cs;
            table[r as usize] = at;
            let mut block = vec![0u8; cs as usize];
            let per_block = layout.per_block;
            for k in 0..per_block {
                let c = r * per_block + k;
                let n = match c {
                    c if c < end => counts[c as usize],
                    c if c < layout.end() => 1,
                    _ => 0,
                };
                tables::set_refcount(&mut block, order, k as usize, n);
            }
            writes.push((at, block));
        }
        writes.push((end * cs, encode_u64_table(&table)));
        for (at, bytes) in &writes {
            m.check_write(file, *at, bytes.len() as u64, Target::New)?;
            file.write_at(bytes, *at)
                .map_err(|e| Error::io(format!("writing refcount structures at {at:#x}"), e))?;
        }
        file.flush()
            .map_err(|e| Error::io("flushing the new refcount structures", e))?;
        let old = m.header.clone();
        m.header.refcount_order = order;
        m.header.refcount_table_offset = end * cs;
        m.header.refcount_table_clusters = layout.table_clusters as u32;
        if let Err(e) = m.write_header(file) {
            m.header = old;
            return Err(m.stop_writes_after_failed_switch("refcount table", e));
        }
        m.geo.refcount_order = order;
        m.refblocks.clear();
        m.replace_reftable(table);
        m.free_hint = 0;
        drop(m);
        self.geo.refcount_order = order;
        Ok(())
    }
}

/// Where the new refcount structures go: the table at the old end of the file, then the
/// blocks, for every range of clusters that holds a nonzero refcount (the new structures
/// included).
struct Layout {
    /// Clusters of the file before the new structures.
    start: u64,
    /// Refcount entries per block.
    per_block: u64,
    /// Clusters of the new refcount table.
    table_clusters: u64,
    /// Indexes (into the table) of the blocks, ascending.
    blocks: Vec<u64>,
}

impl Layout {
    /// Grows the table and the set of blocks until they describe themselves.
    fn plan(counts: &[u64], start: u64, cs: u64, order: u32) -> Result<Layout> {
        let per_block = (cs * 8) >> order;
        let used: Vec<u64> = {
            let mut v: Vec<u64> = (0..start)
                .filter(|&c| counts[c as usize] != 0)
                .map(|c| c / per_block)
                .collect();
            v.dedup();
            v
        };
        let mut l = Layout {
            start,
            per_block,
            table_clusters: 1,
            blocks: used.clone(),
        };
        loop {
            let own = l.start / per_block..=(l.end() - 1) / per_block;
            let mut blocks = used.clone();
            blocks.extend(own);
            blocks.sort_unstable();
            blocks.dedup();
            let entries = blocks.last().map_or(1, |&r| r + 1);
            let table_clusters = (entries * 8).div_ceil(cs).max(1);
            if table_clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::InvalidOption(
                    "the refcount table would exceed 8 MiB".into(),
                ));
            }
            let stable = blocks == l.blocks && table_clusters == l.table_clusters;
            l.blocks = blocks;
            l.table_clusters = table_clusters;
            if stable {
                return Ok(l);
            }
        }
    }

    /// The cluster after the new structures.
    fn end(&self) -> u64 {
        self.start + self.table_clusters + self.blocks.len() as u64
    }
}
