//! `qimg bitmap`: changes an image's persistent dirty bitmaps as qemu-img does (QEMU's
//! `img_bitmap`): the actions in command-line order, each failing with "Operation X on
//! bitmap B failed: ...", the ones before it kept.

use anyhow::bail;
use clap::ArgMatches;
use qcow2::{Format, Locking, Qcow2};

use crate::size::cvtnum;

/// Arguments of `qimg bitmap`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Create BITMAP, recording the writes from now on.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    add: Vec<bool>,
    /// Remove BITMAP.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    remove: Vec<bool>,
    /// Clear BITMAP.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    clear: Vec<bool>,
    /// Start recording writes in BITMAP.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    enable: Vec<bool>,
    /// Stop recording writes in BITMAP.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    disable: Vec<bool>,
    /// Merge bitmap SOURCE (of the image, or of -b) into BITMAP.
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
    /// The image holding the --merge source bitmap.
    #[arg(short = 'b', long = "source-file", value_name = "SRC_FILENAME")]
    source_file: Option<String>,
    /// Format of the -b image.
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT")]
    source_format: Option<String>,
    /// Bytes per bit of a bitmap made by --add (power of two, at least 512).
    #[arg(short = 'g', long = "granularity", value_name = "SIZE")]
    granularity: Option<String>,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// FILENAME BITMAP.
    args: Vec<String>,
}

/// One change, in command-line order.
#[derive(Debug, Clone)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    /// QEMU's name of the operation in its errors.
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The actions of `a` in the order they were given (`m`: the subcommand's matches).
fn ordered_actions(a: &Args, m: &ArgMatches) -> Vec<Action> {
    // Each flag given appends a value, with the index of where it was given.
    let at =
        |id: &str| -> Vec<usize> { m.indices_of(id).map(Iterator::collect).unwrap_or_default() };
    let mut actions: Vec<(usize, Action)> = Vec::new();
    for (id, action) in [
        ("add", Action::Add),
        ("remove", Action::Remove),
        ("clear", Action::Clear),
        ("enable", Action::Enable),
        ("disable", Action::Disable),
    ] {
        actions.extend(at(id).into_iter().map(|i| (i, action.clone())));
    }
    let merges = at("merge").into_iter().zip(a.merge.iter().cloned());
    actions.extend(merges.map(|(i, source)| (i, Action::Merge(source))));
    actions.sort_by_key(|(i, _)| *i);
    actions.into_iter().map(|(_, action)| action).collect()
}

/// Runs `qimg bitmap`.
pub fn run(mut a: Args, m: &ArgMatches) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    if let Some(name) = a.args.first_mut() {
        a.names.resolve(name, &mut a.format)?;
    }
    let granularity = a
        .granularity
        .as_deref()
        .map(|g| cvtnum("granularity", g))
        .transpose()?;
    let actions = ordered_actions(&a, m);
    if actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let adds = actions.iter().any(|x| matches!(x, Action::Add));
    if granularity.is_some() && !adds {
        bail!("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    let merges = actions.iter().any(|x| matches!(x, Action::Merge(_)));
    if a.source_file.is_some() && !merges {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [filename, bitmap] = &a.args[..] else {
        bail!("Expecting filename and bitmap name");
    };
    let (storage, format) = crate::open_for_writing(filename, a.format.as_deref())?;
    let img = match format {
        Format::Qcow2 => {
            // Only the bitmaps change: they stay valid.
            let opts = qcow2::OpenOptions {
                keep_bitmaps: true,
                ..crate::writer_options()
            };
            // Only the image itself, as qemu-img opens it: a missing backing file is no
            // matter to its bitmaps.
            Some(crate::open_qcow2(storage, &opts, None, filename)?)
        }
        Format::Raw => None,
    };
    // A raw source has no bitmaps: `Some(None)`.
    let mut source_format = a.source_format.clone();
    if let Some(name) = &mut a.source_file {
        crate::image_name::resolve(name, &mut source_format, false)?;
    }
    let source = match &a.source_file {
        Some(f) => Some(crate::snapshot::open(
            f,
            source_format.as_deref(),
            false,
            Locking::On,
            None,
            false,
        )?),
        None => None,
    };
    for action in &actions {
        let done = match &img {
            Some(img) => apply(img, action, bitmap, granularity, source.as_ref()),
            None => Err(on_raw(action, bitmap, filename)),
        };
        if let Err(e) = done {
            bail!("Operation {} on bitmap {bitmap} failed: {e}", action.name());
        }
    }
    Ok(0)
}

/// What a raw image answers to `action`: it has no bitmaps and cannot store one.
fn on_raw(action: &Action, bitmap: &str, filename: &str) -> anyhow::Error {
    match action {
        Action::Add => {
            anyhow::anyhow!(
                "Can't store persistent bitmaps to '{filename}': Operation not supported"
            )
        }
        // A merge looks its target bitmap up first, as every other action.
        _ => anyhow::anyhow!("Dirty bitmap '{bitmap}' not found"),
    }
}

/// Applies `action` to bitmap `bitmap` of `img`; a merge reads its source bitmap from
/// `source` if given (`Some(None)`: a raw image), else from `img`.
fn apply(
    img: &Qcow2,
    action: &Action,
    bitmap: &str,
    granularity: Option<u64>,
    source: Option<&Option<Qcow2>>,
) -> anyhow::Result<()> {
    match action {
        Action::Add => {
            // QEMU's default: the cluster size, within 4 KiB to 64 KiB.
            let cs = img.header().cluster_size();
            // As qemu-img, a granularity of 0 is the default.
            let g = granularity
                .filter(|&g| g != 0)
                .unwrap_or(cs.clamp(4096, 65536));
            img.add_bitmap(bitmap.as_bytes(), g, true)?
        }
        Action::Remove => img.remove_bitmap(bitmap.as_bytes())?,
        Action::Clear => img.clear_bitmap(bitmap.as_bytes())?,
        Action::Enable => img.set_bitmap_enabled(bitmap.as_bytes(), true)?,
        Action::Disable => img.set_bitmap_enabled(bitmap.as_bytes(), false)?,
        Action::Merge(name) => {
            // As QEMU: the target is looked up and checked before the source.
            img.check_bitmap_writable(bitmap.as_bytes())?;
            let from = match source {
                None => img,
                Some(Some(q)) => q,
                Some(None) => bail!("Dirty bitmap '{name}' not found"),
            };
            img.merge_into_bitmap(bitmap.as_bytes(), &from.bitmap_bits(name.as_bytes())?)?
        }
    }
    Ok(())
}
