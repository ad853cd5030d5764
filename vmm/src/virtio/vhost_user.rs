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

use super::watchdog::{Watchdog, REQUEST_TIMEOUT};

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
    /// The backend did not answer a request in time; the connection was shut down.
    #[error("vhost-user backend at {}: no answer to {what} within {after:?}; the connection was closed", socket.display())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The request.
        what: &'static str,
        /// How long it waited.
        after: Duration,
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
    watchdog: Watchdog,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u16,
    config: Vec<u8>,
}

impl VhostUserConnection {
    /// Connects to `socket`, takes ownership (SET_OWNER), reads the backend's features,
    /// negotiates protocol features and reads the `config_size`-byte configuration space.
    /// Every request waits at most [`REQUEST_TIMEOUT`] for the backend.
    pub fn connect(socket: &Path, config_size: usize) -> Result<Self, VhostUserError> {
        Self::connect_with_timeout(socket, config_size, REQUEST_TIMEOUT)
    }

    /// [`Self::connect`] with `timeout` per request.
    pub(crate) fn connect_with_timeout(
        socket: &Path,
        config_size: usize,
        timeout: Duration,
    ) -> Result<Self, VhostUserError> {
        let connect_err = |source| VhostUserError::Connect {
            socket: socket.to_owned(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        let watched = stream.try_clone().map_err(connect_err)?;
        let watchdog = Watchdog::new(
            stream.try_clone().map_err(connect_err)?,
            socket.to_owned(),
            timeout,
        )
        .map_err(connect_err)?;
        let mut connection = Self {
            frontend: Frontend::from_stream(stream, MAX_QUEUES),
            stream: watched,
            socket: socket.to_owned(),
            watchdog,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_num: 1,
            config: Vec::new(),
        };
        connection.handshake(config_size)?;
        Ok(connection)
    }

    /// Takes ownership, negotiates features and reads the configuration space.
    fn handshake(&mut self, config_size: usize) -> Result<(), VhostUserError> {
        self.request("SET_OWNER", |f| f.set_owner())?;
        self.features = self.request("GET_FEATURES", |f| f.get_features())?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = self.request("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let protocol = offered & WANTED_PROTOCOL_FEATURES;
            self.request("SET_PROTOCOL_FEATURES", |f| {
                f.set_protocol_features(protocol)
            })?;
            self.protocol = protocol;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.request("GET_QUEUE_NUM", |f| f.get_queue_num())?;
                self.queue_num = n.min(MAX_QUEUES) as u16;
            }
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Unsupported {
                socket: self.socket.clone(),
                reason: "it does not offer VHOST_USER_PROTOCOL_F_CONFIG, so the device's \
                         configuration space cannot be read"
                    .into(),
            });
        }
        self.config = get_config(&self.stream, config_size, CONFIG_TIMEOUT).map_err(|reason| {
            VhostUserError::Config {
                socket: self.socket.clone(),
                reason,
            }
        })?;
        Ok(())
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
        self.request("SET_CONFIG", |f| {
            f.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        })
        .map(drop)
    }

    /// Prepares the backend for the driver: acks `driver_features` and sends the guest
    /// memory table. Configuration writes and [`Self::start_queue`] come after this.
    pub fn set_features_and_memory(
        &mut self,
        memory: &GuestMemoryMmap,
        driver_features: u64,
    ) -> Result<(), VhostUserError> {
        let protocol_bit = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.request("SET_FEATURES", |f| {
            f.set_features(driver_features | protocol_bit)
        })?;
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| self.error("SET_MEM_TABLE", source))?;
        self.request("SET_MEM_TABLE", |f| f.set_mem_table(&regions))
            .map(drop)
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
        // Each ring whole (with the event index fields), aligned as the split ring layout
        // requires and inside one region of guest RAM, as QEMU checks before it starts
        // vhost: a backend trusts the addresses it is given.
        let size = u64::from(queue.size);
        let host = |name: &str, addr: u64, len: u64, align: u64| -> Result<u64, VhostUserError> {
            let refuse = |why: String| VhostUserError::Unsupported {
                socket: self.socket.clone(),
                reason: format!("queue {} {name} at {addr:#x} {why}", queue.index),
            };
            if addr % align != 0 {
                return Err(refuse(format!("is not aligned to {align} bytes")));
            }
            let slice = memory
                .get_slice(GuestAddress(addr), len as usize)
                .map_err(|e| {
                    refuse(format!("({len} bytes) is not in one guest RAM region: {e}"))
                })?;
            Ok(slice.ptr_guard().as_ptr() as u64)
        };
        let rings = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: host("descriptor table", queue.desc, 16 * size, 16)?,
            used_ring_addr: host("used ring", queue.used, 6 + 8 * size, 4)?,
            avail_ring_addr: host("available ring", queue.avail, 6 + 2 * size, 2)?,
            log_addr: None,
        };
        let i = queue.index;
        self.request("SET_VRING_NUM", |f| f.set_vring_num(i, queue.size))?;
        self.request("SET_VRING_ADDR", |f| f.set_vring_addr(i, &rings))?;
        self.request("SET_VRING_BASE", |f| f.set_vring_base(i, queue.base))?;
        self.request("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
        self.request("SET_VRING_KICK", |f| f.set_vring_kick(i, kick))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.request("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
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

    /// Whether the watchdog cut the connection off: a request went unanswered.
    pub fn timed_out(&self) -> bool {
        self.watchdog.fired()
    }

    /// Stops the queues (GET_VRING_BASE), as on a driver reset.
    pub fn stop(&mut self, queues: &[usize]) -> Result<(), VhostUserError> {
        for &i in queues {
            self.request("GET_VRING_BASE", |f| f.get_vring_base(i))?;
        }
        Ok(())
    }

    /// Whether the backend offered `VHOST_USER_F_PROTOCOL_FEATURES` features this connection
    /// uses: exposed for logs.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Sends request `what` through `send`, with the watchdog bounding the wait for the
    /// backend's answer.
    fn request<T, E: Into<vhost::Error>>(
        &mut self,
        what: &'static str,
        send: impl FnOnce(&mut Frontend) -> Result<T, E>,
    ) -> Result<T, VhostUserError> {
        let frontend = &mut self.frontend;
        let result = self.watchdog.run(what, || send(frontend));
        result.map_err(|e| self.error(what, e.into()))
    }

    /// The error for request `what` that failed with `source`: a timeout if the watchdog
    /// shut the connection down.
    fn error(&self, what: &'static str, source: vhost::Error) -> VhostUserError {
        let socket = self.socket.clone();
        if self.watchdog.fired() {
            VhostUserError::Timeout {
                socket,
                what,
                after: self.watchdog.timeout(),
            }
        } else {
            VhostUserError::Request {
                socket,
                what,
                source,
            }
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
