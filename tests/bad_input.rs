//! Bad requests against the real daemon: each gets its status and a JSON error body
//! `{"success":false,"code":...,"message":...}`, and none of them queues anything. Then the
//! partial case (a batch with good and bad calls) and shapes that look odd but are valid.

mod common;

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{
    basic_auth, batch, exchange, get, group, on_disk, peak_rss, post, request, Daemon, Response,
};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const KEY: &str = "KEY_bad_input";
/// The daemon's default body limit (`--max-body-bytes`).
const LIMIT: usize = 1 << 20;

/// One bad request and the answer it must get.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(name: &'static str, request: Vec<u8>, status: u16, code: &'static str) -> Case {
    Case {
        name,
        request,
        status,
        code,
    }
}

/// A POST with the writeKey in Basic auth.
fn keyed(path: &str, body: &str) -> Vec<u8> {
    post(path, Some(KEY), body.as_bytes())
}

/// A Basic-auth POST with `Content-Encoding` and the right `Content-Length`.
fn encoded(encoding: &str, body: &[u8]) -> Vec<u8> {
    request(
        "POST",
        "/v1/batch",
        &[
            "Content-Type: application/json".into(),
            basic_auth(KEY),
            format!("Content-Encoding: {encoding}"),
            format!("Content-Length: {}", body.len()),
        ],
        body,
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// `n` zero bytes, gzip-compressed in one member.
fn gzip_zeros(n: usize) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len());
        encoder.write_all(&chunk[..take]).unwrap();
        left -= take;
    }
    encoder.finish().unwrap()
}

/// Wraps a stream so that a write the server cut short (it answered and closed without
/// reading the whole body) counts as written, and the answer can still be read.
struct ForgivingWrites(TcpStream);

impl AsyncRead for ForgivingWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ForgivingWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.0).poll_write(cx, buf) {
            Poll::Ready(Err(_)) => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.0).poll_flush(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Sends `request` and reads the answer, even when the daemon answers before the body is in.
async fn send(daemon: &Daemon, request: &[u8]) -> Response {
    let stream = TcpStream::connect(daemon.addr).await.expect("connect");
    tokio::time::timeout(
        Duration::from_secs(20),
        exchange(ForgivingWrites(stream), request),
    )
    .await
    .expect("an answer within 20 s")
    .expect("HTTP exchange")
}

fn assert_json_content_type(response: &Response, what: &str) {
    assert_eq!(
        response.header("Content-Type"),
        Some("application/json"),
        "{what}: Content-Type"
    );
}

/// Asserts `{"success":false,"code":code,"message":"..."}` and nothing else.
fn assert_error(response: &Response, status: u16, code: &str, what: &str) {
    let text = String::from_utf8_lossy(&response.body);
    assert_eq!(response.status, status, "{what}: status; body {text}");
    assert_json_content_type(response, what);
    let body = response.json();
    let object = body.as_object().unwrap_or_else(|| panic!("{what}: {text}"));
    assert_eq!(object.get("success"), Some(&json!(false)), "{what}: {text}");
    assert_eq!(object.get("code"), Some(&json!(code)), "{what}: {text}");
    let message = object.get("message").and_then(Value::as_str);
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{what}: message: {text}"
    );
    assert_eq!(object.len(), 3, "{what}: extra keys in {text}");
}

#[tokio::test]
async fn bad_requests_get_their_status_and_code_and_queue_nothing() {
    let long_id = "m".repeat(100);
    let ten_thousand = batch(vec![group("u"); 10_000]);
    let two_mb = vec![b' '; 2 << 20];
    let nested = format!(
        r#"{{"userId":"u","context":{{"x":{}{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let nested_traits = format!(
        r#"{{"userId":"u","groupId":"g","traits":{}1{}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    let huge_trait = "x".repeat(33 * 1024);
    let mut too_many = String::from(r#"{"batch":["#);
    for i in 0..2_501 {
        if i > 0 {
            too_many.push(',');
        }
        too_many.push_str(&group(format!("u{i}")).to_string());
    }
    too_many.push_str("]}");
    // Valid JSON, padded with spaces past the limit.
    let mut oversize = batch([group("u")]).into_bytes();
    oversize.resize(LIMIT + 1, b' ');
    // The same, chunked: only reading the body can tell it is too large.
    let mut chunked = Vec::new();
    for chunk in oversize.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let bomb = gzip_zeros(50 << 20);
    assert!(bomb.len() < LIMIT, "the bomb itself fits the limit");
    // 512 MiB of zeros in 32 gzip members: inflating it in full would show in the RSS.
    let member = gzip_zeros(16 << 20);
    let big_bomb = member.repeat(32);
    assert!(big_bomb.len() < LIMIT, "the big bomb itself fits the limit");
    let mut bad_utf8 = batch([group("u")]).into_bytes();
    let at = bad_utf8.iter().position(|&b| b == b'u').unwrap();
    bad_utf8.splice(at..at, [0xff, 0xfe]);

    let valid_batch = batch([group("u")]);
    let cases = vec![
        // The body as JSON.
        case(
            "invalid JSON",
            keyed("/v1/batch", r#"{"batch": ["#),
            400,
            "invalid_json",
        ),
        case("empty body", keyed("/v1/batch", ""), 400, "invalid_json"),
        case(
            "trailing garbage",
            keyed("/v1/batch", r#"{"batch":[]} x"#),
            400,
            "invalid_json",
        ),
        case(
            "invalid UTF-8",
            post("/v1/batch", Some(KEY), &bad_utf8),
            400,
            "invalid_json",
        ),
        case(
            "body an array",
            keyed("/v1/batch", &format!("[{}]", group("u"))),
            400,
            "invalid_body",
        ),
        case(
            "body a string",
            keyed("/v1/batch", r#""batch""#),
            400,
            "invalid_body",
        ),
        case("body null", keyed("/v1/batch", "null"), 400, "invalid_body"),
        case(
            "single body an array",
            keyed("/v1/group", "[]"),
            400,
            "invalid_body",
        ),
        // The batch envelope.
        case(
            "batch an object",
            keyed("/v1/batch", &format!(r#"{{"batch":{}}}"#, group("u"))),
            400,
            "invalid_batch",
        ),
        case(
            "batch null",
            keyed("/v1/batch", r#"{"batch":null}"#),
            400,
            "invalid_batch",
        ),
        case(
            "batch a string",
            keyed("/v1/batch", r#"{"batch":"[]"}"#),
            400,
            "invalid_batch",
        ),
        case(
            "batch a number beyond a float",
            keyed("/v1/batch", r#"{"batch":1e400}"#),
            400,
            "invalid_batch",
        ),
        case(
            "batch given twice, the last not an array",
            keyed(
                "/v1/batch",
                &format!(r#"{{"batch":[{}],"batch":true}}"#, group("u")),
            ),
            400,
            "invalid_batch",
        ),
        case(
            "missing batch",
            keyed("/v1/batch", r#"{"sentAt":"2026-01-01T00:00:00.000Z"}"#),
            400,
            "missing_batch",
        ),
        case(
            "missing batch on /v1/import",
            keyed("/v1/import", "{}"),
            400,
            "missing_batch",
        ),
        case(
            "empty batch",
            keyed("/v1/batch", r#"{"batch":[]}"#),
            400,
            "empty_batch",
        ),
        case(
            "2,501 calls",
            keyed("/v1/batch", &too_many),
            400,
            "too_many_calls",
        ),
        case(
            "batch context a string",
            keyed(
                "/v1/batch",
                &format!(r#"{{"batch":[{}],"context":"x"}}"#, group("u")),
            ),
            400,
            "invalid_context",
        ),
        case(
            "batch integrations an array",
            keyed(
                "/v1/batch",
                &format!(r#"{{"batch":[{}],"integrations":[]}}"#, group("u")),
            ),
            400,
            "invalid_integrations",
        ),
        case(
            "body writeKey a number",
            post(
                "/v1/batch",
                None,
                format!(r#"{{"batch":[{}],"writeKey":5}}"#, group("u")).as_bytes(),
            ),
            400,
            "invalid_write_key",
        ),
        // One call on /v1/group and friends.
        case(
            "group without groupId",
            keyed("/v1/group", r#"{"userId":"u"}"#),
            400,
            "missing_group_id",
        ),
        case(
            "group with null groupId",
            keyed("/v1/group", r#"{"userId":"u","groupId":null}"#),
            400,
            "missing_group_id",
        ),
        case(
            "group with empty groupId",
            keyed("/v1/group", r#"{"userId":"u","groupId":""}"#),
            400,
            "missing_group_id",
        ),
        case(
            "group without userId/anonymousId",
            keyed("/v1/group", r#"{"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "null userId",
            keyed("/v1/group", r#"{"userId":null,"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "empty userId",
            keyed("/v1/group", r#"{"userId":"","groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "empty userId, null anonymousId",
            keyed(
                "/v1/group",
                r#"{"userId":"","anonymousId":null,"groupId":"g"}"#,
            ),
            400,
            "missing_user_id",
        ),
        case(
            "userId an object",
            keyed("/v1/group", r#"{"userId":{"id":"u"},"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "traits an array",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","traits":["a"]}"#,
            ),
            400,
            "invalid_traits",
        ),
        case(
            "context a string",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","context":"ctx"}"#,
            ),
            400,
            "invalid_context",
        ),
        case(
            "integrations a number",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","integrations":1}"#,
            ),
            400,
            "invalid_integrations",
        ),
        case(
            "messageId of 100 chars",
            keyed(
                "/v1/group",
                &format!(r#"{{"userId":"u","groupId":"g","messageId":"{long_id}"}}"#),
            ),
            400,
            "invalid_message_id",
        ),
        case(
            "messageId empty",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","messageId":""}"#,
            ),
            400,
            "invalid_message_id",
        ),
        case(
            "messageId a number",
            keyed("/v1/group", r#"{"userId":"u","groupId":"g","messageId":7}"#),
            400,
            "invalid_message_id",
        ),
        case(
            "timestamp a number",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","timestamp":1700000000}"#,
            ),
            400,
            "invalid_timestamp",
        ),
        case(
            "call over 32 KB",
            keyed(
                "/v1/group",
                &format!(r#"{{"userId":"u","groupId":"g","traits":{{"big":"{huge_trait}"}}}}"#),
            ),
            400,
            "call_too_large",
        ),
        case(
            "track without event",
            keyed("/v1/track", r#"{"userId":"u"}"#),
            400,
            "missing_event",
        ),
        case(
            "alias without previousId",
            keyed("/v1/alias", r#"{"userId":"u"}"#),
            400,
            "missing_previous_id",
        ),
        // The writeKey.
        case(
            "no writeKey, no default",
            post("/v1/batch", None, valid_batch.as_bytes()),
            401,
            "missing_write_key",
        ),
        case(
            "empty body writeKey, no default",
            post(
                "/v1/batch",
                None,
                format!(r#"{{"batch":[{}],"writeKey":""}}"#, group("u")).as_bytes(),
            ),
            401,
            "missing_write_key",
        ),
        case(
            "Bearer auth",
            request(
                "POST",
                "/v1/batch",
                &[
                    "Authorization: Bearer abc".into(),
                    format!("Content-Length: {}", valid_batch.len()),
                ],
                valid_batch.as_bytes(),
            ),
            401,
            "invalid_authorization",
        ),
        // Sizes and encodings.
        case(
            "body over 1 MiB",
            post("/v1/batch", Some(KEY), &oversize),
            413,
            "body_too_large",
        ),
        case(
            "Content-Length over 1 MiB",
            request(
                "POST",
                "/v1/batch",
                &[basic_auth(KEY), format!("Content-Length: {}", LIMIT + 1)],
                valid_batch.as_bytes(),
            ),
            413,
            "body_too_large",
        ),
        case(
            "chunked body over 1 MiB",
            request(
                "POST",
                "/v1/batch",
                &[basic_auth(KEY), "Transfer-Encoding: chunked".into()],
                &chunked,
            ),
            413,
            "body_too_large",
        ),
        case(
            "gzip bomb, 50 MB of zeros",
            encoded("gzip", &bomb),
            413,
            "body_too_large",
        ),
        case(
            "gzip bomb, 512 MiB in 32 members",
            encoded("gzip", &big_bomb),
            413,
            "body_too_large",
        ),
        case(
            "brotli",
            encoded("br", valid_batch.as_bytes()),
            415,
            "unsupported_encoding",
        ),
        case(
            "deflate",
            encoded("deflate", valid_batch.as_bytes()),
            415,
            "unsupported_encoding",
        ),
        case(
            "invalid gzip bytes",
            encoded("gzip", b"this is not gzip at all"),
            400,
            "invalid_gzip",
        ),
        case(
            "truncated gzip",
            encoded("gzip", &gzip(valid_batch.as_bytes())[..20]),
            400,
            "invalid_gzip",
        ),
        // Methods and paths.
        case("GET /v1/batch", get("/v1/batch"), 405, "method_not_allowed"),
        case(
            "PUT /v1/group",
            request("PUT", "/v1/group", &["Content-Length: 0".into()], b""),
            405,
            "method_not_allowed",
        ),
        case(
            "POST /v1/nope",
            keyed("/v1/nope", &valid_batch),
            404,
            "not_found",
        ),
        case(
            "POST /v2/batch",
            keyed("/v2/batch", &valid_batch),
            404,
            "not_found",
        ),
        case("GET /", get("/"), 404, "not_found"),
        // Hostile shapes.
        case(
            "10,000 calls",
            keyed("/v1/batch", &ten_thousand),
            400,
            "too_many_calls",
        ),
        case(
            "userId an array",
            keyed("/v1/group", r#"{"userId":["u"],"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "userId a boolean",
            keyed("/v1/group", r#"{"userId":true,"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "anonymousId an object, no userId",
            keyed("/v1/group", r#"{"anonymousId":{},"groupId":"g"}"#),
            400,
            "missing_user_id",
        ),
        case(
            "groupId an object",
            keyed("/v1/group", r#"{"userId":"u","groupId":{"id":"g"}}"#),
            400,
            "missing_group_id",
        ),
        case(
            "groupId an array",
            keyed("/v1/group", r#"{"userId":"u","groupId":["g"]}"#),
            400,
            "missing_group_id",
        ),
        case(
            "groupId a boolean",
            keyed("/v1/group", r#"{"userId":"u","groupId":false}"#),
            400,
            "missing_group_id",
        ),
        case(
            "messageId of 200 chars",
            keyed(
                "/v1/group",
                &format!(
                    r#"{{"userId":"u","groupId":"g","messageId":"{}"}}"#,
                    "m".repeat(200)
                ),
            ),
            400,
            "invalid_message_id",
        ),
        case(
            "2 MB body",
            post("/v1/batch", Some(KEY), &two_mb),
            413,
            "body_too_large",
        ),
        case(
            "body longer than its Content-Length",
            request(
                "POST",
                "/v1/group",
                &[basic_auth(KEY), "Content-Length: 20".into()],
                br#"{"userId":"u","groupId":"g"} and more"#,
            ),
            400,
            "invalid_json",
        ),
        case(
            "malformed chunked body",
            request(
                "POST",
                "/v1/group",
                &[basic_auth(KEY), "Transfer-Encoding: chunked".into()],
                b"zz\r\nabc\r\n0\r\n\r\n",
            ),
            400,
            "invalid_body",
        ),
        case(
            "JSON nested 10,000 deep",
            keyed("/v1/identify", &nested),
            400,
            "too_deep",
        ),
        case(
            "traits nested 10,000 deep",
            keyed("/v1/group", &nested_traits),
            400,
            "too_deep",
        ),
        case(
            "a number beyond a 64-bit float (found by the fuzzer)",
            keyed(
                "/v1/group",
                r#"{"userId":"u","groupId":"g","traits":{"n":222.2E22220}}"#,
            ),
            400,
            "number_out_of_range",
        ),
        case(
            "Basic auth that is not base64",
            request(
                "POST",
                "/v1/group",
                &[
                    "Authorization: Basic !!!".into(),
                    "Content-Length: 2".into(),
                ],
                b"{}",
            ),
            401,
            "invalid_authorization",
        ),
    ];

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    for case in &cases {
        let response = send(&daemon, &case.request).await;
        assert_error(&response, case.status, case.code, case.name);
        if case.status == 405 {
            assert_eq!(
                response.header("Allow"),
                Some("POST"),
                "{}: Allow",
                case.name
            );
        }
    }
    // No bomb was inflated in full: the peak RSS stays far below its 512 MiB.
    let peak = peak_rss(daemon.pid());
    assert!(peak < 256 << 20, "daemon peak RSS {} MiB", peak >> 20);

    assert!(daemon.terminate().success());
    let disk = on_disk(dir.path()).await;
    assert!(disk.calls.is_empty(), "queued: {:?}", disk.call_json());
    assert!(disk.rejected.is_empty(), "rejected: {:?}", disk.rejected);
    assert_eq!(disk.dead.len(), 0, "dead letters");
}

/// A batch with good and bad calls: 200, the good ones queued in order, the bad ones in the
/// rejected store with their code and the JSON exactly as sent.
#[tokio::test]
async fn mixed_batch_queues_valid_calls_and_keeps_rejected_ones() {
    let deep = format!(
        r#"{{"type":"group","userId":"u10","groupId":"g","traits":{{"x":{}{}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let items: [(&str, Option<&str>); 12] = [
        (r#"{"type":"group","userId":"u0","groupId":"g"}"#, None),
        (
            r#"{"type":"group","userId":"u1"}"#,
            Some("missing_group_id"),
        ),
        (
            r#"{"type":"track","userId":"u2","event":"Signed Up"}"#,
            None,
        ),
        ("42", Some("invalid_call")),
        (r#"{"type":"bogus","userId":"u4"}"#, Some("invalid_type")),
        (r#"{"userId":"u5","groupId":"g"}"#, Some("missing_type")),
        (r#"{"type":"identify","userId":123}"#, None),
        (
            r#"{ "type": "group", "traits": [1, 2], "userId": "u7", "groupId": "g" }"#,
            Some("invalid_traits"),
        ),
        (
            r#"{"type":"group","userId":"u8","anonymousId":null,"groupId":42}"#,
            None,
        ),
        (
            r#"{"type":"track","userId":"u9","event":""}"#,
            Some("invalid_event"),
        ),
        // Refused on their own; their neighbours are queued all the same.
        (deep.as_str(), Some("too_deep")),
        (
            r#"{"type":"group","userId":"u11","groupId":"g","traits":{"n":1e400}}"#,
            Some("number_out_of_range"),
        ),
    ];
    let body = format!(
        r#"{{"batch":[{}],"writeKey":"KEY_mixed"}}"#,
        items
            .iter()
            .map(|(text, _)| *text)
            .collect::<Vec<_>>()
            .join(",")
    );

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let response = send(&daemon, &post("/v1/batch", None, body.as_bytes())).await;
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_json_content_type(&response, "mixed batch");
    let answer = response.json();
    assert_eq!(answer["success"], json!(true));
    assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    let rejected = answer["rejected"].as_array().expect("rejected list");
    let expected_rejected: Vec<(usize, &str)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, (_, code))| code.map(|code| (i, code)))
        .collect();
    let got: Vec<(usize, &str)> = rejected
        .iter()
        .map(|r| {
            assert_eq!(r.as_object().unwrap().len(), 3, "{r}");
            assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
            (
                r["index"].as_u64().expect("index") as usize,
                r["code"].as_str().expect("code"),
            )
        })
        .collect();
    assert_eq!(got, expected_rejected);

    assert!(daemon.terminate().success());
    let disk = on_disk(dir.path()).await;
    let queued: Vec<Value> = disk.call_json();
    let user_ids: Vec<&Value> = queued.iter().map(|c| &c["userId"]).collect();
    assert_eq!(
        user_ids,
        [&json!("u0"), &json!("u2"), &json!(123), &json!("u8")]
    );
    assert!(disk.calls.iter().all(|c| c.write_key == "KEY_mixed"));
    assert_eq!(
        queued[3]["groupId"],
        json!(42),
        "numeric groupId forwarded unchanged"
    );
    assert_eq!(queued[3].get("anonymousId"), Some(&Value::Null));

    assert_eq!(disk.rejected.len(), expected_rejected.len());
    for (record, (index, code)) in disk.rejected.iter().zip(&expected_rejected) {
        assert_eq!(record.index, *index);
        assert_eq!(record.code, *code);
        assert!(!record.message.is_empty());
        assert_eq!(record.write_key, "KEY_mixed");
        assert_eq!(
            record.call.get(),
            items[*index].0,
            "rejected call kept as sent"
        );
    }
}

/// Shapes real senders use that look odd but are valid.
#[tokio::test]
async fn odd_but_valid_calls_are_accepted() {
    let id_99 = "m".repeat(99);
    let bodies = [
        ("/v1/group", r#"{"userId":123,"groupId":456}"#.to_owned()),
        (
            "/v1/group",
            r#"{"userId":"u","anonymousId":null,"groupId":"g"}"#.to_owned(),
        ),
        (
            "/v1/group",
            r#"{"anonymousId":"a","userId":"","groupId":"g"}"#.to_owned(),
        ),
        (
            "/v1/group",
            format!(r#"{{"userId":"u","groupId":"g","messageId":"{id_99}"}}"#),
        ),
        (
            "/v1/batch",
            r#"{"batch": [{"type": "group", "userId": 7, "anonymousId": null, "groupId": 8}]}"#
                .to_owned(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--write-key", "DEFAULT_KEY"]);
    for (path, body) in &bodies {
        let response = send(&daemon, &post(path, None, body.as_bytes())).await;
        assert_eq!(
            response.status,
            200,
            "{body}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_json_content_type(&response, body);
        assert_eq!(response.body, br#"{"success":true}"#, "{body}");
    }
    assert!(daemon.terminate().success());
    let disk = on_disk(dir.path()).await;
    assert!(disk.rejected.is_empty());
    assert_eq!(disk.calls.len(), bodies.len());
    assert!(disk.calls.iter().all(|c| c.write_key == "DEFAULT_KEY"));
    let calls = disk.call_json();
    // Numbers forwarded unchanged, byte for byte.
    let first = std::str::from_utf8(&disk.calls[0].call).unwrap();
    assert!(
        first.contains(r#""userId":123"#) && first.contains(r#""groupId":456"#),
        "{first}"
    );
    assert_eq!(calls[1].get("anonymousId"), Some(&Value::Null));
    assert_eq!(calls[1]["userId"], json!("u"));
    assert_eq!(calls[2]["userId"], json!(""));
    assert_eq!(calls[3]["messageId"], json!(id_99));
    assert_eq!(calls[4]["userId"], json!(7));
    assert_eq!(calls[4]["groupId"], json!(8));
    assert_eq!(calls[4].get("anonymousId"), Some(&Value::Null));
    for call in &calls {
        assert_eq!(call["type"], json!("group"));
    }
}

/// Requests broken at the HTTP level. A body cut short (the client stops sending before its
/// Content-Length) gets the JSON 400. 100 KB of headers get 431: in one header, grouprelay's
/// JSON error; as 2,000 headers, hyper's own 431 (past its 100-header parser), which carries
/// no body, because hyper answers before any request reaches grouprelay's code.
#[tokio::test]
async fn broken_http_is_answered_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let ok = send(&daemon, &keyed("/v1/group", &group("before").to_string())).await;
    assert_eq!(ok.status, 200);

    // Body shorter than its Content-Length: the client half-closes after half of it.
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    let body = group("short").to_string();
    let head = format!(
        "POST /v1/group HTTP/1.1\r\nHost: x\r\n{}\r\nContent-Length: {}\r\n\r\n",
        basic_auth(KEY),
        body.len() * 2
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains(r#""code":"invalid_body""#), "{text}");

    // 100 KB of headers.
    let headers: Vec<String> = (0..2_000)
        .map(|i| format!("X-Filler-{i}: {}", "a".repeat(40)))
        .collect();
    let h = group("h").to_string();
    let mut with_headers = headers.clone();
    with_headers.push(basic_auth(KEY));
    with_headers.push(format!("Content-Length: {}", h.len()));
    let response = send(
        &daemon,
        &request("POST", "/v1/group", &with_headers, h.as_bytes()),
    )
    .await;
    assert_eq!(response.status, 431);
    let one_big = vec![
        format!("X-Big: {}", "a".repeat(100_000)),
        basic_auth(KEY),
        format!("Content-Length: {}", h.len()),
    ];
    let response = send(
        &daemon,
        &request("POST", "/v1/group", &one_big, h.as_bytes()),
    )
    .await;
    assert_error(&response, 431, "headers_too_large", "one 100 KB header");

    let ok = send(&daemon, &keyed("/v1/group", &group("after").to_string())).await;
    assert_eq!(ok.status, 200);
    assert!(daemon.terminate().success());
    let disk = on_disk(dir.path()).await;
    let users: Vec<Value> = disk
        .call_json()
        .iter()
        .map(|c| c["userId"].clone())
        .collect();
    assert_eq!(users, [json!("before"), json!("after")]);
}

/// A client that writes its whole request before it reads the answer (Python's
/// `http.client` and `requests` do) gets the JSON refusal, not a connection reset: for an
/// early refusal grouprelay reads and discards the rest of the body, within a bound, first.
/// 8 MiB is more than the kernel buffers between the two on loopback: without the discard,
/// the client's write fails with a broken pipe or a reset.
#[test]
fn a_client_that_writes_its_whole_body_first_gets_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let key = basic_auth(KEY);
    // What, headers, path, body size, status, code.
    type Case<'a> = (&'a str, Vec<&'a str>, &'a str, usize, u16, &'a str);
    let cases: [Case; 5] = [
        (
            "2 MB, over the body limit",
            vec![&key],
            "/v1/batch",
            2 << 20,
            413,
            "body_too_large",
        ),
        (
            "8 MiB, over the body limit",
            vec![&key],
            "/v1/batch",
            8 << 20,
            413,
            "body_too_large",
        ),
        (
            "bad authorization",
            vec!["Authorization: Bearer x"],
            "/v1/batch",
            8 << 20,
            401,
            "invalid_authorization",
        ),
        (
            "an encoding not taken",
            vec![&key, "Content-Encoding: br"],
            "/v1/batch",
            8 << 20,
            415,
            "unsupported_encoding",
        ),
        (
            "no such endpoint",
            vec![&key],
            "/v1/nope",
            8 << 20,
            404,
            "not_found",
        ),
    ];
    for (what, headers, path, size, status, code) in cases {
        let mut all = vec![format!("Content-Length: {size}")];
        all.extend(headers.iter().map(|h| (*h).to_owned()));
        let request = request("POST", path, &all, &vec![b' '; size]);
        let (head, json) =
            write_all_then_read(daemon.addr, &request).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {head}"
        );
        assert_eq!(json["code"], code, "{what}: {json}");
    }
}

/// Writes the whole request on a blocking socket, and only then reads the answer to its
/// end: its head, and its body as JSON.
fn write_all_then_read(
    addr: std::net::SocketAddr,
    request: &[u8],
) -> Result<(String, Value), String> {
    use std::io::Read;

    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request)
        .map_err(|e| format!("the request could not be written: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("the answer could not be read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no whole answer: {answer}"))?;
    let json = serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body}"))?;
    Ok((head.to_owned(), json))
}

/// A client that sends `Expect: 100-continue` waits for leave before its body: an early
/// refusal answers it at once, without asking for the body it will refuse.
#[test]
fn an_early_refusal_does_not_ask_for_the_body() {
    use std::io::Read;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let head = request(
        "POST",
        "/v1/batch",
        &[
            basic_auth(KEY),
            format!("Content-Length: {}", 8 << 20),
            "Expect: 100-continue".to_owned(),
        ],
        b"",
    );
    let mut stream = std::net::TcpStream::connect(daemon.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(&head).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}
