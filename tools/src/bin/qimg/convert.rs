//! `qimg convert`: a parallel copy pipeline. Worker threads take chunks in turn, read them
//! from the source chain, skip chunks that are zero (when the target reads as zeros), and
//! write plainly or compressed (compression therefore runs on all cores).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use qcow2::{CreateOptions, Format, Image, Qcow2};

use crate::create::{parse_options, qcow2_options};
use crate::size::parse_size;

/// Arguments of `qimg convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Output format options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Do not create the target; write into an existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// The target is known to read as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Allow out-of-order writes (always done; accepted for compatibility).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Number of parallel workers (1..16).
    #[arg(short = 'm', default_value_t = 8)]
    workers: u32,
    /// Minimum run of zero bytes to leave sparse (default 4k).
    #[arg(short = 'S', default_value = "4k")]
    sparse: String,
    /// Open sources without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image(s), concatenated, then the target.
    #[arg(required = true, num_args = 2..)]
    files: Vec<String>,
}

/// A target the workers write to.
enum Target {
    Qcow2(Box<Qcow2>),
    Other(Box<dyn Image>),
}

impl Target {
    fn image(&self) -> &dyn Image {
        match self {
            Target::Qcow2(q) => &**q,
            Target::Other(i) => &**i,
        }
    }
}

/// Reads `[off, off + buf.len())` of the concatenation of `sources`.
fn read_concat(sources: &[Box<dyn Image>], buf: &mut [u8], mut off: u64) -> qcow2::Result<()> {
    let mut pos = 0;
    for s in sources {
        if pos == buf.len() {
            break;
        }
        if off >= s.size() {
            off -= s.size();
            continue;
        }
        let n = ((s.size() - off) as usize).min(buf.len() - pos);
        s.read_at(&mut buf[pos..pos + n], off)?;
        pos += n;
        off = 0;
    }
    Ok(())
}

/// Runs `qimg convert`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let _ = (a.out_of_order, a.force_share);
    if !(1..=16).contains(&a.workers) {
        bail!("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
    }
    let sparse = parse_size(&a.sparse)?;
    let (target_name, source_names) = a.files.split_last().context("missing target")?;
    let sources: Vec<Box<dyn Image>> = source_names
        .iter()
        .map(|s| crate::open(s, a.format.as_deref(), true))
        .collect::<anyhow::Result<_>>()?;
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    let out_fmt = crate::parse_format(&a.output_format)?;
    if a.compress && out_fmt != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    let target_path = std::path::Path::new(target_name);
    let mut fresh = a.target_is_zero;
    if !a.no_create {
        match out_fmt {
            Format::Qcow2 => {
                let o = qcow2_options(
                    &parse_options(&a.options)?,
                    CreateOptions {
                        size: total,
                        ..Default::default()
                    },
                )?;
                qcow2::create(target_path, &o)
                    .map_err(|e| anyhow::anyhow!("{target_name}: {e}"))?;
                fresh = o.backing_file.is_none();
            }
            Format::Raw => {
                let f = std::fs::File::create(target_path)
                    .with_context(|| format!("Could not create '{target_name}'"))?;
                f.set_len(total)?;
                fresh = true;
            }
        }
    }
    let target = match out_fmt {
        Format::Qcow2 => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(target_path)
                .with_context(|| format!("Could not open '{target_name}'"))?;
            Target::Qcow2(Box::new(Qcow2::open_storage(
                Arc::new(qcow2::FileStorage::new(file)),
                &Default::default(),
                target_path.parent(),
            )?))
        }
        Format::Raw => Target::Other(crate::open(target_name, Some("raw"), false)?),
    };
    let chunk: u64 = match &target {
        Target::Qcow2(q) => q.cluster_size().max(1 << 20),
        Target::Other(_) => 1 << 20,
    };
    let cluster = match &target {
        Target::Qcow2(q) => q.cluster_size(),
        Target::Other(_) => sparse.max(512),
    };
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let chunks = total.div_ceil(chunk);
    let show = a.progress && !a.quiet;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..a.workers.min(chunks.max(1) as u32))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let mut buf = vec![0u8; chunk as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks {
                            return Ok(());
                        }
                        let off = i * chunk;
                        let len = chunk.min(total - off) as usize;
                        read_concat(&sources, &mut buf[..len], off)?;
                        copy_chunk(
                            &target,
                            &buf[..len],
                            off,
                            cluster,
                            sparse,
                            fresh,
                            a.compress,
                        )?;
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if show {
                            eprint!("    ({:.2}/100%)\r", d as f64 * 100.0 / chunks as f64);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a convert worker panicked"))??;
        }
        Ok(())
    })?;
    target.image().flush()?;
    if show {
        eprintln!("    (100.00/100%)");
    }
    Ok(0)
}

/// Writes one chunk in pieces of `cluster` bytes, skipping zero pieces on a fresh target.
fn copy_chunk(
    target: &Target,
    buf: &[u8],
    off: u64,
    cluster: u64,
    sparse: u64,
    fresh: bool,
    compress: bool,
) -> qcow2::Result<()> {
    let img = target.image();
    let mut pos = 0usize;
    while pos < buf.len() {
        let n = (cluster as usize).min(buf.len() - pos);
        let piece = &buf[pos..pos + n];
        let zero = piece.iter().all(|&b| b == 0);
        let at = off + pos as u64;
        if zero && sparse > 0 {
            if !fresh {
                img.write_zeroes(at, n as u64, true)?;
            }
        } else if let (true, Target::Qcow2(q)) = (compress, target) {
            q.write_compressed(piece, at)?;
        } else {
            // Coalesce with following non-zero pieces into one write.
            let mut end = pos + n;
            while end < buf.len() && !compress {
                let m = (cluster as usize).min(buf.len() - end);
                if buf[end..end + m].iter().all(|&b| b == 0) {
                    break;
                }
                end += m;
            }
            img.write_at(&buf[pos..end], at)?;
            pos = end;
            continue;
        }
        pos += n;
    }
    Ok(())
}
