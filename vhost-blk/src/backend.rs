//! The vhost-user backend for one frontend connection: feature negotiation, the config space,
//! and the per-queue worker loop that turns available chains into used ones.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::config::{BlkConfig, WCE_OFFSET};
use crate::device::{Device, QueueSlot};
use crate::error::{Error, Result};
use crate::features;

/// Guest memory as the vhost-user machinery shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The backend serving one frontend connection on a [`Device`].
///
/// Every queue has its own worker thread (`queues_per_thread`), so the only lock a worker
/// takes is its own queue's.
pub struct BlkBackend {
    device: Arc<Device>,
    mem: GuestMemory,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    writeback: AtomicBool,
    active: AtomicBool,
}

impl BlkBackend {
    /// A backend for a new connection. `mem` must be the memory handed to the daemon.
    pub fn new(device: Arc<Device>, mem: GuestMemory) -> Self {
        let writeback = device.config().writeback;
        BlkBackend {
            device,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            writeback: AtomicBool::new(writeback),
            active: AtomicBool::new(true),
        }
    }

    /// Stops this connection's workers: waits for batches in progress; later kicks are ignored.
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        for q in 0..self.device.num_queues() {
            drop(self.device.lock_slot(q));
        }
    }

    /// The config space as this connection sees it.
    fn config(&self) -> BlkConfig {
        BlkConfig {
            writeback: self.writeback.load(Ordering::Relaxed),
            ..self.device.config()
        }
    }

    /// Processes everything available on queue `queue`, with EVENT_IDX-aware notification.
    pub fn process_queue(&self, queue: usize, vring: &VringRwLock) -> Result<()> {
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return Err(Error::Queue {
                queue,
                reason: "no such queue".into(),
            });
        };
        if !self.active.load(Ordering::Acquire) || self.device.stopping() {
            return Ok(());
        }
        let res = if self.event_idx.load(Ordering::Relaxed) {
            // Keep going until no new chain arrived while notifications were off.
            loop {
                if let Err(e) = vring.disable_notification() {
                    break Err(e);
                }
                if let Err(e) = self.process_available(queue, vring, &mut slot) {
                    break Err(e);
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        } else {
            self.process_available(queue, vring, &mut slot)
        };
        res.map_err(|e| {
            slot.ring_errors += 1;
            Error::Queue {
                queue,
                reason: e.to_string(),
            }
        })
    }

    /// Completes every chain in the available ring, then notifies the driver if it wants it.
    fn process_available(
        &self,
        queue: usize,
        vring: &VringRwLock,
        slot: &mut QueueSlot,
    ) -> std::result::Result<(), virtio_queue::Error> {
        let mem = self.mem.memory();
        let disk = self.device.disk();
        let limits = self.device.limits();
        let writethrough = !self.writeback.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let chains: Vec<_> = state.get_queue_mut().iter(mem.clone())?.collect();
        if chains.is_empty() {
            return Ok(());
        }
        for chain in chains {
            let done = slot
                .executor
                .complete_chain(chain, disk, &limits, writethrough);
            if let Err(e) = state.get_queue_mut().add_used(&*mem, done.head, done.used_len) {
                // A head index past the queue (the chain was dropped as empty) or a used ring
                // outside guest memory: nothing to complete.
                slot.ring_errors += 1;
                if slot.ring_errors.is_power_of_two() {
                    tracing::warn!("queue {queue}: cannot complete chain {}: {e}", done.head);
                }
            }
        }
        if state.get_queue_mut().needs_notification(&*mem)? {
            if let Err(e) = state.signal_used_queue() {
                tracing::warn!("queue {queue}: cannot signal the frontend: {e}");
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        features::device_features(self.device.disk().read_only())
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        features::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable, and only with CONFIG_WCE negotiated.
        let wce_negotiated = features::has(
            self.acked_features.load(Ordering::Relaxed),
            VIRTIO_BLK_F_CONFIG_WCE,
        );
        match (offset as usize, buf) {
            (WCE_OFFSET, [wce]) if wce_negotiated => {
                let writeback = *wce != 0;
                if !writeback && self.writeback.load(Ordering::Relaxed) {
                    // Switching to writethrough: make earlier writes durable too.
                    self.device.disk().flush().map_err(io::Error::other)?;
                }
                self.writeback.store(writeback, Ordering::Relaxed);
                tracing::info!(
                    "guest set the write cache to {}",
                    if writeback { "writeback" } else { "writethrough" }
                );
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "config write of {} bytes at offset {offset} is not allowed",
                    buf.len()
                ),
            )),
        }
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // The handler replaces the contents of the `GuestMemoryAtomic` we were built with;
        // workers load a fresh snapshot for every batch.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {thread_id}"
            )));
        }
        // One queue per thread: the thread index is the queue index, and its only vring is
        // event 0.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "event {device_event} on worker {thread_id} names no queue"
            )));
        };
        if let Err(e) = self.process_queue(thread_id, vring) {
            // A broken ring is the guest's problem; keep the worker alive for a reset.
            let errors = self
                .device
                .lock_slot(thread_id)
                .map_or(1, |slot| slot.ring_errors);
            if errors.is_power_of_two() {
                tracing::warn!("{e} (error {errors} on this queue)");
            }
        }
        Ok(())
    }
}
