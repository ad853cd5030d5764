//! `qimg info`: qemu-img 10's human and JSON forms, optionally for the whole backing chain.
//!
//! Each image becomes a [`NodeInfo`] (QAPI `BlockGraphInfo`) with one child, the protocol
//! node `file`; both output forms are printed from it.

use std::io::Seek;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{bail, Context};
use qcow2::format::bitmaps::{parse_directory, DirEntry, AUTO, IN_USE, MAX_DIRECTORY_BYTES};
use qcow2::format::header::{Header, AUTOCLEAR_BITMAPS};
use qcow2::format::snapshot::Snapshot;
use qcow2::{Locking, Storage};

use crate::chain::{open_layer, Backing, BackingFile, Layer};
use crate::qjson::{dict, QObj};
use crate::size::human;

/// Arguments of `qimg info`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(
        long = "output",
        default_value = "human",
        value_parser = crate::parse_output
    )]
    output: crate::Json,
    /// Show the whole backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Open without taking the write lock (qimg takes no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: String,
}

/// What qemu-img reports about one block node (QAPI `BlockNodeInfo` plus `children`).
struct NodeInfo {
    filename: String,
    format: &'static str,
    dirty_flag: bool,
    actual_size: u64,
    virtual_size: u64,
    cluster_size: Option<u64>,
    encrypted: bool,
    /// As the header records it (bytes: it need not be UTF-8).
    backing_filename: Option<Vec<u8>>,
    full_backing_filename: Option<Vec<u8>>,
    backing_format: Option<String>,
    snapshots: Option<Vec<Snapshot>>,
    /// (type, data) of `format-specific`.
    format_specific: Option<(&'static str, QObj)>,
    /// Child nodes by name; `None` for a protocol node (it has an empty list in JSON).
    children: Option<Vec<(&'static str, NodeInfo)>>,
}

/// QEMU's `bdrv_get_full_backing_filename`: `name` relative to the directory part of `base`,
/// unless it is absolute or names a protocol (`json:{...}`, `file:NAME`).
pub fn path_combine(base: &str, name: &str) -> String {
    String::from_utf8(path_combine_bytes(base.as_bytes(), name.as_bytes()))
        .expect("two UTF-8 names joined at an ASCII '/' are UTF-8")
}

/// [`path_combine`] of names that need not be UTF-8.
fn path_combine_bytes(base: &[u8], name: &[u8]) -> Vec<u8> {
    let protocol = name
        .iter()
        .position(|&b| b == b':' || b == b'/')
        .is_some_and(|i| name[i] == b':');
    if name.starts_with(b"/") || protocol {
        return name.to_vec();
    }
    match base.iter().rposition(|&b| b == b'/') {
        Some(i) => [&base[..=i], name].concat(),
        None => name.to_vec(),
    }
}

/// The protocol node under an image: QEMU's `file`, or `host_device` for a device node.
fn file_node(filename: &str, meta: &std::fs::Metadata) -> NodeInfo {
    let kind = meta.file_type();
    let device = kind.is_block_device() || kind.is_char_device();
    NodeInfo {
        filename: filename.to_string(),
        format: if device { "host_device" } else { "file" },
        dirty_flag: false,
        actual_size: meta.blocks() * 512,
        virtual_size: file_length(filename, meta).next_multiple_of(512),
        cluster_size: None,
        encrypted: false,
        backing_filename: None,
        full_backing_filename: None,
        backing_format: None,
        snapshots: None,
        format_specific: Some(("file", QObj::Dict(Vec::new()))),
        children: None,
    }
}

/// The length of the file `filename`: for a block device (whose `st_size` is 0), where its
/// end is.
fn file_length(filename: &str, meta: &std::fs::Metadata) -> u64 {
    if !meta.file_type().is_block_device() {
        return meta.len();
    }
    std::fs::File::open(filename)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .unwrap_or(0)
}

/// The persistent bitmaps QEMU would load (none unless the bitmaps autoclear bit is set).
pub fn read_bitmaps(file: &dyn Storage, h: &Header) -> anyhow::Result<Vec<DirEntry>> {
    let Some(ext) = &h.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let mut dir = vec![0u8; ext.directory_size().min(MAX_DIRECTORY_BYTES) as usize];
    file.read_at(&mut dir, ext.directory_offset())
        .context("reading the bitmap directory")?;
    Ok(parse_directory(&dir, ext.nb_bitmaps())?)
}

/// Persistent bitmaps as a list of `Qcow2BitmapInfo` (absent when there are none).
fn bitmaps(file: &dyn Storage, h: &Header) -> anyhow::Result<Option<QObj>> {
    let list = read_bitmaps(file, h)?;
    if list.is_empty() {
        return Ok(None);
    }
    Ok(Some(QObj::List(
        list.iter()
            .map(|b| {
                let mut f = Vec::new();
                if b.flags & IN_USE != 0 {
                    f.push("in-use".into());
                }
                if b.flags & AUTO != 0 {
                    f.push("auto".into());
                }
                dict([
                    ("name", Some(b.name.as_slice().into())),
                    ("granularity", Some(b.granularity().into())),
                    ("flags", Some(QObj::List(f))),
                ])
            })
            .collect(),
    )))
}

/// `ImageInfoSpecificQCow2`.
fn qcow2_specific(h: &Header, encrypt: Option<QObj>, bitmaps: Option<QObj>) -> QObj {
    let v3 = h.version >= 3;
    dict([
        ("compat", Some(if v3 { "1.1" } else { "0.10" }.into())),
        (
            "data-file",
            h.data_file.as_ref().map(|d| d.as_bytes().into()),
        ),
        (
            "data-file-raw",
            h.has_external_data().then(|| h.data_file_raw().into()),
        ),
        ("extended-l2", v3.then(|| h.extended_l2().into())),
        ("lazy-refcounts", v3.then(|| h.lazy_refcounts().into())),
        ("corrupt", v3.then(|| h.is_corrupt().into())),
        ("refcount-bits", Some(h.refcount_bits().into())),
        ("encrypt", encrypt),
        ("bitmaps", bitmaps),
        ("compression-type", Some(h.compression_type.name().into())),
    ])
}

/// Gathers the info of one image; also returns its backing file.
fn node_info(
    filename: &str,
    format: Option<&str>,
    locking: Locking,
) -> anyhow::Result<(NodeInfo, Backing)> {
    if let Some(f) = format {
        crate::parse_driver(filename, f)?;
    }
    let meta = std::fs::metadata(filename).map_err(|e| crate::file_open_error(filename, e))?;
    let (layer, backing) = open_layer(filename, format, None, locking, true)?;
    // A raw image's node is its file's node with the file as its child.
    let mut node = NodeInfo {
        format: "raw",
        format_specific: None,
        children: Some(vec![("file", file_node(filename, &meta))]),
        ..file_node(filename, &meta)
    };
    let Layer::Qcow2(q) = layer else {
        return Ok((node, backing));
    };
    let h = q.header();
    node.format = "qcow2";
    node.virtual_size = qcow2::Image::size(&*q);
    node.cluster_size = Some(h.cluster_size());
    node.dirty_flag = h.is_dirty();
    // Shown only with a backing file, as QEMU shows it.
    node.backing_format = h.backing_file.as_ref().and(h.backing_format.clone());
    let recorded = h.backing_file.as_ref().map(|b| b.as_bytes().to_vec());
    node.full_backing_filename = backing
        .as_ref()
        .and(recorded.as_ref())
        .map(|b| path_combine_bytes(filename.as_bytes(), b));
    node.backing_filename = recorded;
    if !q.snapshots().is_empty() {
        node.snapshots = Some(q.snapshots().to_vec());
    }
    node.encrypted = h.crypt_method != 0;
    let encrypt = crate::encryption::encrypt_info(&**q.file(), &h)
        .map_err(|e| anyhow::anyhow!("Could not open '{filename}': {e:#}"))?;
    let bitmaps = bitmaps(&**q.file(), &h)?;
    node.format_specific = Some(("qcow2", qcow2_specific(&h, encrypt, bitmaps)));
    Ok((node, backing))
}

/// QEMU's `SnapshotInfo`.
fn snapshot_obj(s: &Snapshot) -> QObj {
    dict([
        ("id", Some(s.id.as_slice().into())),
        ("name", Some(s.name.as_slice().into())),
        ("vm-state-size", Some(s.vm_state_size.into())),
        ("date-sec", Some(s.date_sec.into())),
        ("date-nsec", Some(s.date_nsec.into())),
        (
            "vm-clock-sec",
            Some((s.vm_clock_nsec / 1_000_000_000).into()),
        ),
        (
            "vm-clock-nsec",
            Some((s.vm_clock_nsec % 1_000_000_000).into()),
        ),
        (
            "icount",
            s.icount.filter(|&i| i != u64::MAX).map(QObj::from),
        ),
    ])
}

impl NodeInfo {
    /// The QAPI object qemu-img prints as JSON.
    fn to_qobj(&self) -> QObj {
        let children = self.children.as_ref().map_or_else(Vec::new, |c| {
            c.iter()
                .map(|(name, n)| {
                    dict([("name", Some((*name).into())), ("info", Some(n.to_qobj()))])
                })
                .collect()
        });
        dict([
            ("filename", Some(self.filename.as_str().into())),
            ("format", Some(self.format.into())),
            ("dirty-flag", Some(self.dirty_flag.into())),
            ("actual-size", Some(self.actual_size.into())),
            ("virtual-size", Some(self.virtual_size.into())),
            ("cluster-size", self.cluster_size.map(QObj::from)),
            ("encrypted", self.encrypted.then(|| true.into())),
            (
                "backing-filename",
                self.backing_filename.as_deref().map(QObj::from),
            ),
            (
                "full-backing-filename",
                self.full_backing_filename.as_deref().map(QObj::from),
            ),
            (
                "backing-filename-format",
                self.backing_format.clone().map(QObj::from),
            ),
            (
                "snapshots",
                self.snapshots
                    .as_ref()
                    .map(|s| QObj::List(s.iter().map(snapshot_obj).collect())),
            ),
            (
                "format-specific",
                self.format_specific
                    .as_ref()
                    .map(|(t, d)| dict([("type", Some((*t).into())), ("data", Some(d.clone()))])),
            ),
            ("children", Some(QObj::List(children))),
        ])
    }

    /// QEMU's `bdrv_node_info_dump` followed by the children (`dump_human_image_info`).
    fn dump_human(&self, indentation: usize, path: &str, out: &mut Vec<u8>) {
        let ind = " ".repeat(indentation);
        let protocol = self.children.is_none();
        let [image, format, size] = if protocol {
            ["filename", "protocol type", "file length"]
        } else {
            ["image", "file format", "virtual size"]
        };
        let mut text = |t: String| out.extend_from_slice(t.as_bytes());
        text(format!(
            "{ind}{image}: {}\n{ind}{format}: {}\n{ind}{size}: {} ({} bytes)\n{ind}disk size: {}\n",
            self.filename,
            self.format,
            human(self.virtual_size),
            self.virtual_size,
            human(self.actual_size)
        ));
        if self.encrypted {
            text(format!("{ind}encrypted: yes\n"));
        }
        if let Some(cs) = self.cluster_size {
            text(format!("{ind}cluster_size: {cs}\n"));
        }
        if self.dirty_flag {
            text(format!("{ind}cleanly shut down: no\n"));
        }
        if let Some(b) = &self.backing_filename {
            out.extend_from_slice(format!("{ind}backing file: ").as_bytes());
            out.extend_from_slice(b);
            match &self.full_backing_filename {
                Some(full) if full != b => {
                    out.extend_from_slice(b" (actual path: ");
                    out.extend_from_slice(full);
                    out.push(b')');
                }
                Some(_) => {}
                None => out.extend_from_slice(b" (cannot determine actual path)"),
            }
            out.push(b'\n');
            if let Some(f) = &self.backing_format {
                out.extend_from_slice(format!("{ind}backing file format: {f}\n").as_bytes());
            }
        }
        if let Some(snaps) = &self.snapshots {
            out.extend_from_slice(&snapshot_list(snaps, &ind));
        }
        if let Some((_, data)) = &self.format_specific {
            if data.has_content() {
                let w = indentation * 4;
                out.extend_from_slice(
                    format!("{:w$}Format specific information:\n", "").as_bytes(),
                );
                data.dump_human(indentation + 1, out);
            }
        }
        for (name, child) in self.children.iter().flatten() {
            let w = indentation * 4;
            out.extend_from_slice(format!("{:w$}Child node '{path}{name}':\n", "").as_bytes());
            child.dump_human(indentation + 4, &format!("{path}{name}/"), out);
        }
    }
}

/// One row of QEMU's snapshot table ("%-7s %-16s %8s %19s %15s %10s"), fields as bytes
/// (snapshot IDs and names need not be UTF-8).
fn snapshot_line(f: [&[u8]; 6]) -> Vec<u8> {
    // printf pads by bytes, not characters: a name in UTF-8 takes its bytes' width.
    let left = |s: &[u8], width: usize| [s, &b" ".repeat(width.saturating_sub(s.len()))].concat();
    let right = |s: &[u8], width: usize| [&b" ".repeat(width.saturating_sub(s.len())), s].concat();
    [
        left(f[0], 7),
        left(f[1], 16),
        right(f[2], 8),
        right(f[3], 19),
        right(f[4], 15),
        right(f[5], 10),
    ]
    .join(&b' ')
    .into_iter()
    .chain([b'\n'])
    .collect()
}

/// QEMU's "Snapshot list:" table, every line indented by `ind` (`qemu-img info` and
/// `qemu-img snapshot -l` print it).
pub fn snapshot_list(snaps: &[Snapshot], ind: &str) -> Vec<u8> {
    let mut out = format!("{ind}Snapshot list:\n{ind}").into_bytes();
    out.extend(snapshot_line([
        b"ID",
        b"TAG",
        b"VM_SIZE",
        b"DATE",
        b"VM_CLOCK",
        b"ICOUNT",
    ]));
    for s in snaps {
        out.extend_from_slice(ind.as_bytes());
        out.extend(snapshot_row(s));
    }
    out
}

/// A snapshot as QEMU's `bdrv_snapshot_dump` prints it (date in local time).
fn snapshot_row(s: &Snapshot) -> Vec<u8> {
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    // Unknown (older snapshots have no field for it) or not counted: "--", as QEMU prints.
    let icount = s
        .icount
        .filter(|&i| i != u64::MAX)
        .map_or_else(|| "--".to_string(), |i| i.to_string());
    snapshot_line([
        &s.id,
        &s.name,
        human(s.vm_state_size).as_bytes(),
        local_time(s.date_sec as i64).as_bytes(),
        clock.as_bytes(),
        icount.as_bytes(),
    ])
}

/// "%Y-%m-%d %H:%M:%S" in the local time zone.
fn local_time(secs: i64) -> String {
    // SAFETY: localtime_r only writes the tm we pass; a zeroed tm is a valid value.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&(secs as libc::time_t), &mut tm);
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Runs `qimg info`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    a.names.resolve(&mut a.filename, &mut a.format)?;
    let locking = crate::locking(a.force_share);
    let json = a.output.0;
    let mut chain = Vec::new();
    let mut next = Some((a.filename.clone(), a.format.clone()));
    while let Some((mut name, mut fmt)) = next.take() {
        // A backing file may be named by a `json:` or `file:` pseudo-filename (the top
        // image's name is resolved above).
        if !chain.is_empty() {
            crate::image_name::resolve(&mut name, &mut fmt, false)?;
        }
        if chain.len() > qcow2::open::MAX_CHAIN_DEPTH
            || chain.iter().any(|n: &NodeInfo| n.filename == name)
        {
            bail!("Backing file '{name}' creates an infinite loop.");
        }
        let (node, backing) = node_info(&name, fmt.as_deref(), locking)?;
        chain.push(node);
        if a.backing_chain {
            next = backing.map(BackingFile::into_open).transpose()?;
        }
    }
    let mut out = Vec::new();
    if json {
        let obj = if a.backing_chain {
            QObj::List(chain.iter().map(NodeInfo::to_qobj).collect())
        } else {
            chain[0].to_qobj()
        };
        out = obj.to_json().into_bytes();
        out.push(b'\n');
    } else {
        for (i, node) in chain.iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            node.dump_human(0, "/", &mut out);
        }
    }
    crate::out_bytes(&out);
    Ok(0)
}
