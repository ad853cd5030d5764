//! `qimg rebase`: change an image's backing file. Safe mode (the default) first copies into
//! the image every cluster where the old and new backing files differ, as qemu-img 10 does
//! (whole clusters, or subclusters with extended L2 entries; old data, zero clusters past
//! the old backing file's end); `-u` only
//! rewrites the header; `-b ""` makes the image standalone.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use qcow2::{FileStorage, Image, Locking, Qcow2};

use crate::info::path_combine;
use crate::progress::Progress;

/// Arguments of `qimg rebase`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// New backing file ("" for none).
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Unsafe: only rewrite the header (the contents are assumed to match).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    /// Write the copied clusters compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode of the image (checked; qimg always writes back at the end).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Cache mode of the backing files (checked).
    #[arg(short = 'T', long = "backing-cache")]
    src_cache: Option<String>,
    /// Open the new backing file without keeping writers out (force share).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

/// The format names qemu-img 10 knows (`qemu-img --help`): `-F` takes any of them, even in
/// unsafe mode, where qimg only writes the name into the header.
pub const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Largest run handled at once (qemu-img's IO_BUF_SIZE).
const CHUNK: u64 = 2 << 20;

/// qemu-img's `compare_buffers`: whether the first `chunk`-sized piece differs, and how far
/// pieces with the same answer extend.
fn compare_buffers(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let first = chunk.min(a.len());
    let differ = a[..first] != b[..first];
    let mut i = first;
    while i < a.len() {
        let len = chunk.min(a.len() - i);
        if (a[i..i + len] != b[i..i + len]) != differ {
            break;
        }
        i += len;
    }
    (differ, i)
}

/// Reads `[offset, offset + buf.len())` of `img` with zeros past its end (or without one).
fn read_padded(img: Option<&dyn Image>, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
    let n = img.map_or(0, |i| i.size().saturating_sub(offset).min(buf.len() as u64)) as usize;
    if let (Some(i), true) = (img, n > 0) {
        i.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// The two backing files a rebase compares, with buffers for one run.
struct Backings<'a> {
    old: Option<&'a dyn Image>,
    new: Option<&'a dyn Image>,
    buf_old: Vec<u8>,
    buf_new: Vec<u8>,
    /// The guest ranges written into the image so far.
    written: Vec<(u64, u64)>,
}

impl Backings<'_> {
    /// Copies into `img` what differs between the old and the new backing file in the
    /// unallocated range `[start, end)`, compared and written in `unit`s (whole clusters
    /// written compressed when `compress`: the range then covers whole clusters only).
    fn copy(
        &mut self,
        img: &Qcow2,
        start: u64,
        end: u64,
        unit: u64,
        compress: bool,
    ) -> anyhow::Result<()> {
        if start >= end {
            return Ok(());
        }
        let cs = img.cluster_size();
        let old_size = self.old.map_or(0, |o| o.size());
        let n = (end - start) as usize;
        let (buf_old, buf_new) = (&mut self.buf_old[..n], &mut self.buf_new[..n]);
        read_padded(self.old, buf_old, start)
            .map_err(|e| crate::bare_error(e, "error while reading from old backing file"))?;
        read_padded(self.new, buf_new, start)
            .map_err(|e| crate::bare_error(e, "error while reading from new backing file"))?;
        let mut old_eof = start >= old_size;
        let mut written = 0;
        while written < n {
            let (differ, len) =
                compare_buffers(&buf_old[written..], &buf_new[written..], unit as usize);
            let at = start + written as u64;
            if differ {
                self.written.push((at, len as u64));
                if old_eof {
                    img.write_zeroes(at, len as u64, false)?;
                } else if compress {
                    let pieces = buf_old[written..written + len].chunks(cs as usize);
                    for (k, piece) in pieces.enumerate() {
                        img.write_compressed(piece, at + k as u64 * cs)?;
                    }
                } else {
                    img.write_at(&buf_old[written..written + len], at)
                        .context("Error while writing to COW image")?;
                }
            }
            written += len;
            if at + len as u64 >= old_size {
                old_eof = true;
            }
        }
        Ok(())
    }
}

/// Copies into `img` what differs between its old backing chain and `new`; returns the guest
/// ranges it wrote.
fn copy_differences(
    img: &Qcow2,
    new: Option<&dyn Image>,
    compress: bool,
    progress: &Progress,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let size = img.size();
    let cs = img.cluster_size();
    // The unit of allocation: subclusters with extended L2 entries.
    let sc = img.subcluster_size();
    let mut b = Backings {
        old: img.backing(),
        new,
        buf_old: vec![0u8; (CHUNK + 2 * cs) as usize],
        buf_new: vec![0u8; (CHUNK + 2 * cs) as usize],
        written: Vec::new(),
    };
    let mut offset = 0;
    while offset < size {
        // Queries end on a cluster boundary, so no unallocated cluster is split in two runs.
        let query_end = ((offset + CHUNK) / cs * cs).min(size);
        let st = img
            .block_status(offset, query_end - offset)
            .context("error while reading image metadata")?;
        if st.allocated {
            offset += st.len;
            progress.add(st.len);
            continue;
        }
        // Whole subclusters, so writes never copy-on-write a partial one.
        let start = offset / sc * sc;
        let end = (offset + st.len).next_multiple_of(sc).min(size);
        if compress {
            // Compressed clusters have no subclusters: only clusters unallocated as a whole
            // are written compressed (qemu-img 10 asserts when a cluster is partly
            // allocated), the subclusters around them uncompressed.
            let whole_start = start.next_multiple_of(cs).min(end);
            let whole_end = match end == size {
                true => end,
                false => (end / cs * cs).max(whole_start),
            };
            b.copy(img, start, whole_start, sc, false)?;
            b.copy(img, whole_start, whole_end, cs, true)?;
            b.copy(img, whole_end, end, sc, false)?;
        } else {
            b.copy(img, start, end, sc, false)?;
        }
        progress.add(end - offset);
        offset = end;
    }
    Ok(b.written)
}

/// Runs `qimg rebase`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    // `-u` without `-b` removes the backing file, as `-b ""` does (qemu-img 10).
    let Some(backing) = a.backing.as_deref().or(a.unsafe_mode.then_some("")) else {
        bail!(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry '{} rebase --help' for \
             more info",
            crate::progname()
        );
    };
    // Refused before the image is opened, as qemu-img does.
    if let Some(c) = a.cache.as_deref().filter(|c| !crate::valid_cache_mode(c)) {
        bail!("Invalid cache option: {c}");
    }
    if let Some(c) = a
        .src_cache
        .as_deref()
        .filter(|c| !crate::valid_cache_mode(c))
    {
        bail!("Invalid source cache option: {c}");
    }
    let given = (a.format.as_deref())
        .map(|f| crate::parse_driver(&a.filename, f))
        .transpose()?;
    let backing = (!backing.is_empty()).then_some(backing);
    if let (Some(b), None) = (backing, &a.backing_format) {
        bail!("Could not change the backing file to '{b}': backing format must be specified");
    }
    let path = Path::new(&a.filename);
    let storage = FileStorage::new(crate::open_file(&a.filename, true)?);
    let format = crate::writable_format(&storage, &a.filename, given)?;
    crate::lock(storage.file(), &a.filename, Locking::On, format, true)?;
    if format != qcow2::Format::Qcow2 {
        bail!(
            "Could not change the backing file to '{}': Operation not supported",
            backing.unwrap_or("")
        );
    }
    // In every mode, so an unknown name never reaches the header.
    if let Some(f) = a.backing_format.as_deref() {
        if !QEMU_FORMATS.contains(&f) {
            bail!("Invalid format name: '{f}'");
        }
    }
    // Unsafe mode never opens the old backing file. The guest data stays the same (safe
    // mode copies what the new backing file would change): the bitmaps stay valid, and get
    // the copied ranges marked, as qemu-img's writes mark them.
    let dir = (!a.unsafe_mode).then(|| path.parent().unwrap_or(Path::new(".")));
    let img = crate::open_qcow2(
        Arc::new(storage),
        &crate::bitmap_keeping_writer_options(),
        dir,
        &a.filename,
    )?;
    let progress = Progress::new(a.progress && !a.quiet, img.size());
    if !a.unsafe_mode {
        let new = match backing {
            Some(b) => {
                let (mut path, mut format) =
                    (path_combine(&a.filename, b), a.backing_format.clone());
                // A pseudo-filename names its file (and maybe its format).
                crate::image_name::resolve(&mut path, &mut format, false)?;
                // As in qemu-img, -U shares only the new backing file.
                let opened = crate::open(
                    &path,
                    format.as_deref(),
                    true,
                    crate::locking(a.force_share),
                );
                // qemu-img names the file once, in its own words.
                Some(opened.map_err(|e| {
                    let e = e.to_string();
                    let given = crate::image_name::as_given(&path);
                    let why = e
                        .strip_prefix(&format!("Could not open '{given}': "))
                        .unwrap_or(&e);
                    anyhow::anyhow!("Could not open new backing file '{b}': {why}")
                })?)
            }
            None => None,
        };
        let written = copy_differences(&img, new.as_deref(), a.compress, &progress)?;
        img.flush()
            .with_context(|| format!("Error while flushing '{}'", a.filename))?;
        crate::copy_bitmaps::mark_dirty(&img, &written)?;
    }
    img.set_backing_file(backing, a.backing_format.as_deref())
        .map_err(|e| {
            anyhow::anyhow!(
                "Could not change the backing file to '{}': {e}",
                backing.unwrap_or("")
            )
        })?;
    progress.finish();
    Ok(0)
}
