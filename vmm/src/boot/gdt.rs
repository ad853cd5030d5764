//! The flat GDT a kernel is entered with, and the KVM segment registers that match it.
//!
//! Both boot protocols start the kernel with flat segments (base 0, limit 4 GiB) and load their
//! own GDT early; the table is still written to guest memory so that the descriptor caches the
//! VMM sets describe real entries.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest physical address of the boot GDT (below the EBDA, in RAM no one else uses).
pub const BOOT_GDT_ADDR: u64 = 0x500;

/// Selector of the code segment (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task state segment (GDT entry 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// A GDT entry from its flags (the access byte and the granularity nibble, packed as
/// `0xG0AA`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code, data and TSS entries. `long_mode` selects a 64-bit code segment
/// (L=1) instead of a 32-bit one (D=1).
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code_flags = if long_mode { 0xa09b } else { 0xc09b };
    [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes [`boot_gdt`] at [`BOOT_GDT_ADDR`].
pub fn write(memory: &GuestMemoryMmap, long_mode: bool) -> Result<(), GuestMemoryError> {
    for (i, descriptor) in boot_gdt(long_mode).iter().enumerate() {
        memory.write_obj(*descriptor, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

/// The KVM segment register that caches GDT `entry` under `selector`.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let granularity = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_32bit_code_segment() {
        let gdt = boot_gdt(false);
        assert_eq!(gdt[1], 0x00cf_9b00_0000_ffff);
        let cs = segment_from_entry(gdt[1], CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.db, cs.l, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
    }

    #[test]
    fn long_mode_code_and_tss() {
        let gdt = boot_gdt(true);
        let cs = segment_from_entry(gdt[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db), (1, 0));
        let tr = segment_from_entry(gdt[3], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.limit, tr.g, tr.s), (0xb, 0x67, 0, 0));
    }
}
