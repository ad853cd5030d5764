//! End-to-end tests with libblkio's `virtio-blk-vhost-user` driver as the frontend.

mod common;

use common::*;

#[test]
fn smoke_raw() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let mut d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
    let mut c = connect(&d.socket, 1, false).unwrap_or_else(|e| panic!("{e}:\n{}", d.log()));
    assert_eq!(c.capacity(), 16 << 20);
    let data = pattern(1, 8192);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, 8192).unwrap(), data);
    assert_eq!(c.flush(0), 0);
    drop(c);
    d.stop();
    eprintln!("{}", d.log());
}
