//! The frontend side of one vhost-user connection: the handshake, the device configuration
//! space (read from the backend once, with GET_CONFIG, when it connects), and handing the
//! guest's rings, memory, kick and call eventfds to the backend when the driver starts the
//! device.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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
/// How long a backend gets to answer GET_CONFIG when it connects.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The backend's configuration space could not be read.
    #[error("vhost-user backend at {}: cannot read the device configuration (GET_CONFIG): {reason}", socket.display())]
    Config {
        /// The socket path.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
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
    /// The backend's index of the queue.
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
    config: Vec<u8>,
}

impl VhostUserConnection {
    /// Connects to `socket`, takes ownership (SET_OWNER), reads the backend's features,
    /// negotiates protocol features and reads the `config_size`-byte configuration space.
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
        let config = get_config(&watched, config_size, CONFIG_TIMEOUT).map_err(|reason| {
            VhostUserError::Config {
                socket: socket.to_owned(),
                reason,
            }
        })?;
        Ok(Self {
            frontend,
            stream: watched,
            socket: socket.to_owned(),
            features,
            protocol,
            queue_num,
            config,
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

    /// The configuration space as the backend reported it when it connected.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Writes the device configuration space at `offset`.
    pub fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), VhostUserError> {
        self.frontend
            .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
            .map_err(self.request_err("SET_CONFIG"))
    }

    /// Prepares the backend for the driver: acks `driver_features` and sends the guest
    /// memory table. Configuration writes and [`Self::start_queue`] come after this.
    pub fn set_features_and_memory(
        &mut self,
        memory: &GuestMemoryMmap,
        driver_features: u64,
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
        Ok(())
    }

    /// Hands one queue to the backend: its size, ring addresses, base, call and kick
    /// eventfds, and enables it.
    pub fn start_queue(
        &mut self,
        memory: &GuestMemoryMmap,
        queue: &QueueSetup,
        call: &EventFd,
        kick: &EventFd,
    ) -> Result<(), VhostUserError> {
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
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.frontend
                .set_vring_enable(i, true)
                .map_err(self.request_err("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// A second handle on the same connection, for a thread to wait on for the backend's
    /// hangup without holding the device.
    pub fn hangup_watch(&self) -> std::io::Result<HangupWatch> {
        Ok(HangupWatch(self.stream.try_clone()?))
    }

    /// Whether the backend has closed the connection (it exited, or is being restarted).
    pub fn is_closed(&self) -> bool {
        closed(&self.stream, PollTimeout::ZERO).unwrap_or(true)
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

/// vhost-user's GET_CONFIG request code and header flags.
const GET_CONFIG: u32 = 24;
const HEADER_VERSION: u32 = 0x1;
const HEADER_REPLY: u32 = 0x4;
/// Size of a message header and of GET_CONFIG's body before the payload.
const HEADER_SIZE: usize = 12;
const CONFIG_BODY_SIZE: usize = 12;

/// Reads the whole `size`-byte configuration space with GET_CONFIG on `stream`, waiting at
/// most `timeout`. Done here rather than by the vhost crate, whose client waits for a
/// full-size reply forever: a backend answering with the spec's empty error payload (or not
/// at all) would hang the VMM, and a reply longer than asked for would desynchronise the
/// connection.
fn get_config(stream: &UnixStream, size: usize, timeout: Duration) -> Result<Vec<u8>, String> {
    let body_size = CONFIG_BODY_SIZE + size;
    let mut request = Vec::with_capacity(HEADER_SIZE + body_size);
    // Header; body: offset 0, the whole space, no flags; payload: the space (ignored).
    for word in [
        GET_CONFIG,
        HEADER_VERSION,
        body_size as u32,
        0,
        size as u32,
        0,
    ] {
        request.extend_from_slice(&word.to_le_bytes());
    }
    request.resize(HEADER_SIZE + body_size, 0);
    let mut writer = stream;
    writer
        .write_all(&request)
        .map_err(|e| format!("sending the request: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut header = [0u8; HEADER_SIZE];
    read_until(stream, &mut header, deadline)?;
    let word = |bytes: &[u8], i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let (code, flags, reply_size) = (word(&header, 0), word(&header, 4), word(&header, 8));
    if code != GET_CONFIG || flags & HEADER_REPLY == 0 {
        return Err(format!("the reply is request {code} with flags {flags:#x}"));
    }
    if reply_size as usize != body_size {
        // The spec's way to report an error is a payload of size 0.
        return Err(if reply_size as usize == CONFIG_BODY_SIZE {
            "the backend reported an error".into()
        } else {
            format!("a reply of {reply_size} bytes; expected {body_size}")
        });
    }
    let mut body = vec![0u8; body_size];
    read_until(stream, &mut body, deadline)?;
    match word(&body, 4) {
        0 => Err("the backend reported an error".into()),
        n if n as usize == size => Ok(body.split_off(CONFIG_BODY_SIZE)),
        n => Err(format!("the reply says {n} bytes; expected {size}")),
    }
}

/// Fills `buf` from `stream`, failing at `deadline` or if the backend closes the connection.
fn read_until(stream: &UnixStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the backend did not answer in time".into());
        }
        let timeout =
            PollTimeout::try_from(left.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("waiting for the reply: {e}")),
        }
        let mut reader = stream;
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err("the backend closed the connection".into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the reply: {e}")),
        }
    }
    Ok(())
}

/// Waits for a backend connection to close.
pub struct HangupWatch(UnixStream);

impl HangupWatch {
    /// Blocks until the backend closes the connection (it exited or crashed).
    pub fn wait(&self) -> std::io::Result<()> {
        while !closed(&self.0, PollTimeout::NONE)? {}
        Ok(())
    }
}

/// Whether the peer of `stream` closed its end, waiting up to `timeout` for it.
fn closed(stream: &UnixStream, timeout: PollTimeout) -> std::io::Result<bool> {
    // nix has no name for POLLRDHUP (the peer closed its end). Only it, POLLHUP and POLLERR
    // can be reported, so any ready descriptor means the connection is gone.
    let peer_closed = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(stream.as_fd(), peer_closed)];
    match poll(&mut fds, timeout) {
        Ok(ready) => Ok(ready > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_config_gives_up_on_a_backend_that_does_not_answer() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let e = get_config(&ours, 60, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e, "the backend did not answer in time");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A backend that hangs up instead.
        drop(theirs);
        let e = get_config(&ours, 60, Duration::from_secs(5)).unwrap_err();
        assert!(
            e.contains("closed the connection") || e.contains("sending"),
            "{e}"
        );
    }

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
