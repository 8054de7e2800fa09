//! Power loss: the real binary on the power-cut filesystem (`powercut/`), cut at seeded moments
//! while 8 writers send calls over TCP and the Unix socket; then a "reboot" on the image the
//! cut left. Every call answered 200 in `fsync` mode must come back: delivered upstream, or
//! dead-lettered if upstream refuses it, with the books balanced.
//!
//! Each cut is one of six scenarios: the first seconds after a first start on an empty data
//! dir; steady load with upstream down; a restart (sled's recovery and snapshot); a drain
//! (deliveries and removals); dead-lettering; a rebuild of the database, cut at one of its
//! steps. Each cut's image is one of the power-cut filesystem's variations (every unsynced
//! write lost, a random subset of unsynced blocks kept, the last kept write torn), chosen by
//! the cut's seed.
//!
//! `GROUPRELAY_TEST_SEED` replays a run (the seed is printed, and named in every failure);
//! `GROUPRELAY_POWER_CUTS=N` runs N cuts per scenario instead of [`DEFAULT_CUTS`].
//!
//! The harness is shown to catch loss: the same cuts in `interval` mode, in `fsync` mode
//! with the failpoint that skips the `fdatasync`, and a rebuild that skips its syncs, must
//! report lost calls.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{batch, post, stopped_queue, Books, Daemon, Group, HangGuard, Rng, Upstream};
use powercut::{PowerCut, Variation};
use tokio::time::Instant;

/// Cuts per scenario in a plain `cargo test`: six scenarios, 36 cuts.
const DEFAULT_CUTS: u64 = 6;
const WRITERS: usize = 8;
/// Calls in a small batch request.
const BATCH: usize = 5;
/// Calls in a big batch request; each carries [`BIG_TRAIT`] bytes of traits, so that sled
/// writes leaves big enough for its blob files: in a database with 512 KiB log segments
/// (see [`legacy_database`]); with 2 MiB ones the queue's leaves stay under the threshold.
const BIG_BATCH: usize = 4;
const BIG_TRAIT: usize = 28_000;
/// How long the drain after the reboot may take to deliver everything.
const DRAIN_MS: &str = "60000";
/// How long one cut may take before it counts as a hang (one takes 1-10 s, and each of its
/// bounded waits fails the cut after 60 s). Past it, the cut's processes are described and
/// killed, and the test fails with that diagnosis rather than holding CI.
const CUT_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// A first start on an empty data dir, cut within its first moments (during sled's
    /// first open, or among the first answers).
    FirstStart,
    /// Upstream down, calls piling up.
    Steady,
    /// A run, a kill or a clean stop, a restart (sled recovers and writes its snapshot), and
    /// the cut soon after the restart.
    Restart,
    /// Upstream up: calls are delivered and removed as they come.
    Drain,
    /// Upstream refuses some calls for good (400): they are dead-lettered.
    DeadLetter,
    /// A rebuild of the queue's database (`src/queue/rebuild.rs`), cut at one of its steps:
    /// a first run grows sled's files and leaves calls pending with upstream down; the next
    /// start rebuilds, a failpoint stops it at a seeded step (the copy whole, between the
    /// renames, after the switch), and the power is cut there.
    Rebuild,
}

/// How the daemon runs before the cut.
#[derive(Debug, Clone, Copy)]
struct Mode {
    durability: &'static str,
    failpoints: Option<&'static str>,
    /// The image's variation; `None`: chosen by the cut's seed.
    variation: Option<Variation>,
    /// `interval` mode's flush period.
    sync_interval_ms: &'static str,
    /// Whether writers send big batches too (blob files; the patched sled syncs its log when
    /// it removes one, which would hide a missing fdatasync from the tests that look for it).
    big_calls: bool,
    /// The rebuild scenario's step to cut at (a failpoint's name); `None`: chosen by the
    /// cut's seed.
    rebuild_step: Option<&'static str>,
}

/// The steps of a rebuild the power can be cut at.
const REBUILD_STEPS: [&str; 3] = [
    "rebuild-before-switch",
    "rebuild-between-renames",
    "rebuild-after-switch",
];

const FSYNC: Mode = Mode {
    durability: "fsync",
    failpoints: None,
    variation: None,
    sync_interval_ms: "500",
    big_calls: true,
    rebuild_step: None,
};

/// What one cut showed.
struct Outcome {
    label: String,
    acknowledged: usize,
    /// Acknowledged calls neither delivered nor dead-lettered after the reboot.
    lost: Vec<String>,
    /// The daemon would not start on the image (its log), or another check failed.
    broken: Option<String>,
}

fn cuts_per_scenario() -> u64 {
    std::env::var("GROUPRELAY_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CUTS)
}

/// A call whose id says whether upstream will refuse it (`bad-`).
fn call(id: &str, big: bool) -> Group {
    let call = common::call(id);
    match big {
        true => call.traits(serde_json::json!({ "blob": "x".repeat(BIG_TRAIT) })),
        false => call,
    }
}

/// What the writers send besides single calls and small batches.
#[derive(Debug, Clone, Copy)]
struct Mix {
    big_calls: bool,
    /// Calls upstream refuses for good (`bad-` ids).
    bad_calls: bool,
}

/// The writers: 8 tasks, half over TCP and half over the Unix socket, each sending single
/// calls, small batches and big batches until told to stop or the daemon stops answering.
struct Writers {
    acknowledged: Arc<Mutex<Vec<String>>>,
    answered: tokio::sync::watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(daemon: &Daemon, unix: &Path, tag: &str, seed: u64, mix: Mix) -> Writers {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let (answered_tx, answered) = tokio::sync::watch::channel(0u64);
        let answered_tx = Arc::new(answered_tx);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (acknowledged, answered_tx, stop) =
                    (acknowledged.clone(), answered_tx.clone(), stop.clone());
                let (addr, unix) = (daemon.addr, unix.to_owned());
                let tag = format!("{tag}-w{w}");
                let mut rng = Rng(seed ^ (w as u64).wrapping_mul(0x5851_F42D_4C95_7F2D));
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let (count, big) = match rng.below(10) {
                            0..=5 => (1, false),
                            6..=8 => (BATCH, false),
                            _ if mix.big_calls => (BIG_BATCH, true),
                            _ => (BATCH, false),
                        };
                        let ids: Vec<String> = (0..count)
                            .map(|j| {
                                let bad = mix.bad_calls && rng.below(8) == 0;
                                format!("{}{tag}-{i}-{j}", if bad { "bad-" } else { "" })
                            })
                            .collect();
                        let request = if count == 1 {
                            post("/v1/group", None, &call(&ids[0], big).bytes())
                        } else {
                            let body = batch(ids.iter().map(|id| call(id, big)));
                            post("/v1/batch", None, body.as_bytes())
                        };
                        let answer = if w % 2 == 0 {
                            match tokio::net::TcpStream::connect(addr).await {
                                Ok(stream) => common::exchange(stream, &request).await,
                                Err(e) => Err(e),
                            }
                        } else {
                            match tokio::net::UnixStream::connect(&unix).await {
                                Ok(stream) => common::exchange(stream, &request).await,
                                Err(e) => Err(e),
                            }
                        };
                        match answer {
                            Ok(response) if response.status == 200 => {
                                acknowledged.lock().unwrap().extend(ids);
                                answered_tx.send_modify(|n| *n += 1);
                            }
                            // The cut froze the filesystem (503 storage_error), or the daemon
                            // died mid-request: not acknowledged, and nothing more to send.
                            Ok(_) | Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        Writers {
            acknowledged,
            answered,
            stop,
            tasks,
        }
    }

    /// Waits until `n` requests have been answered 200.
    async fn wait_answered(&mut self, n: u64, label: &str) {
        let reached = tokio::time::timeout(
            Duration::from_secs(60),
            self.answered.wait_for(|&count| count >= n),
        )
        .await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "{label}: the writers never reached {n} answers"
        );
    }

    /// Stops the writers and returns the ids of every call answered 200.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("writer task");
        }
        let acknowledged = self.acknowledged.lock().unwrap();
        acknowledged.clone()
    }
}

/// Starts the daemon without blocking the runtime.
async fn start_daemon(
    data_dir: &Path,
    args: &[String],
    env: &[(String, String)],
) -> tokio::task::JoinHandle<Result<Daemon, String>> {
    let (data_dir, args, env) = (data_dir.to_owned(), args.to_vec(), env.to_vec());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Daemon::try_start_with_env(&data_dir, &args, &env)
    })
}

async fn stop_daemon(daemon: Daemon) {
    tokio::task::spawn_blocking(move || daemon.kill())
        .await
        .expect("kill");
}

/// One cut in `work`, an empty directory: run the scenario on a fresh power-cut filesystem,
/// cut, reboot on the image, and see what came back.
async fn run_cut(scenario: Scenario, mode: Mode, seed: u64, label: &str, work: &Path) -> Outcome {
    let mut rng = Rng(seed);
    let (backing, mountpoint, image, remount) = (
        work.join("backing"),
        work.join("mnt"),
        work.join("image"),
        work.join("mnt-after"),
    );
    for dir in [&backing, &mountpoint, &remount] {
        std::fs::create_dir(dir).unwrap();
    }
    let unix = work.join("grouprelay.sock");

    // The stand-in upstream: up or down (switched up for the reboot); in the dead-letter
    // scenario it refuses, for good, any batch holding a `bad-` call.
    let (upstream, upstream_up) = Upstream::switched_refusing_bad(match scenario {
        Scenario::Steady => false,
        Scenario::Drain | Scenario::DeadLetter | Scenario::Rebuild => true,
        Scenario::FirstStart | Scenario::Restart => rng.below(2) == 0,
    })
    .await;

    let args = |drain_ms: &str| -> Vec<String> {
        [
            "--write-key",
            "K",
            "--upstream",
            &upstream.url(),
            "--listen",
            &format!("unix:{}", unix.display()),
            "--durability",
            mode.durability,
            "--sync-interval-ms",
            mode.sync_interval_ms,
            "--flush-interval-ms",
            "5",
            "--max-batch-events",
            "40",
            "--retry-max-interval-ms",
            "200",
            "--drain-timeout-ms",
            drain_ms,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let env: Vec<(String, String)> = mode
        .failpoints
        .map(|f| vec![("GROUPRELAY_FAILPOINTS".to_owned(), f.to_owned())])
        .unwrap_or_default();
    let mix = Mix {
        big_calls: mode.big_calls,
        bad_calls: scenario == Scenario::DeadLetter,
    };

    let fs = PowerCut::mount(&backing, &mountpoint).expect("mount the power-cut filesystem");
    let data_dir = mountpoint.join("data");
    let mut acknowledged: Vec<String> = Vec::new();
    // Half the cuts with big calls (by seed) run on a database as grouprelay created them
    // before 2026-12-03: the only kind whose leaves of big calls go to blob files, and the
    // kind a rebuild turns into a new one.
    if mix.big_calls && scenario != Scenario::FirstStart && seed % 2 == 0 {
        legacy_database(&data_dir);
    }

    if scenario == Scenario::Restart {
        // A first run under load, ended by a kill or a clean stop; the cut comes after the
        // restart below.
        let daemon = start_daemon(&data_dir, &args("0"), &env)
            .await
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{label}: the first run did not start: {e}"));
        let mut writers = Writers::start(&daemon, &unix, &format!("{label}-a"), rng.next(), mix);
        writers.wait_answered(20 + rng.below(200), label).await;
        let clean = rng.below(2) == 0;
        let daemon = tokio::task::spawn_blocking(move || {
            if clean {
                assert!(daemon.terminate().success());
            } else {
                daemon.kill();
            }
        });
        daemon.await.unwrap();
        acknowledged.extend(writers.finish().await);
    }

    if scenario == Scenario::Rebuild {
        let (filled, cut) = fill_for_rebuild(
            &data_dir,
            &unix,
            &upstream,
            &upstream_up,
            &args,
            &mut rng,
            label,
        )
        .await;
        acknowledged.extend(filled);
        let step = mode
            .rebuild_step
            .unwrap_or(REBUILD_STEPS[rng.below(3) as usize]);
        let mut cut_args = args("0");
        cut_args.extend(["--rebuild-above-bytes".into(), "1".into()]);
        let mut cut_env = env.clone();
        let points = [mode.failpoints, Some(step)].into_iter().flatten();
        cut_env.push((
            "GROUPRELAY_FAILPOINTS".into(),
            points.collect::<Vec<_>>().join(","),
        ));
        let small = Mix {
            big_calls: false,
            bad_calls: false,
        };
        let stopped = stopped_at_failpoint(
            Launch {
                data_dir: &data_dir,
                unix: &unix,
                args: &cut_args,
                env: &cut_env,
            },
            step,
            small,
            cut,
            label,
        )
        .await;
        acknowledged.extend(stopped.acknowledged);
        if let Some(broken) = stopped.broken {
            fs.unmount().expect("unmount");
            return Outcome {
                label: label.to_owned(),
                acknowledged: acknowledged.len(),
                lost: Vec::new(),
                broken: Some(broken),
            };
        }
    }

    // The run the cut lands in: cut after a seeded delay from the start (first start and
    // restart: possibly inside sled's open), or after a seeded number of answers; the
    // rebuild's cut comes where its run stopped, above.
    let cut_after = match scenario {
        Scenario::FirstStart => Err(Duration::from_millis(rng.below(1500))),
        Scenario::Restart => Err(Duration::from_millis(rng.below(800))),
        Scenario::Steady | Scenario::Drain | Scenario::DeadLetter => Ok(50 + rng.below(400)),
        // Its run has stopped already, at the failpoint.
        Scenario::Rebuild => Ok(0),
    };
    let started_at = Instant::now();
    let mut starting = match scenario {
        Scenario::Rebuild => tokio::spawn(async { Err("not started".to_owned()) }),
        _ => start_daemon(&data_dir, &args("0"), &env).await,
    };
    let (daemon, writers) = match cut_after {
        _ if scenario == Scenario::Rebuild => (None, None),
        Ok(answers) => {
            let daemon = (&mut starting)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{label}: the daemon did not start: {e}"));
            let mut writers = Writers::start(&daemon, &unix, label, rng.next(), mix);
            writers.wait_answered(answers, label).await;
            (Some(daemon), Some(writers))
        }
        Err(delay) => {
            let deadline = started_at + delay;
            tokio::select! {
                started = &mut starting => {
                    let daemon = started
                        .unwrap()
                        .unwrap_or_else(|e| panic!("{label}: the daemon did not start: {e}"));
                    let writers = Writers::start(&daemon, &unix, label, rng.next(), mix);
                    tokio::time::sleep_until(deadline).await;
                    (Some(daemon), Some(writers))
                }
                _ = tokio::time::sleep_until(deadline) => (None, None),
            }
        }
    };

    // The power cut: the filesystem freezes, and the image is what a disk could hold.
    let cut_seed = rng.next();
    let report = match mode.variation {
        Some(variation) => fs.cut_with(variation, cut_seed, &image),
        None => fs.cut(cut_seed, &image),
    }
    .unwrap_or_else(|e| panic!("{label}: cut: {e}"));
    let label = format!("{label} ({report})");
    match daemon {
        Some(daemon) => stop_daemon(daemon).await,
        // Still starting when the cut came: it fails on the frozen filesystem, or starts
        // and is killed.
        None => {
            if let Ok(daemon) = starting.await.unwrap() {
                stop_daemon(daemon).await;
            }
        }
    }
    if let Some(writers) = writers {
        acknowledged.extend(writers.finish().await);
    }
    fs.unmount().expect("unmount");

    // The reboot: a fresh mount of the image, grouprelay on it with upstream up; a clean
    // stop drains the queue.
    upstream_up.store(true, Ordering::SeqCst);
    let fs = PowerCut::mount(&image, &remount).expect("mount the image");
    let data_dir = remount.join("data");
    let outcome = |lost: Vec<String>, broken: Option<String>| Outcome {
        label: label.clone(),
        acknowledged: acknowledged.len(),
        lost,
        broken,
    };
    let daemon = match start_daemon(&data_dir, &args(DRAIN_MS), &[])
        .await
        .await
        .unwrap()
    {
        Ok(daemon) => daemon,
        Err(log) => {
            let _ = fs.unmount();
            return outcome(
                acknowledged.clone(),
                Some(format!("grouprelay did not start after the cut: {log}")),
            );
        }
    };
    let stats = daemon.send(&common::get("/stats")).await.json();
    let count = |key: &str| stats[key].as_u64().unwrap_or(u64::MAX);
    let mut broken = None;
    if count("accepted") != count("delivered") + count("dead_total") + count("pending") {
        broken = Some(format!("/stats does not balance after the reboot: {stats}"));
    }
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    if !status.success() && broken.is_none() {
        broken = Some(format!("the drain after the reboot ended with {status}"));
    }

    // What came back: delivered (a 2xx from upstream, before the cut or after) or kept as a
    // dead letter. And the books: counters that balance, a byte count equal to a recount.
    let delivered = upstream.delivered_ids();
    let (dead, books) = read_books(&data_dir).await;
    if let Err(e) = books {
        broken = broken.or(Some(e));
    }
    let _ = fs.unmount();
    let lost = acknowledged
        .iter()
        .filter(|id| !delivered.contains(*id) && !dead.contains(*id))
        .cloned()
        .collect();
    outcome(lost, broken)
}

/// The rebuild scenario's first run: writers until a seeded number of answers with upstream
/// up (sled's files grow as calls come and go), then upstream down and a few more answers
/// (calls left pending), then a kill or a clean stop. Returns the calls answered 200, and the
/// seed for the run that follows.
async fn fill_for_rebuild(
    data_dir: &Path,
    unix: &Path,
    upstream: &Upstream,
    upstream_up: &AtomicBool,
    args: &dyn Fn(&str) -> Vec<String>,
    rng: &mut Rng,
    label: &str,
) -> (Vec<String>, u64) {
    let mut fill_args = args("0");
    fill_args.extend(["--rebuild-above-bytes".into(), "0".into()]);
    let daemon = start_daemon(data_dir, &fill_args, &[])
        .await
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{label}: the first run did not start: {e}"));
    let big = Mix {
        big_calls: true,
        bad_calls: false,
    };
    let mut writers = Writers::start(&daemon, unix, &format!("{label}-a"), rng.next(), big);
    writers.wait_answered(100 + rng.below(200), label).await;
    let mut acknowledged = writers.finish().await;
    // Delivered before upstream goes down, so that what stays pending is small beside the
    // files (or no rebuild would be worth it).
    upstream
        .wait_delivered_ids(&acknowledged.iter().cloned().collect())
        .await;
    upstream_up.store(false, Ordering::SeqCst);
    let small = Mix {
        big_calls: false,
        bad_calls: false,
    };
    let mut writers = Writers::start(&daemon, unix, &format!("{label}-b"), rng.next(), small);
    writers.wait_answered(10 + rng.below(40), label).await;
    let clean = rng.below(2) == 0;
    tokio::task::spawn_blocking(move || {
        if clean {
            assert!(daemon.terminate().success());
        } else {
            daemon.kill();
        }
    })
    .await
    .unwrap();
    acknowledged.extend(writers.finish().await);
    (acknowledged, rng.next())
}

/// What the run stopped at a failpoint left: the calls answered 200 meanwhile, or why the
/// cut cannot test what it should.
struct Stopped {
    acknowledged: Vec<String>,
    broken: Option<String>,
}

/// How to start a daemon: where, on which Unix socket, with which flags and environment.
struct Launch<'a> {
    data_dir: &'a Path,
    unix: &'a Path,
    args: &'a [String],
    env: &'a [(String, String)],
}

/// Starts the daemon armed with `failpoint` and writers on it, and waits (at most 60 s) for
/// the failpoint to stop it.
async fn stopped_at_failpoint(
    launch: Launch<'_>,
    failpoint: &str,
    mix: Mix,
    seed: u64,
    label: &str,
) -> Stopped {
    let Launch {
        data_dir,
        unix,
        args,
        env,
    } = launch;
    let reached = format!("failpoint {failpoint} reached");
    let daemon = match start_daemon(data_dir, args, env).await.await.unwrap() {
        Ok(daemon) => daemon,
        // Stopped before it was ready.
        Err(log) => {
            return Stopped {
                acknowledged: Vec::new(),
                broken: (!log.contains(&reached))
                    .then(|| format!("the rebuild did not reach {failpoint}: {log}")),
            }
        }
    };
    let writers = Writers::start(&daemon, unix, label, seed, mix);
    let log = daemon.log.clone();
    let exited = tokio::time::timeout(Duration::from_secs(60), daemon.wait_exit()).await;
    let acknowledged = writers.finish().await;
    let broken = match exited {
        Err(_) => Some(format!("no rebuild reached {failpoint} in 60 s")),
        Ok(_) => {
            let log = log.clone();
            let reached = reached.clone();
            tokio::task::spawn_blocking(move || log.wait_for("the daemon", &reached, 1))
                .await
                .err()
                .map(|e| format!("the daemon stopped, not at {failpoint}: {e}"))
        }
    };
    Stopped {
        acknowledged,
        broken,
    }
}

/// An empty queue database with sled's 512 KiB log segments, as grouprelay created them
/// before 2026-12-03 (it keeps them: sled refuses another size), made durable before the
/// daemon starts on it.
fn legacy_database(data_dir: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    let path = data_dir.join(grouprelay::queue::DB_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&path)
        .unwrap();
    let db = sled::Config::new()
        .path(&path)
        .segment_size(grouprelay::queue::LEGACY_SEGMENT_BYTES)
        .open()
        .unwrap();
    db.flush().unwrap();
    drop(db);
    for dir in [data_dir.parent().unwrap(), data_dir, &path] {
        std::fs::File::open(dir).unwrap().sync_all().unwrap();
    }
}

/// Opens the queue left by a stopped daemon: the dead letters' ids, and whether the books
/// balance, nothing is pending after the drain, and the stored-bytes count equals a recount.
async fn read_books(data_dir: &Path) -> (HashSet<String>, Result<(), String>) {
    let (dead, books) = stopped_queue(data_dir, |queue| {
        let dead: HashSet<String> = queue
            .dead()
            .expect("read dead letters")
            .iter()
            .filter_map(|d| {
                serde_json::from_str::<serde_json::Value>(d.call.get())
                    .ok()
                    .and_then(|c| c["messageId"].as_str().map(str::to_owned))
            })
            .collect();
        (dead, Books::of(queue))
    })
    .await;
    let checked = books.balance().and_then(|()| match books.pending {
        0 => books.bytes_agree(),
        pending => Err(format!("{pending} calls still pending after the drain")),
    });
    (dead, checked)
}

/// Runs `cuts` cuts of `scenario` and returns what each showed.
async fn cuts(scenario: Scenario, mode: Mode, base: u64, cuts: u64) -> Vec<Outcome> {
    eprintln!(
        "power loss, {scenario:?} in {} mode: seed {base} (GROUPRELAY_TEST_SEED={base} replays it)",
        mode.durability
    );
    let mut outcomes = Vec::new();
    for cut in 0..cuts {
        let seed = Rng(base ^ (scenario as u64) << 56 ^ cut).next();
        let label = format!("{scenario:?}-{cut}");
        let work = tempfile::tempdir().unwrap();
        let hang = HangGuard::arm(
            &format!("{label} (replay with GROUPRELAY_TEST_SEED={base})"),
            work.path(),
            CUT_LIMIT,
        );
        let outcome = run_cut(scenario, mode, seed, &label, work.path()).await;
        drop(hang);
        eprintln!(
            "  {}: {} acknowledged, {} lost{}",
            outcome.label,
            outcome.acknowledged,
            outcome.lost.len(),
            outcome
                .broken
                .as_deref()
                .map(|b| format!(", {}", b.lines().next().unwrap_or("")))
                .unwrap_or_default()
        );
        outcomes.push(outcome);
    }
    outcomes
}

/// The promise: nothing acknowledged in `fsync` mode is lost to any cut, and grouprelay
/// always starts again with balanced books.
async fn nothing_lost(scenario: Scenario) {
    let base = common::test_seed();
    let outcomes = cuts(scenario, FSYNC, base, cuts_per_scenario()).await;
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.lost.is_empty() || o.broken.is_some())
        .map(|o| {
            format!(
                "{}: {} of {} acknowledged calls lost (first: {:?}){}",
                o.label,
                o.lost.len(),
                o.acknowledged,
                o.lost.iter().take(3).collect::<Vec<_>>(),
                o.broken
                    .as_deref()
                    .map(|b| format!("\n    {b}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "power loss in fsync mode (replay with GROUPRELAY_TEST_SEED={base}):\n{}",
        failures.join("\n")
    );
    assert!(
        outcomes.iter().map(|o| o.acknowledged).sum::<usize>() > 0,
        "no call was acknowledged in any cut: the test proved nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::FirstStart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::Steady).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::DeadLetter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_loses_nothing_to_a_power_cut() {
    nothing_lost(Scenario::Rebuild).await;
}

/// `interval` mode delivers a call once written, before the flush that makes it durable
/// (`src/queue/read.rs`), so a cut can take back calls upstream already has, together with
/// their removals. It may lose acknowledged calls (the mode allows that), but grouprelay must
/// start again on every image with balanced books and a byte count equal to a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_keeps_its_books_through_a_power_cut_while_delivering() {
    let mode = Mode {
        durability: "interval",
        ..FSYNC
    };
    let base = common::test_seed();
    let outcomes = cuts(Scenario::Drain, mode, base, cuts_per_scenario()).await;
    let broken: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.broken.as_ref().map(|b| format!("{}: {b}", o.label)))
        .collect();
    assert!(
        broken.is_empty(),
        "power loss in interval mode (replay with GROUPRELAY_TEST_SEED={base}):\n{}",
        broken.join("\n")
    );
    let lost: usize = outcomes.iter().map(|o| o.lost.len()).sum();
    eprintln!("interval mode: {lost} acknowledged calls lost over the cuts");
}

/// Runs two cuts of `scenario` that must each lose acknowledged calls: the harness's proof
/// that it can fail.
async fn must_lose(scenario: Scenario, mode: Mode, what: &str) {
    let outcomes = cuts(scenario, mode, common::test_seed(), 2).await;
    for outcome in &outcomes {
        assert!(
            !outcome.lost.is_empty(),
            "{}: {what} lost none of {} acknowledged calls: the harness cannot see loss",
            outcome.label,
            outcome.acknowledged
        );
    }
}

/// The harness sees loss where there is some: `interval` mode answers before the flush, so a
/// cut that drops every unsynced write must take acknowledged calls with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_loses_calls_to_a_power_cut() {
    // A flush period longer than the run before the cut: every answer precedes any flush.
    let mode = Mode {
        durability: "interval",
        sync_interval_ms: "10000",
        variation: Some(Variation::LoseAll),
        big_calls: false,
        ..FSYNC
    };
    must_lose(Scenario::Steady, mode, "interval mode").await;
}

/// The harness sees a missing `fdatasync`: with the committer's fdatasync skipped (sled's
/// own flush still runs, enough for `kill -9`), `fsync` mode loses acknowledged calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_mode_without_its_fdatasync_loses_calls_to_a_power_cut() {
    let mode = Mode {
        failpoints: Some("queue-skip-fdatasync"),
        variation: Some(Variation::LoseAll),
        big_calls: false,
        ..FSYNC
    };
    must_lose(Scenario::Steady, mode, "fsync mode without its fdatasync").await;
}

/// The harness sees a rebuild that switches in a copy it did not make durable: cut after
/// the switch, the copy's unsynced files are gone, and with them the calls pending in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_without_its_syncs_loses_calls_to_a_power_cut() {
    let mode = Mode {
        failpoints: Some("rebuild-skip-sync"),
        variation: Some(Variation::LoseAll),
        rebuild_step: Some("rebuild-after-switch"),
        ..FSYNC
    };
    must_lose(Scenario::Rebuild, mode, "a rebuild without its syncs").await;
}

/// The harness cannot hold CI: a cut whose process hangs is described and killed once past
/// its limit (here a stand-in that would never end, and a limit of a second).
#[test]
fn a_hung_cut_is_described_and_ended() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    std::fs::write(&log, "").unwrap();
    let guard = HangGuard::arm("hung-cut", work.path(), Duration::from_secs(1));
    let hung = std::process::Command::new("tail")
        .arg("-f")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Bounded, so that a guard that never fires fails the test instead of hanging it.
    let pid = hung.id() as i32;
    let (ended, end) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut hung = hung;
        let _ = ended.send(hung.wait().unwrap());
    });
    let Ok(status) = end.recv_timeout(Duration::from_secs(60)) else {
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("the guard did not end the hung process within 60 s");
    };
    drop(guard);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the hung process ended otherwise: {status}"
    );
}
