//! The CPU's f32 multiply-add rate: the compute ceiling of a step of several rows from the
//! blocks ([`crate::BlockMatrix`]), each of whose rows multiplies every weight once.

use std::hint::black_box;
use std::time::Instant;

use crate::quantised::Kernel;

/// Independent chains of fused multiply-adds per participant: more than a multiply-add's latency
/// times the instructions a cycle (4 × 2 on Zen 5), so that no chain waits for its own last one.
const CHAINS: usize = 12;

/// Vector multiply-adds per timing, over all participants: 2²⁸, ≈ 20–40 ms on two cores with
/// AVX-512.
const INSTRUCTIONS: usize = 1 << 28;

/// The f32 multiply-add rate of every thread of the team together, in GFLOP/s (a multiply-add
/// counts two): [`INSTRUCTIONS`] fused multiply-adds in the CPU's widest vectors
/// ([`Kernel::detect`]: 16 lanes with AVX-512, 8 with AVX2, 1 in portable Rust), in [`CHAINS`]
/// independent chains, shared out over the team ([`crate::team`]) in 8 items per thread — the
/// best of 5 timings, `INSTRUCTIONS · lanes · 2 / seconds`. Nothing is read from memory, so no
/// product of weights runs faster: a step of n rows from the blocks takes at least
/// `2 · n · weights / rate` seconds.
pub fn multiply_add_gflops() -> f64 {
    let kernel = Kernel::detect();
    let items_count = 8 * crate::team::participants();
    let rounds = INSTRUCTIONS / items_count / CHAINS;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let mut items = vec![0.0f32; items_count];
        let started = Instant::now();
        crate::team::for_each_mut(
            &mut items,
            || (),
            |_, sum| *sum = chains(kernel, black_box(rounds), 0.999_999, 1e-7),
        );
        best = best.min(started.elapsed().as_secs_f64());
        black_box(&items);
    }
    let instructions = (items_count * rounds * CHAINS) as f64;
    instructions * kernel.lanes() as f64 * 2.0 / best / 1e9
}

/// `rounds` rounds of [`CHAINS`] independent `a ← a·b + c` in every lane from `a = 1`, summed over
/// the chains and lanes. (The probe's `b = 0.999999`, `c = 10⁻⁷` keep `a` near `c / (1 − b) =
/// 0.1`, away from subnormal numbers, which some CPUs multiply slowly.)
fn chains(kernel: Kernel, rounds: usize, b: f32, c: f32) -> f32 {
    match kernel {
        // SAFETY: the CPU has AVX-512F (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { simd::chains_avx512(rounds, b, c) },
        // SAFETY: the CPU has AVX2 and FMA (`Kernel::detect`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { simd::chains_avx2(rounds, b, c) },
        Kernel::Portable => {
            let mut acc = [1.0f32; CHAINS];
            for _ in 0..rounds {
                for a in &mut acc {
                    *a = *a * b + c;
                }
            }
            acc.iter().sum()
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// [`super::chains`] in 16 lanes.
    ///
    /// # Safety
    /// The CPU runs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chains_avx512(rounds: usize, b: f32, c: f32) -> f32 {
        let (b, c) = (_mm512_set1_ps(b), _mm512_set1_ps(c));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
        _mm512_reduce_add_ps(sum)
    }

    /// [`super::chains`] in 8 lanes.
    ///
    /// # Safety
    /// The CPU runs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chains_avx2(rounds: usize, b: f32, c: f32) -> f32 {
        let (b, c) = (_mm256_set1_ps(b), _mm256_set1_ps(c));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel runs `rounds` multiply-adds in each of its [`CHAINS`] chains and lanes, the
    /// count the rate is computed from: with `b = c = 1` each chain ends at `rounds + 1`, exactly
    /// in f32, so the sum is `CHAINS · lanes · (rounds + 1)`; with `b = 1/2` the product is seen.
    #[test]
    fn every_kernel_runs_rounds_multiply_adds_in_every_chain_and_lane() {
        let rounds = 1000;
        for kernel in Kernel::available() {
            let expected = (CHAINS * kernel.lanes() * (rounds + 1)) as f32;
            assert_eq!(chains(kernel, rounds, 1.0, 1.0), expected, "{kernel:?}");
            // `a ← a/2 + 1` from 1 is 2 − 2⁻ⁿ after n rounds, exact in f32 for n = 10.
            let expected = (CHAINS * kernel.lanes()) as f32 * (2.0 - 1.0 / 1024.0);
            assert_eq!(chains(kernel, 10, 0.5, 1.0), expected, "{kernel:?}");
        }
    }

    /// The rate is the multiply-adds counted over the time taken: near one thread's rate timed
    /// here on the same chains, times at most the team's participants. The band is wide (a factor
    /// of 8 either way, for a machine busy with other tests), so it catches a miscounted rate — the
    /// lanes, the seconds or the giga inverted — not a slow one.
    #[test]
    fn the_rate_is_near_one_threads_rate_times_the_participants() {
        let kernel = Kernel::detect();
        let rounds = 1 << 20;
        let seconds = (0..5)
            .map(|_| {
                let started = Instant::now();
                black_box(chains(kernel, black_box(rounds), 0.999_999, 1e-7));
                started.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let one_thread = (rounds * CHAINS * kernel.lanes() * 2) as f64 / seconds / 1e9;
        let rate = multiply_add_gflops();
        let participants = crate::team::participants() as f64;
        assert!(
            rate > one_thread / 8.0 && rate < one_thread * participants * 8.0,
            "{rate} GFLOP/s on {participants} threads, {one_thread} GFLOP/s on one ({kernel:?})"
        );
    }
}
