//! The crash loop: writers send numbered calls through both endpoints while the daemon is
//! killed with SIGKILL at random moments and the upstream stand-in fails some batches. Every
//! acknowledged call must reach upstream, and the durable counters must add up after every
//! crash.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::{
    acknowledged_until_killed, batch, books, call, delivered_ids, post, Daemon, Reply, Rng,
    Upstream,
};

const ROUNDS: usize = 5;
const WRITERS: usize = 8;
/// Calls per `/v1/batch` request (the other requests are single `/v1/group` calls).
const BATCH: usize = 5;

/// Checks the counters of a stopped daemon's queue against what the queue holds, and
/// returns them.
async fn check_books(data_dir: &Path, round: usize) -> grouprelay::queue::Counts {
    let books = books(data_dir).await;
    // The byte count a restart starts from is what the database holds (a crash leaves no
    // clean-close mark, so it is counted again; a count carried over would drift).
    for check in [books.balance(), books.bytes_agree()] {
        check.unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    books.counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_calls_survive_a_crash_loop_and_the_books_balance() {
    let seed = common::test_seed();
    eprintln!("crash loop seed: {seed} (GROUPRELAY_TEST_SEED={seed} replays the choices)");
    let mut rng = Rng(seed);
    let mut upstream_rng = Rng(seed.rotate_left(17));
    // About one batch in four fails with a 500 or a 503, to be retried.
    let upstream = Upstream::start(move |_| match upstream_rng.below(8) {
        0 => Reply::Status(500),
        1 => Reply::Status(503),
        _ => Reply::Status(200),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--write-key",
        "K",
        "--upstream",
        &upstream.url(),
        "--flush-interval-ms",
        "5",
        "--max-batch-events",
        "40",
        "--retry-max-interval-ms",
        "1000",
    ];
    let mut acknowledged: HashSet<String> = HashSet::new();
    for round in 0..ROUNDS {
        let daemon = Daemon::start(dir.path(), &args);
        let kill_after = 50 + rng.below(400) as usize;
        let acked = acknowledged_until_killed(daemon, WRITERS, kill_after, move |w, i| {
            // Alternate single calls and batches.
            if i % 2 == 0 {
                let id = format!("r{round}-w{w}-{i}");
                let request = post("/v1/group", None, &call(&id).bytes());
                (vec![id], request)
            } else {
                let ids: Vec<String> = (0..BATCH)
                    .map(|j| format!("r{round}-w{w}-{i}-{j}"))
                    .collect();
                let request = post("/v1/batch", None, batch(ids.iter().map(call)).as_bytes());
                (ids, request)
            }
        })
        .await;
        acknowledged.extend(acked);
        check_books(dir.path(), round).await;
    }

    // A last run, left alone, delivers the rest: the acknowledged calls, and those whose
    // answer a kill cut off but that were queued all the same (`accepted` counts both).
    let daemon = Daemon::start(dir.path(), &args);
    let accepted_before = daemon.send(&common::get("/stats")).await.json()["accepted"]
        .as_u64()
        .unwrap() as usize;
    upstream.wait_delivered_ids(&acknowledged).await;
    upstream
        .wait_until("every accepted call delivered", |requests| {
            delivered_ids(requests).len() >= accepted_before
        })
        .await;
    assert!(daemon.terminate().success());
    let counts = check_books(dir.path(), ROUNDS).await;
    let accepted = counts.accepted;

    let mut times_delivered: HashMap<String, usize> = HashMap::new();
    for call in upstream.delivered() {
        *times_delivered
            .entry(call["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // Conservation: every call the queue ever accepted reached upstream (acknowledged ones
    // and those whose answer the kill cut off alike), and nothing else did.
    assert_eq!(
        times_delivered.len() as u64,
        accepted,
        "distinct calls delivered vs calls accepted: {counts:?}"
    );
    let duplicates: usize = times_delivered.values().map(|n| n - 1).sum();
    // Duplicates come only from batches in flight at a kill: at most the concurrency (2)
    // times the batch size (40) per kill.
    assert!(
        duplicates <= ROUNDS * 2 * 40,
        "{duplicates} duplicate deliveries"
    );
    eprintln!(
        "crash loop: {} acknowledged, {accepted} accepted, {duplicates} delivered twice",
        acknowledged.len()
    );
}
