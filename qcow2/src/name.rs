//! Image names QEMU takes besides plain file names: `json:{...}` pseudo-filenames (also in
//! backing file names, where QEMU writes them for images it cannot name by a file) and the
//! option lists they stand for (`driver=qcow2,file.filename=PATH`), down to the file and the
//! format they name. What this crate cannot honour is refused, never ignored.

/// What an image name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedImage {
    /// The file (as given: a relative name is relative to the working directory, as QEMU
    /// takes it).
    pub filename: String,
    /// The format driver, if the name gives one.
    pub driver: Option<String>,
}

/// Why a name cannot be opened (QEMU's words where QEMU refuses it too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

/// What the `json:` pseudo-filename `name` names; `None` if `name` is no such name.
pub fn parse_json_name(name: &str) -> Option<Result<NamedImage, NameError>> {
    let json = name.strip_prefix("json:")?;
    Some(parse_json(json).and_then(|options| from_options(&options)))
}

/// The options of a `json:` pseudo-filename, nested objects flattened into dotted keys as
/// QEMU flattens them.
fn parse_json(json: &str) -> Result<Vec<(String, String)>, NameError> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| NameError(format!("Could not parse the JSON options: {e}")))?;
    let serde_json::Value::Object(object) = value else {
        return Err(NameError("Invalid JSON object given".into()));
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
) -> Result<(), NameError> {
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
                return Err(NameError(format!(
                    "the option '{key}' is not supported here"
                )));
            }
        };
        out.push((key, value));
    }
    Ok(())
}

/// What the flattened option list `options` names (a later value of a key replacing an
/// earlier one, as in QEMU): the keys honoured are `driver` (a format driver), `file.driver`
/// (`file` or `host_device`) and `file.filename`.
pub fn from_options(options: &[(String, String)]) -> Result<NamedImage, NameError> {
    let refuse = |why: String| Err(NameError(why));
    let get = |key: &str| {
        let found = options.iter().rev().find(|(k, _)| k == key);
        found.map(|(_, v)| v.as_str())
    };
    let driver = get("driver");
    if let Some(protocol @ ("file" | "host_device")) = driver {
        return refuse(format!(
            "images open through a format driver (qcow2 or raw), not the protocol driver \
             '{protocol}' alone"
        ));
    }
    for (key, _) in options {
        match key.as_str() {
            "driver" | "file.driver" | "file.filename" => {}
            "file" => {
                let node = get("file").unwrap_or_default();
                return refuse(format!(
                    "Cannot find device='{node}' nor node-name='{node}'"
                ));
            }
            // Only a protocol driver takes a file name of its own.
            "filename" if get("file.filename").is_some() => {
                let format = driver.unwrap_or("qcow2");
                return refuse(format!(
                    "Block format '{format}' does not support the option 'filename'"
                ));
            }
            "filename" => {}
            other => return refuse(format!("the option '{other}' is not supported")),
        }
    }
    let has_file = options.iter().any(|(k, _)| k.starts_with("file."));
    if driver.is_none() && !has_file {
        return refuse("Must specify either driver or file".into());
    }
    let Some(filename) = get("file.filename") else {
        return refuse(match has_file {
            true => crate::Error::NoFileName.to_string(),
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
                return refuse(format!(
                    "'host_device' driver requires '{filename}' to be either a character or \
                     block device"
                ));
            }
        }
        Some(other) => return refuse(format!("the protocol '{other}' is not supported")),
    }
    Ok(NamedImage {
        filename: filename.to_owned(),
        driver: driver.map(str::to_owned),
    })
}
