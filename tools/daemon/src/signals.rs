//! Stopping on SIGTERM, SIGINT or SIGHUP (a closed terminal, as for QEMU): every signal is
//! blocked in every thread and one thread waits for them.

use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};

/// Signal handling could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("signal handling: {0}")]
pub struct SignalError(String);

/// The signals that stop a daemon.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it creates later.
///
/// Call it first thing in `main`, before any thread exists, so that only the thread started
/// by [`on_stop`] ever receives them.
pub fn block() -> Result<(), SignalError> {
    stop_signals()
        .thread_block()
        .map_err(|e| SignalError(format!("cannot block SIGTERM/SIGINT/SIGHUP: {e}")))
}

/// Starts the thread that waits for SIGTERM/SIGINT/SIGHUP, then removes the socket file
/// `socket` (the one the daemon listens on; `None` when it belongs to the frontend), runs
/// `stop` and exits the process with the status `stop` returns.
pub fn on_stop(
    socket: Option<PathBuf>,
    stop: impl FnOnce() -> i32 + Send + 'static,
) -> Result<(), SignalError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = loop {
                match stop_signals().wait() {
                    Ok(s) => break s,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("waiting for signals failed: {e}");
                        return;
                    }
                }
            };
            tracing::info!("received {signal}, shutting down");
            if let Some(socket) = &socket {
                let _ = std::fs::remove_file(socket);
            }
            std::process::exit(stop())
        })
        .map(|_| ())
        .map_err(|e| SignalError(format!("cannot start the signal thread: {e}")))
}
