//! Wall-clock time as Segment writes it: RFC 3339 in UTC with milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2015-02-23T22:28:55.111Z`.
///
/// Written digit by digit: it runs for every request and every upstream batch, where
/// `format!`'s machinery is a cost worth leaving out.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let Ok(year @ 0..=9999) = u32::try_from(year) else {
        return formatted(year, month, day, rem, since.subsec_millis());
    };
    let mut out = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month);
    put_digits(&mut out[8..10], day);
    put_digits(&mut out[11..13], (rem / 3600) as u32);
    put_digits(&mut out[14..16], (rem / 60 % 60) as u32);
    put_digits(&mut out[17..19], (rem % 60) as u32);
    put_digits(&mut out[20..23], since.subsec_millis());
    out.iter().map(|&b| char::from(b)).collect()
}

fn put_digits(out: &mut [u8], mut n: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

fn formatted(year: i64, month: u32, day: u32, rem: u64, millis: u32) -> String {
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        let at = |ms: u64| rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_424_730_535_111), "2015-02-23T22:28:55.111Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(at(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
    }

    proptest::proptest! {
        #[test]
        fn digit_by_digit_matches_format(ms in 0u64..253_402_300_800_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let secs = ms / 1000;
            let (year, month, day) = civil_from_days((secs / 86_400) as i64);
            let slow = formatted(year, month, day, secs % 86_400, (ms % 1000) as u32);
            proptest::prop_assert_eq!(rfc3339_millis(t), slow);
        }
    }
}
