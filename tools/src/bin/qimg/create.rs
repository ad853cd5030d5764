//! `qimg create`.

use anyhow::bail;
use qcow2::{CompressionType, CreateOptions, Format, Locking, Preallocation};

use crate::size::{cvtnum, option_size, strtoi64, SizeError};

/// Arguments of `qimg create`, as qemu-img takes them.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw).
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (size must be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Format options: key=value[,key=value...].
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The new image.
    filename: String,
    /// Virtual size (k, M, G, T, P, E suffixes).
    size: Option<String>,
}

/// Parsed `-o` options, in the order given.
pub fn parse_options(opts: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for o in opts {
        for kv in o.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    Ok(out)
}

/// Why `-o` options are refused. QEMU parses the options' syntax (sizes, numbers, booleans,
/// known names) before the driver sees their values, and callers word the two differently.
#[derive(Debug)]
pub enum OptionError {
    /// Not a value of the option's type, or an unknown option: QEMU's wording.
    Syntax(String),
    /// A well-formed value the qcow2 driver does not accept (`compat`, `compression_type`).
    Value {
        /// QEMU's name of the option.
        param: &'static str,
        /// The value given.
        value: String,
    },
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionError::Syntax(m) => f.write_str(m),
            OptionError::Value { param, value } => {
                write!(f, "Parameter '{param}' does not accept value '{value}'")
            }
        }
    }
}

impl std::error::Error for OptionError {}

/// A boolean `-o` option (QEMU's on/off, true/false, yes/no).
pub fn on_off(key: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(OptionError::Syntax(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// A number-typed `-o` option (QEMU's `parse_option_number`: base 0, unsigned).
pub fn option_number(key: &str, v: &str) -> Result<u64, OptionError> {
    match strtoi64(v) {
        Ok(n) if n >= 0 => Ok(n as u64),
        Err(SizeError::OutOfRange) => Err(OptionError::Syntax(format!(
            "Value '{v}' is too large for parameter '{key}'"
        ))),
        _ => Err(OptionError::Syntax(format!(
            "Parameter '{key}' expects a number"
        ))),
    }
}

/// Builds qcow2 create options from `-o` pairs (applied on top of `base`).
pub fn qcow2_options(
    pairs: &[(String, String)],
    mut o: CreateOptions,
) -> Result<CreateOptions, OptionError> {
    let size = |k: &str, v: &str| option_size(k, v).map_err(|e| OptionError::Syntax(e.to_string()));
    let bad = |param, value: &str| OptionError::Value {
        param,
        value: value.to_string(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "size" => o.size = size(k, v)?,
            "compat" => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad("version", v)),
                }
            }
            "cluster_size" => o.cluster_size = size(k, v)?,
            "refcount_bits" => {
                o.refcount_bits = u32::try_from(option_number(k, v)?).unwrap_or(u32::MAX)
            }
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            "backing_file" => o.backing_file = Some(v.clone()),
            "backing_fmt" => o.backing_format = Some(v.clone()),
            "data_file" => o.data_file = Some(v.clone()),
            "data_file_raw" => o.data_file_raw = on_off(k, v)?,
            "compression_type" => {
                o.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(bad("compression-type", v)),
                }
            }
            "preallocation" => {
                o.preallocation =
                    Preallocation::from_name(v).ok_or_else(|| bad("preallocation", v))?
            }
            "extended_l2" => o.extended_l2 = on_off(k, v)?,
            _ => return Err(OptionError::Syntax(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

/// qemu-img's error for a size the format or the file system cannot hold (EFBIG); `hint`
/// follows the format name.
fn too_large(filename: &str, format: &str, hint: &str) -> anyhow::Error {
    anyhow::anyhow!("{filename}: The image size is too large for file format '{format}'{hint}")
}

/// The "Formatting ..." line qemu-img prints (sizes as signed numbers, as QEMU shows them).
pub fn formatting_line(
    filename: &str,
    fmt: Format,
    o: &CreateOptions,
    compat_given: bool,
) -> String {
    if fmt == Format::Raw {
        return format!("Formatting '{filename}', fmt=raw size={}", o.size as i64);
    }
    let mut s = format!(
        "Formatting '{filename}', fmt=qcow2 cluster_size={} extended_l2={}",
        o.cluster_size as i64,
        if o.extended_l2 { "on" } else { "off" }
    );
    if o.preallocation != Preallocation::Off {
        let name = match o.preallocation {
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
            Preallocation::Off => "off",
        };
        s += &format!(" preallocation={name}");
    }
    s += &format!(
        " compression_type={} size={}",
        o.compression_type.name(),
        o.size as i64
    );
    if let Some(b) = &o.backing_file {
        s += &format!(" backing_file={b}");
    }
    if let Some(b) = &o.backing_format {
        s += &format!(" backing_fmt={b}");
    }
    if let Some(d) = &o.data_file {
        s += &format!(" data_file={d}");
    }
    if o.data_file_raw {
        s += " data_file_raw=on";
    }
    if compat_given {
        s += &format!(" compat={}", if o.version == 2 { "0.10" } else { "1.1" });
    }
    s += &format!(
        " lazy_refcounts={} refcount_bits={}",
        if o.lazy_refcounts { "on" } else { "off" },
        o.refcount_bits
    );
    s
}

/// Runs `qimg create`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let fmt = crate::parse_format(&a.format)?;
    let pairs = parse_options(&a.options)?;
    let compat_given = pairs.iter().any(|(k, _)| k == "compat");
    let mut o = CreateOptions {
        backing_file: a.backing.clone(),
        backing_format: a.backing_format.clone(),
        locking: Locking::On,
        ..Default::default()
    };
    if let Some(s) = &a.size {
        o.size = cvtnum("image size", s)?;
    }
    if fmt == Format::Raw {
        if !pairs.is_empty() || a.backing.is_some() {
            bail!("raw images take no backing file and no -o options except size");
        }
    } else {
        o = qcow2_options(&pairs, o).map_err(|e| anyhow::anyhow!("{}: {e}", a.filename))?;
    }
    // qemu-img compares the names as given.
    if o.backing_file.as_deref() == Some(a.filename.as_str()) {
        bail!(
            "{}: Error: Trying to create an image with the same filename as the backing file",
            a.filename
        );
    }
    let size_given = a.size.is_some() || pairs.iter().any(|(k, _)| k == "size");
    if !size_given && (o.backing_file.is_none() || a.unsafe_backing) {
        bail!("Image creation needs a size parameter");
    }
    // Without -u the backing file must open, with the size given or not.
    let mut detected = None;
    if let Some(b) = o.backing_file.as_deref().filter(|_| !a.unsafe_backing) {
        let dir = std::path::Path::new(&a.filename)
            .parent()
            .unwrap_or(std::path::Path::new("."));
        let path = qcow2::open::resolve_relative(b, dir);
        let opts = qcow2::OpenOptions {
            read_only: true,
            format: o
                .backing_format
                .as_deref()
                .map(crate::parse_format)
                .transpose()?,
            ..Default::default()
        };
        let backing = qcow2::open_image(&path, &opts).map_err(|e| {
            // Here only the file driver names a file it cannot open, and the format
            // driver's errors stand alone.
            let why = match e {
                qcow2::Error::BadMagic(_) => "Image is not in qcow2 format".to_string(),
                e => e.to_string(),
            };
            anyhow::anyhow!("{}: {why}\nCould not open backing image.", a.filename)
        })?;
        if !size_given {
            // QEMU sees a raw file as whole sectors.
            o.size = match backing.format() {
                Format::Raw => backing.size().next_multiple_of(512),
                Format::Qcow2 => backing.size(),
            };
        }
        detected = Some(backing.format());
    }
    if o.backing_file.is_some() && o.backing_format.is_none() {
        let hint = detected.map_or(String::new(), |f| {
            format!("\nDetected format of {}.", f.name())
        });
        bail!(
            "{}: Backing file specified without backing format{hint}",
            a.filename
        );
    }
    if !a.quiet {
        outln!("{}", formatting_line(&a.filename, fmt, &o, compat_given));
    }
    let path = std::path::Path::new(&a.filename);
    match fmt {
        Format::Qcow2 => qcow2::create(path, &o).map_err(|e| match e {
            // QEMU reads a size past i64::MAX as negative.
            qcow2::Error::InvalidOption(m)
                if m.starts_with("Image size too large") && o.size > i64::MAX as u64 =>
            {
                anyhow::anyhow!(
                    "{}: Could not resize image: Image size cannot be negative",
                    a.filename
                )
            }
            qcow2::Error::InvalidOption(m) if m.starts_with("Image size too large") => {
                too_large(&a.filename, "qcow2", " (try using a larger cluster size)")
            }
            e => anyhow::anyhow!("{}: {e}", a.filename),
        })?,
        // Like qemu-img: whole 512-byte sectors, the size printed above unrounded.
        Format::Raw => qcow2::create::create_file(path, Locking::On)
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.filename))?
            .set_len(o.size.next_multiple_of(512))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EFBIG) => too_large(&a.filename, "raw", ""),
                _ => anyhow::Error::new(e).context(format!("Could not create '{}'", a.filename)),
            })?,
    }
    Ok(0)
}
