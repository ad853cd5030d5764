//! vCPUs: their initial state for the chosen boot protocol and the thread that runs each one,
//! dispatching its I/O exits to the [`Platform`].

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::boot::gdt::{self, BOOT_GDT_ADDR, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::boot::paging::PML4_ADDR;
use crate::boot::EntryPoint;
use crate::exit::VmEvent;
use crate::platform::Platform;

/// Stack pointer for a long-mode entry (the protocol wants one; the kernel switches soon).
const BOOT_STACK: u64 = 0x8ff0;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_TSC: u32 = 0x10;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("vCPU {cpu}: KVM {what} failed: {source}")]
pub struct VcpuError {
    cpu: u8,
    what: &'static str,
    source: kvm_ioctls::Error,
}

/// One vCPU, set up and ready to run.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID and local APIC wiring. The boot processor (id 0) is
    /// also put at `entry` (whose GDT and page tables [`crate::boot::load`] wrote); the others
    /// wait for the INIT/SIPI the guest sends them.
    pub fn new(vm: &VmFd, id: u8, cpuid: &CpuId, entry: EntryPoint) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError {
                cpu: id,
                what,
                source,
            }
        };
        let fd = vm.create_vcpu(u64::from(id)).map_err(err("CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(err("SET_CPUID2"))?;
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            },
            // Every vCPU starts with TSC 0, so KVM keeps their TSCs synchronised.
            kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: 0,
                ..Default::default()
            },
        ])
        .expect("two MSR entries fit");
        fd.set_msrs(&msrs).map_err(err("SET_MSRS"))?;
        let mut lapic = fd.get_lapic().map_err(err("GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("SET_LAPIC"))?;
        let vcpu = Self { id, fd };
        if id == 0 {
            vcpu.enter(entry)?;
        }
        Ok(vcpu)
    }

    /// Sets registers, segments and (for long mode) paging so the next run enters `entry`.
    fn enter(&self, entry: EntryPoint) -> Result<(), VcpuError> {
        let err = |what| {
            move |source| VcpuError {
                cpu: self.id,
                what,
                source,
            }
        };
        let long_mode = matches!(entry, EntryPoint::LongMode { .. });
        let table = gdt::boot_gdt(long_mode);
        let mut sregs = self.fd.get_sregs().map_err(err("GET_SREGS"))?;
        sregs.gdt.base = BOOT_GDT_ADDR;
        sregs.gdt.limit = (table.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cs = gdt::segment_from_entry(table[1], CODE_SELECTOR);
        let data = gdt::segment_from_entry(table[2], DATA_SELECTOR);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = gdt::segment_from_entry(table[3], TSS_SELECTOR);
        let mut regs = self.fd.get_regs().map_err(err("GET_REGS"))?;
        regs.rflags = 0x2;
        match entry {
            EntryPoint::Pvh { entry, start_info } => {
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = start_info;
            }
            EntryPoint::LongMode { entry, zero_page } => {
                sregs.cr3 = PML4_ADDR;
                sregs.cr4 = CR4_PAE;
                sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
                sregs.efer = EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rsi = zero_page;
                regs.rsp = BOOT_STACK;
                regs.rbp = BOOT_STACK;
            }
        }
        self.fd.set_sregs(&sregs).map_err(err("SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(err("SET_REGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(err("SET_FPU"))?;
        Ok(())
    }

    /// Runs the vCPU on its own thread until the guest stops it; the reason goes to `events`.
    /// The vCPU parks at `gate` while the VM is paused.
    pub fn spawn(
        mut self,
        platform: Arc<Platform>,
        events: Sender<VmEvent>,
        gate: Arc<PauseGate>,
    ) -> std::io::Result<VcpuHandle> {
        install_kick_handler()?;
        let control = Arc::new(VcpuControl {
            gate,
            ..Default::default()
        });
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                // A panic on this thread must still end the VM: the main thread waits for an
                // event, and a vCPU that is gone would leave the guest hung.
                let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.run(&platform, &thread_control)
                }))
                .unwrap_or_else(|panic| VmEvent::VcpuError {
                    cpu: self.id,
                    reason: format!("the vCPU thread panicked: {}", panic_message(&*panic)),
                    registers: self.dump_registers(),
                });
                let _ = events.send(event);
            })?;
        Ok(VcpuHandle {
            pthread: thread.as_pthread_t(),
            control,
            _thread: thread,
        })
    }

    fn run(&mut self, platform: &Platform, control: &VcpuControl) -> VmEvent {
        loop {
            control.gate.park_if_paused();
            if control.dump_requested.swap(false, Ordering::Relaxed) {
                eprintln!(
                    "vmm: vCPU {} registers:\n{}",
                    self.id,
                    self.dump_registers()
                );
            }
            let exit = self.fd.run();
            control.exits.fetch_add(1, Ordering::Relaxed);
            let failure = match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    platform.pio_read(port, data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    platform.pio_write(port, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    platform.mmio_read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    platform.mmio_write(addr, data);
                    None
                }
                Ok(VcpuExit::Shutdown) => {
                    return VmEvent::TripleFault {
                        cpu: self.id,
                        registers: self.dump_registers(),
                    }
                }
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    Some(format!(
                        "KVM internal error, suberror {} (1 = instruction emulation failed), data {:x?}",
                        internal.suberror,
                        &internal.data[..(internal.ndata as usize).min(internal.data.len())]
                    ))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                    "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                )),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN failed: {e}")),
            };
            if let Some(reason) = failure {
                return VmEvent::VcpuError {
                    cpu: self.id,
                    reason,
                    registers: self.dump_registers(),
                };
            }
        }
    }

    /// The registers a crash report shows.
    fn dump_registers(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "  (registers unavailable)".into();
        };
        format!(
            "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#06x} (base {:#x}, l={} db={}) ss={:#06x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.ss.selector
        )
    }
}

/// Requests from other threads to a running vCPU, and its counters.
#[derive(Default)]
struct VcpuControl {
    dump_requested: AtomicBool,
    exits: AtomicU64,
    gate: Arc<PauseGate>,
}

/// Where vCPUs wait while the VM is paused.
#[derive(Default)]
pub struct PauseGate {
    paused: Mutex<bool>,
    resumed: Condvar,
    parked: AtomicUsize,
}

impl PauseGate {
    /// Blocks the calling vCPU thread while the VM is paused.
    fn park_if_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if *paused {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *paused {
                paused = self.resumed.wait(paused).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn set(&self, paused: bool) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = paused;
        if !paused {
            self.resumed.notify_all();
        }
    }
}

/// All vCPUs of the VM: pause, resume, counters, register dumps.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    gate: Arc<PauseGate>,
}

impl Vcpus {
    /// The set of `handles`, which park at `gate`.
    pub fn new(handles: Vec<VcpuHandle>, gate: Arc<PauseGate>) -> Self {
        Self { handles, gate }
    }

    /// Stops every vCPU and returns once all are parked.
    pub fn pause(&self) {
        self.gate.set(true);
        // A kick that lands just before a vCPU enters KVM_RUN is lost; kick until all park.
        while self.gate.parked.load(Ordering::SeqCst) < self.handles.len() {
            for h in &self.handles {
                h.kick();
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.gate.set(false);
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        *self.gate.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of KVM exits of each vCPU so far.
    pub fn exit_counts(&self) -> Vec<u64> {
        self.handles
            .iter()
            .map(|h| h.control.exits.load(Ordering::Relaxed))
            .collect()
    }

    /// Makes every vCPU print its registers to stderr.
    pub fn dump_registers(&self) {
        for h in &self.handles {
            h.request_register_dump();
        }
    }
}

/// A running vCPU thread, for the main thread to interrupt.
pub struct VcpuHandle {
    pthread: libc::pthread_t,
    control: Arc<VcpuControl>,
    _thread: std::thread::JoinHandle<()>,
}

impl VcpuHandle {
    /// Makes the vCPU print its registers to stderr (at its next exit, which this forces).
    pub fn request_register_dump(&self) {
        self.control.dump_requested.store(true, Ordering::Relaxed);
        self.kick();
    }

    /// Forces the vCPU out of KVM_RUN with the kick signal.
    fn kick(&self) {
        // SAFETY: the thread is alive while its JoinHandle is held; the signal has a handler.
        unsafe { libc::pthread_kill(self.pthread, kick_signal()) };
    }
}

/// The real-time signal that interrupts KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs a no-op handler for the kick signal, so that it interrupts KVM_RUN with EINTR
/// instead of killing the process.
fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Sets the delivery mode bits (10:8) of a local vector table register.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_reach_the_report() {
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let literal = std::panic::catch_unwind(|| panic!("a literal")).unwrap_err();
        let formatted = std::panic::catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        std::panic::set_hook(quiet);
        assert_eq!(panic_message(&*literal), "a literal");
        assert_eq!(panic_message(&*formatted), "formatted 7");
    }
}
