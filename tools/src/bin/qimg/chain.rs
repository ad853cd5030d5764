//! A backing chain opened layer by layer, with block status as qemu-img computes it
//! (`bdrv_block_status` per layer plus the generic block layer's additions).

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use qcow2::{
    BlockStatus, FileStorage, Format, Image, Locking, Qcow2, RawImage, SnapshotRef, Storage,
};

use crate::info::path_combine;

/// One image of a chain, opened without its backing file.
pub enum Layer {
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
    /// A raw image.
    Raw(RawImage),
}

impl Layer {
    fn image(&self) -> &dyn Image {
        match self {
            Layer::Qcow2(img) => &**img,
            Layer::Raw(r) => r,
        }
    }
}

/// Why qimg cannot open a file whose name is not UTF-8 (all its names are `str`s).
pub const NOT_UTF8: &str = "qimg handles only file names that are UTF-8";

/// The open error of a file named by bytes that are not UTF-8 (`name` shows them lossily).
fn not_utf8_error(name: &str) -> anyhow::Error {
    anyhow::anyhow!("Could not open '{name}': {NOT_UTF8}")
}

/// A backing file as qemu-img opens it: name resolved against the overlay's, and format.
pub type Backing = Option<BackingFile>;

/// The backing file an image's header names.
pub struct BackingFile {
    /// Its name resolved against the overlay's (shown lossily if it is not UTF-8).
    pub name: String,
    /// The format the header records.
    pub format: Option<String>,
    /// The recorded name is not UTF-8: qimg cannot open it.
    pub not_utf8: bool,
}

impl BackingFile {
    /// The next image to open, or why qimg cannot (qemu-img's words for an open error).
    pub fn into_open(self) -> anyhow::Result<(String, Option<String>)> {
        if self.not_utf8 {
            return Err(not_utf8_error(&self.name));
        }
        Ok((self.name, self.format))
    }
}

/// What one run of guest bytes looks like through the chain (qemu-img's `MapEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that answered (0 = top).
    pub depth: usize,
    /// Allocated in that layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when the data is stored plainly in a host file.
    pub offset: Option<u64>,
}

/// One opened layer with what qemu-img knows about it.
struct Node {
    layer: Layer,
    /// The file name as qemu-img names it (backing names resolved against the overlay's).
    name: String,
    /// The file holding the guest data (the external data file, if any).
    data_name: String,
    /// QEMU's `qcow2_detect_metadata_preallocation`: data clusters are checked for holes in
    /// the host file. Found out at the layer's first block status query, as in QEMU (a
    /// layer never queried reads no refcount).
    preallocated: std::sync::OnceLock<bool>,
    /// The backing file name the header records.
    recorded_backing: Option<String>,
    /// Guest bytes one L2 table maps (qcow2), where QEMU's runs end.
    table_span: u64,
}

/// An image and its backing files, top first.
pub struct Chain {
    nodes: Vec<Node>,
}

/// Opens one image (or a view of its internal `snapshot`) without its backing file; also
/// returns its backing file. With `metadata_only` (qemu-img info's open), an external data
/// file is not opened: it may be missing.
pub fn open_layer(
    name: &str,
    format: Option<&str>,
    snapshot: Option<&SnapshotRef>,
    locking: Locking,
    metadata_only: bool,
) -> anyhow::Result<(Layer, Backing)> {
    let path = Path::new(name);
    let given = format.map(|f| crate::parse_driver(name, f)).transpose()?;
    let file = FileStorage::new(crate::open_file(name, false)?);
    let fmt = match given {
        Some(f) => f,
        None => crate::probe(&file, name)?,
    };
    crate::lock(file.file(), name, locking, fmt, false)?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    if fmt == Format::Raw {
        if snapshot.is_some() {
            return Err(crate::open_error(name, qcow2::Error::NoSnapshots("raw")));
        }
        return Ok((Layer::Raw(RawImage::new(storage, true)?), None));
    }
    let opts = qcow2::OpenOptions {
        read_only: true,
        no_backing: true,
        snapshot: snapshot.cloned(),
        locking,
        metadata_only,
        ..Default::default()
    };
    let img = crate::open_qcow2(
        storage,
        &opts,
        Some(path.parent().unwrap_or(Path::new("."))),
        name,
    )?;
    let h = img.header();
    let backing = h.backing_file.as_deref().map(|b| BackingFile {
        name: path_combine(name, &b.to_string_lossy()),
        format: h.backing_format.clone(),
        not_utf8: b.to_str().is_none(),
    });
    Ok((Layer::Qcow2(Box::new(img)), backing))
}

/// Whether run `next` goes on where `prev` ends with the same status (QEMU's qcow2 reports
/// both as one).
fn continues(prev: &BlockStatus, next: &BlockStatus) -> bool {
    (prev.allocated, prev.zero, prev.data, prev.compressed)
        == (next.allocated, next.zero, next.data, next.compressed)
        && match (prev.host_offset, next.host_offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + prev.len == b,
            _ => false,
        }
}

/// Whether more clusters are in use than the file has allocated (QEMU's heuristic for an
/// image created with preallocation=metadata). A refcount that cannot be read makes it
/// false, as in QEMU (corruption found on the way is reported as its driver does).
fn detect_metadata_preallocation(img: &Qcow2, path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let cs = img.cluster_size();
    let real_clusters = meta.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let mut count = 0;
    for c in 0..meta.len().div_ceil(cs) {
        if count >= threshold {
            break;
        }
        match img.refcount(c) {
            Ok(refcount) => count += u64::from(refcount != 0),
            Err(e) => {
                crate::report_corruption(&e);
                return false;
            }
        }
    }
    count >= threshold
}

impl Chain {
    /// Opens `filename` (or a view of its internal `snapshot`) and its whole backing chain,
    /// each file locked with `locking`.
    pub fn open(
        filename: &str,
        format: Option<&str>,
        snapshot: Option<&SnapshotRef>,
        locking: Locking,
    ) -> anyhow::Result<Chain> {
        let mut nodes: Vec<Node> = Vec::new();
        let mut next = Some(BackingFile {
            name: filename.to_string(),
            format: format.map(str::to_string),
            not_utf8: false,
        });
        while let Some(BackingFile {
            mut name,
            format: mut fmt,
            not_utf8,
        }) = next.take()
        {
            // A backing file may be named by a `json:` or `file:` pseudo-filename (the top
            // image's name was resolved by the command).
            let resolved = match nodes.is_empty() {
                true => Ok(()),
                false if not_utf8 => Err(not_utf8_error(&name)),
                false => crate::image_name::resolve_backing(&mut name, &mut fmt),
            };
            if nodes.len() > qcow2::open::MAX_CHAIN_DEPTH || nodes.iter().any(|n| n.name == name) {
                anyhow::bail!("Backing file '{name}' creates an infinite loop.");
            }
            let top = if nodes.is_empty() { snapshot } else { None };
            let opened = match (resolved, std::fs::metadata(&name)) {
                (Err(e), _) => Err(e),
                (_, Err(e)) if !nodes.is_empty() => {
                    Err(anyhow::anyhow!("Could not open '{name}': {e}"))
                }
                _ => open_layer(&name, fmt.as_deref(), top, locking, false),
            };
            // qemu-img opens the chain as one: a backing file's error is nested once per
            // level under the top image's.
            let (layer, backing) = opened.map_err(|e| match nodes.first() {
                Some(top) => {
                    let nested = "Could not open backing file: ".repeat(nodes.len() - 1);
                    crate::backing_open_error(&top.name, format!("{nested}{e:#}"))
                }
                None => e,
            })?;
            let (data_name, recorded_backing, table_span) = match &layer {
                Layer::Qcow2(img) => {
                    let h = img.header();
                    let lossy = |n: &OsStr| n.to_string_lossy().into_owned();
                    (
                        h.data_file
                            .as_deref()
                            .filter(|_| h.has_external_data())
                            .map(lossy),
                        h.backing_file.as_deref().map(lossy),
                        h.l2_entries() * h.cluster_size(),
                    )
                }
                Layer::Raw(_) => (None, None, u64::MAX),
            };
            nodes.push(Node {
                layer,
                data_name: data_name.unwrap_or_else(|| name.clone()),
                name,
                preallocated: std::sync::OnceLock::new(),
                recorded_backing,
                table_span,
            });
            next = backing;
        }
        Ok(Chain { nodes })
    }

    /// Number of images in the chain.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The file name of layer `i`, as qemu-img names it.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The file holding layer `i`'s guest data.
    pub fn data_name(&self, i: usize) -> &str {
        &self.nodes[i].data_name
    }

    /// The top image when it is qcow2.
    pub fn top_qcow2(&self) -> Option<&Qcow2> {
        match &self.nodes[0].layer {
            Layer::Qcow2(img) => Some(img),
            Layer::Raw(_) => None,
        }
    }

    /// The format of layer `i`.
    pub fn format(&self, i: usize) -> Format {
        match &self.nodes[i].layer {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }

    /// The backing file name recorded in layer `i`'s header.
    pub fn recorded_backing(&self, i: usize) -> Option<&str> {
        self.nodes[i].recorded_backing.as_deref()
    }

    /// Virtual size of the top image (raw sizes rounded up to sectors, as QEMU does).
    pub fn size(&self) -> u64 {
        self.layer_size(0)
    }

    /// Virtual size of layer `i` (raw sizes rounded up to sectors).
    pub fn layer_size(&self, i: usize) -> u64 {
        match &self.nodes[i].layer {
            Layer::Raw(r) => r.size().next_multiple_of(512),
            Layer::Qcow2(img) => img.size(),
        }
    }

    /// Reads guest bytes of layer `i` alone, without what lies under it: for runs that
    /// [`Chain::status`] found allocated in that layer.
    pub fn read_layer(&self, i: usize, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        self.nodes[i].layer.image().read_at(buf, offset)
    }

    /// Status of one layer at `offset` (at most `len` bytes): QEMU's `bdrv_block_status`.
    fn layer_status(&self, i: usize, offset: u64, len: u64) -> anyhow::Result<Extent> {
        let layer = &self.nodes[i].layer;
        let img = layer.image();
        let mut e = Extent {
            start: offset,
            length: len,
            depth: i,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        if offset >= img.size() {
            // The sector-rounded tail of a raw file reads as zeros; the layer ends after it.
            e.length = len.min(self.layer_size(i) - offset);
            e.present = true;
            e.zero = true;
            e.offset = Some(offset);
            return Ok(e);
        }
        let wanted = len.min(self.layer_size(i) - offset);
        let len = len.min(img.size() - offset);
        let node = &self.nodes[i];
        let preallocated = match layer {
            Layer::Qcow2(q) => *node
                .preallocated
                .get_or_init(|| detect_metadata_preallocation(q, Path::new(&node.name))),
            Layer::Raw(_) => false,
        };
        let mut st: BlockStatus = img.block_status(offset, len)?;
        if let (Layer::Raw(_), false) = (layer, st.data) {
            if offset + st.len == img.size() {
                // A hole to the end of the file goes on over the sector-rounded tail.
                st.len = wanted;
            }
        } else if let (Layer::Qcow2(q), true) = (layer, st.compressed) {
            // QEMU reports compressed clusters one by one.
            st.len = st.len.min(q.cluster_size() - offset % q.cluster_size());
        } else if let Layer::Qcow2(_) = layer {
            // QEMU's qcow2 runs end at the end of an L2 table (its L2 cache holds whole
            // tables by default), ours at the end of a cached slice: go on to the table's end.
            let span = self.nodes[i].table_span;
            let end = (offset + len)
                .min((offset / span + 1) * span)
                .min(offset + i32::MAX as u64);
            while offset + st.len < end {
                // A failure further on ends the run here; the query that starts there
                // reports it (QEMU's runs stop before a broken entry too).
                let Ok(next) = img.block_status(offset + st.len, end - offset - st.len) else {
                    break;
                };
                if !continues(&st, &next) {
                    break;
                }
                st.len += next.len;
            }
        }
        e.length = st.len;
        e.present = st.allocated;
        e.zero = st.zero;
        e.data = st.data;
        e.compressed = st.compressed;
        e.offset = match layer {
            // Raw holes map to the same offset too.
            Layer::Raw(_) => Some(offset),
            Layer::Qcow2(_) => st.host_offset,
        };
        if let (Layer::Qcow2(img), true) = (layer, preallocated) {
            if let (true, false, Some(host)) = (e.data, e.zero, e.offset) {
                if let Some(fd) = img.data_storage().raw_fd() {
                    let (data, run) = qcow2::raw::seek_data_run(fd, host, e.length);
                    if data {
                        e.length = run;
                    } else {
                        e.zero = true;
                        let file_len = img.data_storage().len()?;
                        if host < file_len {
                            e.length = run;
                        }
                    }
                }
            }
        }
        Ok(e)
    }

    /// Status of the run at `offset` through the chain (qemu-img's `get_block_status`).
    pub fn status(&self, offset: u64, len: u64) -> anyhow::Result<Extent> {
        self.status_above(offset, len, self.len())
    }

    /// Status of the run at `offset` as the layers above depth `base` give it, as QEMU's
    /// `bdrv_is_allocated_above` asks them: the base and the layers below it are never
    /// queried (nor read), and a run none of the others allocates is not present.
    pub fn status_above(&self, offset: u64, len: u64, base: usize) -> anyhow::Result<Extent> {
        let mut len = len;
        for i in 0..base {
            let e = self.layer_status(i, offset, len)?;
            if e.present || e.zero || e.data {
                return Ok(e);
            }
            len = e.length;
            let bottom = i + 1 == self.len();
            if bottom || offset >= self.layer_size(i + 1) {
                // Unallocated with nothing below: reads as zeros, not present.
                return Ok(Extent { zero: true, ..e });
            }
            if i + 1 == base {
                return Ok(e);
            }
        }
        unreachable!("there is at least one layer above the base")
    }
}
