//! Raw images: guest offset = file offset.

use std::io;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{check_range, BlockStatus, Extent, Format, Image, IoMapping, MapOutcome};
use crate::storage::Storage;

/// A raw disk image over any storage.
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: u64,
    /// Where the file's last partial sector starts, when the disk is its length rounded up
    /// to whole sectors ([`RawImage::in_sectors`]); the disk size otherwise.
    partial_from: u64,
    read_only: bool,
}

impl RawImage {
    /// Wraps storage whose current length is the disk size.
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<RawImage> {
        let size = storage
            .len()
            .map_err(|e| Error::io("getting the raw image size", e))?;
        Ok(RawImage {
            storage,
            size,
            partial_from: size,
            read_only,
        })
    }

    /// Wraps storage as a disk of whole 512-byte sectors, as QEMU serves a raw file: a
    /// length that is no multiple of 512 is rounded up, the bytes past the file's end read
    /// as zeros, and writes there extend the file. (A disk of the length rounded down would
    /// hide the file's last bytes from the guest.)
    pub fn in_sectors(storage: Arc<dyn Storage>, read_only: bool) -> Result<RawImage> {
        let mut image = RawImage::new(storage, read_only)?;
        image.partial_from = image.size / 512 * 512;
        image.size = image.size.next_multiple_of(512);
        Ok(image)
    }

    /// Reads `buf` at `offset` where the file may end inside it: the missing bytes are
    /// zeros.
    fn read_past_end(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let file_len = self.storage.len()?;
        let present = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if present > 0 {
            self.storage.read_at(&mut buf[..present], offset)?;
        }
        buf[present..].fill(0);
        Ok(())
    }

    /// The underlying storage (daemons use its fd for zero-copy I/O).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl Image for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let read = match offset + buf.len() as u64 > self.partial_from {
            true => self.read_past_end(buf, offset),
            false => self.storage.read_at(buf, offset),
        };
        read.map_err(|e| Error::io(format!("reading {} bytes at {offset}", buf.len()), e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing {} bytes at {offset}", buf.len()), e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable(offset, len)?;
        // A punched hole reads as zeros and frees the space, as the guest allowed; where
        // holes are unsupported (and without `unmap`) the range is zeroed in place.
        if unmap {
            match self.storage.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                Err(e) => return Err(Error::io(format!("unmapping {len} bytes at {offset}"), e)),
            }
        }
        self.storage
            .zero_range(offset, len)
            .map_err(|e| Error::io(format!("writing {len} zero bytes at {offset}"), e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable(offset, len)?;
        // Discarding is a hint: storage without holes keeps the data.
        match self.storage.punch_hole(offset, len) {
            Err(e) if e.kind() != io::ErrorKind::Unsupported => {
                Err(Error::io(format!("discarding {len} bytes at {offset}"), e))
            }
            _ => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("flushing raw image", e))
    }

    fn sync_fds(&self) -> Option<Vec<std::os::unix::io::RawFd>> {
        self.storage.raw_fd().map(|fd| vec![fd])
    }

    fn prepare_flush(&self) -> Result<()> {
        self.storage
            .check_sync()
            .map_err(|e| Error::io("flushing the image", e))
    }

    fn sync_failed(&self) {
        self.storage.mark_sync_failed();
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len.max(1), self.size)?;
        let (data, run) = match self.storage.raw_fd() {
            Some(fd) => seek_data_run(fd, offset, len),
            None => (true, len),
        };
        Ok(BlockStatus {
            len: run,
            allocated: true,
            zero: !data,
            data,
            compressed: false,
            host_offset: data.then_some(offset),
        })
    }

    fn map_io(&self, offset: u64, len: u64, write: bool) -> MapOutcome {
        // The last partial sector goes the slow way (a read there would come back short).
        let in_range = len > 0
            && check_range(offset, len, self.size).is_ok()
            && offset + len <= self.partial_from;
        if !in_range || (write && self.read_only) {
            return MapOutcome::Declined;
        }
        let extents = vec![Extent::Data { host: offset, len }];
        MapOutcome::Mapped(IoMapping::new(self.storage.clone(), extents, None))
    }

    fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.storage.raw_fd()
    }
}

/// Uses SEEK_DATA/SEEK_HOLE to find whether `offset` of file `fd` is data and how long the
/// run is (at most `len`); past the end of the file is a hole.
pub fn seek_data_run(fd: i32, offset: u64, len: u64) -> (bool, u64) {
    // SAFETY: lseek on a valid fd only moves the file position, which pread/pwrite ignore.
    let next_data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
    if next_data < 0 {
        // ENXIO: no data after offset, the rest is a hole; anything else: assume data.
        let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        return (!hole, len);
    }
    let next_data = next_data as u64;
    if next_data > offset {
        return (false, (next_data - offset).min(len));
    }
    // SAFETY: as above.
    let next_hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
    if next_hole < 0 {
        return (true, len);
    }
    (true, (next_hole as u64 - offset).clamp(1, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, MemStorage};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn raw_roundtrip_and_hole_status() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let img = RawImage::new(Arc::new(FileStorage::new(f)), false).unwrap();
        img.write_at(&[5u8; 4096], 65536).unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [5u8; 4096]);
        let st = img.block_status(0, 1 << 20).unwrap();
        assert!(st.zero && !st.data && st.len == 65536, "{st:?}");
        let st = img.block_status(65536, 1 << 20).unwrap_err();
        assert!(matches!(st, Error::OutOfRange { .. }));
        img.write_zeroes(65536, 4096, true).unwrap();
        img.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        let past_end = img.write_at(&[0u8; 2], (1 << 20) - 1).unwrap_err();
        assert!(matches!(past_end, Error::OutOfRange { .. }), "{past_end}");
    }

    /// Storage without holes (memory) reads zeros after a zero write, all of the range.
    #[test]
    fn zero_writes_zero_the_whole_range_where_holes_are_unsupported() {
        for unmap in [false, true] {
            let storage = MemStorage::default();
            storage.set_len(1 << 20).unwrap();
            let img = RawImage::new(Arc::new(storage), false).unwrap();
            // The range starts with zeros: every byte of it must be checked or zeroed.
            img.write_at(&[0xff; 60 << 10], 8192).unwrap();
            img.write_zeroes(4096, 64 << 10, unmap).unwrap();
            let mut buf = vec![1u8; 72 << 10];
            img.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "unmap: {unmap}");
        }
    }

    /// With `unmap` the zeroed range is freed; without it, it stays allocated (as in QEMU:
    /// a guest that did not allow unmapping may count on the space).
    #[test]
    fn zero_writes_free_space_only_when_unmapping_is_allowed() {
        for unmap in [false, true] {
            let f = tempfile::NamedTempFile::new().unwrap();
            f.as_file().set_len(1 << 20).unwrap();
            let storage = FileStorage::new(f.reopen().unwrap());
            let img = RawImage::new(Arc::new(storage), false).unwrap();
            img.write_at(&[0xff; 256 << 10], 0).unwrap();
            img.flush().unwrap();
            let before = f.as_file().metadata().unwrap().blocks();
            img.write_zeroes(0, 256 << 10, unmap).unwrap();
            img.flush().unwrap();
            let after = f.as_file().metadata().unwrap().blocks();
            let mut buf = vec![1u8; 256 << 10];
            img.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "unmap: {unmap}");
            if unmap {
                assert!(after + 256 <= before, "{before} -> {after} blocks");
            } else {
                assert_eq!(after, before, "unmap: {unmap}");
            }
        }
    }
}
