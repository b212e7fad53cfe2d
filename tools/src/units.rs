//! Sizes on the command line (`64M`, `2G`, `4096`) and in human output.

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
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64M, 2G)"))?;
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
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A `--tcp-congestion` value: an algorithm's name, or `system` (None).
pub fn congestion(name: &str) -> Option<String> {
    (name != "system").then(|| name.to_string())
}

/// `1.50 GiB`, `64.0 MiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses a duration: seconds (`5`, `1.5`) or a number with a unit (`300ms`,
/// `2s`, `2m`); refuses negative, NaN, infinite and absurd values.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 5, 1.5s, 300ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!(
            "'{s}': a duration must be finite and at most a year"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").unwrap_err().contains("suffix"));
        assert_eq!(bytes(1536 << 20), "1.50 GiB");
    }
}
