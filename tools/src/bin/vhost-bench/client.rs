//! The libblkio connection: started queues and one shared buffer region split between them.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Blkioq, Errno, MemoryRegion};

/// How long `connect` waits for a server that is not listening yet.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// A started `virtio-blk-vhost-user` device with a mapped buffer of `per_queue` bytes per queue.
pub struct Client {
    // Drop order: the queues and the region go before the Blkio instance.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
    per_queue: usize,
}

/// One queue's part of the buffer region: `len` bytes at `addr`, mapped for the client's
/// lifetime and used by one thread only.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    addr: usize,
    len: usize,
}

impl Buffer {
    /// The `index`-th piece of `len` bytes.
    pub fn slot(&self, index: usize, len: usize) -> *mut u8 {
        assert!((index + 1) * len <= self.len, "slot past the buffer");
        (self.addr + index * len) as *mut u8
    }

    /// The `index`-th piece of `len` bytes as a slice.
    ///
    /// # Safety
    /// No request may be using the piece while the slice lives.
    pub unsafe fn slot_mut(&mut self, index: usize, len: usize) -> &mut [u8] {
        // SAFETY: the piece lies in the mapped region (checked by `slot`) and the caller
        // guarantees no device access overlaps.
        unsafe { std::slice::from_raw_parts_mut(self.slot(index, len), len) }
    }
}

impl Client {
    /// Connects to `socket` (retrying while nothing listens there yet), read-only if asked
    /// (as a read-only device requires), starts `queues` queues and maps a buffer of
    /// `per_queue` bytes for each.
    pub fn connect(
        socket: &Path,
        read_only: bool,
        queues: u16,
        per_queue: usize,
    ) -> Result<Client> {
        let path = socket
            .to_str()
            .with_context(|| format!("{} is not UTF-8", socket.display()))?;
        let deadline = Instant::now() + CONNECT_WAIT;
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user")?;
            b.set_str("path", path)?;
            b.set_bool("read-only", read_only)?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(e.errno(), Errno::CONNREFUSED | Errno::NOENT) =>
                {
                    sleep(Duration::from_millis(10))
                }
                Err(e) => bail!("{e}"),
            }
        };
        blkio.set_i32("num-queues", i32::from(queues))?;
        let started = blkio.start().context("starting the device")?;
        let align = usize::try_from(blkio.get_u64("mem-region-alignment")?)?.max(4096);
        let len = (per_queue * usize::from(queues)).next_multiple_of(align);
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        // Non-zero data, so that no server can take a zero-detection shortcut on writes.
        // SAFETY: the region is `region.len` bytes mapped for the client's lifetime.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
        Ok(Client {
            queues: started.queues,
            region,
            blkio,
            per_queue,
        })
    }

    /// The device size in bytes.
    pub fn capacity(&self) -> Result<u64> {
        Ok(self.blkio.get_u64("capacity")?)
    }

    /// Each queue with its own part of the buffer.
    pub fn queues(&mut self) -> impl Iterator<Item = (&mut Blkioq, Buffer)> {
        let (addr, len) = (self.region.addr, self.per_queue);
        self.queues.iter_mut().enumerate().map(move |(i, q)| {
            let buf = Buffer {
                addr: addr + i * len,
                len,
            };
            (q, buf)
        })
    }
}
