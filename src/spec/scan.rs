//! The limits' scan: one pass over JSON bytes, no parsing, that finds nesting too deep and
//! numbers no 64-bit float can hold; and the two steps it shares with the split
//! (`split.rs`), a string's end and a number's.

/// What the limits refuse in a call's bytes, the first found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scan {
    Fine,
    /// Brackets outside strings nest deeper than the limit.
    TooDeep,
    /// A number no 64-bit float can hold (`1e400`): valid JSON, but upstream's parsers, and
    /// most others, refuse it, which would refuse the whole batch it travels in.
    NumberOutOfRange,
}

/// One pass over `bytes`, no parsing, so it is safe on any input: nesting depth and the
/// range of numbers, both outside strings. (A call's own values are judged by the split as
/// it reads them; this scans the batch objects merged into a call.)
pub(super) fn scan(bytes: &[u8], depth_limit: usize) -> Scan {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'"' => {
                match string_end(bytes, i) {
                    Some(end) => i = end,
                    // Unterminated: the parser's to report.
                    None => return Scan::Fine,
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > depth_limit {
                    return Scan::TooDeep;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let (end, out_of_range) = number_at(bytes, i);
                if out_of_range {
                    return Scan::NumberOutOfRange;
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Scan::Fine
}

/// One past the quote that ends the string whose opening quote is at `i`; `None` when it
/// does not end. Most of a call is strings, so this jumps from one quote or backslash to
/// the next.
pub(super) fn string_end(bytes: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        let n = memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
        if bytes[i + n] == b'\\' {
            i += n + 2;
        } else {
            return Some(i + n + 1);
        }
    }
}

/// Where the number starting at `i` ends, and whether no 64-bit float can hold it. A
/// malformed number is the parser's to report.
pub(super) fn number_at(bytes: &[u8], i: usize) -> (usize, bool) {
    let end = bytes[i..]
        .iter()
        .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .map_or(bytes.len(), |n| i + n);
    let out_of_range = std::str::from_utf8(&bytes[i..end])
        .ok()
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(|n| !n.is_finite());
    (end, out_of_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings_only() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(scan(deep(64).as_bytes(), 64), Scan::Fine);
        assert_eq!(scan(deep(65).as_bytes(), 64), Scan::TooDeep);
        // Brackets inside strings, escaped quotes included, do not count.
        let quoted = format!(r#"{{"a":"{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert_eq!(scan(quoted.as_bytes(), 64), Scan::Fine);
        // An escaped backslash ends its string's escape: the `[` after it counts.
        assert_eq!(scan(br#"{"a":"\\","b":[1]}"#, 1), Scan::TooDeep);
        assert_eq!(scan(br#"{"a":"\\","b":[1]}"#, 2), Scan::Fine);
    }

    /// `scan` with strings read a byte at a time: the plain reference the fast one must match.
    fn scan_bytewise(bytes: &[u8], depth_limit: usize) -> Scan {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if in_string {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > depth_limit {
                        return Scan::TooDeep;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b'-' | b'0'..=b'9' => {
                    let (end, out_of_range) = number_at(bytes, i);
                    if out_of_range {
                        return Scan::NumberOutOfRange;
                    }
                    i = end;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        Scan::Fine
    }

    proptest::proptest! {
        #[test]
        fn the_scan_agrees_with_a_byte_at_a_time(
            bytes in proptest::collection::vec(proptest::sample::select(
                b"{}[]\"\\ a1e9-.".to_vec()), 0..60),
            limit in 0usize..6,
        ) {
            proptest::prop_assert_eq!(scan(&bytes, limit), scan_bytewise(&bytes, limit));
        }
    }

    #[test]
    fn numbers_beyond_a_float_are_refused_outside_strings_only() {
        assert_eq!(scan(br#"{"a":1e400}"#, 64), Scan::NumberOutOfRange);
        assert_eq!(scan(br#"{"a":-222.2E22220}"#, 64), Scan::NumberOutOfRange);
        assert_eq!(scan(br#"{"a":"1e400"}"#, 64), Scan::Fine);
        assert_eq!(
            scan(br#"{"a":1e-400,"b":18446744073709551616,"c":-0.5}"#, 64),
            Scan::Fine
        );
    }
}
