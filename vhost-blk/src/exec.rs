//! Executing validated requests against the disk and completing descriptor chains.

use std::ops::Deref;

use aligned_vec::{AVec, ConstAlign};
use cowbird_daemon::logging::Occurrences;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};

use crate::disk::{looks_like_image_format, Disk};
use crate::error::{Error, Result};
use crate::guest;
use crate::request::{self, Limits, Rejected, Request, RequestKind, SegmentCursor};

/// Largest piece of a read or write that goes through the bounce buffer at once.
pub const CHUNK: usize = 1 << 20;

/// Per-queue request executor: owns the queue's bounce buffer.
pub struct Executor {
    /// Page aligned, so that I/O through it also works with O_DIRECT.
    bounce: AVec<u8, ConstAlign<4096>>,
    /// Requests the image failed (a full disk, an I/O error): logged at powers of two only,
    /// since the guest may retry them without end.
    image_errors: Occurrences,
}

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one chain: what to put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes written into device-writable buffers (data and status).
    pub used_len: u32,
    /// The status written, `None` when the chain had no usable status byte.
    pub status: Option<u8>,
}

impl Executor {
    /// An executor with a [`CHUNK`]-byte bounce buffer.
    pub fn new() -> Self {
        Executor {
            bounce: AVec::from_iter(0, std::iter::repeat_n(0, CHUNK)),
            image_errors: Occurrences::default(),
        }
    }

    /// Parses, executes and completes one chain: writes the status byte and returns the used
    /// ring entry. Errors become a status (or a dropped request), never a panic.
    pub fn complete_chain<D>(
        &mut self,
        chain: DescriptorChain<D>,
        disk: &Disk,
        limits: &Limits,
        writethrough: bool,
    ) -> Completion
    where
        D: Deref + Clone,
        D::Target: GuestMemory,
    {
        let mem = chain.memory();
        match request::parse(chain.clone(), limits) {
            Ok(req) => self.run(mem, disk, &req, writethrough),
            Err(rejected) => reject(mem, &rejected),
        }
    }

    /// Executes a validated request and writes its status.
    pub fn run<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        disk: &Disk,
        req: &Request,
        writethrough: bool,
    ) -> Completion {
        match self.execute(mem, disk, req, writethrough) {
            Ok(n) => finish(mem, req, VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                if matches!(e, Error::Image { .. } | Error::Flush(_)) {
                    if let Some(n) = self.image_errors.count() {
                        tracing::warn!(
                            "request type {}: {e} (failed request {n} on this queue)",
                            req.kind.type_code()
                        );
                    }
                } else {
                    tracing::debug!("request type {}: {e}", req.kind.type_code());
                }
                finish(mem, req, e.status(), 0)
            }
        }
    }

    /// Executes a validated request; returns the data bytes written into guest buffers.
    pub fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        disk: &Disk,
        req: &Request,
        writethrough: bool,
    ) -> Result<u32> {
        match &req.kind {
            RequestKind::In => self.read(mem, disk, req),
            RequestKind::Out => {
                self.write(mem, disk, req)?;
                if writethrough {
                    disk.flush()?;
                }
                Ok(0)
            }
            RequestKind::Flush => disk.flush().map(|()| 0),
            RequestKind::GetId => {
                let n = (req.data_len() as usize).min(disk.serial().len());
                SegmentCursor::new(&req.data).write_to_guest(mem, &disk.serial()[..n])?;
                Ok(n as u32)
            }
            RequestKind::Discard(ranges) | RequestKind::WriteZeroes(ranges) => {
                let discard = matches!(req.kind, RequestKind::Discard(_));
                for r in ranges.iter().filter(|r| !r.is_empty()) {
                    let (offset, len) = (r.offset(), r.len());
                    let res = if discard {
                        disk.image().discard(offset, len)
                    } else {
                        disk.image().write_zeroes(offset, len, r.unmap)
                    };
                    res.map_err(|source| Error::Image {
                        offset,
                        len,
                        source,
                    })?;
                }
                if writethrough {
                    disk.flush()?;
                }
                Ok(0)
            }
        }
    }

    fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        disk: &Disk,
        req: &Request,
    ) -> Result<u32> {
        let total = req.data_len();
        let mut cursor = SegmentCursor::new(&req.data);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK as u64) as usize;
            let offset = req.offset() + done;
            let buf = &mut self.bounce[..n];
            disk.image()
                .read_at(buf, offset)
                .map_err(|source| Error::Image {
                    offset,
                    len: n as u64,
                    source,
                })?;
            cursor.write_to_guest(mem, buf)?;
            done += n as u64;
        }
        // A chain carries at most 4 GiB (virtio-queue stops iterating past that).
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

    fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        disk: &Disk,
        req: &Request,
    ) -> Result<()> {
        let total = req.data_len();
        let mut cursor = SegmentCursor::new(&req.data);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK as u64) as usize;
            let offset = req.offset() + done;
            let buf = &mut self.bounce[..n];
            cursor.read_from_guest(mem, buf)?;
            if offset == 0 && disk.guards_format_signature() && looks_like_image_format(buf) {
                return Err(Error::ProbedFormatWrite);
            }
            disk.image()
                .write_at(buf, offset)
                .map_err(|source| Error::Image {
                    offset,
                    len: n as u64,
                    source,
                })?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Writes `status` for a request that put `data_len` bytes into guest buffers.
pub fn finish<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    status: u8,
    data_len: u32,
) -> Completion {
    write_status(mem, req.head, Some(req.status), status, data_len)
}

/// Completes a chain the parser rejected: its error status if it has a status byte,
/// otherwise nothing is written.
pub fn reject<M: GuestMemory + ?Sized>(mem: &M, rejected: &Rejected) -> Completion {
    tracing::debug!(
        "rejected descriptor chain {}: {}",
        rejected.head,
        rejected.error
    );
    write_status(
        mem,
        rejected.head,
        rejected.status,
        rejected.error.status(),
        0,
    )
}

fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    head: u16,
    addr: Option<GuestAddress>,
    status: u8,
    data_len: u32,
) -> Completion {
    let dropped = Completion {
        head,
        used_len: 0,
        status: None,
    };
    let Some(addr) = addr else {
        return dropped;
    };
    match guest::write(mem, addr, &[status]) {
        Ok(()) => Completion {
            head,
            used_len: data_len.saturating_add(1),
            status: Some(status),
        },
        Err(e) => {
            tracing::debug!("chain {head}: cannot write status at {:#x}: {e}", addr.0);
            dropped
        }
    }
}
