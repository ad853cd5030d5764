//! The disk a daemon serves: an opened image plus what the guest is told about it.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{FileStorage, Format, Image, RawImage, Storage};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::error::{Error, Result};
use crate::request::{SECTOR_SHIFT, SECTOR_SIZE};

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// The image file.
    pub path: PathBuf,
    /// Its format; probed (with a warning) when `None`.
    pub format: Option<Format>,
    /// Serve it read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// The serial the guest reads with GET_ID (at most 20 bytes are used).
    pub serial: Option<String>,
}

/// An image shared by all queues, with its guest-visible properties.
pub struct Disk {
    image: Arc<dyn Image>,
    read_only: bool,
    capacity: u64,
    serial: [u8; ID_BYTES],
    discard_alignment: u32,
    probed_raw: bool,
    /// The file under a raw image, for zero-copy I/O (keeps the descriptor open).
    raw: Option<Arc<dyn Storage>>,
}

impl Disk {
    /// Opens the image described by `opts`.
    ///
    /// Raw images are opened here (not through `qcow2::open_image`) so that the daemon keeps
    /// the file descriptor for zero-copy io_uring I/O; qcow2 goes through the qcow2 engine.
    pub fn open(opts: &DiskOptions) -> Result<Disk> {
        let open_error = |source| Error::Open {
            path: opts.path.clone(),
            direct: opts.direct,
            source,
        };
        let format = match opts.format {
            Some(f) => f,
            None => {
                // Probe without O_DIRECT: the probe reads 4 unaligned bytes.
                let file = File::open(&opts.path).map_err(|e| {
                    open_error(qcow2::Error::io(
                        format!("Could not open '{}'", opts.path.display()),
                        e,
                    ))
                })?;
                let format = qcow2::open::probe(&FileStorage::new(file)).map_err(open_error)?;
                tracing::warn!(
                    "image format was not specified for '{}' and probing guessed {}; specify \
                     --format to remove this warning{}",
                    opts.path.display(),
                    format.name(),
                    if format == Format::Raw {
                        " and the restriction on writing a format signature to sector 0"
                    } else {
                        ""
                    }
                );
                format
            }
        };
        let (image, raw): (Arc<dyn Image>, Option<Arc<dyn Storage>>) = match format {
            Format::Raw => {
                let file = open_raw(&opts.path, opts.read_only, opts.direct).map_err(|e| {
                    open_error(qcow2::Error::io(
                        format!("Could not open '{}'", opts.path.display()),
                        e,
                    ))
                })?;
                let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
                let image = RawImage::new(storage.clone(), opts.read_only).map_err(open_error)?;
                (Arc::new(image), Some(storage))
            }
            Format::Qcow2 => {
                let open_opts = qcow2::OpenOptions {
                    read_only: opts.read_only,
                    format: Some(Format::Qcow2),
                    direct: opts.direct,
                    ..Default::default()
                };
                let image = qcow2::open_image(&opts.path, &open_opts).map_err(open_error)?;
                (Arc::from(image), None)
            }
        };
        let alignment = discard_alignment(&opts.path, format);
        let disk = Disk::new(image, opts.serial.as_deref(), alignment)?;
        Ok(Disk {
            probed_raw: opts.format.is_none() && format == Format::Raw,
            raw,
            ..disk
        })
    }

    /// Wraps an opened image. `discard_alignment` is the discard granularity in bytes.
    pub fn new(
        image: Arc<dyn Image>,
        serial: Option<&str>,
        discard_alignment: u64,
    ) -> Result<Disk> {
        let size = image.size();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                "image size {size} is not a multiple of 512; the last {} bytes are not visible \
                 to the guest",
                size % SECTOR_SIZE
            );
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = serial {
            if s.len() > ID_BYTES {
                return Err(Error::InvalidOption(format!(
                    "serial '{s}' is longer than {ID_BYTES} bytes"
                )));
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let read_only = image.read_only();
        Ok(Disk {
            image,
            read_only,
            capacity: size >> SECTOR_SHIFT,
            serial: id,
            discard_alignment: u32::try_from(discard_alignment >> SECTOR_SHIFT)
                .unwrap_or(u32::MAX)
                .max(1),
            probed_raw: false,
            raw: None,
        })
    }

    /// The image.
    pub fn image(&self) -> &Arc<dyn Image> {
        &self.image
    }

    /// Whether the guest may not write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The GET_ID answer: the serial, zero-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// Discard granularity in sectors.
    pub fn discard_alignment(&self) -> u32 {
        self.discard_alignment
    }

    /// Whether this is a raw image whose format was guessed, so that sector 0 must never be
    /// made to look like another format (QEMU applies the same rule): otherwise a guest could
    /// turn its disk into a qcow2 image naming any host file as its backing file.
    pub fn guards_format_signature(&self) -> bool {
        self.probed_raw
    }

    /// The file descriptor of a raw image, for zero-copy I/O at guest offset = file offset.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.raw.as_ref().and_then(|s| s.raw_fd())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.image.flush().map_err(Error::Flush)
    }
}

/// Opens a raw image file as `qcow2::open_image` would.
fn open_raw(path: &Path, read_only: bool, direct: bool) -> std::io::Result<File> {
    let mut o = File::options();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Discard granularity in bytes: the cluster size for qcow2 (partial clusters are not
/// released), the file system block size for raw.
fn discard_alignment(path: &Path, format: Format) -> u64 {
    const QCOW2_CLUSTER_BITS_OFFSET: u64 = 20;
    match format {
        Format::Qcow2 => {
            let mut bits = [0u8; 4];
            let read = File::open(path)
                .and_then(|f| f.read_exact_at(&mut bits, QCOW2_CLUSTER_BITS_OFFSET));
            match read {
                // The qcow2 crate accepted the header, so cluster_bits is in 9..=21.
                Ok(()) => 1u64 << u32::from_be_bytes(bits).clamp(9, 21),
                Err(_) => 64 << 10,
            }
        }
        Format::Raw => 4096,
    }
}

/// Whether `data` (the start of sector 0) would make format probing see something other
/// than a raw image.
pub fn looks_like_image_format(data: &[u8]) -> bool {
    data.len() >= 4
        && u32::from_be_bytes([data[0], data[1], data[2], data[3]]) == qcow2::format::header::MAGIC
}
