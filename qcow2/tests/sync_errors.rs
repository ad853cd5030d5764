//! Lost writes are reported to every flush that covers them, on a disk that really loses
//! them: ext4 on a loop device over a full tmpfs, where writeback of newly allocated blocks
//! fails (needs root, loop devices and `mkfs.ext4`, as `.ci/run` has).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use qcow2::uring::{Completion, IoRing, Start};
use qcow2::{open_image, Format, Image, OpenOptions};

/// Runs a command, panicking with its output if it fails; returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A mounted ext4 (no journal, so that only data writeback fails) on a loop device whose
/// backing file is on an 8 MiB tmpfs; [`FailingDisk::fill`] uses up the tmpfs, after which
/// writes to blocks the file system had not written before fail at writeback.
struct FailingDisk {
    dir: tempfile::TempDir,
    loop_device: String,
}

impl FailingDisk {
    fn new() -> FailingDisk {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["backing", "mnt"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let backing = dir.path().join("backing");
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=8m", "tmpfs", path(&backing)],
        );
        let disk = backing.join("disk");
        File::create(&disk).unwrap().set_len(64 << 20).unwrap();
        let loop_device = run("losetup", &["-f", "--show", path(&disk)]);
        let failing = FailingDisk { dir, loop_device };
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-O",
                "^has_journal",
                "-E",
                "nodiscard,lazy_itable_init=1",
                &failing.loop_device,
            ],
        );
        run("mount", &[&failing.loop_device, path(&failing.mount())]);
        failing
    }

    fn mount(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Uses up the tmpfs under the loop device (what is written so far is synced first).
    fn fill(&self) {
        run("sync", &[]);
        let mut filler = File::create(self.dir.path().join("backing/filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while filler.write_all(&chunk).is_ok() {}
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount()).status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
        let _ = Command::new("umount")
            .arg(self.dir.path().join("backing"))
            .status();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

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
    let image_path = disk.mount().join("disk.raw");
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
