//! The L2 cache works in slices of a table (at most 4 KiB, as QEMU with
//! `l2-cache-entry-size=4k`; its default is the cluster size), so a miss reads 4 KiB rather
//! than a whole cluster-sized table (2 MiB with 2 MiB clusters), and the cache's memory
//! covers more of the disk.
//!
//! Slices hold the table's 64-bit words: one per entry, or two (entry, subcluster bitmap)
//! with extended L2 entries, so "entry `i`" is word `i * Geometry::l2_words()`.

use crate::error::{Error, Result};
use crate::format::tables::OFFSET_MASK;
use crate::storage::Storage;

use super::meta::{encode_u64_table, read_u64_table, Geometry, Meta};

/// Most words in one slice: 512 words are 4 KiB.
const MAX_SLICE_WORDS: u64 = 512;

/// Guest data the default L2 cache covers at most (QEMU's default covers less).
const DEFAULT_COVERAGE: u64 = 64 << 30;

impl Meta {
    /// Entries per L2 slice.
    pub fn l2_slice_entries(&self) -> u64 {
        self.geo
            .l2_entries()
            .min(MAX_SLICE_WORDS / self.geo.l2_words())
    }

    /// Bytes of one L2 slice.
    pub fn l2_slice_bytes(&self) -> u64 {
        self.l2_slice_entries() * self.geo.l2_words() * 8
    }

    /// Cache key of the slice holding entry `l2i` of the table at `table`: the slice's host
    /// offset.
    pub fn l2_slice_key(&self, table: u64, l2i: u64) -> u64 {
        table + l2i / self.l2_slice_entries() * self.l2_slice_bytes()
    }

    /// Host offset of the L2 table that L1 entry `l1i` points to (0: none, or past the L1
    /// table); an unaligned one is corruption, in QEMU's words.
    pub fn l2_table_offset(&self, l1i: usize) -> Result<u64> {
        let table = self.l1.get(l1i).map_or(0, |e| e & OFFSET_MASK);
        if table % self.geo.cluster_size() != 0 {
            return Err(Error::UnalignedTable(format!(
                "L2 table offset {table:#x} unaligned (L1 index: {})",
                super::c_hex(l1i as u64)
            )));
        }
        Ok(table)
    }

    /// Makes sure the slice holding entry `l2i` of the table at `table` is cached; returns
    /// its key.
    pub fn load_l2_slice(&mut self, file: &dyn Storage, table: u64, l2i: u64) -> Result<u64> {
        let key = self.l2_slice_key(table, l2i);
        if self.l2.contains(key) {
            return Ok(key);
        }
        let cs = self.geo.cluster_size();
        if table.saturating_add(cs) > self.file_len_seen.next_multiple_of(cs) {
            self.file_len_seen = file
                .len()
                .map_err(|e| Error::io("getting the file size", e))?;
        }
        self.check_table_offset("L2 table", table, self.file_len_seen)?;
        let slice = read_u64_table(file, key, (self.l2_slice_bytes() / 8) as usize)?;
        self.make_room_l2(file)?;
        self.l2.insert(key, slice, false);
        Ok(key)
    }

    /// The whole table at `table` (its words), through the cache.
    pub fn read_l2_table(&mut self, file: &dyn Storage, table: u64) -> Result<Vec<u64>> {
        let per = self.l2_slice_entries();
        let mut entries = Vec::with_capacity((self.geo.cluster_size() / 8) as usize);
        for l2i in (0..self.geo.l2_entries()).step_by(per as usize) {
            let key = self.load_l2_slice(file, table, l2i)?;
            entries.extend_from_slice(self.l2.get(key).expect("just loaded"));
        }
        Ok(entries)
    }

    /// Caches a new table (dirty, so that all of it is written back), slice by slice:
    /// `entries` (its words), or all zeros. Its file space is claimed first.
    pub fn insert_l2_table(
        &mut self,
        file: &dyn Storage,
        table: u64,
        entries: Option<&[u64]>,
    ) -> Result<()> {
        self.claim_space(file, table, self.geo.cluster_size(), "an L2 table")?;
        let words = (self.l2_slice_bytes() / 8) as usize;
        for k in 0..self.geo.l2_entries() / self.l2_slice_entries() {
            let k = k as usize;
            let slice = match entries {
                Some(e) => e[k * words..(k + 1) * words].to_vec(),
                None => vec![0; words],
            };
            self.make_room_l2(file)?;
            self.l2.insert(table + (k * words * 8) as u64, slice, true);
        }
        Ok(())
    }

    /// Sets entries from `l2i` on of the table at `table` to the words `new` (loading its
    /// slices).
    pub fn set_l2_entries(
        &mut self,
        file: &dyn Storage,
        table: u64,
        l2i: u64,
        new: &[u64],
    ) -> Result<()> {
        let per = self.l2_slice_entries();
        let w = self.geo.l2_words() as usize;
        let count = new.len() / w;
        let mut done = 0;
        while done < count {
            let at = l2i + done as u64;
            let key = self.load_l2_slice(file, table, at)?;
            let start = (at % per) as usize;
            let n = (per as usize - start).min(count - done);
            let slice = self.l2.get_mut(key).expect("just loaded");
            slice[start * w..(start + n) * w].copy_from_slice(&new[done * w..(done + n) * w]);
            done += n;
        }
        Ok(())
    }

    /// Drops every cached slice of the table at `table` (the cluster was freed).
    pub fn forget_l2_table(&mut self, table: u64) {
        self.l2_generation += 1;
        let slice_bytes = self.l2_slice_bytes();
        for k in 0..self.geo.l2_entries() / self.l2_slice_entries() {
            self.l2.remove(table + k * slice_bytes);
        }
    }

    /// Writes the dirty slices back (no barrier; see `writeback`).
    pub fn write_l2_slices(&mut self, file: &dyn Storage, keys: &[u64]) -> Result<()> {
        if !keys.is_empty() {
            self.l2_generation += 1;
        }
        let cs = self.geo.cluster_size();
        let slice_bytes = self.l2_slice_bytes();
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        // Adjacent slices (say, the whole of a new table) go out as one write.
        let mut encoded: Vec<(u64, Vec<u8>)> = Vec::with_capacity(keys.len());
        for key in sorted {
            let table = key - key % cs;
            self.check_write(file, key, slice_bytes, super::overlap::Target::L2(table))?;
            let slice = encode_u64_table(self.l2.get(key).expect("dirty entry is cached"));
            match encoded.last_mut() {
                Some((at, run)) if *at + run.len() as u64 == key => run.extend_from_slice(&slice),
                _ => encoded.push((key, slice)),
            }
        }
        let writes: Vec<(u64, &[u8])> = encoded.iter().map(|(k, b)| (*k, &b[..])).collect();
        file.write_batch(&writes)
            .map_err(|e| Error::io(format!("writing {} L2 table slices", keys.len()), e))?;
        for &key in keys {
            self.l2.mark_clean(key);
        }
        Ok(())
    }
}

/// Slices the L2 cache holds: `bytes` of them, by default enough to map the first
/// min(disk size, 64 GiB) of the disk; always at least two whole tables. Extended L2
/// entries take twice the bytes, so a given size maps half the disk (as in QEMU).
pub fn l2_cache_slices(bytes: Option<u64>, disk_size: u64, geo: &Geometry) -> usize {
    let table_bytes = geo.cluster_size();
    let slice_bytes = table_bytes.min(MAX_SLICE_WORDS * 8);
    let entry_bytes = geo.l2_words() * 8;
    let bytes = bytes
        .unwrap_or_else(|| (disk_size.min(DEFAULT_COVERAGE) >> geo.cluster_bits) * entry_bytes);
    let per_table = table_bytes / slice_bytes;
    (bytes / slice_bytes).max(2 * per_table).max(4) as usize
}

#[cfg(test)]
mod tests {
    use super::l2_cache_slices;
    use crate::engine::meta::Geometry;

    fn geo(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits,
            refcount_order: 4,
            extended_l2,
        }
    }

    #[test]
    fn extended_entries_need_twice_the_cache() {
        // A 4 KiB slice maps 256 clusters of 64 KiB (16 MiB); 64 GiB needs 4096 slices.
        assert_eq!(l2_cache_slices(None, 1 << 40, &geo(16, true)), 4096);
        assert_eq!(
            l2_cache_slices(Some(64 << 20), 1 << 40, &geo(16, true)),
            16384
        );
    }

    #[test]
    fn default_cache_maps_the_disk_up_to_64_gib() {
        // 64 KiB clusters: a 4 KiB slice maps 32 MiB; 64 GiB needs 2048 slices (8 MiB).
        assert_eq!(l2_cache_slices(None, 1 << 40, &geo(16, false)), 2048);
        assert_eq!(
            l2_cache_slices(None, 64 << 20, &geo(16, false)),
            32,
            "two tables at least"
        );
        // 512-byte clusters: one 512-byte table per slice, 64 GiB = 2^27 entries.
        assert_eq!(l2_cache_slices(None, 1 << 40, &geo(9, false)), 1 << 21);
        // 2 MiB clusters: 512 slices per table.
        assert_eq!(l2_cache_slices(None, 1 << 40, &geo(21, false)), 1024);
        assert_eq!(
            l2_cache_slices(Some(64 << 20), 1 << 40, &geo(16, false)),
            16384
        );
    }
}
