//! Human-written durations (`500ms`, `30s`, `1m30s`, `7d`) and sizes
//! (`128KiB`, `1GiB`, `100KB`, `4096`), as used throughout docs/configuration.md.
//! Durations are parsed by humantime; sizes by the hand-written parser below
//! (see [`parse_size`] for why not bytesize).

use std::time::Duration;

use humantime::DurationError;

/// Parses a duration: one or more `<number><unit>` parts such as `500ms`,
/// `30s`, `1m30s`, `1m 30s` or `1.5s` (docs/configuration.md). humantime
/// does the parsing; around it plantgate keeps what its configurations have
/// always relied on:
/// - a bare number is refused (humantime does too, except `0`): whether `30`
///   means seconds or milliseconds is exactly the kind of guess that bites
///   later;
/// - units are lower case: humantime reads `M` as months next to `m` for
///   minutes, and a `5M` meant as minutes must not wait five months, so an
///   upper-case letter is refused, as it always was;
/// - whole milliseconds: the agent's timers, the OPC UA intervals and the
///   effective configuration that `plantgate check` prints all count in
///   milliseconds, so a finer part (`500us`, `1.0005s`) would be dropped
///   silently;
/// - at most `u64::MAX` milliseconds, the bound it always had.
///
/// Every error names the text, so the caller only adds the key path.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration (expected e.g. \"500ms\", \"30s\", \"5m\", \"7d\")".into());
    }
    if text.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "invalid duration {s:?}: units are lower case (ms, s, m, h, d; \"M\" would be months)"
        ));
    }
    let d = humantime::parse_duration(text).map_err(|e| match e {
        DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("duration {s:?} needs a unit: ms, s, m, h or d (e.g. \"30s\")")
        }
        DurationError::UnknownUnit { unit, .. } => {
            format!("unknown duration unit {unit:?} in {s:?} (use ms, s, m, h or d)")
        }
        DurationError::NumberOverflow => format!("duration {s:?} is too large"),
        _ => format!(
            "invalid duration {s:?} (expected e.g. \"500ms\", \"30s\", \"1m30s\", \"2h\", \"7d\")"
        ),
    })?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "duration {s:?} is finer than a millisecond, the smallest step the agent uses"
        ));
    }
    if u64::try_from(d.as_millis()).is_err() {
        return Err(format!("duration {s:?} is too large"));
    }
    Ok(d)
}

/// Parses a byte size: a plain integer (bytes) or an integer with a unit.
/// `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024, `KB`/`MB`/`GB`/`TB` powers of
/// 1000, as their names say. Units are matched case-insensitively
/// (docs/configuration.md).
///
/// Hand-written rather than bytesize, whose parser would change what
/// existing configurations mean: it reads a lone `k`, `m`, `g`, `t` as
/// powers of 1000 where plantgate has always read them as powers of 1024
/// (`max_size = "512m"` would shrink by 4.6 %, `"1g"` by 7 %, without a
/// word), and it multiplies in `f64` and saturates, so `"99999999999TiB"`
/// would become 16 EiB instead of an error. A wrapper fixing both has to
/// split number and unit itself, which is most of this function; and
/// [`format_size`] must stay exact for `plantgate check`, where bytesize's
/// display rounds (`100000` is "97.7 KiB").
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
        // What humantime adds: fractions down to the millisecond, spelled
        // out units, weeks, a space before the unit, and a bare zero.
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5 minutes"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30sec"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("1 m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1000us"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    /// Every duration the configuration docs and examples write reads as
    /// it did before humantime (the hand-written parser's results).
    #[test]
    fn documented_durations_keep_their_values() {
        for (text, ms) in [
            ("500ms", 500),
            ("250ms", 250),
            ("1s", 1_000),
            ("30s", 30_000),
            ("60s", 60_000),
            ("65535s", 65_535_000),
            ("5m", 300_000),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("7d", 604_800_000),
            ("0s", 0),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_durations_name_the_text() {
        for bad in [
            "",
            "30",
            "abc",
            "-1s",
            "s",
            "10x",
            "1.5.5s",
            "99999999999999999999d",
            "500000000000000000000000s",
            // Upper case: `M` would be months in humantime.
            "5M",
            "30S",
            // Finer than a millisecond.
            "500us",
            "1.0005s",
            "10ns",
            // Fits humantime's u64 seconds, not the agent's u64 milliseconds.
            "18446744073709552s",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            if !bad.is_empty() {
                assert!(err.contains(bad.trim()), "{bad}: {err}");
            }
        }
        assert!(parse_duration("30").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("10x")
            .unwrap_err()
            .contains("unknown duration unit"));
        assert!(parse_duration("5M").unwrap_err().contains("lower case"));
        assert!(parse_duration("500us").unwrap_err().contains("millisecond"));
        assert!(parse_duration("18446744073709552s")
            .unwrap_err()
            .contains("too large"));
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
