//! What Cowbird's daemons share: `vhost-blk` and `vhost-net` (the vhost-user backends) take
//! their socket, relay their frontend's setup messages into the order `vhost` accepts,
//! classify how a frontend's connection ended, decide when to notify a driver, stop on
//! signals and close the worker exit events the same way; they and `vmm` log and report
//! errors the same way, and `vhost-net` and `vmm` parse a NIC's MAC address and TAP name the
//! same way.

pub mod exit_events;
pub mod logging;
pub mod net;
pub mod notify;
pub mod relay;
pub mod signals;
pub mod socket;
