//! The refcounts a check counts from the metadata (QEMU's in-memory refcount table), laid
//! out as refcount blocks are on disk, so a rebuild writes its blocks as they are.

use crate::engine::meta::Geometry;
use crate::format::tables;

/// Most bytes [`Imrt::can_grow`] lets the table grow by. A repair grows the file (and so the
/// table) to hold a refcount block past its end: without a bound, one corrupt refcount table
/// entry in a small image would have the repair allocate gigabytes (the table for 2^31
/// clusters of 64-bit refcounts is 16 GiB). 256 MiB covers a block 8 TiB past the end with
/// 64 KiB clusters and 16-bit refcounts.
pub(super) const MAX_GROWTH: u64 = 256 << 20;

/// In-memory refcounts of clusters `0..len`.
#[derive(Clone)]
pub(super) struct Imrt {
    order: u32,
    block_bytes: usize,
    per_block: u64,
    bytes: Vec<u8>,
    len: u64,
}

impl Imrt {
    /// Zero refcounts for `len` clusters.
    pub fn new(geo: Geometry, len: u64) -> Imrt {
        let mut t = Imrt {
            order: geo.refcount_order,
            block_bytes: geo.cluster_size() as usize,
            per_block: geo.refblock_entries(),
            bytes: Vec::new(),
            len: 0,
        };
        t.grow(len);
        t
    }

    /// No refcounts, with the same geometry.
    pub fn empty_like(&self) -> Imrt {
        Imrt {
            bytes: Vec::new(),
            len: 0,
            ..*self
        }
    }

    /// Clusters covered (QEMU's `nb_clusters`).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Largest refcount an entry holds.
    pub fn max(&self) -> u64 {
        tables::max_refcount(self.order)
    }

    /// Refcount of `cluster` (0 past the end).
    pub fn get(&self, cluster: u64) -> u64 {
        if cluster >= self.len {
            return 0;
        }
        tables::get_refcount(&self.bytes, self.order, cluster as usize)
    }

    /// Sets the refcount of `cluster`, covering it first if needed.
    pub fn set(&mut self, cluster: u64, value: u64) {
        self.grow(cluster + 1);
        tables::set_refcount(&mut self.bytes, self.order, cluster as usize, value);
    }

    /// Covers at least `len` clusters (memory grows by whole refcount blocks).
    pub fn grow(&mut self, len: u64) {
        if len <= self.len {
            return;
        }
        self.len = len;
        let blocks = len.div_ceil(self.per_block) as usize;
        self.bytes.resize(blocks * self.block_bytes, 0);
    }

    /// Whether memory for `len` clusters can be had (without growing yet): at most
    /// [`MAX_GROWTH`] more bytes than now, which the allocator must grant.
    pub fn can_grow(&mut self, len: u64) -> bool {
        let bytes = len
            .div_ceil(self.per_block)
            .saturating_mul(self.block_bytes as u64);
        let more = bytes.saturating_sub(self.bytes.len() as u64);
        more <= MAX_GROWTH && self.bytes.try_reserve(more as usize).is_ok()
    }

    /// Zeroes every refcount, keeping the length.
    pub fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// Refcount block `index` as it goes on disk (`None` past the end: all zeros).
    pub fn block(&self, index: u64) -> Option<&[u8]> {
        let start = index as usize * self.block_bytes;
        self.bytes.get(start..start + self.block_bytes)
    }

    /// Whether refcount block `index` holds only zeros.
    pub fn block_is_zero(&self, index: u64) -> bool {
        self.block(index).is_none_or(|b| b.iter().all(|&x| x == 0))
    }

    /// Refcounts per block.
    pub fn per_block(&self) -> u64 {
        self.per_block
    }
}
