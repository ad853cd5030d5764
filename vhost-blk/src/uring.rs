//! Zero-copy I/O on raw images: one io_uring per queue, reads and writes go straight between
//! the image file and guest memory, submitted without waiting and reaped when the ring's
//! eventfd fires.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vm_memory::{GuestMemory, GuestMemoryLoadGuard, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::request::{Request, RequestKind};

/// Guest memory as a request in flight holds it: the mapping stays alive until completion.
pub type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Most buffers in one readv/writev (the kernel's IOV_MAX); longer requests go the slow way.
pub const MAX_IOVECS: usize = 1024;

/// A request the kernel is working on.
struct InFlight {
    req: Request,
    mem: MemGuard,
    // The kernel reads this array until the request completes; its heap buffer never moves.
    _iovecs: Vec<libc::iovec>,
    expected: u64,
}

// SAFETY: the raw pointers in the iovecs point into guest memory kept mapped by `mem`; the
// entry is only used by the queue's own thread or under the queue's lock.
unsafe impl Send for InFlight {}

/// A finished request: `result` is the kernel's (bytes transferred or -errno).
pub struct Finished {
    /// The request.
    pub req: Request,
    /// The guest memory it used.
    pub mem: MemGuard,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
    /// Bytes the request asked for.
    pub expected: u64,
}

impl Finished {
    /// Whether the whole transfer succeeded.
    pub fn complete(&self) -> bool {
        self.result >= 0 && self.result as u64 == self.expected
    }
}

/// One queue's ring on a raw image file.
pub struct QueueRing {
    ring: IoUring,
    eventfd: EventFd,
    fd: RawFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    unsubmitted: bool,
}

impl QueueRing {
    /// A ring of `entries` entries (at least the queue size) doing I/O on `fd`, which must
    /// stay open for the ring's lifetime.
    pub fn new(entries: u32, fd: RawFd) -> io::Result<QueueRing> {
        let ring = IoUring::new(entries.next_power_of_two().max(4))?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(QueueRing {
            ring,
            eventfd,
            fd,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: false,
        })
    }

    /// The eventfd that becomes readable when completions are ready.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether `req` can go through the ring (a non-empty read or write).
    pub fn eligible(req: &Request) -> bool {
        matches!(req.kind, RequestKind::In | RequestKind::Out) && !req.data.is_empty()
    }

    /// Queues `req` for zero-copy I/O. Gives it back when it cannot be done that way (buffers
    /// that do not map to host memory, too many of them, a full ring); the caller then runs it
    /// through the bounce buffer, which reports any error properly.
    pub fn start(&mut self, mem: &MemGuard, req: Request) -> Result<(), Request> {
        let write = match req.kind {
            RequestKind::Out => true,
            RequestKind::In => false,
            _ => return Err(req),
        };
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iovecs = Vec::with_capacity(req.data.len());
        for seg in &req.data {
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
        if iovecs.len() > MAX_IOVECS {
            return Err(req);
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let fd = types::Fd(self.fd);
        let (ptr, n) = (iovecs.as_ptr(), iovecs.len() as u32);
        let entry = if write {
            opcode::Writev::new(fd, ptr, n).offset(req.offset()).build()
        } else {
            opcode::Readv::new(fd, ptr, n).offset(req.offset()).build()
        }
        .user_data(index as u64);
        // SAFETY: the iovecs and the guest memory they point to live in `slots[index]` until
        // the completion with this user_data is reaped.
        let mut pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        if !pushed && self.ring.submit().is_ok() {
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        }
        if !pushed {
            self.free.push(index);
            return Err(req);
        }
        let expected = req.data_len();
        self.slots[index] = Some(InFlight {
            req,
            mem: mem.clone(),
            _iovecs: iovecs,
            expected,
        });
        self.unsubmitted = true;
        Ok(())
    }

    /// Hands queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted {
            self.ring.submit()?;
            self.unsubmitted = false;
        }
        Ok(())
    }

    /// Whether completions are waiting to be reaped (checked without a system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Collects finished requests without waiting (and resets the eventfd).
    pub fn reap(&mut self, out: &mut Vec<Finished>) {
        let _ = self.eventfd.read();
        for cqe in self.ring.completion() {
            let index = cqe.user_data() as usize;
            let Some(f) = self.slots.get_mut(index).and_then(Option::take) else {
                continue;
            };
            self.free.push(index);
            out.push(Finished {
                req: f.req,
                mem: f.mem,
                result: cqe.result(),
                expected: f.expected,
            });
        }
    }

    /// Waits until every submitted request has finished and collects them.
    pub fn wait_all(&mut self, out: &mut Vec<Finished>) {
        while self.in_flight() > 0 {
            let _ = self.submit();
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("waiting for io_uring completions failed: {e}");
                    return;
                }
            }
            self.reap(out);
        }
    }
}
