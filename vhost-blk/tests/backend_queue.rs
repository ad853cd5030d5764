//! The backend's queue loop on a mock split queue: used ring entries, EVENT_IDX
//! notification suppression, broken avail rings, deactivation, and the WCE config byte.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cowbird_tests::vring::preset_status;
use qcow2::{FileStorage, RawImage};
use vhost_blk::backend::BlkBackend;
use vhost_blk::config::WCE_OFFSET;
use vhost_blk::device::Device;
use vhost_blk::disk::{Disk, DiskOptions};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SIZE: u16 = 16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

struct Rig {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    device: Arc<Device>,
    backend: BlkBackend,
    vring: VringRwLock,
    call: EventFd,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
}

/// A rig on a raw image wrapped by hand: every request takes the bounce-buffer path.
fn rig() -> Rig {
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let img = RawImage::new(Arc::new(FileStorage::new(f)), false).unwrap();
    rig_on(Disk::new(Arc::new(img), Some("rig"), 4096).unwrap())
}

/// A 1 MiB raw image in `dir` opened as the daemon opens it: reads and writes go through
/// the io_uring.
fn opened_raw_disk(dir: &std::path::Path) -> Disk {
    let path = dir.join("disk.raw");
    File::create(&path).unwrap().set_len(1 << 20).unwrap();
    Disk::open(&DiskOptions {
        path,
        format: Some(qcow2::Format::Raw),
        ..Default::default()
    })
    .unwrap()
}

fn rig_on(disk: Disk) -> Rig {
    rig_polling(disk, Duration::ZERO)
}

/// A rig whose worker polls for `poll` after its batches (`--poll-us`).
fn rig_polling(disk: Disk, poll: Duration) -> Rig {
    rig_with(disk, poll, &[(GuestAddress(0), 0x10_0000)])
}

/// A rig whose guest memory is made of the regions `ranges` (the rings live at 0..0x2000).
fn rig_with(disk: Disk, poll: Duration, ranges: &[(GuestAddress, usize)]) -> Rig {
    let mut device = Device::new(disk, 1, SIZE).unwrap();
    device.set_poll(poll);
    let device = Arc::new(device);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(ranges).unwrap());
    let backend = BlkBackend::new(device.clone(), mem.clone());
    // Our own ring layout: virtio-queue's MockSplitQueue places its used ring over the end
    // of its avail ring (it adds the entry count, not the byte size, to the avail address).
    let (desc, avail, used) = (0x0, 0x1000, 0x1800);
    let vring = VringRwLock::new(mem.clone(), SIZE).unwrap();
    vring.set_queue_size(SIZE);
    vring.set_queue_info(desc, avail, used).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring.set_queue_event_idx(true);
    backend.set_event_idx(true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: dup returns a new descriptor that the File owns.
    let dup = unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) };
    vring.set_call(Some(dup));
    Rig {
        mem,
        device,
        backend,
        vring,
        call,
        desc,
        avail,
        used,
        next_desc: 0,
    }
}

impl Rig {
    fn write<T: vm_memory::ByteValued>(&self, val: T, addr: u64) {
        self.mem
            .memory()
            .write_obj(val, GuestAddress(addr))
            .unwrap();
    }

    fn read<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    fn avail_idx(&self) -> u16 {
        self.read(self.avail + 2)
    }

    /// Puts a chain of `(addr, len, flags)` buffers in the descriptor table and makes `head`
    /// available; returns the head index.
    fn push(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.place(bufs);
        self.push_head(head);
        head
    }

    /// Puts a chain in the descriptor table without making it available; returns its head.
    fn place(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == bufs.len();
            let flags = if last { flags } else { flags | NEXT };
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, index + 1));
            self.write(raw, self.desc + 16 * u64::from(index));
        }
        self.next_desc += bufs.len() as u16;
        head
    }

    fn push_head(&self, head: u16) {
        let idx = self.avail_idx();
        self.write(head, self.avail + 4 + 2 * u64::from(idx % SIZE));
        self.write(idx.wrapping_add(1), self.avail + 2);
    }

    fn header(&self, addr: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .memory()
            .write_slice(&h, GuestAddress(addr))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.read(self.used + 2)
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % SIZE);
        (self.read(at), self.read(at + 4))
    }

    /// The driver's `used_event` (after the avail ring).
    fn set_used_event(&self, v: u16) {
        self.write(v, self.avail + 4 + 2 * u64::from(SIZE));
    }

    /// The device's `avail_event` (after the used ring).
    fn avail_event(&self) -> u16 {
        self.read(self.used + 4 + 8 * u64::from(SIZE))
    }

    fn notified(&self) -> bool {
        self.call.read().is_ok()
    }

    /// Presets `count` status bytes from `addr` (see [`preset_status`]).
    fn preset_status(&self, addr: u64, count: usize) {
        preset_status(&*self.mem.memory(), addr, count);
    }

    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }
}

#[test]
fn completes_chains_with_event_idx() {
    let mut r = rig();
    r.header(0x2000, VIRTIO_BLK_T_OUT, 8);
    r.mem
        .memory()
        .write_slice(&[0x5au8; 4096], GuestAddress(0x4000))
        .unwrap();
    r.mem
        .memory()
        .write_slice(&[0xeeu8; 4096], GuestAddress(0x8000))
        .unwrap();
    r.preset_status(0x3000, 5);
    let h0 = r.push(&[(0x2000, 16, 0), (0x4000, 4096, 0), (0x3000, 1, W)]);
    // Requests in flight together are not ordered (as on real disks): this read does not
    // overlap the write. The flush completes after both (it waits for the writes before it).
    r.header(0x2100, VIRTIO_BLK_T_IN, 16);
    let h1 = r.push(&[(0x2100, 16, 0), (0x8000, 4096, W), (0x3001, 1, W)]);
    r.header(0x2200, VIRTIO_BLK_T_FLUSH, 0);
    let h2 = r.push(&[(0x2200, 16, 0), (0x3002, 1, W)]);
    r.set_used_event(0);
    r.kick();
    assert_eq!(r.used_idx(), 3);
    let mut first_two = [r.used_elem(0), r.used_elem(1)];
    first_two.sort();
    let mut expected = [(u32::from(h0), 1), (u32::from(h1), 4097)];
    expected.sort();
    assert_eq!(first_two, expected);
    assert_eq!(r.used_elem(2), (u32::from(h2), 1));
    let statuses: [u8; 3] = r.read(0x3000);
    assert_eq!(statuses, [VIRTIO_BLK_S_OK as u8; 3]);
    let read_back = |r: &Rig, addr| {
        let mut back = [0u8; 4096];
        r.mem
            .memory()
            .read_slice(&mut back, GuestAddress(addr))
            .unwrap();
        back
    };
    assert_eq!(
        read_back(&r, 0x8000),
        [0u8; 4096],
        "sector 16 was never written"
    );
    assert!(
        r.notified(),
        "used_event 0 was passed: the driver must be notified"
    );
    // EVENT_IDX: the device asks to be kicked when the next chain arrives.
    assert_eq!(r.avail_event(), 3);

    // The driver does not want an interrupt before used index 10: none is sent.
    r.set_used_event(10);
    r.header(0x2300, VIRTIO_BLK_T_FLUSH, 0);
    r.push(&[(0x2300, 16, 0), (0x3003, 1, W)]);
    r.kick();
    assert_eq!(r.used_idx(), 4);
    assert_eq!(r.read::<u8>(0x3003), VIRTIO_BLK_S_OK as u8);
    assert!(
        !r.notified(),
        "notification sent although used_event says not yet"
    );

    // The write landed.
    r.header(0x2400, VIRTIO_BLK_T_IN, 8);
    r.push(&[(0x2400, 16, 0), (0x9000, 4096, W), (0x3004, 1, W)]);
    r.kick();
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.read::<u8>(0x3004), VIRTIO_BLK_S_OK as u8);
    assert_eq!(read_back(&r, 0x9000), [0x5au8; 4096]);
}

#[test]
fn bad_head_index_is_skipped_and_the_next_chain_completes() {
    let mut r = rig();
    r.push_head(200);
    r.header(0x2000, VIRTIO_BLK_T_FLUSH, 0);
    let good = r.push(&[(0x2000, 16, 0), (0x3000, 1, W)]);
    r.kick();
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used_elem(0), (u32::from(good), 1));
}

#[test]
fn avail_index_far_ahead_is_an_error_not_a_panic() {
    let r = rig();
    r.write(r.avail_idx().wrapping_add(SIZE + 5), r.avail + 2);
    assert!(r.backend.process_queue(0, &r.vring).is_err());
    r.kick(); // handle_event logs and keeps the worker alive
    assert_eq!(r.used_idx(), 0);
}

/// An avail ring whose index is in guest memory but whose entries are not: the chains it
/// announces cannot be read, which is an error, not work to keep looking for.
#[test]
fn avail_entries_outside_guest_memory_are_an_error_not_a_busy_loop() {
    let r = rig();
    let avail = 0x10_0000 - 4;
    r.vring.set_queue_info(r.desc, avail, r.used).unwrap();
    r.write(1u16, avail + 2);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(r.backend.process_queue(0, &r.vring).is_err()));
    let failed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker is still looking for the chains");
    assert!(failed, "unreadable avail entries were not reported");
}

#[test]
fn deactivated_backend_leaves_the_ring_alone() {
    let mut r = rig();
    r.backend.deactivate();
    r.header(0x2000, VIRTIO_BLK_T_FLUSH, 0);
    r.push(&[(0x2000, 16, 0), (0x3000, 1, W)]);
    r.kick();
    assert_eq!(r.used_idx(), 0);
}

/// A worker of an ended connection that wakes up late (its epoll loop still watches the
/// device's io_uring eventfd) leaves the shared ring to the next connection: it does not
/// consume the eventfd that wakes the new worker.
#[test]
fn a_stale_worker_does_not_take_the_next_connections_ring_events() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig_on(opened_raw_disk(dir.path()));
    let stale = BlkBackend::new(r.device.clone(), r.mem.clone());
    stale.deactivate();
    let fd = r.device.ring_eventfd(0).expect("the raw disk has a ring");
    // SAFETY: an eventfd of the device's ring, open while the device lives.
    assert_eq!(unsafe { libc::eventfd_write(fd, 1) }, 0);
    stale
        .handle_event(
            vhost_blk::backend::ring_event(1),
            EventSet::IN,
            std::slice::from_ref(&r.vring),
            0,
        )
        .unwrap();
    let mut value = 0;
    // SAFETY: as above; `value` is a valid out-parameter.
    assert_eq!(
        unsafe { libc::eventfd_read(fd, &mut value) },
        0,
        "the stale worker consumed the ring's event"
    );
    assert_eq!(value, 1);
}

#[test]
fn wce_is_writable_only_when_negotiated() {
    let r = rig();
    assert_eq!(r.backend.get_config(WCE_OFFSET as u32, 1), vec![1]);
    assert!(r.backend.set_config(WCE_OFFSET as u32, &[0]).is_err());
    r.backend.acked_features(r.backend.features());
    r.backend.set_config(WCE_OFFSET as u32, &[0]).unwrap();
    assert_eq!(r.backend.get_config(WCE_OFFSET as u32, 1), vec![0]);
    assert!(
        r.backend.set_config(0, &[0; 8]).is_err(),
        "capacity is read-only"
    );
    r.backend.set_config(WCE_OFFSET as u32, &[1]).unwrap();
    assert_eq!(r.backend.get_config(WCE_OFFSET as u32, 1), vec![1]);
    assert_eq!(r.backend.get_config(0, 8), (2048u64).to_le_bytes());
}

/// Image storage that counts its flushes (`fdatasync`s).
struct CountingFlushes {
    inner: FileStorage,
    flushes: Arc<AtomicUsize>,
    /// Hand out the file's descriptor, so that the queue's io_uring takes the writes.
    ring: bool,
}

impl qcow2::Storage for CountingFlushes {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, SeqCst);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.then(|| self.inner.file().as_raw_fd())
    }
}

/// A rig on a raw image whose storage counts its syncs, with the counter; with `ring`, writes
/// go through the queue's io_uring (buffered: written at once, without the kernel's worker).
fn counting_rig(ring: bool) -> (Rig, Arc<AtomicUsize>) {
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let flushes = Arc::new(AtomicUsize::new(0));
    let storage = CountingFlushes {
        inner: FileStorage::new(f),
        flushes: flushes.clone(),
        ring,
    };
    let img = RawImage::new(Arc::new(storage), false).unwrap();
    (
        rig_on(Disk::new(Arc::new(img), Some("wt"), 4096).unwrap()),
        flushes,
    )
}

/// Has the guest write two 4 KiB blocks and stops the queue; returns the syncs they took.
fn syncs_for_two_writes(r: &mut Rig, flushes: &AtomicUsize) -> usize {
    r.preset_status(0x3000, 2);
    r.mem
        .memory()
        .write_slice(&[0x5a; 8192], GuestAddress(0x4000))
        .unwrap();
    let before = flushes.load(SeqCst);
    for (i, status) in [0x3000u64, 0x3001].into_iter().enumerate() {
        r.header(0x2000 + 0x10 * i as u64, VIRTIO_BLK_T_OUT, 8 * i as u64);
        r.push(&[
            (0x2000 + 0x10 * i as u64, 16, 0),
            (0x4000 + 4096 * i as u64, 4096, 0),
            (status, 1, W),
        ]);
    }
    r.kick();
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.read::<[u8; 2]>(0x3000), [VIRTIO_BLK_S_OK as u8; 2]);
    flushes.load(SeqCst) - before
}

/// A driver that does not negotiate FLUSH never sends one: each of its writes is made
/// durable before it completes (and the configuration shows the cache off). One that
/// negotiates FLUSH gets the write cache, and its writes complete without a sync.
#[test]
fn a_driver_without_flush_gets_every_write_synced_before_it_completes() {
    for (with_flush, ring) in [(true, false), (false, false), (true, true), (false, true)] {
        let (mut r, flushes) = counting_rig(ring);
        let mut features = r.backend.features();
        if !with_flush {
            features &= !(1 << VIRTIO_BLK_F_FLUSH);
        }
        r.backend.acked_features(features);
        let wce = r.backend.get_config(WCE_OFFSET as u32, 1);
        assert_eq!(wce, vec![u8::from(with_flush)], "with FLUSH: {with_flush}");
        let expected = if with_flush { 0 } else { 2 };
        assert_eq!(
            syncs_for_two_writes(&mut r, &flushes),
            expected,
            "syncs for 2 writes, with FLUSH: {with_flush}, through the io_uring: {ring}"
        );
    }
}

/// The guest's write cache choice outlives renegotiation and reconnection: QEMU sends
/// SET_FEATURES again on every start and reconnect but never reads `wce` back, so a guest
/// that turned the cache off (and so stopped flushing) must keep getting writethrough.
#[test]
fn the_guests_write_cache_choice_survives_renegotiation_and_reconnection() {
    let (mut r, flushes) = counting_rig(false);
    let all = r.backend.features();
    r.backend.acked_features(all);
    r.backend.set_config(WCE_OFFSET as u32, &[0]).unwrap();
    r.backend.acked_features(all);
    assert_eq!(r.backend.get_config(WCE_OFFSET as u32, 1), vec![0]);
    let next = BlkBackend::new(r.device.clone(), r.mem.clone());
    next.acked_features(all);
    assert_eq!(next.get_config(WCE_OFFSET as u32, 1), vec![0]);
    assert_eq!(syncs_for_two_writes(&mut r, &flushes), 2);
}

/// A driver that flushes but cannot set the cache (firmware such as OVMF) leaves it as
/// `--writethrough` set it, for itself and the drivers after it, as qemu-storage-daemon
/// does: it turned the cache on for good.
#[test]
fn a_driver_that_cannot_set_the_cache_keeps_writethrough() {
    let (mut r, flushes) = counting_rig(false);
    r.device.set_write_cache(false);
    let all = r.backend.features();
    r.backend
        .acked_features(all & !(1 << VIRTIO_BLK_F_CONFIG_WCE));
    assert_eq!(syncs_for_two_writes(&mut r, &flushes), 2);
    let next = BlkBackend::new(r.device.clone(), r.mem.clone());
    next.acked_features(all);
    assert_eq!(next.get_config(WCE_OFFSET as u32, 1), vec![0]);
}

#[test]
fn io_uring_requests_complete_at_stop_vring() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rig_on(opened_raw_disk(dir.path()));
    r.mem
        .memory()
        .write_slice(&[0x3cu8; 8192], GuestAddress(0x4000))
        .unwrap();
    r.header(0x2000, VIRTIO_BLK_T_OUT, 16);
    r.push(&[(0x2000, 16, 0), (0x4000, 8192, 0), (0x3000, 1, W)]);
    r.header(0x2100, VIRTIO_BLK_T_FLUSH, 0);
    let flush = r.push(&[(0x2100, 16, 0), (0x3001, 1, W)]);
    r.preset_status(0x3000, 3);
    r.kick();
    // The flush completed at once; the write is in the ring (or already done).
    assert!(r.used_idx() >= 1);
    assert!((0..r.used_idx()).any(|i| r.used_elem(i) == (u32::from(flush), 1)));
    // GET_VRING_BASE: the backend waits for the write and completes it.
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.read::<[u8; 2]>(0x3000), [VIRTIO_BLK_S_OK as u8; 2]);
    // Read it back through the ring.
    r.header(0x2200, VIRTIO_BLK_T_IN, 16);
    r.push(&[(0x2200, 16, 0), (0x8000, 8192, W), (0x3002, 1, W)]);
    r.kick();
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.used_elem(2).1, 8193);
    assert_eq!(r.read::<u8>(0x3002), VIRTIO_BLK_S_OK as u8);
    let mut back = [0u8; 8192];
    r.mem
        .memory()
        .read_slice(&mut back, GuestAddress(0x8000))
        .unwrap();
    assert!(back.iter().all(|&b| b == 0x3c));
}

/// Image storage whose file is the read end of a pipe: an io_uring read of it stays in
/// flight until the test writes into the pipe, a request as slow as the test wants.
struct PipeStorage {
    read_end: std::os::fd::OwnedFd,
}

impl qcow2::Storage for PipeStorage {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("only the io_uring path reads a pipe"))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(1 << 20)
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("fixed size"))
    }
    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.read_end.as_raw_fd())
    }
}

/// A pipe: reads of its read end wait until the test writes into the write end.
fn pipe() -> (std::os::fd::OwnedFd, File) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2, owned once each.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// A disk whose reads go through the io_uring and stay in flight until the returned pipe end
/// is written to.
fn slow_disk() -> (Disk, File) {
    let (read_end, write_end) = pipe();
    let img = RawImage::new(Arc::new(PipeStorage { read_end }), true).unwrap();
    (
        Disk::new(Arc::new(img), Some("slow"), 4096).unwrap(),
        write_end,
    )
}

/// While a request is at the "disk" (an io_uring read of an empty pipe), the worker sleeps in
/// its ring, and a kick must still wake it: the next request (GET_ID, served at once) completes
/// before the slow one, which completes once its data arrives.
#[test]
fn a_kick_during_a_slow_request_is_served_before_it_completes() {
    let (disk, write_end) = slow_disk();
    let mut r = rig_on(disk);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: dup returns a new descriptor that the File owns.
    let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    r.vring.set_kick(Some(dup));

    r.preset_status(0x3000, 2);
    r.header(0x2000, VIRTIO_BLK_T_IN, 0);
    let slow = r.push(&[(0x2000, 16, 0), (0x4000, 4096, W), (0x3000, 1, W)]);
    let (returned, woke) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let (write_end, kick) = (&write_end, &kick);
        s.spawn(move || {
            // The worker is asleep in its ring with the read in flight.
            std::thread::sleep(std::time::Duration::from_millis(200));
            kick.write(1).unwrap();
            if woke
                .recv_timeout(std::time::Duration::from_secs(3))
                .is_err()
            {
                // The kick did not wake it: release the read so that the test fails below
                // instead of hanging.
                std::io::Write::write_all(&mut &*write_end, &[0; 4096]).unwrap();
            }
        });
        // Starts the read and sleeps in the ring; the kick ends the sleep (the epoll loop,
        // played by this test, reads kicks).
        r.kick();
        let _ = returned.send(());
    });
    assert_eq!(r.used_idx(), 0, "the kick did not wake the worker");
    let _ = kick.read();
    r.header(0x2100, VIRTIO_BLK_T_GET_ID, 0);
    let id = r.push(&[(0x2100, 16, 0), (0x5000, 20, W), (0x3001, 1, W)]);
    std::thread::scope(|s| {
        let r = &r;
        let feeder = s.spawn(move || {
            // Wait until GET_ID is in the used ring, then let the read finish.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while r.used_idx() == 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let first = r.used_elem(0);
            std::io::Write::write_all(&mut &write_end, &[0x5a; 4096]).unwrap();
            first
        });
        // Serves GET_ID at once, then sleeps in the ring until the read completes.
        r.kick();
        let first = feeder.join().unwrap();
        assert_eq!(first.0, u32::from(id), "GET_ID came first");
    });
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used_elem(1), (u32::from(slow), 4097));
    assert_eq!(r.read::<[u8; 2]>(0x3000), [VIRTIO_BLK_S_OK as u8; 2]);
    assert_eq!(r.read::<[u8; 4]>(0x4000), [0x5a; 4]);
}

/// With `--poll-us`, a worker whose batch was served without the disk keeps watching the
/// available ring: a chain made available without a kick is served within the window.
#[test]
fn polling_serves_chains_that_come_without_a_kick() {
    let (disk, _write_end) = slow_disk();
    let mut r = rig_polling(disk, Duration::from_millis(500));
    r.header(0x2000, VIRTIO_BLK_T_GET_ID, 0);
    r.push(&[(0x2000, 16, 0), (0x5000, 20, W), (0x3000, 1, W)]);
    r.header(0x2100, VIRTIO_BLK_T_GET_ID, 0);
    let unkicked = r.place(&[(0x2100, 16, 0), (0x5100, 20, W), (0x3001, 1, W)]);
    kick_then_push_unkicked(&r, unkicked);
    assert_eq!(r.used_elem(1), (u32::from(unkicked), 21));
}

/// Kicks the worker, which serves what is available and then polls (a 500 ms window in
/// these tests); 50 ms in, makes chain `unkicked` available without a kick. Checks that
/// both were served.
fn kick_then_push_unkicked(r: &Rig, unkicked: u16) {
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r.push_head(unkicked);
        });
        r.kick();
    });
    assert_eq!(
        r.used_idx(),
        2,
        "the chain made available while polling was not served"
    );
}

/// A read the kernel serves from the page cache as the worker submits it never reaches the
/// disk: the worker polls after it as after a request served without the io_uring, and
/// serves a chain made available without a kick.
#[test]
fn polling_follows_reads_served_from_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cached.raw");
    // Written through the page cache, where the reads find it.
    std::fs::write(&path, vec![0x11; 1 << 20]).unwrap();
    let disk = Disk::open(&DiskOptions {
        path,
        format: Some(qcow2::Format::Raw),
        ..Default::default()
    })
    .unwrap();
    let mut r = rig_polling(disk, Duration::from_millis(500));
    r.header(0x2000, VIRTIO_BLK_T_IN, 0);
    let first = r.push(&[(0x2000, 16, 0), (0x4000, 4096, W), (0x3000, 1, W)]);
    r.header(0x2100, VIRTIO_BLK_T_IN, 8);
    let unkicked = r.place(&[(0x2100, 16, 0), (0x6000, 4096, W), (0x3001, 1, W)]);
    kick_then_push_unkicked(&r, unkicked);
    assert_eq!(r.used_elem(0), (u32::from(first), 4097));
    assert_eq!(r.used_elem(1), (u32::from(unkicked), 4097));
    assert_eq!(r.read::<[u8; 4]>(0x6000), [0x11; 4]);
}

/// Polling stops once a request is at the disk: the worker sleeps in its ring instead of
/// spinning through the disk's latency, and does not poll after the request completes.
#[test]
fn polling_does_not_spin_while_a_request_is_at_the_disk() {
    let (disk, write_end) = slow_disk();
    let mut r = rig_polling(disk, Duration::from_secs(5));
    r.header(0x2000, VIRTIO_BLK_T_IN, 0);
    let slow = r.push(&[(0x2000, 16, 0), (0x4000, 4096, W), (0x3000, 1, W)]);
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            std::io::Write::write_all(&mut &write_end, &[0x5a; 4096]).unwrap();
        });
        r.kick();
    });
    let took = started.elapsed();
    assert_eq!(r.used_elem(0), (u32::from(slow), 4097));
    assert!(
        took < Duration::from_secs(2),
        "the worker polled for {took:?} around a request at the disk (window 5 s)"
    );
}

/// Buffers that span two memory regions (mapped apart in the backend) are read and written
/// piece by piece: a header across one boundary, data across another; through the bounce
/// buffer and through the io_uring.
#[test]
fn buffers_across_memory_regions_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let opened = opened_raw_disk(dir.path());
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let wrapped = RawImage::new(Arc::new(FileStorage::new(f)), false).unwrap();
    let wrapped = Disk::new(Arc::new(wrapped), Some("regions"), 4096).unwrap();
    let ranges = [
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
        (GuestAddress(0x1_0000), 0xf_0000),
    ];
    for disk in [wrapped, opened] {
        let mut r = rig_with(disk, Duration::ZERO, &ranges);
        r.preset_status(0x3000, 2);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        r.mem
            .memory()
            .write_slice(&data, GuestAddress(0xf000))
            .unwrap();
        r.header(0x7ff8, VIRTIO_BLK_T_OUT, 24);
        r.push(&[(0x7ff8, 16, 0), (0xf000, 8192, 0), (0x3000, 1, W)]);
        r.kick();
        r.backend.stop_vring(0).unwrap();
        r.mem
            .memory()
            .write_slice(&[0u8; 8192], GuestAddress(0xf000))
            .unwrap();
        r.header(0x7ff8, VIRTIO_BLK_T_IN, 24);
        r.push(&[(0x7ff8, 16, 0), (0xf000, 8192, W), (0x3001, 1, W)]);
        r.kick();
        r.backend.stop_vring(0).unwrap();
        assert_eq!(r.used_idx(), 2);
        assert_eq!(
            r.read::<[u8; 2]>(0x3000),
            [VIRTIO_BLK_S_OK as u8; 2],
            "status bytes"
        );
        assert_eq!(r.used_elem(1).1, 8193);
        let mut back = vec![0u8; 8192];
        r.mem
            .memory()
            .read_slice(&mut back, GuestAddress(0xf000))
            .unwrap();
        assert!(
            back == data,
            "data read back across the region boundary differs"
        );
    }
}

/// The slow pipe-backed raw image, except that flushes sync a real file (an io_uring fsync of
/// a pipe fails): a flush can then go through the ring while a read waits at the "disk".
struct SlowReadsRealFlush {
    inner: RawImage,
    flushed: File,
}

impl qcow2::Image for SlowReadsRealFlush {
    fn format(&self) -> qcow2::Format {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow2::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> qcow2::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> qcow2::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> qcow2::Result<()> {
        self.inner.flush()
    }
    fn sync_fds(&self) -> Option<Vec<std::os::unix::io::RawFd>> {
        Some(vec![self.flushed.as_raw_fd()])
    }
    fn block_status(&self, offset: u64, len: u64) -> qcow2::Result<qcow2::BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn map_io(&self, offset: u64, len: u64, write: bool) -> qcow2::MapOutcome {
        self.inner.map_io(offset, len, write)
    }
    fn finish_io(&self, mapping: qcow2::IoMapping, ok: bool) -> bool {
        self.inner.finish_io(mapping, ok)
    }
}

/// A flush goes through the ring without waiting for the requests already there: with a
/// read stuck at the "disk", the flush completes first (it covers only completed writes).
#[test]
fn a_flush_does_not_wait_for_requests_in_flight() {
    let (read_end, write_end) = pipe();
    let img = SlowReadsRealFlush {
        inner: RawImage::new(Arc::new(PipeStorage { read_end }), false).unwrap(),
        flushed: tempfile::tempfile().unwrap(),
    };
    let mut r = rig_on(Disk::new(Arc::new(img), Some("slow"), 4096).unwrap());
    r.preset_status(0x3000, 2);
    r.header(0x2000, VIRTIO_BLK_T_IN, 0);
    let slow = r.push(&[(0x2000, 16, 0), (0x4000, 4096, W), (0x3000, 1, W)]);
    r.header(0x2100, VIRTIO_BLK_T_FLUSH, 0);
    let flush = r.push(&[(0x2100, 16, 0), (0x3001, 1, W)]);
    std::thread::scope(|s| {
        let r = &r;
        let feeder = s.spawn(move || {
            // Wait until the flush is in the used ring, then let the read finish.
            let deadline = Instant::now() + Duration::from_secs(5);
            while r.used_idx() == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let first = r.used_elem(0);
            std::io::Write::write_all(&mut &write_end, &[0x5a; 4096]).unwrap();
            first
        });
        // Starts both, then sleeps in the ring until both have completed.
        r.kick();
        let first = feeder.join().unwrap();
        assert_eq!(first, (u32::from(flush), 1), "the flush completed first");
    });
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.used_elem(1), (u32::from(slow), 4097));
    assert_eq!(
        r.read::<[u8; 2]>(0x3000),
        [VIRTIO_BLK_S_OK as u8; 2],
        "status bytes"
    );
}

/// A raw image file whose io_uring descriptor is a pipe: the ring's fsync of it fails
/// (EINVAL), standing in for a sync that hit an I/O error; everything else reaches the file.
struct SyncFailsInTheRing {
    inner: FileStorage,
    pipe: std::os::fd::OwnedFd,
}

impl qcow2::Storage for SyncFailsInTheRing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.pipe.as_raw_fd())
    }
    fn mark_sync_failed(&self) {
        self.inner.mark_sync_failed()
    }
    fn check_sync(&self) -> std::io::Result<()> {
        self.inner.check_sync()
    }
}

/// A sync that fails in the ring fails its flush, and every later flush too, although a
/// plain fdatasync of the file would now succeed: the kernel reports lost writes only once
/// (fsyncgate), so a retry must not turn the failure into success.
#[test]
fn a_failed_sync_fails_that_flush_and_every_later_one() {
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let (pipe, _write_end) = pipe();
    let storage = SyncFailsInTheRing {
        inner: FileStorage::new(f),
        pipe,
    };
    let img = RawImage::new(Arc::new(storage), false).unwrap();
    let mut r = rig_on(Disk::new(Arc::new(img), Some("fsyncgate"), 4096).unwrap());
    r.preset_status(0x3000, 3);
    r.mem
        .memory()
        .write_slice(&[0x5a; 4096], GuestAddress(0x4000))
        .unwrap();
    r.header(0x2000, VIRTIO_BLK_T_OUT, 8);
    r.push(&[(0x2000, 16, 0), (0x4000, 4096, 0), (0x3000, 1, W)]);
    r.kick();
    for (i, status) in [0x3001u64, 0x3002].into_iter().enumerate() {
        r.header(0x2100 + 0x10 * i as u64, VIRTIO_BLK_T_FLUSH, 0);
        r.push(&[(0x2100 + 0x10 * i as u64, 16, 0), (status, 1, W)]);
        r.kick();
    }
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.read::<u8>(0x3000), VIRTIO_BLK_S_OK as u8, "the write");
    assert_eq!(
        r.read::<[u8; 2]>(0x3001),
        [VIRTIO_BLK_S_IOERR as u8; 2],
        "both flushes fail"
    );
}

/// Fails the whole test process if `f` does not return within 20 s (a worker loop that never
/// ends cannot fail an assertion).
fn within_20s<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let what = what.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        if !flag.load(SeqCst) {
            eprintln!("{what} did not return: aborting");
            std::process::abort();
        }
    });
    let out = f();
    done.store(true, SeqCst);
    out
}

/// A disabled ring (SET_VRING_ENABLE 0, as QEMU sends before GET_VRING_BASE) keeps its
/// chains and is not written: with EVENT_IDX the worker looped forever on it (chains
/// available, none taken), holding the queue, so that GET_VRING_BASE never answered. After a
/// stop nothing is written into the ring either.
#[test]
fn a_disabled_ring_keeps_its_chains_and_the_worker_returns() {
    let mut r = rig();
    r.preset_status(0x3000, 1);
    r.header(0x2000, VIRTIO_BLK_T_IN, 0);
    r.push(&[(0x2000, 16, 0), (0x4000, 512, W), (0x3000, 1, W)]);
    r.vring.set_enabled(false);
    let avail_event_before = r.avail_event();
    within_20s("a kick on a disabled ring", || r.kick());
    assert_eq!(r.used_idx(), 0, "a disabled ring's chain was taken");
    assert_eq!(
        r.avail_event(),
        avail_event_before,
        "the disabled ring was written"
    );
    within_20s("GET_VRING_BASE", || r.backend.stop_vring(0).unwrap());
    // Enabled again, the chain is served.
    r.vring.set_enabled(true);
    within_20s("a kick", || r.kick());
    assert_eq!(r.used_idx(), 1);
}
