//! The disk a daemon serves: an opened image plus what the guest is told about it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{Format, Image};
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
}

impl Disk {
    /// Opens the image described by `opts`.
    pub fn open(opts: &DiskOptions) -> Result<Disk> {
        let open_opts = qcow2::OpenOptions {
            read_only: opts.read_only,
            format: opts.format,
            direct: opts.direct,
            ..Default::default()
        };
        let image = qcow2::open_image(&opts.path, &open_opts).map_err(|source| Error::Open {
            path: opts.path.clone(),
            source,
        })?;
        let probed_raw = opts.format.is_none() && image.format() == Format::Raw;
        if opts.format.is_none() {
            tracing::warn!(
                "image format was not specified for '{}' and probing guessed {}; specify --format \
                 to remove this warning{}",
                opts.path.display(),
                image.format().name(),
                if probed_raw {
                    " and the restriction on writing a format signature to sector 0"
                } else {
                    ""
                }
            );
        }
        let discard_alignment = discard_alignment(&opts.path, image.format());
        let disk = Disk::new(Arc::from(image), opts.serial.as_deref(), discard_alignment)?;
        Ok(Disk {
            probed_raw,
            ..disk
        })
    }

    /// Wraps an opened image. `discard_alignment` is the discard granularity in bytes.
    pub fn new(image: Arc<dyn Image>, serial: Option<&str>, discard_alignment: u64) -> Result<Disk> {
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

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.image.flush().map_err(Error::Flush)
    }
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
    data.len() >= 4 && u32::from_be_bytes([data[0], data[1], data[2], data[3]]) == qcow2::format::header::MAGIC
}
