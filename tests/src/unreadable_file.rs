//! A file with bytes that cannot be read, as on failing media: reads that touch the bad
//! range fail with EIO, reads elsewhere return the data. It is the one file of a read-only
//! FUSE file system served by this process (needs root and `/dev/fuse`, which
//! `scripts/install-deps.sh` makes sure of), so the failure reaches the reader through the
//! page cache and memory maps as a real disk error does.

use std::ffi::OsStr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData,
    ReplyEntry, Request,
};

/// The file's name in the mounted directory.
const NAME: &str = "disk.img";
/// Inode numbers: FUSE's root directory and the file.
const ROOT: u64 = 1;
const FILE: u64 = 2;
/// How long the kernel may cache the attributes.
const TTL: Duration = Duration::from_secs(60);

/// The mounted file; unmounted on drop.
pub struct UnreadableFile {
    // Dropped in this order: the mount, then its directory.
    _session: BackgroundSession,
    dir: tempfile::TempDir,
}

impl UnreadableFile {
    /// Serves `data` as a file whose bytes in `bad` fail to read.
    pub fn new(data: Vec<u8>, bad: Range<u64>) -> UnreadableFile {
        let dir = tempfile::tempdir().expect("temporary directory");
        let options = [
            MountOption::RO,
            MountOption::FSName("cowbird-unreadable".into()),
        ];
        let fs = Served { data, bad };
        let session = fuser::spawn_mount2(fs, dir.path(), &options)
            .unwrap_or_else(|e| panic!("mount a FUSE file system (needs root and /dev/fuse): {e}"));
        UnreadableFile {
            _session: session,
            dir,
        }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join(NAME)
    }
}

/// The file system: its data and the range that fails.
struct Served {
    data: Vec<u8>,
    bad: Range<u64>,
}

impl Served {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size) = match ino {
            ROOT => (FileType::Directory, 0o555, 0),
            _ => (FileType::RegularFile, 0o444, self.data.len() as u64),
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl Filesystem for Served {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match parent == ROOT && name == NAME {
            true => reply.entry(&TTL, &self.attr(FILE), 0),
            false => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let len = self.data.len() as u64;
        let start = (offset as u64).min(len);
        let end = (start + u64::from(size)).min(len);
        match start < self.bad.end && self.bad.start < end {
            true => reply.error(libc::EIO),
            false => reply.data(&self.data[start as usize..end as usize]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fail_only_where_asked() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let file = UnreadableFile::new(data.clone(), 512 << 10..516 << 10);
        let f = std::fs::File::open(file.path()).unwrap();
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, data[8192..8192 + 4096]);
        let err = f.read_exact_at(&mut buf, 512 << 10).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        f.read_exact_at(&mut buf, 516 << 10).unwrap();
        assert_eq!(buf, data[516 << 10..(516 << 10) + 4096]);
    }
}
