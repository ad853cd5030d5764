//! A disk that loses writes at writeback, as a failing or thinly provisioned one does: ext4
//! (no journal, so that only data writeback fails) on a loop device whose backing file sits
//! on a small tmpfs. Once [`FailingDisk::fill`] has used up the tmpfs, writes into blocks the
//! file system had not written before succeed into the page cache and fail when written
//! back: the next `fdatasync` reports ENOSPC or EIO. Needs root, loop devices and
//! `mkfs.ext4` (e2fsprogs), as `.ci/run` provides.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::loop_device::LoopDevice;
use crate::run_ok;
use crate::small_fs::SmallFs;

/// The mounted file system; see the module docs. Unmounted and detached on drop.
pub struct FailingDisk {
    // Dropped in this order: the ext4 mount, the loop device, the tmpfs.
    mount: Mounted,
    _loop_device: LoopDevice,
    backing: SmallFs,
}

/// A mount point, unmounted on drop.
struct Mounted(tempfile::TempDir);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

impl FailingDisk {
    /// An 8 MiB tmpfs holding a 64 MiB ext4 file system, mounted.
    pub fn new() -> FailingDisk {
        let backing = SmallFs::mount(8 << 20);
        let disk = backing.path().join("disk");
        File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create the loop device's file");
        let loop_device = LoopDevice::attach(&disk);
        let device = loop_device.path().to_str().expect("utf-8 path");
        let mkfs = [
            "-q",
            "-O",
            "^has_journal",
            "-E",
            "nodiscard,lazy_itable_init=1",
        ];
        run_ok("mkfs.ext4", &[&mkfs[..], &[device]].concat());
        let dir = tempfile::tempdir().expect("temporary directory");
        run_ok("mount", &[device, dir.path().to_str().expect("utf-8 path")]);
        FailingDisk {
            mount: Mounted(dir),
            _loop_device: loop_device,
            backing,
        }
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        self.mount.0.path()
    }

    /// A path on the file system.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Uses up the tmpfs under the loop device, after syncing what was written so far: from
    /// now on, writes into blocks the file system has not written before are lost.
    pub fn fill(&self) {
        run_ok("sync", &[]);
        let mut filler =
            File::create(self.backing.path().join("filler")).expect("create the filler file");
        let chunk = vec![0u8; 64 << 10];
        while filler.write_all(&chunk).is_ok() {}
    }
}

impl Default for FailingDisk {
    fn default() -> Self {
        Self::new()
    }
}
