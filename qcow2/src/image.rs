//! The format-independent image interface that daemons and tools use.

use crate::error::Result;

/// The on-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain byte-for-byte disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// Allocation status of a run of guest bytes (what `qemu-img map` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes (at least one byte).
    pub len: u64,
    /// Allocated in this image (not read from a backing file).
    pub allocated: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in a host file.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the data in this image's data file, when it is stored plainly.
    pub host_offset: Option<u64>,
}

/// A disk image: raw or qcow2, with any backing chain, shared between threads.
pub trait Image: Send + Sync {
    /// The on-disk format.
    fn format(&self) -> Format;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether the image refuses writes.
    fn read_only(&self) -> bool;
    /// Reads guest bytes at `offset` (whole range must be inside the disk).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes guest bytes at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros; with `unmap`, its storage may be released.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Releases a range; afterwards it reads as zeros or as the backing file's data.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Status of the run starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;
    /// The backing image, if any.
    fn backing(&self) -> Option<&dyn Image> {
        None
    }
    /// The host file that [`BlockStatus::host_offset`]s point into (a raw image's file, a
    /// qcow2 image's data file), for callers that read plainly stored data from it directly.
    fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}
