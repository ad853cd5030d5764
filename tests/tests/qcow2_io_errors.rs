//! I/O errors from the host file in the middle of metadata work: the request fails, nothing
//! already done is lost, and once the storage works again the image is consistent
//! (`qemu-img check`) and reads back what was written (qemu-io).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cowbird_tests::*;
use qcow2::{FileStorage, Image, Qcow2, Storage};

/// A host file whose writes to chosen offsets fail with EIO while armed, and whose space
/// claims (fallocate) can be made to run out.
struct FaultyFile {
    inner: FileStorage,
    failing: Mutex<Vec<u64>>,
    /// Space claims that succeed before one fails with ENOSPC (then disarmed).
    claims_before_enospc: Mutex<Option<usize>>,
    /// Syncs fail with EIO (a write lost at writeback).
    syncs_fail: std::sync::atomic::AtomicBool,
    /// Hole punches fail with EIO.
    punches_fail: std::sync::atomic::AtomicBool,
}

impl FaultyFile {
    /// The image file at `path`, read-write, with no failure armed.
    fn open(path: &Path) -> Arc<FaultyFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Arc::new(FaultyFile {
            inner: FileStorage::new(file),
            failing: Mutex::new(Vec::new()),
            claims_before_enospc: Mutex::new(None),
            syncs_fail: Default::default(),
            punches_fail: Default::default(),
        })
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let failing = self.failing.lock().unwrap();
        if failing
            .iter()
            .any(|&f| f >= offset && f < offset + len as u64)
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.inner.write_at(buf, offset)
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        for (offset, buf) in writes {
            self.write_at(buf, *offset)?;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        if self.syncs_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.punches_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.punch_hole(offset, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut armed = self.claims_before_enospc.lock().unwrap();
        match armed.as_mut() {
            Some(0) => {
                *armed = None;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Some(n) => *n -= 1,
            None => {}
        }
        self.inner.allocate(offset, len)
    }
}

/// Host offsets of the refcount blocks the image file's refcount table lists.
fn refcount_blocks(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let table = be(48) as usize;
    let clusters = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    let cluster_size = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (0..clusters * cluster_size / 8)
        .map(|i| be(table + 8 * i) & !0x1ff)
        .filter(|&off| off != 0)
        .collect()
}

/// With lazy refcounts, refcount blocks hold increments that reach the file only when the
/// block leaves the cache. A block whose write fails on the way out stays cached: the
/// flush reports the error, a later flush writes it, and no cluster in use ends up with
/// refcount 0 (which would let it be allocated twice).
#[test]
fn a_refcount_block_that_fails_to_leave_the_cache_keeps_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "lazy.qcow2");
    let p = path.to_str().unwrap();
    // 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB of the file, so
    // 256 KiB of data spread over many blocks, more than the 4-block cache below holds.
    qemu_img_create_qcow2(
        p,
        &["-o", "cluster_size=512,refcount_bits=64,lazy_refcounts=on"],
        "1M",
    );
    qemu_io(&path, &["write -P 0x11 0 256k"]);
    let file = FaultyFile::open(&path);
    let opts = qcow2::OpenOptions {
        refcount_cache_bytes: Some(4 * 512),
        ..Default::default()
    };
    {
        let img = Qcow2::open_storage(file.clone(), &opts, path.parent()).unwrap();
        // A new cluster: its refcount is an increment in a cached block only.
        img.write_at(&[0x22; 512], 512 << 10).unwrap();
        img.flush().unwrap();
        // Every refcount block write fails now; freeing clusters all over the file makes the
        // next flush load blocks, evicting the one with the increment.
        *file.failing.lock().unwrap() = refcount_blocks(&path);
        for k in 0..8u64 {
            img.discard((k * 32) << 10, 512).unwrap();
        }
        assert!(
            img.flush().is_err(),
            "the refcount block writes were to fail"
        );
        file.failing.lock().unwrap().clear();
        img.flush().unwrap();
    }
    let (code, out) = qemu_check(&path);
    assert!(matches!(code, 0 | 3), "qemu-img check exit {code}:\n{out}");
    qemu_io(&path, &["read -P 0x22 512k 512", "read -P 0x11 512 32256"]);
}

/// Growing an image moves its L1 table; if the header write that switches to the new table
/// fails, the file may point at either table, so the image takes no more writes (each would
/// land in a table the file might not use). What was there before stays readable and
/// consistent.
#[test]
fn a_failed_l1_table_switch_stops_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "grow.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(&path, &["write -P 0x33 0 64k"]);
    let file = FaultyFile::open(&path);
    {
        let mut img =
            Qcow2::open_storage(file.clone(), &Default::default(), path.parent()).unwrap();
        *file.failing.lock().unwrap() = vec![0];
        let failed = img.resize(4 << 30, qcow2::Preallocation::Off).unwrap_err();
        assert!(matches!(failed, qcow2::Error::Io { .. }), "{failed}");
        file.failing.lock().unwrap().clear();
        let err = img.write_at(&[0x44; 4096], 128 << 10).unwrap_err();
        assert!(err.to_string().contains("no more writes"), "{err}");
        let mut back = vec![0u8; 4096];
        img.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x33));
    }
    let (code, out) = qemu_check(&path);
    assert!(matches!(code, 0 | 3), "qemu-img check exit {code}:\n{out}");
    qemu_io(&path, &["read -P 0x33 0 64k"]);
}

/// Growing the L1 table of a large resize takes a long run of clusters and new refcount
/// blocks after it; running out of space for any of its claims fails the resize and leaves
/// a consistent image (no refcount block in the table without its own refcount).
#[test]
fn running_out_of_space_while_growing_the_l1_table_leaves_a_consistent_image() {
    let dir = tempfile::tempdir().unwrap();
    for claims in 0..4 {
        let path = path_in(dir.path(), &format!("grow{claims}.qcow2"));
        let p = path.to_str().unwrap();
        // 512-byte clusters: a refcount block covers 128 KiB, and a 2 GiB disk needs a
        // 1 MiB L1 table, whose run needs new refcount blocks.
        qemu_img_create_qcow2(p, &["-o", "cluster_size=512"], "1M");
        let file = FaultyFile::open(&path);
        {
            let mut img = Qcow2::open_storage(file.clone(), &Default::default(), None).unwrap();
            *file.claims_before_enospc.lock().unwrap() = Some(claims);
            // Whether later claims fail depends on how many the resize makes.
            let grown = img.resize(2 << 30, qcow2::Preallocation::Off);
            assert!(
                claims > 0 || grown.is_err(),
                "the first claim fails the resize"
            );
            *file.claims_before_enospc.lock().unwrap() = None;
            img.write_at(&[0x33; 512], 0).unwrap();
            img.flush().unwrap();
        }
        assert_qemu_clean(&path);
        qemu_io(&path, &["read -P 0x33 0 512"]);
    }
}

/// With lazy refcounts, the dirty bit must be on disk before L2 tables whose clusters have
/// no refcount there yet. A failed header write must leave the bit unset in memory too, so
/// that the next writeback sets it again rather than believe it is set.
#[test]
fn a_failed_dirty_bit_write_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "dirty.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_create_qcow2(p, &["-o", "lazy_refcounts=on"], "64M");
    let file = FaultyFile::open(&path);
    let img = Qcow2::open_storage(file.clone(), &Default::default(), None).unwrap();
    *file.failing.lock().unwrap() = vec![0];
    img.write_at(&[0x42; 65536], 0).unwrap();
    assert!(img.flush().is_err(), "the header write fails");
    file.failing.lock().unwrap().clear();
    img.write_at(&[0x43; 65536], 65536).unwrap();
    img.flush().unwrap();
    // A power loss now: the image as the file holds it, before the close.
    let crashed = path_in(dir.path(), "crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    drop(img);
    assert!(
        qcow2_file_dirty(&crashed),
        "the dirty bit is set while refcounts lag"
    );
    // QEMU repairs the dirty image when it opens it.
    qemu_io(&crashed, &["read -P 0x42 0 64k", "read -P 0x43 64k 64k"]);
    assert_qemu_clean(&crashed);
}

/// A resize whose header write fails leaves the size in memory as it was: a later header
/// write (here the dirty bit of lazy refcounts) must not record the size that failed.
#[test]
fn a_failed_resize_header_write_keeps_the_old_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "resize.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_create_qcow2(p, &["-o", "lazy_refcounts=on"], "64M");
    let file = FaultyFile::open(&path);
    let mut img = Qcow2::open_storage(file.clone(), &Default::default(), None).unwrap();
    *file.failing.lock().unwrap() = vec![0];
    assert!(img.resize(128 << 20, qcow2::Preallocation::Off).is_err());
    file.failing.lock().unwrap().clear();
    img.write_at(&[0x44; 512], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.header().size, 64 << 20);
    drop(img);
    assert_qemu_clean(&path);
    assert!(qemu_img(&["info", p]).contains("virtual size: 64 MiB"));
}

/// A repair whose L2 write fails (here: zeroing an unaligned preallocated entry) is not
/// counted as done: the entry is still there, so it stays a corruption and its clusters stay
/// counted (else the refcount repair that follows would free clusters the entry still names).
#[test]
fn a_repair_whose_l2_write_fails_stays_a_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "unaligned.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]);
    qemu_io(&path, &["write -P 0x55 0 128k"]);
    let bytes = std::fs::read(&path).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l2 = be(be(40) as usize) & 0x00ff_ffff_ffff_fe00;
    let data = be(l2 as usize) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 10: COPIED, preallocated zero, at an offset 512 bytes into the data.
    let entry_at = l2 + 8 * 10;
    let entry = 1u64 << 63 | (data + 512) | 1;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &entry.to_be_bytes(), entry_at).unwrap();
    let file = FaultyFile::open(&path);
    *file.failing.lock().unwrap() = vec![entry_at];
    let opts = qcow2::OpenOptions {
        check: true,
        ..Default::default()
    };
    let img = Qcow2::open_storage(file.clone(), &opts, path.parent()).unwrap();
    let report = qcow2::check::check_and_repair(&img, qcow2::check::Repair::All);
    let said = format!("{:?}", report.messages);
    assert!(
        said.contains("Failed to overwrite L2 table entry"),
        "{said}"
    );
    // Counted: the data cluster the entry overlaps shows one reference more than its
    // refcount (which the repair then raises), instead of being taken for fixed.
    let cluster = data >> 16;
    assert!(
        said.contains(&format!("cluster {cluster} refcount=1 reference=2")),
        "{said}"
    );
    drop(img);
    file.failing.lock().unwrap().clear();
    // The data clusters the entry overlaps are still referenced twice over: nothing of the
    // guest's first 128 KiB was freed for reuse.
    qemu_io(&path, &["read -P 0x55 0 128k"]);
    let img = Qcow2::open_storage(file, &opts, path.parent()).unwrap();
    let report = qcow2::check::check_and_repair(&img, qcow2::check::Repair::All);
    assert!(report.failure.is_none(), "{report:?}");
    drop(img);
    let (code, out) = qemu_check(&path);
    assert!(matches!(code, 0 | 3), "qemu-img check exit {code}:\n{out}");
    qemu_io(&path, &["read -P 0x55 0 128k", "read -P 0 640k 64k"]);
}

/// A preallocating resize whose data write fails gives back the clusters it reserved: they
/// were never mapped, and kept their refcount past the end of the file, where a later grow
/// found them taken (the image then showed them as leaks).
#[test]
fn a_failed_preallocation_gives_its_clusters_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "prealloc.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4M"]);
    let file = FaultyFile::open(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    {
        let mut img = Qcow2::open_storage(file.clone(), &Default::default(), None).unwrap();
        *file.failing.lock().unwrap() = vec![len + (4 << 20)];
        let failed = img.resize(64 << 20, qcow2::Preallocation::Full);
        assert!(failed.is_err(), "the data write was to fail");
        assert_eq!(img.size(), 4 << 20);
        file.failing.lock().unwrap().clear();
    }
    {
        let mut img = Qcow2::open_storage(file, &Default::default(), None).unwrap();
        img.resize(64 << 20, qcow2::Preallocation::Full).unwrap();
    }
    assert_qemu_clean(&path);
}

/// A guest write whose data write fails gives back the cluster it allocated (never mapped),
/// as QEMU does: no leak, and the range still reads as before. Whole clusters, a part of one
/// (zeroed first) and a part of one copied from a shared (snapshot) cluster.
#[test]
fn a_failed_data_write_gives_its_new_cluster_back() {
    for case in ["whole", "partial", "shared"] {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path(), "w.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4M"]);
        qemu_io(&path, &["write -P 0x11 0 64k"]);
        if case == "shared" {
            qemu_img(&["snapshot", "-c", "s", path.to_str().unwrap()]);
        }
        let file = FaultyFile::open(&path);
        let len = std::fs::metadata(&path).unwrap().len();
        {
            let img = Qcow2::open_storage(file.clone(), &Default::default(), None).unwrap();
            *file.failing.lock().unwrap() = (0..64).map(|i| len + i * 4096).collect();
            let (data, at) = match case {
                "whole" => (vec![0x22; 128 << 10], 1 << 20),
                "partial" => (vec![0x22; 4096], (1 << 20) + 512),
                _ => (vec![0x22; 4096], 4096),
            };
            assert!(
                img.write_at(&data, at).is_err(),
                "{case}: the write was to fail"
            );
            file.failing.lock().unwrap().clear();
            // Later writes grow the file past the cluster the failed one took (a leak past
            // the end of the file shows only then).
            img.write_at(&[0x33; 256 << 10], 2 << 20).unwrap();
            img.flush().unwrap();
        }
        assert_qemu_clean(&path);
        qemu_io(
            &path,
            &[
                "read -P 0x11 0 64k",
                "read -P 0 1M 128k",
                "read -P 0x33 2M 256k",
            ],
        );
    }
}

/// After a sync failed (every later flush fails, and the dirty metadata cannot be written),
/// reads of data mapped by tables that are not cached still work: a full L2 cache makes
/// room by dropping clean slices. It wrote everything back first, which failed, so every
/// cache miss failed a read of healthy data (as QEMU, qemu-storage-daemon serves them).
#[test]
fn reads_go_on_after_a_failed_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "r.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4G"]);
    // One cluster in each of 100 L2 slices (a slice maps 32 MiB; the cache holds 32).
    let writes: Vec<String> = (0..100u64)
        .map(|k| format!("write -P {} {} 4k", k + 1, k << 25))
        .collect();
    qemu_io(
        &path,
        &writes.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let file = FaultyFile::open(&path);
    let opts = qcow2::OpenOptions {
        l2_cache_bytes: Some(0),
        ..Default::default()
    };
    let img = Qcow2::open_storage(file.clone(), &opts, None).unwrap();
    // A dirty slice (a new cluster mapped) that the failed sync leaves unwritten.
    img.write_at(&[0xee; 4096], 64 << 10).unwrap();
    file.syncs_fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(img.flush().is_err());
    for round in 0..2 {
        for k in 0..100u64 {
            let mut buf = [0u8; 4096];
            img.read_at(&mut buf, k << 25)
                .unwrap_or_else(|e| panic!("round {round}, slice {k}: {e}"));
            assert!(buf.iter().all(|&b| b == k as u8 + 1), "slice {k}");
        }
    }
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 64 << 10).unwrap();
    assert_eq!(buf, [0xee; 4096]);
}

/// With `unmap`, a hole punch that fails at writeback only keeps the space in use (QEMU's
/// discards are optional too): the flush succeeds and every freed cluster is free. A failed
/// punch used to fail the flush and drop the frees still to apply (leaked clusters).
#[test]
fn a_failed_punch_keeps_the_space_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = path_in(dir.path(), "p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "4M"]);
    qemu_io(&path, &["write -P 7 0 1M", "write -P 8 2M 64k"]);
    let file = FaultyFile::open(&path);
    let opts = qcow2::OpenOptions {
        unmap: true,
        ..Default::default()
    };
    {
        let img = Qcow2::open_storage(file.clone(), &opts, None).unwrap();
        img.discard(0, 1 << 20).unwrap();
        file.punches_fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        img.flush().unwrap();
    }
    assert_qemu_clean(&path);
    qemu_io(&path, &["read -P 0 0 1M", "read -P 8 2M 64k"]);
}
