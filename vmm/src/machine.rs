//! Putting a VM together from its [`VmConfig`] and running it until the guest stops.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};

use crate::boot;
use std::path::Path;

use crate::api;
use crate::cli::{
    DiskBackend, DiskConfig, ImageFormat, NetBackend, NetConfig, SerialConfig, VmConfig,
};
use crate::cpuid;
use crate::exit::VmEvent;
use crate::irq::IrqRouter;
use crate::legacy::{ResetPort, SerialPort};
use crate::memory::PCI_HOLE_START;
use crate::pci::PciBus;
use crate::platform::Platform;
use crate::supervisor::{BackendHealth, Supervisor};
use crate::vcpu::{PauseGate, Vcpu, Vcpus};
use crate::virtio::pci::BAR_SIZE;
use crate::virtio::{reconnect, DeviceType, QueueLayout, VhostUserConnection, VirtioPciDevice};
use crate::vm::Vm;

/// virtio-blk feature bit: the device is read-only.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// virtio-net feature bit: the device has a control queue.
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;

/// Builds the VM described by `config`, runs it, and returns the exit status for how it
/// ended (see [`crate::exit`]).
pub fn run(config: &VmConfig) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let signals = block_signals()?;
    let vm = Vm::new(&config.memory, config.hugepages)?;
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
    let supervisor = Supervisor::new()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let pci = attach_devices(config, &vm, &supervisor, &stopping)?;
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
    let gate = Arc::new(PauseGate::default());
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.spawn(platform.clone(), events.clone(), gate.clone()))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot start a vCPU thread")?;
    let vcpus = Arc::new(Vcpus::new(handles, gate));
    handle_signals(signals, vcpus.clone(), events.clone())?;
    if let Some(path) = &config.api_socket {
        let info = api::VmInfo::new(config, started);
        api::serve(path, info, vcpus, events.clone())?;
    }
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
    stopping.store(true, Ordering::SeqCst);
    supervisor.shutdown();
    if let Some(path) = &config.api_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(event.report())
}

/// Blocks SIGUSR1, SIGTERM and SIGINT in this thread and so in every thread it starts from
/// now on, for [`handle_signals`] to receive them.
fn block_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set.thread_block().context("cannot block signals")?;
    Ok(set)
}

/// SIGUSR1 prints every vCPU's registers to stderr (for looking at a hung guest); SIGTERM
/// and SIGINT stop the VM, and with it the backends the VMM started.
fn handle_signals(
    set: SigSet,
    vcpus: Arc<Vcpus>,
    events: mpsc::Sender<VmEvent>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(signal) = set.wait() {
                if signal == Signal::SIGUSR1 {
                    vcpus.dump_registers();
                } else {
                    let _ = events.send(VmEvent::Terminated(signal));
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Connects every `--disk` and `--net` backend (starting those the VMM runs itself under
/// `supervisor`) and plugs a virtio-pci device for each into a new PCI bus.
fn attach_devices(
    config: &VmConfig,
    vm: &Vm,
    supervisor: &Supervisor,
    stopping: &Arc<AtomicBool>,
) -> anyhow::Result<PciBus> {
    let router = Arc::new(IrqRouter::new(vm.fd().clone()));
    let mut bus = PciBus::new();
    let mut next_bar = PCI_HOLE_START;
    let mut plug = |kind: DeviceType,
                    socket: &std::path::Path,
                    queues: u16,
                    queue_size: u16,
                    readonly: bool,
                    health: Option<BackendHealth>|
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
        // A device has the queues asked for (its config space says so too), and a NIC whose
        // backend offers a control queue has that one after its pairs.
        let device_queues = match kind {
            DeviceType::Net if backend.device_features() & VIRTIO_NET_F_CTRL_VQ != 0 => queues + 1,
            _ => queues,
        };
        let layout = QueueLayout {
            count: device_queues,
            size: queue_size,
        };
        let device = VirtioPciDevice::new(
            kind,
            backend,
            layout,
            next_bar as u32,
            vm.fd().clone(),
            router.clone(),
            vm.memory().clone(),
        )
        .with_context(|| format!("cannot create the device for {}", socket.display()))?;
        next_bar += BAR_SIZE;
        let device = Arc::new(Mutex::new(device));
        reconnect::watch(
            device.clone(),
            kind,
            socket.to_owned(),
            stopping.clone(),
            health,
        )
        .context("cannot start the backend watcher")?;
        if bus.add(device).is_none() {
            bail!("too many devices: the PCI bus has 31 slots");
        }
        Ok(())
    };
    for (i, disk) in config.disks.iter().enumerate() {
        let (socket, health) = match &disk.backend {
            DiskBackend::Socket(socket) => (socket.clone(), None),
            DiskBackend::Image { path, format } => {
                let socket = supervisor.socket_path(&format!("disk{i}"));
                let health = supervisor.start(
                    &format!("vhost-blk disk{i}"),
                    "vhost-blk",
                    vhost_blk_args(disk, path, *format, &socket),
                    &socket,
                )?;
                (socket, Some(health))
            }
        };
        plug(
            DeviceType::Block,
            &socket,
            disk.num_queues,
            disk.queue_size,
            disk.readonly,
            health,
        )?;
    }
    for (i, net) in config.nets.iter().enumerate() {
        let (socket, health) = match &net.backend {
            NetBackend::Socket(socket) => (socket.clone(), None),
            NetBackend::Tap { name, mtu, host_ip } => {
                let socket = supervisor.socket_path(&format!("net{i}"));
                let args = vhost_net_args(net, name, *mtu, host_ip.as_deref(), &socket);
                let health =
                    supervisor.start(&format!("vhost-net net{i}"), "vhost-net", args, &socket)?;
                (socket, Some(health))
            }
        };
        plug(
            DeviceType::Net,
            &socket,
            net.num_queues,
            net.queue_size,
            false,
            health,
        )?;
    }
    Ok(bus)
}

/// The `vhost-blk` command line that serves `--disk path=...` on `socket`.
fn vhost_blk_args(
    disk: &DiskConfig,
    image: &Path,
    format: Option<ImageFormat>,
    socket: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--image".into(),
        image.display().to_string(),
        "--num-queues".into(),
        disk.num_queues.to_string(),
        "--queue-size".into(),
        disk.queue_size.max(4).to_string(),
    ];
    if let Some(format) = format {
        args.push("--format".into());
        args.push(match format {
            ImageFormat::Raw => "raw".into(),
            ImageFormat::Qcow2 => "qcow2".into(),
        });
    }
    if disk.readonly {
        args.push("--read-only".into());
    }
    args
}

/// The `vhost-net` command line that serves `--net tap=...` on `socket`.
fn vhost_net_args(
    net: &NetConfig,
    tap: &str,
    mtu: Option<u16>,
    host_ip: Option<&str>,
    socket: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--tap".into(),
        tap.into(),
        "--num-queue-pairs".into(),
        net.queue_pairs().to_string(),
        "--queue-size".into(),
        net.queue_size.to_string(),
    ];
    if let Some(mac) = net.mac {
        args.push("--mac".into());
        args.push(mac.to_string());
    }
    if let Some(mtu) = mtu {
        args.push("--mtu".into());
        args.push(mtu.to_string());
    }
    if let Some(ip) = host_ip {
        args.push("--host-ip".into());
        args.push(ip.into());
    }
    args
}
