//! `qimg info` (human form, as qemu-img 10 prints it).

use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context};
use qcow2::Format;

use crate::size::human;

/// Arguments of `qimg info`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (only human is implemented so far).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Open without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// Runs `qimg info`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let _ = a.force_share;
    if a.output != "human" {
        bail!("--output={} is not implemented by qimg info yet", a.output);
    }
    let meta = std::fs::metadata(&a.filename)
        .with_context(|| format!("Could not open '{}'", a.filename))?;
    let disk = meta.blocks() * 512;
    let path = std::path::Path::new(&a.filename);
    let opts = qcow2::OpenOptions {
        read_only: true,
        format: a.format.as_deref().map(crate::parse_format).transpose()?,
        no_backing: true,
        ..Default::default()
    };
    let img = qcow2::open_image(path, &opts)
        .map_err(|e| anyhow::anyhow!("Could not open '{}': {e}", a.filename))?;
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        a.filename,
        img.format().name(),
        human(img.size()),
        img.size(),
        human(disk)
    );
    if img.format() == Format::Qcow2 {
        let file = std::fs::File::open(path)?;
        let q = qcow2::Qcow2::open_storage(
            std::sync::Arc::new(qcow2::FileStorage::new(file)),
            &opts,
            None,
        )?;
        let h = q.header();
        out += &format!("cluster_size: {}\n", h.cluster_size());
        if let Some(b) = &h.backing_file {
            out += &format!("backing file: {b}\n");
        }
        if let Some(f) = &h.backing_format {
            out += &format!("backing file format: {f}\n");
        }
        if !q.snapshots().is_empty() {
            out += "Snapshot list:\n";
            out += &format!(
                "{:<10}{:<17}{:>7}{:>20}{:>16}{:>12}\n",
                "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
            );
            for s in q.snapshots() {
                out += &format!("{:<10}{:<17}\n", s.id, s.name);
            }
        }
        out += "Format specific information:\n";
        if h.version == 2 {
            out += "    compat: 0.10\n    compression type: zlib\n    refcount bits: 16\n";
        } else {
            out += &format!(
                "    compat: 1.1\n    compression type: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n",
                h.compression_type.name(),
                h.lazy_refcounts(),
                h.refcount_bits(),
                h.is_corrupt()
            );
            if let Some(d) = &h.data_file {
                out += &format!(
                    "    data file: {d}\n    data file raw: {}\n",
                    h.data_file_raw()
                );
            }
            out += "    extended l2: false\n";
        }
    }
    out += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
        a.filename,
        human(meta.len().next_multiple_of(512)),
        meta.len().next_multiple_of(512),
        human(disk)
    );
    print!("{out}");
    Ok(0)
}
