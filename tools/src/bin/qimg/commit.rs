//! `qimg commit`: write what an image (and the images between it and the base) has allocated
//! into a backing file, as qemu-img 10's commit job does (data copied, zero areas written as
//! zeroes), then empty the image unless `-d` or `-b` is given.

use std::sync::Arc;

use anyhow::{bail, Context};
use qcow2::{FileStorage, Format, Image, Locking, Preallocation};

use crate::chain::Chain;
use crate::info::path_combine;
use crate::progress::Progress;
use crate::rate_limit::RateLimit;

/// Arguments of `qimg commit`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The backing file to commit into (default: the image's own backing file).
    #[arg(short = 'b', long = "base")]
    base: Option<String>,
    /// Do not empty the image afterwards.
    #[arg(short = 'd', long = "drop")]
    drop_not: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode (checked; qimg flushes at the end).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Write at most RATE bytes per second into the base (0: no limit).
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    rate: Option<String>,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

/// Largest run copied at once (QEMU's COMMIT_BUFFER_SIZE).
const CHUNK: u64 = 512 << 10;

/// Index of `name` in the chain below the top, as qemu-img finds a backing image
/// (`bdrv_find_backing_image`): when `name` or an overlay's recorded backing name has a
/// protocol (`json:`, `file:`), by that name or the full backing name; otherwise by path,
/// `name` taken relative to the overlay's directory.
fn find_base(chain: &Chain, name: &str) -> Option<usize> {
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    (1..chain.len()).find(|&i| {
        let overlay = chain.name(i - 1);
        let recorded = chain.recorded_backing(i - 1).unwrap_or_default();
        let full = path_combine(overlay, recorded);
        if qcow2::name::protocol(name).is_some() || qcow2::name::protocol(recorded).is_some() {
            return name == recorded || name == full;
        }
        canon(&path_combine(overlay, name)).is_some_and(|c| canon(&full) == Some(c))
    })
}

/// Opens `name` for writing, locked as a writer of a `format` image. A failure is worded
/// as QEMU's reopen of a backing file for writing words it (once "Could not open").
fn open_for_writing(name: &str, format: Format) -> anyhow::Result<std::fs::File> {
    let path = std::path::Path::new(name);
    let file = qcow2::open::open_file(path, false, false).map_err(|e| match e {
        qcow2::Error::Io { error, .. } => anyhow::anyhow!("Could not open '{name}': {error}"),
        e => crate::open_error(name, e),
    })?;
    crate::lock(&file, name, Locking::On, format, true)?;
    Ok(file)
}

/// Fails, as qemu-img's open of the chain does, when another process writes one of the
/// top's backing files. The locks are dropped again: the base is then opened for writing.
fn refuse_backing_writers(top: &std::fs::File, chain: &Chain, name: &str) -> anyhow::Result<()> {
    if chain.format(0) != Format::Qcow2 {
        return Ok(());
    }
    let opts = qcow2::OpenOptions {
        read_only: true,
        ..crate::writer_options()
    };
    let storage = Arc::new(FileStorage::new(top.try_clone()?));
    let dir = std::path::Path::new(name).parent();
    qcow2::Qcow2::open_storage(storage, &opts, dir)
        .map(drop)
        .map_err(|e| crate::open_error(name, e))
}

/// Grows the base to `size` bytes if it is smaller.
fn grow_base(name: &str, format: Format, size: u64) -> anyhow::Result<()> {
    let file = open_for_writing(name, format)?;
    match format {
        Format::Raw => {
            if file.metadata()?.len() < size {
                file.set_len(size)?;
            }
        }
        Format::Qcow2 => {
            // With its backing file: growing must hide what that holds past the old end.
            let dir = std::path::Path::new(name).parent();
            let mut q = crate::open_qcow2(
                Arc::new(FileStorage::new(file)),
                &crate::bitmap_keeping_writer_options(),
                dir,
                name,
            )?;
            if qcow2::Image::size(&q) < size {
                // In QEMU the block job grows the base, and keeps only the errno of a
                // refusal (a v2 image with snapshots, or over a longer backing file).
                q.resize(size, Preallocation::Off).map_err(|e| match e {
                    qcow2::Error::InvalidOption(_) => {
                        anyhow::anyhow!("Block job failed: Operation not supported")
                    }
                    e => anyhow::Error::new(e).context("Block job failed"),
                })?;
            }
        }
    }
    Ok(())
}

/// Whether the chain's extent `e` is written into the base at depth `b`: allocated above
/// it, or zeros synthesised past an intermediate image's end.
fn above(e: &crate::chain::Extent, b: usize) -> bool {
    (e.present && e.depth < b) || (e.zero && !e.present && e.depth + 1 < b)
}

/// The guest ranges the commit into the base at depth `b` writes, adjacent ones merged.
fn runs_above(chain: &Chain, b: usize) -> anyhow::Result<Vec<(u64, u64)>> {
    let size = chain.size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let e = chain.status_above(offset, size - offset, b)?;
        if above(&e, b) {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += e.length,
                _ => runs.push((offset, e.length)),
            }
        }
        offset += e.length;
    }
    Ok(runs)
}

/// The commit's block job: copies what the images above the base at depth `b` allocate
/// from `top` (the chain's top, read through it) into `base`.
fn copy_above(
    chain: &Chain,
    b: usize,
    top: &dyn Image,
    base: &dyn Image,
    rate: Option<&RateLimit>,
    progress: &Progress,
) -> anyhow::Result<()> {
    let size = chain.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        // Pieces end on the CHUNK grid, so that a long zero run is cut on cluster
        // boundaries of the base and stays zero clusters there.
        let piece = (CHUNK - offset % CHUNK).min(size - offset);
        let e = chain.status_above(offset, piece, b)?;
        if above(&e, b) {
            if let Some(rate) = rate {
                rate.wait(e.length);
            }
            if e.zero {
                base.write_zeroes(offset, e.length, true)?;
            } else {
                let chunk = &mut buf[..e.length as usize];
                top.read_at(chunk, offset)?;
                base.write_at(chunk, offset)?;
            }
        }
        offset += e.length;
        progress.add(e.length);
    }
    Ok(())
}

/// Opens the base for the commit's writes. A qcow2 base keeps its persistent bitmaps, with
/// `runs` (what the commit will write) marked dirty in the enabled ones before any write,
/// as qemu-img's writes mark them: a crash half-way leaves more marked, never less.
fn open_base(name: &str, format: Format, runs: &[(u64, u64)]) -> anyhow::Result<Box<dyn Image>> {
    match format {
        Format::Raw => crate::open(name, Some(format.name()), false, Locking::On),
        Format::Qcow2 => {
            let file = open_for_writing(name, format)?;
            let dir = std::path::Path::new(name).parent();
            let opts = crate::bitmap_keeping_writer_options();
            let q = crate::open_qcow2(Arc::new(FileStorage::new(file)), &opts, dir, name)?;
            crate::copy_bitmaps::mark_dirty(&q, runs)?;
            Ok(Box::new(q))
        }
    }
}

/// Runs `qimg commit`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    // Refused before the image is opened, in qemu-img's order.
    let rate = RateLimit::parse(a.rate.as_deref())?;
    if let Some(c) = a.cache.as_deref().filter(|c| !crate::valid_cache_mode(c)) {
        bail!("Invalid cache option: {c}");
    }
    // Opened for writing first, as qemu-img does. The chain is read without locks: the
    // images written (the top, emptied at the end, and the base) are locked as writers,
    // which keeps everyone else out.
    // An unknown format is refused before any file is opened, as qemu-img refuses it.
    if let Some(f) = &a.format {
        crate::parse_driver(&a.filename, f)?;
    }
    let top_file = crate::open_file(&a.filename, true)?;
    let chain = Chain::open(&a.filename, a.format.as_deref(), None, Locking::Off)?;
    if a.format.is_none() && chain.format(0) == Format::Raw {
        crate::warn_probed_raw(&a.filename);
    }
    crate::lock(&top_file, &a.filename, Locking::On, chain.format(0), true)?;
    refuse_backing_writers(&top_file, &chain, &a.filename)?;
    let b = match &a.base {
        None if chain.len() < 2 => bail!("Image does not have a backing file"),
        None => 1,
        Some(name) => find_base(&chain, name).with_context(|| {
            format!(
                "Did not find '{name}' in the backing chain of '{}'",
                a.filename
            )
        })?,
    };
    let size = chain.size();
    let base_name = chain.name(b);
    grow_base(base_name, chain.format(b), size)?;
    let top = crate::open(&a.filename, a.format.as_deref(), true, Locking::Off)?;
    let base = open_base(base_name, chain.format(b), &runs_above(&chain, b)?)?;
    let progress = Progress::new(a.progress && !a.quiet, size);
    copy_above(&chain, b, &*top, &*base, rate.as_ref(), &progress).context("Block job failed")?;
    base.flush()
        .with_context(|| format!("Error while flushing '{base_name}'"))?;
    drop(base);
    if a.base.is_none() && !a.drop_not {
        // Emptied, the image reads as before (through the base): its bitmaps stay valid.
        let storage = Arc::new(FileStorage::new(top_file));
        let opts = crate::bitmap_keeping_writer_options();
        let img = crate::open_qcow2(storage, &opts, None, &a.filename)?;
        img.make_empty()?;
    }
    progress.finish();
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}
