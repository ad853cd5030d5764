//! The crate's error type: every variant names the object (descriptor, sector, file) it is about.

use std::path::PathBuf;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// Everything that can go wrong parsing a guest request, executing it, or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A descriptor's buffer is not (entirely) inside guest memory.
    #[error("descriptor {index} at guest address {addr:#x} ({len} bytes) is outside guest memory")]
    OutOfGuestMemory {
        /// Position of the descriptor in its chain.
        index: usize,
        /// Guest physical address of the buffer.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The available ring named a chain without a single readable descriptor.
    #[error("descriptor chain {head} is empty or its first descriptor is unreadable")]
    EmptyChain {
        /// Head descriptor index.
        head: u16,
    },
    /// The chain loops, is longer than the queue, or names a descriptor that cannot be read.
    #[error("descriptor chain {head} is broken (loop, too long, or bad next index)")]
    BrokenChain {
        /// Head descriptor index.
        head: u16,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable descriptor")]
    ReadableAfterWritable {
        /// Position of the descriptor in its chain.
        index: usize,
    },
    /// The chain has no device-writable byte for the status.
    #[error("descriptor chain {head} has no device-writable status byte")]
    NoStatus {
        /// Head descriptor index.
        head: u16,
    },
    /// Fewer device-readable bytes than a request header.
    #[error("request header needs 16 device-readable bytes, the chain has {len}")]
    ShortHeader {
        /// Device-readable bytes in the chain.
        len: u64,
    },
    /// Data buffers in the wrong direction for the request type.
    #[error("request type {request_type} has {len} data bytes in the wrong direction")]
    WrongDirection {
        /// The request type.
        request_type: u32,
        /// Bytes that should not be there.
        len: u64,
    },
    /// A request type we do not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// A read or write whose length is not a whole number of sectors.
    #[error("data length {len} at sector {sector} is not a multiple of 512")]
    UnalignedLength {
        /// First sector of the request.
        sector: u64,
        /// Data length in bytes.
        len: u64,
    },
    /// A request that reaches past the end of the disk.
    #[error("request at sector {sector} ({sectors} sectors) is past the end of the {capacity}-sector disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("request type {0} writes to a read-only disk")]
    ReadOnly(u32),
    /// A discard or write-zeroes payload that is not a whole number of 16-byte segments.
    #[error("discard/write-zeroes payload of {len} bytes is not a non-empty multiple of 16")]
    BadSegmentPayload {
        /// Payload length in bytes.
        len: u64,
    },
    /// More discard or write-zeroes segments than the device advertises.
    #[error("{count} discard/write-zeroes segments, the device accepts at most {max}")]
    TooManySegments {
        /// Segments in the request.
        count: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// A discard or write-zeroes segment with flags the request type does not allow.
    #[error("discard/write-zeroes segment at sector {sector} has invalid flags {flags:#x}")]
    BadSegmentFlags {
        /// First sector of the segment.
        sector: u64,
        /// The flags field.
        flags: u32,
    },
    /// A discard or write-zeroes segment larger than the device advertises.
    #[error("discard/write-zeroes segment at sector {sector} has {sectors} sectors, at most {max} allowed")]
    SegmentTooLarge {
        /// First sector of the segment.
        sector: u64,
        /// Sectors in the segment.
        sectors: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// Reading or writing guest memory failed after validation (memory map changed).
    #[error("guest memory access at {addr:#x} failed: {source}")]
    GuestMemory {
        /// Guest address of the access.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A write that would change what format probing sees in a probed raw image.
    #[error("refusing to write an image format signature to sector 0 of a raw image whose format was probed")]
    ProbedFormatWrite,
    /// The image layer failed.
    #[error("image I/O at byte {offset} ({len} bytes) failed: {source}")]
    Image {
        /// Guest byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The image error.
        #[source]
        source: qcow2::Error,
    },
    /// Flushing the image failed.
    #[error("flushing the image failed: {0}")]
    Flush(#[source] qcow2::Error),
    /// Opening the image failed.
    #[error("cannot open image '{path}'{}: {source}", if *direct { " with O_DIRECT" } else { "" })]
    Open {
        /// Image path.
        path: PathBuf,
        /// Whether it was opened with O_DIRECT (which needs aligned buffers all the way down).
        direct: bool,
        /// The image error.
        #[source]
        source: qcow2::Error,
    },
    /// An invalid daemon option.
    #[error("{0}")]
    InvalidOption(String),
    /// The vhost-user socket cannot be used.
    #[error(transparent)]
    Socket(#[from] cowbird_daemon::socket::SocketError),
    /// Setting up signal handling failed.
    #[error(transparent)]
    Signal(#[from] cowbird_daemon::signals::SignalError),
    /// The vhost-user daemon machinery failed.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    /// The frontend's connection could not be relayed to the daemon.
    #[error("relaying the frontend's connection: {0}")]
    Relay(#[from] cowbird_daemon::relay::StartError),
    /// A virtqueue operation failed.
    #[error("virtqueue {queue}: {reason}")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What failed.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The virtio-blk status byte a request failing with this error completes with.
    pub fn status(&self) -> u8 {
        match self {
            Error::UnsupportedType(_)
            | Error::TooManySegments { .. }
            | Error::BadSegmentFlags { .. } => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}
