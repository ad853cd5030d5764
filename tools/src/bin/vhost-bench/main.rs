//! `vhost-bench`: a load generator for vhost-user-blk servers (vhost-blk,
//! qemu-storage-daemon, ...) on libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate).
//!
//! One thread per queue keeps `--iodepth` requests in flight and waits for completions on the
//! queue's eventfd (no polling). Reported: IOPS, bandwidth, latency percentiles and, with
//! `--server-pid`, the server's CPU time over the measured window. `--verify` writes blocks
//! stamped with their offset and a generation, reads them back and checks them instead.

mod client;
mod cpu;
mod histogram;
mod load;
mod measure;
mod size;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};

use client::Client;
use load::{Area, Job};

/// The I/O patterns, named as in fio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads and writes, --rwmixread percent reads.
    Randrw,
}

impl Rw {
    /// Whether offsets are random (else each queue walks its area in order).
    pub fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Whether the pattern writes at all.
    pub fn writes(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write | Rw::Randrw)
    }
}

impl std::fmt::Display for Rw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.to_possible_value().expect("no skipped variants");
        f.write_str(value.get_name())
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// Human-readable lines.
    Normal,
    /// One JSON object.
    Json,
}

/// Load generator for vhost-user-blk servers (libblkio's virtio-blk-vhost-user driver).
///
/// Connects to a vhost-user-blk socket, keeps --iodepth requests in flight on each of
/// --queues queues (one thread each, event-driven completions) for --ramp plus --runtime
/// seconds, and reports what completed in the --runtime window: IOPS, MiB/s, latency p50/p99,
/// vhost-bench's own CPU seconds and, with --server-pid, the server's CPU seconds (utime +
/// stime from /proc) and IOPS per server CPU-second. The device range [0, --size) is split
/// evenly between the queues.
///
/// With --verify nothing is timed: write patterns (write, randwrite, randrw) write every
/// block of the range once, each 512-byte sector stamped with its offset and a fresh
/// generation, flush, then read everything back and check it; read patterns only check that
/// every sector holds the stamp of its own offset (left by an earlier --verify write run).
/// A mismatch exits 1 naming the first bad sector.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The server's vhost-user-blk socket (waited for up to 5 s).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Percentage of reads for --rw randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Request size: bytes or with a k, m or g suffix (powers of 1024); a multiple of 512.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = size::parse_block_size)]
    bs: usize,
    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    iodepth: u16,
    /// Send a flush after every N writes on each queue, like fio's --fsync (0: never).
    /// Flushes take a request slot but are not counted in IOPS or latency.
    #[arg(long, value_name = "N", default_value_t = 0)]
    fsync: u32,
    /// Number of queues, one thread each.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Measured seconds.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = size::parse_runtime)]
    runtime: f64,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = size::parse_seconds)]
    ramp: f64,
    /// Bytes of the device to use from offset 0 (same suffixes as --bs) [default: the device
    /// capacity].
    #[arg(long, value_name = "BYTES", value_parser = size::parse_size)]
    size: Option<u64>,
    /// The server's process ID, for its CPU time over the measured window.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Normal)]
    output_format: OutputFormat,
    /// Write stamped blocks, read them back and check them (see above) instead of measuring.
    #[arg(long)]
    verify: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let job = Job {
        rw: cli.rw,
        rwmixread: cli.rwmixread,
        bs: cli.bs,
        iodepth: usize::from(cli.iodepth),
        fsync: cli.fsync as usize,
    };
    // Two buffers per request slot: reads land in their own, so writes keep sending the
    // client's non-zero fill (a read of an empty image would otherwise turn it into zeros).
    // Workloads without writes open the device read-only, so they run on read-only devices.
    let read_only = !cli.rw.writes() && cli.fsync == 0;
    let mut client = Client::connect(&cli.socket, read_only, cli.queues, 2 * job.bs * job.iodepth)
        .with_context(|| format!("connecting to {}", cli.socket.display()))?;
    let capacity = client.capacity()?;
    let size = cli.size.unwrap_or(capacity);
    ensure!(
        size <= capacity,
        "--size {size} is larger than the device ({capacity} bytes)"
    );
    let areas = Area::split(size, cli.queues, job.bs).with_context(|| {
        format!(
            "--size {size}: each of the {} queues needs at least one block of {} bytes",
            cli.queues, job.bs
        )
    })?;
    let json = cli.output_format == OutputFormat::Json;
    if cli.verify {
        let outcome = verify::run(&mut client, &areas, &job)?;
        println!("{}", outcome.render(json)?);
        outcome.result()
    } else {
        let window = measure::Window::after(cli.ramp, cli.runtime);
        let report = measure::run(&mut client, &areas, &job, window, cli.server_pid)?;
        println!("{}", report.render(json)?);
        Ok(())
    }
}
