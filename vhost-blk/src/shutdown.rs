//! SIGTERM/SIGINT/SIGHUP handling: stop serving, finish requests in progress, flush, exit 0.

use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use crate::device::Device;
use crate::error::{Error, Result};

/// The signals that stop the daemon: SIGHUP too (a closed terminal), as for QEMU.
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
/// by [`spawn_handler`] ever receives them.
pub fn block_signals() -> Result<()> {
    stop_signals()
        .thread_block()
        .map_err(|e| Error::Signal(format!("cannot block SIGTERM/SIGINT/SIGHUP: {e}")))
}

/// Starts the thread that waits for SIGTERM/SIGINT/SIGHUP, then shuts `device` down, removes the
/// socket file (`socket`: the one the daemon listens on; `None` in client mode, where the
/// socket belongs to the frontend) and exits the process (0 when the image was flushed, 1
/// otherwise).
pub fn spawn_handler(device: Arc<Device>, socket: Option<PathBuf>) -> Result<()> {
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
            match device.shutdown() {
                Ok(()) => {
                    tracing::info!("image flushed, exiting");
                    std::process::exit(0)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    std::process::exit(1)
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Signal(format!("cannot start the signal thread: {e}")))
}
