//! Building blocks of Cowbird's vhost-user-net backend.
//!
//! The daemon (issue 6) serves a guest's virtio-net queues over a vhost-user socket and moves
//! packets to and from a Linux TAP device. This crate holds the parts of it that are pure logic
//! and can be tested without a TAP device or a frontend:
//! - [`mac`]: MAC addresses, parsing, printing and random locally administered ones;
//! - [`config`]: the virtio-net device configuration space, the offered feature bits and the
//!   mapping from negotiated features to TAP offloads and vnet header size;
//! - [`cli`]: the daemon's command line with its value validation.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod error;
pub mod mac;

pub use error::{Error, Result};
pub use mac::MacAddress;
