//! The frontend's vhost-user connection, relayed to the `vhost-user-backend` daemon through a
//! private socket so that one setup message can be put in the order the daemon accepts.
//!
//! A frontend may send `SET_VRING_ENABLE` before its first `SET_FEATURES`: QEMU (7.2 up to at
//! least 10.0) does when a NIC is attached to its peer, and the vhost-user spec allows it.
//! `vhost` 0.18's request handler accepts that message only once
//! `VHOST_USER_F_PROTOCOL_FEATURES` is among the acked features and otherwise drops the
//! connection before any backend code runs. The relay holds such a message, acks it to the
//! frontend itself when the frontend asked for a reply (the frontend waits for that reply
//! before it sends anything else), and hands it to the daemon right after the `SET_FEATURES`
//! that acks the protocol features. That is also the order the frontend means:
//! `vhost-user-backend` starts every ring disabled when `SET_FEATURES` acks the protocol
//! features, so an enable applied before it would be lost.
//!
//! Every other message passes unchanged in both directions, with the descriptors passed
//! along with it (SCM_RIGHTS). Only setup messages travel here: packets move through the
//! shared rings, and kicks and calls through eventfds the daemon receives directly.

use std::fs::DirBuilder;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::{Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::Error as DaemonError;

use crate::socket::Disconnect;

/// Size of a vhost-user message header: request code, flags and payload size, 32 bits each.
pub const HEADER_SIZE: usize = 12;

/// The protocol version every message carries in its flags.
const VERSION_1: u32 = 0x1;

/// One vhost-user message as it travels on the socket.
#[derive(Debug)]
pub struct Message {
    /// The request code (replies carry the code of the request they answer).
    pub request: u32,
    /// Version, REPLY and NEED_REPLY bits.
    pub flags: u32,
    /// The payload.
    pub body: Vec<u8>,
    /// Descriptors passed with the message.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message from the frontend with `body` and no descriptors.
    pub fn request(request: FrontendReq, flags: u32, body: &[u8]) -> Message {
        Message {
            request: request as u32,
            flags: VERSION_1 | flags,
            body: body.to_vec(),
            fds: Vec::new(),
        }
    }

    /// Whether this is `request`.
    pub fn is(&self, request: FrontendReq) -> bool {
        self.request == request as u32
    }

    /// Whether the sender asked for an ack (NEED_REPLY).
    pub fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// The payload as one 64-bit value (features, acks), if it is exactly that.
    pub fn u64_body(&self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.body.as_slice().try_into().ok()?))
    }

    /// The payload as a vring state (index, value), if it is exactly that.
    pub fn vring_state(&self) -> Option<(u32, u32)> {
        let [a, b, c, d, e, f, g, h]: [u8; 8] = self.body.as_slice().try_into().ok()?;
        Some((
            u32::from_ne_bytes([a, b, c, d]),
            u32::from_ne_bytes([e, f, g, h]),
        ))
    }

    /// The ack a backend sends for this request: 0 for success, 1 for failure.
    pub fn ack(&self, failed: bool) -> Message {
        Message {
            request: self.request,
            flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
            body: u64::from(failed).to_ne_bytes().to_vec(),
            fds: Vec::new(),
        }
    }

    /// Reads one message. `None` when the peer closed the connection between two messages.
    ///
    /// A payload larger than vhost-user allows, more descriptors than it allows, or a
    /// connection closed inside a message are errors.
    pub fn read_from(sock: &UnixStream) -> io::Result<Option<Message>> {
        let mut fds = Vec::new();
        let mut header = [0u8; HEADER_SIZE];
        if !recv_exact(sock, &mut header, &mut fds, true)? {
            return Ok(None);
        }
        let [r0, r1, r2, r3, f0, f1, f2, f3, s0, s1, s2, s3] = header;
        let size = u32::from_ne_bytes([s0, s1, s2, s3]) as usize;
        if size > MAX_MSG_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message of {size} bytes (at most {MAX_MSG_SIZE})"),
            ));
        }
        let mut body = vec![0; size];
        recv_exact(sock, &mut body, &mut fds, false)?;
        Ok(Some(Message {
            request: u32::from_ne_bytes([r0, r1, r2, r3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            body,
            fds,
        }))
    }

    /// Writes the message, its descriptors attached to its first byte.
    pub fn write_to(&self, sock: &UnixStream) -> io::Result<()> {
        let size = u32::try_from(self.body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
        let mut bytes = Vec::with_capacity(HEADER_SIZE + self.body.len());
        bytes.extend_from_slice(&self.request.to_ne_bytes());
        bytes.extend_from_slice(&self.flags.to_ne_bytes());
        bytes.extend_from_slice(&size.to_ne_bytes());
        bytes.extend_from_slice(&self.body);
        let fds: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let mut done = 0;
        while done < bytes.len() {
            let cmsgs: &[ControlMessage] = if done == 0 && !fds.is_empty() {
                &rights
            } else {
                &[]
            };
            match sendmsg::<()>(
                sock.as_raw_fd(),
                &[IoSlice::new(&bytes[done..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Fills `buf` from `sock`, adding the descriptors that come with it to `fds`. Returns
/// `false` if the peer closed the connection before the first byte and `at_boundary` allows
/// that.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_boundary: bool,
) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_ATTACHED_FD_ENTRIES]);
        let mut iov = [IoSliceMut::new(&mut buf[done..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us; nothing else
                // owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        // One message in many pieces must not gather more descriptors than one message may
        // carry (each piece could bring its own).
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_ATTACHED_FD_ENTRIES} descriptors with one message"),
            ));
        }
        if msg.bytes == 0 {
            if done == 0 && at_boundary {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a vhost-user message",
            ));
        }
        done += msg.bytes;
    }
    Ok(true)
}

/// Where a message from the frontend goes.
#[derive(Debug)]
pub enum Route {
    /// To the daemon.
    Daemon(Message),
    /// Back to the frontend (an ack the relay gives itself).
    Frontend(Message),
}

/// The order fix: holds `SET_VRING_ENABLE` until the daemon would accept it.
#[derive(Debug)]
pub struct Reorder {
    /// The features of the last `SET_FEATURES`: what the daemon checks.
    acked_features: u64,
    /// Whether the frontend acked REPLY_ACK, so that the daemon answers NEED_REPLY.
    reply_ack: bool,
    /// The number of queues; a held message for another queue gets a failure ack.
    num_queues: usize,
    /// Messages held until `SET_FEATURES`.
    held: Vec<Message>,
}

impl Reorder {
    /// The state at the start of a connection to a device with `num_queues` queues.
    pub fn new(num_queues: usize) -> Reorder {
        Reorder {
            acked_features: 0,
            reply_ack: false,
            num_queues,
            held: Vec::new(),
        }
    }

    /// Where `msg`, the next message from the frontend, goes, and which held messages follow
    /// it.
    pub fn route(&mut self, msg: Message) -> Vec<Route> {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if msg.is(FrontendReq::SET_PROTOCOL_FEATURES) {
            if let Some(features) = msg.u64_body() {
                self.reply_ack = features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
            }
        } else if msg.is(FrontendReq::SET_FEATURES) {
            if let Some(features) = msg.u64_body() {
                self.acked_features = features;
                let held = std::mem::take(&mut self.held);
                if features & protocol == 0 {
                    // Without protocol features every ring starts enabled, and the daemon
                    // refuses SET_VRING_ENABLE.
                    if !held.is_empty() {
                        tracing::debug!(
                            "dropping {} early SET_VRING_ENABLE: protocol features not acked",
                            held.len()
                        );
                    }
                    return vec![Route::Daemon(msg)];
                }
                if !held.is_empty() {
                    tracing::info!(
                        "replayed {} early SET_VRING_ENABLE after SET_FEATURES",
                        held.len()
                    );
                }
                return std::iter::once(msg)
                    .chain(held)
                    .map(Route::Daemon)
                    .collect();
            }
        } else if msg.is(FrontendReq::SET_VRING_ENABLE) && self.acked_features & protocol == 0 {
            return self.hold(msg);
        }
        vec![Route::Daemon(msg)]
    }

    /// Holds an early `SET_VRING_ENABLE`, acking it if the frontend waits for an ack.
    ///
    /// The ack goes out at once, which relies on the frontend having had the daemon's replies
    /// to its earlier requests already (vhost-user frontends wait for each reply before they
    /// send the next request, and `SET_VRING_ENABLE` itself has no other reply).
    fn hold(&mut self, mut msg: Message) -> Vec<Route> {
        let state = msg.vring_state();
        let valid = matches!(state, Some((index, 0 | 1)) if (index as usize) < self.num_queues);
        tracing::debug!(
            "holding early SET_VRING_ENABLE {state:?} until SET_FEATURES{}",
            if valid { "" } else { " (invalid: refused)" }
        );
        let ack = (msg.need_reply() && self.reply_ack).then(|| Route::Frontend(msg.ack(!valid)));
        if valid {
            // Acked already: the daemon must not answer it a second time.
            msg.flags &= !VhostUserHeaderFlag::NEED_REPLY.bits();
            // Only the last state of each ring matters, which also bounds what is held.
            let index = state.map(|(index, _)| index);
            match self
                .held
                .iter_mut()
                .find(|m| m.vring_state().map(|(i, _)| i) == index)
            {
                Some(old) => *old = msg,
                None => self.held.push(msg),
            }
        }
        ack.into_iter().collect()
    }
}

/// Why relaying a connection could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The private connection or the relay's threads.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The daemon did not take the private connection (its error, in words: it is not
    /// `Sync`).
    #[error("{0}")]
    Daemon(String),
}

/// The two threads relaying one connection: requests (frontend → daemon, through
/// [`Reorder`]) and replies (daemon → frontend).
pub struct Relay {
    frontend: UnixStream,
    daemon: UnixStream,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Relay {
    /// Starts relaying between `frontend`, the frontend's connection, and `daemon`, a
    /// connection to the daemon, for a device with `num_queues` queues.
    ///
    /// When either side closes its connection or sends something that is not a vhost-user
    /// message, the relay closes both connections.
    fn start(frontend: UnixStream, daemon: UnixStream, num_queues: usize) -> io::Result<Relay> {
        // Requests and the relay's own acks both write to the frontend.
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let mut threads = Vec::with_capacity(2);
        let (from_frontend, to_daemon, frontend_out) = (
            frontend.try_clone()?,
            daemon.try_clone()?,
            to_frontend.clone(),
        );
        threads.push(spawn(
            "vhost-user requests",
            &frontend,
            &daemon,
            move || {
                let mut reorder = Reorder::new(num_queues);
                while let Some(msg) = Message::read_from(&from_frontend)? {
                    for route in reorder.route(msg) {
                        match route {
                            Route::Daemon(m) => m.write_to(&to_daemon)?,
                            Route::Frontend(m) => write_locked(&frontend_out, &m)?,
                        }
                    }
                }
                Ok(())
            },
        )?);
        let from_daemon = daemon.try_clone()?;
        threads.push(spawn(
            "vhost-user replies",
            &frontend,
            &daemon,
            move || {
                while let Some(msg) = Message::read_from(&from_daemon)? {
                    write_locked(&to_frontend, &msg)?;
                }
                Ok(())
            },
        )?);
        Ok(Relay {
            frontend,
            daemon,
            threads,
        })
    }

    /// Makes a private connection, has `start_daemon` (`VhostUserDaemon::start`) accept its
    /// far end, and relays `frontend`, the frontend's connection, to it, for a device with
    /// `num_queues` queues.
    pub fn connect(
        frontend: UnixStream,
        num_queues: usize,
        start_daemon: impl FnOnce(&mut Listener) -> Result<(), DaemonError>,
    ) -> Result<Relay, StartError> {
        let (mut listener, relay_end) = daemon_connection()?;
        start_daemon(&mut listener).map_err(|e| StartError::Daemon(e.to_string()))?;
        Ok(Relay::start(frontend, relay_end, num_queues)?)
    }

    /// Stops relaying once the daemon's `wait` returned `ended`; returns how the frontend's
    /// connection ended.
    pub fn finish(self, ended: Result<(), DaemonError>) -> Disconnect {
        match self.stop() {
            // The relay closed the daemon's connection because the frontend sent something
            // that is not a vhost-user message.
            Some(e) => Disconnect::Failed(e.to_string()),
            None => Disconnect::from_wait(ended),
        }
    }

    /// Closes both connections, waits for the threads, and returns the first failure that
    /// is not just a closed connection (a malformed message, too many descriptors).
    fn stop(self) -> Option<io::Error> {
        close(&self.frontend, &self.daemon);
        let mut first = None;
        for thread in self.threads {
            let result = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")));
            if let Err(e) = result {
                let disconnect = matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::NotConnected
                );
                if !disconnect && first.is_none() {
                    first = Some(e);
                }
            }
        }
        first
    }
}

fn write_locked(sock: &Mutex<UnixStream>, msg: &Message) -> io::Result<()> {
    let sock = sock
        .lock()
        .map_err(|_| io::Error::other("relay lock poisoned"))?;
    msg.write_to(&sock)
}

fn close(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

/// Runs `body` on a thread that closes both connections when it ends, so that the other
/// thread and the daemon see the end too.
fn spawn(
    name: &str,
    frontend: &UnixStream,
    daemon: &UnixStream,
    body: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let (frontend, daemon) = (frontend.try_clone()?, daemon.try_clone()?);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = body();
            if let Err(e) = &result {
                tracing::debug!("relay: {e}");
            }
            close(&frontend, &daemon);
            result
        })
}

/// A listener with exactly one connection pending, and that connection's other end: what
/// `VhostUserDaemon::start` accepts from, and the relay's side of it.
///
/// The listening socket lives in a fresh directory only the daemon's user can enter, and
/// both are removed once the connection is made, so no other process can take its place.
fn daemon_connection() -> io::Result<(Listener, UnixStream)> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = loop {
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "cowbird-relay-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let path = dir.join("daemon.sock");
    let connected = UnixListener::bind(&path).and_then(|listener| {
        let stream = UnixStream::connect(&path)?;
        Ok((listener, stream))
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = connected?;
    Ok((Listener::from(listener), stream))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;

    const NEED_REPLY: u32 = 0x8;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (a, b)
    }

    fn vring_state(index: u32, num: u32) -> Vec<u8> {
        [index.to_ne_bytes(), num.to_ne_bytes()].concat()
    }

    fn features_with_protocol() -> u64 {
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 1 << 32
    }

    fn read(sock: &UnixStream) -> Message {
        Message::read_from(sock).unwrap().expect("a message")
    }

    /// An eventfd-like pipe: (read end, write end).
    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    #[test]
    fn a_message_split_over_several_writes_is_read_whole() {
        let (mut a, b) = pair();
        let body = vring_state(3, 1);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(FrontendReq::SET_VRING_ENABLE as u32).to_ne_bytes());
        bytes.extend_from_slice(&(VERSION_1 | NEED_REPLY).to_ne_bytes());
        bytes.extend_from_slice(&8u32.to_ne_bytes());
        bytes.extend_from_slice(&body);
        let writer = std::thread::spawn(move || {
            for piece in [&bytes[..5], &bytes[5..14], &bytes[14..]] {
                a.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            a
        });
        let msg = read(&b);
        assert!(msg.is(FrontendReq::SET_VRING_ENABLE));
        assert!(msg.need_reply());
        assert_eq!(msg.vring_state(), Some((3, 1)));
        assert!(msg.fds.is_empty());
        // A clean close between messages is the end, not an error.
        drop(writer.join().unwrap());
        assert!(Message::read_from(&b).unwrap().is_none());
    }

    #[test]
    fn a_message_in_pieces_brings_no_more_descriptors_than_one_message_may() {
        let (a, b) = pair();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(FrontendReq::SET_VRING_KICK as u32).to_ne_bytes());
        bytes.extend_from_slice(&VERSION_1.to_ne_bytes());
        bytes.extend_from_slice(&8u32.to_ne_bytes());
        bytes.extend_from_slice(&0u64.to_ne_bytes());
        // Each byte of the message with two descriptors: 40 in all.
        let (_r, w) = pipe();
        let sent = std::thread::spawn(move || {
            let fds = [w.as_raw_fd(); 2];
            for byte in &bytes {
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let iov = [IoSlice::new(std::slice::from_ref(byte))];
                sendmsg::<()>(a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            }
            a
        });
        let e = Message::read_from(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        drop(sent.join().unwrap());
    }

    #[test]
    fn framing_errors() {
        // Closed inside a message.
        let (mut a, b) = pair();
        a.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        drop(a);
        let e = Message::read_from(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A payload larger than vhost-user allows.
        let (mut a, b) = pair();
        let mut header = Vec::new();
        for word in [1u32, VERSION_1, MAX_MSG_SIZE as u32 + 1] {
            header.extend_from_slice(&word.to_ne_bytes());
        }
        a.write_all(&header).unwrap();
        let e = Message::read_from(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Header only, empty payload.
        let (a, b) = pair();
        Message::request(FrontendReq::GET_FEATURES, 0, &[])
            .write_to(&a)
            .unwrap();
        let msg = read(&b);
        assert!(msg.is(FrontendReq::GET_FEATURES) && msg.body.is_empty());
        assert_eq!(msg.flags, VERSION_1);
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = pair();
        let (mut r1, w1) = pipe();
        let (mut r2, w2) = pipe();
        let mut msg = Message::request(FrontendReq::SET_VRING_KICK, 0, &0u64.to_ne_bytes());
        msg.fds = vec![OwnedFd::from(w1), OwnedFd::from(w2)];
        msg.write_to(&a).unwrap();
        // The next message has none.
        Message::request(FrontendReq::GET_FEATURES, 0, &[])
            .write_to(&a)
            .unwrap();
        let got = read(&b);
        assert!(got.is(FrontendReq::SET_VRING_KICK));
        assert_eq!(got.fds.len(), 2);
        drop(msg);
        let mut w1 = std::fs::File::from(got.fds.into_iter().next().unwrap());
        w1.write_all(b"k").unwrap();
        let mut byte = [0u8];
        r1.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"k");
        // Every copy of the second write end is closed now: its reader sees EOF.
        assert_eq!(r2.read(&mut byte).unwrap(), 0);
        assert!(read(&b).fds.is_empty());
    }

    #[test]
    fn early_vring_enable_is_acked_and_replayed_after_set_features() {
        let mut r = Reorder::new(3);
        let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let routes = r.route(Message::request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            0,
            &reply_ack.to_ne_bytes(),
        ));
        assert!(
            matches!(&routes[..], [Route::Daemon(m)] if m.is(FrontendReq::SET_PROTOCOL_FEATURES))
        );
        // Held, acked with success.
        let routes = r.route(Message::request(
            FrontendReq::SET_VRING_ENABLE,
            NEED_REPLY,
            &vring_state(0, 1),
        ));
        let [Route::Frontend(ack)] = &routes[..] else {
            panic!("{routes:?}")
        };
        assert!(ack.is(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(ack.flags, VERSION_1 | VhostUserHeaderFlag::REPLY.bits());
        assert_eq!(ack.u64_body(), Some(0));
        // Without NEED_REPLY: held, no ack.
        let routes = r.route(Message::request(
            FrontendReq::SET_VRING_ENABLE,
            0,
            &vring_state(1, 1),
        ));
        assert!(routes.is_empty(), "{routes:?}");
        // An invalid one is refused and dropped.
        let routes = r.route(Message::request(
            FrontendReq::SET_VRING_ENABLE,
            NEED_REPLY,
            &vring_state(3, 1),
        ));
        assert!(matches!(&routes[..], [Route::Frontend(ack)] if ack.u64_body() == Some(1)));
        // Other messages pass.
        let routes = r.route(Message::request(FrontendReq::SET_OWNER, 0, &[]));
        assert!(matches!(&routes[..], [Route::Daemon(m)] if m.is(FrontendReq::SET_OWNER)));
        // SET_FEATURES, then the held messages in order, without NEED_REPLY.
        let routes = r.route(Message::request(
            FrontendReq::SET_FEATURES,
            NEED_REPLY,
            &features_with_protocol().to_ne_bytes(),
        ));
        let [Route::Daemon(f), Route::Daemon(e0), Route::Daemon(e1)] = &routes[..] else {
            panic!("{routes:?}")
        };
        assert!(f.is(FrontendReq::SET_FEATURES) && f.need_reply());
        assert!(e0.is(FrontendReq::SET_VRING_ENABLE) && !e0.need_reply());
        assert_eq!(e0.vring_state(), Some((0, 1)));
        assert_eq!(e1.vring_state(), Some((1, 1)));
        assert!(r.held.is_empty());
        // Afterwards SET_VRING_ENABLE passes untouched (the daemon acks it).
        let routes = r.route(Message::request(
            FrontendReq::SET_VRING_ENABLE,
            NEED_REPLY,
            &vring_state(2, 1),
        ));
        assert!(matches!(&routes[..], [Route::Daemon(m)] if m.need_reply()));
    }

    #[test]
    fn only_the_last_state_of_each_ring_is_held() {
        let mut r = Reorder::new(2);
        for num in [1, 0, 1, 0] {
            for index in [0, 1] {
                r.route(Message::request(
                    FrontendReq::SET_VRING_ENABLE,
                    0,
                    &vring_state(index, num),
                ));
            }
        }
        let routes = r.route(Message::request(
            FrontendReq::SET_FEATURES,
            0,
            &features_with_protocol().to_ne_bytes(),
        ));
        let states: Vec<_> = routes
            .iter()
            .skip(1)
            .map(|r| match r {
                Route::Daemon(m) => m.vring_state(),
                Route::Frontend(m) => panic!("{m:?}"),
            })
            .collect();
        assert_eq!(states, [Some((0, 0)), Some((1, 0))]);
    }

    #[test]
    fn no_ack_without_reply_ack_and_no_replay_without_protocol_features() {
        let mut r = Reorder::new(2);
        let routes = r.route(Message::request(
            FrontendReq::SET_VRING_ENABLE,
            NEED_REPLY,
            &vring_state(0, 1),
        ));
        assert!(routes.is_empty(), "{routes:?}");
        let routes = r.route(Message::request(
            FrontendReq::SET_FEATURES,
            0,
            &(1u64 << 32).to_ne_bytes(),
        ));
        assert!(matches!(&routes[..], [Route::Daemon(m)] if m.is(FrontendReq::SET_FEATURES)));
        // Still no protocol features: still held (then dropped by the next SET_FEATURES).
        assert!(r
            .route(Message::request(
                FrontendReq::SET_VRING_ENABLE,
                0,
                &vring_state(0, 1)
            ))
            .is_empty());
        let routes = r.route(Message::request(
            FrontendReq::SET_FEATURES,
            0,
            &features_with_protocol().to_ne_bytes(),
        ));
        assert_eq!(routes.len(), 2, "{routes:?}");
    }

    #[test]
    fn relay_forwards_both_ways_and_reorders() {
        let (frontend, relay_frontend) = pair();
        let (relay_daemon, daemon) = pair();
        let relay = Relay::start(relay_frontend, relay_daemon, 2).unwrap();
        // A request with a reply, both ways.
        Message::request(FrontendReq::GET_FEATURES, 0, &[])
            .write_to(&frontend)
            .unwrap();
        let got = read(&daemon);
        assert!(got.is(FrontendReq::GET_FEATURES));
        let mut reply = got.ack(false);
        reply.body = features_with_protocol().to_ne_bytes().to_vec();
        let (mut r, w) = pipe();
        reply.fds = vec![OwnedFd::from(w)];
        reply.write_to(&daemon).unwrap();
        let got = read(&frontend);
        assert_eq!(got.u64_body(), Some(features_with_protocol()));
        assert_eq!(got.fds.len(), 1);
        drop(reply);
        std::fs::File::from(got.fds.into_iter().next().unwrap())
            .write_all(b"x")
            .unwrap();
        let mut byte = [0u8];
        r.read_exact(&mut byte).unwrap();
        // QEMU's order: REPLY_ACK, an early SET_VRING_ENABLE waiting for its ack, then
        // SET_FEATURES.
        Message::request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            0,
            &VhostUserProtocolFeatures::REPLY_ACK.bits().to_ne_bytes(),
        )
        .write_to(&frontend)
        .unwrap();
        assert!(read(&daemon).is(FrontendReq::SET_PROTOCOL_FEATURES));
        Message::request(
            FrontendReq::SET_VRING_ENABLE,
            NEED_REPLY,
            &vring_state(1, 1),
        )
        .write_to(&frontend)
        .unwrap();
        let ack = read(&frontend);
        assert!(ack.is(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(ack.u64_body(), Some(0));
        let (mut kick_r, kick_w) = pipe();
        let mut kick = Message::request(FrontendReq::SET_VRING_KICK, 0, &1u64.to_ne_bytes());
        kick.fds = vec![OwnedFd::from(kick_w)];
        kick.write_to(&frontend).unwrap();
        drop(kick);
        let got = read(&daemon);
        assert!(got.is(FrontendReq::SET_VRING_KICK));
        std::fs::File::from(got.fds.into_iter().next().unwrap())
            .write_all(b"k")
            .unwrap();
        kick_r.read_exact(&mut byte).unwrap();
        Message::request(
            FrontendReq::SET_FEATURES,
            0,
            &features_with_protocol().to_ne_bytes(),
        )
        .write_to(&frontend)
        .unwrap();
        assert!(read(&daemon).is(FrontendReq::SET_FEATURES));
        let replayed = read(&daemon);
        assert!(replayed.is(FrontendReq::SET_VRING_ENABLE) && !replayed.need_reply());
        assert_eq!(replayed.vring_state(), Some((1, 1)));
        // The frontend closing ends the relay without an error, and the daemon sees it.
        drop(frontend);
        assert!(Message::read_from(&daemon).unwrap().is_none());
        assert!(relay.stop().is_none());
    }

    #[test]
    fn a_malformed_message_closes_both_sides_and_is_reported() {
        let (mut frontend, relay_frontend) = pair();
        let (relay_daemon, daemon) = pair();
        let relay = Relay::start(relay_frontend, relay_daemon, 2).unwrap();
        let mut header = Vec::new();
        for word in [1u32, VERSION_1, u32::MAX] {
            header.extend_from_slice(&word.to_ne_bytes());
        }
        frontend.write_all(&header).unwrap();
        assert!(Message::read_from(&daemon).unwrap().is_none());
        let mut rest = Vec::new();
        frontend.read_to_end(&mut rest).unwrap();
        let e = relay.stop().expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn daemon_connection_is_pending_and_leaves_no_file() {
        let (listener, stream) = daemon_connection().unwrap();
        let accepted = listener.accept().unwrap().expect("a pending connection");
        let (mut a, mut b) = (stream, accepted);
        a.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("cowbird-relay-{}-", std::process::id()))
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
