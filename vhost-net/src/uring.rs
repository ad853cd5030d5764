//! Batched TAP I/O with io_uring: a batch of frames (tx) or of rx buffer sets becomes one
//! `writev`/`readv` entry each and a single `io_uring_enter` call, instead of one system call
//! per packet. Everything completes inline: TAP writes do not block, and reads carry
//! `RWF_NOWAIT`, so a read that finds the TAP empty completes at once with `-EAGAIN` instead
//! of waiting (io_uring would otherwise arm a poll and keep the guest's buffers in flight).
//! The call returns with every completion reaped, so no buffer is in the kernel's hands
//! afterwards. The ring belongs to one TAP queue, and entries with a single buffer are plain
//! `read`/`write`s (no `iovec` array for the kernel to copy). The TAP is deliberately not a
//! registered (fixed) file: the ring would then hold it open after the daemon exits, until the
//! kernel's asynchronous ring teardown, and a restarted daemon could find the TAP still there.

use std::io;
use std::ops::Range;
use std::os::unix::io::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use crate::datapath::BATCH;

/// One entry of a batch: the `iovec`s it uses and where its result goes.
pub trait BatchEntry {
    /// Its buffers: a range of the batch's `iovec`s.
    fn iovecs(&self) -> Range<usize>;
    /// Its result: 0 until it is done (entries that are not 0 are not submitted), then bytes
    /// or a negative errno.
    fn result_mut(&mut self) -> &mut i32;
}

/// One queue pair's io_uring on its TAP queue, for tx and rx batches (the pair's worker uses
/// it for one batch at a time).
pub struct PairRing {
    ring: IoUring,
    fd: RawFd,
    nowait_reads: bool,
}

impl std::fmt::Debug for PairRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairRing")
            .field("fd", &self.fd)
            .field("nowait_reads", &self.nowait_reads)
            .finish_non_exhaustive()
    }
}

impl PairRing {
    /// A ring with room for a whole batch, reading and writing `fd`, which must stay open as
    /// long as the ring is used.
    pub fn new(fd: RawFd) -> io::Result<PairRing> {
        Ok(PairRing {
            ring: IoUring::new(BATCH.next_power_of_two() as u32)?,
            fd,
            nowait_reads: true,
        })
    }

    /// The file descriptor the ring reads and writes.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Whether rx may go through [`PairRing::read_batch`]: false once the kernel refused a
    /// non-blocking read on the TAP (`RWF_NOWAIT` unsupported).
    pub fn reads(&self) -> bool {
        self.nowait_reads
    }

    /// Writes every entry of `frames` whose result is 0 to the ring's file, its buffers being its range
    /// of `iovecs`, and stores each result.
    ///
    /// An error means the ring itself failed (not a frame): entries without a completion are
    /// marked failed, and the ring must not be used again (drop it: nothing is in flight).
    pub fn write_batch<E: BatchEntry>(
        &mut self,
        iovecs: &[libc::iovec],
        frames: &mut [E],
    ) -> io::Result<()> {
        self.run(iovecs, frames, false)
    }

    /// Reads from the ring's file into every entry of `sets` whose result is 0, in order, and stores each
    /// result (bytes, or `-EAGAIN` when the TAP was empty at that point).
    ///
    /// Errors are as for [`PairRing::write_batch`]. A kernel that does not support
    /// non-blocking reads on the file fails the entries with `-EOPNOTSUPP` and turns
    /// [`PairRing::reads`] off.
    pub fn read_batch<E: BatchEntry>(
        &mut self,
        iovecs: &[libc::iovec],
        sets: &mut [E],
    ) -> io::Result<()> {
        self.run(iovecs, sets, true)?;
        if sets
            .iter_mut()
            .any(|s| *s.result_mut() == -libc::EOPNOTSUPP)
        {
            self.nowait_reads = false;
        }
        Ok(())
    }

    /// The submission entry for `iov`: `read` (non-blocking) or write, of one buffer or a
    /// vector of them.
    fn entry(&self, iov: &[libc::iovec], read: bool) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match (read, iov) {
            (true, [one]) => opcode::Read::new(fd, one.iov_base.cast(), one.iov_len as u32)
                .rw_flags(libc::RWF_NOWAIT)
                .build(),
            (true, _) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .rw_flags(libc::RWF_NOWAIT)
                .build(),
            (false, [one]) => {
                opcode::Write::new(fd, one.iov_base.cast(), one.iov_len as u32).build()
            }
            (false, _) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32).build(),
        }
    }

    fn run<E: BatchEntry>(
        &mut self,
        iovecs: &[libc::iovec],
        entries: &mut [E],
        read: bool,
    ) -> io::Result<()> {
        let mut pending = 0usize;
        for (i, e) in entries.iter_mut().enumerate() {
            if *e.result_mut() != 0 {
                continue;
            }
            let entry = self.entry(&iovecs[e.iovecs()], read).user_data(i as u64);
            // SAFETY: the iovecs and the guest memory they point to stay alive and in place
            // until every completion has been reaped below (or the ring is dropped).
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            pending += 1;
        }
        let mut reaped = 0usize;
        let mut failure = None;
        while reaped < pending {
            match self.ring.submit_and_wait(pending - reaped) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            for cqe in self.ring.completion() {
                if let Some(e) = entries.get_mut(cqe.user_data() as usize) {
                    // Keep 0 meaning "not done" (a TAP never reads or writes 0 bytes).
                    *e.result_mut() = if cqe.result() == 0 {
                        -libc::EIO
                    } else {
                        cqe.result()
                    };
                }
                reaped += 1;
            }
        }
        match failure {
            None => Ok(()),
            Some(err) => {
                for e in entries.iter_mut() {
                    let r = e.result_mut();
                    if *r == 0 {
                        *r = -libc::EIO;
                    }
                }
                Err(err)
            }
        }
    }
}
