//! The body of the `cargo fuzz` target (`qcow2/fuzz`), kept in the library so that the
//! corpus also runs as an ordinary test (`tests/fuzz_corpus.rs`) on stable Rust.

use std::sync::Arc;

use crate::image::Image;
use crate::open::OpenOptions;
use crate::storage::MemStorage;
use crate::{check, Qcow2};

/// Largest guest range read per input, so one input cannot take seconds.
const READ_LIMIT: u64 = 4 << 20;

/// Opens `data` as a qcow2 image read-only, reads its first few MiB, walks their block
/// status and checks it; then opens a copy writable and writes one cluster. Any outcome is
/// fine except a panic, a hang, an unbounded allocation or a status run longer than asked.
pub fn open_read_check_write(data: &[u8]) {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    if let Ok(img) = Qcow2::open_storage(Arc::new(MemStorage::new(data)), &opts, None) {
        let mut buf = vec![0u8; 64 << 10];
        let end = img.size().min(READ_LIMIT);
        let mut offset = 0;
        while offset < end {
            let n = (end - offset).min(buf.len() as u64) as usize;
            if img.read_at(&mut buf[..n], offset).is_err() {
                break;
            }
            offset += n as u64;
        }
        let mut offset = 0;
        while offset < end {
            let Ok(status) = img.block_status(offset, end - offset) else {
                break;
            };
            assert!(status.len > 0 && status.len <= end - offset, "{status:?}");
            offset += status.len;
        }
        let _ = check(&img);
    }
    let writable = OpenOptions {
        read_only: false,
        ..Default::default()
    };
    if let Ok(img) = Qcow2::open_storage(Arc::new(MemStorage::new(data)), &writable, None) {
        let _ = img.write_at(&[0x5a; 4096], (img.size().min(READ_LIMIT) / 2) & !4095);
        let _ = img.flush();
    }
}

/// Bytes at the end of a [`open_mutate_check`] input that choose its operations.
pub const MUTATE_CONTROL_BYTES: usize = 25;

/// Largest guest range one operation of [`open_mutate_check`] covers.
const OP_LIMIT: u64 = 4 << 20;

/// Largest virtual size [`open_mutate_check`] grows an image to.
const GROW_LIMIT: u64 = 1 << 30;

/// Opens all of `data` but its last [`MUTATE_CONTROL_BYTES`] as a qcow2 image writable, runs
/// the operations those bytes choose (writes, zero writes, discards, flushes, repairs,
/// snapshot changes, resizes, compressed writes, amends, persistent bitmap changes), reads
/// back what they touched, checks the image, and reopens what is left read-only to read and
/// check it again. Any outcome is fine except a panic, a hang or an unbounded allocation.
///
/// The control bytes: the first holds flags (bit 0: open for a check, which allows a
/// writable open despite the corrupt bit; bit 1: keep the image's persistent bitmaps); then
/// eight operations of three bytes each (the kind, where, and how much).
pub fn open_mutate_check(data: &[u8]) {
    let split = data.len().saturating_sub(MUTATE_CONTROL_BYTES);
    let (image, control) = data.split_at(split);
    let mut control = control.to_vec();
    control.resize(MUTATE_CONTROL_BYTES, 0);
    let storage = Arc::new(MemStorage::new(image));
    let opts = OpenOptions {
        read_only: false,
        check: control[0] & 1 != 0,
        keep_bitmaps: control[0] & 2 != 0,
        ..Default::default()
    };
    let Ok(mut img) = Qcow2::open_storage(storage.clone(), &opts, None) else {
        return;
    };
    let mut touched = Vec::new();
    for op in control[1..].chunks_exact(3) {
        if let Some(range) = mutate_op(&mut img, op[0], op[1], op[2]) {
            touched.push(range);
        }
    }
    read_back(&img, &touched);
    let _ = crate::check::check_and_repair(&img, crate::check::Repair::Nothing);
    let _ = img.flush();
    drop(img);
    let read_only = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    if let Ok(img) = Qcow2::open_storage(storage, &read_only, None) {
        read_back(&img, &touched);
        let _ = check(&img);
        read_bitmaps(&img);
    }
}

/// Reads the first MiB of `img` and each range in `ranges` (cut to the disk).
fn read_back(img: &Qcow2, ranges: &[(u64, u64)]) {
    let mut buf = Vec::new();
    for &(offset, len) in std::iter::once(&(0, 1 << 20)).chain(ranges) {
        let end = offset.saturating_add(len.min(OP_LIMIT)).min(img.size());
        if offset < end {
            buf.resize((end - offset) as usize, 0);
            let _ = img.read_at(&mut buf, offset);
        }
    }
}

/// Reads every bitmap of `img` whose bits are of a bounded size.
fn read_bitmaps(img: &Qcow2) {
    if img.size() > GROW_LIMIT {
        return;
    }
    for entry in img.bitmaps().unwrap_or_default() {
        let _ = img.bitmap_bits(&entry.name);
    }
}

/// Runs one persistent bitmap operation of [`open_mutate_check`] (kinds 240 to 255): `kind`
/// chooses it, `at` the bitmap (one of four names) and `len` its granularity and state.
fn bitmap_op(img: &Qcow2, kind: u8, at: u8, len: u8) {
    let name = format!("b{}", at % 4).into_bytes();
    let other = format!("b{}", (at >> 2) % 4).into_bytes();
    // Operations that read or write every bit of a bitmap only on disks of a bounded size.
    let bounded = img.size() <= GROW_LIMIT;
    match kind % 8 {
        0 | 1 => {
            let _ = img.add_bitmap(&name, 512 << (len % 12), len & 0x80 != 0);
        }
        2 => {
            let _ = img.remove_bitmap(&name);
        }
        3 => {
            let _ = img.set_bitmap_enabled(&name, len & 1 != 0);
        }
        4 if bounded => {
            let _ = img.clear_bitmap(&name);
        }
        5 if bounded => {
            let _ = img.dirty_whole_bitmap(&name);
        }
        6 if bounded => {
            if let Ok(bits) = img.bitmap_bits(&other) {
                let _ = img.merge_into_bitmap(&name, &bits);
            }
        }
        _ => read_bitmaps(img),
    }
}

/// Runs one operation of [`open_mutate_check`]: `kind` chooses it, `at` where in the disk
/// (in 256ths of the disk, within the first [`GROW_LIMIT`] bytes) and `len` how much.
/// Returns the guest range it wrote, if any.
fn mutate_op(img: &mut Qcow2, kind: u8, at: u8, len: u8) -> Option<(u64, u64)> {
    use crate::create::Preallocation;
    use crate::format::snapshot::SnapshotRef;

    let cs = img.cluster_size();
    let sc = img.subcluster_size();
    let size = img.size();
    // Where: a cluster (or subcluster with `len` bit 7) in the first GROW_LIMIT bytes.
    let unit = if len & 0x80 != 0 { sc } else { cs };
    let base = ((size.min(GROW_LIMIT) / 256 * u64::from(at)) / unit) * unit;
    // How much: a few bytes past the start, one or two units, or a few units unaligned.
    let n = match len & 3 {
        0 => 1 + u64::from(len >> 2) * 37,
        1 => unit,
        2 => 2 * unit,
        _ => unit * u64::from((len >> 2) & 7) + u64::from(len >> 5) * 512 + 1,
    }
    .min(OP_LIMIT);
    let offset = match len & 0x40 {
        0 => base,
        _ => base + u64::from(len & 0x3c) * 16 % unit,
    };
    let n = n.min(size.saturating_sub(offset));
    let pattern = vec![kind ^ at ^ 0xa5; n as usize];
    let wrote = Some((offset, n));
    if kind >= 240 {
        bitmap_op(img, kind, at, len);
        return None;
    }
    match kind % 20 {
        0 | 1 => img.write_at(&pattern, offset).ok().and(wrote),
        2 => {
            let whole = vec![at; cs.min(OP_LIMIT) as usize];
            let offset = offset / cs * cs;
            let end = (offset + whole.len() as u64).min(size);
            let len = end.saturating_sub(offset) as usize;
            img.write_at(&whole[..len], offset)
                .ok()
                .and(Some((offset, len as u64)))
        }
        3 => img.write_zeroes(offset, n, false).ok().and(wrote),
        4 => img.write_zeroes(offset, n, true).ok().and(wrote),
        5 => img.discard(offset, n).ok().and(wrote),
        6 => img.flush().ok().and(None),
        7 => {
            crate::check::check_and_repair(img, crate::check::Repair::Leaks);
            None
        }
        8 => {
            crate::check::check_and_repair(img, crate::check::Repair::All);
            None
        }
        9 | 10 => img.create_snapshot(&format!("s{at}")).ok().and(None),
        11 | 12 => {
            let snaps = img.snapshots();
            let id = snaps
                .get(at as usize % snaps.len().max(1))?
                .id_text()
                .into_owned();
            if kind % 20 == 11 {
                let _ = img.apply_snapshot(&SnapshotRef::Id(id));
            } else {
                let _ = img.delete_snapshot(&SnapshotRef::Id(id));
            }
            None
        }
        13 => {
            let grow = u64::from(at) * cs + u64::from(len) * 512;
            let new = size.saturating_add(grow).min(GROW_LIMIT.max(size));
            let _ = img.resize(new, Preallocation::Off);
            None
        }
        14 => {
            let _ = img.resize(offset.max(512).next_multiple_of(512), Preallocation::Off);
            None
        }
        15 => {
            let whole = vec![at; cs.min(OP_LIMIT) as usize];
            let offset = offset / cs * cs;
            let len = (size.saturating_sub(offset)).min(whole.len() as u64) as usize;
            img.write_compressed(&whole[..len], offset)
                .ok()
                .and(Some((offset, len as u64)))
        }
        16 => img.change_refcount_order(u32::from(at % 7)).ok().and(None),
        17 => {
            let on = !img.header().lazy_refcounts();
            img.set_lazy_refcounts(on).ok().and(None)
        }
        18 => match at & 1 {
            0 => img.downgrade_to_v2().ok().and(None),
            _ => img.upgrade_to_v3().ok().and(None),
        },
        _ => {
            let mut buf = vec![0; n as usize];
            let _ = img.read_at(&mut buf, offset);
            None
        }
    }
}
