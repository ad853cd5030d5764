//! Crashes while internal snapshots are created, applied or deleted, and while `amend`
//! downgrades an image or changes its refcount width: the disk keeps its data (or, for
//! apply, becomes the snapshot's), each snapshot is whole or gone, and qemu-img check finds
//! leaks at most. Create and delete have the window QEMU's ordering
//! has too, between refcounts and the COPIED flags that follow them: flags that only cost
//! a copy or mark a leaked reference, which `qemu-img check -r all` repairs.
//! Snapshot changes are also crashed on images with extended L2 entries (subclusters).

use std::path::Path;
use std::sync::Arc;

use cowbird_tests::crash::CrashStorage;
use cowbird_tests::*;
use qcow2::{CreateOptions, Image, Qcow2, SnapshotRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;

/// The image a crash test starts from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// 4 KiB clusters.
    Standard,
    /// Extended L2 entries, 16 KiB clusters: 512-byte subclusters.
    ExtendedL2,
    /// Lazy refcounts, 4 KiB clusters: refcounts stay cached, under the dirty bit.
    Lazy,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Create,
    Apply,
    Delete,
    Downgrade,
    RefcountWidth(u32),
}

/// Random writes: data, compressed clusters, zeroes.
fn write_some(img: &Qcow2, rng: &mut StdRng) {
    let cs = img.cluster_size();
    for i in 0..rng.random_range(5..30) {
        let off = rng.random_range(0..SIZE - 20000);
        match rng.random_range(0..5) {
            0 => img
                .write_compressed(&vec![i | 1; cs as usize], off / cs * cs)
                .unwrap(),
            1 => img.write_zeroes(off, 9000, rng.random()).unwrap(),
            _ => img.write_at(&pattern(13000, off, i), off).unwrap(),
        }
    }
}

/// Whether every error `qemu-img check` reports is a COPIED flag `op` may leave behind.
fn only_copied_flags(op: Op, text: &str) -> bool {
    text.lines().filter(|l| l.starts_with("ERROR")).all(|line| {
        let refcount = line
            .strip_prefix("ERROR OFLAG_COPIED")
            .and_then(|rest| rest.rsplit("refcount=").next()?.parse::<u64>().ok());
        match (op, refcount) {
            (Op::Create, Some(r)) => r > 1,
            (Op::Delete, Some(r)) => r == 1,
            _ => false,
        }
    })
}

/// On an image of `kind`: snapshot "first" of some data, more data, then a crash at flush
/// `n` of `op`. Returns false if `op` had fewer flushes.
fn crash_in(kind: Kind, op: Op, seed: u64, n: usize) -> bool {
    let mut rng = StdRng::seed_from_u64(seed);
    let storage = Arc::new(CrashStorage::default());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: match kind {
            Kind::Standard | Kind::Lazy => 4096,
            Kind::ExtendedL2 => 16384,
        },
        extended_l2: kind == Kind::ExtendedL2,
        lazy_refcounts: kind == Kind::Lazy,
        ..Default::default()
    };
    qcow2::create::write_skeleton(&*storage, &opts).unwrap();
    let mut img = Qcow2::open_storage(storage.clone(), &Default::default(), None).unwrap();
    write_some(&img, &mut rng);
    if op == Op::Downgrade {
        // A preallocated zero cluster the snapshot will share: a downgrade gives each table
        // a new cluster of zeros and drops the shared one.
        let cs = img.cluster_size();
        img.write_at(&vec![5; cs as usize], 0).unwrap();
        img.write_zeroes(0, cs, false).unwrap();
    }
    let first = our_raw(&img);
    img.create_snapshot("first").unwrap();
    write_some(&img, &mut rng);
    img.flush().unwrap();
    let now = our_raw(&img);
    if kind == Kind::Lazy {
        // A second snapshot (a delete then writes a new table holding it), then closed and
        // opened again: the refcounts written back, the dirty bit clear.
        img.create_snapshot("extra").unwrap();
        drop(img);
        img = Qcow2::open_storage(storage.clone(), &Default::default(), None).unwrap();
    }
    storage.crash_at_flush(n, seed);
    let first_ref = SnapshotRef::Name("first".into());
    match op {
        Op::Create => img.create_snapshot("second").map(drop),
        Op::Apply => img.apply_snapshot(&first_ref),
        Op::Delete => img.delete_snapshot(&first_ref).map(drop),
        Op::Downgrade => img.downgrade_to_v2(),
        Op::RefcountWidth(order) => img.change_refcount_order(order),
    }
    .unwrap();
    if !storage.has_crashed() {
        return false;
    }
    let crashed = storage.crash_image(&mut rng);
    std::mem::forget(img);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    std::fs::write(&path, &crashed).unwrap();
    let what = format!("{kind:?}: {op:?}, seed {seed}, flush {n}");
    if crashed[79] & 1 != 0 {
        // Dirty (lazy refcounts): the next writable open rebuilds the refcounts.
        let repaired = run("qemu-img", &["check", "-r", "all", path.to_str().unwrap()]);
        assert!(repaired.status.success(), "{what}");
    }
    let (code, text) = qemu_check(&path);
    if code == 2 && only_copied_flags(op, &text) {
        let repaired = run("qemu-img", &["check", "-r", "all", path.to_str().unwrap()]);
        assert!(repaired.status.success(), "{what}");
        assert_qemu_clean(&path);
    } else {
        assert!(code == 0 || code == 3, "{what}:\n{text}");
    }
    let disk = qemu_raw(&path);
    assert!(
        disk == now || (op == Op::Apply && disk == first),
        "{what}: the disk"
    );
    for (name, contents) in [("first", &first), ("second", &now)] {
        if listed(&path).contains(&format!(" {name} ")) {
            assert_same(&qemu_snapshot_raw(&path, name), contents, &what);
        }
    }
    true
}

/// `qemu-img snapshot -l`.
fn listed(path: &Path) -> String {
    qemu_img(&["snapshot", "-l", path.to_str().unwrap()])
}

/// Crashes `op` on an image of `kind` at each of its flushes, for a few seeds.
fn crash_everywhere(kind: Kind, op: Op) {
    for seed in 0..4 {
        let mut n = 1;
        while crash_in(kind, op, seed, n) {
            n += 1;
        }
        assert!(n > 3, "{kind:?}: {op:?} has only {} flushes", n - 1);
    }
}

#[test]
fn a_crash_while_a_snapshot_is_created_loses_nothing() {
    crash_everywhere(Kind::Standard, Op::Create);
}

#[test]
fn a_crash_while_a_snapshot_is_applied_leaves_the_old_or_the_new_disk() {
    crash_everywhere(Kind::Standard, Op::Apply);
}

#[test]
fn a_crash_while_a_snapshot_is_deleted_loses_nothing() {
    crash_everywhere(Kind::Standard, Op::Delete);
}

#[test]
fn a_crash_while_an_image_is_downgraded_loses_nothing() {
    crash_everywhere(Kind::Standard, Op::Downgrade);
}

#[test]
fn a_crash_while_the_refcount_width_changes_loses_nothing() {
    for order in [3, 6] {
        crash_everywhere(Kind::Standard, Op::RefcountWidth(order));
    }
}

#[test]
fn a_crash_while_a_snapshot_of_an_extended_l2_image_is_created_loses_nothing() {
    crash_everywhere(Kind::ExtendedL2, Op::Create);
}

#[test]
fn a_crash_while_a_snapshot_of_an_extended_l2_image_is_applied_leaves_the_old_or_the_new_disk() {
    crash_everywhere(Kind::ExtendedL2, Op::Apply);
}

#[test]
fn a_crash_while_a_snapshot_of_an_extended_l2_image_is_deleted_loses_nothing() {
    crash_everywhere(Kind::ExtendedL2, Op::Delete);
}

/// With lazy refcounts the new snapshot table's refcounts are only cached when the header
/// switches to it: the image must be dirty by then, or a crash leaves a table the next
/// allocation overwrites.
#[test]
fn a_crash_while_a_snapshot_of_a_lazy_refcounts_image_is_created_or_deleted_loses_nothing() {
    crash_everywhere(Kind::Lazy, Op::Create);
    crash_everywhere(Kind::Lazy, Op::Delete);
}
