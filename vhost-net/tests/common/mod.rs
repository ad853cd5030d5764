//! Shared helpers for the integration tests: a network namespace, the real daemon binary with
//! its TAP inside that namespace, DPDK's testpmd as the virtio-net frontend, and ping.
//!
//! These tests need root, /dev/net/tun, `ip`, `ping` and `dpdk-testpmd` (Debian packages
//! iproute2, iputils-ping, dpdk-dev). They fail with a message naming what is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use cowbird_tests::netns::NetNs;
pub use cowbird_tests::process::Proc;

/// Host side address of the TAP inside the namespace.
pub const HOST_IP: &str = "10.77.0.1";
/// An address testpmd's icmpecho answers for (it answers ARP and ping for any address).
pub const GUEST_IP: &str = "10.77.0.2";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Panics with a clear message when something the tests need is missing.
pub fn require_environment() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces and TAP devices)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (modprobe tun)".to_owned());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ping", "iputils-ping"),
        ("dpdk-testpmd", "dpdk-dev"),
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the vhost-net integration tests need: {}",
        missing.join(", ")
    );
}

/// Panics with a clear message when `tool` (from Debian package `package`) is not on PATH.
pub fn require_tool(tool: &str, package: &str) {
    assert!(
        on_path(tool),
        "this test needs {tool} (Debian package {package})"
    );
}

/// The daemon in a namespace, with its socket in a temporary directory.
pub struct Daemon {
    /// The process.
    pub proc: Proc,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The TAP name.
    pub tap: String,
}

impl Daemon {
    /// Starts `vhost-net` inside `ns` with a fresh TAP and `HOST_IP/24`, plus `args`, and waits
    /// for its socket.
    pub fn start(ns: &NetNs, dir: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("net.sock");
        let tap = unique("vn");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(env!("CARGO_BIN_EXE_vhost-net"))
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", &tap, "--host-ip", &format!("{HOST_IP}/24")])
            .args(args)
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("vhost-net", cmd, dir.join("vhost-net.log"));
        proc.wait_for_path(&socket, Duration::from_secs(20));
        Daemon { proc, socket, tap }
    }

    /// SIGTERM, expecting exit 0; returns the log.
    pub fn stop(&mut self) -> String {
        let status = self.proc.stop_with(libc::SIGTERM);
        let log = self.proc.log();
        assert!(status.success(), "vhost-net exited with {status}:\n{log}");
        log
    }
}

/// testpmd options for the `virtio_user` frontend.
#[derive(Debug, Clone, Copy)]
pub struct Frontend {
    /// Queue pairs.
    pub queues: u16,
    /// Ask for mergeable rx buffers.
    pub mrg_rxbuf: bool,
    /// Ask for packed rings.
    pub packed_vq: bool,
    /// Listen on the socket (the daemon connects with `--client`).
    pub server: bool,
}

impl Default for Frontend {
    fn default() -> Self {
        Frontend {
            queues: 1,
            mrg_rxbuf: true,
            packed_vq: false,
            server: false,
        }
    }
}

/// Starts dpdk-testpmd in icmpecho mode on a `virtio_user` port connected to `socket`.
pub fn start_testpmd(dir: &Path, socket: &Path, f: Frontend) -> Proc {
    let vdev = format!(
        "net_virtio_user0,path={},queues={},mrg_rxbuf={},packed_vq={},server={},queue_size=256",
        socket.display(),
        f.queues,
        u8::from(f.mrg_rxbuf),
        u8::from(f.packed_vq),
        u8::from(f.server)
    );
    let queues = [format!("--rxq={}", f.queues), format!("--txq={}", f.queues)];
    spawn_testpmd(
        dir,
        None,
        &["--no-telemetry"],
        &[vdev],
        &["--forward-mode=icmpecho", &queues[0], &queues[1]],
    )
    .0
}

/// Starts a non-interactive dpdk-testpmd without hugepages or PCI devices (inside `ns` if
/// given) with EAL options `eal`, ports `vdevs` and testpmd options `app`; it runs until
/// signalled. Returns the process and its DPDK file prefix (`/var/run/dpdk/PREFIX`, removed
/// when the process is dropped).
pub fn spawn_testpmd(
    dir: &Path,
    ns: Option<&NetNs>,
    eal: &[&str],
    vdevs: &[String],
    app: &[&str],
) -> (Proc, String) {
    let prefix = unique("cowbird-net-");
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &ns.name, "dpdk-testpmd"]);
            cmd
        }
        None => Command::new("dpdk-testpmd"),
    };
    cmd.args(["--no-huge", "-m", "256", "--no-pci"])
        .arg(format!("--file-prefix={prefix}"))
        .args(eal);
    for vdev in vdevs {
        cmd.args(["--vdev", vdev]);
    }
    cmd.arg("--")
        // Non-interactive testpmd with a stats period runs until signalled.
        .args(["--total-num-mbufs=16384", "--stats-period=3600"])
        .args(app);
    let log = dir.join(format!("{prefix}.log"));
    let mut proc = Proc::spawn("dpdk-testpmd", cmd, log);
    proc.remove_on_drop(PathBuf::from(format!("/var/run/dpdk/{prefix}")));
    (proc, prefix)
}

/// Ping sizes from the smallest default to the largest unfragmented one at MTU 1500.
pub const PING_SIZES: [&str; 6] = ["56", "64", "100", "512", "1000", "1472"];

/// Pings of every size in [`PING_SIZES`] and a bounded flood, all with 0 loss.
pub fn ping_all_sizes_and_flood(ns: &NetNs) {
    ns.wait_reachable(GUEST_IP, Duration::from_secs(20));
    for size in PING_SIZES {
        let (tx, rx) = ns.ping_burst(GUEST_IP, 20, &["-s", size]);
        assert_eq!((tx, rx), (20, 20), "ping -s {size}: loss");
    }
    let (tx, rx) = ns.ping(GUEST_IP, &["-f", "-c", "3000", "-w", "60", "-s", "1000"]);
    assert_eq!((tx, rx), (3000, 3000), "flood ping: loss");
}

/// The per-pair counters the daemon logs at exit: (pair, tx packets, rx packets).
pub fn pair_counters(log: &str) -> Vec<(usize, u64, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("pair ")? + 5..];
            let (pair, rest) = rest.split_once(": tx ")?;
            let tx = rest.split_whitespace().next()?.parse().ok()?;
            let rx_part = &rest[rest.find(", rx ")? + 5..];
            let rx = rx_part.split_whitespace().next()?.parse().ok()?;
            Some((pair.parse().ok()?, tx, rx))
        })
        .collect()
}
