//! Virtio devices for the guest: the modern virtio-pci transport in front of a vhost-user
//! backend that does all the device work.

pub mod config_space;
#[cfg(test)]
mod fake_backend;
pub mod pci;
pub mod reconnect;
pub mod vhost_user;
pub mod watchdog;

pub use pci::{DeviceType, QueueLayout, VirtioPciDevice};
pub use vhost_user::{VhostUserConnection, VhostUserError};
