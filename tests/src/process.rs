//! A process a test starts (a backend, a frontend, a helper daemon): its stdout and stderr go
//! to a log file, it is stopped with a signal under a deadline, and killed on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A child process with its output in a log file, killed on drop.
pub struct Proc {
    child: Option<Child>,
    log_path: PathBuf,
    what: String,
    /// A directory the process leaves behind (DPDK's runtime directory), removed on drop.
    leftover: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` (`what` names it in messages) with stdin closed and stdout and stderr
    /// going to `log_path`.
    pub fn spawn(what: &str, mut cmd: Command, log_path: PathBuf) -> Proc {
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
            what: what.to_owned(),
            leftover: None,
        }
    }

    /// Removes `dir`, which the process leaves behind, when this is dropped.
    pub fn remove_on_drop(&mut self, dir: PathBuf) {
        self.leftover = Some(dir);
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

    /// Waits (at most `timeout`) until `ready` holds; panics, showing the log, when the process
    /// exits first or time runs out (`what` says what it waited for).
    fn wait_until(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited with {status} before {what}:\n{}",
                    self.what,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not get to {what} within {timeout:?}:\n{}",
                self.what,
                self.log()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Waits (at most `timeout`) until the log contains `text`.
    pub fn wait_for_log(&mut self, text: &str, timeout: Duration) {
        self.wait_until(&format!("logging '{text}'"), timeout, |p| {
            p.log().contains(text)
        });
    }

    /// Waits (at most `timeout`) until `path` exists (the socket it listens on, say).
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) {
        let what = format!("creating {}", path.display());
        self.wait_until(&what, timeout, |_| path.exists());
    }

    /// Stops a process that must still be running (a frontend: its crash during the traffic
    /// must not go unnoticed) with `signal`, expecting exit 0.
    pub fn stop_running(&mut self, signal: libc::c_int) {
        if let Some(status) = self.try_wait() {
            panic!("{} died ({status}):\n{}", self.what, self.log());
        }
        let status = self.stop_with(signal);
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

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.leftover {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
