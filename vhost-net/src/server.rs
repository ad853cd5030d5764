//! The vhost-user socket and the connection loop: one frontend at a time, and after it
//! disconnects the next one. As a server the daemon listens on the socket; with `--client` it
//! connects to a frontend that listens, and reconnects after a disconnect.
//!
//! The daemon takes the frontend's connection itself and relays it to `vhost-user-backend`
//! through a private socket ([`cowbird_daemon::relay`]), which puts QEMU's early
//! `SET_VRING_ENABLE` after `SET_FEATURES`.

use std::path::Path;
use std::sync::Arc;

use cowbird_daemon::relay::Relay;
use cowbird_daemon::socket::Frontends;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{tap_event, NetBackend};
use crate::device::Device;
use crate::error::{Error, Result};

pub use cowbird_daemon::socket::Disconnect;

/// A vhost-user-net server on a unix socket.
pub struct Server {
    device: Arc<Device>,
    frontends: Frontends,
}

impl Server {
    /// Binds `path` to listen for frontends. A stale socket file is replaced; one a live
    /// process listens on is not.
    pub fn bind(path: &Path, device: Arc<Device>) -> Result<Server> {
        Ok(Server {
            device,
            frontends: Frontends::listen(path)?,
        })
    }

    /// A server that connects to a frontend listening on `path` (`--client`).
    pub fn client(path: &Path, device: Arc<Device>) -> Server {
        Server {
            device,
            frontends: Frontends::connect(path),
        }
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
            let ended = self.serve_one()?;
            let stats = self.device.total_stats();
            match ended {
                Disconnect::Closed => tracing::info!("frontend disconnected ({stats})"),
                Disconnect::Failed(e) => {
                    tracing::warn!("frontend connection failed: {e} ({stats})")
                }
            }
        }
    }

    /// Waits for one frontend (or connects to it), serves it until it goes away, and stops
    /// its workers.
    ///
    /// Errors are local failures (the socket, thread creation); anything the frontend does
    /// wrong ends only its connection.
    pub fn serve_one(&mut self) -> Result<Disconnect> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(NetBackend::new(self.device.clone(), mem.clone()));
        let mut daemon = VhostUserDaemon::new("vhost-net".into(), backend.clone(), mem)
            .map_err(|e| Error::VhostUser(e.to_string()))?;
        // A fresh connection starts with every TAP queue attached.
        if let Err(e) = self
            .device
            .tap()
            .set_active_queues(self.device.queue_pairs())
        {
            tracing::warn!("{e}");
        }
        // Each worker also listens to its TAP queue, edge-triggered: the worker reads until
        // EAGAIN or until the guest's buffers run out (then an rx kick resumes it).
        let event = u64::from(tap_event(self.device.num_queues()));
        for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = self.device.tap().queue_fd(pair) {
                handler
                    .register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, event)
                    .map_err(|source| Error::Tap {
                        name: self.device.tap().name().to_owned(),
                        op: "epoll registration",
                        source,
                    })?;
            }
        }
        let Some(frontend) = self.frontends.next(|| self.device.stopping())? else {
            return Ok(Disconnect::Closed);
        };
        let relay = Relay::connect(frontend, self.device.num_queues(), |l| daemon.start(l))?;
        tracing::info!("frontend connected");
        let ended = relay.finish(daemon.wait());
        backend.deactivate();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        Ok(ended)
    }
}
