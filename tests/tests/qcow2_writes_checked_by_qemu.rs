//! Images we create and write, checked by QEMU: `qemu-img check` clean and contents equal
//! to an in-memory model (compared with `qemu-img convert -O raw`).

use std::path::Path;

use cowbird_tests::*;
use qcow2::{CompressionType, CreateOptions, Image, Preallocation, Qcow2};
use rand::{Rng, SeedableRng};

fn create(path: &Path, opts: CreateOptions) {
    qcow2::create(path, &opts).unwrap_or_else(|e| panic!("create {opts:?}: {e}"));
}

fn open_qcow2(path: &Path) -> Qcow2 {
    open_qcow2_opts(path, 0, &Default::default())
}

/// Opens read-write with extra open(2) flags and open options.
fn open_qcow2_opts(path: &Path, flags: i32, opts: &qcow2::OpenOptions) -> Qcow2 {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .unwrap();
    Qcow2::open_storage(
        std::sync::Arc::new(qcow2::FileStorage::new(file)),
        opts,
        path.parent(),
    )
    .unwrap()
}

/// Applies random writes, zeroes, discards and compressed writes to the image and a model.
fn random_ops(img: &Qcow2, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    let cs = img.cluster_size();
    for i in 0..ops {
        let off = rng.random_range(0..size - 1);
        let len = rng.random_range(1..=(size - off).min(3 * cs + 777));
        let (a, b) = (off as usize, (off + len) as usize);
        match rng.random_range(0..10) {
            0..=5 => {
                let data = pattern(len as usize, off, i as u8);
                img.write_at(&data, off).unwrap();
                model[a..b].copy_from_slice(&data);
            }
            6 => {
                img.write_zeroes(off, len, rng.random()).unwrap();
                model[a..b].fill(0);
            }
            7 => {
                // Discard only guarantees anything for whole clusters: mirror that.
                img.discard(off, len).unwrap();
                let start = off.next_multiple_of(cs);
                let end = if off + len == size {
                    size
                } else {
                    (off + len) / cs * cs
                };
                if end > start {
                    model[start as usize..end as usize].fill(0);
                }
            }
            _ if img.has_data_file() => {}
            _ => {
                let c = off / cs * cs;
                let n = cs.min(size - c) as usize;
                let mut data = vec![(i % 7) as u8; n];
                data[..n / 3].copy_from_slice(&pattern(n / 3, c, 3));
                img.write_compressed(&data, c).unwrap();
                model[c as usize..c as usize + n].copy_from_slice(&data);
            }
        }
    }
}

/// Creates `path` with `opts`, applies `ops` random operations (seeded) through a handle
/// opened with the extra open(2) `flags` and `open_opts`, flushes, runs `before_close` on the
/// handle, closes it and checks the image against the model.
fn random_roundtrip(
    path: &Path,
    opts: CreateOptions,
    (flags, open_opts): (i32, &qcow2::OpenOptions),
    (seed, ops): (u64, usize),
    before_close: impl FnOnce(&Qcow2),
    what: &str,
) {
    let mut model = vec![0u8; opts.size as usize];
    create(path, opts);
    {
        let img = open_qcow2_opts(path, flags, open_opts);
        random_ops(&img, &mut model, seed, ops);
        img.flush().unwrap();
        before_close(&img);
    }
    model_matches(path, &model, what);
}

fn model_matches(path: &Path, model: &[u8], what: &str) {
    assert_qemu_clean(path);
    assert_same(&qemu_raw(path), model, what);
    assert_same(&our_raw(&*open(path, true)), model, what);
}

#[test]
fn random_operations_across_the_create_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (3, 65536, 16, CompressionType::Deflate),
        (3, 4096, 1, CompressionType::Zstd),
        (3, 512, 64, CompressionType::Deflate),
        (2, 65536, 16, CompressionType::Deflate),
        (3, 1 << 21, 8, CompressionType::Zstd),
    ];
    for (n, (version, cluster_size, refcount_bits, compression_type)) in
        cases.into_iter().enumerate()
    {
        let opts = CreateOptions {
            size: 6 * 1048576 + 4 * cluster_size + 1536,
            version,
            cluster_size,
            refcount_bits,
            compression_type,
            ..Default::default()
        };
        let path = dir.path().join(format!("m{n}.qcow2"));
        let open = (0, &Default::default());
        random_roundtrip(
            &path,
            opts,
            open,
            (n as u64, 300),
            |_| {},
            &format!("case {n}"),
        );
    }
}

#[test]
fn random_operations_with_o_direct() {
    // Unaligned guest writes, header updates and packed compressed clusters all go through
    // aligned bounce buffers (read-modify-write where needed).
    let dir = tempfile::tempdir().unwrap();
    for (n, cluster_size) in [65536u64, 512].into_iter().enumerate() {
        let opts = CreateOptions {
            size: 4 * 1048576 + 3 * cluster_size + 512,
            cluster_size,
            compression_type: CompressionType::Zstd,
            ..Default::default()
        };
        let path = dir.path().join(format!("d{n}.qcow2"));
        let open = (libc::O_DIRECT, &Default::default());
        let what = format!("O_DIRECT case {n}");
        random_roundtrip(&path, opts, open, (100 + n as u64, 300), |_| {}, &what);
    }
}

#[test]
fn lazy_refcounts_mark_the_image_dirty_while_open_and_clean_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    let opts = CreateOptions {
        size: 8 * 1048576,
        lazy_refcounts: true,
        ..Default::default()
    };
    let dirty = || qcow2_file_dirty(&path);
    let while_open = |_: &Qcow2| {
        assert!(
            dirty(),
            "refcounts are not on disk yet: the dirty bit must say so"
        );
    };
    random_roundtrip(
        &path,
        opts,
        (0, &Default::default()),
        (11, 200),
        while_open,
        "lazy",
    );
    assert!(
        !dirty(),
        "a clean close writes the refcounts and clears the dirty bit"
    );
}

#[test]
fn a_tiny_l2_cache_evicts_dirty_slices_safely() {
    // 4 KiB clusters: each L2 table maps 2 MiB, so a 40 MiB disk has 20 tables and the
    // smallest cache (a few slices) evicts dirty ones all the time.
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 40 * 1048576,
        cluster_size: 4096,
        ..Default::default()
    };
    let tiny = qcow2::OpenOptions {
        l2_cache_bytes: Some(1),
        ..Default::default()
    };
    let path = dir.path().join("tiny-cache.qcow2");
    random_roundtrip(&path, opts, (0, &tiny), (7, 400), |_| {}, "tiny L2 cache");
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and
    // the initial one-cluster table covers 2 MiB, so 6 MiB of data forces growth.
    let size = 6 << 20;
    create(
        &path,
        CreateOptions {
            size,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    );
    let data = pattern(size as usize, 0, 5);
    {
        let img = open_qcow2(&path);
        let before = img.header().refcount_table_offset;
        img.write_at(&data, 0).unwrap();
        img.flush().unwrap();
        assert_ne!(
            img.header().refcount_table_offset,
            before,
            "table did not move"
        );
    }
    model_matches(&path, &data, "after growth");
}

#[test]
fn writes_to_clusters_shared_with_a_snapshot_leave_the_snapshot_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    let p = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
    qemu_io(&path, &["write -P 0x11 0 2M", "write -c -P 0x12 2M 64k"]);
    qemu_img(&["snapshot", "-c", "s1", p]);
    let before = qemu_raw(&path);
    let mut model = before.clone();
    {
        let img = open_qcow2(&path);
        random_ops(&img, &mut model, 42, 200);
    }
    model_matches(&path, &model, "active layer");
    let snap = dir.path().join("snap.raw");
    qemu_img(&[
        "convert",
        "-l",
        "s1",
        "-O",
        "raw",
        p,
        snap.to_str().unwrap(),
    ]);
    assert_same(&std::fs::read(&snap).unwrap(), &before, "snapshot s1");
}

#[test]
fn copy_on_write_over_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"]);
    qemu_io(&base, &["write -P 0x31 0 3M"]);
    create(
        &top,
        CreateOptions {
            size: 4 << 20,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        },
    );
    let mut model = qemu_raw(&top);
    {
        let img = open_qcow2(&top);
        random_ops(&img, &mut model, 7, 200);
    }
    model_matches(&top, &model, "overlay");
    assert!(qemu_img(&["info", "--output=json", top.to_str().unwrap()])
        .contains("\"backing-filename-format\": \"qcow2\""));
}

#[test]
fn writes_over_preallocated_zero_and_compressed_clusters_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("za.qcow2");
    let p = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "2M"]);
    // write -z without -u on allocated clusters keeps them allocated (ZERO_ALLOC).
    qemu_io(
        &path,
        &[
            "write -P 0x41 0 1M",
            "write -z 0 512k",
            "write -c -P 0x42 1M 64k",
        ],
    );
    let mut model = qemu_raw(&path);
    {
        let img = open_qcow2(&path);
        for (off, len) in [(4096u64, 100usize), (131072, 65536), (1048576 + 10, 20)] {
            let d = pattern(len, off, 9);
            img.write_at(&d, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
    }
    model_matches(&path, &model, "zero-alloc and compressed overwrite");
}

#[test]
fn preallocation_modes_and_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (mode, name)) in [
        (Preallocation::Metadata, "metadata"),
        (Preallocation::Falloc, "falloc"),
        (Preallocation::Full, "full"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("p{i}.qcow2"));
        create(
            &path,
            CreateOptions {
                size: 3 << 20,
                preallocation: mode,
                ..Default::default()
            },
        );
        assert_qemu_clean(&path);
        // The same allocation as qemu-img's own image with that mode (host offsets aside).
        let theirs = dir.path().join(format!("q{i}.qcow2"));
        let prealloc = format!("preallocation={name}");
        let theirs_name = theirs.to_str().unwrap();
        qemu_img_create_qcow2(theirs_name, &["-o", &prealloc], "3M");
        let map = |p: &std::path::Path| {
            let out = qemu_img(&["map", "--output=json", p.to_str().unwrap()]);
            let mut pieces = out.split(", \"offset\": ");
            let mut kept = pieces.next().unwrap_or_default().to_owned();
            for piece in pieces {
                kept.push_str(piece.trim_start_matches(|c: char| c.is_ascii_digit()));
            }
            kept
        };
        assert_eq!(map(&path), map(&theirs), "{mode:?}");
    }
    let path = dir.path().join("ext.qcow2");
    // A relative data file name is relative to the working directory (as in QEMU).
    let data_file = dir.path().join("ext.data");
    create(
        &path,
        CreateOptions {
            size: 2 << 20,
            data_file: Some(data_file.to_str().unwrap().into()),
            ..Default::default()
        },
    );
    let mut model = vec![0u8; 2 << 20];
    {
        let img = open_qcow2(&path);
        random_ops(&img, &mut model, 3, 100);
    }
    std::fs::write(dir.path().join("model.raw"), &model).unwrap();
    for args in [
        vec!["check", "-f", "qcow2", "ext.qcow2"],
        vec![
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "ext.qcow2",
            "model.raw",
        ],
    ] {
        qemu_img_in(dir.path(), &args);
    }
    assert_same(&our_raw(&*open(&path, true)), &model, "external data file");
}

/// A raw external data file (data_file_raw) stays the disk as a raw image through writes,
/// zeroes, discards and resizes, as with QEMU: zeroes and discards only changed the
/// metadata (the file kept the old bytes), a grown range was not mapped onto the file and a
/// shrink left the file long.
#[test]
fn a_raw_data_file_stays_the_disk_as_a_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.qcow2");
    let data_file = dir.path().join("raw.data");
    create(
        &path,
        CreateOptions {
            size: 2 << 20,
            data_file: Some(data_file.to_str().unwrap().into()),
            data_file_raw: true,
            ..Default::default()
        },
    );
    let mut model = vec![0u8; 2 << 20];
    {
        let img = open_qcow2(&path);
        random_ops(&img, &mut model, 7, 200);
        img.flush().unwrap();
    }
    assert_same(&std::fs::read(&data_file).unwrap(), &model, "the data file");
    for (size, prealloc) in [(3 << 20, Preallocation::Off), (1 << 20, Preallocation::Off)] {
        let mut img = open_qcow2(&path);
        img.resize(size, prealloc).unwrap();
        model.resize(size as usize, 0);
        img.flush().unwrap();
        drop(img);
        assert_eq!(std::fs::metadata(&data_file).unwrap().len(), size);
        // What is written into the file shows through the image: every cluster maps onto it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&data_file)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x77; 65536], size - 65536).unwrap();
        let end = model.len();
        model[end - 65536..].fill(0x77);
        std::fs::write(dir.path().join("model.raw"), &model).unwrap();
        for args in [
            vec!["check", "raw.qcow2"],
            vec!["compare", "-F", "raw", "raw.qcow2", "model.raw"],
        ] {
            qemu_img_in(dir.path(), &args);
        }
    }
}

/// Runs qemu-img with `args` in `dir`; it must succeed.
fn qemu_img_in(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Zeroing or discarding the end of a disk whose last cluster is partial touches only the
/// range asked for: the bytes before it in that cluster stay (qemu-io reads them back).
#[test]
fn zeroing_the_end_of_a_partial_last_cluster_keeps_what_precedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = 65536 + 1024;
    for mode in ["zero", "zero-unmap", "discard"] {
        let path = path_in(dir.path(), &format!("{mode}.qcow2"));
        qemu_img_create_qcow2(path.to_str().unwrap(), &[], &size.to_string());
        qemu_io(&path, &[&format!("write -P 0xaa 0 {size}")]);
        {
            let img = open_qcow2(&path);
            match mode {
                "zero" => img.write_zeroes(size - 512, 512, false),
                "zero-unmap" => img.write_zeroes(size - 512, 512, true),
                _ => img.discard(size - 512, 512),
            }
            .unwrap();
            img.flush().unwrap();
        }
        qemu_io(&path, &[&format!("read -P 0xaa 0 {}", size - 512)]);
        if mode != "discard" {
            qemu_io(&path, &[&format!("read -P 0 {} 512", size - 512)]);
        }
        assert_qemu_clean(&path);
    }
}

/// `len` pseudo-random bytes (incompressible) followed by zeros up to `size`.
fn noise_then_zeros(seed: u64, len: usize, size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    v.resize(size, 0);
    v
}

#[test]
fn compressed_data_filling_a_host_cluster_exactly_leaves_the_next_one_alone() {
    let cs = 4096usize;
    let packed = |d: &[u8]| qcow2::compress::compress(CompressionType::Deflate, d).map(|c| c.len());
    // Two clusters whose deflate sizes add up to exactly one cluster.
    let first = noise_then_zeros(1, 1900, cs);
    let rest = cs - packed(&first).unwrap();
    let second = (1..3000)
        .map(|k| noise_then_zeros(2, k, cs))
        .find(|d| packed(d) == Some(rest))
        .expect("a cluster of the right compressed size");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tail.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_create_qcow2(p, &["-o", "cluster_size=4096"], "1M");
    let mut model = vec![0u8; 1 << 20];
    {
        let img = open_qcow2(&path);
        let mut write = |data: &[u8], cluster: usize, compressed: bool| {
            let off = cluster * cs;
            if compressed {
                img.write_compressed(data, off as u64).unwrap();
            } else {
                img.write_at(data, off as u64).unwrap();
            }
            model[off..off + cs].copy_from_slice(data);
        };
        write(&[0xaa; 4096], 10, false); // the L2 table, then data
        write(&first, 0, true); // host cluster C
        write(&[0xbb; 4096], 11, false); // host cluster C + 1
        write(&second, 1, true); // fills C exactly
        write(&noise_then_zeros(3, 500, cs), 2, true); // must not go into C + 1
        img.flush().unwrap();
    }
    model_matches(
        &path,
        &model,
        "compressed data after an exactly filled cluster",
    );
}

/// A handle opened without its backing file (`no_backing`) still works for the header's
/// backing file: a downgrade turns zero clusters into clusters of zeros (not unallocated
/// ones, which would read that file), and growing is refused, since the backing file's
/// length decides whether the grown range must be zeroed.
#[test]
fn a_handle_without_its_backing_file_keeps_zero_clusters_zero() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    qemu_img_create_qcow2(base.to_str().unwrap(), &[], "1M");
    qemu_io(&base, &["write -P 0xaa 0 1M"]);
    let backed = ["-b", "b.qcow2", "-F", "qcow2"];
    qemu_img_create_qcow2(top.to_str().unwrap(), &backed, "1M");
    qemu_io(&top, &["write -z 0 64k"]);
    let opts = qcow2::OpenOptions {
        no_backing: true,
        ..Default::default()
    };
    let mut img = open_qcow2_opts(&top, 0, &opts);
    let grown = img.resize(2 << 20, Preallocation::Off);
    assert!(
        matches!(grown, Err(qcow2::Error::Backing { .. })),
        "{grown:?}"
    );
    img.downgrade_to_v2().unwrap();
    drop(img);
    assert_qemu_clean(&top);
    let disk = qemu_raw(&top);
    assert!(
        disk[..64 << 10].iter().all(|&b| b == 0),
        "zeros read the backing file"
    );
    assert!(
        disk[64 << 10..].iter().all(|&b| b == 0xaa),
        "the backing file"
    );
}
