//! Zero-copy I/O: one io_uring per queue. Reads and writes the image can map without
//! metadata work (raw images; allocated qcow2 clusters, zero and unallocated ones for reads)
//! go straight between the image file and guest memory through the qcow2 crate's
//! [`IoRing`], submitted without waiting. While requests are at the disk the queue's worker
//! sleeps in the ring itself, which also polls the queue's kick eventfd; otherwise it sleeps
//! in its epoll loop, which the ring's eventfd wakes for completions.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use qcow2::uring::{Completion, IoRing, Start};
use qcow2::Image;
use vm_memory::{
    GuestMemory, GuestMemoryLoadGuard, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    Permissions,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::guest;
use crate::request::{Request, RequestKind};

/// Guest memory as a request in flight holds it: the mapping stays alive until completion.
pub type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// A request the kernel is working on: its buffers live in `mem`.
struct InFlight {
    req: Request,
    mem: MemGuard,
}

/// A finished request.
pub struct Finished {
    /// The request.
    pub req: Request,
    /// The guest memory it used.
    pub mem: MemGuard,
    /// Whether every byte moved; otherwise the request is redone through the bounce buffer,
    /// which reports the error precisely.
    pub ok: bool,
}

impl From<Completion<InFlight>> for Finished {
    fn from(c: Completion<InFlight>) -> Self {
        Finished {
            req: c.tag.req,
            mem: c.tag.mem,
            ok: c.ok,
        }
    }
}

/// What [`QueueRing::start`] reports for what the ring did with a request.
fn outcome(start: Start<InFlight>) -> Result<Option<Finished>, Request> {
    match start {
        Start::Queued => Ok(None),
        Start::Done(tag) => Ok(Some(Finished {
            req: tag.req,
            mem: tag.mem,
            ok: true,
        })),
        Start::Declined(tag) => Err(tag.req),
    }
}

/// Tries of [`QueueRing::wait_all`], a millisecond apart.
const WAIT_ALL_ATTEMPTS: u32 = 10_000;

/// One queue's ring.
pub struct QueueRing {
    ring: IoRing<InFlight>,
    eventfd: EventFd,
    /// Register guest memory with the ring (`--pin-memory`).
    pin_memory: bool,
    /// The guest memory snapshot registered (or tried); holding it keeps its mappings alive.
    registered: Option<MemGuard>,
}

impl QueueRing {
    /// A ring for I/O on `image` with room for `entries` requests (at least the queue size).
    pub fn new(image: Arc<dyn Image>, entries: u32) -> io::Result<QueueRing> {
        let ring = IoRing::new(image, entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.register_eventfd(eventfd.as_raw_fd())?;
        Ok(QueueRing {
            ring,
            eventfd,
            pin_memory: false,
            registered: None,
        })
    }

    /// The eventfd that becomes readable when completions are ready.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Whether to register guest memory with the ring (`--pin-memory`): its pages are then
    /// pinned once per connection instead of once per request.
    pub fn set_pin_memory(&mut self, on: bool) {
        self.pin_memory = on;
        if !on {
            self.unpin_memory();
        }
    }

    /// Registers `mem` with the ring unless it is the snapshot registered already.
    fn pin(&mut self, mem: &MemGuard) {
        if let Some(registered) = &self.registered {
            if std::ptr::eq::<GuestMemoryMmap>(&**registered, &**mem) {
                return;
            }
        }
        let regions: Vec<(usize, usize)> = vm_memory::GuestMemoryBackend::iter(&**mem)
            .filter_map(|r| {
                let start = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((start as usize, usize::try_from(r.len()).ok()?))
            })
            .collect();
        // SAFETY: `registered` keeps this snapshot, and so its mappings, alive until the next
        // registration or `unpin_memory`.
        match unsafe { self.ring.register_buffers(&regions) } {
            Ok(()) => tracing::debug!(
                "pinned {} MiB of guest memory for io_uring",
                regions.iter().map(|r| r.1).sum::<usize>() >> 20
            ),
            Err(e) => tracing::warn!(
                "cannot pin guest memory for io_uring ({e}); requests pin their pages one by \
                 one (raise RLIMIT_MEMLOCK or drop --pin-memory)"
            ),
        }
        self.registered = Some(mem.clone());
    }

    /// Unpins the guest memory registered for the ring (the connection is going away).
    pub fn unpin_memory(&mut self) {
        self.ring.unregister_buffers();
        self.registered = None;
    }

    /// Whether `req` can go through the ring (a non-empty read or write, or a flush).
    pub fn eligible(req: &Request) -> bool {
        match req.kind {
            RequestKind::In | RequestKind::Out => !req.data.is_empty(),
            RequestKind::Flush => true,
            _ => false,
        }
    }

    /// Starts `req`: `Ok(None)` when queued, `Ok(Some(..))` when it completed at
    /// once (reads of zeros). Gives it back when it cannot be done that way (buffers that
    /// do not map to host memory, ranges needing metadata work, a full ring); the caller
    /// then runs it through the bounce buffer, which reports any error properly.
    pub fn start(&mut self, mem: &MemGuard, req: Request) -> Result<Option<Finished>, Request> {
        let write = match req.kind {
            RequestKind::Out => true,
            RequestKind::In => false,
            RequestKind::Flush => return self.start_flush(mem, req),
            _ => return Err(req),
        };
        if self.pin_memory {
            self.pin(mem);
        }
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iovecs = Vec::with_capacity(req.data.len());
        for seg in &req.data {
            if let Some(slice) = guest::one_slice(&**mem, seg.addr, seg.len as usize) {
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                continue;
            }
            let Ok(slices) = mem.get_slices(seg.addr, seg.len as usize, access) else {
                return Err(req);
            };
            for slice in slices {
                let Ok(slice) = slice else {
                    return Err(req);
                };
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        let offset = req.offset();
        let tag = InFlight {
            req,
            mem: mem.clone(),
        };
        // SAFETY: the iovecs point into guest memory that `tag.mem` keeps mapped until the
        // ring hands the tag back on completion.
        outcome(unsafe { self.ring.start(offset, write, &iovecs, tag) })
    }

    /// Starts a flush: metadata written back now, the image's files synced by the kernel
    /// while the worker goes on with other requests. Writes still in flight need not be
    /// covered (virtio-blk: a flush covers the writes completed before it).
    fn start_flush(&mut self, mem: &MemGuard, req: Request) -> Result<Option<Finished>, Request> {
        let tag = InFlight {
            req,
            mem: mem.clone(),
        };
        outcome(self.ring.start_flush(tag))
    }

    /// Hands queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Whether completions are waiting to be reaped (checked without a system call).
    pub fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    /// Resets the completion eventfd after it woke the worker.
    pub fn clear_eventfd(&mut self) {
        let _ = self.eventfd.read();
    }

    /// Collects finished requests without waiting.
    pub fn reap(&mut self, out: &mut Vec<Finished>) {
        let mut done = Vec::new();
        self.ring.reap(&mut done);
        out.extend(done.into_iter().map(Finished::from));
    }

    /// Keeps a poll on the queue's kick eventfd `kick` in the ring, so that
    /// [`Self::wait_any`] also wakes up for the frontend's next kick; the kick itself stays in
    /// the eventfd for the epoll loop to read. [`Self::kicked`] tells whether it fired.
    pub fn watch_kick(&mut self, kick: RawFd) {
        self.ring.watch_readable(kick);
    }

    /// Whether the poll on the kick fired since the last call.
    pub fn kicked(&mut self) -> bool {
        self.ring.take_readable()
    }

    /// Stops polling the kick eventfd (before the frontend's descriptors change).
    pub fn unwatch_kick(&mut self) {
        self.ring.unwatch();
    }

    /// Sleeps until a request finishes or the watched kick arrives (one system call, which
    /// also submits what is queued) and collects the finished requests.
    pub fn wait_any(&mut self, out: &mut Vec<Finished>) -> io::Result<()> {
        let mut done = Vec::new();
        let res = self.ring.wait_any(&mut done);
        out.extend(done.into_iter().map(Finished::from));
        res
    }

    /// Turns the completion eventfd on or off: off while the worker waits in the ring itself,
    /// on while it sleeps in its epoll loop. After turning it on, check
    /// [`Self::has_completions`]: what arrived while it was off signalled nothing.
    pub fn set_eventfd_notifications(&mut self, on: bool) {
        self.ring.set_eventfd_notifications(on);
    }

    /// Waits until every submitted request has finished and collects them.
    pub fn wait_all(&mut self, out: &mut Vec<Finished>) {
        let mut done = Vec::new();
        // Requests left in the ring would complete later into whatever the queue serves by
        // then (after a reconnect, another frontend's ring): a failed wait is retried, for
        // up to about ten seconds.
        for attempt in 1..=WAIT_ALL_ATTEMPTS {
            match self.ring.wait_all(&mut done) {
                Ok(()) => break,
                Err(e) if attempt.is_power_of_two() || attempt == WAIT_ALL_ATTEMPTS => {
                    tracing::error!("waiting for io_uring completions failed: {e} (try {attempt})");
                }
                Err(_) => {}
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out.extend(done.into_iter().map(Finished::from));
    }
}
