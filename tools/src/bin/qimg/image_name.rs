//! Images named as QEMU names them besides plain file names: a QEMU option string
//! (`--image-opts driver=qcow2,file.filename=a.qcow2`), a JSON pseudo-filename
//! (`json:{"driver":"qcow2","file":{"filename":"a.qcow2"}}`) or a protocol prefix
//! (`file:a.qcow2`). Each comes down to the file to open and, if it names one, the format
//! driver; what qimg's drivers cannot honour is refused, never ignored.

use std::sync::Mutex;

use anyhow::bail;

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
        Named::from_options(&qemu_opts::parse(name))
    } else if let Some(json) = name.strip_prefix("json:") {
        parse_json(json).and_then(|options| Named::from_options(&options))
    } else if let Some(path) = name.strip_prefix("file:") {
        Ok(Named {
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

/// The options of a `json:` pseudo-filename, nested objects flattened into dotted keys as
/// QEMU flattens them.
fn parse_json(json: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    let serde_json::Value::Object(object) = value else {
        return Err("Invalid JSON object given".into());
    };
    let mut out = Vec::new();
    flatten("", &object, &mut out)?;
    Ok(out)
}

/// Appends the members of `object` to `out`, their keys prefixed with `prefix`.
fn flatten(
    prefix: &str,
    object: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, String)>,
) -> Result<(), String> {
    use serde_json::Value;
    for (key, value) in object {
        let key = format!("{prefix}{key}");
        let value = match value {
            Value::Object(inner) => {
                flatten(&format!("{key}."), inner, out)?;
                continue;
            }
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
            Value::Number(n) => n.to_string(),
            Value::Null | Value::Array(_) => {
                return Err(format!("qimg does not support the option '{key}' here"));
            }
        };
        out.push((key, value));
    }
    Ok(())
}

/// What an option string names: the file and, if given, the format driver.
struct Named {
    filename: String,
    driver: Option<String>,
}

impl Named {
    /// Reads `options` (a later value of a key replacing an earlier one, as in QEMU).
    fn from_options(options: &[(String, String)]) -> Result<Named, String> {
        let get = |key: &str| {
            options
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let driver = get("driver");
        if let Some(protocol @ ("file" | "host_device")) = driver {
            return Err(format!(
                "qimg opens images through a format driver (qcow2 or raw), not the protocol \
                 driver '{protocol}' alone"
            ));
        }
        let format = driver.unwrap_or("qcow2");
        for (key, _) in options {
            match key.as_str() {
                "driver" | "file.driver" | "file.filename" => {}
                "file" => {
                    let node = get("file").unwrap_or_default();
                    return Err(format!(
                        "Cannot find device='{node}' nor node-name='{node}'"
                    ));
                }
                // Only a protocol driver takes a file name of its own.
                "filename" if get("file.filename").is_some() => {
                    return Err(format!(
                        "Block format '{format}' does not support the option 'filename'"
                    ));
                }
                "filename" => {}
                other => return Err(format!("qimg does not support the option '{other}'")),
            }
        }
        let has_file = options.iter().any(|(k, _)| k.starts_with("file."));
        if driver.is_none() && !has_file {
            return Err("Must specify either driver or file".into());
        }
        let Some(filename) = get("file.filename") else {
            return Err(match has_file {
                true => qcow2::Error::NoFileName.to_string(),
                false => "A block device must be specified for \"file\"".into(),
            });
        };
        match get("file.driver") {
            None | Some("file") => {}
            Some("host_device") => {
                use std::os::unix::fs::FileTypeExt;
                let device = std::fs::metadata(filename)
                    .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device());
                if let Ok(false) = device {
                    return Err(format!(
                        "'host_device' driver requires '{filename}' to be either a character \
                         or block device"
                    ));
                }
            }
            Some(other) => return Err(format!("qimg does not support the protocol '{other}'")),
        }
        Ok(Named {
            filename: filename.to_owned(),
            driver: driver.map(str::to_owned),
        })
    }
}
