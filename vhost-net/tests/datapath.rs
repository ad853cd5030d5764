//! The packet loops on a hand-built split queue, with a SOCK_SEQPACKET socket pair standing in
//! for the TAP (it keeps frame boundaries): frames reach the "TAP" intact, rx packets land in
//! guest buffers with the right lengths and `num_buffers`, and hostile chains are dropped,
//! counted and completed without disturbing the packets around them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost_net::datapath::{check_ring, needs_notification_since, process_tx, BATCH};
use vhost_net::device::{PairSlot, PairStats};
use vhost_net::rx::{enable_notification_past, process_rx, RxOutcome, RxParams};
use vhost_net::uring::PairRing;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: u64 = 0x40_0000;
const SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const HDR: usize = 12;

/// A split queue the test plays the driver of.
struct Ring {
    mem: Mem,
    queue: Queue,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new() -> Ring {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Ring {
            mem,
            queue,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + 16 * u64::from(index);
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Adds a chain of (addr, len, flags) buffers, linked in order, and publishes it.
    fn add(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let last = i + 1 == bufs.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | NEXT, index + 1)
            };
            self.write_desc(index, addr, len, flags, next);
            self.next_desc += 1;
        }
        self.publish(head);
        head
    }

    /// Runs the rx loop on this queue with `tap` as the TAP.
    fn rx(
        &mut self,
        tap: &OwnedFd,
        params: RxParams,
        slot: &mut PairSlot,
        stats: &PairStats,
    ) -> RxOutcome {
        process_rx(
            &self.mem,
            &mut self.queue,
            tap.as_raw_fd(),
            params,
            slot,
            stats,
        )
    }

    /// Runs the tx loop on this queue with `tap` as the TAP; returns the chains completed.
    fn tx(&mut self, tap: &OwnedFd, hdr: usize, slot: &mut PairSlot, stats: &PairStats) -> usize {
        process_tx(
            &self.mem,
            &mut self.queue,
            tap.as_raw_fd(),
            hdr,
            slot,
            stats,
        )
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used ring entry `i`: (head, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let base = USED + 4 + 8 * u64::from(i % SIZE);
        (
            self.mem.read_obj(GuestAddress(base)).unwrap(),
            self.mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills `fds` with two new descriptors we then own.
    let res = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(res, 0);
    // SAFETY: fresh descriptors.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: plain write of a valid buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(n, data.len() as isize);
}

fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: plain read into a valid buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// A vnet header (all zero, num_buffers 0) followed by `len` bytes of a pattern.
fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; HDR];
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    p
}

fn params(mrg: bool) -> RxParams {
    RxParams {
        hdr_len: HDR,
        mrg_rxbuf: mrg,
        max_packet: (HDR + 1518) as u64,
    }
}

/// The two ways rx reads: one `readv` per packet, and io_uring batches starting with the
/// largest window (so that one round reads into several buffer sets). Each rx test must give
/// the same result both ways.
const RX_MODES: [&str; 2] = ["readv", "io_uring"];

/// A pair slot reading `tap` the way `how` names.
fn rx_slot(how: &str, tap: &OwnedFd) -> PairSlot {
    match how {
        "readv" => PairSlot::default(),
        _ => PairSlot {
            uring: Some(PairRing::new(tap.as_raw_fd()).expect("io_uring")),
            rx_window: BATCH,
            ..PairSlot::default()
        },
    }
}

#[test]
fn tx_frames_reach_the_tap_and_hostile_chains_are_dropped() {
    tx_with(false);
}

#[test]
fn tx_through_io_uring() {
    tx_with(true);
}

fn tx_with(uring: bool) {
    let mut ring = Ring::new();
    let (tap, peer) = seqpacket_pair();
    let mut slot = PairSlot {
        uring: uring.then(|| PairRing::new(tap.as_raw_fd()).expect("io_uring")),
        ..PairSlot::default()
    };
    let frame = packet(100, 1);
    ring.mem
        .write_slice(&frame[..HDR], GuestAddress(0x10_000))
        .unwrap();
    ring.mem
        .write_slice(&frame[HDR..], GuestAddress(0x11_000))
        .unwrap();
    ring.add(&[(0x10_000, HDR as u32, 0), (0x11_000, 100, 0)]);
    // Outside guest memory.
    ring.add(&[(0x10_000, HDR as u32, 0), (MEM_SIZE - 10, 100, 0)]);
    // Device-writable buffer in a tx chain.
    ring.add(&[(0x10_000, HDR as u32, W)]);
    // Shorter than the vnet header.
    ring.add(&[(0x10_000, 5, 0)]);
    // Larger than any frame.
    ring.add(&[(0x20_000, 70_000, 0)]);
    // A loop: descriptor 10 -> 11 -> 10.
    ring.write_desc(10, 0x10_000, 20, NEXT, 11);
    ring.write_desc(11, 0x11_000, 20, NEXT, 10);
    ring.publish(10);
    // A second good frame, header and data in one buffer.
    let frame2 = packet(60, 9);
    ring.mem
        .write_slice(&frame2, GuestAddress(0x12_000))
        .unwrap();
    ring.write_desc(12, 0x12_000, frame2.len() as u32, 0, 0);
    ring.publish(12);

    let stats = PairStats::default();
    let done = ring.tx(&tap, HDR, &mut slot, &stats);
    assert_eq!(done, 7);
    assert_eq!(ring.used_idx(), 7);
    for i in 0..7 {
        assert_eq!(ring.used(i).1, 0, "tx chains complete with length 0");
    }
    assert_eq!(recv(&peer).unwrap(), frame);
    assert_eq!(recv(&peer).unwrap(), frame2);
    assert!(recv(&peer).is_none());
    let s = stats.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes, s.tx_dropped), (2, 160, 5));
}

#[test]
fn rx_without_mrg_rxbuf_one_packet_per_chain() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        ring.add(&[(0x10_000, 2048, W)]);
        ring.add(&[(0x11_000, 10, W), (0x12_000, 2038, W)]);
        ring.add(&[(0x13_000, 2048, W)]);
        let p1 = packet(1500, 3);
        let p2 = packet(64, 4);
        send(&peer, &p1);
        send(&peer, &p2);
        let stats = PairStats::default();
        let out = ring.rx(&tap, params(false), &mut slot, &stats);
        assert_eq!(
            (out.used, out.packets, out.out_of_buffers),
            (2, 2, false),
            "{how}"
        );
        assert_eq!(ring.used(0), (0, p1.len() as u32), "{how}");
        assert_eq!(ring.used(1), (1, p2.len() as u32), "{how}");
        let mut got = vec![0u8; p1.len()];
        ring.mem
            .read_slice(&mut got, GuestAddress(0x10_000))
            .unwrap();
        assert_eq!(&got[HDR..], &p1[HDR..], "{how}");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        // The second packet's header straddles two buffers; num_buffers lands in the second.
        let nb: u16 = ring.mem.read_obj(GuestAddress(0x12_000)).unwrap();
        assert_eq!(nb, 1, "{how}");
        // The third chain was given back: the next read finds the TAP empty.
        assert_eq!(ring.queue.next_avail(), 2, "{how}");
        let s = stats.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes), (2, 1564), "{how}");
    }
}

#[test]
fn rx_with_mrg_rxbuf_spans_chains_and_sets_num_buffers() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        for i in 0..6u64 {
            ring.add(&[(0x10_000 + i * 0x1000, 1024, W)]);
        }
        let p = packet(3000, 5);
        send(&peer, &p);
        let stats = PairStats::default();
        // As with GUEST_TSO: chains are gathered for a packet of up to 4000 bytes.
        let big = RxParams {
            max_packet: 4000,
            ..params(true)
        };
        let out = ring.rx(&tap, big, &mut slot, &stats);
        assert_eq!((out.used, out.packets), (3, 1), "{how}");
        assert_eq!(ring.used(0), (0, 1024), "{how}");
        assert_eq!(ring.used(1), (1, 1024), "{how}");
        assert_eq!(ring.used(2), (2, (p.len() - 2048) as u32), "{how}");
        let nb: u16 = ring.mem.read_obj(GuestAddress(0x10_000 + 10)).unwrap();
        assert_eq!(nb, 3, "{how}");
        let mut got = vec![0u8; p.len()];
        for i in 0..3 {
            let len = if i < 2 { 1024 } else { p.len() - 2048 };
            ring.mem
                .read_slice(
                    &mut got[i * 1024..i * 1024 + len],
                    GuestAddress(0x10_000 + i as u64 * 0x1000),
                )
                .unwrap();
        }
        assert_eq!(&got[HDR..], &p[HDR..], "{how}");
        // The chains gathered for a next packet that did not come went back to the guest.
        assert_eq!(ring.queue.next_avail(), 3, "{how}");
    }
}

#[test]
fn a_packet_over_several_chains_is_used_together_and_notified_with_event_idx() {
    for how in RX_MODES {
        for (used_event, notify) in [(0u16, true), (1, true), (2, true), (3, false)] {
            let mut ring = Ring::new();
            ring.queue.set_event_idx(true);
            // The driver wants an interrupt once entry `used_event` is used.
            ring.mem
                .write_obj(used_event, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
                .unwrap();
            let (tap, peer) = seqpacket_pair();
            let mut slot = rx_slot(how, &tap);
            for i in 0..6u64 {
                ring.add(&[(0x10_000 + i * 0x1000, 1024, W)]);
            }
            send(&peer, &packet(3000, 9));
            let stats = PairStats::default();
            let old = ring.queue.next_used();
            let big = RxParams {
                max_packet: 4000,
                ..params(true)
            };
            let out = ring.rx(&tap, big, &mut slot, &stats);
            assert_eq!((out.used, out.packets), (3, 1), "{how}");
            // All three entries, then one index covering them.
            assert_eq!(ring.used_idx(), 3, "{how}");
            assert_eq!(ring.queue.next_used(), 3, "{how}");
            assert_eq!(
                [ring.used(0), ring.used(1), ring.used(2)],
                [(0, 1024), (1, 1024), (2, 3012 - 2048)]
            );
            // Entries 0..3 were used: the driver asked for 0, 1 or 2 but not 3. (Counting
            // `add_used` calls, one per packet, would miss 0 and 1.)
            assert_eq!(
                needs_notification_since(&mut ring.queue, &ring.mem, old).unwrap(),
                notify,
                "used_event {used_event}"
            );
        }
    }
}

/// Without EVENT_IDX a driver turns notifications off with the available ring's NO_INTERRUPT
/// flag (a Linux guest does while it polls its used ring); the backend must respect it.
#[test]
fn without_event_idx_the_no_interrupt_flag_suppresses_the_notification() {
    for (avail_flags, notify) in [(0u16, true), (1, false)] {
        let mut ring = Ring::new();
        ring.mem
            .write_obj(avail_flags, GuestAddress(AVAIL))
            .unwrap();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(RX_MODES[0], &tap);
        ring.add(&[(0x10_000, 2048, W)]);
        send(&peer, &packet(100, 1));
        let old = ring.queue.next_used();
        let out = ring.rx(&tap, params(false), &mut slot, &PairStats::default());
        assert_eq!((out.used, out.packets), (1, 1));
        assert_eq!(
            needs_notification_since(&mut ring.queue, &ring.mem, old).unwrap(),
            notify,
            "avail flags {avail_flags}"
        );
    }
}

/// With MRG_RXBUF, buffers too few for the largest packet still take a packet that fits
/// them (a Linux guest may keep fewer posted than the largest packet needs: it refills only
/// once half its ring is free, so waiting for more would stop rx for good). A packet that
/// does not fit is held until the guest adds buffers, with a notification asked for past
/// the buffers seen.
#[test]
fn rx_with_mrg_rxbuf_fills_the_buffers_there_are_and_holds_what_does_not_fit() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        let stats = PairStats::default();
        ring.add(&[(0x10_000, 512, W)]);
        let small = packet(100, 6);
        send(&peer, &small);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (1, 1), "{how}");
        assert_eq!(ring.used(0), (0, 112), "{how}");
        let mut got = vec![0u8; small.len()];
        ring.mem
            .read_slice(&mut got, GuestAddress(0x10_000))
            .unwrap();
        assert_eq!(got[HDR..], small[HDR..], "{how}");
        assert_eq!(
            u16::from_le_bytes([got[10], got[11]]),
            1,
            "{how}: num_buffers"
        );

        ring.add(&[(0x11_000, 512, W)]);
        let big = packet(1000, 7);
        send(&peer, &big);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert!(out.out_of_buffers, "{how}");
        assert_eq!(out.used, 0, "{how}");
        assert_eq!(
            ring.queue.next_avail(),
            1,
            "{how}: the buffer stays available"
        );
        assert_eq!(out.avail_seen, 2, "{how}");
        ring.queue.set_event_idx(true);
        let more = enable_notification_past(&mut ring.queue, &ring.mem, out.avail_seen);
        assert!(!more.unwrap(), "{how}");
        let avail_event: u16 = ring
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(avail_event, 2, "{how}: notify once past the buffer seen");
        ring.queue.set_event_idx(false);
        // The held packet goes first once there is room, across both buffers; the next one
        // waits in the TAP for a buffer.
        send(&peer, &packet(50, 8));
        ring.add(&[(0x12_000, 2048, W)]);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (2, 1), "{how}");
        assert_eq!(ring.used(1), (1, 512), "{how}");
        assert_eq!(ring.used(2), (2, big.len() as u32 - 512), "{how}");
        let mut got = vec![0u8; 512];
        ring.mem
            .read_slice(&mut got, GuestAddress(0x11_000))
            .unwrap();
        assert_eq!(got[HDR..], big[HDR..512], "{how}");
        assert_eq!(
            u16::from_le_bytes([got[10], got[11]]),
            2,
            "{how}: num_buffers"
        );
        let mut tail = vec![0u8; big.len() - 512];
        ring.mem
            .read_slice(&mut tail, GuestAddress(0x12_000))
            .unwrap();
        assert_eq!(tail, big[512..], "{how}");
        ring.add(&[(0x13_000, 2048, W)]);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (1, 1), "{how}");
        assert_eq!(ring.used(3), (3, 62), "{how}");
        assert_eq!(stats.snapshot().rx_packets, 3, "{how}");
    }
}

#[test]
fn hostile_rx_chains_are_returned_empty_and_counted() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        ring.add(&[(0x10_000, 4, W)]); // smaller than the vnet header
        ring.add(&[(0x11_000, 100, 0)]); // device-readable
        ring.add(&[(MEM_SIZE - 4, 2048, W)]); // outside guest memory
        ring.write_desc(3, 0x12_000, 100, W | NEXT, 3); // loops onto itself
        ring.publish(3);
        ring.next_desc = 4;
        ring.add(&[(0x13_000, 2048, W)]); // good
        let p = packet(200, 7);
        send(&peer, &p);
        let stats = PairStats::default();
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (5, 1), "{how}");
        for i in 0..4 {
            assert_eq!(ring.used(i), (u32::from(i), 0), "{how}");
        }
        assert_eq!(ring.used(4), (4, p.len() as u32), "{how}");
        assert_eq!(stats.snapshot().rx_bad_chains, 4, "{how}");
        assert_eq!(stats.snapshot().rx_packets, 1, "{how}");
    }
}

#[test]
fn a_bad_chain_behind_good_ones_waits_for_the_next_packet() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        ring.add(&[(0x10_000, 1024, W)]);
        ring.add(&[(0x11_000, 4, W)]); // bad
        ring.add(&[(0x12_000, 2048, W)]);
        send(&peer, &packet(100, 1));
        send(&peer, &packet(100, 2));
        let stats = PairStats::default();
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (3, 2), "{how}");
        assert_eq!(ring.used(0), (0, 112), "{how}");
        assert_eq!(ring.used(1), (1, 0), "{how}");
        assert_eq!(ring.used(2), (2, 112), "{how}");
    }
}

#[test]
fn a_batch_fills_chains_in_ring_order_and_packets_move_down_into_unused_chains() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        for i in 0..16u64 {
            ring.add(&[(0x10_000 + i * 0x1000, 1024, W)]);
        }
        // With GUEST_TSO-sized sets of four chains, each packet but the second leaves chains
        // of its set unused: batched, every later packet is read into a later set and moved
        // down (the second one onto chains of its own set).
        let packets = [
            packet(2000, 1),
            packet(3000, 2),
            packet(100, 3),
            packet(1000, 4),
        ];
        for p in &packets {
            send(&peer, p);
        }
        let stats = PairStats::default();
        let big = RxParams {
            max_packet: 4000,
            ..params(true)
        };
        let out = ring.rx(&tap, big, &mut slot, &stats);
        assert_eq!((out.used, out.packets), (7, 4), "{how}");
        let used: Vec<_> = (0..7).map(|i| ring.used(i)).collect();
        assert_eq!(
            used,
            [
                (0, 1024),
                (1, 988),
                (2, 1024),
                (3, 1024),
                (4, 964),
                (5, 112),
                (6, 1012)
            ],
            "{how}"
        );
        let mut chain = 0u64;
        for (p, buffers) in packets.iter().zip([2u16, 3, 1, 1]) {
            let mut got = vec![0u8; p.len()];
            for (k, piece) in got.chunks_mut(1024).enumerate() {
                let addr = 0x10_000 + (chain + k as u64) * 0x1000;
                ring.mem.read_slice(piece, GuestAddress(addr)).unwrap();
            }
            assert_eq!(&got[HDR..], &p[HDR..], "{how}: packet at chain {chain}");
            let nb = u16::from_le_bytes([got[10], got[11]]);
            assert_eq!(nb, buffers, "{how}: num_buffers at chain {chain}");
            chain += u64::from(buffers);
        }
        assert_eq!(
            ring.queue.next_avail(),
            7,
            "{how}: unused chains given back"
        );
        let s = stats.snapshot();
        assert_eq!((s.rx_packets, s.rx_dropped), (4, 0), "{how}");
    }
}

#[test]
fn batched_without_mrg_rxbuf_a_too_small_chain_before_a_packet_is_returned_empty() {
    let mut ring = Ring::new();
    let (tap, peer) = seqpacket_pair();
    let mut slot = rx_slot("io_uring", &tap);
    ring.add(&[(0x10_000, 2048, W)]);
    ring.add(&[(0x11_000, 100, W)]);
    ring.add(&[(0x12_000, 2048, W)]);
    ring.add(&[(0x13_000, 2048, W)]);
    // The second "packet" is shorter than a vnet header: dropped, its chain left unused.
    let packets = [packet(500, 1), vec![0u8; 5], packet(500, 3)];
    for p in &packets {
        send(&peer, p);
    }
    let stats = PairStats::default();
    let out = ring.rx(&tap, params(false), &mut slot, &stats);
    // The third packet, read into the next chain, cannot move down into the 100-byte one:
    // that goes back empty.
    assert_eq!((out.used, out.packets), (3, 2));
    assert_eq!(
        [ring.used(0), ring.used(1), ring.used(2)],
        [(0, 512), (1, 0), (2, 512)]
    );
    let mut got = vec![0u8; 512];
    ring.mem
        .read_slice(&mut got, GuestAddress(0x12_000))
        .unwrap();
    assert_eq!(&got[HDR..], &packets[2][HDR..]);
    assert_eq!(ring.queue.next_avail(), 3);
    let s = stats.snapshot();
    assert_eq!((s.rx_packets, s.rx_dropped), (2, 1));
}

#[test]
fn broken_avail_ring_does_not_panic() {
    let mut ring = Ring::new();
    let (tap, peer) = seqpacket_pair();
    // The driver claims 40000 new entries (more than the queue size).
    ring.mem
        .write_obj(40000u16, GuestAddress(AVAIL + 2))
        .unwrap();
    send(&peer, &packet(100, 1));
    let mut slot = PairSlot::default();
    let stats = PairStats::default();
    let out = ring.rx(&tap, params(true), &mut slot, &stats);
    assert_eq!(out.packets, 0);
    let done = ring.tx(&tap, HDR, &mut slot, &stats);
    assert_eq!(done, 0);
    // Head indices past the table.
    let mut ring = Ring::new();
    ring.mem.write_obj(999u16, GuestAddress(AVAIL + 4)).unwrap();
    ring.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let _ = ring.tx(&tap, HDR, &mut slot, &stats);
    let _ = ring.rx(&tap, params(false), &mut slot, &stats);
}

/// With MRG_RXBUF, a packet too large for the chains before a bad one can never get more
/// buffers (the bad chain is dealt with only once it is first): it is dropped, not held
/// round after round; a packet that fits goes in, and the bad chain goes back empty.
#[test]
fn a_packet_too_large_for_the_chains_before_a_bad_one_is_dropped() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        let stats = PairStats::default();
        ring.add(&[(0x10_000, 512, W)]);
        ring.add(&[(0x11_000, 4, W)]); // bad
        send(&peer, &packet(1000, 1));
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (0, 0), "{how}");
        assert!(!out.out_of_buffers, "{how}: nothing to wait for");
        assert_eq!(stats.snapshot().rx_dropped, 1, "{how}");
        assert_eq!(ring.queue.next_avail(), 0, "{how}");
        let small = packet(100, 2);
        send(&peer, &small);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (2, 1), "{how}");
        assert_eq!(ring.used(0), (0, small.len() as u32), "{how}");
        assert_eq!(ring.used(1), (1, 0), "{how}");
    }
}

/// With MRG_RXBUF, a packet larger than the whole ring's buffers is dropped: the guest cannot
/// add buffers before some are used, so holding it would stall the queue for good.
#[test]
fn a_packet_larger_than_the_whole_ring_is_dropped() {
    for how in RX_MODES {
        let mut ring = Ring::new();
        let (tap, peer) = seqpacket_pair();
        let mut slot = rx_slot(how, &tap);
        let stats = PairStats::default();
        for i in 0..u64::from(SIZE) {
            ring.add(&[(0x10_000 + i * 0x100, 64, W)]);
        }
        send(&peer, &packet(1200, 1)); // 1212 bytes against 16 x 64
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!(out.packets, 0, "{how}");
        assert!(!out.out_of_buffers, "{how}: nothing to wait for");
        assert_eq!(stats.snapshot().rx_dropped, 1, "{how}");
        let small = packet(100, 2); // 112 bytes: two chains
        send(&peer, &small);
        let out = ring.rx(&tap, params(true), &mut slot, &stats);
        assert_eq!((out.used, out.packets), (2, 1), "{how}");
        assert_eq!(ring.used(0), (0, 64), "{how}");
        assert_eq!(ring.used(1), (1, 48), "{how}");
    }
}

/// Rings that virtio-queue cannot pop from although their index says there is something:
/// an available ring at address 0 (virtio-queue takes it for a ring never set up), or one
/// whose entries run out of guest memory. They are not served.
#[test]
fn rings_that_cannot_be_popped_are_not_served() {
    for avail in [0, MEM_SIZE - 4] {
        let mut ring = Ring::new();
        ring.queue
            .set_avail_ring_address(Some(avail as u32), Some(0));
        ring.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        assert!(
            !check_ring(&ring.queue, &ring.mem).unwrap(),
            "avail ring at {avail:#x}"
        );
    }
    let ring = Ring::new();
    assert!(check_ring(&ring.queue, &ring.mem).unwrap());
}
