//! The guest_queue fuzz corpus (`fuzz/corpus/guest_queue`) run through the fuzz target's body
//! on stable Rust: no input may panic or hang, and the seeds (`fuzz/make_seeds.py`) are served
//! as a driver expects, so that the harness cannot pass by refusing everything.

use std::path::Path;

use vhost_blk::fuzzing::serve_input;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the seeds put the avail and used rings, the status bytes and the data.
const AVAIL: u64 = 0x100;
const USED: u64 = 0x140;
const STATUS: u64 = 0x300;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/guest_queue");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "corpus is missing");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn seed(name: &str) -> GuestMemoryMmap {
    let (_, data) = corpus()
        .into_iter()
        .find(|(n, _)| n == &format!("seed-{name}"))
        .unwrap_or_else(|| panic!("seed-{name} is missing"));
    serve_input(&data).unwrap_or_else(|| panic!("seed-{name} was refused"))
}

fn u16_at(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn bytes_at(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Every chain the seed made available is in the used ring.
fn all_used(mem: &GuestMemoryMmap) -> u16 {
    let made_available = u16_at(mem, AVAIL + 2);
    assert_eq!(u16_at(mem, USED + 2), made_available);
    made_available
}

#[test]
fn corpus_inputs_do_not_panic() {
    for (_, data) in corpus() {
        serve_input(&data);
    }
}

#[test]
fn seeds_are_served_as_a_driver_expects() {
    for (name, with_ranges) in [("raw-mixed", false), ("qcow2-mixed-event-idx", true)] {
        let mem = seed(name);
        let n = all_used(&mem);
        assert_eq!(n, if with_ranges { 6 } else { 4 }, "{name}");
        let statuses = bytes_at(&mem, STATUS, n.into());
        assert!(
            statuses.iter().all(|&s| s == VIRTIO_BLK_S_OK as u8),
            "{name}: {statuses:?}"
        );
        // The read of a sector no seed writes, and the serial.
        assert_eq!(bytes_at(&mem, 0xa00, 512), [0; 512], "{name}");
        assert_eq!(&bytes_at(&mem, 0x700, 4), b"fuzz", "{name}");
    }
    let mem = seed("qcow2-indirect");
    all_used(&mem);
    assert_eq!(bytes_at(&mem, STATUS, 2), [VIRTIO_BLK_S_OK as u8; 2]);
    assert_eq!(bytes_at(&mem, 0xc00, 1024), [0; 1024]);
    // A read across the boundary of two memory regions is served; a write past the end fails.
    let mem = seed("split-memory-read-across");
    all_used(&mem);
    let statuses = bytes_at(&mem, STATUS, 2);
    assert_eq!(statuses, [VIRTIO_BLK_S_OK as u8, VIRTIO_BLK_S_IOERR as u8]);
    // A chain that loops has no status byte to trust: completed without one.
    let mem = seed("raw-loop");
    all_used(&mem);
    assert_eq!(bytes_at(&mem, STATUS, 1), [0]);
}
