//! A request body parsed: a single call or a batch, each call normalised and validated.

use super::call::{
    Body, CallType, Endpoint, Receipt, RejectedCall, Violation, MAX_CALLS_PER_REQUEST,
    MAX_JSON_DEPTH,
};
use super::normalise::{normalise, Shared};
use super::pairs::{BatchField, BatchTop, Entries};
use super::split::split_object;
use super::validate::object_field;
use super::value::{kind, Kind};

/// Parses, normalises and validates one request body.
///
/// `Err` refuses the whole body (unparseable JSON, a batch that is not an array, or a bad
/// call on a single-call path); `Ok` may still carry rejected calls of a batch.
pub fn parse_body(
    endpoint: Endpoint,
    bytes: &[u8],
    receipt: &mut Receipt<'_>,
) -> Result<Body, Violation> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Violation::new("invalid_json", "the body is not valid UTF-8"))?;
    match endpoint {
        Endpoint::Single(call_type) => single_body(text, call_type, receipt),
        Endpoint::Batch => batch_body(text, receipt),
    }
}

/// A single-call path's body: the call itself, which may carry a `writeKey`.
fn single_body(
    text: &str,
    call_type: CallType,
    receipt: &mut Receipt<'_>,
) -> Result<Body, Violation> {
    // serde checks the syntax (reading nothing into memory); then the call is split. A body
    // refused is refused for the reason serde's reading of it as an object gives, as before
    // the split: a body that is not an object is told by its first token.
    let checked = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    let Some(call) = checked
        .then(|| split_object(text, MAX_JSON_DEPTH).ok())
        .flatten()
    else {
        return Err(match Entries::parse(text) {
            Err(e) => not_parsed(e),
            Ok(_) => Violation::new("invalid_json", "the body is not valid JSON"),
        });
    };
    let write_key = write_key(&call.entries)?;
    let call = normalise(&call, Some(call_type), None, receipt)?;
    Ok(Body {
        write_key,
        calls: vec![call],
        rejected: Vec::new(),
    })
}

/// A batch body: its `writeKey`, the `context` and `integrations` its calls share, and its
/// calls, each normalised or rejected on its own.
fn batch_body(text: &str, receipt: &mut Receipt<'_>) -> Result<Body, Violation> {
    // A batch's calls are split out while the body is read: reading `batch` as one raw
    // value and then splitting it would read the whole body twice.
    let BatchTop {
        entries: top,
        batch,
    } = BatchTop::parse(text)
        .or_else(|_| BatchTop::parse_in_two_steps(text))
        .map_err(not_parsed)?;
    let write_key = write_key(&top)?;
    let shared = Shared {
        context: object_field(&top, "context", "invalid_context")?,
        integrations: object_field(&top, "integrations", "invalid_integrations")?,
    };
    let items = batch_calls(batch)?;
    let mut body = Body {
        write_key,
        calls: Vec::with_capacity(items.len()),
        rejected: Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        match batch_call(index, item, &shared, receipt) {
            Ok(call) => body.calls.push(call),
            Err(violation) => body.rejected.push(RejectedCall {
                index,
                violation,
                raw: item.as_bytes().to_vec(),
            }),
        }
    }
    Ok(body)
}

/// The calls in a batch body's `batch`: an array of one to [`MAX_CALLS_PER_REQUEST`] values.
fn batch_calls(batch: Option<BatchField<'_>>) -> Result<Vec<&str>, Violation> {
    let items = match batch {
        None => return Err(Violation::new("missing_batch", "the body has no batch")),
        Some(BatchField::Calls(items)) => items,
        Some(BatchField::NotArray) => {
            return Err(Violation::new(
                "invalid_batch",
                "batch must be an array of calls",
            ))
        }
    };
    if items.is_empty() {
        return Err(Violation::new("empty_batch", "batch has no calls"));
    }
    if items.len() > MAX_CALLS_PER_REQUEST {
        return Err(Violation::new(
            "too_many_calls",
            format!(
                "batch has {} calls; at most {MAX_CALLS_PER_REQUEST} are accepted per request",
                items.len()
            ),
        ));
    }
    Ok(items)
}

/// One call of a batch, normalised with what the batch shares.
fn batch_call(
    index: usize,
    item: &str,
    shared: &Shared<'_>,
    receipt: &mut Receipt<'_>,
) -> Result<Vec<u8>, Violation> {
    match split_object(item, MAX_JSON_DEPTH) {
        Ok(call) => normalise(&call, None, Some(shared), receipt),
        Err(_) => Err(Violation::new(
            "invalid_call",
            format!("batch[{index}] is not a JSON object"),
        )),
    }
}

/// The body's own `writeKey`: `None` when it is absent, `null` or empty.
fn write_key(top: &Entries<'_>) -> Result<Option<String>, Violation> {
    match top.get("writeKey") {
        None => Ok(None),
        Some(raw) => match kind(raw) {
            Kind::Null => Ok(None),
            Kind::String => {
                let key: String = serde_json::from_str(raw)
                    .map_err(|_| Violation::new("invalid_write_key", "writeKey is not a string"))?;
                Ok((!key.is_empty()).then_some(key))
            }
            _ => Err(Violation::new(
                "invalid_write_key",
                "writeKey must be a string",
            )),
        },
    }
}

/// Why a body that did not parse is refused: it is not JSON, or it is JSON but not an object.
fn not_parsed(e: serde_json::Error) -> Violation {
    match e.classify() {
        serde_json::error::Category::Data => {
            Violation::new("invalid_body", "the body must be a JSON object")
        }
        _ => Violation::new("invalid_json", format!("the body is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(endpoint: Endpoint, body: &str) -> &'static str {
        let mut id = || "generated".to_owned();
        let mut receipt = Receipt {
            timestamp: "2026-12-03T00:00:00.000Z",
            new_message_id: &mut id,
        };
        parse_body(endpoint, body.as_bytes(), &mut receipt)
            .err()
            .map_or("accepted", |v| v.code)
    }

    /// A single call's body is refused for the reason serde's reading of it as an object
    /// gives: a body that is not an object is told by its first token, broken or not.
    #[test]
    fn a_single_call_body_is_refused_as_serde_reads_it() {
        let group = Endpoint::Single(CallType::Group);
        for (body, code) in [
            ("[1,", "invalid_body"),
            ("[}", "invalid_body"),
            ("null x", "invalid_body"),
            ("1 2", "invalid_body"),
            ("truex", "invalid_body"),
            ("[]", "invalid_body"),
            ("1e400", "invalid_json"),
            (r#""\ud800""#, "invalid_json"),
            ("", "invalid_json"),
            ("  ", "invalid_json"),
            ("x", "invalid_json"),
            (r#"{"userId":"u","groupId":"g""#, "invalid_json"),
            (r#"{"userId":"u","groupId":"g"} x"#, "invalid_json"),
            (r#"{"\ud800":1,"userId":"u","groupId":"g"}"#, "invalid_json"),
            (
                r#"{"userId":"u","groupId":"g","traits":{"n":1e400}}"#,
                "number_out_of_range",
            ),
            (r#" {"userId":"u","groupId":"g"} "#, "accepted"),
        ] {
            assert_eq!(refusal(group, body), code, "{body}");
        }
    }

    /// In a batch, a call that is not an object, or has a key serde cannot read, is refused
    /// alone.
    #[test]
    fn a_batch_call_that_does_not_split_is_refused_alone() {
        let mut id = || "generated".to_owned();
        let mut receipt = Receipt {
            timestamp: "2026-12-03T00:00:00.000Z",
            new_message_id: &mut id,
        };
        let body =
            r#"{"batch":[[1],{"\ud800":1},"x",{"type":"group","userId":"u","groupId":"g"}]}"#;
        let parsed = parse_body(Endpoint::Batch, body.as_bytes(), &mut receipt).unwrap();
        assert_eq!(parsed.calls.len(), 1);
        let refused: Vec<(usize, &str)> = parsed
            .rejected
            .iter()
            .map(|r| (r.index, r.violation.code))
            .collect();
        assert_eq!(
            refused,
            [
                (0, "invalid_call"),
                (1, "invalid_call"),
                (2, "invalid_call")
            ]
        );
    }
}
