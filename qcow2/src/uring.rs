//! Many guest requests in flight on one thread: ranges mapped by [`Image::map_io`] are read
//! or written with io_uring straight between the image's host file and the caller's buffers
//! (guest memory in a daemon). When mapping needs an L2 slice that is not cached, the slice is
//! read through the same ring and the request is mapped again once it is installed, so cold
//! reads do not block the thread. Writes to files in the page cache are done at once with
//! pwritev, still without a copy: io_uring would queue them to a kernel worker. Requests the
//! mapping cannot serve (allocation, copy-on-write, compressed or backing data) are declined
//! and go through [`Image::read_at`] / [`Image::write_at`].

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use aligned_vec::{avec_rt, AVec, RuntimeAlign};
use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::fixed_buffers::FixedBuffers;
use crate::image::{Extent, Image, IoMapping, MapOutcome, MetadataLoad};

/// Most buffers in one readv/writev (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// Bits of an entry's user data that number the pieces of one request.
const PIECE_BITS: u32 = 20;

/// Metadata reads one request may wait for before it is declined (a request spans few slices).
const MAX_LOADS: u32 = 4;

/// Alignment of metadata read buffers (enough for O_DIRECT).
const LOAD_ALIGN: usize = 4096;

/// Queued entries handed to the kernel at once while a batch is still being built, without
/// waiting for [`IoRing::submit`]: the device starts on the first requests meanwhile. One
/// submit for a whole batch of 32 made this machine's disk serve them as a convoy (the batch
/// completes together and comes back together): 4 KiB random reads at QD32 through vhost-blk
/// went from 63k to 76-79k IOPS with groups of 4, for one more system call per 4 requests.
const SUBMIT_EVERY: usize = 4;

/// User data of the poll armed by [`IoRing::watch_readable`] (no request slot has this
/// index).
const WATCH: u64 = u64::MAX;

/// User data of the entry cancelling that poll.
const CANCEL: u64 = u64::MAX - 1;

/// What [`IoRing::start`] did with a request.
pub enum Start<T> {
    /// Submitted (or queued for the next [`IoRing::submit`]); [`IoRing::reap`] returns it.
    Queued,
    /// Already complete: every byte was a zero read filled in place, or a buffered write.
    Done(T),
    /// Not mappable without metadata work, or no room in the ring: do it the slow way.
    Declined(T),
}

/// What [`IoRing::start_sync`] did with a batch of flushes.
enum SyncStart<T> {
    /// The sync is in the ring; its completion finishes them.
    Submitted,
    /// Nothing to sync (a read-only image): they are done.
    Done(Vec<T>),
    /// Not through the ring: do them the slow way.
    Declined(Vec<T>),
}

/// A finished request.
pub struct Completion<T> {
    /// What the caller attached to the request.
    pub tag: T,
    /// Every piece moved all its bytes. Otherwise (an error, a short transfer, an unaligned
    /// buffer under O_DIRECT, or the request turned out to need the slow path after a
    /// metadata read) redo it the slow way, which reports any error precisely.
    pub ok: bool,
}

/// A request as the caller gave it.
struct Request<T> {
    tag: T,
    offset: u64,
    write: bool,
    iovecs: Vec<libc::iovec>,
    /// Metadata reads done for it so far.
    loads: u32,
}

/// Guest data the kernel is moving.
struct InFlight<T> {
    tag: T,
    // Kept until completion: the busy mark of a write, what it allocated, and the storage
    // whose fd is in use; handed back with `Image::finish_io`.
    mapping: IoMapping,
    /// One per entry in the ring.
    pieces: Vec<Piece>,
    remaining: usize,
    ok: bool,
}

/// The part of a request that is one entry in the ring: one host extent.
struct Piece {
    /// Bytes it moves.
    len: u64,
    // The kernel reads this array until the request completes; its heap buffer never moves.
    _iovecs: Vec<libc::iovec>,
}

/// Metadata being read for a request that waits for it.
struct Loading<T> {
    request: Request<T>,
    load: MetadataLoad,
    // The kernel writes into this buffer until the read completes.
    buf: AVec<u8, RuntimeAlign>,
}

/// Flushes whose files the kernel is syncing (one sync serves them all).
struct Syncing<T> {
    tags: Vec<T>,
    remaining: usize,
    ok: bool,
}

enum Slot<T> {
    Data(InFlight<T>),
    Metadata(Loading<T>),
    Sync(Syncing<T>),
}

/// One thread's io_uring for I/O on one image.
pub struct IoRing<T> {
    image: Arc<dyn Image>,
    ring: IoUring,
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    /// Entries queued since the last submit.
    unsubmitted: usize,
    /// The poll armed by [`IoRing::watch_readable`] is on this descriptor.
    watching: Option<RawFd>,
    /// That poll fired since [`IoRing::take_readable`] last looked.
    readable: bool,
    /// Requests that finished while [`IoRing::unwatch`] waited, for the next reap.
    pending: Vec<Completion<T>>,
    /// Memory registered by [`IoRing::register_buffers`].
    fixed: FixedBuffers,
    /// The kernel has vectored reads and writes of fixed buffers (Linux 6.15).
    vectored_fixed: bool,
    /// A sync of the image's files is in flight.
    syncing: bool,
    /// Flushes that came while it was: the next sync serves them all.
    waiting_flushes: Vec<T>,
    /// What this ring's flushes sync; `None` when the image cannot split its flush.
    sync_files: Option<SyncFiles>,
}

/// The image's files ([`Image::sync_fds`]), each through a file description of the ring's
/// own. The kernel reports a lost write once per description (its `errseq`): with one
/// description shared by every ring, a sync in flight on another ring could take the report
/// and this ring's flush succeed over the lost data. A description opened when the ring is
/// made sees every loss after that.
struct SyncFiles {
    /// The descriptors to sync: the ring's own, or the image's where reopening failed.
    fds: Vec<RawFd>,
    /// Keeps the ring's own descriptions open.
    _own: Vec<std::fs::File>,
}

impl SyncFiles {
    fn open(image_fds: Vec<RawFd>) -> SyncFiles {
        let mut own = Vec::new();
        let fds = image_fds
            .into_iter()
            .map(|fd| match reopen(fd) {
                Ok(file) => {
                    let own_fd = file.as_raw_fd();
                    own.push(file);
                    own_fd
                }
                Err(e) => {
                    tracing::warn!("cannot reopen descriptor {fd} to sync it on its own: {e}");
                    fd
                }
            })
            .collect();
        SyncFiles { fds, _own: own }
    }
}

/// A new file description of the file open as `fd` (read-only: a sync needs no more).
fn reopen(fd: RawFd) -> io::Result<std::fs::File> {
    std::fs::File::open(format!("/proc/self/fd/{fd}"))
}

// SAFETY: the raw pointers in the iovecs point into memory the caller promised (in `start`)
// stays valid until completion; the ring is used by one thread at a time.
unsafe impl<T: Send> Send for IoRing<T> {}

impl<T> IoRing<T> {
    /// A ring for I/O on `image` with room for at least `entries` pieces in flight.
    pub fn new(image: Arc<dyn Image>, entries: u32) -> io::Result<IoRing<T>> {
        Ok(IoRing {
            sync_files: image.sync_fds().map(SyncFiles::open),
            image,
            ring: IoUring::new(entries.next_power_of_two().max(4))?,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            watching: None,
            readable: false,
            pending: Vec::new(),
            syncing: false,
            waiting_flushes: Vec::new(),
            fixed: FixedBuffers::default(),
            vectored_fixed: false,
        })
    }

    /// Registers `regions` (`(start address, length)`, say guest memory) as the ring's fixed
    /// buffers, replacing those registered before: reads and writes whose buffers lie in one
    /// of them skip the kernel's per-request page pinning. The pages stay pinned (and count
    /// against RLIMIT_MEMLOCK) until [`IoRing::unregister_buffers`] or the ring is dropped.
    ///
    /// # Safety
    /// The regions must stay mapped until then: a new mapping at the same addresses would be
    /// taken for the registered pages, and its requests would move the old pages' data.
    pub unsafe fn register_buffers(&mut self, regions: &[(usize, usize)]) -> io::Result<()> {
        self.unregister_buffers();
        let fixed = FixedBuffers::new(regions);
        if fixed.is_empty() {
            return Ok(());
        }
        let submitter = self.ring.submitter();
        // SAFETY: the caller keeps the regions mapped while they are registered.
        unsafe { submitter.register_buffers(&fixed.iovecs())? };
        let mut probe = Probe::new();
        self.vectored_fixed = submitter.register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        self.fixed = fixed;
        Ok(())
    }

    /// Drops the buffers registered by [`IoRing::register_buffers`] (requests in flight keep
    /// theirs until they complete).
    pub fn unregister_buffers(&mut self) {
        if self.fixed.is_empty() {
            return;
        }
        if let Err(e) = self.ring.submitter().unregister_buffers() {
            tracing::warn!("unregistering io_uring buffers failed: {e}");
        }
        self.fixed = FixedBuffers::default();
    }

    /// Signals `eventfd` whenever completions arrive.
    pub fn register_eventfd(&self, eventfd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(eventfd)
    }

    /// Requests started and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.waiting_flushes.len()
    }

    /// Starts reading (or writing) the guest range at `offset` into (from) the buffers
    /// `iovecs`, whose lengths add up to the range's length.
    ///
    /// # Safety
    /// The memory `iovecs` describes must stay valid, and writable for reads, until this
    /// request is returned by [`IoRing::reap`] or [`IoRing::wait_all`]; `tag` may own it.
    pub unsafe fn start(
        &mut self,
        offset: u64,
        write: bool,
        iovecs: &[libc::iovec],
        tag: T,
    ) -> Start<T> {
        self.start_request(Request {
            tag,
            offset,
            write,
            iovecs: iovecs.to_vec(),
            loads: 0,
        })
    }

    fn start_request(&mut self, req: Request<T>) -> Start<T> {
        let len = req.iovecs.iter().map(|v| v.iov_len as u64).sum();
        match self.image.map_io(req.offset, len, req.write) {
            MapOutcome::Mapped(mapping) => self.start_data(req, mapping),
            MapOutcome::Load(load) if req.loads < MAX_LOADS => self.start_load(req, load),
            MapOutcome::Load(_) | MapOutcome::Declined => Start::Declined(req.tag),
        }
    }

    /// Submits the metadata read `load` needs; the request is mapped again when it is done.
    fn start_load(&mut self, request: Request<T>, load: MetadataLoad) -> Start<T> {
        let Some(fd) = load.storage.raw_fd() else {
            return Start::Declined(request.tag);
        };
        if !self.make_room(1) {
            return Start::Declined(request.tag);
        }
        let mut buf = avec_rt!([LOAD_ALIGN]| 0u8; load.len);
        let index = self.free_slot();
        let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
            .offset(load.offset)
            .build()
            .user_data((index as u64) << PIECE_BITS);
        // SAFETY: the buffer and the storage (which keeps `fd` open) live in `slots[index]`
        // until the completion is reaped; `make_room` guaranteed the space. Moving the AVec
        // into the slot does not move its heap buffer.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        debug_assert!(pushed, "room was made");
        self.slots[index] = Some(Slot::Metadata(Loading { request, load, buf }));
        self.queued();
        Start::Queued
    }

    /// Moves the data of a mapped request.
    fn start_data(&mut self, req: Request<T>, mapping: IoMapping) -> Start<T> {
        let Some(fd) = mapping.storage.raw_fd() else {
            return self.decline(req.tag, mapping);
        };
        for &(host, len) in &mapping.zero_first {
            // New clusters the write covers partly: the rest must read as zeros. A quick
            // file system operation, done here before the data goes out.
            if mapping.storage.zero_range(host, len).is_err() {
                return self.decline(req.tag, mapping);
            }
        }
        let write = req.write;
        // (host offset, buffers) of each extent with data; zero extents are filled here.
        let data: Vec<(u64, Vec<libc::iovec>)> = match mapping.extents[..] {
            // The common case: the request's buffers as they are.
            [Extent::Data { host, .. }] => vec![(host, req.iovecs)],
            _ => mapping
                .extents
                .iter()
                .zip(split(&req.iovecs, &mapping.extents))
                .filter_map(|(e, piece)| match *e {
                    Extent::Data { host, .. } => Some((host, piece)),
                    Extent::Zero { .. } => {
                        // SAFETY: the caller promised these buffers are writable for a read.
                        unsafe { fill_zero(&piece) };
                        None
                    }
                })
                .collect(),
        };
        if data.is_empty() {
            return self.finish_now(req.tag, mapping, true);
        }
        if write && !mapping.storage.is_direct() {
            // Buffered writes are memory copies into the page cache: io_uring would hand
            // them to a kernel worker thread, which costs more than doing them here.
            let written = data.iter().all(|(host, vecs)| {
                // SAFETY: the caller keeps the buffers valid; pwritev only reads them.
                unsafe { pwritev_all(fd, vecs, *host) }
            });
            // On failure the slow path redoes the write and reports the error.
            return self.finish_now(req.tag, mapping, written);
        }
        if data.iter().any(|(_, v)| v.len() > MAX_IOVECS)
            || data.len() >= 1 << PIECE_BITS
            || !self.make_room(data.len())
        {
            return self.decline(req.tag, mapping);
        }
        let index = self.free_slot();
        for (piece, (host, vecs)) in data.iter().enumerate() {
            let entry = self
                .data_entry(fd, write, *host, vecs)
                .user_data(((index as u64) << PIECE_BITS) | piece as u64);
            // SAFETY: the iovec arrays and the mapping (which keeps `fd` open) live in
            // `slots[index]` until every piece's completion is reaped; the caller keeps the
            // buffers valid. `make_room` guaranteed the space.
            let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
            debug_assert!(pushed, "room was made for every piece");
        }
        self.slots[index] = Some(Slot::Data(InFlight {
            tag: req.tag,
            mapping,
            remaining: data.len(),
            pieces: data
                .into_iter()
                .map(|(_, iovecs)| Piece {
                    len: iovecs.iter().map(|v| v.iov_len as u64).sum(),
                    _iovecs: iovecs,
                })
                .collect(),
            ok: true,
        }));
        self.queued();
        Start::Queued
    }

    /// The entry moving `vecs` to or from `offset` of `fd`: from fixed buffers when one holds
    /// them all.
    fn data_entry(
        &self,
        fd: RawFd,
        write: bool,
        offset: u64,
        vecs: &[libc::iovec],
    ) -> squeue::Entry {
        let fd = types::Fd(fd);
        let (ptr, n) = (vecs.as_ptr(), vecs.len() as u32);
        match self.fixed.holding(vecs) {
            Some(index) if vecs.len() == 1 => {
                // A registered buffer is at most 1 GiB, so the length fits.
                let (buf, len) = (vecs[0].iov_base.cast::<u8>(), vecs[0].iov_len as u32);
                if write {
                    opcode::WriteFixed::new(fd, buf, len, index)
                        .offset(offset)
                        .build()
                } else {
                    opcode::ReadFixed::new(fd, buf, len, index)
                        .offset(offset)
                        .build()
                }
            }
            Some(index) if self.vectored_fixed => {
                if write {
                    opcode::WritevFixed::new(fd, ptr, n, index)
                        .offset(offset)
                        .build()
                } else {
                    opcode::ReadvFixed::new(fd, ptr, n, index)
                        .offset(offset)
                        .build()
                }
            }
            _ if write => opcode::Writev::new(fd, ptr, n).offset(offset).build(),
            _ => opcode::Readv::new(fd, ptr, n).offset(offset).build(),
        }
    }

    /// Starts a flush of every write completed so far: the image writes its metadata back
    /// here ([`Image::prepare_flush`]), and its files are synced (`fdatasync`) through the
    /// ring, each through a file description of the ring's own, so the
    /// thread does not wait for the disk. Like QEMU, one sync at a time: a
    /// flush that comes while one is in flight waits for it, and the next sync serves every
    /// flush that waited (each covers the writes completed before it came, and all of those
    /// completed before that sync starts). Declined when the image cannot split its flush,
    /// when writing back fails (the slow path reports the error) or when the ring is full.
    pub fn start_flush(&mut self, tag: T) -> Start<T> {
        if self.syncing {
            self.waiting_flushes.push(tag);
            return Start::Queued;
        }
        match self.start_sync(vec![tag]) {
            SyncStart::Submitted => Start::Queued,
            SyncStart::Done(mut tags) => Start::Done(tags.pop().expect("one flush")),
            SyncStart::Declined(mut tags) => Start::Declined(tags.pop().expect("one flush")),
        }
    }

    /// Writes metadata back and submits the sync serving the flushes `tags`.
    fn start_sync(&mut self, tags: Vec<T>) -> SyncStart<T> {
        let Some(files) = &self.sync_files else {
            return SyncStart::Declined(tags);
        };
        if self.image.prepare_flush().is_err() {
            return SyncStart::Declined(tags);
        }
        let fds = files.fds.clone();
        if fds.is_empty() {
            return SyncStart::Done(tags);
        }
        if fds.len() >= 1 << PIECE_BITS || !self.make_room(fds.len()) {
            return SyncStart::Declined(tags);
        }
        let index = self.free_slot();
        for (piece, &fd) in fds.iter().enumerate() {
            let entry = opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(((index as u64) << PIECE_BITS) | piece as u64);
            // SAFETY: `self` keeps the files open (its own descriptions, and the image)
            // until the completions are reaped; `make_room` guaranteed the space.
            let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
            debug_assert!(pushed, "room was made for every file");
        }
        self.slots[index] = Some(Slot::Sync(Syncing {
            tags,
            remaining: fds.len(),
            ok: true,
        }));
        self.syncing = true;
        self.queued();
        SyncStart::Submitted
    }

    /// Gives a mapping back unused (releasing what it allocated) and declines the request.
    fn decline(&self, tag: T, mapping: IoMapping) -> Start<T> {
        self.finish_now(tag, mapping, false)
    }

    /// Hands back the mapping of a request whose I/O is over without the ring: done if it
    /// moved every byte and its clusters are mapped, declined otherwise.
    fn finish_now(&self, tag: T, mapping: IoMapping, ok: bool) -> Start<T> {
        if self.image.finish_io(mapping, ok) {
            Start::Done(tag)
        } else {
            Start::Declined(tag)
        }
    }

    /// A free slot index (the slot itself is empty).
    fn free_slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    /// Whether `pieces` more entries fit in the submission queue, submitting to make room.
    fn make_room(&mut self, pieces: usize) -> bool {
        let room = |ring: &mut IoUring| {
            let sq = ring.submission();
            sq.capacity() - sq.len() >= pieces
        };
        if room(&mut self.ring) {
            return true;
        }
        self.ring.submit().is_ok() && room(&mut self.ring)
    }

    /// Hands queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Counts an entry just queued; submits once [`SUBMIT_EVERY`] are waiting.
    fn queued(&mut self) {
        self.unsubmitted += 1;
        if self.unsubmitted >= SUBMIT_EVERY {
            if let Err(e) = self.submit() {
                // The entries stay queued; the next submit retries them.
                tracing::warn!("io_uring submit failed: {e}");
            }
        }
    }

    /// Whether completions are waiting to be reaped (checked without a system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Collects finished requests without waiting. Requests whose metadata arrived are
    /// mapped again and submitted.
    pub fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        self.reap_completions(out);
        if let Err(e) = self.submit() {
            // The entries stay queued; the next submit retries them.
            tracing::warn!("io_uring submit failed: {e}");
        }
    }

    fn reap_completions(&mut self, out: &mut Vec<Completion<T>>) {
        out.append(&mut self.pending);
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in cqes {
            if user_data == WATCH {
                self.watching = None;
                self.readable |= result >= 0;
                continue;
            }
            if user_data == CANCEL {
                continue;
            }
            let index = (user_data >> PIECE_BITS) as usize;
            let piece = (user_data & ((1 << PIECE_BITS) - 1)) as usize;
            match self.slots.get_mut(index) {
                Some(Some(Slot::Data(f))) => {
                    let expected = f.pieces.get(piece).map_or(u64::MAX, |p| p.len);
                    f.ok &= u64::try_from(result).ok() == Some(expected);
                    f.remaining -= 1;
                    if f.remaining == 0 {
                        let Some(Slot::Data(f)) = self.slots[index].take() else {
                            unreachable!("matched above");
                        };
                        self.free.push(index);
                        let ok = self.image.finish_io(f.mapping, f.ok);
                        out.push(Completion { tag: f.tag, ok });
                    }
                }
                Some(Some(Slot::Sync(s))) => {
                    if result < 0 {
                        let e = io::Error::from_raw_os_error(-result);
                        tracing::error!("syncing the image failed: {e}");
                    }
                    s.ok &= result == 0;
                    s.remaining -= 1;
                    if s.remaining == 0 {
                        let Some(Slot::Sync(s)) = self.slots[index].take() else {
                            unreachable!("matched above");
                        };
                        self.free.push(index);
                        self.syncing = false;
                        if !s.ok {
                            // Every later flush fails too: the next sync could succeed
                            // without the data this one lost.
                            self.image.sync_failed();
                        }
                        out.extend(s.tags.into_iter().map(|tag| Completion { tag, ok: s.ok }));
                        let waiting = std::mem::take(&mut self.waiting_flushes);
                        if !waiting.is_empty() {
                            let (tags, ok) = match self.start_sync(waiting) {
                                SyncStart::Submitted => (Vec::new(), true),
                                SyncStart::Done(tags) => (tags, true),
                                // The slow path redoes them and reports any error.
                                SyncStart::Declined(tags) => (tags, false),
                            };
                            out.extend(tags.into_iter().map(|tag| Completion { tag, ok }));
                        }
                    }
                }
                Some(Some(Slot::Metadata(_))) => {
                    let Some(Slot::Metadata(l)) = self.slots[index].take() else {
                        unreachable!("matched above");
                    };
                    self.free.push(index);
                    if usize::try_from(result).ok() == Some(l.load.len) {
                        self.image.install_metadata(&l.load, &l.buf);
                    }
                    let mut request = l.request;
                    request.loads += 1;
                    match self.start_request(request) {
                        Start::Queued => {}
                        Start::Done(tag) => out.push(Completion { tag, ok: true }),
                        Start::Declined(tag) => out.push(Completion { tag, ok: false }),
                    }
                }
                _ => {}
            }
        }
    }

    /// Waits until at least one request finishes (if any is in flight) and collects what
    /// finished.
    pub fn wait_one(&mut self, out: &mut Vec<Completion<T>>) -> io::Result<()> {
        let before = out.len();
        while self.in_flight() > 0 && out.len() == before {
            self.submit_and_wait_one()?;
            self.reap(out);
        }
        Ok(())
    }

    /// Submits what is queued and sleeps until at least one completion is posted (an
    /// interrupted wait counts as done).
    fn submit_and_wait_one(&mut self) -> io::Result<()> {
        self.unsubmitted = 0;
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keeps a poll for readability of `fd` (say, a queue's kick eventfd) in the ring, so
    /// that the thread's waits in the ring ([`IoRing::wait_any`]) also end when `fd` becomes
    /// readable; [`IoRing::take_readable`] tells whether it did. Nothing is read from `fd`.
    /// Does nothing when the poll is armed already; it is queued for the next submit
    /// otherwise.
    pub fn watch_readable(&mut self, fd: RawFd) {
        if self.watching == Some(fd) {
            return;
        }
        // Another descriptor (a new connection's kick): stop polling the old one.
        self.unwatch();
        if !self.make_room(1) {
            return;
        }
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(WATCH);
        // SAFETY: a poll entry refers to no memory.
        let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        debug_assert!(pushed, "room was made");
        self.watching = Some(fd);
        self.queued();
    }

    /// Whether the poll armed by [`IoRing::watch_readable`] fired since the last call (its
    /// completion was reaped); it is then no longer armed.
    pub fn take_readable(&mut self) -> bool {
        std::mem::take(&mut self.readable)
    }

    /// Cancels the poll armed by [`IoRing::watch_readable`].
    pub fn unwatch(&mut self) {
        if self.watching.is_none() {
            return;
        }
        let cancel = opcode::AsyncCancel::new(WATCH).build().user_data(CANCEL);
        // SAFETY: a cancel entry refers to no memory.
        if !self.make_room(1) || unsafe { self.ring.submission().push(&cancel).is_err() } {
            return;
        }
        let mut out = Vec::new();
        while self.watching.is_some() {
            if let Err(e) = self.submit_and_wait_one() {
                tracing::warn!("cancelling a poll failed: {e}");
                return;
            }
            self.reap_completions(&mut out);
        }
        self.pending.extend(out);
    }

    /// Sleeps until anything completes (a request, or the watched descriptor's poll) unless
    /// something has already, and collects the finished requests. One system call, which
    /// also submits.
    pub fn wait_any(&mut self, out: &mut Vec<Completion<T>>) -> io::Result<()> {
        if self.ring.completion().is_empty() && self.pending.is_empty() {
            self.submit_and_wait_one()?;
        }
        self.reap(out);
        Ok(())
    }

    /// Turns notifications through the eventfd given to [`IoRing::register_eventfd`] on or
    /// off (a flag in shared memory, no system call). A thread that waits in the ring itself
    /// turns them off meanwhile; after turning them back on it must look for completions
    /// once more ([`IoRing::has_completions`]): those that arrived while they were off
    /// signalled nothing.
    pub fn set_eventfd_notifications(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// Waits until every request has finished and collects them.
    pub fn wait_all(&mut self, out: &mut Vec<Completion<T>>) -> io::Result<()> {
        while self.in_flight() > 0 {
            self.wait_one(out)?;
        }
        Ok(())
    }
}

/// Cuts `iovecs` into one list per extent, at the extents' boundaries.
fn split(iovecs: &[libc::iovec], extents: &[Extent]) -> Vec<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(extents.len());
    let mut vecs = iovecs.iter().copied().filter(|v| v.iov_len > 0);
    let mut current: Option<libc::iovec> = None;
    for e in extents {
        let mut need = e.len() as usize;
        let mut piece = Vec::new();
        while need > 0 {
            let Some(v) = current.take().or_else(|| vecs.next()) else {
                break;
            };
            let take = v.iov_len.min(need);
            piece.push(libc::iovec {
                iov_base: v.iov_base,
                iov_len: take,
            });
            if take < v.iov_len {
                current = Some(libc::iovec {
                    // SAFETY: `take < iov_len`, so the pointer stays inside the buffer.
                    iov_base: unsafe { v.iov_base.cast::<u8>().add(take) }.cast(),
                    iov_len: v.iov_len - take,
                });
            }
            need -= take;
        }
        out.push(piece);
    }
    out
}

/// Writes every byte of `iovecs` at `offset` of `fd`; false on an error or a short write.
///
/// # Safety
/// Every iovec must describe readable memory.
unsafe fn pwritev_all(fd: RawFd, iovecs: &[libc::iovec], offset: u64) -> bool {
    let expected: usize = iovecs.iter().map(|v| v.iov_len).sum();
    loop {
        // SAFETY: the caller guarantees the buffers; the count is at most MAX_IOVECS.
        let n = unsafe {
            libc::pwritev(
                fd,
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n >= 0 {
            return n as usize == expected;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Zeroes the buffers.
///
/// # Safety
/// Every iovec must describe writable memory.
unsafe fn fill_zero(iovecs: &[libc::iovec]) {
    for v in iovecs {
        // SAFETY: the caller guarantees the buffer is writable for `iov_len` bytes.
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_images::{create_open, open};
    use crate::Qcow2;

    fn iovec(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// Runs one request through the ring; returns whether it was served there.
    fn run(ring: &mut IoRing<u32>, offset: u64, write: bool, bufs: &mut [&mut [u8]]) -> bool {
        let iovecs: Vec<_> = bufs.iter_mut().map(|b| iovec(b)).collect();
        // SAFETY: the buffers outlive the wait in `served`.
        let start = unsafe { ring.start(offset, write, &iovecs, 7) };
        served(ring, start, 7)
    }

    /// Runs a flush through the ring; returns whether it was served there.
    fn flush(ring: &mut IoRing<u32>) -> bool {
        let start = ring.start_flush(9);
        served(ring, start, 9)
    }

    /// Waits for the request `start` reports on (tagged `tag`); whether the ring served it.
    fn served(ring: &mut IoRing<u32>, start: Start<u32>, tag: u32) -> bool {
        match start {
            Start::Declined(_) => false,
            Start::Done(t) => {
                assert_eq!(t, tag);
                true
            }
            Start::Queued => {
                ring.submit().unwrap();
                let mut done = Vec::new();
                ring.wait_all(&mut done).unwrap();
                assert_eq!(done.len(), 1);
                assert_eq!(done[0].tag, tag);
                done[0].ok
            }
        }
    }

    fn mapped(outcome: MapOutcome) -> Option<IoMapping> {
        match outcome {
            MapOutcome::Mapped(m) => Some(m),
            _ => None,
        }
    }

    #[test]
    fn registered_memory_goes_through_fixed_buffer_operations() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = create_open(dir.path(), "f.qcow2", 1 << 20, 4096);
        img.write_at(&[0x5a; 16384], 0).unwrap();
        let mut ring = IoRing::<u32>::new(Arc::new(img), 8).unwrap();
        let mut memory = vec![0u8; 65536];
        let region = (memory.as_ptr() as usize, memory.len());
        // SAFETY: `memory` outlives the ring's use of it (unregistered below).
        unsafe { ring.register_buffers(&[region]).unwrap() };
        let opcode = |ring: &IoRing<u32>, vecs: &[libc::iovec]| {
            u8::try_from(ring.data_entry(0, false, 0, vecs).get_opcode()).unwrap()
        };
        let (head, tail) = memory.split_at_mut(8192);
        let (a, b) = (iovec(&mut head[..4096]), iovec(&mut tail[..4096]));
        let mut outside = [0u8; 512];
        assert_eq!(opcode(&ring, &[a]), opcode::ReadFixed::CODE);
        // Two registered pieces: one vectored fixed read where the kernel has it (Linux 6.15),
        // a plain vectored read before.
        let vectored = if ring.vectored_fixed {
            opcode::ReadvFixed::CODE
        } else {
            eprintln!("this kernel has no vectored fixed reads: checking the fallback to Readv");
            opcode::Readv::CODE
        };
        assert_eq!(opcode(&ring, &[a, b]), vectored);
        assert_eq!(
            opcode(&ring, &[a, iovec(&mut outside)]),
            opcode::Readv::CODE
        );

        // The kernel takes them: a fixed read, a vectored one, a fixed write read back.
        assert!(run(&mut ring, 0, false, &mut [&mut head[..4096]]));
        assert!(run(
            &mut ring,
            4096,
            false,
            &mut [&mut head[4096..], &mut tail[..4096]]
        ));
        assert!(head.iter().chain(&tail[..4096]).all(|&x| x == 0x5a));
        tail[4096..8192].fill(0xc3);
        assert!(run(&mut ring, 8192, true, &mut [&mut tail[4096..8192]]));
        let mut back = [0u8; 4096];
        assert!(run(&mut ring, 8192, false, &mut [&mut back]));
        assert_eq!(back, [0xc3; 4096]);

        ring.unregister_buffers();
        assert_eq!(
            opcode(&ring, &[iovec(&mut memory[..512])]),
            opcode::Readv::CODE
        );
    }

    #[test]
    fn queued_requests_go_to_the_kernel_in_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = create_open(dir.path(), "g.qcow2", 1 << 20, 4096);
        img.write_at(&[0xaa; 4096 * SUBMIT_EVERY], 0).unwrap();
        let mut ring = IoRing::new(Arc::new(img), 16).unwrap();
        let mut bufs = vec![[0u8; 4096]; SUBMIT_EVERY];
        let mut queue = |ring: &mut IoRing<u32>, i: usize| {
            let iov = [iovec(&mut bufs[i])];
            // SAFETY: the buffers outlive the waits below.
            let started = unsafe { ring.start(4096 * i as u64, false, &iov, i as u32) };
            assert!(matches!(started, Start::Queued));
        };
        for i in 0..SUBMIT_EVERY - 1 {
            queue(&mut ring, i);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!ring.has_completions(), "a short batch waits for submit");
        // The last request of a group hands the whole group over, no submit call needed.
        queue(&mut ring, SUBMIT_EVERY - 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut done = Vec::new();
        while done.len() < SUBMIT_EVERY && std::time::Instant::now() < deadline {
            if ring.has_completions() {
                ring.reap_completions(&mut done);
            }
        }
        assert_eq!(done.len(), SUBMIT_EVERY, "the group reached the kernel");
        assert!(done.iter().all(|c| c.ok));
        drop(ring);
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0xaa)));
    }

    #[test]
    fn reads_and_in_place_writes_go_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let cs = 4096u64;
        let (_, img) = create_open(dir.path(), "a.qcow2", 1 << 20, cs);
        let img = Arc::new(img);
        // Clusters 1-2 data, 3 zero, 4.. unallocated.
        img.write_at(&[0xaa; 8192], cs).unwrap();
        img.write_zeroes(3 * cs, cs, false).unwrap();
        let mut ring = IoRing::new(img.clone(), 8).unwrap();

        // A read across data, zero and unallocated clusters, split over odd buffers.
        let mut a = vec![0x55u8; 1000];
        let mut b = vec![0x55u8; 5 * cs as usize - 1000 - 512];
        assert!(run(&mut ring, cs + 512, false, &mut [&mut a, &mut b]));
        let mut expect = vec![0u8; 5 * cs as usize - 512];
        img.read_at(&mut expect, cs + 512).unwrap();
        assert_eq!([a, b].concat(), expect);
        assert!(expect[..8192 - 512].iter().all(|&x| x == 0xaa));

        // In place: allowed; the bytes land in the cluster.
        let mut w = vec![0x11u8; 3000];
        assert!(run(&mut ring, cs + 100, true, &mut [&mut w]));
        let mut back = vec![0u8; 3000];
        img.read_at(&mut back, cs + 100).unwrap();
        assert_eq!(back, w);

        // Writes that allocate clusters reading as zeros (unallocated, zero) go through the
        // ring too; the rest of a partly written new cluster reads as zeros.
        let mut w2 = vec![0x22u8; 5000];
        assert!(run(&mut ring, 4 * cs + 100, true, &mut [&mut w2]));
        assert!(run(&mut ring, 3 * cs, true, &mut [&mut w]));
        assert_eq!(ring.in_flight(), 0);
        let mut back = vec![0xffu8; 3 * cs as usize];
        img.read_at(&mut back, 3 * cs).unwrap();
        let mut expect = vec![0u8; 3 * cs as usize];
        expect[..3000].fill(0x11);
        expect[cs as usize + 100..cs as usize + 5100].fill(0x22);
        assert!(
            back == expect,
            "allocated clusters hold the data and zeros elsewhere"
        );
        img.flush().unwrap();
        let report = crate::check(&img).unwrap();
        assert!(report.is_clean() && report.leaks == 0, "{report:?}");
    }

    #[test]
    fn a_flush_writes_metadata_back_and_syncs_the_files_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let cs = 4096u64;
        let (path, img) = create_open(dir.path(), "flush.qcow2", 1 << 20, cs);
        let img = Arc::new(img);
        let mut ring = IoRing::new(img.clone(), 8).unwrap();
        // An allocating write: its L2 entry is set in the cache when the data is written.
        let mut w = vec![0x77u8; cs as usize];
        assert!(run(&mut ring, 5 * cs, true, &mut [&mut w]));
        let mut back = vec![0u8; cs as usize];
        open(&path).read_at(&mut back, 5 * cs).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "the mapping is not in the file before the flush"
        );
        assert!(flush(&mut ring), "the flush went through the ring");
        let fresh = open(&path);
        fresh.read_at(&mut back, 5 * cs).unwrap();
        assert_eq!(back, w, "the flush wrote the mapping back");
        let report = crate::check(&fresh).unwrap();
        assert!(report.is_clean() && report.leaks == 0, "{report:?}");

        // A raw file: one fdatasync through the ring.
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let raw = crate::RawImage::new(Arc::new(crate::FileStorage::new(f)), false).unwrap();
        let mut ring = IoRing::<u32>::new(Arc::new(raw), 8).unwrap();
        assert!(matches!(ring.start_flush(9), Start::Queued));
        let mut done = Vec::new();
        ring.wait_all(&mut done).unwrap();
        assert!(done.len() == 1 && done[0].ok, "synced through the ring");

        // Storage without a file descriptor cannot be synced by the ring: declined.
        let mem =
            crate::RawImage::new(Arc::new(crate::MemStorage::new(&[0; 4096])), false).unwrap();
        let mut ring = IoRing::<u32>::new(Arc::new(mem), 8).unwrap();
        assert!(matches!(ring.start_flush(9), Start::Declined(9)));
    }

    #[test]
    fn flushes_that_come_during_a_sync_wait_for_the_next_one() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let raw = crate::RawImage::new(Arc::new(crate::FileStorage::new(f)), false).unwrap();
        let mut ring = IoRing::<u32>::new(Arc::new(raw), 8).unwrap();
        for tag in 1..=3 {
            assert!(matches!(ring.start_flush(tag), Start::Queued));
        }
        assert_eq!(ring.in_flight(), 3);
        assert_eq!(
            (
                ring.slots.len() - ring.free.len(),
                ring.waiting_flushes.len()
            ),
            (1, 2),
            "one sync in the ring; the other two flushes wait for the next"
        );
        let mut done = Vec::new();
        ring.wait_all(&mut done).unwrap();
        let mut tags: Vec<u32> = done.iter().filter(|c| c.ok).map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags, [1, 2, 3]);
        assert_eq!(ring.in_flight(), 0);
        // After the last sync, a new flush starts one of its own.
        assert!(flush(&mut ring));
    }

    #[test]
    fn cold_l2_slices_are_read_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (path, img) = create_open(dir.path(), "cold.qcow2", 64 << 20, 65536);
        img.write_at(&[0x5a; 8192], 40 << 20).unwrap();
        drop(img);
        let img: Arc<Qcow2> = Arc::new(open(&path));
        assert!(
            matches!(img.map_io(40 << 20, 4096, false), MapOutcome::Load(_)),
            "a fresh handle has no L2 slice cached"
        );
        let mut ring = IoRing::new(img.clone(), 8).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(run(&mut ring, (40 << 20) + 4096, false, &mut [&mut buf]));
        assert!(buf.iter().all(|&b| b == 0x5a));
        assert!(
            mapped(img.map_io(40 << 20, 4096, false)).is_some(),
            "now cached"
        );
    }

    #[test]
    fn a_slice_read_before_a_writeback_is_not_cached() {
        // 4 KiB clusters: one 512-entry slice per 2 MiB table; the smallest cache holds 4.
        let dir = tempfile::tempdir().unwrap();
        let (path, img) = create_open(dir.path(), "stale.qcow2", 32 << 20, 4096);
        for table in 0..8u64 {
            img.write_at(&[1; 512], table << 21).unwrap();
        }
        drop(img);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let opts = crate::OpenOptions {
            l2_cache_bytes: Some(1),
            ..Default::default()
        };
        let storage = Arc::new(crate::FileStorage::new(file));
        let img = Qcow2::open_storage(storage, &opts, None).unwrap();
        let MapOutcome::Load(load) = img.map_io(0, 512, false) else {
            panic!("expected a load");
        };
        let mut old = vec![0u8; load.len];
        load.storage.read_at(&mut old, load.offset).unwrap();
        // While the "ring's" read is in flight, the slice changes, is written back and
        // evicted (reads of the other tables fill the cache).
        img.write_at(&[2; 512], 1 << 20).unwrap();
        img.flush().unwrap();
        let mut back = [0u8; 512];
        for table in 1..8u64 {
            img.read_at(&mut back, table << 21).unwrap();
        }
        img.install_metadata(&load, &old);
        img.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [2; 512], "the stale slice must not be served");
    }

    #[test]
    fn write_mappings_hold_off_overlapping_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = create_open(dir.path(), "b.qcow2", 1 << 20, 4096);
        img.write_at(&[1; 4096], 0).unwrap();
        let mapping = mapped(img.map_io(0, 4096, true)).expect("in place");
        // While the write is "in flight", a second in-place mapping of it is refused.
        assert!(mapped(img.map_io(0, 512, true)).is_none());
        assert!(
            mapped(img.map_io(0, 512, false)).is_some(),
            "reads are not held off"
        );
        drop(mapping);
        assert!(mapped(img.map_io(0, 512, true)).is_some());
    }

    /// An eventfd's counter, read without blocking (None when it is zero).
    fn eventfd_count(fd: RawFd) -> Option<u64> {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`.
        let n = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
        (n == 8).then_some(v)
    }

    /// Adds 1 to an eventfd's counter.
    fn signal(fd: RawFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local.
        assert_eq!(unsafe { libc::write(fd, (&raw const one).cast(), 8) }, 8);
    }

    #[test]
    fn a_watched_descriptor_ends_a_wait_in_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = create_open(dir.path(), "w.qcow2", 1 << 20, 4096);
        img.write_at(&[0xaa; 4096], 0).unwrap();
        let mut ring: IoRing<u32> = IoRing::new(Arc::new(img), 8).unwrap();
        // SAFETY: plain eventfd creation; closed below.
        let kick = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        let notify = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(kick >= 0 && notify >= 0);
        ring.register_eventfd(notify).unwrap();

        // A request in flight: the wait collects it; the kick's poll has not fired.
        let mut buf = vec![0u8; 4096];
        let iov = [iovec(&mut buf)];
        // SAFETY: `buf` outlives the waits below.
        assert!(matches!(
            unsafe { ring.start(0, false, &iov, 1) },
            Start::Queued
        ));
        ring.set_eventfd_notifications(false);
        ring.watch_readable(kick);
        let mut done = Vec::new();
        while done.is_empty() {
            ring.wait_any(&mut done).unwrap();
        }
        assert!(done[0].ok && buf.iter().all(|&b| b == 0xaa));
        assert!(!ring.take_readable());

        // Nothing in flight: a kick from another thread ends the wait, and stays in the
        // eventfd for its owner to read.
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            signal(kick);
        });
        let t = std::time::Instant::now();
        while !ring.take_readable() {
            ring.wait_any(&mut done).unwrap();
        }
        assert!(t.elapsed() >= std::time::Duration::from_millis(40));
        kicker.join().unwrap();
        assert_eq!(
            eventfd_count(kick),
            Some(1),
            "the kick was left in the eventfd"
        );
        assert_eq!(
            eventfd_count(notify),
            None,
            "notifications were off while the thread waited in the ring"
        );

        // Armed again with notifications on: the next kick signals the ring's eventfd (the
        // epoll loop's wake-up).
        ring.watch_readable(kick);
        ring.submit().unwrap();
        ring.set_eventfd_notifications(true);
        signal(kick);
        let t = std::time::Instant::now();
        while eventfd_count(notify).is_none() {
            assert!(t.elapsed().as_secs() < 5, "no notification for the kick");
            std::thread::yield_now();
        }
        ring.reap(&mut done);
        assert!(ring.take_readable());

        // After unwatching, a kick completes nothing in the ring.
        assert_eq!(eventfd_count(kick), Some(1));
        ring.watch_readable(kick);
        ring.submit().unwrap();
        ring.unwatch();
        ring.take_readable();
        signal(kick);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!ring.has_completions());
        // SAFETY: both descriptors are ours.
        unsafe {
            libc::close(kick);
            libc::close(notify);
        }
    }

    #[test]
    fn split_cuts_buffers_at_extent_boundaries() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 6];
        let pieces = split(
            &[iovec(&mut a), iovec(&mut b)],
            &[
                Extent::Zero { len: 4 },
                Extent::Data { host: 0, len: 8 },
                Extent::Zero { len: 4 },
            ],
        );
        let lens: Vec<Vec<usize>> = pieces
            .iter()
            .map(|p| p.iter().map(|v| v.iov_len).collect())
            .collect();
        assert_eq!(lens, vec![vec![4], vec![6, 2], vec![4]]);
        assert_eq!(pieces[2][0].iov_base, b[2..].as_ptr() as *mut _);
    }
}
