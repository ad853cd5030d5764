//! A timed run: load on every queue, counted in a window, with the server's CPU time.

use std::fmt::Write as _;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use blkio::{Blkioq, ReqFlags};
use serde::Serialize;

use crate::client::{Buffer, Client};
use crate::cpu::cpu_seconds;
use crate::histogram::Histogram;
use crate::load::{keep_in_flight, on_each_queue, Area, Job, Offsets, Requests, Rng};
use crate::Rw;

const MIB: f64 = (1 << 20) as f64;

/// The measured window: completions in `[start, end)` count.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    ramp: Duration,
    start: Instant,
    end: Instant,
}

impl Window {
    /// The window of `runtime` seconds that begins `ramp` seconds from now.
    pub fn after(ramp: f64, runtime: f64) -> Window {
        let ramp = Duration::from_secs_f64(ramp);
        let start = Instant::now() + ramp;
        Window {
            ramp,
            start,
            end: start + Duration::from_secs_f64(runtime),
        }
    }

    fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// What one queue completed in the window.
#[derive(Debug, Default)]
struct Stats {
    reads: u64,
    writes: u64,
    flushes: u64,
    latency: Histogram,
}

/// What a slot's request does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// One queue's load: new requests until the window ends.
struct Load {
    job: Job,
    buf: Buffer,
    offsets: Offsets,
    mix: Rng,
    window: Window,
    /// Per slot: when its request was queued and what it does.
    queued: Vec<(Instant, Op)>,
    /// Writes queued since the last flush (for `--fsync`).
    unflushed: usize,
    stats: Stats,
}

impl Requests for Load {
    fn submit(&mut self, q: &mut Blkioq, slot: usize) -> bool {
        let now = Instant::now();
        if now >= self.window.end {
            return false;
        }
        if self.job.fsync > 0 && self.unflushed >= self.job.fsync {
            self.unflushed = 0;
            self.queued[slot] = (now, Op::Flush);
            q.flush(slot, ReqFlags::empty());
            return true;
        }
        let write = match self.job.rw {
            Rw::Randrw => self.mix.next() % 100 >= u64::from(self.job.rwmixread),
            rw => rw.writes(),
        };
        let (offset, bs) = (self.offsets.next(), self.job.bs);
        if write {
            self.unflushed += 1;
            self.queued[slot] = (now, Op::Write);
            q.write(offset, self.buf.slot(slot, bs), bs, slot, ReqFlags::empty());
        } else {
            self.queued[slot] = (now, Op::Read);
            let ptr = self.buf.slot(self.job.iodepth + slot, bs);
            q.read(offset, ptr, bs, slot, ReqFlags::empty());
        }
        true
    }

    fn complete(&mut self, slot: usize, now: Instant) -> Result<()> {
        if now >= self.window.start && now < self.window.end {
            let (queued, op) = self.queued[slot];
            match op {
                Op::Read => self.stats.reads += 1,
                Op::Write => self.stats.writes += 1,
                // Like fio, flushes are counted apart: not in IOPS or latency.
                Op::Flush => {
                    self.stats.flushes += 1;
                    return Ok(());
                }
            }
            let ns = now.duration_since(queued).as_nanos();
            self.stats
                .latency
                .record(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        Ok(())
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// The result of a timed run (also its JSON form).
#[derive(Debug, Serialize)]
pub struct Report {
    rw: Rw,
    rwmixread: Option<u8>,
    bs: usize,
    iodepth: usize,
    queues: usize,
    size: u64,
    runtime_s: f64,
    ramp_s: f64,
    reads: u64,
    writes: u64,
    flushes: u64,
    iops: f64,
    mib_s: f64,
    lat_us: Latency,
    client_cpu_s: f64,
    server_pid: Option<u32>,
    server_cpu_s: Option<f64>,
    iops_per_server_cpu_s: Option<f64>,
}

/// Runs `job` on every queue (queue i in `areas[i]`) until `window` ends and reports what
/// completed inside it, with `server_pid`'s CPU time over the window.
pub fn run(
    client: &mut Client,
    areas: &[Area],
    job: &Job,
    window: Window,
    server_pid: Option<u32>,
) -> Result<Report> {
    if let Some(pid) = server_pid {
        cpu_seconds(pid).context("--server-pid")?;
    }
    let (stats, cpu) = on_each_queue(
        client,
        areas,
        |i, q, buf, area| {
            let seed = i as u64 + 1;
            let mut load = Load {
                job: *job,
                buf,
                offsets: Offsets::new(job, area, seed),
                mix: Rng::new(!seed),
                window,
                queued: vec![(window.start, Op::Read); job.iodepth],
                unflushed: 0,
                stats: Stats::default(),
            };
            keep_in_flight(q, job.iodepth, &mut load)?;
            Ok(load.stats)
        },
        || window_cpu(server_pid, &window),
    );
    let (stats, (client_cpu, cpu)) = (stats?, cpu?);
    let mut total = Stats::default();
    for s in &stats {
        total.reads += s.reads;
        total.writes += s.writes;
        total.flushes += s.flushes;
        total.latency.merge(&s.latency);
    }
    let done = total.reads + total.writes;
    ensure!(done > 0, "no request completed in the measured window");
    let iops = done as f64 / window.seconds();
    let lat = |q| total.latency.quantile(q) / 1000.0;
    Ok(Report {
        rw: job.rw,
        rwmixread: (job.rw == Rw::Randrw).then_some(job.rwmixread),
        bs: job.bs,
        iodepth: job.iodepth,
        queues: areas.len(),
        size: areas.iter().map(|a| a.blocks * job.bs as u64).sum(),
        runtime_s: window.seconds(),
        ramp_s: window.ramp.as_secs_f64(),
        reads: total.reads,
        writes: total.writes,
        flushes: total.flushes,
        iops,
        mib_s: iops * job.bs as f64 / MIB,
        lat_us: Latency {
            p50: lat(0.5),
            p99: lat(0.99),
            mean: total.latency.mean() / 1000.0,
        },
        client_cpu_s: client_cpu,
        server_pid,
        server_cpu_s: cpu,
        iops_per_server_cpu_s: cpu.map(|c| iops * window.seconds() / c),
    })
}

/// The CPU seconds this process and `server_pid` use from the window's start to its end.
fn window_cpu(server_pid: Option<u32>, window: &Window) -> Result<(f64, Option<f64>)> {
    let both = || -> Result<(f64, Option<f64>)> {
        let server = server_pid.map(cpu_seconds).transpose()?;
        Ok((cpu_seconds(std::process::id())?, server))
    };
    sleep(window.start.saturating_duration_since(Instant::now()));
    let before = both()?;
    sleep(window.end.saturating_duration_since(Instant::now()));
    let after = both()?;
    let server = after.1.zip(before.1).map(|(a, b)| a - b);
    Ok((after.0 - before.0, server))
}

impl Report {
    /// The report as JSON or as lines of text.
    pub fn render(&self, json: bool) -> Result<String> {
        if json {
            return Ok(serde_json::to_string_pretty(self)?);
        }
        let mut out = String::new();
        let mix = self
            .rwmixread
            .map_or(String::new(), |p| format!(" rwmixread={p}"));
        writeln!(
            out,
            "{}{mix}: bs={} iodepth={} queues={} size={} runtime={}s ramp={}s",
            self.rw, self.bs, self.iodepth, self.queues, self.size, self.runtime_s, self.ramp_s
        )?;
        writeln!(
            out,
            "  IOPS={:.0} BW={:.1}MiB/s (reads={} writes={} flushes={})",
            self.iops, self.mib_s, self.reads, self.writes, self.flushes
        )?;
        writeln!(
            out,
            "  lat (usec): p50={:.1} p99={:.1} mean={:.1}",
            self.lat_us.p50, self.lat_us.p99, self.lat_us.mean
        )?;
        write!(out, "  vhost-bench: {:.2} CPU-s", self.client_cpu_s)?;
        if let (Some(pid), Some(cpu), Some(per)) = (
            self.server_pid,
            self.server_cpu_s,
            self.iops_per_server_cpu_s,
        ) {
            write!(
                out,
                "\n  server pid {pid}: {cpu:.2} CPU-s, {per:.0} IOPS per CPU-second"
            )?;
        }
        Ok(out)
    }
}
