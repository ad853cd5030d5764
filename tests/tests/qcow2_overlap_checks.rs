//! Overlap checks: an L2 entry that points guest data at metadata (here the L1 table, then
//! the refcount table), or an L1 entry that points an L2 table at the refcount table, makes
//! the engine refuse the write and mark the image corrupt, as QEMU does, instead of
//! overwriting the metadata.

use std::fs;
use std::os::unix::fs::FileExt;

use cowbird_tests::{open, path_in, qemu_img, qemu_io};

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The image file opened read-write, and its first 512 bytes (the header).
fn open_with_header(path: &std::path::Path) -> (fs::File, Vec<u8>) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut header = vec![0u8; 512];
    file.read_exact_at(&mut header, 0).unwrap();
    (file, header)
}

/// Writes guest cluster 0 with qemu-io, then redirects its L2 entry to the host range the
/// header field at `field` (40: L1 table, 48: refcount table) points to. Returns that offset.
fn redirect_cluster0_to(path: &std::path::Path, field: usize) -> u64 {
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(path, &["write -P 0x11 0 64k"]);
    let (file, header) = open_with_header(path);
    let target = be64(&header, field);
    let l1 = be64(&header, 40);
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, l1).unwrap();
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    file.write_all_at(&((1u64 << 63) | target).to_be_bytes(), l2)
        .unwrap();
    target
}

#[test]
fn data_write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    for (name, field, what) in [
        ("l1.qcow2", 40, "active L1 table"),
        ("rt.qcow2", 48, "refcount table"),
    ] {
        let path = path_in(dir.path(), name);
        let target = redirect_cluster0_to(&path, field);
        let before = fs::read(&path).unwrap();
        {
            let img = open(&path, false);
            let err = img.write_at(&[0xee; 4096], 0).unwrap_err().to_string();
            assert!(
                err.contains(what) && err.contains("marked corrupt"),
                "{name}: {err}"
            );
            // Nothing else is written either.
            assert!(
                img.write_at(&[0xee; 512], 512 << 10).is_err(),
                "{name}: write after corruption"
            );
        }
        let after = fs::read(&path).unwrap();
        let t = target as usize;
        assert_eq!(
            before[t..t + 512],
            after[t..t + 512],
            "{name}: metadata was overwritten"
        );
        let info = qemu_img(&["info", path.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{name}: {info}");
    }
}

#[test]
fn metadata_write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    // The L1 entry of guest cluster 0 points its L2 table at the refcount table: allocating
    // a cluster there would write that "L2 table" back over the refcount table.
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "l2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    let (file, header) = open_with_header(&path);
    let (l1, reftable) = (be64(&header, 40), be64(&header, 48));
    file.write_all_at(&((1u64 << 63) | reftable).to_be_bytes(), l1)
        .unwrap();
    let before = fs::read(&path).unwrap();
    {
        let img = open(&path, false);
        // The refcount table's second entry is 0: guest cluster 1 reads as unallocated.
        let err = img
            .write_at(&[0xee; 4096], 64 << 10)
            .and_then(|()| img.flush())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refcount table") && err.contains("marked corrupt"),
            "{err}"
        );
        let again = img.write_at(&[0xee; 512], 512 << 10).unwrap_err();
        assert!(matches!(again, qcow2::Error::WritesStopped), "{again}");
    }
    let after = fs::read(&path).unwrap();
    let t = reftable as usize;
    assert_eq!(
        before[t..t + 4096],
        after[t..t + 4096],
        "refcount table overwritten"
    );
    let info = qemu_img(&["info", path.to_str().unwrap()]);
    assert!(info.contains("corrupt: true"), "{info}");
}

/// An L2 entry whose host offset is not cluster-aligned (guest cluster 0 moved 512 bytes into
/// the host cluster of guest cluster 1) is refused for reads, writes and discards: honouring
/// it would read the wrong bytes, write into the neighbour, or free the neighbour's cluster.
/// Guest cluster 1 keeps its data and its refcount.
#[test]
fn an_unaligned_l2_entry_is_refused_and_its_neighbour_survives() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "unaligned.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x22 64k 64k"]);
    let (file, header) = open_with_header(&path);
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, be64(&header, 40)).unwrap();
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    let mut entries = [0u8; 16];
    file.read_exact_at(&mut entries, l2).unwrap();
    let neighbour = be64(&entries, 8) & 0x00ff_ffff_ffff_fe00;
    file.write_all_at(&((1u64 << 63) | (neighbour + 512)).to_be_bytes(), l2)
        .unwrap();
    {
        let img = open(&path, false);
        let mut buf = vec![0u8; 4096];
        let err = img.read_at(&mut buf, 0).unwrap_err();
        let qemu_words = format!(
            "Image is corrupt: Cluster allocation offset {:#x} unaligned (L2 offset: {l2:#x}, \
             L2 index: 0)",
            neighbour + 512
        );
        // Opened for writing: fatal, as in QEMU (the image is marked corrupt).
        assert!(matches!(err, qcow2::Error::MarkedCorrupt(_)), "{err:?}");
        assert!(err.to_string().starts_with(&qemu_words), "{err}");
        assert!(img.write_at(&[0xee; 4096], 0).is_err(), "write");
        assert!(img.discard(0, 64 << 10).is_err(), "discard");
        assert!(img.write_zeroes(0, 64 << 10, true).is_err(), "write zeroes");
        img.read_at(&mut buf, 64 << 10).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0x22),
            "guest cluster 1 reads wrong"
        );
        img.flush().unwrap();
    }
    assert!(qemu_img(&["info", path.to_str().unwrap()]).contains("corrupt: true"));
    // QEMU opens a corrupt image read-only only.
    let read = cowbird_tests::run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 64k 64k",
            path.to_str().unwrap(),
        ],
    );
    let said = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success() && !said.contains("fail"), "{said}");
    // qemu-img reports the unaligned entry (stderr), and counts it as a second reference to
    // the neighbour's cluster, which still has its refcount of 1 (0 if it had been freed).
    let check = cowbird_tests::run("qemu-img", &["check", path.to_str().unwrap()]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(check.status.code(), Some(2), "{out}");
    assert!(out.contains("not properly aligned"), "{out}");
    let cluster = neighbour >> 16;
    assert!(
        out.contains(&format!("ERROR cluster {cluster} refcount=1 reference=2")),
        "the neighbour's cluster lost its reference:\n{out}"
    );
}

/// An L2 entry with only the COPIED bit (host offset 0, the header) in an image without a
/// data file is unallocated, as QEMU reads it: the guest cluster reads as zeros, not as the
/// header, and a write to it allocates a new cluster instead of going over the header.
#[test]
fn a_copied_entry_at_offset_zero_is_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "copied0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(&path, &["write -P 0x11 0 64k"]);
    let (file, header) = open_with_header(&path);
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, be64(&header, 40)).unwrap();
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 1: COPIED and nothing else.
    file.write_all_at(&(1u64 << 63).to_be_bytes(), l2 + 8)
        .unwrap();
    qemu_io(&path, &["read -P 0 64k 64k"]);
    {
        let img = open(&path, false);
        let mut buf = vec![0xffu8; 64 << 10];
        img.read_at(&mut buf, 64 << 10).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "guest cluster 1 reads the header"
        );
        img.write_at(&[0x22; 4096], 64 << 10).unwrap();
        img.flush().unwrap();
    }
    qemu_io(&path, &["read -P 0x11 0 64k", "read -P 0x22 64k 4k"]);
    let info = qemu_img(&["info", path.to_str().unwrap()]);
    assert!(!info.contains("corrupt: true"), "{info}");
}
