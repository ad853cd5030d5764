//! The internal snapshot table: parsing and serialising (unknown extra data is kept).

use super::header::{be16, be32, be64};
use crate::error::{Error, Result};

/// Most snapshots QEMU allows in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of saved VM state in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded (-1 = off).
    pub icount: Option<u64>,
    /// Extra data past the fields we know (a later QEMU's), kept byte for byte.
    pub unknown_extra: Vec<u8>,
}

/// Which internal snapshot to open, with QEMU's lookup rules (`bdrv_snapshot_load_tmp`):
/// the first snapshot in table order that matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// The snapshot with this ID.
    Id(String),
    /// The snapshot with this name.
    Name(String),
    /// The snapshot with both this ID and this name.
    IdAndName {
        /// Its ID.
        id: String,
        /// Its name.
        name: String,
    },
    /// An ID, or if no snapshot has it, a name (qemu-img's bare `-l ID_OR_NAME`). Every ID is
    /// tried before any name.
    IdOrName(String),
}

impl SnapshotRef {
    /// The snapshot of `table` this refers to.
    pub fn find<'a>(&self, table: &'a [Snapshot]) -> Option<&'a Snapshot> {
        let first = |f: &dyn Fn(&Snapshot) -> bool| table.iter().find(|s| f(s));
        match self {
            SnapshotRef::Id(id) => first(&|s| s.id == *id),
            SnapshotRef::Name(name) => first(&|s| s.name == *name),
            SnapshotRef::IdAndName { id, name } => first(&|s| s.id == *id && s.name == *name),
            SnapshotRef::IdOrName(x) => first(&|s| s.id == *x).or_else(|| first(&|s| s.name == *x)),
        }
    }
}

/// Bytes of extra data whose fields we know: VM state size, disk size, icount.
const KNOWN_EXTRA: usize = 24;

/// Serialises a snapshot table as QEMU's `qcow2_write_snapshots` does: every entry gets the
/// 24 bytes of known extra data (plus what it had beyond them), and starts 8-byte aligned;
/// the last one is not padded.
/// `current_size` stands in for a disk size the entry does not record (QEMU's reading).
pub fn serialize_table(table: &[Snapshot], current_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for s in table {
        out.resize(out.len().next_multiple_of(8), 0);
        let extra_len = KNOWN_EXTRA + s.unknown_extra.len();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        let small_state = u32::try_from(s.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small_state.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.unwrap_or(current_size).to_be_bytes());
        out.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&s.unknown_extra);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
    }
    out
}

/// Parses `count` snapshot entries from `table`, the bytes at the snapshot table offset.
///
/// Returns the snapshots and the table's length in bytes.
pub fn parse_table(table: &[u8], count: u32) -> Result<(Vec<Snapshot>, usize)> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::Corrupt(format!("{count} snapshots is too many")));
    }
    let short = |i: u32| Error::Corrupt(format!("snapshot table entry {i} is truncated"));
    let mut out = Vec::with_capacity(count as usize);
    let mut off = 0usize;
    for i in 0..count {
        if off + 40 > table.len() {
            return Err(short(i));
        }
        let e = &table[off..];
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let extra_len = be32(e, 36) as usize;
        let total = 40 + extra_len + id_len + name_len;
        if off + total > table.len() {
            return Err(short(i));
        }
        let extra = &e[40..40 + extra_len];
        let id = &e[40 + extra_len..40 + extra_len + id_len];
        let name = &e[40 + extra_len + id_len..total];
        out.push(Snapshot {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size: if extra_len >= 8 {
                be64(extra, 0)
            } else {
                be32(e, 32) as u64
            },
            disk_size: (extra_len >= 16).then(|| be64(extra, 8)),
            icount: (extra_len >= 24).then(|| be64(extra, 16)),
            unknown_extra: extra.get(KNOWN_EXTRA..).unwrap_or_default().to_vec(),
        });
        off += total.div_ceil(8) * 8;
    }
    Ok((out, off))
}

/// A table entry with only an ID and a name, for tests of lookups and numbering.
#[cfg(test)]
pub(crate) fn test_snapshot(id: &str, name: &str) -> Snapshot {
    Snapshot {
        l1_table_offset: 0,
        l1_size: 0,
        id: id.into(),
        name: name.into(),
        date_sec: 0,
        date_nsec: 0,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: None,
        icount: None,
        unknown_extra: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_entry_with_extra_data_and_rejects_truncation() {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x70000u64.to_be_bytes());
        e[8..12].copy_from_slice(&4u32.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&4u16.to_be_bytes());
        e[36..40].copy_from_slice(&16u32.to_be_bytes());
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(b"1snap");
        e.resize(e.len().div_ceil(8) * 8, 0);
        let (snaps, len) = parse_table(&e, 1).unwrap();
        assert_eq!(len, e.len());
        assert_eq!(snaps[0].l1_table_offset, 0x70000);
        assert_eq!(snaps[0].id, "1");
        assert_eq!(snaps[0].name, "snap");
        assert_eq!(snaps[0].disk_size, Some(1 << 30));
        let cut = parse_table(&e[..50], 1).unwrap_err();
        assert!(
            matches!(cut, Error::Corrupt(_) | Error::InvalidHeader(_)),
            "{cut}"
        );
    }

    #[test]
    fn serialising_adds_the_known_extra_data_and_keeps_unknown_bytes() {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x70000u64.to_be_bytes());
        e[12..14].copy_from_slice(&2u16.to_be_bytes());
        e[14..16].copy_from_slice(&1u16.to_be_bytes());
        e[32..36].copy_from_slice(&77u32.to_be_bytes());
        e.extend_from_slice(b"12x");
        e.resize(48, 0);
        let (old, _) = parse_table(&e, 1).unwrap();
        let bytes = serialize_table(&old, 5 << 20);
        let (new, len) = parse_table(&bytes, 1).unwrap();
        assert_eq!((bytes.len(), len), (40 + 24 + 3, 72));
        assert_eq!(new[0].vm_state_size, 77);
        assert_eq!(new[0].disk_size, Some(5 << 20));
        assert_eq!(new[0].icount, Some(u64::MAX));
        assert_eq!((new[0].id.as_str(), new[0].name.as_str()), ("12", "x"));
        let mut later = new[0].clone();
        later.unknown_extra = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let bytes = serialize_table(&[later.clone(), new[0].clone()], 0);
        let (both, _) = parse_table(&bytes, 2).unwrap();
        assert_eq!(both, vec![later, new[0].clone()]);
    }

    #[test]
    fn lookup_tries_every_id_before_any_name() {
        let snap = test_snapshot;
        let table = [snap("1", "2"), snap("2", "b"), snap("3", "b")];
        let found = |r: SnapshotRef| r.find(&table).map(|s| s.id.as_str());
        assert_eq!(found(SnapshotRef::IdOrName("2".into())), Some("2"));
        assert_eq!(found(SnapshotRef::IdOrName("b".into())), Some("2"));
        assert_eq!(found(SnapshotRef::Name("2".into())), Some("1"));
        assert_eq!(found(SnapshotRef::Id("b".into())), None);
        let both = |id: &str, name: &str| SnapshotRef::IdAndName {
            id: id.into(),
            name: name.into(),
        };
        assert_eq!(found(both("3", "b")), Some("3"));
        assert_eq!(found(both("1", "b")), None);
    }
}
