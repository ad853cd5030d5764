//! A vhost-user backend for unit tests: it answers the handshake, records every request
//! (with the descriptor it carried) and can misbehave on purpose — answer GET_CONFIG with the
//! spec's error payload, too long, or not at all, or hang up on a request it "rejects", as
//! `vhost-user-backend` does. It serves one connection after the other, like `vhost-blk`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, REPLY_ACK and CONFIG.
const PROTOCOL: u64 = (1 << 0) | (1 << 3) | (1 << 9);
const NEED_REPLY: u32 = 0x8;

/// How the backend answers GET_CONFIG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigReply {
    /// With its configuration space.
    Space,
    /// With the spec's error reply: a payload of size 0.
    Error,
    /// With 8 bytes more than asked for.
    TooLong,
    /// Not at all.
    Silent,
}

/// What the backend offers and how it behaves.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Device features (VERSION_1 and PROTOCOL_FEATURES are added).
    pub features: u64,
    /// Queues it serves (GET_QUEUE_NUM).
    pub queues: u64,
    /// Its configuration space.
    pub config: Vec<u8>,
    /// How it answers GET_CONFIG.
    pub config_reply: ConfigReply,
    /// Requests it closes the connection on instead of answering.
    pub reject: Vec<FrontendReq>,
    /// Requests it never answers, keeping the connection open (a hung backend).
    pub ignore: Vec<FrontendReq>,
}

impl Behaviour {
    /// A well-behaved virtio-blk backend with `features` and `queues` queues.
    pub fn block(features: u64, queues: u64) -> Self {
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&2048u64.to_le_bytes()); // capacity: 1 MiB
        config[0x20] = 1; // writeback
        Self {
            features,
            queues,
            config,
            config_reply: ConfigReply::Space,
            reject: Vec::new(),
            ignore: Vec::new(),
        }
    }
}

/// One request the backend received.
#[derive(Debug, Clone)]
pub struct Message {
    /// The request.
    pub request: FrontendReq,
    /// Its body.
    pub body: Vec<u8>,
    /// The descriptor it carried, if any.
    pub fd: Option<Arc<File>>,
}

impl Message {
    /// The little-endian u32 at `offset` of the body.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.body[offset..offset + 4].try_into().unwrap())
    }
}

#[derive(Default)]
struct State {
    /// Requests of each connection so far, oldest connection first.
    connections: Vec<Vec<Message>>,
    /// The connection being served.
    current: Option<UnixStream>,
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    state: Mutex<State>,
    changed: Condvar,
}

/// A fake backend listening on a socket of its own; removed on drop.
pub struct FakeBackend {
    /// Its socket.
    pub socket: PathBuf,
    shared: Arc<Shared>,
}

impl FakeBackend {
    /// Starts listening and serving with `behaviour`.
    pub fn start(behaviour: Behaviour) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let socket = std::env::temp_dir().join(format!(
            "cowbird-fake-backend-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind the fake backend's socket");
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let serving = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serving.serve(stream),
                    Err(_) => return,
                }
            }
        });
        Self { socket, shared }
    }

    /// Changes how it behaves from the next request on.
    pub fn set_behaviour(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.shared.behaviour.lock().unwrap());
    }

    /// Closes the connection being served, as a backend that exits does.
    pub fn hang_up(&self) {
        if let Some(stream) = &self.shared.lock().current {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// The requests connection `index` (0: the first) received so far.
    pub fn messages(&self, index: usize) -> Vec<Message> {
        self.shared
            .lock()
            .connections
            .get(index)
            .cloned()
            .unwrap_or_default()
    }

    /// The request codes connection `index` received so far.
    pub fn requests(&self, index: usize) -> Vec<FrontendReq> {
        self.messages(index).iter().map(|m| m.request).collect()
    }

    /// Waits (at most 10 s) until connection `index` has received `request`; returns all its
    /// requests of that kind.
    pub fn wait_for(&self, index: usize, request: FrontendReq) -> Vec<Message> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = self.shared.lock();
        loop {
            let found: Vec<Message> = state
                .connections
                .get(index)
                .map(|c| c.iter().filter(|m| m.request == request).cloned().collect())
                .unwrap_or_default();
            if !found.is_empty() {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connection {index} never got {request:?}");
            state = self.shared.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Number of connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections.len()
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.hang_up();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&self, mut stream: UnixStream) {
        {
            let mut state = self.lock();
            state.connections.push(Vec::new());
            state.current = stream.try_clone().ok();
        }
        self.changed.notify_all();
        while let Some(received) = receive(&stream) {
            let Ok(request) = FrontendReq::try_from(received.request) else {
                break;
            };
            let flags = received.flags;
            let message = Message {
                request,
                body: received.body,
                fd: received.fd,
            };
            self.lock()
                .connections
                .last_mut()
                .expect("pushed above")
                .push(message.clone());
            self.changed.notify_all();
            let behaviour = self.behaviour.lock().unwrap().clone();
            if behaviour.reject.contains(&request) {
                break;
            }
            if behaviour.ignore.contains(&request) {
                continue;
            }
            let reply = match request {
                FrontendReq::GET_FEATURES => Some(u64_payload(
                    behaviour.features | VERSION_1 | PROTOCOL_FEATURES,
                )),
                FrontendReq::GET_PROTOCOL_FEATURES => Some(u64_payload(PROTOCOL)),
                FrontendReq::GET_QUEUE_NUM => Some(u64_payload(behaviour.queues)),
                // The vring state: its index, base 0.
                FrontendReq::GET_VRING_BASE => Some([&message.body[0..4], &[0; 4]].concat()),
                FrontendReq::GET_CONFIG => config_reply(&behaviour, &message),
                _ if flags & NEED_REPLY != 0 => Some(u64_payload(0)),
                _ => None,
            };
            if let Some(payload) = reply {
                let mut bytes = Vec::new();
                for word in [u32::from(request), 0x5, payload.len() as u32] {
                    bytes.extend_from_slice(&word.to_le_bytes());
                }
                bytes.extend_from_slice(&payload);
                if stream.write_all(&bytes).is_err() {
                    break;
                }
            }
        }
        self.lock().current = None;
    }
}

fn u64_payload(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// The GET_CONFIG reply `behaviour` calls for: offset, size and flags, then the space.
fn config_reply(behaviour: &Behaviour, request: &Message) -> Option<Vec<u8>> {
    let (offset, size) = (request.u32_at(0), request.u32_at(4) as usize);
    let mut space = behaviour.config.clone();
    space.resize(size, 0);
    let mut reply = offset.to_le_bytes().to_vec();
    match behaviour.config_reply {
        ConfigReply::Space | ConfigReply::TooLong => {
            reply.extend_from_slice(&(size as u32).to_le_bytes());
            reply.extend_from_slice(&request.body[8..12]);
            reply.extend_from_slice(&space);
            if behaviour.config_reply == ConfigReply::TooLong {
                reply.extend_from_slice(&[0x99; 8]);
            }
        }
        ConfigReply::Error => {
            reply.extend_from_slice(&0u32.to_le_bytes());
            reply.extend_from_slice(&request.body[8..12]);
        }
        ConfigReply::Silent => return None,
    }
    Some(reply)
}

/// A request as it came off the socket.
struct Received {
    request: u32,
    flags: u32,
    body: Vec<u8>,
    fd: Option<Arc<File>>,
}

/// One request with the descriptor sent with it; `None` once the frontend hung up.
fn receive(stream: &UnixStream) -> Option<Received> {
    let mut header = [0u8; 12];
    let (n, fd) = stream.recv_with_fd(&mut header).ok()?;
    if n == 0 {
        return None;
    }
    let mut reader = stream;
    reader.read_exact(&mut header[n..]).ok()?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
    let mut body = vec![0u8; word(8) as usize];
    reader.read_exact(&mut body).ok()?;
    Some(Received {
        request: word(0),
        flags: word(4),
        body,
        fd: fd.map(Arc::new),
    })
}
