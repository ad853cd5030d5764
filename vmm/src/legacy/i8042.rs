//! The i8042 keyboard controller, reduced (by `vm-superio`) to what a guest without ACPI uses
//! to leave: the "pulse reset line" command (0xfe to port 0x64) that Linux sends for
//! `reboot=k`. The VMM treats the reset as the end of the VM.

use std::sync::mpsc::Sender;
use std::sync::Mutex;

use vm_superio::{I8042Device, Trigger};

use crate::exit::VmEvent;

/// Data port of the controller.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port of the controller.
pub const COMMAND_PORT: u16 = 0x64;

/// Reports the reset line as a [`VmEvent::Reset`].
pub struct ResetTrigger(Sender<VmEvent>);

impl Trigger for ResetTrigger {
    type E = std::sync::mpsc::SendError<VmEvent>;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::Reset)
    }
}

/// The controller at ports 0x60..=0x64.
pub struct ResetPort(Mutex<I8042Device<ResetTrigger>>);

impl ResetPort {
    /// A controller that reports resets on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self(Mutex::new(I8042Device::new(ResetTrigger(events))))
    }

    /// Guest read of `port`.
    pub fn read(&self, port: u16) -> u8 {
        self.lock().read((port - DATA_PORT) as u8)
    }

    /// Guest write of `value` to `port`.
    pub fn write(&self, port: u16, value: u8) {
        // The receiver is gone only while the VMM is already exiting.
        let _ = self.lock().write((port - DATA_PORT) as u8, value);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, I8042Device<ResetTrigger>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = ResetPort::new(tx);
        port.write(DATA_PORT, 0xfe);
        port.write(COMMAND_PORT, 0xd1);
        assert!(rx.try_recv().is_err());
        port.write(COMMAND_PORT, 0xfe);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
    }
}
