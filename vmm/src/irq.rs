//! Interrupt routing: which KVM GSI raises which interrupt.
//!
//! GSIs 0..24 keep KVM's default routing to the PIC and IOAPIC pins (the serial port uses
//! GSI 4). Every MSI-X vector of every PCI device gets its own GSI from 24 up, with an irqfd
//! that the vhost-user backend signals directly; the route of such a GSI is rewritten
//! whenever the guest programs or masks the vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::boot::mptable::IOAPIC_PINS;

/// An MSI message: what the device writes where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (the LAPIC window plus destination bits).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// Allocates GSIs for MSI vectors and keeps KVM's routing table in sync with them.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    msi_routes: BTreeMap<u32, MsiMessage>,
}

impl IrqRouter {
    /// A router for `vm` with only the default PIC/IOAPIC routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: u32::from(IOAPIC_PINS),
                msi_routes: BTreeMap::new(),
            }),
        }
    }

    /// Reserves `count` consecutive GSIs for MSI vectors; returns the first, or `None` when
    /// KVM's routing table could not hold them all at once (see [`MAX_MSI_VECTORS`]).
    pub fn allocate(&self, count: u32) -> Option<u32> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = state.next_gsi;
        let end = first.checked_add(count)?;
        if end - u32::from(IOAPIC_PINS) > MAX_MSI_VECTORS {
            return None;
        }
        state.next_gsi = end;
        Some(first)
    }

    /// Routes `gsi` to `message`, or removes its route (`None`: masked or unprogrammed), and
    /// hands the new table to KVM.
    pub fn set_msi_route(
        &self,
        gsi: u32,
        message: Option<MsiMessage>,
    ) -> Result<(), kvm_ioctls::Error> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes = state.msi_routes.clone();
        let changed = match message {
            Some(m) => routes.insert(gsi, m) != Some(m),
            None => routes.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        // Kept only once KVM took it: a table KVM refused must not spoil later updates.
        self.vm.set_gsi_routing(&routing_table(&routes))?;
        state.msi_routes = routes;
        Ok(())
    }
}

/// Most MSI vectors all devices together may have: KVM's routing table holds 4096 entries
/// (KVM_MAX_IRQ_ROUTES), of which the PIC and IOAPIC pins take 40, and GSIs stay below 4096.
pub const MAX_MSI_VECTORS: u32 = 4096 - 40;

/// KVM's default irqchip routes followed by the MSI routes.
fn routing_table(msi_routes: &BTreeMap<u32, MsiMessage>) -> KvmIrqRouting {
    let mut entries = Vec::new();
    for pin in 0..u32::from(IOAPIC_PINS) {
        if pin < 16 {
            let (chip, chip_pin) = if pin < 8 {
                (KVM_IRQCHIP_PIC_MASTER, pin)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
            };
            entries.push(irqchip_entry(pin, chip, chip_pin));
        }
        entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
    }
    for (&gsi, message) in msi_routes {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = message.address as u32;
        entry.u.msi.address_hi = (message.address >> 32) as u32;
        entry.u.msi.data = message.data;
        entries.push(entry);
    }
    let mut table = KvmIrqRouting::new(0).expect("an empty routing table always fits");
    for entry in entries {
        table
            .push(entry)
            .expect("40 irqchip routes plus MAX_MSI_VECTORS fit in KVM_MAX_IRQ_ROUTES");
    }
    table
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: MsiMessage = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };

    fn router() -> IrqRouter {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        vm.create_irq_chip().expect("create the irqchip");
        IrqRouter::new(Arc::new(vm))
    }

    #[test]
    fn gsis_stop_where_kvm_routing_ends() {
        let r = router();
        assert_eq!(r.allocate(MAX_MSI_VECTORS - 8), Some(24));
        assert_eq!(r.allocate(9), None);
        assert_eq!(r.allocate(8), Some(24 + MAX_MSI_VECTORS - 8));
        assert_eq!(r.allocate(1), None);
        // Every vector routed at once: KVM takes the table.
        let routes = (24..24 + MAX_MSI_VECTORS)
            .map(|gsi| (gsi, MESSAGE))
            .collect();
        r.vm.set_gsi_routing(&routing_table(&routes)).unwrap();
    }

    #[test]
    fn a_route_kvm_refuses_does_not_spoil_later_ones() {
        let r = router();
        assert!(r.set_msi_route(5000, Some(MESSAGE)).is_err());
        r.set_msi_route(24, Some(MESSAGE)).unwrap();
        r.set_msi_route(24, None).unwrap();
    }

    #[test]
    fn table_keeps_the_legacy_routes_and_adds_msi() {
        let mut routes = BTreeMap::new();
        routes.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        );
        let table = routing_table(&routes);
        let entries = table.as_slice();
        // 16 PIC routes + 24 IOAPIC routes + 1 MSI route.
        assert_eq!(entries.len(), 41);
        let msi = entries.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was written as an MSI route.
        assert_eq!(
            unsafe { (msi.u.msi.address_lo, msi.u.msi.data) },
            (0xfee0_0000, 0x41)
        );
    }
}
