//! Writing a JSON object from keys and already-serialized values, byte for byte as given.

/// Writes a JSON object from keys and already-serialized values.
pub(super) struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, first: true }
    }

    /// Adds `key`, escaped as JSON needs, and `raw_value` exactly as given.
    pub(super) fn field(&mut self, key: &str, raw_value: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        // Keys almost never need escaping, so a plain key is copied as it is rather than run
        // through serde_json's escaping writer.
        if key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.out.push(b'"');
            self.out.extend_from_slice(key.as_bytes());
            self.out.push(b'"');
        } else {
            serde_json::to_writer(&mut *self.out, key).expect("writing to a Vec cannot fail");
        }
        self.out.push(b':');
        self.out.extend_from_slice(raw_value.as_bytes());
    }

    pub(super) fn finish(self) {
        self.out.push(b'}');
    }
}

/// `s` as a JSON string, quotes and escapes included.
pub(super) fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn keys_are_written_as_serde_json_writes_them(key in "(?s).{0,12}|[\\x00-\\x7f]{0,12}") {
            let mut out = Vec::new();
            let mut writer = ObjectWriter::new(&mut out);
            writer.field(&key, "1");
            writer.finish();
            let expected = format!("{{{}:1}}", serde_json::to_string(&key).unwrap());
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
