//! `qimg dd`: copy (part of) an image into a new image, with qemu-img's `bs=`, `count=`,
//! `skip=`, `if=` and `of=` operands (including its way of counting `count` from the start
//! of the input, skipped blocks included).

use anyhow::{bail, Context};
use qcow2::{CreateOptions, Format, Locking};

use crate::size::{cvtint_full, cvtnum_full};

/// Arguments of `qimg dd`.
#[derive(clap::Args)]
pub struct Args {
    /// Input format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: String,
    /// Open the input without taking the write lock (qimg takes no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// Operands: if=FILE of=FILE bs=SIZE count=N skip=N.
    operands: Vec<String>,
}

/// The parsed operands.
struct Operands {
    input: String,
    output: String,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse_operands(ops: &[String]) -> anyhow::Result<Operands> {
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512, None, 0);
    let number = |name, v| cvtint_full(name, v, 0, i64::MAX as u64);
    for op in ops {
        // An unknown operand is named without its value.
        let Some((k, v)) = op.split_once('=') else {
            bail!("unrecognized operand {op}");
        };
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => bs = cvtnum_full("bs", v, 1, i32::MAX as u64)?,
            "count" => count = Some(number("count", v)?),
            "skip" => skip = number("skip", v)?,
            _ => bail!("unrecognized operand {k}"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    Ok(Operands {
        input,
        output,
        bs,
        count,
        skip,
    })
}

/// Runs `qimg dd`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    let mut ops = parse_operands(&a.operands)?;
    a.names.resolve(&mut ops.input, &mut a.format)?;
    crate::image_name::resolve_new(&mut ops.output)?;
    let input = crate::open(
        &ops.input,
        a.format.as_deref(),
        true,
        crate::source_locking(a.force_share),
    )?;
    let out_fmt = qcow2::Format::from_name(&a.output_format)
        .ok_or_else(|| anyhow::anyhow!("Unknown file format"))?;
    let mut size = match input.format() {
        Format::Raw => input.size().next_multiple_of(512),
        Format::Qcow2 => input.size(),
    };
    if let Some(c) = ops.count {
        size = size.min(c.saturating_mul(ops.bs));
    }
    let skip = ops.skip.checked_mul(ops.bs).filter(|&s| s <= size);
    let out_size = skip.map_or(0, |s| size - s);
    let out_path = std::path::Path::new(&ops.output);
    let created = match out_fmt {
        Format::Qcow2 => qcow2::create(
            out_path,
            &CreateOptions {
                size: out_size,
                locking: Locking::On,
                ..Default::default()
            },
        )
        .map_err(anyhow::Error::from),
        Format::Raw => crate::create::create_raw(out_path, out_size, &Default::default()),
    };
    created
        .map_err(|e| anyhow::anyhow!("{}: error while creating output image: {e:#}", ops.output))?;
    let Some(mut in_pos) = skip else {
        crate::print_error(format!("{}: cannot skip to specified offset", ops.input));
        return Ok(0);
    };
    let output = crate::open(&ops.output, Some(out_fmt.name()), false, Locking::On)?;
    let mut buf = vec![0u8; ops.bs.min(size - in_pos).max(1) as usize];
    let mut out_pos = 0;
    while in_pos < size {
        let n = ops.bs.min(size - in_pos) as usize;
        // A raw input reads as whole sectors: zeros after its last byte.
        let readable = input.size().saturating_sub(in_pos).min(n as u64) as usize;
        if readable > 0 {
            input
                .read_at(&mut buf[..readable], in_pos)
                .context("error while reading from input image file")?;
        }
        buf[readable..n].fill(0);
        output
            .write_at(&buf[..n], out_pos)
            .context("error while writing to output image file")?;
        in_pos += n as u64;
        out_pos += n as u64;
    }
    output
        .flush()
        .context("error while flushing output image file")?;
    Ok(0)
}
