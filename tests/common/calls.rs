//! The calls tests send: one builder for a `group` call's JSON, and a batch around calls.

use std::fmt;

use serde_json::{json, Value};

/// A `group` call, written as compact JSON with its fields in one order (`type`, `userId`,
/// `groupId`, `messageId`, `traits`), so that what the queue keeps compares byte for byte.
#[derive(Debug, Clone)]
pub struct Group {
    typed: bool,
    user_id: String,
    message_id: Option<String>,
    traits: Option<Value>,
}

/// `{"type":"group","userId":user_id,"groupId":"g"}`, to add to.
pub fn group(user_id: impl fmt::Display) -> Group {
    Group {
        typed: true,
        user_id: user_id.to_string(),
        message_id: None,
        traits: None,
    }
}

/// The usual call: messageId `id`, userId `u-{id}`.
pub fn call(id: impl fmt::Display) -> Group {
    group(format!("u-{id}")).id(id)
}

/// A numbered call: messageId `m{n}`, userId `u{n}`.
pub fn numbered(n: impl fmt::Display) -> Group {
    group(format!("u{n}")).id(format!("m{n}"))
}

impl Group {
    /// With this `messageId`.
    pub fn id(mut self, message_id: impl fmt::Display) -> Group {
        self.message_id = Some(message_id.to_string());
        self
    }

    /// With these `traits`.
    pub fn traits(mut self, traits: Value) -> Group {
        self.traits = Some(traits);
        self
    }

    /// With `{"pad":"xx…"}` of `n` bytes for traits, to make the call bigger.
    pub fn pad(self, n: usize) -> Group {
        self.traits(json!({ "pad": "x".repeat(n) }))
    }

    /// Without `type`: a single call's path names it.
    pub fn untyped(mut self) -> Group {
        self.typed = false;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |s: &str| Value::from(s).to_string();
        f.write_str("{")?;
        if self.typed {
            f.write_str(r#""type":"group","#)?;
        }
        write!(f, r#""userId":{},"groupId":"g""#, text(&self.user_id))?;
        if let Some(id) = &self.message_id {
            write!(f, r#","messageId":{}"#, text(id))?;
        }
        if let Some(traits) = &self.traits {
            write!(f, r#","traits":{traits}"#)?;
        }
        f.write_str("}")
    }
}

/// `{"batch":[…]}` around calls written as JSON.
pub fn batch<C: fmt::Display>(calls: impl IntoIterator<Item = C>) -> String {
    let calls: Vec<String> = calls.into_iter().map(|c| c.to_string()).collect();
    format!(r#"{{"batch":[{}]}}"#, calls.join(","))
}

/// The messageIds of calls, in order.
pub fn message_ids(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| c["messageId"].as_str().expect("a messageId").to_owned())
        .collect()
}
