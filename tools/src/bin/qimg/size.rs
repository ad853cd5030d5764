//! Sizes the way qemu-img reads and prints them.

/// Why a size string is refused (QEMU's `qemu_strtosz` returns -EINVAL or -ERANGE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size.
    Invalid,
    /// A size, but negative or past 2^64 - 1.
    OutOfRange,
}

/// QEMU's `qemu_strtosz`: decimal with an optional fraction ("1.5k", ".5M", "1."), or
/// hexadecimal without fraction or suffix ("0x1f"); one optional binary suffix b/B (bytes),
/// k/K, m/M, g/G, t/T, p/P, e/E (so "1e3" is one exabyte followed by garbage); leading
/// blanks and '+' allowed; a fraction needs a suffix other than bytes and rounds half up.
pub fn strtosz(s: &str) -> Result<u64, SizeError> {
    use SizeError::{Invalid, OutOfRange};
    let digits = |t: &str, radix: u32| {
        t.bytes()
            .take_while(|b| char::from(*b).is_digit(radix))
            .count()
    };
    let blank = s.len()
        - s.trim_start_matches(|c: char| c.is_ascii_whitespace())
            .len();
    let (sign, body) = match s.as_bytes().get(blank) {
        Some(b'+') => (1, &s[blank + 1..]),
        Some(b'-') => (-1, &s[blank + 1..]),
        _ => (0, &s[blank..]),
    };
    let int_len = digits(body, 10);
    let mut val: u64 = 0;
    // The rest of the string after what has been parsed.
    let mut rest;
    let mut valf: u64 = 0;
    if int_len > 0 {
        val = body[..int_len].parse().map_err(|_| {
            // Too many digits: out of range, unless garbage follows (then not a size).
            if int_len == body.len() {
                OutOfRange
            } else {
                Invalid
            }
        })?;
        if sign < 0 {
            return Err(if int_len == body.len() {
                OutOfRange
            } else {
                Invalid
            });
        }
        rest = &body[int_len..];
    } else {
        rest = s;
    }
    if int_len > 0 && val == 0 && rest.starts_with(['x', 'X']) {
        let hex_len = digits(&rest[1..], 16);
        // strtoull reads "0x" as a prefix only at the start: "00x1" is 0 and garbage.
        if hex_len == 0 || int_len > 1 {
            return Err(Invalid);
        }
        val = u64::from_str_radix(&rest[1..1 + hex_len], 16).map_err(|_| {
            if 1 + hex_len == rest.len() {
                OutOfRange
            } else {
                Invalid
            }
        })?;
        rest = &rest[1 + hex_len..];
        if rest.starts_with('.')
            || rest
                .bytes()
                .next()
                .is_some_and(|c| suffix_shift(c).is_some())
        {
            return Err(Invalid);
        }
    } else if rest.starts_with('.') || (int_len == 0 && s.contains('.')) {
        if int_len > 0 && !rest.as_bytes().get(1).is_some_and(u8::is_ascii_digit) {
            rest = &rest[1..];
        } else {
            // strtod on the rest with any exponent cut off: [blanks][sign]digits.digits
            let cut = rest.find(['e', 'E']).unwrap_or(rest.len());
            let t = &rest[..cut];
            let lead = t.len()
                - t.trim_start_matches(|c: char| c.is_ascii_whitespace())
                    .len();
            let signed = usize::from(t[lead..].starts_with(['+', '-']));
            let mant = &t[lead + signed..];
            let whole = digits(mant, 10);
            let frac = if mant[whole..].starts_with('.') {
                digits(&mant[whole + 1..], 10)
            } else {
                0
            };
            if whole + frac == 0 {
                return Err(Invalid);
            }
            let len = lead
                + signed
                + whole
                + usize::from(frac > 0 || mant[whole..].starts_with('.'))
                + frac;
            let number: f64 = t[lead..len].parse().map_err(|_| Invalid)?;
            if number.is_sign_negative() || t[..len].contains('-') {
                return Err(Invalid);
            }
            // The integral part came before the '.', so `number` is in [0, 1] here. A
            // fraction too small for a normal double underflows (ERANGE), which QEMU keeps
            // as the smallest fraction.
            let nonzero = t[lead..len].bytes().any(|b| (b'1'..=b'9').contains(&b));
            if number >= 1.0 {
                val = val.checked_add(1).ok_or(OutOfRange)?;
            } else if nonzero && number < f64::MIN_POSITIVE {
                valf = 1;
            } else {
                valf = (number * 2f64.powi(64)) as u64;
            }
            rest = &rest[len..];
        }
    } else if int_len == 0 {
        return Err(Invalid);
    }
    let shift = match rest.bytes().next().and_then(suffix_shift) {
        Some(shift) => {
            rest = &rest[1..];
            shift
        }
        None => 0,
    };
    if !rest.is_empty() || (shift == 0 && valf != 0) {
        return Err(Invalid);
    }
    // 64.64 fixed point times the unit; the fraction's remainder rounds half up.
    let scaled = (u128::from(val) << shift)
        + ((u128::from(valf) << shift) >> 64)
        + u128::from((((u128::from(valf) << shift) as u64) >> 63) as u8 as u64);
    u64::try_from(scaled).map_err(|_| OutOfRange)
}

/// Binary exponent of a size suffix.
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c {
        b'b' | b'B' => 0,
        b'k' | b'K' => 10,
        b'm' | b'M' => 20,
        b'g' | b'G' => 30,
        b't' | b'T' => 40,
        b'p' | b'P' => 50,
        b'e' | b'E' => 60,
        _ => return None,
    })
}

/// qemu-img's `cvtnum_full`: a size for the option called `name` in `min..=max`, refused
/// with qemu-img's wording.
pub fn cvtnum_full(name: &str, v: &str, min: u64, max: u64) -> anyhow::Result<u64> {
    match strtosz(v) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Err(SizeError::Invalid) => anyhow::bail!("Invalid {name} specified: '{v}'."),
        _ => anyhow::bail!("Invalid {name} specified. Must be between {min} and {max}."),
    }
}

/// QEMU's `qemu_strtoi64` with base 0: an integer (decimal, 0x hexadecimal or 0 octal) with
/// optional leading blanks and sign, and nothing after it.
pub fn strtoi64(s: &str) -> Result<i64, SizeError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex = t.len() > 2 && t.starts_with(['0']) && t[1..].starts_with(['x', 'X']);
    let (radix, digits) = if hex {
        (16, &t[2..])
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    let magnitude = u128::from_str_radix(digits, radix).unwrap_or(u128::MAX);
    let value = if negative {
        0i128.checked_sub_unsigned(magnitude)
    } else {
        i128::try_from(magnitude).ok()
    };
    value
        .and_then(|v| i64::try_from(v).ok())
        .ok_or(SizeError::OutOfRange)
}

/// qemu-img's `cvtnum_full` for a count (not a size): an integer in `min..=max`.
pub fn cvtint_full(name: &str, v: &str, min: u64, max: u64) -> anyhow::Result<u64> {
    match strtoi64(v) {
        Ok(n) if u64::try_from(n).is_ok_and(|n| (min..=max).contains(&n)) => Ok(n as u64),
        Err(SizeError::Invalid) => anyhow::bail!("Invalid {name} specified: '{v}'."),
        _ => anyhow::bail!("Invalid {name} specified. Must be between {min} and {max}."),
    }
}

/// qemu-img's `cvtnum`: a size in `0..=i64::MAX`.
pub fn cvtnum(name: &str, v: &str) -> anyhow::Result<u64> {
    cvtnum_full(name, v, 0, i64::MAX as u64)
}

/// A size-typed `-o` option (QEMU's `parse_option_size`), refused with QEMU's wording.
pub fn option_size(param: &str, v: &str) -> anyhow::Result<u64> {
    match strtosz(v) {
        Ok(n) => Ok(n),
        Err(SizeError::OutOfRange) => {
            anyhow::bail!("Value '{v}' is out of range for parameter '{param}'")
        }
        Err(SizeError::Invalid) => anyhow::bail!(
            "Parameter '{param}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ),
    }
}

/// QEMU's size_to_str: three significant digits and a binary unit ("64 MiB", "1.5 KiB"),
/// switching to the next unit once the number reaches 1000 (1000 KiB is "0.977 MiB"; 999.5
/// KiB still rounds to "1e+03 KiB").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // floor(log2(bytes * 1024 / 1000)) / 10, as QEMU computes it with frexp: the exponent
    // of the double, read exactly from its bits.
    let scaled = bytes as f64 / 0.9765625;
    let i = if scaled < 1.0 {
        0
    } else {
        let exponent = ((scaled.to_bits() >> 52) & 0x7ff) as usize - 1023;
        exponent / 10
    };
    let v = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}", g3(v), UNITS[i])
}

/// printf("%0.3g") for values in [0, 1000).
fn g3(v: f64) -> String {
    if v >= 999.5 {
        // %g rounds to three digits, reaching 1000, and then switches to exponent form.
        return "1e+03".to_string();
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtnum_refuses_like_qemu_img() {
        assert_eq!(cvtnum("rate limit", "1.5k").unwrap(), 1536);
        assert_eq!(cvtnum("rate limit", "7E").unwrap(), 7 << 60);
        let range = "Invalid rate limit specified. Must be between 0 and 9223372036854775807.";
        for v in ["-5", " -5", "8E", "10E", "99999999999999999999"] {
            let e = cvtnum("rate limit", v).unwrap_err().to_string();
            assert_eq!(e, range, "{v}");
        }
        for v in ["xyz", "-5k", "1.5", "", "1e3", "0x10k", "5 "] {
            let e = cvtnum("rate limit", v).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid rate limit specified: '{v}'."));
        }
    }

    /// Values and verdicts taken from qemu-img 10.0 (`qemu-img create -f raw x SIZE` and
    /// `-o size=SIZE`).
    #[test]
    fn strtosz_reads_sizes_like_qemu() {
        use SizeError::{Invalid, OutOfRange};
        let cases: &[(&str, Result<u64, SizeError>)] = &[
            ("4096", Ok(4096)),
            ("64M", Ok(64 << 20)),
            ("2K", Ok(2048)),
            ("1b", Ok(1)),
            ("1B", Ok(1)),
            ("08", Ok(8)),
            ("+5", Ok(5)),
            (" 1k", Ok(1024)),
            ("0x10", Ok(16)),
            ("0X1F", Ok(31)),
            ("1.", Ok(1)),
            ("1.0", Ok(1)),
            ("1.k", Ok(1024)),
            ("1.0k", Ok(1024)),
            (".5k", Ok(512)),
            (" .5k", Ok(512)),
            ("+.5k", Ok(512)),
            ("0.3k", Ok(307)),
            ("1.7k", Ok(1741)),
            ("0.0001k", Ok(0)),
            ("3.14159M", Ok(3294196)),
            ("1.99999999999999999999", Ok(2)),
            ("0.99999999999999999999k", Ok(1024)),
            ("1.00000000000000000001k", Ok(1024)),
            ("1e", Ok(1 << 60)),
            ("1.5E", Ok(1729382256910270464)),
            ("7.99999999999E", Ok(9223372036843246592)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("15.9999999999999999E", Ok(u64::MAX - 127)),
            ("-5", Err(OutOfRange)),
            ("-0", Err(OutOfRange)),
            (" -5", Err(OutOfRange)),
            ("16E", Err(OutOfRange)),
            ("18446744073709551616", Err(OutOfRange)),
            ("-5k", Err(Invalid)),
            ("-.5k", Err(Invalid)),
            ("99999999999999999999k", Err(Invalid)),
            ("1e3", Err(Invalid)),
            ("1.5", Err(Invalid)),
            ("1.5b", Err(Invalid)),
            ("0x", Err(Invalid)),
            ("0x1.8", Err(Invalid)),
            ("00x10", Err(Invalid)),
            ("1.000000000000000000000000000001", Ok(1)),
            ("0x10k", Err(Invalid)),
            ("5 ", Err(Invalid)),
            (".", Err(Invalid)),
            (".k", Err(Invalid)),
            ("2kB", Err(Invalid)),
            ("1.inf", Err(Invalid)),
            ("inf", Err(Invalid)),
            ("nan", Err(Invalid)),
            ("1_000", Err(Invalid)),
            ("", Err(Invalid)),
        ];
        for (v, want) in cases {
            assert_eq!(strtosz(v), *want, "{v:?}");
        }
    }

    /// Counts as qemu-img 10.0 reads them (`qemu-img dd count=N`, `bench -c/-d`).
    #[test]
    fn counts_are_integers_like_qemu_img() {
        assert_eq!(strtoi64(" +3"), Ok(3));
        assert_eq!(strtoi64("0x10"), Ok(16));
        assert_eq!(strtoi64("010"), Ok(8));
        assert_eq!(strtoi64("-5"), Ok(-5));
        assert_eq!(strtoi64("99999999999999999999"), Err(SizeError::OutOfRange));
        for v in ["8k", "1.5", "08", "0x", "", "3 ", "abc"] {
            assert_eq!(strtoi64(v), Err(SizeError::Invalid), "{v:?}");
        }
        let count = |v| cvtint_full("count", v, 0, i64::MAX as u64).map_err(|e| e.to_string());
        assert_eq!(count("0"), Ok(0));
        assert_eq!(count("7E"), Err("Invalid count specified: '7E'.".into()));
        assert_eq!(
            count("-5"),
            Err("Invalid count specified. Must be between 0 and 9223372036854775807.".into())
        );
    }

    #[test]
    fn prints_sizes_like_qemu_img() {
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(401408), "392 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(512), "512 B");
        // Values captured from qemu-img 10.0 info.
        assert_eq!(human(1023 * 1024), "0.999 MiB");
        assert_eq!(human(1000 * 1024), "0.977 MiB");
        assert_eq!(human(1023488), "1e+03 KiB");
        assert_eq!(human(1000 << 20), "0.977 GiB");
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1000), "0.977 KiB");
        assert_eq!(human(0), "0 B");
        assert_eq!(human(u64::MAX), "16 EiB");
    }
}
