//! Sizes (`64M`, `2G`, `4096`) and durations (`300ms`, `2s`, `1.5m`) on the
//! command line, and sizes in human output.

use std::time::Duration;

/// Parses `--compress`: `none`, `zstd` (level 1) or `zstd:LEVEL` (negative
/// levels are zstd's fast modes).
pub fn parse_compress(s: &str) -> Result<Compress, String> {
    parse_level(s).map(Compress)
}

/// A `--compress` value: the zstd level, `None` for no compression.
#[derive(Clone, Copy, Debug)]
pub struct Compress(pub Option<i32>);

fn parse_level(s: &str) -> Result<Option<i32>, String> {
    match s {
        "none" | "off" => Ok(None),
        "zstd" => Ok(Some(1)),
        _ => {
            let level = s
                .strip_prefix("zstd:")
                .ok_or_else(|| format!("'{s}': expected none, zstd or zstd:LEVEL"))?;
            let l: i32 = level
                .parse()
                .map_err(|_| format!("'{s}': the zstd level must be a number"))?;
            let range = zstd::compression_level_range();
            if !range.contains(&l) {
                return Err(format!(
                    "'{s}': zstd levels go from {} to {}",
                    range.start(),
                    range.end()
                ));
            }
            Ok(Some(l))
        }
    }
}

/// Parses a byte size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a whole number of bytes with an optional \
             K, M, G or T suffix (examples: 4096, 64M, 2G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large (at most 16 EiB - 1)"))?;
    let shift = match suffix
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{s}': unknown size suffix '{suffix}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large (at most 16 EiB - 1)"))
}

/// The longest duration any option takes: longer values are typing
/// mistakes (a unit forgotten or doubled), not plans.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a number without a unit means for a duration option: seconds for
/// most, milliseconds where the option always took milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareUnit {
    Seconds,
    Millis,
}

/// Parses a duration: a number with a unit (`300ms`, `2s`, `1.5s`, `2m`,
/// `1h`) or a bare number in `bare` units. Refuses negative, NaN, infinite
/// and absurdly long (over [`MAX_DURATION`]) values with a message.
pub fn parse_duration(s: &str, bare: BareUnit) -> Result<Duration, String> {
    let t = s.trim();
    let bare_name = match bare {
        BareUnit::Seconds => "seconds",
        BareUnit::Millis => "milliseconds",
    };
    let examples = format!("examples: 300ms, 2s, 1.5s, 2m; a bare number is {bare_name}");
    // A bare number (this also catches nan, inf and exponents like 1e30).
    let (n, unit_secs) = if let Ok(n) = t.parse::<f64>() {
        let unit = match bare {
            BareUnit::Seconds => 1.0,
            BareUnit::Millis => 1e-3,
        };
        (n, unit)
    } else {
        let num = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &t[num.len()..];
        if num.trim().is_empty() {
            return Err(format!("'{s}' is not a duration ({examples})"));
        }
        let unit_secs = match unit {
            "ms" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("'{s}' is not a duration ({examples})")),
            other => {
                return Err(format!(
                    "'{s}': unknown unit '{other}' (use ms, s, m or h; {examples})"
                ))
            }
        };
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a duration ({examples})"))?;
        (n, unit_secs)
    };
    if n.is_nan() {
        return Err(format!("'{s}' is not a number ({examples})"));
    }
    if n < 0.0 {
        return Err(format!("'{s}': a duration cannot be negative"));
    }
    let secs = n * unit_secs;
    if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("'{s}' is too long (at most a year)"));
    }
    // Whole nanoseconds, rounded: 0.3 s is 300 ms exactly, not 299.999...
    Ok(Duration::from_nanos((secs * 1e9).round() as u64))
}

/// A duration option whose bare numbers are seconds.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Seconds)
}

/// A duration option whose bare numbers are milliseconds.
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse_duration(s, BareUnit::Millis)
}

/// A duration option in seconds that must be more than zero (a timeout:
/// zero would give up before anything could happen).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err(format!(
            "'{s}': a timeout must be more than 0; omit the option to wait for ever"
        ));
    }
    Ok(d)
}

/// `2s`, `300ms`, `1.5s`: a duration as the options take it.
pub fn duration(d: Duration) -> String {
    format!("{d:?}")
}

/// A `--tcp-congestion` value: an algorithm's name, or `system` (None).
pub fn congestion(name: &str) -> Option<String> {
    (name != "system").then(|| name.to_string())
}

/// `1.50 GiB`, `64.00 MiB`, `512 B`: the controller's one size format.
pub fn bytes(n: u64) -> String {
    ferry::summary::iec(n)
}

/// A rate in SI units, as every output of ferry prints rates: `850 MB/s`,
/// `1.23 GB/s` (10^6 and 10^9 bytes per second), `512 kB/s`.
pub fn rate(bytes_per_second: f64) -> String {
    let r = bytes_per_second.max(0.0);
    if r >= 1e9 {
        format!("{:.2} GB/s", r / 1e9)
    } else if r >= 1e6 {
        format!("{:.0} MB/s", r / 1e6)
    } else {
        format!("{:.0} kB/s", r / 1e3)
    }
}

/// `1:05` or `0:07`: minutes and seconds, for the bar's ETA.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_si_and_sizes_iec() {
        assert_eq!(rate(1.234e9), "1.23 GB/s");
        assert_eq!(rate(104_857_600.0), "105 MB/s");
        assert_eq!(rate(2048.0), "2 kB/s");
        assert_eq!(bytes(100 << 20), "100.00 MiB");
        assert_eq!(clock(65_400), "1:05");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").unwrap_err().contains("suffix"));
        assert_eq!(bytes(1536 << 20), "1.50 GiB");
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("").unwrap_err().contains("not a size"));
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_secs("300ms").unwrap(), ms(300));
        assert_eq!(parse_secs("2s").unwrap(), ms(2000));
        assert_eq!(parse_secs("1.5s").unwrap(), ms(1500));
        assert_eq!(parse_secs("2m").unwrap(), ms(120_000));
        assert_eq!(parse_secs("1h").unwrap(), ms(3_600_000));
        assert_eq!(parse_secs("0.3").unwrap(), ms(300));
        assert_eq!(parse_secs("5").unwrap(), ms(5000));
        assert_eq!(parse_secs("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_millis("300").unwrap(), ms(300));
        assert_eq!(parse_millis("300ms").unwrap(), ms(300));
        assert_eq!(parse_millis("2s").unwrap(), ms(2000));
        assert_eq!(parse_millis(" 2 s ").unwrap(), ms(2000));
        for bad in ["-1", "-1s", "-0.5ms"] {
            assert!(parse_secs(bad).unwrap_err().contains("negative"), "{bad}");
        }
        for bad in ["nan", "NaN", "nans"] {
            let e = parse_secs(bad).unwrap_err();
            assert!(e.contains("not a"), "{bad}: {e}");
        }
        for bad in ["inf", "-inf", "infinity", "1e30", "9999999h", "1e30ms"] {
            let e = parse_secs(bad).unwrap_err();
            assert!(
                e.contains("too long") || e.contains("negative"),
                "{bad}: {e}"
            );
        }
        assert!(parse_secs("1e30").unwrap_err().contains("too long"));
        assert!(parse_secs("inf").unwrap_err().contains("too long"));
        assert!(parse_secs("2x").unwrap_err().contains("unknown unit 'x'"));
        assert!(parse_secs("").unwrap_err().contains("not a duration"));
        assert!(parse_secs("s").unwrap_err().contains("not a duration"));
        assert!(parse_timeout("0").unwrap_err().contains("more than 0"));
        assert!(parse_timeout("0ms").unwrap_err().contains("more than 0"));
        assert_eq!(parse_timeout("2").unwrap(), ms(2000));
        assert!(parse_secs("400d").unwrap_err().contains("unknown unit 'd'"));
        assert_eq!(duration(ms(2000)), "2s");
        assert_eq!(duration(ms(300)), "300ms");
    }
}
