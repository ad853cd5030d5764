//! Cloud Hypervisor style option lists: `key=value,key=value,flag`.
//!
//! Values cannot contain commas (as in Cloud Hypervisor); a path with a comma cannot be given.

use crate::error::{Error, Result};

/// One parsed option list, checked against the keys the option accepts.
#[derive(Debug)]
pub(crate) struct OptionList<'a> {
    entries: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> OptionList<'a> {
    /// Splits `input` at commas and each entry at its first `=`. Rejects an empty list, empty
    /// entries, keys not in `valid` and repeated keys.
    pub(crate) fn parse(input: &'a str, valid: &[&str]) -> Result<Self> {
        if input.is_empty() {
            return Err(Error::EmptyOptionList);
        }
        let mut entries: Vec<(&'a str, Option<&'a str>)> = Vec::new();
        for entry in input.split(',') {
            if entry.is_empty() {
                return Err(Error::EmptyEntry {
                    input: input.to_owned(),
                });
            }
            let (key, value) = match entry.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (entry, None),
            };
            if !valid.contains(&key) {
                return Err(Error::UnknownKey {
                    key: key.to_owned(),
                    valid: valid.join(", "),
                });
            }
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(Error::DuplicateKey {
                    key: key.to_owned(),
                });
            }
            entries.push((key, value));
        }
        Ok(Self { entries })
    }

    /// Whether `key` was given, with or without a value.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| *k == key)
    }

    /// The value of `key`, if given; `key` alone or `key=` is an error.
    pub(crate) fn value(&self, key: &str) -> Result<Option<&'a str>> {
        match self.entries.iter().find(|(k, _)| *k == key) {
            None => Ok(None),
            Some((_, Some(v))) if !v.is_empty() => Ok(Some(v)),
            Some(_) => Err(Error::MissingValue {
                key: key.to_owned(),
            }),
        }
    }

    /// The value of `key` passed through `parse`, whose error text becomes the reason.
    pub(crate) fn parsed<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, String>,
    ) -> Result<Option<T>> {
        let Some(value) = self.value(key)? else {
            return Ok(None);
        };
        parse(value)
            .map(Some)
            .map_err(|reason| Error::InvalidValue {
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            })
    }

    /// A boolean flag: absent is false, `key` alone, `key=on` or `key=true` is true,
    /// `key=off` or `key=false` is false.
    pub(crate) fn flag(&self, key: &str) -> Result<bool> {
        match self.entries.iter().find(|(k, _)| *k == key) {
            None => Ok(false),
            Some((_, None | Some("on" | "true"))) => Ok(true),
            Some((_, Some("off" | "false"))) => Ok(false),
            Some((_, Some(v))) => Err(Error::InvalidValue {
                key: key.to_owned(),
                value: (*v).to_owned(),
                reason: "expected on, off, true or false".into(),
            }),
        }
    }
}

/// Parses a plain decimal number (no sign, no spaces, no hex) as `u64`.
pub(crate) fn parse_decimal(s: &str) -> std::result::Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a decimal number".into());
    }
    s.parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["socket", "num_queues", "readonly"];

    #[test]
    fn splits_keys_values_and_flags() {
        let list = OptionList::parse("socket=/a=b,num_queues=4,readonly", KEYS).unwrap();
        assert_eq!(list.value("socket").unwrap(), Some("/a=b"));
        assert_eq!(list.value("num_queues").unwrap(), Some("4"));
        assert!(list.flag("readonly").unwrap());
        assert!(list.has("socket"));
        assert!(!OptionList::parse("socket=/s", KEYS)
            .unwrap()
            .has("readonly"));
    }

    #[test]
    fn rejects_malformed_lists() {
        assert_eq!(
            OptionList::parse("", KEYS).unwrap_err(),
            Error::EmptyOptionList
        );
        for input in ["socket=/s,", ",socket=/s", "socket=/s,,readonly"] {
            assert_eq!(
                OptionList::parse(input, KEYS).unwrap_err(),
                Error::EmptyEntry {
                    input: input.into()
                }
            );
        }
        assert_eq!(
            OptionList::parse("socket=/s,queues=2", KEYS).unwrap_err(),
            Error::UnknownKey {
                key: "queues".into(),
                valid: "socket, num_queues, readonly".into()
            }
        );
        assert_eq!(
            OptionList::parse("=x", KEYS).unwrap_err().to_string(),
            "unknown key '' (valid keys: socket, num_queues, readonly)"
        );
        assert_eq!(
            OptionList::parse("socket=/a,socket=/b", KEYS).unwrap_err(),
            Error::DuplicateKey {
                key: "socket".into()
            }
        );
    }

    #[test]
    fn missing_values() {
        for input in ["socket", "socket="] {
            let list = OptionList::parse(input, KEYS).unwrap();
            assert_eq!(
                list.value("socket").unwrap_err().to_string(),
                "'socket' needs a value (socket=...)"
            );
        }
    }

    #[test]
    fn flags() {
        for (input, expected) in [
            ("readonly", true),
            ("readonly=on", true),
            ("readonly=true", true),
            ("readonly=off", false),
            ("readonly=false", false),
            ("socket=/s", false),
        ] {
            let list = OptionList::parse(input, KEYS).unwrap();
            assert_eq!(list.flag("readonly").unwrap(), expected, "{input}");
        }
        let list = OptionList::parse("readonly=yes", KEYS).unwrap();
        assert!(matches!(
            list.flag("readonly"),
            Err(Error::InvalidValue { .. })
        ));
    }

    #[test]
    fn parsed_values_carry_the_reason() {
        let list = OptionList::parse("num_queues=x4", KEYS).unwrap();
        assert_eq!(
            list.parsed("num_queues", parse_decimal)
                .unwrap_err()
                .to_string(),
            "num_queues=x4: expected a decimal number"
        );
        let list = OptionList::parse("num_queues=12", KEYS).unwrap();
        assert_eq!(list.parsed("num_queues", parse_decimal).unwrap(), Some(12));
        assert_eq!(list.parsed("socket", parse_decimal).unwrap(), None);
    }

    #[test]
    fn decimal_numbers() {
        assert_eq!(parse_decimal("0"), Ok(0));
        assert_eq!(parse_decimal("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "-1", "+1", "0x10", " 1", "1 ", "1_000"] {
            assert!(parse_decimal(bad).is_err(), "{bad:?}");
        }
        assert!(parse_decimal("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
    }
}
