//! The guest's I/O space: which device answers a port or an MMIO address.
//!
//! Ports: COM1 (0x3f8), the i8042 (0x60, 0x64) and PCI configuration (0xcf8..0xcff); PIT,
//! PIC and the speaker port are in KVM. MMIO outside RAM goes to the PCI BARs; the IOAPIC and
//! LAPICs are in KVM. Accesses nobody decodes read as all ones and writes are dropped, as on
//! a real bus.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::legacy::i8042::{COMMAND_PORT, DATA_PORT};
use crate::legacy::serial::{COM1_PORT, COM1_PORTS};
use crate::legacy::{ResetPort, SerialPort};
use crate::pci::{PciBus, CONFIG_ADDRESS_PORT};

/// Every device a vCPU exit can reach.
pub struct Platform {
    serial: Option<SerialPort>,
    reset: ResetPort,
    /// Configuration accesses change the bus (its address register, the BAR windows) and
    /// take it alone; MMIO shares it, each access locking only the device it is for.
    pci: RwLock<PciBus>,
}

const PCI_PORTS: std::ops::RangeInclusive<u16> = CONFIG_ADDRESS_PORT..=CONFIG_ADDRESS_PORT + 7;

impl Platform {
    /// A platform with these devices.
    pub fn new(serial: Option<SerialPort>, reset: ResetPort, pci: PciBus) -> Self {
        Self {
            serial,
            reset,
            pci: RwLock::new(pci),
        }
    }

    /// A vCPU read `data.len()` bytes from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if self.is_serial(p) => {
                if let (Some(serial), Some(first)) = (&self.serial, data.first_mut()) {
                    *first = serial.read(p - COM1_PORT);
                }
            }
            DATA_PORT | COMMAND_PORT => data[0] = self.reset.read(port),
            p if PCI_PORTS.contains(&p) => self.pci_config().read_port(p, data),
            _ => data.fill(0xff),
        }
    }

    /// A vCPU wrote `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            p if self.is_serial(p) => {
                if let (Some(serial), Some(&value)) = (&self.serial, data.first()) {
                    serial.write(p - COM1_PORT, value);
                }
            }
            DATA_PORT | COMMAND_PORT => self.reset.write(port, data[0]),
            p if PCI_PORTS.contains(&p) => self.pci_config().write_port(p, data),
            _ => {}
        }
    }

    /// A vCPU read from MMIO `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci().read_mmio(addr, data) {
            data.fill(0xff);
        }
    }

    /// A vCPU wrote to MMIO `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci().write_mmio(addr, data);
    }

    fn is_serial(&self, port: u16) -> bool {
        self.serial.is_some() && (COM1_PORT..COM1_PORT + COM1_PORTS).contains(&port)
    }

    fn pci(&self) -> RwLockReadGuard<'_, PciBus> {
        self.pci.read().unwrap_or_else(|e| e.into_inner())
    }

    fn pci_config(&self) -> RwLockWriteGuard<'_, PciBus> {
        self.pci.write().unwrap_or_else(|e| e.into_inner())
    }
}
