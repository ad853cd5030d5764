//! QEMU's option strings (`-o key=value,...`): the syntax of `util/qemu-option.c`
//! (`opts_do_parse`, `get_opt_value`, `has_help_option`), qemu-img's joining of several `-o`
//! (`accumulate_options`), and the typed option lists of the formats qimg creates, from which
//! `-o` values are checked and `-o help` is printed.

use anyhow::bail;

use crate::size::{strtoi64, strtosz, SizeError};

/// Joins the `-o` arguments with commas, as qemu-img does, after checking that each can be
/// joined: none is empty or starts with a comma, and none ends with an odd number of commas
/// (which would escape the separator). `None` when there is no `-o`.
pub fn accumulate(opts: &[String]) -> anyhow::Result<Option<String>> {
    for o in opts {
        let trailing = o.len() - o.trim_end_matches(',').len();
        if o.is_empty() || o.starts_with(',') || trailing % 2 == 1 {
            bail!("Invalid option list: {o}");
        }
    }
    Ok((!opts.is_empty()).then(|| opts.join(",")))
}

/// QEMU's `get_opt_value`: the value at the start of `s`, up to the first single comma (a
/// doubled comma stands for one comma), and the rest of `s` from that comma on.
fn opt_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(i) if rest[i + 1..].starts_with(',') => {
                value.push_str(&rest[..=i]);
                rest = &rest[i + 2..];
            }
            Some(i) => {
                value.push_str(&rest[..i]);
                return (value, &rest[i..]);
            }
        }
    }
}

/// Whether a joined option string asks for help: one of its elements is `help` or `?`.
pub fn has_help(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let (value, tail) = opt_value(rest);
        if value == "help" || value == "?" {
            return true;
        }
        rest = tail.strip_prefix(',').unwrap_or(tail);
    }
    false
}

/// QEMU's `opts_do_parse` (no implied first name): `key=value` pairs in order; a key alone is
/// a flag (`key` means `key=on`, `nokey` means `key=off`); `id` is dropped.
pub fn parse(s: &str) -> Vec<(String, String)> {
    let mut out = parse_all(s);
    out.retain(|(key, _)| key != "id");
    out
}

/// [`parse`] with `id` kept (an image's option string takes no `id`: it is refused there).
pub fn parse_all(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (key, value, tail) = if rest[len..].starts_with('=') {
            let (value, tail) = opt_value(&rest[len + 1..]);
            (rest[..len].to_string(), value, tail)
        } else {
            let (key, value) = match rest[..len].strip_prefix("no") {
                Some(k) => (k.to_string(), "off"),
                None => (rest[..len].to_string(), "on"),
            };
            (key, value.to_string(), &rest[len..])
        };
        rest = tail.strip_prefix(',').unwrap_or(tail);
        out.push((key, value));
    }
    out
}

/// The type of an option's value (QEMU's `QemuOptType`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Str,
    Bool,
    Number,
    Size,
}

/// One option a driver takes (QEMU's `QemuOptDesc`).
pub struct Desc {
    pub name: &'static str,
    pub kind: Type,
    pub help: &'static str,
    /// The value QEMU shows when none is given.
    pub default: Option<&'static str>,
}

const fn desc(name: &'static str, kind: Type, help: &'static str) -> Desc {
    Desc {
        name,
        kind,
        help,
        default: None,
    }
}

const fn with_default(d: Desc, default: &'static str) -> Desc {
    Desc {
        default: Some(default),
        ..d
    }
}

const SIZE: Desc = desc("size", Type::Size, "Virtual disk size");

/// The qcow2 driver's create options, in QEMU's order (that of its "Formatting" line).
pub const QCOW2: &[Desc] = &[
    desc(
        "encryption",
        Type::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    desc(
        "encrypt.format",
        Type::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    desc(
        "encrypt.key-secret",
        Type::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    desc(
        "encrypt.cipher-alg",
        Type::Str,
        "Name of encryption cipher algorithm",
    ),
    desc(
        "encrypt.cipher-mode",
        Type::Str,
        "Name of encryption cipher mode",
    ),
    desc(
        "encrypt.ivgen-alg",
        Type::Str,
        "Name of IV generator algorithm",
    ),
    desc(
        "encrypt.ivgen-hash-alg",
        Type::Str,
        "Name of IV generator hash algorithm",
    ),
    desc(
        "encrypt.hash-alg",
        Type::Str,
        "Name of encryption hash algorithm",
    ),
    desc(
        "encrypt.iter-time",
        Type::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    with_default(
        desc("cluster_size", Type::Size, "qcow2 cluster size"),
        "65536",
    ),
    with_default(desc("extended_l2", Type::Bool, "Extended L2 tables"), "off"),
    desc(
        "preallocation",
        Type::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    with_default(
        desc(
            "compression_type",
            Type::Str,
            "Compression method used for image cluster compression",
        ),
        "zlib",
    ),
    SIZE,
    desc(
        "compat",
        Type::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    desc("backing_file", Type::Str, "File name of a base image"),
    desc("backing_fmt", Type::Str, "Image format of the base image"),
    desc("data_file", Type::Str, "File name of an external data file"),
    desc(
        "data_file_raw",
        Type::Bool,
        "The external data file must stay valid as a raw image",
    ),
    with_default(
        desc("lazy_refcounts", Type::Bool, "Postpone refcount updates"),
        "off",
    ),
    with_default(
        desc(
            "refcount_bits",
            Type::Number,
            "Width of a reference count entry in bits",
        ),
        "16",
    ),
];

/// The raw format driver's create options.
pub const RAW: &[Desc] = &[SIZE];

/// The file protocol driver's create options (QEMU appends them to the format's).
pub const FILE: &[Desc] = &[
    SIZE,
    desc(
        "nocow",
        Type::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    desc(
        "preallocation",
        Type::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    desc(
        "extent_size_hint",
        Type::Size,
        "Extent size hint for the image file, 0 to disable",
    ),
];

/// The create options of format `format` (`None`: unknown), with the file protocol's after
/// them when `protocol` (QEMU's `qemu_opts_append`: a name given twice keeps the first).
pub fn create_options(format: qcow2::Format, protocol: bool) -> Vec<&'static Desc> {
    let own = match format {
        qcow2::Format::Qcow2 => QCOW2,
        qcow2::Format::Raw => RAW,
    };
    let mut list: Vec<&Desc> = own.iter().collect();
    if protocol {
        for d in FILE {
            if !list.iter().any(|o| o.name == d.name) {
                list.push(d);
            }
        }
    }
    list
}

/// Checks `pairs` against `list` in order as QEMU's `opt_validate` does: the name must be
/// known and the value of its type. Returns QEMU's message for the first that is not.
pub fn validate(pairs: &[(String, String)], list: &[&Desc]) -> Result<(), String> {
    for (k, v) in pairs {
        let Some(d) = list.iter().find(|d| d.name == k) else {
            return Err(format!("Invalid parameter '{k}'"));
        };
        match d.kind {
            Type::Str => {}
            Type::Bool => {
                bool_value(k, v)?;
            }
            Type::Number => {
                number_value(k, v)?;
            }
            Type::Size => {
                size_value(k, v)?;
            }
        }
    }
    Ok(())
}

/// A boolean option's value (QEMU's `parse_option_bool`).
pub fn bool_value(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// A number option's value (QEMU's `parse_option_number`: base 0, unsigned).
pub fn number_value(key: &str, v: &str) -> Result<u64, String> {
    match strtoi64(v) {
        Ok(n) if n >= 0 => Ok(n as u64),
        Err(SizeError::OutOfRange) => {
            Err(format!("Value '{v}' is too large for parameter '{key}'"))
        }
        _ => Err(format!("Parameter '{key}' expects a number")),
    }
}

/// A size option's value (QEMU's `parse_option_size`).
pub fn size_value(key: &str, v: &str) -> Result<u64, String> {
    match strtosz(v) {
        Ok(n) => Ok(n),
        Err(SizeError::OutOfRange) => {
            Err(format!("Value '{v}' is out of range for parameter '{key}'"))
        }
        Err(SizeError::Invalid) => Err(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, \
             G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )),
    }
}

/// The last value given for `key` (QEMU's `qemu_opt_get`: the last one counts).
pub fn last<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The "Formatting ..." line `qemu-img create` prints (QEMU's `qemu_opts_print`): every
/// option of the format and the file driver given in `pairs` (the last value counts) or with
/// a default, in QEMU's order; `size` is the image size. Numbers and sizes given show as
/// numbers, strings with their commas doubled, other values as given.
pub fn formatting_line(
    filename: &str,
    format: qcow2::Format,
    pairs: &[(String, String)],
    size: u64,
) -> String {
    let mut s = format!("Formatting '{filename}', fmt={}", format.name());
    for d in create_options(format, true) {
        let given = last(pairs, d.name);
        let value = match (d.name, given, d.kind) {
            ("size", _, _) => (size as i64).to_string(),
            (_, None, _) => match d.default {
                Some(v) => v.to_string(),
                None => continue,
            },
            (_, Some(v), Type::Str) => v.replace(',', ",,"),
            (_, Some(v), Type::Size) => (size_value(d.name, v).unwrap_or(0) as i64).to_string(),
            (_, Some(v), Type::Number) => (number_value(d.name, v).unwrap_or(0) as i64).to_string(),
            (_, Some(v), Type::Bool) => v.to_string(),
        };
        s += &format!(" {}={value}", d.name);
    }
    s
}

/// Prints the create options of `format` as `qemu-img create -o help` does: with the file
/// protocol's when a file name is given, else with a note that there may be more.
pub fn print_help(format: qcow2::Format, filename: Option<&str>) {
    let list = create_options(format, filename.is_some());
    match filename {
        Some(_) => outln!("Supported options:"),
        None => outln!("Supported {} options:", format.name()),
    }
    out!("{}", help_lines(&list));
    if filename.is_none() {
        outln!(
            "\nThe protocol level may support further options.\nSpecify the target filename to \
             include those options."
        );
    }
}

/// QEMU's `qemu_opts_print_help` lines for `list`, sorted as it sorts them.
pub fn help_lines(list: &[&Desc]) -> String {
    let mut lines = Vec::new();
    for d in list {
        let kind = match d.kind {
            Type::Str => "str",
            Type::Bool => "bool (on/off)",
            Type::Number => "num",
            Type::Size => "size",
        };
        let head = format!("  {}=<{kind}>", d.name);
        lines.push(format!("{head:<24} - {}\n", d.help));
    }
    lines.sort();
    lines.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse(s)
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn parses_like_qemu_opts() {
        assert_eq!(pairs("a=1,b=2"), [p("a", "1"), p("b", "2")]);
        assert_eq!(pairs("data_file=new,,x.d"), [p("data_file", "new,x.d")]);
        assert_eq!(pairs("a=1,,,b=2"), [p("a", "1,"), p("b", "2")]);
        assert_eq!(pairs("cluster_size=64k,,"), [p("cluster_size", "64k,")]);
        assert_eq!(pairs("lazy_refcounts"), [p("lazy_refcounts", "on")]);
        assert_eq!(pairs("nolazy_refcounts"), [p("lazy_refcounts", "off")]);
        assert_eq!(pairs("nocow"), [p("cow", "off")]);
        assert_eq!(pairs("id=3,a=1"), [p("a", "1")]);
        assert_eq!(pairs("="), [p("", "")]);
        assert_eq!(pairs("a=,b"), [p("a", ""), p("b", "on")]);
    }

    #[test]
    fn accumulates_and_finds_help_like_qemu_img() {
        let acc = |v: &[&str]| {
            accumulate(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        assert_eq!(acc(&[]), Ok(None));
        assert_eq!(acc(&["a=1", "b=2"]), Ok(Some("a=1,b=2".into())));
        assert_eq!(acc(&["a=1,,"]), Ok(Some("a=1,,".into())));
        assert_eq!(acc(&[","]), Err("Invalid option list: ,".into()));
        assert_eq!(acc(&["a=1,,,"]), Err("Invalid option list: a=1,,,".into()));
        assert_eq!(acc(&[""]), Err("Invalid option list: ".into()));
        assert!(has_help("a=1,help"));
        assert!(has_help("?"));
        assert!(!has_help("a=help"));
        assert!(!has_help("a=1,,help"));
    }

    #[test]
    fn help_lines_are_padded_like_qemu() {
        assert_eq!(
            help_lines(&create_options(qcow2::Format::Raw, true)),
            "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n  \
             nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n  \
             preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n  \
             size=<size>            - Virtual disk size\n"
        );
    }
}
