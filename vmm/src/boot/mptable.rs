//! The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI finds its
//! CPUs, its IOAPIC and which ISA interrupt goes to which IOAPIC pin.
//!
//! The floating pointer and the configuration table go into the BIOS area at 0xf0000 (reserved
//! in the e820 map), one of the places Linux's `smp_scan_config` looks. Interrupts are wired identity-style: ISA IRQ n to IOAPIC pin n,
//! as KVM's default GSI routing does; PCI devices use MSI-X only.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest physical address of the local APIC of every CPU.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Guest physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
/// Guest physical address of the MP floating pointer.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// Largest MP table this module writes: the 64 KiB BIOS area minus the floating pointer.
const MAX_TABLE_LEN: usize = 0x1_0000 - 16;

const BUS_ID_PCI: u8 = 0;
const BUS_ID_ISA: u8 = 1;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

/// Builds the MP floating pointer followed by the configuration table for `cpus` CPUs.
/// `base` is the guest address the bytes will be written at.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let table_addr = base + 16;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_ID_PCI, b"PCI   "), (BUS_ID_ISA, b"ISA   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        // Type 3 (I/O interrupt), INT, conforming polarity and trigger.
        entries.extend_from_slice(&[3, 0, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, BUS_ID_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    // 255 CPUs take about 5 KiB.
    debug_assert!(table_len <= MAX_TABLE_LEN);
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, set below
    table.extend_from_slice(b"COWBIRD ");
    table.extend_from_slice(b"VMM         ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4);
    out.push(0); // checksum, set below
    out.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `cpus` CPUs at [`MPTABLE_ADDR`].
pub fn write(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), GuestMemoryError> {
    memory.write_slice(&build(cpus, MPTABLE_ADDR), GuestAddress(MPTABLE_ADDR))
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        let bytes = build(2, MPTABLE_ADDR);
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[0..16]), 0);
        let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, MPTABLE_ADDR + 16);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        // 2 CPUs, 2 buses, 1 IOAPIC, 16 interrupts, 2 local interrupts.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 23);
        // The first CPU is the bootstrap processor, the second is not.
        assert_eq!(table[44..48], [0, 0, APIC_VERSION, 3]);
        assert_eq!(table[64..68], [0, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn the_largest_vm_fits() {
        let bytes = build(u8::MAX, MPTABLE_ADDR);
        assert!(bytes.len() <= 0x1_0000);
    }
}
