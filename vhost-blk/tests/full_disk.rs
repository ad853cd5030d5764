//! A guest filling the file system its image lives on (a small tmpfs): writes that find no
//! space fail with IOERR, flushes still succeed, nothing that completed is lost, and once
//! space is freed the same writes succeed. libblkio is the frontend, qemu-img the judge.

mod common;

use std::path::Path;

use common::*;
use cowbird_tests::small_fs::SmallFs;
use cowbird_tests::{qemu_check, qemu_img_create_qcow2, qemu_raw};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The guest disk: much larger than the file system under it.
const DISK: u64 = 64 * MIB;
/// Each write; consecutive writes are 640 KiB apart, so with 4 KiB clusters (an L2 table
/// maps 2 MiB) every few writes need a new L2 table.
const PIECE: usize = 64 * KIB as usize;
const STRIDE: u64 = 640 * KIB;

/// Writes pieces until one fails, without flushing (dirty metadata piles up); then checks
/// that a flush succeeds, that everything written reads back, and that after freeing space
/// the failed write and a flush succeed. Returns the guest's view as the writes left it.
fn fill_then_free(fs: &SmallFs, image: &Path, format: &str) -> Vec<u8> {
    let filler = fs.fill("filler", MIB as usize);
    let logs = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(logs.path(), image, &["--format", format]);
    let mut c = connect(&d.socket, 1, false).unwrap_or_else(|e| panic!("{e}:\n{}", d.log()));
    let mut model = vec![0u8; DISK as usize];
    let piece = |i: u64| (i * STRIDE, pattern(i + 1, PIECE));
    let mut failed = None;
    for i in 0..DISK / STRIDE {
        let (off, data) = piece(i);
        match c.write(0, off, &data) {
            0 => model[off as usize..off as usize + PIECE].copy_from_slice(&data),
            r => {
                assert_eq!(r, -libc::EIO, "write {i} at {off}");
                failed = Some(i);
                break;
            }
        }
    }
    let failed = failed.expect("the file system never filled up");
    assert!(failed > 0, "not even the first write fitted");
    // A guest retrying without end gets the error each time, and the log does not grow with
    // every retry: the first failure and then every power of two are reported.
    let (off, data) = piece(failed);
    for retry in 0..40 {
        assert_eq!(c.write(0, off, &data), -libc::EIO, "retry {retry}");
    }
    let reported = d.log().matches("No space left on device").count();
    assert!(
        (1..=8).contains(&reported),
        "41 failed writes, {reported} log lines:\n{}",
        d.log()
    );
    assert_eq!(c.flush(0), 0, "flush on the full file system:\n{}", d.log());
    for i in 0..failed {
        let (off, data) = piece(i);
        assert!(
            c.read(0, off, PIECE).unwrap() == data,
            "write {i} at {off} does not read back"
        );
    }
    assert!(d.log().contains("No space left on device"), "{}", d.log());
    // Space back: the failed write goes through now.
    std::fs::remove_file(filler).unwrap();
    let (off, data) = piece(failed);
    assert_eq!(c.write(0, off, &data), 0, "{}", d.log());
    model[off as usize..off as usize + PIECE].copy_from_slice(&data);
    assert_eq!(c.flush(0), 0);
    drop(c);
    d.stop();
    model
}

#[test]
fn qcow2_on_a_full_file_system_fails_writes_and_loses_nothing() {
    let fs = SmallFs::mount(4 * MIB);
    let image = fs.path().join("disk.qcow2");
    qemu_img_create_qcow2(image.to_str().unwrap(), &["-o", "cluster_size=4096"], "64M");
    let model = fill_then_free(&fs, &image, "qcow2");
    // 0: clean; 3: leaked clusters only (a cluster allocated for a write that then failed).
    let (code, out) = qemu_check(&image);
    assert!(matches!(code, 0 | 3), "qemu-img check exit {code}:\n{out}");
    assert!(
        qemu_raw(&image) == model,
        "the image differs from what the guest wrote"
    );
}

#[test]
fn raw_on_a_full_file_system_fails_writes_and_loses_nothing() {
    let fs = SmallFs::mount(4 * MIB);
    let image = fs.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let model = fill_then_free(&fs, &image, "raw");
    assert!(
        std::fs::read(&image).unwrap() == model,
        "the image differs from what the guest wrote"
    );
}
