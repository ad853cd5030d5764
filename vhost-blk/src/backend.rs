//! The vhost-user backend for one frontend connection: feature negotiation, the config space,
//! and the per-queue worker loop that turns available chains into used ones.

use std::io;
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use cowbird_daemon::exit_events::ExitEvents;
use cowbird_daemon::logging::Occurrences;
use cowbird_daemon::notify;

use crate::config::{BlkConfig, WCE_OFFSET};
use crate::device::{Device, QueueSlot};
use crate::error::{Error, Result};
use crate::exec::{self, Completion};
use crate::features;
use crate::request::{self, RequestKind};
use crate::uring::{Finished, QueueRing};

/// Guest memory as the vhost-user machinery shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The state of a vring as a worker sees it.
type VringState = vhost_user_backend::VringState<GuestMemory>;

/// What one step of polling a queue found.
enum PollStep {
    /// No new chain.
    Nothing,
    /// New chains, all completed without the disk.
    Served,
    /// New chains, some of them now in the io_uring.
    ReachedDisk,
}

/// The backend serving one frontend connection on a [`Device`].
///
/// Every queue has its own worker thread (`queues_per_thread`), so the only lock a worker
/// takes is its own queue's.
pub struct BlkBackend {
    device: Arc<Device>,
    mem: GuestMemory,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// Whether the driver negotiated FLUSH (assumed until its features arrive).
    flushes: AtomicBool,
    active: AtomicBool,
    /// The workers' exit events, closed when the connection's backend goes.
    exit_events: ExitEvents,
    /// Write cache changes by the guest: logged at powers of two only.
    cache_changes: Occurrences,
}

impl BlkBackend {
    /// A backend for a new connection. `mem` must be the memory handed to the daemon.
    pub fn new(device: Arc<Device>, mem: GuestMemory) -> Self {
        BlkBackend {
            device,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            flushes: AtomicBool::new(true),
            active: AtomicBool::new(true),
            exit_events: ExitEvents::default(),
            cache_changes: Occurrences::default(),
        }
    }

    /// Stops this connection's workers: waits for batches and io_uring requests in progress;
    /// later kicks are ignored. Completions of requests in flight are not reported (the
    /// frontend is gone).
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        self.device.drain_slots(|slot| {
            if let Some(ring) = slot.ring.as_mut() {
                ring.unwatch_kick();
                ring.unpin_memory();
            }
            slot.vring = None;
        });
    }

    /// Whether every write must be durable before it completes: the write cache is off, or
    /// the driver never flushes (virtio 1.x 5.2.6.2; QEMU's virtio-blk does the same).
    fn writethrough(&self) -> bool {
        !(self.flushes.load(Ordering::Relaxed) && self.device.write_cache())
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Acquire) && !self.device.stopping()
    }

    /// Processes everything available on queue `queue`, with EVENT_IDX-aware notification.
    pub fn process_queue(&self, queue: usize, vring: &VringRwLock) -> Result<()> {
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return Err(Error::Queue {
                queue,
                reason: "no such queue".into(),
            });
        };
        if !self.active() || !usable(vring) {
            // A disabled or stopped ring is left alone: its chains wait, and nothing is
            // written into it (after GET_VRING_BASE it may be gone).
            return Ok(());
        }
        let res = if slot.vring.is_none() {
            // First served on this connection: a poll cut short by the last one may have
            // left notifications off in the ring.
            slot.vring = Some(vring.clone());
            vring.enable_notification().map(drop)
        } else {
            Ok(())
        };
        let res = res.and_then(|()| match self.event_idx.load(Ordering::Relaxed) {
            // Keep going until no new chain arrived while notifications were off (and the
            // ring is still served: a disabled one keeps its chains).
            true => loop {
                if let Err(e) = vring.disable_notification() {
                    break Err(e);
                }
                match self.process_available(queue, vring, &mut slot) {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
                if !self.active() {
                    break Ok(());
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            },
            false => self.process_available(queue, vring, &mut slot).map(drop),
        });
        res.map_err(|e| {
            slot.ring_errors += 1;
            Error::Queue {
                queue,
                reason: e.to_string(),
            }
        })
    }

    /// Starts every chain in the available ring: reads and writes the image can map go to the
    /// io_uring (queued, completed later by [`Self::process_completions`]), everything else
    /// completes now. Notifies the driver if it wants it. Returns false, taking nothing, if
    /// the ring is disabled or stopped (its chains wait).
    fn process_available(
        &self,
        queue: usize,
        vring: &VringRwLock,
        slot: &mut QueueSlot,
    ) -> std::result::Result<bool, virtio_queue::Error> {
        let mem = self.mem.memory();
        let disk = self.device.disk();
        let limits = self.device.limits();
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            // A completion event can bring us here.
            return Ok(false);
        }
        let chains: Vec<_> = state.get_queue_mut().iter(mem.clone())?.collect();
        // Read after the chains: a chain made available after the guest turned its write
        // cache off must see it off.
        let writethrough = self.writethrough();
        if chains.is_empty() {
            let q = state.get_queue();
            if q.avail_idx(&*mem, Ordering::Acquire)? != Wrapping(q.next_avail()) {
                // Chains were made available but their entries cannot be read: the ring
                // lies partly outside guest memory. An error, not more work to look for.
                let slot = q.next_avail().checked_rem(q.size()).unwrap_or(0);
                let entry = q.avail_ring().wrapping_add(4 + 2 * u64::from(slot));
                return Err(virtio_queue::Error::GuestMemory(
                    vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(
                        entry,
                    )),
                ));
            }
            return Ok(true);
        }
        let mut completed = 0usize;
        for chain in chains {
            let done = match request::parse(chain, &limits) {
                Err(rejected) => exec::reject(&*mem, &rejected),
                Ok(req) => {
                    // In writethrough, a write through the ring is synced as it completes.
                    let zero_copy = QueueRing::eligible(&req)
                        // Writes to sector 0 of a probed raw image are inspected first.
                        && !(req.sector == 0
                            && disk.guards_format_signature()
                            && req.kind == RequestKind::Out);
                    let req = match slot.ring.as_mut() {
                        Some(ring) if zero_copy => match ring.start(&mem, req) {
                            Ok(None) => continue,
                            Ok(Some(f)) => {
                                // Done at once (a buffered write is a copy into the page
                                // cache): completed as the ring's own, synced first in
                                // writethrough.
                                self.complete_ring_request(queue, &mut state, slot, &mem, f);
                                completed += 1;
                                continue;
                            }
                            Err(req) => req,
                        },
                        _ => req,
                    };
                    if req.kind.changes_the_image() {
                        // Zero-copy writes in flight keep their clusters reserved, and the
                        // slow path may wait for those: finish them first. (A GET_ID does
                        // not wait behind a slow read.)
                        completed += self.drain_ring(queue, &mut state, slot, &mem);
                    }
                    slot.executor.run(&*mem, disk, &req, writethrough)
                }
            };
            add_used(queue, &mut state, slot, &mem, done);
            completed += 1;
        }
        // Requests queued in the ring are submitted by the caller (`serve`, the poll loop),
        // which then collects those the kernel finished as it took them.
        if completed > 0 && notify::needs_notification(state.get_queue_mut(), &*mem)? {
            signal(queue, &state);
        }
        Ok(true)
    }

    /// Submits the io_uring requests of queue `queue` still queued and completes those that
    /// have finished.
    pub fn process_completions(&self, queue: usize) -> Result<()> {
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return Ok(());
        };
        if !self.active() {
            return Ok(());
        }
        self.submit_and_complete(queue, &mut slot)
    }

    /// Submits what queue `queue`'s io_uring holds queued and completes what has finished,
    /// including what the kernel finished as it took it (reads from the page cache): only
    /// requests still in flight afterwards are at the disk.
    fn submit_and_complete(&self, queue: usize, slot: &mut QueueSlot) -> Result<()> {
        let (Some(vring), Some(ring)) = (slot.vring.clone(), slot.ring.as_mut()) else {
            return Ok(());
        };
        if let Err(e) = ring.submit() {
            // The entries stay queued; the next submit retries them.
            tracing::warn!("queue {queue}: io_uring submit failed: {e}");
        }
        if !ring.has_completions() {
            return Ok(());
        }
        let mut finished = Vec::new();
        ring.reap(&mut finished);
        self.complete_finished(queue, &vring, slot, finished)
            .map_err(|e| Error::Queue {
                queue,
                reason: e.to_string(),
            })
    }

    /// Serves queue `queue` until it is idle or kicked: completes what finished, starts what
    /// is available, polls if asked to, and while requests are at the disk sleeps in the
    /// queue's io_uring, which wakes up for a completion and for the next kick alike. That
    /// spares an `epoll_wait` and an eventfd read per completion. Kicks themselves are read
    /// by the epoll loop, which calls back here.
    ///
    /// Polling only follows requests served without the disk (reads of unallocated
    /// clusters, reads the kernel finished from the page cache as it took them): their next
    /// request comes within a round trip to the driver, which a poll catches without two
    /// wake-ups. Once a request of this pass is at the disk, polling would only spin through
    /// the disk's latency, so the worker sleeps instead.
    fn serve(&self, queue: usize, vring: &VringRwLock) {
        let mut reached_disk = self.in_flight(queue) > 0;
        if let Err(e) = self.process_completions(queue) {
            self.log_queue_error(queue, &e);
        }
        if let Some(mut slot) = self.device.lock_slot(queue) {
            if let Some(ring) = slot.ring.as_mut() {
                // A poll that fired for the kick the epoll loop has just read.
                ring.kicked();
            }
        }
        loop {
            if let Err(e) = self.process_queue(queue, vring) {
                self.log_queue_error(queue, &e);
            }
            if let Err(e) = self.process_completions(queue) {
                self.log_queue_error(queue, &e);
            }
            reached_disk |= self.in_flight(queue) > 0;
            if !reached_disk {
                self.poll(queue, vring);
            }
            if !self.wait_in_ring(queue, vring) {
                return;
            }
            if let Err(e) = self.process_completions(queue) {
                self.log_queue_error(queue, &e);
            }
        }
    }

    /// Requests of queue `queue` in its io_uring (queued or at the disk).
    fn in_flight(&self, queue: usize) -> usize {
        self.device
            .lock_slot(queue)
            .and_then(|slot| slot.ring.as_ref().map(QueueRing::in_flight))
            .unwrap_or(0)
    }

    /// Sleeps in queue `queue`'s io_uring until a request finishes or the frontend kicks, and
    /// completes what finished. Returns whether to go on serving: false when nothing is in
    /// flight or a kick came (the epoll loop reads it; the ring's eventfd then reports the
    /// requests still in flight).
    fn wait_in_ring(&self, queue: usize, vring: &VringRwLock) -> bool {
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return false;
        };
        if !self.active() {
            return false;
        }
        let Some(ring) = slot.ring.as_mut() else {
            return false;
        };
        if ring.in_flight() == 0 {
            // Idle: the epoll loop waits for the next kick. Ring notifications stay off: the
            // only completion still to come is the kick's poll, which must not wake it twice.
            return false;
        }
        ring.set_eventfd_notifications(false);
        if let Some(kick) = vring.get_ref().get_kick() {
            ring.watch_kick(kick.as_raw_fd());
        }
        let mut finished = Vec::new();
        let waited = ring.wait_any(&mut finished);
        let go_on = waited.is_ok() && !ring.kicked();
        if !go_on {
            ring.set_eventfd_notifications(true);
            // What completed before notifications came back on is collected here; later
            // completions signal the eventfd.
            ring.reap(&mut finished);
        }
        let completed = self.complete_finished(queue, vring, &mut slot, finished);
        drop(slot);
        if let Err(e) = waited {
            tracing::warn!("queue {queue}: waiting in the io_uring failed: {e}");
        }
        if let Err(e) = completed {
            self.log_queue_error(
                queue,
                &Error::Queue {
                    queue,
                    reason: e.to_string(),
                },
            );
        }
        go_on
    }

    /// Adaptive polling (`--poll-us`): after a batch served without the disk, keeps looking
    /// at queue `queue`'s available ring, with driver notifications off, until nothing has
    /// arrived for the poll interval or a request has gone to the io_uring (the worker then
    /// sleeps in the ring); then turns notifications back on and handles what arrived in
    /// between. Saves the driver's kicks and our wake-ups while requests keep coming, at the
    /// price of a busy thread.
    fn poll(&self, queue: usize, vring: &VringRwLock) {
        let interval = self.device.poll();
        if interval.is_zero() || !self.set_notifications(queue, vring, false) {
            return;
        }
        let mut last_progress = Instant::now();
        loop {
            match self.poll_once(queue, vring) {
                Ok(PollStep::Served) => last_progress = Instant::now(),
                Ok(PollStep::Nothing) if last_progress.elapsed() < interval => {
                    std::hint::spin_loop()
                }
                Ok(PollStep::Nothing | PollStep::ReachedDisk) => break,
                Err(e) => {
                    self.log_queue_error(queue, &e);
                    break;
                }
            }
            if !self.active() {
                return;
            }
        }
        self.set_notifications(queue, vring, true);
        // Chains made available just before notifications came back on.
        if let Err(e) = self.process_queue(queue, vring) {
            self.log_queue_error(queue, &e);
        }
    }

    /// Turns driver notifications of queue `queue` on or off, if the ring is still served
    /// (checked under the queue's slot, which GET_VRING_BASE takes after stopping the ring:
    /// nothing is written into a stopped ring). Returns whether it did.
    fn set_notifications(&self, queue: usize, vring: &VringRwLock, on: bool) -> bool {
        let Some(_slot) = self.device.lock_slot(queue) else {
            return false;
        };
        if !self.active() || !usable(vring) {
            return false;
        }
        let set = match on {
            true => vring.enable_notification().map(drop),
            false => vring.disable_notification(),
        };
        if let Err(e) = &set {
            tracing::debug!("queue {queue}: cannot turn notifications on ({on}): {e}");
        }
        set.is_ok()
    }

    /// One polling step: starts the chains that became available, if any.
    fn poll_once(&self, queue: usize, vring: &VringRwLock) -> Result<PollStep> {
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return Ok(PollStep::Nothing);
        };
        if !self.active() {
            return Ok(PollStep::Nothing);
        }
        let queue_error = |e: virtio_queue::Error| Error::Queue {
            queue,
            reason: e.to_string(),
        };
        let pending = {
            let mem = self.mem.memory();
            let state = vring.get_ref();
            let q = state.get_queue();
            state.is_enabled()
                && q.ready()
                && q.avail_idx(&*mem, Ordering::Acquire).map_err(queue_error)?
                    != Wrapping(q.next_avail())
        };
        if !pending {
            return Ok(PollStep::Nothing);
        }
        if !self
            .process_available(queue, vring, &mut slot)
            .map_err(queue_error)?
        {
            return Ok(PollStep::Nothing);
        }
        self.submit_and_complete(queue, &mut slot)?;
        Ok(match slot.ring.as_ref() {
            Some(ring) if ring.in_flight() > 0 => PollStep::ReachedDisk,
            _ => PollStep::Served,
        })
    }

    /// Logs a queue error, rate-limited: a broken ring is the guest's problem, and the worker
    /// stays alive for a reset.
    fn log_queue_error(&self, queue: usize, e: &Error) {
        let errors = self
            .device
            .lock_slot(queue)
            .map_or(1, |slot| slot.ring_errors);
        if errors.is_power_of_two() {
            tracing::warn!("{e} (error {errors} on this queue)");
        }
    }

    /// Writes the status of finished io_uring requests and puts them in the used ring.
    fn complete_finished(
        &self,
        queue: usize,
        vring: &VringRwLock,
        slot: &mut QueueSlot,
        finished: Vec<Finished>,
    ) -> std::result::Result<(), virtio_queue::Error> {
        if finished.is_empty() {
            return Ok(());
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        for f in finished {
            self.complete_ring_request(queue, &mut state, slot, &mem, f);
        }
        if notify::needs_notification(state.get_queue_mut(), &*mem)? {
            signal(queue, &state);
        }
        Ok(())
    }

    /// Waits for queue `queue`'s requests in the io_uring and puts them in the used ring of
    /// `state` (held by the caller); returns how many were completed.
    fn drain_ring(
        &self,
        queue: usize,
        state: &mut VringState,
        slot: &mut QueueSlot,
        mem: &GuestMemoryMmap,
    ) -> usize {
        let mut finished = Vec::new();
        match slot.ring.as_mut() {
            Some(ring) if ring.in_flight() > 0 => ring.wait_all(&mut finished),
            _ => return 0,
        }
        let n = finished.len();
        for f in finished {
            self.complete_ring_request(queue, state, slot, mem, f);
        }
        n
    }

    /// Puts a request back from the io_uring in the used ring of `state`. One the ring could
    /// not move completely (short transfer, unaligned buffer for O_DIRECT, any error, or it
    /// needs allocation after all) is redone through the bounce buffer, which reports errors;
    /// a write first waits for the rest of the ring, whose in-place writes may hold the
    /// clusters it needs.
    fn complete_ring_request(
        &self,
        queue: usize,
        state: &mut VringState,
        slot: &mut QueueSlot,
        mem: &GuestMemoryMmap,
        f: Finished,
    ) {
        let writethrough = self.writethrough();
        let done = if f.ok && writethrough && f.req.kind == RequestKind::Out {
            // Durable before it is done.
            match self.device.disk().flush() {
                Ok(()) => finish_zero_copy(&f),
                Err(e) => {
                    tracing::warn!("queue {queue}: flushing a write in writethrough mode: {e}");
                    exec::finish(&*f.mem, &f.req, VIRTIO_BLK_S_IOERR as u8, 0)
                }
            }
        } else if f.ok {
            finish_zero_copy(&f)
        } else {
            tracing::debug!(
                "queue {queue}: io_uring request type {} at {} not completed there; running it \
                 through the bounce buffer",
                f.req.kind.type_code(),
                f.req.offset(),
            );
            if f.req.kind.changes_the_image() {
                self.drain_ring(queue, state, slot, mem);
            }
            slot.executor
                .run(&*f.mem, self.device.disk(), &f.req, writethrough)
        };
        add_used(queue, state, slot, mem, done);
    }
}

/// Whether `vring` is served: set up (ready; GET_VRING_BASE stops it) and enabled.
fn usable(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// The used-ring entry of a request the ring moved completely.
fn finish_zero_copy(f: &Finished) -> exec::Completion {
    let data_len = match f.req.kind {
        RequestKind::In => u32::try_from(f.req.data_len()).unwrap_or(u32::MAX),
        _ => 0,
    };
    exec::finish(&*f.mem, &f.req, VIRTIO_BLK_S_OK as u8, data_len)
}

/// Event id of a queue's io_uring completions: above the vring ids, as vhost-user-backend
/// requires for extra listeners.
pub fn ring_event(num_queues: usize) -> u16 {
    u16::try_from(num_queues + 1).unwrap_or(u16::MAX)
}

/// Puts a completion in the used ring (or logs why it cannot).
fn add_used(
    queue: usize,
    state: &mut VringState,
    slot: &mut QueueSlot,
    mem: &GuestMemoryMmap,
    done: Completion,
) {
    if let Err(e) = state
        .get_queue_mut()
        .add_used(mem, done.head, done.used_len)
    {
        // A head index past the queue (the chain was dropped as empty) or a used ring outside
        // guest memory: nothing to complete.
        slot.ring_errors += 1;
        if slot.ring_errors.is_power_of_two() {
            tracing::warn!("queue {queue}: cannot complete chain {}: {e}", done.head);
        }
    }
}

fn signal(queue: usize, state: &VringState) {
    if let Err(e) = state.signal_used_queue() {
        tracing::warn!("queue {queue}: cannot signal the frontend: {e}");
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
        // The write cache stays as `--writethrough` or a driver's `wce` write left it, as in
        // qemu-storage-daemon's export: a driver that cannot set it does not change it.
        let flushes = features::has(features, VIRTIO_BLK_F_FLUSH);
        self.flushes.store(flushes, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        features::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = BlkConfig {
            writeback: !self.writethrough(),
            ..self.device.config()
        };
        config.read(offset, size)
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
                if self.device.set_write_cache(writeback) && !writeback {
                    // Switched to writethrough: make earlier writes durable too.
                    self.device.disk().flush().map_err(io::Error::other)?;
                }
                if let Some(n) = self.cache_changes.count() {
                    tracing::info!(
                        "guest set the write cache to {} (change {n})",
                        if writeback {
                            "writeback"
                        } else {
                            "writethrough"
                        }
                    );
                }
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: finish the requests in flight before the frontend reads the base.
        let queue = queue_index as usize;
        let Some(mut slot) = self.device.lock_slot(queue) else {
            return Ok(());
        };
        let mut finished = Vec::new();
        if let Some(ring) = slot.ring.as_mut() {
            ring.wait_all(&mut finished);
            // The frontend may hand over a new kick eventfd next.
            ring.unwatch_kick();
        }
        if let Some(vring) = slot.vring.clone() {
            self.complete_finished(queue, &vring, &mut slot, finished)
                .map_err(|e| io::Error::other(format!("queue {queue}: {e}")))?;
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues()).map(|q| 1u64 << q).collect()
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
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {thread_id}"
            )));
        }
        if !self.active() {
            // A worker of a connection that has ended, not yet gone: the rings are the
            // device's and may already serve the next connection; leave them alone.
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index, its only vring is event 0
        // and its io_uring's eventfd is `ring_event`.
        if device_event == ring_event(self.device.num_queues()) {
            if let Some(mut slot) = self.device.lock_slot(thread_id) {
                if let Some(ring) = slot.ring.as_mut() {
                    ring.clear_eventfd();
                }
            }
        } else if device_event != 0 {
            return Err(io::Error::other(format!(
                "event {device_event} on worker {thread_id} names no queue"
            )));
        }
        if let Some(vring) = vrings.first() {
            self.serve(thread_id, vring);
        }
        Ok(())
    }
}
