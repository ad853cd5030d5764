//! The crate's error type: each variant names the value that was rejected and why.

use std::io;
use std::path::PathBuf;

use crate::mac::MacAddress;

/// Everything the vhost-net building blocks can reject or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that is not six colon-separated pairs of hex digits.
    #[error("invalid MAC address '{input}': {reason}")]
    InvalidMac {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A well-formed MAC address that a NIC cannot use as its own address.
    #[error("MAC address {mac} cannot be a NIC's address: {reason}")]
    UnusableMac {
        /// The rejected address.
        mac: MacAddress,
        /// Why (multicast, all zeros).
        reason: &'static str,
    },
    /// Reading the host's random source failed.
    #[error("cannot read random bytes from {path}: {source}")]
    Random {
        /// The random source that failed.
        path: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
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
    /// A network interface name the kernel would refuse.
    #[error("invalid interface name '{name}': {reason}")]
    InvalidTapName {
        /// The name as given.
        name: String,
        /// What the kernel would object to.
        reason: &'static str,
    },
    /// A unix socket path that cannot be bound or connected.
    #[error("invalid socket path '{}': {reason}", path.display())]
    InvalidSocketPath {
        /// The path as given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// An address/prefix pair that does not parse or whose prefix is too long.
    #[error("invalid address '{input}': {reason}")]
    InvalidCidr {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Shorthand for results carrying this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
