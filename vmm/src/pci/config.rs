//! A PCI type 0 configuration space: the header, 32-bit memory BARs and a capability list,
//! with a per-byte write mask so that guest writes can only change what real hardware lets
//! them change (BAR sizing works by itself: the low bits of a BAR are read-only).

/// Size of a conventional PCI configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Offset of the first capability.
const FIRST_CAPABILITY: usize = 0x40;
/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;
const BAR0: usize = 0x10;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const CAPABILITIES_POINTER: usize = 0x34;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Command register bit: memory space decoding on.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register bit: the function may access memory (bus master).
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command bits a guest may change: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0407;

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bar_sizes: [u64; NUM_BARS],
    next_capability: usize,
    last_capability_next: usize,
}

impl PciConfig {
    /// A header with these IDs, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut config = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bar_sizes: [0; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability_next: CAPABILITIES_POINTER,
        };
        config.set_u16(0x00, ids.vendor);
        config.set_u16(0x02, ids.device);
        config.bytes[0x08] = ids.revision;
        config.bytes[0x09..0x0c].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        config.set_u16(0x2c, ids.subsystem_vendor);
        config.set_u16(0x2e, ids.subsystem);
        config.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        // Interrupt line: scratch register for the guest.
        config.writable[0x3c] = 0xff;
        config
    }

    /// Declares BAR `index` as a 32-bit non-prefetchable memory BAR of `size` bytes (a power
    /// of two, at least 4 KiB) at guest address `addr`.
    pub fn add_memory_bar(&mut self, index: usize, size: u64, addr: u32) {
        assert!(size.is_power_of_two() && (4096..=1 << 31).contains(&size));
        self.bar_sizes[index] = size;
        let offset = BAR0 + 4 * index;
        let mask = !(size as u32 - 1);
        self.writable[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
        self.set_u32(offset, addr & mask);
    }

    /// Appends a capability whose first byte is its ID; `body` is everything after the ID and
    /// next-pointer bytes, `writable` the guest-writable mask for the same bytes. Returns the
    /// capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        assert_eq!(body.len(), writable.len());
        let offset = self.next_capability;
        let len = 2 + body.len();
        assert!(
            offset + len <= CONFIG_SPACE_SIZE,
            "capabilities overflow config space"
        );
        self.bytes[self.last_capability_next] = offset as u8;
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + len].copy_from_slice(body);
        self.writable[offset + 2..offset + len].copy_from_slice(writable);
        self.last_capability_next = offset + 1;
        self.next_capability = (offset + len + 3) & !3;
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
        self.set_u16(STATUS, status);
        offset
    }

    /// Guest read of `data.len()` bytes at `offset`; bytes past the space read as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Guest write: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(offset + i).copied() else {
                return;
            };
            let old = self.bytes[offset + i];
            self.bytes[offset + i] = (old & !mask) | (value & mask);
        }
    }

    /// The guest address BAR `index` decodes, if it is a BAR and memory decoding is on.
    pub fn bar_range(&self, index: usize) -> Option<std::ops::Range<u64>> {
        let size = self.bar_sizes[index];
        if size == 0 || self.u16_at(COMMAND) & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        let base = u64::from(self.u32_at(BAR0 + 4 * index) & !0xf);
        Some(base..base + size)
    }

    /// Whether the driver lets the function access memory (command register, bus master).
    pub fn bus_master(&self) -> bool {
        self.u16_at(COMMAND) & COMMAND_BUS_MASTER != 0
    }

    /// A little-endian u16 of the space.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// A little-endian u32 of the space.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_8000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn read_u32(config: &PciConfig, offset: usize) -> u32 {
        let mut buf = [0; 4];
        config.read(offset, &mut buf);
        u32::from_le_bytes(buf)
    }

    #[test]
    fn bar_sizing_and_placement() {
        let mut config = PciConfig::new(ids());
        config.add_memory_bar(0, 0x1_0000, 0xc000_0000);
        assert_eq!(read_u32(&config, 0x10), 0xc000_0000);
        // Not decoded until the guest turns memory space on.
        assert_eq!(config.bar_range(0), None);
        config.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(read_u32(&config, 0x10), 0xffff_0000, "size probe");
        config.write(0x10, &0xd000_1234u32.to_le_bytes());
        config.write(0x04, &[0x06, 0]);
        assert_eq!(config.bar_range(0), Some(0xd000_0000..0xd001_0000));
        // Unused BARs stay zero.
        config.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(read_u32(&config, 0x14), 0);
    }

    #[test]
    fn read_only_header_and_capability_chain() {
        let mut config = PciConfig::new(ids());
        config.write(0x00, &[0, 0, 0, 0]);
        assert_eq!(read_u32(&config, 0), 0x1042_1af4);
        assert_eq!(read_u32(&config, 0x08) >> 8, 0x01_8000);
        let first = config.add_capability(0x09, &[0xaa, 0xbb], &[0, 0]);
        let second = config.add_capability(0x11, &[1, 2, 3], &[0, 0xff, 0]);
        assert_eq!((first, second), (0x40, 0x44));
        let mut buf = [0; 1];
        config.read(0x34, &mut buf);
        assert_eq!(buf[0], 0x40);
        config.read(0x41, &mut buf);
        assert_eq!(buf[0], 0x44);
        config.write(0x46, &[9, 9, 9]);
        let mut cap = [0; 5];
        config.read(0x44, &mut cap);
        assert_eq!(cap, [0x11, 0, 1, 9, 3]);
        assert_ne!(config.u16_at(0x06) & 0x10, 0);
    }
}
