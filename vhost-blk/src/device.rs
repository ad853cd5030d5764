//! The device as it outlives frontend connections: the disk, its configuration, and one
//! slot per queue that serialises a queue's work with shutdown.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use crate::config::BlkConfig;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::request::Limits;
use crate::uring::QueueRing;
use vhost_user_backend::VringRwLock;

/// Largest number of queues: vhost-user-backend maps queues to threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue size (the virtio limit for split queues).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Per-queue state that lives across connections. A worker holds the slot's lock while it
/// processes a batch, so locking every slot waits for batches in progress; requests still in
/// the io_uring are waited for separately ([`QueueRing::wait_all`]).
pub struct QueueSlot {
    /// The queue's executor and bounce buffer.
    pub executor: Executor,
    /// The queue's io_uring, for raw images (zero-copy reads and writes).
    pub ring: Option<QueueRing>,
    /// The connection's vring, once its worker has seen it (for completing at stop).
    pub vring: Option<VringRwLock>,
    /// Ring errors seen (for rate-limited logging).
    pub ring_errors: u64,
}

/// A vhost-user-blk device: a disk served on `num_queues` queues.
pub struct Device {
    disk: Disk,
    config: BlkConfig,
    queue_size: u16,
    slots: Vec<Mutex<QueueSlot>>,
    stopping: AtomicBool,
    poll: Duration,
    /// The write cache setting (`wce`): on for a new device, then the last driver's choice.
    /// Kept across connections, as QEMU keeps it across reconnects and never reads it back.
    write_cache: AtomicBool,
}

impl Device {
    /// A device for `disk` with `num_queues` queues of at most `queue_size` entries.
    pub fn new(disk: Disk, num_queues: u16, queue_size: u16) -> Result<Device> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(Error::InvalidOption(format!(
                "the number of queues must be between 1 and {MAX_QUEUES}, not {num_queues}"
            )));
        }
        if !queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&queue_size) {
            return Err(Error::InvalidOption(format!(
                "the queue size must be a power of two between 4 and {MAX_QUEUE_SIZE}, not \
                 {queue_size}"
            )));
        }
        let config = BlkConfig {
            topology: disk.topology(),
            ..BlkConfig::new(
                disk.capacity(),
                num_queues,
                queue_size,
                disk.discard_alignment(),
            )
        };
        let mut ring_warned = false;
        let slots = (0..num_queues)
            .map(|_| {
                let ring = QueueRing::new(disk.image().clone(), u32::from(queue_size))
                    .map_err(|e| {
                        if !std::mem::replace(&mut ring_warned, true) {
                            tracing::warn!(
                                "io_uring unavailable ({e}); I/O goes through bounce buffers"
                            );
                        }
                    })
                    .ok();
                Mutex::new(QueueSlot {
                    executor: Executor::new(),
                    ring,
                    vring: None,
                    ring_errors: 0,
                })
            })
            .collect();
        Ok(Device {
            disk,
            config,
            queue_size,
            slots,
            stopping: AtomicBool::new(false),
            poll: Duration::ZERO,
            write_cache: AtomicBool::new(config.writeback),
        })
    }

    /// Sets how long a worker keeps polling its queue after a batch served without the disk
    /// (`--poll-us`); zero (the default of a new device) never polls.
    pub fn set_poll(&mut self, poll: Duration) {
        self.poll = poll;
    }

    /// Registers each connection's guest memory with the queues' io_uring (`--pin-memory`).
    pub fn set_pin_memory(&self, on: bool) {
        for queue in 0..self.slots.len() {
            if let Some(ring) = self.lock_slot(queue).as_mut().and_then(|s| s.ring.as_mut()) {
                ring.set_pin_memory(on);
            }
        }
    }

    /// How long a worker keeps polling its queue after a batch served without the disk.
    pub fn poll(&self) -> Duration {
        self.poll
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The configuration space, with the current write cache setting.
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            writeback: self.write_cache(),
            ..self.config
        }
    }

    /// Whether the write cache is on (the `wce` the driver sees).
    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    /// Turns the write cache on or off; returns the previous setting.
    pub fn set_write_cache(&self, on: bool) -> bool {
        self.write_cache.swap(on, Ordering::Relaxed)
    }

    /// What the request parser enforces.
    pub fn limits(&self) -> Limits {
        self.config.limits(self.disk.read_only())
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.slots.len()
    }

    /// Largest queue size a frontend may choose.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Locks queue `queue`'s slot (waiting for a batch in progress).
    pub fn lock_slot(&self, queue: usize) -> Option<MutexGuard<'_, QueueSlot>> {
        self.slots
            .get(queue)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Drains every queue's io_uring (completions dropped: no frontend will see them) and
    /// hands its slot to `visit`, one slot at a time.
    pub fn drain_slots(&self, visit: impl FnMut(&mut QueueSlot)) {
        self.drain(visit, false);
    }

    /// Takes every slot, each drained as it is taken, and returns the guards, all held.
    ///
    /// Slots a worker holds are retried after the others rather than waited for: a worker can
    /// be waiting, its slot locked, for a cluster that a write in another queue's ring holds
    /// until that ring is reaped, and the workers of a connection going away reap nothing.
    /// Only one caller may hold several slots at once (else two could each wait for the
    /// other's): [`Self::drain_slots`] lets each go at once.
    fn drain(
        &self,
        mut visit: impl FnMut(&mut QueueSlot),
        keep: bool,
    ) -> Vec<MutexGuard<'_, QueueSlot>> {
        let mut done = vec![false; self.slots.len()];
        let mut kept = Vec::new();
        while done.contains(&false) {
            for (slot, done) in self.slots.iter().zip(done.iter_mut()) {
                if *done {
                    continue;
                }
                let mut locked = match slot.try_lock() {
                    Ok(g) => g,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => continue,
                };
                if let Some(ring) = locked.ring.as_mut() {
                    ring.wait_all(&mut Vec::new());
                }
                visit(&mut locked);
                *done = true;
                if keep {
                    kept.push(locked);
                }
            }
            if done.contains(&false) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        kept
    }

    /// The eventfd of queue `queue`'s io_uring, if it has one.
    pub fn ring_eventfd(&self, queue: usize) -> Option<RawFd> {
        self.lock_slot(queue)?.ring.as_ref().map(QueueRing::eventfd)
    }

    /// Whether reads and writes go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.ring_eventfd(0).is_some()
    }

    /// Whether shutdown has begun: workers then process nothing more.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops request processing, waits for requests in progress, and closes the image
    /// (flushed and marked clean).
    ///
    /// Afterwards no worker touches the disk again; the process can exit.
    pub fn shutdown(&self) -> Result<()> {
        self.stopping.store(true, Ordering::Release);
        // Taking every slot waits for batches in progress; later batches see `stopping`. The
        // guest will not see the completions of requests in the rings; their data reaches
        // the file.
        let guards = self.drain(|_| {}, true);
        let res = self.disk.close();
        drop(guards);
        res
    }
}
