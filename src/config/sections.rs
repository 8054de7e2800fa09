//! The resolved configuration: one section for each part that takes settings, each with
//! its defaults, and the rules that join two settings.

use crate::forward::upstream::UpstreamSettings;
use crate::forward::ForwardSettings;
use crate::http::ingest::IngestSettings;
use crate::memory::MemoryProfile;
use crate::queue::QueueOptions;
use crate::server::operator::AdminSettings;
use crate::server::{ListenAddr, ServerSettings, DEFAULT_LISTEN};

use super::data_dir::default_data_dir;
use super::error::ConfigError;

/// The resolved configuration, a section for each part that takes settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: Vec<ListenAddr>,
    /// Whether `listen` was given (not the default): with sockets passed by the service
    /// manager, only a given `listen` is bound as well.
    pub listen_given: bool,
    /// Whether `listen` may name addresses beyond loopback.
    pub allow_remote: bool,
    /// How connections are served.
    pub server: ServerSettings,
    /// The admin socket: where, and who may use it.
    pub admin: AdminSettings,
    /// Which writeKeys are taken, and how large a body.
    pub ingest: IngestSettings,
    /// The queue: its data dir, durability mode and limits.
    pub queue: QueueOptions,
    /// Where batches go.
    pub upstream: UpstreamSettings,
    /// Batching, retries, expiry and the drain.
    pub forward: ForwardSettings,
    pub log_format: LogFormat,
    /// How the allocator trades resident memory for CPU.
    pub memory_profile: MemoryProfile,
}

impl Default for Config {
    /// Every default; the data dir is `$STATE_DIRECTORY` or the per-user data dir (empty
    /// when there is neither, which [`Config::check`] refuses).
    fn default() -> Config {
        Config {
            listen: vec![ListenAddr::Tcp(DEFAULT_LISTEN)],
            listen_given: false,
            allow_remote: false,
            server: ServerSettings::default(),
            admin: AdminSettings::default(),
            ingest: IngestSettings::default(),
            queue: QueueOptions::new(default_data_dir().unwrap_or_default()),
            upstream: UpstreamSettings::default(),
            forward: ForwardSettings::default(),
            log_format: LogFormat::default(),
            memory_profile: MemoryProfile::default(),
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

impl Config {
    /// The rules that join two settings.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
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
        if let Ok(upstream) = self.upstream.url.parse::<hyper::Uri>() {
            self.upstream
                .proxy
                .resolve(&upstream)
                .map_err(|e| ConfigError::new("--upstream-proxy", e))?;
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
