//! The fuzz corpus (qcow2/fuzz/corpus/open_image: small images made by qemu-img and qemu-io)
//! run through the fuzz target's body on stable Rust, plus single-byte corruptions of their
//! first 512 bytes (the header and, with 512-byte clusters, the start of the tables): no
//! input may panic or hang.

use std::path::Path;

use qcow2::fuzzing::open_read_check_write;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_image");
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
