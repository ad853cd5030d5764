//! Running the whole stack in tests: the test guest (kernel + initramfs from
//! `tests/guest/build.sh`), our binaries (`vmm`, `vhost-blk`, `vhost-net`) and peer backends
//! (`qemu-storage-daemon`), each as a real process that is killed when the test ends.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::netns::NetNs;
use crate::process::Proc;

/// The test guest's artefacts.
#[derive(Debug, Clone)]
pub struct Guest {
    /// ELF kernel with a PVH entry.
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// The initramfs whose /init runs the `cowbird.test=` steps.
    pub initrd: PathBuf,
    /// The busybox binary inside the initramfs (the `blk` step writes its first MiB).
    pub busybox: PathBuf,
}

impl Guest {
    /// What the guest's `blk` step writes at [1 MiB, 2 MiB) of its disk: the first MiB of
    /// its busybox.
    pub fn blk_step_data(&self) -> Vec<u8> {
        let busybox = fs::read(&self.busybox).expect("guest busybox");
        busybox[..1 << 20].to_vec()
    }
}

/// Builds the test guest once per test process (cached across runs by the script) and
/// returns its artefacts.
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("build.sh prints the directory"),
        );
        Guest {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initrd: dir.join("initrd.cpio"),
            busybox: dir.join("busybox"),
        }
    })
}

/// Path of one of the workspace's binaries, built next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Checks that KVM is usable, with a clear message otherwise.
pub fn require_kvm() {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot VMs and need read/write access to /dev/kvm: {e}");
    }
}

/// How a `vmm` run ended.
#[derive(Debug)]
pub struct VmmOutcome {
    /// Exit code, `None` if killed (timeout or signal).
    pub code: Option<i32>,
    /// Everything the guest wrote to its serial console.
    pub serial: String,
    /// The VMM's own stderr.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl VmmOutcome {
    /// Panics, showing the console and stderr, unless the guest printed `marker`.
    pub fn expect_marker(&self, marker: &str) {
        assert!(
            self.serial.contains(marker),
            "guest did not print {marker}; exit {:?} after {:?}\n--- serial ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed,
            tail(&self.serial, 60),
            self.stderr
        );
    }

    /// Panics unless the VMM exited 0 after the guest printed `COWBIRD-DONE`.
    pub fn expect_clean_poweroff(&self) {
        self.expect_marker("COWBIRD-DONE");
        assert_eq!(
            self.code,
            Some(0),
            "vmm exit status; stderr:\n{}",
            self.stderr
        );
    }

    /// The guest's uptime (seconds) when userspace started, from its marker line.
    pub fn userspace_uptime(&self) -> Option<f64> {
        let line = self
            .serial
            .lines()
            .find(|l| l.starts_with("COWBIRD-USERSPACE"))?;
        line.split("uptime=").nth(1)?.trim().parse().ok()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One boot of the test guest under our VMM.
pub struct Boot<'a> {
    /// The `cowbird.test=` steps.
    pub steps: &'a str,
    /// The kernel image (the guest's vmlinux or bzImage).
    pub kernel: &'a Path,
    /// Extra `vmm` arguments (`--cpus`, `--disk`, ...).
    pub vmm_args: Vec<String>,
    /// Extra kernel parameters.
    pub kernel_args: &'a str,
    /// Network namespace to run the VMM in (and so the backends it starts).
    pub netns: Option<&'a NetNs>,
}

impl<'a> Boot<'a> {
    /// A boot of the PVH vmlinux running `steps`, with nothing else.
    pub fn steps(steps: &'a str) -> Self {
        Self {
            steps,
            kernel: &guest().vmlinux,
            vmm_args: Vec::new(),
            kernel_args: "",
            netns: None,
        }
    }

    /// Adds `vmm` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.vmm_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Runs it in `dir` for at most `timeout`.
    pub fn run(&self, dir: &Path, timeout: Duration) -> VmmOutcome {
        run_vmm(dir, self, timeout)
    }

    /// Runs it on another thread; when the guest starts its `pause` step, runs `during_pause`
    /// here, then waits for the VM. Returns both results.
    pub fn run_with_pause<T>(
        &self,
        dir: &Path,
        timeout: Duration,
        during_pause: impl FnOnce() -> T,
    ) -> (VmmOutcome, T) {
        std::thread::scope(|scope| {
            let vm = scope.spawn(|| self.run(dir, timeout));
            wait_for_console(&dir.join("serial.log"), "COWBIRD-STEP pause", timeout);
            let result = during_pause();
            (vm.join().expect("VM thread"), result)
        })
    }
}

/// Boots the test guest under our VMM as `boot` says; waits up to `timeout`.
pub fn run_vmm(dir: &Path, boot: &Boot, timeout: Duration) -> VmmOutcome {
    let guest = guest();
    let serial = dir.join("serial.log");
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 cowbird.test={} {}",
        boot.steps, boot.kernel_args
    );
    let mut args = vec![
        "--kernel".to_string(),
        boot.kernel.display().to_string(),
        "--initramfs".into(),
        guest.initrd.display().to_string(),
        "--memory".into(),
        "256M".into(),
        "--serial".into(),
        format!("file={}", serial.display()),
        "--cmdline".into(),
        cmdline,
    ];
    args.extend_from_slice(&boot.vmm_args);
    let mut command = match boot.netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &netns.name]).arg(binary("vmm"));
            c
        }
        None => Command::new(binary("vmm")),
    };
    command.args(&args);
    // Sockets of backends the VMM starts go under the test's directory.
    let runtime_dir = dir.join("run");
    fs::create_dir_all(&runtime_dir).expect("runtime dir");
    command.env("XDG_RUNTIME_DIR", &runtime_dir);
    run_command(command, &serial, timeout)
}

/// Runs `vmm` with exactly `args`, reading the console from `serial`.
pub fn run_vmm_raw(args: &[String], serial: &Path, timeout: Duration) -> VmmOutcome {
    let mut command = Command::new(binary("vmm"));
    command.args(args);
    run_command(command, serial, timeout)
}

fn run_command(mut command: Command, serial: &Path, timeout: Duration) -> VmmOutcome {
    let started = Instant::now();
    let stderr_path = serial.with_extension("stderr");
    let stderr = fs::File::create(&stderr_path).expect("stderr file");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("cannot start vmm");
    let code = wait_timeout(&mut child, timeout);
    VmmOutcome {
        code,
        serial: fs::read_to_string(serial).unwrap_or_default(),
        stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// Waits for `child` up to `timeout`, then kills it; returns its exit code.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A backend process serving a vhost-user socket; killed on drop.
pub struct Backend {
    proc: Proc,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl Backend {
    /// Starts `program args...`, logging to `<socket>.log`, and waits until `socket` exists.
    pub fn start(program: &Path, args: &[String], socket: &Path) -> Backend {
        let mut command = Command::new(program);
        command.args(args);
        let what = program.display().to_string();
        let mut proc = Proc::spawn(&what, command, socket.with_extension("log"));
        proc.wait_for_path(socket, Duration::from_secs(20));
        Backend {
            proc,
            socket: socket.to_owned(),
        }
    }

    /// `vhost-blk --socket <dir>/<name>.sock --image IMAGE extra...`.
    pub fn vhost_blk(dir: &Path, name: &str, image: &Path, extra: &[&str]) -> Backend {
        let socket = dir.join(format!("{name}.sock"));
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--image".into(),
            image.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Backend::start(&binary("vhost-blk"), &args, &socket)
    }

    /// `qemu-storage-daemon` exporting IMAGE (of `format`) as a writable vhost-user-blk.
    pub fn qemu_storage_daemon(dir: &Path, name: &str, image: &Path, format: &str) -> Backend {
        let socket = dir.join(format!("{name}.sock"));
        let args = vec![
            "--blockdev".to_string(),
            format!("driver=file,filename={},node-name=file0,cache.direct=off", image.display()),
            "--blockdev".into(),
            format!("driver={format},file=file0,node-name=disk0"),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ),
        ];
        Backend::start(Path::new("qemu-storage-daemon"), &args, &socket)
    }

    /// `vhost-net` inside network namespace `netns`, on a new TAP `tap` with `host_ip`, with
    /// `extra` arguments.
    pub fn vhost_net(
        dir: &Path,
        netns: &NetNs,
        tap: &str,
        host_ip: &str,
        extra: &[&str],
    ) -> Backend {
        let socket = dir.join("net.sock");
        let args = vec![
            "netns".to_string(),
            "exec".into(),
            netns.name.clone(),
            binary("vhost-net").display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--tap".into(),
            tap.into(),
            "--host-ip".into(),
            host_ip.into(),
        ];
        let args = [args, extra.iter().map(|a| a.to_string()).collect()].concat();
        Backend::start(Path::new("ip"), &args, &socket)
    }

    /// The backend's stdout and stderr so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Sends SIGTERM and waits (at most 20 s); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        self.proc.stop_with(libc::SIGTERM).success()
    }

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// Waits until the guest console log `path` contains `text`; panics after `timeout`,
/// showing the end of the log.
pub fn wait_for_console(path: &Path, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read_to_string(path).unwrap_or_default();
    panic!(
        "the guest did not print {text} within {timeout:?}; console:\n{}",
        tail(&log, 40)
    );
}
