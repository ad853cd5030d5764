//! qcow2 and raw disk images for Cowbird.
//!
//! Two layers:
//! - [`format`](mod@format): pure parsing and serialisation of headers, tables and snapshots;
//! - the engine ([`Qcow2`]): caches, cluster allocation, copy-on-write and crash-safe
//!   metadata ordering, doing its I/O through the [`Storage`] trait.
//!
//! Daemons and tools use the format-independent [`Image`] trait, opened with [`open_image`].

pub mod check;
pub mod compress;
pub mod create;
mod engine;
pub mod error;
pub mod file_attributes;
pub mod fixed_buffers;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod lock;
pub mod name;
pub mod open;
pub mod raw;
pub mod storage;
pub mod uring;

/// The `tracing` target of the lines QEMU's qcow2 driver prints on stderr as they are
/// (`qcow2_free_clusters failed: Invalid argument`): a tool that stands in for qemu-img
/// prints events of this target word for word.
pub const QEMU_STDERR: &str = "qcow2::qemu_stderr";

pub use check::{check, CheckReport};
pub use create::{create, CreateOptions, Preallocation};
pub use engine::{BitmapBits, Qcow2};
pub use error::{Error, Result};
pub use format::header::CompressionType;
pub use format::snapshot::SnapshotRef;
pub use image::{
    BlockStatus, Extent, Format, Image, IoMapping, MapOutcome, MetadataLoad, OpenWarning,
};
pub use lock::Locking;
pub use open::{open_image, OpenOptions};
pub use raw::RawImage;
pub use storage::{FileStorage, MemStorage, Storage};
