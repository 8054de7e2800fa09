//! Every setting of `grouprelay run`, defined once: flag, variable, file key, type, help,
//! where its value lands in [`Config`], and how its default shows.
//!
//! The [`settings!`] table below is the only list of settings. From it come the
//! [`Settings`] overlay (clap's flags and `GROUPRELAY_*` variables, and the TOML file's
//! schema, so a key means the same thing in each place), the merge of two overlays, the
//! step that puts an overlay's values into a [`Config`], and [`SETTINGS`], which `--help`
//! and the defaults test read. A default itself is written once, as a `DEFAULT_*` constant
//! beside the code that uses it; the table only says how it shows.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::sections::{Config, LogFormat};
use crate::forward::proxy::ProxySetting;
use crate::forward::{load_ca_file, MAX_BATCH_EVENTS};
use crate::memory::MemoryProfile;
use crate::queue::Durability;
use crate::server::operator::{parse_admin_listen, Group};
use crate::server::ListenAddr;

/// One setting as `--help`, the README and the packaged TOML describe it.
pub struct Setting {
    /// The field's name: `max_queue_bytes`.
    pub name: &'static str,
    /// Its default in the syntax its flag takes, read from a [`Config`] of defaults; `None`
    /// when the default is not a value (found at start, or "none").
    pub shown_default: fn(&Config) -> Option<String>,
}

impl Setting {
    /// The file key: `max-queue-bytes`.
    pub fn key(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The flag: `--max-queue-bytes`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key())
    }
}

/// Defines the settings. Each entry: doc comment (the `--help` line, without its default)
/// and clap attributes; `name: Type`; `apply`, which checks a given value and puts it into
/// the [`Config`] (an `Err` is the problem, reported with the flag's name); `shows`, the
/// default as `--help` shows it.
macro_rules! settings {
    ($(
        $(#[$attr:meta])*
        $name:ident: $ty:ty,
            apply: $apply:expr,
            shows: $shows:expr;
    )*) => {
        /// Settings as given by flags, environment or file; `None` means "not given here".
        #[derive(Debug, Default, Clone, clap::Args, serde::Deserialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$attr])* pub $name: Option<$ty>, )*
            /// TOML file with the same keys as these flags [default: /etc/grouprelay/grouprelay.toml when it exists]
            #[arg(long, value_name = "FILE", env = "GROUPRELAY_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
        }

        impl Settings {
            /// Fills every setting not given here from `lower`.
            pub fn or(self, lower: Settings) -> Settings {
                Settings {
                    $( $name: self.$name.or(lower.$name), )*
                    config: self.config.or(lower.config),
                }
            }

            /// Puts every setting given here into `config`, each checked on its own.
            pub(super) fn apply_to(self, config: &mut Config) -> Result<(), ConfigError> {
                $(
                    if let Some(value) = self.$name {
                        let apply: fn(&mut Config, $ty) -> Result<(), String> = $apply;
                        apply(config, value).map_err(|problem| {
                            ConfigError::new(&format!("--{}", stringify!($name).replace('_', "-")), problem)
                        })?;
                    }
                )*
                Ok(())
            }
        }

        /// Every setting but `--config`, in `--help` order.
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                name: stringify!($name),
                shown_default: $shows,
            },
        )*];
    };
}

settings! {
    /// Where to listen: HOST:PORT or unix:PATH. Repeatable
    #[arg(long, value_name = "ADDR", env = "GROUPRELAY_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
        apply: |c, addrs| {
            if addrs.is_empty() {
                return Err("at least one address is needed".into());
            }
            c.listen = addrs.iter().map(|a| ListenAddr::parse(a)).collect::<Result<_, _>>()?;
            c.listen_given = true;
            Ok(())
        },
        shows: |c| Some(c.listen.iter().map(ListenAddr::as_setting).collect::<Vec<_>>().join(","));

    /// Where the queue lives [default: $STATE_DIRECTORY, else the per-user data dir]
    #[arg(long, value_name = "PATH", env = "GROUPRELAY_DATA_DIR")]
    data_dir: PathBuf,
        apply: |c, dir| {
            c.queue.data_dir = dir;
            Ok(())
        },
        shows: |_| None;

    /// Segment API to forward to
    #[arg(long, value_name = "URL", env = "GROUPRELAY_UPSTREAM")]
    upstream: String,
        apply: |c, url| {
            let url = url.trim_end_matches('/');
            match url.parse::<hyper::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some_and(|h| !h.is_empty()) => {}
                _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
            }
            c.upstream.url = url.to_owned();
            Ok(())
        },
        shows: |c| Some(c.upstream.url.clone());

    /// Egress proxy for upstream: http://[user:password@]host:port, or none to ignore the proxy variables (the password is never logged) [default: from HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY]
    #[arg(long, value_name = "URL", env = "GROUPRELAY_UPSTREAM_PROXY", hide_env_values = true)]
    upstream_proxy: String,
        apply: |c, text| {
            c.upstream.proxy = ProxySetting::parse(&text)?;
            Ok(())
        },
        shows: |_| None;

    /// PEM certificates to trust for upstream's TLS beside the system's roots [default: none]
    #[arg(long, value_name = "PATH", env = "GROUPRELAY_UPSTREAM_CA_FILE")]
    upstream_ca_file: PathBuf,
        apply: |c, path| {
            load_ca_file(&path)?;
            c.upstream.ca_file = Some(path);
            Ok(())
        },
        shows: |_| None;

    /// writeKey for requests that carry none (never logged)
    #[arg(long, value_name = "KEY", env = "GROUPRELAY_WRITE_KEY", hide_env_values = true)]
    write_key: String,
        apply: |c, key| {
            if key.is_empty() {
                return Err("must not be empty".into());
            }
            c.ingest.write_key = Some(key);
            Ok(())
        },
        shows: |_| None;

    /// When a 200 is sent: fsync (after an fdatasync covering the call) or interval
    #[arg(long, value_name = "MODE", env = "GROUPRELAY_DURABILITY")]
    durability: Durability,
        apply: |c, mode| {
            c.queue.durability = mode;
            Ok(())
        },
        shows: |c| Some(c.queue.durability.to_string());

    /// Stored bytes past which new calls get 429
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_QUEUE_BYTES")]
    max_queue_bytes: u64,
        apply: |c, n| {
            c.queue.max_bytes = positive(n)?;
            Ok(())
        },
        shows: |c| Some(c.queue.max_bytes.to_string());

    /// Free bytes to keep on the data dir's filesystem; below it new calls get 429; 0 turns it off
    #[arg(long, value_name = "N", env = "GROUPRELAY_MIN_FREE_DISK_BYTES")]
    min_free_disk_bytes: u64,
        apply: |c, n| {
            c.queue.min_free_bytes = n;
            Ok(())
        },
        shows: |c| Some(c.queue.min_free_bytes.to_string());

    /// Where the admin API listens, unix:PATH [default: $RUNTIME_DIRECTORY/admin.sock under systemd, else <data-dir>/admin.sock]
    #[arg(long, value_name = "unix:PATH", env = "GROUPRELAY_ADMIN_LISTEN")]
    admin_listen: String,
        apply: |c, text| {
            c.admin.listen = Some(parse_admin_listen(&text)?);
            Ok(())
        },
        shows: |_| None;

    /// Group whose members may use the admin socket (made 0660, this group); without it, only root and grouprelay's own user (0600)
    #[arg(long, value_name = "NAME", env = "GROUPRELAY_ADMIN_GROUP")]
    admin_group: String,
        apply: |c, name| {
            Group::named(&name)?;
            c.admin.group = Some(name);
            Ok(())
        },
        shows: |_| None;

    /// Disk the queue's files may take before they are rebuilt to give space back (once most of it is free space); 0 turns it off
    #[arg(long, value_name = "N", env = "GROUPRELAY_REBUILD_ABOVE_BYTES")]
    rebuild_above_bytes: u64,
        apply: |c, n| {
            c.queue.rebuild_above_bytes = n;
            Ok(())
        },
        shows: |c| Some(c.queue.rebuild_above_bytes.to_string());

    /// How long a partial upstream batch may wait, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_FLUSH_INTERVAL_MS")]
    flush_interval_ms: u64,
        apply: |c, ms| {
            c.forward.flush_interval = Duration::from_millis(positive(ms)?);
            Ok(())
        },
        shows: |c| Some(c.forward.flush_interval.as_millis().to_string());

    /// Largest request body, after gzip decoding, in bytes
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_BODY_BYTES")]
    max_body_bytes: usize,
        apply: |c, n| {
            c.ingest.max_body_bytes = positive(n)?;
            Ok(())
        },
        shows: |c| Some(c.ingest.max_body_bytes.to_string());

    /// In interval mode, how often the queue is flushed to disk, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_SYNC_INTERVAL_MS")]
    sync_interval_ms: u64,
        apply: |c, ms| {
            c.queue.sync_interval = Duration::from_millis(positive(ms)?);
            Ok(())
        },
        shows: |c| Some(c.queue.sync_interval.as_millis().to_string());

    /// Allow listening on addresses other than loopback
    #[arg(long, env = "GROUPRELAY_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    allow_remote: bool,
        apply: |c, allow| {
            c.allow_remote = allow;
            Ok(())
        },
        shows: |c| Some(c.allow_remote.to_string());

    /// Most calls in one upstream batch, at most 2500
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_BATCH_EVENTS")]
    max_batch_events: usize,
        apply: |c, n| {
            if n > MAX_BATCH_EVENTS {
                return Err(format!("{n} is over upstream's limit of {MAX_BATCH_EVENTS}"));
            }
            c.forward.max_batch_events = positive(n)?;
            Ok(())
        },
        shows: |c| Some(c.forward.max_batch_events.to_string());

    /// gzip upstream request bodies
    #[arg(long, env = "GROUPRELAY_UPSTREAM_GZIP", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    upstream_gzip: bool,
        apply: |c, gzip| {
            c.upstream.gzip = gzip;
            Ok(())
        },
        shows: |c| Some(c.upstream.gzip.to_string());

    /// Upstream request timeout, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_UPSTREAM_TIMEOUT_MS")]
    upstream_timeout_ms: u64,
        apply: |c, ms| {
            c.upstream.timeout = Duration::from_millis(positive(ms)?);
            Ok(())
        },
        shows: |c| Some(c.upstream.timeout.as_millis().to_string());

    /// Upstream batches in flight at once
    #[arg(long, value_name = "N", env = "GROUPRELAY_UPSTREAM_CONCURRENCY")]
    upstream_concurrency: usize,
        apply: |c, n| {
            c.forward.concurrency = positive(n)?;
            Ok(())
        },
        shows: |c| Some(c.forward.concurrency.to_string());

    /// Longest wait between retries, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_RETRY_MAX_INTERVAL_MS")]
    retry_max_interval_ms: u64,
        apply: |c, ms| {
            c.forward.retry_max_interval = Duration::from_millis(positive(ms)?);
            Ok(())
        },
        shows: |c| Some(c.forward.retry_max_interval.as_millis().to_string());

    /// Calls older than this are dead-lettered as expired instead of sent: 7d, 12h, 30m, 90s
    #[arg(long, value_name = "AGE", env = "GROUPRELAY_MAX_AGE")]
    max_age: String,
        apply: |c, text| {
            c.forward.max_age = parse_age(&text)
                .ok_or_else(|| format!("{text:?} is not an age like 7d, 12h, 30m or 90s"))?;
            Ok(())
        },
        shows: |c| Some(age_text(c.forward.max_age));

    /// On shutdown, how long to keep delivering the queue, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: u64,
        apply: |c, ms| {
            c.forward.drain_timeout = Duration::from_millis(ms);
            Ok(())
        },
        shows: |c| Some(c.forward.drain_timeout.as_millis().to_string());

    /// Only these writeKeys are accepted; calls for any other get 403. Comma-separated (never logged) [default: any key]
    #[arg(long, value_name = "KEYS", env = "GROUPRELAY_ALLOWED_WRITE_KEYS", hide_env_values = true, value_delimiter = ',')]
    allowed_write_keys: Vec<String>,
        apply: |c, keys| {
            let keys: HashSet<String> = keys
                .into_iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                return Err("lists no key (leave it out to accept any key)".into());
            }
            c.ingest.allowed_write_keys = Some(keys);
            Ok(())
        },
        shows: |_| None;

    /// A client must send a request's headers within this time, in ms
    #[arg(long, value_name = "N", env = "GROUPRELAY_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: u64,
        apply: |c, ms| {
            c.server.header_read_timeout = Duration::from_millis(positive(ms)?);
            Ok(())
        },
        shows: |c| Some(c.server.header_read_timeout.as_millis().to_string());

    /// Most client connections open at once; further ones wait in the listen backlog
    #[arg(long, value_name = "N", env = "GROUPRELAY_MAX_CONNECTIONS")]
    max_connections: usize,
        apply: |c, n| {
            c.server.max_connections = positive(n)?;
            Ok(())
        },
        shows: |c| Some(c.server.max_connections.to_string());

    /// Log lines as text or json (one JSON object per line)
    #[arg(long, value_name = "FORMAT", env = "GROUPRELAY_LOG_FORMAT")]
    log_format: LogFormat,
        apply: |c, format| {
            c.log_format = format;
            Ok(())
        },
        shows: |c| Some(c.log_format.to_string());

    /// lean: large freed blocks go back to the system (smallest RSS); throughput: they are kept and reused (less CPU per call under batch traffic, about twice the RSS under it)
    #[arg(long, value_name = "PROFILE", env = "GROUPRELAY_MEMORY_PROFILE")]
    memory_profile: MemoryProfile,
        apply: |c, profile| {
            c.memory_profile = profile;
            Ok(())
        },
        shows: |c| Some(c.memory_profile.to_string());
}

/// Adds each setting's default, as [`Config::default`] has it, to its line in `command`'s
/// `--help` (`run` and `validate` take these settings).
pub fn with_defaults_in_help(command: clap::Command) -> clap::Command {
    let defaults = Config::default();
    SETTINGS.iter().fold(command, |command, setting| {
        match (setting.shown_default)(&defaults) {
            Some(value) => command.mut_arg(setting.name, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {value}]"))
            }),
            None => command,
        }
    })
}

/// Each setting's file key and its default as `--help` shows it.
pub fn shown_defaults() -> Vec<(String, Option<String>)> {
    let defaults = Config::default();
    SETTINGS
        .iter()
        .map(|setting| (setting.key(), (setting.shown_default)(&defaults)))
        .collect()
}

fn positive<N: Default + PartialEq>(n: N) -> Result<N, String> {
    if n == N::default() {
        return Err("must be greater than 0".into());
    }
    Ok(n)
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

/// An age as [`parse_age`] reads it, in the largest unit that divides it.
fn age_text(age: Duration) -> String {
    let ms = age.as_millis();
    let units: [(u128, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    units.iter().find(|(unit, _)| ms % unit == 0).map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_take_units() {
        assert_eq!(parse_age("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_age("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_age("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_age("0s"), None);
        assert_eq!(parse_age("1w"), None);
    }

    #[test]
    fn ages_show_as_they_are_written() {
        for text in ["7d", "12h", "30m", "90s", "250ms"] {
            assert_eq!(age_text(parse_age(text).unwrap()), text);
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<Settings>("listn = []").is_err());
    }

    #[test]
    fn every_setting_is_a_file_key() {
        for setting in SETTINGS {
            let text = format!("{} = 1", setting.key());
            if let Err(e) = toml::from_str::<Settings>(&text) {
                assert!(
                    !e.message().contains("unknown field"),
                    "{}: {e}",
                    setting.key()
                );
            }
        }
    }
}
