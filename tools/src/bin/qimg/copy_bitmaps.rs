//! Bitmaps in `qimg convert`: with `--bitmaps` the source's persistent dirty bitmaps copied
//! into the target as qemu-img copies them (QEMU's `convert_check_bitmaps` and
//! `convert_copy_bitmaps`: same names, granularities and enabled state, and the same bits);
//! with `-n` the target's own enabled bitmaps marked dirty over the disk it rewrites. Also
//! the marks of `commit` and `rebase`, whose writes qemu-img's bitmaps record.

use anyhow::bail;
use qcow2::format::bitmaps::{AUTO, IN_USE};
use qcow2::{BitmapBits, Image, Locking, Qcow2};

/// Opens the source image `name` for its bitmaps; refuses, as qemu-img does, an image that
/// cannot have any (raw, qcow2 version 2), and an inconsistent bitmap unless `skip_broken`.
pub fn source(
    name: &str,
    format: Option<&str>,
    skip_broken: bool,
    locking: Locking,
) -> anyhow::Result<Qcow2> {
    let src = crate::snapshot::open(name, format, false, locking, None, true)?
        .filter(|q| q.header().version >= 3)
        .ok_or_else(|| anyhow::anyhow!("Source lacks bitmap support"))?;
    if !skip_broken {
        // QEMU goes through an image's bitmaps last first.
        if let Some(b) = src.bitmaps()?.iter().rev().find(|b| b.flags & IN_USE != 0) {
            bail!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use \
                 '{} bitmap --remove' to delete it",
                b.display_name(),
                crate::progname()
            );
        }
    }
    Ok(src)
}

/// Copies every bitmap of `src` into `target` (skipping inconsistent ones with a warning).
/// As in QEMU, they are gone through last first, up to the first whose name the target has
/// (an error), and those copied keep their order in the target's directory.
pub fn copy(src: &Qcow2, target: &Qcow2) -> anyhow::Result<()> {
    let taken: Vec<Vec<u8>> = target.bitmaps()?.into_iter().map(|b| b.name).collect();
    let mut copied = Vec::new();
    let mut clash = None;
    for b in src.bitmaps()?.into_iter().rev() {
        if b.flags & IN_USE != 0 {
            errln!(
                "{}: warning: Skipping inconsistent bitmap '{}'",
                crate::progname(),
                b.display_name()
            );
        } else if taken.contains(&b.name) {
            clash = Some(b);
            break;
        } else {
            copied.push(b);
        }
    }
    // The clash last: adding it gives the error.
    for b in copied.into_iter().rev().chain(clash) {
        if let Err(e) = target.add_bitmap(&b.name, b.granularity(), b.flags & AUTO != 0) {
            bail!("Failed to create bitmap {}: {e}", b.display_name());
        }
        let populated = src
            .bitmap_bits(&b.name)
            .and_then(|bits| target.merge_into_bitmap(&b.name, &bits));
        if let Err(e) = populated {
            let _ = target.remove_bitmap(&b.name);
            bail!("Failed to populate bitmap {}: {e}", b.display_name());
        }
    }
    Ok(())
}

/// Marks every enabled bitmap of `target` wholly dirty: `convert -n` writes the whole disk
/// without tracking its writes (qemu-img's writes mark them as they go).
pub fn dirty_enabled(target: &Qcow2) -> anyhow::Result<()> {
    for b in target.bitmaps()? {
        if b.flags & AUTO != 0 && b.flags & IN_USE == 0 {
            target.dirty_whole_bitmap(&b.name)?;
        }
    }
    Ok(())
}

/// Marks the guest ranges `ranges` (offset, length) dirty in every enabled bitmap of
/// `target`, as the writes of qemu-img's commit and rebase mark them.
pub fn mark_dirty(target: &Qcow2, ranges: &[(u64, u64)]) -> anyhow::Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    let size = target.size();
    for b in target.bitmaps()? {
        if b.flags & AUTO == 0 || b.flags & IN_USE != 0 {
            continue;
        }
        let g = b.granularity();
        let mut bits = BitmapBits {
            granularity: g,
            disk_size: size,
            bits: vec![0; size.div_ceil(g).div_ceil(8) as usize],
        };
        for &(offset, len) in ranges.iter().filter(|&&(o, l)| l > 0 && o < size) {
            let end = (offset + len).min(size);
            for k in offset / g..=(end - 1) / g {
                bits.bits[(k / 8) as usize] |= 1 << (k % 8);
            }
        }
        target.merge_into_bitmap(&b.name, &bits)?;
    }
    Ok(())
}
