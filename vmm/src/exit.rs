//! How a VM ends: the events vCPU threads and devices report to the main thread, and the
//! process exit status each one maps to.

use std::process::ExitCode;

/// Something that ends the VM.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest reset the machine (i8042 reset line): how it reboots and powers off.
    Reset,
    /// The VMM was asked to stop (SIGTERM or SIGINT).
    Terminated(nix::sys::signal::Signal),
    /// A `shutdown` request on the API socket.
    ApiShutdown,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed.
    TripleFault {
        /// The vCPU.
        cpu: u8,
        /// Its registers at the time.
        registers: String,
    },
    /// KVM could not run a vCPU (internal error, failed entry, unexpected exit).
    VcpuError {
        /// The vCPU.
        cpu: u8,
        /// What KVM reported.
        reason: String,
        /// Its registers at the time.
        registers: String,
    },
}

/// Exit status when the guest powered off or rebooted, or the VMM was told to stop.
pub const EXIT_GUEST_OFF: u8 = 0;
/// Exit status when the VMM could not set up or run the VM.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit status for an invalid command line (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the guest crashed (triple fault).
pub const EXIT_GUEST_CRASH: u8 = 3;
/// Exit status when KVM failed to run a vCPU.
pub const EXIT_VCPU_ERROR: u8 = 4;

impl VmEvent {
    /// The process exit status for this event; crash reports go to stderr.
    pub fn report(&self) -> ExitCode {
        match self {
            Self::Reset => ExitCode::from(EXIT_GUEST_OFF),
            Self::Terminated(signal) => {
                eprintln!("vmm: terminating on {signal}");
                ExitCode::from(EXIT_GUEST_OFF)
            }
            Self::ApiShutdown => {
                eprintln!("vmm: shut down through the API socket");
                ExitCode::from(EXIT_GUEST_OFF)
            }
            Self::TripleFault { cpu, registers } => {
                eprintln!("vmm: guest crashed: triple fault on vCPU {cpu}\n{registers}");
                ExitCode::from(EXIT_GUEST_CRASH)
            }
            Self::VcpuError {
                cpu,
                reason,
                registers,
            } => {
                eprintln!("vmm: vCPU {cpu} stopped: {reason}\n{registers}");
                ExitCode::from(EXIT_VCPU_ERROR)
            }
        }
    }
}
