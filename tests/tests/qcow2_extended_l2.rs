//! Images with extended L2 entries (subclusters): what qemu-io writes we read identically,
//! through the synchronous engine and through `map_io` (the zero-copy path).

use std::path::Path;

use cowbird_tests::*;
use qcow2::{Extent, Image, MapOutcome};

/// 64 KiB clusters: 2 KiB subclusters.
const CLUSTER: u64 = 65536;
const SIZE: u64 = 4 << 20;

/// A raw base file with a pattern everywhere, so reads of the backing file show.
fn patterned_base(dir: &Path) -> std::path::PathBuf {
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
