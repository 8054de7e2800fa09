//! Normalising a call: its type settled and the call validated, then queued as it came or
//! written afresh (`type`, `messageId` and `timestamp` filled in, the batch's `context` and
//! `integrations` merged in, `writeKey` and `sentAt` left out), and last the call as it will
//! be sent checked against the depth, number and size limits.

use serde_json::value::RawValue;

use super::call::{CallType, Receipt, Violation, MAX_CALL_BYTES, MAX_JSON_DEPTH};
use super::pairs::Entries;
use super::scan::{scan, Scan};
use super::validate::validate;
use super::value::{present, string_value};
use super::writer::{quoted, ObjectWriter};

/// Batch-level `context` and `integrations`, merged into every item.
pub(super) struct Shared<'a> {
    pub(super) context: Option<&'a RawValue>,
    pub(super) integrations: Option<&'a RawValue>,
}

/// Keys that never reach the queue: the writeKey travels beside the call, and `sentAt` is
/// set afresh on every upload.
const STRIPPED: [&str; 2] = ["writeKey", "sentAt"];

/// Validates one call and returns its normalised bytes.
pub(super) fn normalise(
    fields: &Entries<'_>,
    path_type: Option<CallType>,
    shared: Option<&Shared<'_>>,
    receipt: &mut Receipt<'_>,
) -> Result<Vec<u8>, Violation> {
    let call_type = type_of(fields, path_type)?;
    validate(fields, call_type)?;
    let bytes = if unchanged(fields, call_type, shared) {
        fields.source.as_bytes().to_vec()
    } else {
        rewrite(fields, call_type, shared, receipt)
    };
    // Checked on the call as it will be sent (batch context merged in), so that in a batch
    // only the call is refused, never its neighbours.
    check_as_sent(&bytes)?;
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
                        format!("type {} is not a Segment call type", raw.get()),
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
        raw.get()
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            == Some(call_type.as_str())
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
/// had none of.
fn rewrite(
    fields: &Entries<'_>,
    call_type: CallType,
    shared: Option<&Shared<'_>>,
    receipt: &mut Receipt<'_>,
) -> Vec<u8> {
    let message_id = present(fields.get("messageId"));
    let timestamp = present(fields.get("timestamp"));
    let context = shared.and_then(|s| s.context);
    let integrations = shared.and_then(|s| s.integrations);
    let mut out = Vec::with_capacity(fields.source.len() + 128);
    let mut writer = ObjectWriter::new(&mut out);
    let merged_context = context.map(|c| merge(fields.get("context"), c));
    let merged_integrations = integrations.map(|i| merge(fields.get("integrations"), i));
    let (mut wrote_context, mut wrote_integrations) = (false, false);
    for (key, value) in &fields.pairs {
        match key.as_ref() {
            k if STRIPPED.contains(&k) => {}
            // Rewritten below where missing or null; only the last duplicate counts.
            "type" | "messageId" | "timestamp" => {}
            "context" if merged_context.is_some() => {
                if !wrote_context {
                    writer.field("context", merged_context.as_deref().unwrap_or("{}"));
                    wrote_context = true;
                }
            }
            "integrations" if merged_integrations.is_some() => {
                if !wrote_integrations {
                    writer.field(
                        "integrations",
                        merged_integrations.as_deref().unwrap_or("{}"),
                    );
                    wrote_integrations = true;
                }
            }
            k => writer.field(k, value.get()),
        }
    }
    writer.field("type", &quoted(call_type.as_str()));
    match message_id {
        Some(id) => writer.field("messageId", id.get()),
        None => writer.field("messageId", &quoted(&(receipt.new_message_id)())),
    }
    match timestamp {
        Some(ts) => writer.field("timestamp", ts.get()),
        None => writer.field("timestamp", &quoted(receipt.timestamp)),
    }
    if let (Some(merged), false) = (&merged_context, wrote_context) {
        writer.field("context", merged);
    }
    if let (Some(merged), false) = (&merged_integrations, wrote_integrations) {
        writer.field("integrations", merged);
    }
    writer.finish();
    out
}

/// The limits checked on the call's final bytes: nesting depth, numbers' range, size.
fn check_as_sent(bytes: &[u8]) -> Result<(), Violation> {
    match scan(bytes, MAX_JSON_DEPTH) {
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

/// Merges a batch-level object into a call's own: the call's keys win.
fn merge(own: Option<&RawValue>, shared: &RawValue) -> String {
    let own = present(own).and_then(|raw| Entries::parse(raw.get()).ok());
    let Some(own) = own else {
        return shared.get().to_owned();
    };
    let Ok(shared) = Entries::parse(shared.get()) else {
        return own.source.to_owned();
    };
    let mut out = Vec::with_capacity(own.source.len() + shared.source.len());
    let mut writer = ObjectWriter::new(&mut out);
    for (key, value) in &own.pairs {
        writer.field(key, value.get());
    }
    for (key, value) in &shared.pairs {
        if own.get(key).is_none() {
            writer.field(key, value.get());
        }
    }
    writer.finish();
    String::from_utf8(out).expect("JSON written from UTF-8 parts")
}
