//! `qimg check`: qemu-img's report, JSON form and exit codes (0/1/2/3/63).

use crate::qjson::{self, QObj};
use anyhow::bail;

/// Arguments of `qimg check`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Repair: leaks or all.
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Open without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
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

/// Runs `qimg check`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    crate::output_is_json("check", &a.output)?;
    if let Some(r) = &a.repair {
        if r != "leaks" && r != "all" {
            bail!("Unknown option for -r (expecting 'leaks' or 'all'): {r}");
        }
    }
    let fmt = a.format.as_deref().map(crate::parse_format).transpose()?;
    let path = std::path::Path::new(&a.filename);
    let read_only = a.repair.is_none();
    let opts = qcow2::OpenOptions {
        read_only,
        format: fmt,
        no_backing: true,
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
    let probed = fmt.map_or_else(|| qcow2::open::probe(&file), Ok)?;
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
            crate::print_error(format!("Could not open '{}': {e}", a.filename));
            return Ok(1);
        }
    };
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
    let mut report = qcow2::check(&img)?;
    let (mut leaks_fixed, mut corruptions_fixed) = (0, 0);
    if a.repair.is_some() && !report.is_clean() {
        let fix_all = a.repair.as_deref() == Some("all");
        if report.corruptions == 0 || fix_all {
            for m in &report.messages {
                eprintln!("{m}");
            }
            qcow2::check::rebuild_refcounts(&img)?;
            leaks_fixed = report.leaks;
            corruptions_fixed = if fix_all { report.corruptions } else { 0 };
            if !a.quiet && a.output == "human" {
                println!("The following inconsistencies were found and repaired:\n\n    {leaks_fixed} leaked clusters\n    {corruptions_fixed} corruptions\n\nDouble checking the fixed image now...");
            }
            report = qcow2::check(&img)?;
        }
    }
    if a.output == "json" {
        let opt = |v: u64| (v != 0).then(|| QObj::from(v));
        let out = qjson::dict([
            ("filename", Some(a.filename.as_str().into())),
            ("format", Some("qcow2".into())),
            ("check-errors", Some(report.check_errors.into())),
            ("image-end-offset", opt(report.image_end_offset)),
            ("corruptions", opt(report.corruptions)),
            ("leaks", opt(report.leaks)),
            ("corruptions-fixed", opt(corruptions_fixed)),
            ("leaks-fixed", opt(leaks_fixed)),
            ("total-clusters", opt(report.total_clusters)),
            ("allocated-clusters", opt(report.allocated_clusters)),
            ("fragmented-clusters", opt(report.fragmented_clusters)),
            ("compressed-clusters", opt(report.compressed_clusters)),
        ])
        .to_json();
        println!("{out}");
        for m in &report.messages {
            eprintln!("{m}");
        }
    } else if !a.quiet {
        for m in &report.messages {
            eprintln!("{m}");
        }
        if report.is_clean() {
            println!("No errors were found on the image.");
        }
        if report.corruptions > 0 {
            println!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.", report.corruptions);
        }
        if report.leaks > 0 {
            println!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.", report.leaks);
        }
        if report.total_clusters > 0 && report.allocated_clusters > 0 {
            let alloc = report.allocated_clusters;
            println!(
                "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters",
                alloc,
                report.total_clusters,
                percent(alloc, report.total_clusters),
                percent(report.fragmented_clusters, alloc),
                percent(report.compressed_clusters, alloc)
            );
        }
        if report.image_end_offset > 0 {
            println!("Image end offset: {}", report.image_end_offset);
        }
    }
    Ok(if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}
