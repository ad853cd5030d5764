//! `qimg resize`: absolute or relative (`+`/`-`) sizes, `--shrink`, `--preallocation`.

use std::path::Path;

use anyhow::{bail, Context};
use qcow2::format::header::{Header, AUTOCLEAR_BITMAPS};
use qcow2::{FileStorage, Format, Preallocation, Storage};

use crate::size::option_size;

/// Arguments of `qimg resize`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Preallocation of the added range: off, metadata, falloc or full.
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// The new size from the current one and the size argument.
fn new_size(current: u64, arg: &str) -> anyhow::Result<u64> {
    let positive = || anyhow::anyhow!("New image size must be positive");
    let total = match arg.as_bytes().first() {
        Some(b'+') => current.checked_add(option_size("size", &arg[1..])?),
        Some(b'-') => current.checked_sub(option_size("size", &arg[1..])?),
        _ => Some(option_size("size", arg)?),
    };
    match total {
        Some(t) if t > 0 && t <= i64::MAX as u64 => Ok(t),
        _ => Err(positive()),
    }
}

/// Grows or shrinks a raw file.
fn resize_raw(
    file: &FileStorage,
    old: u64,
    new: u64,
    prealloc: Preallocation,
) -> anyhow::Result<()> {
    // Refused before the file changes, as qemu-img does.
    crate::create::truncate_raw(file, old, new, prealloc)?;
    file.flush()?;
    Ok(())
}

/// Whether the qcow2 image in `file` has persistent dirty bitmaps (valid ones: their
/// autoclear bit is set).
pub fn has_bitmaps(file: &dyn Storage, name: &str) -> anyhow::Result<bool> {
    let mut first = vec![0u8; file.len()?.min(2 << 20) as usize];
    file.read_at(&mut first, 0)?;
    let h = Header::parse(&first).map_err(|e| crate::open_error(name, e))?;
    Ok(h.bitmaps.as_ref().is_some_and(|b| b.nb_bitmaps() > 0)
        && h.autoclear_features & AUTOCLEAR_BITMAPS != 0)
}

/// Runs `qimg resize`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    let prealloc = match &a.preallocation {
        None => Preallocation::Off,
        Some(p) => Preallocation::from_name(p)
            .with_context(|| format!("Invalid preallocation mode '{p}'"))?,
    };
    // The size's syntax is checked before the image is opened, as qemu-img checks it.
    option_size("size", a.size.strip_prefix(['+', '-']).unwrap_or(&a.size))?;
    let path = Path::new(&a.filename);
    let (storage, fmt) = crate::open_for_writing(&a.filename, a.format.as_deref())?;
    let mut qcow = None;
    let current = match fmt {
        // As QEMU sees it: in whole sectors.
        Format::Raw => storage.len()?.next_multiple_of(512),
        Format::Qcow2 => {
            // The engine resizes persistent bitmaps with the disk, as QEMU does.
            let opts = qcow2::OpenOptions {
                keep_bitmaps: true,
                ..crate::writer_options()
            };
            let q = crate::open_qcow2(
                storage.clone(),
                &opts,
                Some(path.parent().unwrap_or(Path::new("."))),
                &a.filename,
            )?;
            let size = qcow2::Image::size(&q);
            qcow = Some(q);
            size
        }
    };
    let total = new_size(current, &a.size)?;
    if total <= current && prealloc != Preallocation::Off {
        bail!("Preallocation can only be used for growing images");
    }
    if total < current && !a.shrink {
        crate::print_error("Use the --shrink option to perform a shrink operation.");
        bail!("warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    if total > crate::BDRV_MAX_LENGTH {
        bail!(
            "offset({total}) exceeds maximum({})",
            crate::BDRV_MAX_LENGTH
        );
    }
    if qcow.is_some() && total % 512 != 0 {
        bail!("The new size must be a multiple of 512");
    }
    match qcow.as_mut() {
        Some(q) => q.resize(total, prealloc).map_err(|e| match e {
            // QEMU's own refusals come as they are.
            qcow2::Error::InvalidOption(why) => anyhow::anyhow!(why),
            e @ qcow2::Error::ResizeFile(_) => anyhow::anyhow!(e),
            e => anyhow::anyhow!("Error resizing image: {e}"),
        })?,
        None => resize_raw(&storage, current, total, prealloc)?,
    }
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}
