//! Security and hostile clients: the writeKey allow-list, writeKeys kept out of logs and
//! answers, slow clients cut off, and many idle connections not starving new ones.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{get, group, post, run_to_exit, Daemon, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn group_call(id: &str) -> String {
    group(format!("u-{id}")).id(format!("m-{id}")).to_string()
}

#[tokio::test]
async fn only_allowed_write_keys_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--allowed-write-keys", "key-a,key-b"]);
    let ok = daemon
        .send(&post(
            "/v1/group",
            Some("key-a"),
            group_call("1").as_bytes(),
        ))
        .await;
    assert_eq!(ok.status, 200);
    let refused = daemon
        .send(&post(
            "/v1/group",
            Some("key-c"),
            group_call("2").as_bytes(),
        ))
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["code"], "write_key_not_allowed");
    // A key in the body is held to the same list.
    let body_key = format!(r#"{{"writeKey":"key-c","batch":[{}]}}"#, group_call("3"));
    let refused = daemon
        .send(&post("/v1/batch", None, body_key.as_bytes()))
        .await;
    assert_eq!(refused.status, 403);
    let stats = daemon.send(&get("/stats")).await.json();
    assert_eq!(stats["accepted"], 1, "{stats}");
    // Every dead-letter cause is listed, with 0 where there is none.
    for cause in ["rejected_by_upstream", "expired", "quarantined"] {
        assert_eq!(stats["dead"][cause], 0, "{stats}");
    }
    daemon.terminate();

    // A default key outside the list is a configuration error.
    let (status, stderr) = run_to_exit(&[
        "validate",
        "--write-key",
        "key-z",
        "--allowed-write-keys",
        "key-a",
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--write-key"), "{stderr}");
}

/// A full run (accepted, refused, malformed, rejected-in-batch, retried, dead-lettered
/// calls) at debug level: none of the writeKeys used, nor their Basic encodings, appears in
/// any log line or any answer.
#[tokio::test]
async fn write_keys_never_appear_in_logs_or_answers() {
    const BASIC: &str = "SECRETKEYbasic0001";
    const BODY: &str = "SECRETKEYbody0002";
    const DEFAULT: &str = "SECRETKEYdefault0003";
    const REFUSED: &str = "SECRETKEYrefused0004";
    let mut answered = 0;
    let upstream = Upstream::start(move |request| {
        answered += 1;
        if answered == 1 {
            Reply::Status(500)
        } else if request.calls().iter().any(|c| c["userId"] == "poison") {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let allowed = format!("{BASIC},{BODY},{DEFAULT}");
    let daemon = Daemon::start_with_env(
        dir.path(),
        &[
            "--upstream",
            &upstream.url(),
            "--write-key",
            DEFAULT,
            "--allowed-write-keys",
            &allowed,
            "--flush-interval-ms",
            "20",
        ],
        &[("RUST_LOG", "debug")],
    );
    let mut answers = Vec::new();
    let body_key_batch = format!(
        r#"{{"writeKey":"{BODY}","batch":[{},{{"type":"group","groupId":"g"}}]}}"#,
        group_call("body")
    );
    let poison = group("poison").id("m-poison").to_string();
    for (request, status) in [
        (
            post("/v1/group", Some(BASIC), group_call("basic").as_bytes()),
            200,
        ),
        (post("/v1/batch", None, body_key_batch.as_bytes()), 200),
        (
            post("/v1/group", None, group_call("default").as_bytes()),
            200,
        ),
        (post("/v1/group", Some(BASIC), poison.as_bytes()), 200),
        (
            post("/v1/group", Some(REFUSED), group_call("refused").as_bytes()),
            403,
        ),
        (post("/v1/group", Some(BASIC), b"{not json"), 400),
        (post("/v1/group", Some(BASIC), br#"{"type":"group"}"#), 400),
    ] {
        let response = daemon.send(&request).await;
        assert_eq!(
            response.status,
            status,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        answers.push(String::from_utf8_lossy(&response.body).into_owned());
    }
    upstream.wait_delivered(3).await;
    daemon.wait_for_log("moved to the dead-letter store").await;
    let stats = daemon.send(&get("/stats")).await;
    answers.push(String::from_utf8_lossy(&stats.body).into_owned());
    let log = daemon.log_text();
    assert!(daemon.terminate().success());

    let engine = base64::engine::general_purpose::STANDARD;
    for key in [BASIC, BODY, DEFAULT, REFUSED] {
        for form in [
            key.to_owned(),
            engine.encode(format!("{key}:")),
            engine.encode(key),
        ] {
            assert!(!log.contains(&form), "the log holds {form}:\n{log}");
            for answer in &answers {
                assert!(!answer.contains(&form), "an answer holds {form}: {answer}");
            }
        }
    }
    // The run did exercise the paths it claims to (retry, dead letter, rejection).
    assert!(log.contains("retrying"), "{log}");
    assert!(answers[1].contains("rejected"), "{}", answers[1]);
}

#[tokio::test]
async fn a_client_slow_to_send_headers_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--header-read-timeout-ms", "300"]);
    let mut slow = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    slow.write_all(b"POST /v1/group HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    // One header byte every 50 ms, never finishing: the server must close the connection.
    let cut_off = async {
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                read = slow.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    // hyper may answer 408 before closing; read on to the close.
                    Ok(_) => continue,
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if slow.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), cut_off)
        .await
        .expect("a slow client was never cut off");

    // An idle keep-alive connection is closed by the same timeout.
    let mut idle = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let closed = async {
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let seen = tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("an idle keep-alive connection was never closed");
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // Others are served all along.
    let ok = daemon
        .send(&post("/v1/group", Some("key"), group_call("1").as_bytes()))
        .await;
    assert_eq!(ok.status, 200);
    daemon.terminate();
}

#[tokio::test]
async fn two_thousand_idle_connections_do_not_stop_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    raise_open_files_limit();
    let daemon = Daemon::start(dir.path(), &[]);
    let mut idle = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        idle.push(std::net::TcpStream::connect(daemon.addr).expect("connect an idle client"));
    }
    let ok = daemon
        .send(&post("/v1/group", Some("key"), group_call("1").as_bytes()))
        .await;
    assert_eq!(ok.status, 200);
    let stats = daemon.send(&get("/stats")).await.json();
    assert_eq!(stats["accepted"], 1);
    drop(idle);
    daemon.terminate();
}

/// This test process holds 2,000 sockets: lift its soft limit (often 1,024) to the hard one.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 4_100,
        "the hard open-files limit ({}) is too low for this test",
        limit.rlim_cur
    );
}
