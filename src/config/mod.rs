//! Configuration: one typed [`Config`] in sections, resolved once at start from
//! flags > environment > file > defaults.
//!
//! Each setting is defined once, in [`settings`]: its flag, variable and file key, type and
//! help, and where its value lands. Each default is a `DEFAULT_*` constant beside the code
//! that uses it, and [`Config::default`] gathers them: the queue's in [`crate::queue`], the
//! forwarder's in [`crate::forward`], the upstream client's in
//! [`crate::forward::upstream`], the connections' in [`crate::server`], the call path's in
//! [`crate::http::ingest`]. A test (`tests/settings.rs`) checks that `--help`, the packaged TOML
//! and the README's settings table show those defaults.
//!
//! Resolving is one overlay: the flags and environment (as clap parsed them) over the file
//! over the defaults; each given value is checked on its own as it is applied, then the
//! rules that join two settings are checked ([`Config::check`]). Every problem is a
//! [`ConfigError`] naming the setting, and the binary exits 2 on it.

mod listen;
pub mod settings;

use std::path::{Path, PathBuf};

use crate::forward::upstream::UpstreamSettings;
use crate::forward::ForwardSettings;
use crate::http::ingest::IngestSettings;
use crate::queue::QueueOptions;
use crate::server::ServerSettings;
pub use listen::{ListenAddr, DEFAULT_LISTEN};
pub use settings::Settings;

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/grouprelay/grouprelay.toml";

/// The resolved configuration, a section for each part that takes settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: Vec<ListenAddr>,
    /// Whether `listen` may name addresses beyond loopback.
    pub allow_remote: bool,
    /// How connections are served.
    pub server: ServerSettings,
    /// Which writeKeys are taken, and how large a body.
    pub ingest: IngestSettings,
    /// The queue: its data dir, durability mode and limits.
    pub queue: QueueOptions,
    /// Where batches go.
    pub upstream: UpstreamSettings,
    /// Batching, retries, expiry and the drain.
    pub forward: ForwardSettings,
    pub log_format: LogFormat,
}

impl Default for Config {
    /// Every default; the data dir is `$STATE_DIRECTORY` or the per-user data dir (empty
    /// when there is neither, which [`Config::check`] refuses).
    fn default() -> Config {
        Config {
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN)],
            allow_remote: false,
            server: ServerSettings::default(),
            ingest: IngestSettings::default(),
            queue: QueueOptions::new(default_data_dir().unwrap_or_default()),
            upstream: UpstreamSettings::default(),
            forward: ForwardSettings::default(),
            log_format: LogFormat::default(),
        }
    }
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable; coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected \"text\" or \"json\", got {other:?}")),
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

    fn from_settings(settings: Settings) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        settings.apply_to(&mut config)?;
        config.check()?;
        Ok(config)
    }

    /// The rules that join two settings.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(remote) = self.listen.iter().find(|addr| !addr.is_local()) {
            if !self.allow_remote {
                return Err(ConfigError::new(
                    "--listen",
                    format!(
                        "{} is not a loopback address; pass --allow-remote to listen on it",
                        remote.as_setting()
                    ),
                ));
            }
        }
        if let (Some(key), Some(allowed)) =
            (&self.ingest.write_key, &self.ingest.allowed_write_keys)
        {
            if !allowed.contains(key) {
                return Err(ConfigError::new(
                    "--write-key",
                    "is not in --allowed-write-keys",
                ));
            }
        }
        if self.queue.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "--data-dir",
                "not given, $STATE_DIRECTORY is unset and there is no per-user data dir",
            ));
        }
        Ok(())
    }
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
    use crate::queue::Durability;
    use std::time::Duration;

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
        assert_eq!(config.queue.max_bytes, 20);
        assert_eq!(config.queue.durability, Durability::Interval);
        assert_eq!(
            config.listen,
            vec![ListenAddr::Tcp("127.0.0.1:9000".parse().unwrap())]
        );
        assert_eq!(config.forward.flush_interval, Duration::from_millis(500));
    }

    #[test]
    fn remote_addresses_need_allow_remote() {
        let with = |listen: &str, allow_remote: bool| {
            Config::from_settings(Settings {
                listen: Some(vec![listen.to_owned()]),
                allow_remote: Some(allow_remote),
                data_dir: Some("/tmp/x".into()),
                ..Settings::default()
            })
        };
        assert!(with("0.0.0.0:8788", false).is_err());
        assert!(with("0.0.0.0:8788", true).is_ok());
        assert!(with("[::1]:8788", false).is_ok());
        assert!(with("unix:/run/x.sock", false).is_ok());
    }

    #[test]
    fn the_write_key_must_be_allowed() {
        let error = Config::from_settings(Settings {
            write_key: Some("a".into()),
            allowed_write_keys: Some(vec!["b".into()]),
            data_dir: Some("/tmp/x".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(error.setting, "--write-key");
    }
}
