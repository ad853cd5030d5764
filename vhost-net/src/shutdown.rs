//! SIGTERM/SIGINT/SIGHUP handling: stop moving packets, remove the socket, exit 0. A TAP the daemon
//! created is not persistent, so the kernel deletes it when the process's descriptors close.

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

/// Starts the thread that waits for SIGTERM/SIGINT/SIGHUP, then stops `device`, removes the socket
/// file `socket` (when the daemon listens on it) and exits the process with status 0.
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
            if let Some(socket) = socket {
                let _ = std::fs::remove_file(socket);
            }
            device.shutdown();
            for pair in 0..device.queue_pairs() {
                if let Some(stats) = device.stats(pair) {
                    tracing::info!("pair {pair}: {}", stats.snapshot());
                }
            }
            if device.tap().created() {
                tracing::info!("removing TAP device {}", device.tap().name());
            }
            std::process::exit(0)
        })
        .map(|_| ())
        .map_err(|e| Error::Signal(format!("cannot start the signal thread: {e}")))
}
