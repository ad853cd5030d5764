//! The device as it outlives frontend connections: the TAP, the configuration space, the
//! offered features, and one slot per queue pair that serialises a pair's work with shutdown.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use vhost::vhost_user::message::VhostUserVirtioFeatures;

use crate::chain::Segment;
use crate::config::{self, FeatureOptions, NetConfigSpace};
use crate::error::{Error, Result};
use crate::tap::Tap;
use crate::uring::{BatchEntry, PairRing};
use crate::MacAddress;

pub use crate::config::MAX_QUEUE_PAIRS;

/// Packet and drop counters of one queue pair. `tx` is guest→TAP, `rx` TAP→guest.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Frames written to the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Tx chains dropped: malformed, or refused by the TAP.
    pub tx_dropped: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (without the vnet header).
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP but not delivered (too large for the guest's buffers).
    pub rx_dropped: AtomicU64,
    /// Rx chains returned unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
}

impl PairStats {
    /// Adds `n` to `counter` (relaxed: these are statistics).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_chains: get(&self.rx_bad_chains),
        }
    }
}

/// A copy of [`PairStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`PairStats::tx_packets`].
    pub tx_packets: u64,
    /// See [`PairStats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`PairStats::tx_dropped`].
    pub tx_dropped: u64,
    /// See [`PairStats::rx_packets`].
    pub rx_packets: u64,
    /// See [`PairStats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`PairStats::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`PairStats::rx_bad_chains`].
    pub rx_bad_chains: u64,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx {} packets {} bytes {} dropped, rx {} packets {} bytes {} dropped {} bad chains",
            self.tx_packets,
            self.tx_bytes,
            self.tx_dropped,
            self.rx_packets,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_bad_chains
        )
    }
}

/// Scratch `iovec`s of one queue pair.
#[derive(Debug, Default)]
pub struct Iovecs(pub Vec<libc::iovec>);

// SAFETY: the pointers are only scratch space filled and used by the thread holding the pair's
// slot lock, within one batch, while it holds the guest memory they point into.
unsafe impl Send for Iovecs {}

/// One rx chain gathered for the next packet.
#[derive(Debug, Clone)]
pub struct RxChain {
    /// Head descriptor index.
    pub head: u16,
    /// Its buffers: a range of [`PairSlot::segs`].
    pub segs: std::ops::Range<usize>,
    /// Their total length.
    pub capacity: u64,
}

/// One rx buffer set of a batch: consecutive gathered chains with room for the largest
/// packet (a single chain without MRG_RXBUF), read into with one `readv`.
#[derive(Debug, Clone)]
pub struct RxSet {
    /// Its chains: a range of [`PairSlot::rx_chains`].
    pub chains: std::ops::Range<usize>,
    /// Their buffers' host mapping: a range of [`PairSlot::iovecs`].
    pub iovecs: std::ops::Range<usize>,
    /// Their total length.
    pub capacity: u64,
    /// What reading into it returned: bytes or a negative errno (0 before it is read).
    pub result: i32,
}

impl BatchEntry for RxSet {
    fn iovecs(&self) -> std::ops::Range<usize> {
        self.iovecs.clone()
    }

    fn result_mut(&mut self) -> &mut i32 {
        &mut self.result
    }
}

/// One tx chain of a batch.
#[derive(Debug, Clone)]
pub struct TxFrame {
    /// Head descriptor index.
    pub head: u16,
    /// Its buffers: a range of [`PairSlot::iovecs`] (empty for a dropped chain).
    pub iovecs: std::ops::Range<usize>,
    /// Frame length with the vnet header (0 for a dropped chain).
    pub len: u64,
    /// What writing it returned: bytes or a negative errno (-1 for a dropped chain, 0 before
    /// it is written).
    pub result: i32,
}

impl BatchEntry for TxFrame {
    fn iovecs(&self) -> std::ops::Range<usize> {
        self.iovecs.clone()
    }

    fn result_mut(&mut self) -> &mut i32 {
        &mut self.result
    }
}

/// Per-pair state that lives across connections. A worker holds the slot's lock while it
/// processes a batch, so locking every slot waits for batches in progress.
#[derive(Debug, Default)]
pub struct PairSlot {
    /// Scratch: buffers of the chains being processed.
    pub segs: Vec<Segment>,
    /// Scratch: their host mapping.
    pub iovecs: Iovecs,
    /// Scratch: rx chains gathered for a batch of packets.
    pub rx_chains: Vec<RxChain>,
    /// Scratch: the rx batch's buffer sets.
    pub rx_sets: Vec<RxSet>,
    /// Buffer sets the next rx batch reads into: grows while the TAP fills every set, shrinks
    /// to what it held when it ran dry.
    pub rx_window: usize,
    /// Scratch: a packet being moved to earlier rx chains.
    pub bounce: Vec<u8>,
    /// A packet read from the TAP for buffers too few to hold the largest packet (MRG_RXBUF)
    /// and longer than they turned out to be: delivered first once the guest adds buffers.
    pub held: Vec<u8>,
    /// Scratch: the tx batch.
    pub tx_frames: Vec<TxFrame>,
    /// The pair's io_uring for tx and rx batches (`None`: one writev or readv per packet).
    pub uring: Option<PairRing>,
    /// Errors seen (for rate-limited logging).
    pub errors: u64,
}

/// What the device is built from.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Number of queue pairs, 1..=[`MAX_QUEUE_PAIRS`].
    pub queue_pairs: u16,
    /// Largest virtqueue size a frontend may choose.
    pub queue_size: u16,
    /// The guest's MAC address.
    pub mac: MacAddress,
    /// MTU offered to the guest (and set on the TAP by the caller).
    pub mtu: Option<u16>,
}

/// A vhost-user-net device: a TAP served on `queue_pairs` rx/tx pairs and a control queue.
pub struct Device {
    tap: Tap,
    opts: DeviceOptions,
    features: u64,
    slots: Vec<Mutex<PairSlot>>,
    stats: Vec<PairStats>,
    stopping: AtomicBool,
}

impl Device {
    /// A device on `tap`, which must have one queue per pair.
    pub fn new(tap: Tap, opts: DeviceOptions) -> Result<Device> {
        if opts.queue_pairs == 0 || opts.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(Error::InvalidQueuePairs {
                value: u64::from(opts.queue_pairs),
                max: MAX_QUEUE_PAIRS,
            });
        }
        if tap.num_queues() != usize::from(opts.queue_pairs) {
            return Err(Error::TapConflict {
                name: tap.name().to_owned(),
                reason: format!(
                    "{} queues open for {} queue pairs",
                    tap.num_queues(),
                    opts.queue_pairs
                ),
            });
        }
        if !opts.queue_size.is_power_of_two() {
            return Err(Error::InvalidQueueSize(u64::from(opts.queue_size)));
        }
        let ufo = tap.supports_ufo();
        let features = config::device_features(FeatureOptions {
            mtu: opts.mtu.is_some(),
            ufo,
        }) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let pairs = usize::from(opts.queue_pairs);
        let mut warned = false;
        let slots = (0..pairs)
            .map(|pair| {
                let uring = tap
                    .queue_fd(pair)
                    .map(PairRing::new)
                    .transpose()
                    .map_err(|e| {
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!("io_uring unavailable ({e}); one syscall per packet");
                        }
                    })
                    .ok()
                    .flatten();
                Mutex::new(PairSlot {
                    uring,
                    ..PairSlot::default()
                })
            })
            .collect();
        Ok(Device {
            tap,
            features,
            slots,
            stats: (0..pairs).map(|_| PairStats::default()).collect(),
            opts,
            stopping: AtomicBool::new(false),
        })
    }

    /// The TAP device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The options the device was built with.
    pub fn options(&self) -> &DeviceOptions {
        &self.opts
    }

    /// The virtio feature bits offered (with VHOST_USER_F_PROTOCOL_FEATURES).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The configuration space.
    pub fn config(&self) -> NetConfigSpace {
        NetConfigSpace {
            mac: self.opts.mac,
            link_up: true,
            max_virtqueue_pairs: self.opts.queue_pairs,
            mtu: self.opts.mtu,
        }
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.slots.len()
    }

    /// Number of virtqueues (two per pair and the control queue).
    pub fn num_queues(&self) -> usize {
        config::num_queues(self.opts.queue_pairs)
    }

    /// Largest queue size a frontend may choose.
    pub fn queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    /// Locks pair `pair`'s slot (waiting for a batch in progress).
    pub fn lock_slot(&self, pair: usize) -> Option<MutexGuard<'_, PairSlot>> {
        self.slots
            .get(pair)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Drops the packets held for rx buffers (read under features a new negotiation may
    /// change: the vnet header, the offloads).
    pub fn drop_held_packets(&self) {
        for pair in 0..self.slots.len() {
            if let Some(mut slot) = self.lock_slot(pair) {
                slot.held.clear();
            }
        }
    }

    /// Counters of pair `pair`.
    pub fn stats(&self, pair: usize) -> Option<&PairStats> {
        self.stats.get(pair)
    }

    /// The sum of all pairs' counters.
    pub fn total_stats(&self) -> StatsSnapshot {
        self.stats
            .iter()
            .map(PairStats::snapshot)
            .fold(StatsSnapshot::default(), |a, b| StatsSnapshot {
                tx_packets: a.tx_packets + b.tx_packets,
                tx_bytes: a.tx_bytes + b.tx_bytes,
                tx_dropped: a.tx_dropped + b.tx_dropped,
                rx_packets: a.rx_packets + b.rx_packets,
                rx_bytes: a.rx_bytes + b.rx_bytes,
                rx_dropped: a.rx_dropped + b.rx_dropped,
                rx_bad_chains: a.rx_bad_chains + b.rx_bad_chains,
            })
    }

    /// Whether shutdown has begun: workers then process nothing more.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops packet processing and waits for batches in progress. Afterwards no worker
    /// touches the TAP or guest memory again; the process can exit.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        for pair in 0..self.slots.len() {
            drop(self.lock_slot(pair));
        }
    }
}
