//! `qimg compare`: exit 0 identical, 1 different, 2 error.

use qcow2::Image;

/// Arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict mode: sizes must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Open without taking the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    image1: String,
    /// Second image.
    image2: String,
}

const CHUNK: u64 = 1 << 20;

/// First differing byte offset in `[from, to)` of two images, if any.
fn first_difference(
    a: &dyn Image,
    b: &dyn Image,
    from: u64,
    to: u64,
) -> qcow2::Result<Option<u64>> {
    let mut x = vec![0u8; CHUNK as usize];
    let mut y = vec![0u8; CHUNK as usize];
    let mut off = from;
    while off < to {
        let n = CHUNK.min(to - off) as usize;
        a.read_at(&mut x[..n], off)?;
        b.read_at(&mut y[..n], off)?;
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// First non-zero byte offset in `[from, to)` of an image.
fn first_nonzero(a: &dyn Image, from: u64, to: u64) -> qcow2::Result<Option<u64>> {
    let mut x = vec![0u8; CHUNK as usize];
    let mut off = from;
    while off < to {
        let n = CHUNK.min(to - off) as usize;
        a.read_at(&mut x[..n], off)?;
        if let Some(i) = x[..n].iter().position(|&p| p != 0) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Runs `qimg compare`.
pub fn run(a: Args) -> anyhow::Result<u8> {
    let locking = crate::locking(a.force_share);
    let say = |s: String| {
        if !a.quiet {
            outln!("{s}");
        }
    };
    let (i1, i2) = match (
        crate::open(&a.image1, a.format1.as_deref(), true, locking),
        crate::open(&a.image2, a.format2.as_deref(), true, locking),
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            crate::print_error(format!("{e:#}"));
            return Ok(2);
        }
    };
    let (s1, s2) = (i1.size(), i2.size());
    let common = s1.min(s2);
    let result = (|| -> qcow2::Result<u8> {
        if let Some(off) = first_difference(&*i1, &*i2, 0, common)? {
            say(format!("Content mismatch at offset {}!", off / 512 * 512));
            return Ok(1);
        }
        if s1 != s2 {
            if a.strict {
                say("Strict mode: Image size mismatch!".into());
                return Ok(1);
            }
            say("Warning: Image size mismatch!".into());
            let longer = if s1 > s2 { &*i1 } else { &*i2 };
            if let Some(off) = first_nonzero(longer, common, s1.max(s2))? {
                say(format!("Content mismatch at offset {}!", off / 512 * 512));
                return Ok(1);
            }
        }
        say("Images are identical.".into());
        Ok(0)
    })();
    match result {
        Ok(c) => Ok(c),
        Err(e) => {
            crate::report_error(&anyhow::Error::new(e).context("Error while reading"));
            Ok(4)
        }
    }
}
