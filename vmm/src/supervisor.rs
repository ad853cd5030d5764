//! Backend processes the VMM starts itself (`--disk path=...`, `--net tap=...`): each runs
//! in its own process group on a private socket, its stderr is forwarded with a prefix, it is
//! restarted when it dies (the device's watcher then re-attaches it, see
//! [`crate::virtio::reconnect`]), and it is stopped — SIGTERM, then SIGKILL after a grace
//! period — when the VMM exits, or killed by the kernel if the VMM dies first.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a backend gets to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stopped backends get to finish (flush images) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Restarts in a row of a backend that dies within [`HEALTHY_AFTER`] before giving up.
const MAX_QUICK_RESTARTS: u32 = 5;
/// A backend that ran this long is considered healthy again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// One backend process and what it takes to start it again.
#[derive(Debug)]
struct Managed {
    name: String,
    command: Vec<String>,
    pid: AtomicI32,
    gave_up: Arc<AtomicBool>,
}

/// What the rest of the VMM may learn about, and do to, a backend the supervisor started.
#[derive(Debug, Clone)]
pub struct BackendHealth(Arc<Managed>);

impl BackendHealth {
    /// Whether the supervisor stopped restarting the backend (it kept dying at once, or
    /// could not be started again): it will not come back.
    pub fn gave_up(&self) -> bool {
        self.0.gave_up.load(Ordering::SeqCst)
    }

    /// Kills the backend's process group, for a backend that stopped answering: its
    /// supervisor then starts it again, as after a crash.
    pub fn kill_hung(&self) {
        tracing::warn!(
            "{} stopped answering; killing it so that it is restarted",
            self.0.name
        );
        signal_group(self.0.pid.load(Ordering::SeqCst), libc::SIGKILL);
    }
}

/// The set of backend processes this VMM started.
pub struct Supervisor {
    dir: PathBuf,
    children: Mutex<Vec<Arc<Managed>>>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// A supervisor whose backends put their sockets in a new private directory.
    pub fn new() -> anyhow::Result<Self> {
        let base =
            std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        // A new directory only this user can enter, with a name nobody can create first
        // (mkdtemp): whoever owned it could swap a backend's socket and be handed the
        // guest's memory.
        let template = base.join(format!("cowbird-vmm-{}-XXXXXX", std::process::id()));
        let dir = nix::unistd::mkdtemp(&template)
            .with_context(|| format!("cannot create a directory like {}", template.display()))?;
        Ok(Self {
            dir,
            children: Mutex::new(Vec::new()),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The socket path for a backend called `name`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Starts `program` (found next to this executable, else on `$PATH`) with `args`, named
    /// `name` in logs, and waits until it has created `socket`.
    pub fn start(
        &self,
        name: &str,
        program: &str,
        args: Vec<String>,
        socket: &Path,
    ) -> anyhow::Result<BackendHealth> {
        let program = find_program(program);
        let mut command = vec![program.display().to_string()];
        command.extend(args);
        let managed = Arc::new(Managed {
            name: name.to_owned(),
            command,
            pid: AtomicI32::new(0),
            gave_up: Arc::new(AtomicBool::new(false)),
        });
        let _ = std::fs::remove_file(socket);
        let mut child = spawn(&managed)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} ({}) exited with {status} before serving {}",
                    program.display(),
                    socket.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "{name} did not create {} within {START_TIMEOUT:?}",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.lock().push(managed.clone());
        let health = BackendHealth(managed.clone());
        let stopping = self.stopping.clone();
        std::thread::Builder::new()
            .name(format!("supervise-{name}"))
            .spawn(move || {
                supervise(&managed, child, &stopping);
                managed
                    .gave_up
                    .store(!stopping.load(Ordering::SeqCst), Ordering::SeqCst);
            })?;
        Ok(health)
    }

    /// Stops every backend: SIGTERM to its process group, SIGKILL after a grace period.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let children = self.lock().clone();
        for c in &children {
            signal_group(c.pid.load(Ordering::SeqCst), libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while children.iter().any(|c| alive(c.pid.load(Ordering::SeqCst)))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &children {
            let pid = c.pid.load(Ordering::SeqCst);
            if alive(pid) {
                tracing::warn!("{} did not stop within {STOP_GRACE:?}; killing it", c.name);
                signal_group(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Managed>>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if !self.stopping.load(Ordering::SeqCst) {
            self.shutdown();
        }
    }
}

/// Waits for the child; restarts it unless the VMM is stopping or it keeps dying at once.
/// Returns when it will not restart it any more.
fn supervise(managed: &Managed, mut child: Child, stopping: &AtomicBool) {
    let mut quick_restarts = 0;
    loop {
        let started = Instant::now();
        let status = child.wait();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        quick_restarts = if started.elapsed() < HEALTHY_AFTER {
            quick_restarts + 1
        } else {
            1
        };
        if quick_restarts > MAX_QUICK_RESTARTS {
            tracing::error!(
                "{} died ({status}) {MAX_QUICK_RESTARTS} times in a row; not restarting it",
                managed.name
            );
            return;
        }
        tracing::warn!("{} died ({status}); restarting it", managed.name);
        std::thread::sleep(Duration::from_millis(100) * quick_restarts);
        match spawn(managed) {
            Ok(c) => child = c,
            Err(e) => {
                tracing::error!("cannot restart {}: {e:#}", managed.name);
                return;
            }
        }
    }
}

/// Starts the backend in its own process group, with its stderr forwarded line by line.
fn spawn(managed: &Managed) -> anyhow::Result<Child> {
    let mut command = Command::new(&managed.command[0]);
    command
        .args(&managed.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it makes the kernel SIGTERM the backend if the
    // VMM thread that started it dies (the supervising threads live as long as the VMM).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {} ({})", managed.name, managed.command[0]))?;
    managed.pid.store(child.id() as i32, Ordering::SeqCst);
    if let Some(stderr) = child.stderr.take() {
        let name = managed.name.clone();
        std::thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                }
            })?;
    }
    Ok(child)
}

/// `program` next to the running executable if it is there, else the bare name for `$PATH`.
fn find_program(program: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(program)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(program))
}

fn signal_group(pid: i32, signal: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) on a process group we created.
        unsafe { libc::kill(-pid, signal) };
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A supervisor whose sockets live in a directory of their own under the temp dir.
    fn supervisor() -> Supervisor {
        let dir = std::env::temp_dir().join(format!("cowbird-supervisor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Supervisor {
            dir,
            children: Mutex::new(Vec::new()),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn the_socket_directory_is_a_new_one_only_its_owner_enters() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let base = std::env::temp_dir().join(format!("cowbird-xdg-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // Someone else got there first with the name the directory once had.
        let planted = base.join(format!("cowbird-vmm-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o777)
            .create(&planted)
            .unwrap();
        // nextest runs each test in a process of its own.
        std::env::set_var("XDG_RUNTIME_DIR", &base);
        let supervisor = Supervisor::new().unwrap();
        let dir = supervisor.socket_path("x").parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        drop(supervisor);
        std::fs::remove_dir_all(&base).unwrap();
        assert_ne!(dir, planted);
        assert!(dir.starts_with(&base), "{}", dir.display());
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    }

    /// A backend that creates its socket and dies at once, every time.
    pub(crate) fn start_dying_backend(supervisor: &Supervisor) -> BackendHealth {
        let socket = supervisor.socket_path("dying");
        let script = format!("touch {}; exit 1", socket.display());
        supervisor
            .start("dying", "sh", vec!["-c".into(), script], &socket)
            .unwrap()
    }

    /// Waits up to 20 s for `condition`.
    pub(crate) fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_backend_that_keeps_dying_is_given_up_and_its_health_says_so() {
        let s = supervisor();
        let health = start_dying_backend(&s);
        assert!(!health.gave_up());
        eventually("the supervisor gives up", || health.gave_up());
    }

    #[test]
    fn stopping_the_vmm_is_not_giving_up() {
        let s = supervisor();
        let socket = s.socket_path("sleeper");
        let script = format!("touch {}; exec sleep 60", socket.display());
        let health = s
            .start("sleeper", "sh", vec!["-c".into(), script], &socket)
            .unwrap();
        s.shutdown();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!health.gave_up());
    }
}
