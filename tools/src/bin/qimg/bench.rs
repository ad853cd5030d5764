//! `qimg bench`: qemu-img's I/O micro-benchmark — `count` requests of `size` bytes, `depth`
//! of them in flight (at most 1024), from `offset` in steps of `step`, wrapping at the end of
//! the image. Like qemu-img, one thread keeps the requests in flight: mapped ranges go
//! through the qcow2 crate's io_uring ring, the rest (allocating writes, metadata misses)
//! through the engine's synchronous path.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use qcow2::uring::{Completion, IoRing, Start};
use qcow2::{Format, Image};

use crate::size::{cvtint_full, cvtnum, cvtnum_full};

/// Arguments of `qimg bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value = "75000")]
    count: String,
    /// Requests in flight.
    #[arg(short = 'd', long = "depth", default_value = "64")]
    depth: String,
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Flush after this many write requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// AIO mode: threads, native or io_uring (accepted).
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO (checked as qemu-img does: needs an O_DIRECT cache mode).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Do not wait for requests in flight before a flush (accepted).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Quiet (accepted; qemu-img prints its report anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size.
    #[arg(short = 's', long = "buffer-size", default_value = "4096")]
    size: String,
    /// Distance between request offsets (default: the request size).
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Cache mode (checked; qimg reads and writes through the page cache).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Open a read-only benchmark's image without keeping writers out (force share).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

/// Runs `qimg bench`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    let _ = (a.no_drain, a.quiet);
    if let Some(m) = a.aio.as_deref() {
        if !matches!(m, "threads" | "native" | "io_uring") {
            bail!("Invalid aio option: {m}");
        }
    }
    if a.cache
        .as_deref()
        .is_some_and(|c| !crate::valid_cache_mode(c))
    {
        bail!("Invalid cache mode");
    }
    let pattern = match a.pattern.as_deref() {
        Some(p) => cvtint_full("pattern byte", p, 0, 0xff)? as u8,
        None => 0,
    };
    let int_max = i32::MAX as u64;
    let count = cvtint_full("request count", &a.count, 1, int_max)?;
    let depth = cvtint_full("queue depth", &a.depth, 1, int_max)?;
    let flush_interval = a
        .flush_interval
        .as_deref()
        .map(|v| cvtint_full("flush interval", v, 0, int_max))
        .transpose()?;
    let bufsize = cvtnum_full("buffer size", &a.size, 1, int_max)?;
    let step = match &a.step {
        // As in qemu-img, a step of 0 is the request size.
        Some(s) => Some(cvtnum_full("step size", s, 0, int_max)?).filter(|&s| s > 0),
        None => None,
    }
    .unwrap_or(bufsize);
    let start = cvtnum("offset", &a.offset)?;
    if flush_interval.is_some() && !a.write {
        bail!("--flush-interval is only available in write tests");
    }
    if flush_interval.is_some_and(|n| n > 0 && n < depth) {
        bail!("Flush interval can't be smaller than depth");
    }
    // Refused when the image is opened, in the block layer's words.
    let refuse = |why: &str| anyhow::anyhow!("Could not open '{}': {why}", a.filename);
    if a.write && a.force_share {
        return Err(refuse(
            "force-share=on can only be used with read-only images",
        ));
    }
    let direct = matches!(a.cache.as_deref(), Some("none" | "directsync"));
    if (a.native || a.aio.as_deref() == Some("native")) && !direct {
        return Err(refuse(
            "aio=native was specified, but it requires cache.direct=on, which was not \
             specified.",
        ));
    }
    let offset_at = |size: u64, i: u64| match i {
        0 => start,
        _ if size == 0 => 0,
        _ => (start as u128 + i as u128 * step as u128).rem_euclid(size as u128) as u64,
    };
    let img: Arc<dyn Image> = match a.write {
        true => open_for_writes(&a.filename, a.format.as_deref(), |size| {
            (0..count).map(|i| (offset_at(size, i), bufsize)).collect()
        })?,
        false => crate::open(
            &a.filename,
            a.format.as_deref(),
            true,
            crate::locking(a.force_share),
        )?
        .into(),
    };
    let size = img.size();
    outln!(
        "Sending {} {} requests, {bufsize} bytes each, {} in parallel (starting at offset {start}, step size {step})",
        count,
        if a.write { "write" } else { "read" },
        depth
    );
    if let Some(n) = flush_interval {
        outln!("Sending flush every {n} requests");
    }
    let offset_of = |i: u64| offset_at(size, i);
    let began = Instant::now();
    let buffers = depth.min(count).min(1024) as usize;
    let mut run = Run {
        img: &*img,
        write: a.write,
        flush_interval: flush_interval.filter(|&n| n > 0),
        ring: IoRing::new(img.clone(), buffers.max(1) as u32)?,
        buffers: vec![vec![pattern; bufsize as usize]; buffers],
        free: (0..buffers).collect(),
        done: 0,
    };
    let outcome = (|| -> qcow2::Result<()> {
        let mut next = 0;
        while run.done < count {
            while next < count {
                let Some(b) = run.free.pop() else { break };
                run.start(b, offset_of(next))?;
                next += 1;
            }
            run.reap(false)?;
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        // The block layer fails requests past the end, as corrupt metadata, with EIO.
        let e = match e {
            qcow2::Error::OutOfRange { .. } => anyhow::anyhow!("Input/output error"),
            e => e.into(),
        };
        crate::report_error(&e.context("Failed request"));
        return Ok(1);
    }
    // Like qemu-img, the time covers the requests; the flush on close comes after.
    let elapsed = began.elapsed();
    if a.write {
        img.flush()
            .with_context(|| format!("Error while flushing '{}'", a.filename))?;
    }
    outln!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    Ok(0)
}

/// Opens the image of a write benchmark as qemu-img does (the format given or probed, with
/// QEMU's warning for a probed raw image). A qcow2 image keeps its persistent dirty bitmaps,
/// with what the run will write (`written(disk size)`: offset, length) marked in the enabled
/// ones before the first write, as qemu-img's writes mark them.
fn open_for_writes(
    name: &str,
    format: Option<&str>,
    written: impl Fn(u64) -> Vec<(u64, u64)>,
) -> anyhow::Result<Arc<dyn Image>> {
    let (storage, format) = crate::open_for_writing(name, format)?;
    match format {
        Format::Raw => Ok(Arc::new(qcow2::RawImage::new(storage, false)?)),
        Format::Qcow2 => {
            let dir = std::path::Path::new(name).parent();
            let opts = crate::bitmap_keeping_writer_options();
            let q = crate::open_qcow2(storage, &opts, dir, name)?;
            crate::copy_bitmaps::mark_dirty(&q, &written(q.size()))?;
            Ok(Arc::new(q))
        }
    }
}

/// The requests of one benchmark run: buffer `b` belongs to the request tagged `b`.
struct Run<'a> {
    img: &'a dyn Image,
    write: bool,
    flush_interval: Option<u64>,
    ring: IoRing<(usize, u64)>,
    buffers: Vec<Vec<u8>>,
    free: Vec<usize>,
    done: u64,
}

impl Run<'_> {
    /// Starts a request on buffer `b` at `offset`.
    fn start(&mut self, b: usize, offset: u64) -> qcow2::Result<()> {
        let buf = &mut self.buffers[b];
        let iovec = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the buffer is neither used nor freed until the ring returns tag `b`.
        match unsafe { self.ring.start(offset, self.write, &[iovec], (b, offset)) } {
            Start::Queued => Ok(()),
            Start::Done((b, _)) => self.finished(b),
            Start::Declined(tag) => self.synchronous(tag),
        }
    }

    /// Completes a request back from the ring; a failed one is redone synchronously, which
    /// reports the error.
    fn complete(&mut self, c: Completion<(usize, u64)>) -> qcow2::Result<()> {
        if c.ok {
            self.finished(c.tag.0)
        } else {
            self.synchronous(c.tag)
        }
    }

    /// Runs a request through the engine's blocking path. Writes first wait for the ring:
    /// a zero-copy write in flight may hold the clusters this one needs.
    fn synchronous(&mut self, (b, offset): (usize, u64)) -> qcow2::Result<()> {
        if self.write {
            self.drain()?;
            self.img.write_at(&self.buffers[b], offset)?;
        } else {
            self.img.read_at(&mut self.buffers[b], offset)?;
        }
        self.finished(b)
    }

    /// Frees buffer `b` of a completed request; flushes every `flush_interval` requests.
    fn finished(&mut self, b: usize) -> qcow2::Result<()> {
        self.free.push(b);
        self.done += 1;
        if self.flush_interval.is_some_and(|n| self.done % n == 0) {
            self.drain()?;
            self.img.flush()?;
        }
        Ok(())
    }

    /// Waits for and completes every request in flight.
    fn drain(&mut self) -> qcow2::Result<()> {
        while self.ring.in_flight() > 0 {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Submits what is queued, waits for one request (or, with `all`, every request) in
    /// flight and completes what finished.
    fn reap(&mut self, all: bool) -> qcow2::Result<()> {
        let mut finished = Vec::new();
        let waited = if all {
            self.ring.wait_all(&mut finished)
        } else {
            self.ring.wait_one(&mut finished)
        };
        waited.map_err(|e| qcow2::Error::io("waiting for io_uring", e))?;
        for c in finished {
            self.complete(c)?;
        }
        Ok(())
    }
}
