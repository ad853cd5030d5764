//! The body of the `cargo fuzz` target (`qcow2/fuzz`), kept in the library so that the
//! corpus also runs as an ordinary test (`tests/fuzz_corpus.rs`) on stable Rust.

use std::sync::Arc;

use crate::image::Image;
use crate::open::OpenOptions;
use crate::storage::MemStorage;
use crate::{check, Qcow2};

/// Largest guest range read per input, so one input cannot take seconds.
const READ_LIMIT: u64 = 4 << 20;

/// Opens `data` as a qcow2 image read-only, reads its first few MiB and checks it; then
/// opens a copy writable and writes one cluster. Any outcome is fine except a panic, a hang
/// or an unbounded allocation.
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
