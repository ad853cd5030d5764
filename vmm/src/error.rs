//! The crate's error type: each variant names the option, key or value it rejects.

use std::path::PathBuf;

/// Everything the VMM's configuration layer can reject.
///
/// Errors about one key=value list (`--disk`, `--net`) do not name the option: clap prefixes
/// them with `invalid value '...' for '--disk <OPTIONS>'`. Errors that involve several options
/// name them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The option list is empty.
    #[error("empty option list")]
    EmptyOptionList,
    /// An empty entry between commas, e.g. `socket=/s,,readonly`.
    #[error("empty entry in '{input}' (stray ',')")]
    EmptyEntry {
        /// The whole option list.
        input: String,
    },
    /// A key this option does not have.
    #[error("unknown key '{key}' (valid keys: {valid})")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The keys the option accepts.
        valid: String,
    },
    /// The same key twice in one list.
    #[error("'{key}' given more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A key that needs a value was given none (`socket` or `socket=`).
    #[error("'{key}' needs a value ({key}=...)")]
    MissingValue {
        /// The key.
        key: String,
    },
    /// A value that does not parse or is out of range.
    #[error("{key}={value}: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two keys that exclude each other.
    #[error("'{first}' and '{second}' cannot be used together")]
    ConflictingKeys {
        /// The first key.
        first: &'static str,
        /// The key that conflicts with it.
        second: &'static str,
    },
    /// None of the keys that select the backend was given.
    #[error("one of {expected} is required")]
    MissingKey {
        /// The alternatives, e.g. "socket=PATH or path=IMAGE".
        expected: &'static str,
    },
    /// A size that does not parse (`--memory`).
    #[error("invalid size '{input}': {reason}")]
    InvalidSize {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A memory size the guest layout cannot use.
    #[error("memory size of {size} bytes: {reason}")]
    InvalidMemorySize {
        /// The size in bytes.
        size: u64,
        /// Why it is refused.
        reason: String,
    },
    /// A plain command-line number that does not parse or is out of range.
    #[error("'{input}': {reason}")]
    InvalidNumber {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An empty string where a file path is expected.
    #[error("expected a file path, got an empty string")]
    EmptyPath,
    /// A `--serial` value other than stdio, file=PATH or off.
    #[error("invalid serial mode '{input}' (expected stdio, file=PATH or off)")]
    InvalidSerial {
        /// The text as given.
        input: String,
    },
    /// A kernel command line the boot protocol cannot carry.
    #[error("kernel command line is {len} bytes; the x86 boot protocol allows at most {max}")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The same unix socket given to two devices (or to a device and --api-socket).
    #[error("socket '{}' is used by both {first} and {second}", path.display())]
    DuplicateSocket {
        /// The socket path.
        path: PathBuf,
        /// The first user, e.g. "--disk #1".
        first: String,
        /// The second user.
        second: String,
    },
    /// The same TAP name given to two `--net` options.
    #[error("TAP '{name}' is used by both {first} and {second}")]
    DuplicateTap {
        /// The interface name.
        name: String,
        /// The first user.
        first: String,
        /// The second user.
        second: String,
    },
    /// The same MAC address given to two `--net` options.
    #[error("MAC address {mac} is used by both {first} and {second}")]
    DuplicateMac {
        /// The address.
        mac: String,
        /// The first user.
        first: String,
        /// The second user.
        second: String,
    },
    /// More queues in all than KVM has doorbells for.
    #[error("the devices have {queues} queues a guest starts (a disk's up to one per vCPU, a NIC's all and its control queue); KVM takes at most {max} queue doorbells per VM")]
    TooManyQueues {
        /// Queues of every disk and NIC that a Linux guest starts.
        queues: usize,
        /// The limit.
        max: usize,
    },
    /// One image file given to two `--disk` options, at least one of them writable.
    #[error("image '{}' is used by both {first} and {second}; only read-only disks may share an image", path.display())]
    SharedWritableImage {
        /// The image path.
        path: PathBuf,
        /// The first user.
        first: String,
        /// The second user.
        second: String,
    },
}

/// Shorthand for results carrying this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
