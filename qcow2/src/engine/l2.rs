//! The L2 cache works in slices of a table (at most 4 KiB, as QEMU's default
//! `l2-cache-entry-size`), so a miss reads 4 KiB rather than a whole cluster-sized table
//! (2 MiB with 2 MiB clusters), and the cache's memory covers more of the disk.

use crate::error::Result;
use crate::storage::Storage;

use super::meta::{encode_u64_table, read_u64_table, Meta};

/// Most entries in one slice: 512 entries are 4 KiB.
const MAX_SLICE_ENTRIES: u64 = 512;

/// Guest data the default L2 cache covers at most (QEMU's default covers less).
const DEFAULT_COVERAGE: u64 = 64 << 30;

impl Meta {
    /// Entries per L2 slice.
    pub fn l2_slice_entries(&self) -> u64 {
        self.geo.l2_entries().min(MAX_SLICE_ENTRIES)
    }

    /// Cache key of the slice holding entry `l2i` of the table at `table`: the slice's host
    /// offset.
    pub fn l2_slice_key(&self, table: u64, l2i: u64) -> u64 {
        let per = self.l2_slice_entries();
        table + l2i / per * per * 8
    }

    /// Makes sure the slice holding entry `l2i` of the table at `table` is cached; returns
    /// its key.
    pub fn load_l2_slice(&mut self, file: &dyn Storage, table: u64, l2i: u64) -> Result<u64> {
        let key = self.l2_slice_key(table, l2i);
        if self.l2.contains(key) {
            return Ok(key);
        }
        let len = file
            .len()
            .map_err(|e| crate::Error::io("getting the file size", e))?;
        self.check_table_offset("L2 table", table, len)?;
        let slice = read_u64_table(file, key, self.l2_slice_entries() as usize)?;
        self.make_room_l2(file)?;
        self.l2.insert(key, slice, false);
        Ok(key)
    }

    /// The whole table at `table`, through the cache.
    pub fn read_l2_table(&mut self, file: &dyn Storage, table: u64) -> Result<Vec<u64>> {
        let per = self.l2_slice_entries();
        let mut entries = Vec::with_capacity(self.geo.l2_entries() as usize);
        for l2i in (0..self.geo.l2_entries()).step_by(per as usize) {
            let key = self.load_l2_slice(file, table, l2i)?;
            entries.extend_from_slice(self.l2.get(key).expect("just loaded"));
        }
        Ok(entries)
    }

    /// Caches a new table (dirty, so that all of it is written back), slice by slice:
    /// `entries`, or all zeros. Its file space is claimed first.
    pub fn insert_l2_table(
        &mut self,
        file: &dyn Storage,
        table: u64,
        entries: Option<&[u64]>,
    ) -> Result<()> {
        self.claim_space(file, table, self.geo.cluster_size(), "an L2 table")?;
        let per = self.l2_slice_entries() as usize;
        for k in 0..self.geo.l2_entries() as usize / per {
            let slice = match entries {
                Some(e) => e[k * per..(k + 1) * per].to_vec(),
                None => vec![0; per],
            };
            self.make_room_l2(file)?;
            self.l2.insert(table + (k * per * 8) as u64, slice, true);
        }
        Ok(())
    }

    /// Sets entries `l2i..l2i + new.len()` of the table at `table` (loading its slices).
    pub fn set_l2_entries(
        &mut self,
        file: &dyn Storage,
        table: u64,
        l2i: u64,
        new: &[u64],
    ) -> Result<()> {
        let per = self.l2_slice_entries();
        let mut done = 0;
        while done < new.len() {
            let at = l2i + done as u64;
            let key = self.load_l2_slice(file, table, at)?;
            let start = (at % per) as usize;
            let n = (per as usize - start).min(new.len() - done);
            let slice = self.l2.get_mut(key).expect("just loaded");
            slice[start..start + n].copy_from_slice(&new[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Drops every cached slice of the table at `table` (the cluster was freed).
    pub fn forget_l2_table(&mut self, table: u64) {
        self.l2_generation += 1;
        let slice_bytes = self.l2_slice_entries() * 8;
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
        let slice_bytes = self.l2_slice_entries() * 8;
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
            .map_err(|e| crate::Error::io(format!("writing {} L2 table slices", keys.len()), e))?;
        for &key in keys {
            self.l2.mark_clean(key);
        }
        Ok(())
    }
}

/// Slices the L2 cache holds: `bytes` of them, by default enough to map the first
/// min(disk size, 64 GiB) of the disk; always at least two whole tables.
pub fn l2_cache_slices(bytes: Option<u64>, disk_size: u64, cluster_bits: u32) -> usize {
    let l2_entries = 1u64 << (cluster_bits - 3);
    let slice_bytes = l2_entries.min(MAX_SLICE_ENTRIES) * 8;
    let bytes = bytes.unwrap_or_else(|| (disk_size.min(DEFAULT_COVERAGE) >> cluster_bits) * 8);
    let per_table = l2_entries * 8 / slice_bytes;
    (bytes / slice_bytes).max(2 * per_table).max(4) as usize
}

#[cfg(test)]
mod tests {
    use super::l2_cache_slices;

    #[test]
    fn default_cache_maps_the_disk_up_to_64_gib() {
        // 64 KiB clusters: a 4 KiB slice maps 32 MiB; 64 GiB needs 2048 slices (8 MiB).
        assert_eq!(l2_cache_slices(None, 1 << 40, 16), 2048);
        assert_eq!(
            l2_cache_slices(None, 64 << 20, 16),
            32,
            "two tables at least"
        );
        // 512-byte clusters: one 512-byte table per slice, 64 GiB = 2^27 entries.
        assert_eq!(l2_cache_slices(None, 1 << 40, 9), 1 << 21);
        // 2 MiB clusters: 512 slices per table.
        assert_eq!(l2_cache_slices(None, 1 << 40, 21), 1024);
        assert_eq!(l2_cache_slices(Some(64 << 20), 1 << 40, 16), 16384);
    }
}
