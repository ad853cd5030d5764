//! The disk a daemon serves: an opened image plus what the guest is told about it.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{FileStorage, Format, Image, Locking, RawImage};
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

/// Largest physical block size reported to the guest; larger host blocks become the optimal
/// I/O size instead (guests cope badly with physical blocks above a page).
pub const MAX_PHYSICAL_BLOCK: u64 = 4096;

/// How the disk prefers to be accessed (VIRTIO_BLK_F_TOPOLOGY); sizes in 512-byte logical
/// blocks, as in `struct virtio_blk_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first physically aligned logical block.
    pub alignment_offset: u8,
    /// Smallest I/O that needs no read-modify-write: the physical block.
    pub min_io_size: u16,
    /// Preferred I/O size (0: no preference).
    pub opt_io_size: u32,
}

impl Default for Topology {
    /// 512-byte physical blocks, no preference.
    fn default() -> Self {
        Topology {
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
        }
    }
}

impl Topology {
    /// The topology of an image stored in a file whose host block size (`st_blksize`: the
    /// file system block, or the device block for a block device) is `host_block`; qcow2
    /// images pass their cluster size, which becomes the optimal I/O size (a write of whole
    /// clusters never copies on write).
    pub fn new(host_block: u64, cluster_size: Option<u64>) -> Topology {
        let pow2_floor = |x: u64| 1u64 << (63 - x.max(1).leading_zeros());
        let physical = pow2_floor(host_block.clamp(SECTOR_SIZE, MAX_PHYSICAL_BLOCK));
        let opt = match cluster_size {
            Some(c) => c.max(physical),
            None if host_block > physical => pow2_floor(host_block),
            None => 0,
        };
        Topology {
            physical_block_exp: (physical >> SECTOR_SHIFT).trailing_zeros() as u8,
            alignment_offset: 0,
            min_io_size: (physical >> SECTOR_SHIFT) as u16,
            opt_io_size: u32::try_from(opt >> SECTOR_SHIFT).unwrap_or(u32::MAX),
        }
    }
}

/// An image shared by all queues, with its guest-visible properties.
pub struct Disk {
    image: Arc<dyn Image>,
    read_only: bool,
    capacity: u64,
    serial: [u8; ID_BYTES],
    discard_alignment: u32,
    topology: Topology,
    probed_raw: bool,
}

impl Disk {
    /// Opens the image described by `opts`.
    ///
    /// Raw images are opened here (not through `qcow2::open_image`) to honour `--direct` and
    /// the probing rules; qcow2 goes through the qcow2 engine. Both are locked as QEMU locks
    /// them, so that an image QEMU or qemu-img uses is refused, and they refuse ours.
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
                // Only a guess of raw is dangerous (the guest could make the disk look like
                // another format), so QEMU warns only then.
                if format == Format::Raw {
                    tracing::warn!(
                        "image format was not specified for '{}' and probing guessed raw; \
                         writing a format signature to sector 0 is refused; specify --format \
                         raw to remove this warning and the restriction",
                        opts.path.display(),
                    );
                }
                format
            }
        };
        let image: Arc<dyn Image> = match format {
            Format::Raw => {
                let file = open_raw(&opts.path, opts.read_only, opts.direct).map_err(|e| {
                    open_error(qcow2::Error::io(
                        format!("Could not open '{}'", opts.path.display()),
                        e,
                    ))
                })?;
                let writable = !opts.read_only;
                qcow2::lock::lock_image_file(&file, &opts.path, Locking::Device, format, writable)
                    .map_err(open_error)?;
                let storage = Arc::new(FileStorage::new(file));
                Arc::new(RawImage::in_sectors(storage, opts.read_only).map_err(open_error)?)
            }
            Format::Qcow2 => {
                let open_opts = qcow2::OpenOptions {
                    read_only: opts.read_only,
                    format: Some(Format::Qcow2),
                    direct: opts.direct,
                    locking: Locking::Device,
                    // A guest's discards give the host its space back, as QEMU's
                    // `discard=unmap` does (raw images punch holes too).
                    unmap: true,
                    ..Default::default()
                };
                Arc::from(qcow2::open_image(&opts.path, &open_opts).map_err(open_error)?)
            }
        };
        let cluster_size = (format == Format::Qcow2).then(|| qcow2_cluster_size(&opts.path));
        // Partial clusters are not released; raw discards go by file system block.
        let alignment = cluster_size.unwrap_or(4096);
        let host_block = std::fs::metadata(&opts.path).map_or(SECTOR_SIZE, |m| m.blksize());
        let disk = Disk::new(image, opts.serial.as_deref(), alignment)?;
        Ok(Disk {
            topology: Topology::new(host_block, cluster_size),
            probed_raw: opts.format.is_none() && format == Format::Raw,
            ..disk
        })
    }

    /// Wraps an opened image. `discard_alignment` is the discard granularity in bytes; the
    /// topology is the default one (512-byte blocks, no preference).
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
            topology: Topology::default(),
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

    /// The block topology the guest is told about.
    pub fn topology(&self) -> Topology {
        self.topology
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

    /// Flushes and marks the image clean (qcow2 lazy refcounts), for shutdown.
    pub fn close(&self) -> Result<()> {
        self.image.close().map_err(Error::Flush)
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

/// The cluster size of a qcow2 image (64 KiB if the header cannot be read again).
fn qcow2_cluster_size(path: &Path) -> u64 {
    const QCOW2_CLUSTER_BITS_OFFSET: u64 = 20;
    let mut bits = [0u8; 4];
    let read = File::open(path).and_then(|f| f.read_exact_at(&mut bits, QCOW2_CLUSTER_BITS_OFFSET));
    match read {
        // The qcow2 crate accepted the header, so cluster_bits is in 9..=21.
        Ok(()) => 1u64 << u32::from_be_bytes(bits).clamp(9, 21),
        Err(_) => 64 << 10,
    }
}

/// Whether `data` (the start of sector 0) would make format probing see something other
/// than a raw image.
pub fn looks_like_image_format(data: &[u8]) -> bool {
    qcow2::open::probe_head(data).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_follows_the_host_block_and_the_cluster() {
        // ext4 (4 KiB blocks), raw: 4 KiB physical blocks, no preferred size.
        let t = Topology::new(4096, None);
        assert_eq!(
            (t.physical_block_exp, t.min_io_size, t.opt_io_size),
            (3, 8, 0)
        );
        // qcow2 with 64 KiB clusters on the same file system.
        let t = Topology::new(4096, Some(64 << 10));
        assert_eq!(
            (t.physical_block_exp, t.min_io_size, t.opt_io_size),
            (3, 8, 128)
        );
        // 512-byte clusters never go below the physical block.
        assert_eq!(Topology::new(4096, Some(512)).opt_io_size, 8);
        // Huge host blocks become the preferred size, not the physical block.
        let t = Topology::new(1 << 20, None);
        assert_eq!(
            (t.physical_block_exp, t.min_io_size, t.opt_io_size),
            (3, 8, 2048)
        );
        // Nonsense from the host: 0 or not a power of two.
        assert_eq!(Topology::new(0, None), Topology::default());
        assert_eq!(Topology::new(3000, None).physical_block_exp, 2);
    }
}
