//! Replays the requests captured from the official Segment client libraries
//! (`tests/fixtures/client-requests/`; its README says which client and version sent each)
//! byte for byte against the real daemon, then reads the queue on disk and checks each stored
//! call against the spec (`docs/http-api.md`, `docs/group-call.md`): writeKey beside the call,
//! `messageId` and `timestamp` kept or assigned, batch-level `context` merged, `writeKey` and
//! `sentAt` stripped, unknown keys and `null`s kept.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{basic_credentials, header, on_disk, post, Daemon, Response};
use grouprelay::clock;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// The default writeKey given to daemons replaying requests that carry Basic auth. The
/// requests that carry the key only in their body get a daemon without one.
const DEFAULT_KEY: &str = "DEFAULT_KEY";

/// The captures this suite knows about; a folder added or lost fails the test.
const KNOWN: [&str; 9] = [
    "go-3.3.0",
    "node-2.3.0",
    "node-3.1.0",
    "python-2.3.4",
    "python-2.4.0",
    "python-2.4.0-gzip",
    "ruby-2.5.0",
    "rust-segment-0.2.6-batch",
    "rust-segment-0.2.6-single",
];

/// One captured request.
struct Capture {
    name: String,
    request_line: String,
    path: String,
    headers: Vec<(String, String)>,
    /// The decoded body, as `request.json` has it.
    body: Value,
    /// The body bytes exactly as they arrived (gzip bytes for the gzip capture).
    raw: Vec<u8>,
}

impl Capture {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn is_gzip(&self) -> bool {
        self.header("Content-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
    }

    fn is_batch(&self) -> bool {
        self.body.get("batch").is_some()
    }

    /// The writeKey as the client meant it: from Basic auth, else from the body.
    fn write_key(&self) -> String {
        match self.header("Authorization") {
            Some(auth) => basic_credentials(auth)
                .split(':')
                .next()
                .unwrap()
                .to_owned(),
            None => self.body["writeKey"]
                .as_str()
                .expect("a request without Authorization carries writeKey in its body")
                .to_owned(),
        }
    }

    /// The calls the client sent, decoded.
    fn items(&self) -> Vec<Map<String, Value>> {
        let items = match self.body.get("batch") {
            Some(batch) => batch.as_array().expect("batch is an array").clone(),
            None => vec![self.body.clone()],
        };
        items
            .into_iter()
            .map(|item| item.as_object().expect("call is an object").clone())
            .collect()
    }

    /// Each call's raw fields, straight from `body.raw` (decompressed), to compare bytes.
    fn raw_items(&self) -> Vec<BTreeMap<String, String>> {
        let mut text = Vec::new();
        if self.is_gzip() {
            flate2::read::MultiGzDecoder::new(&self.raw[..])
                .read_to_end(&mut text)
                .expect("gunzip body.raw");
        } else {
            text = self.raw.clone();
        }
        let text = String::from_utf8(text).expect("UTF-8 body");
        let fields = |source: &str| -> BTreeMap<String, String> {
            let map: BTreeMap<String, &RawValue> =
                serde_json::from_str(source).expect("call is an object");
            map.into_iter()
                .map(|(k, v)| (k, v.get().to_owned()))
                .collect()
        };
        if self.is_batch() {
            #[derive(serde::Deserialize)]
            struct Batch<'a> {
                #[serde(borrow)]
                batch: Vec<&'a RawValue>,
            }
            let batch: Batch<'_> = serde_json::from_str(&text).expect("batch body");
            batch.batch.iter().map(|item| fields(item.get())).collect()
        } else {
            vec![fields(&text)]
        }
    }

    /// The call type the path gives a single call (`/v1/group` -> `group`).
    fn path_type(&self) -> Option<&str> {
        match self.path.rsplit('/').next() {
            Some("batch" | "import" | "b") | None => None,
            Some(name) => Some(name),
        }
    }

    /// The request as it goes on the wire: the captured request line and headers in their
    /// order (Host rewritten to the daemon's address), then the exact body bytes.
    fn wire_bytes(&self, daemon: &Daemon) -> Vec<u8> {
        let mut head = format!("{}\r\n", self.request_line);
        for (name, value) in &self.headers {
            let value = if name.eq_ignore_ascii_case("host") {
                daemon.addr.to_string()
            } else {
                value.clone()
            };
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.raw);
        bytes
    }
}

fn captures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/client-requests")
}

fn load_captures() -> Vec<Capture> {
    let dir = captures_dir();
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.is_dir())
        .collect();
    folders.sort();
    folders
        .into_iter()
        .map(|folder| {
            let name = folder.file_name().unwrap().to_string_lossy().into_owned();
            let request: Value = serde_json::from_slice(
                &std::fs::read(folder.join("request.json")).expect("request.json"),
            )
            .expect("request.json is JSON");
            let raw = std::fs::read(folder.join("body.raw")).expect("body.raw");
            let headers = request["headers"]
                .as_array()
                .expect("headers")
                .iter()
                .map(|pair| {
                    (
                        pair[0].as_str().expect("header name").to_owned(),
                        pair[1].as_str().expect("header value").to_owned(),
                    )
                })
                .collect();
            Capture {
                request_line: request["request_line"].as_str().unwrap().to_owned(),
                path: request["path"].as_str().unwrap().to_owned(),
                headers,
                body: request["body"].clone(),
                raw,
                name,
            }
        })
        .collect()
}

/// Asserts the one success answer the official clients handle right.
fn assert_success(response: &Response, what: &str) {
    assert_eq!(
        response.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.header("Content-Type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(
        response.body,
        br#"{"success":true}"#,
        "{what}: {}",
        String::from_utf8_lossy(&response.body)
    );
}

/// `2026-11-26T11:19:14.688Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_millis_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| range.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

/// Whether the JSON object text has `"key": raw` (any spacing around the colon), the
/// value's bytes exactly as given.
fn has_field(text: &str, key: &str, raw: &str) -> bool {
    let key = serde_json::to_string(key).unwrap();
    text.match_indices(&key).any(|(at, _)| {
        let rest = text[at + key.len()..].trim_start();
        rest.strip_prefix(':')
            .is_some_and(|rest| rest.trim_start().starts_with(raw))
    })
}

fn unix_ms_now() -> u64 {
    clock::unix_ms(SystemTime::now())
}

/// What the stored call must be: the client's call without `writeKey`/`sentAt`, with the
/// batch-level `context`/`integrations` merged under its own keys and the path's type.
/// `messageId`/`timestamp` are left as sent (the caller fills in assigned ones).
fn expected_call(capture: &Capture, item: &Map<String, Value>) -> Map<String, Value> {
    let mut call = item.clone();
    call.remove("writeKey");
    call.remove("sentAt");
    if capture.is_batch() {
        for field in ["context", "integrations"] {
            if let Some(Value::Object(shared)) = capture.body.get(field) {
                let own = call.entry(field).or_insert_with(|| json!({}));
                if own.is_null() {
                    *own = json!({});
                }
                let own = own.as_object_mut().expect("own field is an object");
                for (key, value) in shared {
                    own.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
        }
    }
    if let Some(path_type) = capture.path_type() {
        call.entry("type").or_insert_with(|| json!(path_type));
    }
    call
}

#[tokio::test]
async fn replays_every_captured_client_request() {
    let captures = load_captures();
    let names: Vec<&str> = captures.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, KNOWN, "captures in {}", captures_dir().display());

    for capture in &captures {
        let name = capture.name.as_str();
        // The fixture itself: the raw body is what Content-Length says.
        let declared: usize = capture
            .header("Content-Length")
            .expect("Content-Length")
            .parse()
            .unwrap();
        assert_eq!(
            declared,
            capture.raw.len(),
            "{name}: Content-Length vs body.raw"
        );

        let has_auth = capture.header("Authorization").is_some();
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<&str> = Vec::new();
        if has_auth {
            // A default key the daemon must not use: the Basic one wins.
            args.extend(["--write-key", DEFAULT_KEY]);
        }
        let daemon = Daemon::start(dir.path(), &args);
        let before = unix_ms_now();
        let response = daemon.send(&capture.wire_bytes(&daemon)).await;
        let after = unix_ms_now();
        assert_success(&response, name);
        let status = daemon.terminate();
        assert!(status.success(), "{name}: daemon exited {status}");

        let disk = on_disk(dir.path()).await;
        let items = capture.items();
        let raw_items = capture.raw_items();
        assert_eq!(
            raw_items.len(),
            items.len(),
            "{name}: body.raw vs request.json"
        );
        assert_eq!(disk.calls.len(), items.len(), "{name}: queued calls");
        assert!(
            disk.rejected.is_empty(),
            "{name}: rejected {:?}",
            disk.rejected
        );
        assert_eq!(disk.dead.len(), 0, "{name}: dead letters");

        let write_key = capture.write_key();
        assert_ne!(write_key, DEFAULT_KEY);
        let mut assigned_ids = HashSet::new();
        for (i, ((record, item), raw_item)) in
            disk.calls.iter().zip(&items).zip(&raw_items).enumerate()
        {
            let what = format!("{name} call {i}");
            assert_eq!(record.write_key, write_key, "{what}: writeKey");
            assert!(
                (before..=after).contains(&record.received_ms),
                "{what}: received_ms {} outside {before}..={after}",
                record.received_ms
            );
            let stored: Value = serde_json::from_slice(&record.call)
                .unwrap_or_else(|e| panic!("{what}: stored call is not JSON: {e}"));
            let stored = stored
                .as_object()
                .expect("stored call is an object")
                .clone();
            let text = String::from_utf8(record.call.clone()).expect("UTF-8 call");

            for stripped in ["writeKey", "sentAt"] {
                assert!(
                    !stored.contains_key(stripped),
                    "{what}: {stripped} stored: {text}"
                );
            }
            let mut expected = expected_call(capture, item);
            let call_type = expected["type"].as_str().expect("type").to_owned();
            assert_eq!(stored.get("type"), Some(&json!(call_type)), "{what}: type");

            match item.get("messageId") {
                Some(id) => assert_eq!(stored.get("messageId"), Some(id), "{what}: messageId"),
                None => {
                    let id = stored["messageId"].as_str().expect("messageId assigned");
                    let uuid = uuid::Uuid::parse_str(id)
                        .unwrap_or_else(|e| panic!("{what}: messageId {id:?} is no UUID: {e}"));
                    assert_eq!(uuid.get_version_num(), 4, "{what}: messageId {id}");
                    assert!(assigned_ids.insert(id.to_owned()), "{what}: {id} repeated");
                    expected.insert("messageId".into(), json!(id));
                }
            }
            match item.get("timestamp") {
                Some(ts) => assert_eq!(stored.get("timestamp"), Some(ts), "{what}: timestamp"),
                None => {
                    let ts = stored["timestamp"].as_str().expect("timestamp stamped");
                    assert!(is_rfc3339_millis_utc(ts), "{what}: timestamp {ts:?}");
                    let receipt = clock::rfc3339_millis(
                        UNIX_EPOCH + Duration::from_millis(record.received_ms),
                    );
                    assert_eq!(ts, receipt, "{what}: stamped with the time of receipt");
                    expected.insert("timestamp".into(), json!(ts));
                }
            }
            // Everything else exactly as sent: nulls, unknown keys, traits.
            assert_eq!(stored, expected, "{what}");
            // Values normalising has no reason to touch reach the queue byte for byte.
            for key in [
                "traits",
                "_metadata",
                "anonymousId",
                "integrations",
                "userId",
            ] {
                if let Some(raw) = raw_item.get(key) {
                    if key == "integrations" && capture.body.get("integrations").is_some() {
                        continue;
                    }
                    assert!(
                        has_field(&text, key, raw),
                        "{what}: {key}: {raw} not kept byte for byte in {text}"
                    );
                }
            }
        }

        // What makes each capture special, spelled out.
        let calls = disk.call_json();
        match name {
            "go-3.3.0" => {
                let batch_id = capture.body["messageId"].as_str().unwrap();
                for call in &calls {
                    assert_eq!(
                        call["context"]["library"],
                        json!({"name": "analytics-go", "version": "3.0.0"}),
                        "go: batch-level context.library merged"
                    );
                    assert_ne!(
                        call["messageId"],
                        json!(batch_id),
                        "go: batch messageId used"
                    );
                }
            }
            "python-2.3.4" | "node-2.3.0" => {
                assert!(!has_auth, "{name} is the body-writeKey-only capture");
            }
            "python-2.4.0" | "python-2.4.0-gzip" => {
                assert_eq!(capture.is_gzip(), name.ends_with("gzip"));
                for call in &calls {
                    let call = call.as_object().unwrap();
                    assert_eq!(call.get("anonymousId"), Some(&Value::Null), "{name}");
                    assert_eq!(call.get("integrations"), Some(&json!({})), "{name}");
                }
            }
            "node-3.1.0" => {
                for call in &calls {
                    assert_eq!(
                        call["_metadata"],
                        json!({"nodeVersion": "v20.20.2", "jsRuntime": "node"})
                    );
                }
            }
            "ruby-2.5.0" => assert_eq!(capture.path, "/v1/import"),
            "rust-segment-0.2.6-single" | "rust-segment-0.2.6-batch" => {
                assert_eq!(
                    assigned_ids.len(),
                    calls.len(),
                    "{name}: messageIds assigned"
                );
                if name.ends_with("single") {
                    assert_eq!(capture.path, "/v1/group");
                    assert!(capture.body.get("type").is_none());
                    assert!(capture.body.get("timestamp").is_none());
                }
            }
            _ => {}
        }
    }
}

/// The complete Group call from `group-call.md`, plus a `null` trait: a trait key with a
/// space, a number where the table says string and the `null` all survive exactly.
#[tokio::test]
async fn single_group_call_keeps_traits_exactly() {
    let traits = r#"{"name": "Initech", "industry": "Technology", "employees": 329, "plan": "enterprise", "total billed": 830, "deleted": null}"#;
    let body = format!(
        r#"{{
  "anonymousId": "507f191e810c19729de860ea",
  "channel": "browser",
  "context": {{"ip": "8.8.8.8", "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"}},
  "integrations": {{"All": true, "Mixpanel": false, "Salesforce": false}},
  "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
  "receivedAt": "2015-02-23T22:28:55.387Z",
  "sentAt": "2015-02-23T22:28:55.111Z",
  "timestamp": "2015-02-23T22:28:55.111Z",
  "traits": {traits},
  "type": "group",
  "userId": "97980cfea0067",
  "groupId": "0e8c78ea9d97a7b8185e8632",
  "version": "1.1"
}}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let response = daemon
        .send(&post("/v1/group", Some("KEY_single"), body.as_bytes()))
        .await;
    assert_success(&response, "complete group call");

    // Basic auth wins over a different writeKey in the body.
    let both = br#"{"batch":[{"type":"group","userId":"u","groupId":"g"}],"writeKey":"BODY_KEY"}"#;
    let response = daemon
        .send(&post("/v1/batch", Some("HEADER_KEY"), both))
        .await;
    assert_success(&response, "Basic and body writeKey");

    // A single call whose only writeKey is in its body (no default key was given).
    let single = br#"{"userId":"u","groupId":"g","writeKey":"SINGLE_BODY_KEY","sentAt":"2026-01-01T00:00:00.000Z"}"#;
    let response = daemon.send(&post("/v1/group", None, single)).await;
    assert_success(&response, "single call with body writeKey");

    assert!(daemon.terminate().success());
    let disk = on_disk(dir.path()).await;
    assert_eq!(disk.calls.len(), 3);
    assert!(disk.rejected.is_empty());

    let record = &disk.calls[0];
    assert_eq!(record.write_key, "KEY_single");
    let text = std::str::from_utf8(&record.call).unwrap();
    assert!(
        text.contains(&format!(r#""traits":{traits}"#)),
        "traits not byte for byte: {text}"
    );
    let mut expected: Value = serde_json::from_str(&body).unwrap();
    expected.as_object_mut().unwrap().remove("sentAt");
    let stored: Value = serde_json::from_slice(&record.call).unwrap();
    assert_eq!(stored, expected);
    assert_eq!(stored["traits"]["total billed"], json!(830));
    assert_eq!(stored["traits"].get("deleted"), Some(&Value::Null));

    assert_eq!(disk.calls[1].write_key, "HEADER_KEY");
    let stored: Value = serde_json::from_slice(&disk.calls[1].call).unwrap();
    assert!(stored.get("writeKey").is_none());

    assert_eq!(disk.calls[2].write_key, "SINGLE_BODY_KEY");
    let stored: Value = serde_json::from_slice(&disk.calls[2].call).unwrap();
    assert!(stored.get("writeKey").is_none(), "{stored}");
    assert!(stored.get("sentAt").is_none(), "{stored}");
    assert_eq!(stored["type"], json!("group"));
}
