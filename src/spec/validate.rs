//! Validating a call: the fields `docs/group-call.md` requires of each call type, and the JSON
//! types of the fields it gives rules for. Checks run in a fixed order and the first failure is
//! the one reported.

use super::call::{CallType, Violation, MAX_MESSAGE_ID_CHARS};
use super::pairs::Entries;
use super::value::{kind, present, string_value, Kind};

/// Checks the fields that `group-call.md` requires of each call type.
pub(super) fn validate(fields: &Entries<'_>, call_type: CallType) -> Result<(), Violation> {
    check_required(fields, call_type)?;
    check_objects(fields)?;
    check_message_id(fields)?;
    check_timestamp(fields)
}

/// The ids each call type requires, and a track's `event`.
fn check_required(fields: &Entries<'_>, call_type: CallType) -> Result<(), Violation> {
    let user_id = has_id(fields, "userId");
    let anonymous_id = has_id(fields, "anonymousId");
    match call_type {
        CallType::Alias => {
            if !user_id {
                return Err(Violation::new(
                    "missing_user_id",
                    "alias requires userId (a non-empty string or a number)",
                ));
            }
            if !has_id(fields, "previousId") {
                return Err(Violation::new(
                    "missing_previous_id",
                    "alias requires previousId (a non-empty string or a number)",
                ));
            }
        }
        _ if !user_id && !anonymous_id => {
            return Err(Violation::new(
                "missing_user_id",
                "userId or anonymousId is required (a non-empty string or a number)",
            ))
        }
        CallType::Group => {
            if !has_id(fields, "groupId") {
                return Err(Violation::new(
                    "missing_group_id",
                    "group requires groupId (a non-empty string or a number)",
                ));
            }
        }
        CallType::Track => check_event(fields)?,
        CallType::Identify | CallType::Page | CallType::Screen => {}
    }
    Ok(())
}

/// A track's `event`: required, a non-empty string.
fn check_event(fields: &Entries<'_>) -> Result<(), Violation> {
    match present(fields.get("event")) {
        Some(raw) if kind(raw) == Kind::String && raw != "\"\"" => Ok(()),
        Some(_) => Err(Violation::new(
            "invalid_event",
            "event must be a non-empty string",
        )),
        None => Err(Violation::new("missing_event", "track requires event")),
    }
}

/// `traits`, `context` and `integrations` are objects where given.
fn check_objects(fields: &Entries<'_>) -> Result<(), Violation> {
    for (name, code) in [
        ("traits", "invalid_traits"),
        ("context", "invalid_context"),
        ("integrations", "invalid_integrations"),
    ] {
        object_field(fields, name, code)?;
    }
    Ok(())
}

/// A given `messageId` is a non-empty string shorter than [`MAX_MESSAGE_ID_CHARS`].
fn check_message_id(fields: &Entries<'_>) -> Result<(), Violation> {
    if let Some(raw) = present(fields.get("messageId")) {
        let id = string_value(raw);
        match id {
            Some(id) if !id.is_empty() && id.chars().count() < MAX_MESSAGE_ID_CHARS => {}
            _ => {
                return Err(Violation::new(
                    "invalid_message_id",
                    format!(
                    "messageId must be a non-empty string under {MAX_MESSAGE_ID_CHARS} characters"
                ),
                ))
            }
        }
    }
    Ok(())
}

/// A given `timestamp` is a JSON string.
fn check_timestamp(fields: &Entries<'_>) -> Result<(), Violation> {
    if let Some(raw) = present(fields.get("timestamp")) {
        if kind(raw) != Kind::String {
            return Err(Violation::new(
                "invalid_timestamp",
                "timestamp must be an ISO-8601 string",
            ));
        }
    }
    Ok(())
}

/// Whether an id field holds a usable id: a non-empty string or a number. `null`, an empty
/// string, any other type or absence counts as missing (`group-call.md`, "Ids").
fn has_id(fields: &Entries<'_>, name: &str) -> bool {
    match fields.get(name) {
        Some(raw) => match kind(raw) {
            Kind::String => raw != "\"\"",
            Kind::Number => true,
            _ => false,
        },
        None => false,
    }
}

/// A field that must be an object when present (and not `null`).
pub(super) fn object_field<'a>(
    fields: &Entries<'a>,
    name: &str,
    code: &'static str,
) -> Result<Option<&'a str>, Violation> {
    match present(fields.get(name)) {
        None => Ok(None),
        Some(raw) if kind(raw) == Kind::Object => Ok(Some(raw)),
        Some(_) => Err(Violation::new(code, format!("{name} must be an object"))),
    }
}
