//! Fuzz target: a request body through grouprelay's decoding and validation, as ingest runs
//! it (gzip inflation within the limit, then parse, normalise, validate), on every endpoint.
//! Whatever the bytes, nothing may panic, and every call accepted must be a JSON object
//! within the call size limit.
#![no_main]

use grouprelay::http::body::{inflate_gzip, Inflate};
use grouprelay::spec::{self, CallType, Endpoint, Receipt};
use libfuzzer_sys::fuzz_target;

/// Small, so that the fuzzer reaches the limit paths.
const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let decoded;
    let body = if selector & 0x80 != 0 {
        match inflate_gzip(body, LIMIT) {
            Ok(inflated) => {
                assert!(inflated.len() <= LIMIT);
                decoded = inflated;
                &decoded[..]
            }
            Err(Inflate::TooLarge | Inflate::Invalid(_)) => return,
        }
    } else {
        body
    };
    let endpoint = match selector % 4 {
        0 => Endpoint::Batch,
        1 => Endpoint::Single(CallType::Group),
        2 => Endpoint::Single(CallType::Track),
        _ => Endpoint::Single(CallType::Alias),
    };
    let mut new_id = || "00000000-0000-4000-8000-000000000000".to_owned();
    let mut receipt = Receipt {
        timestamp: "2026-11-26T00:00:00.000Z",
        new_message_id: &mut new_id,
    };
    if let Ok(parsed) = spec::parse_body(endpoint, body, &mut receipt) {
        for call in &parsed.calls {
            assert!(
                call.len() <= spec::MAX_CALL_BYTES,
                "an accepted call over the limit"
            );
            let value: serde_json::Value =
                serde_json::from_slice(call).expect("an accepted call is JSON");
            assert!(value.is_object(), "an accepted call is an object");
            assert!(value.get("messageId").is_some_and(|v| v.is_string()));
            assert!(value.get("type").is_some_and(|v| v.is_string()));
        }
    }
});
