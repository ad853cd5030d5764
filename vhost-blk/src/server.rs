//! The socket and the connection loop: one frontend at a time, and after it disconnects the
//! next one. By default the daemon listens; with `--client` it connects to a listening
//! frontend and reconnects after every disconnect.

use std::path::Path;
use std::sync::Arc;

use cowbird_daemon::relay::Relay;
use cowbird_daemon::socket::Frontends;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{ring_event, BlkBackend};
use crate::device::Device;
use crate::error::{Error, Result};

pub use cowbird_daemon::socket::{Disconnect, MAX_RECONNECT_DELAY};

/// A vhost-user-blk server on a unix socket.
pub struct Server {
    device: Arc<Device>,
    frontends: Frontends,
}

impl Server {
    /// Binds `path`. A stale socket file is replaced; one a live process listens on is not.
    pub fn bind(path: &Path, device: Arc<Device>) -> Result<Server> {
        Ok(Server {
            device,
            frontends: Frontends::listen(path)?,
        })
    }

    /// A server that connects to a frontend listening on `path` instead of listening itself.
    /// While nothing listens there (no socket file, or nobody accepting), it retries with a
    /// growing pause of up to [`MAX_RECONNECT_DELAY`]; so it also reconnects to a restarted
    /// frontend after a disconnect.
    pub fn connect(path: &Path, device: Arc<Device>) -> Server {
        Server {
            device,
            frontends: Frontends::connect(path),
        }
    }

    /// Whether the server connects to its frontends (`--client`) rather than listening.
    pub fn is_client(&self) -> bool {
        self.frontends.is_client()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.frontends.path()
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
        let Some(frontend) = self.frontends.next(|| self.device.stopping())? else {
            return Ok(Disconnect::Closed);
        };
        // The frontend's connection is relayed to the daemon, which puts an early
        // SET_VRING_ENABLE after SET_FEATURES (`cowbird_daemon::relay`).
        let relay = Relay::connect(frontend, self.device.num_queues(), |l| daemon.start(l))?;
        tracing::info!("frontend connected");
        let ended = relay.finish(daemon.wait());
        // Stop the workers before anything else touches the disk: in-progress batches finish,
        // later kicks are ignored, then the worker threads exit.
        backend.deactivate();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        if let Err(e) = self.device.disk().flush() {
            tracing::error!("flushing after disconnect: {e}");
        }
        Ok(ended)
    }
}
