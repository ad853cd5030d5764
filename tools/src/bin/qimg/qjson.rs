//! QEMU's QObject model as qemu-img prints it: pretty JSON with QDict hash-bucket key
//! order and 4-space indentation, and the human "key: value" dump of format-specific data.

/// A QObject: dictionaries keep their QAPI insertion order; QDict order is applied on output.
#[derive(Debug, Clone, PartialEq)]
pub enum QObj {
    /// A dictionary, in insertion (QAPI field) order.
    Dict(Vec<(&'static str, QObj)>),
    /// A list.
    List(Vec<QObj>),
    /// A string: bytes, as QEMU's C strings are (names read from an image need not be
    /// UTF-8; JSON shows invalid bytes as U+FFFD, the human dump as they are).
    Str(Vec<u8>),
    /// An integer (wide enough for int64 and uint64).
    Int(i128),
    /// A boolean.
    Bool(bool),
}

impl From<&str> for QObj {
    fn from(s: &str) -> QObj {
        QObj::Str(s.as_bytes().to_vec())
    }
}
impl From<String> for QObj {
    fn from(s: String) -> QObj {
        QObj::Str(s.into_bytes())
    }
}
impl From<&[u8]> for QObj {
    fn from(s: &[u8]) -> QObj {
        QObj::Str(s.to_vec())
    }
}
impl From<bool> for QObj {
    fn from(b: bool) -> QObj {
        QObj::Bool(b)
    }
}
impl From<u64> for QObj {
    fn from(n: u64) -> QObj {
        QObj::Int(n.into())
    }
}
impl From<u32> for QObj {
    fn from(n: u32) -> QObj {
        QObj::Int(n.into())
    }
}
impl From<i64> for QObj {
    fn from(n: i64) -> QObj {
        QObj::Int(n.into())
    }
}

/// Builds a dictionary from fields in QAPI order; `None` values (absent optional members)
/// are left out.
pub fn dict<const N: usize>(fields: [(&'static str, Option<QObj>); N]) -> QObj {
    QObj::Dict(
        fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect(),
    )
}

/// QEMU's QDict bucket of a key (tdb_hash, then QDict's modulus).
fn bucket(key: &str) -> u32 {
    let mut h: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, c) in key.bytes().enumerate() {
        h = h.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(h).wrapping_add(12345) % 512
}

/// Orders fields (given in insertion order) as a QDict iterates them: by bucket, and most
/// recently inserted first within a bucket.
fn qdict_order<'a>(fields: &'a [(&'static str, QObj)]) -> Vec<(&'static str, &'a QObj)> {
    let mut indexed: Vec<(usize, &(&'static str, QObj))> = fields.iter().enumerate().collect();
    indexed.sort_by(|(ia, (ka, _)), (ib, (kb, _))| bucket(ka).cmp(&bucket(kb)).then(ib.cmp(ia)));
    indexed.into_iter().map(|(_, (k, v))| (*k, v)).collect()
}

/// A JSON string literal escaped as QEMU's `to_json` does (non-ASCII as `\uXXXX`).
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl QObj {
    /// Pretty JSON as qemu-img prints it (no trailing newline).
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(0, &mut out);
        out
    }

    fn write_json(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent + 4);
        match self {
            QObj::Dict(fields) => {
                out.push_str("{\n");
                let ordered = qdict_order(fields);
                for (i, (k, v)) in ordered.iter().enumerate() {
                    out.push_str(&pad);
                    quote(k, out);
                    out.push_str(": ");
                    v.write_json(indent + 4, out);
                    out.push_str(if i + 1 < ordered.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push('}');
            }
            QObj::List(items) => {
                out.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    out.push_str(&pad);
                    v.write_json(indent + 4, out);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&" ".repeat(indent));
                out.push(']');
            }
            QObj::Str(s) => quote(&String::from_utf8_lossy(s), out),
            QObj::Int(n) => out.push_str(&n.to_string()),
            QObj::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }

    /// Whether this is a composite (dictionary or list).
    fn composite(&self) -> bool {
        matches!(self, QObj::Dict(_) | QObj::List(_))
    }

    /// Whether a dictionary or list has members (QEMU's `qobject_has_content`).
    pub fn has_content(&self) -> bool {
        match self {
            QObj::Dict(f) => !f.is_empty(),
            QObj::List(l) => !l.is_empty(),
            _ => true,
        }
    }

    /// QEMU's human `dump_qobject` (used for "Format specific information").
    pub fn dump_human(&self, indentation: usize, out: &mut Vec<u8>) {
        let line = |out: &mut Vec<u8>, label: String, v: &QObj| {
            let end = if v.composite() { "\n" } else { " " };
            out.extend_from_slice(
                format!("{:w$}{label}:{end}", "", w = indentation * 4).as_bytes(),
            );
            v.dump_human(indentation + 1, out);
            if !v.composite() {
                out.push(b'\n');
            }
        };
        match self {
            QObj::Dict(fields) => {
                for (k, v) in qdict_order(fields) {
                    line(out, k.replace('-', " "), v);
                }
            }
            QObj::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    line(out, format!("[{i}]"), v);
                }
            }
            QObj::Str(s) => out.extend_from_slice(s),
            QObj::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
            QObj::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_qemu_img_check_key_order() {
        let obj = dict([
            ("filename", Some("q1.qcow2".into())),
            ("format", Some("qcow2".into())),
            ("check-errors", Some(0u64.into())),
            ("image-end-offset", Some(524288u64.into())),
            ("corruptions", None),
            ("total-clusters", Some(1024u64.into())),
            ("allocated-clusters", Some(3u64.into())),
            ("fragmented-clusters", Some(1u64.into())),
            ("compressed-clusters", Some(1u64.into())),
        ]);
        let expected = "{\n    \"image-end-offset\": 524288,\n    \"compressed-clusters\": 1,\n    \"total-clusters\": 1024,\n    \"check-errors\": 0,\n    \"allocated-clusters\": 3,\n    \"filename\": \"q1.qcow2\",\n    \"format\": \"qcow2\",\n    \"fragmented-clusters\": 1\n}";
        assert_eq!(obj.to_json(), expected);
    }

    #[test]
    fn empty_containers_and_escapes_print_like_qemu() {
        let obj = dict([("children", Some(QObj::List(vec![QObj::Dict(vec![])])))]);
        assert_eq!(
            obj.to_json(),
            "{\n    \"children\": [\n        {\n        }\n    ]\n}"
        );
        let mut s = String::new();
        quote("a\"b\\é\u{1}", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\\\u00E9\\u0001\"");
    }
}
