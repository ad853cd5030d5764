//! Creating new qcow2 images with the options qemu-img's qcow2 driver takes.

use std::path::Path;
use std::sync::Arc;

use crate::engine::meta::encode_u64_table;
use crate::engine::Qcow2;
use crate::error::{Error, Result};
use crate::file_attributes::FileAttributes;
use crate::format::header::{
    default_feature_names, CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::format::tables;
use crate::image::Image;
use crate::lock::{self, Locking, Perms};
use crate::open::OpenOptions;
use crate::storage::{FileStorage, Storage};

/// How much of the image to allocate at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata skeleton.
    #[default]
    Off,
    /// L2 tables and data clusters mapped (data reads as zeros from the sparse file).
    Metadata,
    /// As `Metadata`, plus fallocate of the data.
    Falloc,
    /// As `Metadata`, plus writing zeros to the data.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names.
    pub fn from_name(s: &str) -> Option<Preallocation> {
        Some(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }
}

/// Options for a new qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Cluster size in bytes (power of two, 512 B – 2 MiB).
    pub cluster_size: u64,
    /// Refcount width in bits (power of two, 1 – 64).
    pub refcount_bits: u32,
    /// Set the lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// The external data file is a valid raw image.
    pub data_file_raw: bool,
    /// Compression algorithm for compressed clusters.
    pub compression_type: CompressionType,
    /// Extended L2 entries (32 subclusters per cluster; v3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// QEMU-compatible locks while the files are created (see [`crate::lock`]).
    pub locking: Locking,
    /// Attributes of the image file (copy-on-write off, extent size hint).
    pub file: FileAttributes,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            compression_type: CompressionType::Deflate,
            extended_l2: false,
            preallocation: Preallocation::Off,
            locking: Locking::Off,
            file: FileAttributes::default(),
        }
    }
}

impl CreateOptions {
    /// Checks option combinations, with qemu-img's error messages.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidOption(m.into()));
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version == 2 {
            // In QEMU's order.
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.lazy_refcounts {
                return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
            }
            if self.data_file.is_some() {
                return bad("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
            if self.compression_type != CompressionType::Deflate {
                return bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
            }
        } else if self.version != 3 {
            return bad("Invalid compatibility level");
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            // The preallocated clusters would hide the backing file (subclusters can stay
            // unallocated in a preallocated cluster).
            return bad("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.size > (1 << 62) {
            return bad("Image size too large");
        }
        Ok(())
    }
}

/// Creates a qcow2 image at `path` (truncating any existing file), its size rounded up to a
/// multiple of 512 as QEMU does. As QEMU's qcow2 driver, the options are checked once the
/// file is created (and locked, so that an image in use is refused, not destroyed), and a file
/// emptied for an image that cannot be made is removed.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.file.validate().map_err(Error::InvalidOption)?;
    let file = create_file(path, opts.locking)?;
    if let Some(e) = opts.file.apply(&file) {
        tracing::warn!("Failed to set extent size hint: {e}");
    }
    let made = make(file, opts);
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Checks `opts` and makes the image in `file` (and its external data file, if any).
fn make(file: std::fs::File, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    // QEMU rounds the virtual size up to whole 512-byte sectors.
    let mut opts = CreateOptions {
        size: opts.size.next_multiple_of(512),
        ..opts.clone()
    };
    if let Some(name) = &opts.data_file {
        // As QEMU: relative to the working directory (not the image's), `file:NAME`
        // recorded as NAME, other protocols refused.
        let name =
            crate::name::new_file_name(name).map_err(|e| Error::InvalidOption(e.to_string()))?;
        let df = std::path::PathBuf::from(&name);
        opts.data_file = Some(name);
        // Empty when preallocated: the preallocation extends it (sparse for metadata), with
        // no zeros to write over what a new file does not hold.
        let len = match preallocation(&opts) {
            Preallocation::Off => opts.size,
            _ => 0,
        };
        create_file(&df, opts.locking)?
            .set_len(len)
            .map_err(|e| Error::io(format!("Could not create '{}'", df.display()), e))?;
    }
    fill(file, &opts)
}

/// The preallocation a new image gets: as asked, but as QEMU at least metadata for a raw
/// data file, which is a standalone image only if every cluster maps onto it.
fn preallocation(opts: &CreateOptions) -> Preallocation {
    match opts.preallocation {
        Preallocation::Off if opts.data_file_raw => Preallocation::Metadata,
        p => p,
    }
}

/// Writes the new image `opts` describes into `file`, preallocating as asked.
fn fill(file: std::fs::File, opts: &CreateOptions) -> Result<()> {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    write_skeleton(&*storage, opts)?;
    let preallocation = preallocation(opts);
    if preallocation != Preallocation::Off {
        let img = Qcow2::open_storage(storage, &OpenOptions::default(), None)?;
        img.preallocate(preallocation)?;
        img.flush()?;
    }
    Ok(())
}

/// Creates (or empties) the file at `path` for a new image, as QEMU does: it is opened
/// without truncation, locked as a writer and resizer that keeps other resizers out, and
/// only then truncated, so that an image someone uses is refused, not destroyed.
pub fn create_file(path: &Path, locking: Locking) -> Result<std::fs::File> {
    let failed = |e| Error::io(format!("Could not create '{}'", path.display()), e);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(failed)?;
    if locking != Locking::Off {
        lock::acquire(&file, path, Perms::WRITE.with(Perms::RESIZE), Perms::RESIZE)?;
    }
    file.set_len(0).map_err(failed)?;
    Ok(file)
}

/// Writes header, refcount table, one refcount block and an empty L1 table.
pub fn write_skeleton(file: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
    let l1_size = opts.size.div_ceil(cs * l2_entries);
    if l1_size * 8 > crate::format::header::MAX_L1_BYTES {
        return Err(Error::InvalidOption(
            "Image size too large for this cluster size".into(),
        ));
    }
    // An empty disk has no L1 table at all (as in QEMU); a cluster for it would leak.
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let per_block = cs * 8 / opts.refcount_bits as u64;
    // header, reftable, refblock, L1 — plus extra refblocks if the L1 is huge.
    let mut blocks = 1u64;
    while 3 + l1_clusters + (blocks - 1) > blocks * per_block {
        blocks += 1;
    }
    let reftable_clusters = (blocks * 8).div_ceil(cs).max(1);
    let reftable_off = cs;
    let first_block = reftable_off + reftable_clusters * cs;
    let l1_off = first_block + blocks * cs;
    let used = l1_off / cs + l1_clusters;
    let mut incompat = 0;
    let mut compat = 0;
    let mut autoclear = 0;
    if opts.compression_type != CompressionType::Deflate {
        incompat |= INCOMPAT_COMPRESSION;
    }
    if opts.data_file.is_some() {
        incompat |= INCOMPAT_DATA_FILE;
    }
    if opts.extended_l2 {
        incompat |= INCOMPAT_EXTL2;
    }
    if opts.lazy_refcounts {
        compat |= COMPAT_LAZY_REFCOUNTS;
    }
    if opts.data_file_raw {
        autoclear |= AUTOCLEAR_DATA_FILE_RAW;
    }
    let header = Header {
        version: opts.version,
        cluster_bits,
        size: opts.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: reftable_off,
        refcount_table_clusters: reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompat,
        compatible_features: compat,
        autoclear_features: autoclear,
        refcount_order,
        header_length: if opts.version == 2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN
        },
        compression_type: opts.compression_type,
        extra_header_bytes: Vec::new(),
        backing_file: opts.backing_file.clone().map(Into::into),
        backing_format: opts.backing_format.clone(),
        data_file: opts.data_file.clone().map(Into::into),
        feature_names: if opts.version >= 3 {
            default_feature_names(cs)
        } else {
            Vec::new()
        },
        bitmaps: None,
        crypto: None,
        unknown_extensions: Vec::new(),
    };
    let bytes = header.serialize()?;
    let w = |buf: &[u8], off: u64, what: &str| {
        file.write_at(buf, off)
            .map_err(|e| Error::io(format!("writing {what}"), e))
    };
    file.set_len(0)
        .map_err(|e| Error::io("truncating the new image", e))?;
    // A whole header cluster, as QEMU writes it (so the file's blocks match too).
    let mut first_cluster = bytes;
    first_cluster.resize(first_cluster.len().max(cs as usize), 0);
    w(&first_cluster, 0, "header")?;
    let mut reftable = vec![0u64; (reftable_clusters * cs / 8) as usize];
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per_block {
            let c = b * per_block + i;
            if c < used {
                tables::set_refcount(&mut block, refcount_order, i as usize, 1);
            }
        }
        let off = first_block + b * cs;
        w(&block, off, "refcount block")?;
        reftable[b as usize] = off;
    }
    w(&encode_u64_table(&reftable), reftable_off, "refcount table")?;
    // As in QEMU, the file ends right after the L1 table's entries (its cluster is counted).
    w(&vec![0u8; (l1_size * 8) as usize], l1_off, "L1 table")?;
    file.flush()
        .map_err(|e| Error::io("flushing the new image", e))
}

impl Qcow2 {
    /// Maps every guest cluster to a host cluster (preallocation=metadata/falloc/full).
    pub fn preallocate(&self, mode: Preallocation) -> Result<()> {
        self.preallocate_from(mode, 0)
    }

    /// Maps the unallocated guest clusters from byte `from` to the end of the disk (all of
    /// them must be unallocated except the one containing `from`).
    pub fn preallocate_from(&self, mode: Preallocation, from: u64) -> Result<()> {
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cs = self.cluster_size();
        let clusters = self.size().div_ceil(cs);
        let per_l2 = self.meta().geo.l2_entries();
        let mut c = from / cs;
        // The cluster holding `from` is left alone when it is allocated, or when it is partial
        // and may show the backing file: before `from` it holds guest data.
        let partial = from % cs != 0 && self.has_backing_file();
        if c < clusters
            && (partial || self.l2_entry(c)? != crate::format::tables::L2Entry::Unallocated)
        {
            c += 1;
        }
        while c < clusters {
            let n = (per_l2 - c % per_l2).min(clusters - c);
            // As QEMU lays them out: each L2 table before the clusters it maps.
            let (host, n) = if self.has_data_file() {
                (c * cs, n)
            } else {
                self.reserve_clusters(c, n)?
            };
            if let Err(e) = self.fill_preallocated(mode, host, n * cs) {
                // Never mapped: given back, not leaked (as QEMU's qcow2_alloc_cluster_abort).
                if !self.has_data_file() {
                    self.meta_mut().free_later(host, n * cs);
                }
                return Err(e);
            }
            self.map_preallocated(c, n, host)?;
            c += n;
        }
        Ok(())
    }

    /// Makes the `len` bytes of data at `host` ready for a preallocated mapping in `mode`:
    /// zeros where the file already has bytes there, space claimed or written past them.
    fn fill_preallocated(&self, mode: Preallocation, host: u64, len: u64) -> Result<()> {
        let data = self.data_storage();
        let file_len = data.len().map_err(|e| Error::io("getting file size", e))?;
        // Clusters reused inside the file (after a resize) may hold stale bytes.
        if host < file_len && matches!(mode, Preallocation::Metadata | Preallocation::Falloc) {
            write_zeros(&**data, host, (host + len).min(file_len) - host)
                .map_err(|e| Error::io("zeroing preallocated clusters", e))?;
        }
        match mode {
            Preallocation::Off => Ok(()),
            Preallocation::Metadata => data.set_len(file_len.max(host + len)),
            // The length too: a file system without fallocate claims nothing, but the file
            // still reaches the mapped clusters.
            Preallocation::Falloc => data
                .allocate(host, len)
                .and_then(|()| data.set_len(file_len.max(host + len))),
            Preallocation::Full => write_zeros(&**data, host, len),
        }
        .map_err(|e| Error::io("preallocating data", e))
    }
}

fn write_zeros(data: &dyn Storage, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        data.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
