//! A hostile vhost-user frontend written in the test, talking to the real daemon over its
//! socket: it shares memfd-backed "guest" memory, puts malicious chains on a ring next to
//! valid ones and kicks. Every bad chain must come back in the used ring with IOERR/UNSUPP
//! (or dropped with length 0 when it has no usable status byte), memory the requests did not
//! own must stay untouched, and the valid requests must still be served.

mod common;

use std::fs::File;
use std::time::{Duration, Instant};

use common::{pattern, Daemon};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const SIZE: u16 = 32;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// A guest address no region covers.
const OUTSIDE: u64 = 0xdead_0000_0000;
/// Status bytes live here, one per request, preset to this canary.
const STATUS: u64 = 0x3_0000;
const CANARY: u8 = 0xaa;
/// Sectors of the test disk.
const SECTORS: u64 = 2048;

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

/// A virtio-blk request header at `addr`.
fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(addr)).unwrap();
    mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
}

/// Makes `heads` available after the `first` ones already published.
fn publish(mem: &GuestMemoryMmap, first: u16, heads: &[u16]) {
    for (k, head) in heads.iter().enumerate() {
        let slot = u64::from((first + k as u16) % SIZE);
        mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
    }
    mem.write_obj(first + heads.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();
}

/// Waits (at most 20 s) until `n` chains are used; returns every used (head, length).
fn wait_used(mem: &GuestMemoryMmap, n: u16, daemon: &Daemon) -> Vec<(u16, u32)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let used_idx = || mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    while used_idx() < n {
        assert!(
            Instant::now() < deadline,
            "the daemon used {} of {n} chains:\n{}",
            used_idx(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (0..used_idx())
        .map(|i| {
            let addr = USED + 4 + 8 * u64::from(i % SIZE);
            let id: u32 = mem.read_obj(GuestAddress(addr)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
            (id as u16, len)
        })
        .collect()
}

/// Connects, negotiates VERSION_1 (+ protocol features), shares the memory and starts queue 0.
/// Returns the frontend and the queue's (call, kick) eventfds.
fn connect(daemon: &Daemon, mem: &GuestMemoryMmap) -> (Frontend, EventFd, EventFd) {
    let mut fe = Frontend::connect(&daemon.socket, 1).expect("connect");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let features = VIRTIO_F_VERSION_1 | (offered & PROTOCOL_FEATURES);
    fe.set_features(features).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .unwrap();
    }
    let region = mem.iter().next().unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fe.set_vring_num(0, SIZE).unwrap();
    let rings = VringConfigData {
        queue_max_size: SIZE,
        queue_size: SIZE,
        flags: 0,
        desc_table_addr: host(DESC),
        used_ring_addr: host(USED),
        avail_ring_addr: host(AVAIL),
        log_addr: None,
    };
    fe.set_vring_addr(0, &rings).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.set_vring_enable(0, true).unwrap();
    }
    (fe, call, kick)
}

fn status(mem: &GuestMemoryMmap, n: u64) -> u8 {
    mem.read_obj(GuestAddress(STATUS + n)).unwrap()
}

#[test]
fn hostile_chains_fail_alone_and_the_daemon_keeps_serving() {
    for format in ["raw", "qcow2"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(format!("disk.{format}"));
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            format,
            image.to_str().unwrap(),
            &(SECTORS * 512).to_string(),
        ]);
        let mut daemon = Daemon::start(dir.path(), &image, &["--format", format]);
        let mem = shared_memory();
        mem.write_slice(&[CANARY; 64], GuestAddress(STATUS))
            .unwrap();
        mem.write_slice(&[0x77; 0x8000], GuestAddress(0x2_0000))
            .unwrap();
        let (fe, _call, kick) = connect(&daemon, &mem);

        // 0: unknown request type.
        header(&mem, 0x1_0000, 99, 0);
        write_desc(&mem, 0, 0x1_0000, 16, NEXT, 1);
        write_desc(&mem, 1, STATUS, 1, WRITE, 0);
        // 2: a read into a buffer outside guest memory.
        header(&mem, 0x1_0010, VIRTIO_BLK_T_IN, 0);
        write_desc(&mem, 2, 0x1_0010, 16, NEXT, 3);
        write_desc(&mem, 3, OUTSIDE, 4096, WRITE | NEXT, 4);
        write_desc(&mem, 4, STATUS + 1, 1, WRITE, 0);
        // 5: a descriptor loop (5 -> 6 -> 5), no status byte to write.
        header(&mem, 0x1_0020, VIRTIO_BLK_T_IN, 0);
        write_desc(&mem, 5, 0x1_0020, 16, NEXT, 6);
        write_desc(&mem, 6, 0x2_0000, 512, WRITE | NEXT, 5);
        // 7: a read into a device-readable buffer (wrong direction).
        header(&mem, 0x1_0030, VIRTIO_BLK_T_IN, 0);
        write_desc(&mem, 7, 0x1_0030, 16, NEXT, 8);
        write_desc(&mem, 8, 0x2_1000, 512, NEXT, 9);
        write_desc(&mem, 9, STATUS + 3, 1, WRITE, 0);
        // 10: a header of 8 bytes instead of 16.
        header(&mem, 0x1_0040, VIRTIO_BLK_T_IN, 0);
        write_desc(&mem, 10, 0x1_0040, 8, NEXT, 11);
        write_desc(&mem, 11, STATUS + 4, 1, WRITE, 0);
        // 12: a read past the end of the disk.
        header(&mem, 0x1_0050, VIRTIO_BLK_T_IN, SECTORS);
        write_desc(&mem, 12, 0x1_0050, 16, NEXT, 13);
        write_desc(&mem, 13, 0x2_2000, 512, WRITE | NEXT, 14);
        write_desc(&mem, 14, STATUS + 5, 1, WRITE, 0);
        // 15: a flush whose status byte is device-readable: nothing may be written.
        header(&mem, 0x1_0060, VIRTIO_BLK_T_FLUSH, 0);
        write_desc(&mem, 15, 0x1_0060, 16, NEXT, 16);
        write_desc(&mem, 16, STATUS + 6, 1, 0, 0);
        // 17: a write whose data buffer runs past the end of guest memory.
        header(&mem, 0x1_0070, VIRTIO_BLK_T_OUT, 0);
        write_desc(&mem, 17, 0x1_0070, 16, NEXT, 18);
        write_desc(&mem, 18, MEM_SIZE as u64 - 512, 4096, NEXT, 19);
        write_desc(&mem, 19, STATUS + 7, 1, WRITE, 0);
        // 20: a valid write of 4 KiB at sector 8.
        let data = pattern(7, 4096);
        mem.write_slice(&data, GuestAddress(0x2_4000)).unwrap();
        header(&mem, 0x1_0080, VIRTIO_BLK_T_OUT, 8);
        write_desc(&mem, 20, 0x1_0080, 16, NEXT, 21);
        write_desc(&mem, 21, 0x2_4000, 4096, NEXT, 22);
        write_desc(&mem, 22, STATUS + 8, 1, WRITE, 0);
        let heads = [0, 2, 5, 7, 10, 12, 15, 17, 20];
        publish(&mem, 0, &heads);
        kick.write(1).unwrap();
        let used = wait_used(&mem, heads.len() as u16, &daemon);
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
            CANARY,
            "{format}: read-only status written"
        );
        assert_eq!(
            status(&mem, 2),
            CANARY,
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
        write_desc(&mem, 23, 0x1_0090, 16, NEXT, 24);
        write_desc(&mem, 24, 0x2_6000, 4096, WRITE | NEXT, 25);
        write_desc(&mem, 25, STATUS + 9, 1, WRITE, 0);
        publish(&mem, heads.len() as u16, &[23]);
        kick.write(1).unwrap();
        wait_used(&mem, heads.len() as u16 + 1, &daemon);
        assert_eq!(status(&mem, 9), VIRTIO_BLK_S_OK as u8, "{format}");
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x2_6000)).unwrap();
        assert!(back == data, "{format}: read back differs");
        drop(fe);
        assert!(daemon.running(), "{format}: daemon died:\n{}", daemon.log());
        daemon.stop();
        if format == "qcow2" {
            common::qemu_img_check(&image);
        }
    }
}
