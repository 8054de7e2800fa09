//! A raw JSON value as an object's pairs hold it: its kind, whether it is there, its text as a
//! string.

use std::borrow::Cow;

/// The JSON type of a raw value, read from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

pub(super) fn kind(raw: &str) -> Kind {
    match raw.as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'"') => Kind::String,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

/// A field that is present and not `null`.
pub(super) fn present(raw: Option<&str>) -> Option<&str> {
    raw.filter(|r| kind(r) != Kind::Null)
}

/// A raw JSON string's text: borrowed when it has no escapes to undo (every call's `type`
/// does), `None` when the value is not a string.
pub(super) fn string_value(text: &str) -> Option<Cow<'_, str>> {
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        _ => serde_json::from_str(text).ok(),
    }
}
