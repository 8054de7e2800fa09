//! Failure points (`src/failpoint.rs`): the daemon aborts exactly between "written" and
//! "flushed", or between "upstream said 2xx" and "removed from the queue"; neither loses a
//! call, and the durable counters still balance.

mod common;

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::{batch, call, message_ids, post, Daemon, Reply, Upstream};
use grouprelay::queue::Counts;

/// The books of a stopped daemon's queue, checked to balance: its counters, and the calls
/// it holds.
async fn books(data_dir: &Path) -> (Counts, usize) {
    let books = common::books(data_dir).await;
    books.balance().unwrap();
    (books.counts, books.pending as usize)
}

/// Delivers what is queued to a stand-in that takes everything, and returns the distinct
/// messageIds it received. The stop drains: the stand-in records a batch before its answer
/// reaches the daemon, so a stop without a drain could abandon that batch unsettled.
async fn deliver_all(data_dir: &Path, upstream: &Upstream, expected: &HashSet<String>) {
    let daemon = Daemon::start(
        data_dir,
        &[
            "--upstream",
            &upstream.url(),
            "--flush-interval-ms",
            "5",
            "--drain-timeout-ms",
            "10000",
        ],
    );
    upstream.wait_delivered_ids(expected).await;
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn a_crash_between_written_and_flushed_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_env(
        dir.path(),
        &["--write-key", "K"],
        &[("GROUPRELAY_FAILPOINTS", "queue-after-write=3")],
    );
    let mut acknowledged = HashSet::new();
    for id in ["a1", "a2"] {
        let response = daemon
            .send(&post("/v1/group", None, &call(id).bytes()))
            .await;
        assert_eq!(response.status, 200);
        acknowledged.insert(id.to_owned());
    }
    // The third write reaches the failpoint: the process aborts before answering.
    let stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let answer = common::exchange(stream, &post("/v1/group", None, &call("a3").bytes())).await;
    assert!(
        answer.is_err(),
        "the aborted request got an answer: {answer:?}"
    );
    let status = daemon.wait_exit().await;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");

    let (counts, _) = books(dir.path()).await;
    // The unanswered call may or may not have survived; the answered ones must have.
    assert!((2..=3).contains(&counts.accepted), "{counts:?}");
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    deliver_all(dir.path(), &upstream, &acknowledged).await;
    let (counts, pending) = books(dir.path()).await;
    assert_eq!(pending, 0);
    assert_eq!(upstream.delivered_ids().len() as u64, counts.accepted);
}

/// A panic while a request writes everyone's calls (inside sled, say) fails the requests of
/// that round; later requests are answered (503: the writer's state is no longer trusted)
/// instead of waiting for a writer that is gone, and what was acknowledged stays.
#[tokio::test]
async fn a_panic_in_the_queue_write_fails_only_its_round() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_env(
        dir.path(),
        &["--write-key", "K"],
        &[("GROUPRELAY_FAILPOINTS", "queue-write-panics=2")],
    );
    let first = daemon
        .send(&post("/v1/group", None, &call("p1").bytes()))
        .await;
    assert_eq!(first.status, 200);
    // The second write panics in this request's task: no 200 for it.
    let stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let answer = common::exchange(stream, &post("/v1/group", None, &call("p2").bytes())).await;
    assert!(
        answer.as_ref().map_or(true, |a| a.status != 200),
        "the panicked write was acknowledged: {answer:?}"
    );
    let third = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        daemon.send(&post("/v1/group", None, &call("p3").bytes())),
    )
    .await
    .expect("the request after the panic waits for a writer that is gone");
    assert_eq!(third.status, 503, "{third:?}");
    let health = daemon.send(&common::get("/health")).await;
    assert_eq!(health.status, 200);
    // Not ready, so that an operator (or a probe) sees it needs a restart.
    let ready = daemon.send(&common::get("/ready")).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(daemon.terminate().success());
    // A restart reads the state back from disk and accepts again.
    let daemon = Daemon::start(dir.path(), &["--write-key", "K"]);
    let fourth = daemon
        .send(&post("/v1/group", None, &call("p4").bytes()))
        .await;
    assert_eq!(fourth.status, 200);
    assert!(daemon.terminate().success());
    let (counts, pending) = books(dir.path()).await;
    assert_eq!(counts.accepted, 2, "{counts:?}");
    assert_eq!(pending, 2);
}

#[tokio::test]
async fn a_crash_between_delivered_and_removed_resends_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(|_| Reply::Status(200)).await;
    let ids: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let batch = batch(ids.iter().map(call));
    let daemon = Daemon::start_with_env(
        dir.path(),
        &["--write-key", "K", "--upstream", &upstream.url()],
        &[("GROUPRELAY_FAILPOINTS", "forward-after-delivered")],
    );
    let response = daemon
        .send(&post("/v1/batch", None, batch.as_bytes()))
        .await;
    assert_eq!(response.status, 200);
    // Upstream takes the batch; the daemon aborts before removing it from the queue.
    let status = daemon.wait_exit().await;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    assert_eq!(upstream.delivered_ids().len(), 10);
    let (counts, pending) = books(dir.path()).await;
    assert_eq!((counts.accepted, counts.delivered, pending), (10, 0, 10));

    // After the restart the same calls go again (upstream dedupes by messageId).
    let daemon = Daemon::start(
        dir.path(),
        &["--write-key", "K", "--upstream", &upstream.url()],
    );
    upstream.wait_delivered(20).await;
    assert!(daemon.terminate().success());
    let again = message_ids(&upstream.delivered()[10..]);
    assert_eq!(again, ids, "the same calls, once more, in order");
    let (counts, pending) = books(dir.path()).await;
    assert_eq!((counts.delivered, pending), (10, 0));
}
