//! A hostile vhost-user frontend written in the test, talking to the real daemon over its
//! socket: it shares memfd-backed "guest" memory, puts malicious chains on a ring around valid
//! ones, and kicks. The daemon must drop and count the bad chains, move exactly the valid
//! frames, and keep serving.
//!
//! - tx: a buffer outside guest memory, a descriptor loop, a buffer shorter than the vnet
//!   header and an oversized frame around one valid frame, which alone reaches the TAP;
//! - rx (with and without MRG_RXBUF): a buffer outside guest memory, a loop, a chain shorter
//!   than the vnet header and a device-readable buffer, around two good buffers; frames
//!   injected on the TAP side must land intact in the good buffers, the bad chains must come
//!   back used and empty;
//! - rx with MRG_RXBUF and fewer buffers than a packet needs: the worker waits for more
//!   without spinning, and the packet lands once they come;
//! - the control queue with EVENT_IDX: the driver notifies only as `avail_event` asks;
//! - TAP queue steering with two pairs: without MQ, or with MQ and the second pair's rx
//!   vring never enabled, every flow the kernel sends lands in the first pair's rx ring.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{require_environment, Daemon, NetNs};
use cowbird_tests::vring::{handshake, TestRing, NEXT, OUTSIDE, WRITE};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const CTRL_QUEUE: usize = 2;
const SIZE: u16 = 16;
/// The vnet header with VERSION_1 (`struct virtio_net_hdr_v1`).
const HDR_LEN: usize = 12;

fn tap_rx_packets(ns: &NetNs, tap: &str) -> u64 {
    let path = format!("/sys/class/net/{tap}/statistics/rx_packets");
    let out = ns.exec(&["cat", &path]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Sends `frame` out of `tap` inside `ns` with a packet socket: the daemon reads it from the
/// TAP.
fn inject(ns: &NetNs, tap: &str, frame: Vec<u8>) {
    let name = CString::new(tap).unwrap();
    ns.run_inside(move || {
        // SAFETY: `name` is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "{name:?}: {}", std::io::Error::last_os_error());
        // SAFETY: plain socket creation; protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// A broadcast Ethernet frame with a local experimental ethertype and `len - 14` bytes of a
/// pattern seeded by `seed`.
fn test_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame
}

/// Disconnects `fe` and returns the daemon's counters from its disconnect line: tx packets,
/// bytes, dropped; rx packets, bytes, dropped, bad chains.
fn disconnect(daemon: &mut Daemon, fe: Frontend) -> Vec<u64> {
    drop(fe);
    daemon
        .proc
        .wait_for_log("frontend disconnected", Duration::from_secs(10));
    let log = daemon.proc.log();
    let line = log
        .lines()
        .find(|l| l.contains("frontend disconnected"))
        .expect("disconnect line");
    eprintln!("{line}");
    let counters: Vec<u64> = line[line.find("(tx ").expect("counters")..]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(counters.len(), 7, "{line}");
    counters
}

/// The daemon is alive and a new frontend gets through the handshake.
fn still_serving(daemon: &mut Daemon) {
    assert!(
        daemon.proc.try_wait().is_none(),
        "daemon died:\n{}",
        daemon.proc.log()
    );
    let (again, _) = handshake(&daemon.socket, 3, 0);
    again.get_features().unwrap();
    drop(again);
    daemon.stop();
}

/// Starts the daemon in `ns` and connects a frontend that acks `extra` features on top of the
/// defaults; returns them with a fresh ring for it.
fn connect(ns: &NetNs, dir: &std::path::Path, extra: u64) -> (Daemon, TestRing, Frontend, u64) {
    let daemon = Daemon::start(ns, dir, &[]);
    let ring = TestRing::new(MEM_SIZE, SIZE);
    let (fe, features) = handshake(&daemon.socket, 3, extra);
    (daemon, ring, fe, features)
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_daemon_keeps_serving() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let (mut daemon, mut ring, mut fe, features) = connect(&ns, dir.path(), 0);
    let mem = ring.mem.clone();

    // The valid frame: a zero vnet header and a 60-byte broadcast Ethernet frame.
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend(test_frame(60, 1));
    mem.write_slice(&frame, GuestAddress(0x2_0000)).unwrap();
    // Chains: outside memory; a loop (1 -> 2 -> 1); shorter than the header; oversized; valid.
    ring.desc(0, OUTSIDE, 72, 0, 0);
    ring.desc(1, 0x3_0000, 64, NEXT, 2);
    ring.desc(2, 0x3_1000, 64, NEXT, 1);
    ring.desc(3, 0x3_2000, 4, 0, 0);
    ring.desc(4, 0x4_0000, 128 << 10, 0, 0);
    ring.desc(5, 0x2_0000, frame.len() as u32, 0, 0);
    let heads = [0u16, 1, 3, 4, 5];
    ring.publish(&heads);

    let before = tap_rx_packets(&ns, &daemon.tap);
    let (_call, kick) = ring.start(&mut fe, features, TX_QUEUE);
    kick.write(1).unwrap();

    ring.wait_used(heads.len(), || daemon.proc.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while tap_rx_packets(&ns, &daemon.tap) < before + 1 {
        assert!(
            Instant::now() < deadline,
            "the valid frame never reached the TAP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let counters = disconnect(&mut daemon, fe);
    assert_eq!(counters[0], 1, "exactly one frame sent: {counters:?}");
    assert_eq!(counters[2], 4, "four hostile chains dropped: {counters:?}");
    still_serving(&mut daemon);
}

/// A network namespace whose new interfaces get no IPv6: the kernel would otherwise send
/// neighbour discovery frames into the rx ring.
fn netns_without_ipv6() -> NetNs {
    let ns = NetNs::new("net");
    ns.run_inside(|| {
        let knob = "/proc/sys/net/ipv6/conf/default/disable_ipv6";
        if std::path::Path::new(knob).exists() {
            std::fs::write(knob, "1").unwrap_or_else(|e| panic!("{knob}: {e}"));
        }
    });
    ns
}

/// Good rx buffers and the hostile chains around them: (head, guest address) of the two good
/// ones, and the order the chains are made available in.
const RX_GOOD: [(u16, u64); 2] = [(1, 0x1_0000), (6, 0x2_0000)];
const RX_HEADS: [u16; 6] = [0, 1, 2, 4, 5, 6];
const RX_BUF_LEN: u32 = 2048;

fn hostile_rx_chains(mrg_rxbuf: bool) {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = netns_without_ipv6();
    let extra = if mrg_rxbuf {
        1 << VIRTIO_NET_F_MRG_RXBUF
    } else {
        0
    };
    let (mut daemon, mut ring, mut fe, features) = connect(&ns, dir.path(), extra);
    let mem = ring.mem.clone();

    // Outside memory; good A; a loop (2 -> 3 -> 2); shorter than the header;
    // device-readable (wrong direction); good B.
    ring.desc(0, OUTSIDE, RX_BUF_LEN, WRITE, 0);
    ring.desc(1, RX_GOOD[0].1, RX_BUF_LEN, WRITE, 0);
    ring.desc(2, 0x3_0000, 64, WRITE | NEXT, 3);
    ring.desc(3, 0x3_1000, 64, WRITE | NEXT, 2);
    ring.desc(4, 0x3_2000, HDR_LEN as u32 - 8, WRITE, 0);
    ring.desc(5, 0x3_3000, RX_BUF_LEN, 0, 0);
    ring.desc(6, RX_GOOD[1].1, RX_BUF_LEN, WRITE, 0);
    // Poison the good buffers so that stale bytes cannot pass for the frame.
    for (_, addr) in RX_GOOD {
        mem.write_slice(&[0xa5; RX_BUF_LEN as usize], GuestAddress(addr))
            .unwrap();
    }
    ring.publish(&RX_HEADS);
    let (_call, kick) = ring.start(&mut fe, features, RX_QUEUE);
    kick.write(1).unwrap();

    // The first frame fills A: the chain before it comes back empty, the three after it too
    // once the daemon has moved on to B, which waits for the second frame.
    let frames = [test_frame(200, 1), test_frame(1514, 2)];
    let used_after = [5usize, 6];
    for (i, frame) in frames.iter().enumerate() {
        inject(&ns, &daemon.tap, frame.clone());
        let used = ring.wait_used(used_after[i], || daemon.proc.log());
        let (head, addr) = RX_GOOD[i];
        let entry = used[if i == 0 { 1 } else { 5 }];
        assert_eq!(entry, (head, (HDR_LEN + frame.len()) as u32), "frame {i}");
        let mut got = vec![0u8; HDR_LEN + frame.len()];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(&got[HDR_LEN..], &frame[..], "frame {i} not intact");
        // No offloads negotiated: no flags, no GSO; one buffer.
        assert_eq!(&got[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }
    for (slot, head) in [(0, 0u16), (2, 2), (3, 4), (4, 5)] {
        assert_eq!(ring.used()[slot], (head, 0), "bad chain {head}");
    }
    let counters = disconnect(&mut daemon, fe);
    // rx packets, dropped, bad chains.
    assert_eq!(
        [counters[3], counters[5], counters[6]],
        [2, 0, 4],
        "{counters:?}"
    );
    still_serving(&mut daemon);
}

#[test]
fn hostile_rx_chains_are_dropped_and_good_buffers_get_frames_intact() {
    hostile_rx_chains(false);
}

#[test]
fn hostile_rx_chains_with_mrg_rxbuf_are_dropped_and_good_buffers_get_frames_intact() {
    hostile_rx_chains(true);
}

/// CPU seconds the process `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// With MRG_RXBUF a packet may span chains. One 1 KiB buffer cannot take a full-size frame:
/// the frame is held and the worker must wait for the driver's next buffers (asking to be
/// notified past the one it saw) instead of spinning on it; two more buffers then take the
/// frame across two chains.
/// The CPU time `daemon` uses in half a second, once what was just sent to it settled
/// (200 ms).
fn cpu_over_half_a_second(daemon: &Daemon) -> f64 {
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_seconds(daemon.proc.pid());
    std::thread::sleep(Duration::from_millis(500));
    cpu_seconds(daemon.proc.pid()) - before
}

#[test]
fn too_few_rx_buffers_with_mrg_rxbuf_wait_without_spinning() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = netns_without_ipv6();
    let extra = 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_RING_F_EVENT_IDX;
    let (mut daemon, mut ring, mut fe, features) = connect(&ns, dir.path(), extra);
    let mem = ring.mem.clone();
    let bufs = [0x1_0000u64, 0x2_0000, 0x3_0000];
    for (i, addr) in bufs.iter().enumerate() {
        ring.desc(i as u16, *addr, 1024, WRITE, 0);
    }
    ring.publish(&[0]);
    let (_call, kick) = ring.start(&mut fe, features, RX_QUEUE);
    kick.write(1).unwrap();
    // A full-size frame is waiting in the TAP while only the one buffer is there.
    let frame = test_frame(1514, 3);
    inject(&ns, &daemon.tap, frame.clone());
    let spent = cpu_over_half_a_second(&daemon);
    assert!(
        spent < 0.2,
        "the daemon used {spent:.2} CPU-s in 0.5 s waiting for buffers"
    );
    assert!(ring.used().is_empty(), "the lone buffer was used");

    ring.publish(&[1, 2]);
    kick.write(1).unwrap();
    let used = ring.wait_used(2, || daemon.proc.log());
    assert_eq!(
        used[..2],
        [(0, 1024), (1, (HDR_LEN + frame.len()) as u32 - 1024)]
    );
    let mut got = vec![0u8; 2048];
    mem.read_slice(&mut got[..1024], GuestAddress(bufs[0]))
        .unwrap();
    mem.read_slice(&mut got[1024..], GuestAddress(bufs[1]))
        .unwrap();
    assert_eq!(
        &got[HDR_LEN..HDR_LEN + frame.len()],
        &frame[..],
        "frame not intact"
    );
    // num_buffers: the packet took two chains.
    assert_eq!(&got[10..12], &[2, 0]);
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
}

/// Starts a daemon and a frontend, has `start_broken` start `queue` on a ring it breaks
/// (returning the call and kick eventfds), kicks it (and sends a frame for rx), then checks
/// that the daemon does not spin on it (`what` names the breakage) and is not wedged:
/// GET_VRING_BASE answers (the worker does not hold the ring) and a new frontend is served.
fn a_broken_ring_neither_spins_nor_wedges(
    queue: usize,
    what: &str,
    start_broken: impl Fn(&TestRing, &mut Frontend, u64) -> (EventFd, EventFd),
) {
    let dir = tempfile::tempdir().unwrap();
    let ns = netns_without_ipv6();
    let extra = 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_RING_F_EVENT_IDX;
    let (mut daemon, ring, mut fe, features) = connect(&ns, dir.path(), extra);
    let (_call, kick) = start_broken(&ring, &mut fe, features);
    kick.write(1).unwrap();
    if queue == RX_QUEUE {
        inject(&ns, &daemon.tap, test_frame(100, 1));
    }
    let spent = cpu_over_half_a_second(&daemon);
    assert!(
        spent < 0.2,
        "queue {queue}, {what}: the daemon used {spent:.2} CPU-s in 0.5 s"
    );
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
}

/// A driver whose available index jumps more than a ring's size ahead (virtio-queue refuses
/// to iterate such a ring) gets neither a spinning worker nor a wedged daemon, on any queue:
/// the worker leaves the ring alone until it is set up again.
#[test]
fn an_available_index_past_the_ring_neither_spins_nor_wedges_the_daemon() {
    require_environment();
    for queue in [RX_QUEUE, TX_QUEUE, CTRL_QUEUE] {
        a_broken_ring_neither_spins_nor_wedges(queue, "index past the ring", |ring, fe, f| {
            let fds = ring.start(fe, f, queue);
            ring.set_avail_idx(0x8000);
            fds
        });
    }
}

/// A driver whose available ring virtio-queue cannot pop from, although its index says a
/// chain is there (the ring at guest address 0, which virtio-queue takes for a ring never set
/// up, or its entries past the end of guest memory), gets neither a spinning worker nor a
/// wedged daemon, on any queue.
#[test]
fn an_available_ring_that_cannot_be_popped_neither_spins_nor_wedges_the_daemon() {
    require_environment();
    for queue in [RX_QUEUE, TX_QUEUE, CTRL_QUEUE] {
        for avail in [0, MEM_SIZE as u64 - 4] {
            let what = format!("avail ring at {avail:#x}");
            a_broken_ring_neither_spins_nor_wedges(queue, &what, |ring, fe, f| {
                ring.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
                ring.start_with_avail_at(fe, f, queue, avail)
            });
        }
    }
}

/// With EVENT_IDX a driver notifies the control queue only when its available index passes
/// the device's `avail_event` (Linux's `virtqueue_kick_prepare`), then busy-waits for the
/// command's ack. The daemon must keep asking for the next command, or the second one is
/// never seen.
#[test]
fn control_commands_with_event_idx_are_each_notified_and_served() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let extra = 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_RING_F_EVENT_IDX;
    let (mut daemon, mut ring, mut fe, features) = connect(&ns, dir.path(), extra);
    let mem = ring.mem.clone();
    let (_call, kick) = ring.start(&mut fe, features, CTRL_QUEUE);
    for i in 0..3u16 {
        // VIRTIO_NET_CTRL_RX / VIRTIO_NET_CTRL_RX_PROMISC, on: header, data, ack.
        let base = 0x1_0000 + 0x100 * u64::from(i);
        mem.write_slice(&[0u8, 0], GuestAddress(base)).unwrap();
        mem.write_slice(&[1u8], GuestAddress(base + 0x10)).unwrap();
        mem.write_slice(&[0xffu8], GuestAddress(base + 0x20))
            .unwrap();
        ring.desc(3 * i, base, 2, NEXT, 3 * i + 1);
        ring.desc(3 * i + 1, base + 0x10, 1, NEXT, 3 * i + 2);
        ring.desc(3 * i + 2, base + 0x20, 1, WRITE, 0);
        let old = i;
        ring.publish(&[3 * i]);
        // vring_need_event(avail_event, new, old)
        let event = ring.avail_event();
        if (i + 1).wrapping_sub(event).wrapping_sub(1) < (i + 1).wrapping_sub(old) {
            kick.write(1).unwrap();
        }
        let used = ring.wait_used(usize::from(i) + 1, || daemon.proc.log());
        assert_eq!(used[usize::from(i)], (3 * i, 1), "command {i}");
        let mut ack = [0u8];
        mem.read_slice(&mut ack, GuestAddress(base + 0x20)).unwrap();
        assert_eq!(ack, [0], "command {i} acked OK");
    }
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
}

/// A guest making chain heads past the queue available, again and again, on every queue,
/// cannot flood the host's log: virtio-queue's own complaint about each is silenced, and
/// the daemon's lines are rate-limited.
#[test]
fn heads_past_the_queue_do_not_flood_the_log() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let (mut daemon, mut ring, mut fe, features) =
        connect(&ns, dir.path(), 1 << VIRTIO_NET_F_CTRL_VQ);
    let kicks: Vec<_> = [TX_QUEUE, CTRL_QUEUE]
        .into_iter()
        .map(|q| ring.start(&mut fe, features, q))
        .collect();
    let before = daemon.proc.log().lines().count();
    for _ in 0..20 {
        ring.publish(&[SIZE + 1; 8]);
        for (_, kick) in &kicks {
            kick.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = daemon.proc.log();
    let lines = log.lines().count() - before;
    assert!(lines <= 24, "{lines} log lines for 320 bad chains:\n{log}");
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
}

/// A guest repeating a malformed control command cannot flood the host's log: each one is
/// answered with an error, and the log names the first and then every power of two.
#[test]
fn malformed_control_commands_are_refused_without_flooding_the_log() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let (mut daemon, mut ring, mut fe, features) =
        connect(&ns, dir.path(), 1 << VIRTIO_NET_F_CTRL_VQ);
    let mem = ring.mem.clone();
    let (_call, kick) = ring.start(&mut fe, features, CTRL_QUEUE);
    // A one-byte header (two are needed), then the ack byte.
    let chains = SIZE / 2;
    for c in 0..chains {
        let base = 0x1_0000 + 0x100 * u64::from(c);
        ring.desc(2 * c, base, 1, NEXT, 2 * c + 1);
        ring.desc(2 * c + 1, base + 0x10, 1, WRITE, 0);
    }
    let rounds = 25;
    for round in 1..=rounds {
        for c in 0..chains {
            mem.write_slice(&[0x55u8], GuestAddress(0x1_0010 + 0x100 * u64::from(c)))
                .unwrap();
        }
        ring.publish(&(0..chains).map(|c| 2 * c).collect::<Vec<_>>());
        kick.write(1).unwrap();
        ring.wait_used(usize::from(chains * round), || daemon.proc.log());
        for c in 0..chains {
            let mut ack = [0u8];
            mem.read_slice(&mut ack, GuestAddress(0x1_0010 + 0x100 * u64::from(c)))
                .unwrap();
            assert_eq!(ack, [1], "round {round}, command {c}: VIRTIO_NET_ERR");
        }
    }
    let commands = chains * rounds;
    let log = daemon.proc.log();
    let lines = log.matches("control queue:").count();
    // 1, 2, 4, ..., 128 of 200.
    assert_eq!(lines, 8, "{commands} bad commands:\n{log}");
    assert!(log.contains("(bad command 128)"), "{log}");
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
}

/// An IPv4/UDP frame from 10.9.0.1:`port` to 10.9.0.2:9 (broadcast MAC): the kernel steers
/// each source port, a different flow, to a TAP queue by its hash.
fn udp_frame(port: u16) -> Vec<u8> {
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 28 + 8, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&[10, 9, 0, 1, 10, 9, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend(ip);
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&9u16.to_be_bytes());
    frame.extend_from_slice(&16u16.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    frame
}

/// Starts the first rx vring of a daemon with two queue pairs, negotiated with `extra`, and
/// sends the TAP batches of UDP frames from 16 source ports (16 flows) starting at each of
/// `batches`. Returns how many frames of each batch reached the rx ring.
fn flows_reaching_the_first_pair(extra: u64, batches: &[u16]) -> Vec<usize> {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = netns_without_ipv6();
    let mut daemon = Daemon::start(&ns, dir.path(), &["--num-queue-pairs", "2"]);
    let size = 64;
    let mut ring = TestRing::new(MEM_SIZE, size);
    for i in 0..size {
        ring.desc(i, 0x1_0000 + 0x800 * u64::from(i), 2048, WRITE, 0);
    }
    ring.publish(&(0..size).collect::<Vec<_>>());
    let (mut fe, features) = handshake(&daemon.socket, 5, extra);
    let (_call, kick) = ring.start(&mut fe, features, RX_QUEUE);
    kick.write(1).unwrap();
    let mut landed = Vec::new();
    let mut total = 0;
    for first in batches {
        let sent = 16;
        for port in *first..first + 16 {
            inject(&ns, &daemon.tap, udp_frame(port));
        }
        // Every frame of the batch, or whatever arrives in half a second.
        let deadline = Instant::now() + Duration::from_millis(500);
        while ring.used().len() < total + sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let now = ring.used().len();
        landed.push(now - total);
        total = now;
    }
    disconnect(&mut daemon, fe);
    still_serving(&mut daemon);
    landed
}

/// Without MQ the driver serves one pair, so only the first TAP queue may stay attached: the
/// kernel would steer some flows to the second, which nobody reads.
#[test]
fn without_mq_every_flow_reaches_the_only_pair() {
    let landed = flows_reaching_the_first_pair(0, &[1000]);
    assert_eq!(landed, [16], "frames of 16 flows that reached rx queue 0");
}

/// With MQ and no control queue (QEMU's vhost-user), the pairs in use are those whose rx
/// vring the frontend enables. The second pair's TAP queue is detached on its first event
/// (the packets already in it are lost); the flows after that all reach the first pair.
#[test]
fn with_mq_and_no_control_queue_flows_follow_the_enabled_rx_vrings() {
    let landed = flows_reaching_the_first_pair(1 << VIRTIO_NET_F_MQ, &[1000, 2000]);
    assert_eq!(landed[1], 16, "frames of the second 16 flows: {landed:?}");
}

/// The targets of the open descriptors of process `pid`, once their number has settled.
fn open_fds(pid: u32) -> Vec<String> {
    let read = || {
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        fds.sort();
        fds
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

/// A connection leaves no file descriptor behind: the daemon holds as many after ten
/// connections as after the first (each used to leak its workers' exit eventfds).
#[test]
fn reconnects_leak_no_file_descriptors() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let mut daemon = Daemon::start(&ns, dir.path(), &["--num-queue-pairs", "2"]);
    let mut after_first = Vec::new();
    for round in 1..=10 {
        let (fe, _) = handshake(&daemon.socket, 5, 0);
        fe.get_features().unwrap();
        drop(fe);
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon.proc.log().matches("frontend disconnected").count() < round {
            assert!(Instant::now() < deadline, "{}", daemon.proc.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        if round == 1 {
            after_first = open_fds(daemon.proc.pid());
        }
    }
    assert_eq!(
        open_fds(daemon.proc.pid()),
        after_first,
        "file descriptors leaked across 9 connections"
    );
    daemon.stop();
}

/// A file where the socket should go is refused and left as it was (a mistyped path must not
/// cost the file), and SIGHUP stops the daemon as SIGTERM does: exit 0, socket removed.
#[test]
fn a_file_in_the_socket_s_place_is_kept_and_sighup_stops_the_daemon() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("net");
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "important").unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_vhost-net"))
        .arg("--socket")
        .arg(&precious)
        .args(["--tap", &common::unique("vn")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = cowbird_tests::stack::wait_timeout(&mut child, Duration::from_secs(20));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "important");

    let mut daemon = Daemon::start(&ns, dir.path(), &[]);
    let status = daemon.proc.stop_with(libc::SIGHUP);
    assert!(status.success(), "{status}:\n{}", daemon.proc.log());
    assert!(!daemon.socket.exists());
}
