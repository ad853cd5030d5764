//! Packets per second, throughput and backend CPU time per packet between a userspace
//! virtio-net frontend and a TAP device, for vhost-net and for the DPDK stand-in on the same
//! workload.
//!
//! - Frontend: dpdk-testpmd with a `virtio_user` port (one queue pair, 1024 entries) in
//!   `txonly` mode (guest → TAP) or `rxonly` mode (TAP → guest), its forwarding lcore on CPU 1.
//! - Backends: `vhost-net` (this crate's daemon, built with the bench profile) with its TAP in
//!   a fresh network namespace; or DPDK's `net_vhost` backend and `net_tap` port in a second
//!   testpmd forwarding between them (`io` mode, forwarding lcore on CPU 0), its TAP in the
//!   namespace. Both move every packet through one TAP.
//! - guest → TAP is counted where the packets arrive, the TAP's rx_packets; TAP → guest
//!   frames come from an AF_PACKET socket sending batches on the TAP as fast as it can
//!   (`sendmmsg`, qdisc bypassed; frames a full TAP queue cannot take are dropped by the
//!   kernel) and are counted by the frontend (testpmd telemetry `ipackets`).
//! - Each sample is a fresh namespace, backend and frontend: 1 s of warm-up, then the window.
//!   Backend CPU is the backend process's user + system time over the window (a polling DPDK
//!   lcore is always busy: its time per packet is the core divided by the packet rate).
//!   Backends alternate run by run; medians are printed with the vhost-net/DPDK ratios.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-net nice -n 10 cargo bench -p vhost-net --bench tap_pps \
//!     [-- --runs 5 --secs 5 --sizes 64,1514 --directions tx,rx --backends vhost-net,dpdk]
//! ```
//!
//! Needs root, /dev/net/tun, `ip` and `dpdk-testpmd`, like the integration tests.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    VhostNet,
    Dpdk,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::VhostNet => "vhost-net",
            Backend::Dpdk => "DPDK net_vhost+net_tap",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    GuestToTap,
    TapToGuest,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::GuestToTap => "guest → TAP",
            Direction::TapToGuest => "TAP → guest",
        }
    }
}

struct Options {
    runs: usize,
    secs: f64,
    sizes: Vec<usize>,
    directions: Vec<Direction>,
    backends: Vec<Backend>,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            runs: 5,
            secs: 5.0,
            sizes: vec![64, 1514],
            directions: vec![Direction::GuestToTap, Direction::TapToGuest],
            backends: vec![Backend::VhostNet, Backend::Dpdk],
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--runs" => o.runs = value().parse().expect("--runs N"),
                "--secs" => o.secs = value().parse().expect("--secs SECONDS"),
                "--sizes" => {
                    o.sizes = value()
                        .split(',')
                        .map(|s| s.parse().expect("--sizes 64,1514"))
                        .collect()
                }
                "--directions" => {
                    o.directions = value()
                        .split(',')
                        .map(|d| match d {
                            "tx" => Direction::GuestToTap,
                            "rx" => Direction::TapToGuest,
                            _ => panic!("--directions takes tx and/or rx"),
                        })
                        .collect()
                }
                "--backends" => {
                    o.backends = value()
                        .split(',')
                        .map(|b| match b {
                            "vhost-net" => Backend::VhostNet,
                            "dpdk" => Backend::Dpdk,
                            _ => panic!("--backends takes vhost-net and/or dpdk"),
                        })
                        .collect()
                }
                // `cargo bench` passes --bench; filters and other harness flags do not apply.
                _ => {}
            }
        }
        assert!(
            o.runs > 0 && o.secs > 0.0 && !o.backends.is_empty(),
            "--runs and --secs must be positive, --backends not empty"
        );
        o
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    pps: f64,
    cpu_us_per_packet: f64,
    /// TAP → guest: frames per second the generator put on the TAP (taken by the backend or
    /// dropped by the kernel because the TAP's queue was full).
    offered_pps: f64,
}

/// A testpmd telemetry connection (`/var/run/dpdk/PREFIX/dpdk_telemetry.v2`).
struct Telemetry(File);

impl Telemetry {
    fn connect(prefix: &str, proc: &mut Proc) -> Telemetry {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let path = format!("/var/run/dpdk/{prefix}/dpdk_telemetry.v2");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            let addr = UnixAddr::new(path.as_str()).expect("telemetry path");
            if connect(fd.as_raw_fd(), &addr).is_ok() {
                let mut t = Telemetry(File::from(fd));
                t.read_reply(); // {"version": ..., "pid": ..., "max_output_len": ...}
                return t;
            }
            if let Some(status) = proc.try_wait() {
                panic!("testpmd exited with {status}:\n{}", proc.log());
            }
            assert!(Instant::now() < deadline, "no telemetry:\n{}", proc.log());
            sleep(Duration::from_millis(50));
        }
    }

    fn read_reply(&mut self) -> String {
        let mut buf = vec![0u8; 65536];
        let n = self.0.read(&mut buf).expect("telemetry read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Port 0's (ipackets, opackets).
    fn packets(&mut self) -> (u64, u64) {
        self.0
            .write_all(b"/ethdev/stats,0")
            .expect("telemetry write");
        let reply = self.read_reply();
        let field = |name: &str| -> u64 {
            let key = format!("\"{name}\":");
            let at = reply
                .find(&key)
                .unwrap_or_else(|| panic!("no {name} in {reply}"));
            reply[at + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or_else(|_| panic!("bad {name} in {reply}"))
        };
        (field("ipackets"), field("opackets"))
    }
}

/// `/proc/net/dev` of a namespace, opened from inside it; re-read for current counters.
struct NetDev(File);

impl NetDev {
    fn open(ns: &NetNs) -> NetDev {
        NetDev(ns.run_inside(|| File::open("/proc/thread-self/net/dev").expect("/proc/net/dev")))
    }

    /// `ifname`'s counters: rx bytes, packets, errs, drop, fifo, frame, compressed, multicast,
    /// then the same eight for tx.
    fn counters(&mut self, ifname: &str) -> Vec<u64> {
        let mut text = String::new();
        self.0.rewind().expect("rewind /proc/net/dev");
        self.0
            .read_to_string(&mut text)
            .expect("read /proc/net/dev");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{ifname}:")))
            .unwrap_or_else(|| panic!("no {ifname} in /proc/net/dev"));
        line.split_once(':')
            .map(|(_, c)| {
                c.split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// User + system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may contain spaces) start with the state (3).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// Sends `size`-byte Ethernet frames on a TAP from the kernel side, as fast as it can.
struct Generator {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Generator {
    fn start(ns: &NetNs, tap: &str, size: usize) -> Generator {
        let name = std::ffi::CString::new(tap).unwrap();
        let sock = ns.run_inside(move || {
            // SAFETY: plain socket calls with valid arguments; the result is checked.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let fd = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
                let ifindex = libc::if_nametoindex(name.as_ptr());
                assert!(ifindex > 0, "no {name:?}");
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
                addr.sll_ifindex = ifindex as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                let one: libc::c_int = 1;
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    (&one as *const libc::c_int).cast(),
                    4,
                );
                fd
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frame = vec![0u8; size.max(60)];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            // IPv4 + UDP headers (the content is not checked by anything on the way).
            frame[14] = 0x45;
            frame[23] = 17;
            const BATCH: usize = 64;
            let mut iov = libc::iovec {
                iov_base: frame.as_mut_ptr().cast(),
                iov_len: frame.len(),
            };
            // SAFETY: zeroed mmsghdr is valid; each points at the one iovec, which outlives
            // the loop.
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|_| unsafe {
                    let mut m: libc::mmsghdr = std::mem::zeroed();
                    m.msg_hdr.msg_iov = &mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: msgs holds BATCH valid headers.
                let n =
                    unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
                if n < 0 {
                    std::thread::yield_now();
                }
            }
        });
        Generator { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// The backend under test, serving on `socket`, moving packets to/from `tap` in `ns`.
struct RunningBackend {
    proc: Proc,
    tap: String,
    socket: PathBuf,
    stop_signal: libc::c_int,
}

fn start_backend(backend: Backend, ns: &NetNs, dir: &Path) -> RunningBackend {
    match backend {
        Backend::VhostNet => {
            let daemon = Daemon::start(ns, dir, &["--queue-size", "1024"]);
            RunningBackend {
                proc: daemon.proc,
                tap: daemon.tap,
                socket: daemon.socket,
                stop_signal: libc::SIGTERM,
            }
        }
        Backend::Dpdk => {
            let tap = unique("dt");
            let socket = dir.join("dpdk.sock");
            let (mut proc, _) = spawn_testpmd(
                dir,
                Some(ns),
                &["-l", "0,1", "--main-lcore", "1", "--no-telemetry"],
                &[
                    format!("net_vhost0,iface={},queues=1", socket.display()),
                    format!("net_tap0,iface={tap}"),
                ],
                &["--forward-mode=io"],
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while !socket.exists() || !ns.has_link(&tap) {
                if let Some(status) = proc.try_wait() {
                    panic!("testpmd backend exited with {status}:\n{}", proc.log());
                }
                assert!(Instant::now() < deadline, "backend not up:\n{}", proc.log());
                sleep(Duration::from_millis(50));
            }
            RunningBackend {
                proc,
                tap,
                socket,
                stop_signal: libc::SIGINT,
            }
        }
    }
}

fn measure(backend: Backend, direction: Direction, size: usize, secs: f64) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("bench");
    let mut be = start_backend(backend, &ns, dir.path());
    let mode = match direction {
        Direction::GuestToTap => "--forward-mode=txonly",
        Direction::TapToGuest => "--forward-mode=rxonly",
    };
    let txpkts = format!("--txpkts={size}");
    let (mut frontend, prefix) = spawn_testpmd(
        dir.path(),
        None,
        &["-l", "0,1", "--main-lcore", "0"],
        &[format!(
            "net_virtio_user0,path={},queues=1,queue_size=1024",
            be.socket.display()
        )],
        &[mode, &txpkts],
    );
    let mut telemetry = Telemetry::connect(&prefix, &mut frontend);
    let mut netdev = NetDev::open(&ns);
    let generator =
        (direction == Direction::TapToGuest).then(|| Generator::start(&ns, &be.tap, size));
    let tap = be.tap.clone();
    // (packets counted, frames offered on the TAP: its tx packets + tx drops).
    let mut count = || {
        let c = netdev.counters(&tap);
        match direction {
            Direction::GuestToTap => (c[1], 0),
            Direction::TapToGuest => (telemetry.packets().0, c[9] + c[11]),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count().0 == 0 {
        assert!(
            Instant::now() < deadline,
            "no traffic through {}:\n{}\n{}",
            backend.name(),
            be.proc.log(),
            frontend.log()
        );
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_secs(1));
    let pid = be.proc.pid();
    let (p0, c0, t0) = (count(), cpu_seconds(pid), Instant::now());
    sleep(Duration::from_secs_f64(secs));
    let (p1, c1, t1) = (count(), cpu_seconds(pid), Instant::now());
    if let Some(g) = generator {
        g.stop();
    }
    let _ = frontend.stop_with(libc::SIGINT);
    let _ = be.proc.stop_with(be.stop_signal);
    let packets = p1.0.saturating_sub(p0.0).max(1) as f64;
    let secs = (t1 - t0).as_secs_f64();
    Sample {
        pps: packets / secs,
        cpu_us_per_packet: (c1 - c0) * 1e6 / packets,
        offered_pps: p1.1.saturating_sub(p0.1) as f64 / secs,
    }
}

/// Medians (and the pps range) of one backend's samples for one case.
struct Summary {
    pps: f64,
    min: f64,
    max: f64,
    cpu: f64,
    offered: f64,
}

impl Summary {
    fn of(samples: &[Sample]) -> Summary {
        let field = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Summary {
            pps: field(|s| s.pps),
            min: samples.iter().map(|s| s.pps).fold(f64::INFINITY, f64::min),
            max: samples.iter().map(|s| s.pps).fold(0.0, f64::max),
            cpu: field(|s| s.cpu_us_per_packet),
            offered: field(|s| s.offered_pps),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    require_environment();
    let o = Options::parse();
    println!(
        "{} run(s) of {} s per case, backends alternating; medians (min–max pps)\n",
        o.runs, o.secs
    );
    println!(
        "| direction | frame | backend | kpps (min–max) | offered kpps | Gbit/s | \
         backend CPU µs/pkt | vhost-net/DPDK pps | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &direction in &o.directions {
        for &size in &o.sizes {
            let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
            for run in 0..o.runs {
                let order = if run % 2 == 0 {
                    [Backend::VhostNet, Backend::Dpdk]
                } else {
                    [Backend::Dpdk, Backend::VhostNet]
                };
                for backend in order.into_iter().filter(|b| o.backends.contains(b)) {
                    let s = measure(backend, direction, size, o.secs);
                    eprintln!(
                        "{} {size} B {} run {run}: {:.0} pps, {:.2} µs/pkt",
                        direction.name(),
                        backend.name(),
                        s.pps,
                        s.cpu_us_per_packet
                    );
                    samples[usize::from(backend == Backend::Dpdk)].push(s);
                }
            }
            let summaries = samples.map(|s| (!s.is_empty()).then(|| Summary::of(&s)));
            for (backend, m) in [Backend::VhostNet, Backend::Dpdk].iter().zip(&summaries) {
                let Some(m) = m else { continue };
                let ratios = match (backend, &summaries) {
                    (Backend::VhostNet, [Some(ours), Some(dpdk)]) => {
                        format!("{:.2} | {:.2}", ours.pps / dpdk.pps, ours.cpu / dpdk.cpu)
                    }
                    _ => " | ".to_owned(),
                };
                let offered = match direction {
                    Direction::GuestToTap => "–".to_owned(),
                    Direction::TapToGuest => format!("{:.0}", m.offered / 1e3),
                };
                println!(
                    "| {} | {size} B | {} | {:.0} ({:.0}–{:.0}) | {offered} | {:.3} | {:.2} | \
                     {ratios} |",
                    direction.name(),
                    backend.name(),
                    m.pps / 1e3,
                    m.min / 1e3,
                    m.max / 1e3,
                    m.pps * size as f64 * 8.0 / 1e9,
                    m.cpu,
                );
            }
        }
    }
}
