//! Resolving: the flags and environment over the config file over the defaults, into one
//! checked [`Config`].

use std::path::Path;

use super::error::ConfigError;
use super::sections::Config;
use super::settings::Settings;

/// Read when no `--config` is given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/grouprelay/grouprelay.toml";

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

    pub(super) fn from_settings(settings: Settings) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        settings.apply_to(&mut config)?;
        config.check()?;
        Ok(config)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Durability;
    use crate::server::ListenAddr;
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
