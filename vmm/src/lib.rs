//! Building blocks of Cowbird's VMM: a lean KVM monitor whose disks and NICs are vhost-user
//! devices served by separate processes (issues 7 and 8).
//!
//! So far:
//! - [`cli`]: the command line and the typed, validated [`VmConfig`](cli::VmConfig) it yields;
//! - [`memory`]: memory sizes and the x86_64 guest RAM and e820 layout;
//! - [`mac`]: MAC addresses for `--net`.

#![warn(missing_docs)]

pub mod cli;
pub mod error;
mod kv;
pub mod mac;
pub mod memory;

pub use error::{Error, Result};
