//! Arbitrary bytes as a qcow2 image: open, read, check, write (see `qcow2::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qcow2::fuzzing::open_read_check_write(data);
});
