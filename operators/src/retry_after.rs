//! Parsing of the `Retry-After` response header (RFC 9110, section 10.2.3).
//!
//! The header is either delay-seconds (`Retry-After: 120`) or an HTTP-date
//! (`Retry-After: Tue, 14 Nov 2023 22:13:30 GMT`). [`parse_retry_after`] turns either form into
//! the absolute time until which the endpoint requests a pause, and [`clamp_retry_after`]
//! bounds that time. A value that is not valid parses to `None`, never to "no wait", so that a
//! malformed header makes the caller fall back to its own backoff instead of retrying at once.
//!
//! Both functions are pure: the caller passes "now".

use std::time::UNIX_EPOCH;

use hookflow_schemas::Millis;

/// The maximum wait a `Retry-After` value may request and still count as valid: 365 days, in
/// ms.
///
/// A longer wait is far more likely a mistake than a plan, such as a Unix timestamp sent as
/// delay-seconds (`Retry-After: 1700000400` requests 53 years), so it parses to `None` and the
/// caller's own backoff applies. Shorter waits that are still too long are the caller's to cap
/// with [`clamp_retry_after`].
pub const MAX_VALID_DELAY_MS: u64 = 365 * 24 * 3_600_000;

/// Parses a `Retry-After` header value received at `now_ms` and returns the time until which
/// it requests a pause, in ms since the Unix epoch.
///
/// Accepted forms, after leading and trailing spaces and tabs are removed:
///
/// * delay-seconds: one or more ASCII digits, counted from `now_ms` (`"3"` returns
///   `now_ms + 3000`);
/// * an HTTP-date in the preferred IMF-fixdate form (`Tue, 14 Nov 2023 22:13:30 GMT`) or one
///   of the obsolete forms RFC 9110 still requires recipients to accept: RFC 850
///   (`Tuesday, 14-Nov-23 22:13:30 GMT`) and asctime (`Tue Nov 14 22:13:30 2023`). The
///   weekday must match the date, and an RFC 850 two-digit year is read as 2000 to 2069 or
///   1970 to 1999, as the `httpdate` crate reads it. A date in the past returns that past
///   time, and [`clamp_retry_after`] raises it to the caller's floor.
///
/// Returns `None`, meaning "no valid `Retry-After`", for:
///
/// * an empty value, a sign or a fraction (`-5`, `+3`, `1.5`);
/// * units or other text (`3s`, `abc`), a list (`3, 5`) or control characters;
/// * a number whose milliseconds overflow 64 bits, or an impossible date;
/// * a wait of more than [`MAX_VALID_DELAY_MS`].
///
/// Never panics.
pub fn parse_retry_after(value: &str, now_ms: Millis) -> Option<Millis> {
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() || value.bytes().any(|byte| byte.is_ascii_control()) {
        return None;
    }

    let until_ms = if value.bytes().all(|byte| byte.is_ascii_digit()) {
        // Parsing fails only when the number does not fit in 64 bits.
        let seconds: u64 = value.parse().ok()?;
        now_ms.checked_add(seconds.checked_mul(1000)?)?
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        let since_epoch = date.duration_since(UNIX_EPOCH).ok()?;
        Millis::try_from(since_epoch.as_millis()).ok()?
    };

    if until_ms.saturating_sub(now_ms) > MAX_VALID_DELAY_MS {
        return None;
    }
    Some(until_ms)
}

/// Bounds the time `until_ms` that a `Retry-After` requested to the range from
/// `now_ms + min_ms` to `now_ms + max_ms`, and returns the bounded time.
///
/// `min_ms` is the floor that keeps a `Retry-After: 0` or a past date from causing a retry
/// storm, and `max_ms` the cap that keeps one header from pausing an endpoint for too long.
/// When `min_ms` exceeds `max_ms`, the floor wins. A caller counts a capped value by
/// comparing the result with `until_ms`: it is smaller exactly when the cap applied.
pub fn clamp_retry_after(until_ms: Millis, now_ms: Millis, min_ms: u64, max_ms: u64) -> Millis {
    let earliest = now_ms.saturating_add(min_ms);
    let latest = now_ms.saturating_add(max_ms.max(min_ms));
    until_ms.clamp(earliest, latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14T22:13:20Z in ms.
    const T0_MS: Millis = 1_700_000_000_000;

    #[test]
    fn parse_delay_seconds_table() {
        let cases: &[(&str, Option<Millis>)] = &[
            ("0", Some(T0_MS)),
            ("3", Some(T0_MS + 3_000)),
            ("003", Some(T0_MS + 3_000)),
            (" 3", Some(T0_MS + 3_000)),
            ("3\t ", Some(T0_MS + 3_000)),
            ("555", Some(T0_MS + 555_000)),
            ("86400", Some(T0_MS + 86_400_000)),
            ("31536000", Some(T0_MS + MAX_VALID_DELAY_MS)),
            ("31536001", None),
            ("1700000400", None),
            ("18446744073709551", None),
            ("18446744073709551615", None),
            ("18446744073709551616", None),
            ("99999999999999999999999999999999", None),
            ("", None),
            ("   ", None),
            ("abc", None),
            ("-5", None),
            ("+3", None),
            ("1.5", None),
            ("1e3", None),
            ("0x10", None),
            ("3s", None),
            ("3 s", None),
            ("3, 5", None),
            ("3\n", None),
            ("3\r\n5", None),
            ("\u{0663}", None),
            ("\u{ff13}", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, T0_MS), *expected, "{value:?}");
        }
    }

    #[test]
    fn parse_http_date_table() {
        let cases: &[(&str, Option<Millis>)] = &[
            ("Tue, 14 Nov 2023 22:13:30 GMT", Some(T0_MS + 10_000)),
            ("  Tue, 14 Nov 2023 22:13:30 GMT ", Some(T0_MS + 10_000)),
            ("Tuesday, 14-Nov-23 22:13:30 GMT", Some(T0_MS + 10_000)),
            ("Tue Nov 14 22:13:30 2023", Some(T0_MS + 10_000)),
            ("Tue, 14 Nov 2023 22:13:20 GMT", Some(T0_MS)),
            ("Tue, 14 Nov 2023 22:13:10 GMT", Some(T0_MS - 10_000)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(784_111_777_000)),
            ("Thu, 14 Nov 2024 22:13:20 GMT", None),
            ("Fri, 31 Dec 9999 23:59:59 GMT", None),
            ("Mon, 14 Nov 2023 22:13:30 GMT", None),
            ("Tue, 14 Nov 2023 22:13:30 UTC", None),
            ("Tue, 14 Nov 2023 22:13:30 gmt", None),
            ("tue, 14 Nov 2023 22:13:30 GMT", None),
            ("Tue, 14 Nov 2023 22:13:60 GMT", None),
            ("Tue, 14 Nov 2023 24:00:00 GMT", None),
            ("Thu, 31 Feb 2023 22:13:30 GMT", None),
            ("Tue, 14 Nov 2023 22:13:30 +0000", None),
            ("Tue, 14 Nov 2023 22:13:30", None),
            ("2023-11-14T22:13:30Z", None),
            (
                "Tue, 14 Nov 2023 22:13:30 GMT, Tue, 14 Nov 2023 22:13:40 GMT",
                None,
            ),
            ("Thu, 01 Jan 1970 00:00:00 GMT", Some(0)),
            ("Wed, 31 Dec 1969 23:59:59 GMT", None),
            ("Tue, 14 Nov 2023 22:13:30 GMT\u{e9}", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, T0_MS), *expected, "{value:?}");
        }
    }

    #[test]
    fn parse_survives_any_now() {
        for now_ms in [0, 1, T0_MS, Millis::MAX - 1_000, Millis::MAX] {
            for value in ["0", "1", "555", "18446744073709551615", "abc", ""] {
                if let Some(until_ms) = parse_retry_after(value, now_ms) {
                    assert!(until_ms >= now_ms, "{value:?} at {now_ms}: {until_ms}");
                }
            }
        }
        assert_eq!(parse_retry_after("1", Millis::MAX), None, "overflows");
        assert_eq!(parse_retry_after("0", Millis::MAX), Some(Millis::MAX));
    }

    #[test]
    fn clamp_table() {
        const MIN_MS: u64 = 1_000;
        const MAX_MS: u64 = 300_000;
        let cases: &[(Millis, Millis)] = &[
            (T0_MS + 3_000, T0_MS + 3_000),
            (T0_MS + 555_000, T0_MS + MAX_MS),
            (T0_MS + MAX_MS, T0_MS + MAX_MS),
            (T0_MS + MAX_MS + 1, T0_MS + MAX_MS),
            (T0_MS + MIN_MS, T0_MS + MIN_MS),
            (T0_MS, T0_MS + MIN_MS),
            (T0_MS - 10_000, T0_MS + MIN_MS),
            (0, T0_MS + MIN_MS),
            (Millis::MAX, T0_MS + MAX_MS),
        ];
        for (until_ms, expected) in cases {
            assert_eq!(
                clamp_retry_after(*until_ms, T0_MS, MIN_MS, MAX_MS),
                *expected,
                "until {until_ms}"
            );
        }
    }

    #[test]
    fn clamp_floor_wins_over_cap() {
        assert_eq!(clamp_retry_after(T0_MS, T0_MS, 5_000, 1_000), T0_MS + 5_000);
        assert_eq!(
            clamp_retry_after(T0_MS + 60_000, T0_MS, 5_000, 1_000),
            T0_MS + 5_000
        );
    }

    #[test]
    fn clamp_saturates_near_max_time() {
        let now_ms = Millis::MAX - 10;
        assert_eq!(
            clamp_retry_after(Millis::MAX, now_ms, 1_000, 300_000),
            Millis::MAX
        );
        assert_eq!(clamp_retry_after(0, now_ms, 1_000, 300_000), Millis::MAX);
    }
}
