//! Loading a Linux kernel into guest memory and describing how to enter it.
//!
//! Two protocols:
//! - **PVH** for an ELF `vmlinux` that has a PVH entry note: the kernel is entered in 32-bit
//!   protected mode with `%ebx` pointing at an `hvm_start_info`. No decompressor runs, which
//!   matters when guest kernel code is slow (see docs/architecture.md).
//! - **Linux 64-bit boot protocol** for a `bzImage`: the protected-mode kernel is loaded at
//!   1 MiB and entered in long mode with `%rsi` pointing at a `boot_params` zero page.
//!
//! Either way the command line, the initramfs (at the top of low RAM) and an MP table (so the
//! kernel finds its CPUs and IOAPIC without ACPI) are written too.

pub mod gdt;
pub mod mptable;
pub mod paging;
mod protocol;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{MemoryLayout, HIGH_RAM_START, PAGE_SIZE};

pub use protocol::{write_bzimage_params, write_pvh_start_info};

/// Guest physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room reserved for the command line, terminating NUL included.
pub const CMDLINE_MAX: usize = 2048;

/// How the vCPU enters the loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, `%ebx` = start info (PVH).
    Pvh {
        /// Guest physical address of the PVH entry.
        entry: u64,
        /// Guest physical address of the `hvm_start_info`.
        start_info: u64,
    },
    /// 64-bit long mode with identity-mapped page tables, `%rsi` = zero page (bzImage).
    LongMode {
        /// Guest physical address of the 64-bit entry.
        entry: u64,
        /// Guest physical address of the `boot_params` zero page.
        zero_page: u64,
    },
}

/// What `--initramfs` loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initramfs {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Why a kernel could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux with a PVH note nor a bzImage.
    #[error("{} is not a bootable x86_64 Linux kernel (need an ELF vmlinux with a PVH entry or a bzImage): {reason}", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What the loaders said.
        reason: String,
    },
    /// The initramfs does not fit in guest RAM next to the kernel.
    #[error("initramfs {} ({size} bytes) does not fit in guest memory below {limit:#x}", path.display())]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit, terminating NUL excluded.
        max: usize,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// What failed.
        source: vm_memory::GuestMemoryError,
    },
}

/// Loads `kernel` (and `initramfs`) into `memory`, writes the command line, the boot
/// structures and the MP table for `cpus` CPUs, and returns how to enter the kernel.
pub fn load(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<EntryPoint, BootError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BootError::Read { path, source }
    };
    let mut file = File::open(kernel).map_err(read_err(kernel))?;
    let loaded = load_kernel(memory, kernel, &mut file)?;
    let kernel_end = loaded.result.kernel_end;

    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "the command line",
            source,
        })?;

    let initramfs = match initramfs {
        Some(path) => {
            let limit = loaded
                .result
                .setup_header
                .map_or(u64::MAX, |h| u64::from(h.initrd_addr_max) + 1);
            Some(load_initramfs(memory, layout, path, kernel_end, limit)?)
        }
        None => None,
    };
    mptable::write(memory, cpus).map_err(|source| BootError::GuestMemory {
        what: "the MP table",
        source,
    })?;

    let entry = match loaded.kind {
        KernelKind::Pvh(entry) => {
            let start_info = write_pvh_start_info(memory, layout, initramfs)?;
            EntryPoint::Pvh { entry, start_info }
        }
        KernelKind::BzImage => {
            let header = loaded.result.setup_header.unwrap_or_default();
            let zero_page = write_bzimage_params(memory, layout, header, initramfs)?;
            EntryPoint::LongMode {
                // The 64-bit entry is 0x200 bytes into the protected-mode kernel.
                entry: loaded.result.kernel_load.0 + 0x200,
                zero_page,
            }
        }
    };
    let long_mode = matches!(entry, EntryPoint::LongMode { .. });
    let tables = || -> Result<(), vm_memory::GuestMemoryError> {
        gdt::write(memory, long_mode)?;
        if long_mode {
            paging::write_identity_map(memory)?;
        }
        Ok(())
    };
    tables().map_err(|source| BootError::GuestMemory {
        what: "the boot GDT and page tables",
        source,
    })?;
    Ok(entry)
}

/// Which protocol a loaded kernel is entered by.
enum KernelKind {
    Pvh(u64),
    BzImage,
}

struct LoadedKernel {
    result: KernelLoaderResult,
    kind: KernelKind,
}

/// Tries the ELF loader (PVH), then the bzImage loader.
fn load_kernel(
    memory: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
) -> Result<LoadedKernel, BootError> {
    let highmem = Some(GuestAddress(HIGH_RAM_START));
    let elf_error = match Elf::load(memory, None, file, highmem) {
        Ok(result) => {
            return match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                    result,
                    kind: KernelKind::Pvh(entry.0),
                }),
                _ => Err(BootError::NotAKernel {
                    path: path.to_owned(),
                    reason: "the ELF file has no PVH entry note (build with CONFIG_PVH=y)".into(),
                }),
            }
        }
        Err(e) => e,
    };
    match BzImage::load(memory, None, file, highmem) {
        Ok(result) => Ok(LoadedKernel {
            result,
            kind: KernelKind::BzImage,
        }),
        Err(bz_error) => Err(BootError::NotAKernel {
            path: path.to_owned(),
            reason: format!("as ELF: {elf_error}; as bzImage: {bz_error}"),
        }),
    }
}

/// Copies the initramfs to the highest page-aligned address of low RAM that is below `limit`
/// and above the kernel.
fn load_initramfs(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<Initramfs, BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = layout.ram_regions()[0].end().min(limit);
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
        limit: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::GuestMemory {
            what: "the initramfs",
            source,
        })?;
    Ok(Initramfs { addr, size })
}
