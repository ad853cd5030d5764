//! `qimg compare`: qemu-img's img_compare. Both images' block status, through their backing
//! chains, decides what is read: runs that read as zeros on both sides are equal unread, a run
//! with data on one side only is checked for non-zero bytes, and only data against data is
//! read from both (2 MiB at a time). Exit codes: 0 identical, 1 different, 2 the images could
//! not be opened, 3 block status failed, 4 a read failed.

use crate::chain::{Chain, Extent};
use crate::progress::Steps;

/// Arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format")]
    format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format")]
    format2: Option<String>,
    /// Strict mode: sizes and block status must match too.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Cache mode of the images (checked, otherwise ignored).
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// Open without taking the write lock.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// QEMU objects (refused: qimg creates none).
    #[arg(long = "object")]
    object: Vec<String>,
    /// Treat each image name as a QEMU option string (driver=qcow2,file.filename=PATH).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// First image.
    image1: String,
    /// Second image.
    image2: String,
}

/// qemu-img's read size.
const IO_BUF: u64 = 2 << 20;

/// QEMU's `BDRV_BLOCK_*` bits, compared in strict mode.
const DATA: u8 = 0x01;
const ZERO: u8 = 0x02;
const OFFSET_VALID: u8 = 0x04;
const ALLOCATED: u8 = 0x10;
const EOF: u8 = 0x20;
const COMPRESSED: u8 = 0x80;

/// Why a comparison ended without a verdict.
enum Failed {
    /// Block status of the named image failed (exit 3).
    Status(String, anyhow::Error),
    /// Reading the named image at an offset failed (exit 4).
    Read(String, u64, qcow2::Error),
}

impl Failed {
    /// Prints the error in qemu-img's words and returns the exit code.
    fn report(self) -> u8 {
        match self {
            Failed::Status(name, e) => {
                let message = format!("Sector allocation test failed for {name}");
                crate::print_error(crate::bare_error(e, &message));
                3
            }
            Failed::Read(name, offset, e) => {
                let why = match e {
                    qcow2::Error::Io { error, .. } => error.to_string(),
                    e => {
                        crate::report_corruption(&e);
                        "Input/output error".to_owned()
                    }
                };
                crate::print_error(format!(
                    "Error while reading offset {offset} of {name}: {why}"
                ));
                4
            }
        }
    }
}

/// A run of one image as `bdrv_block_status_above` reports it.
struct Run {
    extent: Extent,
    flags: u8,
}

impl Run {
    fn zero(&self) -> bool {
        self.flags & ZERO != 0
    }
}

/// One of the two images, with its read buffer.
struct Side<'a> {
    chain: Chain,
    name: &'a str,
    buf: Vec<u8>,
}

impl Side<'_> {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    /// The run at `offset`, through the whole chain.
    fn status(&self, offset: u64) -> Result<Run, Failed> {
        let e = self
            .chain
            .status(offset, self.size() - offset)
            .map_err(|e| Failed::Status(self.name.to_owned(), e))?;
        let below_backing = !e.present && e.depth + 1 < self.chain.len();
        let mut flags = if below_backing {
            // Unallocated down to a backing file that ends before `offset`: the block layer
            // makes those zeros allocated.
            ZERO | ALLOCATED
        } else {
            [
                (e.data, DATA),
                (e.zero, ZERO),
                (e.offset.is_some(), OFFSET_VALID),
                (e.present, ALLOCATED),
                (e.compressed, COMPRESSED),
            ]
            .iter()
            .filter(|(set, _)| *set)
            .fold(0, |f, (_, bit)| f | bit)
        };
        // The run ends the image, or (unallocated through the chain) the bottom image, whose
        // status is the answer.
        let end = e.start + e.length;
        let bottom_end = !e.present && !below_backing && end == self.chain.layer_size(e.depth);
        if end == self.size() || bottom_end {
            flags |= EOF;
        }
        Ok(Run { extent: e, flags })
    }

    /// The `len` bytes of `run` at its start, or `None` when they read as zeros.
    fn read(&mut self, run: &Run, len: u64) -> Result<Option<&[u8]>, Failed> {
        if run.zero() {
            return Ok(None);
        }
        let (depth, offset) = (run.extent.depth, run.extent.start);
        let buf = &mut self.buf[..len as usize];
        self.chain
            .read_layer(depth, buf, offset)
            .map_err(|e| Failed::Read(self.name.to_owned(), offset, e))?;
        Ok(Some(buf))
    }
}

/// Offset of the first 512-byte sector where `a` and `b` differ (`None` stands for zeros).
fn first_difference(a: Option<&[u8]>, b: Option<&[u8]>) -> Option<u64> {
    const ZEROS: [u8; 512] = [0; 512];
    let (x, y) = match (a, b) {
        (Some(a), b) => (a, b),
        (None, Some(b)) => (b, None),
        (None, None) => return None,
    };
    x.chunks(512)
        .enumerate()
        .find(|(i, s)| match y {
            Some(y) => *s != &y[i * 512..i * 512 + s.len()],
            None => *s != &ZEROS[..s.len()],
        })
        .map(|(i, _)| i as u64 * 512)
}

/// Opens one image with its backing chain; `None` when that failed (reported).
fn open<'a>(name: &'a str, format: Option<&str>, a: &Args) -> Option<Side<'a>> {
    match Chain::open(name, format, None, crate::locking(a.force_share)) {
        Ok(chain) => Some(Side {
            chain,
            name,
            buf: vec![0; IO_BUF as usize],
        }),
        Err(e) => {
            crate::report_error(&e);
            None
        }
    }
}

/// Prints a verdict line unless quiet.
fn say(a: &Args, line: std::fmt::Arguments) {
    if !a.quiet {
        outln!("{line}");
    }
}

/// qemu-img's checks of the options that come before opening the images, and the images'
/// names resolved into their files (see `image_name`): the exit code if one fails (reported).
fn check_options(a: &mut Args) -> Result<(), u8> {
    if !a.object.is_empty() {
        crate::print_error("--object is not supported");
        return Err(2);
    }
    if let Some(c) = a.cache.as_deref().filter(|c| !crate::valid_cache_mode(c)) {
        crate::print_error(format!("Invalid source cache option: {c}"));
        return Err(2);
    }
    if a.image_opts && a.format1.is_some() {
        crate::print_error("--image-opts and --format are mutually exclusive");
        return Err(2);
    }
    let image_opts = a.image_opts;
    for (name, format) in [
        (&mut a.image1, &mut a.format1),
        (&mut a.image2, &mut a.format2),
    ] {
        if let Err(e) = crate::image_name::resolve(name, format, image_opts) {
            crate::print_error(e);
            return Err(2);
        }
    }
    Ok(())
}

/// Compares the contents of the two images: the exit code.
fn contents<'a>(
    a: &Args,
    one: &mut Side<'a>,
    two: &mut Side<'a>,
    progress: &mut Steps,
) -> Result<u8, Failed> {
    let (size1, size2) = (one.size(), two.size());
    let (common, whole) = (size1.min(size2), size1.max(size2));
    progress.start();
    if a.strict && size1 != size2 {
        say(a, format_args!("Strict mode: Image size mismatch!"));
        return Ok(1);
    }
    let mut offset = 0;
    while offset < common {
        let (r1, r2) = (one.status(offset)?, two.status(offset)?);
        let mut chunk = r1.extent.length.min(r2.extent.length);
        if a.strict && r1.flags != r2.flags {
            say(
                a,
                format_args!("Strict mode: Offset {offset} block status mismatch!"),
            );
            return Ok(1);
        }
        if !(r1.zero() && r2.zero()) {
            chunk = chunk.min(IO_BUF);
            let x = one.read(&r1, chunk)?;
            if let Some(at) = first_difference(x, two.read(&r2, chunk)?) {
                say(
                    a,
                    format_args!("Content mismatch at offset {}!", offset + at),
                );
                return Ok(1);
            }
        }
        offset += chunk;
        progress.advance(chunk, whole);
    }
    if size1 != size2 {
        // The longer image's extra part must read as zeros.
        say(a, format_args!("Warning: Image size mismatch!"));
        let over = if size1 > size2 { one } else { two };
        while offset < whole {
            let run = over.status(offset)?;
            let mut chunk = run.extent.length;
            if !run.zero() {
                chunk = chunk.min(IO_BUF);
                if let Some(at) = first_difference(over.read(&run, chunk)?, None) {
                    say(
                        a,
                        format_args!("Content mismatch at offset {}!", offset + at),
                    );
                    return Ok(1);
                }
            }
            offset += chunk;
            progress.advance(chunk, whole);
        }
    }
    say(a, format_args!("Images are identical."));
    Ok(0)
}

/// Compares the images; returns the exit code (errors reported).
fn compare(a: &mut Args, progress: &mut Steps) -> u8 {
    if let Err(code) = check_options(a) {
        return code;
    }
    let Some(mut one) = open(&a.image1, a.format1.as_deref(), a) else {
        return 2;
    };
    let Some(mut two) = open(&a.image2, a.format2.as_deref(), a) else {
        return 2;
    };
    contents(a, &mut one, &mut two, progress).unwrap_or_else(Failed::report)
}

/// Runs `qimg compare`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    // Progress is not shown in quiet mode; its end is printed whatever the outcome.
    let mut progress = Steps::new(a.progress && !a.quiet, 2.0);
    let code = compare(&mut a, &mut progress);
    progress.end();
    Ok(code)
}
