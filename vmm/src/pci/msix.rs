//! MSI-X: the capability's control word and the vector table a device keeps in one of its
//! BARs. Each vector is backed by a KVM GSI and an irqfd; programming, masking or unmasking a
//! vector rewrites that GSI's route, so interrupts never pass through the VMM.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::irq::{IrqRouter, MsiMessage};

/// MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Size of one vector table entry.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

/// A device's MSI-X vectors.
pub struct Msix {
    entries: Vec<Entry>,
    irqfds: Vec<EventFd>,
    first_gsi: u32,
    router: Arc<IrqRouter>,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    /// `vectors` masked vectors, each with a GSI from `router` and an irqfd registered on it.
    pub fn new(
        vectors: u16,
        router: Arc<IrqRouter>,
        vm: &kvm_ioctls::VmFd,
    ) -> std::io::Result<Self> {
        let first_gsi = router.allocate(u32::from(vectors)).ok_or_else(|| {
            std::io::Error::other(format!(
                "{vectors} more MSI-X vectors do not fit in KVM's interrupt routing table \
                 (at most {} for all devices; use fewer queues or devices)",
                crate::irq::MAX_MSI_VECTORS
            ))
        })?;
        let mut irqfds = Vec::with_capacity(usize::from(vectors));
        for v in 0..u32::from(vectors) {
            let fd = crate::vm::new_eventfd()?;
            vm.register_irqfd(&fd, first_gsi + v)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            irqfds.push(fd);
        }
        let masked = Entry {
            control: VECTOR_MASKED,
            ..Default::default()
        };
        Ok(Self {
            entries: vec![masked; usize::from(vectors)],
            irqfds,
            first_gsi,
            router,
            enabled: false,
            function_masked: false,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Whether the device has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The eventfd that raises `vector`, for a backend to signal; `None` for
    /// VIRTIO_MSI_NO_VECTOR or an out-of-range vector.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }

    /// The GSI of `vector` (tests detach its irqfd from KVM to count what is signalled).
    #[cfg(test)]
    pub(crate) fn gsi(&self, vector: u16) -> u32 {
        self.first_gsi + u32::from(vector)
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) != (self.enabled, self.function_masked) {
            let before: Vec<bool> = (0..self.entries.len())
                .map(|v| self.deliverable(v))
                .collect();
            self.enabled = enabled;
            self.function_masked = function_masked;
            for (v, could_deliver) in before.into_iter().enumerate() {
                self.update_route(v, could_deliver);
            }
        }
    }

    /// Whether vector `index` reaches the guest: MSI-X enabled, neither the function nor
    /// the vector masked.
    fn deliverable(&self, index: usize) -> bool {
        self.enabled && !self.function_masked && self.entries[index].control & VECTOR_MASKED == 0
    }

    /// Guest read from the vector table at byte `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = [0xffu8; ENTRY_SIZE as usize];
        let index = (offset / ENTRY_SIZE) as usize;
        if let Some(e) = self.entries.get(index) {
            bytes[0..8].copy_from_slice(&e.address.to_le_bytes());
            bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
            bytes[12..16].copy_from_slice(&e.control.to_le_bytes());
        }
        let start = (offset % ENTRY_SIZE) as usize;
        let end = (start + data.len()).min(bytes.len());
        data[..end - start].copy_from_slice(&bytes[start..end]);
    }

    /// Guest write to the vector table at byte `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        if index >= self.entries.len() {
            return;
        }
        let could_deliver = self.deliverable(index);
        let entry = &mut self.entries[index];
        let mut bytes = [0u8; ENTRY_SIZE as usize];
        bytes[0..8].copy_from_slice(&entry.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&entry.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&entry.control.to_le_bytes());
        let start = (offset % ENTRY_SIZE) as usize;
        let end = (start + data.len()).min(bytes.len());
        bytes[start..end].copy_from_slice(&data[..end - start]);
        entry.address = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
        entry.data = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        entry.control = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
        self.update_route(index, could_deliver);
    }

    /// Sets the route of vector `index` from its current state; `could_deliver` is whether
    /// it reached the guest before the change. An interrupt signalled while it could not is
    /// not remembered, so one is raised when it can again, whether the vector, the function
    /// or MSI-X as a whole was unmasked: a spurious virtio interrupt is harmless, a lost one
    /// stalls a queue.
    fn update_route(&mut self, index: usize, could_deliver: bool) {
        let e = self.entries[index];
        let deliverable = self.deliverable(index);
        let message = deliverable.then_some(MsiMessage {
            address: e.address,
            data: e.data,
        });
        let gsi = self.first_gsi + index as u32;
        if let Err(err) = self.router.set_msi_route(gsi, message) {
            tracing::error!(gsi, %err, "cannot update MSI route");
            return;
        }
        if deliverable && !could_deliver {
            let _ = self.irqfds[index].write(1);
        }
    }

    /// Masks every vector and disables MSI-X, as on a device reset.
    pub fn reset(&mut self) {
        self.enabled = false;
        for v in 0..self.entries.len() {
            self.entries[v] = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
            self.update_route(v, true);
        }
    }
}

/// The MSI-X capability body (after ID and next pointer) for `vectors` vectors with the table
/// at `table_offset` and the pending-bit array at `pba_offset`, both in BAR `bar`; and its
/// guest-writable mask (only the enable and function-mask bits).
pub fn capability(vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&(vectors - 1).to_le_bytes());
    body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    let mut writable = vec![0u8; body.len()];
    writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
    (body, writable)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: u64 = 0xfee0_0000;

    /// `vectors` MSI-X vectors of a new VM, with vector 0's irqfd detached from KVM so the
    /// test sees every interrupt raised on it.
    fn msix(vectors: u16) -> (Msix, EventFd) {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create a VM"));
        vm.create_irq_chip().expect("create the irqchip");
        let msix = Msix::new(vectors, Arc::new(IrqRouter::new(vm.clone())), &vm).unwrap();
        let irqfd = msix.irqfd(0).unwrap();
        vm.unregister_irqfd(irqfd, msix.gsi(0)).unwrap();
        let observed = irqfd.try_clone().unwrap();
        (msix, observed)
    }

    fn program(msix: &mut Msix, vector: u16, masked: bool) {
        let mut entry = ADDRESS.to_le_bytes().to_vec();
        entry.extend_from_slice(&(0x41 + u32::from(vector)).to_le_bytes());
        entry.extend_from_slice(&u32::from(masked).to_le_bytes());
        msix.write_table(u64::from(vector) * ENTRY_SIZE, &entry);
    }

    fn interrupts(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    #[test]
    fn a_vector_gets_one_interrupt_whenever_it_can_deliver_again() {
        let (mut m, irq) = msix(2);
        // Linux's order: enable with the function masked, program, unmask the function.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, false);
        assert_eq!(interrupts(&irq), 0);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(interrupts(&irq), 1, "function unmasked");
        m.set_control(0);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(interrupts(&irq), 1, "MSI-X enabled");
        program(&mut m, 0, true);
        program(&mut m, 0, false);
        assert_eq!(interrupts(&irq), 1, "vector unmasked");
        // Reprogramming a deliverable vector, or unmasking the function of a masked one,
        // raises nothing.
        program(&mut m, 0, false);
        program(&mut m, 0, true);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(interrupts(&irq), 0);
    }
}
