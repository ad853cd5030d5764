//! The fuzz corpora run through the fuzz targets' bodies on stable Rust: open_image (small
//! images made by qemu-img and qemu-io) plus single-byte corruptions of their first 512 bytes
//! (the header and, with 512-byte clusters, the start of the tables), and mutate_image (such
//! images followed by the bytes that choose the operations): no input may panic or hang. The
//! images qemu-img made (all but the `crash-*` inputs) must also open, check clean and read as
//! qemu-img reads them, so the harness cannot pass by refusing everything.

use std::path::Path;

use std::process::Command;
use std::sync::Arc;

use qcow2::fuzzing::{open_mutate_check, open_read_check_write, MUTATE_CONTROL_BYTES};
use qcow2::{Image, MemStorage, Qcow2};

fn corpus() -> Vec<(String, Vec<u8>)> {
    corpus_of("open_image")
}

/// The inputs in the corpus of fuzz target `target`, by name.
fn corpus_of(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "corpus is missing");
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn corpus_inputs_do_not_panic() {
    for (_, data) in corpus() {
        open_read_check_write(&data);
    }
}

#[test]
fn mutate_corpus_inputs_do_not_panic() {
    for (_, data) in corpus_of("mutate_image") {
        open_mutate_check(&data);
    }
}

/// The qemu-made images of the mutate_image corpus open writable, check clean, and take the
/// operations their control bytes choose, so that target's harness reaches the engine (and,
/// for the seeds that keep bitmaps, their dirty bits).
#[test]
fn mutate_corpus_seeds_open_writable() {
    let mut opened = 0;
    let mut with_bitmaps = 0;
    for (name, data) in corpus_of("mutate_image") {
        if Path::new(&name)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("crash-")
        {
            continue;
        }
        let (image, control) = data.split_at(data.len() - MUTATE_CONTROL_BYTES);
        let opts = qcow2::OpenOptions {
            check: true,
            keep_bitmaps: control[0] & 2 != 0,
            ..Default::default()
        };
        let img = Qcow2::open_storage(Arc::new(MemStorage::new(image)), &opts, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = qcow2::check(&img).unwrap();
        // The lazy-refcount image was left dirty by a crash: it needs its repair.
        let dirty = img.header().is_dirty();
        assert!(report.is_clean() || dirty, "{name}: {report:?}");
        if opts.keep_bitmaps {
            // qemu-io's writes are in the bitmaps, so the bitmap operations start from them.
            let bitmaps = img.bitmaps().unwrap();
            assert!(!bitmaps.is_empty(), "{name}: no bitmaps");
            let bits = img.bitmap_bits(&bitmaps[0].name).unwrap();
            assert!(bits.bits.iter().any(|&b| b != 0), "{name}: no dirty bits");
            with_bitmaps += 1;
        }
        opened += 1;
    }
    assert!(opened >= 10, "only {opened} qemu-made images");
    assert!(with_bitmaps >= 2, "only {with_bitmaps} images keep bitmaps");
}

#[test]
fn qemu_made_corpus_images_open_and_read_like_qemu_img() {
    let mut checked = 0;
    for (name, data) in corpus() {
        if Path::new(&name)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("crash-")
        {
            continue;
        }
        let opts = qcow2::OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let img = Qcow2::open_storage(Arc::new(MemStorage::new(&data)), &opts, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = qcow2::check(&img).unwrap();
        assert!(report.is_clean(), "{name}: {report:?}");
        let mut ours = vec![0u8; img.size() as usize];
        img.read_at(&mut ours, 0).unwrap();
        let raw = tempfile::NamedTempFile::new().unwrap();
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw", &name])
            .arg(raw.path())
            .output()
            .expect("qemu-img (scripts/install-deps.sh)");
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(
            std::fs::read(raw.path()).unwrap() == ours,
            "{name}: contents differ"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} qemu-made images");
}

#[test]
fn corrupted_headers_do_not_panic() {
    for (name, data) in corpus() {
        for at in 0..data.len().min(512) {
            for value in [0x00, 0xff, data[at] ^ 0x80] {
                let mut bad = data.clone();
                bad[at] = value;
                let result = std::panic::catch_unwind(|| open_read_check_write(&bad));
                assert!(result.is_ok(), "{name}: byte {at} = {value:#x} panics");
            }
        }
    }
}
