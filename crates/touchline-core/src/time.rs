//! Event time: nanoseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// An instant as nanoseconds since 1970-01-01T00:00:00Z. `i64` covers 1677..2262, wider than any
/// touchpoint Touchline accepts (1970 up to a few minutes from now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnixNanos(pub i64);

const NANOS_PER_SECOND: i64 = 1_000_000_000;

impl UnixNanos {
    /// The current wall clock time.
    #[must_use]
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Builds an instant from protobuf-style seconds and nanos; `None` when out of range.
    #[must_use]
    pub fn from_parts(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..NANOS_PER_SECOND).contains(&i64::from(nanos)) {
            return None;
        }
        seconds
            .checked_mul(NANOS_PER_SECOND)
            .and_then(|total| total.checked_add(i64::from(nanos)))
            .map(Self)
    }

    /// Protobuf-style seconds and nanos taken as a bound of a range of event times: any valid
    /// protobuf `Timestamp` (years 1 to 9999), an instant outside what nanoseconds since 1970
    /// hold (1677 to 2262, beyond which no event can be) taken as the earliest or the latest
    /// one. `None` for nanos outside `0..1e9` or seconds outside protobuf's range.
    #[must_use]
    pub fn bound_from_parts(seconds: i64, nanos: i32) -> Option<Self> {
        const FIRST_SECOND: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
        const LAST_SECOND: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        if !(FIRST_SECOND..=LAST_SECOND).contains(&seconds)
            || !(0..NANOS_PER_SECOND).contains(&i64::from(nanos))
        {
            return None;
        }
        // Wide enough for any valid timestamp, then clamped: saturating the seconds before
        // adding the nanos moved an instant just inside 1677 by up to 145 ms.
        let nanoseconds = i128::from(seconds) * i128::from(NANOS_PER_SECOND) + i128::from(nanos);
        Some(Self(i64::try_from(nanoseconds).unwrap_or(
            if nanoseconds < 0 { i64::MIN } else { i64::MAX },
        )))
    }

    /// Splits into protobuf-style seconds and nanos (nanos always in `0..1e9`).
    #[must_use]
    pub fn to_parts(self) -> (i64, i32) {
        let seconds = self.0.div_euclid(NANOS_PER_SECOND);
        let nanos = i32::try_from(self.0.rem_euclid(NANOS_PER_SECOND)).unwrap_or_default();
        (seconds, nanos)
    }

    #[must_use]
    pub fn saturating_add_nanos(self, nanos: i64) -> Self {
        Self(self.0.saturating_add(nanos))
    }

    /// Formats as RFC 3339 UTC with millisecond precision, for people.
    #[must_use]
    pub fn to_rfc3339(self) -> String {
        let (seconds, nanos) = self.to_parts();
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            second_of_day / 3600,
            second_of_day % 3600 / 60,
            second_of_day % 60,
            nanos / 1_000_000
        )
    }

    /// Parses RFC 3339 (`2026-11-25T10:00:00Z`, `2026-11-25T10:00:00.250+01:00`).
    #[must_use]
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() < 20
            || bytes[4] != b'-'
            || bytes[7] != b'-'
            || !matches!(bytes[10], b'T' | b't' | b' ')
        {
            return None;
        }
        let number = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = text.get(range)?;
            if !part.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
        let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
        // A date the calendar has (not February 30th, which the arithmetic below would move to
        // March), and a leap second only as the last second of a minute's hour (23:59:60, or
        // its local equivalent: any hour, minute 59).
        if bytes[13] != b':'
            || bytes[16] != b':'
            || !(1..=12).contains(&month)
            || !(1..=days_in_month(year, month)).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
            || (second == 60 && minute != 59)
        {
            return None;
        }
        let mut rest = text.get(19..)?;
        let mut nanos = 0_i64;
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            nanos = fraction[..digits].parse::<i64>().ok()?
                * 10_i64.pow(9 - u32::try_from(digits).ok()?);
            rest = &fraction[digits..];
        }
        let offset_seconds = match rest.as_bytes() {
            b"Z" | b"z" => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let digit = |byte: &u8| byte.is_ascii_digit().then(|| i64::from(byte - b'0'));
                let hours = digit(h1)? * 10 + digit(h2)?;
                let minutes = digit(m1)? * 10 + digit(m2)?;
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let magnitude = hours * 3600 + minutes * 60;
                if *sign == b'-' { -magnitude } else { magnitude }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month, day);
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
        Self::from_parts(seconds, i32::try_from(nanos).ok()?)
    }
}

/// Days in `month` (1-12) of `year` (Gregorian).
fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_exact_up_to_the_ends_of_what_nanoseconds_hold_and_saturate_past_them() {
        // The earliest second that holds instants nanoseconds since 1970 can: exact, nanos too.
        assert_eq!(
            UnixNanos::bound_from_parts(-9_223_372_037, 999_999_999),
            Some(UnixNanos(-9_223_372_036_000_000_001))
        );
        assert_eq!(
            UnixNanos::bound_from_parts(-9_223_372_037, 0),
            Some(UnixNanos(i64::MIN)),
            "before 1677: the earliest instant"
        );
        assert_eq!(
            UnixNanos::bound_from_parts(9_223_372_036, 854_775_807),
            Some(UnixNanos(i64::MAX))
        );
        assert_eq!(
            UnixNanos::bound_from_parts(253_402_300_799, 999_999_999),
            Some(UnixNanos(i64::MAX)),
            "after 2262: the latest instant"
        );
        assert_eq!(
            UnixNanos::bound_from_parts(1, 5),
            Some(UnixNanos(1_000_000_005))
        );
        assert_eq!(UnixNanos::bound_from_parts(1, -1), None);
        assert_eq!(UnixNanos::bound_from_parts(1, 1_000_000_000), None);
        assert_eq!(UnixNanos::bound_from_parts(-62_135_596_801, 0), None);
    }

    #[test]
    fn parts_round_trip() {
        let instant = UnixNanos::from_parts(1_700_000_000, 123_456_789);
        assert_eq!(instant, Some(UnixNanos(1_700_000_000_123_456_789)));
        assert_eq!(
            instant.map(UnixNanos::to_parts),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(UnixNanos::from_parts(1, 1_000_000_000), None);
        assert_eq!(UnixNanos::from_parts(1, -1), None);
        assert_eq!(UnixNanos::from_parts(i64::MAX, 0), None);
    }

    #[test]
    fn rfc3339_round_trips() {
        let instant = UnixNanos::parse_rfc3339("2026-11-25T10:09:31.250Z");
        assert_eq!(
            instant.map(UnixNanos::to_rfc3339).as_deref(),
            Some("2026-11-25T10:09:31.250Z")
        );
        assert_eq!(
            UnixNanos::parse_rfc3339("2026-11-25T11:09:31+01:00"),
            UnixNanos::parse_rfc3339("2026-11-25T10:09:31Z")
        );
        assert_eq!(
            UnixNanos::parse_rfc3339("1970-01-01T00:00:00Z"),
            Some(UnixNanos(0))
        );
        assert_eq!(UnixNanos::parse_rfc3339("yesterday"), None);
        assert_eq!(UnixNanos::parse_rfc3339("2026-13-01T00:00:00Z"), None);
        // Dates the calendar does not have are refused, not moved to the next month.
        for missing in [
            "2026-02-29T10:00:00Z",
            "2026-02-31T10:00:00Z",
            "2026-04-31T10:00:00Z",
            "1900-02-29T10:00:00Z",
            "2026-11-25T10:30:60Z",
        ] {
            assert_eq!(UnixNanos::parse_rfc3339(missing), None, "{missing}");
        }
        for present in [
            "2024-02-29T10:00:00Z",
            "2000-02-29T10:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-04-30T10:00:00Z",
        ] {
            assert!(UnixNanos::parse_rfc3339(present).is_some(), "{present}");
        }
        assert_eq!(
            UnixNanos::parse_rfc3339("2024-02-29T00:00:00Z"),
            UnixNanos::from_parts(1_709_164_800, 0)
        );
        assert_eq!(
            UnixNanos::parse_rfc3339("2026-01-01T00:00:00\u{e9}1234"),
            None
        );
        assert_eq!(UnixNanos::parse_rfc3339("2026-01-01T00:00:00.\u{e9}"), None);
        assert_eq!(UnixNanos::parse_rfc3339("2026-01-01T00:00:00+99:00"), None);
        assert_eq!(
            UnixNanos::parse_rfc3339(
                "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}"
            ),
            None
        );
    }
}
