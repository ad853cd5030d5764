//! A hostile vhost-user frontend written in the test, talking to the real daemon over its
//! socket: it shares memfd-backed "guest" memory, puts malicious chains on a ring next to
//! valid ones and kicks. Every bad chain must come back in the used ring with IOERR/UNSUPP
//! (or dropped with length 0 when it has no usable status byte), memory the requests did not
//! own must stay untouched, and the valid requests must still be served.

mod common;

use std::os::unix::net::UnixStream;

use common::{pattern, Daemon};
use cowbird_daemon::relay::Message;
use cowbird_tests::vring::{
    handshake, handshake_on, preset_status, TestRing, NEXT, OUTSIDE, PROTOCOL_FEATURES,
    STATUS_CANARY, WRITE,
};
use cowbird_tests::{assert_qemu_clean, qemu_img};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::Frontend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 4 << 20;
const SIZE: u16 = 32;
/// Status bytes live here, one per request, preset to `STATUS_CANARY`.
const STATUS: u64 = 0x3_0000;
/// Sectors of the test disk.
const SECTORS: u64 = 2048;

/// A virtio-blk request header at `addr`.
fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(addr)).unwrap();
    mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
}

fn status(mem: &GuestMemoryMmap, n: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + n)).unwrap()
}

#[test]
fn hostile_chains_fail_alone_and_the_daemon_keeps_serving() {
    for format in ["raw", "qcow2"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(format!("disk.{format}"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            format,
            image.to_str().unwrap(),
            &(SECTORS * 512).to_string(),
        ]);
        let mut daemon = Daemon::start(dir.path(), &image, &["--format", format]);
        let mut ring = TestRing::new(MEM_SIZE, SIZE);
        let mem = ring.mem.clone();
        preset_status(&mem, STATUS, 64);
        mem.write_slice(&[0x77; 0x8000], GuestAddress(0x2_0000))
            .unwrap();
        let (mut fe, features) = handshake(&daemon.socket, 1, 0);
        let (_call, kick) = ring.start(&mut fe, features, 0);

        // 0: unknown request type.
        header(&mem, 0x1_0000, 99, 0);
        ring.desc(0, 0x1_0000, 16, NEXT, 1);
        ring.desc(1, STATUS, 1, WRITE, 0);
        // 2: a read into a buffer outside guest memory.
        header(&mem, 0x1_0010, VIRTIO_BLK_T_IN, 0);
        ring.desc(2, 0x1_0010, 16, NEXT, 3);
        ring.desc(3, OUTSIDE, 4096, WRITE | NEXT, 4);
        ring.desc(4, STATUS + 1, 1, WRITE, 0);
        // 5: a descriptor loop (5 -> 6 -> 5), no status byte to write.
        header(&mem, 0x1_0020, VIRTIO_BLK_T_IN, 0);
        ring.desc(5, 0x1_0020, 16, NEXT, 6);
        ring.desc(6, 0x2_0000, 512, WRITE | NEXT, 5);
        // 7: a read into a device-readable buffer (wrong direction).
        header(&mem, 0x1_0030, VIRTIO_BLK_T_IN, 0);
        ring.desc(7, 0x1_0030, 16, NEXT, 8);
        ring.desc(8, 0x2_1000, 512, NEXT, 9);
        ring.desc(9, STATUS + 3, 1, WRITE, 0);
        // 10: a header of 8 bytes instead of 16.
        header(&mem, 0x1_0040, VIRTIO_BLK_T_IN, 0);
        ring.desc(10, 0x1_0040, 8, NEXT, 11);
        ring.desc(11, STATUS + 4, 1, WRITE, 0);
        // 12: a read past the end of the disk.
        header(&mem, 0x1_0050, VIRTIO_BLK_T_IN, SECTORS);
        ring.desc(12, 0x1_0050, 16, NEXT, 13);
        ring.desc(13, 0x2_2000, 512, WRITE | NEXT, 14);
        ring.desc(14, STATUS + 5, 1, WRITE, 0);
        // 15: a flush whose status byte is device-readable: nothing may be written.
        header(&mem, 0x1_0060, VIRTIO_BLK_T_FLUSH, 0);
        ring.desc(15, 0x1_0060, 16, NEXT, 16);
        ring.desc(16, STATUS + 6, 1, 0, 0);
        // 17: a write whose data buffer runs past the end of guest memory.
        header(&mem, 0x1_0070, VIRTIO_BLK_T_OUT, 0);
        ring.desc(17, 0x1_0070, 16, NEXT, 18);
        ring.desc(18, MEM_SIZE as u64 - 512, 4096, NEXT, 19);
        ring.desc(19, STATUS + 7, 1, WRITE, 0);
        // 20: a valid write of 4 KiB at sector 8.
        let data = pattern(7, 4096);
        mem.write_slice(&data, GuestAddress(0x2_4000)).unwrap();
        header(&mem, 0x1_0080, VIRTIO_BLK_T_OUT, 8);
        ring.desc(20, 0x1_0080, 16, NEXT, 21);
        ring.desc(21, 0x2_4000, 4096, NEXT, 22);
        ring.desc(22, STATUS + 8, 1, WRITE, 0);
        let heads = [0, 2, 5, 7, 10, 12, 15, 17, 20];
        ring.publish(&heads);
        kick.write(1).unwrap();
        let used = ring.wait_used(heads.len(), || daemon.log());
        let used_len = |head: u16| {
            used.iter()
                .find(|(h, _)| *h == head)
                .unwrap_or_else(|| panic!("{format}: chain {head} never used: {used:?}"))
                .1
        };
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_UNSUPP as u8, "{format}");
        for (n, what) in [
            (1, "buffer outside memory"),
            (3, "wrong direction"),
            (4, "short header"),
            (5, "past the end"),
            (7, "data past the end of memory"),
        ] {
            assert_eq!(status(&mem, n), ioerr, "{format}: {what}");
        }
        assert_eq!(used_len(5), 0, "{format}: a loop is dropped");
        assert_eq!(used_len(15), 0, "{format}: no writable status byte");
        assert_eq!(
            status(&mem, 6),
            STATUS_CANARY,
            "{format}: read-only status written"
        );
        assert_eq!(
            status(&mem, 2),
            STATUS_CANARY,
            "{format}: no status byte in the loop"
        );
        let mut untouched = vec![0u8; 0x1000];
        mem.read_slice(&mut untouched, GuestAddress(0x2_1000))
            .unwrap();
        assert!(
            untouched.iter().all(|&b| b == 0x77),
            "{format}: a device-readable buffer was written"
        );
        assert_eq!(status(&mem, 8), VIRTIO_BLK_S_OK as u8, "{format}");

        // The daemon keeps serving this ring: the data written reads back.
        header(&mem, 0x1_0090, VIRTIO_BLK_T_IN, 8);
        ring.desc(23, 0x1_0090, 16, NEXT, 24);
        ring.desc(24, 0x2_6000, 4096, WRITE | NEXT, 25);
        ring.desc(25, STATUS + 9, 1, WRITE, 0);
        ring.publish(&[23]);
        kick.write(1).unwrap();
        ring.wait_used(heads.len() + 1, || daemon.log());
        assert_eq!(status(&mem, 9), VIRTIO_BLK_S_OK as u8, "{format}");
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x2_6000)).unwrap();
        assert!(back == data, "{format}: read back differs");
        drop(fe);
        assert!(daemon.running(), "{format}: daemon died:\n{}", daemon.log());
        daemon.stop();
        if format == "qcow2" {
            assert_qemu_clean(&image);
        }
    }
}

/// A frontend may enable a ring before it acks the features (the vhost-user spec allows it,
/// and QEMU does it for NICs): `vhost` 0.18 alone dropped the connection at that message. The
/// ring here is enabled by that early message only, and serves a request.
#[test]
fn a_ring_enabled_before_the_features_are_acked_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let size = (SECTORS * 512).to_string();
    qemu_img(&["create", "-q", "-f", "raw", image.to_str().unwrap(), &size]);
    let mut daemon = Daemon::start(dir.path(), &image, &["--format", "raw"]);
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    let enable_ring_0 = [0u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat();
    Message::request(FrontendReq::SET_VRING_ENABLE, 0, &enable_ring_0)
        .write_to(&stream)
        .unwrap();
    let (mut fe, features) = handshake_on(Frontend::from_stream(stream, 1), 0);
    assert_ne!(features & PROTOCOL_FEATURES, 0, "{}", daemon.log());
    let mut ring = TestRing::new(MEM_SIZE, SIZE);
    let mem = ring.mem.clone();
    preset_status(&mem, STATUS, 1);
    // Started without its own SET_VRING_ENABLE.
    let (_call, kick) = ring.start(&mut fe, features & !PROTOCOL_FEATURES, 0);
    header(&mem, 0x1_0000, VIRTIO_BLK_T_FLUSH, 0);
    ring.desc(0, 0x1_0000, 16, NEXT, 1);
    ring.desc(1, STATUS, 1, WRITE, 0);
    ring.publish(&[0]);
    kick.write(1).unwrap();
    ring.wait_used(1, || daemon.log());
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK as u8);
    assert!(daemon.log().contains("replayed 1 early SET_VRING_ENABLE"));
    drop(fe);
    assert!(daemon.running(), "daemon died:\n{}", daemon.log());
    daemon.stop();
}

/// Without EVENT_IDX, a driver turns its interrupts off with the available ring's
/// NO_INTERRUPT flag (a Linux guest does while it polls its used ring): requests completed
/// then are used without a call; once the flag is cleared, the next completion calls.
#[test]
fn without_event_idx_the_no_interrupt_flag_holds_the_call_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let size = (SECTORS * 512).to_string();
    qemu_img(&["create", "-q", "-f", "raw", image.to_str().unwrap(), &size]);
    let mut daemon = Daemon::start(dir.path(), &image, &["--format", "raw"]);
    let (mut fe, features) = handshake(&daemon.socket, 1, 0);
    let mut ring = TestRing::new(MEM_SIZE, SIZE);
    let mem = ring.mem.clone();
    preset_status(&mem, STATUS, 2);
    let (call, kick) = ring.start(&mut fe, features, 0);
    for (n, avail_flags) in [(0u16, 1u16), (1, 0)] {
        ring.set_avail_flags(avail_flags);
        header(&mem, 0x1_0000 + 16 * u64::from(n), VIRTIO_BLK_T_FLUSH, 0);
        ring.desc(2 * n, 0x1_0000 + 16 * u64::from(n), 16, NEXT, 2 * n + 1);
        ring.desc(2 * n + 1, STATUS + u64::from(n), 1, WRITE, 0);
        ring.publish(&[2 * n]);
        kick.write(1).unwrap();
        ring.wait_used(usize::from(n) + 1, || daemon.log());
        assert_eq!(status(&mem, u64::from(n)), VIRTIO_BLK_S_OK as u8);
        // The call, if any, follows the used index at once.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let called = call.read().is_ok();
        assert_eq!(
            called,
            avail_flags == 0,
            "avail flags {avail_flags}\n{}",
            daemon.log()
        );
    }
    drop(fe);
    daemon.stop();
}
