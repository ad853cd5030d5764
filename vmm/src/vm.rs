//! The KVM virtual machine: guest memory backed by a memfd (so vhost-user backends can map
//! it), its memory slots, the in-kernel interrupt controllers and PIT.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::memory::MemoryLayout;

/// A new eventfd for wiring the VM (an irqfd, an ioeventfd, a call fd): non-blocking and
/// close-on-exec, so that the backend processes the VMM starts inherit none of them — a
/// backend holding another device's irqfd could inject that device's interrupts.
pub fn new_eventfd() -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// Guest physical address of the 3-page region KVM needs for the TSS on Intel hosts; inside
/// the platform range below 4 GiB, never RAM.
const TSS_ADDR: usize = 0xfffb_d000;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you in the kvm group?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The guest memory file could not be created or sized.
    #[error("cannot create guest memory ({size} bytes): {source}")]
    Memory {
        /// Requested RAM size.
        size: u64,
        /// What failed.
        source: std::io::Error,
    },
}

/// A created VM with its guest memory mapped and registered.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM: guest RAM as laid out by `layout` in one memfd (of 2 MiB huge pages if
    /// `hugepages`), one KVM slot per RAM region, the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn new(layout: &MemoryLayout, hugepages: bool) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            what: "CREATE_VM",
            source,
        })?;
        let memory = create_guest_memory(layout, hugepages)?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the mapping belongs to `memory`, which lives as long as the VM (both are
            // owned by `Vm`), and no other slot covers this guest range.
            unsafe { fd.set_user_memory_region(slot_region) }.map_err(|source| VmError::Kvm {
                what: "SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        fd.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            memory,
        })
    }

    /// The KVM system handle (for CPUID queries).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor, shared with devices that register irqfds and ioeventfds.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Maps guest RAM from one memfd, region after region. Huge pages are reserved up front
/// (fallocate), so a host without enough of them fails here, not with a SIGBUS later.
fn create_guest_memory(layout: &MemoryLayout, hugepages: bool) -> Result<GuestMemoryMmap, VmError> {
    let size = layout.size();
    let memory_err = |source| VmError::Memory { size, source };
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if hugepages {
        flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
    }
    let fd = memfd_create(c"cowbird-guest-ram", flags).map_err(|e| memory_err(e.into()))?;
    let file = File::from(fd);
    file.set_len(size).map_err(memory_err)?;
    if hugepages {
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64).map_err(
            |e| {
                memory_err(std::io::Error::other(format!(
                    "cannot reserve {} huge pages of 2 MiB ({e}); see /proc/sys/vm/nr_hugepages",
                    size >> 21
                )))
            },
        )?;
    }
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (addr, len) in layout.guest_memory_ranges() {
        let file = file.try_clone().map_err(memory_err)?;
        ranges.push((addr, len, Some(FileOffset::new(file, offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| memory_err(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn guest_memory_is_one_shared_file() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let memory = create_guest_memory(&layout, false).unwrap();
        let region = memory.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes through the file: what a vhost-user backend that maps it sees.
        let file = region.file_offset().unwrap().file();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
