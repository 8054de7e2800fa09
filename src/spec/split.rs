//! A call's object, already known to be valid JSON, split in one pass into its `(key, raw
//! value)` pairs, with each value's first breach of the depth and number limits noted on the
//! way.
//!
//! serde has checked the whole body once (a batch's calls are read as raw values, a single
//! call as ignored data), so this pass trusts the syntax and only finds where each key and
//! value begins and ends: it jumps between quotes and brackets with `memchr` instead of
//! reading every value again through serde. The limits' scan rides along, so the call as it
//! will be sent is checked from its parts ([`super::normalise`]) rather than by another pass
//! over its bytes.

use std::borrow::Cow;

use super::pairs::Entries;
use super::scan::{number_at, string_end, Scan};

/// Why an object could not be split.
#[derive(Debug)]
pub(super) enum SplitError {
    /// The value is not a JSON object.
    NotObject,
    /// A key's escapes do not make a string (a lone surrogate, `"\ud800"`).
    Key,
    /// Not valid JSON after all: only if the text was not checked first, which is a bug.
    Malformed,
}

/// An object split into its pairs, each with its value's first breach of the limits.
pub(super) struct Split<'a> {
    pub(super) entries: Entries<'a>,
    /// One per pair, in order: what [`super::scan::scan`] would report first inside that
    /// value, the value sitting in an object at depth 1 (`Scan::Fine` for most).
    pub(super) flaws: Vec<Scan>,
}

/// Splits `source`, a valid JSON value, into its pairs if it is an object. `depth_limit`
/// counts the object's own braces as one level, as [`super::scan::scan`] does.
pub(super) fn split_object(source: &str, depth_limit: usize) -> Result<Split<'_>, SplitError> {
    let trimmed = source.trim_matches(|c: char| c.is_ascii_whitespace());
    let bytes = trimmed.as_bytes();
    if bytes.first() != Some(&b'{') {
        return Err(SplitError::NotObject);
    }
    let mut pairs = Vec::with_capacity(16);
    let mut flaws = Vec::with_capacity(16);
    let mut i = skip_space(bytes, 1);
    if bytes.get(i) == Some(&b'}') && i + 1 == bytes.len() {
        return Ok(Split {
            entries: Entries {
                source: trimmed,
                pairs,
            },
            flaws,
        });
    }
    loop {
        if bytes.get(i) != Some(&b'"') {
            return Err(SplitError::Malformed);
        }
        let key_end = string_end(bytes, i).ok_or(SplitError::Malformed)?;
        let quoted_key = &trimmed[i..key_end];
        let plain = &quoted_key[1..quoted_key.len() - 1];
        let key = if plain.contains('\\') {
            Cow::Owned(serde_json::from_str::<String>(quoted_key).map_err(|_| SplitError::Key)?)
        } else {
            Cow::Borrowed(plain)
        };
        i = skip_space(bytes, key_end);
        if bytes.get(i) != Some(&b':') {
            return Err(SplitError::Malformed);
        }
        let start = skip_space(bytes, i + 1);
        let (end, flaw) = value_end(bytes, start, depth_limit).ok_or(SplitError::Malformed)?;
        pairs.push((key, &trimmed[start..end]));
        flaws.push(flaw);
        i = skip_space(bytes, end);
        match bytes.get(i) {
            Some(b',') => i = skip_space(bytes, i + 1),
            Some(b'}') if i + 1 == bytes.len() => break,
            _ => return Err(SplitError::Malformed),
        }
    }
    Ok(Split {
        entries: Entries {
            source: trimmed,
            pairs,
        },
        flaws,
    })
}

/// Where the value starting at `start` ends, and its first breach of the limits: nesting
/// past `depth_limit` (the enclosing object at depth 1), or a number no 64-bit float holds.
fn value_end(bytes: &[u8], start: usize, depth_limit: usize) -> Option<(usize, Scan)> {
    match *bytes.get(start)? {
        b'"' => Some((string_end(bytes, start)?, Scan::Fine)),
        b'{' | b'[' => {
            let mut flaw = Scan::Fine;
            let mut depth = 1usize;
            let mut i = start;
            loop {
                match *bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > depth_limit && flaw == Scan::Fine {
                            flaw = Scan::TooDeep;
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 1 {
                            return Some((i + 1, flaw));
                        }
                    }
                    b'-' | b'0'..=b'9' => {
                        let (end, out_of_range) = number_at(bytes, i);
                        if out_of_range && flaw == Scan::Fine {
                            flaw = Scan::NumberOutOfRange;
                        }
                        i = end;
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        b'-' | b'0'..=b'9' => {
            let (end, out_of_range) = number_at(bytes, start);
            let flaw = if out_of_range {
                Scan::NumberOutOfRange
            } else {
                Scan::Fine
            };
            Some((end, flaw))
        }
        // `true`, `false`, `null`.
        _ => {
            let len = bytes[start..]
                .iter()
                .position(|b| !b.is_ascii_alphabetic())
                .unwrap_or(bytes.len() - start);
            (len > 0).then_some((start + len, Scan::Fine))
        }
    }
}

/// The first byte at or after `i` that is not JSON whitespace.
fn skip_space(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::scan::scan;

    /// An object as the tests compare it: its pairs as text, and each value's flaw.
    type Seen = Option<(Vec<(String, String)>, Vec<Scan>)>;

    /// What the split must agree with: serde's pairs, and the limits' scan of each value
    /// placed alone in an object (`{"k":value}` puts it at depth 1, as in the call).
    fn reference(source: &str, limit: usize) -> Seen {
        let entries = Entries::parse(source).ok()?;
        let pairs = entries
            .pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flaws = entries
            .pairs
            .iter()
            .map(|(_, v)| scan(format!("{{\"k\":{v}}}").as_bytes(), limit))
            .collect();
        Some((pairs, flaws))
    }

    fn split(source: &str, limit: usize) -> Seen {
        let split = split_object(source, limit).ok()?;
        let pairs = split
            .entries
            .pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some((pairs, split.flaws))
    }

    #[test]
    fn splits_as_serde_reads_and_scans_as_the_scan_does() {
        for source in [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1,"b":"x\"y","c":[1,{"d":null}],"e":true,"f":false,"g":-0.5e3}"#,
            "{ \"a\" :\n[ ] ,\t\"b\" : { \"c\" : \"}\" } }\n",
            r#"{"a\"b":1,"\u0041":2,"a":3,"a":4}"#,
            r#"{"n":1e400,"m":[[[1]]],"s":"1e400"}"#,
            r#"{"deep":[[[[[1e400]]]]],"later":[[[[[[[[2]]]]]]]]}"#,
            r#"{"x":"\\","y":[1]}"#,
        ] {
            for limit in [1, 2, 3, 4, 64] {
                assert_eq!(
                    split(source, limit),
                    reference(source, limit),
                    "{source} at {limit}"
                );
            }
        }
    }

    #[test]
    fn a_value_that_is_not_an_object_and_a_bad_key_are_told() {
        for source in ["[]", "1", "\"{}\"", "null", " [{}]"] {
            assert!(matches!(
                split_object(source, 64),
                Err(SplitError::NotObject)
            ));
        }
        assert!(matches!(
            split_object(r#"{"\ud800":1}"#, 64),
            Err(SplitError::Key)
        ));
        // A value with a lone surrogate is kept as it came, as serde's raw values keep it.
        let split = split_object(r#"{"a":"\ud800"}"#, 64).unwrap();
        assert_eq!(split.entries.pairs[0].1, r#""\ud800""#);
    }

    /// Valid JSON objects, keys and values of every kind, nested, with odd spacing.
    fn json_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let space = prop::sample::select(vec!["", " ", "\n\t", "  "]);
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("1e400".to_owned()),
            Just("-2.5E-3".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            "(?s).{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just(r#""\"\\}]""#.to_owned()),
        ];
        let value = leaf.prop_recursive(6, 48, 4, move |inner| {
            let space = space.clone();
            prop_oneof![
                prop::collection::vec((inner.clone(), space.clone()), 0..4).prop_map(|items| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(v, s)| format!("{s}{v}{s}"))
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                prop::collection::vec(("[a-c\\\\\"]{0,3}", inner, space), 0..4).prop_map(|pairs| {
                    let pairs: Vec<String> = pairs
                        .into_iter()
                        .map(|(k, v, s)| {
                            format!("{s}{}{s}:{s}{v}", serde_json::to_string(&k).unwrap())
                        })
                        .collect();
                    format!("{{{}}}", pairs.join(","))
                }),
            ]
        });
        proptest::collection::vec(("[a-c\\\\\"]{0,3}", value), 0..6).prop_map(|pairs| {
            let pairs: Vec<String> = pairs
                .into_iter()
                .map(|(k, v)| format!("{}: {v}", serde_json::to_string(&k).unwrap()))
                .collect();
            format!(" {{{}}} ", pairs.join(" ,"))
        })
    }

    proptest::proptest! {
        #[test]
        fn any_object_splits_as_serde_reads_it(source in json_object(), limit in 1usize..6) {
            proptest::prop_assert_eq!(split(&source, limit), reference(&source, limit));
        }
    }
}
