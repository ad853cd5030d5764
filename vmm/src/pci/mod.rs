//! A single PCI bus behind configuration mechanism #1 (ports 0xcf8/0xcfc), with a host bridge
//! at 00.0 and one device per slot after it. BARs are placed by the VMM in the 32-bit hole;
//! the guest may move them and the bus follows.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use config::{PciConfig, PciIds, NUM_BARS};

/// First I/O port of the configuration mechanism: the address register.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First I/O port of the data window.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Number of device slots on the bus.
const SLOTS: usize = 32;

/// A PCI function the bus can reach.
pub trait PciDevice: Send {
    /// The device's configuration space.
    fn config(&self) -> &PciConfig;
    /// Guest write to the configuration space at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Guest read from BAR `bar` at byte `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write to BAR `bar` at byte `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00.0, which Linux looks for before trusting mechanism #1.
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A shared handle on a device, so its owner (e.g. for reconnects) and the bus both reach it.
pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// The bus: configuration address register and the devices by slot.
pub struct PciBus {
    config_address: u32,
    slots: Vec<SharedDevice>,
    /// The decoded BARs: (address range, slot, BAR), refreshed at every configuration write,
    /// so that an MMIO access locks only the device it is for (another one may be busy with
    /// its backend for a while).
    windows: Vec<(std::ops::Range<u64>, usize, usize)>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let bridge = HostBridge(PciConfig::new(PciIds {
            vendor: 0x8086,
            device: 0x0d57,
            class: 0x06_0000,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }));
        Self {
            config_address: 0,
            slots: vec![Arc::new(Mutex::new(bridge))],
            windows: Vec::new(),
        }
    }

    /// Plugs `device` into the next free slot; returns the slot number, or `None` if the bus is
    /// full.
    pub fn add(&mut self, device: SharedDevice) -> Option<usize> {
        if self.slots.len() >= SLOTS {
            return None;
        }
        self.slots.push(device);
        let slot = self.slots.len() - 1;
        let config = lock(&self.slots[slot]).config().clone();
        self.refresh_windows(slot, &config);
        Some(slot)
    }

    /// Records where slot `slot`'s BARs decode now, from its configuration `config`.
    fn refresh_windows(&mut self, slot: usize, config: &PciConfig) {
        self.windows.retain(|&(_, s, _)| s != slot);
        for bar in 0..NUM_BARS {
            if let Some(range) = config.bar_range(bar) {
                self.windows.push((range, slot, bar));
            }
        }
    }

    /// Guest read from the configuration ports.
    pub fn read_port(&mut self, port: u16, data: &mut [u8]) {
        if (CONFIG_ADDRESS_PORT..CONFIG_ADDRESS_PORT + 4).contains(&port) {
            let offset = usize::from(port - CONFIG_ADDRESS_PORT);
            let bytes = self.config_address.to_le_bytes();
            copy_out(&bytes, offset, data);
            return;
        }
        let offset = usize::from(port - CONFIG_DATA_PORT);
        match self.addressed() {
            Some((slot, register)) => lock(&self.slots[slot])
                .config()
                .read(register + offset, data),
            None => data.fill(0xff),
        }
    }

    /// Guest write to the configuration ports.
    pub fn write_port(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            self.config_address = u32::from_le_bytes(data.try_into().unwrap());
            return;
        }
        if !(CONFIG_DATA_PORT..CONFIG_DATA_PORT + 4).contains(&port) {
            return;
        }
        let offset = usize::from(port - CONFIG_DATA_PORT);
        if let Some((slot, register)) = self.addressed() {
            let config = {
                let mut device = lock(&self.slots[slot]);
                device.write_config(register + offset, data);
                device.config().clone()
            };
            self.refresh_windows(slot, &config);
        }
    }

    /// Guest MMIO read; false if no BAR decodes `addr`.
    pub fn read_mmio(&self, addr: u64, data: &mut [u8]) -> bool {
        self.with_bar(addr, |device, bar, offset| {
            device.read_bar(bar, offset, data)
        })
    }

    /// Guest MMIO write; false if no BAR decodes `addr`.
    pub fn write_mmio(&self, addr: u64, data: &[u8]) -> bool {
        self.with_bar(addr, |device, bar, offset| {
            device.write_bar(bar, offset, data)
        })
    }

    fn with_bar(&self, addr: u64, f: impl FnOnce(&mut dyn PciDevice, usize, u64)) -> bool {
        // The first slot's BAR wins where guest-placed BARs overlap.
        let hit = self
            .windows
            .iter()
            .filter(|(range, _, _)| range.contains(&addr))
            .min_by_key(|&&(_, slot, bar)| (slot, bar));
        match hit {
            Some((range, slot, bar)) => {
                f(&mut *lock(&self.slots[*slot]), *bar, addr - range.start);
                true
            }
            None => false,
        }
    }

    /// The device and register the address register selects, if it is enabled, on bus 0,
    /// function 0 and a populated slot.
    fn addressed(&self) -> Option<(usize, usize)> {
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let function = (a >> 8) & 0x7;
        let register = (a & 0xfc) as usize;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        (slot < self.slots.len()).then_some((slot, register))
    }
}

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

fn copy_out(bytes: &[u8], offset: usize, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset + i).copied().unwrap_or(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_config(bus: &mut PciBus, slot: u32, register: u32) -> u32 {
        let address = 0x8000_0000 | (slot << 11) | register;
        bus.write_port(CONFIG_ADDRESS_PORT, &address.to_le_bytes());
        let mut data = [0; 4];
        bus.read_port(CONFIG_DATA_PORT, &mut data);
        u32::from_le_bytes(data)
    }

    /// A device with one 4 KiB memory BAR at `addr` that answers reads with `byte`.
    struct Plain(PciConfig, u8);

    impl PciDevice for Plain {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data);
        }
        fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(self.1);
        }
        fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    }

    fn plain(addr: u32, byte: u8) -> SharedDevice {
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_8000,
            revision: 1,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_memory_bar(0, 4096, addr);
        config.write(4, &[0x02, 0]);
        Arc::new(Mutex::new(Plain(config, byte)))
    }

    #[test]
    fn mmio_locks_only_the_device_it_is_for_and_follows_moved_bars() {
        let busy = plain(0xc000_0000, 1);
        let mut bus = PciBus::new();
        bus.add(busy.clone()).unwrap();
        let slot = bus.add(plain(0xc000_1000, 2)).unwrap();
        let bus = Arc::new(bus);
        // The first device is busy (say, waiting for its backend): the second still answers.
        let held = busy.lock().unwrap();
        let (done, answered) = std::sync::mpsc::channel();
        let reader = bus.clone();
        let reading = std::thread::spawn(move || {
            let mut data = [0u8; 4];
            let hit = reader.read_mmio(0xc000_1004, &mut data);
            let _ = done.send((hit, data));
        });
        let answer = answered.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        assert_eq!(
            answer.expect("MMIO waited for an unrelated device"),
            (true, [2; 4])
        );
        // The guest moves the second BAR; the bus decodes the new place only. (The reader
        // drops its clone of the bus when it ends, after it answered.)
        reading.join().unwrap();
        let mut bus = Arc::into_inner(bus).unwrap();
        let address = 0x8000_0000u32 | ((slot as u32) << 11) | 0x10;
        bus.write_port(CONFIG_ADDRESS_PORT, &address.to_le_bytes());
        bus.write_port(CONFIG_DATA_PORT, &0xc000_8000u32.to_le_bytes());
        let mut data = [0u8; 1];
        assert!(!bus.read_mmio(0xc000_1000, &mut data));
        assert!(bus.read_mmio(0xc000_8000, &mut data));
        assert_eq!(data, [2]);
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_ones() {
        let mut bus = PciBus::new();
        assert_eq!(read_config(&mut bus, 0, 0), 0x0d57_8086);
        assert_eq!(read_config(&mut bus, 0, 8) >> 8, 0x06_0000);
        assert_eq!(read_config(&mut bus, 5, 0), u32::MAX);
        // The address register reads back (Linux's mechanism #1 probe).
        let mut data = [0; 4];
        bus.read_port(CONFIG_ADDRESS_PORT, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_2800);
    }
}
