//! vhost-blk against qemu-storage-daemon, driven by the same userspace frontend.
//!
//! `cargo bench -p vhost-blk --bench vs_qsd [-- OPTIONS]` (`-- --help` lists the options).
//!
//! Both daemons serve the same image files, one after the other (the order alternates from
//! case to case and from run to run, so that drift in the machine's load hits both alike).
//! The client is libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate), with
//! event-driven completions (eventfd, no polling) and one thread per queue keeping a fixed
//! number of requests in flight on its queue. Raw images are opened with O_DIRECT on both sides
//! (`--direct`, `cache.direct=on`); qcow2 images go through the host page cache on both sides,
//! because vhost-blk cannot open qcow2 with O_DIRECT yet. qemu-storage-daemon uses
//! `aio=io_uring` and one iothread (QEMU 10's vhost-user-blk export takes a single iothread
//! whatever the number of queues); vhost-blk runs one worker per queue.
//!
//! Reported per case: median IOPS (and MiB/s), the server's CPU time per million requests
//! (utime + stime of the whole process from /proc over the measured window), median p50
//! latency, and the ratios ours / qsd. A markdown table goes to stdout, progress to stderr.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use clap::{Parser, ValueEnum};

const MIB: u64 = 1 << 20;

/// vhost-blk vs qemu-storage-daemon (same images, same libblkio client, alternating runs).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Alternating runs per case; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Warm-up seconds per run (requests already in flight, not counted).
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Size of the raw and preallocated qcow2 images in MiB (filled with data). The empty
    /// qcow2 image is 16 times larger, so that random writes allocate for the whole run.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Images to test.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        ImageKind::Raw, ImageKind::Qcow2Prealloc, ImageKind::Qcow2Empty,
    ])]
    images: Vec<ImageKind>,
    /// Queue counts to test (one client thread per queue; QD1 runs with one queue only).
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 2])]
    queues: Vec<u16>,
    /// Requests in flight per queue for the deep-queue workloads.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Only run workloads whose name contains one of these (comma separated), e.g.
    /// `randread,seqread`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Serve raw images through the host page cache too (no O_DIRECT on either side).
    #[arg(long)]
    buffered: bool,
    /// Directory for the images and sockets; must support O_DIRECT (not tmpfs). Default: a
    /// temporary directory under /var/tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Extra vhost-blk arguments, e.g. `--ours-args=--poll-us=32` (space separated).
    #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
    ours_args: Option<String>,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Print every run, not only the medians.
    #[arg(long, short)]
    verbose: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The images a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ImageKind {
    /// A raw file filled with data.
    Raw,
    /// A qcow2 image with every cluster allocated and filled (`preallocation=metadata`).
    Qcow2Prealloc,
    /// A fresh qcow2 image, recreated before every run: reads see zeros, writes allocate.
    Qcow2Empty,
}

impl ImageKind {
    fn name(self) -> &'static str {
        match self {
            ImageKind::Raw => "raw",
            ImageKind::Qcow2Prealloc => "qcow2 prealloc",
            ImageKind::Qcow2Empty => "qcow2 empty",
        }
    }

    fn format(self) -> &'static str {
        match self {
            ImageKind::Raw => "raw",
            _ => "qcow2",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            ImageKind::Raw => "data.raw",
            ImageKind::Qcow2Prealloc => "prealloc.qcow2",
            ImageKind::Qcow2Empty => "empty.qcow2",
        }
    }
}

/// An I/O pattern.
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    sequential: bool,
    block_size: usize,
    qd: usize,
}

/// One line of the result table: a workload on an image with some queues.
#[derive(Debug, Clone, Copy)]
struct Case {
    image: ImageKind,
    queues: u16,
    workload: Workload,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{} QD{} {}q {}",
            self.workload.name,
            self.workload.qd,
            self.queues,
            self.image.name()
        )
    }
}

/// The two servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Ours,
    Qsd,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Ours => "vhost-blk",
            Server::Qsd => "qsd",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    iops: f64,
    mib_s: f64,
    /// Server CPU seconds per million requests.
    cpu_per_mreq: f64,
    p50_us: f64,
    p99_us: f64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("vs_qsd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    ensure!(
        args.runs > 0 && args.seconds > 0.0,
        "--runs and --seconds must be positive"
    );
    ensure!(
        args.qd > 0 && args.size_mib >= 16,
        "--qd must be positive and --size-mib at least 16"
    );
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("vhost-blk-bench")
                .tempdir_in("/var/tmp")
                .context("creating a directory in /var/tmp")?;
            tmp.path().to_path_buf()
        }
    };
    let cases = cases(args);
    ensure!(!cases.is_empty(), "no case selected");
    check_qsd(&args.qsd)?;
    prepare_images(args, &dir, &cases)?;

    let total = cases.len() * args.runs * 2;
    let est = total as f64 * (args.seconds + args.warmup + 0.3);
    eprintln!(
        "{} cases x {} runs x 2 servers, about {:.0} s",
        cases.len(),
        args.runs,
        est
    );
    let mut samples: Vec<[Vec<Sample>; 2]> = vec![Default::default(); cases.len()];
    for run in 0..args.runs {
        for (i, case) in cases.iter().enumerate() {
            let order = if (run + i) % 2 == 0 {
                [Server::Ours, Server::Qsd]
            } else {
                [Server::Qsd, Server::Ours]
            };
            for server in order {
                let s = measure(args, &dir, server, case)
                    .with_context(|| format!("{} on {}", server.name(), case.label()))?;
                if args.verbose {
                    eprintln!(
                        "run {run} {:<32} {:<9} {:>9.0} IOPS {:>8.1} MiB/s {:>6.2} CPU-s/M \
                         p50 {:>7.1} us p99 {:>7.1} us",
                        case.label(),
                        server.name(),
                        s.iops,
                        s.mib_s,
                        s.cpu_per_mreq,
                        s.p50_us,
                        s.p99_us
                    );
                } else {
                    eprint!(".");
                }
                samples[i][server as usize].push(s);
            }
        }
    }
    eprintln!();
    print!("{}", table(args, &cases, &samples));
    Ok(())
}

/// The cases selected by the arguments.
fn cases(args: &Args) -> Vec<Case> {
    let workloads = [
        ("randread-4k", false, false, 4096, 1),
        ("randread-4k", false, false, 4096, args.qd),
        ("randwrite-4k", true, false, 4096, 1),
        ("randwrite-4k", true, false, 4096, args.qd),
        ("seqread-128k", false, true, 128 << 10, 8),
    ]
    .map(|(name, write, sequential, block_size, qd)| Workload {
        name,
        write,
        sequential,
        block_size,
        qd,
    });
    let mut cases = Vec::new();
    for &image in &args.images {
        for &queues in &args.queues {
            for &workload in &workloads {
                let selected =
                    args.only.is_empty() || args.only.iter().any(|o| workload.name.contains(o));
                // QD1 and sequential streams say nothing more with several queues.
                let multi_ok = workload.qd > 1 && !workload.sequential;
                if selected && queues > 0 && (queues == 1 || multi_ok) {
                    cases.push(Case {
                        image,
                        queues,
                        workload,
                    });
                }
            }
        }
    }
    cases
}

fn check_qsd(qsd: &Path) -> Result<()> {
    let out = Command::new(qsd)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} (is QEMU installed?)", qsd.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{}",
        version.lines().next().unwrap_or("qemu-storage-daemon")
    );
    Ok(())
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("cannot run qemu-img")?;
    ensure!(
        out.status.success(),
        "qemu-img {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Writes the raw data file (and the preallocated qcow2 copy) once for the whole bench.
fn prepare_images(args: &Args, dir: &Path, cases: &[Case]) -> Result<()> {
    let wants = |k| cases.iter().any(|c| c.image == k);
    let raw = dir.join(ImageKind::Raw.file_name());
    if wants(ImageKind::Raw) || wants(ImageKind::Qcow2Prealloc) {
        eprintln!(
            "writing a {} MiB raw image in {}",
            args.size_mib,
            dir.display()
        );
        let mut f = File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
        let mut chunk = vec![0u8; 4 * MIB as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..args.size_mib.div_ceil(4) {
            for word in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk)?;
        }
        f.set_len(args.size_mib * MIB)?;
        f.sync_all()?;
    }
    if wants(ImageKind::Qcow2Prealloc) {
        let q = dir.join(ImageKind::Qcow2Prealloc.file_name());
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            path_str(&raw)?,
            path_str(&q)?,
        ])?;
    }
    if !wants(ImageKind::Raw) && raw.exists() {
        std::fs::remove_file(&raw)?;
    }
    Ok(())
}

/// The image file of a case, recreated first when the case needs a fresh one.
fn image_for(args: &Args, dir: &Path, kind: ImageKind) -> Result<PathBuf> {
    let path = dir.join(kind.file_name());
    if kind == ImageKind::Qcow2Empty {
        let size = format!("{}M", args.size_mib * 16);
        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path)?, &size])?;
    }
    Ok(path)
}

/// Whether a case's image is opened with O_DIRECT.
fn direct(args: &Args, kind: ImageKind) -> bool {
    kind == ImageKind::Raw && !args.buffered
}

/// A server process, stopped with SIGTERM when dropped.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(args: &Args, dir: &Path, server: Server, case: &Case) -> Result<(Running, PathBuf)> {
        let image = image_for(args, dir, case.image)?;
        let socket = dir.join(format!("{}.sock", server.name()));
        let _ = std::fs::remove_file(&socket);
        let log = dir.join(format!("{}.log", server.name()));
        let mut cmd = match server {
            Server::Ours => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-blk"));
                c.arg("--socket")
                    .arg(&socket)
                    .arg("--image")
                    .arg(&image)
                    .args(["--format", case.image.format()])
                    .args(["--num-queues", &case.queues.to_string()])
                    .env("RUST_LOG", "warn");
                if direct(args, case.image) {
                    c.arg("--direct");
                }
                c.args(args.ours_args.iter().flat_map(|a| a.split_whitespace()));
                c
            }
            Server::Qsd => {
                let mut c = Command::new(&args.qsd);
                let on_off = if direct(args, case.image) {
                    "on"
                } else {
                    "off"
                };
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=file0,filename={},cache.direct={on_off},aio=io_uring",
                    path_str(&image)?
                ));
                let node = if case.image.format() == "qcow2" {
                    c.args(["--blockdev", "driver=qcow2,node-name=fmt0,file=file0"]);
                    "fmt0"
                } else {
                    "file0"
                };
                c.args(["--object", "iothread,id=iot0"])
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,\
                         addr.path={},writable=on,num-queues={},iothread=iot0",
                        path_str(&socket)?,
                        case.queues
                    ));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", server.name()))?;
        let mut running = Running { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = running.child.try_wait()? {
                bail!("exited with {status}: {}", running.log_text());
            }
            ensure!(Instant::now() < deadline, "no socket after 20 s");
            sleep(Duration::from_millis(5));
        }
        Ok((running, socket))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU seconds (user + system, all threads) the process has used.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((ticks(11)? + ticks(12)?) / hz)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: only signals our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio client: one buffer region split between the queues.
struct Client {
    // Queues and the region must go before the Blkio instance.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

impl Client {
    fn connect(socket: &Path, queues: u16, buf_len: usize) -> Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user")?;
            b.set_str("path", path_str(socket)?)?;
            match b.connect() {
                Ok(()) => break b,
                Err(e) if Instant::now() < deadline && e.errno() == blkio::Errno::CONNREFUSED => {
                    sleep(Duration::from_millis(10))
                }
                Err(e) => bail!("connecting to {}: {e}", socket.display()),
            }
        };
        blkio.set_i32("num-queues", i32::from(queues))?;
        let started = blkio.start()?;
        let align = usize::try_from(blkio.get_u64("mem-region-alignment")?)?.max(4096);
        let region = blkio.alloc_mem_region(buf_len.next_multiple_of(align))?;
        blkio.map_mem_region(&region)?;
        // Non-zero data, so that nothing can take a write-zeroes shortcut.
        // SAFETY: the region is `region.len` bytes mapped for the client's lifetime.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
        Ok(Client {
            queues: started.queues,
            region,
            blkio,
        })
    }

    fn capacity(&self) -> Result<u64> {
        Ok(self.blkio.get_u64("capacity")?)
    }
}

/// What one queue's thread counted in the measured window.
#[derive(Default)]
struct QueueStats {
    done: u64,
    latencies_ns: Vec<u32>,
}

/// Keeps `w.qd` requests in flight on `q` until `end`; counts completions in `[start, end)`.
fn drive(
    q: &mut Blkioq,
    buf: usize,
    w: &Workload,
    area: (u64, u64),
    seed: u64,
    start: Instant,
    end: Instant,
) -> Result<QueueStats> {
    let bs = w.block_size as u64;
    let (area_start, area_len) = area;
    let blocks = (area_len / bs).max(1);
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut seq = 0u64;
    let mut next_offset = || {
        let block = if w.sequential {
            seq = (seq + 1) % blocks;
            seq
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        };
        area_start + block * bs
    };
    let mut submitted = vec![Instant::now(); w.qd];
    let mut submit = |q: &mut Blkioq, slot: usize, submitted: &mut [Instant]| {
        let offset = next_offset();
        let ptr = buf + slot * w.block_size;
        submitted[slot] = Instant::now();
        if w.write {
            q.write(
                offset,
                ptr as *const u8,
                w.block_size,
                slot,
                ReqFlags::empty(),
            );
        } else {
            q.read(
                offset,
                ptr as *mut u8,
                w.block_size,
                slot,
                ReqFlags::empty(),
            );
        }
    };
    for slot in 0..w.qd {
        submit(q, slot, &mut submitted);
    }
    let mut stats = QueueStats {
        latencies_ns: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = w.qd;
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(10);
        let n = q.do_io(&mut completions, 1, Some(&mut timeout), None)?;
        ensure!(n > 0, "no completion within 10 s");
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io filled the first n completions.
            let c = unsafe { c.assume_init_read() };
            ensure!(
                c.ret == 0,
                "request failed: {}",
                std::io::Error::from_raw_os_error(-c.ret)
            );
            let slot = c.user_data;
            if now >= start && now < end {
                stats.done += 1;
                let ns = now.duration_since(submitted[slot]).as_nanos();
                stats
                    .latencies_ns
                    .push(u32::try_from(ns).unwrap_or(u32::MAX));
            }
            if now < end {
                submit(q, slot, &mut submitted);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(stats)
}

/// Starts `server` for `case`, runs the workload from one thread per queue, stops the server.
fn measure(args: &Args, dir: &Path, server: Server, case: &Case) -> Result<Sample> {
    let (running, socket) = Running::start(args, dir, server, case)?;
    let w = case.workload;
    let per_queue = w.qd * w.block_size;
    let mut client = Client::connect(&socket, case.queues, per_queue * usize::from(case.queues))
        .with_context(|| running.log_text())?;
    let capacity = client.capacity()?;
    let nq = u64::from(case.queues);
    let area_len = capacity / nq / 4096 * 4096;
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.seconds);
    let buf = client.region.addr;
    let (stats, cpu) = std::thread::scope(|s| {
        let threads: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let area = (i as u64 * area_len, area_len);
                let buf = buf + i * per_queue;
                s.spawn(move || drive(q, buf, &w, area, i as u64 + 1, start, end))
            })
            .collect();
        // The server's CPU time over the measured window.
        let cpu = (|| -> Result<f64> {
            sleep(start.saturating_duration_since(Instant::now()));
            let before = running.cpu_seconds()?;
            sleep(end.saturating_duration_since(Instant::now()));
            Ok(running.cpu_seconds()? - before)
        })();
        let stats: Vec<_> = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect();
        (stats, cpu)
    });
    let mut done = 0;
    let mut lat = Vec::new();
    for s in stats {
        let s = s.with_context(|| running.log_text())?;
        done += s.done;
        lat.extend(s.latencies_ns);
    }
    drop(client);
    drop(running);
    ensure!(done > 0, "no request completed");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let iops = done as f64 / args.seconds;
    Ok(Sample {
        iops,
        mib_s: iops * w.block_size as f64 / MIB as f64,
        cpu_per_mreq: cpu? / done as f64 * 1e6,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The markdown result table.
fn table(args: &Args, cases: &[Case], samples: &[[Vec<Sample>; 2]]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} runs x {} s per case and server (medians); raw: {}; qcow2: host page cache on \
         both sides\n",
        args.runs,
        args.seconds,
        if args.buffered {
            "host page cache on both sides"
        } else {
            "O_DIRECT on both sides"
        }
    );
    let _ = writeln!(
        out,
        "| workload | image | queues | vhost-blk | qsd | ratio | server CPU-s per M req \
         ours / qsd | IOPS per CPU-s ratio | p50 µs ours / qsd |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (case, [ours, qsd]) in cases.iter().zip(samples) {
        let m = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f));
        let (oi, qi) = (m(ours, |s| s.iops), m(qsd, |s| s.iops));
        let (oc, qc) = (m(ours, |s| s.cpu_per_mreq), m(qsd, |s| s.cpu_per_mreq));
        let (ol, ql) = (m(ours, |s| s.p50_us), m(qsd, |s| s.p50_us));
        let rate = |s: &[Sample], iops: f64| {
            if case.workload.sequential {
                format!("{:.0} MiB/s", m(s, |s| s.mib_s))
            } else {
                format!("{iops:.0} IOPS")
            }
        };
        let _ = writeln!(
            out,
            "| {} QD{} | {} | {} | {} | {} | {:.2} | {:.1} / {:.1} | {:.2} | {:.0} / {:.0} |",
            case.workload.name,
            case.workload.qd,
            case.image.name(),
            case.queues,
            rate(ours, oi),
            rate(qsd, qi),
            oi / qi,
            oc,
            qc,
            qc / oc,
            ol,
            ql,
        );
    }
    out
}
