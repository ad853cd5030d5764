//! TAP → guest: frames read from the TAP straight into the guest's rx buffers.
//!
//! A round gathers available rx chains into buffer sets, each with room for the largest
//! packet (one chain without MRG_RXBUF; with it, consecutive chains until they hold
//! [`RxParams::max_packet`]), and reads one packet into each set: through the pair's io_uring
//! as one `readv` entry per set and one `io_uring_enter` for the round, or without it with
//! one `readv` call per round. The number of sets per round follows the TAP: it doubles
//! while every set gets a packet and drops to what the TAP held when it runs dry, so an idle
//! TAP costs one failed read, not a batch of them. Chains too few for the largest packet
//! (MRG_RXBUF) take the next packet through a host buffer if it fits them, else it is held
//! for the guest's next buffers (`PairSlot::held`).
//!
//! Packets are put in the used ring in ring order, each starting at the first chain not yet
//! used. A packet shorter than its set leaves chains of that set unused; the next packet is
//! then moved down into them (a copy inside guest memory, needed only with MRG_RXBUF when
//! sets span several chains, or after a dropped packet), so the chains used always precede
//! the unused ones. (Without MRG_RXBUF a packet must fit one chain: a left-over chain too
//! small for the packet after it goes back used and empty, as a bad chain does.) The unused
//! chains are given back to the available ring by rewinding the next-available index: the
//! guest keeps them, and the index reported to the frontend stays right. Each packet's chains
//! become visible with one used-index update.

use std::num::Wrapping;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::chain::{parse_rx, read_at, to_iovecs, write_at, MAX_BUFFERS};
use crate::config::VNET_HDR_LEN;
use crate::datapath::{add_used, add_used_together, log_bad, rw, BATCH, NUM_BUFFERS_OFFSET};
use crate::device::{PairSlot, PairStats, RxChain, RxSet};
use crate::error::{Error, Result};

/// How rx chains are filled, from the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxParams {
    /// The vnet header length.
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: a packet may span several chains.
    pub mrg_rxbuf: bool,
    /// Bytes (header included) the largest packet may need; with MRG_RXBUF, chains are
    /// gathered until they hold this much.
    pub max_packet: u64,
}

/// What [`process_rx`] stopped on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxOutcome {
    /// Chains put in the used ring.
    pub used: usize,
    /// Packets delivered.
    pub packets: usize,
    /// The guest has not made enough buffers available (the TAP may still hold packets).
    pub out_of_buffers: bool,
    /// With `out_of_buffers`: the available index up to which chains were looked at and
    /// found too few for a packet (left available). Only buffers past it can change that.
    pub avail_seen: u16,
    /// The batch limit was reached (more may be waiting).
    pub more: bool,
}

/// Reads up to [`BATCH`] packets from `fd` into available rx chains.
///
/// Stops when the TAP has nothing more (EAGAIN), when the guest's buffers run out, or after a
/// batch. Packets stay in the TAP while the guest has no room for them.
pub fn process_rx<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    fd: RawFd,
    params: RxParams,
    slot: &mut PairSlot,
    stats: &PairStats,
) -> RxOutcome {
    let mut out = RxOutcome::default();
    loop {
        if out.packets >= BATCH {
            out.more = true;
            return out;
        }
        let batched = slot.uring.as_ref().is_some_and(|r| r.reads());
        let want = if batched && slot.held.is_empty() {
            slot.rx_window.clamp(1, BATCH - out.packets)
        } else {
            1
        };
        let Some(gathered) = gather(mem, queue, params, slot, stats, want, &mut out) else {
            out.out_of_buffers = true;
            return out;
        };
        let start = gathered.start;
        if let Err(e) = map_sets(mem, slot) {
            // Buffers that need more iovecs than one read takes (many chains of many
            // buffers, or buffers split across memory regions): the first chain goes back
            // used and empty, as a bad chain does, so that the ring moves on.
            queue.set_next_avail(start.wrapping_add(1));
            PairStats::add(&stats.rx_bad_chains, 1);
            log_bad(slot, "rx", &e);
            add_used(queue, mem, slot, slot.rx_chains[0].head, 0);
            out.used += 1;
            continue;
        }
        let short = params.mrg_rxbuf && slot.rx_sets[0].capacity < params.max_packet;
        if short || !slot.held.is_empty() {
            // No more buffers can join these if a bad chain waits behind them (it is dealt
            // with only once first) or if they are the whole ring.
            let final_buffers = gathered.ended_on_bad_chain
                || queue
                    .avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|idx| (idx - Wrapping(start)).0 >= queue.size());
            fill_from_host(mem, fd, params, slot, final_buffers);
        } else {
            read_sets(fd, slot);
        }
        let before = out.packets;
        let drained = deliver(mem, queue, params, slot, stats, start, &mut out);
        if !slot.held.is_empty() {
            // Its buffers were too few: wait for more than those.
            let seen = slot.rx_chains.len();
            out.out_of_buffers = true;
            out.avail_seen = start.wrapping_add(u16::try_from(seen).unwrap_or(u16::MAX));
            slot.iovecs.0.clear();
            return out;
        }
        slot.iovecs.0.clear();
        let sets = slot.rx_sets.len();
        slot.rx_window = if drained {
            out.packets - before + 1
        } else {
            2 * sets
        }
        .clamp(1, BATCH);
        if drained {
            return out;
        }
    }
}

/// Where [`gather`] put its chains.
struct Gathered {
    /// The available index of the first chain gathered.
    start: u16,
    /// A bad chain right after the ones gathered ended the gathering.
    ended_on_bad_chain: bool,
}

/// Pops chains into at most `want` buffer sets. Bad chains met first are given back used and
/// empty (the driver drops them); one met later ends the round and waits to be first.
/// Returns `None` when no set could be formed (nothing is taken then).
fn gather<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    params: RxParams,
    slot: &mut PairSlot,
    stats: &PairStats,
    want: usize,
    out: &mut RxOutcome,
) -> Option<Gathered> {
    slot.rx_chains.clear();
    slot.rx_sets.clear();
    slot.segs.clear();
    slot.iovecs.0.clear();
    let mut start = queue.next_avail();
    let (mut set_start, mut set_cap) = (0usize, 0u64);
    let mut ended_on_bad_chain = false;
    while slot.rx_sets.len() < want {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let first = slot.segs.len();
        match parse_rx(chain, params.hdr_len, &mut slot.segs) {
            Ok(capacity) => {
                slot.rx_chains.push(RxChain {
                    head,
                    segs: first..slot.segs.len(),
                    capacity,
                });
                set_cap += capacity;
            }
            Err(e) if slot.rx_chains.is_empty() => {
                PairStats::add(&stats.rx_bad_chains, 1);
                log_bad(slot, "rx", &e);
                add_used(queue, mem, slot, head, 0);
                out.used += 1;
                start = queue.next_avail();
                continue;
            }
            Err(_) => {
                // Deal with it first thing next round, after these packets.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                ended_on_bad_chain = true;
                break;
            }
        }
        if !params.mrg_rxbuf || set_cap >= params.max_packet {
            push_set(slot, set_start, set_cap);
            (set_start, set_cap) = (slot.rx_chains.len(), 0);
        }
    }
    if set_start < slot.rx_chains.len() {
        // Chains that cannot hold the largest packet (MRG_RXBUF): alone, they take the next
        // packet through a host buffer if it fits them (a guest may keep fewer buffers than
        // the largest packet needs: Linux refills only once half its ring is free), else
        // after what was gathered before them.
        if slot.rx_sets.is_empty() {
            push_set(slot, set_start, set_cap);
        } else {
            slot.rx_chains.truncate(set_start);
            slot.segs
                .truncate(slot.rx_chains.last().map_or(0, |c| c.segs.end));
        }
    }
    if slot.rx_sets.is_empty() {
        out.avail_seen = queue.next_avail();
        queue.set_next_avail(start);
        return None;
    }
    Some(Gathered {
        start,
        ended_on_bad_chain,
    })
}

/// Turns driver notifications back on for buffers made available past index `seen` (the
/// chains before it were looked at and cannot hold a packet) and says whether some came
/// already. With EVENT_IDX the driver is asked to notify once it passes `seen`; asking from
/// the first chain not taken instead would report those same chains as new, again and again.
pub fn enable_notification_past<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    seen: u16,
) -> std::result::Result<bool, virtio_queue::Error> {
    let next = queue.next_avail();
    queue.set_next_avail(seen);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(next);
    more
}

fn push_set(slot: &mut PairSlot, from: usize, capacity: u64) {
    slot.rx_sets.push(RxSet {
        chains: from..slot.rx_chains.len(),
        iovecs: 0..0,
        capacity,
        result: 0,
    });
}

/// Maps every set's buffers to `iovec`s; fails if a set needs more than one read takes.
fn map_sets<M: GuestMemory>(mem: &M, slot: &mut PairSlot) -> Result<()> {
    for set in &mut slot.rx_sets {
        let from = slot.iovecs.0.len();
        for c in &slot.rx_chains[set.chains.clone()] {
            to_iovecs(mem, &slot.segs[c.segs.clone()], true, &mut slot.iovecs.0)?;
        }
        if slot.iovecs.0.len() - from > MAX_BUFFERS {
            let head = slot.rx_chains[set.chains.start].head;
            return Err(Error::TooManyBuffers {
                head,
                max: MAX_BUFFERS,
            });
        }
        set.iovecs = from..slot.iovecs.0.len();
    }
    Ok(())
}

/// Fills the first set from a host buffer: the packet held from an earlier round, or else
/// the next one read from the TAP (the set may be too small for the largest packet, and the
/// TAP truncates what does not fit). A packet that does not fit the set is held, and the set
/// gets none; unless no more buffers can join the set (`final_buffers`): then the packet is
/// dropped (`deliver` counts it), as the kernel's vhost-net drops one too large for the ring.
fn fill_from_host<M: GuestMemory>(
    mem: &M,
    fd: RawFd,
    params: RxParams,
    slot: &mut PairSlot,
    final_buffers: bool,
) {
    slot.rx_sets.truncate(1);
    if slot.held.is_empty() {
        slot.held
            .resize(usize::try_from(params.max_packet).unwrap_or(usize::MAX), 0);
        let buf = libc::iovec {
            iov_base: slot.held.as_mut_ptr().cast(),
            iov_len: slot.held.len(),
        };
        match rw(fd, &[buf], false) {
            Ok(n) if n > slot.held.len() => {
                // Truncated by the TAP (it reports the whole length): dropped by `deliver`.
                slot.held.clear();
                slot.rx_sets[0].result = i32::try_from(n).unwrap_or(i32::MAX);
                return;
            }
            Ok(n) if n > 0 => slot.held.truncate(n),
            done => {
                slot.held.clear();
                slot.rx_sets[0].result = match done {
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    Ok(_) => -libc::EIO,
                };
                return;
            }
        }
    }
    let set = &mut slot.rx_sets[0];
    if slot.held.len() as u64 > set.capacity {
        if final_buffers {
            set.result = i32::try_from(slot.held.len()).unwrap_or(i32::MAX);
            slot.held.clear();
        } else {
            set.result = -libc::EAGAIN;
        }
        return;
    }
    let chains = &slot.rx_chains[set.chains.clone()];
    let segs = chains[0].segs.start..chains[chains.len() - 1].segs.end;
    set.result = match write_at(mem, &slot.segs[segs], 0, &slot.held) {
        true => i32::try_from(slot.held.len()).unwrap_or(i32::MAX),
        false => -libc::EFAULT,
    };
    slot.held.clear();
}

/// Reads one packet into each set: all sets through the io_uring, or one `readv` per set
/// until one fails.
fn read_sets(fd: RawFd, slot: &mut PairSlot) {
    debug_assert!(slot.uring.as_ref().is_none_or(|r| r.fd() == fd));
    if let Some(ring) = slot.uring.as_mut().filter(|r| r.reads()) {
        match ring.read_batch(&slot.iovecs.0, &mut slot.rx_sets) {
            Ok(()) if !ring.reads() => {
                tracing::warn!("the kernel refuses non-blocking io_uring reads on the TAP; rx falls back to one readv per packet");
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!("io_uring failed ({e}); one syscall per packet from now on");
                slot.uring = None;
            }
        }
        return;
    }
    for set in &mut slot.rx_sets {
        set.result = match rw(fd, &slot.iovecs.0[set.iovecs.clone()], false) {
            Ok(0) => -libc::EIO,
            Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        if set.result < 0 {
            break;
        }
    }
}

/// Puts the packets read into the used ring, in order, each from the first unused chain on;
/// drops truncated ones; gives the chains left over back to the available ring. Returns
/// whether the TAP ran dry (or failed) during the round.
fn deliver<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    params: RxParams,
    slot: &mut PairSlot,
    stats: &PairStats,
    start: u16,
    out: &mut RxOutcome,
) -> bool {
    let mut next = 0usize;
    let mut drained = false;
    for i in 0..slot.rx_sets.len() {
        let set = slot.rx_sets[i].clone();
        if set.result < 0 {
            if set.result != -libc::EAGAIN {
                slot.errors += 1;
                if slot.errors.is_power_of_two() {
                    tracing::warn!(
                        "reading the TAP failed: {}",
                        std::io::Error::from_raw_os_error(-set.result)
                    );
                }
            }
            drained = true;
            continue;
        }
        let n = set.result as u64;
        // The TUN driver reports the full packet length even when it had to truncate it.
        if n > set.capacity || n < params.hdr_len as u64 {
            PairStats::add(&stats.rx_dropped, 1);
            continue;
        }
        if !params.mrg_rxbuf {
            // One chain per packet: a chain left over before this one that cannot hold it
            // goes back used and empty, like a bad chain (the driver drops it).
            while next < set.chains.start && slot.rx_chains[next].capacity < n {
                let head = slot.rx_chains[next].head;
                add_used(queue, mem, slot, head, 0);
                out.used += 1;
                next += 1;
            }
        }
        if set.chains.start != next && !move_down(mem, slot, set.chains.clone(), next, n) {
            PairStats::add(&stats.rx_dropped, 1);
            continue;
        }
        // The chains from `next` on that hold the packet (those up to the set's end hold at
        // least its capacity).
        let mut used = 0usize;
        let mut remaining = n;
        while remaining > 0 && next + used < set.chains.end {
            remaining -= remaining.min(slot.rx_chains[next + used].capacity);
            used += 1;
        }
        if params.hdr_len >= VNET_HDR_LEN {
            let num_buffers = u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes();
            let segs = slot.rx_chains[next].segs.clone();
            // Cannot fail: the chain holds at least the header and was checked writable.
            let _ = write_at(mem, &slot.segs[segs], NUM_BUFFERS_OFFSET, &num_buffers);
        }
        let mut remaining = n;
        add_used_together(queue, mem, slot, used, |slot, k| {
            let chain = &slot.rx_chains[next + k];
            let len = remaining.min(chain.capacity);
            remaining -= len;
            (chain.head, len as u32)
        });
        next += used;
        out.used += used;
        out.packets += 1;
        PairStats::add(&stats.rx_packets, 1);
        PairStats::add(&stats.rx_bytes, n - params.hdr_len as u64);
    }
    queue.set_next_avail(start.wrapping_add(next as u16));
    drained
}

/// Moves the `n`-byte packet read into chains `from` to the chains starting at `to` (before
/// `from.start`), through a bounce buffer since the two may overlap.
fn move_down<M: GuestMemory>(
    mem: &M,
    slot: &mut PairSlot,
    from: std::ops::Range<usize>,
    to: usize,
    n: u64,
) -> bool {
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    let chains = &slot.rx_chains;
    let src = chains[from.start].segs.start..chains[from.end - 1].segs.end;
    let dst = chains[to].segs.start..src.end;
    slot.bounce.resize(n, 0);
    read_at(mem, &slot.segs[src], 0, &mut slot.bounce)
        && write_at(mem, &slot.segs[dst], 0, &slot.bounce)
}
