//! The socket and the connection loop: one frontend at a time, and after it disconnects the
//! next one. By default the daemon listens; with `--client` it connects to a listening
//! frontend and reconnects after every disconnect.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cowbird_daemon::socket::{self, SocketError};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{ring_event, BlkBackend};
use crate::device::Device;
use crate::error::{Error, Result};

/// Longest pause between two attempts to reach a frontend in client mode.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A vhost-user-blk server on a unix socket.
pub struct Server {
    device: Arc<Device>,
    endpoint: Endpoint,
    path: PathBuf,
}

/// How the server reaches its frontends.
enum Endpoint {
    /// Listening on a socket we created (and remove on drop).
    Listen(Listener),
    /// Connecting to a socket a frontend listens on (QEMU's `server=on` chardev).
    Connect,
}

pub use cowbird_daemon::socket::Disconnect;

impl Server {
    /// Binds `path`. A stale socket file is replaced; one a live process listens on is not.
    pub fn bind(path: &Path, device: Arc<Device>) -> Result<Server> {
        Ok(Server {
            device,
            endpoint: Endpoint::Listen(Listener::from(socket::listen(path)?)),
            path: path.to_path_buf(),
        })
    }

    /// A server that connects to a frontend listening on `path` instead of listening itself.
    /// While nothing listens there (no socket file, or nobody accepting), it retries with a
    /// growing pause of up to [`MAX_RECONNECT_DELAY`]; so it also reconnects to a restarted
    /// frontend after a disconnect.
    pub fn connect(path: &Path, device: Arc<Device>) -> Result<Server> {
        if path.to_str().is_none() {
            return Err(Error::Socket(SocketError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8"),
            }));
        }
        Ok(Server {
            device,
            endpoint: Endpoint::Connect,
            path: path.to_path_buf(),
        })
    }

    /// Whether the server connects to its frontends (`--client`) rather than listening.
    pub fn is_client(&self) -> bool {
        matches!(self.endpoint, Endpoint::Connect)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device served.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Serves frontends one after the other, forever (until the process is told to stop).
    pub fn run(&mut self) -> Result<()> {
        loop {
            match self.serve_one()? {
                Disconnect::Closed => tracing::info!("frontend disconnected"),
                Disconnect::Failed(e) => tracing::warn!("frontend connection failed: {e}"),
            }
        }
    }

    /// Waits for one frontend, serves it until it goes away, and stops its workers.
    ///
    /// Errors are local failures (the socket, thread creation); anything the frontend does
    /// wrong ends only its connection.
    pub fn serve_one(&mut self) -> Result<Disconnect> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(self.device.clone(), mem.clone()));
        let mut daemon = VhostUserDaemon::new("vhost-blk".into(), backend.clone(), mem)
            .map_err(|e| Error::VhostUser(e.to_string()))?;
        // Each worker also listens to its queue's io_uring completions.
        let handlers = daemon.get_epoll_handlers();
        let event = u64::from(ring_event(self.device.num_queues()));
        for (queue, handler) in handlers.iter().enumerate() {
            if let Some(fd) = self.device.ring_eventfd(queue) {
                handler
                    .register_listener(fd, EventSet::IN, event)
                    .map_err(|e| Error::Queue {
                        queue,
                        reason: format!("cannot watch io_uring completions: {e}"),
                    })?;
            }
        }
        match &mut self.endpoint {
            Endpoint::Listen(listener) => {
                tracing::debug!("waiting for a frontend on {}", self.path.display());
                daemon.start(listener).map_err(|e| match e {
                    DaemonError::CreateBackendListener(VhostUserError::SocketError(source)) => {
                        Error::Socket(SocketError::Io {
                            path: self.path.clone(),
                            source,
                        })
                    }
                    e => Error::VhostUser(e.to_string()),
                })?;
            }
            Endpoint::Connect => self.connect_frontend(&mut daemon)?,
        }
        tracing::info!("frontend connected");
        let ended = daemon.wait();
        // Stop the workers before anything else touches the disk: in-progress batches finish,
        // later kicks are ignored, then the worker threads exit.
        backend.deactivate();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        if let Err(e) = self.device.disk().flush() {
            tracing::error!("flushing after disconnect: {e}");
        }
        Ok(Disconnect::from_wait(ended))
    }

    /// Connects `daemon` to the frontend's socket, waiting while nothing listens there.
    fn connect_frontend(&self, daemon: &mut VhostUserDaemon<Arc<BlkBackend>>) -> Result<()> {
        // Checked in `connect`.
        let path = self.path.to_str().unwrap_or_default();
        let mut delay = Duration::from_millis(10);
        let mut waiting = false;
        loop {
            match daemon.start_client(path) {
                Ok(()) => return Ok(()),
                Err(DaemonError::CreateBackendReqHandler(VhostUserError::SocketConnect(e)))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if !std::mem::replace(&mut waiting, true) {
                        tracing::info!("waiting for a frontend to listen on {path} ({e})");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                }
                Err(DaemonError::CreateBackendReqHandler(VhostUserError::SocketConnect(
                    source,
                ))) => {
                    return Err(Error::Socket(SocketError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
                Err(e) => return Err(Error::VhostUser(e.to_string())),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The frontend's socket is not ours to remove.
        if !self.is_client() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
