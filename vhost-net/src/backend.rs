//! The vhost-user backend for one frontend connection: feature negotiation (applied to the
//! TAP), the config space, and the per-pair worker that moves packets.
//!
//! Queue `2p` is pair `p`'s rx queue, `2p + 1` its tx queue, and the last queue the control
//! queue. Worker thread `p` serves pair `p` (its two vrings are events 0 and 1) and the TAP
//! queue `p` (event [`tap_event`], edge-triggered); worker 0 also serves the control queue
//! (event 2). A worker takes only its own pair's lock.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use cowbird_daemon::exit_events::ExitEvents;
use cowbird_daemon::logging::Occurrences;
use cowbird_daemon::notify;

use crate::chain::MAX_FRAME_LEN;
use crate::config::{self, feature};
use crate::ctrl::{self, Action, ACK_ERR};
use crate::datapath::{self, BATCH};
use crate::device::Device;
use crate::rx::{self, RxParams};

/// Batches of packets one call moves on a queue before it lets the worker's other events
/// (the pair's other direction, the control queue, a stop) have their turn, as kernel
/// vhost's weight limit does.
const BUDGET: usize = 16;

/// Guest memory as the vhost-user machinery shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Event id of a worker's TAP queue: above every vring id, as vhost-user-backend requires for
/// extra listeners.
pub fn tap_event(num_queues: usize) -> u16 {
    u16::try_from(num_queues + 1).unwrap_or(u16::MAX)
}

/// The vhost-user protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The backend serving one frontend connection on a [`Device`].
pub struct NetBackend {
    device: Arc<Device>,
    mem: GuestMemory,
    acked: AtomicU64,
    event_idx: AtomicBool,
    active: AtomicBool,
    /// The workers' exit events, closed when the connection's backend goes.
    exit_events: ExitEvents,
    /// Queue-pair changes the guest asked for, and malformed control commands: each logged
    /// at powers of two only (a guest could repeat them without end).
    ctrl_events: Occurrences,
    ctrl_errors: Occurrences,
}

impl NetBackend {
    /// A backend for a new connection. `mem` must be the memory handed to the daemon.
    pub fn new(device: Arc<Device>, mem: GuestMemory) -> Self {
        NetBackend {
            device,
            mem,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            active: AtomicBool::new(true),
            exit_events: ExitEvents::default(),
            ctrl_events: Occurrences::default(),
            ctrl_errors: Occurrences::default(),
        }
    }

    /// The device served.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Stops this connection's workers: waits for batches in progress; later events are
    /// ignored.
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        for pair in 0..self.device.queue_pairs() {
            drop(self.device.lock_slot(pair));
        }
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Acquire) && !self.device.stopping()
    }

    fn has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Relaxed) & feature(bit) != 0
    }

    /// How rx chains are filled under the negotiated features.
    pub fn rx_params(&self) -> RxParams {
        let acked = self.acked.load(Ordering::Relaxed);
        let hdr_len = config::vnet_hdr_len(acked);
        let gso = [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ]
        .iter()
        .any(|&b| self.has(b));
        let frame = if gso {
            MAX_FRAME_LEN
        } else {
            // An Ethernet header and a VLAN tag around the MTU.
            u64::from(self.device.options().mtu.unwrap_or(1500).max(1500)) + 18
        };
        RxParams {
            hdr_len,
            mrg_rxbuf: self.has(VIRTIO_NET_F_MRG_RXBUF),
            max_packet: hdr_len as u64 + frame,
        }
    }

    /// Moves packets from TAP queue `pair` into the rx vring.
    pub fn process_rx(&self, pair: usize, vring: &VringRwLock) -> Result<(), virtio_queue::Error> {
        let (Some(mut slot), Some(stats), Some(fd)) = (
            self.device.lock_slot(pair),
            self.device.stats(pair),
            self.device.tap().queue_fd(pair),
        ) else {
            return Ok(());
        };
        if !self.active() {
            return Ok(());
        }
        let params = self.rx_params();
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let serving = state.get_queue().ready() && state.is_enabled();
        if self.has(VIRTIO_NET_F_MQ) && !self.has(VIRTIO_NET_F_CTRL_VQ) && pair > 0 {
            // No control queue (QEMU's vhost-user): the frontend picks the pairs in use by
            // enabling their vrings, so the TAP queue follows the rx vring, or the kernel
            // would steer flows to a queue nobody reads. Noticed here, on the queue's next
            // event: its packets, or the driver's first kick.
            if let Err(e) = self.device.tap().set_queue_attached(pair, serving) {
                tracing::warn!("TAP queue {pair}: {e}");
            }
        }
        if !serving || !datapath::check_ring(state.get_queue(), &*mem)? {
            return Ok(());
        }
        // No kicks while buffers last; re-enabled when they run out.
        state.get_queue_mut().disable_notification(&*mem)?;
        let mut batches = 0;
        loop {
            let old = state.get_queue().next_used();
            let out = rx::process_rx(&*mem, state.get_queue_mut(), fd, params, &mut slot, stats);
            if out.used > 0
                && datapath::needs_notification_since(state.get_queue_mut(), &*mem, old)?
            {
                signal(&state);
            }
            // More packets, or buffers that arrived while notifications were off.
            let again = out.more
                || (out.out_of_buffers
                    && rx::enable_notification_past(state.get_queue_mut(), &*mem, out.avail_seen)?
                    && datapath::check_ring(state.get_queue(), &*mem)?);
            if !again {
                return Ok(());
            }
            batches += 1;
            if batches == BUDGET {
                // Enough for one turn: a kick of our own brings the worker back here after
                // its other events (the TAP's readiness is edge-triggered: it would not).
                kick_again(&state);
                return Ok(());
            }
        }
    }

    /// Writes the tx vring's frames to TAP queue `pair`.
    pub fn process_tx(&self, pair: usize, vring: &VringRwLock) -> Result<(), virtio_queue::Error> {
        let (Some(mut slot), Some(stats), Some(fd)) = (
            self.device.lock_slot(pair),
            self.device.stats(pair),
            self.device.tap().queue_fd(pair),
        ) else {
            return Ok(());
        };
        if !self.active() {
            return Ok(());
        }
        let hdr_len = config::vnet_hdr_len(self.acked.load(Ordering::Relaxed));
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let mut batches = 0;
        loop {
            // Checked on every pass: a stopped ring (GET_VRING_BASE) or a broken one is left
            // alone.
            if !state.is_enabled() || !datapath::check_ring(state.get_queue(), &*mem)? {
                return Ok(());
            }
            state.get_queue_mut().disable_notification(&*mem)?;
            loop {
                if batches == BUDGET {
                    // Enough for one turn (see the rx side).
                    kick_again(&state);
                    return Ok(());
                }
                batches += 1;
                let done = datapath::process_tx(
                    &*mem,
                    state.get_queue_mut(),
                    fd,
                    hdr_len,
                    &mut slot,
                    stats,
                );
                if done > 0 && notify::needs_notification(state.get_queue_mut(), &*mem)? {
                    signal(&state);
                }
                if done < BATCH {
                    break;
                }
            }
            if !state.get_queue_mut().enable_notification(&*mem)? {
                return Ok(());
            }
        }
    }

    /// Executes the commands on the control vring.
    pub fn process_ctrl(&self, vring: &VringRwLock) -> Result<(), virtio_queue::Error> {
        if !self.active() {
            return Ok(());
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let mq = self.has(VIRTIO_NET_F_MQ);
        let pairs = self.device.options().queue_pairs;
        for _ in 0..BUDGET {
            // As on the tx side: a stopped or broken ring is left alone.
            if !state.is_enabled() || !datapath::check_ring(state.get_queue(), &*mem)? {
                return Ok(());
            }
            state.get_queue_mut().disable_notification(&*mem)?;
            self.execute_ctrl_commands(&mut state, &mem, pairs, mq)?;
            // With EVENT_IDX this also asks the driver to notify for its next command.
            if !state.get_queue_mut().enable_notification(&*mem)? {
                return Ok(());
            }
        }
        // Enough for one turn: a kick of our own brings the worker back.
        kick_again(&state);
        Ok(())
    }

    /// Executes the commands available on the control vring and completes them.
    fn execute_ctrl_commands(
        &self,
        state: &mut vhost_user_backend::VringState<GuestMemory>,
        mem: &GuestMemoryMmap,
        pairs: u16,
        mq: bool,
    ) -> Result<(), virtio_queue::Error> {
        let mut completed = 0;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) {
            let (head, ack, status) = match ctrl::parse(chain) {
                Ok(cmd) => {
                    let (mut status, action) = ctrl::handle(&cmd, pairs, mq);
                    if let Action::SetQueuePairs(n) = action {
                        let result = self.device.tap().set_active_queues(usize::from(n));
                        let logged = self.ctrl_events.count();
                        match result {
                            Ok(()) => {
                                if let Some(k) = logged {
                                    tracing::info!("guest uses {n} queue pair(s) (change {k})");
                                }
                            }
                            Err(e) => {
                                if let Some(k) = logged {
                                    tracing::warn!("cannot use {n} queue pairs: {e} (change {k})");
                                }
                                status = ACK_ERR;
                            }
                        }
                    } else if status == ACK_ERR {
                        tracing::debug!(
                            "control command class {} cmd {} refused",
                            cmd.class,
                            cmd.cmd
                        );
                    }
                    (cmd.head, Some(cmd.ack), status)
                }
                Err((head, ack, e)) => {
                    if let Some(k) = self.ctrl_errors.count() {
                        tracing::warn!("control queue: {e} (bad command {k})");
                    }
                    (head, ack, ACK_ERR)
                }
            };
            let used_len = match ack {
                Some(addr) if mem.write_obj(status, addr).is_ok() => 1,
                _ => 0,
            };
            if let Err(e) = state.get_queue_mut().add_used(mem, head, used_len) {
                if let Some(k) = self.ctrl_errors.count() {
                    tracing::warn!("control queue: cannot complete chain {head}: {e} (error {k})");
                }
            }
            completed += 1;
        }
        if completed > 0 && notify::needs_notification(state.get_queue_mut(), mem)? {
            signal(state);
        }
        Ok(())
    }
}

/// Kicks the queue of `state` as the driver would, so that its worker comes back to it after
/// the other events waiting.
fn kick_again(state: &vhost_user_backend::VringState<GuestMemory>) {
    if let Some(kick) = state.get_kick() {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local buffer to the queue's kick eventfd.
        unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

fn signal(state: &vhost_user_backend::VringState<GuestMemory>) {
    if let Err(e) = state.signal_used_queue() {
        tracing::warn!("cannot signal the frontend: {e}");
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        self.device.drop_held_packets();
        let tap = self.device.tap();
        let hdr_len = config::vnet_hdr_len(features);
        let offload = config::tun_offload_flags(features);
        if let Err(e) = tap.set_vnet_hdr_len(hdr_len) {
            tracing::error!("{e}");
        }
        if let Err(e) = tap.set_offload(offload) {
            tracing::error!("{e}");
        }
        // Without MQ the driver uses one pair; with a control queue and MQ it starts on one
        // and asks for more. (Flows the kernel steers to the TAP queue of a pair nobody
        // serves would be lost.)
        let pairs = if !self.has(VIRTIO_NET_F_MQ) || self.has(VIRTIO_NET_F_CTRL_VQ) {
            1
        } else {
            self.device.queue_pairs()
        };
        if let Err(e) = tap.set_active_queues(pairs) {
            tracing::error!("{e}");
        }
        tracing::info!(
            "negotiated {} (vnet header {hdr_len} bytes, TAP offloads {offload:#x})",
            config::describe_features(features)
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config().read(offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the virtio-net config space is read-only (write of {} bytes at {offset})",
                buf.len()
            ),
        ))
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // The handler replaced the contents of the `GuestMemoryAtomic` we share; workers load
        // a fresh snapshot for every batch.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let pairs = self.device.queue_pairs();
        let ctrl = 1u64 << (2 * pairs);
        (0..pairs)
            .map(|p| (0b11u64 << (2 * p)) | if p == 0 { ctrl } else { 0 })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.make()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let pair = thread_id;
        let res = if device_event == tap_event(self.device.num_queues()) {
            if !evset.contains(EventSet::IN) {
                tracing::warn!("TAP queue {pair}: unexpected event {evset:?}");
                return Ok(());
            }
            match vrings.first() {
                Some(rx) => self.process_rx(pair, rx),
                None => Ok(()),
            }
        } else {
            let Some(vring) = vrings.get(usize::from(device_event)) else {
                return Err(io::Error::other(format!(
                    "event {device_event} on worker {thread_id} names no queue"
                )));
            };
            match device_event {
                0 => self.process_rx(pair, vring),
                1 => self.process_tx(pair, vring),
                _ => self.process_ctrl(vring),
            }
        };
        if let Err(e) = res {
            // A broken ring is the guest's problem; keep the worker alive for a reset.
            let errors = self.device.lock_slot(pair).map_or(1, |mut s| {
                s.errors += 1;
                s.errors
            });
            if errors.is_power_of_two() {
                tracing::warn!("queue pair {pair}: {e} (error {errors})");
            }
        }
        Ok(())
    }
}
