//! The virtio-blk configuration space (`struct virtio_blk_config`), filled from the disk.

use crate::disk::Topology;
use crate::request::{Limits, SECTOR_SHIFT};

/// Bytes of `struct virtio_blk_config` up to and including the zoned characteristics.
pub const CONFIG_LEN: usize = 96;
/// Offset of the `wce` (writeback cache enable) byte, the only field the driver may write.
pub const WCE_OFFSET: usize = 32;

/// Largest discard and write-zeroes segment we advertise (in sectors): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Most discard or write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 16;

/// The SIZE_MAX we advertise with `seg_max` segments per request.
///
/// Segments of any size work here (the io_uring path takes whole buffers, the bounce path goes
/// in chunks), but libblkio computes the largest request as `size_max * seg_max` in an `i32`
/// and overflows on `u32::MAX`; so the limit is the largest power of two that keeps a request
/// below 2 GiB (64 KiB with 32766 segments, 8 MiB with 254), which no driver comes near.
pub fn size_max(seg_max: u32) -> u32 {
    let max = (i32::MAX as u32) / seg_max.max(1);
    1u32 << (31 - max.leading_zeros())
}

/// The device configuration a driver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most data segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Physical block and preferred I/O sizes (VIRTIO_BLK_F_TOPOLOGY).
    pub topology: Topology,
    /// Writeback cache enabled (VIRTIO_BLK_F_CONFIG_WCE); when off, every write is flushed.
    pub writeback: bool,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest discard segment in sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most segments per discard request.
    pub max_discard_seg: u32,
    /// Discard granularity in sectors: smaller or misaligned discards may do nothing.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment in sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// The configuration for a disk of `capacity` sectors served on `num_queues` queues of
    /// `queue_size` entries, with the default topology (see [`Topology::default`]).
    pub fn new(capacity: u64, num_queues: u16, queue_size: u16, discard_alignment: u32) -> Self {
        // Two ring entries go to the header and the status (Linux and QEMU use the same).
        let seg_max = u32::from(queue_size).saturating_sub(2).max(1);
        BlkConfig {
            capacity,
            size_max: size_max(seg_max),
            seg_max,
            blk_size: 512,
            topology: Topology::default(),
            writeback: true,
            num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: discard_alignment.max(1),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            write_zeroes_may_unmap: true,
        }
    }

    /// The limits the request parser enforces, matching what this config advertises.
    pub fn limits(&self, read_only: bool) -> Limits {
        Limits {
            capacity: self.capacity,
            read_only,
            max_discard_sectors: self.max_discard_sectors,
            max_discard_seg: self.max_discard_seg,
            max_write_zeroes_sectors: self.max_write_zeroes_sectors,
            max_write_zeroes_seg: self.max_write_zeroes_seg,
        }
    }

    /// The little-endian config space bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // geometry (16..20) stays zero: VIRTIO_BLK_F_GEOMETRY is not offered.
        put(20, &self.blk_size.to_le_bytes());
        let t = &self.topology;
        put(24, &[t.physical_block_exp, t.alignment_offset]);
        put(26, &t.min_io_size.to_le_bytes());
        put(28, &t.opt_io_size.to_le_bytes());
        put(WCE_OFFSET, &[u8::from(self.writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        // Secure erase (60..72) and zoned (72..96) stay zero: not offered.
        b
    }

    /// `size` bytes of the config space from `offset`; bytes past the structure read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::bindings::virtio_blk::virtio_blk_config as C;

    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(std::mem::size_of::<C>(), CONFIG_LEN);
        assert_eq!(offset_of!(C, size_max), 8);
        assert_eq!(offset_of!(C, seg_max), 12);
        assert_eq!(offset_of!(C, blk_size), 20);
        assert_eq!(offset_of!(C, physical_block_exp), 24);
        assert_eq!(offset_of!(C, alignment_offset), 25);
        assert_eq!(offset_of!(C, min_io_size), 26);
        assert_eq!(offset_of!(C, opt_io_size), 28);
        assert_eq!(offset_of!(C, wce), WCE_OFFSET);
        assert_eq!(offset_of!(C, num_queues), 34);
        assert_eq!(offset_of!(C, max_discard_sectors), 36);
        assert_eq!(offset_of!(C, max_discard_seg), 40);
        assert_eq!(offset_of!(C, discard_sector_alignment), 44);
        assert_eq!(offset_of!(C, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(C, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn bytes_are_truthful() {
        let c = BlkConfig {
            topology: Topology::new(4096, Some(65536)),
            ..BlkConfig::new(2048, 4, 128, 128)
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 16 << 20);
        assert_eq!(b[24..26], [3, 0]);
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[WCE_OFFSET], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 128);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn size_max_keeps_requests_below_2_gib() {
        for seg_max in [1, 2, 126, 254, 1000, 32766] {
            let size_max = size_max(seg_max);
            assert!(size_max.is_power_of_two());
            assert!(u64::from(size_max) * u64::from(seg_max) <= i32::MAX as u64);
            assert!(u64::from(size_max) * 2 * u64::from(seg_max) > i32::MAX as u64);
        }
        assert_eq!(size_max(254), 8 << 20);
        assert_eq!(size_max(32766), 64 << 10);
    }

    #[test]
    fn reads_past_the_end_are_zero_padded() {
        let c = BlkConfig::new(8, 1, 256, 8);
        assert_eq!(c.read(0, 8), 8u64.to_le_bytes());
        assert_eq!(c.read(90, 10), vec![0u8; 10]);
        assert_eq!(c.read(4000, 4), vec![0u8; 4]);
        assert_eq!(c.read(u32::MAX, 2), vec![0u8; 2]);
        assert_eq!(c.read(0, 0), Vec::<u8>::new());
    }
}
