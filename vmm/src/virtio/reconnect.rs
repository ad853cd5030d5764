//! Keeping a device attached to its backend process: when the backend hangs up (it exited,
//! crashed, or was restarted by its supervisor), a watcher thread reconnects to the same
//! socket as soon as it accepts again and hands the device's running queues to the new
//! process. The guest sees its requests stall meanwhile, not fail.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{DeviceType, VhostUserConnection, VirtioPciDevice};

/// How often to retry the socket while the backend is away.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Watches `device`'s backend on `socket` until `stopping` is set (the VMM is shutting down
/// and stops backends on purpose).
pub fn watch(
    device: Arc<Mutex<VirtioPciDevice>>,
    kind: DeviceType,
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut hangup = lock(&device).hangup_watch()?;
    std::thread::Builder::new()
        .name("backend-watch".into())
        .spawn(move || loop {
            if let Err(e) = hangup.wait() {
                tracing::error!(socket = %socket.display(), "cannot watch the backend: {e}");
                return;
            }
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!(socket = %socket.display(), "backend disconnected; waiting for it to come back");
            let backend = loop {
                std::thread::sleep(RETRY_INTERVAL);
                if let Ok(backend) = VhostUserConnection::connect(&socket, kind.config_size()) {
                    break backend;
                }
            };
            let mut device = lock(&device);
            if let Err(e) = device.reconnect(backend) {
                tracing::error!(socket = %socket.display(), "reconnected backend cannot resume the device: {e:#}");
            } else {
                tracing::warn!(socket = %socket.display(), "backend reconnected");
            }
            match device.hangup_watch() {
                Ok(watch) => hangup = watch,
                Err(e) => {
                    tracing::error!(socket = %socket.display(), "cannot watch the backend: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

fn lock(device: &Mutex<VirtioPciDevice>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}
