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

mod data_dir;
mod error;
mod resolve;
mod sections;
pub mod settings;

pub use data_dir::create_data_dir;
pub use error::ConfigError;
pub use resolve::DEFAULT_CONFIG_FILE;
pub use sections::{Config, LogFormat};
pub use settings::Settings;
