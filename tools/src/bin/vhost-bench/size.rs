//! Command-line values: sizes with binary suffixes (as fio reads them) and seconds.

/// Largest request size (`--bs`): every queue maps `iodepth` buffers of this size.
const MAX_BS: u64 = 64 << 20;

/// Bytes from "4096", "4k", "4K", "4KiB", "1m", "2g", "1t" (suffixes are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let shift = match &lower[digits.len()..] {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        unit => return Err(format!("unknown unit '{unit}' (use k, m, g or t)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of bytes"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A request size: a non-zero multiple of 512 up to 64 MiB.
pub fn parse_block_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n == 0 || n % 512 != 0 || n > MAX_BS {
        return Err(format!(
            "{n} is not a multiple of 512 between 512 and {MAX_BS}"
        ));
    }
    usize::try_from(n).map_err(|e| e.to_string())
}

/// A non-negative, finite number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds")),
    }
}

/// A positive, finite number of seconds.
pub fn parse_runtime(s: &str) -> Result<f64, String> {
    let v = parse_seconds(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("the runtime must be positive".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("1.5k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999t").is_err());
        assert_eq!(parse_block_size("1m"), Ok(1 << 20));
        assert!(parse_block_size("1000").is_err());
        assert!(parse_block_size("0").is_err());
        assert!(parse_block_size("128m").is_err());
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("inf").is_err());
        assert_eq!(parse_runtime("3"), Ok(3.0));
        assert!(parse_runtime("0").is_err());
    }
}
