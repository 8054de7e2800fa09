//! Restarts as an operator makes them: a clean stop duplicates nothing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{batch, numbered, post, Daemon, Reply, Upstream};

const KEY: &str = "KEY_restarts";

/// Every `SIGTERM` reaches its drain deadline with batches in flight (upstream takes each at
/// once and answers 600 ms later, the drain allows 100 ms): those batches are waited for and
/// settled, not abandoned and sent again at the next start. Over three stops, no call
/// reaches upstream twice, and every call does reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_during_a_drain_send_no_call_twice() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::After(Duration::from_millis(600), 200)).await;
    let url = upstream.url();
    let args = |drain: &'static str| {
        vec![
            "--upstream",
            &url,
            "--drain-timeout-ms",
            drain,
            "--max-batch-events",
            "50",
            "--flush-interval-ms",
            "10",
            "--upstream-concurrency",
            "2",
        ]
    };
    let mut sent = 0;
    for round in 0..3 {
        let daemon = Daemon::start(dir.path(), &args("100"));
        let before = upstream.requests().len();
        for _ in 0..3 {
            let calls: Vec<_> = (sent..sent + 100).map(numbered).collect();
            sent += 100;
            let answer = daemon
                .send(&post("/v1/batch", Some(KEY), batch(calls).as_bytes()))
                .await;
            assert_eq!(answer.status, 200, "round {round}");
        }
        // A batch is in flight (upstream has it, and answers in 600 ms): stop now.
        upstream
            .wait_until("a batch in flight", |requests| requests.len() > before)
            .await;
        assert!(daemon.terminate().success(), "round {round}");
    }
    let daemon = Daemon::start(dir.path(), &args("30000"));
    upstream.wait_delivered(sent).await;
    assert!(daemon.terminate().success());

    let mut times: HashMap<String, usize> = HashMap::new();
    for call in upstream.delivered() {
        *times
            .entry(call["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, &n)| n > 1).collect();
    assert_eq!(times.len(), sent, "every call reaches upstream");
    assert!(
        twice.is_empty(),
        "{} calls were sent twice, e.g. {:?}",
        twice.len(),
        twice.first()
    );
}
