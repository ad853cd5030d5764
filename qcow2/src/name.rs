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
fn parse_json_name(name: &str) -> Option<Result<NamedImage, NameError>> {
    let json = name.strip_prefix("json:")?;
    Some(parse_json(json).and_then(|options| from_options(&options)))
}

/// The options of a `json:` pseudo-filename, nested objects flattened into dotted keys as
/// QEMU flattens them. As QEMU's parser, a key given twice in one object is refused; so is
/// a dotted key that another member also produces, and a value that is not a string or an
/// object (no option this crate honours takes one).
fn parse_json(json: &str) -> Result<Vec<(String, String)>, NameError> {
    let mut out = Vec::new();
    let mut refusal = None;
    let node = Node {
        key: None,
        out: &mut out,
        refusal: &mut refusal,
    };
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = serde::de::DeserializeSeed::deserialize(node, &mut de).and_then(|()| de.end());
    if let Some(refused) = refusal {
        return Err(refused);
    }
    parsed.map_err(|e| NameError(format!("Could not parse the JSON options: {e}")))?;
    for (i, (key, _)) in out.iter().enumerate() {
        if out[..i].iter().any(|(k, _)| k == key) {
            return Err(NameError(format!("the option '{key}' is given twice")));
        }
    }
    Ok(out)
}

/// One JSON value of a pseudo-filename: the whole object (`key` `None`) or a member's value.
struct Node<'a> {
    key: Option<String>,
    out: &'a mut Vec<(String, String)>,
    /// Why the name is refused, in QEMU's words (the parser's own error carries a position).
    refusal: &'a mut Option<NameError>,
}

impl Node<'_> {
    /// Records `why` and returns the parser error that stops the walk.
    fn refuse<E: serde::de::Error>(self, why: String) -> E {
        *self.refusal = Some(NameError(why));
        E::custom("refused")
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let prefix = self.key.map(|k| format!("{k}.")).unwrap_or_default();
        let mut seen = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                *self.refusal = Some(NameError(
                    "Could not parse the JSON options: JSON parse error, duplicate key".into(),
                ));
                return Err(serde::de::Error::custom("refused"));
            }
            map.next_value_seed(Node {
                key: Some(format!("{prefix}{key}")),
                out: &mut *self.out,
                refusal: &mut *self.refusal,
            })?;
            seen.push(key);
        }
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        match self.key {
            Some(key) => {
                self.out.push((key, v.to_owned()));
                Ok(())
            }
            None => Err(self.refuse("Invalid JSON object given".into())),
        }
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.not_a_string())
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        Err(self.not_a_string())
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        Err(self.not_a_string())
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        Err(self.not_a_string())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(self.not_a_string())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.not_a_string())
    }
}

impl Node<'_> {
    /// The refusal of a value that is neither a string nor an object.
    fn not_a_string<E: serde::de::Error>(self) -> E {
        let why = match &self.key {
            None => "Invalid JSON object given".to_owned(),
            Some(key) => format!("Invalid parameter type for '{key}', expected: string"),
        };
        self.refuse(why)
    }
}

/// What `name` names if it is a pseudo-filename: a `json:` name's file and driver, a `file:`
/// name's file; any other protocol is refused. `None` for a plain file name.
pub fn parse_name(name: &str) -> Option<Result<NamedImage, NameError>> {
    Some(match protocol(name)? {
        "json" => return parse_json_name(name),
        "file" => Ok(NamedImage {
            filename: strip_file_protocol(name),
            driver: None,
        }),
        other => Err(NameError(format!("Unknown protocol '{other}'"))),
    })
}

/// The file an image (or external data file) to be created under `name` goes into: a plain
/// name, or NAME of `file:NAME`; QEMU creates through no other protocol.
pub fn new_file_name(name: &str) -> Result<String, NameError> {
    match protocol(name) {
        None => Ok(name.to_owned()),
        Some("file") => Ok(strip_file_protocol(name)),
        Some(other) => Err(NameError(format!("Unknown protocol '{other}'"))),
    }
}

/// The file a `file:NAME` name names: NAME, made `./NAME` if NAME would itself read as a
/// protocol name (as QEMU shows it).
pub fn strip_file_protocol(name: &str) -> String {
    let file = name.strip_prefix("file:").unwrap_or(name);
    match protocol(file) {
        Some(_) => format!("./{file}"),
        None => file.to_owned(),
    }
}

/// The protocol prefix of `name` (`json` of `json:{...}`), as QEMU finds one: a colon
/// before any slash.
pub fn protocol(name: &str) -> Option<&str> {
    let at = name.find([':', '/'])?;
    name[at..].starts_with(':').then(|| &name[..at])
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
            // QEMU names block nodes by `node-name`; `id` is no option of theirs.
            "id" => {
                let format = driver.unwrap_or("qcow2");
                return refuse(format!(
                    "Block format '{format}' does not support the option 'id'"
                ));
            }
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
