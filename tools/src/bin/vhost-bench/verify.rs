//! `--verify`: every 512-byte sector is written stamped with its device offset and a
//! generation (a header, then bytes derived from both), read back and compared.

use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use blkio::{Blkioq, ReqFlags};
use serde::Serialize;

use crate::client::{Buffer, Client};
use crate::load::{keep_in_flight, on_each_queue, Area, Job, Requests, Rng};
use crate::Rw;

const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"VHBENCH1";
/// Magic, offset and generation.
const HEADER: usize = 24;

/// Fills `buf` (whole sectors) with the stamps of the sectors from device offset `offset`.
fn stamp(buf: &mut [u8], offset: u64, generation: u64) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let at = offset + (i * SECTOR) as u64;
        sector[..8].copy_from_slice(MAGIC);
        sector[8..16].copy_from_slice(&at.to_le_bytes());
        sector[16..HEADER].copy_from_slice(&generation.to_le_bytes());
        let mut rng = Rng::new(at ^ generation.rotate_left(32));
        for word in sector[HEADER..].chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
    }
}

/// What a bad sector holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// A stamp header for this offset and generation.
    Stamp { offset: u64, generation: u64 },
    /// Something without the magic; its first bytes.
    Foreign([u8; 16]),
}

impl Found {
    fn parse(sector: &[u8]) -> Found {
        let u64_at = |i: usize| u64::from_le_bytes(sector[i..i + 8].try_into().expect("8 bytes"));
        if &sector[..8] == MAGIC {
            Found::Stamp {
                offset: u64_at(8),
                generation: u64_at(16),
            }
        } else {
            Found::Foreign(sector[..16].try_into().expect("16 bytes"))
        }
    }
}

/// The first bad sector of a block.
#[derive(Debug, Clone)]
struct Mismatch {
    offset: u64,
    expected_generation: Option<u64>,
    found: Found,
    /// First differing byte within the sector.
    first_diff: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self
            .expected_generation
            .map_or("any generation".to_owned(), |g| format!("generation {g}"));
        write!(
            f,
            "sector at offset {}: expected the stamp of offset {} ({generation}), found ",
            self.offset, self.offset
        )?;
        match self.found {
            Found::Stamp { offset, generation }
                if offset == self.offset
                    && self.expected_generation.is_none_or(|g| g == generation) =>
            {
                write!(
                    f,
                    "that header but other data from byte {}",
                    self.first_diff
                )
            }
            Found::Stamp { offset, generation } => {
                write!(f, "the stamp of offset {offset} generation {generation}")
            }
            Found::Foreign(bytes) => write!(
                f,
                "data not written by vhost-bench --verify (starting {})",
                bytes.map(|b| format!("{b:02x}")).join(" ")
            ),
        }
    }
}

/// The first sector of `buf`, read from device offset `offset`, that is not the stamp of its
/// own offset with `generation` (with the generation in its header when None).
fn check(buf: &[u8], offset: u64, generation: Option<u64>) -> Option<Mismatch> {
    let mut expected = [0u8; SECTOR];
    for (i, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let at = offset + (i * SECTOR) as u64;
        let found = Found::parse(sector);
        let header_generation = match found {
            Found::Stamp { generation, .. } => generation,
            Found::Foreign(_) => 0,
        };
        stamp(&mut expected, at, generation.unwrap_or(header_generation));
        if let Some(first_diff) = sector.iter().zip(&expected).position(|(a, b)| a != b) {
            return Some(Mismatch {
                offset: at,
                expected_generation: generation,
                found,
                first_diff,
            });
        }
    }
    None
}

/// The order a queue visits its blocks in: one after another, or (random patterns) a
/// permutation `i * stride + first mod blocks` with a stride coprime to the block count.
#[derive(Debug, Clone, Copy)]
struct Order {
    blocks: u64,
    stride: u64,
    first: u64,
}

impl Order {
    fn new(blocks: u64, random: bool, seed: u64) -> Order {
        if !random {
            return Order {
                blocks,
                stride: 1,
                first: 0,
            };
        }
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let mut stride = (blocks as f64 * 0.618) as u64 | 1;
        while gcd(stride, blocks) != 1 {
            stride += 2;
        }
        Order {
            blocks,
            stride,
            first: Rng::new(seed).next() % blocks,
        }
    }

    /// The `i`-th block (each of `0..blocks` once for `i` in `0..blocks`).
    fn block(&self, i: u64) -> u64 {
        ((u128::from(i) * u128::from(self.stride) + u128::from(self.first))
            % u128::from(self.blocks)) as u64
    }
}

/// What one queue's read-back found.
#[derive(Debug, Default)]
struct Checked {
    blocks: u64,
    bad_blocks: u64,
    first: Option<Mismatch>,
}

/// One pass over a queue's area: stamped writes (`write` = Some(generation)) or checked reads.
struct Pass {
    bs: usize,
    buf: Buffer,
    area: Area,
    order: Order,
    next: u64,
    write: Option<u64>,
    expected_generation: Option<u64>,
    /// Device offset of each slot's request.
    offsets: Vec<u64>,
    checked: Checked,
}

impl Requests for Pass {
    fn submit(&mut self, q: &mut Blkioq, slot: usize) -> bool {
        if self.next == self.area.blocks {
            return false;
        }
        let offset = self.area.start + self.order.block(self.next) * self.bs as u64;
        self.next += 1;
        self.offsets[slot] = offset;
        let ptr = self.buf.slot(slot, self.bs);
        if let Some(generation) = self.write {
            // SAFETY: the slot's previous request has completed.
            stamp(
                unsafe { self.buf.slot_mut(slot, self.bs) },
                offset,
                generation,
            );
            q.write(offset, ptr, self.bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, ptr, self.bs, slot, ReqFlags::empty());
        }
        true
    }

    fn complete(&mut self, slot: usize, _now: Instant) -> Result<()> {
        if self.write.is_none() {
            // SAFETY: the slot's request has completed and the next is not queued yet.
            let data = unsafe { self.buf.slot_mut(slot, self.bs) };
            self.checked.blocks += 1;
            if let Some(m) = check(data, self.offsets[slot], self.expected_generation) {
                self.checked.bad_blocks += 1;
                self.checked.first.get_or_insert(m);
            }
        }
        Ok(())
    }
}

/// A single flush request.
#[derive(Default)]
struct Flush {
    queued: bool,
}

impl Requests for Flush {
    fn submit(&mut self, q: &mut Blkioq, slot: usize) -> bool {
        if self.queued {
            return false;
        }
        self.queued = true;
        q.flush(slot, ReqFlags::empty());
        true
    }

    fn complete(&mut self, _slot: usize, _now: Instant) -> Result<()> {
        Ok(())
    }
}

/// Writes (with `generation`), flushes and reads back one queue's area, or only reads it.
fn verify_queue(
    q: &mut Blkioq,
    buf: Buffer,
    area: Area,
    job: &Job,
    generation: Option<u64>,
    seed: u64,
) -> Result<Checked> {
    let order = Order::new(area.blocks, job.rw.random(), seed);
    let mut pass = Pass {
        bs: job.bs,
        buf,
        area,
        order,
        next: 0,
        write: generation,
        expected_generation: generation,
        offsets: vec![0; job.iodepth],
        checked: Checked::default(),
    };
    if generation.is_some() {
        keep_in_flight(q, job.iodepth, &mut pass).context("writing")?;
        keep_in_flight(q, 1, &mut Flush::default()).context("flushing")?;
        pass.next = 0;
        pass.write = None;
    }
    keep_in_flight(q, job.iodepth, &mut pass).context("reading back")?;
    Ok(pass.checked)
}

/// The result of `--verify` (also its JSON form).
#[derive(Debug, Serialize)]
pub struct Outcome {
    rw: Rw,
    bs: usize,
    iodepth: usize,
    queues: usize,
    size: u64,
    /// The generation written, None for a read-only check.
    generation: Option<u64>,
    blocks_written: u64,
    blocks_checked: u64,
    bad_blocks: u64,
    first_mismatch: Option<String>,
}

/// Runs `--verify` for `job` on every queue (queue i in `areas[i]`).
pub fn run(client: &mut Client, areas: &[Area], job: &Job) -> Result<Outcome> {
    let generation = job.rw.writes().then(fresh_generation);
    let (results, ()) = on_each_queue(
        client,
        areas,
        |i, q, buf, area| verify_queue(q, buf, area, job, generation, i as u64 + 1),
        || (),
    );
    let results = results?;
    let blocks: u64 = areas.iter().map(|a| a.blocks).sum();
    Ok(Outcome {
        rw: job.rw,
        bs: job.bs,
        iodepth: job.iodepth,
        queues: areas.len(),
        size: blocks * job.bs as u64,
        generation,
        blocks_written: if generation.is_some() { blocks } else { 0 },
        blocks_checked: results.iter().map(|c| c.blocks).sum(),
        bad_blocks: results.iter().map(|c| c.bad_blocks).sum(),
        first_mismatch: results
            .iter()
            .filter_map(|c| c.first.as_ref())
            .min_by_key(|m| m.offset)
            .map(Mismatch::to_string),
    })
}

/// A generation no earlier run is likely to have used: the time in nanoseconds.
fn fresh_generation() -> u64 {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    ns.max(1)
}

impl Outcome {
    /// The outcome as JSON or as lines of text.
    pub fn render(&self, json: bool) -> Result<String> {
        if json {
            return Ok(serde_json::to_string_pretty(self)?);
        }
        let written = match self.generation {
            Some(g) => format!("wrote {} blocks (generation {g}), ", self.blocks_written),
            None => String::new(),
        };
        Ok(format!(
            "verify {}: bs={} iodepth={} queues={} size={}: {written}checked {} blocks, {} bad",
            self.rw,
            self.bs,
            self.iodepth,
            self.queues,
            self.size,
            self.blocks_checked,
            self.bad_blocks
        ))
    }

    /// An error naming the first bad sector if any block was bad.
    pub fn result(&self) -> Result<()> {
        if let Some(first) = &self.first_mismatch {
            bail!(
                "verify failed: {} of {} blocks differ; first: {first}",
                self.bad_blocks,
                self.blocks_checked
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_check_and_name_what_is_wrong() {
        let mut block = vec![0u8; 4096];
        stamp(&mut block, 8192, 7);
        assert!(check(&block, 8192, Some(7)).is_none());
        assert!(check(&block, 8192, None).is_none());
        // Another generation, another offset, foreign data, one flipped payload byte.
        let m = check(&block, 8192, Some(8)).unwrap();
        assert!(m
            .to_string()
            .contains("found the stamp of offset 8192 generation 7"));
        let m = check(&block, 4096, None).unwrap();
        assert_eq!(m.offset, 4096);
        assert!(m.to_string().contains("found the stamp of offset 8192"));
        let mut bad = block.clone();
        bad[1024..1536].fill(0);
        let m = check(&bad, 8192, Some(7)).unwrap();
        assert_eq!(m.offset, 9216);
        assert!(m.to_string().contains("not written by vhost-bench"), "{m}");
        let mut bad = block.clone();
        bad[3 * 512 + 100] ^= 1;
        let m = check(&bad, 8192, Some(7)).unwrap();
        assert_eq!((m.offset, m.first_diff), (8192 + 3 * 512, 100));
        assert!(m
            .to_string()
            .contains("that header but other data from byte 100"));
    }

    #[test]
    fn random_orders_visit_every_block_once() {
        for blocks in [1u64, 2, 3, 10, 64, 1000, 4096] {
            let order = Order::new(blocks, true, blocks);
            let mut seen: Vec<u64> = (0..blocks).map(|i| order.block(i)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..blocks).collect::<Vec<_>>());
        }
        let seq = Order::new(5, false, 1);
        assert_eq!(
            (0..5).map(|i| seq.block(i)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
    }
}
