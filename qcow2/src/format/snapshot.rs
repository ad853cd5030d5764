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
    /// Unique ID string: bytes, as QEMU keeps it (a C string, not always UTF-8).
    pub id: Vec<u8>,
    /// Name: bytes, as the ID.
    pub name: Vec<u8>,
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

impl Snapshot {
    /// The ID as text (invalid UTF-8 replaced), for display.
    pub fn id_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.id)
    }
    /// The name as text (invalid UTF-8 replaced), for display.
    pub fn name_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.name)
    }
}

impl SnapshotRef {
    /// The snapshot of `table` this refers to.
    pub fn find<'a>(&self, table: &'a [Snapshot]) -> Option<&'a Snapshot> {
        let first = |f: &dyn Fn(&Snapshot) -> bool| table.iter().find(|s| f(s));
        match self {
            SnapshotRef::Id(id) => first(&|s| s.id == id.as_bytes()),
            SnapshotRef::Name(name) => first(&|s| s.name == name.as_bytes()),
            SnapshotRef::IdAndName { id, name } => {
                first(&|s| s.id == id.as_bytes() && s.name == name.as_bytes())
            }
            SnapshotRef::IdOrName(x) => {
                first(&|s| s.id == x.as_bytes()).or_else(|| first(&|s| s.name == x.as_bytes()))
            }
        }
    }
}

/// What makes a snapshot table's place unusable (QEMU's `qcow2_validate_table`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceProblem {
    /// More entries than [`MAX_SNAPSHOTS`].
    TooLarge,
    /// An offset that is not cluster aligned (checked with no snapshots too, as QEMU
    /// checks it), or so large that the table would end past the largest file offset.
    OffsetInvalid,
}

/// Whether a table of `count` entries at `offset` may be read, as QEMU decides.
pub fn place_problem(offset: u64, count: u32, cluster_size: u64) -> Option<PlaceProblem> {
    let min_len = u64::from(count) * 40;
    if count > MAX_SNAPSHOTS {
        Some(PlaceProblem::TooLarge)
    } else if offset % cluster_size != 0 || i64::MAX as u64 - min_len < offset {
        Some(PlaceProblem::OffsetInvalid)
    } else {
        None
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
        out.extend_from_slice(&s.id);
        out.extend_from_slice(&s.name);
    }
    out
}

/// Most bytes of extra data an entry may have (QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_EXTRA_DATA: usize = 1024;

/// Most bytes the snapshot table may take (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`).
pub const MAX_TABLE_BYTES: usize = 64 << 20;

/// A snapshot table as read.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// The entries.
    pub snapshots: Vec<Snapshot>,
    /// Bytes from the table's offset to the end of its last entry.
    pub len: usize,
    /// Entries whose extra data a repairing read cut to [`MAX_EXTRA_DATA`].
    pub extra_data_dropped: u32,
    /// Entries a repairing read dropped from the end of a table that was too big.
    pub dropped: u32,
    /// What a repairing read tells about its repairs, in order (QEMU's words).
    pub messages: Vec<String>,
}

/// Reads `count` snapshot entries through `read` (which fills a buffer from a position
/// relative to the table's offset; past the end of the file with zeros), as QEMU reads
/// them (`qcow2_do_read_snapshots`). Too much extra data in an entry or a table over
/// [`MAX_TABLE_BYTES`] fail, unless `repair`: then the extra data is cut and the entries
/// that do not fit are dropped, as `qemu-img check -r all` does.
pub fn read_table(
    read: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    count: u32,
    repair: bool,
) -> Result<Table> {
    let mut bytes = |at: usize, len: usize| -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        read(at, &mut out)?;
        Ok(out)
    };
    let mut out = Table::default();
    let mut off = 0usize;
    let mut table_len = 0usize;
    for i in 0..count {
        let entry_start = off;
        table_len = table_len.next_multiple_of(8);
        off = off.next_multiple_of(8);
        let e = bytes(off, 40)?;
        off += 40;
        let id_len = be16(&e, 12) as usize;
        let name_len = be16(&e, 14) as usize;
        let extra_len = be32(&e, 36) as usize;
        let mut kept_extra = extra_len;
        if extra_len > MAX_EXTRA_DATA {
            if !repair {
                return Err(Error::SnapshotTable(format!(
                    "Too much extra metadata in snapshot table entry {i}\nYou can force-remove \
                     this extra metadata with qemu-img check -r all"
                )));
            }
            out.messages.push(format!(
                "Discarding too much extra metadata in snapshot table entry {i} \
                 ({extra_len} > {MAX_EXTRA_DATA})"
            ));
            out.extra_data_dropped += 1;
            kept_extra = MAX_EXTRA_DATA;
        }
        let extra = bytes(off, kept_extra)?;
        off += extra_len;
        let id = bytes(off, id_len)?;
        off += id_len;
        let name = bytes(off, name_len)?;
        off += name_len;
        table_len += 40 + kept_extra + id_len + name_len;
        if table_len > MAX_TABLE_BYTES || off > i32::MAX as usize {
            let overhanging = count - i;
            if !repair {
                return Err(Error::SnapshotTable(format!(
                    "Snapshot table is too big\nYou can force-remove all {overhanging} \
                     overhanging snapshots with qemu-img check -r all"
                )));
            }
            out.messages.push(format!(
                "Discarding {overhanging} overhanging snapshots (snapshot table is too big)"
            ));
            out.dropped += overhanging;
            off = entry_start;
            break;
        }
        out.snapshots.push(Snapshot {
            l1_table_offset: be64(&e, 0),
            l1_size: be32(&e, 8),
            id: c_string(id),
            name: c_string(name),
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            vm_state_size: if kept_extra >= 8 {
                be64(&extra, 0)
            } else {
                be32(&e, 32) as u64
            },
            disk_size: (kept_extra >= 16).then(|| be64(&extra, 8)),
            icount: (kept_extra >= 24).then(|| be64(&extra, 16)),
            unknown_extra: extra.get(KNOWN_EXTRA..).unwrap_or_default().to_vec(),
        });
    }
    out.len = off;
    Ok(out)
}

/// `bytes` up to the first NUL, as QEMU keeps IDs and names (C strings).
fn c_string(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(end) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(end);
    }
    bytes
}

/// A table entry with only an ID and a name, for tests of lookups and numbering.
#[cfg(test)]
pub(crate) fn test_snapshot(id: &str, name: &str) -> Snapshot {
    Snapshot {
        l1_table_offset: 0,
        l1_size: 0,
        id: id.as_bytes().to_vec(),
        name: name.as_bytes().to_vec(),
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

    /// Reads a table from `bytes`, zeros past their end.
    fn parse(bytes: &[u8], count: u32, repair: bool) -> Result<Table> {
        let mut read = |at: usize, buf: &mut [u8]| {
            buf.fill(0);
            if let Some(have) = bytes.get(at..) {
                let n = have.len().min(buf.len());
                buf[..n].copy_from_slice(&have[..n]);
            }
            Ok(())
        };
        read_table(&mut read, count, repair)
    }

    /// An entry with `extra` bytes of extra data (the first 16 known), an ID and a name.
    fn entry(extra: u32, id: &[u8], name: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x70000u64.to_be_bytes());
        e[8..12].copy_from_slice(&4u32.to_be_bytes());
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.resize(40 + extra as usize, 0xee);
        e.extend_from_slice(id);
        e.extend_from_slice(name);
        e
    }

    #[test]
    fn parses_entries_and_reads_past_the_end_as_zeros() {
        let mut e = entry(16, b"1", b"snap");
        let table = parse(&e, 1, false).unwrap();
        let snaps = &table.snapshots;
        assert_eq!(table.len, 61);
        assert_eq!(snaps[0].l1_table_offset, 0x70000);
        assert_eq!(snaps[0].id, b"1");
        assert_eq!(snaps[0].name, b"snap");
        assert_eq!(snaps[0].disk_size, Some(1 << 30));
        assert_eq!(snaps[0].icount, None);
        // A second entry past the end of the file is all zeros, as QEMU reads it.
        e.resize(64, 0);
        let two = parse(&e[..60], 2, false).unwrap();
        assert_eq!(two.snapshots[0].name, b"sna");
        assert_eq!(
            (two.snapshots[1].l1_size, two.snapshots[1].disk_size),
            (0, None)
        );
        assert_eq!(two.len, 64 + 40);
    }

    #[test]
    fn too_much_extra_data_fails_unless_repairing_which_cuts_it() {
        let mut bytes = entry(16, b"1", b"a");
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        let second_at = bytes.len();
        bytes.extend(entry(2000, b"2", b"b"));
        let err = parse(&bytes, 2, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Too much extra metadata in snapshot table entry 1\nYou can force-remove this \
             extra metadata with qemu-img check -r all"
        );
        let table = parse(&bytes, 2, true).unwrap();
        assert_eq!(table.extra_data_dropped, 1);
        assert_eq!(
            table.messages,
            ["Discarding too much extra metadata in snapshot table entry 1 (2000 > 1024)"]
        );
        let cut = &table.snapshots[1];
        assert_eq!((&cut.id[..], &cut.name[..]), (&b"2"[..], &b"b"[..]));
        assert_eq!(cut.unknown_extra, vec![0xee; MAX_EXTRA_DATA - KNOWN_EXTRA]);
        // The table on disk still ends after the whole entry.
        assert_eq!(table.len, second_at + 40 + 2000 + 2);
    }

    #[test]
    fn a_table_over_64_mib_fails_unless_repairing_which_drops_the_rest() {
        let big = entry(0, &[b'i'; 0xffff], &[b'n'; 0xffff]);
        let step = big.len().next_multiple_of(8);
        let count = 520;
        let mut bytes = vec![0u8; step * count];
        for i in 0..count {
            bytes[i * step..i * step + big.len()].copy_from_slice(&big);
        }
        let fit = MAX_TABLE_BYTES / step;
        let err = parse(&bytes, count as u32, false).unwrap_err();
        let overhanging = count - fit;
        assert_eq!(
            err.to_string(),
            format!(
                "Snapshot table is too big\nYou can force-remove all {overhanging} overhanging \
                 snapshots with qemu-img check -r all"
            )
        );
        let table = parse(&bytes, count as u32, true).unwrap();
        assert_eq!(table.snapshots.len(), fit);
        assert_eq!(table.dropped as usize, overhanging);
        assert_eq!(table.len, (fit - 1) * step + big.len());
        assert_eq!(
            table.messages,
            [format!(
                "Discarding {overhanging} overhanging snapshots (snapshot table is too big)"
            )]
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
        let old = parse(&e, 1, false).unwrap().snapshots;
        let bytes = serialize_table(&old, 5 << 20);
        let table = parse(&bytes, 1, false).unwrap();
        let new = table.snapshots;
        assert_eq!((bytes.len(), table.len), (40 + 24 + 3, 40 + 24 + 3));
        assert_eq!(new[0].vm_state_size, 77);
        assert_eq!(new[0].disk_size, Some(5 << 20));
        assert_eq!(new[0].icount, Some(u64::MAX));
        assert_eq!((&new[0].id[..], &new[0].name[..]), (&b"12"[..], &b"x"[..]));
        let mut later = new[0].clone();
        later.unknown_extra = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let bytes = serialize_table(&[later.clone(), new[0].clone()], 0);
        let both = parse(&bytes, 2, false).unwrap().snapshots;
        assert_eq!(both, vec![later, new[0].clone()]);
    }

    #[test]
    fn lookup_tries_every_id_before_any_name() {
        let snap = test_snapshot;
        let table = [snap("1", "2"), snap("2", "b"), snap("3", "b")];
        let found = |r: SnapshotRef| r.find(&table).map(|s| s.id.as_slice());
        assert_eq!(found(SnapshotRef::IdOrName("2".into())), Some(&b"2"[..]));
        assert_eq!(found(SnapshotRef::IdOrName("b".into())), Some(&b"2"[..]));
        assert_eq!(found(SnapshotRef::Name("2".into())), Some(&b"1"[..]));
        assert_eq!(found(SnapshotRef::Id("b".into())), None);
        let both = |id: &str, name: &str| SnapshotRef::IdAndName {
            id: id.into(),
            name: name.into(),
        };
        assert_eq!(found(both("3", "b")), Some(&b"3"[..]));
        assert_eq!(found(both("1", "b")), None);
    }
}
