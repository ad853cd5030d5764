//! The `vmm` command line (issues 7 and 8) and the typed configuration it produces.
//!
//! Device options are Cloud Hypervisor style key=value lists:
//! - `--disk socket=PATH[,num_queues=N][,queue_size=N][,readonly]`: an externally managed
//!   vhost-user-blk backend (vhost-blk, qemu-storage-daemon, ...);
//! - `--disk path=IMAGE[,format=raw|qcow2][,num_queues=N][,queue_size=N][,readonly]`: the VMM
//!   starts a `vhost-blk` child for the image;
//! - `--net socket=PATH[,mac=MAC][,num_queues=N][,queue_size=N]`: an externally managed
//!   vhost-user-net backend;
//! - `--net tap=NAME[,mac=MAC][,mtu=N][,ip=ADDR/PREFIX][,num_queues=N][,queue_size=N]`: the
//!   VMM starts a `vhost-net` child on that TAP (`ip` is the host side's address on it).
//!
//! As in Cloud Hypervisor, `num_queues` of a NIC counts rx and tx queues (2 per queue pair).

use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

use crate::error::{Error, Result};
use crate::kv::{parse_decimal, OptionList};
use crate::memory::{parse_size, MemoryLayout};
use cowbird_daemon::net::{parse_tap_name, MacAddress};
use cowbird_daemon::socket::{self, SocketError};

/// Kernel command line used when `--cmdline` is not given: console on the 8250 at 0x3f8,
/// reboot through the keyboard controller (which ends the VMM), reboot at once on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Longest kernel command line: x86 COMMAND_LINE_SIZE (2048) minus the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Most vCPUs: xAPIC IDs are 8 bits, 0xff is the broadcast ID, and the MP table gives the
/// IOAPIC an ID after the CPUs'.
pub const MAX_VCPUS: u8 = 254;
/// Default guest memory.
pub const DEFAULT_MEMORY: &str = "512M";
/// Largest split virtqueue size the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default disk queue size (Cloud Hypervisor's).
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;
/// Default NIC queue size (Cloud Hypervisor's and QEMU's).
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;
/// Most queues per disk: each takes an MSI-X vector and a backend worker, and no VM here has
/// more than [`MAX_VCPUS`] vCPUs to drive them.
pub const MAX_DISK_QUEUES: u16 = 256;
/// Most queues per NIC: 256 queue pairs, the Linux TUN driver's limit (`MAX_TAP_QUEUES`).
pub const MAX_NET_QUEUES: u16 = 512;

/// A lean KVM virtual machine monitor whose disks and NICs are vhost-user devices.
#[derive(Debug, Clone, Parser)]
#[command(name = "vmm", version)]
pub struct Cli {
    /// Guest kernel: an ELF vmlinux (booted through PVH) or a bzImage.
    #[arg(long, value_name = "FILE", value_parser = parse_file_path)]
    pub kernel: PathBuf,

    /// Initramfs to load for the kernel.
    #[arg(long, value_name = "FILE", value_parser = parse_file_path)]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE, value_parser = parse_cmdline)]
    pub cmdline: String,

    /// Number of vCPUs, 1..=254.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,

    /// Guest RAM: bytes, or a number with a K, M, G or T suffix (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEMORY, value_parser = parse_memory)]
    pub memory: MemoryLayout,

    /// Back guest RAM with 2 MiB huge pages (hugetlbfs memfd); the memory size must be a
    /// multiple of 2 MiB and the host must have enough free huge pages
    /// (/proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub hugepages: bool,

    /// Disks, in order: `socket=PATH[,num_queues=N,queue_size=N][,readonly]` or
    /// `path=IMAGE[,format=raw|qcow2][,num_queues=N,queue_size=N][,readonly]`.
    #[arg(
        long = "disk",
        value_name = "OPTIONS",
        help = "A disk: socket=PATH[,num_queues=N,queue_size=N][,readonly], or \
                path=IMAGE[,format=raw|qcow2][,num_queues=N,queue_size=N][,readonly]. Repeatable"
    )]
    pub disks: Vec<DiskConfig>,

    /// NICs, in order: `socket=PATH[,mac=MAC,num_queues=N,queue_size=N]` or
    /// `tap=NAME[,mac=MAC,mtu=N,ip=ADDR/PREFIX,num_queues=N,queue_size=N]`; `num_queues` counts rx and tx
    /// queues.
    #[arg(
        long = "net",
        value_name = "OPTIONS",
        help = "A NIC: socket=PATH[,mac=MAC,num_queues=N,queue_size=N], or \
                tap=NAME[,mac=MAC,mtu=N,ip=ADDR/PREFIX,num_queues=N,queue_size=N]. num_queues counts rx and \
                tx queues. Repeatable"
    )]
    pub nets: Vec<NetConfig>,

    /// Serial console (8250 at 0x3f8): stdio, file=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: SerialConfig,

    /// Unix socket for the JSON control plane (info, pause, resume, shutdown, counters).
    #[arg(long, value_name = "PATH", value_parser = socket::parse_path)]
    pub api_socket: Option<PathBuf>,
}

impl Cli {
    /// The validated VM configuration, after checks that involve several options.
    pub fn into_config(self) -> Result<VmConfig> {
        let config = VmConfig {
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            cpus: self.cpus,
            memory: self.memory,
            hugepages: self.hugepages,
            disks: self.disks,
            nets: self.nets,
            serial: self.serial,
            api_socket: self.api_socket,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (devices the VMM adds are appended by the boot code).
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM and its physical layout.
    pub memory: MemoryLayout,
    /// Whether guest RAM comes from 2 MiB huge pages.
    pub hugepages: bool,
    /// Disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// NICs, in PCI slot order after the disks.
    pub nets: Vec<NetConfig>,
    /// Serial console.
    pub serial: SerialConfig,
    /// Control plane socket.
    pub api_socket: Option<PathBuf>,
}

impl VmConfig {
    /// Checks what no single option can: a socket used twice, a TAP or MAC given to two NICs,
    /// a writable image given to two disks. Paths are compared as given, without touching the
    /// filesystem.
    pub fn validate(&self) -> Result<()> {
        if self.hugepages && self.memory.size() % HUGE_PAGE_SIZE != 0 {
            return Err(Error::InvalidMemorySize {
                size: self.memory.size(),
                reason: "--hugepages needs a multiple of 2 MiB".into(),
            });
        }
        let mut sockets: Vec<(&PathBuf, String)> = Vec::new();
        if let Some(api) = &self.api_socket {
            sockets.push((api, "--api-socket".into()));
        }
        let mut images: Vec<(&PathBuf, bool, String)> = Vec::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let who = format!("--disk #{}", i + 1);
            match &disk.backend {
                DiskBackend::Socket(path) => sockets.push((path, who)),
                DiskBackend::Image { path, .. } => images.push((path, disk.readonly, who)),
            }
        }
        let mut taps: Vec<(&str, String)> = Vec::new();
        let mut macs: Vec<(MacAddress, String)> = Vec::new();
        for (i, net) in self.nets.iter().enumerate() {
            let who = format!("--net #{}", i + 1);
            match &net.backend {
                NetBackend::Socket(path) => sockets.push((path, who.clone())),
                // A template such as tap%d gets a fresh name from the kernel each time.
                NetBackend::Tap { name, .. } if !name.contains('%') => {
                    taps.push((name, who.clone()))
                }
                NetBackend::Tap { .. } => {}
            }
            if let Some(mac) = net.mac {
                macs.push((mac, who));
            }
        }

        for (i, (path, second)) in sockets.iter().enumerate() {
            if let Some((_, first)) = sockets[..i].iter().find(|(p, _)| p == path) {
                return Err(Error::DuplicateSocket {
                    path: (*path).clone(),
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
        for (i, (path, readonly, second)) in images.iter().enumerate() {
            if let Some((_, first_ro, first)) = images[..i].iter().find(|(p, _, _)| p == path) {
                if !(*readonly && *first_ro) {
                    return Err(Error::SharedWritableImage {
                        path: (*path).clone(),
                        first: first.clone(),
                        second: second.clone(),
                    });
                }
            }
        }
        for (i, (name, second)) in taps.iter().enumerate() {
            if let Some((_, first)) = taps[..i].iter().find(|(n, _)| n == name) {
                return Err(Error::DuplicateTap {
                    name: (*name).to_owned(),
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
        for (i, (mac, second)) in macs.iter().enumerate() {
            if let Some((_, first)) = macs[..i].iter().find(|(m, _)| m == mac) {
                return Err(Error::DuplicateMac {
                    mac: mac.to_string(),
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
        // The queues a Linux guest starts: a disk's up to one per vCPU, every queue of a NIC
        // and the control queue its backend may add.
        let queues = self
            .disks
            .iter()
            .map(|d| usize::from(d.num_queues.min(u16::from(self.cpus))))
            .sum::<usize>()
            + self
                .nets
                .iter()
                .map(|n| usize::from(n.num_queues) + 1)
                .sum::<usize>();
        if queues > MAX_DOORBELLS {
            return Err(Error::TooManyQueues {
                queues,
                max: MAX_DOORBELLS,
            });
        }
        Ok(())
    }
}

/// Queue doorbells (KVM ioeventfds, one per queue) a VM can have: KVM's MMIO bus takes 1000
/// devices (`NR_IOBUS_DEVS`), one of them the in-kernel IOAPIC.
pub const MAX_DOORBELLS: usize = 999;

/// Size of the huge pages `--hugepages` uses.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Image formats a spawned `vhost-blk` can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw image: guest bytes are file bytes.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            _ => Err("expected raw or qcow2".into()),
        }
    }
}

/// Who serves a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    /// An externally managed vhost-user-blk backend listening on this socket.
    Socket(PathBuf),
    /// A `vhost-blk` child the VMM starts for this image.
    Image {
        /// The image file.
        path: PathBuf,
        /// Its format; `None` lets `vhost-blk` detect it.
        format: Option<ImageFormat>,
    },
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Where the disk is served from.
    pub backend: DiskBackend,
    /// Number of request queues, 1..=[`MAX_DISK_QUEUES`].
    pub num_queues: u16,
    /// Size of each queue: a power of two up to 32768.
    pub queue_size: u16,
    /// Whether the guest sees a read-only disk (VIRTIO_BLK_F_RO).
    pub readonly: bool,
}

impl DiskConfig {
    const KEYS: &'static [&'static str] = &[
        "socket",
        "path",
        "format",
        "num_queues",
        "queue_size",
        "readonly",
    ];
}

impl FromStr for DiskConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let list = OptionList::parse(s, Self::KEYS)?;
        let backend = match (list.value("socket")?, list.value("path")?) {
            (Some(_), Some(_)) => {
                return Err(Error::ConflictingKeys {
                    first: "socket",
                    second: "path",
                })
            }
            (Some(socket), None) => {
                if list.has("format") {
                    return Err(Error::ConflictingKeys {
                        first: "socket",
                        second: "format",
                    });
                }
                DiskBackend::Socket(socket_key(socket)?)
            }
            (None, Some(path)) => DiskBackend::Image {
                path: PathBuf::from(path),
                format: list.parsed("format", |v| v.parse())?,
            },
            (None, None) => {
                return Err(Error::MissingKey {
                    expected: "socket=PATH or path=IMAGE",
                })
            }
        };
        Ok(Self {
            backend,
            num_queues: list
                .parsed("num_queues", |v| bounded(v, 1, MAX_DISK_QUEUES, "queues"))?
                .unwrap_or(1),
            queue_size: list
                .parsed("queue_size", queue_size)?
                .unwrap_or(DEFAULT_DISK_QUEUE_SIZE),
            readonly: list.flag("readonly")?,
        })
    }
}

/// Who serves a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// An externally managed vhost-user-net backend listening on this socket.
    Socket(PathBuf),
    /// A `vhost-net` child the VMM starts on this TAP device.
    Tap {
        /// The TAP interface name (or a `%d` template).
        name: String,
        /// MTU to offer the guest and set on the TAP; the backend's default if `None`.
        mtu: Option<u16>,
        /// Address and prefix length for the host side of the TAP (`ip=10.0.0.1/24`).
        host_ip: Option<String>,
    },
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Where the NIC is served from.
    pub backend: NetBackend,
    /// The guest's MAC address; the backend picks one if `None`.
    pub mac: Option<MacAddress>,
    /// Number of rx plus tx queues: even, 2..=[`MAX_NET_QUEUES`].
    pub num_queues: u16,
    /// Size of each queue: a power of two up to 32768.
    pub queue_size: u16,
}

impl NetConfig {
    const KEYS: &'static [&'static str] = &[
        "socket",
        "tap",
        "mac",
        "mtu",
        "ip",
        "num_queues",
        "queue_size",
    ];

    /// Number of rx/tx queue pairs (`num_queues / 2`).
    pub fn queue_pairs(&self) -> u16 {
        self.num_queues / 2
    }
}

impl FromStr for NetConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let list = OptionList::parse(s, Self::KEYS)?;
        let backend = match (list.value("socket")?, list.value("tap")?) {
            (Some(_), Some(_)) => {
                return Err(Error::ConflictingKeys {
                    first: "socket",
                    second: "tap",
                })
            }
            (Some(socket), None) => {
                if list.has("mtu") || list.has("ip") {
                    // The MTU lives in the backend's config space; only a backend we start
                    // can be told it.
                    return Err(Error::ConflictingKeys {
                        first: "socket",
                        second: if list.has("mtu") { "mtu" } else { "ip" },
                    });
                }
                NetBackend::Socket(socket_key(socket)?)
            }
            (None, Some(tap)) => NetBackend::Tap {
                name: parse_tap_name(tap).map_err(|e| Error::InvalidValue {
                    key: "tap".into(),
                    value: tap.to_owned(),
                    reason: e.reason(),
                })?,
                mtu: list.parsed("mtu", |v| bounded(v, 68, u16::MAX, "MTU"))?,
                host_ip: list.parsed("ip", |v| match v.split_once('/') {
                    Some((addr, prefix))
                        if addr.parse::<std::net::IpAddr>().is_ok()
                            && prefix.parse::<u8>().is_ok() =>
                    {
                        Ok(v.to_owned())
                    }
                    _ => Err("expected ADDRESS/PREFIX, e.g. 10.0.0.1/24".to_owned()),
                })?,
            },
            (None, None) => {
                return Err(Error::MissingKey {
                    expected: "socket=PATH or tap=NAME",
                })
            }
        };
        let mac = list.parsed("mac", |v| {
            v.parse::<MacAddress>()
                .and_then(MacAddress::check_unicast)
                .map_err(|e| e.reason())
        })?;
        let num_queues = list
            .parsed("num_queues", |v| {
                let n = bounded(v, 2, MAX_NET_QUEUES, "queues")?;
                if n % 2 != 0 {
                    return Err("must be even: it counts rx and tx queues, 2 per queue pair".into());
                }
                Ok(n)
            })?
            .unwrap_or(2);
        Ok(Self {
            backend,
            mac,
            num_queues,
            queue_size: list
                .parsed("queue_size", queue_size)?
                .unwrap_or(DEFAULT_NET_QUEUE_SIZE),
        })
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdin and stdout.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No serial device.
    Off,
}

impl FromStr for SerialConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                Some(_) => Err(Error::MissingValue { key: "file".into() }),
                None => Err(Error::InvalidSerial {
                    input: s.to_owned(),
                }),
            },
        }
    }
}

/// A number in `min..=max`; `what` names the unit in the error.
fn bounded(s: &str, min: u16, max: u16, what: &str) -> std::result::Result<u16, String> {
    let n = parse_decimal(s)?;
    match u16::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{what} must be {min}..={max}")),
    }
}

/// A virtqueue size: a power of two in 1..=32768.
fn queue_size(s: &str) -> std::result::Result<u16, String> {
    let n = parse_decimal(s)?;
    match u16::try_from(n) {
        Ok(n) if n.is_power_of_two() && n <= MAX_QUEUE_SIZE => Ok(n),
        _ => Err("must be a power of two between 1 and 32768".into()),
    }
}

/// A `socket=` value, with the socket path checks as the reason.
fn socket_key(s: &str) -> Result<PathBuf> {
    socket::parse_path(s).map_err(|e| Error::InvalidValue {
        key: "socket".into(),
        value: s.to_owned(),
        reason: match e {
            SocketError::InvalidPath { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

/// `--kernel`, `--initramfs`: a non-empty path. Whether it can be read is found out when the
/// VM is built.
pub fn parse_file_path(s: &str) -> Result<PathBuf> {
    if s.is_empty() {
        return Err(Error::EmptyPath);
    }
    Ok(PathBuf::from(s))
}

/// `--cmdline`: at most [`MAX_CMDLINE_LEN`] bytes.
pub fn parse_cmdline(s: &str) -> Result<String> {
    if s.len() > MAX_CMDLINE_LEN {
        return Err(Error::CmdlineTooLong {
            len: s.len(),
            max: MAX_CMDLINE_LEN,
        });
    }
    Ok(s.to_owned())
}

/// `--cpus`: 1..=[`MAX_VCPUS`].
pub fn parse_cpus(s: &str) -> Result<u8> {
    let invalid = |reason: String| Error::InvalidNumber {
        input: s.to_owned(),
        reason,
    };
    let n = parse_decimal(s).map_err(invalid)?;
    match u8::try_from(n) {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "the number of vCPUs must be 1..={MAX_VCPUS}"
        ))),
    }
}

/// `--memory`: a size (see [`parse_size`]) the guest layout can use.
pub fn parse_memory(s: &str) -> Result<MemoryLayout> {
    MemoryLayout::new(parse_size(s)?)
}

#[cfg(test)]
mod tests;
