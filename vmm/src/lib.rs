//! Cowbird's VMM: a lean KVM monitor whose disks and NICs are vhost-user devices served by
//! separate processes (`vhost-blk`, `vhost-net`, or any vhost-user backend).
//!
//! Reading order:
//! - [`cli`] and [`memory`]: the command line and the guest physical layout;
//! - [`vm`]: KVM, guest memory (a memfd the backends map) and the in-kernel irqchip;
//! - [`boot`]: loading the kernel (PVH or bzImage), initramfs, command line, MP table;
//! - [`vcpu`] and [`cpuid`]: vCPU state and the thread running each vCPU;
//! - [`platform`]: which device answers which port or address; [`legacy`] (serial, i8042);
//! - [`pci`] and [`virtio`]: the PCI bus, MSI-X, the virtio-pci transport and the vhost-user
//!   frontend; [`irq`]: MSI routing;
//! - [`supervisor`]: backend processes the VMM starts itself (`--disk path=`, `--net tap=`);
//! - [`machine`]: all of the above put together; [`exit`]: how a VM ends; [`api`]: the
//!   control socket.

#![warn(missing_docs)]

pub mod api;
pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod error;
pub mod exit;
pub mod irq;
mod kv;
pub mod legacy;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod platform;
pub mod supervisor;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use error::{Error, Result};
