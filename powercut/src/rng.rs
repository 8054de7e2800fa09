//! A tiny seeded PRNG (splitmix64): the cut's only source of chance, so one seed gives one image.

/// splitmix64 (Steele, Lea, Flood 2014): a 64-bit state stepped by a constant and mixed.
/// Not for cryptography; plenty for choosing which unsynced writes survive a cut.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent generator for one object (a file or directory node) of a cut seeded with
    /// `seed`. Deriving one stream per node keeps each node's fate independent of how many draws
    /// the other nodes made, so adding a file to a workload does not reshuffle every other file.
    pub(crate) fn for_node(seed: u64, node: u64) -> Rng {
        let mut mixer = Rng::new(seed ^ node.wrapping_mul(GOLDEN_GAMMA).rotate_left(17));
        Rng::new(mixer.next_u64() ^ node)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; 0 when `n` is 0. The modulo bias is irrelevant at these sizes.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A fair coin.
    pub(crate) fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_stream_and_nodes_differ() {
        let a: Vec<u64> = (0..8).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Rng::for_node(7, 1);
        let mut y = Rng::for_node(7, 2);
        assert_ne!(x.next_u64(), y.next_u64());
        let mut r = Rng::new(1);
        let coins = (0..1000).filter(|_| r.coin()).count();
        assert!(
            (400..600).contains(&coins),
            "coin is far from fair: {coins}"
        );
        assert!((0..1000).all(|_| r.below(5) < 5));
        assert_eq!(r.below(0), 0);
    }
}
