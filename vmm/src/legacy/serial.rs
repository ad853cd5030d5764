//! The 16550A serial port at 0x3f8 (COM1) on IRQ 4, built on `vm-superio`'s emulation, with
//! output to stdout or a file and, for stdin consoles, guest input from a reader thread.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use cowbird_daemon::logging::Occurrences;
use kvm_ioctls::VmFd;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORTS: u16 = 8;
/// The ISA interrupt of COM1.
pub const COM1_IRQ: u32 = 4;

/// An eventfd registered as an irqfd: writing it raises the interrupt.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The emulated UART with its interrupt and output.
type Uart = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The serial port, shared by the vCPU threads and the input thread.
#[derive(Clone)]
pub struct SerialPort {
    uart: Arc<Mutex<Uart>>,
    /// Output the UART could not write (a closed stdout, a full disk): logged at powers of
    /// two only, since the guest goes on printing.
    output_errors: Arc<Occurrences>,
}

impl SerialPort {
    /// A UART writing to `out`, interrupting on GSI [`COM1_IRQ`] of `vm`.
    pub fn new(vm: &VmFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let irq = crate::vm::new_eventfd()?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            uart: Arc::new(Mutex::new(Serial::new(IrqTrigger(irq), out))),
            output_errors: Arc::default(),
        })
    }

    /// Guest read of register `offset`.
    pub fn read(&self, offset: u16) -> u8 {
        self.lock().read(offset as u8)
    }

    /// Guest write of register `offset`.
    pub fn write(&self, offset: u16, value: u8) {
        if let Err(e) = self.lock().write(offset as u8, value) {
            if let Some(n) = self.output_errors.count() {
                tracing::warn!("serial output: {e:?} (error {n})");
            }
        }
    }

    /// Feeds `input` to the guest from a background thread until it reaches end of file.
    /// Bytes wait while the UART's receive FIFO is full.
    pub fn spawn_input(&self, mut input: impl Read + Send + 'static) {
        let port = self.clone();
        std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = input.read(&mut buf) {
                    let mut pending = &buf[..n];
                    while !pending.is_empty() {
                        let room = {
                            let mut serial = port.lock();
                            let room = serial.fifo_capacity().min(pending.len());
                            if room > 0 {
                                let _ = serial.enqueue_raw_bytes(&pending[..room]);
                            }
                            room
                        };
                        pending = &pending[room..];
                        if room == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                }
            })
            .expect("spawning a thread only fails when the process is out of resources");
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }
}
