//! Arbitrary bytes as a qcow2 image and a few operations on it: open writable, write, zero,
//! discard, repair, snapshot, resize, then read back and check (see `qcow2::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::open_mutate_check(data);
});
