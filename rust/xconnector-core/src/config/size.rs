//! Byte sizes as users write them: an integer is MiB (the design's `max_cache_size: 2048`), a
//! string carries a unit (`"2GiB"`, `"512MB"`, `"1.5 GiB"`, `"4096B"`).

/// Parses a size string into bytes, or says what is wrong with it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(format!("{text:?} is not a size; write a number with a unit, e.g. \"2GiB\" or \"512MB\""));
    }
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size: {num:?} is not a number"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "mib" | "m" => 1 << 20,
        "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" | "k" => 1 << 10,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        _ => return Err(format!("{text:?} has an unknown unit {unit:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// An integer size in MiB, as bytes.
pub fn mib_to_bytes(mib: i64) -> Result<u64, String> {
    if mib < 0 {
        return Err(format!("{mib} is negative; sizes are MiB >= 0 or strings like \"2GiB\""));
    }
    (mib as u64).checked_mul(1 << 20).ok_or_else(|| format!("{mib} MiB is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("2048"), Ok(2048 << 20));
        assert_eq!(parse_size(" 1gb "), Ok(1_000_000_000));
        assert_eq!(mib_to_bytes(2048), Ok(2048 << 20));
    }

    #[test]
    fn errors_say_what_to_write() {
        assert!(parse_size("lots").unwrap_err().contains("e.g. \"2GiB\""));
        assert!(parse_size("2 parsecs").unwrap_err().contains("unknown unit \"parsecs\""));
        assert!(parse_size("1.2.3GB").unwrap_err().contains("not a number"));
        assert!(parse_size("-1GB").unwrap_err().contains("not a size"));
        assert!(mib_to_bytes(-5).unwrap_err().contains("negative"));
        assert!(parse_size("1e400").is_err());
    }
}
