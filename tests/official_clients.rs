//! End to end with a real official client: segment-analytics-python (installed by `.ci/run`
//! into a virtual environment) sends Group calls to grouprelay, which forwards them to an
//! upstream stand-in. Every call must arrive intact.

mod common;

use std::path::PathBuf;

use common::{on_disk, Daemon, Reply, Upstream};
use serde_json::json;

/// The Python with segment-analytics-python: `$GROUPRELAY_TEST_PYTHON`, else the venv that
/// `.ci/run` makes. Outside CI a missing client skips the test with a message; in CI it fails.
fn python() -> Option<PathBuf> {
    let path = std::env::var_os("GROUPRELAY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run installs segment-analytics-python there",
        path.display()
    );
    eprintln!(
        "skipping: no segment-analytics-python at {} (run .ci/run once)",
        path.display()
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_group_calls_arrive_upstream_intact() {
    let Some(python) = python() else { return };
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &["--upstream", &url, "--flush-interval-ms", "20"],
    );
    let host = format!("http://{}", daemon.addr);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/send_groups.py");
    for gzip in ["0", "1"] {
        let out = tokio::process::Command::new(&python)
            .args([script, &host, "PY_KEY", "120", gzip])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "python client failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    upstream.wait_delivered(240).await;
    daemon.terminate();

    for request in upstream.requests() {
        assert_eq!(request.write_key(), "PY_KEY");
    }
    let delivered = upstream.delivered();
    assert_eq!(delivered.len(), 240);
    for call in &delivered {
        let i: u64 = call["messageId"].as_str().unwrap()[3..].parse().unwrap();
        assert_eq!(call["type"], "group");
        assert_eq!(call["userId"], format!("user-{i}"));
        assert_eq!(call["groupId"], format!("group-{}", i % 7));
        assert_eq!(
            call["traits"],
            json!({"name": "Acme", "plan": null, "total billed": i, "employees": 329})
        );
        // Python sends "anonymousId": null beside the userId; it is kept as sent.
        assert_eq!(call["anonymousId"], serde_json::Value::Null);
        assert_eq!(call["context"]["library"]["name"], "analytics-python");
        assert!(call["timestamp"].is_string());
        assert!(call.get("writeKey").is_none() && call.get("sentAt").is_none());
    }
    assert!(on_disk(dir.path()).await.calls.is_empty());
}
