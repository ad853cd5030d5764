//! A hostile vhost-user frontend written in the test, talking to the real daemon over its
//! socket: it shares memfd-backed "guest" memory, puts malicious tx chains on the ring (a
//! buffer outside guest memory, a descriptor loop, a buffer shorter than the vnet header, an
//! oversized frame) around one valid frame, and kicks. The daemon must complete every chain,
//! send exactly the valid frame to the TAP, count the rest as dropped, and keep serving.

mod common;

use std::fs::File;
use std::time::{Duration, Instant};

use common::{require_environment, Daemon, Netns};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const TX_QUEUE: usize = 1;
const SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;

fn shared_memory() -> GuestMemoryMmap {
    let fd = memfd_create(c"raw-frontend", MFdFlags::MFD_CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(MEM_SIZE as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn write_desc(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let base = DESC + 16 * u64::from(index);
    mem.write_obj(addr, GuestAddress(base)).unwrap();
    mem.write_obj(len, GuestAddress(base + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
    mem.write_obj(next, GuestAddress(base + 14)).unwrap();
}

fn tap_rx_packets(ns: &Netns, tap: &str) -> u64 {
    let path = format!("/sys/class/net/{tap}/statistics/rx_packets");
    let out = ns.exec(&["cat", &path]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Connects and negotiates VERSION_1 (plus the protocol features bit when offered).
fn handshake(daemon: &Daemon) -> (Frontend, u64) {
    let mut fe = Frontend::connect(&daemon.socket, 3).expect("connect");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let features = VIRTIO_F_VERSION_1 | (offered & PROTOCOL_FEATURES);
    fe.set_features(features).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .unwrap();
    }
    (fe, features)
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_daemon_keeps_serving() {
    require_environment();
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    let mut daemon = Daemon::start(&ns, dir.path(), &[]);
    let mem = shared_memory();
    let (mut fe, features) = handshake(&daemon);
    let region = mem.iter().next().unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();

    // The valid frame: a zero vnet header (12 bytes) and a 60-byte broadcast Ethernet frame.
    let mut frame = vec![0u8; 12 + 60];
    frame[12..18].fill(0xff);
    frame[18..24].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[24..26].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    mem.write_slice(&frame, GuestAddress(0x2_0000)).unwrap();
    // Chains: outside memory; a loop (1 -> 2 -> 1); shorter than the header; oversized; valid.
    write_desc(&mem, 0, 0xdead_0000_0000, 72, 0, 0);
    write_desc(&mem, 1, 0x3_0000, 64, NEXT, 2);
    write_desc(&mem, 2, 0x3_1000, 64, NEXT, 1);
    write_desc(&mem, 3, 0x3_2000, 4, 0, 0);
    write_desc(&mem, 4, 0x4_0000, 128 << 10, 0, 0);
    write_desc(&mem, 5, 0x2_0000, frame.len() as u32, 0, 0);
    let heads = [0u16, 1, 3, 4, 5];
    for (slot, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();

    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let before = tap_rx_packets(&ns, &daemon.tap);
    fe.set_vring_num(TX_QUEUE, SIZE).unwrap();
    let rings = VringConfigData {
        queue_max_size: SIZE,
        queue_size: SIZE,
        flags: 0,
        desc_table_addr: host(DESC),
        used_ring_addr: host(USED),
        avail_ring_addr: host(AVAIL),
        log_addr: None,
    };
    fe.set_vring_addr(TX_QUEUE, &rings).unwrap();
    fe.set_vring_base(TX_QUEUE, 0).unwrap();
    fe.set_vring_call(TX_QUEUE, &call).unwrap();
    fe.set_vring_kick(TX_QUEUE, &kick).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.set_vring_enable(TX_QUEUE, true).unwrap();
    }
    kick.write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() < heads.len() as u16 {
        assert!(
            Instant::now() < deadline,
            "the daemon did not complete all chains:\n{}",
            daemon.proc.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while tap_rx_packets(&ns, &daemon.tap) < before + 1 {
        assert!(
            Instant::now() < deadline,
            "the valid frame never reached the TAP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        daemon.proc.try_wait().is_none(),
        "daemon died:\n{}",
        daemon.proc.log()
    );
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
    // "(tx P packets B bytes D dropped, rx ...)": one frame sent, the four hostile chains dropped.
    let tx = &line[line.find("(tx ").expect("tx counters") + 4..];
    let words: Vec<&str> = tx.split_whitespace().collect();
    assert_eq!(words[0], "1", "exactly one frame sent: {line}");
    assert_eq!(words[4], "4", "four hostile chains dropped: {line}");

    // Still serving: a new frontend gets through the handshake.
    let (again, _) = handshake(&daemon);
    again.get_features().unwrap();
    drop(again);
    daemon.stop();
}
