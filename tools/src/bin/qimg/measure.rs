//! `qimg measure`: the file size a new image needs (QEMU's `qcow2_measure` / `raw_measure`),
//! for a given virtual size or for the contents of an existing image.

use anyhow::{bail, Context};
use qcow2::{Format, Preallocation};

use crate::chain::Chain;
use crate::qemu_opts;
use crate::qjson::{dict, QObj};
use crate::size::cvtnum;
use crate::snapshot_param;

/// Arguments of `qimg measure`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format: human or json.
    #[arg(
        long = "output",
        default_value = "human",
        value_parser = crate::parse_output
    )]
    output: crate::Json,
    /// Source image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Target image format.
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    output_format: String,
    /// Target format options.
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Virtual size of a new image (instead of a source image).
    #[arg(long = "size")]
    size: Option<String>,
    /// Measure this internal snapshot of the source: `snapshot.id=ID[,snapshot.name=NAME]`
    /// or an ID or name.
    #[arg(short = 'l', long = "snapshot")]
    snapshot: Option<String>,
    /// Open without taking the write lock (qimg takes no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The source image.
    filename: Option<String>,
}

/// `qcow2_refcount_metadata_size`: refcount blocks and table for `clusters` clusters,
/// including themselves (a fixed point).
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// `qcow2_calc_prealloc_size`: file size of a fully allocated image.
fn prealloc_size(total: u64, cs: u64, refcount_order: u32, l2e_size: u64) -> u64 {
    let aligned = total.next_multiple_of(cs);
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e_size);
    meta += nl2e * l2e_size;
    let nl1e = (nl2e * l2e_size / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// Bytes of source data that need clusters of size `cs` (QEMU's block-status walk).
fn data_clusters_bytes(src: &Chain, cs: u64) -> anyhow::Result<u64> {
    let size = src.size();
    let mut required = 0;
    let mut offset = 0;
    while offset < size {
        let e = src
            .status(offset, size - offset)
            .context("Unable to get block status")?;
        let mut pnum = e.length;
        if !e.zero && e.data && e.present {
            pnum = (offset + pnum).next_multiple_of(cs) - offset;
            required += offset % cs + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// `qcow2_get_persistent_dirty_bitmap_size` for the source's bitmaps.
fn bitmaps_size(src: &Chain, cs: u64) -> anyhow::Result<u64> {
    let Some(q) = src.top_qcow2() else {
        return Ok(0);
    };
    let size = qcow2::Image::size(q);
    let mut total = 0;
    let mut dir = 0;
    for b in crate::info::read_bitmaps(&**q.file(), &q.header())? {
        let bytes = size.div_ceil(b.granularity()).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs + (clusters * 8).next_multiple_of(cs);
        dir += (24 + b.name.len() as u64).next_multiple_of(8);
    }
    Ok(total + dir.next_multiple_of(cs))
}

/// (required, fully allocated, bitmaps) for a qcow2 target: QEMU's `qcow2_measure`, which
/// reads only the options that change the size (and checks only those).
fn measure_qcow2(
    pairs: &[(String, String)],
    size: u64,
    src: Option<&Chain>,
) -> anyhow::Result<(u64, u64, Option<u64>)> {
    // The values were checked against their types already.
    let get = |k: &str| qemu_opts::last(pairs, k);
    let extended_l2 = get("extended_l2").is_some_and(|v| qemu_opts::bool_value("", v) == Ok(true));
    let cs = get("cluster_size").map_or(65536, |v| qemu_opts::size_value("", v).unwrap_or(0));
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        bail!("Cluster size must be a power of two between 512 and 2048k");
    }
    if extended_l2 && cs < 16384 {
        bail!("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    let version = match get("compat") {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(v) => bail!("Invalid compatibility level: '{v}'"),
    };
    let refcount_bits =
        get("refcount_bits").map_or(16, |v| qemu_opts::number_value("", v).unwrap_or(0));
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        bail!("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if version < 3 && refcount_bits != 16 {
        bail!(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)"
        );
    }
    let preallocation = match get("preallocation") {
        None => Preallocation::Off,
        Some(v) => Preallocation::from_name(v)
            .ok_or_else(|| anyhow::anyhow!("invalid parameter value: {v}"))?,
    };
    let has_backing_file = get("backing_file").is_some();
    if get("encrypt.format") == Some("luks") {
        if get("encrypt.key-secret").is_none() {
            bail!("Parameter 'encrypt.key-secret' is required for cipher");
        }
        bail!("qimg does not support encrypted images");
    }
    let l2e_size = if extended_l2 { 16 } else { 8 };
    let mut virtual_size = size.next_multiple_of(cs);
    if (virtual_size / cs).div_ceil(cs / l2e_size) * 8 > 32 << 20 {
        bail!("The image size is too large (try using a larger cluster size)");
    }
    let mut required = 0;
    let mut bitmaps = None;
    if let Some(src) = src {
        virtual_size = src.size().next_multiple_of(cs);
        required = if has_backing_file {
            virtual_size
        } else {
            data_clusters_bytes(src, cs)?
        };
        let supports = src.top_qcow2().is_some_and(|q| q.header().version >= 3);
        if version >= 3 && supports {
            bitmaps = Some(bitmaps_size(src, cs)?);
        }
    }
    if matches!(preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully = prealloc_size(virtual_size, cs, refcount_bits.trailing_zeros(), l2e_size);
    Ok((fully - virtual_size + required, fully, bitmaps))
}

/// Runs `qimg measure`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    if let Some(name) = &mut a.filename {
        a.names.resolve(name, &mut a.format)?;
    }
    let json = a.output.0;
    let options = qemu_opts::accumulate(&a.options)?;
    let snapshot = snapshot_param::parse_given(a.snapshot.as_deref())?;
    let size = (a.size.as_deref())
        .map(|v| cvtnum("image size", v))
        .transpose()?;
    let src = match (size, &a.filename) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (_, None) if a.format.is_some() || snapshot.is_some() => {
            bail!("--image-opts, -f, and -l require a filename argument.")
        }
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (None, Some(f)) => Some(Chain::open(
            f,
            a.format.as_deref(),
            snapshot.as_ref(),
            crate::locking(a.force_share),
        )?),
        (Some(_), None) => None,
    };
    let size = size.unwrap_or(0);
    let fmt = crate::parse_format(&a.output_format)?;
    let pairs = options.map_or_else(Vec::new, |o| qemu_opts::parse(&o));
    if let Err(e) = qemu_opts::validate(&pairs, &qemu_opts::create_options(fmt, true)) {
        crate::print_error(e);
        bail!("Invalid options for file format '{}'", fmt.name());
    }
    let (required, fully, bitmaps) = match fmt {
        Format::Raw => {
            let r = src.as_ref().map_or(size.next_multiple_of(512), Chain::size);
            (r, r, None)
        }
        Format::Qcow2 => measure_qcow2(&pairs, size, src.as_ref())?,
    };
    if json {
        let obj = dict([
            ("required", Some(required.into())),
            ("fully-allocated", Some(fully.into())),
            ("bitmaps", bitmaps.map(QObj::from)),
        ]);
        outln!("{}", obj.to_json());
    } else {
        outln!("required size: {required}\nfully allocated size: {fully}");
        if let Some(b) = bitmaps {
            outln!("bitmaps size: {b}");
        }
    }
    Ok(0)
}
