//! Putting a VM together from its [`VmConfig`] and running it until the guest stops.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};

use crate::boot;
use crate::cli::{DiskBackend, NetBackend, SerialConfig, VmConfig};
use crate::cpuid;
use crate::irq::IrqRouter;
use crate::legacy::{ResetPort, SerialPort};
use crate::memory::PCI_HOLE_START;
use crate::pci::PciBus;
use crate::platform::Platform;
use crate::vcpu::{Vcpu, VcpuHandle};
use crate::virtio::pci::BAR_SIZE;
use crate::virtio::{reconnect, DeviceType, VhostUserConnection, VirtioPciDevice};
use crate::vm::Vm;

/// virtio-blk feature bit: the device is read-only.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

/// Builds the VM described by `config`, runs it, and returns the exit status for how it
/// ended (see [`crate::exit`]).
pub fn run(config: &VmConfig) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let sigusr1 = block_sigusr1()?;
    let vm = Vm::new(&config.memory)?;
    let max = vm.kvm().get_max_vcpus();
    if usize::from(config.cpus) > max {
        bail!(
            "--cpus {}: this host's KVM allows at most {max}",
            config.cpus
        );
    }
    let entry = boot::load(
        vm.memory(),
        &config.memory,
        &config.kernel,
        config.initramfs.as_deref(),
        &config.cmdline,
        config.cpus,
    )?;
    tracing::debug!(?entry, "kernel loaded");

    let (events, exits) = mpsc::channel();
    let serial = match &config.serial {
        SerialConfig::Stdio => {
            let port = SerialPort::new(vm.fd(), Box::new(std::io::stdout()))?;
            port.spawn_input(std::io::stdin());
            Some(port)
        }
        SerialConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial output {}", path.display()))?;
            Some(SerialPort::new(
                vm.fd(),
                Box::new(file) as Box<dyn Write + Send>,
            )?)
        }
        SerialConfig::Off => None,
    };
    let pci = attach_devices(config, &vm)?;
    let platform = Arc::new(Platform::new(serial, ResetPort::new(events.clone()), pci));

    let supported = cpuid::supported(vm.kvm()).context("KVM_GET_SUPPORTED_CPUID")?;
    // All vCPUs exist (with TSC 0) before any runs, so KVM synchronises their TSCs.
    let vcpus = (0..config.cpus)
        .map(|id| {
            Vcpu::new(
                vm.fd(),
                id,
                &cpuid::for_vcpu(&supported, id, config.cpus),
                entry,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.spawn(platform.clone(), events.clone()))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot start a vCPU thread")?;
    dump_registers_on_signal(sigusr1, handles)?;
    tracing::info!(
        cpus = config.cpus,
        memory_mib = config.memory.size() >> 20,
        setup_ms = started.elapsed().as_millis() as u64,
        "VM running"
    );
    let event = exits
        .recv()
        .expect("the vCPU threads hold senders until they report");
    let _ = std::io::stdout().flush();
    Ok(event.report())
}

/// Blocks SIGUSR1 in this thread and so in every thread it starts from now on, for
/// [`dump_registers_on_signal`] to receive it.
fn block_sigusr1() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block().context("cannot block SIGUSR1")?;
    Ok(set)
}

/// Makes the signals in `set` (SIGUSR1) print every vCPU's registers to stderr, for looking
/// at a hung guest.
fn dump_registers_on_signal(set: SigSet, vcpus: Vec<VcpuHandle>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("sigusr1".into())
        .spawn(move || {
            while set.wait().is_ok() {
                for vcpu in &vcpus {
                    vcpu.request_register_dump();
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Connects every `--disk` and `--net` backend and plugs a virtio-pci device for each into a
/// new PCI bus.
fn attach_devices(config: &VmConfig, vm: &Vm) -> anyhow::Result<PciBus> {
    let router = Arc::new(IrqRouter::new(vm.fd().clone()));
    let mut bus = PciBus::new();
    let mut next_bar = PCI_HOLE_START;
    let mut plug = |kind: DeviceType,
                    socket: &std::path::Path,
                    queues: u16,
                    queue_size: u16,
                    readonly: bool|
     -> anyhow::Result<()> {
        let backend = VhostUserConnection::connect(socket, kind.config_size())?;
        if backend.queue_num() < queues {
            bail!(
                "{}: num_queues={queues} but the backend serves only {} queue(s)",
                socket.display(),
                backend.queue_num()
            );
        }
        if readonly && backend.device_features() & VIRTIO_BLK_F_RO == 0 {
            bail!(
                "{}: readonly was asked but the backend serves the disk writable; start it read-only",
                socket.display()
            );
        }
        let device = VirtioPciDevice::new(
            kind,
            backend,
            queue_size,
            next_bar as u32,
            vm.fd().clone(),
            router.clone(),
            vm.memory().clone(),
        )
        .with_context(|| format!("cannot create the device for {}", socket.display()))?;
        next_bar += BAR_SIZE;
        let device = Arc::new(Mutex::new(device));
        reconnect::watch(device.clone(), kind, socket.to_owned())
            .context("cannot start the backend watcher")?;
        if bus.add(device).is_none() {
            bail!("too many devices: the PCI bus has 31 slots");
        }
        Ok(())
    };
    for disk in &config.disks {
        match &disk.backend {
            DiskBackend::Socket(socket) => plug(DeviceType::Block, socket, disk.num_queues, disk.queue_size, disk.readonly)?,
            DiskBackend::Image { path, .. } => bail!(
                "--disk path={}: starting vhost-blk from the VMM is not implemented yet; start `vhost-blk --socket S --image {}` and use --disk socket=S",
                path.display(),
                path.display()
            ),
        }
    }
    for net in &config.nets {
        match &net.backend {
            NetBackend::Socket(socket) => plug(DeviceType::Net, socket, net.num_queues, net.queue_size, false)?,
            NetBackend::Tap { name, .. } => bail!(
                "--net tap={name}: starting vhost-net from the VMM is not implemented yet; start `vhost-net --socket S --tap {name}` and use --net socket=S"
            ),
        }
    }
    Ok(bus)
}
