//! The persistent dirty bitmap directory (qcow2 spec, "Bitmaps"): its entries, parsed and
//! encoded. Bitmap data lives in clusters named by each entry's table; `engine/bitmaps.rs`
//! reads and changes them.

use crate::error::{Error, Result};
use crate::format::header::{be16, be32, be64};

/// Entry flag: the bitmap is being changed and may be inconsistent.
pub const IN_USE: u32 = 1;
/// Entry flag: the bitmap is enabled (records writes) when the image is opened.
pub const AUTO: u32 = 2;
/// Entry type of a dirty tracking bitmap, the only one defined.
const DIRTY_TRACKING: u8 = 1;
/// Longest bitmap name QEMU takes.
pub const MAX_NAME_LEN: usize = 1023;
/// Largest bitmap directory QEMU reads.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Bits 9-55 of a bitmap table entry: the host offset of a data cluster.
pub const DATA_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest bitmap table QEMU takes, in entries.
pub const MAX_TABLE_SIZE: u32 = 0x0800_0000;
/// Finest and coarsest granularity QEMU takes (log2 of bytes per bit).
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;

/// Whether a bitmap table entry is well formed for `cluster_size`-byte clusters: no
/// reserved bit set, and a data cluster offset (cluster-aligned) or none (all zeros, or all
/// ones with bit 0).
pub fn table_entry_valid(entry: u64, cluster_size: u64) -> bool {
    let offset = entry & DATA_OFFSET;
    entry & 0xff00_0000_0000_01fe == 0
        && (offset == 0 || (entry & 1 == 0 && offset % cluster_size == 0))
}

/// One bitmap directory entry (QEMU's `Qcow2BitmapDirEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// [`IN_USE`], [`AUTO`].
    pub flags: u32,
    /// log2 of the bytes each bit covers.
    pub granularity_bits: u8,
    /// Name (unique in the image), as stored: bytes, which need not be UTF-8.
    pub name: Vec<u8>,
    /// Extra data, kept as found.
    pub extra: Vec<u8>,
}

impl DirEntry {
    /// The name for messages (bytes that are not UTF-8 replaced).
    pub fn display_name(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.name)
    }

    /// Bytes of guest disk each bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
}

/// Parses the `count` entries of a bitmap directory.
pub fn parse_directory(bytes: &[u8], count: u32) -> Result<Vec<DirEntry>> {
    let truncated = || Error::Corrupt("the bitmap directory is truncated".into());
    let mut entries = Vec::new();
    let mut pos = 0;
    for _ in 0..count {
        if pos + 24 > bytes.len() {
            return Err(truncated());
        }
        let name_len = usize::from(be16(bytes, pos + 18));
        let extra_len = be32(bytes, pos + 20) as usize;
        let extra_at = pos + 24;
        let name_at = extra_at + extra_len;
        let name = bytes
            .get(name_at..name_at + name_len)
            .ok_or_else(truncated)?;
        entries.push(DirEntry {
            table_offset: be64(bytes, pos),
            table_size: be32(bytes, pos + 8),
            flags: be32(bytes, pos + 12),
            granularity_bits: bytes[pos + 17],
            name: name.to_vec(),
            extra: bytes[extra_at..name_at].to_vec(),
        });
        pos = (name_at + name_len).next_multiple_of(8);
    }
    Ok(entries)
}

/// Flags the spec does not define.
const RESERVED_FLAGS: u32 = !(IN_USE | AUTO);
/// Largest bitmap QEMU loads, in bytes of its table's clusters.
const MAX_PHYS_BYTES: u64 = 0x2000_0000;

/// Bitmap table entries a bitmap of `granularity_bits` needs for a `disk_size`-byte disk
/// (QEMU serialises the bits in 64-bit words) with `cluster_size`-byte clusters.
pub fn table_entries_needed(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits.min(63));
    (bits.div_ceil(64) * 8).div_ceil(cluster_size)
}

/// Checks a bitmap directory of `count` entries as QEMU does before it opens an image
/// (`bitmap_list_load`, `check_dir_entry`) for a `disk_size`-byte disk with
/// `cluster_size`-byte clusters; returns the entries, or QEMU's reason to refuse the image.
pub fn check_directory(
    bytes: &[u8],
    count: u32,
    disk_size: u64,
    cluster_size: u64,
) -> std::result::Result<Vec<DirEntry>, String> {
    let broken = || "Broken bitmap directory".to_owned();
    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        if pos + 24 > bytes.len() {
            return Err(broken());
        }
        if entries.len() == count as usize {
            return Err("More bitmaps found than specified in header extension".into());
        }
        let name_len = usize::from(be16(bytes, pos + 18));
        let extra_len = be32(bytes, pos + 20) as usize;
        let end = pos + (24 + name_len + extra_len).next_multiple_of(8);
        if end > bytes.len() {
            return Err(broken());
        }
        if extra_len != 0 {
            return Err("Bitmap extra data is not supported".into());
        }
        let entry = DirEntry {
            table_offset: be64(bytes, pos),
            table_size: be32(bytes, pos + 8),
            flags: be32(bytes, pos + 12),
            granularity_bits: bytes[pos + 17],
            name: bytes[pos + 24..pos + 24 + name_len].to_vec(),
            extra: Vec::new(),
        };
        let phys = u64::from(entry.table_size) * cluster_size;
        let g = entry.granularity_bits;
        // The bits the table holds cover the disk (u128: no shift can overflow).
        let fits = |disk: u64| u128::from(disk) <= (u128::from(phys) * 8) << g.min(64);
        let valid = entry.table_size != 0
            && entry.table_offset != 0
            && entry.table_offset % cluster_size == 0
            && entry.table_size <= MAX_TABLE_SIZE
            && GRANULARITY_BITS.contains(&g)
            && entry.flags & RESERVED_FLAGS == 0
            && name_len <= MAX_NAME_LEN
            && bytes[pos + 16] == DIRTY_TRACKING
            && phys <= MAX_PHYS_BYTES
            && (entry.flags & IN_USE != 0 || fits(disk_size));
        if !valid {
            return Err(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                entry.display_name()
            ));
        }
        entries.push(entry);
        pos = end;
    }
    if entries.len() != count as usize {
        return Err("Less bitmaps found than specified in header extension".into());
    }
    Ok(entries)
}

/// Encodes directory entries (each padded to 8 bytes, as the spec wants).
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(DIRTY_TRACKING);
        out.push(e.granularity_bits);
        let name_len = u16::try_from(e.name.len()).expect("names are at most 1023 bytes");
        out.extend_from_slice(&name_len.to_be_bytes());
        let extra_len = u32::try_from(e.extra.len()).expect("extra data came from a u32");
        out.extend_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(&e.name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_padding_and_extra_data() {
        let entries = vec![
            DirEntry {
                table_offset: 0x30000,
                table_size: 1,
                flags: AUTO,
                granularity_bits: 16,
                name: b"b0".to_vec(),
                extra: Vec::new(),
            },
            DirEntry {
                table_offset: 0x40000,
                table_size: 3,
                flags: IN_USE,
                granularity_bits: 9,
                name: b"a longer name".to_vec(),
                extra: vec![1, 2, 3],
            },
        ];
        let bytes = encode_directory(&entries);
        assert_eq!(bytes.len(), 24 + 8 + 24 + 16);
        assert_eq!(parse_directory(&bytes, 2).unwrap(), entries);
        assert!(parse_directory(&bytes[..40], 2).is_err());
    }

    fn entry(table_size: u32, granularity_bits: u8, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size,
            flags,
            granularity_bits,
            name: b"b0".to_vec(),
            extra: Vec::new(),
        }
    }

    #[test]
    fn directories_are_checked_in_qemus_words() {
        const CS: u64 = 65536;
        const DISK: u64 = 64 << 30;
        // 64 GiB at 64 KiB per bit: 1 Mi bits, 128 KiB, two table entries.
        assert_eq!(table_entries_needed(DISK, 16, CS), 2);
        let good = encode_directory(&[entry(2, 16, AUTO)]);
        assert_eq!(check_directory(&good, 1, DISK, CS).unwrap().len(), 1);
        let refused = |bytes: &[u8], count| check_directory(bytes, count, DISK, CS).unwrap_err();
        assert_eq!(
            refused(&good, 2),
            "Less bitmaps found than specified in header extension"
        );
        let two = encode_directory(&[entry(2, 16, AUTO), entry(2, 16, 0)]);
        assert_eq!(
            refused(&two, 1),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(refused(&good[..30], 1), "Broken bitmap directory");
        let extra = DirEntry {
            extra: vec![0; 8],
            ..entry(2, 16, AUTO)
        };
        assert_eq!(
            refused(&encode_directory(&[extra]), 1),
            "Bitmap extra data is not supported"
        );
        let constraints = "Bitmap 'b0' doesn't satisfy the constraints";
        // A table too small for the disk, unless the bitmap is in use (then it is not
        // loaded); granularity out of range; a flag the spec does not define.
        for bad in [entry(1, 16, AUTO), entry(2, 8, 0), entry(2, 16, 4)] {
            assert_eq!(refused(&encode_directory(&[bad]), 1), constraints);
        }
        let in_use = encode_directory(&[entry(1, 16, IN_USE)]);
        assert!(check_directory(&in_use, 1, DISK, CS).is_ok());
    }
}
