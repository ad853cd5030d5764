//! Cowbird's vhost-user-net backend: serves a guest's virtio-net queues over a vhost-user
//! socket and moves packets to and from a Linux TAP device.
//!
//! - [`tap`]: the TAP device (one queue per pair, vnet headers, offloads, address, MTU);
//! - [`chain`]: validates untrusted descriptor chains into guest buffers and `iovec`s;
//! - [`datapath`]: tx chains → TAP with writev; [`rx`]: TAP → rx chains with readv in
//!   batches of buffer sets (MRG_RXBUF: one packet over several chains); zero-copy both
//!   ways; [`uring`]: tx and rx batches as one io_uring submission each;
//! - [`ctrl`]: the control queue's commands (MQ pairs, receive filters);
//! - [`config`]: what the device tells the driver (MAC addresses: `cowbird_daemon::net`); [`cli`]: the command line;
//! - [`device`]: state that outlives connections (TAP, per-pair slots and counters);
//! - [`backend`]: the `vhost-user-backend` glue for one connection, one worker per pair;
//! - [`server`]: the socket and the connection loop, the frontend's connection relayed to the
//!   daemon with QEMU's early `SET_VRING_ENABLE` put after `SET_FEATURES`
//!   (`cowbird_daemon::relay`; SIGTERM/SIGINT/SIGHUP are `main`'s, through
//!   `cowbird_daemon::signals`).

#![warn(missing_docs)]

pub mod backend;
pub mod chain;
pub mod cli;
pub mod config;
pub mod ctrl;
pub mod datapath;
pub mod device;
pub mod error;
pub mod rx;
pub mod server;
pub mod tap;
pub mod uring;

pub use cowbird_daemon::net::MacAddress;
pub use error::{Error, Result};
