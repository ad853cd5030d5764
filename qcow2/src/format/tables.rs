//! L1/L2 entries and refcount blocks: decoding and encoding, no I/O.

/// Bits 9..=55 of an L1/L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (writes may go in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of an L2 entry (v3): reads as zeros.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
/// Bits 0-31 of an extended L2 entry's bitmap: subcluster `i` is allocated (bit `i`).
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Bits 32-63 of an extended L2 entry's bitmap: subcluster `i` reads as zeros (bit `32 + i`).
pub const ALL_ZERO: u64 = ALL_ALLOC << 32;

/// Bitmap bits marking subclusters `from..to` allocated.
pub fn alloc_bits(from: u64, to: u64) -> u64 {
    if from >= to {
        return 0;
    }
    (ALL_ALLOC >> (SUBCLUSTERS - (to - from))) << from
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; hides the backing file. `host` keeps a preallocated cluster if set.
    Zero {
        /// Preallocated host cluster (QEMU's ZERO_ALLOC), if any.
        host: Option<u64>,
        /// COPIED flag.
        copied: bool,
    },
    /// Data at `host`.
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// COPIED flag: refcount is exactly one.
        copied: bool,
    },
    /// Compressed data starting at byte `host`, at most `len` bytes.
    Compressed {
        /// Host byte offset (not aligned).
        host: u64,
        /// Upper bound of the compressed length.
        len: u64,
    },
}

impl L2Entry {
    /// Decodes a raw (host-endian) L2 entry for an image with `cluster_bits`.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let shift = 62 - (cluster_bits - 8);
            let host = raw & ((1u64 << shift) - 1);
            let sectors = ((raw & !COPIED & !COMPRESSED) >> shift) + 1;
            return L2Entry::Compressed {
                host,
                len: sectors * 512 - (host & 511),
            };
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            L2Entry::Zero {
                host: (host != 0).then_some(host),
                copied,
            }
        } else if host == 0 && !copied {
            L2Entry::Unallocated
        } else {
            L2Entry::Normal { host, copied }
        }
    }

    /// Decodes the first word of an extended L2 entry: as [`L2Entry::decode`], but bit 0 is
    /// not a zero flag (QEMU ignores it), so there are no cluster-level zero entries.
    pub fn decode_extended(raw: u64, cluster_bits: u32) -> L2Entry {
        match raw & COMPRESSED {
            0 => L2Entry::decode(raw & !ZERO, cluster_bits),
            _ => L2Entry::decode(raw, cluster_bits),
        }
    }

    /// What subcluster `i` of a cluster with this (extended) entry and `bitmap` is, as the
    /// entry a cluster of one subcluster (`sc` bytes) would have (QEMU's
    /// qcow2_get_subcluster_type). An unallocated subcluster of an allocated cluster reads as
    /// [`L2Entry::Unallocated`]. `None`: the bitmap is invalid for the entry (a subcluster
    /// both allocated and zero, or allocated bits without a host cluster).
    pub fn subcluster(self, bitmap: u64, i: u64, sc: u64) -> Option<L2Entry> {
        if !self.valid_bitmap(bitmap) {
            return None;
        }
        let zero = bitmap >> 32 & 1 << i != 0;
        let alloc = bitmap & 1 << i != 0;
        match self {
            L2Entry::Normal { host, copied } => {
                if zero {
                    Some(L2Entry::Zero {
                        host: Some(host + i * sc),
                        copied,
                    })
                } else if alloc {
                    Some(L2Entry::Normal {
                        host: host + i * sc,
                        copied,
                    })
                } else {
                    Some(L2Entry::Unallocated)
                }
            }
            L2Entry::Unallocated if zero => Some(L2Entry::Zero {
                host: None,
                copied: false,
            }),
            e => Some(e),
        }
    }

    /// Whether `bitmap` is valid for this (extended) entry, as QEMU judges it: no subcluster
    /// both allocated and zero in an allocated cluster, no allocated subcluster in an
    /// unallocated one. Compressed clusters read whatever their bitmap (the check reports
    /// a nonzero one).
    pub fn valid_bitmap(self, bitmap: u64) -> bool {
        match self {
            L2Entry::Normal { .. } => (bitmap >> 32) & bitmap == 0,
            L2Entry::Unallocated => bitmap & ALL_ALLOC == 0,
            _ => true,
        }
    }

    /// Encodes the entry; inverse of [`L2Entry::decode`] for compressed entries built by
    /// [`compressed_entry`].
    pub fn encode(self) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                host.unwrap_or(0) | ZERO | if copied { COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => host | if copied { COPIED } else { 0 },
            L2Entry::Compressed { .. } => {
                unreachable!("compressed entries are built with compressed_entry")
            }
        }
    }

    /// Host cluster the entry references for refcounting, if any (not for compressed).
    pub fn host_cluster(self) -> Option<u64> {
        match self {
            L2Entry::Normal { host, .. } => Some(host),
            L2Entry::Zero { host, .. } => host,
            _ => None,
        }
    }
}

/// Builds a compressed L2 entry for data of `len` bytes at host byte offset `host`.
pub fn compressed_entry(host: u64, len: u64, cluster_bits: u32) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    let first_sector = host >> 9;
    let last_sector = (host + len - 1) >> 9;
    COMPRESSED | ((last_sector - first_sector) << shift) | host
}

/// Reads big-endian entry `index` of a table of 64-bit entries.
pub fn get_u64(table: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(table[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
}

/// Writes big-endian entry `index` of a table of 64-bit entries.
pub fn set_u64(table: &mut [u8], index: usize, value: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

/// Reads refcount `index` from a refcount block of `1 << order`-bit entries.
pub fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            ((byte >> ((index % per_byte) * bits)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => block[index] as u64,
        4 => u16::from_be_bytes([block[index * 2], block[index * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4")) as u64,
        _ => get_u64(block, index),
    }
}

/// Writes refcount `index`; the caller checks `value` fits with [`max_refcount`].
pub fn set_refcount(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => set_u64(block, index, value),
    }
}

/// Largest refcount representable with `1 << order` bits.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_roundtrip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..entries {
                set_refcount(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..entries {
                assert_eq!(get_refcount(&block, order, i), (i as u64 * 7 + 1) & max);
            }
        }
        // Sub-byte refcounts count from the least significant bit (QEMU's layout).
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set_refcount(&mut block, 2, 1, 0xf);
        assert_eq!(block[0], 0xf1);
    }

    #[test]
    fn subclusters_decode_like_qemu() {
        let sc = 2048;
        let normal = L2Entry::decode_extended(0x50000 | 1 | COPIED, 16);
        assert_eq!(
            normal,
            L2Entry::Normal {
                host: 0x50000,
                copied: true
            },
            "bit 0 is no zero flag"
        );
        let bitmap = alloc_bits(1, 3) | 1 << 35;
        assert_eq!(bitmap, 0b110 | 1 << 35);
        assert_eq!(normal.subcluster(bitmap, 0, sc), Some(L2Entry::Unallocated));
        assert_eq!(
            normal.subcluster(bitmap, 2, sc),
            Some(L2Entry::Normal {
                host: 0x50000 + 2 * sc,
                copied: true
            })
        );
        assert_eq!(
            normal.subcluster(bitmap, 3, sc),
            Some(L2Entry::Zero {
                host: Some(0x50000 + 3 * sc),
                copied: true
            })
        );
        // Allocated and zero at once, anywhere in the bitmap: invalid for every subcluster.
        assert_eq!(normal.subcluster(1 << 7 | 1 << 39, 0, sc), None);
        let none = L2Entry::Unallocated;
        assert_eq!(
            none.subcluster(1 << 32, 0, sc),
            Some(L2Entry::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(none.subcluster(1 << 32, 1, sc), Some(L2Entry::Unallocated));
        assert_eq!(none.subcluster(1 << 5, 1, sc), None);
        assert_eq!(alloc_bits(0, 32), ALL_ALLOC);
        assert_eq!(alloc_bits(4, 4), 0);
    }

    #[test]
    fn l2_entries_decode_like_qemu() {
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(0x50000 | COPIED, 16),
            L2Entry::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, 16),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(0x50000 | 1 | COPIED, 16),
            L2Entry::Zero {
                host: Some(0x50000),
                copied: true
            }
        );
        let raw = compressed_entry(0x50010, 1000, 16);
        assert_eq!(L2Entry::decode_extended(raw, 16), L2Entry::decode(raw, 16));
        assert_eq!(
            L2Entry::decode(raw, 16),
            L2Entry::Compressed {
                host: 0x50010,
                len: 1024 - 0x10
            }
        );
    }
}
