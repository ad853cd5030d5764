//! The structures each boot protocol hands the kernel: PVH's `hvm_start_info` and the bzImage
//! protocol's `boot_params` zero page.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, Initramfs, CMDLINE_ADDR, CMDLINE_MAX};
use crate::memory::MemoryLayout;

/// Guest physical address of the PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// Guest physical address of the PVH module list (the initramfs).
const PVH_MODLIST_ADDR: u64 = 0x6040;
/// Guest physical address of the PVH memory map.
const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Guest physical address of the bzImage zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_LOADED_HIGH: u8 = 0x01;
const KERNEL_CAN_USE_HEAP: u8 = 0x80;

/// Writes the PVH start info, memory map and module list; returns the start info's address.
pub fn write_pvh_start_info(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    initramfs: Option<Initramfs>,
) -> Result<u64, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initramfs.is_some()),
        modlist_paddr: if initramfs.is_some() {
            PVH_MODLIST_ADDR
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some(initrd) = initramfs {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, memory).map_err(|e| BootError::GuestMemory {
        what: "the PVH start info",
        source: vm_memory::GuestMemoryError::IOError(std::io::Error::other(e.to_string())),
    })?;
    Ok(PVH_START_INFO_ADDR)
}

/// Writes the bzImage zero page from the kernel's own setup header; returns its address.
pub fn write_bzimage_params(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    header: setup_header,
    initramfs: Option<Initramfs>,
) -> Result<u64, BootError> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= KERNEL_LOADED_HIGH | KERNEL_CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = CMDLINE_MAX as u32;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(layout.e820()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    params.e820_entries = layout.e820().len().min(params.e820_table.len()) as u8;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "the zero page",
            source,
        })?;
    Ok(ZERO_PAGE_ADDR)
}
