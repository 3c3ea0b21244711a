//! The one small generator and the one string hash every crate uses where a result must be the
//! same on every machine and every Rust version (data order and splits, example selection, score
//! cache fingerprints, decoding's writer and token draws, the fuzzers): `std`'s `DefaultHasher`
//! and `rand`'s default generators promise neither.

/// SplitMix64 (Steele, Lea & Flood, 2014): `state ← state + φ·2⁶⁴`, output [`mix64`]`(state)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// A uniform draw in [0, 1) from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal draw by Box–Muller: `√(−2 ln u₁) · cos(2π u₂)` from two uniform draws,
    /// `u₁` in (0, 1].
    pub fn standard_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An index in `0..n` (`next_u64() mod n`; `n = 0` is taken as 1).
    pub fn index(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// SplitMix64's finaliser: a bijection of `u64` that spreads every input bit over the output.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A stable 64-bit hash of a string: [`stable_hash_bytes`] of its UTF-8 bytes.
pub fn stable_hash(s: &str) -> u64 {
    stable_hash_bytes(s.as_bytes())
}

/// A stable 64-bit hash of bytes: the first SplitMix64 output seeded with their FNV-1a hash (FNV
/// alone leaves inputs that differ in their last bytes close in the high bits).
pub fn stable_hash_bytes(bytes: &[u8]) -> u64 {
    SplitMix64(fnv1a(bytes)).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_normal_draws_have_the_normal_moments_and_mass() {
        let mut rng = SplitMix64(11);
        let n = 200_000;
        let draws: Vec<f64> = (0..n).map(|_| rng.standard_normal()).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let within_one = draws.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        // Standard errors at n = 200,000: mean 0.0022, variance 0.0032, mass 0.0010.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
        assert!(
            (within_one - 0.682_689).abs() < 0.005,
            "P(|x| < 1) = {within_one}"
        );
    }

    #[test]
    fn an_index_is_the_next_draw_modulo_n() {
        let mut rng = SplitMix64(5);
        let mut draws = SplitMix64(5);
        for n in [1, 2, 3, 7, 1000, usize::MAX] {
            assert_eq!(
                rng.index(n),
                (draws.next_u64() % n as u64) as usize,
                "n = {n}"
            );
        }
        // n = 0 is taken as 1, and the draw is still made.
        assert_eq!(rng.index(0), 0);
        draws.next_u64();
        assert_eq!(rng.next_u64(), draws.next_u64());
    }

    #[test]
    fn the_generator_and_hashes_match_their_published_values() {
        // FNV-1a test vectors (Fowler, Noll, Vo).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        // SplitMix64 from seed 0: the reference implementation's first outputs.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let u = SplitMix64(7).uniform();
        assert!((0.0..1.0).contains(&u));
        assert_eq!(stable_hash("doc-1"), SplitMix64(fnv1a(b"doc-1")).next_u64());
    }
}
