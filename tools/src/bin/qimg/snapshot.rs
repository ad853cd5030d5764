//! `qimg snapshot`: list (`-l`, the default), create (`-c`), apply (`-a`) and delete (`-d`)
//! internal snapshots, with qemu-img's messages and exit codes.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use qcow2::{FileStorage, Format, Locking, Qcow2, SnapshotRef};

/// Arguments of `qimg snapshot`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list", action = clap::ArgAction::Count)]
    list: u8,
    /// Apply the snapshot with this ID or name.
    #[arg(short = 'a', long = "apply")]
    apply: Vec<String>,
    /// Create a snapshot with this name.
    #[arg(short = 'c', long = "create")]
    create: Vec<String>,
    /// Delete the snapshot with this name.
    #[arg(short = 'd', long = "delete")]
    delete: Vec<String>,
    /// Open without taking locks (listing only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// How images are named (`--image-opts`) and QEMU objects (refused).
    #[command(flatten)]
    names: crate::image_name::NameArgs,
    /// The image.
    filename: Vec<String>,
}

/// What `qimg snapshot` was asked to do.
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

impl Args {
    /// The one action asked for (qemu-img refuses two, even the same one twice).
    fn action(&self) -> anyhow::Result<Action> {
        let mut all: Vec<Action> = (0..self.list).map(|_| Action::List).collect();
        all.extend(self.apply.iter().cloned().map(Action::Apply));
        all.extend(self.create.iter().cloned().map(Action::Create));
        all.extend(self.delete.iter().cloned().map(Action::Delete));
        if all.len() > 1 {
            bail!(
                "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
                crate::progname()
            );
        }
        Ok(all.pop().unwrap_or(Action::List))
    }
}

/// Runs `qimg snapshot`.
pub fn run(mut a: Args) -> anyhow::Result<u8> {
    a.names.refuse_objects()?;
    if let Some(name) = a.filename.first_mut() {
        a.names.resolve(name, &mut a.format)?;
    }
    let action = a.action()?;
    let [name] = &a.filename[..] else {
        bail!(
            "Expecting one image file name\nTry '{} snapshot --help' for more info",
            crate::progname()
        );
    };
    let format = a.format.as_deref();
    if let Action::List = action {
        let image = open(
            name,
            format,
            false,
            crate::locking(a.force_share),
            None,
            true,
        )?;
        if let Some(q) = image.filter(|q| !q.snapshots().is_empty()) {
            crate::out_bytes(&crate::info::snapshot_list(q.snapshots(), ""));
        }
        return Ok(0);
    }
    if a.force_share {
        bail!("Could not open '{name}': force-share=on can only be used with read-only images");
    }
    let applying = match &action {
        Action::Apply(snap) => Some(snap.as_str()),
        _ => None,
    };
    let image = open(name, format, true, Locking::On, applying, true)?;
    match action {
        Action::List => unreachable!("listed above"),
        Action::Create(snap) => {
            // qemu-img keeps at most 255 bytes of the name.
            let mut snap_name = snap.clone();
            while snap_name.len() > 255 {
                snap_name.pop();
            }
            let created = match image {
                Some(mut q) => q.create_snapshot(&snap_name).map(drop),
                None => Err(qcow2::Error::NotSupported("raw images".into())),
            };
            let what = format!("Could not create snapshot '{snap}'");
            created.map_err(|e| {
                corruption(e, &what)
                    .unwrap_or_else(|e| anyhow::anyhow!("{what}: {}", errno_text(&e)))
            })
        }
        Action::Apply(snap) => {
            let Some(mut q) = image else {
                bail!("Could not apply snapshot '{snap}': Block driver does not support snapshots");
            };
            let what = format!("Could not apply snapshot '{snap}': Failed to load snapshot");
            q.apply_snapshot(&SnapshotRef::IdOrName(snap.clone()))
                .map_err(|e| {
                    corruption(e, &what).unwrap_or_else(|e| {
                        let why = match e {
                            qcow2::Error::SnapshotNotFound => "No such file or directory".into(),
                            e => errno_text(&e),
                        };
                        anyhow::anyhow!("{what}: {why}")
                    })
                })
        }
        Action::Delete(snap) => {
            let by_name = SnapshotRef::Name(snap.clone());
            let found = image.filter(|q| by_name.find(q.snapshots()).is_some());
            let Some(mut q) = found else {
                bail!("Could not delete snapshot '{snap}': snapshot not found");
            };
            let what = format!("Could not delete snapshot '{snap}'");
            q.delete_snapshot(&by_name).map(drop).map_err(|e| {
                corruption(
                    e,
                    &format!("{what}: Failed to free the cluster and L1 table"),
                )
                .unwrap_or_else(|e| anyhow::anyhow!("{what}: {e}"))
            })
        }
    }?;
    Ok(0)
}

/// Corruption `e` as the cause of `what`: qimg then reports it as QEMU's qcow2 driver does and
/// names it an I/O error (see [`crate::report_error`]). Any other error comes back.
fn corruption(e: qcow2::Error, what: &str) -> Result<anyhow::Error, qcow2::Error> {
    match e {
        qcow2::Error::Corrupt(_)
        | qcow2::Error::UnalignedTable(_)
        | qcow2::Error::BackingCorrupt(_)
        | qcow2::Error::MarkedCorrupt(_) => Ok(anyhow::Error::new(e).context(what.to_owned())),
        e => Err(e),
    }
}

/// The words qemu-img's `strerror` gives for what an engine error stands for.
fn errno_text(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::NotSupported(_) => "Operation not supported".into(),
        qcow2::Error::RefcountOverflow { .. } | qcow2::Error::RefcountUnderflow(_) => {
            "Invalid argument".into()
        }
        qcow2::Error::Io { error, .. } => error.to_string(),
        e => e.to_string(),
    }
}

/// Opens an image, with its backing chain if `backing` (as `qemu-img snapshot` does; `qimg
/// bitmap` opens its merge source without it): a qcow2 image, or `None` for a raw one.
/// `applying` names the snapshot about to be applied, refused while the image has
/// persistent dirty bitmaps, as QEMU does.
pub fn open(
    name: &str,
    format: Option<&str>,
    writable: bool,
    locking: Locking,
    applying: Option<&str>,
    backing: bool,
) -> anyhow::Result<Option<Qcow2>> {
    let given = format.map(|f| crate::parse_driver(name, f)).transpose()?;
    let storage = Arc::new(FileStorage::new(crate::open_file(name, writable)?));
    let fmt = match (given, writable) {
        (given, true) => crate::writable_format(&*storage, name, given)?,
        (Some(f), false) => f,
        (None, false) => crate::probe(&*storage, name)?,
    };
    crate::lock(storage.file(), name, locking, fmt, writable)?;
    if fmt == Format::Raw {
        return Ok(None);
    }
    if let Some(snap) = applying {
        if crate::resize::has_bitmaps(&*storage, name)? {
            bail!("Could not apply snapshot '{snap}': Device has active dirty bitmaps");
        }
    }
    // Taking or deleting a snapshot leaves the guest's data alone: the bitmaps stay valid.
    let opts = qcow2::OpenOptions {
        read_only: !writable,
        locking,
        keep_bitmaps: true,
        ..Default::default()
    };
    let dir = Path::new(name).parent().unwrap_or(Path::new("."));
    let dir = backing.then_some(dir);
    crate::open_qcow2(storage, &opts, dir, name).map(Some)
}
