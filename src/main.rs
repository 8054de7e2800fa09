//! The `grouprelay` command line: parse, resolve the configuration, run, map errors to exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use grouprelay::admin;
use grouprelay::config::{settings, Config, LogFormat, Settings};
use grouprelay::daemon::{self, DaemonError};
use grouprelay::server::Inherited;
use grouprelay::shutdown;

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
    Status(admin::AdminArgs),
    /// List, show, replay or purge the running daemon's dead letters.
    Dead {
        #[command(subcommand)]
        command: admin::DeadCommand,
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
        Command::Status(args) => return admin::status(&args),
        Command::Dead { command } => return admin::dead(command),
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
    let inherited = match grouprelay::server::take_inherited() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("grouprelay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(config.log_format);
    grouprelay::memory::tune_allocator(config.memory_profile);
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("grouprelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(config, inherited));
    // Do not wait on a blocking task stuck in the filesystem (a flush after an I/O error).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(DaemonError::Config(e)) => {
            eprintln!("grouprelay: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        // Logged once, to stderr like every log line.
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, inherited: Vec<Inherited>) -> Result<(), DaemonError> {
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
    daemon::run(config, inherited, shutdown).await
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
