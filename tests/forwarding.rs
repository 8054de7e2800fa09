//! Forwarding upstream, tested with the real daemon and a real HTTP stand-in for Segment.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{group, message_ids, on_disk, post, Daemon, Recorded, Reply, Upstream};
use serde_json::{json, Value};

/// Daemon flags for fast tests: short flush interval and retry cap.
fn fast<'a>(upstream: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--upstream",
        upstream,
        "--flush-interval-ms",
        "20",
        "--retry-max-interval-ms",
        "200",
        "--drain-timeout-ms",
        "300",
    ];
    args.extend_from_slice(extra);
    args
}

/// A batch of `n` calls with messageIds `{key_tag}-{from}` on.
fn batch(key_tag: &str, from: usize, n: usize) -> Vec<u8> {
    common::batch((from..from + n).map(|i| {
        let id = format!("{key_tag}-{i}");
        group(&id)
            .id(id)
            .traits(json!({"name": "Acme", "plan": null, "total billed": i}))
    }))
    .into_bytes()
}

/// The sequence number in a messageId like `A-17`.
fn seq(message_id: &str) -> usize {
    message_id.rsplit('-').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_upstream_gets_every_call_once_in_order_per_write_key() {
    every_call_once_in_order("lean").await;
}

/// The same with the allocator keeping large blocks (`--memory-profile throughput`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throughput_memory_profile_delivers_alike() {
    every_call_once_in_order("throughput").await;
}

/// 600 calls under two writeKeys, delivered once each, in order per key, then removed.
async fn every_call_once_in_order(memory_profile: &str) {
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &fast(
            &url,
            &[
                "--max-batch-events",
                "40",
                "--memory-profile",
                memory_profile,
            ],
        ),
    );
    for round in 0..10 {
        for (key, tag) in [("KEY_A", "A"), ("KEY_B", "B")] {
            let response = daemon
                .send(&post("/v1/batch", Some(key), &batch(tag, round * 30, 30)))
                .await;
            assert_eq!(response.status, 200);
        }
    }
    upstream.wait_delivered(600).await;
    assert_eq!(daemon.terminate().code(), Some(0));

    let requests = upstream.requests();
    let delivered = upstream.delivered();
    let ids = message_ids(&delivered);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 600, "every call exactly once");
    assert_eq!(unique.len(), 600);
    let mut last_seq: HashMap<String, usize> = HashMap::new();
    for request in &requests {
        assert!(
            request.calls().len() <= 40,
            "batch of {}",
            request.calls().len()
        );
        assert!(request.body_len < 500_000);
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["content-encoding"], "gzip");
        let agent = request.headers["user-agent"].to_str().unwrap();
        assert!(agent.starts_with("grouprelay/"), "{agent}");
        assert!(request.body["sentAt"].as_str().unwrap().ends_with('Z'));
        let key = request.write_key();
        let tag = &key[4..];
        for call in request.calls() {
            let id = call["messageId"].as_str().unwrap();
            assert!(id.starts_with(tag), "a call of {id} sent with {key}");
            assert!(call.get("writeKey").is_none() && call.get("sentAt").is_none());
            assert_eq!(call["traits"]["plan"], Value::Null);
            // Order per writeKey: each call's sequence is above the previous one's.
            let previous = last_seq.insert(key.clone(), seq(id));
            assert!(
                previous.is_none_or(|p| p < seq(id)),
                "{id} after {previous:?}"
            );
        }
    }
    let disk = on_disk(dir.path()).await;
    assert!(
        disk.calls.is_empty(),
        "delivered calls are removed from the queue"
    );
    assert!(disk.dead.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_outage_is_retried_with_a_fresh_sent_at() {
    let attempt = Arc::new(AtomicUsize::new(0));
    let counter = attempt.clone();
    let upstream = Upstream::start(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::Status(500),
        1 => Reply::Status(503),
        2 => Reply::WithHeaders(429, vec![("retry-after", "1".into())]),
        3 => Reply::Stall,
        4 => Reply::Status(408),
        _ => Reply::Status(200),
    })
    .await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        dir.path(),
        &fast(
            &url,
            &["--upstream-timeout-ms", "300", "--upstream-gzip", "false"],
        ),
    );
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", 0, 5)))
        .await;
    assert_eq!(response.status, 200);
    upstream.wait_delivered(5).await;
    let log = daemon.log_text();
    daemon.terminate();

    let requests = upstream.requests();
    assert_eq!(requests.len(), 6, "five failures, then the delivery");
    assert!(requests
        .iter()
        .all(|r| r.headers.get("content-encoding").is_none()));
    let first = &requests[0];
    for retry in &requests[1..] {
        assert_eq!(message_ids(retry.calls()), message_ids(first.calls()));
        let stamps = |r: &Recorded| {
            r.calls()
                .iter()
                .map(|c| c["timestamp"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(stamps(retry), stamps(first), "timestamps never change");
    }
    let sent_at: HashSet<_> = requests
        .iter()
        .map(|r| r.body["sentAt"].to_string())
        .collect();
    assert_eq!(
        sent_at.len(),
        requests.len(),
        "sentAt is fresh on every attempt"
    );
    for cause in ["500", "503", "429", "no answer within 300 ms", "408"] {
        assert!(log.contains(cause), "the retry log names {cause}:\n{log}");
    }
    assert!(!log.contains("KEY_A"), "the writeKey is never logged");
    assert_eq!(upstream.delivered().len(), 5);
    assert!(on_disk(dir.path()).await.calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_out_a_refused_connection() {
    // A port with nothing listening: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{port}");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", 0, 7)))
        .await;
    assert_eq!(response.status, 200);
    daemon.wait_for_log("retrying").await;
    let upstream = Upstream::start_on(port, |_| Reply::Status(200)).await;
    upstream.wait_delivered(7).await;
    daemon.terminate();
    assert!(message_ids(&upstream.delivered())
        .iter()
        .all(|id| id.starts_with("A-")));
    assert!(on_disk(dir.path()).await.calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_poison_call_is_dead_lettered() {
    let upstream = Upstream::start(|request: &Recorded| {
        if request.calls().iter().any(|c| c["userId"] == "poison") {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    let mut body: Value = serde_json::from_slice(&batch("A", 0, 9)).unwrap();
    body["batch"][4]["userId"] = json!("poison");
    let response = daemon
        .send(&post(
            "/v1/batch",
            Some("KEY_A"),
            &serde_json::to_vec(&body).unwrap(),
        ))
        .await;
    assert_eq!(response.status, 200);
    // Calls behind the poison one are not blocked.
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", 9, 3)))
        .await;
    assert_eq!(response.status, 200);
    upstream.wait_delivered(11).await;
    daemon.wait_for_log("moved to the dead-letter store").await;
    daemon.terminate();

    let ids = message_ids(&upstream.delivered());
    assert_eq!(ids.len(), 11);
    assert!(!ids.contains(&"A-4".to_owned()));
    let disk = on_disk(dir.path()).await;
    assert!(disk.calls.is_empty());
    assert_eq!(disk.dead.len(), 1);
    let dead = &disk.dead[0];
    assert_eq!(dead.reason, "rejected_by_upstream");
    assert_eq!(dead.status, Some(400));
    assert!(dead.response.contains("scripted"));
    assert_eq!(dead.write_key, "KEY_A");
    assert!(dead.attempts >= 1);
    let call: Value = serde_json::from_str(dead.call.get()).unwrap();
    assert_eq!(call["messageId"], "A-4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_an_outage_loses_nothing_and_sends_nothing_twice() {
    let down = Upstream::start(|_| Reply::Status(503)).await;
    let url = down.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    for (key, tag) in [("KEY_A", "A"), ("KEY_B", "B")] {
        let response = daemon
            .send(&post("/v1/batch", Some(key), &batch(tag, 0, 25)))
            .await;
        assert_eq!(response.status, 200);
    }
    daemon.wait_for_log("retrying").await;
    assert_eq!(
        daemon.terminate().code(),
        Some(0),
        "a drain that times out still exits 0"
    );
    assert_eq!(
        on_disk(dir.path()).await.calls.len(),
        50,
        "everything stays queued"
    );
    down.stop();

    let up = Upstream::start(|_| Reply::Status(200)).await;
    let url = up.url();
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    up.wait_delivered(50).await;
    daemon.terminate();
    let ids = message_ids(&up.delivered());
    assert_eq!(ids.len(), 50);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 50);
    assert!(on_disk(dir.path()).await.calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_write_key_backing_off_does_not_hold_up_another() {
    let upstream = Upstream::start(|request: &Recorded| {
        if request.write_key() == "KEY_A" {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &fast(&url, &["--max-batch-events", "10"]));
    // Far more of A than its lane holds, then B behind it in the queue.
    for i in 0..10 {
        let response = daemon
            .send(&post("/v1/batch", Some("KEY_A"), &batch("A", i * 50, 50)))
            .await;
        assert_eq!(response.status, 200);
    }
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_B"), &batch("B", 0, 30)))
        .await;
    assert_eq!(response.status, 200);
    upstream.wait_delivered(30).await;
    daemon.terminate();
    let ids = message_ids(&upstream.delivered());
    assert!(ids.iter().all(|id| id.starts_with("B-")));
    assert_eq!(
        on_disk(dir.path()).await.calls.len(),
        500,
        "A's calls wait in the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_under_500_kb() {
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    // 60 calls of about 30 KB: 1.8 MB in all.
    let filler = "x".repeat(30_000);
    for i in 0..60 {
        let call = group("u")
            .untyped()
            .id(format!("A-{i}"))
            .traits(json!({ "blob": filler }));
        let response = daemon
            .send(&post("/v1/group", Some("KEY_A"), &call.bytes()))
            .await;
        assert_eq!(response.status, 200);
    }
    upstream.wait_delivered(60).await;
    daemon.terminate();
    let requests = upstream.requests();
    assert!(requests.len() >= 4);
    assert!(
        requests.iter().all(|r| r.body_len < 500_000),
        "a batch over 500 KB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_max_age_are_dead_lettered_as_expired_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    {
        use grouprelay::queue::{Queue, QueueOptions};
        let queue = Queue::open(QueueOptions::new(dir.path())).unwrap();
        let old_ms = grouprelay::clock::unix_ms(std::time::SystemTime::now()) - 2 * 86_400_000;
        let call = group("u").id("old-1").bytes();
        queue.append("KEY_A", old_ms, &[call], &[]).await.unwrap();
        queue.close().await.unwrap();
    }
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let daemon = Daemon::start(dir.path(), &fast(&url, &["--max-age", "1d"]));
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", 0, 2)))
        .await;
    assert_eq!(response.status, 200);
    upstream.wait_delivered(2).await;
    daemon.wait_for_log("expired").await;
    daemon.terminate();
    assert!(!message_ids(&upstream.delivered()).contains(&"old-1".to_owned()));
    let disk = on_disk(dir.path()).await;
    assert_eq!(disk.dead.len(), 1);
    assert_eq!(disk.dead[0].reason, "expired");
    assert!(disk.calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_partial_batches_before_exit() {
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    // A flush interval far beyond the test: only the drain can send these calls.
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--upstream",
            &url,
            "--flush-interval-ms",
            "3600000",
            "--drain-timeout-ms",
            "30000",
        ],
    );
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", 0, 7)))
        .await;
    assert_eq!(response.status, 200);
    assert!(upstream.requests().is_empty());
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(message_ids(&upstream.delivered()).len(), 7);
    assert!(on_disk(dir.path()).await.calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_takes_calls_again_once_upstream_drains_it() {
    let (upstream, healthy) = Upstream::switched(false).await;
    let url = upstream.url();
    let dir = tempfile::tempdir().unwrap();
    // Each delivered batch is logged at DEBUG, after its removal from the queue.
    let daemon = Daemon::start_with_env(
        dir.path(),
        &fast(&url, &["--max-queue-bytes", "20000"]),
        &[("RUST_LOG", "info,grouprelay::forward=debug")],
    );
    let mut accepted = 0;
    let refusal = loop {
        let response = daemon
            .send(&post("/v1/batch", Some("KEY_A"), &batch("A", accepted, 1)))
            .await;
        if response.status != 200 {
            break response;
        }
        accepted += 1;
        assert!(accepted < 1000, "the limit was never reached");
    };
    assert_eq!(refusal.status, 429);
    assert_eq!(refusal.json()["code"], "queue_full");
    assert!(refusal.header("retry-after").is_some());
    healthy.store(true, Ordering::SeqCst);
    upstream.wait_delivered(accepted).await;
    // The daemon logs each delivered batch after removing it from the queue.
    let batches = upstream
        .requests()
        .iter()
        .filter(|r| r.answered == 200)
        .count();
    daemon.wait_for_log_count("batch delivered", batches).await;
    let response = daemon
        .send(&post("/v1/batch", Some("KEY_A"), &batch("A", accepted, 1)))
        .await;
    assert_eq!(
        response.status, 200,
        "room again once delivered calls are removed"
    );
    upstream.wait_delivered(accepted + 1).await;
    daemon.terminate();
    let ids = message_ids(&upstream.delivered());
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), accepted + 1);
}

/// An outage is told in two lines of its own, whatever the retries: when upstream becomes
/// unreachable (with the calls waiting) and when it is back (after how long). Retry lines
/// name their lane by the writeKey's fingerprint, never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_told_when_it_starts_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, healthy) = Upstream::switched(false).await;
    let url = upstream.url();
    let key = "KEY_outage_lines";
    let daemon = Daemon::start(dir.path(), &fast(&url, &[]));
    let body = group("u").id("m-outage").to_string();
    let answer = daemon
        .send(&post("/v1/group", Some(key), body.as_bytes()))
        .await;
    assert_eq!(answer.status, 200);
    daemon.wait_for_log_count("retrying", 3).await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    upstream.wait_delivered(1).await;
    daemon.wait_for_log("upstream back after").await;
    let log = daemon.log_text();
    let unreachable: Vec<_> = log
        .lines()
        .filter(|l| l.contains("upstream unreachable since"))
        .collect();
    assert_eq!(unreachable.len(), 1, "{log}");
    assert!(unreachable[0].contains("(1 call waiting)"), "{log}");
    assert!(!log.contains(key), "the writeKey is in the log:\n{log}");
    let retry = log.lines().find(|l| l.contains("retrying")).unwrap();
    let lane = retry
        .split("lane=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        lane.len() == 8 && lane.chars().all(|c| c.is_ascii_hexdigit()),
        "{retry}"
    );
    daemon.terminate();
}

/// Past a backoff of 5 s, a failing lane waits no longer than that and sends one call as a
/// check, so upstream's return is noticed within seconds even with the default 60 s cap;
/// once a check is taken, the rest follows in full batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_is_checked_with_one_call_every_few_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, healthy) = Upstream::switched(false).await;
    let url = upstream.url();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--upstream",
            &url,
            "--flush-interval-ms",
            "20",
            "--retry-max-interval-ms",
            "60000",
        ],
    );
    let calls: Vec<String> = (0..20)
        .map(|n| group("u").id(format!("c{n}")).to_string())
        .collect();
    let body = format!(r#"{{"batch":[{}]}}"#, calls.join(","));
    let answer = daemon
        .send(&post("/v1/batch", Some("KEY_check"), body.as_bytes()))
        .await;
    assert_eq!(answer.status, 200);
    // The backoff passes 5 s after about six failures: then the waits stop growing.
    daemon.wait_for_log("delay_ms=5000").await;
    let checks = upstream.requests().len();
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    upstream.wait_delivered(20).await;
    let requests = upstream.requests();
    assert_eq!(
        requests[checks].calls().len(),
        1,
        "the next request is a check"
    );
    assert_eq!(
        requests.last().unwrap().calls().len(),
        19,
        "then the rest in one batch"
    );
    let log = daemon.log_text();
    let longest = log
        .lines()
        .filter_map(|l| l.split("delay_ms=").nth(1))
        .filter_map(|d| d.split_whitespace().next()?.parse::<u64>().ok())
        .max();
    assert_eq!(longest, Some(5000), "{log}");
    daemon.terminate();
}
