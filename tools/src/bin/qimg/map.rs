//! `qimg map`: the allocation map through the backing chain, printed as qemu-img prints it
//! (merged runs; JSON one object per line, or the human table of data areas).

use anyhow::{bail, Context};

use crate::chain::{Chain, Extent};
use crate::size::cvtnum;

/// Arguments of `qimg map`.
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
    /// First guest byte to map.
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Most bytes to map.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Open without taking the write lock (qimg takes no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

/// qemu-img's `entry_mergeable`.
fn mergeable(curr: &Extent, next: &Extent) -> bool {
    curr.length > 0
        && curr.zero == next.zero
        && curr.data == next.data
        && curr.compressed == next.compressed
        && curr.depth == next.depth
        && curr.present == next.present
        && match (curr.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + curr.length == b,
            _ => false,
        }
}

/// C's `%#-16x`: `0x`-prefixed hex (plain `0` for zero), left-justified in 16 columns.
fn hex(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Prints one entry; for the human form, may rewrite `next` to coalesce more
/// (qemu-img's `dump_map_entry`). Fails on data without an offset in the human form.
fn dump(
    json: bool,
    e: &Extent,
    next: Option<&mut Extent>,
    chain: &Chain,
    out: &mut String,
) -> anyhow::Result<()> {
    if json {
        out.push_str(&format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        ));
        if let Some(o) = e.offset {
            out.push_str(&format!(", \"offset\": {o}"));
        }
        out.push('}');
        if next.is_some() {
            out.push_str(",\n");
        }
        return Ok(());
    }
    if e.data && e.offset.is_none() {
        bail!("File contains external, encrypted or compressed clusters.");
    }
    if e.data && !e.zero {
        out.push_str(&format!(
            "{}{}{}{}\n",
            hex(e.start),
            hex(e.length),
            hex(e.offset.unwrap_or(0)),
            chain.data_name(e.depth)
        ));
    }
    if let Some(n) = next {
        if !n.data || n.zero {
            n.data = false;
            n.zero = true;
        }
    }
    Ok(())
}

/// An offset or length option ("Invalid `what` specified" on a bad value).
fn parse_opt(v: &Option<String>, what: &str) -> anyhow::Result<Option<u64>> {
    v.as_deref().map(|s| cvtnum(what, s)).transpose()
}

/// Runs `qimg map`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    let json = a.output.0;
    let start = parse_opt(&a.start_offset, "start offset")?.unwrap_or(0);
    let max_length = parse_opt(&a.max_length, "max length")?.unwrap_or(i64::MAX as u64);
    let chain = Chain::open(
        &a.filename,
        a.format.as_deref(),
        None,
        crate::locking(a.force_share),
    )?;
    let end = chain.size().min(start.saturating_add(max_length));
    let mut out = String::new();
    if json {
        out.push('[');
    } else {
        out.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ));
    }
    let mut curr = Extent {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    };
    let result = (|| -> anyhow::Result<()> {
        while curr.start + curr.length < end {
            let offset = curr.start + curr.length;
            let mut next = chain
                .status(offset, end - offset)
                .context("Could not read file metadata")?;
            if mergeable(&curr, &next) {
                curr.length += next.length;
                continue;
            }
            if curr.length > 0 {
                dump(json, &curr, Some(&mut next), &chain, &mut out)?;
            }
            curr = next;
        }
        dump(json, &curr, None, &chain, &mut out)
    })();
    // qemu-img closes the list only when the whole map was read.
    if json && result.is_ok() {
        out.push_str("]\n");
    }
    out!("{out}");
    result.map(|()| 0)
}
