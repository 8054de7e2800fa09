//! The admin commands (`grouprelay status`, `grouprelay dead ...`): each asks the running
//! daemon's `/admin/` endpoints ([`crate::http::admin`]) and prints the answer.
//!
//! sled allows one process per database, so these commands cannot open the queue
//! themselves. Exit status: 0 done, 1 when the daemon is unreachable or refuses, 2 for a bad
//! argument.

pub mod client;

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::clock;
use crate::http::admin::{DeadSummary, Selection};
use crate::http::routes::DeadAction;
use crate::human::{bytes, count};
use crate::server::operator;
use crate::status::Status;
use client::{RequestError, Target};

/// Exit status for a bad argument.
const EXIT_USAGE: u8 = 2;

/// How the admin commands find the daemon.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The daemon's admin socket, unix:PATH [default: found as `run` places it, from the same config file and variables]
    #[arg(long, value_name = "URL", env = "GROUPRELAY_URL")]
    url: Option<String>,
}

/// The daemon to ask, and how to tell a user who may not.
struct Daemon {
    target: Target,
    /// "run as root or as a member of GROUP".
    who_may: String,
}

/// `grouprelay dead ...`
#[derive(clap::Subcommand)]
pub enum DeadCommand {
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

/// A refusal from the daemon.
#[derive(Deserialize)]
struct Refusal {
    message: Option<String>,
}

/// `grouprelay status`: up (with the numbers) or down; exit 1 when down.
pub fn status(admin: &AdminArgs) -> ExitCode {
    let Some(target) = target(admin) else {
        return ExitCode::from(EXIT_USAGE);
    };
    match ask::<Status>(&target, Method::GET, "/admin/status".into(), None) {
        Ok(status) => {
            print_status(&status);
            ExitCode::SUCCESS
        }
        Err(Failure::Unreachable(e) | Failure::Answer(e)) => {
            println!("grouprelay: down ({e})");
            ExitCode::FAILURE
        }
        Err(failure) => failure.report(),
    }
}

/// `grouprelay dead ...`
pub fn dead(command: DeadCommand) -> ExitCode {
    let outcome = match command {
        DeadCommand::List {
            reason,
            limit,
            admin,
        } => dead_list(&admin, reason, limit),
        DeadCommand::Show { id, admin } => target(&admin)
            .ok_or(Failure::Usage)
            .and_then(|target| {
                ask::<serde_json::Value>(&target, Method::GET, format!("/admin/dead/{id}"), None)
            })
            .map(|letter| println!("{letter:#}")),
        DeadCommand::Replay {
            ids,
            all,
            reason,
            admin,
        } => dead_action(&admin, DeadAction::Replay, selection(ids, all, reason)),
        DeadCommand::Purge { ids, all, admin } => {
            dead_action(&admin, DeadAction::Purge, selection(ids, all, None))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

fn dead_list(
    admin: &AdminArgs,
    reason: Option<String>,
    limit: Option<usize>,
) -> Result<(), Failure> {
    let target = target(admin).ok_or(Failure::Usage)?;
    let mut query = Vec::new();
    if let Some(reason) = reason {
        query.push(format!("reason={reason}"));
    }
    if let Some(limit) = limit {
        query.push(format!("limit={limit}"));
    }
    let path = format!("/admin/dead?{}", query.join("&"));
    let letters = ask::<Vec<DeadSummary>>(&target, Method::GET, path, None)?;
    if letters.is_empty() {
        // On stderr: what scripts read from stdout stays one line per dead letter.
        eprintln!("grouprelay: no dead letters");
    }
    for letter in letters {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            letter.id,
            letter.message_id.as_deref().unwrap_or("-"),
            letter.write_key,
            letter.reason,
            time(Some(letter.dead_at_ms)),
        );
    }
    Ok(())
}

fn dead_action(
    admin: &AdminArgs,
    action: DeadAction,
    selection: Option<Selection>,
) -> Result<(), Failure> {
    let target = target(admin).ok_or(Failure::Usage)?;
    let Some(selection) = selection else {
        eprintln!("grouprelay: name dead letters: IDs, --all or --reason");
        return Err(Failure::Usage);
    };
    let body = serde_json::to_vec(&selection).map_err(|e| Failure::Answer(e.to_string()))?;
    let path = format!("/admin/dead/{}", action.as_str());
    let answer = ask::<serde_json::Value>(&target, Method::POST, path, Some(body))?;
    let done = answer[action.as_str()].as_u64().unwrap_or(0);
    let done_word = match action {
        DeadAction::Replay => "replayed",
        DeadAction::Purge => "purged",
    };
    println!("{done_word} {}", count(done, "dead letter"));
    Ok(())
}

/// Which dead letters, or `None` when the command named none.
fn selection(ids: Vec<u64>, all: bool, reason: Option<String>) -> Option<Selection> {
    (!ids.is_empty() || all || reason.is_some()).then_some(Selection { ids, all, reason })
}

/// Why an admin command did not get its answer.
enum Failure {
    /// A bad argument, already reported.
    Usage,
    /// The daemon could not be reached.
    Unreachable(String),
    /// The daemon refused: its status and message.
    Refused(u16, String),
    /// The admin socket's permissions keep this user out.
    Denied(String),
    /// The answer is not what the daemon sends.
    Answer(String),
}

impl Failure {
    fn report(self) -> ExitCode {
        match self {
            Failure::Usage => return ExitCode::from(EXIT_USAGE),
            Failure::Unreachable(e) | Failure::Answer(e) | Failure::Denied(e) => {
                eprintln!("grouprelay: {e}")
            }
            Failure::Refused(status, message) => {
                eprintln!("grouprelay: the daemon answered {status}: {message}")
            }
        }
        ExitCode::FAILURE
    }
}

/// The daemon: `--url`, else the admin socket where `grouprelay run` with the same config
/// file and variables puts it.
fn target(admin: &AdminArgs) -> Option<Daemon> {
    // An operator may not be allowed to read the daemon's config file: then the defaults.
    let config = run_config().unwrap_or_default();
    let target = match &admin.url {
        Some(url) => Target::parse(url)
            .map_err(|e| eprintln!("grouprelay: --url: {e}"))
            .ok()?,
        None => Target::Unix(config.admin.path_for_client(&config.queue.data_dir)),
    };
    let who_may = match &target {
        Target::Unix(path) => operator::who_may_use(path),
        Target::Tcp(_) => None,
    }
    .unwrap_or_else(|| config.admin.who_may());
    Some(Daemon { target, who_may })
}

/// The configuration `grouprelay run` would have here, without flags: the config file and
/// the `GROUPRELAY_*` variables over the defaults.
fn run_config() -> Result<crate::config::Config, String> {
    use clap::{Args, FromArgMatches};
    let command = crate::config::Settings::augment_args(clap::Command::new("grouprelay"));
    let matches = command
        .try_get_matches_from(["grouprelay"])
        .map_err(|e| e.to_string())?;
    let settings =
        crate::config::Settings::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    crate::config::Config::resolve(settings).map_err(|e| e.to_string())
}

/// One request to the daemon, its 200 answer read as `T`.
fn ask<T: DeserializeOwned>(
    daemon: &Daemon,
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
) -> Result<T, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Unreachable(format!("cannot start the runtime: {e}")))?;
    let (status, bytes) = runtime
        .block_on(client::request(
            &daemon.target,
            method,
            &path,
            body.map(Bytes::from),
        ))
        .map_err(|e| match e {
            RequestError::Denied(e) => Failure::Denied(format!("{e}; {}", daemon.who_may)),
            RequestError::Failed(e) => Failure::Unreachable(e),
        })?;
    let not_ours = |e: serde_json::Error| {
        Failure::Answer(format!(
            "the answer ({status}) is not what grouprelay sends ({e}): {}",
            String::from_utf8_lossy(&bytes)
        ))
    };
    if status != 200 {
        let refusal: Refusal = serde_json::from_slice(&bytes).map_err(not_ours)?;
        let message = refusal.message.unwrap_or_else(|| "no message".into());
        return Err(Failure::Refused(status, message));
    }
    serde_json::from_slice(&bytes).map_err(not_ours)
}

fn time(ms: Option<u64>) -> String {
    ms.map(|ms| clock::rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)))
        .unwrap_or_else(|| "-".into())
}

fn print_status(status: &Status) {
    println!("grouprelay {}: up", status.version);
    let oldest = status
        .oldest_call_age_seconds
        .map(|age| format!(", oldest {age:.1} s old"))
        .unwrap_or_default();
    println!(
        "queue: {} ({} stored){oldest}",
        count(status.pending, "call"),
        bytes(status.stored_bytes)
    );
    println!(
        "accepted: {}, delivered: {}, rejected at ingest: {}",
        status.accepted, status.delivered, status.rejected
    );
    let by_reason: Vec<String> = status
        .dead
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if by_reason.is_empty() {
        println!("dead letters: {}", status.dead_total());
    } else {
        println!(
            "dead letters: {} ({})",
            status.dead_total(),
            by_reason.join(", ")
        );
    }
    let upstream = &status.upstream;
    let mut line = match upstream.state.as_str() {
        "backing_off" => format!(
            "upstream: backing off until {}",
            time(upstream.backing_off_until_ms)
        ),
        _ => "upstream: healthy".to_owned(),
    };
    if let Some(error) = &upstream.last_error {
        line.push_str(&format!(
            "; last error at {}: {error}",
            time(upstream.last_error_at_ms)
        ));
    }
    if let Some(at) = upstream.last_delivery_at_ms {
        line.push_str(&format!("; last delivery at {}", time(Some(at))));
    }
    if let Some(proxy) = &upstream.proxy {
        line.push_str(&format!("; through the proxy {proxy}"));
    }
    println!("{line}");
}
