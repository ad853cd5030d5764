//! The identity-mapped page tables a long-mode (bzImage) entry needs: the first GiB with
//! 2 MiB pages, enough for the kernel to reach its own tables.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest physical address of the PML4 (CR3).
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;

/// Writes PML4 → PDPT → PD mapping guest virtual 0..1 GiB to the same physical addresses.
pub fn write_identity_map(memory: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    memory.write_obj(PDPT_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    memory.write_obj(PD_ADDR | PRESENT_WRITABLE, GuestAddress(PDPT_ADDR))?;
    for i in 0..512u64 {
        let entry = (i << 21) | HUGE_PAGE | PRESENT_WRITABLE;
        memory.write_obj(entry, GuestAddress(PD_ADDR + i * 8))?;
    }
    Ok(())
}
