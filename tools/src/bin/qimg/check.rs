//! `qimg check`: qemu-img's report, JSON form and exit codes (0/1/2/3/63).

use crate::qjson::{self, QObj};
use anyhow::bail;
use qcow2::check::{Message, Repair};

/// Arguments of `qimg check`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(
        long = "output",
        default_value = "human",
        value_parser = crate::parse_output
    )]
    output: crate::Json,
    /// Repair: leaks or all.
    #[arg(
        short = 'r',
        long = "repair",
        value_parser = parse_repair
    )]
    repair: Option<Repair>,
    /// Cache mode (checked; qimg reads through the page cache whatever it is).
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

fn percent(n: u64, d: u64) -> String {
    format!(
        "{:.2}",
        if d == 0 {
            0.0
        } else {
            n as f64 * 100.0 / d as f64
        }
    )
}

/// Parses the repair mode of `-r` as qemu-img does.
fn parse_repair(r: &str) -> Result<Repair, crate::BadValue> {
    match r {
        "leaks" => Ok(Repair::Leaks),
        "all" => Ok(Repair::All),
        r => Err(crate::BadValue(format!(
            "--repair (-r) expects 'leaks' or 'all' not '{r}'"
        ))),
    }
}

/// Runs `qimg check`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    let json = a.output.0;
    let mode = a.repair.unwrap_or_default();
    if let Some(c) = a.cache.as_deref().filter(|c| !crate::valid_cache_mode(c)) {
        bail!("Invalid source cache option: {c}");
    }
    let fmt = (a.format.as_deref())
        .map(|f| crate::parse_driver(&a.filename, f))
        .transpose()?;
    let path = std::path::Path::new(&a.filename);
    let read_only = mode == Repair::Nothing;
    if a.force_share && !read_only {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.filename
        );
    }
    let opts = qcow2::OpenOptions {
        read_only,
        format: fmt,
        no_backing: true,
        check: true,
        ..Default::default()
    };
    let file = match crate::open_file(&a.filename, !read_only) {
        Ok(f) => f,
        Err(e) => {
            crate::print_error(format!("{e:#}"));
            return Ok(1);
        }
    };
    let file = qcow2::FileStorage::new(file);
    let probed = match read_only {
        true => fmt.map_or_else(|| crate::probe(&file, &a.filename), Ok)?,
        // A repair opens the image for writing: QEMU warns of a probed raw image then.
        false => crate::writable_format(&file, &a.filename, fmt)?,
    };
    if probed != qcow2::Format::Qcow2 {
        crate::print_error("This image format does not support checks");
        return Ok(63);
    }
    let locking = crate::locking(a.force_share);
    if let Err(e) = crate::lock(file.file(), &a.filename, locking, probed, !read_only) {
        crate::print_error(e);
        return Ok(1);
    }
    let storage: std::sync::Arc<dyn qcow2::Storage> = std::sync::Arc::new(file);
    let img = match qcow2::Qcow2::open_storage(storage, &opts, None) {
        Ok(i) => i,
        Err(e) => {
            crate::print_error(crate::open_error(&a.filename, e));
            return Ok(1);
        }
    };
    crate::report_open(&img);
    // qemu-img opens the backing chain too, and fails without it.
    if img.header().backing_file.is_some() {
        let chain = qcow2::OpenOptions {
            read_only: true,
            format: fmt,
            ..Default::default()
        };
        if let Err(e @ qcow2::Error::Backing { .. }) = qcow2::open_image(path, &chain) {
            crate::print_error(crate::open_error(&a.filename, e));
            return Ok(1);
        }
    }
    let report = check_and_recheck(&img, mode, json || a.quiet);
    if let Some(why) = &report.failure {
        crate::print_error(format!("Check failed: {why}"));
        return Ok(1);
    }
    if a.quiet {
    } else if json {
        print_json(&crate::image_name::as_given(&a.filename), &report);
    } else {
        print_human(&report);
    }
    if report.check_errors > 0 {
        crate::print_error("Check failed");
        return Ok(1);
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// Checks with `mode`, printing the messages as qemu-img does; if something was repaired,
/// says so (unless `silent`) and checks again. Returns the last report, with the counts of
/// what was fixed.
fn check_and_recheck(img: &qcow2::Qcow2, mode: Repair, silent: bool) -> qcow2::CheckReport {
    let first = qcow2::check::check_and_repair(img, mode);
    print_messages(&first);
    let (leaks, corruptions) = (first.leaks_fixed, first.corruptions_fixed);
    if first.failure.is_some() || leaks + corruptions == 0 {
        return first;
    }
    if !silent {
        outln!("The following inconsistencies were found and repaired:\n\n    {leaks} leaked clusters\n    {corruptions} corruptions\n\nDouble checking the fixed image now...");
    }
    let mut again = qcow2::check::check_and_repair(img, Repair::Nothing);
    print_messages(&again);
    again.leaks_fixed = leaks;
    again.corruptions_fixed = corruptions;
    again
}

/// The check's own lines go to stderr as they come (also with -q, as in qemu-img).
pub fn print_messages(report: &qcow2::CheckReport) {
    for m in &report.messages {
        match m {
            Message::Line(line) => {
                use std::io::Write as _;
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(line).and_then(|()| err.write_all(b"\n"));
            }
            Message::Error(e) => crate::print_error(e),
        }
    }
}

/// qemu-img's JSON report.
fn print_json(filename: &str, report: &qcow2::CheckReport) {
    let opt = |v: u64| (v != 0).then(|| QObj::from(v));
    let out = qjson::dict([
        ("filename", Some(filename.into())),
        ("format", Some("qcow2".into())),
        ("check-errors", Some(report.check_errors.into())),
        ("image-end-offset", opt(report.image_end_offset)),
        ("corruptions", opt(report.corruptions)),
        ("leaks", opt(report.leaks)),
        ("corruptions-fixed", opt(report.corruptions_fixed)),
        ("leaks-fixed", opt(report.leaks_fixed)),
        ("total-clusters", opt(report.total_clusters)),
        ("allocated-clusters", opt(report.allocated_clusters)),
        ("fragmented-clusters", opt(report.fragmented_clusters)),
        ("compressed-clusters", opt(report.compressed_clusters)),
    ])
    .to_json();
    outln!("{out}");
}

/// qemu-img's human-readable report.
fn print_human(report: &qcow2::CheckReport) {
    if report.is_clean() {
        outln!("No errors were found on the image.");
    }
    if report.corruptions > 0 {
        outln!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.", report.corruptions);
    }
    if report.leaks > 0 {
        outln!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.", report.leaks);
    }
    if report.check_errors > 0 {
        outln!(
            "\n{} internal errors have occurred during the check.",
            report.check_errors
        );
    }
    if report.total_clusters > 0 && report.allocated_clusters > 0 {
        let alloc = report.allocated_clusters;
        outln!(
            "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters",
            alloc,
            report.total_clusters,
            percent(alloc, report.total_clusters),
            percent(report.fragmented_clusters, alloc),
            percent(report.compressed_clusters, alloc)
        );
    }
    if report.image_end_offset > 0 {
        outln!("Image end offset: {}", report.image_end_offset);
    }
}
