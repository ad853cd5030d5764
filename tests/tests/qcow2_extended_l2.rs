//! Images with extended L2 entries (subclusters): what qemu-io writes we read identically,
//! through the synchronous engine and through `map_io` (the zero-copy path).

use std::path::{Path, PathBuf};

use cowbird_tests::*;
use qcow2::{Extent, Image, MapOutcome};

/// 64 KiB clusters: 2 KiB subclusters.
const CLUSTER: u64 = 65536;
const SIZE: u64 = 4 << 20;

/// A raw base file with a pattern everywhere, so reads of the backing file show.
fn patterned_base(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, pattern(SIZE as usize, 0, 0x5a)).unwrap();
    base
}

/// Creates an extended-L2 qcow2 image at `path`, over `backing` (raw) if given.
fn create_ext(path: &Path, backing: Option<&Path>, cluster: u64) {
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("extended_l2=on,cluster_size={cluster}"),
    ];
    if let Some(b) = backing {
        args.extend([
            "-b".into(),
            b.to_str().unwrap().into(),
            "-F".into(),
            "raw".into(),
        ]);
    }
    args.extend([path.to_str().unwrap().into(), SIZE.to_string()]);
    qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Subcluster-sized and unaligned writes, zero writes, discards and compressed clusters.
fn scribble(img: &Path) {
    qemu_io(
        img,
        &[
            "write -P 0x55 4k 4k",
            "write -P 0x66 70000 3000",
            "write -P 0x77 200k 100k",
            "write -z 6k 2k",
            "write -z 512k 8k",
            "write -z -u 1M 64k",
            "write -P 0x11 1088k 64k",
            "write -z 1090k 4k",
            "discard 1100k 4k",
            "write -c -P 0x44 2M 64k",
            "write -c -P 0x45 2112k 64k",
            "write -P 0x12 3M 1k",
        ],
    );
}

/// Reads `[offset, offset + buf.len())` through `map_io` only; panics if it is declined.
fn map_read(img: &dyn Image, buf: &mut [u8], offset: u64) {
    let mapping = loop {
        match img.map_io(offset, buf.len() as u64, false) {
            MapOutcome::Mapped(m) => break m,
            MapOutcome::Load(load) => {
                let mut bytes = vec![0u8; load.len];
                load.storage.read_at(&mut bytes, load.offset).unwrap();
                img.install_metadata(&load, &bytes);
            }
            MapOutcome::Declined => panic!("map_io declined a read at {offset}"),
        }
    };
    let mut pos = 0usize;
    for e in &mapping.extents {
        match *e {
            Extent::Data { host, len } => {
                let len = len as usize;
                mapping
                    .storage
                    .read_at(&mut buf[pos..pos + len], host)
                    .unwrap();
                pos += len;
            }
            Extent::Zero { len } => {
                buf[pos..pos + len as usize].fill(0);
                pos += len as usize;
            }
        }
    }
    assert_eq!(pos, buf.len());
    assert!(img.finish_io(mapping, true));
}

/// Reads of odd sizes at odd offsets (across subclusters and clusters) match `expected`.
fn assert_pieces_match(img: &dyn Image, expected: &[u8], via_map: bool) {
    let mut offset = 0u64;
    let mut k = 0u64;
    while offset < SIZE {
        let len = (1 + (k * 7919) % 9000).min(SIZE - offset) as usize;
        let mut buf = vec![0xeeu8; len];
        if via_map {
            map_read(img, &mut buf, offset);
        } else {
            img.read_at(&mut buf, offset).unwrap();
        }
        let at = offset as usize;
        assert_same(
            &buf,
            &expected[at..at + len],
            &format!("{len} bytes at {offset}"),
        );
        offset += len as u64;
        k += 1;
    }
}

#[test]
fn reads_what_qemu_io_wrote_over_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = patterned_base(dir.path());
    let img = dir.path().join("x.qcow2");
    create_ext(&img, Some(&base), CLUSTER);
    scribble(&img);
    let theirs = qemu_raw(&img);
    let ours = open(&img, true);
    assert_same(&our_raw(&*ours), &theirs, "whole image");
    assert_pieces_match(&*ours, &theirs, false);
    // The first write reached only subclusters 2 and 3 of cluster 0: 0 and 1 still come
    // from the backing file.
    assert_eq!(theirs[..4096], pattern(4096, 0, 0x5a)[..]);
}

#[test]
fn map_io_reads_subclusters_without_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [16384, CLUSTER, 2 << 20] {
        let img = dir.path().join(format!("m{cluster}.qcow2"));
        create_ext(&img, None, cluster);
        qemu_io(
            &img,
            &[
                "write -P 0x55 4k 4k",
                "write -P 0x66 70000 3000",
                "write -P 0x77 200k 100k",
                "write -z 6k 2k",
                "write -z -u 1M 64k",
                "write -P 0x11 3M 1k",
            ],
        );
        let theirs = qemu_raw(&img);
        let ours = open(&img, true);
        assert_pieces_match(&*ours, &theirs, true);
    }
}

/// The file offset of the bitmap of guest cluster `cluster`'s extended L2 entry (first L2
/// table only).
fn bitmap_at(img: &Path, cluster: u64) -> u64 {
    let data = std::fs::read(img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
    let l1 = be64(40) as usize;
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    l2 + cluster * 16 + 8
}

/// Overwrites 8 bytes of `img` at `at` with `value` (big-endian).
fn poke(img: &Path, at: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&value.to_be_bytes(), at).unwrap();
}

#[test]
fn invalid_bitmaps_are_corruption_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    create_ext(&img, None, CLUSTER);
    qemu_io(&img, &["write -P 0x55 0 4k", "write -c -P 0x44 128k 64k"]);
    // Cluster 0 allocated; cluster 1 unallocated; cluster 2 compressed.
    for (cluster, bitmap, valid) in [
        (0, 1 << 5 | 1 << 37, false), // subcluster 5 allocated and zero
        (1, 1 << 3, false),           // allocated subclusters without a host cluster
        (2, 1 << 40, true),           // a compressed cluster reads; the check reports it
    ] {
        let copy = dir.path().join(format!("c{cluster}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        poke(&copy, bitmap_at(&copy, cluster), bitmap);
        let ours = open(&copy, true);
        let mut buf = vec![0u8; 4096];
        let read = ours.read_at(&mut buf, cluster * CLUSTER);
        let mapped = ours.map_io(cluster * CLUSTER, 4096, false);
        if valid {
            read.unwrap();
        } else {
            let err = read.unwrap_err().to_string();
            assert!(err.contains("Invalid cluster entry found"), "{err}");
            let mapped = match mapped {
                MapOutcome::Load(load) => {
                    let mut bytes = vec![0u8; load.len];
                    load.storage.read_at(&mut bytes, load.offset).unwrap();
                    ours.install_metadata(&load, &bytes);
                    ours.map_io(cluster * CLUSTER, 4096, false)
                }
                other => other,
            };
            assert!(matches!(mapped, MapOutcome::Declined));
        }
        let ours = qcow2::Qcow2::open_storage(
            std::sync::Arc::new(qcow2::FileStorage::new(std::fs::File::open(&copy).unwrap())),
            &qcow2::OpenOptions {
                read_only: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let report = qcow2::check(&ours).unwrap();
        assert_eq!(report.corruptions, 1, "cluster {cluster}: {report:?}");
        let (code, _) = qemu_check(&copy);
        assert_eq!(code, 2, "qemu-img check agrees it is corrupt");
    }
}

/// One operation of a write test, applied to our image and to a raw model of its contents.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Compressed(u64),
}

/// Applies `op` to `img` and to `model` (QEMU's semantics: discards cover whole clusters).
fn apply(img: &qcow2::Qcow2, model: &mut [u8], op: Op, seed: u8) {
    let cluster = img.cluster_size();
    match op {
        Op::Write(off, len) => {
            let data = pattern(len as usize, off, seed);
            img.write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Op::Zero(off, len, unmap) => {
            img.write_zeroes(off, len, unmap).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard(off, len) => {
            img.discard(off, len).unwrap();
            let start = off.next_multiple_of(cluster);
            let end = (off + len) / cluster * cluster;
            if start < end {
                model[start as usize..end as usize].fill(0);
            }
        }
        Op::Compressed(off) => {
            let data = vec![seed; cluster as usize];
            img.write_compressed(&data, off).unwrap();
            model[off as usize..(off + cluster) as usize].copy_from_slice(&data);
        }
    }
}

/// Opens `path` writable with our engine (its backing file too).
fn open_rw(path: &Path) -> qcow2::Qcow2 {
    let dir = path.parent().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    qcow2::Qcow2::open_storage(
        std::sync::Arc::new(qcow2::FileStorage::new(file)),
        &Default::default(),
        Some(dir),
    )
    .unwrap()
}

/// Runs `ops` through our engine on an extended-L2 image (over the patterned base if
/// `backing`), then has QEMU judge: check clean, contents identical to the model.
fn write_and_judge(dir: &Path, name: &str, backing: bool, ops: &[Op]) -> PathBuf {
    let base = backing.then(|| patterned_base(dir));
    let path = dir.join(name);
    create_ext(&path, base.as_deref(), CLUSTER);
    // A compressed cluster QEMU wrote, for our writes to copy.
    qemu_io(&path, &["write -c -P 0x3c 3M 64k"]);
    let mut model = match &base {
        Some(b) => std::fs::read(b).unwrap(),
        None => vec![0u8; SIZE as usize],
    };
    model[3 << 20..(3 << 20) + CLUSTER as usize].fill(0x3c);
    let img = open_rw(&path);
    for (k, &op) in ops.iter().enumerate() {
        apply(&img, &mut model, op, k as u8 + 1);
    }
    assert_same(&our_raw(&img), &model, "our reads after our writes");
    img.flush().unwrap();
    drop(img);
    assert_qemu_clean(&path);
    let raw = dir.join(format!("{name}.model"));
    std::fs::write(&raw, &model).unwrap();
    let (p, m) = (path.to_str().unwrap(), raw.to_str().unwrap());
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p, m]);
    path
}

/// The extents of `qemu-img map --output=json`: (start, length, depth, data).
fn qemu_map(path: &Path) -> Vec<(u64, u64, u64, bool)> {
    let out = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The map extent holding guest byte `at`.
fn extent_at(map: &[(u64, u64, u64, bool)], at: u64) -> (u64, u64, u64, bool) {
    *map.iter()
        .find(|e| e.0 <= at && at < e.0 + e.1)
        .unwrap_or_else(|| panic!("no extent at {at}: {map:?}"))
}

#[test]
fn subcluster_writes_leave_the_rest_to_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let c5 = 5 * CLUSTER;
    let path = write_and_judge(
        dir.path(),
        "w.qcow2",
        true,
        &[
            // Subclusters 2 and 3 of an unallocated cluster.
            Op::Write(4096, 4096),
            // Unaligned, inside subclusters 2 and 3 of cluster 1: their edges are copied.
            Op::Write(70000, 3000),
            // Into a cluster already allocated (COPIED): in place, edges from the backing.
            Op::Write(c5 + 100, 1000),
            Op::Write(c5 + 10000, 1000),
            Op::Write(c5 + 2048, 2048),
        ],
    );
    let map = qemu_map(&path);
    // Untouched subclusters still come from the backing file (depth 1).
    assert_eq!(extent_at(&map, 0), (0, 4096, 1, true));
    assert_eq!(extent_at(&map, 4096).2, 0);
    assert_eq!(extent_at(&map, 8192).2, 1);
    assert_eq!(extent_at(&map, CLUSTER).2, 1);
    assert_eq!(extent_at(&map, 70000), (CLUSTER + 4096, 4096, 0, true));
    assert_eq!(extent_at(&map, CLUSTER + 8192).2, 1);
    assert_eq!(extent_at(&map, c5), (c5, 4096, 0, true));
    assert_eq!(extent_at(&map, c5 + 4096).2, 1);
    assert_eq!(extent_at(&map, c5 + 10000), (c5 + 8192, 4096, 0, true));
    assert_eq!(extent_at(&map, c5 + 12288).2, 1);
}

#[test]
fn zeroes_discards_and_copies_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let c = CLUSTER;
    for backing in [true, false] {
        let path = write_and_judge(
            dir.path(),
            &format!("z{backing}.qcow2"),
            backing,
            &[
                Op::Write(0, 3 * c + 5000),
                // Whole subclusters get zero bits; partial ones literal zeros.
                Op::Zero(6144, 2048, false),
                Op::Zero(8192 + 100, 3000, false),
                Op::Zero(c + 1000, 20000, true),
                // Whole clusters, kept and unmapped; unallocated ones.
                Op::Zero(2 * c, c, false),
                Op::Zero(8 * c, 2 * c, true),
                Op::Discard(c / 2, 3 * c),
                Op::Discard(20 * c + 5, 4096),
                // A write into a zeroed subcluster and into a partly zeroed cluster.
                Op::Write(6144 + 10, 100),
                Op::Write(2 * c + 3000, 5000),
                // Compressed clusters (ours and QEMU's) are copied on a partial write.
                Op::Compressed(12 * c),
                Op::Write(12 * c + 7000, 3000),
                Op::Write((3 << 20) + 4096, 100),
                Op::Zero((3 << 20) + c + 2048, 2048, false),
                Op::Compressed(14 * c),
                Op::Zero(14 * c + 4096, 4096, false),
                // Whole clusters over partly allocated ones, and across the disk's end.
                Op::Write(5 * c, 3 * c),
                Op::Write(SIZE - 3000, 3000),
                Op::Zero(SIZE - c - 1000, c + 1000, false),
                Op::Write(16 * c, c),
                Op::Zero(16 * c + 2048, 4096, false),
            ],
        );
        // Whole subclusters were zeroed with their zero bits, not by writing zeros.
        let map = qemu_map(&path);
        assert_eq!(
            extent_at(&map, 16 * c + 2048),
            (16 * c + 2048, 4096, 0, false)
        );
        assert!(extent_at(&map, 16 * c + 6144).3);
    }
}

#[test]
fn random_subcluster_io_matches_a_model() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ops: Vec<Op> = (0..60)
            .map(|_| {
                let off = rng.random_range(0..SIZE - 1);
                let len = rng
                    .random_range(1..(3 * CLUSTER).min(SIZE - off))
                    .min(SIZE - off);
                let sub = |x: u64| x / 2048 * 2048;
                match rng.random_range(0..10) {
                    0..=4 => Op::Write(off, len),
                    5 => Op::Write(sub(off), 2048 * rng.random_range(1..8)),
                    6 => Op::Zero(off, len, rng.random_bool(0.5)),
                    7 => Op::Zero(sub(off), 2048 * rng.random_range(1..8), false),
                    8 => Op::Discard(off, len),
                    _ => Op::Compressed(off / CLUSTER * CLUSTER),
                }
            })
            .map(|op| match op {
                Op::Write(o, l) | Op::Zero(o, l, _) if o + l > SIZE => Op::Write(o, SIZE - o),
                op => op,
            })
            .collect();
        write_and_judge(dir.path(), &format!("r{seed}.qcow2"), seed % 2 == 0, &ops);
    }
}

#[test]
fn snapshots_of_extended_l2_images_read_and_are_copied_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = patterned_base(dir.path());
    let path = dir.path().join("s.qcow2");
    create_ext(&path, Some(&base), CLUSTER);
    scribble(&path);
    qemu_img(&["snapshot", "-c", "s1", path.to_str().unwrap()]);
    let at_snapshot = qemu_raw(&path);
    // QEMU makes the same writes on a copy, for the allocation to compare with.
    let theirs = dir.path().join("t.qcow2");
    std::fs::copy(&path, &theirs).unwrap();
    qemu_io(
        &theirs,
        &[
            "write -P 1 4196 1000",
            "write -P 2 204800 3000",
            "write -z 1114112 4096",
            "write -P 4 2097162 10",
        ],
    );
    // Our writes into clusters (and an L2 table) shared with the snapshot.
    let img = open_rw(&path);
    let mut model = at_snapshot.clone();
    for (k, op) in [
        Op::Write(4096 + 100, 1000),
        Op::Write(200 << 10, 3000),
        Op::Zero(1088 << 10, 4096, false),
        Op::Write((2 << 20) + 10, 10),
    ]
    .into_iter()
    .enumerate()
    {
        apply(&img, &mut model, op, k as u8 + 1);
    }
    img.flush().unwrap();
    drop(img);
    assert_qemu_clean(&path);
    assert_same(&qemu_raw(&path), &model, "after our writes");
    // Shared clusters were copied as QEMU copies them: from the first to the last allocated
    // subcluster (and over the write), the rest left to the backing file.
    assert_eq!(qemu_map(&path), qemu_map(&theirs));
    // The snapshot still reads as it was taken, through QEMU and through our snapshot view.
    assert_same(
        &qemu_snapshot_raw(&path, "s1"),
        &at_snapshot,
        "qemu's snapshot s1",
    );
    let snap = qcow2::open_image(
        &path,
        &qcow2::OpenOptions {
            read_only: true,
            snapshot: Some(qcow2::SnapshotRef::Name("s1".into())),
            ..Default::default()
        },
    )
    .unwrap();
    assert_same(&our_raw(&*snap), &at_snapshot, "our snapshot view");
}

/// Writes `data` at `offset` through `map_io` only; false if the write is declined.
fn map_write(img: &dyn Image, data: &[u8], offset: u64) -> bool {
    let mapping = loop {
        match img.map_io(offset, data.len() as u64, true) {
            MapOutcome::Mapped(m) => break m,
            MapOutcome::Load(load) => {
                let mut bytes = vec![0u8; load.len];
                load.storage.read_at(&mut bytes, load.offset).unwrap();
                img.install_metadata(&load, &bytes);
            }
            MapOutcome::Declined => return false,
        }
    };
    for &(host, len) in &mapping.zero_first {
        mapping.storage.zero_range(host, len).unwrap();
    }
    let mut pos = 0usize;
    for e in &mapping.extents {
        let Extent::Data { host, len } = *e else {
            panic!("a write maps to data only");
        };
        let len = len as usize;
        mapping
            .storage
            .write_at(&data[pos..pos + len], host)
            .unwrap();
        pos += len;
    }
    assert_eq!(pos, data.len());
    assert!(img.finish_io(mapping, true));
    true
}

#[test]
fn map_io_writes_unallocated_subclusters_of_copied_clusters_in_place() {
    let dir = tempfile::tempdir().unwrap();
    for backing in [true, false] {
        let base = backing.then(|| patterned_base(dir.path()));
        let path = dir.path().join(format!("mw{backing}.qcow2"));
        create_ext(&path, base.as_deref(), CLUSTER);
        // Cluster 0: subclusters 2-3 allocated, 5 zero, the rest unallocated.
        qemu_io(&path, &["write -P 0x55 4k 4k", "write -z 10k 2k"]);
        let mut model = qemu_raw(&path);
        let img = open_rw(&path);
        let mut write = |data: Vec<u8>, off: u64, expect: bool| {
            assert_eq!(
                map_write(&img, &data, off),
                expect,
                "{} bytes at {off}",
                data.len()
            );
            if !expect {
                img.write_at(&data, off).unwrap();
            }
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        };
        // Whole unallocated subclusters 4 and 6-7, with the allocated ones between.
        write(pattern(2048, 8192, 1), 8192, true);
        write(pattern(3 * 2048, 12288, 2), 12288, true);
        write(pattern(5000, 5000, 3), 5000, true);
        // Part of the zero subcluster 5: the rest reads as zeros.
        write(pattern(100, 10300, 4), 10300, true);
        // Part of an unallocated subcluster reads the backing file: the engine's job then.
        write(pattern(100, 20000, 5), 20000, !backing);
        // An unallocated cluster: allocation is the engine's.
        write(pattern(2048, 2 * CLUSTER, 6), 2 * CLUSTER, false);
        assert_same(&our_raw(&img), &model, "our reads");
        img.flush().unwrap();
        drop(img);
        assert_qemu_clean(&path);
        assert_same(&qemu_raw(&path), &model, "qemu's reads");
        let map = qemu_map(&path);
        // Subclusters 2-9 hold data now; 10 on is still unallocated.
        assert_eq!(extent_at(&map, 8192), (4096, 16384, 0, true));
        let rest = extent_at(&map, 20480);
        assert!(rest.0 == 20480 && !(rest.2 == 0 && rest.3), "{rest:?}");
    }
}

/// An extended-L2 image with `cluster`-byte clusters over the patterned base, written in
/// pieces by qemu-io ([`scribble`]): allocated subclusters next to ones the backing file
/// shows, zero bits, compressed clusters.
fn partly_written(dir: &Path, name: &str, cluster: u64) -> PathBuf {
    let base = patterned_base(dir);
    let path = dir.join(name);
    create_ext(&path, Some(&base), cluster);
    scribble(&path);
    path
}

/// Copies `path` to a sibling named `name`.
fn copy(path: &Path, name: &str) -> PathBuf {
    let to = path.with_file_name(name);
    std::fs::copy(path, &to).unwrap();
    to
}

/// qemu-io writes that reach clusters shared with a snapshot of [`partly_written`] in part:
/// allocated and backing-file subclusters, a zeroed one, compressed clusters.
const SHARED_WRITES: [&str; 7] = [
    "write -P 0xa1 4196 1000",
    "write -P 0xa2 10k 1k",
    "write -z 200k 2k",
    "write -P 0xa3 1090k 100",
    "write -P 0xa4 2097162 10",
    "discard 2112k 128k",
    "write -P 0xa5 3M 100",
];

/// Our engine's writes into the same shared clusters as [`SHARED_WRITES`] for
/// `cluster`-byte clusters; the last one replaces a shared cluster with a compressed one.
fn shared_ops(cluster: u64) -> [Op; 7] {
    [
        Op::Write(4096 + 100, 1000),
        Op::Write(10 << 10, 1024),
        Op::Zero(200 << 10, 2048, false),
        Op::Write((1090 << 10) + 10, 100),
        Op::Write((2 << 20) + 10, 10),
        Op::Discard(2112 << 10, 2 * cluster),
        Op::Compressed(3 << 20),
    ]
}

/// Our engine makes snapshot `name` of `path`.
fn our_create(path: &Path, name: &str) {
    open_rw(path).create_snapshot(name).unwrap();
}

/// Our engine applies snapshot `name` of `path`.
fn our_apply(path: &Path, name: &str) {
    open_rw(path)
        .apply_snapshot(&qcow2::SnapshotRef::Name(name.into()))
        .unwrap();
}

/// Our engine deletes snapshot `name` of `path`.
fn our_delete(path: &Path, name: &str) {
    open_rw(path)
        .delete_snapshot(&qcow2::SnapshotRef::Name(name.into()))
        .unwrap();
}

/// `qemu-img snapshot FLAG NAME PATH`.
fn qemu_snapshot(path: &Path, flag: &str, name: &str) {
    qemu_img(&["snapshot", flag, name, path.to_str().unwrap()]);
}

#[test]
fn our_snapshots_keep_their_contents_under_qemu_io_writes_and_delete_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [16384, CLUSTER] {
        let path = partly_written(dir.path(), &format!("o{cluster}.qcow2"), cluster);
        let at_snapshot = qemu_raw(&path);
        // The same writes without a snapshot give the active layer's model; with
        // qemu-img's snapshot, the allocation to compare with.
        let plain = copy(&path, "plain.qcow2");
        let theirs = copy(&path, "theirs.qcow2");
        our_create(&path, "s1");
        qemu_snapshot(&theirs, "-c", "s1");
        assert_qemu_clean(&path);
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&theirs));
        for img in [&path, &plain, &theirs] {
            qemu_io(img, &SHARED_WRITES);
        }
        assert_qemu_clean(&path);
        let what = format!("{cluster}-byte clusters");
        assert_same(&qemu_raw(&path), &qemu_raw(&plain), &what);
        assert_same(&qemu_snapshot_raw(&path, "s1"), &at_snapshot, &what);
        assert_eq!(qemu_map(&path), qemu_map(&theirs), "{what}");
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&theirs));
        // Deleting frees what only the snapshot held, as much as qemu-img frees.
        our_delete(&path, "s1");
        qemu_snapshot(&theirs, "-d", "s1");
        assert_qemu_clean(&path);
        assert_same(&qemu_raw(&path), &qemu_raw(&plain), &what);
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&theirs));
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&plain));
    }
}

#[test]
fn qemu_img_snapshots_are_applied_by_us_after_our_writes() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [16384, CLUSTER] {
        let path = partly_written(dir.path(), &format!("a{cluster}.qcow2"), cluster);
        qemu_snapshot(&path, "-c", "q1");
        let at_q1 = qemu_raw(&path);
        let img = open_rw(&path);
        let mut model = at_q1.clone();
        for (k, op) in shared_ops(cluster).into_iter().enumerate() {
            apply(&img, &mut model, op, k as u8 + 1);
        }
        img.flush().unwrap();
        drop(img);
        let what = format!("{cluster}-byte clusters");
        assert_qemu_clean(&path);
        assert_same(&qemu_raw(&path), &model, &what);
        // Ours applies it on the image, qemu-img on a copy: the same disk and allocation.
        let theirs = copy(&path, "theirs.qcow2");
        our_apply(&path, "q1");
        qemu_snapshot(&theirs, "-a", "q1");
        assert_qemu_clean(&path);
        assert_same(&qemu_raw(&path), &at_q1, &what);
        assert_eq!(qemu_map(&path), qemu_map(&theirs), "{what}");
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&theirs));
        // The applied disk changes on its own; the snapshot keeps its contents.
        qemu_io(&path, &SHARED_WRITES);
        assert_qemu_clean(&path);
        assert_same(&qemu_snapshot_raw(&path, "q1"), &at_q1, &what);
    }
}

/// One random step of [`mixed_snapshot_sequences_match_models`], by our engine or by QEMU.
#[derive(Debug)]
enum Step {
    Create,
    Apply(usize),
    Delete(usize),
    Write,
}

#[test]
fn mixed_snapshot_sequences_match_models() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    // Which (step, tool) pairs ran, so that the sequences cannot miss one silently.
    let mut ran = std::collections::HashSet::new();
    for seed in 0..4u64 {
        let cluster = if seed % 2 == 0 { 16384 } else { CLUSTER };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let path = partly_written(dir.path(), &format!("m{seed}.qcow2"), cluster);
        let mut active = qemu_raw(&path);
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        for n in 0..14 {
            let ours = rng.random_bool(0.5);
            let step = match rng.random_range(0..5) {
                0 | 1 if snaps.len() < 4 => Step::Create,
                2 if !snaps.is_empty() => Step::Apply(rng.random_range(0..snaps.len())),
                3 if !snaps.is_empty() => Step::Delete(rng.random_range(0..snaps.len())),
                _ => Step::Write,
            };
            match step {
                Step::Create => {
                    let name = format!("s{n}");
                    match ours {
                        true => our_create(&path, &name),
                        false => qemu_snapshot(&path, "-c", &name),
                    }
                    snaps.push((name, active.clone()));
                }
                Step::Apply(i) => {
                    match ours {
                        true => our_apply(&path, &snaps[i].0),
                        false => qemu_snapshot(&path, "-a", &snaps[i].0),
                    }
                    active = snaps[i].1.clone();
                }
                Step::Delete(i) => {
                    let (name, _) = snaps.remove(i);
                    match ours {
                        true => our_delete(&path, &name),
                        false => qemu_snapshot(&path, "-d", &name),
                    }
                }
                Step::Write => random_writes(&path, &mut active, ours, &mut rng, n as u8),
            }
            let tool = ["qemu", "us"][ours as usize];
            let what = format!("seed {seed}, step {n}: {step:?} by {tool}");
            ran.insert((std::mem::discriminant(&step), ours));
            let (code, text) = qemu_check(&path);
            assert_eq!(code, 0, "{what}:\n{text}");
            let report = qcow2::check(&open_rw(&path)).unwrap();
            assert!(report.is_clean(), "{what}: our check: {report:?}");
            assert_same(&qemu_raw(&path), &active, &what);
            for (name, contents) in &snaps {
                assert_same(
                    &qemu_snapshot_raw(&path, name),
                    contents,
                    &format!("{what}, {name}"),
                );
            }
        }
        // Deleting what is left (ours and qemu-img's on a copy) frees as much.
        let theirs = copy(&path, "theirs.qcow2");
        for (name, _) in &snaps {
            our_delete(&path, name);
            qemu_snapshot(&theirs, "-d", name);
        }
        assert_qemu_clean(&path);
        assert_same(&qemu_raw(&path), &active, "after deleting all");
        assert_eq!(host_clusters_in_use(&path), host_clusters_in_use(&theirs));
    }
    assert_eq!(ran.len(), 8, "every kind of step by both tools");
}

/// A few random writes to `path` (and the model `disk`): through our engine (data, zeroes,
/// discards, compressed clusters) or through qemu-io (data, zeroes), half of them
/// subcluster-aligned.
fn random_writes(path: &Path, disk: &mut [u8], ours: bool, rng: &mut impl rand::Rng, seed: u8) {
    let img = ours.then(|| open_rw(path));
    let cluster = img.as_ref().map_or(0, |i| i.cluster_size());
    let mut cmds = Vec::new();
    for k in 0..rng.random_range(1..6u8) {
        let (off, len) = match rng.random_bool(0.5) {
            true => (
                rng.random_range(0..SIZE / 2048) * 2048,
                2048 * rng.random_range(1..8),
            ),
            false => (rng.random_range(0..SIZE - 1), rng.random_range(1..100_000)),
        };
        let len = len.min(SIZE - off);
        let byte = seed.wrapping_mul(16).wrapping_add(k) | 1;
        let zero = rng.random_range(0..4) == 0;
        match &img {
            Some(img) => {
                let op = match rng.random_range(0..8) {
                    0 => Op::Discard(off, len),
                    1 => Op::Compressed(off / cluster * cluster),
                    _ if zero => Op::Zero(off, len, rng.random_bool(0.5)),
                    _ => Op::Write(off, len),
                };
                apply(img, disk, op, byte);
            }
            None => {
                let range = off as usize..(off + len) as usize;
                if zero {
                    cmds.push(format!("write -z {off} {len}"));
                    disk[range].fill(0);
                } else {
                    cmds.push(format!("write -P {byte} {off} {len}"));
                    disk[range].fill(byte);
                }
            }
        }
    }
    match img {
        Some(img) => img.flush().unwrap(),
        None => qemu_io(path, &cmds.iter().map(String::as_str).collect::<Vec<_>>()),
    }
}

#[test]
fn a_misaligned_entry_stops_a_snapshot_with_qemu_s_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.qcow2");
    create_ext(&path, None, 16384);
    qemu_io(&path, &["write -P 1 0 4k", "write -P 2 16k 1k"]);
    // Guest cluster 1's entry (the word before its bitmap) points 512 bytes into a cluster.
    let entry = bitmap_at(&path, 1) - 8;
    let data = std::fs::read(&path).unwrap();
    let raw = u64::from_be_bytes(data[entry as usize..][..8].try_into().unwrap());
    poke(&path, entry, raw + 512);
    let theirs = copy(&path, "theirs.qcow2");
    let out = run(
        "qemu-img",
        &["snapshot", "-c", "s", theirs.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let words = stderr
        .split("Marking image as corrupt: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("qemu-img: {stderr}"));
    let err = open_rw(&path).create_snapshot("s").unwrap_err();
    assert!(matches!(err, qcow2::Error::MarkedCorrupt(_)), "{err:?}");
    assert!(
        err.to_string().contains(words),
        "ours: {err}; qemu-img: {words}"
    );
    // Both images are now marked corrupt.
    for image in [&path, &theirs] {
        let info = qemu_img(&["info", image.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{info}");
    }
}
