//! Randomised tests' choices: a seed each run prints, so that any run can be replayed, and a
//! small deterministic generator.

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

/// A small deterministic generator (splitmix64): any seed, 0 included.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
