//! Attributes of a new image file, as QEMU's file driver sets them when it creates one
//! (`nocow`, `extent_size_hint`), for raw and qcow2 images alike.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// QEMU's default extent size hint for new files.
const DEFAULT_EXTENT_SIZE_HINT: u64 = 1 << 20;

/// What a new image file gets before anything is written into it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileAttributes {
    /// Turn copy-on-write off (btrfs; other file systems ignore it).
    pub nocow: bool,
    /// The extent size hint asked for (XFS); `None`: QEMU's 1 MiB; 0: none.
    pub extent_size_hint: Option<u64>,
}

impl FileAttributes {
    /// Refuses a hint the file system interface cannot carry, in QEMU's words.
    pub fn validate(&self) -> Result<(), String> {
        match self.extent_size_hint {
            Some(hint) if hint > u64::from(u32::MAX) => Err("Extent size hint is too large".into()),
            _ => Ok(()),
        }
    }

    /// Sets the attributes on the new, empty `file`. Turning copy-on-write off cannot fail
    /// (QEMU ignores its failure); the error of an extent size hint that was asked for and
    /// could not be set is returned (QEMU warns and goes on).
    pub fn apply(&self, file: &File) -> Option<io::Error> {
        if self.nocow {
            set_nocow(file);
        }
        let hint = self.extent_size_hint.unwrap_or(DEFAULT_EXTENT_SIZE_HINT);
        match set_extent_size_hint(file, u32::try_from(hint).unwrap_or(u32::MAX)) {
            Err(e) if self.extent_size_hint.is_some() => Some(e),
            _ => None,
        }
    }
}

/// Turns copy-on-write off for `file` (btrfs), ignoring failure as QEMU does.
fn set_nocow(file: &File) {
    const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS read and write one long at the address
    // given, which points to `flags`; the descriptor is open.
    unsafe {
        if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0 {
            flags |= FS_NOCOW_FL;
            libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}

/// Linux's `struct fsxattr` (`FS_IOC_FSGETXATTR`, `FS_IOC_FSSETXATTR`).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// Sets the extent size hint of `file` (XFS; other file systems may ignore it).
fn set_extent_size_hint(file: &File, hint: u32) -> io::Result<()> {
    const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
    const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
    const FS_XFLAG_EXTSIZE: u32 = 0x800;
    let mut attr = FsXattr::default();
    // SAFETY: the ioctls read and write a `struct fsxattr`, which `FsXattr` lays out; the
    // descriptor is open.
    let r = unsafe {
        let fd = file.as_raw_fd();
        if libc::ioctl(fd, FS_IOC_FSGETXATTR as _, &mut attr) == 0 {
            attr.xflags |= FS_XFLAG_EXTSIZE;
            attr.extsize = hint;
            libc::ioctl(fd, FS_IOC_FSSETXATTR as _, &attr)
        } else {
            -1
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
