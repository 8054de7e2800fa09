//! Configuration: one typed [`Config`], resolved once at start from flags > env > file > defaults.
//!
//! [`Settings`] is both the `grouprelay run` flags (with their `GROUPRELAY_*` variables) and
//! the TOML file's schema, so a key means the same thing in each place. Every problem is
//! reported as a [`ConfigError`] naming the setting, and the binary exits 2 on it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::queue::Durability;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8788";
pub const DEFAULT_UPSTREAM: &str = "https://api.segment.io";

/// Settings as given by flags, environment or file; `None` means "not given here".
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Where to listen: HOST:PORT or unix:PATH. Repeatable [default: 127.0.0.1:8788]
    #[arg(
        long,
        value_name = "ADDR",
        env = "GROUPRELAY_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Option<Vec<String>>,

    /// Where the queue lives [default: $STATE_DIRECTORY, else the per-user data dir]
    #[arg(long, value_name = "PATH", env = "GROUPRELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Segment API to forward to [default: https://api.segment.io]
    #[arg(long, value_name = "URL", env = "GROUPRELAY_UPSTREAM")]
    pub upstream: Option<String>,

    /// writeKey for requests that carry none (never logged)
    #[arg(
        long,
        value_name = "KEY",
        env = "GROUPRELAY_WRITE_KEY",
        hide_env_values = true
    )]
    pub write_key: Option<String>,

    /// When a 200 is sent: fsync (after an fdatasync covering the call) or interval [default: fsync]
    #[arg(long, value_name = "MODE", env = "GROUPRELAY_DURABILITY")]
    pub durability: Option<String>,

    /// Stored bytes past which new calls get 429 [default: 1073741824]
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_QUEUE_BYTES")]
    pub max_queue_bytes: Option<u64>,

    /// Free bytes to keep on the data dir's filesystem; below it new calls get 429; 0 turns it off [default: 536870912]
    #[arg(long, value_name = "N", env = "GROUPRELAY_MIN_FREE_DISK_BYTES")]
    pub min_free_disk_bytes: Option<u64>,

    /// How long a partial upstream batch may wait, in ms [default: 500]
    #[arg(long, value_name = "N", env = "GROUPRELAY_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,

    /// Largest request body, after gzip decoding, in bytes [default: 1048576]
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,

    /// In interval mode, how often the queue is flushed to disk, in ms [default: 200]
    #[arg(long, value_name = "N", env = "GROUPRELAY_SYNC_INTERVAL_MS")]
    pub sync_interval_ms: Option<u64>,

    /// Allow listening on addresses other than loopback
    #[arg(long, env = "GROUPRELAY_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_remote: Option<bool>,

    /// Most calls in one upstream batch, at most 2500 [default: 500]
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_BATCH_EVENTS")]
    pub max_batch_events: Option<usize>,

    /// gzip upstream request bodies [default: true]
    #[arg(long, env = "GROUPRELAY_UPSTREAM_GZIP", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub upstream_gzip: Option<bool>,

    /// Upstream request timeout, in ms [default: 10000]
    #[arg(long, value_name = "N", env = "GROUPRELAY_UPSTREAM_TIMEOUT_MS")]
    pub upstream_timeout_ms: Option<u64>,

    /// Upstream batches in flight at once [default: 2]
    #[arg(long, value_name = "N", env = "GROUPRELAY_UPSTREAM_CONCURRENCY")]
    pub upstream_concurrency: Option<usize>,

    /// Longest wait between retries, in ms [default: 60000]
    #[arg(long, value_name = "N", env = "GROUPRELAY_RETRY_MAX_INTERVAL_MS")]
    pub retry_max_interval_ms: Option<u64>,

    /// Calls older than this are dead-lettered as expired instead of sent: 7d, 12h, 30m, 90s [default: 7d]
    #[arg(long, value_name = "AGE", env = "GROUPRELAY_MAX_AGE")]
    pub max_age: Option<String>,

    /// On shutdown, how long to keep delivering the queue, in ms [default: 5000]
    #[arg(long, value_name = "N", env = "GROUPRELAY_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,

    /// Only these writeKeys are accepted; calls for any other get 403. Comma-separated (never logged) [default: any key]
    #[arg(
        long,
        value_name = "KEYS",
        env = "GROUPRELAY_ALLOWED_WRITE_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub allowed_write_keys: Option<Vec<String>>,

    /// A client must send a request's headers within this time, in ms [default: 10000]
    #[arg(long, value_name = "N", env = "GROUPRELAY_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,

    /// Most client connections open at once; further ones wait in the listen backlog [default: 10000]
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Log lines as text or json (one JSON object per line) [default: text]
    #[arg(long, value_name = "FORMAT", env = "GROUPRELAY_LOG_FORMAT")]
    pub log_format: Option<String>,

    /// TOML file with the same keys as these flags [default: /etc/grouprelay/grouprelay.toml when it exists]
    #[arg(long, value_name = "FILE", env = "GROUPRELAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    pub data_dir: PathBuf,
    pub upstream: String,
    pub write_key: Option<String>,
    pub durability: Durability,
    pub max_queue_bytes: u64,
    pub min_free_disk_bytes: u64,
    pub flush_interval: Duration,
    pub max_body_bytes: usize,
    pub sync_interval: Duration,
    pub allow_remote: bool,
    pub max_batch_events: usize,
    pub upstream_gzip: bool,
    pub upstream_timeout: Duration,
    pub upstream_concurrency: usize,
    pub retry_max_interval: Duration,
    pub max_age: Duration,
    pub drain_timeout: Duration,
    /// `None`: any writeKey.
    pub allowed_write_keys: Option<std::collections::HashSet<String>>,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable; coloured on a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/grouprelay/grouprelay.toml";

/// Upstream takes at most this many calls per batch (more are silently dropped).
pub const MAX_BATCH_EVENTS: usize = 2_500;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "http://{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A setting that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            setting: setting.to_owned(),
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // One line, whatever the underlying error printed.
        let problem = self
            .problem
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        write!(f, "{}: {}", self.setting, problem)
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Fills every setting not given here from `lower`.
    fn or(self, lower: Settings) -> Settings {
        Settings {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            upstream: self.upstream.or(lower.upstream),
            write_key: self.write_key.or(lower.write_key),
            durability: self.durability.or(lower.durability),
            max_queue_bytes: self.max_queue_bytes.or(lower.max_queue_bytes),
            min_free_disk_bytes: self.min_free_disk_bytes.or(lower.min_free_disk_bytes),
            flush_interval_ms: self.flush_interval_ms.or(lower.flush_interval_ms),
            max_body_bytes: self.max_body_bytes.or(lower.max_body_bytes),
            sync_interval_ms: self.sync_interval_ms.or(lower.sync_interval_ms),
            allow_remote: self.allow_remote.or(lower.allow_remote),
            max_batch_events: self.max_batch_events.or(lower.max_batch_events),
            upstream_gzip: self.upstream_gzip.or(lower.upstream_gzip),
            upstream_timeout_ms: self.upstream_timeout_ms.or(lower.upstream_timeout_ms),
            upstream_concurrency: self.upstream_concurrency.or(lower.upstream_concurrency),
            retry_max_interval_ms: self.retry_max_interval_ms.or(lower.retry_max_interval_ms),
            max_age: self.max_age.or(lower.max_age),
            drain_timeout_ms: self.drain_timeout_ms.or(lower.drain_timeout_ms),
            allowed_write_keys: self.allowed_write_keys.or(lower.allowed_write_keys),
            header_read_timeout_ms: self.header_read_timeout_ms.or(lower.header_read_timeout_ms),
            max_connections: self.max_connections.or(lower.max_connections),
            log_format: self.log_format.or(lower.log_format),
            config: self.config.or(lower.config),
        }
    }

    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let setting = "--config";
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(setting, format!("cannot read {}: {e}", path.display()))
        })?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|span| format!(" (line {})", text[..span.start].lines().count().max(1)))
                .unwrap_or_default();
            ConfigError::new(
                setting,
                format!("{}: {}{line}", path.display(), e.message()),
            )
        })
    }
}

impl Config {
    /// Resolves flags and environment (`given`, as clap parsed them) over the config file
    /// they name, over the defaults.
    pub fn resolve(given: Settings) -> Result<Config, ConfigError> {
        let default_file = Path::new(DEFAULT_CONFIG_FILE);
        let settings = match &given.config {
            Some(path) => given.clone().or(Settings::from_file(path)?),
            None if default_file.exists() => given.or(Settings::from_file(default_file)?),
            None => given,
        };
        Config::from_settings(settings)
    }

    fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let allow_remote = s.allow_remote.unwrap_or(false);
        let listen = s
            .listen
            .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_owned()])
            .iter()
            .map(|addr| parse_listen(addr, allow_remote))
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(ConfigError::new(
                "--listen",
                "at least one address is needed",
            ));
        }
        let upstream = s.upstream.unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
        let upstream = upstream.trim_end_matches('/').to_owned();
        match upstream.parse::<hyper::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty()) => {}
            _ => {
                return Err(ConfigError::new(
                    "--upstream",
                    format!("{upstream:?} is not an http:// or https:// URL"),
                ))
            }
        }
        let write_key = match s.write_key {
            Some(key) if key.is_empty() => {
                return Err(ConfigError::new("--write-key", "must not be empty"))
            }
            key => key,
        };
        let durability = match s.durability.as_deref() {
            None | Some("fsync") => Durability::Fsync,
            Some("interval") => Durability::Interval,
            Some(other) => {
                return Err(ConfigError::new(
                    "--durability",
                    format!("expected \"fsync\" or \"interval\", got {other:?}"),
                ))
            }
        };
        let max_queue_bytes = positive("--max-queue-bytes", s.max_queue_bytes, 1 << 30)?;
        let flush_interval_ms = positive("--flush-interval-ms", s.flush_interval_ms, 500)?;
        let max_body_bytes = positive(
            "--max-body-bytes",
            s.max_body_bytes.map(|n| n as u64),
            1 << 20,
        )?;
        let sync_interval_ms = positive("--sync-interval-ms", s.sync_interval_ms, 200)?;
        let max_batch_events = positive(
            "--max-batch-events",
            s.max_batch_events.map(|n| n as u64),
            500,
        )? as usize;
        if max_batch_events > MAX_BATCH_EVENTS {
            return Err(ConfigError::new(
                "--max-batch-events",
                format!("{max_batch_events} is over upstream's limit of {MAX_BATCH_EVENTS}"),
            ));
        }
        let upstream_timeout_ms = positive("--upstream-timeout-ms", s.upstream_timeout_ms, 10_000)?;
        let upstream_concurrency = positive(
            "--upstream-concurrency",
            s.upstream_concurrency.map(|n| n as u64),
            2,
        )? as usize;
        let retry_max_interval_ms =
            positive("--retry-max-interval-ms", s.retry_max_interval_ms, 60_000)?;
        let max_age = match s.max_age.as_deref() {
            None => Duration::from_secs(7 * 24 * 3600),
            Some(text) => parse_age(text).ok_or_else(|| {
                ConfigError::new(
                    "--max-age",
                    format!("{text:?} is not an age like 7d, 12h, 30m or 90s"),
                )
            })?,
        };
        let drain_timeout_ms = s.drain_timeout_ms.unwrap_or(5_000);
        let allowed_write_keys = match s.allowed_write_keys {
            None => None,
            Some(keys) => {
                let keys: std::collections::HashSet<String> = keys
                    .into_iter()
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .collect();
                if keys.is_empty() {
                    return Err(ConfigError::new(
                        "--allowed-write-keys",
                        "lists no key (leave it out to accept any key)",
                    ));
                }
                if write_key.as_ref().is_some_and(|k| !keys.contains(k)) {
                    return Err(ConfigError::new(
                        "--write-key",
                        "is not in --allowed-write-keys",
                    ));
                }
                Some(keys)
            }
        };
        let header_read_timeout_ms =
            positive("--header-read-timeout-ms", s.header_read_timeout_ms, 10_000)?;
        let max_connections = positive(
            "--max-connections",
            s.max_connections.map(|n| n as u64),
            10_000,
        )? as usize;
        let data_dir = match s.data_dir {
            Some(dir) => dir,
            None => default_data_dir().ok_or_else(|| {
                ConfigError::new(
                    "--data-dir",
                    "not given, $STATE_DIRECTORY is unset and there is no per-user data dir",
                )
            })?,
        };
        Ok(Config {
            listen,
            data_dir,
            upstream,
            write_key,
            durability,
            max_queue_bytes,
            min_free_disk_bytes: s.min_free_disk_bytes.unwrap_or(512 << 20),
            flush_interval: Duration::from_millis(flush_interval_ms),
            max_body_bytes: usize::try_from(max_body_bytes)
                .map_err(|_| ConfigError::new("--max-body-bytes", "too large"))?,
            sync_interval: Duration::from_millis(sync_interval_ms),
            allow_remote,
            max_batch_events,
            upstream_gzip: s.upstream_gzip.unwrap_or(true),
            upstream_timeout: Duration::from_millis(upstream_timeout_ms),
            upstream_concurrency,
            retry_max_interval: Duration::from_millis(retry_max_interval_ms),
            max_age,
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            allowed_write_keys,
            header_read_timeout: Duration::from_millis(header_read_timeout_ms),
            max_connections,
            log_format: match s.log_format.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(ConfigError::new(
                        "--log-format",
                        format!("expected \"text\" or \"json\", got {other:?}"),
                    ))
                }
            },
        })
    }
}

/// `7d`, `12h`, `30m`, `90s`, `500ms`, or a number of seconds; never zero.
fn parse_age(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let age = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!age.is_zero()).then_some(age)
}

fn positive(setting: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::new(setting, "must be greater than 0")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// Parses `HOST:PORT` or `unix:PATH`, refusing non-loopback addresses unless allowed.
pub fn parse_listen(addr: &str, allow_remote: bool) -> Result<ListenAddr, ConfigError> {
    let setting = "--listen";
    if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(ConfigError::new(setting, "unix: needs a socket path"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let socket = match addr.parse::<SocketAddr>() {
        Ok(socket) => socket,
        Err(_) => match addr.rsplit_once(':') {
            Some(("localhost", port)) => {
                let port = port.parse::<u16>().map_err(|_| {
                    ConfigError::new(setting, format!("{addr:?}: the port is not a number"))
                })?;
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
            }
            _ => {
                return Err(ConfigError::new(
                    setting,
                    format!("{addr:?} is neither HOST:PORT (an IP address) nor unix:PATH"),
                ))
            }
        },
    };
    if !socket.ip().is_loopback() && !allow_remote {
        return Err(ConfigError::new(
            setting,
            format!("{addr} is not a loopback address; pass --allow-remote to listen on it"),
        ));
    }
    Ok(ListenAddr::Tcp(socket))
}

/// `$STATE_DIRECTORY`'s first entry (set by systemd's `StateDirectory=`), else the per-user
/// data dir.
fn default_data_dir() -> Option<PathBuf> {
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = std::env::split_paths(&dirs).find(|p| !p.as_os_str().is_empty()) {
            return Some(first);
        }
    }
    directories::ProjectDirs::from("", "", "grouprelay").map(|d| d.data_dir().to_path_buf())
}

/// Creates the data dir (mode 0700) if it is missing.
pub fn create_data_dir(dir: &Path) -> Result<(), ConfigError> {
    // Each new directory's name synced into its parent: the queue's files are only as
    // durable as the path to them.
    crate::dirsync::create_dir_all(dir, 0o700).map_err(|e| {
        ConfigError::new(
            "--data-dir",
            format!("cannot create {}: {e}", dir.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file: Settings = toml::from_str(
            "listen = [\"127.0.0.1:9000\"]\ndurability = \"interval\"\nmax-queue-bytes = 10\n",
        )
        .unwrap();
        let flags = Settings {
            max_queue_bytes: Some(20),
            data_dir: Some("/tmp/x".into()),
            ..Settings::default()
        };
        let config = Config::from_settings(flags.or(file)).unwrap();
        assert_eq!(config.max_queue_bytes, 20);
        assert_eq!(config.durability, Durability::Interval);
        assert_eq!(
            config.listen,
            vec![ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap())]
        );
        assert_eq!(config.flush_interval, Duration::from_millis(500));
    }

    #[test]
    fn ages_take_units() {
        assert_eq!(parse_age("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_age("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_age("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_age("0s"), None);
        assert_eq!(parse_age("1w"), None);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<Settings>("listn = []").is_err());
    }

    #[test]
    fn remote_addresses_need_allow_remote() {
        assert!(parse_listen("0.0.0.0:8788", false).is_err());
        assert!(parse_listen("0.0.0.0:8788", true).is_ok());
        assert!(parse_listen("[::1]:8788", false).is_ok());
        assert_eq!(
            parse_listen("localhost:1", false).unwrap(),
            ListenAddr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            parse_listen("unix:/run/x.sock", false).unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
    }
}
