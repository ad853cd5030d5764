//! Guest memory sizes and the x86_64 guest physical layout: where RAM goes, and the e820 map
//! the guest is told about.
//!
//! RAM starts at 0 and runs up to the 32-bit PCI hole at 3 GiB..4 GiB (PCI BARs, IOAPIC,
//! LAPIC); whatever does not fit below the hole continues at 4 GiB. The e820 map marks the
//! EBDA and the legacy VGA/BIOS area (640 KiB..1 MiB) reserved and leaves the hole out, so the
//! guest finds it as a gap it may assign to PCI devices.

use std::ops::Range;

use vm_memory::GuestAddress;

use crate::error::{Error, Result};

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One tebibyte.
pub const TIB: u64 = 1 << 40;

/// Guest page size: KVM memory slots must be aligned to it.
pub const PAGE_SIZE: u64 = 4 * KIB;
/// Start of the extended BIOS data area, where the MP table goes; reserved up to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of RAM above the legacy VGA/BIOS area (1 MiB).
pub const HIGH_RAM_START: u64 = MIB;
/// Start of the 32-bit PCI hole (3 GiB): no RAM from here up to [`PCI_HOLE_END`].
pub const PCI_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit PCI hole (4 GiB), where RAM that did not fit below resumes.
pub const PCI_HOLE_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO page; from here to 4 GiB belongs to the platform (IOAPIC, LAPIC).
pub const IOAPIC_START: u64 = 0xFEC0_0000;

/// Smallest guest memory accepted. x86_64 kernels load at 16 MiB by default
/// (CONFIG_PHYSICAL_START) and need room above that for themselves and an initramfs.
pub const MIN_MEMORY_SIZE: u64 = 32 * MIB;
/// Largest guest memory accepted: a sanity bound well inside every x86_64 host's physical
/// address width; the real limit is checked against the host when the VM is created.
pub const MAX_MEMORY_SIZE: u64 = TIB;

/// Parses a size: a decimal number of bytes, optionally followed by one of `K`, `M`, `G`, `T`
/// (either case) for KiB, MiB, GiB, TiB. `512M`, `2G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let invalid = |reason: String| Error::InvalidSize {
        input: s.to_owned(),
        reason,
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() {
        return Err(invalid(
            "expected a number of bytes, optionally followed by K, M, G or T".into(),
        ));
    }
    let unit = match suffix {
        "" => 1,
        "K" | "k" => KIB,
        "M" | "m" => MIB,
        "G" | "g" => GIB,
        "T" | "t" => TIB,
        other => {
            return Err(invalid(format!(
                "unknown suffix '{other}' (use K, M, G or T)"
            )))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| invalid("too large".into()))
}

/// A contiguous range of guest RAM: one KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRegion {
    /// The guest physical address just past the region.
    pub const fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// The type of an e820 entry, with its numeric value from the boot protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved, not for the OS to use (type 2).
    Reserved,
}

impl E820Type {
    /// The numeric type as written into `boot_params.e820_table` or the PVH memory map.
    pub const fn code(self) -> u32 {
        match self {
            Self::Ram => 1,
            Self::Reserved => 2,
        }
    }
}

/// One entry of the guest's e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The guest physical memory layout for a given RAM size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    size: u64,
    ram: Vec<RamRegion>,
    e820: Vec<E820Entry>,
}

impl MemoryLayout {
    /// Lays out `size` bytes of RAM: below the PCI hole first, the rest from 4 GiB.
    ///
    /// `size` must be a multiple of 4 KiB and within [`MIN_MEMORY_SIZE`]..=[`MAX_MEMORY_SIZE`].
    pub fn new(size: u64) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidMemorySize { size, reason };
        if size % PAGE_SIZE != 0 {
            return Err(invalid("not a multiple of the 4 KiB page size".into()));
        }
        if size < MIN_MEMORY_SIZE {
            return Err(invalid(format!(
                "smaller than the minimum of {} MiB",
                MIN_MEMORY_SIZE / MIB
            )));
        }
        if size > MAX_MEMORY_SIZE || usize::try_from(size).is_err() {
            return Err(invalid(format!(
                "larger than the maximum of {} GiB",
                MAX_MEMORY_SIZE / GIB
            )));
        }

        let low = size.min(PCI_HOLE_START);
        let high = size - low;
        let mut ram = vec![RamRegion {
            guest_addr: 0,
            size: low,
        }];
        let mut e820 = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIGH_RAM_START - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: HIGH_RAM_START,
                size: low - HIGH_RAM_START,
                kind: E820Type::Ram,
            },
        ];
        if high > 0 {
            ram.push(RamRegion {
                guest_addr: PCI_HOLE_END,
                size: high,
            });
            e820.push(E820Entry {
                addr: PCI_HOLE_END,
                size: high,
                kind: E820Type::Ram,
            });
        }
        Ok(Self { size, ram, e820 })
    }

    /// Total RAM in bytes, as requested.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions (one or two), lowest first: the KVM memory slots to create.
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.ram
    }

    /// The e820 map to hand to the guest, sorted by address, without overlaps.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820
    }

    /// The guest physical address just past the highest RAM byte.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, RamRegion::end)
    }

    /// The RAM regions in the form `vm_memory`'s `GuestMemoryMmap::from_ranges` takes.
    pub fn guest_memory_ranges(&self) -> Vec<(GuestAddress, usize)> {
        // `new` checked that the total size fits in usize, so each region does.
        self.ram
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
            .collect()
    }

    /// The guest physical range where 32-bit PCI BARs may be placed: the hole below the
    /// IOAPIC.
    pub fn pci_mmio32_window(&self) -> Range<u64> {
        PCI_HOLE_START..IOAPIC_START
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 * 1024);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("16777215T").unwrap(), ((1u64 << 24) - 1) << 40);
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "", "M", "-1", "+1", "1.5G", "1 G", " 1G", "1G ", "1GB", "1GiB", "12X", "0x10", "1e9",
            "G1",
        ] {
            assert!(
                matches!(parse_size(bad), Err(Error::InvalidSize { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_size("16777216T").unwrap_err().to_string(),
            "invalid size '16777216T': too large"
        );
        assert_eq!(
            parse_size("99999999999999999999").unwrap_err().to_string(),
            "invalid size '99999999999999999999': too large"
        );
        assert_eq!(
            parse_size("1GB").unwrap_err().to_string(),
            "invalid size '1GB': unknown suffix 'GB' (use K, M, G or T)"
        );
    }

    #[test]
    fn small_guest_is_all_below_the_hole() {
        let l = MemoryLayout::new(512 * MIB).unwrap();
        assert_eq!(
            l.ram_regions(),
            &[RamRegion {
                guest_addr: 0,
                size: 512 * MIB
            }]
        );
        assert_eq!(
            l.e820(),
            &[
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x6_0400,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 511 * MIB,
                    kind: E820Type::Ram
                },
            ]
        );
        assert_eq!(l.ram_end(), 512 * MIB);
        assert_eq!(l.size(), 512 * MIB);
    }

    #[test]
    fn exactly_3g_fills_up_to_the_hole() {
        let l = MemoryLayout::new(3 * GIB).unwrap();
        assert_eq!(l.ram_regions().len(), 1);
        assert_eq!(l.ram_end(), PCI_HOLE_START);
        assert_eq!(l.e820().len(), 3);
        assert_eq!(l.e820()[2].addr + l.e820()[2].size, PCI_HOLE_START);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let l = MemoryLayout::new(8 * GIB).unwrap();
        assert_eq!(
            l.ram_regions(),
            &[
                RamRegion {
                    guest_addr: 0,
                    size: 3 * GIB
                },
                RamRegion {
                    guest_addr: 4 * GIB,
                    size: 5 * GIB
                },
            ]
        );
        assert_eq!(l.ram_end(), 9 * GIB);
        assert_eq!(
            l.e820().last(),
            Some(&E820Entry {
                addr: 4 * GIB,
                size: 5 * GIB,
                kind: E820Type::Ram
            })
        );
        let total: u64 = l.ram_regions().iter().map(|r| r.size).sum();
        assert_eq!(total, 8 * GIB);
    }

    #[test]
    fn e820_is_sorted_disjoint_and_avoids_the_hole() {
        for size in [
            MIN_MEMORY_SIZE,
            512 * MIB,
            3 * GIB - PAGE_SIZE,
            3 * GIB,
            3 * GIB + PAGE_SIZE,
            4 * GIB,
            64 * GIB,
            MAX_MEMORY_SIZE,
        ] {
            let l = MemoryLayout::new(size).unwrap();
            for pair in l.e820().windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{size:#x}");
            }
            let mut usable = 0;
            for e in l.e820() {
                assert!(e.size > 0, "{size:#x}: {e:?}");
                let end = e.addr + e.size;
                assert!(
                    end <= PCI_HOLE_START || e.addr >= PCI_HOLE_END,
                    "{size:#x}: {e:?} overlaps the PCI hole"
                );
                // Every e820 range is backed by a RAM region.
                assert!(
                    l.ram_regions()
                        .iter()
                        .any(|r| r.guest_addr <= e.addr && end <= r.end()),
                    "{size:#x}: {e:?}"
                );
                if e.kind == E820Type::Ram {
                    usable += e.size;
                }
            }
            assert_eq!(usable, size - (HIGH_RAM_START - EBDA_START), "{size:#x}");
        }
    }

    #[test]
    fn rejects_unusable_memory_sizes() {
        for (size, reason) in [
            (512 * MIB + 1, "not a multiple of the 4 KiB page size"),
            (
                MIN_MEMORY_SIZE - PAGE_SIZE,
                "smaller than the minimum of 32 MiB",
            ),
            (0, "smaller than the minimum of 32 MiB"),
            (
                MAX_MEMORY_SIZE + PAGE_SIZE,
                "larger than the maximum of 1024 GiB",
            ),
        ] {
            assert_eq!(
                MemoryLayout::new(size).unwrap_err(),
                Error::InvalidMemorySize {
                    size,
                    reason: reason.into()
                }
            );
        }
    }

    #[test]
    fn e820_type_codes() {
        assert_eq!(E820Type::Ram.code(), 1);
        assert_eq!(E820Type::Reserved.code(), 2);
    }

    #[test]
    fn pci_window_is_inside_the_hole() {
        let l = MemoryLayout::new(GIB).unwrap();
        let w = l.pci_mmio32_window();
        assert!(w.start >= PCI_HOLE_START && w.end <= PCI_HOLE_END);
        assert!(w.start >= l.ram_end());
    }

    #[test]
    fn layout_backs_real_guest_memory() {
        let l = MemoryLayout::new(64 * MIB).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&l.guest_memory_ranges()).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress(64 * MIB - 1));
        for e in l.e820() {
            assert!(mem.address_in_range(GuestAddress(e.addr)));
            assert!(mem.address_in_range(GuestAddress(e.addr + e.size - 1)));
        }
        let last = GuestAddress(l.ram_end() - 8);
        mem.write_obj(0xfeed_u64, last).unwrap();
        assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0xfeed);
        assert!(!mem.address_in_range(GuestAddress(l.ram_end())));
    }
}
