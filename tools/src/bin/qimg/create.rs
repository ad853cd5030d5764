//! `qimg create`.

use anyhow::bail;
use qcow2::file_attributes::FileAttributes;
use qcow2::{CompressionType, CreateOptions, Format, Locking, Preallocation};

use crate::qemu_opts;
use crate::size::cvtnum;

/// Arguments of `qimg create`, as qemu-img takes them.
#[derive(clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw).
    #[arg(short = 'f', long = "format", default_value = "raw")]
    format: String,
    /// Backing file.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Do not open the backing file (size must be given).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// Format options: key=value[,key=value...].
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The new image.
    filename: Option<String>,
    /// Virtual size (k, M, G, T, P, E suffixes).
    size: Option<String>,
}

/// Parsed `-o` options, in the order given (QEMU's syntax: see `qemu_opts`).
pub fn parse_options(opts: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    Ok(qemu_opts::accumulate(opts)?.map_or_else(Vec::new, |s| qemu_opts::parse(&s)))
}

/// Whether the `-o` options ask for help (`help` or `?`); fails if they cannot be joined.
pub fn wants_help(opts: &[String]) -> anyhow::Result<bool> {
    Ok(qemu_opts::accumulate(opts)?.is_some_and(|s| qemu_opts::has_help(&s)))
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
    /// An option QEMU takes that qimg cannot honour.
    Unsupported(String),
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionError::Syntax(m) | OptionError::Unsupported(m) => f.write_str(m),
            OptionError::Value { param, value } => {
                write!(f, "Parameter '{param}' does not accept value '{value}'")
            }
        }
    }
}

impl std::error::Error for OptionError {}

/// A boolean `-o` option (QEMU's on/off, true/false, yes/no).
pub fn on_off(key: &str, v: &str) -> Result<bool, OptionError> {
    qemu_opts::bool_value(key, v).map_err(OptionError::Syntax)
}

/// A number-typed `-o` option (QEMU's `parse_option_number`: base 0, unsigned).
pub fn option_number(key: &str, v: &str) -> Result<u64, OptionError> {
    qemu_opts::number_value(key, v).map_err(OptionError::Syntax)
}

/// Checks the syntax of `-o` pairs for a new image of format `fmt` in a file: the names the
/// format and the file driver know, with values of their types.
pub fn check_syntax(pairs: &[(String, String)], fmt: Format) -> Result<(), OptionError> {
    qemu_opts::validate(pairs, &qemu_opts::create_options(fmt, true)).map_err(OptionError::Syntax)
}

/// Builds qcow2 create options from `-o` pairs (applied on top of `base`).
pub fn qcow2_options(
    pairs: &[(String, String)],
    o: CreateOptions,
) -> Result<CreateOptions, OptionError> {
    let mut o = qcow2_option_fields(pairs, o)?;
    qcow2_option_choices(pairs, &mut o)?;
    Ok(o)
}

/// Applies the `-o` pairs QEMU checks as it parses them (names, numbers, sizes, flags) on
/// top of `o`; the named choices are left to [`qcow2_option_choices`].
fn qcow2_option_fields(
    pairs: &[(String, String)],
    mut o: CreateOptions,
) -> Result<CreateOptions, OptionError> {
    check_syntax(pairs, Format::Qcow2)?;
    let unsupported = |what: &str| OptionError::Unsupported(format!("qimg cannot {what}"));
    let size = |k: &str, v: &str| qemu_opts::size_value(k, v).map_err(OptionError::Syntax);
    for (k, v) in pairs {
        match k.as_str() {
            "size" => o.size = size(k, v)?,
            "cluster_size" => o.cluster_size = size(k, v)?,
            "refcount_bits" => {
                o.refcount_bits = u32::try_from(option_number(k, v)?).unwrap_or(u32::MAX)
            }
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            "backing_file" => o.backing_file = Some(v.clone()),
            "backing_fmt" => o.backing_format = Some(v.clone()),
            "data_file" => o.data_file = Some(v.clone()),
            "data_file_raw" => o.data_file_raw = on_off(k, v)?,
            "extended_l2" => o.extended_l2 = on_off(k, v)?,
            // Read below (the last value counts).
            "compat" | "compression_type" | "preallocation" => {}
            "encryption" if !on_off(k, v)? => {}
            "encryption" => return Err(unsupported("create encrypted images")),
            k if k.starts_with("encrypt.") => return Err(unsupported("create encrypted images")),
            "nocow" => o.file.nocow = on_off(k, v)?,
            "extent_size_hint" => o.file.extent_size_hint = Some(size(k, v)?),
            _ => return Err(OptionError::Syntax(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

/// Applies the `-o` choices (compat, compression_type, preallocation) QEMU's qcow2 driver
/// checks only once it creates the image, after the "Formatting" line.
fn qcow2_option_choices(
    pairs: &[(String, String)],
    o: &mut CreateOptions,
) -> Result<(), OptionError> {
    let bad = |param, value: &str| OptionError::Value {
        param,
        value: value.to_string(),
    };
    if let Some(v) = qemu_opts::last(pairs, "compat") {
        o.version = match v {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(bad("version", v)),
        }
    }
    if let Some(v) = qemu_opts::last(pairs, "compression_type") {
        o.compression_type = match v {
            "zlib" => CompressionType::Deflate,
            "zstd" => CompressionType::Zstd,
            _ => return Err(bad("compression-type", v)),
        }
    }
    if let Some(v) = qemu_opts::last(pairs, "preallocation") {
        o.preallocation = Preallocation::from_name(v).ok_or_else(|| bad("preallocation", v))?;
    }
    Ok(())
}

/// QEMU's qcow2 driver takes as backing format only the name of a block driver it has.
pub fn check_backing_format(o: &CreateOptions) -> Result<(), OptionError> {
    match o.backing_format.as_deref() {
        Some(f) if !crate::rebase::QEMU_FORMATS.contains(&f) => Err(OptionError::Value {
            param: "backing-fmt",
            value: f.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The options of a new raw image: `size` and the file driver's `nocow`, `preallocation` and
/// `extent_size_hint` (the last value of each counts).
#[derive(Default)]
pub struct RawOptions {
    /// `-o size`.
    pub size: Option<u64>,
    /// The preallocation mode as given (checked when the file is created, as QEMU does).
    pub preallocation: Option<String>,
    /// Copy-on-write off, the extent size hint.
    pub file: FileAttributes,
}

/// Reads `-o` pairs for a new raw image (QEMU's syntax checks first).
pub fn raw_options(pairs: &[(String, String)]) -> Result<RawOptions, OptionError> {
    check_syntax(pairs, Format::Raw)?;
    let mut o = RawOptions::default();
    let size = |k: &str, v: &str| qemu_opts::size_value(k, v).map_err(OptionError::Syntax);
    for (k, v) in pairs {
        match k.as_str() {
            "size" => o.size = Some(size(k, v)?),
            "nocow" => o.file.nocow = on_off(k, v)?,
            "preallocation" => o.preallocation = Some(v.clone()),
            "extent_size_hint" => o.file.extent_size_hint = Some(size(k, v)?),
            _ => return Err(OptionError::Syntax(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

/// Creates the raw image `path` of `size` bytes (rounded up to whole sectors) as QEMU's file
/// driver does: bad values are refused before the file is made; then it is created empty
/// and locked, gets its attributes (copy-on-write off, the extent size hint, where the file
/// system has them) and is grown with the preallocation asked for. Errors carry no file name.
pub fn create_raw(path: &std::path::Path, size: u64, o: &RawOptions) -> anyhow::Result<()> {
    let mode = match o.preallocation.as_deref() {
        None => Some(Preallocation::Off),
        Some(p) => match Preallocation::from_name(p) {
            // A mode QEMU knows, but not one for files: refused once the file exists.
            Some(Preallocation::Metadata) => None,
            Some(m) => Some(m),
            None => bail!("invalid parameter value: {p}"),
        },
    };
    o.file.validate().map_err(anyhow::Error::msg)?;
    let file = qcow2::create::create_file(path, Locking::On)?;
    if let Some(e) = o.file.apply(&file) {
        crate::print_error(format!("warning: Failed to set extent size hint: {e}"));
    }
    let Some(mode) = mode else {
        bail!("Unsupported preallocation mode: metadata");
    };
    let file = qcow2::FileStorage::new(file);
    truncate_raw(&file, 0, round_to_sectors(size), mode)
}

/// A new image's size rounded up to whole sectors, as QEMU's ROUND_UP in uint64 arithmetic
/// (a size within 511 bytes of 2^64 wraps to 0).
fn round_to_sectors(size: u64) -> u64 {
    size.wrapping_add(511) & !511
}

/// QEMU's `raw_regular_truncate`: grows the raw file `file` from `current` to `size` bytes
/// (or shrinks it, without preallocation), preallocating the new part as `mode` asks.
pub fn truncate_raw(
    file: &qcow2::FileStorage,
    current: u64,
    size: u64,
    mode: Preallocation,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use qcow2::Storage as _;
    // QEMU writes the first block of a new file (to speed up its probing of the alignment
    // later); failures do not matter.
    let first_block = || {
        if current == 0 && size > 0 {
            let n = if size < 4096 { 512 } else { 4096 };
            let _ = file.write_at(&[0u8; 4096][..n], 0);
        }
    };
    // As QEMU: a preallocation that fails leaves the file at its old length.
    let or_restore = |result: anyhow::Result<()>| {
        if result.is_err() {
            let _ = file.set_len(current);
        }
        result
    };
    match mode {
        Preallocation::Metadata => bail!("Unsupported preallocation mode: metadata"),
        Preallocation::Off => {
            resize_file(file, size)?;
            first_block();
            Ok(())
        }
        Preallocation::Falloc if size > current => {
            or_restore(
                file.allocate(current, size - current)
                    .context("Could not preallocate new data"),
            )?;
            first_block();
            Ok(())
        }
        Preallocation::Falloc => Ok(()),
        Preallocation::Full => or_restore(write_zeros_up_to(file, current, size)),
    }
}

/// Grows `file` from `current` to `size` bytes by writing zeros, flushed to the disk.
fn write_zeros_up_to(file: &qcow2::FileStorage, current: u64, size: u64) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use qcow2::Storage as _;
    resize_file(file, size)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = current;
    while off < size {
        let n = (size - off).min(zeros.len() as u64);
        file.write_at(&zeros[..n as usize], off)
            .context("Could not write zeros for preallocation")?;
        off += n;
    }
    file.flush().context("Could not flush file to disk")
}

/// Sets the length of `file` to `size`, with QEMU's words for a failure: a length past
/// i64::MAX (a size rounded up past it) is ftruncate's EINVAL, which std refuses before the
/// call with words of its own.
fn resize_file(file: &qcow2::FileStorage, size: u64) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use qcow2::Storage as _;
    if i64::try_from(size).is_err() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            .context("Could not resize file");
    }
    file.set_len(size).context("Could not resize file")
}

/// qemu-img's error for a size the format or the file system cannot hold (EFBIG); `hint`
/// follows the format name.
fn too_large(filename: &str, format: &str, hint: &str) -> anyhow::Error {
    anyhow::anyhow!("{filename}: The image size is too large for file format '{format}'{hint}")
}

/// Runs `qimg create`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let options = qemu_opts::accumulate(&a.options)?;
    if options.as_deref().is_some_and(qemu_opts::has_help) {
        qemu_opts::print_help(crate::parse_format(&a.format)?, a.filename.as_deref());
        return Ok(0);
    }
    let Some(filename) = a.filename.as_deref() else {
        bail!(
            "Expecting image file name\nTry '{} create --help' for more info",
            crate::progname()
        );
    };
    let pairs = options.map_or_else(Vec::new, |s| qemu_opts::parse(&s));
    let size = a
        .size
        .as_deref()
        .map(|s| cvtnum("image size", s))
        .transpose()?;
    let fmt = crate::parse_format(&a.format).map_err(|e| anyhow::anyhow!("{filename}: {e}"))?;
    // The file named (`file:NAME` names NAME); messages name the image as given.
    let mut path = filename.to_owned();
    crate::image_name::resolve_new(&mut path).map_err(|e| anyhow::anyhow!("{filename}: {e}"))?;
    let path = std::path::Path::new(&path);
    match fmt {
        Format::Raw => create_raw_image(&a, filename, path, size, &pairs),
        Format::Qcow2 => create_qcow2(&a, filename, path, size, &pairs),
    }
}

/// `qimg create -f raw`: the image named `filename` in file `path`.
fn create_raw_image(
    a: &Args,
    filename: &str,
    path: &std::path::Path,
    size: Option<u64>,
    pairs: &[(String, String)],
) -> anyhow::Result<u8> {
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("{filename}: {e}");
    let o = raw_options(pairs).map_err(|e| fail(&e))?;
    if o.size.is_some() && size.is_some() {
        return Err(fail(&"The image size must be specified only once"));
    }
    if a.backing.is_some() {
        return Err(fail(&"Backing file not supported for file format 'raw'"));
    }
    if a.backing_format.is_some() {
        return Err(fail(
            &"Backing file format not supported for file format 'raw'",
        ));
    }
    // QEMU's size option is an int64 in which -1 means none.
    let Some(size) = o.size.filter(|&s| s != u64::MAX).or(size) else {
        return Err(fail(&"Image creation needs a size parameter"));
    };
    if !a.quiet {
        outln!(
            "{}",
            qemu_opts::formatting_line(filename, Format::Raw, pairs, size)
        );
    }
    // Like qemu-img: whole 512-byte sectors, the size printed above unrounded.
    create_raw(path, size, &o).map_err(|e| {
        let efbig = e
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(libc::EFBIG);
        match efbig {
            true => too_large(filename, "raw", ""),
            false => fail(&format!("{e:#}")),
        }
    })?;
    Ok(0)
}

/// `qimg create -f qcow2`: the image named `filename` in file `path`.
fn create_qcow2(
    a: &Args,
    filename: &str,
    path: &std::path::Path,
    size: Option<u64>,
    pairs: &[(String, String)],
) -> anyhow::Result<u8> {
    let mut o = CreateOptions {
        locking: Locking::On,
        size: size.unwrap_or(0),
        ..Default::default()
    };
    let fail = |e: OptionError| anyhow::anyhow!("{filename}: {e}");
    o = qcow2_option_fields(pairs, o).map_err(fail)?;
    // -b and -F are set after the -o options, so they count over theirs.
    let mut pairs = pairs.to_vec();
    if let Some(b) = &a.backing {
        o.backing_file = Some(b.clone());
        pairs.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &a.backing_format {
        o.backing_format = Some(f.clone());
        pairs.push(("backing_fmt".into(), f.clone()));
    }
    if o.backing_file.as_deref() == Some("") {
        bail!("{filename}: Expected backing file name, got empty string");
    }
    let size_option = pairs.iter().any(|(k, _)| k == "size");
    if size_option && size.is_some() {
        bail!("{filename}: The image size must be specified only once");
    }
    // qemu-img compares the names as given.
    if o.backing_file.as_deref() == Some(filename) {
        bail!("{filename}: Error: Trying to create an image with the same filename as the backing file");
    }
    // QEMU's size option is an int64 in which -1 means none.
    let size_given = size.is_some() || (size_option && o.size != u64::MAX);
    if !size_given && (o.backing_file.is_none() || a.unsafe_backing) {
        bail!("{filename}: Image creation needs a size parameter");
    }
    // Without -u the backing file must open, with the size given or not.
    let mut detected = None;
    if let Some(b) = o.backing_file.as_deref().filter(|_| !a.unsafe_backing) {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let (path, driver) = qcow2::open::locate_backing(b.as_ref(), dir)
            .map_err(|e| anyhow::anyhow!("{filename}: {e}\nCould not open backing image."))?;
        let format = match o.backing_format.as_deref().or(driver.as_deref()) {
            None => None,
            Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                anyhow::anyhow!("{filename}: Unknown driver '{f}'\nCould not open backing image.")
            })?),
        };
        let opts = qcow2::OpenOptions {
            read_only: true,
            format,
            ..Default::default()
        };
        let backing = qcow2::open_image(&path, &opts).map_err(|e| {
            // Here only the file driver names a file it cannot open, and the format
            // driver's errors stand alone.
            let why = match e {
                qcow2::Error::BadMagic(_) => "Image is not in qcow2 format".to_string(),
                e => e.to_string(),
            };
            anyhow::anyhow!("{filename}: {why}\nCould not open backing image.")
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
        bail!("{filename}: Backing file specified without backing format{hint}");
    }
    if !a.quiet {
        outln!(
            "{}",
            qemu_opts::formatting_line(filename, Format::Qcow2, &pairs, o.size)
        );
    }
    let choices = qcow2_option_choices(&pairs, &mut o).and_then(|()| check_backing_format(&o));
    if let Err(e) = choices {
        // QEMU's qcow2 driver refuses these once it has created (and emptied) the file, which
        // it then removes.
        qcow2::create::create_file(path, o.locking)
            .map_err(|e| anyhow::anyhow!("{filename}: {e}"))?;
        let _ = std::fs::remove_file(path);
        return Err(fail(e));
    }
    o.size = round_to_sectors(o.size);
    let rounded = o.size;
    qcow2::create(path, &o).map_err(|e| match e {
        // QEMU grows the new image to its size, rounded up to sectors, which past i64::MAX
        // reads as negative and past the block layer's limit is refused as such.
        qcow2::Error::InvalidOption(m)
            if m.starts_with("Image size too large") && rounded > i64::MAX as u64 =>
        {
            anyhow::anyhow!("{filename}: Could not resize image: Image size cannot be negative")
        }
        qcow2::Error::InvalidOption(m)
            if m.starts_with("Image size too large") && rounded > crate::BDRV_MAX_LENGTH =>
        {
            anyhow::anyhow!(
                "{filename}: Could not resize image: offset({rounded}) exceeds \
                 maximum({})",
                crate::BDRV_MAX_LENGTH
            )
        }
        qcow2::Error::InvalidOption(m) if m.starts_with("Image size too large") => {
            too_large(filename, "qcow2", " (try using a larger cluster size)")
        }
        e => anyhow::anyhow!("{filename}: {e}"),
    })?;
    Ok(0)
}
