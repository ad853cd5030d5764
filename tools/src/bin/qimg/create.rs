//! `qimg create`.

use anyhow::{bail, Context};
use qcow2::{CompressionType, CreateOptions, Format, Preallocation};

use crate::size::parse_size;

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

fn on_off(key: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

/// Builds qcow2 create options from `-o` pairs (applied on top of `base`).
pub fn qcow2_options(
    pairs: &[(String, String)],
    mut o: CreateOptions,
) -> anyhow::Result<CreateOptions> {
    for (k, v) in pairs {
        match k.as_str() {
            "size" => o.size = parse_size(v)?,
            "compat" => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid parameter '{v}'"),
                }
            }
            "cluster_size" => o.cluster_size = parse_size(v)?,
            "refcount_bits" => o.refcount_bits = v.parse().context("Invalid refcount_bits")?,
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            "backing_file" => o.backing_file = Some(v.clone()),
            "backing_fmt" => o.backing_format = Some(v.clone()),
            "data_file" => o.data_file = Some(v.clone()),
            "data_file_raw" => o.data_file_raw = on_off(k, v)?,
            "compression_type" => {
                o.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => bail!("Invalid parameter '{v}'"),
                }
            }
            "preallocation" => {
                o.preallocation = Preallocation::from_name(v)
                    .with_context(|| format!("Invalid parameter '{v}'"))?
            }
            "extended_l2" if !on_off(k, v)? => {}
            "extended_l2" => bail!("extended_l2=on is not supported by qimg yet"),
            _ => bail!("Invalid parameter '{k}'"),
        }
    }
    Ok(o)
}

/// The "Formatting ..." line qemu-img prints.
pub fn formatting_line(
    filename: &str,
    fmt: Format,
    o: &CreateOptions,
    compat_given: bool,
) -> String {
    if fmt == Format::Raw {
        return format!("Formatting '{filename}', fmt=raw size={}", o.size);
    }
    let mut s = format!(
        "Formatting '{filename}', fmt=qcow2 cluster_size={} extended_l2=off",
        o.cluster_size
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
        o.size
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
        ..Default::default()
    };
    if let Some(s) = &a.size {
        o.size = parse_size(s)?;
    }
    if fmt == Format::Raw {
        if !pairs.is_empty() || a.backing.is_some() {
            bail!("raw images take no backing file and no -o options except size");
        }
    } else {
        o = qcow2_options(&pairs, o)?;
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
    if let Some(b) = o.backing_file.as_deref().filter(|_| !a.unsafe_backing) {
        let dir = std::path::Path::new(&a.filename)
            .parent()
            .unwrap_or(std::path::Path::new("."));
        let path = qcow2::open::resolve_relative(b, dir);
        let backing = crate::open(
            path.to_str().unwrap_or(b),
            o.backing_format.as_deref(),
            true,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}\nCould not open backing image.", a.filename))?;
        if !size_given {
            // QEMU sees a raw file as whole sectors.
            o.size = match backing.format() {
                Format::Raw => backing.size().next_multiple_of(512),
                Format::Qcow2 => backing.size(),
            };
        }
    }
    if o.backing_file.is_some() && o.backing_format.is_none() {
        bail!("Backing file specified without backing format");
    }
    if !a.quiet {
        println!("{}", formatting_line(&a.filename, fmt, &o, compat_given));
    }
    let path = std::path::Path::new(&a.filename);
    match fmt {
        Format::Qcow2 => {
            qcow2::create(path, &o).map_err(|e| anyhow::anyhow!("{}: {e}", a.filename))?
        }
        // Like qemu-img: whole 512-byte sectors, the size printed above unrounded.
        Format::Raw => std::fs::File::create(path)
            .and_then(|f| f.set_len(o.size.next_multiple_of(512)))
            .with_context(|| format!("Could not create '{}'", a.filename))?,
    }
    Ok(0)
}
