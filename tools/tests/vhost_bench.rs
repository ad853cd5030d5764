//! `vhost-bench` against the real `vhost-blk` daemon: reports, verification (also of an image
//! corrupted behind the daemon's back) and argument errors.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The `vhost-blk` binary of this workspace, built by cargo for this test's profile and target
/// directory (cargo only builds a package's own binaries for its tests).
fn vhost_blk_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("tests live in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile directory above {}", exe.display()),
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vhost-blk", "--bin", "vhost-blk"])
            .args(["--profile", profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build -p vhost-blk failed");
        profile_dir.join("vhost-blk")
    })
}

/// A `vhost-blk` process serving a raw image, killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, queues: u16, extra: &[&str]) -> Daemon {
        let socket = dir.join("blk.sock");
        let child = Command::new(vhost_blk_binary())
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(["--format", "raw", "--num-queues", &queues.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start vhost-blk");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vhost-blk made no socket in 20 s"
            );
            sleep(Duration::from_millis(10));
        }
        Daemon { child, socket }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A zero-filled raw image of `size` bytes.
fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn bench(socket: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-bench"));
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    cmd.args(args).output().expect("run vhost-bench")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs vhost-bench expecting success; returns its stdout.
fn bench_ok(socket: &Path, args: &[&str]) -> String {
    let out = bench(Some(socket), args);
    assert!(
        out.status.success(),
        "vhost-bench {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn json_report_has_sane_numbers_and_the_writes_reach_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), 32 * MIB);
    let daemon = Daemon::start(dir.path(), &image, 2, &[]);
    let pid = daemon.pid();
    let out = bench_ok(
        &daemon.socket,
        &[
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "4k",
            "--iodepth",
            "4",
            "--queues",
            "2",
            "--runtime",
            "1",
            "--ramp",
            "0.2",
            "--server-pid",
            &pid,
            "--output-format",
            "json",
        ],
    );
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {out}"));
    assert_eq!(r["rw"], "randrw");
    assert_eq!(r["rwmixread"], 70);
    assert_eq!((f("bs"), f("iodepth"), f("queues")), (4096.0, 4.0, 2.0));
    assert_eq!(f("size"), (32 * MIB) as f64);
    assert_eq!((f("runtime_s"), f("ramp_s")), (1.0, 0.2));
    let (reads, writes) = (f("reads"), f("writes"));
    let done = reads + writes;
    assert!(done >= 100.0, "only {done} requests in a second: {out}");
    let read_share = reads / done;
    assert!(
        (0.6..0.8).contains(&read_share),
        "{read_share} reads: {out}"
    );
    assert!(close(f("iops"), done, 1e-9), "{out}");
    assert!(close(f("mib_s"), done * 4096.0 / MIB as f64, 1e-9), "{out}");
    let (p50, p99, mean) = (
        r["lat_us"]["p50"].as_f64().unwrap(),
        r["lat_us"]["p99"].as_f64().unwrap(),
        r["lat_us"]["mean"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 < 1e6 && mean > 0.0, "{out}");
    assert_eq!(r["server_pid"].as_u64(), Some(u64::from(daemon.child.id())));
    // The server worked in the window, but no process gets more than every core.
    let cpu = f("server_cpu_s");
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(cpu > 0.0 && cpu <= cores * 1.1, "{cpu} CPU-s: {out}");
    let client_cpu = f("client_cpu_s");
    assert!(client_cpu > 0.0 && client_cpu <= cores * 1.1, "{out}");
    assert!(close(f("iops_per_server_cpu_s"), done / cpu, 1e-9), "{out}");

    // The writes went through the daemon into the file.
    let mut data = vec![0u8; (32 * MIB) as usize];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut data, 0)
        .unwrap();
    let written = data
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    // Random offsets repeat, but at least half the measured writes (of at most every block)
    // must have landed on distinct blocks.
    let blocks = (32 * MIB / 4096) as f64;
    assert!(
        written as f64 >= 0.5 * writes.min(blocks),
        "{written} blocks written for {writes} writes"
    );

    // Sequential reads without a server PID, in text form.
    let out = bench_ok(
        &daemon.socket,
        &[
            "--rw",
            "read",
            "--bs",
            "64k",
            "--iodepth",
            "2",
            "--runtime",
            "0.5",
        ],
    );
    assert!(
        out.starts_with("read: bs=65536 iodepth=2 queues=1"),
        "{out}"
    );
    assert!(
        out.contains(" writes=0 flushes=0)") && !out.contains("server pid"),
        "{out}"
    );

    // --fsync 2: a flush after every second write, counted apart.
    let out = bench_ok(
        &daemon.socket,
        &[
            "--rw",
            "randwrite",
            "--iodepth",
            "4",
            "--fsync",
            "2",
            "--runtime",
            "0.5",
            "--output-format",
            "json",
        ],
    );
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {out}"));
    let (writes, flushes) = (f("writes"), f("flushes"));
    assert!(writes >= 50.0, "{out}");
    assert!(
        (flushes * 2.0 - writes).abs() <= 8.0,
        "one flush per two writes: {out}"
    );
    assert!(close(f("iops"), writes / f("runtime_s"), 1e-9), "{out}");
}

#[test]
fn verify_passes_on_a_healthy_daemon_and_fails_on_corruption_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), 16 * MIB);
    let daemon = Daemon::start(dir.path(), &image, 2, &[]);
    let size = ["--size", "8m"];
    let out = bench_ok(
        &daemon.socket,
        &[
            &size[..],
            &[
                "--rw",
                "randwrite",
                "--verify",
                "--queues",
                "2",
                "--iodepth",
                "8",
            ],
        ]
        .concat(),
    );
    assert!(out.contains("wrote 2048 blocks"), "{out}");
    assert!(out.ends_with("checked 2048 blocks, 0 bad\n"), "{out}");
    let out = bench_ok(
        &daemon.socket,
        &[&size[..], &["--rw", "read", "--verify"]].concat(),
    );
    assert!(out.ends_with("checked 2048 blocks, 0 bad\n"), "{out}");

    // The stamps are in the file: sector 0 names offset 0.
    let file = File::options().read(true).write(true).open(&image).unwrap();
    let mut sector = [0u8; 512];
    file.read_exact_at(&mut sector, 0).unwrap();
    assert_eq!(&sector[..16], b"VHBENCH1\0\0\0\0\0\0\0\0");

    // Behind the daemon's back: one sector overwritten, one block copied to another offset.
    file.write_all_at(&[0xff; 512], 5 * MIB + 1024).unwrap();
    let mut block = [0u8; 4096];
    file.read_exact_at(&mut block, 4096).unwrap();
    file.write_all_at(&block, 3 * 4096).unwrap();
    file.sync_all().unwrap();

    let out = bench(
        Some(&daemon.socket),
        &[
            &size[..],
            &[
                "--rw",
                "randread",
                "--verify",
                "--queues",
                "2",
                "--output-format",
                "json",
            ],
        ]
        .concat(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("verify failed: 2 of 2048 blocks differ; first: sector at offset 12288: ")
            && stderr.contains("found the stamp of offset 4096 generation"),
        "{stderr}"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["bad_blocks"].as_u64(), r["blocks_checked"].as_u64()),
        (Some(2), Some(2048))
    );
    // Whole-MiB blocks: the first one holds the copied block.
    let out = bench(
        Some(&daemon.socket),
        &["--rw", "read", "--verify", "--size", "1m", "--bs", "1m"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 of 1 blocks differ; first: sector at offset 12288"),
        "{stderr}"
    );
    // A fresh write repairs the image.
    let out = bench(
        Some(&daemon.socket),
        &["--rw", "write", "--verify", "--size", "8m"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = bench(
        Some(&daemon.socket),
        &["--rw", "read", "--verify", "--size", "8m"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(daemon);
    let mut sector = [0u8; 512];
    file.read_exact_at(&mut sector, 5 * MIB + 1024).unwrap();
    assert_eq!(&sector[..8], b"VHBENCH1");
}

#[test]
fn run_time_errors_exit_1_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let out = bench(Some(&missing), &["--runtime", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "vhost-bench: connecting to {}: ",
            missing.display()
        )),
        "{stderr}"
    );

    let image = raw_image(dir.path(), 4 * MIB);
    let daemon = Daemon::start(dir.path(), &image, 1, &[]);
    for (args, message) in [
        (
            &["--size", "8m"][..],
            "--size 8388608 is larger than the device (4194304 bytes)",
        ),
        (
            &["--size", "4k", "--bs", "8k"],
            "each of the 1 queues needs at least one block",
        ),
        (
            &["--server-pid", "999999999"],
            "--server-pid: reading /proc/999999999/stat",
        ),
    ] {
        let out = bench(
            Some(&daemon.socket),
            &[args, &["--runtime", "0.1"]].concat(),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// Workloads without writes run on a read-only device; writes are refused at the start.
#[test]
fn reads_run_on_a_read_only_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), 4 * MIB);
    let daemon = Daemon::start(dir.path(), &image, 1, &["--read-only"]);
    for rw in ["randread", "read"] {
        let out = bench_ok(&daemon.socket, &["--rw", rw, "--runtime", "0.2"]);
        assert!(out.contains("IOPS"), "{rw}: {out}");
    }
    for args in [&["--rw", "randwrite"][..], &["--rw", "write", "--verify"]] {
        let out = bench(
            Some(&daemon.socket),
            &[args, &["--runtime", "0.2"]].concat(),
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("read-only"), "{args:?}: {stderr}");
    }
}

#[test]
fn bad_arguments_exit_2_with_clap_errors() {
    for (args, mentions) in [
        (&[][..], "--socket <PATH>"),
        (&["--socket", "s", "--rw", "randomread"], "randomread"),
        (
            &["--socket", "s", "--bs", "1000"],
            "1000 is not a multiple of 512",
        ),
        (&["--socket", "s", "--bs", "4q"], "unknown unit 'q'"),
        (&["--socket", "s", "--iodepth", "0"], "--iodepth"),
        (&["--socket", "s", "--queues", "65"], "--queues"),
        (&["--socket", "s", "--rwmixread", "101"], "--rwmixread"),
        (
            &["--socket", "s", "--runtime", "0"],
            "the runtime must be positive",
        ),
        (&["--socket", "s", "--ramp=-1"], "--ramp"),
        (&["--socket", "s", "--output-format", "xml"], "xml"),
        (&["--socket", "s", "--verbose"], "--verbose"),
    ] {
        let out = bench(None, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(mentions),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}
