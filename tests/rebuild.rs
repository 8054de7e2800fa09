//! Rebuilds (`src/queue/rebuild.rs`): the queue's database copied into a fresh one and switched
//! in gives the disk back and changes nothing else; a crash at any step of the switch loses
//! nothing acknowledged, and the next start completes it.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{batch, call, on_disk, open_again, post, stopped_queue, Books, Daemon, Upstream};
use grouprelay::queue::{
    files_bytes, DeadCause, DeadReason, Durability, Queue, QueueOptions, DB_DIR,
};
use grouprelay::spec::{RejectedCall, Violation};

/// What a rebuild must leave as it was: every count, every pending call with its id, every
/// dead letter with its id, every rejected call, the byte count.
#[derive(Debug, PartialEq)]
struct Contents {
    counts: grouprelay::queue::Counts,
    pending: Vec<(u64, Vec<u8>)>,
    dead: Vec<(u64, String)>,
    rejected: usize,
    stored_bytes: u64,
}

fn contents(queue: &Queue) -> Contents {
    Contents {
        counts: queue.counts(),
        pending: queue
            .read(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.record.call))
            .collect(),
        dead: queue
            .dead_entries()
            .unwrap()
            .into_iter()
            .map(|(id, d)| (id, d.call.get().to_owned()))
            .collect(),
        rejected: queue.rejected().unwrap().len(),
        stored_bytes: queue.stored_bytes(),
    }
}

fn big_call(i: usize) -> Vec<u8> {
    call(format!("c{i}"))
        .traits(serde_json::json!({ "blob": "x".repeat(2_000) }))
        .bytes()
}

fn rejected_call() -> RejectedCall {
    RejectedCall {
        index: 1,
        violation: Violation {
            code: "missing_group_id",
            message: "groupId is required".into(),
        },
        raw: br#"{"type":"group","userId":"u"}"#.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_gives_the_disk_back_and_keeps_every_call_id_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        // Only the rebuilds this test asks for.
        rebuild_above_bytes: 0,
        durability: Durability::Fsync,
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options.clone()).unwrap();
    for request in 0..100 {
        let calls: Vec<Vec<u8>> = (0..50).map(|i| big_call(request * 50 + i)).collect();
        let rejected = if request == 7 {
            vec![rejected_call()]
        } else {
            vec![]
        };
        queue.append("K", 1, &calls, &rejected).await.unwrap();
    }
    // Most delivered, some dead-lettered, the rest pending, scattered over chunks. A chunk
    // leaves only once every call in it has, and is copied whole: one call in 250 pending
    // keeps at most a tenth of the chunks (each holds about 25 of these 2 KB calls).
    let all = queue.read(0, usize::MAX).unwrap();
    let (dead, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|c| c.id % 97 == 3);
    let (pending, delivered): (Vec<_>, Vec<_>) = rest.into_iter().partition(|c| c.id % 250 == 5);
    queue.remove(&delivered).unwrap();
    let reason = DeadReason::new(DeadCause::RejectedByUpstream, Some(400), String::new(), 1);
    queue.dead_letter(&dead, &reason).unwrap();
    let db = dir.path().join(DB_DIR);
    let before = contents(&queue);
    assert_eq!(before.pending.len(), pending.len());
    let files_before = files_bytes(&db);

    let rebuilt = queue.rebuild().await.unwrap();
    let files_after = files_bytes(&db);
    assert_eq!(
        contents(&queue),
        before,
        "a rebuild changed what the queue holds"
    );
    assert_eq!(queue.rebuilds(), 1);
    assert!(
        files_after * 4 < files_before,
        "the files took {files_before} bytes before the rebuild and {files_after} after"
    );
    assert_eq!(rebuilt.files_after, files_after);
    assert!(!dir.path().join("queue.next").exists() && !dir.path().join("queue.old").exists());

    // New calls take the next ids; a new dead letter a key past every old one.
    queue.append("K", 2, &[big_call(9_999)], &[]).await.unwrap();
    let new = queue.read(before.counts.accepted, 10).unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].id, before.counts.accepted);
    queue.dead_letter(&new, &reason).unwrap();
    let dead_ids: Vec<u64> = queue
        .dead_entries()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    let old_max = before.dead.iter().map(|(id, _)| *id).max().unwrap();
    assert_eq!(
        dead_ids.len(),
        before.dead.len() + 1,
        "a dead letter was overwritten"
    );
    assert!(dead_ids.iter().filter(|&&id| id > old_max).count() == 1);

    // And all of it is what a restart finds.
    let after = contents(&queue);
    queue.close().await.unwrap();
    drop(queue);
    let queue = open_again(options).await.unwrap();
    assert_eq!(contents(&queue), after);
    let books = Books::of(&queue);
    books.balance().unwrap();
    books.bytes_agree().unwrap();
    queue.close().await.unwrap();
}

/// Appends and settling go on while rebuilds run: every call appended is read back once,
/// and the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_settling_during_rebuilds_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        rebuild_above_bytes: 0,
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    queue
                        .append("K", 1, &[big_call(w * 1_000 + i)], &[])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            let mut from = 0;
            while seen.len() < 800 {
                let appended = queue.appended();
                let calls = queue.read(from, 100).unwrap();
                if calls.is_empty() {
                    appended.await;
                    continue;
                }
                from = calls.last().unwrap().id + 1;
                for c in &calls {
                    assert!(seen.insert(c.id, c.record.call.clone()).is_none());
                }
                queue.remove(&calls).unwrap();
            }
            seen
        })
    };
    let rebuilds = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                queue.rebuild().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    rebuilds.await.unwrap();
    let seen = reader.await.unwrap();
    let ids: HashSet<String> = seen
        .values()
        .map(|c| serde_json::from_slice::<serde_json::Value>(c).unwrap()["messageId"].to_string())
        .collect();
    assert_eq!(ids.len(), 800, "every call read back once");
    let books = Books::of(&queue);
    books.balance().unwrap();
    assert_eq!(books.counts.delivered, 800);
    assert_eq!(queue.rebuilds(), 5);
    queue.close().await.unwrap();
}

fn daemon_args<'a>(upstream: &'a str, rebuild_above: &'a str) -> Vec<&'a str> {
    vec![
        "--write-key",
        "K",
        "--upstream",
        upstream,
        "--flush-interval-ms",
        "5",
        "--retry-max-interval-ms",
        "200",
        "--rebuild-above-bytes",
        rebuild_above,
    ]
}

/// What a first run left in a data dir: calls still pending, and the dead letters' ids.
struct Filled {
    pending: HashSet<String>,
    dead: Vec<u64>,
    files: u64,
}

/// A data dir filled by a first run that never rebuilds: big calls delivered (so sled's
/// files grew), calls dead-lettered, a rejected call, and calls still pending with upstream
/// down.
async fn filled_data_dir(data_dir: &Path, upstream: &Upstream, up: &AtomicBool) -> Filled {
    let mut args = daemon_args(&upstream.url(), "0")
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    args.extend(["--drain-timeout-ms".into(), "0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start(data_dir, &args);
    let big = |id: &String| call(id).traits(serde_json::json!({ "blob": "x".repeat(28_000) }));
    let mut delivered = HashSet::new();
    for r in 0..60 {
        let ids: Vec<String> = (0..5).map(|i| format!("d{r}-{i}")).collect();
        let body = batch(ids.iter().map(big));
        let sent = daemon.send(&post("/v1/batch", None, body.as_bytes())).await;
        assert_eq!(sent.status, 200);
        delivered.extend(ids);
    }
    let body = batch((0..6).map(|i| call(format!("bad-{i}"))));
    assert_eq!(
        daemon
            .send(&post("/v1/batch", None, body.as_bytes()))
            .await
            .status,
        200
    );
    let with_rejected = format!(
        r#"{{"batch":[{},{{"type":"group","userId":"u"}}]}}"#,
        call("r0")
    );
    let sent = daemon
        .send(&post("/v1/batch", None, with_rejected.as_bytes()))
        .await;
    assert_eq!(sent.status, 200);
    delivered.insert("r0".into());
    upstream.wait_delivered_ids(&delivered).await;
    daemon
        .wait_for_log_count("moved to the dead-letter store", 6)
        .await;
    // Upstream down: what follows stays pending.
    up.store(false, Ordering::SeqCst);
    let pending: HashSet<String> = (0..30).map(|i| format!("p{i}")).collect();
    for id in &pending {
        let sent = daemon
            .send(&post("/v1/group", None, &call(id).bytes()))
            .await;
        assert_eq!(sent.status, 200);
    }
    assert!(daemon.terminate().success());
    let dead = stopped_queue(data_dir, |q| {
        q.dead_entries()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    })
    .await;
    Filled {
        pending,
        dead,
        files: files_bytes(&data_dir.join(DB_DIR)),
    }
}

/// A run whose rebuild at start aborts at `failpoint`, then a run that finishes: every
/// pending call is delivered, the dead letters and the rejected call are the same, the books
/// balance, nothing of the rebuild is left, and the files shrank.
async fn a_crash_at(failpoint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (upstream, up) = Upstream::switched_refusing_bad(true).await;
    let filled = filled_data_dir(&data_dir, &upstream, &up).await;
    assert_eq!(filled.dead.len(), 6);
    assert!(
        filled.files > 2_000_000,
        "the first run left {} bytes of files",
        filled.files
    );

    // The files take far more than the few calls stored: the start rebuilds, and aborts.
    let url = upstream.url();
    let args = daemon_args(&url, "1");
    let env = [("GROUPRELAY_FAILPOINTS", failpoint)];
    let crashed = {
        let (data_dir, args, env) = (
            data_dir.clone(),
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            env.map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Daemon::try_start_with_env(&data_dir, &args, &env)
        })
        .await
        .unwrap()
    };
    let reached = format!("failpoint {failpoint} reached");
    match crashed {
        Ok(daemon) => {
            let log = daemon.log.clone();
            let status = daemon.wait_exit().await;
            assert!(!status.success(), "{status}");
            tokio::task::spawn_blocking(move || log.wait_for("the daemon", &reached, 1))
                .await
                .unwrap();
        }
        Err(log) => assert!(
            log.contains(&reached),
            "the rebuild did not reach {failpoint}:\n{log}"
        ),
    }

    up.store(true, Ordering::SeqCst);
    let daemon = Daemon::start(&data_dir, &daemon_args(&url, "1"));
    upstream.wait_delivered_ids(&filled.pending).await;
    assert!(daemon.terminate().success());
    assert!(
        !data_dir.join("queue.next").exists(),
        "queue.next left behind"
    );
    assert!(
        !data_dir.join("queue.old").exists(),
        "queue.old left behind"
    );
    let files = files_bytes(&data_dir.join(DB_DIR));
    assert!(
        files * 2 < filled.files,
        "the files took {} bytes before and {files} after",
        filled.files
    );
    let books = common::books(&data_dir).await;
    books.balance().unwrap();
    books.bytes_agree().unwrap();
    assert_eq!(books.pending, 0);
    let left = on_disk(&data_dir).await;
    assert_eq!(left.rejected.len(), 1, "the rejected call");
    let dead = stopped_queue(&data_dir, |q| {
        q.dead_entries()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<u64>>()
    })
    .await;
    assert_eq!(dead, filled.dead, "the dead letters and their ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_the_copy_whole_but_not_switched_loses_nothing() {
    a_crash_at("rebuild-before-switch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_two_renames_loses_nothing() {
    a_crash_at("rebuild-between-renames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_switch_loses_nothing() {
    a_crash_at("rebuild-after-switch").await;
}
