//! The pure format layer: headers, tables and snapshots as bytes, with no I/O.

pub mod bitmaps;
pub mod header;
pub mod luks;
pub mod snapshot;
pub mod tables;
