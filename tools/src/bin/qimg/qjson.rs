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

/// A JSON string literal escaped as QEMU's JSON writer does: non-ASCII as `\uXXXX`, a C
/// string (up to a NUL byte) decoded by QEMU's `mod_utf8_codepoint`, so that what is not
/// UTF-8 (invalid, overlong, surrogate or noncharacter sequences) becomes U+FFFD sequence by
/// sequence, and the two bytes C0 80 are U+0000.
fn quote(s: &[u8], out: &mut String) {
    out.push('"');
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    let mut rest = &s[..end];
    while !rest.is_empty() {
        let (cp, len) = mod_utf8_codepoint(rest);
        rest = &rest[len..];
        match cp.unwrap_or(0xFFFD) {
            0x22 => out.push_str("\\\""),
            0x5C => out.push_str("\\\\"),
            0x08 => out.push_str("\\b"),
            0x0C => out.push_str("\\f"),
            0x0A => out.push_str("\\n"),
            0x0D => out.push_str("\\r"),
            0x09 => out.push_str("\\t"),
            cp if cp > 0xFFFF => {
                let v = cp - 0x10000;
                out.push_str(&format!(
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (v >> 10),
                    0xDC00 + (v & 0x3FF)
                ));
            }
            cp if !(0x20..0x7F).contains(&cp) => out.push_str(&format!("\\u{cp:04X}")),
            cp => out.push(char::from(cp as u8)),
        }
    }
    out.push('"');
}

/// QEMU's `mod_utf8_codepoint` on the start of `s` (not empty, no NUL): the code point, or
/// None for a sequence QEMU rejects, and how many bytes it took.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let lead = s[0];
    if lead < 0x80 {
        return (Some(lead.into()), 1);
    }
    if lead >= 0xFE || lead & 0x40 == 0 {
        // Impossible bytes, or a continuation byte where a sequence should start.
        return (None, 1);
    }
    let len = lead.leading_ones() as usize;
    let mut cp = u32::from(lead) & (0x7F >> len);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => cp = (cp << 6) | u32::from(b & 0x3F),
            // A continuation byte missing: what was read so far is rejected.
            _ => return (None, i),
        }
    }
    let noncharacter = (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE;
    let valid = cp <= 0x10FFFF && !noncharacter && !(0xD800..=0xDFFF).contains(&cp);
    let overlong = cp < MIN[len - 2] && !(cp == 0 && len == 2);
    (Some(cp).filter(|_| valid && !overlong), len)
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
                    quote(k.as_bytes(), out);
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
            QObj::Str(s) => quote(s, out),
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
        quote("a\"b\\é\u{1}".as_bytes(), &mut s);
        assert_eq!(s, "\"a\\\"b\\\\\\u00E9\\u0001\"");
    }
}
