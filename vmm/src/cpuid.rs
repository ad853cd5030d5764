//! The CPUID the guest sees: what KVM supports on this host, minus what this VMM does not
//! emulate, with each vCPU's APIC ID and the topology (one package, one thread per core).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Leaf 1 ECX: the guest runs under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: performance/debug capability MSR (no PMU is emulated).
const ECX_PDCM: u32 = 1 << 15;
/// KVM paravirtual features offered (leaf 0x40000001 EAX): QEMU's defaults, i.e. kvmclock
/// (both MSR sets and the stable bit), no-op port 0x80 delays, async page faults, steal time
/// and PV EOI. The PV IPI, TLB-flush, sched-yield and poll-control hypercalls are left out,
/// as QEMU leaves them out unless asked.
const KVM_FEATURES_OFFERED: u32 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 24);
/// Leaf 0x80000001 ECX: AMD topology extensions (leaf 0x8000001e).
const ECX_TOPOEXT: u32 = 1 << 22;
/// Leaf 0x80000007 EDX: the TSC runs at a constant rate in all states.
const EDX_INVARIANT_TSC: u32 = 1 << 8;
/// Leaf 1 EDX: several logical processors per package.
const EDX_HTT: u32 = 1 << 28;

/// KVM's supported CPUID, for [`for_vcpu`].
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// The CPUID of vCPU `id` out of `cpus`.
pub fn for_vcpu(supported: &CpuId, id: u8, cpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        adjust(entry, id, cpus);
    }
    cpuid
}

fn adjust(entry: &mut kvm_cpuid_entry2, id: u8, cpus: u8) {
    let core_bits = u32::from(cpus).next_power_of_two().trailing_zeros();
    match entry.function {
        1 => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
            entry.ecx = (entry.ecx | ECX_HYPERVISOR) & !ECX_PDCM;
            if cpus > 1 {
                entry.edx |= EDX_HTT;
            }
        }
        4 => {
            // Cores per package - 1 in bits 31:26; each cache is private to one core.
            entry.eax = (entry.eax & 0x03ff_ffff & !(0xfff << 14)) | ((u32::from(cpus) - 1) << 26);
        }
        // Thermal/power management and the performance monitoring unit: not emulated.
        6 | 0xa => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb => {
            // Extended topology: level 0 = threads (1 per core), level 1 = cores.
            entry.edx = u32::from(id);
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = u32::from(cpus);
                    entry.ecx = (2 << 8) | 1;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x4000_0001 => entry.eax &= KVM_FEATURES_OFFERED,
        // Invariant TSC: not promised (QEMU hides it too unless asked): a guest that trusts
        // it skips the TSC synchronisation checks between vCPUs.
        0x8000_0007 => entry.edx &= !EDX_INVARIANT_TSC,
        // AMD: number of cores (ECX 7:0 = cores - 1, 15:12 = APIC ID bits for the core).
        0x8000_0008 => {
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(cpus) - 1);
        }
        // AMD extended topology (leaf 0x8000001e) is not described: TOPOEXT off.
        0x8000_0001 => entry.ecx &= !ECX_TOPOEXT,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology() {
        let mut leaf1 = entry(1, 0);
        adjust(&mut leaf1, 3, 4);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        let mut cores = entry(0xb, 1);
        adjust(&mut cores, 3, 4);
        assert_eq!((cores.eax, cores.ebx, cores.edx), (2, 4, 3));
    }

    #[test]
    fn kvm_pv_features_are_qemus_defaults() {
        let mut kvm = kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: u32::MAX,
            ..Default::default()
        };
        adjust(&mut kvm, 0, 2);
        assert_eq!(kvm.eax, KVM_FEATURES_OFFERED);
        assert_eq!(kvm.eax & (1 << 11), 0, "no PV IPI");
    }

    #[test]
    fn pmu_is_hidden() {
        let mut pmu = kvm_cpuid_entry2 {
            function: 0xa,
            eax: 0x0704_3002,
            ..Default::default()
        };
        adjust(&mut pmu, 0, 1);
        assert_eq!(pmu.eax, 0);
    }
}
