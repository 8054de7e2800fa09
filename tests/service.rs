//! Running as a service: the systemd unit verifies, the example configuration names every
//! setting, systemd hears READY/STATUS/WATCHDOG/STOPPING, `/ready` says why it is not, and
//! logs can be JSON.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{get, group, post, run_output, run_to_exit, Daemon, BIN};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `systemd-analyze` is needed; CI has it (and must run this), elsewhere the test says so.
fn systemd_analyze() -> Option<&'static str> {
    let found = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return None;
    }
    Some("systemd-analyze")
}

#[test]
fn the_unit_file_verifies() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = std::fs::read_to_string(repo("packaging/systemd/grouprelay.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=/usr/bin/grouprelay validate",
        "StateDirectory=grouprelay",
        "RuntimeDirectory=grouprelay",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    let socket = std::fs::read_to_string(repo("packaging/systemd/grouprelay.socket")).unwrap();
    for needed in [
        "ListenStream=127.0.0.1:8788",
        "ListenStream=/run/grouprelay/grouprelay.sock",
        "SocketMode=0660",
    ] {
        assert!(socket.contains(needed), "the socket unit lacks {needed}");
    }
    // verify checks that the commands exist: point them at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("grouprelay.service");
    std::fs::write(&copy, unit.replace("/usr/bin/grouprelay", BIN)).unwrap();
    std::fs::write(dir.path().join("grouprelay.socket"), socket).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .arg(dir.path().join("grouprelay.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warns: {stderr}"
    );
}

#[test]
fn the_example_configuration_names_every_setting_and_validates() {
    let example = repo("packaging/grouprelay.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    // It names the operators' group the package makes: make it here as the package would
    // (tests run as root in CI).
    let has_group = |name: &str| {
        std::process::Command::new("getent")
            .args(["group", name])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !has_group("grouprelay-admin") {
        let _ = std::process::Command::new("groupadd")
            .args(["--system", "grouprelay-admin"])
            .output();
    }
    assert!(
        has_group("grouprelay-admin"),
        "the grouprelay-admin group is missing and cannot be made (run as root)"
    );
    let (status, out) = run_to_exit(&["validate", "--config", example.to_str().unwrap()]);
    assert!(status.success(), "the example as shipped is valid: {out}");

    // Every flag of `grouprelay run` is a key of the file, set or shown commented out.
    let help = run_output(&["run", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !["help", "config", ""].contains(w))
        .collect();
    assert!(flags.len() > 15, "flags found: {flags:?}");
    for flag in flags {
        let key = format!("{flag} = ");
        assert!(
            text.lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&key)),
            "packaging/grouprelay.toml does not show {flag}"
        );
    }

    // The defaults it shows are valid values too.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting)
                if setting.contains(" = ")
                    && !setting.starts_with("write-key")
                    && !setting.starts_with("allowed-write-keys")
                    // An example path: no such file here.
                    && !setting.starts_with("upstream-ca-file") =>
            {
                setting.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.toml");
    std::fs::write(&all, uncommented).unwrap();
    let (status, stderr) = run_to_exit(&["validate", "--config", all.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
}

#[tokio::test]
async fn systemd_hears_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let systemd = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start_with_env(
        &data,
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let next = || async {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), systemd.recv(&mut buf))
            .await
            .expect("a notification within 20 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=0 calls queued")),
        "{ready}"
    );
    // Ready means ready: the listener answers.
    assert_eq!(daemon.send(&get("/health")).await.status, 200);
    let watchdog = next().await;
    assert_eq!(watchdog, "WATCHDOG=1");

    let pid = daemon.pid();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = loop {
        let message = next().await;
        if message != "WATCHDOG=1" {
            break message;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(
        stopping
            .lines()
            .any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")),
        "{stopping}"
    );
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn ready_says_why_it_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &["--max-queue-bytes", "2000", "--write-key", "K"],
    );
    let ready = daemon.send(&get("/ready")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    let call = &group("u").pad(190).bytes();
    // Fill the queue to its limit.
    let mut filled = false;
    for _ in 0..100 {
        if daemon.send(&post("/v1/group", None, call)).await.status == 429 {
            filled = true;
            break;
        }
    }
    assert!(filled, "the queue never filled");
    let ready = daemon.send(&get("/ready")).await;
    assert_eq!(ready.status, 503);
    let body = ready.json();
    assert_eq!(body["status"], "not_ready");
    assert!(body["reason"].as_str().unwrap().contains("full"), "{body}");
    // Live all the same.
    assert_eq!(daemon.send(&get("/health")).await.status, 200);
    daemon.terminate();
}

#[tokio::test]
async fn logs_can_be_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--log-format", "json"]);
    assert_eq!(daemon.send(&get("/health")).await.status, 200);
    let log = daemon.log_text();
    assert!(daemon.terminate().success());
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
}

/// `GET /metrics` after known traffic: the counters say exactly what happened, and no
/// writeKey appears.
#[tokio::test]
async fn metrics_count_known_traffic() {
    let mut answered = 0;
    let upstream = common::Upstream::start(move |_| {
        answered += 1;
        if answered == 1 {
            common::Reply::Status(500)
        } else {
            common::Reply::Status(200)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &["--upstream", &upstream.url(), "--flush-interval-ms", "5"],
    );
    const KEY: &str = "METRICSKEY0123456789";
    for i in 0..3 {
        let call = group(format!("u{i}")).untyped();
        let response = daemon
            .send(&post("/v1/group", Some(KEY), &call.bytes()))
            .await;
        assert_eq!(response.status, 200);
    }
    let batch = br#"{"batch":[{"type":"group","userId":"a","groupId":"g"},{"type":"group","userId":"b"},{"type":"group","userId":"c","groupId":"g"}]}"#;
    assert_eq!(
        daemon
            .send(&post("/v1/batch", Some(KEY), batch))
            .await
            .status,
        200
    );
    assert_eq!(
        daemon
            .send(&post("/v1/group", Some(KEY), b"{nope"))
            .await
            .status,
        400
    );
    upstream.wait_delivered(5).await;
    // The stand-in has answered; the daemon settles the calls a moment later. Nothing
    // announces that but /stats itself, so look again until it does (bounded).
    let settled = async {
        while daemon.send(&get("/stats")).await.json()["delivered"] != 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), settled)
        .await
        .expect("the delivered calls settled");
    let response = daemon.send(&get("/metrics")).await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/openmetrics-text")));
    let text = String::from_utf8(response.body).unwrap();
    assert!(!text.contains(KEY), "a writeKey in the metrics");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(value("grouprelay_calls_accepted_total"), 5.0);
    assert_eq!(
        value(r#"grouprelay_calls_rejected_total{code="missing_group_id"}"#),
        1.0
    );
    assert_eq!(
        value(r#"grouprelay_calls_rejected_total{code="invalid_json"}"#),
        1.0
    );
    assert_eq!(
        value(r#"grouprelay_http_requests_total{path="/v1/group",status="200"}"#),
        3.0
    );
    assert_eq!(
        value(r#"grouprelay_http_requests_total{path="/v1/group",status="400"}"#),
        1.0
    );
    assert_eq!(
        value(r#"grouprelay_http_requests_total{path="/v1/batch",status="200"}"#),
        1.0
    );
    assert_eq!(value("grouprelay_ingest_duration_seconds_count"), 5.0);
    assert_eq!(value("grouprelay_calls_delivered_total"), 5.0);
    assert_eq!(value("grouprelay_upstream_retries_total"), 1.0);
    assert_eq!(
        value(r#"grouprelay_upstream_responses_total{class="5xx"}"#),
        1.0
    );
    assert!(value(r#"grouprelay_upstream_responses_total{class="2xx"}"#) >= 1.0);
    assert!(value("grouprelay_upstream_batches_total") >= 2.0);
    assert!(value("grouprelay_queue_flush_duration_seconds_count") >= 4.0);
    for gauge in [
        "grouprelay_queue_calls",
        "grouprelay_queue_stored_bytes",
        "grouprelay_queue_oldest_call_age_seconds",
    ] {
        assert!(value(gauge) >= 0.0);
    }
    assert!(daemon.terminate().success());
}
