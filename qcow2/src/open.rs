//! Opening images by path: format probing, backing chains and external data files.

use std::ffi::OsStr;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::Qcow2;
use crate::error::{Error, Result};
use crate::format::header::{MAGIC, MAX_L1_BYTES};
use crate::format::snapshot::{Snapshot, SnapshotRef};
use crate::image::{Format, Image};
use crate::lock::{self, Locking};
use crate::name::{NameError, NamedImage};
use crate::raw::RawImage;
use crate::storage::{FileStorage, Storage};

/// Deepest backing chain we follow before assuming a loop or a mistake.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open without write access (backing files are always read-only).
    pub read_only: bool,
    /// The format; probed from the first bytes when `None`.
    pub format: Option<Format>,
    /// Do not open the backing file (reads of unallocated clusters return zeros).
    pub no_backing: bool,
    /// Bytes of L2 table slices to cache; by default enough to map min(disk size, 64 GiB).
    pub l2_cache_bytes: Option<u64>,
    /// Bytes of refcount blocks to cache (QEMU's `refcount-cache-size`); 4 MiB by default,
    /// at least four blocks.
    pub refcount_cache_bytes: Option<u64>,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Do not claim file space for new metadata as it is allocated: a full file system then
    /// shows at the next flush rather than at the write that needed the table. Only for
    /// writers that fail as a whole on any error, such as a conversion (each claim is a
    /// system call).
    pub defer_space_claims: bool,
    /// Images already in this chain (canonical paths), to refuse loops.
    pub chain: Vec<PathBuf>,
    /// Open this internal snapshot of a qcow2 image instead of its current state (read-only;
    /// backing files are opened as they are). As with qemu-img's `-l`, the virtual size stays
    /// the image's current one: guest clusters past the snapshot's L1 table read as
    /// unallocated.
    pub snapshot: Option<SnapshotRef>,
    /// QEMU-compatible locks on the image's files (backing files as readers).
    pub locking: Locking,
    /// Open for `qemu-img check` (QEMU's BDRV_O_CHECK): a dirty image is left for the check
    /// to report and repair, and a writable open is allowed despite the corrupt bit, so
    /// that a repair can clear it.
    pub check: bool,
    /// Open to read metadata only (QEMU's BDRV_O_NO_IO, as `qemu-img info` does): read-only,
    /// guest data cannot be read ([`crate::Error::MetadataOnly`]), the external data file is
    /// not opened (nor needs to exist), and encrypted images open.
    pub metadata_only: bool,
    /// A writer that changes no guest data (internal snapshots taken or deleted, format
    /// options amended, the disk resized, which resizes the bitmaps): persistent dirty
    /// bitmaps stay valid, so their autoclear bit is kept. Any other writer clears it, as
    /// QEMU's drivers that do not maintain the bitmaps do.
    pub keep_bitmaps: bool,
    /// Like QEMU's `discard=unmap`: clusters whose last reference goes (a discard, a zero
    /// write; unlike QEMU's default, also freed tables and copied-away clusters) are released
    /// from the image file too (a hole punched, best effort), so the host gets the space
    /// back. Without it they are only marked free for reuse. Not for images with an external
    /// data file.
    pub unmap: bool,
}

/// Opens an image's file as QEMU's file driver does, for reading or also writing, with
/// O_DIRECT if `direct`. A directory opens for reading, so that case is refused by name (for
/// writing, open(2) refuses it).
pub fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str().is_empty() {
        return Err(Error::NoFileName);
    }
    if read_only && std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::NotAFile(path.to_path_buf()));
    }
    let mut o = FsOpenOptions::new();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))
}

/// Guesses the format from the first bytes of a file, as QEMU's probes do: qcow2 for its
/// magic followed by version 2 or later, or by version 1 (QEMU's older qcow format, which
/// opening then refuses by name); raw otherwise. As in QEMU, which probes a zero-padded
/// buffer, a file too short for a whole header counts too (opening it then fails). A file
/// in another format QEMU would recognise is refused ([`Error::UnsupportedFormat`]) rather
/// than served as raw.
pub fn probe(file: &dyn Storage) -> Result<Format> {
    let len = file.len().map_err(|e| Error::io("probing format", e))?;
    let mut start = [0u8; 512];
    let present = len.min(start.len() as u64) as usize;
    file.read_at(&mut start[..present], 0)
        .map_err(|e| Error::io("Could not read image for determining its format", e))?;
    match probe_head(&start) {
        Some("qcow2") => Ok(Format::Qcow2),
        Some(name) => Err(Error::UnsupportedFormat(name)),
        None => Ok(Format::Raw),
    }
}

/// The image format whose signature starts `head` (a file's first bytes, zero-padded as
/// QEMU pads its probe buffer), `None` for raw: "qcow2" for the qcow2 magic with version 2
/// or later, or version 1 (QEMU's older qcow, which opening then refuses by name), or
/// another format QEMU probes. Also what guards sector 0 of a probed raw image: a guest
/// must not write a signature there that makes the next probe see another format.
pub fn probe_head(head: &[u8]) -> Option<&'static str> {
    let mut padded = [0u8; 512];
    let n = head.len().min(padded.len());
    padded[..n].copy_from_slice(&head[..n]);
    let magic = u32::from_be_bytes(padded[..4].try_into().expect("4 bytes"));
    let version = u32::from_be_bytes(padded[4..8].try_into().expect("4 bytes"));
    if magic == MAGIC && version >= 1 {
        return Some("qcow2");
    }
    other_format(&padded)
}

/// The name of the image format whose signature starts `head` (the first 512 bytes of a
/// file), among the formats QEMU probes other than qcow2 and raw.
fn other_format(head: &[u8; 512]) -> Option<&'static str> {
    const PREFIXES: [(&[u8], &str); 11] = [
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"LUKS\xba\xbe", "luks"),
        (b"QED\0", "qed"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    ];
    /// VirtualBox's signature, little-endian at byte 64 of a VDI header.
    const VDI_SIGNATURE: u32 = 0xbeda_107f;
    if let Some(&(_, name)) = PREFIXES.iter().find(|(p, _)| head.starts_with(p)) {
        return Some(name);
    }
    let vdi = u32::from_le_bytes(head[64..68].try_into().expect("4 bytes"));
    (vdi == VDI_SIGNATURE).then_some("vdi")
}

/// Opens the image at `path` with its backing chain.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Image>> {
    if path.as_os_str().is_empty() {
        return Err(Error::NoFileName);
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    if opts.chain.contains(&canonical) {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: "backing chain contains a loop".into(),
        });
    }
    if opts.chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
        });
    }
    let file = FileStorage::new(open_file(path, opts.read_only, opts.direct)?);
    let format = match opts.format {
        Some(f) => f,
        None => probe(&file)?,
    };
    lock::lock_image_file(file.file(), path, opts.locking, format, !opts.read_only)?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    let mut child = opts.clone();
    child.chain.push(canonical);
    Ok(match format {
        Format::Raw if opts.snapshot.is_some() => return Err(Error::NoSnapshots("raw")),
        Format::Raw => Box::new(RawImage::new(storage, opts.read_only)?),
        Format::Qcow2 => Box::new(Qcow2::open_storage(
            storage,
            &child,
            Some(path.parent().unwrap_or(Path::new("."))),
        )?),
    })
}

/// Resolves a backing or data file name against the directory of the image naming it.
pub fn resolve_relative(name: impl AsRef<OsStr>, dir: &Path) -> PathBuf {
    let p = Path::new(name.as_ref());
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Where the backing file `name` of an image in directory `dir` is, and its format if the
/// name gives one: a plain name is relative to `dir`; a `json:` or `file:` pseudo-filename
/// names a file relative to the working directory, as in QEMU; other protocols are refused.
/// As in QEMU, a plain name joined to a directory that reads as a protocol name
/// (`file:d/base.qcow2`) is read as one. A name that is not UTF-8 is a plain name.
pub fn locate_backing(
    name: &OsStr,
    dir: &Path,
) -> std::result::Result<(PathBuf, Option<String>), NameError> {
    let located = |named: NamedImage| (PathBuf::from(named.filename), named.driver);
    if let Some(named) = name.to_str().and_then(crate::name::parse_name) {
        return named.map(located);
    }
    let joined = resolve_relative(name, dir);
    match joined.to_str().and_then(crate::name::parse_name) {
        Some(named) => named.map(located),
        None => Ok((joined, None)),
    }
}

/// Opens a backing file (read-only), in its recorded format or else the one its name gives.
pub(crate) fn open_backing(
    name: &OsStr,
    format: Option<&str>,
    dir: &Path,
    parent: &OpenOptions,
) -> Result<Box<dyn Image>> {
    let (path, driver) = locate_backing(name, dir).map_err(|e| Error::Backing {
        path: PathBuf::from(name),
        reason: e.to_string(),
    })?;
    let format = match format.or(driver.as_deref()) {
        None => None,
        Some(f) => Some(Format::from_name(f).ok_or_else(|| Error::Backing {
            path: path.clone(),
            reason: format!("unsupported backing format '{f}'"),
        })?),
    };
    let opts = OpenOptions {
        read_only: true,
        format,
        no_backing: false,
        l2_cache_bytes: parent.l2_cache_bytes,
        refcount_cache_bytes: parent.refcount_cache_bytes,
        direct: parent.direct,
        defer_space_claims: parent.defer_space_claims,
        chain: parent.chain.clone(),
        snapshot: None,
        locking: parent.locking,
        check: false,
        metadata_only: parent.metadata_only,
        keep_bitmaps: false,
        unmap: false,
    };
    open_image(&path, &opts).map_err(|e| match e {
        // Its own backing file failed: one more level, as QEMU nests them.
        Error::Backing { path, reason } => Error::Backing {
            path,
            reason: format!("Could not open backing file: {reason}"),
        },
        // QEMU's qcow2 driver words it so.
        Error::BadMagic(_) => Error::Backing {
            path,
            reason: "Image is not in qcow2 format".into(),
        },
        other => Error::Backing {
            path,
            reason: other.to_string(),
        },
    })
}

/// Opens an external data file (only names it, with `opts.metadata_only`).
pub(crate) fn open_data_file(name: &OsStr, opts: &OpenOptions) -> Result<Arc<dyn Storage>> {
    let (read_only, locking) = (opts.read_only, opts.locking);
    // Relative to the working directory, not the image's, as QEMU opens it.
    let path = PathBuf::from(name);
    if opts.metadata_only {
        return Ok(Arc::new(crate::storage::Unopened(path)));
    }
    let file = open_file(&path, read_only, false)?;
    // Locked as a raw file: its bytes are guest data.
    lock::lock_image_file(&file, &path, locking, Format::Raw, !read_only)?;
    Ok(Arc::new(FileStorage::new(file)))
}

/// The L1 table of the snapshot `r` names, for a read-only view of it (QEMU's
/// `qcow2_snapshot_load_tmp`).
pub(crate) fn snapshot_l1(
    file: &dyn Storage,
    table: &[Snapshot],
    r: &SnapshotRef,
    read_only: bool,
    cluster_size: u64,
) -> Result<Vec<u64>> {
    if !read_only {
        return Err(Error::SnapshotWritable);
    }
    read_snapshot_l1(
        file,
        r.find(table).ok_or(Error::SnapshotNotFound)?,
        cluster_size,
    )
    .map_err(|e| match e {
        Error::Corrupt(why) => Error::SnapshotLoad(why),
        Error::Io { .. } => Error::SnapshotLoad("Failed to read l1 table for snapshot".into()),
        e => e,
    })
}

/// Reads the L1 table of snapshot `s` after checking its size and alignment as QEMU's
/// `qcow2_validate_table` does; entries past the end of the file read as zeros, as QEMU
/// reads them.
pub(crate) fn read_snapshot_l1(
    file: &dyn Storage,
    s: &Snapshot,
    cluster_size: u64,
) -> Result<Vec<u64>> {
    let bytes = s.l1_size as u64 * 8;
    if bytes > MAX_L1_BYTES {
        return Err(Error::Corrupt("Snapshot L1 table too large".into()));
    }
    if s.l1_table_offset % cluster_size != 0 || s.l1_table_offset.checked_add(bytes).is_none() {
        return Err(Error::Corrupt("Snapshot L1 table offset invalid".into()));
    }
    let file_len = file
        .len()
        .map_err(|e| Error::io("getting the image size", e))?;
    crate::engine::read_table_within(file, s.l1_table_offset, s.l1_size, file_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A file of `len` bytes starting with the qcow2 magic and `version`.
    fn file(version: u32, len: usize) -> MemStorage {
        let mut data = vec![0u8; len];
        data[..4].copy_from_slice(&MAGIC.to_be_bytes());
        data[4..8].copy_from_slice(&version.to_be_bytes());
        MemStorage::new(&data)
    }

    #[test]
    fn probing_takes_the_version_and_length_into_account_as_qemu_does() {
        assert_eq!(probe(&file(3, 65536)).unwrap(), Format::Qcow2);
        assert_eq!(probe(&file(2, 104)).unwrap(), Format::Qcow2);
        // Refused by name when opened, rather than served as raw.
        assert_eq!(probe(&file(1, 48)).unwrap(), Format::Qcow2);
        assert_eq!(probe(&file(0, 65536)).unwrap(), Format::Raw);
        // Shorter than a header: probed as QEMU probes its zero-padded buffer.
        assert_eq!(probe(&file(3, 8)).unwrap(), Format::Qcow2);
        assert_eq!(probe(&file(1, 8)).unwrap(), Format::Qcow2);
        let magic_only = [&MAGIC.to_be_bytes()[..], &[0, 0, 0]].concat();
        assert_eq!(probe(&MemStorage::new(&magic_only)).unwrap(), Format::Raw);
        assert_eq!(probe(&MemStorage::new(&[0u8; 4096])).unwrap(), Format::Raw);
    }
}
