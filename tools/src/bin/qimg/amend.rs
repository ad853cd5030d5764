//! `qimg amend`: changes qcow2 format options in place, with qemu-img's option checks,
//! order of changes and messages (QEMU's `img_amend` and `qcow2_amend_options`).

use std::ffi::OsStr;
use std::path::Path;

use anyhow::bail;
use qcow2::{Format, Qcow2};

use crate::create::{on_off, option_number, parse_options, wants_help};
use crate::size::option_size;

/// Arguments of `qimg amend`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Options to change (`-o help` lists them).
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Allow unsafe operations (only LUKS amendments need it; accepted).
    #[arg(long = "force")]
    _force: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: Vec<String>,
}

/// QEMU's help for qcow2's amend options.
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// qcow2 options that only `create` takes.
const CREATE_ONLY: [&str; 14] = [
    "cluster_size",
    "preallocation",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "compression_type",
    "extended_l2",
    "encrypt.slice",
    "encrypt.detached-header",
];

/// What the options ask for (the last value of each option counts, as in QEMU).
#[derive(Default)]
struct Changes {
    size: Option<u64>,
    version: Option<u32>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    encryption: bool,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u64>,
}

/// Parses the options' syntax as QEMU's option parser does: unknown names, create-only
/// names (with QEMU's hint when every option is one `create` knows) and malformed values.
fn parse(pairs: &[(String, String)]) -> anyhow::Result<Changes> {
    let mut c = Changes::default();
    let mut compat = None;
    for (k, v) in pairs {
        let k = k.as_str();
        match k {
            "size" => c.size = Some(option_size(k, v)?),
            "compat" => compat = Some(v.as_str()),
            "backing_file" => c.backing_file = Some(v.clone()),
            "backing_fmt" => c.backing_fmt = Some(v.clone()),
            "data_file" => c.data_file = Some(v.clone()),
            "data_file_raw" => c.data_file_raw = Some(on_off(k, v)?),
            "lazy_refcounts" => c.lazy_refcounts = Some(on_off(k, v)?),
            "refcount_bits" => c.refcount_bits = Some(option_number(k, v)?),
            "encrypt.iter-time" | "encrypt.keyslot" => {
                option_number(k, v)?;
                c.encryption = true;
            }
            "encrypt.new-secret" | "encrypt.old-secret" | "encrypt.state" => c.encryption = true,
            _ => {
                let create_only = |k: &str| CREATE_ONLY.contains(&k) || is_amend_option(k);
                let hint = match pairs.iter().all(|(k, _)| create_only(k)) {
                    true => "\nThis option is only supported for image creation",
                    false => "",
                };
                bail!("Invalid parameter '{k}'{hint}");
            }
        }
    }
    c.version = match compat {
        None => None,
        Some("0.10" | "v2") => Some(2),
        Some("1.1" | "v3") => Some(3),
        Some(v) => bail!("Unknown compatibility level {v}"),
    };
    Ok(c)
}

/// Whether `k` is one of qcow2's amend options.
fn is_amend_option(k: &str) -> bool {
    HELP.lines()
        .filter_map(|l| l.trim_start().split_once('='))
        .any(|(name, _)| name == k)
}

/// Runs `qimg amend`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    if let Some(name) = a.filename.first_mut() {
        a.names.resolve(name, &mut a.format)?;
    }
    if a.options.is_empty() {
        bail!(
            "Must specify options (-o)\nTry '{} amend --help' for more info",
            crate::progname()
        );
    }
    let help = wants_help(&a.options)?;
    if let (Some(f), true) = (&a.format, help) {
        return print_help(f);
    }
    let [name] = &a.filename[..] else {
        bail!("Expecting one image file name");
    };
    if let Some(c) = a.cache.as_deref().filter(|c| !crate::valid_cache_mode(c)) {
        bail!("Invalid cache option: {c}");
    }
    let (storage, fmt) = crate::open_for_writing(name, a.format.as_deref())?;
    if help {
        return print_help(fmt.name());
    }
    if fmt == Format::Raw {
        bail!("Format driver 'raw' does not support option amendment");
    }
    let dir = Path::new(name).parent().unwrap_or(Path::new("."));
    // The guest's data stays, and a new size resizes the bitmaps: they stay valid.
    let opts = qcow2::OpenOptions {
        keep_bitmaps: true,
        ..crate::writer_options()
    };
    let mut img = crate::open_qcow2(storage, &opts, Some(dir), name)?;
    // After the open, as in QEMU: a dirty image is repaired even if the options are refused.
    let changes = parse(&parse_options(&a.options)?)?;
    let progress = crate::progress::Progress::new(a.progress && !a.quiet, 1);
    let result = amend(&mut img, &changes);
    progress.add(1);
    progress.finish();
    result.map_err(|e| match e {
        qcow2::Error::InvalidOption(m) | qcow2::Error::NotSupported(m) => anyhow::anyhow!(m),
        e => e.into(),
    })?;
    Ok(0)
}

/// Prints the amend options of format `name`.
fn print_help(name: &str) -> anyhow::Result<u8> {
    match crate::parse_format(name)? {
        Format::Qcow2 => out!("{HELP}"),
        Format::Raw => bail!("Format driver 'raw' does not support option amendment"),
    }
    Ok(0)
}

/// Applies `c` in QEMU's order: checks, upgrade, refcount width, data file, backing file,
/// lazy refcounts, size, and the downgrade last. As in QEMU, a step that fails leaves the
/// steps before it done.
fn amend(img: &mut Qcow2, c: &Changes) -> qcow2::Result<()> {
    let invalid = |m: &str| Err(qcow2::Error::InvalidOption(m.into()));
    let h = img.header();
    if c.data_file.is_some() && h.data_file.is_none() {
        return invalid("data-file can only be set for images that use an external data file");
    }
    if c.data_file_raw == Some(true) && !h.data_file_raw() {
        return invalid("data-file-raw cannot be set on existing images");
    }
    if c.encryption {
        return invalid("Can't amend encryption options - encryption not present");
    }
    let bits = c.refcount_bits;
    if bits.is_some_and(|b| b == 0 || b > 64 || !b.is_power_of_two()) {
        return invalid("Refcount width must be a power of two and may not exceed 64 bits");
    }
    let version = c.version.unwrap_or(h.version);
    if version > h.version {
        img.upgrade_to_v3()?;
    }
    if let Some(bits) = bits {
        if version < 3 && bits != 16 {
            return invalid(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)",
            );
        }
        img.change_refcount_order(bits.trailing_zeros())?;
    }
    img.set_data_file(c.data_file.as_deref(), c.data_file_raw)?;
    if (c.backing_file.is_some() || c.backing_fmt.is_some())
        && (c.backing_file.as_deref().map(OsStr::new) != h.backing_file.as_deref()
            || c.backing_fmt != h.backing_format)
    {
        return invalid(&format!(
            "Cannot amend the backing file\nYou can use '{} rebase' instead.",
            crate::progname()
        ));
    }
    if let Some(on) = c.lazy_refcounts {
        if on && version < 3 && !h.lazy_refcounts() {
            return invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            );
        }
        img.set_lazy_refcounts(on)?;
    }
    if let Some(size) = c.size.filter(|&s| s != 0 && s != qcow2::Image::size(img)) {
        if size % 512 != 0 {
            return invalid("The new size must be a multiple of 512");
        }
        img.resize(size, qcow2::Preallocation::Off)?;
    }
    if version < h.version {
        img.downgrade_to_v2()?;
    }
    Ok(())
}
