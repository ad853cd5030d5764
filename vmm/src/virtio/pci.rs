//! The modern virtio-pci transport (virtio 1.x, section 4.1) for a device whose work is done
//! by a vhost-user backend.
//!
//! BAR 0 holds, at fixed offsets, the common configuration, the ISR byte, the device
//! configuration (cached from the backend, see [`super::config_space`]), the queue
//! notification doorbells and the MSI-X table. Doorbells are KVM ioeventfds handed to the
//! backend as kick fds and MSI-X vectors are irqfds handed over as call fds, so once the
//! driver has started the device, the VMM is not on the data path.
//!
//! Once the driver has set DRIVER_OK, the negotiated features and the queues' sizes, enables
//! and ring addresses are fixed until it resets the device (the spec forbids changing them;
//! the backend and a later resume rely on them). A device that cannot run — its backend
//! refused the queues, a new backend cannot resume them, or its backend is gone for good —
//! sets DEVICE_NEEDS_RESET and sends a configuration-change interrupt, and is not started
//! again until the driver resets it.

use std::sync::Arc;

use cowbird_daemon::logging::Occurrences;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::config_space::ConfigSpace;
use super::vhost_user::{HangupWatch, QueueSetup, VhostUserConnection};
use crate::irq::IrqRouter;
use crate::pci::config::{PciConfig, PciIds};
use crate::pci::msix::{self, Msix, MSIX_CAPABILITY_ID};
use crate::pci::PciDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x1_0000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x8000;
const MSIX_PBA_OFFSET: u64 = 0xc000;

const VIRTIO_VENDOR_CAPABILITY: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
/// Status bits only the device sets or clears (a reset clears them).
const STATUS_STICKY: u8 = STATUS_DRIVER_OK | STATUS_NEEDS_RESET;
const NO_VECTOR: u16 = 0xffff;
const MSIX_CONTROL_OFFSET: usize = 2;

/// Most queues a device can have: its MSI-X table, between the table and pending-bit array
/// offsets, holds one vector per queue plus one for configuration changes.
pub const MAX_QUEUES: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / msix::ENTRY_SIZE) as u16 - 1;

/// Transport features the VMM can offer whatever the backend: VERSION_1 is required.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Features a backend may offer that are never passed on to the guest: those whose support
/// depends on the transport or an IOMMU (ACCESS_PLATFORM, ORDER_PLATFORM, SR_IOV,
/// NOTIFICATION_DATA, NOTIF_CONFIG_DATA, RING_RESET, ADMIN_VQ), packed rings (RING_PACKED: the
/// VMM starts and resumes queues as split rings) and vhost's dirty-page logging (LOG_ALL,
/// for migration, which the VMM does not do).
const NEVER_OFFERED: u64 = (1 << 26)
    | (1 << 33)
    | (1 << 34)
    | (1 << 36)
    | (1 << 37)
    | (1 << 38)
    | (1 << 39)
    | (1 << 40)
    | (1 << 41);

/// The kinds of device the VMM attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// virtio-net (device ID 1).
    Net,
    /// virtio-blk (device ID 2).
    Block,
}

impl DeviceType {
    fn virtio_id(self) -> u16 {
        match self {
            Self::Net => 1,
            Self::Block => 2,
        }
    }

    fn pci_class(self) -> u32 {
        match self {
            Self::Net => 0x02_0000,
            Self::Block => 0x01_8000,
        }
    }

    /// Size of the device type's configuration space as this VMM exposes it.
    pub fn config_size(self) -> usize {
        match self {
            Self::Net => 24,
            Self::Block => 60,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    max_size: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Queue {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Guest address of the used ring's index, if the ring's address leaves room for it.
    fn used_index(&self) -> Option<GuestAddress> {
        self.used.checked_add(2).map(GuestAddress)
    }
}

/// The device status after the driver writes `written` (not 0, which resets) over `current`,
/// and whether the write starts the device. Only a reset clears DRIVER_OK, so that the reset
/// stops the backend the device started, and DEVICE_NEEDS_RESET, which only the device sets;
/// a device that needs a reset does not start.
fn next_status(current: u8, written: u8) -> (u8, bool) {
    let status = (written & !STATUS_NEEDS_RESET) | (current & STATUS_STICKY);
    let starting = status & STATUS_DRIVER_OK != 0
        && current & STATUS_DRIVER_OK == 0
        && status & STATUS_NEEDS_RESET == 0;
    (status, starting)
}

/// How many queues a device has and how many entries each may have at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Number of queues.
    pub count: u16,
    /// Largest queue size the driver may set.
    pub size: u16,
}

/// A virtio-pci function backed by a vhost-user connection.
pub struct VirtioPciDevice {
    config: PciConfig,
    backend: VhostUserConnection,
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    msix: Msix,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    unrouted_call: EventFd,
    device_space: ConfigSpace,
    device_features: u64,
    device_feature_select: u32,
    driver_features: u64,
    driver_feature_select: u32,
    config_vector: u16,
    status: u8,
    queue_select: u16,
    /// Queues whose doorbells KVM catches as ioeventfds while the device runs, wherever the
    /// guest puts BAR 0.
    doorbell_queues: Vec<usize>,
    /// The doorbells registered with KVM: address and queue.
    registered_doorbells: Vec<(u64, usize)>,
    /// Queues handed to the backend since the driver started the device, in order: the ones
    /// a reset stops and a reconnect resumes.
    started: Vec<usize>,
    msix_capability: usize,
    /// A NIC's last queue is its control queue, which is the backend's last queue however
    /// many pairs the backend serves beyond the device's.
    control_queue: bool,
    /// The backend is gone for good (its supervisor gave up): the device never starts again.
    lost: bool,
    /// The backend of this connection got the driver's features and configuration writes
    /// (the device started on it): a reset puts its configuration back.
    config_sent: bool,
    /// Resets the device asked for, configuration writes its backend refused, starts while
    /// the backend is away and stops it refused: logged at powers of two only (a guest can
    /// repeat each without end).
    needs_reset_events: Occurrences,
    config_errors: Occurrences,
    away_starts: Occurrences,
    stop_errors: Occurrences,
}

impl VirtioPciDevice {
    /// A device of `kind` with `queues` (the backend must serve that many) and BAR 0 at
    /// `bar_addr`.
    pub fn new(
        kind: DeviceType,
        backend: VhostUserConnection,
        queues: QueueLayout,
        bar_addr: u32,
        vm: Arc<VmFd>,
        router: Arc<IrqRouter>,
        memory: GuestMemoryMmap,
    ) -> std::io::Result<Self> {
        let num_queues = queues.count;
        if !(1..=MAX_QUEUES).contains(&num_queues) || num_queues > backend.queue_num() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{num_queues} queues: a device has 1 to {MAX_QUEUES} (one MSI-X vector each, \
                     plus one for configuration changes) and at most as many as its backend \
                     serves ({})",
                    backend.queue_num()
                ),
            ));
        }
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + kind.virtio_id(),
            class: kind.pci_class(),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_memory_bar(0, BAR_SIZE, bar_addr);
        for (cfg_type, offset, length) in [
            (CAP_COMMON, COMMON_OFFSET, COMMON_SIZE),
            (CAP_ISR, ISR_OFFSET, 1),
            (CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE),
        ] {
            let body = virtio_capability(cfg_type, offset, length, None);
            config.add_capability(VIRTIO_VENDOR_CAPABILITY, &body, &vec![0; body.len()]);
        }
        let notify_len = u64::from(num_queues) * u64::from(NOTIFY_MULTIPLIER);
        let body = virtio_capability(
            CAP_NOTIFY,
            NOTIFY_OFFSET,
            notify_len,
            Some(NOTIFY_MULTIPLIER),
        );
        config.add_capability(VIRTIO_VENDOR_CAPABILITY, &body, &vec![0; body.len()]);
        // One vector per queue plus one for configuration changes.
        let vectors = num_queues + 1;
        let (body, writable) =
            msix::capability(vectors, 0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_capability = config.add_capability(MSIX_CAPABILITY_ID, &body, &writable);
        let msix = Msix::new(vectors, router, &vm)?;
        let kicks = (0..num_queues)
            .map(|_| crate::vm::new_eventfd())
            .collect::<std::io::Result<Vec<_>>>()?;
        let device_features = (backend.device_features() | VIRTIO_F_VERSION_1) & !NEVER_OFFERED;
        Ok(Self {
            config,
            device_space: ConfigSpace::new(kind, num_queues, backend.config()),
            backend,
            vm,
            memory,
            msix,
            queues: vec![Queue::new(queues.size); usize::from(num_queues)],
            kicks,
            unrouted_call: crate::vm::new_eventfd()?,
            device_features,
            device_feature_select: 0,
            driver_features: 0,
            driver_feature_select: 0,
            config_vector: NO_VECTOR,
            status: 0,
            queue_select: 0,
            doorbell_queues: Vec::new(),
            registered_doorbells: Vec::new(),
            started: Vec::new(),
            msix_capability,
            control_queue: kind == DeviceType::Net && num_queues % 2 == 1,
            lost: false,
            config_sent: false,
            needs_reset_events: Occurrences::default(),
            config_errors: Occurrences::default(),
            away_starts: Occurrences::default(),
            stop_errors: Occurrences::default(),
        })
    }

    /// The backend's index of the device's queue `index`.
    fn backend_queue(&self, index: usize) -> usize {
        if self.control_queue && index + 1 == self.queues.len() {
            // A backend with no queue at all (refused at resume) maps it nowhere.
            usize::from(self.backend.queue_num().saturating_sub(1))
        } else {
            index
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.device_space.generation()),
            0x16 => u64::from(self.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => queue.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select), // notify offset = queue index
            // A ring address, read whole (64 bits) or by halves.
            o @ 0x20..=0x37 if o % 4 == 0 => queue.map_or(0, |q| {
                let addr = [q.desc, q.avail, q.used][((o - 0x20) / 8) as usize];
                if o % 8 == 0 {
                    addr
                } else {
                    addr >> 32
                }
            }),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        let low = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let high = |old: u64| (old & 0xffff_ffff) | (value << 32);
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if !self.running() => {
                let offered = self.device_features;
                match self.driver_feature_select {
                    0 => self.driver_features = low(self.driver_features) & offered,
                    1 => self.driver_features = high(self.driver_features) & offered,
                    _ => {}
                }
            }
            0x10 => {
                let v = value as u16;
                self.config_vector = if v < self.msix.len() { v } else { NO_VECTOR };
            }
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 => self.update_queue(|q| {
                let size = value as u16;
                if size.is_power_of_two() && size <= q.max_size {
                    q.size = size;
                }
            }),
            0x1a => {
                // Fixed while running too: the backend signals the vector's eventfd it was
                // given at the start.
                let vectors = self.msix.len();
                let v = value as u16;
                self.update_queue(|q| q.vector = if v < vectors { v } else { NO_VECTOR });
            }
            0x1c => self.update_queue(|q| q.enabled = value & 1 == 1),
            // A ring address, written whole (64 bits) or by halves (virtio 1.2 4.1.3.1).
            o @ 0x20..=0x37 if o % 4 == 0 => self.update_queue(|q| {
                let addr = match o & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                *addr = match (o % 8, n) {
                    (0, 8) => value,
                    (0, _) => low(*addr),
                    _ => high(*addr),
                };
            }),
            _ => {}
        }
    }

    /// Whether the driver has started the device (DRIVER_OK): features and queue setup are
    /// fixed until a reset.
    fn running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Changes the selected queue's setup, unless the device runs.
    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.running() {
            tracing::debug!(
                queue = self.queue_select,
                "ignored a queue change on a running device"
            );
            return;
        }
        if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
            f(q);
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let (status, starting) = next_status(self.status, status);
        self.status = status;
        if starting {
            if let Err(e) = self.activate() {
                self.needs_reset(&format!("cannot start the device: {e:#}"));
            }
        }
    }

    /// Registers the doorbells of the enabled queues as ioeventfds and hands the queues to
    /// the backend.
    fn activate(&mut self) -> anyhow::Result<()> {
        if self.lost {
            anyhow::bail!("its backend is gone for good");
        }
        if self.config.bar_range(0).is_none() {
            anyhow::bail!("driver started the device with BAR 0 disabled");
        }
        self.doorbell_queues = (0..self.queues.len())
            .filter(|&i| self.queues[i].enabled)
            .collect();
        self.place_doorbells()?;
        if self.backend.is_closed() {
            // Being restarted: the queues start when it is back, as after any reconnect.
            if let Some(n) = self.away_starts.count() {
                tracing::warn!(socket = %self.backend.socket().display(), "backend away; the device starts when it reconnects (time {n})");
            }
            self.started = (0..self.queues.len())
                .filter(|&i| self.queues[i].enabled)
                .collect();
            return Ok(());
        }
        self.start_backend(false)
    }

    /// Hands the queues to the backend, after the driver's features and the configuration
    /// fields the guest wrote. A fresh start takes the enabled queues from ring index 0; a
    /// resume (new backend process) takes the queues started before from the used ring's
    /// index, so requests the old backend took but never completed are processed again.
    fn start_backend(&mut self, resume: bool) -> anyhow::Result<()> {
        let indices: Vec<usize> = if resume {
            self.started.clone()
        } else {
            (0..self.queues.len())
                .filter(|&i| self.queues[i].enabled)
                .collect()
        };
        let mut setups = Vec::with_capacity(indices.len());
        for &index in &indices {
            let q = self.queues[index];
            let base = if resume {
                let at = q
                    .used_index()
                    .ok_or_else(|| anyhow::anyhow!("queue {index}: used ring at {:#x}", q.used))?;
                self.memory
                    .read_obj::<u16>(at)
                    .map_err(|e| anyhow::anyhow!("queue {index}: used ring unreadable: {e}"))?
            } else {
                0
            };
            setups.push(QueueSetup {
                index: self.backend_queue(index),
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                base,
            });
        }
        self.backend
            .set_features_and_memory(&self.memory, self.driver_features)?;
        self.config_sent = true;
        for (offset, bytes) in self.device_space.guest_writes(self.driver_features) {
            self.backend.write_config(offset, &bytes)?;
        }
        for (index, setup) in indices.into_iter().zip(&setups) {
            // Recorded first: a queue the backend half took is stopped on reset too.
            if !self.started.contains(&index) {
                self.started.push(index);
            }
            let call = call_fd(&self.msix, &self.unrouted_call, &self.queues[index]);
            self.backend
                .start_queue(&self.memory, setup, call, &self.kicks[index])?;
        }
        tracing::debug!(socket = %self.backend.socket().display(), queues = setups.len(), resume, "device started");
        Ok(())
    }

    /// Replaces a backend that went away with a new connection to it. The guest sees the
    /// new backend's configuration space (with its own writes kept, and a configuration
    /// interrupt if anything else changed); a running device's queues resume where the used
    /// rings say, and each is kicked and signalled once: requests queued meanwhile get
    /// served, and completions the old backend published without signalling them are seen.
    /// A device the new backend cannot serve needs a reset.
    pub fn reconnect(&mut self, backend: VhostUserConnection) -> anyhow::Result<()> {
        self.backend = backend;
        self.config_sent = false;
        if self.device_space.refresh(self.backend.config()) {
            self.signal_config();
        }
        let resumed = self.resume();
        if let Err(e) = &resumed {
            self.needs_reset(&format!(
                "the reconnected backend cannot serve the device: {e:#}"
            ));
        }
        resumed
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        let missing = self.driver_features & !self.backend.device_features();
        if missing != 0 {
            anyhow::bail!("it lacks features the driver uses ({missing:#x})");
        }
        if self.backend.queue_num() < self.queues.len() as u16 {
            anyhow::bail!(
                "it serves {} queue(s); the device has {}",
                self.backend.queue_num(),
                self.queues.len()
            );
        }
        if !self.running() || self.status & STATUS_NEEDS_RESET != 0 {
            return Ok(());
        }
        self.start_backend(true)?;
        for &index in &self.started {
            let _ = self.kicks[index].write(1);
            let _ = call_fd(&self.msix, &self.unrouted_call, &self.queues[index]).write(1);
        }
        Ok(())
    }

    /// The backend is gone for good (its supervisor stopped restarting it): the device
    /// needs a reset, which the driver is told.
    pub fn backend_lost(&mut self) {
        self.lost = true;
        self.needs_reset("its backend is gone for good");
    }

    /// Sets DEVICE_NEEDS_RESET and sends the configuration-change interrupt: the device
    /// stays stopped until the driver resets it.
    fn needs_reset(&mut self, why: &str) {
        if let Some(n) = self.needs_reset_events.count() {
            tracing::error!(socket = %self.backend.socket().display(), "{why}; the device needs a reset (time {n})");
        }
        self.status |= STATUS_NEEDS_RESET;
        self.signal_config();
    }

    fn signal_config(&self) {
        if let Some(irqfd) = self.msix.irqfd(self.config_vector) {
            let _ = irqfd.write(1);
        }
    }

    /// Whether the connection to the backend was cut off because it stopped answering.
    pub fn backend_timed_out(&self) -> bool {
        self.backend.timed_out()
    }

    /// The backend connection's hangup watch (see [`VhostUserConnection::hangup_watch`]).
    pub fn hangup_watch(&self) -> std::io::Result<HangupWatch> {
        self.backend.hangup_watch()
    }

    /// Guest write to the device configuration space: only to a field the device type makes
    /// writable with the features negotiated (see [`ConfigSpace::is_writable`]); the rest is
    /// dropped. A running device's backend gets the write at once and the space keeps it
    /// only if the backend took it; otherwise it is kept and written when the backend starts
    /// (or comes back).
    fn write_device_config(&mut self, offset: u64, data: &[u8]) {
        if !self
            .device_space
            .is_writable(offset, data.len(), self.driver_features)
        {
            tracing::debug!(
                offset,
                len = data.len(),
                "dropped a guest write to a read-only config field"
            );
            return;
        }
        if self.running() && self.status & STATUS_NEEDS_RESET == 0 && !self.backend.is_closed() {
            if let Err(e) = self.backend.write_config(offset as usize, data) {
                if let Some(n) = self.config_errors.count() {
                    tracing::error!("{e} (refused configuration write {n})");
                }
                return;
            }
        }
        self.device_space.store(offset, data);
    }

    fn reset(&mut self) {
        self.stop_queues();
        self.restore_config();
        for q in &mut self.queues {
            *q = Queue::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
    }

    /// Puts the configuration fields the guest wrote back to the backend's defaults, in the
    /// backend too (a reset restores the original write cache setting, as in QEMU). A backend
    /// that is away, or never got the guest's writes on this connection, has its defaults
    /// anyway; one that refuses keeps the guest's values, and so does the space.
    fn restore_config(&mut self) {
        if std::mem::take(&mut self.config_sent) && !self.backend.is_closed() {
            for (offset, bytes) in self.device_space.changed_from(self.backend.config()) {
                if let Err(e) = self.backend.write_config(offset, &bytes) {
                    tracing::warn!("restoring the configuration at a reset: {e}");
                    return;
                }
            }
        }
        self.device_space.forget_writes(self.backend.config());
    }

    /// Takes the started queues back from the backend and stops listening to their doorbells.
    fn stop_queues(&mut self) {
        let started: Vec<usize> = std::mem::take(&mut self.started)
            .into_iter()
            .map(|i| self.backend_queue(i))
            .collect();
        if !started.is_empty() {
            if let Err(e) = self.backend.stop(&started) {
                if let Some(n) = self.stop_errors.count() {
                    tracing::warn!("stopping the backend's queues: {e} (time {n})");
                }
            }
        }
        self.doorbell_queues.clear();
        self.unregister_doorbells();
    }

    /// Registers the doorbells of [`Self::doorbell_queues`] with KVM where BAR 0 decodes now
    /// (none while it does not), moving them if the guest moved the BAR: KVM must neither
    /// catch writes to the old address nor miss the new one.
    fn place_doorbells(&mut self) -> anyhow::Result<()> {
        let base = self
            .config
            .bar_range(0)
            .map(|bar| bar.start + NOTIFY_OFFSET);
        let wanted: Vec<(u64, usize)> = base
            .map(|base| {
                let at = |i: usize| base + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                self.doorbell_queues.iter().map(|&i| (at(i), i)).collect()
            })
            .unwrap_or_default();
        if wanted == self.registered_doorbells {
            return Ok(());
        }
        self.unregister_doorbells();
        for (doorbell, index) in wanted {
            self.vm
                .register_ioevent(
                    &self.kicks[index],
                    &IoEventAddress::Mmio(doorbell),
                    NoDatamatch,
                )
                .map_err(|e| anyhow::anyhow!("KVM_IOEVENTFD for queue {index}: {e}"))?;
            self.registered_doorbells.push((doorbell, index));
        }
        Ok(())
    }

    fn unregister_doorbells(&mut self) {
        for (addr, index) in self.registered_doorbells.drain(..) {
            let _ = self.vm.unregister_ioevent(
                &self.kicks[index],
                &IoEventAddress::Mmio(addr),
                NoDatamatch,
            );
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let was_master = self.config.bus_master();
        self.config.write(offset, data);
        let control = self.msix_capability + MSIX_CONTROL_OFFSET;
        if offset <= control + 1 && offset + data.len() > control {
            self.msix.set_control(self.config.u16_at(control));
        }
        if let Err(e) = self.place_doorbells() {
            self.needs_reset(&format!("cannot move the doorbells with BAR 0: {e:#}"));
        }
        if was_master
            && !self.config.bus_master()
            && self.running()
            && self.status & STATUS_NEEDS_RESET == 0
        {
            // The device must stop touching memory (Linux turns bus mastering off for every
            // device before a kexec, whose next kernel owns the rings' memory): its queues
            // are stopped, and it needs a reset before it runs again, as QEMU stops it.
            self.stop_queues();
            self.status |= STATUS_NEEDS_RESET;
            tracing::info!(socket = %self.backend.socket().display(), "bus mastering turned off: the device stopped");
        }
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o, data),
            ISR_OFFSET => data.fill(0), // MSI-X only: the ISR is never used
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device_space.read(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.write_device_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // A doorbell that KVM did not catch (the device has not started).
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(index) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

/// The eventfd the backend signals for `queue`: its vector's irqfd, or `unrouted` (which
/// nobody listens to) for a queue without a vector.
fn call_fd<'a>(msix: &'a Msix, unrouted: &'a EventFd, queue: &Queue) -> &'a EventFd {
    msix.irqfd(queue.vector).unwrap_or(unrouted)
}

/// A `virtio_pci_cap` body after the ID and next bytes: length, type, BAR 0, offset, length,
/// and for the notify capability the offset multiplier.
fn virtio_capability(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        body.extend_from_slice(&m.to_le_bytes());
    }
    body
}

#[cfg(test)]
mod tests;
