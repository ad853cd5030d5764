//! The crate's error type: every variant names the object and, where it has one, the offset.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening, reading, writing or creating an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the host file, with what we were doing. The message includes the
    /// underlying error, so it is not also reported as the error's source (a chain printed
    /// whole would say it twice).
    #[error("{what}: {error}")]
    Io {
        /// What the failed operation was doing ("reading L2 table at 0x30000").
        what: String,
        /// The underlying error.
        error: io::Error,
    },
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image (bad magic 0x{0:08x})")]
    BadMagic(u32),
    /// A header field holds a value the format forbids or we cannot handle (QEMU's wording
    /// where QEMU refuses the same).
    #[error("{0}")]
    InvalidHeader(String),
    /// The repair of a dirty image (lazy refcounts after a crash) failed on a writable open;
    /// the image stays dirty (QEMU's words).
    #[error("Could not repair dirty image: {0}")]
    DirtyRepairFailed(String),
    /// A file in an image format QEMU knows and we do not serve (found by probing): read as
    /// raw, its container bytes would pass for the disk's contents.
    #[error("Image format '{0}' is not supported (only qcow2 and raw are)")]
    UnsupportedFormat(&'static str),
    /// A version other than 2 or 3.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// The image uses a feature we do not implement (named from the feature table if present).
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeature(String),
    /// Metadata that points somewhere impossible: past EOF, misaligned, overlapping.
    #[error("Image is corrupt: {0}")]
    Corrupt(String),
    /// An image whose corrupt bit is set, opened for writing (QEMU's wording: it opens such
    /// an image read-only, or for `check -r`, only).
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptBitSet,
    /// Corruption found in an image opened for writing: as QEMU does, the image is now
    /// marked corrupt (the header's corrupt bit) and takes no more writes until repaired.
    #[error("Image is corrupt: {0}; the image is now marked corrupt")]
    MarkedCorrupt(String),
    /// An L2 table or refcount block at an offset that is not cluster aligned: corruption
    /// that QEMU's driver makes fatal wherever it is met in an image open for writing (it
    /// becomes [`Error::MarkedCorrupt`] there); read-only, reported as [`Error::Corrupt`].
    #[error("Image is corrupt: {0}")]
    UnalignedTable(String),
    /// Corruption found in a backing file while reading through the image above it: it is
    /// the backing file's (the image above is not marked corrupt for it).
    #[error("Image is corrupt: {0}")]
    BackingCorrupt(String),
    /// A refcount that would drop below zero (metadata counting a cluster fewer times than
    /// it is used); QEMU's "Invalid argument".
    #[error("{0}")]
    RefcountUnderflow(String),
    /// A write refused because the image was marked corrupt earlier in this session.
    #[error("the image was marked corrupt; no more writes are accepted")]
    WritesStopped,
    /// A guest request that falls outside the virtual disk.
    #[error("request at offset {offset} length {len} is past the end of the {size}-byte image")]
    OutOfRange {
        /// Guest byte offset of the request.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// Guest data I/O on an image opened for its metadata only.
    #[error("the image was opened for its metadata only: guest data cannot be accessed")]
    MetadataOnly,
    /// A compressed cluster that does not decompress to a whole cluster.
    #[error("compressed cluster at host offset 0x{offset:x} is invalid: {reason}")]
    Decompress {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// What the decompressor said.
        reason: String,
    },
    /// Another user of the file holds a conflicting QEMU lock (see [`crate::lock`]).
    #[error("{message}\nIs another process using the image [{}]?", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
        /// QEMU's wording of the conflict ("Failed to get \"write\" lock").
        message: String,
    },
    /// An empty file name (QEMU's wording).
    #[error("The 'file' block driver requires a file name")]
    NoFileName,
    /// A directory where an image file was expected (QEMU's wording).
    #[error("'file' driver requires '{}' to be a regular file", .0.display())]
    NotAFile(PathBuf),
    /// A backing chain problem: missing file, loop, too deep.
    #[error("backing file {path}: {reason}")]
    Backing {
        /// The backing file name as resolved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot table cannot be used as it is: QEMU's words, with its hint on how
    /// `check -r all` repairs it.
    #[error("{0}")]
    SnapshotTable(String),
    /// No internal snapshot matches the one asked for (QEMU's wording).
    #[error("Can't find snapshot")]
    SnapshotNotFound,
    /// The table of the snapshot a view asked for cannot be used (QEMU's words from
    /// `qcow2_snapshot_load_tmp`).
    #[error("{0}")]
    SnapshotLoad(String),
    /// A snapshot view was asked for with write access; snapshots open read-only.
    #[error("a snapshot can only be opened read-only")]
    SnapshotWritable,
    /// A snapshot view of an image format without internal snapshots.
    #[error("{0} images have no internal snapshots")]
    NoSnapshots(&'static str),
    /// An operation the image's setup rules out, where QEMU fails with ENOTSUP (the
    /// message says which setup).
    #[error("Operation not supported: {0}")]
    NotSupported(String),
    /// A cluster would get more references than its refcount width holds (QEMU: ERANGE
    /// within a write, EINVAL when a snapshot is taken).
    #[error("the refcount of cluster {cluster} would overflow {bits} bits")]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// Refcount width.
        bits: u32,
    },
    /// Invalid create or resize options.
    #[error("{0}")]
    InvalidOption(String),
    /// A file that cannot take its new length (QEMU's words; an external data file that
    /// would grow past what the file system allows, say).
    #[error("Could not resize file: {0}")]
    ResizeFile(io::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error described as `what` instead; other errors unchanged.
    pub fn reworded(self, what: &str) -> Self {
        match self {
            Error::Io { error, .. } => Error::io(what, error),
            e => e,
        }
    }

    /// Wraps an I/O error with a description of the operation.
    pub fn io(what: impl Into<String>, error: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            error,
        }
    }
}
