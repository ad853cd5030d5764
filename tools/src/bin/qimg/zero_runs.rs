//! qemu-img convert's search for zeros in the data it copies (`is_allocated_sectors_min`),
//! so that a raw target gets the same holes: zero runs of at least `-S` bytes inside data
//! are left out, shorter ones are written with the data around them, and the ends of runs
//! are aligned to the largest power of two not above `-S`.

/// Bytes per sector, the unit of the search.
const SECTOR: usize = 512;

/// Splits `data` (at guest sector `sector`) into runs as qemu-img convert writes them:
/// `(is_data, bytes)` in order, with `-S` of `min_sparse` bytes (a multiple of 512, not 0).
/// The last sector of `data` may be short.
pub fn runs(data: &[u8], sector: u64, min_sparse: u64) -> Vec<(bool, usize)> {
    let min = (min_sparse / SECTOR as u64) as usize;
    let alignment = 1u64 << (63 - (min as u64).leading_zeros());
    let mut out: Vec<(bool, usize)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let (is_data, n) = run_min(rest, sector + (pos / SECTOR) as u64, min, alignment);
        let bytes = (n * SECTOR).min(rest.len());
        match out.last_mut() {
            Some((d, len)) if *d == is_data => *len += bytes,
            _ => out.push((is_data, bytes)),
        }
        pos += bytes;
    }
    out
}

/// Sectors in `buf` (the last may be short).
fn sectors(buf: &[u8]) -> usize {
    buf.len().div_ceil(SECTOR)
}

/// Whether sector `k` of `buf` holds only zeros.
fn zero_sector(buf: &[u8], k: usize) -> bool {
    buf[k * SECTOR..((k + 1) * SECTOR).min(buf.len())]
        .iter()
        .all(|&b| b == 0)
}

/// QEMU's `is_allocated_sectors`: whether the run at the start of `buf` is data, and its
/// length in sectors. A data run's end is aligned up to `alignment` (sectors from the
/// disk's start), a zero run's down; a zero run no longer than the part it would lose
/// counts as data.
fn run(buf: &[u8], sector: u64, alignment: u64) -> (bool, usize) {
    let n = sectors(buf);
    let mut zero = zero_sector(buf, 0);
    let mut i = 1;
    while i < n && zero_sector(buf, i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, n);
    }
    let tail = ((sector + i as u64) & (alignment - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            zero = false;
        }
        if zero {
            i -= tail;
        } else {
            i = (i + alignment as usize - tail).min(n);
        }
    }
    (!zero, i)
}

/// QEMU's `is_allocated_sectors_min`: as [`run`], but a data run goes on over zero runs
/// shorter than `min` sectors that more data follows.
fn run_min(buf: &[u8], sector: u64, min: usize, alignment: u64) -> (bool, usize) {
    let n = sectors(buf);
    let min = min.min(n);
    let (is_data, first) = run(buf, sector, alignment);
    if !is_data {
        return (false, first);
    }
    let (mut used, mut checked) = (first, first);
    while checked < n {
        let (d, len) = run(&buf[checked * SECTOR..], sector + checked as u64, alignment);
        checked += len;
        if d {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sectors` of data with zero sectors at `zeros`.
    fn disk(sectors: usize, zeros: std::ops::Range<usize>) -> Vec<u8> {
        let mut d = vec![1u8; sectors * SECTOR];
        d[zeros.start * SECTOR..zeros.end * SECTOR].fill(0);
        d
    }

    #[test]
    fn zero_runs_of_at_least_min_sparse_are_left_out_with_aligned_ends() {
        // -S 4k: a 10-sector zero run after 256 data sectors loses its last 2 sectors to
        // the alignment (8 sectors).
        let d = disk(300, 256..266);
        assert_eq!(
            runs(&d, 0, 4096),
            [(true, 256 * 512), (false, 8 * 512), (true, 36 * 512)]
        );
        // Shorter than -S: written with the data.
        assert_eq!(runs(&d, 0, 8192), [(true, 300 * 512)]);
    }

    #[test]
    fn a_data_run_end_is_aligned_up_like_qemu_img() {
        // 3 data sectors at sector 1024, then zeros: written as 8 sectors (4 KiB).
        let d = disk(16, 3..16);
        assert_eq!(runs(&d, 1024, 4096), [(true, 8 * 512), (false, 8 * 512)]);
    }

    #[test]
    fn sizes_that_are_no_power_of_two_align_to_the_power_below() {
        // -S 3k (6 sectors): alignment 4 sectors; a 10-sector zero run at 256 keeps 8.
        let d = disk(300, 256..266);
        assert_eq!(
            runs(&d, 0, 3072),
            [(true, 256 * 512), (false, 8 * 512), (true, 36 * 512)]
        );
    }

    #[test]
    fn a_short_last_sector_counts_as_a_sector() {
        let mut d = disk(2, 1..2);
        d.truncate(512 + 100);
        assert_eq!(runs(&d, 0, 512), [(true, 512), (false, 100)]);
    }
}
