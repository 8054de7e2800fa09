//! Normalising a call: its type settled and the call validated, then queued as it came or
//! written afresh (`type`, `messageId` and `timestamp` filled in, the batch's `context` and
//! `integrations` merged in, `writeKey` and `sentAt` left out), and last the call as it will
//! be sent checked against the depth, number and size limits.

use super::call::{CallType, Receipt, Violation, MAX_CALL_BYTES, MAX_JSON_DEPTH};
use super::pairs::Entries;
use super::scan::{scan, Scan};
use super::split::{split_object, Split};
use super::validate::validate;
use super::value::{present, string_value};
use super::writer::{quoted, ObjectWriter};

/// Batch-level `context` and `integrations`, merged into every item.
pub(super) struct Shared<'a> {
    pub(super) context: Option<&'a str>,
    pub(super) integrations: Option<&'a str>,
}

/// Keys that never reach the queue: the writeKey travels beside the call, and `sentAt` is
/// set afresh on every upload.
const STRIPPED: [&str; 2] = ["writeKey", "sentAt"];

/// Validates one call and returns its normalised bytes.
pub(super) fn normalise(
    call: &Split<'_>,
    path_type: Option<CallType>,
    shared: Option<&Shared<'_>>,
    receipt: &mut Receipt<'_>,
) -> Result<Vec<u8>, Violation> {
    let fields = &call.entries;
    let call_type = type_of(fields, path_type)?;
    validate(fields, call_type)?;
    let (bytes, flaw) = if unchanged(fields, call_type, shared) {
        let flaw = call.flaws.iter().copied().find(|f| *f != Scan::Fine);
        (
            fields.source.as_bytes().to_vec(),
            flaw.unwrap_or(Scan::Fine),
        )
    } else {
        rewrite(call, call_type, shared, receipt)
    };
    // Judged from the parts; a scan of the bytes must agree (the tests and the fuzzer run
    // with this check).
    debug_assert_eq!(
        flaw,
        scan(&bytes, MAX_JSON_DEPTH),
        "the limits from the parts"
    );
    // Checked on the call as it will be sent (batch context merged in), so that in a batch
    // only the call is refused, never its neighbours.
    check_as_sent(&bytes, flaw)?;
    Ok(bytes)
}

/// The call's type: the path's, else the call's own `type`, which a batch's call must have.
fn type_of(fields: &Entries<'_>, path_type: Option<CallType>) -> Result<CallType, Violation> {
    match path_type {
        Some(t) => Ok(t),
        None => match fields.get("type") {
            None => Err(Violation::new(
                "missing_type",
                "type is required in a batch",
            )),
            Some(raw) => string_value(raw)
                .and_then(|name| CallType::from_name(&name))
                .ok_or_else(|| {
                    Violation::new(
                        "invalid_type",
                        format!("type {raw} is not a Segment call type"),
                    )
                }),
        },
    }
}

/// Whether the call is queued byte for byte: it names its type already, has a `messageId`
/// and a `timestamp`, takes nothing from its batch and has no key to strip.
fn unchanged(fields: &Entries<'_>, call_type: CallType, shared: Option<&Shared<'_>>) -> bool {
    let message_id = present(fields.get("messageId"));
    let timestamp = present(fields.get("timestamp"));
    let context = shared.and_then(|s| s.context);
    let integrations = shared.and_then(|s| s.integrations);
    // Compared without allocating: this runs for every call.
    let type_is_right = fields.get("type").is_some_and(|raw| {
        raw.strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(call_type.as_str())
    });
    type_is_right
        && message_id.is_some()
        && timestamp.is_some()
        && context.is_none()
        && integrations.is_none()
        && !fields.has_any(&STRIPPED)
}

/// The call written afresh: its own fields in order, less the stripped keys, with the batch's
/// `context` and `integrations` merged in where it has its own; then `type`, `messageId` and
/// `timestamp` (the call's own where given, else made now); then the merged objects the call
/// had none of. With the bytes, the first breach of the limits in them, found from the parts
/// written: the kept values' own (noted when the call was split), and the merged objects'
/// (scanned here; they sit one level down). `type`, `messageId` and `timestamp` are strings.
fn rewrite(
    call: &Split<'_>,
    call_type: CallType,
    shared: Option<&Shared<'_>>,
    receipt: &mut Receipt<'_>,
) -> (Vec<u8>, Scan) {
    let fields = &call.entries;
    let message_id = present(fields.get("messageId"));
    let timestamp = present(fields.get("timestamp"));
    let context = shared.and_then(|s| s.context);
    let integrations = shared.and_then(|s| s.integrations);
    let mut out = Vec::with_capacity(fields.source.len() + 128);
    let mut writer = ObjectWriter::new(&mut out);
    let mut flaw = Scan::Fine;
    let mut note = |found: Scan| {
        if flaw == Scan::Fine {
            flaw = found;
        }
    };
    let merged_context = context.map(|c| merge(fields.get("context"), c));
    let merged_integrations = integrations.map(|i| merge(fields.get("integrations"), i));
    let (mut wrote_context, mut wrote_integrations) = (false, false);
    for ((key, value), own_flaw) in fields.pairs.iter().zip(&call.flaws) {
        match key.as_ref() {
            k if STRIPPED.contains(&k) => {}
            // Rewritten below where missing or null; only the last duplicate counts.
            "type" | "messageId" | "timestamp" => {}
            "context" if merged_context.is_some() => {
                if !wrote_context {
                    let merged = merged_context.as_deref().unwrap_or("{}");
                    note(scan(merged.as_bytes(), MAX_JSON_DEPTH - 1));
                    writer.field("context", merged);
                    wrote_context = true;
                }
            }
            "integrations" if merged_integrations.is_some() => {
                if !wrote_integrations {
                    let merged = merged_integrations.as_deref().unwrap_or("{}");
                    note(scan(merged.as_bytes(), MAX_JSON_DEPTH - 1));
                    writer.field("integrations", merged);
                    wrote_integrations = true;
                }
            }
            k => {
                note(*own_flaw);
                writer.field(k, value);
            }
        }
    }
    writer.field("type", &quoted(call_type.as_str()));
    match message_id {
        Some(id) => writer.field("messageId", id),
        None => writer.field("messageId", &quoted(&(receipt.new_message_id)())),
    }
    match timestamp {
        Some(ts) => writer.field("timestamp", ts),
        None => writer.field("timestamp", &quoted(receipt.timestamp)),
    }
    if let (Some(merged), false) = (&merged_context, wrote_context) {
        note(scan(merged.as_bytes(), MAX_JSON_DEPTH - 1));
        writer.field("context", merged);
    }
    if let (Some(merged), false) = (&merged_integrations, wrote_integrations) {
        note(scan(merged.as_bytes(), MAX_JSON_DEPTH - 1));
        writer.field("integrations", merged);
    }
    writer.finish();
    (out, flaw)
}

/// The limits on the call's final bytes: `flaw`, its first breach of the depth and number
/// limits, and its size.
fn check_as_sent(bytes: &[u8], flaw: Scan) -> Result<(), Violation> {
    match flaw {
        Scan::Fine => {}
        Scan::TooDeep => {
            return Err(Violation::new(
                "too_deep",
                format!("the call nests JSON deeper than {MAX_JSON_DEPTH} levels"),
            ))
        }
        Scan::NumberOutOfRange => {
            return Err(Violation::new(
                "number_out_of_range",
                "the call holds a number beyond a 64-bit float (e.g. 1e400)",
            ))
        }
    }
    if bytes.len() > MAX_CALL_BYTES {
        return Err(Violation::new(
            "call_too_large",
            format!(
                "the call is {} bytes serialized; at most {MAX_CALL_BYTES} are accepted",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Merges a batch-level object into a call's own: the call's keys win. Both are values of a
/// body serde has checked, so they are split without serde.
fn merge(own: Option<&str>, shared: &str) -> String {
    let own = present(own).and_then(|raw| split_object(raw, MAX_JSON_DEPTH).ok());
    let Some(Split { entries: own, .. }) = own else {
        return shared.to_owned();
    };
    let Ok(Split {
        entries: shared, ..
    }) = split_object(shared, MAX_JSON_DEPTH)
    else {
        return own.source.to_owned();
    };
    let mut out = Vec::with_capacity(own.source.len() + shared.source.len());
    let mut writer = ObjectWriter::new(&mut out);
    for (key, value) in &own.pairs {
        writer.field(key, value);
    }
    for (key, value) in &shared.pairs {
        if own.get(key).is_none() {
            writer.field(key, value);
        }
    }
    writer.finish();
    String::from_utf8(out).expect("JSON written from UTF-8 parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[[...1...]]` nested `levels` deep, with `tail` inside the innermost array.
    fn nested(levels: usize, tail: &str) -> String {
        format!("{}{tail}{}", "[".repeat(levels), "]".repeat(levels))
    }

    /// The limits found from the parts (the split's notes, the merged objects' scans) are
    /// those a scan of the bytes written finds, whatever is kept, stripped or merged.
    #[test]
    fn the_limits_found_from_the_parts_are_those_of_the_bytes() {
        let depths = [1, MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH];
        let numbers = ["1", "1e400"];
        let mut id = || "generated".to_owned();
        let mut receipt = Receipt {
            timestamp: "2026-12-03T00:00:00.000Z",
            new_message_id: &mut id,
        };
        let mut cases = 0;
        for own_depth in depths {
            for shared_depth in depths {
                for number in numbers {
                    for stripped in [nested(MAX_JSON_DEPTH + 5, "1e400"), "1".to_owned()] {
                        for with_own_context in [false, true] {
                            let own_context = if with_own_context {
                                format!(r#""context":{{"a":{}}},"#, nested(own_depth, "1"))
                            } else {
                                String::new()
                            };
                            let call = format!(
                                r#"{{"sentAt":{stripped},{own_context}"traits":{{"n":{number},"d":{}}},"userId":"u","groupId":"g"}}"#,
                                nested(own_depth, "2")
                            );
                            let shared_context =
                                format!(r#"{{"b":{},"c":{number}}}"#, nested(shared_depth, "3"));
                            for shared in [
                                Shared {
                                    context: None,
                                    integrations: None,
                                },
                                Shared {
                                    context: Some(&shared_context),
                                    integrations: Some(&shared_context),
                                },
                            ] {
                                let split = split_object(&call, MAX_JSON_DEPTH).unwrap();
                                let (bytes, flaw) =
                                    rewrite(&split, CallType::Group, Some(&shared), &mut receipt);
                                assert_eq!(
                                    flaw,
                                    scan(&bytes, MAX_JSON_DEPTH),
                                    "{}",
                                    String::from_utf8_lossy(&bytes)
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 4 * 4 * 2 * 2 * 2 * 2);
    }

    /// A call queued as it came is judged by its split's notes: the same as a scan of it.
    #[test]
    fn a_call_kept_as_it_came_is_judged_as_its_bytes_are() {
        let mut id = || "generated".to_owned();
        let mut receipt = Receipt {
            timestamp: "2026-12-03T00:00:00.000Z",
            new_message_id: &mut id,
        };
        for (traits, code) in [
            (nested(MAX_JSON_DEPTH - 2, "1"), None),
            (nested(MAX_JSON_DEPTH - 1, "1"), Some("too_deep")),
            (nested(2, "1e400"), Some("number_out_of_range")),
            (
                format!("[{},{}]", nested(2, "1e400"), nested(MAX_JSON_DEPTH, "1")),
                Some("number_out_of_range"),
            ),
            (
                format!("[{},{}]", nested(MAX_JSON_DEPTH, "1"), nested(2, "1e400")),
                Some("too_deep"),
            ),
        ] {
            let call = format!(
                r#"{{"type":"group","messageId":"m","timestamp":"t","userId":"u","groupId":"g","traits":{{"x":{traits}}}}}"#
            );
            let split = split_object(&call, MAX_JSON_DEPTH).unwrap();
            assert!(unchanged(&split.entries, CallType::Group, None));
            let result = normalise(&split, None, None, &mut receipt);
            assert_eq!(result.as_ref().err().map(|v| v.code), code, "{call}");
            let expected = match scan(call.as_bytes(), MAX_JSON_DEPTH) {
                Scan::Fine => None,
                Scan::TooDeep => Some("too_deep"),
                Scan::NumberOutOfRange => Some("number_out_of_range"),
            };
            assert_eq!(code, expected, "{call}");
        }
    }
}
