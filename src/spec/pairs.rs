//! Reading a JSON object as its ordered `(key, raw value)` pairs, borrowed from the source
//! text, through serde; a batch body read in one pass with its `batch` split into the calls'
//! raw values. (A call's own object, once serde has checked it, is split by `split.rs`.)

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::value::{kind, Kind};

/// A JSON object read as its ordered `(key, raw value)` pairs, borrowed from the source text.
pub(super) struct Entries<'a> {
    /// The object's own text.
    pub(super) source: &'a str,
    /// Each key, unescaped, with its value's JSON text as it came.
    pub(super) pairs: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> Entries<'a> {
    /// Reads `source` as one JSON object. A syntax error and a value that is not an object
    /// are told apart by the error's category.
    pub(super) fn parse(source: &'a str) -> Result<Entries<'a>, serde_json::Error> {
        let Pairs(pairs) = serde_json::from_str(source)?;
        Ok(Entries {
            source: source.trim_matches(|c: char| c.is_ascii_whitespace()),
            pairs,
        })
    }

    /// The last value under `key`, as JSON parsers that keep one value per key would see it.
    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Whether any of `keys` is among the object's keys.
    pub(super) fn has_any(&self, keys: &[&str]) -> bool {
        self.pairs.iter().any(|(k, _)| keys.contains(&k.as_ref()))
    }
}

/// A batch body read in one pass: its other top-level fields as [`Entries`], and the value
/// of its (last) `batch` key split into the calls' raw values.
pub(super) struct BatchTop<'a> {
    pub(super) entries: Entries<'a>,
    pub(super) batch: Option<BatchField<'a>>,
}

/// The value of a batch body's `batch` key: the calls' raw values, or word that it is not an
/// array.
pub(super) enum BatchField<'a> {
    Calls(Vec<&'a str>),
    NotArray,
}

impl<'a> BatchTop<'a> {
    /// One pass. Fails on more than bad JSON: a `batch` that is not an array fails here if
    /// it holds a number no float can hold (`1e400`) or a lone surrogate (`"\ud800"`), which
    /// serde reads only when it looks inside; [`Self::parse_in_two_steps`] tells these apart.
    pub(super) fn parse(source: &'a str) -> Result<BatchTop<'a>, serde_json::Error> {
        let BatchPairs { pairs, batch } = serde_json::from_str(source)?;
        Ok(BatchTop {
            entries: Entries {
                source: source.trim_matches(|c: char| c.is_ascii_whitespace()),
                pairs,
            },
            batch,
        })
    }

    /// The body as [`Entries`], then its `batch` split: slower, but every failure is the
    /// body's own (the JSON, or the calls' array).
    pub(super) fn parse_in_two_steps(source: &'a str) -> Result<BatchTop<'a>, serde_json::Error> {
        let mut entries = Entries::parse(source)?;
        let batch = match entries.get("batch") {
            None => None,
            Some(raw) if kind(raw) == Kind::Array => {
                let calls: Vec<&RawValue> = serde_json::from_str(raw)?;
                Some(BatchField::Calls(
                    calls.into_iter().map(RawValue::get).collect(),
                ))
            }
            Some(_) => Some(BatchField::NotArray),
        };
        entries.pairs.retain(|(key, _)| key != "batch");
        Ok(BatchTop { entries, batch })
    }
}

/// What serde reads for [`BatchTop::parse`]: the pairs other than `batch`, and `batch` split.
struct BatchPairs<'a> {
    pairs: Vec<(Cow<'a, str>, &'a str)>,
    batch: Option<BatchField<'a>>,
}

impl<'de> Deserialize<'de> for BatchPairs<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = BatchPairs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                let mut batch = None;
                while let Some(Key(key)) = map.next_key()? {
                    if key == "batch" {
                        // The last one counts, as for any other key.
                        batch = Some(map.next_value::<BatchField<'de>>()?);
                    } else {
                        pairs.push((key, map.next_value::<&'de RawValue>()?.get()));
                    }
                }
                Ok(BatchPairs { pairs, batch })
            }
        }
        deserializer.deserialize_map(TopVisitor)
    }
}

impl<'de> Deserialize<'de> for BatchField<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = BatchField<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut calls = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(call) = seq.next_element::<&'de RawValue>()? {
                    calls.push(call.get());
                }
                Ok(BatchField::Calls(calls))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(BatchField::NotArray)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BatchField::NotArray)
            }
        }
        deserializer.deserialize_any(FieldVisitor)
    }
}

/// What serde reads for [`Entries::parse`]: an object's pairs, in order.
struct Pairs<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de> Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Key(key)) = map.next_key()? {
                    pairs.push((key, map.next_value::<&'de RawValue>()?.get()));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

/// An object key, borrowed from the source unless it had escapes to undo.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_read_in_one_pass_reads_as_in_two() {
        let seen = |top: BatchTop<'_>| {
            let pairs: Vec<(String, String)> = top
                .entries
                .pairs
                .iter()
                .map(|(k, v)| (k.to_string(), (*v).to_owned()))
                .collect();
            let batch = top.batch.map(|b| match b {
                BatchField::Calls(calls) => calls.iter().map(|c| (*c).to_owned()).collect(),
                BatchField::NotArray => vec!["not an array".to_owned()],
            });
            (top.entries.source.to_owned(), pairs, batch)
        };
        for body in [
            r#"{"batch":[{"a":1}, 2 ,"x",[{}]],"context":{"b":[1]},"writeKey":"k"}"#,
            r#" {"sentAt":"t","batch":[]} "#,
            r#"{"batch":{"a":[1,2]},"x":null}"#,
            r#"{"batch":"[]"}"#,
            r#"{"batch":[1],"batch":false}"#,
            r#"{"batch":7,"batch":[{"c":"\u0041"}]}"#,
            r#"{"bat\u0063h":[{"d":1}],"e\"":2}"#,
            r#"{}"#,
        ] {
            let one = BatchTop::parse(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            let two = BatchTop::parse_in_two_steps(body).unwrap();
            assert_eq!(seen(one), seen(two), "{body}");
        }
    }
}
