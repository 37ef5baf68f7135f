//! Time bounds on the command line: an RFC 3339 time (`2026-12-04T10:00:00Z`), a UTC date
//! (`2026-12-04`, meaning its midnight), or a duration before now (`90s`, `30m`, `24h`,
//! `7d`).

use hookflow_schemas::Millis;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{ReplayError, Result};

/// Resolves `text` to milliseconds since the Unix epoch, relative forms counting back from
/// `now_ms`.
///
/// # Errors
///
/// Fails, naming the value and the accepted forms, if `text` is none of them.
pub fn parse_time(text: &str, now_ms: Millis) -> Result<Millis> {
    let text = text.trim();
    let invalid = || {
        ReplayError::Invalid(format!(
            "invalid time `{text}`: expected RFC 3339 (2026-12-04T10:00:00Z), a UTC date \
             (2026-12-04) or a duration before now (90s, 30m, 24h, 7d)"
        ))
    };

    if let Some(ago_ms) = parse_duration_ms(text) {
        return Ok(now_ms.saturating_sub(ago_ms));
    }
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(&format!("{text}T00:00:00Z"), &Rfc3339))
        .map_err(|_| invalid())?;
    let ms = parsed.unix_timestamp_nanos() / 1_000_000;
    Millis::try_from(ms).map_err(|_| invalid())
}

/// Parses `<digits><unit>` with unit `s`, `m`, `h` or `d` into milliseconds.
fn parse_duration_ms(text: &str) -> Option<u64> {
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(unit_at);
    let count: u64 = digits.parse().ok()?;
    let unit_ms: u64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    count.checked_mul(unit_ms)
}

/// Returns the `YYYY-MM-DD` UTC date of `ms`, as the archive's `date=` directories name it.
pub fn utc_date(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map(|t| {
            let date = t.date();
            format!(
                "{:04}-{:02}-{:02}",
                date.year(),
                u8::from(date.month()),
                date.day()
            )
        })
        .unwrap_or_else(|_| "9999-12-31".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    #[test]
    fn parse_time_forms() {
        let cases = [
            ("2023-11-14T22:13:20Z", NOW),
            ("2023-11-14T23:13:20+01:00", NOW),
            ("2023-11-14", 1_699_920_000_000),
            ("90s", NOW - 90_000),
            ("30m", NOW - 1_800_000),
            ("24h", NOW - 86_400_000),
            ("7d", NOW - 7 * 86_400_000),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_time(text, NOW).expect(text), expected, "{text}");
        }
    }

    #[test]
    fn parse_time_rejects_junk() {
        for text in ["yesterday", "24", "5w", "", "2023-13-01"] {
            let error = parse_time(text, NOW).expect_err(text);
            assert!(error.to_string().contains("RFC 3339"), "{error}");
        }
    }

    #[test]
    fn utc_date_matches_partition_names() {
        assert_eq!(utc_date(NOW), "2023-11-14");
        assert_eq!(utc_date(0), "1970-01-01");
    }
}
