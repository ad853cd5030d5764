//! Shared helpers for the integration tests: a network namespace, the real daemon binary with
//! its TAP inside that namespace, DPDK's testpmd as the virtio-net frontend, and ping.
//!
//! These tests need root, /dev/net/tun, `ip`, `ping` and `dpdk-testpmd` (Debian packages
//! iproute2, iputils-ping, dpdk-dev). They fail with a message naming what is missing.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

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

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn new() -> Netns {
        let name = unique("cowbird-net-");
        let out = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates belong to the
    /// namespace) and returns its result.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns with a namespace descriptor we own; it moves only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// Whether interface `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", name]).status.success()
    }

    /// Pings `ip` from the namespace: returns (transmitted, received).
    pub fn ping(&self, ip: &str, extra: &[&str]) -> (u64, u64) {
        let mut args = vec!["ping", "-q", "-n"];
        args.extend_from_slice(extra);
        args.push(ip);
        let out = self.exec(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| {
                panic!(
                    "no ping summary:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let num = |word: &str| -> u64 {
            let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let i = words
                .iter()
                .position(|w| *w == word)
                .unwrap_or_else(|| panic!("no '{word}' in '{line}'"));
            words[i - 1].parse().unwrap()
        };
        (num("packets"), num("received"))
    }

    /// Sends pings 10 ms apart to `ip` (plus `extra` options) until `count` have been answered
    /// or 20 s have passed; returns (`count`, how many of the pings numbered 1 to `count` were
    /// answered).
    ///
    /// Late replies must not count as lost: once a reply has come, iputils ping ignores `-W`
    /// and exits two round trips after its last request, so on a loaded machine replies that
    /// were only late (the kernel still receives them) would be. With a deadline (`-w`) ping
    /// waits for the replies instead, sending more pings meanwhile; a flow's replies come back
    /// in order, so without loss the first `count` replies are exactly pings 1 to `count`.
    pub fn ping_burst(&self, ip: &str, count: u16, extra: &[&str]) -> (u64, u64) {
        let count_arg = count.to_string();
        let mut args = vec!["ping", "-n", "-c", &count_arg, "-i", "0.01", "-w", "20"];
        args.extend_from_slice(extra);
        args.push(ip);
        let out = self.exec(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut answered = vec![false; usize::from(count)];
        for line in text.lines().filter(|l| l.contains(" bytes from ")) {
            let seq = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(slot) = seq.and_then(|n| answered.get_mut(n.wrapping_sub(1))) {
                *slot = true;
            }
        }
        let got = answered.iter().filter(|&&a| a).count() as u64;
        if got < u64::from(count) {
            eprintln!(
                "ping {args:?}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (u64::from(count), got)
    }

    /// Pings until one reply comes (ARP resolved, frontend up), at most `timeout`.
    pub fn wait_reachable(&self, ip: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping(ip, &["-c", "1", "-W", "1"]).1 == 1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{ip} unreachable after {timeout:?}"
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process with its output in a log file, killed on drop.
pub struct Proc {
    child: Option<Child>,
    log_path: PathBuf,
    what: &'static str,
    /// A directory the process leaves behind (DPDK's runtime directory), removed on drop.
    leftover: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log_path`.
    pub fn spawn(what: &'static str, mut cmd: Command, log_path: PathBuf) -> Proc {
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc {
            child: Some(child),
            log_path,
            what,
            leftover: None,
        }
    }

    /// The output so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process id (`ip netns exec` runs its command in place: this is the command's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("already stopped").id()
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (at most `timeout`) until the log contains `text`.
    pub fn wait_for_log(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited with {status} before logging '{text}':\n{}",
                    self.what,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log '{text}' within {timeout:?}:\n{}",
                self.what,
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Stops a frontend (testpmd) that must still be running, with SIGINT, expecting exit 0:
    /// a frontend crash during the traffic must not go unnoticed.
    pub fn stop_frontend(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} died ({status}):\n{}", self.what, self.log());
        }
        let status = self.stop_with(libc::SIGINT);
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.what,
            self.log()
        );
    }

    /// Sends `signal` and waits (at most 20 s) for the exit status.
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit after signal {signal}:\n{}",
                    self.what,
                    self.log()
                );
            }
            sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.leftover {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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
    pub fn start(ns: &Netns, dir: &Path, args: &[&str]) -> Daemon {
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = proc.try_wait() {
                panic!("vhost-net exited with {status}:\n{}", proc.log());
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", proc.log());
            sleep(Duration::from_millis(10));
        }
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
    ns: Option<&Netns>,
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
    proc.leftover = Some(PathBuf::from(format!("/var/run/dpdk/{prefix}")));
    (proc, prefix)
}

/// Ping sizes from the smallest default to the largest unfragmented one at MTU 1500.
pub const PING_SIZES: [&str; 6] = ["56", "64", "100", "512", "1000", "1472"];

/// Pings of every size in [`PING_SIZES`] and a bounded flood, all with 0 loss.
pub fn ping_all_sizes_and_flood(ns: &Netns) {
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
