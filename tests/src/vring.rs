//! A hostile vhost-user frontend for backend tests: a split virtqueue laid out by the test in
//! memfd-backed "guest" memory that the backend maps, with descriptors written by hand (so
//! they can be malicious), and the vhost-user handshake done with the `vhost` crate's
//! frontend side.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Descriptor flag: the chain continues at `next`.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// A guest address no memory region covers.
pub const OUTSIDE: u64 = 0xdead_0000_0000;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// What a status byte holds until the device writes it (see [`preset_status`]).
pub const STATUS_CANARY: u8 = 0xee;

/// Presets the `count` status bytes at guest address `addr` to [`STATUS_CANARY`]. Guest
/// memory starts zeroed and `VIRTIO_BLK_S_OK` is 0: a check for OK on a byte not preset
/// passes even when the device never wrote the status.
pub fn preset_status<M>(mem: &M, addr: u64, count: usize)
where
    M: Bytes<GuestAddress> + ?Sized,
    M::E: std::fmt::Debug,
{
    mem.write_slice(&vec![STATUS_CANARY; count], GuestAddress(addr))
        .expect("status bytes in guest memory");
}

/// Guest address of the descriptor table; the avail and used rings follow at 4 KiB steps.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// One split virtqueue of `size` entries at guest addresses 0 (descriptors), 0x1000 (avail)
/// and 0x2000 (used) in shared memory; the rest of the memory is for buffers.
pub struct TestRing {
    /// The guest memory (memfd-backed, shared with the backend).
    pub mem: GuestMemoryMmap,
    size: u16,
    published: u16,
}

impl TestRing {
    /// `mem_size` bytes of shared guest memory with an empty ring of `size` entries.
    pub fn new(mem_size: usize, size: u16) -> TestRing {
        let fd = memfd_create(c"test-ring", MFdFlags::MFD_CLOEXEC).expect("memfd");
        let file = File::from(fd);
        file.set_len(mem_size as u64).expect("memfd size");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            mem_size,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        TestRing {
            mem,
            size,
            published: 0,
        }
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + 16 * u64::from(index);
        let m = &self.mem;
        m.write_obj(addr, GuestAddress(base)).unwrap();
        m.write_obj(len, GuestAddress(base + 8)).unwrap();
        m.write_obj(flags, GuestAddress(base + 12)).unwrap();
        m.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Makes `heads` available, after those published before.
    pub fn publish(&mut self, heads: &[u16]) {
        for head in heads {
            let slot = u64::from(self.published % self.size);
            self.mem
                .write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.published = self.published.wrapping_add(1);
        }
        self.mem
            .write_obj(self.published, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Sets the available ring's flags (`1`: VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(flags, GuestAddress(AVAIL)).unwrap();
    }

    /// Sets the available index to `idx` without publishing anything (a hostile driver's
    /// jump past the ring).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Every used-ring entry so far: (head, length).
    pub fn used(&self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let addr = USED + 4 + 8 * u64::from(i % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    /// The used ring's `avail_event` (EVENT_IDX): the driver notifies once its available
    /// index passes it.
    pub fn avail_event(&self) -> u16 {
        let at = USED + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Waits (at most 20 s) until `n` chains are used; returns the used entries. On a
    /// timeout it panics with what `context` says (the backend's log, say).
    pub fn wait_used(&self, n: usize, context: impl Fn() -> String) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used = self.used();
            if used.len() >= n {
                return used;
            }
            assert!(
                Instant::now() < deadline,
                "the backend used {} of {n} chains: {used:?}\n{}",
                used.len(),
                context()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shares the memory with the backend and starts `queue` on this ring (with `features`
    /// as negotiated). Returns the call and kick eventfds; the backend stops serving the
    /// ring when they are closed.
    pub fn start(&self, fe: &mut Frontend, features: u64, queue: usize) -> (EventFd, EventFd) {
        self.start_with_avail_at(fe, features, queue, AVAIL)
    }

    /// [`Self::start`] with the available ring at guest address `avail` instead (a hostile
    /// driver's choice; the helpers that publish chains assume the usual place).
    pub fn start_with_avail_at(
        &self,
        fe: &mut Frontend,
        features: u64,
        queue: usize,
        avail: u64,
    ) -> (EventFd, EventFd) {
        let region = self.mem.iter().next().unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        let host = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_num(queue, self.size).unwrap();
        let rings = VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: host(DESC),
            used_ring_addr: host(USED),
            avail_ring_addr: host(avail),
            log_addr: None,
        };
        fe.set_vring_addr(queue, &rings).unwrap();
        fe.set_vring_base(queue, 0).unwrap();
        fe.set_vring_call(queue, &call).unwrap();
        fe.set_vring_kick(queue, &kick).unwrap();
        if features & PROTOCOL_FEATURES != 0 {
            fe.set_vring_enable(queue, true).unwrap();
        }
        (call, kick)
    }
}

/// Connects to a backend with `queues` queues and negotiates VERSION_1 and `extra` (which
/// must be offered), plus the protocol features bit when offered. Returns the frontend and
/// the negotiated features.
pub fn handshake(socket: &Path, queues: u64, extra: u64) -> (Frontend, u64) {
    handshake_on(Frontend::connect(socket, queues).expect("connect"), extra)
}

/// [`handshake`] on a connection made already.
pub fn handshake_on(mut fe: Frontend, extra: u64) -> (Frontend, u64) {
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_eq!(offered & extra, extra, "features {extra:#x} not offered");
    let features = VIRTIO_F_VERSION_1 | extra | (offered & PROTOCOL_FEATURES);
    fe.set_features(features).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .unwrap();
    }
    (fe, features)
}
