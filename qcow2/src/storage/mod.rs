//! The storage trait the engine does its I/O through, and its file implementation.

use std::fs::File;
use std::io::{self, Seek};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::{AsRawFd, RawFd};

mod batch;
mod direct;
mod unopened;

pub use unopened::Unopened;

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, RwLockReadGuard};

use direct::DirectIo;
use io_uring::IoUring;

/// Entries of the ring that submits batched writes.
const BATCH_ENTRIES: u32 = 64;

/// Byte-addressed storage under an image: a host file, or a test double.
///
/// Implementations are shared between threads; every call is positional.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes every `(offset, bytes)` pair, in no particular order (metadata writeback).
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        writes
            .iter()
            .try_for_each(|(offset, bytes)| self.write_at(bytes, *offset))
    }
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range so it reads as zeros (punch hole); fails with
    /// [`io::ErrorKind::Unsupported`] where the storage cannot (the range is then unchanged).
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Allocates a range without writing it (fallocate); a no-op where unsupported.
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Makes a range read as zeros, growing the storage if needed. Unlike `punch_hole` this
    /// always takes effect; the default writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// The host file descriptor, for callers that do zero-copy I/O (io_uring) themselves.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether I/O bypasses the host page cache (O_DIRECT).
    fn is_direct(&self) -> bool {
        false
    }
    /// Records that a sync of this storage failed elsewhere (an io_uring fsync of its fd).
    /// The kernel may have dropped dirty data and says so only once, so every later
    /// [`Storage::flush`] fails too, as in QEMU.
    fn mark_sync_failed(&self) {}
    /// Fails once a sync of this storage has failed (see [`Storage::mark_sync_failed`]).
    fn check_sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The system's words for `errno`, without Rust's "(os error N)".
fn os_error_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.split_once(" (os error") {
        Some((words, _)) => words.to_string(),
        None => text,
    }
}

/// A host file accessed with pread/pwrite. Files opened with O_DIRECT work too: requests
/// that are not aligned as the kernel wants go through aligned bounce buffers.
pub struct FileStorage {
    file: File,
    direct: Option<DirectIo>,
    /// A block device's logical block size: it refuses fallocate ranges not aligned to it.
    device_block: Option<u64>,
    /// Submits batched writes (metadata writeback) in one system call; created on first use.
    batch_ring: Mutex<Option<IoUring>>,
    /// A sync failed: later ones must fail too (see [`Storage::mark_sync_failed`]). The
    /// failure's errno, -1 when not known, 0 while none failed.
    sync_error: AtomicI32,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage")
            .field("file", &self.file)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        let device_block = logical_block_size(&file);
        let direct = DirectIo::detect(&file, device_block);
        FileStorage {
            file,
            direct,
            device_block,
            batch_ring: Mutex::new(None),
            sync_error: AtomicI32::new(0),
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// `fallocate(mode)` over a range that must read as zeros afterwards. A block device
    /// takes only the part aligned to its logical block: the unaligned head and tail are
    /// written as zeros, as QEMU's block layer splits them.
    fn fallocate_blocks(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = match self.device_block {
            Some(block) => (
                offset.next_multiple_of(block),
                (offset + len) / block * block,
            ),
            None => (offset, offset + len),
        };
        if start >= end {
            return write_zeros(self, offset, len);
        }
        {
            let _shared = self.shared();
            fallocate(&self.file, mode, start, end - start)?;
        }
        write_zeros(self, offset, start - offset)?;
        write_zeros(self, end, offset + len - end)
    }

    /// Under O_DIRECT, holds off read-modify-write cycles while the file is resized or
    /// written to by other means than `write_at`.
    fn shared(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.direct.as_ref().map(DirectIo::shared)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            return direct.read(&self.file, buf, offset);
        }
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) => direct.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> io::Result<()> {
        if self.direct.is_some() || writes.len() < 2 {
            // O_DIRECT needs the aligned bounce path of `write_at`.
            return writes
                .iter()
                .try_for_each(|(offset, bytes)| self.write_at(bytes, *offset));
        }
        let mut ring = self.batch_ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.is_none() {
            *ring = Some(IoUring::new(BATCH_ENTRIES)?);
        }
        let ring = ring.as_mut().expect("just created");
        for chunk in writes.chunks(BATCH_ENTRIES as usize) {
            batch::write_all(ring, &self.file, chunk)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check_sync()?;
        self.file.sync_data().inspect_err(|e| {
            let errno = e.raw_os_error().unwrap_or(-1);
            let _ = self
                .sync_error
                .compare_exchange(0, errno, Ordering::SeqCst, Ordering::SeqCst);
        })
    }

    fn mark_sync_failed(&self) {
        let _ = self
            .sync_error
            .compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn check_sync(&self) -> io::Result<()> {
        let why = match self.sync_error.load(Ordering::SeqCst) {
            0 => return Ok(()),
            -1 => String::new(),
            errno => format!(" ({})", os_error_text(errno)),
        };
        Err(io::Error::other(format!(
            "an earlier sync of this file failed{why}: data written before it may be lost"
        )))
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_block_device() {
            // A block device's st_size is 0; its end is its size (as QEMU finds it).
            return (&self.file).seek(io::SeekFrom::End(0));
        }
        Ok(meta.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _shared = self.shared();
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate_blocks(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _shared = self.shared();
        match fallocate(&self.file, 0, offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate_blocks(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            // File systems without unwritten extents: write the zeros.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => write_zeros(self, offset, len),
            other => other,
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Storage in memory, for tests and fuzzing. It refuses to grow past [`MemStorage::LIMIT`]
/// (as a full disk would), so a corrupt image pointing far beyond its end cannot make the
/// process allocate without bound.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl MemStorage {
    /// Largest size the storage grows to.
    pub const LIMIT: usize = 256 << 20;

    /// Storage holding a copy of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        MemStorage {
            bytes: std::sync::Mutex::new(bytes.to_vec()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock();
        buf.fill(0);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(buf.len()).min(bytes.len());
        buf[..end - start].copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if end > Self::LIMIT {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        if end > bytes.len() {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len > Self::LIMIT {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        self.lock().resize(len, 0);
        Ok(())
    }
}

/// Writes `len` zero bytes at `offset`, a chunk at a time.
fn write_zeros<S: Storage + ?Sized>(storage: &S, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        storage.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// The logical block size of `file` if it is a block device (`BLKSSZGET`).
fn logical_block_size(file: &File) -> Option<u64> {
    if !file.metadata().ok()?.file_type().is_block_device() {
        return None;
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int into `size`; the fd is owned by `file`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    (r == 0 && size > 0).then_some(size as u64)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        // EOPNOTSUPP is `ErrorKind::Unsupported`.
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failed_sync_every_flush_fails() {
        let s = FileStorage::new(tempfile::tempfile().unwrap());
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.mark_sync_failed();
        s.write_at(&[2; 512], 0).unwrap();
        for _ in 0..2 {
            let e = s.flush().unwrap_err().to_string();
            assert!(e.contains("earlier sync of this file failed"), "{e}");
        }
    }

    #[test]
    fn reads_past_eof_as_zeros_and_punches_holes() {
        let f = tempfile::tempfile().unwrap();
        let s = FileStorage::new(f);
        s.write_at(&[7u8; 8192], 0).unwrap();
        let mut buf = [1u8; 16];
        s.read_at(&mut buf, 8190).unwrap();
        assert_eq!(&buf[..2], &[7, 7]);
        assert!(buf[2..].iter().all(|&b| b == 0));
        s.punch_hole(0, 4096).unwrap();
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert_eq!(s.len().unwrap(), 8192);
    }

    #[test]
    fn batched_writes_all_land() {
        let storage = FileStorage::new(tempfile::tempfile().unwrap());
        // More writes than the ring holds, scattered, of different sizes.
        let data: Vec<(u64, Vec<u8>)> = (0..150u64)
            .map(|k| ((k * 7919) % 150 * 8192, vec![k as u8 + 1; 512 + k as usize]))
            .collect();
        let writes: Vec<(u64, &[u8])> = data.iter().map(|(o, b)| (*o, &b[..])).collect();
        storage.write_batch(&writes).unwrap();
        for (offset, bytes) in &data {
            let mut back = vec![0u8; bytes.len()];
            storage.read_at(&mut back, *offset).unwrap();
            assert_eq!(&back, bytes, "at {offset}");
        }
    }

    #[test]
    fn zero_range_zeroes_and_grows() {
        let file = tempfile::tempfile().unwrap();
        let storage = FileStorage::new(file);
        storage.write_at(&[0xaa; 8192], 0).unwrap();
        storage.zero_range(1024, 2048).unwrap();
        storage.zero_range(16384, 4096).unwrap();
        let mut buf = vec![0u8; 8192];
        storage.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0xaa));
        assert!(buf[1024..3072].iter().all(|&b| b == 0));
        assert!(buf[3072..].iter().all(|&b| b == 0xaa));
        assert_eq!(storage.len().unwrap(), 20480);
    }
}
