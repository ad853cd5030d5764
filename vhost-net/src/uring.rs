//! Batched tx with io_uring: a batch of frames becomes one `writev` entry each and a single
//! `io_uring_enter` call, instead of one `writev` system call per frame. TAP writes complete
//! inline, so the call returns with every completion ready.

use std::io;

use io_uring::{opcode, types, IoUring};

use crate::datapath::BATCH;
use crate::device::TxFrame;

/// One queue pair's tx ring.
pub struct TxRing {
    ring: IoUring,
}

impl std::fmt::Debug for TxRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxRing").finish_non_exhaustive()
    }
}

impl TxRing {
    /// A ring with room for a whole batch.
    pub fn new() -> io::Result<TxRing> {
        Ok(TxRing {
            ring: IoUring::new(BATCH.next_power_of_two() as u32)?,
        })
    }

    /// Writes every frame of `frames` whose `result` is 0 to `fd`, its buffers being the
    /// `frame.iovecs` range of `iovecs`, and stores each result.
    ///
    /// An error means the ring itself failed (not a frame): frames without a completion are
    /// marked failed, and the ring must not be used again (drop it: nothing is in flight).
    pub fn write_batch(
        &mut self,
        fd: i32,
        iovecs: &[libc::iovec],
        frames: &mut [TxFrame],
    ) -> io::Result<()> {
        let mut pending = 0usize;
        {
            let mut sq = self.ring.submission();
            for (i, f) in frames.iter().enumerate().filter(|(_, f)| f.result == 0) {
                let iov = &iovecs[f.iovecs.clone()];
                let entry = opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the iovecs and the guest memory they point to stay alive and in place
                // until every completion has been reaped below (or the ring is dropped).
                if unsafe { sq.push(&entry) }.is_err() {
                    break;
                }
                pending += 1;
            }
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
                if let Some(f) = frames.get_mut(cqe.user_data() as usize) {
                    // Keep 0 meaning "not written".
                    f.result = if cqe.result() == 0 {
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
            Some(e) => {
                for f in frames.iter_mut().filter(|f| f.result == 0) {
                    f.result = -libc::EIO;
                }
                Err(e)
            }
        }
    }
}
