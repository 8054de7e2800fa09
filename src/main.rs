//! The `grouprelay` command line: parse, resolve the configuration, run, map errors to exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use grouprelay::admin::client::{self, Target};
use grouprelay::admin::Selection;
use grouprelay::config::{settings, Config, LogFormat, Settings};
use grouprelay::daemon::{self, DaemonError};
use grouprelay::shutdown;
use hyper::Method;

/// A durable localhost relay for Segment calls: every call answered 200 is on disk.
#[derive(Parser)]
#[command(name = "grouprelay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(Settings),
    /// Check a configuration and exit 0, or 2 naming the first problem.
    Validate(Settings),
    /// Show the running daemon's state: queue, deliveries, dead letters, upstream.
    Status(AdminArgs),
    /// List, show, replay or purge the running daemon's dead letters.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
}

/// How the admin commands find the daemon.
#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon: http://HOST:PORT or unix:PATH
    #[arg(long, value_name = "URL", env = "GROUPRELAY_URL", default_value = DEFAULT_ADMIN_URL)]
    url: String,
}

const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8788";

#[derive(Subcommand)]
enum DeadCommand {
    /// One line per dead letter: id, messageId, writeKey's first 4 characters, reason, time.
    List {
        /// Only this reason: rejected_by_upstream or expired
        #[arg(long)]
        reason: Option<String>,
        /// At most this many, oldest first
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One dead letter in full.
    Show {
        id: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Queue dead letters again, with the same messageId.
    Replay {
        ids: Vec<u64>,
        /// Every dead letter
        #[arg(long, conflicts_with_all = ["ids", "reason"])]
        all: bool,
        /// Every dead letter with this reason
        #[arg(long, conflicts_with = "ids")]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete dead letters for good.
    Purge {
        ids: Vec<u64>,
        /// Every dead letter
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Exit status for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let command = Cli::command()
        .mut_subcommand("run", settings::with_defaults_in_help)
        .mut_subcommand("validate", settings::with_defaults_in_help);
    let cli = match command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("grouprelay: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (settings, validate_only) = match cli.command {
        Command::Run(settings) => (settings, false),
        Command::Validate(settings) => (settings, true),
        Command::Status(admin) => return admin_command(&admin, AdminRequest::Status),
        Command::Dead { command } => {
            let (admin, request) = match command {
                DeadCommand::List {
                    reason,
                    limit,
                    admin,
                } => (admin, AdminRequest::DeadList { reason, limit }),
                DeadCommand::Show { id, admin } => (admin, AdminRequest::DeadShow(id)),
                DeadCommand::Replay {
                    ids,
                    all,
                    reason,
                    admin,
                } => {
                    let selection = selection(ids, all, reason);
                    (admin, AdminRequest::Dead("replay", selection))
                }
                DeadCommand::Purge { ids, all, admin } => (
                    admin,
                    AdminRequest::Dead("purge", selection(ids, all, None)),
                ),
            };
            return admin_command(&admin, request);
        }
    };
    let config = match Config::resolve(settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("grouprelay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if validate_only {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log_format);
    limit_malloc_arenas();
    raise_open_files_limit();
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(run(config));
    // Do not wait on a blocking task stuck in the filesystem (a flush after an I/O error).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(DaemonError::Config(e)) => {
            eprintln!("grouprelay: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("grouprelay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), DaemonError> {
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        match shutdown::signal().await {
            Ok(name) => {
                tracing::info!("{name} received; shutting down");
                trigger.fire();
            }
            // Without signal handlers the default action (exit) applies; never fire early.
            Err(e) => tracing::error!(error = %e, "cannot listen for signals"),
        }
    });
    daemon::run(config, shutdown).await
}

/// Builds a runtime, or says why not.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("grouprelay: cannot start the runtime: {e}"))
        .ok()
}

enum AdminRequest {
    Status,
    DeadList {
        reason: Option<String>,
        limit: Option<usize>,
    },
    DeadShow(u64),
    /// `replay` or `purge`, and which.
    Dead(&'static str, Option<Selection>),
}

/// Which dead letters, or `None` when the command named none.
fn selection(ids: Vec<u64>, all: bool, reason: Option<String>) -> Option<Selection> {
    (!ids.is_empty() || all || reason.is_some()).then_some(Selection { ids, all, reason })
}

/// Runs an admin command against the daemon: exit 0, 1 when the daemon is unreachable or
/// refuses, 2 for a bad argument.
fn admin_command(admin: &AdminArgs, request: AdminRequest) -> ExitCode {
    let target = match Target::parse(&admin.url) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("grouprelay: --url: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (method, path, body) = match &request {
        AdminRequest::Status => (Method::GET, "/admin/status".to_owned(), None),
        AdminRequest::DeadList { reason, limit } => {
            let mut query = Vec::new();
            if let Some(reason) = reason {
                query.push(format!("reason={reason}"));
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            (
                Method::GET,
                format!("/admin/dead?{}", query.join("&")),
                None,
            )
        }
        AdminRequest::DeadShow(id) => (Method::GET, format!("/admin/dead/{id}"), None),
        AdminRequest::Dead(action, selection) => {
            let Some(selection) = selection else {
                eprintln!("grouprelay: name dead letters: IDs, --all or --reason");
                return ExitCode::from(EXIT_CONFIG);
            };
            let body = serde_json::to_value(selection).expect("JSON");
            (Method::POST, format!("/admin/dead/{action}"), Some(body))
        }
    };
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let answer = runtime.block_on(client::request(&target, method, &path, body));
    let (status, value) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            if matches!(request, AdminRequest::Status) {
                println!("grouprelay: down ({e})");
            } else {
                eprintln!("grouprelay: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if status != 200 {
        let message = value["message"].as_str().unwrap_or("no message");
        eprintln!("grouprelay: the daemon answered {status}: {message}");
        return ExitCode::FAILURE;
    }
    match request {
        AdminRequest::Status => print_status(&value),
        AdminRequest::DeadList { .. } => {
            for letter in value.as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    letter["id"],
                    letter["message_id"].as_str().unwrap_or("-"),
                    letter["write_key"].as_str().unwrap_or("-"),
                    letter["reason"].as_str().unwrap_or("-"),
                    time(letter["dead_at_ms"].as_u64()),
                );
            }
        }
        AdminRequest::DeadShow(_) => {
            println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
        }
        AdminRequest::Dead(action, _) => {
            let done = value[action].as_u64().unwrap_or(0);
            let done_word = if action == "replay" {
                "replayed"
            } else {
                "purged"
            };
            println!("{done_word} {done} dead letters");
        }
    }
    ExitCode::SUCCESS
}

fn time(ms: Option<u64>) -> String {
    ms.map(|ms| {
        grouprelay::clock::rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
    })
    .unwrap_or_else(|| "-".into())
}

fn print_status(status: &serde_json::Value) {
    println!(
        "grouprelay {}: up",
        status["version"].as_str().unwrap_or("?")
    );
    let oldest = status["oldest_call_age_seconds"]
        .as_f64()
        .map(|age| format!(", oldest {age:.1} s old"))
        .unwrap_or_default();
    println!(
        "queue: {} calls ({} bytes stored){oldest}",
        status["pending"], status["stored_bytes"]
    );
    println!(
        "accepted: {}, delivered: {}, rejected at ingest: {}",
        status["accepted"], status["delivered"], status["rejected"]
    );
    let dead = status["dead"].as_object().cloned().unwrap_or_default();
    let total: u64 = dead.values().filter_map(|v| v.as_u64()).sum();
    let by_reason: Vec<String> = dead.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if by_reason.is_empty() {
        println!("dead letters: {total}");
    } else {
        println!("dead letters: {total} ({})", by_reason.join(", "));
    }
    let upstream = &status["upstream"];
    let mut line = match upstream["state"].as_str() {
        Some("backing_off") => format!(
            "upstream: backing off until {}",
            time(upstream["backing_off_until_ms"].as_u64())
        ),
        _ => "upstream: healthy".to_owned(),
    };
    if let Some(error) = upstream["last_error"].as_str() {
        line.push_str(&format!(
            "; last error at {}: {error}",
            time(upstream["last_error_at_ms"].as_u64())
        ));
    }
    if let Some(at) = upstream["last_delivery_at_ms"].as_u64() {
        line.push_str(&format!("; last delivery at {}", time(Some(at))));
    }
    println!("{line}");
}

/// glibc gives each thread that allocates its own arena, and memory freed in one is rarely
/// returned: reading a large backlog through sled's threads and tokio's workers grew RSS
/// from about 170 MB to 440 MB (grouprelay-bench, backlog scenario). Two arenas keep it flat.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Each client connection is a file descriptor, and the usual soft limit of 1,024 would cap
/// a host's connections far below `--max-connections`; the hard limit is what the operator
/// (or systemd's `LimitNOFILE=`) allows.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
