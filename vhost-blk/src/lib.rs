//! Cowbird's vhost-user-blk backend: serves a raw or qcow2 image to a guest's virtio-blk
//! queues over a vhost-user unix socket.
//!
//! - [`request`]: parses and validates untrusted descriptor chains into typed requests;
//! - [`exec`]: executes requests against the [`disk`] and completes chains through bounce
//!   buffers; [`uring`]: the zero-copy io_uring path (raw images, mapped qcow2 clusters);
//! - [`config`] and [`features`]: what the device tells the driver;
//! - [`device`]: state that outlives connections (disk, per-queue slots, shutdown);
//! - [`backend`]: the `vhost-user-backend` glue for one connection, one worker per queue;
//! - [`fuzzing`]: the body of the fuzz target over guest memory and ring addresses;
//! - [`server`]: the socket and the connection loop, the frontend's connection relayed to the
//!   daemon (`cowbird_daemon::relay`; SIGTERM/SIGINT/SIGHUP are `main`'s, through
//!   `cowbird_daemon::signals`).

#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod device;
pub mod disk;
pub mod error;
pub mod exec;
pub mod features;
pub mod fuzzing;
pub mod guest;
pub mod request;
pub mod server;
pub mod uring;

pub use error::{Error, Result};
