//! A small file system to fill up: full-disk tests put images on it.

use std::path::{Path, PathBuf};

use crate::run_ok;

/// A tmpfs of a fixed size mounted on a fresh temporary directory, unmounted on drop.
///
/// Mounting needs root (CI runs as root); without it the test fails, it does not skip.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `bytes` bytes.
    pub fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::tempdir().expect("temporary directory");
        let size = format!("size={bytes}");
        let at = dir.path().to_str().expect("utf-8 path");
        run_ok("mount", &["-t", "tmpfs", "-o", &size, "tmpfs", at]);
        SmallFs { dir }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file of `bytes` bytes on the file system, to be removed when space is wanted back.
    pub fn fill(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, vec![0x5a; bytes]).expect("write filler file");
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a process that still holds a file there does not keep the mount.
        let at = self.dir.path().to_str().unwrap_or_default();
        let _ = std::process::Command::new("umount")
            .args(["-l", at])
            .status();
    }
}
