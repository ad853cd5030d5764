//! Consistency check and refcount rebuild: recount every reference from the metadata and
//! compare with the stored refcounts (what `qemu-img check` does).

use crate::engine::meta::{encode_u64_table, read_u64_table};
use crate::engine::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::{be16, be32, be64};
use crate::format::tables::{self, L2Entry, COPIED, OFFSET_MASK};
use crate::image::Image;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references (data may be lost if the cluster is reused).
    pub corruptions: u64,
    /// Refcounts higher than the references (wasted space only).
    pub leaks: u64,
    /// Problems that stopped parts of the check (unreadable tables).
    pub check_errors: u64,
    /// Guest clusters allocated in the active L1 (normal, compressed, preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, in QEMU's wording.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// Counts references to host clusters.
struct Counter {
    cs: u64,
    expected: Vec<u64>,
    report: CheckReport,
    copied_checks: Vec<CopiedCheck>,
}

struct CopiedCheck {
    host: u64,
    copied: bool,
    what: String,
}

impl Counter {
    fn add(&mut self, what: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(last) = offset.checked_add(len - 1) else {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR: {what} at offset 0x{offset:x} ({len} bytes) is beyond the end of the image file"
            ));
            return;
        };
        for c in offset / self.cs..=last / self.cs {
            match self.expected.get_mut(c as usize) {
                Some(n) => *n += 1,
                None => {
                    self.report.corruptions += 1;
                    self.report.messages.push(format!(
                        "ERROR: {what} at offset 0x{:x} is beyond the end of the image file",
                        c * self.cs
                    ));
                    return;
                }
            }
        }
    }
}

/// Recounts all references. `include_refcount_structures` is false when rebuilding.
fn count_references(img: &Qcow2, include_refcount_structures: bool) -> Result<Counter> {
    let file = &**img.file();
    let header = img.header();
    let cs = header.cluster_size();
    let file_len = file.len().map_err(|e| Error::io("getting file size", e))?;
    let clusters = file_len.div_ceil(cs);
    let mut c = Counter {
        cs,
        expected: vec![0; clusters as usize],
        report: CheckReport {
            total_clusters: header.size.div_ceil(cs),
            ..Default::default()
        },
        copied_checks: Vec::new(),
    };
    c.add("header", 0, cs);
    let l1 = read_u64_table(file, header.l1_table_offset, header.l1_size as usize)?;
    c.add(
        "L1 table",
        header.l1_table_offset,
        header.l1_size as u64 * 8,
    );
    count_l1(img, &mut c, &l1, true)?;
    for s in img.snapshots() {
        c.add("snapshot L1 table", s.l1_table_offset, s.l1_size as u64 * 8);
        if s.l1_size as u64 * 8 > crate::format::header::MAX_L1_BYTES {
            c.report.corruptions += 1;
            c.report.messages.push(format!(
                "ERROR: snapshot {} has an oversized L1 table",
                s.id
            ));
            continue;
        }
        let sl1 = read_u64_table(file, s.l1_table_offset, s.l1_size as usize)?;
        count_l1(img, &mut c, &sl1, false)?;
    }
    if header.nb_snapshots > 0 {
        let len = snapshot_table_len(img, &header)?;
        c.add("snapshot table", header.snapshots_offset, len);
    }
    if let Some(bm) = &header.bitmaps {
        count_bitmaps(img, &mut c, bm.directory_offset(), bm.directory_size())?;
    }
    if include_refcount_structures {
        c.add(
            "refcount table",
            header.refcount_table_offset,
            header.refcount_table_clusters as u64 * cs,
        );
        let m = img.meta();
        for &e in &m.reftable {
            let off = e & !0x1ff;
            if off != 0 {
                c.add("refcount block", off, cs);
            }
        }
    }
    Ok(c)
}

fn snapshot_table_len(img: &Qcow2, header: &crate::format::header::Header) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    img.file()
        .read_at(&mut buf, header.snapshots_offset)
        .map_err(|e| Error::io("reading the snapshot table", e))?;
    let mut len = crate::format::snapshot::parse_table(&buf, header.nb_snapshots)
        .map(|(_, l)| l as u64)
        .unwrap_or(0);
    if len == 0 {
        // Larger than our first read: read it all.
        let mut big = vec![0u8; 64 << 20];
        img.file()
            .read_at(&mut big, header.snapshots_offset)
            .map_err(|e| Error::io("reading the snapshot table", e))?;
        len = crate::format::snapshot::parse_table(&big, header.nb_snapshots)?.1 as u64;
    }
    Ok(len)
}

fn count_l1(img: &Qcow2, c: &mut Counter, l1: &[u64], active: bool) -> Result<()> {
    let file = &**img.file();
    let cs = c.cs;
    let bits = img.header().cluster_bits;
    let has_data_file = img.has_data_file();
    let mut next_contiguous = 0u64;
    for (i, &e) in l1.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            c.report.corruptions += 1;
            c.report.messages.push(format!(
                "ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        c.add("L2 table", off, cs);
        if active {
            c.copied_checks.push(CopiedCheck {
                host: off,
                copied: e & COPIED != 0,
                what: format!("L2 cluster: l1_index={i} l1_entry={e:x}"),
            });
        }
        if off + cs > c.expected.len() as u64 * cs {
            continue;
        }
        let l2 = read_u64_table(file, off, (cs / 8) as usize)?;
        for &raw in &l2 {
            let entry = L2Entry::decode(raw, bits);
            match entry {
                L2Entry::Unallocated => {}
                L2Entry::Compressed { host, len } => {
                    let start = host & !511;
                    c.add("compressed cluster", start, len + (host - start));
                    if active {
                        // Compressed clusters count as fragmented, as in QEMU.
                        c.report.allocated_clusters += 1;
                        c.report.compressed_clusters += 1;
                        c.report.fragmented_clusters += 1;
                    }
                }
                L2Entry::Zero { host: None, .. } => {}
                L2Entry::Normal { host, copied }
                | L2Entry::Zero {
                    host: Some(host),
                    copied,
                } => {
                    if host % cs != 0 {
                        c.report.corruptions += 1;
                        c.report.messages.push(format!(
                            "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                        ));
                        continue;
                    }
                    if raw & tables::L2_RESERVED != 0 && matches!(entry, L2Entry::Normal { .. }) {
                        c.report.check_errors += 1;
                    }
                    if active {
                        c.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            c.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                    if !has_data_file {
                        c.add("data cluster", host, cs);
                        if active {
                            c.copied_checks.push(CopiedCheck {
                                host,
                                copied,
                                what: format!("data cluster: l2_entry={raw:x}"),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn count_bitmaps(img: &Qcow2, c: &mut Counter, dir_off: u64, dir_size: u64) -> Result<()> {
    if dir_size > 64 << 20 {
        return Err(Error::Corrupt(format!(
            "bitmap directory of {dir_size} bytes is too large"
        )));
    }
    c.add("bitmap directory", dir_off, dir_size);
    let mut dir = vec![0u8; dir_size as usize];
    img.file()
        .read_at(&mut dir, dir_off)
        .map_err(|e| Error::io("reading the bitmap directory", e))?;
    let mut pos = 0usize;
    while pos + 24 <= dir.len() {
        let table_off = be64(&dir, pos);
        let table_size = be32(&dir, pos + 8) as u64;
        let name_size = be16(&dir, pos + 18) as usize;
        let extra = be32(&dir, pos + 20) as usize;
        c.add("bitmap table", table_off, table_size * 8);
        if table_size * 8 <= 64 << 20 {
            let table = read_u64_table(&**img.file(), table_off, table_size as usize)?;
            for e in table {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    c.add("bitmap data", off, c.cs);
                }
            }
        }
        pos += (24 + extra + name_size).div_ceil(8) * 8;
    }
    Ok(())
}

/// Checks the image's refcounts and flags against its metadata.
pub fn check(img: &Qcow2) -> Result<CheckReport> {
    img.flush()?;
    let counter = count_references(img, true)?;
    let Counter {
        cs,
        expected,
        mut report,
        copied_checks,
    } = counter;
    let file = &**img.file();
    let mut m = img.meta_mut();
    let mut highest = 0u64;
    for (i, &want) in expected.iter().enumerate() {
        let have = m.refcount(file, i as u64)?;
        if have > 0 || want > 0 {
            highest = i as u64 + 1;
        }
        if have < want {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR cluster {i} refcount={have} reference={want}"
            ));
        } else if have > want {
            report.leaks += 1;
            report.messages.push(format!(
                "Leaked cluster {i} refcount={have} reference={want}"
            ));
        }
    }
    for chk in copied_checks {
        let rc = m.refcount(file, chk.host / cs)?;
        if (rc == 1) != chk.copied {
            report.corruptions += 1;
            report
                .messages
                .push(format!("ERROR OFLAG_COPIED {} refcount={rc}", chk.what));
        }
    }
    report.image_end_offset = highest * cs;
    Ok(report)
}

/// Rebuilds the refcount structures from the metadata: new refcount blocks and table are
/// written after the end of the file, then the header is switched over to them.
pub fn rebuild_refcounts(img: &Qcow2) -> Result<()> {
    let counter = count_references(img, false)?;
    let mut expected = counter.expected;
    let cs = counter.cs;
    let file = &**img.file();
    let mut m = img.meta_mut();
    let order = m.geo.refcount_order;
    let per_block = m.geo.refblock_entries();
    let start = expected.len() as u64;
    // Find how many blocks and table clusters describe everything including themselves.
    let (mut blocks, mut table_clusters) = (0u64, 0u64);
    loop {
        let total = start + blocks + table_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    expected.resize((start + blocks + table_clusters) as usize, 0);
    for c in start..start + blocks + table_clusters {
        expected[c as usize] = 1;
    }
    let max = tables::max_refcount(order);
    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        let lo = b * per_block;
        for i in 0..per_block {
            if let Some(&n) = expected.get((lo + i) as usize) {
                if n > max {
                    return Err(Error::Corrupt(format!(
                        "cluster {} has {n} references, more than {} refcount bits hold",
                        lo + i,
                        1 << order
                    )));
                }
                tables::set_refcount(&mut block, order, i as usize, n);
            }
        }
        let off = (start + b) * cs;
        file.write_at(&block, off)
            .map_err(|e| Error::io(format!("writing refcount block at 0x{off:x}"), e))?;
        table[b as usize] = off;
    }
    let table_off = (start + blocks) * cs;
    file.write_at(&encode_u64_table(&table), table_off)
        .map_err(|e| Error::io("writing the rebuilt refcount table", e))?;
    file.flush()
        .map_err(|e| Error::io("flushing rebuilt refcounts", e))?;
    m.header.refcount_table_offset = table_off;
    m.header.refcount_table_clusters = table_clusters as u32;
    m.replace_reftable(table);
    m.refblocks = crate::engine::cache::TableCache::new(64);
    m.free_hint = 0;
    m.pending_frees.clear();
    m.compressed_tail = None;
    m.write_header(&**img.file())?;
    drop(m);
    fix_copied_flags(img)
}

/// Sets COPIED on active L1/L2 entries exactly when the refcount is one.
fn fix_copied_flags(img: &Qcow2) -> Result<()> {
    let file = &**img.file();
    let mut m = img.meta_mut();
    let cs = m.geo.cluster_size();
    let bits = m.geo.cluster_bits;
    let data_file = img.has_data_file();
    for i in 0..m.l1.len() {
        let e = m.l1[i];
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let copied = m.refcount(file, off / cs)? == 1;
        let fixed = if copied { off | COPIED } else { off };
        if fixed != e {
            m.l1[i] = fixed;
            m.l1_dirty = true;
        }
        let table = m.read_l2_table(file, off)?;
        let mut changed = table.clone();
        for (k, &raw) in table.iter().enumerate() {
            if data_file {
                continue;
            }
            let host = match L2Entry::decode(raw, bits) {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => host,
                _ => continue,
            };
            let one = m.refcount(file, host / cs)? == 1;
            changed[k] = if one { raw | COPIED } else { raw & !COPIED };
        }
        if changed != table {
            m.set_l2_entries(file, off, 0, &changed)?;
        }
    }
    drop(m);
    img.flush()
}
