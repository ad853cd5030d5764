//! O_DIRECT on a host file: the kernel wants the file offset, the length and the memory
//! address aligned. Aligned requests go straight through; others go through an aligned
//! bounce buffer, and unaligned writes become read-modify-write of the covering blocks.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::{RwLock, RwLockReadGuard};

use aligned_vec::{avec_rt, AVec, RuntimeAlign};

/// The alignment rules of a file opened with O_DIRECT.
#[derive(Debug)]
pub(super) struct DirectIo {
    mem_align: usize,
    offset_align: u64,
    /// Taken exclusively by a read-modify-write cycle, shared by everything else that writes
    /// or grows the file: two writes sharing a block (compressed clusters packed into one
    /// sector, say) must not undo each other, and the length a cycle restores must not cut
    /// off what was appended meanwhile.
    rmw: RwLock<()>,
}

impl DirectIo {
    /// The rules for `file` if it was opened with O_DIRECT; `device_block` is its logical
    /// block size if it is a block device.
    pub(super) fn detect(file: &File, device_block: Option<u64>) -> Option<DirectIo> {
        let fd = file.as_raw_fd();
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || flags & libc::O_DIRECT == 0 {
            return None;
        }
        // SAFETY: statx writes only into `stx`; the empty path with AT_EMPTY_PATH names `fd`.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        let known = r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0;
        // Without the kernel's answer: offsets aligned to the device's logical block, or to
        // sectors (what guests issue), and page-aligned memory (what our buffers have).
        let (mem, offset) = if known && stx.stx_dio_offset_align > 0 {
            (stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align)
        } else {
            (4096, device_block.map_or(512, |b| b as u32))
        };
        Some(DirectIo {
            mem_align: mem as usize,
            offset_align: u64::from(offset),
            rmw: RwLock::new(()),
        })
    }

    fn offset_aligned(&self, offset: u64, len: usize) -> bool {
        offset % self.offset_align == 0 && len as u64 % self.offset_align == 0
    }

    fn bounce(&self, len: usize) -> AVec<u8, RuntimeAlign> {
        avec_rt!([self.mem_align]| 0u8; len)
    }

    /// The aligned range covering `[offset, offset + len)`.
    fn covering(&self, offset: u64, len: usize) -> (u64, usize) {
        let start = offset - offset % self.offset_align;
        let end = (offset + len as u64).next_multiple_of(self.offset_align);
        (start, (end - start) as usize)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
    pub(super) fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.offset_aligned(offset, buf.len()) && buf.as_ptr() as usize % self.mem_align == 0 {
            return self.read_aligned(file, buf, offset);
        }
        let (start, len) = self.covering(offset, buf.len());
        let mut bounce = self.bounce(len);
        self.read_aligned(file, &mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// An aligned read; a short transfer means the end of the file.
    fn read_aligned(&self, file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match file.read_at(buf, offset) {
                Ok(0) => break,
                Ok(n) if n as u64 % self.offset_align != 0 => {
                    buf = &mut buf[n..];
                    break;
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.fill(0);
        Ok(())
    }

    /// Holds off read-modify-write cycles while the caller writes or resizes the file by
    /// other means than [`DirectIo::write`].
    pub(super) fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes all of `buf` at `offset`.
    pub(super) fn write(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.offset_aligned(offset, buf.len()) {
            let _shared = self.shared();
            if buf.as_ptr() as usize % self.mem_align == 0 {
                return file.write_all_at(buf, offset);
            }
            let mut bounce = self.bounce(buf.len());
            bounce.copy_from_slice(buf);
            return file.write_all_at(&bounce, offset);
        }
        let _rmw = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        // A block device has no length to restore (its st_size is 0).
        let meta = file.metadata()?;
        let old_len = (!meta.file_type().is_block_device()).then_some(meta.len());
        let (start, len) = self.covering(offset, buf.len());
        let mut bounce = self.bounce(len);
        self.read_aligned(file, &mut bounce, start)?;
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        file.write_all_at(&bounce, start)?;
        // Writing whole blocks may have grown the file past what was asked for.
        let end = offset + buf.len() as u64;
        match old_len {
            Some(old_len) if start + len as u64 > old_len.max(end) => {
                file.set_len(old_len.max(end))?
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn unaligned_requests_are_bounced_and_keep_the_file_length() {
        // Next to the sources: on a disk, which has O_DIRECT (a tmpfs /tmp may not).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x11u8; 10_000]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("O_DIRECT open");
        let dio = DirectIo::detect(&file, None).expect("opened with O_DIRECT");
        dio.write(&file, &[0x22; 100], 3).unwrap();
        dio.write(&file, &[0x33; 700], 9_500).unwrap();
        dio.write(&file, &vec![0x44; 4096], 4096).unwrap(); // aligned, unaligned memory maybe
        let mut buf = vec![0u8; 11_000];
        dio.read(&file, &mut buf[1..], 0).unwrap(); // misaligned memory and length
        let got = &buf[1..];
        assert!(got[..3].iter().all(|&b| b == 0x11));
        assert!(got[3..103].iter().all(|&b| b == 0x22));
        assert!(got[103..4096].iter().all(|&b| b == 0x11));
        assert!(got[4096..8192].iter().all(|&b| b == 0x44));
        assert!(got[8192..9_500].iter().all(|&b| b == 0x11));
        assert!(got[9_500..10_200].iter().all(|&b| b == 0x33));
        assert!(
            got[10_200..].iter().all(|&b| b == 0),
            "past the end reads zeros"
        );
        assert_eq!(file.metadata().unwrap().len(), 10_200);
        assert!(DirectIo::detect(&std::fs::File::open(&path).unwrap(), None).is_none());
    }
}
