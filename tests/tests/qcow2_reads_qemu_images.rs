//! Images written by qemu-img / qemu-io, read by our engine: byte-identical to
//! `qemu-img convert -O raw` across the format matrix.

use cowbird_tests::*;

/// Writes a mix of everything qemu-io can produce into `img`.
fn scribble(img: &std::path::Path, cluster: u64) {
    let c = cluster;
    // QEMU cannot compress into clusters smaller than 4 KiB (the data never fits).
    let compressed = if c >= 4096 {
        vec![
            format!("write -c -P 0x44 {} {}", 20 * c, c),
            format!("write -c -P 0x55 {} {}", 21 * c, c),
        ]
    } else {
        Vec::new()
    };
    qemu_io(
        img,
        &[
            "write -P 0x11 1000 70000",
            &format!("write -P 0x22 {} {}", 3 * c + 7, 2 * c),
            &format!("write -z {} {}", 8 * c, 2 * c),
            &format!("write -P 0x33 {} {}", 12 * c, 3 * c),
            &format!("write -z -u {} {}", 13 * c, c),
            &format!("discard {} {}", 14 * c, c),
            "write -P 0x66 5000192 69632",
        ],
    );
    let cmds: Vec<&str> = compressed.iter().map(String::as_str).collect();
    if !cmds.is_empty() {
        qemu_io(img, &cmds);
    }
}

fn check_matrix(version: &str, cluster: u64, refcount_bits: u32, compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let opts = format!(
        "compat={version},cluster_size={cluster},refcount_bits={refcount_bits}{}",
        if version == "1.1" {
            format!(",compression_type={compression}")
        } else {
            String::new()
        }
    );
    qemu_img_create_qcow2(
        img.to_str().unwrap(),
        &["-o", &opts],
        &(8 * 1048576 + 24 * cluster).to_string(),
    );
    scribble(&img, cluster);
    let ours = our_raw(&*open(&img, true));
    assert_same(&ours, &qemu_raw(&img), &opts);
}

#[test]
fn v3_every_cluster_size() {
    for cluster in [512, 1024, 4096, 65536, 1 << 21] {
        check_matrix("1.1", cluster, 16, "zlib");
    }
}

#[test]
fn v2_images() {
    for cluster in [512, 65536] {
        check_matrix("0.10", cluster, 16, "zlib");
    }
}

#[test]
fn every_refcount_width() {
    for bits in [1, 2, 4, 8, 32, 64] {
        check_matrix("1.1", 65536, bits, "zlib");
    }
}

#[test]
fn zstd_compressed_clusters() {
    check_matrix("1.1", 65536, 16, "zstd");
    check_matrix("1.1", 4096, 16, "zstd");
}

#[test]
fn snapshot_then_overwrite_reads_current_and_keeps_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io(
        &img,
        &["write -P 0x22 65536 100000", "write -z 524288 65536"],
    );
    let ours = our_raw(&*open(&img, true));
    assert_same(&ours, &qemu_raw(&img), "after snapshot");
    // The snapshot still reads as it was taken (qemu-img convert -l is the judge).
    let snap = qcow2::open_image(
        &img,
        &qcow2::OpenOptions {
            read_only: true,
            snapshot: Some(qcow2::SnapshotRef::Name("s1".into())),
            ..Default::default()
        },
    )
    .unwrap();
    let ours = our_raw(&*snap);
    assert!(ours[..1 << 20].iter().all(|&b| b == 0x11) && ours[1 << 20..].iter().all(|&b| b == 0));
    let flat = dir.path().join("s1.raw");
    let (src, dst) = (img.to_str().unwrap(), flat.to_str().unwrap());
    qemu_img(&["convert", "-l", "s1", "-O", "raw", src, dst]);
    assert_same(&ours, &std::fs::read(&flat).unwrap(), "snapshot s1");
}

#[test]
fn backing_chain_with_relative_names_and_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("base.raw");
    std::fs::write(&raw, pattern(3 << 20, 0, 9)).unwrap();
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    qemu_img_create_qcow2(
        mid.to_str().unwrap(),
        &["-b", "base.raw", "-F", "raw"],
        "4M",
    );
    qemu_io(&mid, &["write -P 0x77 100000 200000"]);
    qemu_img_create_qcow2(
        top.to_str().unwrap(),
        &["-b", "mid.qcow2", "-F", "qcow2"],
        "4M",
    );
    qemu_io(
        &top,
        &["write -P 0x88 150000 1000", "write -z 3000000 65536"],
    );
    // Open from another working directory: names resolve against the image's directory.
    let ours = our_raw(&*open(&top, true));
    assert_same(&ours, &qemu_raw(&top), "three-level chain");
}

#[test]
fn backing_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img_create_qcow2(b.to_str().unwrap(), &["-b", "a.qcow2", "-F", "qcow2"], "1M");
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let err = qcow2::open_image(
        &b,
        &qcow2::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .err()
    .expect("a loop must not open");
    assert!(err.to_string().contains("loop"), "{err}");
}

#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    qemu_img_create_qcow2(
        img.to_str().unwrap(),
        &[
            "-o",
            &format!("data_file={}", dir.path().join("x.data").display()),
        ],
        "4M",
    );
    qemu_io(
        &img,
        &["write -P 0x99 4096 300000", "write -z 1048576 65536"],
    );
    let ours = our_raw(&*open(&img, true));
    assert_same(&ours, &qemu_raw(&img), "external data file");
}

#[test]
fn refuses_luks_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("l.qcow2");
    qemu_img_create_qcow2(
        luks.to_str().unwrap(),
        &[
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
        "1M",
    );
    let err = qcow2::open_image(&luks, &Default::default()).err().unwrap();
    assert!(err.to_string().contains("LUKS"), "{err}");
}

#[test]
fn dirty_lazy_refcount_image_reads_read_only_and_is_repaired_on_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img_create_qcow2(img.to_str().unwrap(), &["-o", "lazy_refcounts=on"], "4M");
    // qemu-io's abort leaves the dirty bit set and refcounts stale.
    let _ = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x12 0 300000",
            "-c",
            "abort",
            img.to_str().unwrap(),
        ],
    );
    let (code, _) = qemu_check(&img);
    assert_ne!(code, 0, "the image should need repair");
    let expected = {
        let ro = open(&img, true);
        our_raw(&*ro)
    };
    let mut model = vec![0u8; 4 << 20];
    model[..300000].fill(0x12);
    assert_same(&expected, &model, "read-only, dirty");
    drop(open(&img, false));
    assert_qemu_clean(&img);
    assert_same(&qemu_raw(&img), &model, "after repair, read by qemu-img");
}

/// A metadata-only open (what `qimg info` uses) takes an encrypted image but never hands out
/// its data (ciphertext); a normal open refuses the image.
#[test]
fn metadata_only_opens_encrypted_images_without_their_data() {
    use qcow2::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("aes.qcow2");
    qemu_img_create_qcow2(
        img.to_str().unwrap(),
        &[
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
        ],
        "1M",
    );
    let refused = qcow2::open_image(&img, &OpenOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(refused, qcow2::Error::UnsupportedFeature(_)),
        "{refused}"
    );
    let opts = OpenOptions {
        metadata_only: true,
        ..Default::default()
    };
    let opened = qcow2::open_image(&img, &opts).unwrap();
    assert!(opened.read_only());
    let mut buf = [0u8; 512];
    let err = opened.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(err, qcow2::Error::MetadataOnly), "{err}");
    assert!(matches!(
        opened.map_io(0, 512, false),
        qcow2::MapOutcome::Declined
    ));
}
