//! Human-written durations (`500ms`, `30s`, `1m30s`, `7d`) and sizes
//! (`128KiB`, `1GiB`, `100KB`, `4096`), as used throughout docs/configuration.md.

use std::time::Duration;

/// Parses a duration made of one or more `<integer><unit>` parts, units
/// `ms`, `s`, `m`, `h`, `d`. A bare number is refused: whether `30` means
/// seconds or milliseconds is exactly the kind of guess that bites later.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration (expected e.g. \"500ms\", \"30s\", \"5m\", \"7d\")".into());
    }
    let bad = || {
        format!(
            "invalid duration {s:?} (expected e.g. \"500ms\", \"30s\", \"1m30s\", \"2h\", \"7d\")"
        )
    };
    let mut rest = text;
    let mut total_ms: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let number: u128 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let factor: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "duration {s:?} needs a unit: ms, s, m, h or d (e.g. \"30s\")"
                ))
            }
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total_ms = number
            .checked_mul(factor)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
        rest = &rest[unit_len..];
        // "1m 30s" reads naturally; tolerate the space.
        rest = rest.trim_start();
    }
    let ms = u64::try_from(total_ms).map_err(|_| format!("duration {s:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses a byte size: a plain integer (bytes) or an integer with a unit.
/// `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024, `KB`/`MB`/`GB`/`TB` powers of
/// 1000, as their names say. Units are matched case-insensitively.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let bad = || {
        format!("invalid size {s:?} (expected e.g. \"4096\", \"128KiB\", \"512MiB\", \"1GiB\", \"100KB\")")
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad());
    }
    let number: u64 = text[..digits].parse().map_err(|_| bad())?;
    let unit = text[digits..].trim_start();
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The inverse of [`parse_size`] for display: the largest binary unit that
/// divides `n` exactly, else plain bytes.
pub(super) fn format_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, suffix) in UNITS {
        if n >= unit && n % unit == 0 {
            return format!("{}{suffix}", n / unit);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1h1m1s1ms"),
            Ok(Duration::from_millis(3_661_001))
        );
    }

    #[test]
    fn bad_durations_name_the_text() {
        for bad in [
            "",
            "30",
            "abc",
            "5 minutes",
            "1.5s",
            "-1s",
            "s",
            "10x",
            "99999999999999999999d",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            if !bad.is_empty() {
                assert!(err.contains(bad.trim()), "{bad}: {err}");
            }
        }
        assert!(parse_duration("30").unwrap_err().contains("needs a unit"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("128KiB"), Ok(128 * 1024));
        assert_eq!(parse_size("512MiB"), Ok(512 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("100KB"), Ok(100_000));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
    }

    #[test]
    fn sizes_format_back() {
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(128 * 1024), "128KiB");
        assert_eq!(format_size(100_000), "100000");
        assert_eq!(format_size(0), "0");
        for n in [1u64 << 30, 3 << 20, 4096, 100_000, 1536] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }

    #[test]
    fn bad_sizes_name_the_text() {
        for bad in ["", "MiB", "1.5GiB", "12 parsecs", "-1", "99999999999TiB"] {
            let err = parse_size(bad).expect_err(bad);
            if !bad.is_empty() {
                assert!(err.contains(bad), "{bad}: {err}");
            }
        }
    }
}
