//! Loop devices over files, for tests of host block devices (needs root).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached when dropped.
pub struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches a free loop device to `file`.
    pub fn attach(file: &Path) -> LoopDevice {
        Self::attach_with_sector_size(file, 512)
    }

    /// Attaches a free loop device with logical blocks of `sector_size` bytes to `file`.
    pub fn attach_with_sector_size(file: &Path, sector_size: u32) -> LoopDevice {
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup (needs root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }

    /// The device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
