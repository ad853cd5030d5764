//! The Linux TAP device: one file descriptor per queue pair, vnet headers, offloads, and the
//! host side's address, MTU and link state.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for
//! more than one queue pair, through `/dev/net/tun`. A TAP created here is not made
//! persistent, so the kernel removes it when the last descriptor closes: on exit, on a crash,
//! on SIGKILL. An existing (persistent) TAP is attached to and left in place.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, PoisonError};

use crate::cli::IpCidr;
use crate::config::tun_offload;
use crate::error::{Error, Result};

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// A TAP device opened with one queue per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    created: bool,
    attached: Mutex<Vec<bool>>,
}

/// An `ifreq` whose name is `name`, everything else zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

/// The name stored in an `ifreq`.
fn ifreq_name(req: &libc::ifreq) -> String {
    // SAFETY: the kernel and `ifreq` NUL-terminate the name within IFNAMSIZ bytes; the last
    // byte is never written by `ifreq`.
    unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether an interface called `name` exists in the current network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// An AF_INET (or AF_INET6) datagram socket for interface ioctls.
fn control_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, request, arg)` with the errno as an `io::Error`.
///
/// # Safety
/// `arg` must be what `request` expects.
unsafe fn ioctl<T>(fd: RawFd, request: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates the TAP `name` (a `%d` template lets the kernel pick the number), or attaches to
    /// an existing one, with `queues` queues. Descriptors are non-blocking.
    pub fn open(name: &str, queues: u16) -> Result<Tap> {
        let multi = queues > 1;
        let existed = !name.contains('%') && interface_exists(name);
        let mut files = Vec::with_capacity(usize::from(queues));
        let mut actual = name.to_owned();
        for q in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_PATH)
                .map_err(|source| Error::TunUnavailable {
                    path: TUN_PATH,
                    source,
                })?;
            let mut req = ifreq(&actual);
            let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            if multi {
                flags |= libc::IFF_MULTI_QUEUE;
            }
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF takes a `struct ifreq`.
            if let Err(e) = unsafe { ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } {
                return Err(Self::setiff_error(&actual, existed || q > 0, multi, e));
            }
            if q == 0 {
                actual = ifreq_name(&req);
            }
            files.push(file);
        }
        let tap = Tap {
            name: actual,
            queues: files,
            created: !existed,
            attached: Mutex::new(vec![true; usize::from(queues)]),
        };
        // The vnet header is the point of the exercise: check the kernel kept it.
        let flags = tap.flags()?;
        if flags & libc::IFF_VNET_HDR == 0 || flags & libc::IFF_TAP == 0 {
            return Err(Error::TapConflict {
                name: tap.name.clone(),
                reason: format!("the kernel reports flags {flags:#x} without IFF_TAP|IFF_VNET_HDR"),
            });
        }
        Ok(tap)
    }

    /// Turns a TUNSETIFF failure into one clear error.
    fn setiff_error(name: &str, existed: bool, multi: bool, e: io::Error) -> Error {
        let conflict = |reason: String| Error::TapConflict {
            name: name.to_owned(),
            reason,
        };
        match e.raw_os_error() {
            Some(libc::EINVAL) if existed => conflict(format!(
                "it exists with different flags (not a TAP, or {} multi-queue); delete it or \
                 {} --num-queue-pairs",
                if multi { "not" } else { "already" },
                if multi { "drop" } else { "raise" }
            )),
            Some(libc::EBUSY) => {
                conflict("it is in use by another process (or has no free queue left)".to_owned())
            }
            Some(libc::EPERM) => conflict(
                "permission denied: it belongs to another user or CAP_NET_ADMIN is missing"
                    .to_owned(),
            ),
            _ => Error::Tap {
                name: name.to_owned(),
                op: "TUNSETIFF",
                source: e,
            },
        }
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Tap {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// The interface name (with any `%d` template resolved).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process created the device (it disappears when the process exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The descriptor of queue `q`.
    pub fn queue_fd(&self, q: usize) -> Option<RawFd> {
        self.queues.get(q).map(AsRawFd::as_raw_fd)
    }

    /// The device flags as the kernel reports them (TUNGETIFF).
    pub fn flags(&self) -> Result<libc::c_int> {
        let mut req = ifreq("");
        // SAFETY: TUNGETIFF fills a `struct ifreq`.
        unsafe { ioctl(self.queues[0].as_raw_fd(), libc::TUNGETIFF, &mut req) }
            .map_err(self.err("TUNGETIFF"))?;
        // SAFETY: TUNGETIFF wrote the flags member.
        Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
    }

    /// Sets the vnet header length the kernel reads and writes in front of every packet.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<()> {
        let mut len = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
        for q in &self.queues {
            // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
            unsafe { ioctl(q.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut len) }
                .map_err(self.err("TUNSETVNETHDRSZ"))?;
        }
        Ok(())
    }

    /// Sets the offloads the kernel may use on packets it hands us (TUNSETOFFLOAD).
    pub fn set_offload(&self, flags: u32) -> Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value as an unsigned long.
        let res = unsafe {
            libc::ioctl(
                self.queues[0].as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if res < 0 {
            return Err(self.err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Whether the kernel accepts UDP fragmentation offload on this device (then resets the
    /// offloads to none).
    pub fn supports_ufo(&self) -> bool {
        use tun_offload::*;
        let ok = self
            .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
            .is_ok();
        let _ = self.set_offload(0);
        ok
    }

    /// Attaches (`true`) or detaches queue `q` so that the kernel does (not) steer packets to
    /// it (TUNSETQUEUE); only meaningful on a multi-queue device. Idempotent.
    pub fn set_queue_attached(&self, q: usize, attach: bool) -> Result<()> {
        let mut attached = self.attached.lock().unwrap_or_else(PoisonError::into_inner);
        let (Some(state), Some(file)) = (attached.get_mut(q), self.queues.get(q)) else {
            return Ok(());
        };
        if *state == attach || self.queues.len() < 2 {
            return Ok(());
        }
        let mut req = ifreq("");
        let flags = if attach {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETQUEUE takes a `struct ifreq`.
        unsafe { ioctl(file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) }
            .map_err(self.err("TUNSETQUEUE"))?;
        *state = attach;
        Ok(())
    }

    /// Attaches the first `n` queues and detaches the others.
    pub fn set_active_queues(&self, n: usize) -> Result<()> {
        // Attach first so that the device never has zero queues.
        for q in 0..self.queues.len().min(n.max(1)) {
            self.set_queue_attached(q, true)?;
        }
        for q in n.max(1)..self.queues.len() {
            self.set_queue_attached(q, false)?;
        }
        Ok(())
    }

    /// Sets the interface MTU (SIOCSIFMTU).
    pub fn set_mtu(&self, mtu: u16) -> Result<()> {
        let sock = control_socket(libc::AF_INET).map_err(self.err("socket"))?;
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU takes a `struct ifreq`.
        unsafe { ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) }
            .map_err(self.err("SIOCSIFMTU"))
    }

    /// Brings the interface up (SIOCSIFFLAGS with IFF_UP).
    pub fn set_up(&self) -> Result<()> {
        let sock = control_socket(libc::AF_INET).map_err(self.err("socket"))?;
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills a `struct ifreq`.
        unsafe { ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) }
            .map_err(self.err("SIOCGIFFLAGS"))?;
        // SAFETY: the kernel wrote the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS takes a `struct ifreq`.
        unsafe { ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) }
            .map_err(self.err("SIOCSIFFLAGS"))
    }

    /// Assigns `cidr` to the interface (SIOCSIFADDR, plus SIOCSIFNETMASK for IPv4).
    pub fn add_address(&self, cidr: &IpCidr) -> Result<()> {
        match cidr.addr {
            IpAddr::V4(v4) => {
                let sock = control_socket(libc::AF_INET).map_err(self.err("socket"))?;
                let sockaddr = |bytes: [u8; 4]| {
                    let sin = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(bytes),
                        },
                        sin_zero: [0; 8],
                    };
                    // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes) and is plain data.
                    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
                };
                let mut req = ifreq(&self.name);
                req.ifr_ifru.ifru_addr = sockaddr(v4.octets());
                // SAFETY: SIOCSIFADDR takes a `struct ifreq`.
                unsafe { ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req) }
                    .map_err(self.err("SIOCSIFADDR"))?;
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(cidr.prefix_len))
                    .unwrap_or(0);
                let mut req = ifreq(&self.name);
                req.ifr_ifru.ifru_netmask = sockaddr(mask.to_be_bytes());
                // SAFETY: SIOCSIFNETMASK takes a `struct ifreq`.
                unsafe { ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req) }
                    .map_err(self.err("SIOCSIFNETMASK"))
            }
            IpAddr::V6(v6) => {
                let sock = control_socket(libc::AF_INET6).map_err(self.err("socket"))?;
                let index = {
                    let c = std::ffi::CString::new(self.name.as_str())
                        .map_err(|e| self.err("if_nametoindex")(io::Error::other(e)))?;
                    // SAFETY: `c` is a valid NUL-terminated string.
                    unsafe { libc::if_nametoindex(c.as_ptr()) }
                };
                if index == 0 {
                    return Err(self.err("if_nametoindex")(io::Error::last_os_error()));
                }
                let mut req = libc::in6_ifreq {
                    ifr6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ifr6_prefixlen: u32::from(cidr.prefix_len),
                    ifr6_ifindex: index as libc::c_int,
                };
                // SAFETY: SIOCSIFADDR on an AF_INET6 socket takes a `struct in6_ifreq`.
                unsafe { ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req) }
                    .map_err(self.err("SIOCSIFADDR"))
            }
        }
    }
}
