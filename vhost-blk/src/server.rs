//! The socket and the connection loop: one frontend at a time, and after it disconnects the
//! next one. By default the daemon listens; with `--client` it connects to a listening
//! frontend and reconnects after every disconnect.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// How a connection ended.
#[derive(Debug)]
pub enum Disconnect {
    /// The frontend closed the connection.
    Closed,
    /// The connection failed (protocol error from the frontend, or a local failure).
    Failed(String),
}

impl Server {
    /// Binds `path`. A stale socket file is replaced; one a live process listens on is not.
    pub fn bind(path: &Path, device: Arc<Device>) -> Result<Server> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a socket is ours to replace: never a file someone typed by mistake.
            if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                return Err(Error::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| Error::Socket {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Socket {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Server {
            device,
            endpoint: Endpoint::Listen(Listener::from(listener)),
            path: path.to_path_buf(),
        })
    }

    /// A server that connects to a frontend listening on `path` instead of listening itself.
    /// While nothing listens there (no socket file, or nobody accepting), it retries with a
    /// growing pause of up to [`MAX_RECONNECT_DELAY`]; so it also reconnects to a restarted
    /// frontend after a disconnect.
    pub fn connect(path: &Path, device: Arc<Device>) -> Result<Server> {
        if path.to_str().is_none() {
            return Err(Error::Socket {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the path is not UTF-8"),
            });
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
                        Error::Socket {
                            path: self.path.clone(),
                            source,
                        }
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
        Ok(match ended {
            Ok(()) => Disconnect::Closed,
            Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => Disconnect::Closed,
            Err(DaemonError::HandleRequest(VhostUserError::SocketError(e)))
                if e.kind() == io::ErrorKind::ConnectionReset =>
            {
                Disconnect::Closed
            }
            Err(e) => Disconnect::Failed(e.to_string()),
        })
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
                    return Err(Error::Socket {
                        path: self.path.clone(),
                        source,
                    })
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
