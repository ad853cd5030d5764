//! A bound on how long the VMM waits for a vhost-user backend's answer.
//!
//! The vhost crate waits for a reply forever (it retries a read that timed out), so a backend
//! that stops answering — stopped, deadlocked, stuck in the kernel — would hold the vCPU
//! that made the request, and every vCPU that then touches the PCI bus, for good. A
//! watchdog thread per connection shuts the socket down when a request takes longer than
//! its limit: the request fails with a clear error, the device needs a reset, and the
//! backend's hangup watcher treats it as gone (reconnecting when it answers again).

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long one request may wait for the backend by default. Generous: a backend stopping a
/// queue (GET_VRING_BASE) first finishes the requests it has in flight at the disk.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// The request waiting for the backend, and until when it may.
    armed: Option<(&'static str, Instant)>,
    /// The request the watchdog gave up on, if any: the connection is shut down.
    fired: Option<&'static str>,
    /// The connection is gone: the thread ends.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shuts a vhost-user connection down when one request waits longer than the limit.
pub struct Watchdog {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl Watchdog {
    /// Starts watching the connection `stream` (a handle on the socket the requests use) to
    /// the backend at `socket`, with `timeout` per request.
    pub fn new(stream: UnixStream, socket: PathBuf, timeout: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || watch(&watched, &stream, &socket, timeout))?;
        Ok(Self { shared, timeout })
    }

    /// Runs `request` (named `what` in the log) with the watchdog armed.
    pub fn run<T>(&self, what: &'static str, request: impl FnOnce() -> T) -> T {
        self.shared.lock().armed = Some((what, Instant::now() + self.timeout));
        self.shared.changed.notify_all();
        let result = request();
        self.shared.lock().armed = None;
        result
    }

    /// Whether the watchdog shut the connection down because a request took too long.
    pub fn fired(&self) -> bool {
        self.shared.lock().fired.is_some()
    }

    /// The time each request is given.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// The watchdog thread: waits for armed requests and shuts `stream` down when one is late.
fn watch(shared: &Shared, stream: &UnixStream, socket: &std::path::Path, timeout: Duration) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        state = match state.armed {
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner()),
            Some((what, deadline)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::error!(
                        socket = %socket.display(),
                        "the backend did not answer {what} within {timeout:?}; closing the connection"
                    );
                    let _ = stream.shutdown(Shutdown::Both);
                    state.fired = Some(what);
                    state.armed = None;
                    continue;
                }
                shared
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_late_request_has_its_connection_shut_down() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let dog = Watchdog::new(
            ours.try_clone().unwrap(),
            "test.sock".into(),
            Duration::from_millis(100),
        )
        .unwrap();
        // A request answered in time leaves the connection alone.
        dog.run("FAST", || std::thread::sleep(Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!dog.fired());
        // One waiting for an answer that never comes is cut off (the read timeout only
        // keeps this test from hanging if it is not).
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let read = dog.run("READ", || (&ours).read(&mut [0u8; 8]));
        assert!(
            matches!(read, Ok(0)),
            "the read ends at the shutdown: {read:?}"
        );
        assert!(dog.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
