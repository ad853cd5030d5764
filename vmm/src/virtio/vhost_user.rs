//! The frontend side of one vhost-user connection: the handshake, the device configuration
//! space (read from the backend with GET_CONFIG), and handing the guest's rings, memory,
//! kick and call eventfds to the backend when the driver starts the device.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Protocol features the VMM uses when the backend has them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG);
/// Largest queue index the frontend will address.
const MAX_QUEUES: u64 = 1024;

/// Why talking to a vhost-user backend failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be connected.
    #[error("cannot connect to vhost-user backend at {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A request failed or the backend broke the protocol.
    #[error("vhost-user backend at {}: {what} failed: {source}", socket.display())]
    Request {
        /// The socket path.
        socket: PathBuf,
        /// The request.
        what: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The backend lacks something the device needs.
    #[error("vhost-user backend at {}: {reason}", socket.display())]
    Unsupported {
        /// The socket path.
        socket: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// One virtqueue as the driver set it up.
#[derive(Debug, Clone, Copy)]
pub struct QueueSetup {
    /// Queue index.
    pub index: usize,
    /// Number of descriptors.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub avail: u64,
    /// Guest address of the used (device) ring.
    pub used: u64,
    /// Index of the next available-ring entry the backend should process.
    pub base: u16,
}

/// A connected, initialised backend.
pub struct VhostUserConnection {
    frontend: Frontend,
    stream: UnixStream,
    socket: PathBuf,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u16,
    config_size: usize,
}

impl VhostUserConnection {
    /// Connects to `socket`, takes ownership (SET_OWNER), reads the backend's features and
    /// negotiates protocol features. `config_size` is the device type's config space size.
    pub fn connect(socket: &Path, config_size: usize) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(socket).map_err(|source| VhostUserError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        let watched = stream
            .try_clone()
            .map_err(|source| VhostUserError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        let mut frontend = Frontend::from_stream(stream, MAX_QUEUES);
        let request = |what| {
            let socket = socket.to_owned();
            move |source| VhostUserError::Request {
                socket,
                what,
                source,
            }
        };
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut queue_num = 1;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & WANTED_PROTOCOL_FEATURES;
            frontend
                .set_protocol_features(protocol)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
                queue_num = n.min(MAX_QUEUES) as u16;
            }
        }
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Unsupported {
                socket: socket.to_owned(),
                reason: "it does not offer VHOST_USER_PROTOCOL_F_CONFIG, so the device's \
                         configuration space cannot be read"
                    .into(),
            });
        }
        Ok(Self {
            frontend,
            stream: watched,
            socket: socket.to_owned(),
            features,
            protocol,
            queue_num,
            config_size,
        })
    }

    /// The socket this connection uses.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Virtio features the backend offers (without the vhost-user protocol bit).
    pub fn device_features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Number of queues the backend serves.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// Reads the device configuration space at `offset`. The whole space is fetched each
    /// time: some backends (qemu-storage-daemon) ignore GET_CONFIG's offset.
    pub fn read_config(&mut self, offset: usize, data: &mut [u8]) -> Result<(), VhostUserError> {
        let buf = vec![0u8; self.config_size];
        let (_, space) = self
            .frontend
            .get_config(
                0,
                self.config_size as u32,
                VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map_err(self.request_err("GET_CONFIG"))?;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = space.get(offset + i).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Writes the device configuration space at `offset`.
    pub fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), VhostUserError> {
        self.frontend
            .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
            .map_err(self.request_err("SET_CONFIG"))
    }

    /// Starts the device: acks `driver_features`, sends the guest memory table, then each
    /// queue's size, ring addresses, base, call and kick eventfds, and enables it.
    pub fn activate(
        &mut self,
        memory: &GuestMemoryMmap,
        driver_features: u64,
        queues: &[(QueueSetup, &EventFd, &EventFd)],
    ) -> Result<(), VhostUserError> {
        let protocol_bit = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(driver_features | protocol_bit)
            .map_err(self.request_err("SET_FEATURES"))?;
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.request_err("SET_MEM_TABLE"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.request_err("SET_MEM_TABLE"))?;
        for (queue, call, kick) in queues {
            let host = |addr: u64| -> Result<u64, VhostUserError> {
                memory
                    .get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|e| VhostUserError::Unsupported {
                        socket: self.socket.clone(),
                        reason: format!(
                            "queue {} ring at {addr:#x} is not in guest RAM: {e}",
                            queue.index
                        ),
                    })
            };
            let rings = VringConfigData {
                queue_max_size: queue.size,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: host(queue.desc)?,
                used_ring_addr: host(queue.used)?,
                avail_ring_addr: host(queue.avail)?,
                log_addr: None,
            };
            let i = queue.index;
            self.frontend
                .set_vring_num(i, queue.size)
                .map_err(self.request_err("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &rings)
                .map_err(self.request_err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, queue.base)
                .map_err(self.request_err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(self.request_err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(self.request_err("SET_VRING_KICK"))?;
            if protocol_bit != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(self.request_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// A second handle on the same connection, for a thread to wait on for the backend's
    /// hangup without holding the device.
    pub fn hangup_watch(&self) -> std::io::Result<HangupWatch> {
        Ok(HangupWatch(self.stream.try_clone()?))
    }

    /// Stops the queues (GET_VRING_BASE), as on a driver reset.
    pub fn stop(&mut self, queues: &[usize]) -> Result<(), VhostUserError> {
        for &i in queues {
            self.frontend
                .get_vring_base(i)
                .map_err(self.request_err("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    /// Whether the backend offered `VHOST_USER_F_PROTOCOL_FEATURES` features this connection
    /// uses: exposed for logs.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    fn request_err(&self, what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
        let socket = self.socket.clone();
        move |source| VhostUserError::Request {
            socket,
            what,
            source,
        }
    }
}

/// Waits for a backend connection to close.
pub struct HangupWatch(UnixStream);

impl HangupWatch {
    /// Blocks until the backend closes the connection (it exited or crashed).
    pub fn wait(&self) -> std::io::Result<()> {
        // nix has no name for POLLRDHUP (the peer closed its end). Only it, POLLHUP and
        // POLLERR can be reported, so any ready descriptor means the connection is gone.
        let peer_closed = PollFlags::from_bits_retain(libc::POLLRDHUP);
        loop {
            let mut fds = [PollFd::new(self.0.as_fd(), peer_closed)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(ready) if ready > 0 => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hangup_is_seen_when_the_peer_closes() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let watch = HangupWatch(ours);
        let waiter = std::thread::spawn(move || watch.wait());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(theirs);
        waiter.join().unwrap().unwrap();
    }
}
