//! Images named on the command line as QEMU names them besides plain file names: a QEMU option
//! string (`--image-opts driver=qcow2,file.filename=a.qcow2`), a JSON pseudo-filename
//! (`json:{"driver":"qcow2","file":{"filename":"a.qcow2"}}`) or a protocol prefix
//! (`file:a.qcow2`). Each comes down to the file to open and, if it names one, the format
//! driver (`qcow2::name`); what qimg cannot honour is refused, never ignored.

use std::sync::Mutex;

use anyhow::bail;
use qcow2::name::from_options;

use crate::qemu_opts;

/// The files [`resolve`] found, with the names they were given by: QEMU's errors name an
/// image as the user named it.
static GIVEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The name the image in file `file` was given by: `file` itself unless it was named
/// otherwise, and named only so.
pub fn as_given(file: &str) -> String {
    let given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut names = given
        .iter()
        .filter(|(f, _)| f == file)
        .map(|(_, n)| n.as_str());
    match names.next() {
        Some(name) if names.all(|other| other == name) => name.to_owned(),
        _ => file.to_owned(),
    }
}

/// Records that the image in `file` was named `name`.
fn remember(file: &str, name: &str) {
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    given.push((file.to_owned(), name.to_owned()));
}

/// qemu-img's `--image-opts` and `--object` options.
#[derive(clap::Args)]
#[group(skip)]
pub struct NameArgs {
    /// Treat each image name as a QEMU option string (driver=qcow2,file.filename=PATH).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// QEMU objects such as secrets: qimg has none, so this is refused.
    #[arg(long = "object", hide = true)]
    pub object: Vec<String>,
}

impl NameArgs {
    /// Fails if an `--object` was given.
    pub fn refuse_objects(&self) -> anyhow::Result<()> {
        if !self.object.is_empty() {
            bail!("qimg does not support --object yet");
        }
        Ok(())
    }

    /// Resolves the image name `name`, given with format `format` (see [`resolve`]).
    pub fn resolve(&self, name: &mut String, format: &mut Option<String>) -> anyhow::Result<()> {
        resolve(name, format, self.image_opts)
    }
}

/// Replaces `name`, the name of an existing image, by the file it names, and a `format` not
/// given (`-f`) by the format driver the name gives, if any. `image_opts`: the name is a QEMU
/// option string, which excludes `-f`.
pub fn resolve(
    name: &mut String,
    format: &mut Option<String>,
    image_opts: bool,
) -> anyhow::Result<()> {
    if image_opts && format.is_some() {
        bail!("--image-opts and --format are mutually exclusive");
    }
    let given = name.clone();
    resolve_named(name, format, image_opts)
        .map_err(|e| anyhow::anyhow!("Could not open '{given}': {e}"))
}

/// [`resolve`] for a backing file's name, as an overlay records it: a refusal is not
/// prefixed with the name (QEMU nests it under the overlay's).
pub fn resolve_backing(name: &mut String, format: &mut Option<String>) -> anyhow::Result<()> {
    resolve_named(name, format, false).map_err(anyhow::Error::msg)
}

/// [`resolve`] without the name in its refusals.
fn resolve_named(
    name: &mut String,
    format: &mut Option<String>,
    image_opts: bool,
) -> Result<(), String> {
    let named = if image_opts {
        if !name.contains('=') {
            // QEMU takes a bare word for a reference to a node of that name.
            return Err(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ));
        }
        from_options(&qemu_opts::parse_all(name))
    } else {
        match qcow2::name::parse_name(name) {
            Some(named) => named,
            None => {
                remember(name, name);
                return Ok(());
            }
        }
    };
    let named = named.map_err(|e| e.to_string())?;
    remember(&named.filename, name);
    *name = named.filename;
    if format.is_none() {
        *format = named.driver;
    }
    Ok(())
}

/// Replaces `name`, the name of an image to create, by its file: a `file:` prefix is
/// dropped; other protocols are refused (the error is QEMU's, without the name).
pub fn resolve_new(name: &mut String) -> anyhow::Result<()> {
    *name = qcow2::name::new_file_name(name)?;
    Ok(())
}
