//! Keeping a device attached to its backend process: when the backend hangs up (it exited,
//! crashed, or was restarted by its supervisor), a watcher thread reconnects to the same
//! socket as soon as it accepts again and hands the device's running queues to the new
//! process. The guest sees its requests stall meanwhile, not fail.
//!
//! A backend the VMM started that stopped answering (its connection was cut off by the
//! watchdog) is killed, so that its supervisor starts it again. A backend that keeps
//! failing — it refuses the handshake, or hangs up again soon after each reconnect — is
//! retried less and less often (up to every `MAX_RETRY_INTERVAL`, 5 s). One its
//! supervisor gave up on leaves the device needing a reset.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DeviceType, VhostUserConnection, VhostUserError, VirtioPciDevice};
use crate::supervisor::BackendHealth;

/// How often to retry the socket while the backend is away, at first.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// The longest pause between two attempts.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// A connection that lasted this long was healthy: the next retry starts from
/// [`RETRY_INTERVAL`] again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// The pause before the next attempt to reach a backend: doubles with every failure, back
/// to the first interval after a healthy connection.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(RETRY_INTERVAL)
    }

    fn delay(&self) -> Duration {
        self.0
    }

    fn failed(&mut self) {
        self.0 = (self.0 * 2).min(MAX_RETRY_INTERVAL);
    }

    fn healthy(&mut self) {
        self.0 = RETRY_INTERVAL;
    }
}

/// Watches `device`'s backend on `socket` until `stopping` is set (the VMM is shutting down
/// and stops backends on purpose). `health` tells, for a backend the VMM started, whether its
/// supervisor gave up restarting it.
pub fn watch(
    device: Arc<Mutex<VirtioPciDevice>>,
    kind: DeviceType,
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    health: Option<BackendHealth>,
) -> std::io::Result<()> {
    let mut hangup = lock(&device).hangup_watch()?;
    std::thread::Builder::new()
        .name("backend-watch".into())
        .spawn(move || {
            let mut backoff = Backoff::new();
            let mut connected = Instant::now();
            loop {
                if let Err(e) = hangup.wait() {
                    tracing::error!(socket = %socket.display(), "cannot watch the backend: {e}");
                    return;
                }
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(socket = %socket.display(), "backend disconnected; waiting for it to come back");
                if let Some(health) = &health {
                    // Cut off for not answering: the process is still there, stuck, and its
                    // socket would take the next connection and never answer it either.
                    if lock(&device).backend_timed_out() {
                        health.kill_hung();
                    }
                }
                if connected.elapsed() < HEALTHY_AFTER {
                    backoff.failed();
                } else {
                    backoff.healthy();
                }
                let backend = loop {
                    std::thread::sleep(backoff.delay());
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    if health.as_ref().is_some_and(BackendHealth::gave_up) {
                        lock(&device).backend_lost();
                        return;
                    }
                    match VhostUserConnection::connect(&socket, kind.config_size()) {
                        Ok(backend) => break backend,
                        // Not accepting yet (restarting): no failure of the backend's.
                        Err(VhostUserError::Connect { .. }) => {}
                        Err(e) => {
                            tracing::error!("{e}");
                            backoff.failed();
                        }
                    }
                };
                let mut device = lock(&device);
                if let Err(e) = device.reconnect(backend) {
                    tracing::error!(socket = %socket.display(), "reconnected backend cannot resume the device: {e:#}");
                    backoff.failed();
                } else {
                    tracing::warn!(socket = %socket.display(), "backend reconnected");
                }
                connected = Instant::now();
                match device.hangup_watch() {
                    Ok(watch) => hangup = watch,
                    Err(e) => {
                        tracing::error!(socket = %socket.display(), "cannot watch the backend: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

fn lock(device: &Mutex<VirtioPciDevice>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_limit_and_restarts_after_a_healthy_connection() {
        let mut b = Backoff::new();
        assert_eq!(b.delay(), RETRY_INTERVAL);
        b.failed();
        assert_eq!(b.delay(), RETRY_INTERVAL * 2);
        for _ in 0..20 {
            b.failed();
        }
        assert_eq!(b.delay(), MAX_RETRY_INTERVAL);
        b.healthy();
        assert_eq!(b.delay(), RETRY_INTERVAL);
    }
}
