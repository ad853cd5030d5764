//! Lost writes are reported to every flush that covers them, on a disk that really loses
//! them ([`FailingDisk`]).

use std::fs::File;
use std::sync::Arc;

use cowbird_tests::failing_disk::FailingDisk;
use qcow2::uring::{Completion, IoRing, Start};
use qcow2::{open_image, Format, Image, OpenOptions};

/// Waits for the request `start` reported on; whether it succeeded.
fn outcome(ring: &mut IoRing<u32>, start: Start<u32>) -> bool {
    match start {
        Start::Done(_) => true,
        Start::Declined(_) => false,
        Start::Queued => {
            let mut done: Vec<Completion<u32>> = Vec::new();
            ring.wait_all(&mut done).unwrap();
            assert_eq!(done.len(), 1);
            done[0].ok
        }
    }
}

/// Two queues' rings flush at once after a write the disk lost: both flushes fail. With one
/// file description shared by the rings, the kernel told only the first sync, and the
/// other flush succeeded over the lost write.
#[test]
fn a_lost_write_fails_the_flushes_of_every_ring() {
    let disk = FailingDisk::new();
    let image_path = disk.join("disk.raw");
    File::create(&image_path).unwrap().set_len(4 << 20).unwrap();
    disk.fill();
    let opts = OpenOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let image: Arc<dyn Image> = Arc::from(open_image(&image_path, &opts).unwrap());
    let mut first = IoRing::<u32>::new(image.clone(), 8).unwrap();
    let mut second = IoRing::<u32>::new(image.clone(), 8).unwrap();

    let mut data = vec![0x5au8; 256 << 10];
    let iovec = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `data` outlives the request, which `outcome` waits for.
    let write = unsafe { first.start(0, true, &[iovec], 1) };
    assert!(
        outcome(&mut first, write),
        "the write reaches the page cache"
    );

    let (flush_first, flush_second) = (first.start_flush(2), second.start_flush(3));
    assert!(matches!(flush_first, Start::Queued));
    assert!(matches!(flush_second, Start::Queued));
    first.submit().unwrap();
    second.submit().unwrap();
    let (first_ok, second_ok) = (
        outcome(&mut first, flush_first),
        outcome(&mut second, flush_second),
    );
    assert!(
        !first_ok && !second_ok,
        "flush results: first ring {first_ok}, second ring {second_ok}"
    );

    // Every later flush fails as well, on the rings and the slow path.
    let again = second.start_flush(4);
    assert!(!outcome(&mut second, again));
    let err = image.flush().unwrap_err().to_string();
    assert!(err.contains("sync"), "{err}");
}
