//! `qimg convert`: a parallel copy pipeline.
//!
//! The concatenated sources are cut into chunks that worker threads take in guest order.
//! A worker asks the source chain's block status which parts of its chunk read as zeros (so
//! holes and unallocated clusters are never read), gets the rest — straight from a memory map
//! of the file holding it (a raw file, or a qcow2 image's data file for plainly stored
//! clusters), else by reading it — drops blocks that are all zeros, and writes the
//! remaining runs as large writes, plainly or compressed (compression thus runs on all cores).
//!
//! Uncompressed writes into a new qcow2 image reserve their host clusters in chunk order (a
//! turnstile: chunk `i` reserves after chunk `i - 1`; chunks without data pass) and then
//! write out of turn, so the target is laid out in guest order like qemu-img's, without a
//! metadata lock per cluster. Data writes into the target take turns on a lock (the file
//! system serialises buffered writes to one file anyway). There is at most one worker per
//! CPU, and a worker waiting for that lock spins a little before it sleeps: the next writer
//! then starts as soon as the last one is done, instead of after the wake-up of an idle CPU.
//!
//! SIGINT or SIGTERM stops the workers from taking new chunks; the chunks in flight are
//! finished (chunks are taken in guest order, so the target then holds an exact prefix of the
//! sources), the target's metadata is written back, and qimg dies of the signal as qemu-img
//! would (see `interrupt.rs`). qemu-img itself leaves its cached metadata unwritten.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context};
use qcow2::{CreateOptions, Format, Image, Locking, Preallocation, Qcow2, SnapshotRef};

use crate::create::{qcow2_options, raw_options, OptionError, RawOptions};
use crate::interrupt::{signal_name, Interrupt};
use crate::progress::Progress;
use crate::qemu_opts;
use crate::rate_limit::RateLimit;
use crate::size::{cvtint_full, cvtnum};
use crate::snapshot_param;
use crate::source_map::{self, Mapping};
use crate::zero_runs;

/// Arguments of `qimg convert`, with qemu-img 10.0's long names.
#[derive(clap::Args)]
pub struct Args {
    /// Source format.
    #[arg(short = 'f', long = "source-format")]
    format: Option<String>,
    /// Convert this internal snapshot of the (first) source:
    /// `snapshot.id=ID[,snapshot.name=NAME]` or an ID or name. `-s ID_OR_NAME` is the older
    /// spelling (qemu-img 10 dropped it).
    #[arg(short = 'l', long = "snapshot", short_alias = 's')]
    snapshot: Option<String>,
    /// Output format (raw by default).
    #[arg(short = 'O', long = "output-format")]
    output_format: Option<String>,
    /// Output format options.
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Backing file of the target: only what the sources' top layers allocate is copied.
    #[arg(short = 'B', long = "backing")]
    backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Compress the output (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Do not create the target; write into an existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// The target is known to read as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Allow out-of-order writes (always done; accepted for compatibility).
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Copy offloading (copy_file_range): it changes how bytes are copied, not which, and
    /// qimg copies as it always does.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Number of parallel workers (1..16); at most one per CPU runs.
    #[arg(short = 'm', long = "parallel", default_value = "8")]
    workers: String,
    /// Minimum run of zero bytes to leave sparse (default 4k).
    #[arg(short = 'S', long = "sparse-size")]
    sparse: Option<String>,
    /// Cache mode of the target: unsafe (the default, as qemu-img's) ignores flushes;
    /// writeback, writethrough, none and directsync flush at the end.
    #[arg(short = 't', long = "output-cache", default_value = "unsafe")]
    cache: String,
    /// Cache mode of the sources (accepted for compatibility).
    #[arg(short = 'T', long = "source-cache")]
    src_cache: Option<String>,
    /// Open sources without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Write at most RATE bytes per second into the target (0: no limit).
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    rate: Option<String>,
    /// Copy what cannot be read from the sources as zeros, with a warning per sector (unless
    /// -q), instead of failing.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Copy the source's persistent dirty bitmaps into the (qcow2) target.
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps, skip inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// How images are named (`--image-opts` for the sources, `--target-image-opts`).
    #[command(flatten)]
    names: Names,
    /// Each source's format: `-f`, or the one its name gives (see `resolve_names`).
    #[arg(skip)]
    source_formats: Vec<Option<String>>,
    /// Source image(s), concatenated, then the target.
    files: Vec<String>,
}

/// How convert's images are named: `--image-opts` (or `--source-image-opts`) for the
/// sources, `--target-image-opts` for the target (see `image_name`).
#[derive(clap::Args)]
#[group(skip)]
struct Names {
    #[command(flatten)]
    common: crate::image_name::NameArgs,
    /// Treat each source name as a QEMU option string (as --image-opts).
    #[arg(long = "source-image-opts")]
    source_image_opts: bool,
    /// Treat the target name as a QEMU option string (needs -n).
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
}

impl Args {
    /// qemu-img's checks of the options together that come before any file is opened, and
    /// the refusal of the options qimg lacks.
    fn check_combinations(&self) -> anyhow::Result<()> {
        let l = &self.names;
        if self.skip_broken_bitmaps && !self.bitmaps {
            bail!("Use of --skip-broken-bitmaps requires --bitmaps");
        }
        if self.compress && self.copy_range {
            bail!("Cannot enable copy offloading when -c is used");
        }
        if self.sparse.is_some() && self.copy_range {
            bail!("Cannot enable copy offloading when -S is used");
        }
        if self.copy_range && self.salvage {
            bail!("Cannot use copy offloading in salvaging mode");
        }
        if l.target_image_opts && !self.no_create {
            bail!("--target-image-opts requires use of -n flag");
        }
        l.common.refuse_objects()
    }

    /// Replaces the sources' names by their files (their formats: `-f` or what the names
    /// give, in `source_formats`), the name of an existing target (`-n`) by its file and `-O`
    /// by its format, and the name of a new target by its file.
    fn resolve_names(&mut self) -> anyhow::Result<()> {
        let sources = self.files.len().saturating_sub(1);
        let image_opts = self.names.common.image_opts || self.names.source_image_opts;
        for name in &mut self.files[..sources] {
            let mut format = self.format.clone();
            crate::image_name::resolve(name, &mut format, image_opts)?;
            self.source_formats.push(format);
        }
        let Some(target) = self.files.get_mut(sources).filter(|_| sources > 0) else {
            return Ok(());
        };
        if !self.no_create {
            return crate::image_name::resolve_new(target);
        }
        // `-O` (raw by default) wins over a json: driver; an option string has none.
        let mut format = match self.names.target_image_opts {
            true => self.output_format.clone(),
            false => Some(
                self.output_format
                    .as_deref()
                    .unwrap_or(DEFAULT_FORMAT)
                    .to_owned(),
            ),
        };
        crate::image_name::resolve(target, &mut format, self.names.target_image_opts)?;
        if self.names.target_image_opts && format.is_none() {
            // Named without a driver: the format is probed, as QEMU opens it.
            let file = std::fs::File::open(&*target).map(qcow2::FileStorage::new);
            format = file
                .ok()
                .and_then(|f| qcow2::open::probe(&f).ok())
                .map(|f| f.name().to_owned());
        }
        self.output_format = format;
        Ok(())
    }

    /// The target's format: `-O`, the one its name gives, or raw.
    fn target_format(&self) -> &str {
        self.output_format.as_deref().unwrap_or(DEFAULT_FORMAT)
    }
}

/// The target's format without `-O`, as in qemu-img.
const DEFAULT_FORMAT: &str = "raw";

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

/// The target's storage with `-t unsafe`, qemu-img convert's default: flushes do nothing.
/// Metadata still reaches the file in the engine's crash-safe order (so an interrupted
/// convert leaves a consistent image), but nothing is forced to the disk.
struct NoFlush(qcow2::FileStorage);

impl qcow2::Storage for NoFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.allocate(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.zero_range(offset, len)
    }
    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.0.raw_fd()
    }
}

/// One source image, with a memory map of the file holding its data where possible.
struct Source {
    img: Box<dyn Image>,
    map: Option<Mapping>,
    /// The size qemu-img gives it: a raw file's size rounded up to whole sectors (the
    /// padding reads as zeros).
    size: u64,
}

impl Source {
    /// Where the guest bytes `[at, at + len)` lie in `map`, when they are stored there
    /// plainly and in one piece.
    fn host(&self, at: u64, len: u64) -> qcow2::Result<Option<(&Mapping, u64)>> {
        let Some(m) = &self.map else {
            return Ok(None);
        };
        let host = match self.img.format() {
            Format::Raw => Some(at),
            Format::Qcow2 => {
                let st = self.img.block_status(at, len)?;
                let plain = st.data && !st.zero && !st.compressed && st.len >= len;
                st.host_offset.filter(|_| plain)
            }
        };
        Ok(host
            .filter(|h| h.checked_add(len).is_some_and(|end| end <= m.file_len()))
            .map(|h| (m, h)))
    }
}

/// What a range of the sources needs in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Left unallocated: the target's backing file provides it.
    Skip,
    /// Reads as zeros.
    Zero,
    /// Guest data to copy.
    Data,
}

/// How the pipeline treats ranges, fixed for the whole run.
struct Policy {
    /// The target's name as given, for error messages.
    target_name: String,
    /// Granularity of zero detection where the target allocates whole blocks (a qcow2
    /// target's (sub)cluster); `-S` otherwise (chunks are multiples of it).
    block: u64,
    /// Data spans are read and written in whole blocks (a qcow2 target allocates whole
    /// (sub)clusters); otherwise only the source's data is, not the holes around it.
    whole_blocks: bool,
    /// `-S`: 0 copies everything as data.
    sparse: u64,
    /// `-C`: data ranges are copied whole, without looking for zeros in them (as
    /// qemu-img's copy offloading does).
    copy_range: bool,
    /// The target reads as zeros already: zero ranges need no write.
    fresh: bool,
    /// The size of the target's backing file, if it has one (`-B`): what the sources' top
    /// layers leave unallocated is left to it, and zeros past its end need no write.
    target_backing: Option<u64>,
    compress: bool,
    /// Reserve host clusters in guest order (uncompressed writes into a new qcow2 image).
    reserve: bool,
    /// `-r`: the target's write rate.
    rate: Option<RateLimit>,
    /// `--salvage`: sectors that cannot be read are copied as zeros (with a warning unless
    /// `quiet`).
    salvage: bool,
    quiet: bool,
    /// The storage of a new raw target, whose data ranges are allocated before writing.
    raw_storage: Option<Arc<dyn qcow2::Storage>>,
    /// Held while uncompressed data goes into the target. The file system serialises
    /// buffered writes to one file anyway (ext4's inode lock), but a writer waiting there
    /// spins on its core for as long as it waits; waiting here spins only briefly.
    writing: WriteLock,
}

/// Turns of the workers at writing into the target. Writing is the serial part of a
/// conversion, so the next writer should start the moment the last one is done. A waiter
/// sleeping on a plain lock gets there only after its CPU wakes up (tens of microseconds in a
/// virtual machine, per chunk); a waiter here spins for up to [`WriteLock::SPIN`] first (about
/// one chunk's write), and sleeps only after that. Spinning costs nothing the conversion needs
/// because there is at most one worker per CPU.
#[derive(Default)]
struct WriteLock(Mutex<()>);

impl WriteLock {
    /// How long a waiter spins before it sleeps.
    const SPIN: std::time::Duration = std::time::Duration::from_millis(1);

    /// Waits for the turn to write; it ends when the guard drops.
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        let start = std::time::Instant::now();
        while start.elapsed() < Self::SPIN {
            match self.0.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The concatenated sources.
struct Sources {
    list: Vec<Source>,
    total: u64,
}

impl Sources {
    /// The source holding guest offset `off`, and the offset inside it.
    fn locate(&self, mut off: u64) -> (&Source, u64) {
        for s in &self.list {
            if off < s.size {
                return (s, off);
            }
            off -= s.size;
        }
        unreachable!("offset past the sources")
    }

    /// Kind of the run at `off` (at most `len` bytes) and its length.
    fn classify(&self, off: u64, len: u64, p: &Policy) -> qcow2::Result<(Kind, u64)> {
        let (s, at) = self.locate(off);
        let len = len.min(s.size - at);
        if at >= s.img.size() {
            // The sector padding of a raw file.
            let kind = if p.sparse == 0 {
                Kind::Data
            } else {
                Kind::Zero
            };
            return Ok((kind, len));
        }
        let len = len.min(s.img.size() - at);
        if let Some(backing_end) = p.target_backing {
            return target_backing_kind(&*s.img, off, at, len, backing_end, p.sparse);
        }
        if p.sparse == 0 {
            return Ok((Kind::Data, len));
        }
        let (zero, run) = chain_zero(&*s.img, at, len)?;
        Ok((if zero { Kind::Zero } else { Kind::Data }, run))
    }

    /// [`Sources::classify`] with qemu-img's handling of errors: they fail the conversion,
    /// or with `--salvage` the range is narrowed (to a quarter at a time, as QEMU does) down
    /// to the sector that fails, which is then read as data (warned about unless quiet).
    fn status(&self, off: u64, len: u64, p: &Policy) -> anyhow::Result<(Kind, u64)> {
        let mut len = len;
        loop {
            match self.classify(off, len, p) {
                Ok(status) => return Ok(status),
                Err(e) if p.salvage && len <= 512 => {
                    if !p.quiet {
                        errln!(
                            "{}: warning: error while reading block status at offset {off}: {}",
                            crate::progname(),
                            read_error_text(&e)
                        );
                    }
                    return Ok((Kind::Data, len));
                }
                Err(_) if p.salvage => len = (len.div_ceil(512).div_ceil(4) * 512).min(len),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("error while reading block status at offset {off}")
                    })
                }
            }
        }
    }

    /// Starts reading the memory-mapped data of `[off, off + len)` into the page cache, ahead
    /// of its copy. Only a hint: errors are left to the copy, which reports them.
    fn prefetch(&self, off: u64, len: u64, p: &Policy) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let Ok((kind, run)) = self.classify(pos, end - pos, p) else {
                return;
            };
            if run == 0 {
                return;
            }
            if kind == Kind::Data {
                // Rounded out to whole blocks where the copy reads it so (`plan`): a page at
                // an edge the copy faults in would start a readahead running on into the hole.
                let block = if p.whole_blocks { p.block } else { 1 };
                let s = off + (pos - off) / block * block;
                let e = (off + (pos + run - off).next_multiple_of(block)).min(end);
                let data = match self.mapped(s, e - s) {
                    Ok(Some(data)) => Some(data),
                    _ => self.mapped(pos, run).ok().flatten(),
                };
                if let Some(data) = data {
                    for m in self.list.iter().filter_map(|s| s.map.as_ref()) {
                        m.prefetch(data);
                    }
                }
            }
            pos += run;
        }
    }

    /// Where qemu-img's read of the data span starting at `span` that covers `at` starts: in
    /// [`READ_PIECE`]s from the source's start, not before the span.
    fn piece_start(&self, span: u64, at: u64) -> u64 {
        let (_, inside) = self.locate(at);
        (at - inside % READ_PIECE).max(span)
    }

    /// Data of `[off, off + len)` as a slice of a memory map, if one source covers it.
    fn mapped(&self, off: u64, len: u64) -> qcow2::Result<Option<&[u8]>> {
        let (s, at) = self.locate(off);
        if at + len > s.img.size() {
            return Ok(None);
        }
        Ok(s.host(at, len)?.map(|(m, host)| m.slice(host, len)))
    }

    /// Reads the data at `off` into `buf`.
    fn read_into(&self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let (s, at) = self.locate(off + pos as u64);
            let n = ((s.size - at) as usize).min(buf.len() - pos);
            let real = (s.img.size().saturating_sub(at) as usize).min(n);
            match s.host(at, real as u64)? {
                Some((m, host)) => {
                    let data = m.slice(host, real as u64);
                    source_map::fault_in(data)
                        .map_err(|_| qcow2::Error::io("reading a mapped source", read_error()))?;
                    buf[pos..pos + real].copy_from_slice(data);
                }
                None => s.img.read_at(&mut buf[pos..pos + real], at)?,
            }
            buf[pos + real..pos + n].fill(0);
            pos += n;
        }
        Ok(())
    }

    /// `--salvage`: reads the data at `off` into `buf` sector by sector, the sectors that
    /// cannot be read as zeros, each with qemu-img's warning unless `quiet`.
    fn salvage(&self, off: u64, buf: &mut [u8], quiet: bool) {
        for (k, sector) in buf.chunks_mut(512).enumerate() {
            let at = off + k as u64 * 512;
            if let Err(e) = self.read_into(at, sector) {
                sector.fill(0);
                if !quiet {
                    errln!(
                        "{}: warning: error while reading offset {at}: {}",
                        crate::progname(),
                        read_error_text(&e)
                    );
                }
            }
        }
    }
}

/// The error of a source page that could not be read through its map (the kernel does not
/// say why; a disk error is the likely reason).
fn read_error() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

/// How qemu-img names a read error: the system's words for an I/O error with an errno,
/// else (a corrupt or undecodable image) the I/O error the block layer reports.
fn read_error_text(e: &qcow2::Error) -> String {
    let os = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error);
    match os {
        Some(code) => std::io::Error::from_raw_os_error(code)
            .to_string()
            .split(" (os error")
            .next()
            .unwrap_or_default()
            .to_string(),
        None => "Input/output error".into(),
    }
}

/// Kind of the run at source offset `at` (guest offset `off`, at most `len` bytes) of `img`
/// when the target has a backing file of `backing_end` bytes, and its length (QEMU's rules):
/// what the source's top layer leaves to its own backing file is left to the target's; what
/// it leaves unallocated with no backing file under it reads as zeros, which the target needs
/// written only where its backing file reaches. With `-S 0` (`sparse` 0) zeros are data.
fn target_backing_kind(
    img: &dyn Image,
    off: u64,
    at: u64,
    len: u64,
    backing_end: u64,
    sparse: u64,
) -> qcow2::Result<(Kind, u64)> {
    let st = img.block_status(at, len)?;
    let (kind, mut run) = match (st.allocated, img.backing()) {
        (true, _) if st.zero && !st.data => (Kind::Zero, st.len),
        (true, _) => (Kind::Data, st.len),
        // As in QEMU, a run is judged by its start: one that starts inside the source's
        // backing file is left to the target's as a whole.
        (false, Some(b)) if at < b.size() => (Kind::Skip, st.len),
        (false, _) => (Kind::Zero, st.len),
    };
    let kind = match kind {
        Kind::Zero if off >= backing_end => Kind::Skip,
        Kind::Zero => {
            run = run.min(backing_end - off);
            if sparse == 0 {
                Kind::Data
            } else {
                Kind::Zero
            }
        }
        k => k,
    };
    Ok((kind, run))
}

/// Whether `[off, off + run)` of `img` (with its backing chain) reads as zeros, for the
/// longest such `run` up to `len`.
fn chain_zero(img: &dyn Image, off: u64, len: u64) -> qcow2::Result<(bool, u64)> {
    let st = img.block_status(off, len)?;
    if st.allocated {
        return Ok((st.zero && !st.data, st.len));
    }
    match img.backing() {
        Some(b) if off < b.size() => chain_zero(b, off, st.len.min(b.size() - off)),
        _ => Ok((true, st.len)),
    }
}

/// A run of a chunk to write.
struct Run<'a> {
    off: u64,
    kind: Kind,
    len: u64,
    data: &'a [u8],
}

/// Splits `[off, off + len)` of the sources into runs: block-aligned data spans (got from the
/// sources and cut further where whole blocks are zeros), zero ranges and skipped ranges.
fn plan<'a>(
    src: &'a Sources,
    target: &Target,
    off: u64,
    len: u64,
    p: &Policy,
    buf: &'a mut [u8],
) -> anyhow::Result<Vec<Run<'a>>> {
    let end = off + len;
    // Ranges by kind, with data spans rounded out to whole blocks.
    let mut ranges: Vec<(u64, u64, Kind)> = Vec::new();
    let mut pos = off;
    while pos < end {
        let (mut kind, run) = src.status(pos, end - pos, p)?;
        let (mut s, mut e) = (pos, pos + run);
        pos = e;
        // Compressed clusters are written whole: a zero or backing span counts in whole
        // blocks only, and a block it covers in part is read from the sources, as qemu-img
        // reads it.
        if p.compress && kind != Kind::Data {
            let whole = off + (e - off) / p.block * p.block;
            match whole > s {
                true => (e, pos) = (whole, whole),
                false => kind = Kind::Data,
            }
        }
        if kind == Kind::Data && p.whole_blocks {
            s = off + (s - off) / p.block * p.block;
            e = (off + (e - off).next_multiple_of(p.block)).min(end);
            pos = e;
        }
        // A data span rounded down swallows the end of what precedes it.
        while let Some(last) = ranges.last_mut() {
            if last.1 <= s {
                break;
            }
            if last.0 >= s {
                ranges.pop();
            } else {
                last.1 = s;
            }
        }
        match ranges.last_mut() {
            Some((_, le, lk)) if *le == s && *lk == kind => *le = e,
            _ => ranges.push((s, e, kind)),
        }
    }
    // Read every data span that has no memory map into its place in `buf`, then hand out
    // slices.
    let mut runs = Vec::new();
    let mut rest: &'a mut [u8] = buf;
    let mut rest_off = off;
    for (s, e, kind) in ranges {
        if kind != Kind::Data {
            runs.push(Run {
                off: s,
                kind,
                len: e - s,
                data: &[],
            });
            continue;
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - rest_off) as usize);
        let (mine, tail) = tail.split_at_mut((e - s) as usize);
        rest = tail;
        rest_off = e;
        let kept = kept_by_target(src, p, s, e)?;
        let data: &[u8] = match src.mapped(s, e - s) {
            Ok(Some(mapped)) if kept.is_empty() => {
                if let Err(at) = source_map::fault_in(mapped) {
                    let piece = src.piece_start(s, s + at as u64);
                    return Err(read_error())
                        .context(format!("error while reading at byte {piece}"));
                }
                mapped
            }
            // A mapping that fails is found again by the read, which reports it.
            _ => {
                read_span(src, p, s, mine)?;
                for (ks, ke) in kept {
                    let piece = &mut mine[(ks - s) as usize..(ke - s) as usize];
                    target.image().read_at(piece, ks).with_context(|| {
                        format!("{}: error while reading at byte {ks}", p.target_name)
                    })?;
                }
                mine
            }
        };
        split_zero_blocks(&mut runs, s, data, p);
    }
    Ok(runs)
}

/// How much of a data span qemu-img's convert reads at a time (its buffer): read errors name
/// the start of the piece that failed.
const READ_PIECE: u64 = 2 << 20;

/// Reads the sources' data at `off` into `buf`, in [`READ_PIECE`]s counted from each
/// source's start (`--salvage`: what cannot be read as zeros).
fn read_span(src: &Sources, p: &Policy, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    let end = off + buf.len() as u64;
    let mut at = off;
    while at < end {
        let (s, inside) = src.locate(at);
        let base = at - inside;
        let next = (base + (inside / READ_PIECE + 1) * READ_PIECE)
            .min(base + s.size)
            .min(end);
        let piece = &mut buf[(at - off) as usize..(next - off) as usize];
        let read = src.read_into(at, piece);
        let piece_at = at;
        at = next;
        match read {
            Ok(()) => {}
            Err(_) if p.salvage => src.salvage(piece_at, piece, p.quiet),
            Err(err) => return Err(err).context(format!("error while reading at byte {piece_at}")),
        }
    }
    Ok(())
}

/// With a target backing file (`-B`): the ranges of the data span `[s, e)` that the sources'
/// top layers leave to their backing files, which the span took in when it was rounded out to
/// whole blocks. They must keep what the target shows there (its backing file's data in a new
/// target), as QEMU's copy-on-write of a partly written cluster keeps it, not get the
/// sources' backing files' data. Compressed clusters are written whole from the sources, as
/// qemu-img writes them.
fn kept_by_target(src: &Sources, p: &Policy, s: u64, e: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut kept: Vec<(u64, u64)> = Vec::new();
    if p.target_backing.is_none() || p.compress {
        return Ok(kept);
    }
    let mut pos = s;
    while pos < e {
        let (kind, run) = src.status(pos, e - pos, p)?;
        let end = (pos + run).min(e);
        if kind == Kind::Skip {
            match kept.last_mut() {
                Some((_, last_end)) if *last_end == pos => *last_end = end,
                _ => kept.push((pos, end)),
            }
        }
        pos = end;
    }
    Ok(kept)
}

/// Appends `data` (at guest `off`) as runs of data and zeros. The zeros are the runs
/// qemu-img's convert leaves out with `-S` ([`zero_runs`]); where the target allocates whole
/// blocks (aligned in the guest), a block that data touches is written whole. Compressed
/// clusters are zero only when all of their bytes are, as qemu-img checks them.
fn split_zero_blocks<'a>(runs: &mut Vec<Run<'a>>, off: u64, data: &'a [u8], p: &Policy) {
    // The start and end of the block holding byte `i` of `data`, within `data`.
    let block_start = |i: usize| ((off + i as u64) / p.block * p.block).saturating_sub(off);
    let block_end = |i: usize| {
        let end = ((off + i as u64) / p.block + 1) * p.block - off;
        end.min(data.len() as u64) as usize
    };
    // Data pieces of `data`, in order.
    let mut found: Vec<(usize, usize)> = Vec::new();
    if p.sparse == 0 || p.copy_range {
        found.push((0, data.len()));
    } else if p.compress {
        let mut i = 0;
        while i < data.len() {
            let e = block_end(i);
            if data[i..e].iter().any(|&b| b != 0) {
                found.push((i, e));
            }
            i = e;
        }
    } else {
        let mut at = 0;
        for (is_data, len) in zero_runs::runs(data, off / 512, p.sparse) {
            if is_data {
                found.push((at, at + len));
            }
            at += len;
        }
    }
    let mut push = |kind: Kind, s: usize, e: usize| match runs.last_mut() {
        // Only runs of this span join: another's data is another slice.
        Some(last)
            if last.kind == kind && last.off >= off && last.off + last.len == off + s as u64 =>
        {
            last.len += (e - s) as u64;
            if kind == Kind::Data {
                last.data = &data[(last.off - off) as usize..e];
            }
        }
        _ => runs.push(Run {
            off: off + s as u64,
            kind,
            len: (e - s) as u64,
            data: if kind == Kind::Data { &data[s..e] } else { &[] },
        }),
    };
    let mut done = 0;
    for (s, e) in found {
        let (s, e) = match p.whole_blocks {
            true => (block_start(s) as usize, block_end(e - 1)),
            false => (s, e),
        };
        if s > done {
            push(Kind::Zero, done, s);
        }
        if e > done {
            push(Kind::Data, s.max(done), e);
            done = e;
        }
    }
    if done < data.len() {
        push(Kind::Zero, done, data.len());
    }
}

/// Largest `-S` qemu-img accepts (its bounce buffer, 32768 sectors).
const MAX_SPARSE: u64 = 16 << 20;

/// How far ahead of the chunk it copies a worker prefetches the sources' data: the page
/// cache is filled from a cold source by the kernel's large asynchronous reads rather than
/// by the copy's page faults, synchronously (2 GiB raw → qcow2 from a cold cache:
/// 1.14 s without, 0.86 s at 8 MiB ahead, 0.75 s at 16 MiB; 32 MiB no better; see
/// docs/benchmarks.md).
const READ_AHEAD: u64 = 16 << 20;

/// The error of workers stopped because another one failed.
const FOLLOWER: &str = "another convert worker failed";

/// Lets chunk `i` go after chunk `i - 1` (for reservations in guest order). Chunks with
/// nothing to reserve pass without waiting.
#[derive(Default)]
struct Turnstile {
    state: Mutex<TurnState>,
    moved: Condvar,
    failed: AtomicBool,
}

#[derive(Default)]
struct TurnState {
    /// The chunk whose turn it is.
    next: u64,
    /// Later chunks that passed already (nothing to reserve).
    passed: BTreeSet<u64>,
}

impl TurnState {
    /// Ends the turn of `next` and of the chunks after it that passed already.
    fn advance(&mut self) {
        self.next += 1;
        while self.passed.remove(&self.next) {
            self.next += 1;
        }
    }
}

impl Turnstile {
    fn lock(&self) -> std::sync::MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in chunk `i`'s turn; fails if another worker failed meanwhile.
    fn run<T>(&self, i: u64, f: impl FnOnce() -> T) -> anyhow::Result<T> {
        let mut st = self.lock();
        while st.next != i {
            if self.failed.load(Ordering::SeqCst) {
                bail!(FOLLOWER);
            }
            st = self.moved.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let r = f();
        st.advance();
        self.moved.notify_all();
        Ok(r)
    }

    /// Chunks `chunks` have nothing to reserve: their turns need no waiting. (On a
    /// mostly-empty disk this spares thousands of sleeps and wake-ups.)
    fn pass(&self, chunks: std::ops::Range<u64>) {
        let mut st = self.lock();
        if st.next == chunks.start {
            st.next = chunks.end - 1;
            st.advance();
            self.moved.notify_all();
        } else {
            st.passed.extend(chunks);
        }
    }

    /// Whether a worker failed: the others stop taking chunks.
    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _g = self.lock();
        self.moved.notify_all();
    }
}

/// How the target is to be created.
enum Creation {
    Qcow2(CreateOptions),
    Raw(RawOptions),
}

/// Runs `qimg convert`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    let _ = a.out_of_order;
    // What getopt's loop checks, as it reads the options.
    let options = qemu_opts::accumulate(&a.options)?;
    let snapshot = snapshot_param::parse_given(a.snapshot.as_deref())?;
    let sparse =
        (a.sparse.as_deref()).map_or(Ok(4096), |s| cvtnum("buffer size for sparse output", s))?;
    if sparse % 512 != 0 || sparse > MAX_SPARSE {
        bail!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
        );
    }
    let workers = cvtint_full("number of coroutines", &a.workers, 1, 16)? as u32;
    let rate = RateLimit::parse(a.rate.as_deref())?;
    // Then, in qemu-img's order, the checks of the options together.
    a.check_combinations()?;
    a.resolve_names()?;
    if a.no_create && options.is_some() {
        bail!("-o has no effect when skipping image creation");
    }
    if a.target_is_zero && !a.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if options.as_deref().is_some_and(qemu_opts::has_help) {
        let target = a.files.last().filter(|_| a.files.len() > 1);
        qemu_opts::print_help(
            crate::parse_format(a.target_format())?,
            target.map(|t| t.as_str()),
        );
        return Ok(0);
    }
    let (Some(target_name), [_, ..]) =
        (a.files.last(), &a.files[..a.files.len().saturating_sub(1)])
    else {
        bail!("Must specify image file name");
    };
    let source_names = &a.files[..a.files.len() - 1];
    if a.bitmaps && source_names.len() > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    if let Some(c) = &a.src_cache {
        if !crate::valid_cache_mode(c) {
            bail!("Invalid source cache option: {c}");
        }
    }
    let interrupt = Interrupt::catch()?;
    let rate = rate.map(|r| r.interruptible(interrupt.clone()));
    let flushes = match a.cache.as_str() {
        "unsafe" => false,
        "writeback" | "writethrough" | "none" | "directsync" => true,
        c => bail!("Invalid cache option: {c}"),
    };
    if matches!(snapshot, Some(SnapshotRef::IdOrName(_))) && source_names.len() > 1 {
        bail!("No support for concatenating multiple snapshot");
    }
    let list: Vec<Source> = source_names
        .iter()
        .enumerate()
        .map(|(i, s)| -> anyhow::Result<Source> {
            let view = if i == 0 { snapshot.clone() } else { None };
            let locking = crate::source_locking(a.force_share);
            let img = crate::open_at(s, a.source_formats[i].as_deref(), true, view, locking)?;
            // `--salvage` reads: a read error then fails one read, which is narrowed down to
            // the sectors that fail, instead of one page of a map.
            let map = match a.salvage {
                true => None,
                false => img.data_fd().and_then(Mapping::new),
            };
            let size = img.size().next_multiple_of(512);
            Ok(Source { img, map, size })
        })
        .collect::<anyhow::Result<_>>()?;
    let bitmap_source = match a.bitmaps {
        true => Some(crate::copy_bitmaps::source(
            &source_names[0],
            a.source_formats[0].as_deref(),
            a.skip_broken_bitmaps,
            crate::source_locking(a.force_share),
        )?),
        false => None,
    };
    let total: u64 = list.iter().map(|s| s.size).sum();
    let sources = Sources { list, total };
    let pairs = options.map_or_else(Vec::new, |o| qemu_opts::parse(&o));
    let target_path = Path::new(target_name);
    // The format the target is created in (or, with -n, opened as).
    let out_fmt = match a.no_create {
        false => crate::parse_format(a.target_format())?,
        true => crate::parse_driver(target_name, a.target_format())?,
    };
    let mut fresh = a.target_is_zero;
    let mut target_backing = None;
    // A target created preallocated has its clusters: the data goes into them.
    let mut preallocated = false;
    // Claiming each new table's file space as it is allocated is skipped (a system call
    // per table) only where whole clusters are reserved ahead, whose failures give their
    // space back: elsewhere (compressed, subclusters, -n into the user's image) a full file
    // system would leave the tables unwritten, and what was written unmapped and leaked.
    let mut defer_space_claims = false;
    if !a.no_create {
        // The backing file of the target: -B, or else -o backing_file.
        let backing = a
            .backing
            .as_deref()
            .or(qemu_opts::last(&pairs, "backing_file"));
        let created = match out_fmt {
            Format::Qcow2 => {
                let mut o = qcow2_options(
                    &pairs,
                    CreateOptions {
                        size: total,
                        ..Default::default()
                    },
                )
                .map_err(|e| match e {
                    OptionError::Value { .. } => {
                        anyhow::anyhow!("{target_name}: error while converting qcow2: {e}")
                    }
                    _ => e.into(),
                })?;
                // As qemu-img: the target has the sources' size whatever `-o size` says.
                o.size = total;
                o.locking = Locking::On;
                if a.backing.is_some() {
                    o.backing_file.clone_from(&a.backing);
                }
                if a.backing_format.is_some() {
                    o.backing_format.clone_from(&a.backing_format);
                }
                Creation::Qcow2(o)
            }
            Format::Raw => {
                let o = raw_options(&pairs)?;
                if a.backing.is_some() {
                    bail!("Backing file not supported for file format 'raw'");
                }
                if a.backing_format.is_some() {
                    bail!("Backing file format not supported for file format 'raw'");
                }
                Creation::Raw(o)
            }
        };
        if backing.is_some() && sources.list.len() > 1 {
            bail!(
                "Having a backing file for the target makes no sense when concatenating \
                 multiple input images"
            );
        }
        if let Creation::Qcow2(o) = &created {
            if o.backing_file.is_some() && o.backing_format.is_none() {
                bail!("Use of backing file requires explicit backing format");
            }
        }
        if a.compress && out_fmt != Format::Qcow2 {
            bail!("Compression not supported for this file format");
        }
        if let Creation::Qcow2(o) = &created {
            if a.compress && o.preallocation != Preallocation::Off {
                bail!("Compression and preallocation not supported at the same time");
            }
            preallocated = o.preallocation != Preallocation::Off;
            defer_space_claims =
                !a.compress && !preallocated && !o.extended_l2 && o.data_file.is_none();
        }
        match created {
            Creation::Qcow2(o) => {
                crate::create::check_backing_format(&o).map_err(|e| {
                    anyhow::anyhow!("{target_name}: error while converting qcow2: {e}")
                })?;
                qcow2::create(target_path, &o).map_err(|e| {
                    anyhow::anyhow!("{target_name}: error while converting qcow2: {e}")
                })?;
                // Filled in once the target is open: the size of its backing file.
                target_backing = o.backing_file.is_some().then_some(0);
                fresh = target_backing.is_none();
            }
            Creation::Raw(o) => {
                crate::create::create_raw(target_path, total, &o).map_err(|e| {
                    anyhow::anyhow!("{target_name}: error while converting raw: {e:#}")
                })?;
                fresh = true;
            }
        }
    } else if a.backing.is_some() {
        // The target is left as it is: the sources' top layers are copied over whatever it
        // shows where they leave clusters unallocated, and zeros are written wherever they
        // read as zeros (the end of the target's backing file is not known).
        if a.target_is_zero {
            // qemu-img says so, but exits with 0.
            crate::print_error(
                "Cannot use --target-is-zero when the destination image has a backing file",
            );
            return Ok(0);
        }
        if sources.list.len() > 1 {
            bail!(
                "Having a backing file for the target makes no sense when concatenating \
                 multiple input images"
            );
        }
        target_backing = Some(u64::MAX);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target_path)
        .map_err(|e| crate::file_open_error(target_name, e))?;
    crate::lock(&file, target_name, Locking::On, out_fmt, true)?;
    let storage: Arc<dyn qcow2::Storage> = if flushes {
        Arc::new(qcow2::FileStorage::new(file))
    } else {
        Arc::new(NoFlush(qcow2::FileStorage::new(file)))
    };
    let raw_storage = (out_fmt == Format::Raw && !a.no_create).then(|| storage.clone());
    let target = match out_fmt {
        Format::Qcow2 => {
            // Backing and data file names are relative to the target's directory (none
            // for a bare file name, as QEMU's `path_combine`).
            let dir = target_path.parent();
            // With -n the target's own bitmaps stay (updated after the copy), and clusters
            // the zeros free are released from the file, as qemu-img's unmapping zero
            // writes release them.
            let opts = qcow2::OpenOptions {
                defer_space_claims,
                keep_bitmaps: a.no_create,
                unmap: true,
                ..Default::default()
            };
            Target::Qcow2(Box::new(crate::open_qcow2(
                storage,
                &opts,
                dir,
                target_name,
            )?))
        }
        Format::Raw => {
            if a.no_create {
                // As QEMU's file driver: an existing target counts as its size rounded up to
                // 512 bytes, and the copy's last sector extends the file.
                let len = storage.len()?;
                if len < total && len.next_multiple_of(512) >= total {
                    storage.set_len(total)?;
                }
            }
            Target::Other(Box::new(
                qcow2::RawImage::new(storage, false)
                    .map_err(|e| crate::open_error(target_name, e))?,
            ))
        }
    };
    if a.bitmaps && !matches!(&target, Target::Qcow2(q) if q.header().version >= 3) {
        bail!(
            "Format driver '{}' does not support bitmaps",
            out_fmt.name()
        );
    }
    if a.no_create && target.image().size().next_multiple_of(512) < total {
        bail!("output file is smaller than input file");
    }
    if let (Target::Qcow2(q), true) = (&target, a.no_create) {
        // Before the first write: however the copy ends, they cover it.
        crate::copy_bitmaps::dirty_enabled(q)?;
    }
    if a.compress && !matches!(target, Target::Qcow2(_)) {
        bail!("Compression not supported for this file format");
    }
    // Subclusters of a target with extended L2 entries are allocated one by one (compressed
    // clusters have none).
    let block = match &target {
        Target::Qcow2(q) if a.compress => q.cluster_size(),
        Target::Qcow2(q) => q.subcluster_size(),
        Target::Other(_) => sparse.max(512),
    };
    let policy = Policy {
        target_name: target_name.clone(),
        block,
        whole_blocks: matches!(target, Target::Qcow2(_)),
        sparse,
        copy_range: a.copy_range,
        fresh,
        target_backing: target_backing.map(|end| match end {
            0 => target.image().backing().map_or(0, |b| b.size()),
            end => end,
        }),
        compress: a.compress,
        raw_storage,
        writing: WriteLock::default(),
        rate,
        salvage: a.salvage,
        quiet: a.quiet,
        // Reservations are of whole clusters: not for runs of subclusters, nor where the
        // clusters are there already.
        reserve: matches!(&target, Target::Qcow2(q)
            if !a.compress && !a.no_create && !preallocated && !q.has_data_file()
                && block == q.cluster_size()),
    };
    let chunk = (4u64 << 20).next_multiple_of(block);
    let chunks = sources.total.div_ceil(chunk);
    let next = AtomicU64::new(0);
    let turn = Turnstile::default();
    let progress = Progress::new(a.progress && !a.quiet, sources.total);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..worker_count(workers, chunks))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let mut buf = vec![0u8; chunk as usize];
                    loop {
                        // Checked before taking a chunk: every chunk taken is finished, or
                        // the turnstile would wait for it forever.
                        if interrupt.caught().is_some() || turn.has_failed() {
                            return Ok(());
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks {
                            return Ok(());
                        }
                        let off = i * chunk;
                        let span = claim_empty_span(&sources, &policy, &next, i, chunk, chunks);
                        let (r, len) = match span {
                            Ok(Some((kind, end))) => {
                                // What follows the span had no chunk before it to prefetch it.
                                let after = end * chunk;
                                if after < sources.total {
                                    let ahead = READ_AHEAD.min(sources.total - after);
                                    sources.prefetch(after, ahead, &policy);
                                }
                                let len = (end * chunk).min(sources.total) - off;
                                let r = fill_empty_span(
                                    &target,
                                    &policy,
                                    &turn,
                                    kind,
                                    i..end,
                                    off,
                                    len,
                                );
                                (r, len)
                            }
                            Ok(None) => {
                                prefetch_ahead(&sources, &policy, off, chunk);
                                let len = chunk.min(sources.total - off);
                                let r = copy_chunk(
                                    &sources, &target, &policy, &turn, i, off, len, &mut buf,
                                );
                                (r, len)
                            }
                            Err(e) => (Err(e), 0),
                        };
                        if r.is_err() {
                            turn.fail();
                            return r;
                        }
                        progress.add(len);
                    }
                })
            })
            .collect();
        let mut first: Option<anyhow::Error> = None;
        for w in workers {
            let r = w
                .join()
                .map_err(|_| anyhow::anyhow!("a convert worker panicked"))
                .and_then(|r| r);
            if let Err(e) = r {
                // Report the first real error, not a follower's.
                let follower = |e: &anyhow::Error| e.root_cause().to_string() == FOLLOWER;
                if first.as_ref().is_none_or(|f| follower(f) && !follower(&e)) {
                    first = Some(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    })?;
    target
        .image()
        .flush()
        .with_context(|| format!("Error while flushing '{target_name}'"))?;
    if let Some(sig) = interrupt.caught() {
        progress.abandon();
        let done = (next.load(Ordering::Relaxed).min(chunks) * chunk).min(sources.total);
        errln!(
            "{}: convert interrupted by {}: '{target_name}' is consistent and holds the first \
             {done} of {} bytes",
            crate::progname(),
            signal_name(sig),
            sources.total
        );
        Interrupt::die(sig);
    }
    if let (Target::Qcow2(q), true, None) = (&target, policy.compress, policy.target_backing) {
        // qemu-img ends compressed writes with an empty one, which makes the file end on a
        // whole sector.
        let file = q.file();
        let len = file.len()?;
        if len % 512 != 0 {
            file.set_len(len.next_multiple_of(512))
                .with_context(|| format!("Error while writing '{target_name}'"))?;
        }
    }
    if let (Some(src), Target::Qcow2(q)) = (&bitmap_source, &target) {
        crate::copy_bitmaps::copy(src, q)?;
        q.flush()
            .with_context(|| format!("Error while flushing '{target_name}'"))?;
    }
    progress.finish();
    Ok(0)
}

/// How many workers copy `chunks` chunks with `-m requested`: no more than there are chunks or
/// CPUs. Workers beyond one per CPU add nothing (the writes into the target are serial, the
/// rest is CPU work) but take the CPU from the one that is writing, and waiters on the write
/// lock would spin on a CPU that others need.
fn worker_count(requested: u32, chunks: u64) -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    requested
        .min(cpus)
        .min(u32::try_from(chunks).unwrap_or(u32::MAX))
        .max(1)
}

/// When chunk `i` (just taken) starts a run without data (zeros, or left to the target's
/// backing file) that covers whole chunks after it, takes those too, unless another worker
/// took the next one already; returns the run's kind and the end of the claim (a chunk
/// number). One block-status query then covers a hole of any size: a sparse 100 GiB disk
/// would otherwise cost one query and one turn per 4 MiB chunk.
fn claim_empty_span(
    src: &Sources,
    p: &Policy,
    next: &AtomicU64,
    i: u64,
    chunk: u64,
    chunks: u64,
) -> anyhow::Result<Option<(Kind, u64)>> {
    let off = i * chunk;
    let (kind, run) = src.status(off, src.total - off, p)?;
    if kind == Kind::Data {
        return Ok(None);
    }
    let end = if off + run >= src.total {
        chunks
    } else {
        (off + run) / chunk
    };
    if end <= i + 1 {
        return Ok(None);
    }
    let claimed = next
        .compare_exchange(i + 1, end, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok();
    Ok(claimed.then_some((kind, end)))
}

/// Writes chunks `chunks` (`[off, off + len)` of the guest), which hold no data: zeros where
/// the target does not read as zeros already, nothing where its backing file shows through.
fn fill_empty_span(
    target: &Target,
    p: &Policy,
    turn: &Turnstile,
    kind: Kind,
    chunks: std::ops::Range<u64>,
    off: u64,
    len: u64,
) -> anyhow::Result<()> {
    if kind == Kind::Zero && !p.fresh {
        if let Some(rate) = &p.rate {
            rate.wait(len);
        }
        target
            .image()
            .write_zeroes(off, len, true)
            .with_context(|| format!("{}: error while writing at byte {off}", p.target_name))?;
    }
    if p.reserve {
        turn.pass(chunks);
    }
    Ok(())
}

/// Prefetches what a worker about to copy the chunk at `off` should: the chunk
/// [`READ_AHEAD`] (rounded up to whole chunks) further on, and the chunk itself when it lies
/// in the first [`READ_AHEAD`] (no chunk before it prefetched it).
fn prefetch_ahead(src: &Sources, p: &Policy, off: u64, chunk: u64) {
    let first = (off < READ_AHEAD).then_some(off);
    for at in first
        .into_iter()
        .chain([off + READ_AHEAD.next_multiple_of(chunk)])
    {
        if at < src.total {
            src.prefetch(at, chunk.min(src.total - at), p);
        }
    }
}

/// Copies one chunk (number `i`, at `off`) of the sources into the target.
#[allow(clippy::too_many_arguments)]
fn copy_chunk(
    src: &Sources,
    target: &Target,
    p: &Policy,
    turn: &Turnstile,
    i: u64,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    let runs = plan(src, target, off, len, p, &mut buf[..len as usize])?;
    let written = write_chunk(target, p, turn, i, &runs);
    // A page of a source's map that failed after `plan` touched it (evicted, and read again
    // with an error) was read as zeros, or failed the write with EFAULT.
    let efault = written.as_ref().is_err_and(|e| {
        e.chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| io.raw_os_error() == Some(libc::EFAULT))
    });
    if source_map::take_fault().is_some() || efault {
        return Err(read_error()).context(format!("error while reading at byte {off}"));
    }
    written.with_context(|| format!("{}: error while writing at byte {off}", p.target_name))?;
    for r in &runs {
        for m in src.list.iter().filter_map(|s| s.map.as_ref()) {
            m.release(r.data);
        }
    }
    Ok(())
}

/// Writes the runs of chunk `i` into the target.
fn write_chunk(
    target: &Target,
    p: &Policy,
    turn: &Turnstile,
    i: u64,
    runs: &[Run<'_>],
) -> anyhow::Result<()> {
    let img = target.image();
    if let Some(rate) = &p.rate {
        let written = runs.iter().filter(|r| r.kind == Kind::Data || !p.fresh);
        // qemu-img writes data in pieces of its buffer's size, each let through once the
        // bytes before it have taken their time.
        let mut left: u64 = written.map(|r| r.len).sum();
        while left > 0 {
            let piece = left.min(READ_PIECE);
            rate.wait(piece);
            left -= piece;
        }
    }
    for r in runs.iter().filter(|r| r.kind == Kind::Zero && !p.fresh) {
        img.write_zeroes(r.off, r.len, true)?;
    }
    let data = runs.iter().filter(|r| r.kind == Kind::Data);
    match target {
        Target::Qcow2(_) if p.reserve && !runs.iter().any(|r| r.kind == Kind::Data) => {
            turn.pass(i..i + 1);
        }
        Target::Qcow2(q) if p.reserve => {
            // Host clusters in guest order (this chunk's turn), then the writes, which need no
            // turn (only the `writing` lock).
            let cs = q.cluster_size();
            // Reserved clusters that are not written are given back (a failure stops the
            // conversion; they would be leaked).
            let give_back = |placed: &[(u64, &[u8], u64)]| {
                for &(_, bytes, host) in placed {
                    q.release_reserved(host, (bytes.len() as u64).div_ceil(cs));
                }
            };
            let placed = turn.run(i, || -> qcow2::Result<Vec<(u64, &[u8], u64)>> {
                let mut placed = Vec::new();
                for r in data {
                    let mut done = 0u64;
                    while done < r.len {
                        let at = r.off + done;
                        let reserved = q.reserve_clusters(at / cs, (r.len - done).div_ceil(cs));
                        let (host, n) = reserved.inspect_err(|_| give_back(&placed))?;
                        let bytes = (n * cs).min(r.len - done);
                        placed.push((at, &r.data[done as usize..(done + bytes) as usize], host));
                        done += bytes;
                    }
                }
                Ok(placed)
            })??;
            // Allocating the file blocks in one go spares the file system its per-block
            // delayed allocation in the writes (a third less CPU on ext4). One call covers the
            // chunk's whole host span: every call takes the inode lock the writes need too.
            let _writing = p.writing.lock();
            let start = placed.iter().map(|&(_, _, h)| h).min();
            let end = placed.iter().map(|&(_, b, h)| h + b.len() as u64).max();
            if let (Some(start), Some(end)) = (start, end) {
                let allocated = q.data_storage().allocate(start, end - start);
                allocated.inspect_err(|_| give_back(&placed))?;
            }
            for (k, &(at, bytes, host)) in placed.iter().enumerate() {
                // A failed write gives its own clusters back.
                q.write_reserved(bytes, at, host)
                    .inspect_err(|_| give_back(&placed[k + 1..]))?;
            }
        }
        Target::Qcow2(q) if p.compress => {
            let cs = q.cluster_size() as usize;
            for r in data {
                for (k, piece) in r.data.chunks(cs).enumerate() {
                    q.write_compressed(piece, r.off + (k * cs) as u64)?;
                }
            }
        }
        _ => {
            let _writing = p.writing.lock();
            for r in data {
                if let (Target::Other(_), Some(storage)) = (target, &p.raw_storage) {
                    // As for qcow2: allocate the blocks in one go before the write.
                    storage.allocate(r.off, r.len)?;
                }
                img.write_at(r.data, r.off)?;
            }
        }
    }
    Ok(())
}
