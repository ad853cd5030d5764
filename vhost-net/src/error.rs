//! The crate's error type: each variant names the value that was rejected and why.

use std::io;

/// Everything the vhost-net building blocks can reject or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A MAC address or interface name that cannot be used.
    #[error(transparent)]
    Net(#[from] cowbird_daemon::net::Error),
    /// A command-line value that should be a decimal number is not one.
    #[error("'{input}' is not a number: {reason}")]
    InvalidNumber {
        /// The text as given.
        input: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A virtqueue size that is zero, too large or not a power of two.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    InvalidQueueSize(u64),
    /// A number of queue pairs outside what the spec and the TAP driver allow.
    #[error("number of queue pairs {value} is outside 1..={max}")]
    InvalidQueuePairs {
        /// The rejected value.
        value: u64,
        /// The largest accepted value.
        max: u16,
    },
    /// An MTU outside 68..=65535.
    #[error("MTU {0} is outside 68..=65535")]
    InvalidMtu(u64),
    /// An address/prefix pair that does not parse or whose prefix is too long.
    #[error("invalid address '{input}': {reason}")]
    InvalidCidr {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `/dev/net/tun` cannot be opened (missing device node or the `tun` module not loaded).
    #[error(
        "cannot open {path}: {source} (is the tun module loaded and the device node present?)"
    )]
    TunUnavailable {
        /// The clone device path.
        path: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An existing network interface of that name cannot be used as our TAP.
    #[error("cannot attach to TAP device '{name}': {reason}")]
    TapConflict {
        /// The interface name.
        name: String,
        /// Why (wrong type, multi-queue mismatch, in use, ...).
        reason: String,
    },
    /// An operation on the TAP device failed.
    #[error("TAP device '{name}': {op} failed: {source}")]
    Tap {
        /// The interface name.
        name: String,
        /// What was being done (the ioctl).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
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
    /// The chain loops, is longer than the queue, or names a descriptor that cannot be read.
    #[error("descriptor chain {head} is broken (loop, too long, or bad next index)")]
    BrokenChain {
        /// Head descriptor index.
        head: u16,
    },
    /// A descriptor points the wrong way: device-writable on tx, device-readable on rx.
    #[error("descriptor {index} of chain {head} has the wrong direction for this queue")]
    WrongDirection {
        /// Head descriptor index.
        head: u16,
        /// Position of the descriptor in its chain.
        index: usize,
    },
    /// A chain shorter than the vnet header.
    #[error("descriptor chain {head} holds {len} bytes, less than the {hdr_len}-byte vnet header")]
    ChainTooShort {
        /// Head descriptor index.
        head: u16,
        /// Bytes in the chain (in the direction that matters).
        len: u64,
        /// The negotiated vnet header length.
        hdr_len: usize,
    },
    /// A tx chain longer than any frame the TAP accepts.
    #[error("tx chain {head} holds {len} bytes, more than the {max}-byte limit")]
    FrameTooLong {
        /// Head descriptor index.
        head: u16,
        /// Bytes in the chain.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A chain with more buffers than one readv/writev takes.
    #[error("descriptor chain {head} has more than {max} buffers")]
    TooManyBuffers {
        /// Head descriptor index.
        head: u16,
        /// The limit.
        max: usize,
    },
    /// The vhost-user socket cannot be bound, connected or accepted on.
    #[error(transparent)]
    Socket(#[from] cowbird_daemon::socket::SocketError),
    /// The vhost-user machinery failed (daemon creation, protocol error).
    #[error("vhost-user: {0}")]
    VhostUser(String),
    /// The frontend's connection could not be relayed to the daemon.
    #[error("relaying the frontend's connection: {0}")]
    Relay(#[from] cowbird_daemon::relay::StartError),
    /// Signal setup failed.
    #[error(transparent)]
    Signal(#[from] cowbird_daemon::signals::SignalError),
}

/// Shorthand for results carrying this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
