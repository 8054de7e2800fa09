//! Randomised tests' choices: a seed each run prints, so that any run can be replayed.

/// The seed of a randomised test: `GROUPRELAY_TEST_SEED` when set (to replay a run), else
/// the clock. Tests print it, so that any run can be replayed.
pub fn test_seed() -> u64 {
    std::env::var("GROUPRELAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}
