//! QEMU's image locking, so that QEMU, qemu-img, qemu-storage-daemon and Cowbird keep out of
//! each other's way: a user of an image file holds a shared byte-range lock (an open file
//! description lock) on byte 100 + i for each permission i it takes, and on byte 200 + i for
//! each permission it refuses to share; it may open the file only if nobody else holds the
//! opposite byte of any of them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::image::Format;

/// First byte of the "permission taken" locks.
const PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" locks.
const SHARED_BASE: i64 = 200;

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reads see a consistent image.
    pub const CONSISTENT_READ: Perms = Perms(1);
    /// Writes.
    pub const WRITE: Perms = Perms(2);
    /// Writes that do not change what the image reads as.
    pub const WRITE_UNCHANGED: Perms = Perms(4);
    /// Changes of the file's length.
    pub const RESIZE: Perms = Perms(8);
    /// QEMU's names, by bit.
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Both sets.
    pub const fn with(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Bit numbers and names of the permissions in the set.
    fn each(self) -> impl Iterator<Item = (i64, &'static str)> {
        (0..4)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| (i64::from(i), Self::NAMES[i as usize]))
    }
}

/// How an image's files are locked (QEMU's `locking` option and qemu-img's `-U`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// No locks: for callers that share images on purpose (tests, a crash harness).
    #[default]
    Off,
    /// As QEMU opens an image: take what the access needs, and keep writers and resizers out
    /// of a qcow2 file, whose metadata a reader relies on.
    On,
    /// [`Locking::On`], and keep writers out of raw files too (qemu-img convert's sources).
    Consistent,
    /// qemu-img's `-U` (force share), read-only: keep nobody out.
    ForceShare,
    /// As a QEMU guest device opens its disk (`share-rw=off`): [`Locking::On`], and keep
    /// other writers out of raw files too (resizers may stay: the device follows a resize).
    Device,
}

impl Locking {
    /// What a user opening a `format` file (`writable` or not) takes and refuses to share;
    /// `None` without locking.
    pub fn perms(self, format: Format, writable: bool) -> Option<(Perms, Perms)> {
        let take = match (writable, format) {
            (false, _) => Perms::CONSISTENT_READ,
            (true, Format::Raw) => Perms::CONSISTENT_READ.with(Perms::WRITE),
            (true, Format::Qcow2) => Perms::CONSISTENT_READ
                .with(Perms::WRITE)
                .with(Perms::RESIZE),
        };
        let no_writers = Perms::WRITE.with(Perms::RESIZE);
        match (self, format) {
            (Locking::Off, _) => None,
            (Locking::ForceShare, _) => Some((Perms::CONSISTENT_READ, Perms::NONE)),
            (Locking::On, Format::Raw) => Some((take, Perms::NONE)),
            (Locking::Device, Format::Raw) => Some((take, Perms::WRITE)),
            (Locking::On | Locking::Consistent | Locking::Device, _) => Some((take, no_writers)),
        }
    }
}

/// Locks `file` (named `path` in errors) for a user opening it as a `format` image, `writable`
/// or not, with `locking`.
pub fn lock_image_file(
    file: &File,
    path: &Path,
    locking: Locking,
    format: Format,
    writable: bool,
) -> Result<()> {
    match locking.perms(format, writable) {
        Some((take, unshare)) => acquire(file, path, take, unshare),
        None => Ok(()),
    }
}

/// Takes the locks of a user that holds `take` and shares everything but `unshare` on `file`
/// (named `path` in errors), then checks that nobody else conflicts. The locks last as long
/// as `file`'s open file description: another open of the same file, in this process too,
/// is another user.
pub fn acquire(file: &File, path: &Path, take: Perms, unshare: Perms) -> Result<()> {
    let io = |e| Error::io(format!("Could not lock '{}'", path.display()), e);
    for (bit, _) in take.each() {
        set_read_lock(file, PERM_BASE + bit).map_err(io)?;
    }
    for (bit, _) in unshare.each() {
        set_read_lock(file, SHARED_BASE + bit).map_err(io)?;
    }
    let locked = |message: String| Error::Locked {
        path: path.to_path_buf(),
        message,
    };
    for (bit, name) in take.each() {
        if held_by_another(file, SHARED_BASE + bit).map_err(io)? {
            return Err(locked(format!("Failed to get \"{name}\" lock")));
        }
    }
    for (bit, name) in unshare.each() {
        if held_by_another(file, PERM_BASE + bit).map_err(io)? {
            return Err(locked(format!("Failed to get shared \"{name}\" lock")));
        }
    }
    Ok(())
}

/// A `struct flock` for one byte.
fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; zero is a valid value of every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on `byte` for `file`'s open file description.
fn set_read_lock(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the `flock` we pass, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte` (one an exclusive lock there
/// would conflict with).
fn held_by_another(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK fills the `flock` we pass, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    /// The bytes QEMU 10's qemu-io holds (read from /proc/locks): rw qcow2 takes 100, 101,
    /// 103 and unshares 201, 203; a read-only qcow2 user 100, 201, 203; rw raw 100, 101.
    #[test]
    fn perms_are_qemus() {
        let on = Locking::On;
        let rw = on.perms(Format::Qcow2, true).unwrap();
        assert_eq!((rw.0 .0, rw.1 .0), (0b1011, 0b1010));
        let ro = on.perms(Format::Qcow2, false).unwrap();
        assert_eq!((ro.0 .0, ro.1 .0), (0b0001, 0b1010));
        let raw = on.perms(Format::Raw, true).unwrap();
        assert_eq!((raw.0 .0, raw.1 .0), (0b0011, 0));
        // A guest device on a raw file (QEMU's virtio-blk): 100, 101 and unshares 201.
        let device = Locking::Device.perms(Format::Raw, true).unwrap();
        assert_eq!((device.0 .0, device.1 .0), (0b0011, 0b0010));
        assert_eq!(Locking::Off.perms(Format::Qcow2, true), None);
    }

    #[test]
    fn a_writer_and_a_reader_of_a_qcow2_file_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        File::create(&path).unwrap();
        let (take, unshare) = Locking::On.perms(Format::Qcow2, true).unwrap();
        let writer = open(&path);
        acquire(&writer, &path, take, unshare).unwrap();
        let (take_ro, unshare_ro) = Locking::On.perms(Format::Qcow2, false).unwrap();
        let reader = open(&path);
        let e = acquire(&reader, &path, take_ro, unshare_ro).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                path.display()
            )
        );
        // -U readers keep nobody out and are not kept out.
        let (take_u, unshare_u) = Locking::ForceShare.perms(Format::Qcow2, false).unwrap();
        acquire(&open(&path), &path, take_u, unshare_u).unwrap();
        // Once the writer is gone, a reader gets in, and then keeps a writer out.
        drop(writer);
        drop(reader);
        let reader = open(&path);
        acquire(&reader, &path, take_ro, unshare_ro).unwrap();
        let e = acquire(&open(&path), &path, take, unshare).unwrap_err();
        assert!(
            e.to_string().starts_with("Failed to get \"write\" lock"),
            "{e}"
        );
    }

    #[test]
    fn raw_files_are_shared_by_writers_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        File::create(&path).unwrap();
        let (take, unshare) = Locking::On.perms(Format::Raw, true).unwrap();
        let one = open(&path);
        acquire(&one, &path, take, unshare).unwrap();
        acquire(&open(&path), &path, take, unshare).unwrap();
        let (take_c, unshare_c) = Locking::Consistent.perms(Format::Raw, false).unwrap();
        let e = acquire(&open(&path), &path, take_c, unshare_c).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Failed to get shared \"write\" lock"),
            "{e}"
        );
    }
}
