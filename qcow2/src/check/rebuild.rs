//! Rebuilding the refcount structures from the counted refcounts (QEMU's
//! rebuild_refcount_structure): refcount blocks, then the table, go in the first free
//! clusters, where QEMU puts them.
//!
//! Unlike QEMU, a rebuild never takes a cluster that metadata references past the end of
//! the file, nor one an old refcount table entry with reserved bits points at: QEMU counts
//! neither, so it could put the new structures there (and the guest would read refcounts,
//! or the write would hit the old block). If the new structures end up past such
//! references, those references are inside the file afterwards and are counted.

use std::collections::BTreeSet;

use super::imrt::Imrt;
use super::{clusters_of, exceeds_file, strerror, Checker, Failed};
use crate::engine::meta::encode_u64_table;
use crate::engine::overlap::Target;
use crate::Error;

type Outcome = std::result::Result<(), Failed>;

/// Where the new refcount structures go.
struct Layout {
    /// The new refcount table: host offsets of the blocks.
    table: Vec<u64>,
    /// First cluster of the new table.
    table_cluster: u64,
    /// Clusters of the new table.
    table_clusters: u64,
    /// The cluster after the last new structure.
    end: u64,
}

/// Places the new structures, marking the clusters it takes in its copy of the counts.
struct Planner<'a> {
    imrt: Imrt,
    /// Clusters that must not be taken although nothing counts them.
    busy: &'a BTreeSet<u64>,
    cs: u64,
    end: u64,
}

impl Planner<'_> {
    fn is_free(&self, c: u64) -> bool {
        self.imrt.get(c) == 0 && !self.busy.contains(&c)
    }

    /// Takes the first `n` contiguous free clusters from `*first_free` on (QEMU's
    /// alloc_clusters_imrt); `*first_free` moves to the first free cluster seen.
    fn alloc(&mut self, n: u64, first_free: &mut u64) -> u64 {
        let (mut c, mut run, mut seen) = (*first_free, 0, false);
        while run < n {
            if self.is_free(c) {
                run += 1;
                if !seen {
                    *first_free = c;
                    seen = true;
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        for k in c - n..c {
            self.imrt.set(k, 1);
        }
        self.end = self.end.max(c);
        c - n
    }

    /// Gives a refcount block to every block range with a counted cluster in
    /// `[from, to)` (QEMU's rebuild_refcounts_write_refblocks); returns whether the table
    /// grew.
    fn place_blocks(&mut self, from: u64, mut to: u64, table: &mut Vec<u64>) -> bool {
        let per_block = self.imrt.per_block();
        let (mut first_free, mut grown, mut c) = (0, false, from);
        while c < to {
            if c % per_block == 0 && self.imrt.block_is_zero(c / per_block) {
                c += per_block;
                continue;
            }
            if self.imrt.get(c) == 0 {
                c += 1;
                continue;
            }
            let index = c / per_block;
            let start = index * per_block;
            if table.get(index as usize).is_none_or(|&b| b == 0) {
                // Never in a range whose block is already placed (and written, in QEMU).
                first_free = first_free.max(start);
                let block = self.alloc(1, &mut first_free);
                to = to.max(block + 1);
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).next_multiple_of(self.cs) / 8;
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                table[index as usize] = block * self.cs;
            }
            c = start + per_block;
        }
        grown
    }

    /// Places blocks for everything counted, then the table, again until the table stops
    /// growing.
    fn plan(mut self) -> (Layout, Imrt) {
        let mut table = Vec::new();
        let len = self.imrt.len();
        self.place_blocks(0, len, &mut table);
        loop {
            let clusters = (table.len() as u64 * 8).div_ceil(self.cs);
            let at = self.alloc(clusters, &mut 0);
            if !self.place_blocks(at, at + clusters, &mut table) {
                let layout = Layout {
                    table,
                    table_cluster: at,
                    table_clusters: clusters,
                    end: self.end,
                };
                return (layout, self.imrt);
            }
        }
    }
}

impl Checker<'_> {
    /// Writes new refcount structures for the counted refcounts and switches the header
    /// over to them. The old ones stay counted in them, to be freed by the caller.
    pub(super) fn rebuild_refcounts(&mut self) -> Outcome {
        let mut busy: BTreeSet<u64> = clusters_of(&self.past_eof, self.cs).into_keys().collect();
        busy.extend(self.old_refblock_clusters());
        let mut pending = std::mem::take(&mut self.past_eof);
        loop {
            // Planned on a copy while past-the-end references may still have to be counted.
            let imrt = match pending.is_empty() {
                true => {
                    let empty = self.imrt.empty_like();
                    std::mem::replace(&mut self.imrt, empty)
                }
                false => self.imrt.clone(),
            };
            let planner = Planner {
                imrt,
                busy: &busy,
                cs: self.cs,
                end: 0,
            };
            let (layout, imrt) = planner.plan();
            let new_len = self.file_len.max(layout.end * self.cs);
            let (inside, outside) = pending
                .into_iter()
                .partition::<Vec<_>, _>(|&(o, s)| !exceeds_file(o, s, new_len, self.cs));
            pending = outside;
            if inside.is_empty() {
                self.imrt = imrt;
                return self.write_layout(&layout);
            }
            self.count_regions(&inside);
        }
    }

    /// Counts references to regions that a rebuild brings inside the file.
    fn count_regions(&mut self, regions: &[(u64, u64)]) {
        for (c, n) in clusters_of(regions, self.cs) {
            let sum = self.imrt.get(c).saturating_add(n).min(self.imrt.max());
            self.imrt.set(c, sum);
        }
    }

    /// Clusters the old refcount table points at, usable entries or not.
    fn old_refblock_clusters(&self) -> Vec<u64> {
        let m = self.img.meta();
        m.reftable
            .iter()
            .map(|e| e & !0x1ff)
            .filter(|&b| b != 0)
            .flat_map(|b| [b / self.cs, b.saturating_add(self.cs - 1) / self.cs])
            .collect()
    }

    /// Writes the blocks (from the planned refcounts, which include the new structures)
    /// and the table, points the header at the table and makes the engine use them.
    fn write_layout(&mut self, layout: &Layout) -> Outcome {
        let (img, file, cs) = (self.img, self.file, self.cs);
        let table_offset = layout.table_cluster * cs;
        let clusters = u32::try_from(layout.table_clusters).map_err(|_| Failed::eio())?;
        let mut m = img.meta_mut();
        let blocks = layout.table.iter().enumerate().filter(|(_, &b)| b != 0);
        let zeros = vec![0; cs as usize];
        for (index, &block) in blocks {
            m.check_write(file, block, cs, Target::New)
                .map_err(|e| self.refused("writing refblock", e))?;
            let bytes = self.imrt.block(index as u64).unwrap_or(&zeros);
            file.write_at(bytes, block)
                .map_err(|e| self.write_failed("writing refblock", &e))?;
        }
        let bytes = encode_u64_table(&layout.table);
        m.check_write(file, table_offset, bytes.len() as u64, Target::New)
            .map_err(|e| self.refused("writing reftable", e))?;
        file.write_at(&bytes, table_offset)
            .and_then(|()| file.flush())
            .map_err(|e| self.write_failed("writing reftable", &e))?;
        let mut header = table_offset.to_be_bytes().to_vec();
        header.extend_from_slice(&clusters.to_be_bytes());
        // The refcount table offset and size are at byte 48 of the header.
        file.write_at(&header, 48)
            .and_then(|()| file.flush())
            .map_err(|e| self.write_failed("setting reftable", &e))?;
        m.header.refcount_table_offset = table_offset;
        m.header.refcount_table_clusters = clusters;
        m.replace_reftable(layout.table.clone());
        m.refblocks.clear();
        m.free_hint = 0;
        m.pending_frees.clear();
        m.compressed_tail = None;
        Ok(())
    }

    /// A write of the rebuild that the overlap check refused: the image is marked corrupt
    /// and the write fails with EIO, in QEMU's words.
    fn refused(&mut self, what: &str, e: Error) -> Failed {
        if let Error::MarkedCorrupt(why) = &e {
            self.say_marked_corrupt(why);
        }
        self.write_failed(what, &std::io::Error::from_raw_os_error(libc::EIO))
    }

    /// A failed write of the rebuild, reported in QEMU's words ("ERROR writing refblock:
    /// ...").
    fn write_failed(&mut self, what: &str, e: &std::io::Error) -> Failed {
        self.report_error(format!("ERROR {what}: {}", strerror(e)));
        Failed(strerror(e))
    }
}
