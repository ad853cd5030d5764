//! Guest memory and ring addresses from the fuzzer, served by the queue worker (see
//! `vhost_blk::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_blk::fuzzing::serve_input(data);
});
