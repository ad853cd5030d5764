//! `qimg bench`: qemu-img's I/O micro-benchmark — `count` requests of `size` bytes, `depth`
//! of them in flight (one thread each, at most 64), from `offset` in steps of `step`,
//! wrapping at the end of the image.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::bail;

use crate::size::parse_size;

/// Arguments of `qimg bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: u64,
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Flush after this many write requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// AIO mode: threads, native or io_uring (accepted).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Bypass the host page cache (accepted).
    #[arg(short = 'n')]
    nocache: bool,
    /// Do not wait for requests in flight before a flush (accepted).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value_t = 0)]
    pattern: u8,
    /// Quiet (accepted; qemu-img prints its report anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size.
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Distance between request offsets (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode (accepted).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Open without taking the write lock (qimg takes no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// The image.
    filename: String,
}

/// Runs `qimg bench`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let _ = (a.nocache, a.no_drain, a.quiet, &a.cache, a.force_share);
    if let Some(m) = a.aio.as_deref() {
        if !matches!(m, "threads" | "native" | "io_uring") {
            bail!("Invalid aio option: {m}");
        }
    }
    if !(1..=i32::MAX as u64).contains(&a.depth) {
        bail!("Invalid queue depth specified. Must be between 1 and 2147483647.");
    }
    let bufsize = parse_size(&a.size)
        .ok()
        .filter(|s| (1..=i32::MAX as u64).contains(s))
        .ok_or_else(|| anyhow::anyhow!("Invalid buffer size specified"))?;
    let step = match &a.step {
        Some(s) => parse_size(s).map_err(|_| anyhow::anyhow!("Invalid step size specified"))?,
        None => bufsize,
    };
    let start = parse_size(&a.offset).map_err(|_| anyhow::anyhow!("Invalid offset specified"))?;
    if a.flush_interval.is_some() && !a.write {
        bail!("--flush-interval is only available in write tests");
    }
    let img = crate::open(&a.filename, a.format.as_deref(), !a.write)?;
    let size = img.size();
    println!(
        "Sending {} {} requests, {bufsize} bytes each, {} in parallel (starting at offset {start}, step size {step})",
        a.count,
        if a.write { "write" } else { "read" },
        a.depth
    );
    if let Some(n) = a.flush_interval {
        println!("Sending flush every {n} requests");
    }
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let began = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.depth.min(a.count).min(64) {
            s.spawn(|| {
                let mut buf = vec![a.pattern; bufsize as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.count || failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let off = match i {
                        0 => start,
                        _ if size == 0 => 0,
                        _ => (start as u128 + i as u128 * step as u128).rem_euclid(size as u128)
                            as u64,
                    };
                    let r = if a.write {
                        img.write_at(&buf, off)
                    } else {
                        img.read_at(&mut buf, off)
                    };
                    let r = r.and_then(|()| {
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        match a.flush_interval {
                            Some(n) if n > 0 && d % n == 0 => img.flush(),
                            _ => Ok(()),
                        }
                    });
                    if let Err(e) = r {
                        if !failed.swap(true, Ordering::Relaxed) {
                            eprintln!("qimg: Failed request: {e}");
                        }
                        return;
                    }
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        return Ok(1);
    }
    if a.write {
        img.flush()?;
    }
    println!(
        "Run completed in {:.3} seconds.",
        began.elapsed().as_secs_f64()
    );
    Ok(0)
}
