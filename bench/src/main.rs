//! grouprelay-bench: measures grouprelay against a do-nothing hyper baseline in the same run.
//!
//! Every ingest figure is reported beside the baseline's and as a ratio to it, because
//! absolute numbers on shared machines drift from run to run. Scenarios:
//! - `ingest`: durable ingest (`fsync` and `interval`) at each connection count, over TCP and
//!   the Unix socket, single calls on `/v1/group` and 100-call batches on `/v1/batch`; beside
//!   grouprelay, the stack's floor (`floor.rs`: hyper, a parse and a sled insert, group commit
//!   in `fsync` mode, nothing else) in each mode, to tell the stack's cost from ours;
//! - `backlog`: a queue of N calls: disk bytes, time from start to `/health` 200, RSS;
//! - `drain`: the same queue delivered to a local sink that answers 200 at once (calls/s);
//! - `reclaim`: a queue of N calls delivered, then the disk and memory that come back within
//!   [`RECLAIM_WINDOW`], and a restart to `/health` on what is left; beside the same with
//!   rebuilds off (`--rebuild-above-bytes 0`, every earlier release), as the baseline;
//! - `rebuild`: the longest a rebuild makes new calls wait: one copying the most it may;
//! - `idle`: RSS of an idle daemon, and how often its threads wake.

mod floor;
mod load;
mod servers;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use grouprelay::queue::{files_bytes, Durability, Queue, QueueOptions, REBUILD_MAX_COPY_BYTES};
use load::{Shape, Target};
use serde::Serialize;
use servers::{Placement, Sink};

/// How long an idle daemon's wake-ups are counted.
const IDLE_WAKEUP_WINDOW: Duration = Duration::from_secs(10);
/// How long after a drain the `reclaim` scenario waits for the data dir to shrink.
const RECLAIM_WINDOW: Duration = Duration::from_secs(300);
/// The data dir size the `reclaim` scenario waits for (issue 17's target: 64 MB).
const RECLAIM_TARGET_BYTES: u64 = 64_000_000;
/// How long the daemon idles after the data dir shrank before its RSS is read.
const RECLAIM_IDLE: Duration = Duration::from_secs(10);
#[derive(Parser)]
#[command(
    name = "grouprelay-bench",
    about = "Measures grouprelay against a do-nothing baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,
    /// Scenarios to run, comma-separated: ingest, backlog, drain, reclaim, rebuild, idle
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ingest,backlog,drain,reclaim,rebuild,idle"
    )]
    scenarios: Vec<String>,
    /// Connection counts for ingest
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    conns: Vec<usize>,
    /// Durability modes for ingest
    #[arg(long, value_delimiter = ',', default_value = "fsync,interval")]
    modes: Vec<String>,
    /// Servers to measure against the baseline: grouprelay (`--memory-profile lean`),
    /// grouprelay-throughput (`--memory-profile throughput`) and floor (the stack's floor:
    /// hyper, parse, a sled insert, group commit, nothing else) in each mode; candidate
    /// (`--candidate`'s binary) in each mode; parse (hyper and the parse alone, storing
    /// nothing) once
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "parse,floor,grouprelay,grouprelay-throughput"
    )]
    servers: Vec<String>,
    /// Transports for ingest: tcp, unix
    #[arg(long, value_delimiter = ',', default_value = "tcp,unix")]
    transports: Vec<String>,
    /// Request shapes for ingest: group, batch100
    #[arg(long, value_delimiter = ',', default_value = "group,batch100")]
    shapes: Vec<String>,
    /// Another grouprelay binary, measured as server `candidate` (`--memory-profile lean`)
    /// beside this build's: list it in `--servers` (say `grouprelay,candidate,candidate,
    /// grouprelay`) for a same-run A/B of two builds
    #[arg(long)]
    candidate: Option<std::path::PathBuf>,
    /// Measured seconds per ingest run (after a 1 s warm-up)
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Calls in the backlog, drain and reclaim scenarios
    #[arg(long, default_value_t = 1_000_000)]
    backlog_calls: u64,
    /// Pin servers to CPU 0 and the load generator to CPU 1
    #[arg(long)]
    pin: bool,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Internal {
    /// (internal) Run the baseline server; prints its TCP address.
    Baseline {
        #[arg(long)]
        unix: std::path::PathBuf,
    },
    /// (internal) Run the stack's floor server; prints its TCP address.
    Floor {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long)]
        unix: std::path::PathBuf,
    },
}

#[derive(Serialize, Default)]
struct Report {
    machine: String,
    placement: String,
    ingest: Vec<IngestRow>,
    backlog: Option<BacklogRow>,
    drain: Option<DrainRow>,
    /// With rebuilds (the default) and without (the baseline).
    reclaim: Vec<ReclaimRow>,
    /// The longest a rebuild makes new calls wait: one that copies the most it may.
    largest_rebuild: Option<RebuildPause>,
    idle_rss_mb: Option<f64>,
    /// Context switches a second over every thread of an idle daemon.
    idle_wakeups_per_sec: Option<f64>,
}

#[derive(Serialize)]
struct IngestRow {
    server: String,
    transport: String,
    shape: String,
    conns: usize,
    requests_per_sec: f64,
    calls_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    /// requests/s as a fraction of the baseline's in the same configuration.
    ratio: f64,
    rss_mb: f64,
    /// The server's CPU time (user + system, all threads) per request, in microseconds.
    cpu_us_per_request: f64,
    /// KB the server wrote to storage per request: what its durability costs the disk.
    written_kb_per_request: f64,
}

#[derive(Serialize)]
struct BacklogRow {
    calls: u64,
    call_bytes: u64,
    disk_bytes: u64,
    disk_ratio: f64,
    start_to_healthy_ms: f64,
    rss_mb_at_healthy: f64,
    rss_mb_after_3s: f64,
    peak_rss_mb: f64,
}

#[derive(Serialize)]
struct ReclaimRow {
    /// `rebuild` (the default) or `no rebuild` (`--rebuild-above-bytes 0`).
    server: String,
    calls: u64,
    /// The data dir once the backlog was queued.
    disk_bytes_full: u64,
    drain_seconds: f64,
    /// From the last call delivered to the data dir under [`RECLAIM_TARGET_BYTES`]; `None`:
    /// not within [`RECLAIM_WINDOW`].
    seconds_to_target: Option<f64>,
    /// The data dir at the end of the wait.
    disk_bytes_after: u64,
    peak_rss_mb: f64,
    /// RSS after [`RECLAIM_IDLE`] of idling once the wait ended.
    idle_rss_mb_after: f64,
    /// A restart on the data dir as left, to `/health` answering 200.
    restart_to_healthy_ms: f64,
    /// As a fraction of the baseline's (`no rebuild`) in the same run.
    disk_ratio: f64,
    idle_rss_ratio: f64,
    restart_ratio: f64,
}

#[derive(Serialize)]
struct RebuildPause {
    /// Bytes of stored records the rebuild copied.
    copied_bytes: u64,
    files_before_bytes: u64,
    files_after_bytes: u64,
    /// How long appends waited.
    paused_ms: f64,
}

#[derive(Serialize)]
struct DrainRow {
    calls: u64,
    seconds: f64,
    calls_per_sec: f64,
    /// The daemon's CPU (user and system, from start to the last call delivered) per call.
    cpu_us_per_call: f64,
    peak_rss_mb: f64,
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        match command {
            Internal::Baseline { unix } => runtime.block_on(servers::serve_baseline(unix)),
            Internal::Floor {
                mode,
                data_dir,
                unix,
            } => runtime.block_on(floor::serve(&mode, &data_dir, unix)),
        }
        return;
    }
    if cli.servers.iter().any(|k| k == "candidate") && cli.candidate.is_none() {
        eprintln!("server `candidate` needs `--candidate PATH` (another grouprelay binary)");
        std::process::exit(2);
    }
    let placement = Placement { pinned: cli.pin };
    // Read the machine before pinning this process narrows what it sees.
    let machine = machine();
    let workers = if cli.pin {
        pin_self_to_cpu(1);
        1
    } else {
        2
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(&cli, placement, machine));
    print_report(&report);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
        println!("\nwrote {}", path.display());
    }
}

async fn run(cli: &Cli, placement: Placement, machine: String) -> Report {
    let mut report = Report {
        machine,
        placement: if cli.pin {
            "servers pinned to CPU 0 (taskset), load generator and sink on CPU 1".into()
        } else {
            "unpinned: servers, load generator and sink share both cores".into()
        },
        ..Report::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let wants = |s: &str| cli.scenarios.iter().any(|x| x == s);
    if wants("ingest") {
        report.ingest = ingest(cli, placement, dir.path()).await;
    }
    if wants("backlog") || wants("drain") {
        let data = dir.path().join("backlog");
        let call_bytes = prefill(&data, cli.backlog_calls).await;
        if wants("backlog") {
            report.backlog = Some(backlog(placement, &data, cli.backlog_calls, call_bytes).await);
        }
        if wants("drain") {
            report.drain = Some(drain(placement, &data, cli.backlog_calls).await);
        }
    }
    if wants("reclaim") {
        report.reclaim = reclaim_rows(placement, dir.path(), cli.backlog_calls).await;
    }
    if wants("rebuild") {
        report.largest_rebuild = Some(largest_rebuild(&dir.path().join("largest-rebuild")).await);
    }
    if wants("idle") {
        let sink = Sink::start().await;
        let server =
            servers::start_grouprelay(placement, &dir.path().join("idle"), &sink.url(), &[]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        report.idle_rss_mb = Some(mb(server.rss().0));
        // Wake-ups of an idle daemon, over 10 s.
        let before = server.context_switches();
        tokio::time::sleep(IDLE_WAKEUP_WINDOW).await;
        let woke = server.context_switches().saturating_sub(before);
        report.idle_wakeups_per_sec = Some(woke as f64 / IDLE_WAKEUP_WINDOW.as_secs_f64());
        server.stop();
    }
    report
}

async fn ingest(cli: &Cli, placement: Placement, dir: &std::path::Path) -> Vec<IngestRow> {
    let mut rows = Vec::new();
    let warmup = Duration::from_secs(1);
    let duration = Duration::from_secs(cli.seconds);
    let shapes: Vec<Shape> = cli
        .shapes
        .iter()
        .map(|s| match s.as_str() {
            "group" => Shape::Single,
            "batch100" => Shape::Batch100,
            other => panic!("unknown shape {other}"),
        })
        .collect();
    let sink = Sink::start().await;
    let runs = server_runs(cli);
    for shape in &shapes {
        for transport in &cli.transports {
            for &conns in &cli.conns {
                // The baseline first, then each mode, back to back in the same conditions.
                let baseline = servers::start_baseline(placement, dir);
                let target = target_of(transport, &baseline);
                let cpu_before = baseline.cpu_seconds();
                let base = load::run(target, *shape, conns, warmup, duration).await;
                let cpu = baseline.cpu_seconds() - cpu_before;
                let base_rps = base.requests_per_sec();
                let base_requests = base_rps * (warmup + duration).as_secs_f64();
                rows.push(row(
                    "baseline",
                    transport,
                    *shape,
                    conns,
                    &base,
                    base_rps,
                    Usage {
                        rss: baseline.rss().0,
                        cpu_seconds_per_request: cpu / base_requests,
                        written_bytes_per_request: 0.0,
                    },
                ));
                baseline.stop();
                for (kind, mode) in &runs {
                    let data = dir.join(format!(
                        "ingest-{kind}-{mode}-{transport}-{}-{conns}",
                        shape.name()
                    ));
                    let (server, name) = match kind.as_str() {
                        "grouprelay" | "grouprelay-throughput" | "candidate" => (
                            servers::start_grouprelay_binary(
                                &grouprelay_binary(cli, kind),
                                placement,
                                &data,
                                &sink.url(),
                                &[
                                    "--durability",
                                    mode,
                                    "--max-queue-bytes",
                                    "20000000000",
                                    "--memory-profile",
                                    memory_profile(kind),
                                ],
                            ),
                            match (kind.as_str(), memory_profile(kind)) {
                                ("candidate", _) => format!("grouprelay {mode} candidate"),
                                (_, "lean") => format!("grouprelay {mode}"),
                                (_, profile) => format!("grouprelay {mode} {profile}"),
                            },
                        ),
                        "floor" | "parse" => (
                            servers::start_floor(placement, mode, &data),
                            if kind == "parse" {
                                "parse only (stores nothing)".to_owned()
                            } else {
                                format!("stack floor {mode}")
                            },
                        ),
                        other => panic!("unknown server {other}"),
                    };
                    let cpu_before = server.cpu_seconds();
                    let written_before = server.written_bytes();
                    let result = load::run(
                        target_of(transport, &server),
                        *shape,
                        conns,
                        warmup,
                        duration,
                    )
                    .await;
                    let rss = server.rss().0;
                    let cpu = server.cpu_seconds() - cpu_before;
                    let written = server.written_bytes() - written_before;
                    let rps = result.requests_per_sec();
                    let requests = rps * (warmup + duration).as_secs_f64();
                    rows.push(row(
                        &name,
                        transport,
                        *shape,
                        conns,
                        &result,
                        base_rps,
                        Usage {
                            rss,
                            cpu_seconds_per_request: cpu / requests,
                            written_bytes_per_request: written as f64 / requests,
                        },
                    ));
                    server.stop();
                    let _ = std::fs::remove_dir_all(&data);
                }
                eprintln!("done: {} {transport} {conns} conns", shape.name());
            }
        }
    }
    rows
}

/// The binary a grouprelay server kind runs: `--candidate`'s for `candidate`, else the one
/// built beside the bench.
fn grouprelay_binary(cli: &Cli, kind: &str) -> std::path::PathBuf {
    match kind {
        "candidate" => cli
            .candidate
            .clone()
            .expect("server `candidate` needs `--candidate PATH`"),
        _ => std::env::current_exe()
            .unwrap()
            .with_file_name("grouprelay"),
    }
}

/// The `--memory-profile` a grouprelay server kind runs with.
fn memory_profile(kind: &str) -> &'static str {
    match kind {
        "grouprelay-throughput" => "throughput",
        _ => "lean",
    }
}

/// The (server, mode) pairs to measure after each baseline: `parse` once, the others in each
/// mode, modes outer so that each mode's floor and grouprelay run back to back.
fn server_runs(cli: &Cli) -> Vec<(String, String)> {
    let mut runs = Vec::new();
    if cli.servers.iter().any(|k| k == "parse") {
        runs.push(("parse".to_owned(), "parse".to_owned()));
    }
    for mode in &cli.modes {
        for kind in cli.servers.iter().filter(|k| *k != "parse") {
            runs.push((kind.clone(), mode.clone()));
        }
    }
    runs
}

fn target_of(transport: &str, server: &servers::Server) -> Target {
    match transport {
        "tcp" => Target::Tcp(server.tcp),
        "unix" => Target::Unix(server.unix.clone()),
        other => panic!("unknown transport {other}"),
    }
}

/// What a server used during a load run.
struct Usage {
    rss: u64,
    cpu_seconds_per_request: f64,
    /// Bytes the server wrote to storage per request (the baseline writes none).
    written_bytes_per_request: f64,
}

fn row(
    server: &str,
    transport: &str,
    shape: Shape,
    conns: usize,
    r: &load::LoadResult,
    base_rps: f64,
    usage: Usage,
) -> IngestRow {
    IngestRow {
        server: server.into(),
        transport: transport.into(),
        shape: shape.name().into(),
        conns,
        requests_per_sec: r.requests_per_sec(),
        calls_per_sec: r.calls_per_sec(),
        p50_ms: r.ms(0.5),
        p99_ms: r.ms(0.99),
        p999_ms: r.ms(0.999),
        errors: r.errors,
        ratio: r.requests_per_sec() / base_rps,
        rss_mb: mb(usage.rss),
        cpu_us_per_request: usage.cpu_seconds_per_request * 1e6,
        written_kb_per_request: usage.written_bytes_per_request / 1e3,
    }
}

/// Fills a queue with `n` calls through the library (as grouprelay would store them) and
/// returns the calls' bytes.
async fn prefill(data: &std::path::Path, n: u64) -> u64 {
    let started = Instant::now();
    let queue = Queue::open(QueueOptions {
        durability: Durability::Interval,
        max_bytes: u64::MAX,
        ..QueueOptions::new(data)
    })
    .unwrap();
    let now = grouprelay::clock::unix_ms(std::time::SystemTime::now());
    let mut bytes = 0;
    let mut i = 0;
    while i < n {
        let chunk: Vec<Vec<u8>> = (i..(i + 1000).min(n))
            .map(|j| load::group_call(&format!("backlog-{j}-0000-0000-000000000000")).into_bytes())
            .collect();
        bytes += chunk.iter().map(|c| c.len() as u64).sum::<u64>();
        i += chunk.len() as u64;
        queue.append("BENCH_KEY", now, &chunk, &[]).await.unwrap();
    }
    queue.close().await.unwrap();
    drop(queue);
    eprintln!(
        "prefilled {n} calls in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    bytes
}

async fn backlog(
    placement: Placement,
    data: &std::path::Path,
    calls: u64,
    call_bytes: u64,
) -> BacklogRow {
    let disk_bytes = files_bytes(data);
    // Upstream down (nothing listens there): the backlog stays put while we measure.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = Instant::now();
    let server = servers::start_grouprelay(
        placement,
        data,
        &format!("http://{closed}"),
        &["--drain-timeout-ms", "0"],
    );
    let target = Target::Tcp(server.tcp);
    health(&target).await;
    let healthy = started.elapsed();
    let at_healthy = server.rss().0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, peak) = server.rss();
    server.stop();
    BacklogRow {
        calls,
        call_bytes,
        disk_bytes,
        disk_ratio: disk_bytes as f64 / call_bytes as f64,
        start_to_healthy_ms: healthy.as_secs_f64() * 1000.0,
        rss_mb_at_healthy: mb(at_healthy),
        rss_mb_after_3s: mb(after),
        peak_rss_mb: mb(peak),
    }
}

async fn drain(placement: Placement, data: &std::path::Path, calls: u64) -> DrainRow {
    let sink = Sink::start().await;
    let started = Instant::now();
    let server = servers::start_grouprelay(placement, data, &sink.url(), &[]);
    let done = sink.wait_for(calls, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    let cpu = server.cpu_seconds();
    let peak = server.rss().1;
    server.stop();
    assert!(done, "drain did not finish in 600 s");
    DrainRow {
        calls,
        seconds: elapsed.as_secs_f64(),
        calls_per_sec: calls as f64 / elapsed.as_secs_f64(),
        cpu_us_per_call: cpu * 1e6 / calls as f64,
        peak_rss_mb: mb(peak),
    }
}

/// The `reclaim` scenario with rebuilds off (the baseline) and on, each on a queue of its
/// own, with ratios against the baseline.
async fn reclaim_rows(placement: Placement, dir: &std::path::Path, calls: u64) -> Vec<ReclaimRow> {
    let baseline = reclaim(placement, &dir.join("reclaim-off"), calls, false).await;
    let mut rebuilt = reclaim(placement, &dir.join("reclaim-on"), calls, true).await;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    rebuilt.disk_ratio = ratio(
        rebuilt.disk_bytes_after as f64,
        baseline.disk_bytes_after as f64,
    );
    rebuilt.idle_rss_ratio = ratio(rebuilt.idle_rss_mb_after, baseline.idle_rss_mb_after);
    rebuilt.restart_ratio = ratio(
        rebuilt.restart_to_healthy_ms,
        baseline.restart_to_healthy_ms,
    );
    vec![baseline, rebuilt]
}

/// A backlog of `calls` queued, delivered to a sink, then the data dir watched (once a
/// second) until it is under [`RECLAIM_TARGET_BYTES`] or [`RECLAIM_WINDOW`] has passed; the
/// RSS after [`RECLAIM_IDLE`] more; and a restart on what is left.
async fn reclaim(
    placement: Placement,
    data: &std::path::Path,
    calls: u64,
    rebuild: bool,
) -> ReclaimRow {
    prefill(data, calls).await;
    let disk_bytes_full = files_bytes(data);
    let sink = Sink::start().await;
    let rebuild_args: &[&str] = if rebuild {
        &[]
    } else {
        &["--rebuild-above-bytes", "0"]
    };
    let started = Instant::now();
    let server = servers::start_grouprelay(placement, data, &sink.url(), rebuild_args);
    assert!(
        sink.wait_for(calls, Duration::from_secs(600)).await,
        "reclaim: the drain did not finish in 600 s"
    );
    let drained = Instant::now();
    let mut seconds_to_target = None;
    while drained.elapsed() < RECLAIM_WINDOW {
        if files_bytes(data) < RECLAIM_TARGET_BYTES {
            seconds_to_target = Some(drained.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(RECLAIM_IDLE).await;
    let (idle_rss, peak_rss) = server.rss();
    server.stop();
    let disk_bytes_after = files_bytes(data);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let restarted = Instant::now();
    let server = servers::start_grouprelay(placement, data, &format!("http://{closed}"), &[]);
    health(&Target::Tcp(server.tcp)).await;
    let restart = restarted.elapsed();
    server.stop();
    eprintln!(
        "reclaim ({}): drained in {:.1} s, data dir {} MB -> {} MB",
        if rebuild { "rebuild" } else { "no rebuild" },
        (drained - started).as_secs_f64(),
        mb(disk_bytes_full),
        mb(disk_bytes_after)
    );
    ReclaimRow {
        server: if rebuild { "rebuild" } else { "no rebuild" }.into(),
        calls,
        disk_bytes_full,
        drain_seconds: (drained - started).as_secs_f64(),
        seconds_to_target,
        disk_bytes_after,
        peak_rss_mb: mb(peak_rss),
        idle_rss_mb_after: mb(idle_rss),
        restart_to_healthy_ms: restart.as_secs_f64() * 1000.0,
        disk_ratio: 1.0,
        idle_rss_ratio: 1.0,
        restart_ratio: 1.0,
    }
}

/// A queue in this process holding just under [`REBUILD_MAX_COPY_BYTES`] of calls after
/// 300,000 came and went, rebuilt: the most a rebuild copies, and so the longest it makes
/// new calls wait.
async fn largest_rebuild(data: &std::path::Path) -> RebuildPause {
    // fsync: every call readable (durable) once appended.
    let queue = Queue::open(QueueOptions {
        durability: Durability::Fsync,
        max_bytes: u64::MAX,
        rebuild_above_bytes: 0,
        ..QueueOptions::new(data)
    })
    .unwrap();
    for i in (0..300_000u64).step_by(1000) {
        let calls: Vec<Vec<u8>> = (i..i + 1000)
            .map(|j| load::group_call(&format!("pause-{j}-0000-0000-000000000000")).into_bytes())
            .collect();
        queue.append("BENCH_KEY", 1, &calls, &[]).await.unwrap();
    }
    // Deliver from the front until what is left fits in one rebuild's copy.
    while queue.stored_bytes() > REBUILD_MAX_COPY_BYTES {
        let calls = queue.read(0, 1000).unwrap();
        queue.remove(&calls).unwrap();
    }
    let rebuilt = queue.rebuild().await.unwrap();
    queue.close().await.unwrap();
    RebuildPause {
        copied_bytes: rebuilt.copied,
        files_before_bytes: rebuilt.files_before,
        files_after_bytes: rebuilt.files_after,
        paused_ms: rebuilt.paused.as_secs_f64() * 1000.0,
    }
}

/// Polls `/health` until it answers 200 (start-up time is what is measured here).
async fn health(target: &Target) {
    let Target::Tcp(addr) = target else {
        unreachable!()
    };
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cores} cores, {cpu}; load average before the run: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn pin_self_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn print_report(report: &Report) {
    println!("machine: {}", report.machine);
    println!("placement: {}", report.placement);
    if !report.ingest.is_empty() {
        println!();
        println!(
            "| server | transport | shape | conns | req/s | calls/s | p50 ms | p99 ms | p99.9 ms | x baseline | errors | RSS MB | server CPU µs/req | KB written/req |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &report.ingest {
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.1} |",
                r.server, r.transport, r.shape, r.conns, r.requests_per_sec, r.calls_per_sec, r.p50_ms, r.p99_ms, r.p999_ms, r.ratio, r.errors, r.rss_mb, r.cpu_us_per_request, r.written_kb_per_request
            );
        }
    }
    if let Some(b) = &report.backlog {
        println!();
        println!(
            "backlog: {} calls ({:.1} MB of calls) take {:.1} MB on disk ({:.2}x); start to /health 200: {:.0} ms; RSS {:.1} MB at healthy, {:.1} MB after 3 s (peak {:.1} MB)",
            b.calls, mb(b.call_bytes), mb(b.disk_bytes), b.disk_ratio, b.start_to_healthy_ms, b.rss_mb_at_healthy, b.rss_mb_after_3s, b.peak_rss_mb
        );
    }
    if let Some(d) = &report.drain {
        println!(
            "drain: {} calls delivered to a local sink in {:.1} s: {:.0} calls/s, {:.2} µs CPU a call (peak RSS {:.1} MB)",
            d.calls, d.seconds, d.calls_per_sec, d.cpu_us_per_call, d.peak_rss_mb
        );
    }
    if !report.reclaim.is_empty() {
        println!();
        println!(
            "| reclaim | calls | data dir full MB | drain s | s to < 64 MB | data dir after MB | x baseline | peak RSS MB | idle RSS MB after | x baseline | restart to /health ms | x baseline |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &report.reclaim {
            println!(
                "| {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.3} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} |",
                r.server,
                r.calls,
                mb(r.disk_bytes_full),
                r.drain_seconds,
                r.seconds_to_target
                    .map_or("not within 300".into(), |s| format!("{s:.0}")),
                mb(r.disk_bytes_after),
                r.disk_ratio,
                r.peak_rss_mb,
                r.idle_rss_mb_after,
                r.idle_rss_ratio,
                r.restart_to_healthy_ms,
                r.restart_ratio
            );
        }
    }
    if let Some(r) = &report.largest_rebuild {
        println!(
            "largest rebuild: {:.1} MB of records copied, files {:.1} MB -> {:.1} MB, new calls waited {:.0} ms",
            mb(r.copied_bytes),
            mb(r.files_before_bytes),
            mb(r.files_after_bytes),
            r.paused_ms
        );
    }
    if let Some(idle) = report.idle_rss_mb {
        println!("idle RSS: {idle:.1} MB");
    }
    if let Some(wakeups) = report.idle_wakeups_per_sec {
        println!("idle wake-ups: {wakeups:.1} a second (every thread's context switches)");
    }
}
