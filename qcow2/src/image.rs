//! The format-independent image interface that daemons and tools use.

use std::sync::Arc;

use crate::engine::busy::BusyGuard;
use crate::error::Result;
use crate::storage::Storage;

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

/// Something QEMU's qcow2 driver warns about while opening an image, which qemu-img prints
/// on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenWarning {
    /// The image (of this qcow2 version) has a bitmaps extension without its autoclear bit:
    /// a program without bitmap support wrote it, so the bitmaps are ignored (and their
    /// clusters may leak).
    InconsistentBitmaps {
        /// The image's qcow2 version.
        version: u32,
    },
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
    /// The files [`Image::flush`] ends by syncing (open as long as the image), for a caller
    /// that syncs them itself after [`Image::prepare_flush`], say through io_uring, without
    /// blocking its thread for the disk. `None`: this image cannot split its flush; call
    /// `flush`.
    fn sync_fds(&self) -> Option<Vec<std::os::unix::io::RawFd>> {
        None
    }
    /// Does what [`Image::flush`] does short of syncing the files [`Image::sync_fds`] lists.
    fn prepare_flush(&self) -> Result<()> {
        Ok(())
    }
    /// Records that a sync of the files [`Image::sync_fds`] lists failed: every later
    /// flush fails as well (the kernel reports lost writes only once).
    fn sync_failed(&self) {}
    /// Flushes and leaves the image as a clean close would (qcow2 with lazy refcounts: the
    /// refcounts written and the dirty bit cleared). Writes after it are still allowed.
    fn close(&self) -> Result<()> {
        self.flush()
    }
    /// Status of the run starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;
    /// The backing image, if any.
    fn backing(&self) -> Option<&dyn Image> {
        None
    }
    /// What QEMU's driver warns about while opening this image and its backing chain (top
    /// first).
    fn open_warnings(&self) -> Vec<OpenWarning> {
        self.backing().map_or_else(Vec::new, |b| b.open_warnings())
    }
    /// What the open repaired: a qcow2 image opened for writing while dirty (lazy refcounts
    /// after a crash) is checked and repaired first, as QEMU does; the report's messages are
    /// the ones QEMU prints then.
    fn dirty_repair(&self) -> Option<&crate::check::CheckReport> {
        None
    }
    /// The host file that [`BlockStatus::host_offset`]s point into (a raw image's file, a
    /// qcow2 image's data file), for callers that read plainly stored data from it directly.
    fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    /// Maps `len > 0` guest bytes at `offset` to host extents so the caller can do the I/O
    /// itself (io_uring, straight into guest memory), when that needs no copy: reads of data
    /// and zero clusters, writes in place, and writes that allocate clusters which read as
    /// zeros (mapped by [`Image::finish_io`] once the data is written). It never does I/O
    /// itself: when mapping needs metadata that is not cached, it says which bytes to read
    /// (then [`Image::install_metadata`] and map again). [`MapOutcome::Declined`] means "use
    /// [`Image::read_at`]/[`Image::write_at`]", which also report any error.
    fn map_io(&self, _offset: u64, _len: u64, _write: bool) -> MapOutcome {
        MapOutcome::Declined
    }
    /// Hands back a mapping after its I/O: `ok` if every byte moved. A write that allocated
    /// clusters maps them now (after the data, as crash safety wants), or releases them when
    /// the I/O failed; then the clusters are free for other writers. Returns whether the
    /// request is complete: false when the I/O failed or its clusters could not be mapped,
    /// and the caller must redo it through [`Image::write_at`], which reports the error.
    fn finish_io(&self, _mapping: IoMapping, ok: bool) -> bool {
        ok
    }
    /// Takes metadata read as [`MapOutcome::Load`] asked. Bytes that no longer match the
    /// image's state (it changed meanwhile) or fail validation are ignored: mapping again then
    /// asks again, or declines.
    fn install_metadata(&self, _load: &MetadataLoad, _bytes: &[u8]) {}
}

/// What [`Image::map_io`] found.
pub enum MapOutcome {
    /// The range is mapped.
    Mapped(IoMapping),
    /// Metadata has to be read first.
    Load(MetadataLoad),
    /// Use [`Image::read_at`]/[`Image::write_at`].
    Declined,
}

/// Metadata to read before a range can be mapped: `len` bytes at `offset` of `storage`.
pub struct MetadataLoad {
    /// The file to read.
    pub storage: Arc<dyn Storage>,
    /// Where.
    pub offset: u64,
    /// How many bytes.
    pub len: usize,
    /// The image's metadata generation when the load was asked for.
    pub(crate) generation: u64,
}

/// A piece of a mapped guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes stored at offset `host` of the mapping's storage.
    Data {
        /// Offset in [`IoMapping::storage`].
        host: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes that read as zeros (reads only).
    Zero {
        /// Length in bytes.
        len: u64,
    },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } => len,
        }
    }

    /// Whether the extent is empty (never true for extents of a mapping).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a guest range lives, from [`Image::map_io`]. A write mapping keeps the guest
/// clusters reserved against allocating writes and discards until it is handed back with
/// [`Image::finish_io`] (or dropped), so keep it until the I/O completed.
pub struct IoMapping {
    /// The file the [`Extent::Data`] offsets refer to.
    pub storage: Arc<dyn Storage>,
    /// The pieces in guest order; their lengths add up to the mapped length.
    pub extents: Vec<Extent>,
    /// Host ranges to zero before the data is written: new clusters the write covers only
    /// partly, whose other bytes must read as zeros.
    pub zero_first: Vec<(u64, u64)>,
    /// Guest clusters that get a new host cluster once the data is written.
    pub(crate) allocated: Vec<Allocated>,
    /// Subclusters of COPIED clusters (extended L2 entries) written in place that become
    /// allocated once the data is written: (guest cluster, their allocation bits).
    pub(crate) subclusters: Vec<(u64, u64)>,
    _busy: Option<BusyGuard>,
}

/// A guest cluster a write mapping allocated: its entry at mapping time and its new cluster.
pub(crate) struct Allocated {
    pub cluster: u64,
    pub old: crate::format::tables::L2Entry,
    pub host: u64,
}

impl IoMapping {
    /// A mapping of `extents` in `storage`, holding `busy` until dropped.
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        extents: Vec<Extent>,
        busy: Option<BusyGuard>,
    ) -> Self {
        IoMapping {
            storage,
            extents,
            zero_first: Vec::new(),
            allocated: Vec::new(),
            subclusters: Vec::new(),
            _busy: busy,
        }
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange { offset, len, size }),
    }
}
