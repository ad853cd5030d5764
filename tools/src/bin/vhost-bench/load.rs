//! The parts every run shares: the job, each queue's area of the device, offsets, and the
//! loop that keeps a queue's requests in flight.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use blkio::{Blkioq, Completion};

use crate::client::{Buffer, Client};
use crate::Rw;

/// How long a queue waits for one completion before giving up on the server.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);

/// What every queue's thread does.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// The pattern.
    pub rw: Rw,
    /// Percentage of reads for `Rw::Randrw`.
    pub rwmixread: u8,
    /// Request size in bytes.
    pub bs: usize,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// A flush after every this many writes on a queue (0: none), like fio's `fsync`.
    pub fsync: usize,
}

/// The range of the device one queue works on, in whole blocks.
#[derive(Debug, Clone, Copy)]
pub struct Area {
    /// First byte.
    pub start: u64,
    /// Number of blocks of the job's block size.
    pub blocks: u64,
}

impl Area {
    /// `[0, size)` split into `queues` equal areas of whole `bs` blocks; None if a queue
    /// would get no block.
    pub fn split(size: u64, queues: u16, bs: usize) -> Option<Vec<Area>> {
        let blocks = size / bs as u64 / u64::from(queues);
        (blocks > 0).then(|| {
            (0..u64::from(queues))
                .map(|i| Area {
                    start: i * blocks * bs as u64,
                    blocks,
                })
                .collect()
        })
    }
}

/// A xorshift64 generator: cheap and deterministic per seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Where a queue's requests go: one step after another through its area, wrapping around, or
/// uniformly at random.
#[derive(Debug, Clone)]
pub struct Offsets {
    area: Area,
    bs: u64,
    random: bool,
    next_block: u64,
    rng: Rng,
}

impl Offsets {
    /// Offsets in `area` for `job`, random ones drawn from `seed`.
    pub fn new(job: &Job, area: Area, seed: u64) -> Offsets {
        Offsets {
            area,
            bs: job.bs as u64,
            random: job.rw.random(),
            next_block: 0,
            rng: Rng::new(seed),
        }
    }

    /// The next request's device offset.
    pub fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng.next() % self.area.blocks
        } else {
            let b = self.next_block;
            self.next_block = (b + 1) % self.area.blocks;
            b
        };
        self.area.start + block * self.bs
    }
}

/// A source of requests for [`keep_in_flight`]; `slot` (below the depth) names a request in
/// flight and comes back with its completion.
pub trait Requests {
    /// Queues a request for `slot` on `q`; false when there is nothing more to do.
    fn submit(&mut self, q: &mut Blkioq, slot: usize) -> bool;
    /// Called with the time of each successful completion.
    fn complete(&mut self, slot: usize, now: Instant) -> Result<()>;
}

/// Keeps up to `depth` requests from `reqs` in flight on `q`, blocking on the queue's
/// completion eventfd, until `reqs` has nothing more to submit and all have completed. A
/// failed request or a server that completes nothing for 30 s is an error.
pub fn keep_in_flight(q: &mut Blkioq, depth: usize, reqs: &mut impl Requests) -> Result<()> {
    let mut in_flight = (0..depth).filter(|&slot| reqs.submit(q, slot)).count();
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    while in_flight > 0 {
        let mut timeout = COMPLETION_TIMEOUT;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .context("waiting for completions")?;
        ensure!(n > 0, "no request completed within {COMPLETION_TIMEOUT:?}");
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                bail!(
                    "request failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            reqs.complete(c.user_data, now)?;
            if !reqs.submit(q, c.user_data) {
                in_flight -= 1;
            }
        }
    }
    Ok(())
}

/// Runs `work(i, queue, buffer, area)` for every queue i (in `areas[i]`) on a thread of its
/// own, and `meanwhile` on this thread; returns the queues' results and `meanwhile`'s.
pub fn on_each_queue<T: Send, M>(
    client: &mut Client,
    areas: &[Area],
    work: impl Fn(usize, &mut Blkioq, Buffer, Area) -> Result<T> + Sync,
    meanwhile: impl FnOnce() -> M,
) -> (Result<Vec<T>>, M) {
    std::thread::scope(|s| {
        let work = &work;
        let threads: Vec<_> = client
            .queues()
            .zip(areas)
            .enumerate()
            .map(|(i, ((q, buf), &area))| s.spawn(move || work(i, q, buf, area)))
            .collect();
        let m = meanwhile();
        let results = threads
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.join()
                    .map_err(|_| anyhow!("queue {i}'s thread panicked"))?
                    .with_context(|| format!("queue {i}"))
            })
            .collect();
        (results, m)
    })
}
