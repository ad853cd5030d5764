//! `qimg`: a drop-in for `qemu-img` on qcow2 and raw images.
//!
//! Subcommands follow qemu-img's syntax, output and exit codes; each lives in its own module.

/// `println!` that ignores a closed stdout, as qemu-img does (it ignores SIGPIPE and
/// print errors): `qimg map | head` ends quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr, as qemu-img does: `qimg check IMG 2>&1 | head`
/// keeps check's exit code instead of panicking.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `print!` that ignores a closed stdout (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// QEMU's BDRV_MAX_LENGTH: the largest size its block layer handles.
const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Writes raw bytes to stdout (names from an image need not be UTF-8), ignoring a closed
/// stdout as [`out!`] does.
fn out_bytes(bytes: &[u8]) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(bytes);
}

mod amend;
mod bench;
mod bitmap;
mod chain;
mod check;
mod cli_error;
mod commit;
mod compare;
mod convert;
mod copy_bitmaps;
mod create;
mod dd;
mod encryption;
mod image_name;
mod info;
mod interrupt;
mod map;
mod measure;
mod progress;
mod qemu_opts;
mod qjson;
mod rate_limit;
mod rebase;
mod resize;
mod size;
mod snapshot;
mod snapshot_param;
mod source_map;
mod zero_runs;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use qcow2::Locking;

/// qimg: QEMU disk image utility, compatible with qemu-img for qcow2 and raw images.
#[derive(Parser)]
#[command(
    name = "qimg",
    version,
    about,
    // As qemu-img: `help` is no command, and the help ends with the formats.
    disable_help_subcommand = true,
    after_help = "Supported image formats:\n\n  qcow2 raw"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new disk image.
    Create(create::Args),
    /// Show information about an image.
    Info(info::Args),
    /// Check an image for consistency and optionally repair it.
    Check(check::Args),
    /// Convert (copy) one or more images into a new image.
    Convert(convert::Args),
    /// Compare the guest-visible contents of two images.
    Compare(compare::Args),
    /// Change the virtual size of an image.
    Resize(resize::Args),
    /// Compute the size a new image needs.
    Measure(measure::Args),
    /// Show the allocation map of an image and its backing chain.
    Map(map::Args),
    /// Change the backing file of an image.
    Rebase(rebase::Args),
    /// Write an image's changes into its backing file.
    Commit(commit::Args),
    /// Copy (part of) an image into a new image, dd style.
    Dd(dd::Args),
    /// Run an I/O benchmark on an image.
    Bench(bench::Args),
    /// Change format options of an image in place.
    Amend(amend::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    Bitmap(bitmap::Args),
}

/// The name this program was started under (the last part of `argv[0]`), which prefixes
/// every error line as qemu-img's do: a `qemu-img` link to qimg prints "qemu-img: ...".
pub fn progname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .as_deref()
            .and_then(|a| std::path::Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qimg".to_owned())
    })
}

/// Logs to stderr as `RUST_LOG` asks; the lines qemu-img prints from its qcow2 driver
/// ([`qcow2::QEMU_STDERR`]) always, as they are.
fn init_logging() {
    use tracing_subscriber::{filter, fmt, prelude::*, EnvFilter};
    let qemu_lines = fmt::layer()
        .with_writer(std::io::stderr)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_ansi(false)
        .with_filter(filter::filter_fn(|m| m.target() == qcow2::QEMU_STDERR));
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::from_default_env());
    tracing_subscriber::registry()
        .with(logs)
        .with(qemu_lines)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let args: Vec<String> = match std::env::args_os().map(OsString::into_string).collect() {
        Ok(args) => args,
        Err(arg) => {
            eprintln!(
                "{}: argument '{}' is not UTF-8: {}",
                progname(),
                arg.to_string_lossy(),
                chain::NOT_UTF8
            );
            return ExitCode::from(1);
        }
    };
    // getopt_long, which qemu-img uses, takes any unambiguous prefix of a long option; an
    // option given twice counts with its last value; the word after an option that needs a
    // value is its value, even one that starts with '-'.
    let command = Cli::command().mut_subcommands(|s| {
        s.infer_long_args(true)
            .args_override_self(true)
            .mut_args(|a| {
                match !a.is_positional()
                    && a.get_action().takes_values()
                    && a.get_num_args().is_none_or(|n| n.takes_values())
                {
                    true => a.allow_hyphen_values(true),
                    false => a,
                }
            })
    });
    let (cli, matches) = match command
        .try_get_matches_from(&args)
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)))
    {
        Ok(parsed) => parsed,
        Err(e) => return ExitCode::from(cli_error::report(&e, &args)),
    };
    let result = match cli.command {
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Map(a) => map::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Dd(a) => dd::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Amend(a) => amend::run(a),
        // Its actions apply in command-line order, which only the matches keep.
        Command::Bitmap(a) => match matches.subcommand_matches("bitmap") {
            Some(m) => bitmap::run(a, m),
            None => unreachable!("the bitmap subcommand was parsed"),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report_error(&e);
            ExitCode::from(1)
        }
    }
}

/// Prints an error line as qemu-img does (the program name, ": " and the message, system
/// errors as strerror alone).
pub fn print_error(message: impl std::fmt::Display) {
    errln!(
        "{}: {}",
        progname(),
        without_os_error_numbers(&message.to_string())
    );
}

/// Prints a command's error as qemu-img does. Corruption found on the way is reported first
/// as QEMU's qcow2 driver reports it (on a line of its own, "qcow2: Image is corrupt: ..."),
/// and the command's error then names it an I/O error, as the block layer does. A failure
/// of an image's file while the command runs is named by the system's words alone, as the
/// block layer passes on only the errno: what the engine was doing is dropped (the errors
/// of an open were worded in QEMU's words before they got here).
pub fn report_error(e: &anyhow::Error) {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if report_corruption(cause) {
            parts.push("Input/output error".to_owned());
            break;
        }
        if let Some(qcow2::Error::Io { error, .. }) = cause.downcast_ref::<qcow2::Error>() {
            parts.push(error.to_string());
            break;
        }
        parts.push(cause.to_string());
    }
    print_error(parts.join(": "));
}

/// An error qemu-img reports as `message` alone, without the system's words; corruption
/// found on the way is reported first, as QEMU's qcow2 driver reports it.
pub fn bare_error(e: impl Into<anyhow::Error>, message: &str) -> anyhow::Error {
    e.into().chain().any(report_corruption);
    anyhow::anyhow!("{message}")
}

/// If `cause` is corruption found in a qcow2 image, prints it as QEMU's qcow2 driver does
/// (a line of its own: "qcow2: Image is corrupt: ...", or "qcow2: Marking image as corrupt:
/// ..." when the image was open for writing) and returns true; the block layer then calls
/// the failure an I/O error.
pub fn report_corruption(cause: &(dyn std::error::Error + 'static)) -> bool {
    match cause.downcast_ref::<qcow2::Error>() {
        Some(
            qcow2::Error::Corrupt(what)
            | qcow2::Error::UnalignedTable(what)
            | qcow2::Error::BackingCorrupt(what),
        ) => errln!(
            "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be \
             suppressed"
        ),
        Some(qcow2::Error::MarkedCorrupt(what)) => errln!(
            "qcow2: Marking image as corrupt: {what}; further corruption events will be \
             suppressed"
        ),
        _ => return false,
    }
    true
}

/// Drops Rust's " (os error N)" after system error texts: qemu-img prints strerror alone.
fn without_os_error_numbers(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" (os error ") {
        let tail = &rest[at + " (os error ".len()..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && tail[digits..].starts_with(')') {
            out.push_str(&rest[..at]);
            rest = &tail[digits + 1..];
        } else {
            out.push_str(&rest[..at + 1]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// A command-line value refused in qemu-img's words. Refused by a clap value parser, it is
/// reported where getopt would (in the order of the command line), followed by qemu-img's
/// "Try ... --help" line.
#[derive(Debug)]
pub struct BadValue(pub String);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadValue {}

/// The `--output` value: whether it asks for JSON.
#[derive(Clone, Copy)]
pub struct Json(pub bool);

/// Parses an `--output` value as qemu-img does.
pub fn parse_output(output: &str) -> Result<Json, BadValue> {
    match output {
        "human" => Ok(Json(false)),
        "json" => Ok(Json(true)),
        o => Err(BadValue(format!(
            "--output expects 'human' or 'json' not '{o}'"
        ))),
    }
}

/// qemu-img's error when an image's file cannot be opened: the block layer and the file
/// driver each name it.
pub fn file_open_error(path: &str, e: std::io::Error) -> anyhow::Error {
    if path.is_empty() {
        return open_error(path, qcow2::Error::NoFileName);
    }
    let given = image_name::as_given(path);
    anyhow::anyhow!("Could not open '{given}': Could not open '{path}': {e}")
}

/// Opens the file of image `name` for reading, or also writing, with qemu-img's errors.
pub fn open_file(name: &str, writable: bool) -> anyhow::Result<std::fs::File> {
    qcow2::open::open_file(std::path::Path::new(name), !writable, false)
        .map_err(|e| open_error(name, e))
}

/// qemu-img's error when the backing file of `path` cannot be opened (`why` names it).
pub fn backing_open_error(path: &str, why: impl std::fmt::Display) -> anyhow::Error {
    let given = image_name::as_given(path);
    anyhow::anyhow!("Could not open '{given}': Could not open backing file: {why}")
}

/// qemu-img's wording for an open error of a qcow2 image (or of its snapshot).
pub fn open_error(path: &str, e: qcow2::Error) -> anyhow::Error {
    let path = image_name::as_given(path);
    match e {
        qcow2::Error::Backing { reason, .. } => backing_open_error(&path, reason),
        qcow2::Error::BadMagic(_) => {
            anyhow::anyhow!("Could not open '{path}': Image is not in qcow2 format")
        }
        qcow2::Error::SnapshotNotFound | qcow2::Error::SnapshotLoad(_) => {
            anyhow::anyhow!("Failed to load snapshot: {e}")
        }
        qcow2::Error::NoSnapshots(format) => anyhow::anyhow!(
            "Failed to load snapshot: Block format '{format}' used by device '' does not \
             support temporarily loading internal snapshots"
        ),
        e => anyhow::anyhow!("Could not open '{path}': {e}"),
    }
}

/// Whether qemu-img knows the cache mode `c` (`-t`, `-T`).
pub fn valid_cache_mode(c: &str) -> bool {
    ["unsafe", "writeback", "writethrough", "none", "directsync"].contains(&c)
}

/// Parses a qemu-img format name (QEMU's other image formats are refused as formats qimg
/// does not serve).
pub fn parse_format(name: &str) -> anyhow::Result<qcow2::Format> {
    qcow2::Format::from_name(name).ok_or_else(|| match other_qemu_format(name) {
        Some(known) => anyhow::anyhow!("{}", qcow2::Error::UnsupportedFormat(known)),
        None => anyhow::anyhow!("Unknown file format '{name}'"),
    })
}

/// `name` if it is one of [`OTHER_QEMU_FORMATS`].
fn other_qemu_format(name: &str) -> Option<&'static str> {
    OTHER_QEMU_FORMATS.iter().find(|&&f| f == name).copied()
}

/// QEMU's image format drivers other than qcow2 and raw: named with `-f`, they are
/// refused as formats qimg does not serve, not as unknown drivers.
const OTHER_QEMU_FORMATS: [&str; 12] = [
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Parses the format `name` given for the image `path`, with the block layer's error (it
/// names the image it was to open).
pub fn parse_driver(path: &str, name: &str) -> anyhow::Result<qcow2::Format> {
    qcow2::Format::from_name(name).ok_or_else(|| match other_qemu_format(name) {
        Some(known) => open_error(path, qcow2::Error::UnsupportedFormat(known)),
        None => {
            let path = image_name::as_given(path);
            anyhow::anyhow!("Could not open '{path}': Unknown driver '{name}'")
        }
    })
}

/// The format of the image `name`, open in `storage`, as QEMU probes it (a format qimg does
/// not serve is refused in the words of an open that failed).
pub fn probe(storage: &dyn qcow2::Storage, name: &str) -> anyhow::Result<qcow2::Format> {
    qcow2::open::probe(storage).map_err(|e| open_error(name, e))
}

/// The format of the image `name`, open in `storage`, for a command that writes to it:
/// `given`, or probed; when probing guessed raw, QEMU's warning (block 0 of a probed raw image
/// could be turned into another format's header).
pub fn writable_format(
    storage: &dyn qcow2::Storage,
    name: &str,
    given: Option<qcow2::Format>,
) -> anyhow::Result<qcow2::Format> {
    if let Some(f) = given {
        return Ok(f);
    }
    let probed = probe(storage, name)?;
    if probed == qcow2::Format::Raw {
        warn_probed_raw(name);
    }
    Ok(probed)
}

/// Opens the file of image `name` for writing as qemu-img does: in the format given
/// (`format`, `-f`) or probed (QEMU's warning for raw), locked as a writer's.
pub fn open_for_writing(
    name: &str,
    format: Option<&str>,
) -> anyhow::Result<(std::sync::Arc<qcow2::FileStorage>, qcow2::Format)> {
    let given = format.map(|f| parse_driver(name, f)).transpose()?;
    let storage = std::sync::Arc::new(qcow2::FileStorage::new(open_file(name, true)?));
    let format = writable_format(&*storage, name, given)?;
    lock(storage.file(), name, Locking::On, format, true)?;
    Ok((storage, format))
}

/// Options to open a qcow2 image whose own file the caller opened for writing and locked:
/// its backing files are locked as QEMU locks a writer's backing chain (readers that keep
/// other writers out of qcow2 files).
pub fn writer_options() -> qcow2::OpenOptions {
    qcow2::OpenOptions {
        locking: Locking::On,
        ..Default::default()
    }
}

/// [`writer_options`] for a writer that keeps the image's persistent dirty bitmaps valid:
/// it changes no guest data, or marks what it writes in them (commit, rebase).
pub fn bitmap_keeping_writer_options() -> qcow2::OpenOptions {
    qcow2::OpenOptions {
        keep_bitmaps: true,
        ..writer_options()
    }
}

/// QEMU's warning for a raw image opened for writing without its format given.
pub fn warn_probed_raw(name: &str) {
    errln!(
        "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions."
    );
}

/// Opens an image as qemu-img would, with its error wording.
pub fn open(
    path: &str,
    format: Option<&str>,
    read_only: bool,
    locking: Locking,
) -> anyhow::Result<Box<dyn qcow2::Image>> {
    open_at(path, format, read_only, None, locking)
}

/// qemu-img's locking of images it opens: QEMU's locks, or none kept out with `-U`.
pub fn locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::On
    }
}

/// qemu-img's locking of the images it copies from: writers are kept out of raw files too.
pub fn source_locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::Consistent
    }
}

/// Locks a file qimg opened itself, as `qcow2::open_image` locks the files it opens.
pub fn lock(
    file: &std::fs::File,
    name: &str,
    locking: Locking,
    format: qcow2::Format,
    writable: bool,
) -> anyhow::Result<()> {
    qcow2::lock::lock_image_file(file, std::path::Path::new(name), locking, format, writable)
        .map_err(|e| open_error(name, e))
}

/// Opens an image, or a read-only view of one of its internal snapshots, as qemu-img would.
pub fn open_at(
    path: &str,
    format: Option<&str>,
    read_only: bool,
    snapshot: Option<qcow2::SnapshotRef>,
    locking: Locking,
) -> anyhow::Result<Box<dyn qcow2::Image>> {
    let opts = qcow2::OpenOptions {
        read_only,
        format: format.map(|f| parse_driver(path, f)).transpose()?,
        snapshot,
        locking,
        ..Default::default()
    };
    let img =
        qcow2::open_image(std::path::Path::new(path), &opts).map_err(|e| open_error(path, e))?;
    report_open(&*img);
    Ok(img)
}

/// Opens qcow2 image `name` from `storage` (`dir` resolves its backing and data file
/// names) with qemu-img's error wording.
pub fn open_qcow2(
    storage: std::sync::Arc<dyn qcow2::Storage>,
    opts: &qcow2::OpenOptions,
    dir: Option<&std::path::Path>,
    name: &str,
) -> anyhow::Result<qcow2::Qcow2> {
    let img = qcow2::Qcow2::open_storage(storage, opts, dir).map_err(|e| open_error(name, e))?;
    report_open(&img);
    Ok(img)
}

/// Prints what QEMU's qcow2 driver prints on stderr while opening `img`: its warnings, then
/// what it repaired (a dirty image after a crash).
pub fn report_open(img: &dyn qcow2::Image) {
    for w in img.open_warnings() {
        match w {
            qcow2::OpenWarning::InconsistentBitmaps { version } => {
                print_error(match version {
                    2 => {
                        "warning: This qcow2 v2 image contains bitmaps, but they may have been \
                          modified by a program without persistent bitmap support; so now they \
                          must all be considered inconsistent"
                    }
                    _ => {
                        "warning: a program lacking bitmap support modified this file, so all \
                          bitmaps are now considered inconsistent"
                    }
                });
                // QEMU's line ends without a newline.
                use std::io::Write as _;
                let _ = write!(
                    std::io::stderr(),
                    "Some clusters may be leaked, run '{} check -r' on the image file to fix.",
                    progname()
                );
            }
        }
    }
    if let Some(report) = img.dirty_repair() {
        check::print_messages(report);
    }
}

#[cfg(test)]
mod tests {
    use super::without_os_error_numbers;

    #[test]
    fn errors_print_strerror_without_the_number() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            without_os_error_numbers(&format!("t.img: error while writing at byte 0: {e}")),
            "t.img: error while writing at byte 0: No space left on device"
        );
        assert_eq!(
            without_os_error_numbers("a (os error x) b"),
            "a (os error x) b"
        );
    }
}
