//! `vhost-blk`: a vhost-user-blk daemon serving a raw or qcow2 image.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use cowbird_daemon::logging::{self, error_line};
use cowbird_daemon::{signals, socket};
use tracing::level_filters::LevelFilter;

use vhost_blk::device::{Device, MAX_QUEUES, MAX_QUEUE_SIZE};
use vhost_blk::disk::{Disk, DiskOptions, ID_BYTES};
use vhost_blk::server::Server;

/// Image formats accepted by `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// Serve a disk image to a virtual machine's virtio-blk device over a vhost-user socket.
///
/// The daemon listens on the socket and serves one frontend (QEMU, Cloud Hypervisor,
/// libblkio, ...) at a time; when it disconnects, the next one is accepted. With --client it
/// connects to a frontend that listens instead, and reconnects after a disconnect. SIGTERM or
/// SIGINT finishes requests in progress, flushes the image and exits 0.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Unix socket to listen on (a stale socket file is replaced), or with --client the
    /// frontend's socket to connect to.
    #[arg(long, value_name = "PATH", value_parser = socket::parse_path)]
    socket: PathBuf,
    /// Connect to a frontend listening on --socket (e.g. QEMU's `-chardev
    /// socket,server=on,...`) instead of listening; retried every second at most while nothing
    /// listens there, and again after every disconnect.
    #[arg(long)]
    client: bool,
    /// Disk image to serve.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Image format; probed from the file when omitted (with a warning, as QEMU does).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Number of request queues (one worker thread each), 1 to 64.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    num_queues: u16,
    /// Largest virtqueue size a frontend may use: a power of two, 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Serve the image read-only (the guest sees VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// After requests served without the disk (reads of unallocated qcow2 clusters, GET_ID,
    /// reads the kernel served from the page cache at once, ...), keep polling the available ring, with the driver's notifications off, until
    /// nothing has come for N microseconds or a request goes to the disk; 0 never polls.
    /// Like QEMU's iothread poll-max-ns (32 us by default there too), but never spinning
    /// through a disk access: a worker with requests at the disk sleeps in its io_uring.
    #[arg(long, value_name = "N", default_value_t = 32)]
    poll_us: u32,
    /// Pin each connection's guest memory and register it with the queues' io_uring: the
    /// kernel then skips pinning (and for reads dirtying) the pages of every request, about
    /// half of the CPU time of 1 MiB requests with --direct. The guest's memory stays
    /// resident while connected and counts against RLIMIT_MEMLOCK (without CAP_IPC_LOCK);
    /// if pinning fails, requests pin their pages one by one as without this flag.
    #[arg(long)]
    pin_memory: bool,
    /// Start with the write cache off (`wce` = 0, as qemu-storage-daemon's `writethrough=on`):
    /// every write is synced before it completes. A driver with CONFIG_WCE may turn it on.
    #[arg(long)]
    writethrough: bool,
    /// Serial number the guest reads (GET_ID), at most 20 bytes.
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    serial: Option<String>,
}

/// `--queue-size`: a power of two from 4 to [`MAX_QUEUE_SIZE`] (checked with the other
/// options, before the image is opened).
fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && (4..=MAX_QUEUE_SIZE).contains(&n) => Ok(n),
        _ => Err(format!("must be a power of two from 4 to {MAX_QUEUE_SIZE}")),
    }
}

/// `--serial`: at most [`ID_BYTES`] bytes.
fn parse_serial(s: &str) -> Result<String, String> {
    match s.len() <= ID_BYTES {
        true => Ok(s.to_owned()),
        false => Err(format!("at most {ID_BYTES} bytes, not {}", s.len())),
    }
}

fn main() {
    let cli = Cli::parse();
    logging::init(LevelFilter::INFO);
    if let Err(e) = run(cli) {
        tracing::error!("{}", error_line(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Before any thread exists, so that only the signal thread receives SIGTERM/SIGINT/SIGHUP.
    signals::block()?;
    let opts = DiskOptions {
        path: cli.image.clone(),
        format: cli.format.map(|f| match f {
            FormatArg::Raw => qcow2::Format::Raw,
            FormatArg::Qcow2 => qcow2::Format::Qcow2,
        }),
        read_only: cli.read_only,
        direct: cli.direct,
        serial: cli.serial.clone(),
    };
    let disk = Disk::open(&opts)?;
    let format = disk.image().format();
    let capacity = disk.capacity();
    let mut device =
        Device::new(disk, cli.num_queues, cli.queue_size).context("invalid device options")?;
    device.set_poll(Duration::from_micros(u64::from(cli.poll_us)));
    device.set_pin_memory(cli.pin_memory);
    device.set_write_cache(!cli.writethrough);
    let device = Arc::new(device);
    let io_uring = device.uses_io_uring();
    let (mut server, owned_socket) = if cli.client {
        (Server::connect(&cli.socket, device.clone()), None)
    } else {
        (
            Server::bind(&cli.socket, device.clone())?,
            Some(cli.socket.clone()),
        )
    };
    // Stopping finishes requests in progress and flushes the image: exit 0 when that worked.
    signals::on_stop(owned_socket, move || match device.shutdown() {
        Ok(()) => {
            tracing::info!("image flushed, exiting");
            0
        }
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    })?;
    tracing::info!(
        "serving {} ({}, {} sectors{}{}) {} {} with {} queue(s) of up to {} entries",
        cli.image.display(),
        format.name(),
        capacity,
        if cli.read_only { ", read-only" } else { "" },
        if io_uring { ", zero-copy io_uring" } else { "" },
        if cli.client { "to" } else { "on" },
        cli.socket.display(),
        cli.num_queues,
        cli.queue_size,
    );
    server
        .run()
        .with_context(|| format!("serving {}", cli.socket.display()))
}
