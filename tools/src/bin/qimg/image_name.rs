//! Images named on the command line as QEMU names them besides plain file names: a QEMU option
//! string (`--image-opts driver=qcow2,file.filename=a.qcow2`), a JSON pseudo-filename
//! (`json:{"driver":"qcow2","file":{"filename":"a.qcow2"}}`) or a protocol prefix
//! (`file:a.qcow2`). Each comes down to the file to open and, if it names one, the format
//! driver (`qcow2::name`); what qimg cannot honour is refused, never ignored.

use std::sync::Mutex;

use anyhow::bail;
use qcow2::name::{from_options, parse_json_name, NamedImage};

use crate::qemu_opts;

/// The names images were given by, with the files [`resolve`] replaced them by: QEMU's
/// errors name an image as the user named it.
static GIVEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The name the image in file `file` was given by (`file` itself unless it was resolved).
pub fn as_given(file: &str) -> String {
    let given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let found = given.iter().find(|(f, _)| f == file);
    found.map_or(file, |(_, name)| name).to_owned()
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

/// Replaces `name` by the file it names and `format` by the format driver it names (unless
/// it names none). `image_opts`: the name is a QEMU option string, which excludes `-f`.
pub fn resolve(
    name: &mut String,
    format: &mut Option<String>,
    image_opts: bool,
) -> anyhow::Result<()> {
    if image_opts && format.is_some() {
        bail!("--image-opts and --format are mutually exclusive");
    }
    let named = if image_opts {
        if !name.contains('=') {
            // QEMU takes a bare word for a reference to a node of that name.
            bail!("Could not open '{name}': Cannot find device='{name}' nor node-name='{name}'");
        }
        from_options(&qemu_opts::parse(name))
    } else if let Some(named) = parse_json_name(name) {
        named
    } else if let Some(path) = name.strip_prefix("file:") {
        Ok(NamedImage {
            filename: path.to_owned(),
            driver: None,
        })
    } else {
        return Ok(());
    };
    let named = named.map_err(|e| anyhow::anyhow!("Could not open '{name}': {e}"))?;
    let given = std::mem::replace(name, named.filename);
    GIVEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((name.clone(), given));
    if named.driver.is_some() {
        *format = named.driver;
    }
    Ok(())
}
