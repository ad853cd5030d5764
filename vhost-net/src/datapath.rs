//! Moving packets: tx chains to the TAP (here) and frames from the TAP into rx chains
//! ([`crate::rx`]), both straight between guest memory and the kernel, plus what both
//! directions share: completing chains, publishing a packet's used entries together, and the
//! EVENT_IDX check.
//!
//! The functions work on a bare [`Queue`] and a file descriptor, so they can be tested with a
//! mock queue and a datagram socket standing in for the TAP. Bad chains are dropped and
//! counted; nothing the guest puts in a ring makes them panic or fail.

use std::io;
use std::num::Wrapping;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use cowbird_daemon::notify;

use crate::chain::{parse_tx, to_iovecs};
use crate::device::{PairSlot, PairStats, TxFrame};
use crate::error::Error;

/// Most chains completed before the caller gets a chance to notify the guest.
pub const BATCH: usize = 64;

/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
pub(crate) const NUM_BUFFERS_OFFSET: u64 = 10;

/// Whether `queue` can be served: the driver set it up (`ready`), its rings lie whole in
/// guest memory, and its available index is at most a ring's size ahead of ours. A ring that
/// virtio-queue cannot pop from (one running out of memory, or an available ring at address 0,
/// which it takes for a ring never set up) is left alone, and so is a larger jump of the
/// index, an error: serving either would go round without end (the index never catches up).
/// Such a ring waits to be set up again.
pub fn check_ring<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, virtio_queue::Error> {
    if !queue.ready() || !rings_in_memory(queue, mem) {
        return Ok(false);
    }
    let pending = queue.avail_idx(mem, Ordering::Acquire)? - Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(virtio_queue::Error::InvalidAvailRingIndex);
    }
    Ok(true)
}

/// Whether the descriptor table and both rings of `queue` (event index fields included) lie
/// in guest memory, the available ring not at address 0.
fn rings_in_memory<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    let size = u64::from(queue.size());
    let inside = |addr: u64, len: u64, access| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    };
    queue.avail_ring() != 0
        && inside(queue.desc_table(), 16 * size, Permissions::Read)
        && inside(queue.avail_ring(), 6 + 2 * size, Permissions::Read)
        && inside(queue.used_ring(), 6 + 8 * size, Permissions::Write)
}

/// Logs a dropped chain, rate-limited per pair.
pub(crate) fn log_bad(slot: &mut PairSlot, what: &str, e: &Error) {
    slot.errors += 1;
    if slot.errors.is_power_of_two() {
        tracing::warn!("{what}: {e} (dropped; {} such drops so far)", slot.errors);
    }
}

pub(crate) fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    slot: &mut PairSlot,
    head: u16,
    len: u32,
) {
    if let Err(e) = queue.add_used(mem, head, len) {
        slot.errors += 1;
        if slot.errors.is_power_of_two() {
            tracing::warn!("cannot complete chain {head}: {e}");
        }
    }
}

/// Writes used ring entry number `pos` (head, len) without moving the used index, so the
/// driver does not see it yet.
fn write_used_ahead<M: GuestMemory>(
    queue: &Queue,
    mem: &M,
    slot: &mut PairSlot,
    pos: u16,
    head: u16,
    len: u32,
) {
    let mut elem = [0u8; 8];
    elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
    elem[4..].copy_from_slice(&len.to_le_bytes());
    let offset = 4 + 8 * u64::from(pos % queue.size().max(1));
    let written = GuestAddress(queue.used_ring())
        .checked_add(offset)
        .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(queue.used_ring()),
        ))
        .and_then(|addr| mem.write_slice(&elem, addr));
    if let Err(e) = written {
        slot.errors += 1;
        if slot.errors.is_power_of_two() {
            tracing::warn!("cannot complete chain {head}: {e}");
        }
    }
}

/// Puts one packet's chains, `(head, len)` for `count` chains from `entry(i)`, in the used
/// ring so that the driver sees them all at once.
///
/// Virtio 1.x (5.1.6.4): "the device MUST use all buffers used by a single receive packet
/// together, such that at least `num_buffers` are observed by driver as used". `add_used`
/// publishes the used index after every entry, and a polling driver (DPDK's virtio PMD) that
/// sees only the first buffers of a packet drops them and takes the rest for the start of the
/// next packet. So all entries but the last are written ahead of the index, and the last one
/// goes through `add_used`, whose release store of the index publishes them together.
pub(crate) fn add_used_together<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    slot: &mut PairSlot,
    count: usize,
    mut entry: impl FnMut(&PairSlot, usize) -> (u16, u32),
) {
    let first = queue.next_used();
    for i in 0..count {
        let (head, len) = entry(slot, i);
        let pos = first.wrapping_add(i as u16);
        if i + 1 < count {
            write_used_ahead(queue, mem, slot, pos, head, len);
        } else {
            queue.set_next_used(pos);
            add_used(queue, mem, slot, head, len);
        }
    }
}

/// Whether the driver is to be notified of the used entries from index `old` on: with
/// EVENT_IDX, whether its `used_event` lies among them (the virtio spec's `vring_need_event`);
/// without EVENT_IDX, unless the driver set NO_INTERRUPT.
///
/// The queue's own `needs_notification` counts `add_used` calls since it last ran, which is
/// fewer than the entries when a packet's chains are completed together
/// (as [`crate::rx::process_rx`] does); this counts from the used index the caller saw before.
pub fn needs_notification_since<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    old: u16,
) -> Result<bool, virtio_queue::Error> {
    // Also resets the queue's count for the next round.
    let counted = notify::needs_notification(queue, mem)?;
    if counted || !queue.event_idx_enabled() {
        return Ok(counted);
    }
    // `used_event` follows the available ring's entries.
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    let used_event: u16 = mem
        .load(addr, Ordering::Acquire)
        .map_err(virtio_queue::Error::GuestMemory)?;
    let new = Wrapping(queue.next_used());
    Ok(new - Wrapping(u16::from_le(used_event)) - Wrapping(1) < new - Wrapping(old))
}

/// `readv`/`writev` on `fd`.
pub(crate) fn rw(fd: RawFd, iovecs: &[libc::iovec], write: bool) -> io::Result<usize> {
    let n = libc::c_int::try_from(iovecs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the iovecs point into guest memory mapped for the duration of the call (the
    // caller holds the memory guard) and were checked to lie inside it.
    let res = unsafe {
        if write {
            libc::writev(fd, iovecs.as_ptr(), n)
        } else {
            libc::readv(fd, iovecs.as_ptr(), n)
        }
    };
    if res < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(res as usize)
    }
}

/// Writes up to [`BATCH`] available tx chains to `fd` and completes them. Returns the number
/// of chains completed (dropped ones included).
///
/// The batch is parsed first, then written: with the pair's io_uring as one `writev` entry per
/// frame and a single `io_uring_enter` for the whole batch, otherwise with one `writev` call
/// per frame. Either way the kernel reads the frames straight out of guest memory.
pub fn process_tx<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    fd: RawFd,
    hdr_len: usize,
    slot: &mut PairSlot,
    stats: &PairStats,
) -> usize {
    slot.segs.clear();
    slot.iovecs.0.clear();
    slot.tx_frames.clear();
    while slot.tx_frames.len() < BATCH {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let (seg_start, iov_start) = (slot.segs.len(), slot.iovecs.0.len());
        let res = parse_tx(chain, hdr_len, &mut slot.segs).and_then(|len| {
            to_iovecs(mem, &slot.segs[seg_start..], false, &mut slot.iovecs.0).map(|()| len)
        });
        let frame = match res {
            Ok(len) => TxFrame {
                head,
                iovecs: iov_start..slot.iovecs.0.len(),
                len,
                result: 0,
            },
            Err(e) => {
                PairStats::add(&stats.tx_dropped, 1);
                log_bad(slot, "tx", &e);
                TxFrame {
                    head,
                    iovecs: iov_start..iov_start,
                    len: 0,
                    result: -1,
                }
            }
        };
        slot.tx_frames.push(frame);
    }
    let done = slot.tx_frames.len();
    if done == 0 {
        return 0;
    }
    // All iovecs are in place: their addresses no longer move while the kernel reads them.
    debug_assert!(slot.uring.as_ref().is_none_or(|r| r.fd() == fd));
    if let Some(ring) = slot.uring.as_mut() {
        if let Err(e) = ring.write_batch(&slot.iovecs.0, &mut slot.tx_frames) {
            tracing::warn!("io_uring failed ({e}); tx falls back to one writev per frame");
            slot.uring = None;
        }
    } else {
        for f in slot.tx_frames.iter_mut().filter(|f| f.result == 0) {
            f.result = match rw(fd, &slot.iovecs.0[f.iovecs.clone()], true) {
                Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
        }
    }
    for i in 0..done {
        let f = &slot.tx_frames[i];
        let (head, len, result) = (f.head, f.len, f.result);
        if len > 0 {
            if result >= 0 {
                PairStats::add(&stats.tx_packets, 1);
                PairStats::add(&stats.tx_bytes, len - hdr_len as u64);
            } else {
                // EAGAIN (the TAP's queue is full), EINVAL (a bad vnet header or a runt
                // frame), EIO (the link is down): the frame is lost either way.
                PairStats::add(&stats.tx_dropped, 1);
                slot.errors += 1;
                if slot.errors.is_power_of_two() {
                    tracing::debug!(
                        "tx chain {head}: the TAP refused the frame: {}",
                        io::Error::from_raw_os_error(-result)
                    );
                }
            }
        }
        add_used(queue, mem, slot, head, 0);
    }
    slot.iovecs.0.clear();
    done
}
