//! A setting that cannot be used, and why: the one error configuration has.

/// A setting that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub setting: String,
    pub problem: String,
}

impl ConfigError {
    pub(super) fn new(setting: &str, problem: impl Into<String>) -> ConfigError {
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
