//! The device as it outlives frontend connections: the disk, its configuration, and one
//! slot per queue that serialises a queue's work with shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::config::BlkConfig;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::request::Limits;

/// Largest number of queues: vhost-user-backend maps queues to threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue size (the virtio limit for split queues).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Per-queue state that lives across connections. A worker holds the slot's lock while it
/// processes a batch, so locking every slot waits for in-flight requests to finish.
pub struct QueueSlot {
    /// The queue's executor and bounce buffer.
    pub executor: Executor,
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
}

impl Device {
    /// A device for `disk` with `num_queues` queues of at most `queue_size` entries.
    pub fn new(disk: Disk, num_queues: u16, queue_size: u16) -> Result<Device> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(Error::InvalidOption(format!(
                "the number of queues must be between 1 and {MAX_QUEUES}, not {num_queues}"
            )));
        }
        if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE || queue_size < 4 {
            return Err(Error::InvalidOption(format!(
                "the queue size must be a power of two between 4 and {MAX_QUEUE_SIZE}, not \
                 {queue_size}"
            )));
        }
        let config = BlkConfig::new(
            disk.capacity(),
            num_queues,
            queue_size,
            disk.discard_alignment(),
        );
        let slots = (0..num_queues)
            .map(|_| {
                Mutex::new(QueueSlot {
                    executor: Executor::new(),
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
        })
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The configuration space as a fresh connection sees it.
    pub fn config(&self) -> BlkConfig {
        self.config
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

    /// Whether shutdown has begun: workers then process nothing more.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops request processing, waits for requests in progress, and flushes the image.
    ///
    /// Afterwards no worker touches the disk again; the process can exit.
    pub fn shutdown(&self) -> Result<()> {
        self.stopping.store(true, Ordering::Release);
        // Taking every slot waits for batches in progress; later batches see `stopping`.
        let guards: Vec<_> = (0..self.slots.len())
            .filter_map(|q| self.lock_slot(q))
            .collect();
        let res = self.disk.flush();
        drop(guards);
        res
    }
}
