//! Crash consistency (a storage that drops unflushed writes at random points) and many
//! threads writing one image at once.

use std::sync::Arc;

use cowbird_tests::crash::CrashStorage;
use cowbird_tests::*;
use qcow2::uring::{IoRing, Start};
use qcow2::{CreateOptions, Image, Qcow2};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;

/// One random run cut short by a crash; returns whether the crashed image was dirty.
fn crash_round(seed: u64, opts: &CreateOptions, base: Option<&std::path::Path>) -> bool {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let storage = Arc::new(CrashStorage::default());
    qcow2::create::write_skeleton(&*storage, opts).unwrap();
    let img = Qcow2::open_storage(storage.clone(), &Default::default(), base).unwrap();
    let cs = img.cluster_size();
    let mut model = vec![0u8; SIZE as usize];
    if let Some(b) = base {
        model = qemu_raw(&b.join("base.qcow2"));
        model.resize(SIZE as usize, 0);
    }
    let mut flushed = model.clone();
    let mut touched = vec![false; SIZE as usize];
    let ops = rng.random_range(20..120);
    // Half the rounds crash inside a flush (between its barriers), half between requests.
    if seed % 2 == 0 {
        storage.crash_at_flush(rng.random_range(1..12), seed);
    }
    for i in 0..ops {
        if storage.has_crashed() {
            break;
        }
        let off = rng.random_range(0..SIZE - 1);
        let len = rng.random_range(1..=(SIZE - off).min(2 * cs + 100));
        let (a, b) = (off as usize, (off + len) as usize);
        match rng.random_range(0..8) {
            0 => {
                img.flush().unwrap();
                if !storage.has_crashed() {
                    flushed.copy_from_slice(&model);
                    touched.fill(false);
                }
            }
            1 => {
                img.write_zeroes(off, len, rng.random()).unwrap();
                model[a..b].fill(0);
                touched[a..b].fill(true);
            }
            2 => {
                let c = off / cs * cs;
                let data = vec![(i as u8) | 1; cs as usize];
                img.write_compressed(&data, c).unwrap();
                model[c as usize..(c + cs) as usize].copy_from_slice(&data);
                touched[c as usize..(c + cs) as usize].fill(true);
            }
            _ => {
                let data = pattern(len as usize, off, i as u8);
                img.write_at(&data, off).unwrap();
                model[a..b].copy_from_slice(&data);
                touched[a..b].fill(true);
            }
        }
    }
    let crashed = storage.crash_image(&mut rng);
    std::mem::forget(img); // a crash: no close-time flush
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    std::fs::write(&path, &crashed).unwrap();
    if let Some(b) = base {
        std::fs::copy(b.join("base.qcow2"), dir.path().join("base.qcow2")).unwrap();
    }
    let dirty = qcow2_dirty_bit(&crashed);
    if dirty {
        // Dirty (lazy refcounts): a writable open repairs the refcounts, as QEMU's does.
        assert!(
            opts.lazy_refcounts,
            "seed {seed}: dirty without lazy refcounts"
        );
        drop(open(&path, false));
    }
    let (code, text) = qemu_check(&path);
    assert!(
        code == 0 || code == 3,
        "seed {seed}: qemu-img check found corruption after a crash:\n{text}"
    );
    let after = our_raw(&*open(&path, true));
    for i in 0..SIZE as usize {
        if !touched[i] && after[i] != flushed[i] {
            panic!(
                "seed {seed}: flushed byte {i} lost: {} != {}",
                after[i], flushed[i]
            );
        }
    }
    dirty
}

#[test]
fn flushed_writes_survive_crashes_and_metadata_stays_consistent() {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        ..Default::default()
    };
    for seed in 0..40 {
        assert!(!crash_round(seed, &opts, None));
    }
}

#[test]
fn crashes_with_lazy_refcounts_are_repaired_on_open() {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        lazy_refcounts: true,
        ..Default::default()
    };
    let dirty = (200..230)
        .filter(|&seed| crash_round(seed, &opts, None))
        .count();
    assert!(
        dirty > 0,
        "no crash left a dirty image: the lazy path was not exercised"
    );
}

#[test]
fn crashes_with_a_backing_file_and_snapshot_sharing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"]);
    qemu_io(&base, &["write -P 0x5a 0 3M"]);
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    for seed in 100..115 {
        assert!(!crash_round(seed, &opts, Some(dir.path())));
    }
}

#[test]
fn crashes_with_extended_l2_entries() {
    // Subcluster bitmaps change in place, in allocated clusters: their L2 updates follow the
    // same ordering as new mappings.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"]);
    qemu_io(&base, &["write -P 0x5a 0 3M"]);
    for (seeds, backing) in [(200..215, true), (300..315, false)] {
        let opts = CreateOptions {
            size: SIZE,
            cluster_size: 16384,
            extended_l2: true,
            backing_file: backing.then(|| "base.qcow2".into()),
            backing_format: backing.then(|| "qcow2".into()),
            ..Default::default()
        };
        for seed in seeds {
            assert!(!crash_round(seed, &opts, backing.then_some(dir.path())));
        }
    }
}

#[test]
fn many_threads_on_one_image_match_the_model() {
    threads_match_the_model(4096, false);
}

#[test]
fn many_threads_on_subclusters_match_the_model() {
    // 512-byte subclusters: each 6 KiB write allocates some and fills partial ones.
    threads_match_the_model(16384, true);
}

/// Six threads write interleaved stripes into one image with clusters of `cluster_size`
/// bytes (extended L2 entries if `extended_l2`); the result must match the model.
fn threads_match_the_model(cluster_size: u64, extended_l2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.qcow2");
    qcow2::create(
        &path,
        &CreateOptions {
            size: SIZE * 4,
            cluster_size,
            extended_l2,
            ..Default::default()
        },
    )
    .unwrap();
    let img: Arc<dyn Image> = Arc::from(open(&path, false));
    let threads = 6u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                // Each thread owns interleaved 6 KiB stripes, so writes of different threads
                // share clusters (exercising the busy-cluster serialisation) but not bytes.
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut model = vec![0u8; (SIZE * 4) as usize];
                for i in 0..400 {
                    let stripe = rng.random_range(0..(SIZE * 4) / 6144 / threads);
                    let off = (stripe * threads + t) * 6144;
                    let data = pattern(6144, off, (t * 31 + i) as u8);
                    img.write_at(&data, off).unwrap();
                    model[off as usize..off as usize + 6144].copy_from_slice(&data);
                    let mut back = vec![0u8; 6144];
                    img.read_at(&mut back, off).unwrap();
                    assert_eq!(back, data, "thread {t} read back its own write");
                }
                model
            })
        })
        .collect();
    let mut expected = vec![0u8; (SIZE * 4) as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let m = h.join().unwrap();
        let t = t as u64;
        for stripe in 0..(SIZE * 4) / 6144 / threads {
            let off = ((stripe * threads + t) * 6144) as usize;
            expected[off..off + 6144].copy_from_slice(&m[off..off + 6144]);
        }
    }
    img.flush().unwrap();
    drop(img);
    assert_qemu_clean(&path);
    assert_same(&qemu_raw(&path), &expected, "after concurrent writes");
}

/// Runs `reqs` (offset, buffer) through `ring`, all in flight together; what the ring
/// declines runs synchronously (writes only after the ring drained, as callers must).
fn ring_batch(ring: &mut IoRing<usize>, img: &dyn Image, reqs: &mut [(u64, Vec<u8>)], write: bool) {
    let mut redo = Vec::new();
    for (k, (off, buf)) in reqs.iter_mut().enumerate() {
        let iovec = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the buffers stay in `reqs`, untouched, until `wait_all` below.
        match unsafe { ring.start(*off, write, &[iovec], k) } {
            Start::Queued | Start::Done(_) => {}
            Start::Declined(k) => redo.push(k),
        }
    }
    ring.submit().unwrap();
    let mut done = Vec::new();
    ring.wait_all(&mut done).unwrap();
    redo.extend(done.into_iter().filter(|c| !c.ok).map(|c| c.tag));
    for k in redo {
        let (off, buf) = &mut reqs[k];
        if write {
            img.write_at(buf, *off).unwrap();
        } else {
            img.read_at(buf, *off).unwrap();
        }
    }
}

#[test]
fn threads_with_io_rings_and_the_synchronous_path_match_the_model() {
    // Like the test above, but each thread keeps 16 requests in flight through its own
    // io_uring: in-place writes go through the ring, allocating ones through the engine,
    // in the same clusters as other threads' requests.
    rings_match_the_model(4096, false);
}

#[test]
fn threads_with_io_rings_on_subclusters_match_the_model() {
    // The ring also writes unallocated subclusters of COPIED clusters in place.
    rings_match_the_model(16384, true);
}

/// Four threads with an io_uring each write and read back interleaved stripes of an image
/// with clusters of `cluster_size` bytes (extended L2 entries if `extended_l2`).
fn rings_match_the_model(cluster_size: u64, extended_l2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rings.qcow2");
    let size = SIZE * 4;
    qcow2::create(
        &path,
        &CreateOptions {
            size,
            cluster_size,
            extended_l2,
            ..Default::default()
        },
    )
    .unwrap();
    let img: Arc<dyn Image> = Arc::from(open(&path, false));
    let threads = 4u64;
    let stripes = size / 6144 / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                let mut ring = IoRing::new(img.clone(), 16).unwrap();
                let mut model = vec![0u8; size as usize];
                for round in 0..40u64 {
                    let mut picked: Vec<u64> =
                        (0..16).map(|_| rng.random_range(0..stripes)).collect();
                    picked.sort_unstable();
                    picked.dedup();
                    let mut writes: Vec<(u64, Vec<u8>)> = picked
                        .iter()
                        .map(|s| {
                            let off = (s * threads + t) * 6144;
                            (off, pattern(6144, off, (t * 31 + round) as u8))
                        })
                        .collect();
                    ring_batch(&mut ring, &*img, &mut writes, true);
                    for (off, data) in &writes {
                        model[*off as usize..*off as usize + 6144].copy_from_slice(data);
                    }
                    let mut reads: Vec<(u64, Vec<u8>)> = writes
                        .iter()
                        .map(|(off, _)| (*off, vec![0u8; 6144]))
                        .collect();
                    ring_batch(&mut ring, &*img, &mut reads, false);
                    for ((off, data), (_, back)) in writes.iter().zip(&reads) {
                        assert!(back == data, "thread {t} read back its write at {off}");
                    }
                }
                model
            })
        })
        .collect();
    let mut expected = vec![0u8; size as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let m = h.join().unwrap();
        for stripe in 0..stripes {
            let off = ((stripe * threads + t as u64) * 6144) as usize;
            expected[off..off + 6144].copy_from_slice(&m[off..off + 6144]);
        }
    }
    img.flush().unwrap();
    drop(img);
    assert_qemu_clean(&path);
    assert_same(
        &qemu_raw(&path),
        &expected,
        "after concurrent ring and engine writes",
    );
}

/// Growing a clean image with lazy refcounts moves its L1 table to new clusters whose
/// refcounts are only cached. A crash at any flush of the resize must leave either the old
/// table in use or an image marked dirty (repaired on open): never a clean image whose L1
/// table has refcount 0.
#[test]
fn a_crash_while_growing_a_lazy_refcount_image_leaves_it_repairable() {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        lazy_refcounts: true,
        ..Default::default()
    };
    let (mut dirty, mut crashes) = (0, 0);
    for seed in 0..24u64 {
        let storage = Arc::new(CrashStorage::default());
        qcow2::create::write_skeleton(&*storage, &opts).unwrap();
        let mut img = Qcow2::open_storage(storage.clone(), &Default::default(), None).unwrap();
        storage.crash_at_flush(1 + seed as usize % 6, seed);
        // Fails once the storage has "crashed"; what matters is what reached the disk.
        let resized = img.resize(64 * SIZE, qcow2::Preallocation::Off);
        assert!(
            resized.is_ok() || storage.has_crashed(),
            "seed {seed}: {resized:?}"
        );
        crashes += usize::from(storage.has_crashed());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let crashed = storage.crash_image(&mut rng);
        std::mem::forget(img);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crashed.qcow2");
        std::fs::write(&path, &crashed).unwrap();
        if qcow2_dirty_bit(&crashed) {
            dirty += 1;
            drop(open(&path, false));
        }
        let (code, text) = qemu_check(&path);
        assert!(
            code == 0 || code == 3,
            "seed {seed}: qemu-img check found corruption after a crash:\n{text}"
        );
        let size = u64::from_be_bytes(crashed[24..32].try_into().unwrap());
        assert!(
            size == SIZE || size == 64 * SIZE,
            "seed {seed}: size {size}"
        );
    }
    assert!(dirty > 0, "no crash left a dirty image");
    assert!(crashes > 0, "no seed crashed during the resize");
}

#[test]
fn o_direct_read_modify_writes_keep_what_other_threads_appended() {
    // Under O_DIRECT, compressed clusters are written by read-modify-write of their blocks,
    // which restores the file length afterwards; meanwhile another thread appends clusters.
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.qcow2");
    let p = path.to_str().unwrap();
    qemu_img_create_qcow2(p, &["-o", "cluster_size=4096"], "16M");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let storage = Arc::new(qcow2::FileStorage::new(file));
    let img = Arc::new(Qcow2::open_storage(storage, &Default::default(), None).unwrap());
    assert!(img.data_storage().is_direct());
    let (cs, n) = (4096usize, 1000usize);
    let noise = |seed: u64, len: usize| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        v.resize(cs, 0);
        v
    };
    let barrier = Arc::new(std::sync::Barrier::new(2));
    std::thread::scope(|s| {
        let (img, barrier) = (&img, &barrier);
        s.spawn(move || {
            barrier.wait();
            for k in 0..n {
                let data = noise(k as u64, 700);
                img.write_compressed(&data, (k * cs) as u64).unwrap();
            }
        });
        s.spawn(move || {
            barrier.wait();
            for k in n..2 * n {
                img.write_at(&noise(k as u64, cs), (k * cs) as u64).unwrap();
            }
        });
    });
    drop(Arc::into_inner(img).expect("threads done"));
    assert_qemu_clean(&path);
    let mut model = vec![0u8; 16 << 20];
    for k in 0..2 * n {
        let len = if k < n { 700 } else { cs };
        model[k * cs..(k + 1) * cs].copy_from_slice(&noise(k as u64, len));
    }
    assert_same(&qemu_raw(&path), &model, "compressed and appended clusters");
}

#[test]
fn a_crash_never_keeps_an_l1_entry_without_its_new_l2_table() {
    // Guest data flushed long ago sits behind an L2 table shared with a snapshot; a write
    // copies the table and points the L1 at the copy. A crash at any flush of that, keeping
    // only the L1 table's write of those in flight, must still find the data.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.qcow2");
    let p = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]);
    qemu_io(&path, &["write -P 0x5a 0 1M"]);
    qemu_img(&["snapshot", "-c", "snap", p]);
    let original = std::fs::read(&path).unwrap();
    let mut crashes = 0;
    let mut ran_out_of_flushes = false;
    for n in 1..=6 {
        let storage = Arc::new(CrashStorage::default());
        qcow2::Storage::write_at(&*storage, &original, 0).unwrap();
        qcow2::Storage::flush(&*storage).unwrap();
        let img = Qcow2::open_storage(storage.clone(), &Default::default(), None).unwrap();
        storage.crash_at_flush_keeping(n, &[img.header().l1_table_offset]);
        img.write_at(&[0x77; 512], 100 * 65536).unwrap();
        img.flush().unwrap();
        drop(img);
        if !storage.has_crashed() {
            ran_out_of_flushes = true;
            break;
        }
        crashes += 1;
        let crashed = dir.path().join(format!("crashed{n}.qcow2"));
        std::fs::write(&crashed, storage.crash_image(&mut rand::rng())).unwrap();
        let (code, text) = qemu_check(&crashed);
        assert!(code == 0 || code == 3, "crash at flush {n}: {text}");
        qemu_io(&crashed, &["read -P 0x5a 0 1M"]);
    }
    // Every flush of the copy was crashed at: the write and its flush has some, and fewer
    // than the loop tries.
    assert!(
        crashes > 0,
        "the write and flush never flushed: nothing was tested"
    );
    assert!(
        ran_out_of_flushes,
        "the write and flush has more than {crashes} flushes: crash at the later ones too"
    );
}

/// Shrinking unmaps the clusters past the new end, then records the new size: a crash at any
/// flush of the shrink leaves the old size, or the new one with nothing mapped past it (the
/// header went first before, and growing the image back showed the old data again).
#[test]
fn a_crash_while_shrinking_never_leaves_the_new_size_over_old_data() {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        ..Default::default()
    };
    let half = SIZE / 2;
    let mut new_size_seen = 0;
    for n in 1..12usize {
        let storage = Arc::new(CrashStorage::default());
        qcow2::create::write_skeleton(&*storage, &opts).unwrap();
        let mut img = Qcow2::open_storage(storage.clone(), &Default::default(), None).unwrap();
        img.write_at(&vec![0x77; SIZE as usize], 0).unwrap();
        img.flush().unwrap();
        storage.crash_at_flush(n, n as u64);
        let shrunk = img.resize(half, qcow2::Preallocation::Off);
        assert!(
            shrunk.is_ok() || storage.has_crashed(),
            "flush {n}: {shrunk:?}"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        let crashed = storage.crash_image(&mut rng);
        std::mem::forget(img);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crashed.qcow2");
        std::fs::write(&path, &crashed).unwrap();
        let size = u64::from_be_bytes(crashed[24..32].try_into().unwrap());
        assert!(size == SIZE || size == half, "flush {n}: size {size}");
        if size == half {
            new_size_seen += 1;
            let p = path.to_str().unwrap();
            qemu_img(&["resize", p, &SIZE.to_string()]);
            qemu_io(&path, &[&format!("read -P 0 {half} {half}")]);
        }
        let (code, text) = qemu_check(&path);
        assert!(code == 0 || code == 3, "flush {n}:\n{text}");
    }
    assert!(new_size_seen > 0, "no crash came after the new size");
}
