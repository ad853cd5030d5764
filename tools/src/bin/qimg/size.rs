//! Sizes the way qemu-img reads and prints them.

/// Parses "10G", "512k", "1048576" (binary suffixes k/K, M, G, T, P, E; plain = bytes).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let bad = || {
        anyhow::anyhow!(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    };
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c {
                'b' | 'B' => 0,
                'k' | 'K' => 10,
                'M' | 'm' => 20,
                'G' | 'g' => 30,
                'T' | 't' => 40,
                'P' | 'p' => 50,
                'E' | 'e' => 60,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    if value < 0.0 {
        return Err(bad());
    }
    let bytes = value * (1u64 << shift) as f64;
    if bytes > i64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// qemu-img's `cvtnum`: a size for the option called `name`, refused with qemu-img's wording
/// (out of range for negative integers and sizes past `i64::MAX`).
pub fn cvtnum(name: &str, v: &str) -> anyhow::Result<u64> {
    let range = || {
        anyhow::anyhow!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    match parse_size(v) {
        Ok(n) if n > i64::MAX as u64 => return Err(range()),
        Ok(n) => return Ok(n),
        Err(_) => {}
    }
    let negative = v
        .strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    let (num, unit) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&v[..i], parse_size(&format!("1{c}")).ok()),
        _ => (v, Some(1)),
    };
    let too_big = unit
        .zip(num.parse::<f64>().ok())
        .is_some_and(|(u, n)| n >= 0.0 && n * u as f64 > i64::MAX as f64);
    if negative || too_big {
        return Err(range());
    }
    anyhow::bail!("Invalid {name} specified: '{v}'.")
}

/// QEMU's size_to_str: three significant digits and a binary unit ("64 MiB", "1.5 KiB").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let i = if bytes == 0 {
        0
    } else {
        (63 - bytes.leading_zeros()) / 10
    } as usize;
    let v = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}", g3(v), UNITS[i])
}

/// printf("%0.3g") for values in [0, 1024).
fn g3(v: f64) -> String {
    if v >= 999.5 {
        // %g switches to exponent form at 1000 after rounding to three digits.
        let e = v.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        let m = format!("{m:.2}");
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e+{e:02}");
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
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
        for v in ["-5", "8E", "10E"] {
            assert_eq!(
                cvtnum("rate limit", v).unwrap_err().to_string(),
                range,
                "{v}"
            );
        }
        for v in ["xyz", "-5k", "1.5", ""] {
            let e = cvtnum("rate limit", v).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid rate limit specified: '{v}'."));
        }
    }

    #[test]
    fn parses_and_prints_like_qemu_img() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(401408), "392 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1023 * 1024), "1.02e+03 KiB");
    }
}
