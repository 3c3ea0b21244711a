//! The ELBO with free bits, the importance-weighted bound, mutual information and active units.

use burn::prelude::*;
use chorus_latent::DiagonalGaussian;

use crate::logsumexp;

/// Free bits: `Σ_d max(λ, KL_d)` per sequence. Dimensions whose KL is below λ contribute the
/// constant λ, so their gradient is exactly zero; λ = 0 gives the plain KL sum.
///
/// # Shapes
/// - kl: `[batch, d_latent]` per-dimension KL
/// - output: `[batch]`
pub fn kl_free_bits<B: Backend>(kl: Tensor<B, 2>, lambda: f64) -> Tensor<B, 1> {
    let kl = if lambda > 0.0 {
        kl.clamp_min(lambda)
    } else {
        kl
    };
    kl.sum_dim(1).squeeze_dim::<1>(1)
}

/// The terms of `L(x, c) = E_q[log p(x | z, c)] − β Σ_d max(λ, KL_d)` for one batch, each summed
/// over a sequence's tokens (not length-weighted), estimated with the given z samples.
#[derive(Debug, Clone)]
pub struct ElboTerms<B: Backend> {
    /// `[batch]`: the Monte Carlo estimate of `E_q[log p(x | z, c)]` (mean over samples).
    pub reconstruction: Tensor<B, 1>,
    /// `[batch]`: `Σ_d KL(q(z_d | x, c) ‖ p(z_d | c))`, without free bits (what is reported).
    pub kl: Tensor<B, 1>,
    /// `[batch]`: `Σ_d max(λ, KL_d)`, the term that is optimised.
    pub kl_free_bits: Tensor<B, 1>,
    /// β at this step.
    pub beta: f64,
    /// `[batch]`: the bag-of-words log-likelihood of the target under z
    /// ([`bag_of_words_log_likelihood`]), when the objective has that term ([`with_bag_of_words`]).
    pub bag_of_words: Option<Tensor<B, 1>>,
    /// Scalar: `mean_batch(−reconstruction + β · kl_free_bits − α · bag_of_words)`, the loss to
    /// minimise (α = 0 without the bag-of-words term).
    pub loss: Tensor<B, 1>,
}

/// Assembles the ELBO terms.
///
/// # Shapes
/// - log_px: `[n_samples, batch]`, `log p(x | z_s, c)` for each sample
/// - kl: `[batch, d_latent]`, per-dimension KL (zeros when there is no z)
pub fn elbo_terms<B: Backend>(
    log_px: Tensor<B, 2>,
    kl: Tensor<B, 2>,
    beta: f64,
    free_bits: f64,
) -> ElboTerms<B> {
    let reconstruction = log_px.mean_dim(0).squeeze_dim::<1>(0);
    let kl_fb = kl_free_bits(kl.clone(), free_bits);
    let kl = kl.sum_dim(1).squeeze_dim::<1>(1);
    let loss = (reconstruction.clone().neg() + kl_fb.clone() * beta).mean();
    ElboTerms {
        reconstruction,
        kl,
        kl_free_bits: kl_fb,
        beta,
        bag_of_words: None,
        loss,
    }
}

/// The bag-of-words log-likelihood of each row's target tokens under one distribution over the
/// vocabulary, `log p_bow(x | z) = Σ_t m_t · log softmax(ℓ)_{x_t}` with `ℓ = W z + b` — Zhao et
/// al. (2017)'s auxiliary term, which only a z that knows the target's words can raise.
///
/// # Shapes
/// - logits: `[batch, vocab]`, `ℓ` per row
/// - targets: `[batch, seq]`
/// - mask: `[batch, seq]`, 1.0 at the target's positions
/// - output: `[batch]`
pub fn bag_of_words_log_likelihood<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let log_probs = logits.clone() - logsumexp(logits, 1); // [b, vocab]
    let per_token = log_probs.gather(1, targets) * mask; // [b, seq]
    per_token.sum_dim(1).squeeze_dim::<1>(1)
}

/// `terms` with the bag-of-words term of weight `weight` (α ≥ 0): the loss becomes
/// `mean_batch(−reconstruction + β · kl_free_bits − α · log p_bow(x | z))`. The term is no part of
/// the likelihood: it shapes what z carries, and evaluation ignores it.
///
/// # Shapes
/// - log_bow: `[batch]`, [`bag_of_words_log_likelihood`] (averaged over z's samples)
pub fn with_bag_of_words<B: Backend>(
    terms: ElboTerms<B>,
    log_bow: Tensor<B, 1>,
    weight: f64,
) -> ElboTerms<B> {
    let loss = terms.loss - log_bow.clone().mean() * weight;
    ElboTerms {
        bag_of_words: Some(log_bow),
        loss,
        ..terms
    }
}

/// Importance-weighted estimate of `log p(x | c)` with S samples `z_s ~ q`:
/// `logsumexp_s [log p(x | z_s, c) + log p(z_s | c) − log q(z_s | x, c)] − log S`.
/// Its expectation is a lower bound on `log p(x | c)` that tightens as S grows (S = 1: the ELBO).
///
/// # Shapes
/// - log_px, log_pz, log_qz: `[n_samples, batch]`
/// - output: `[batch]`
pub fn iw_log_likelihood<B: Backend>(
    log_px: Tensor<B, 2>,
    log_pz: Tensor<B, 2>,
    log_qz: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [n_samples, _] = log_px.dims();
    let log_w = log_px + log_pz - log_qz;
    (logsumexp(log_w, 0) - (n_samples as f64).ln()).squeeze_dim::<1>(0)
}

/// Mutual information `I_q(x; z)` between data and code under the aggregate posterior, with He et
/// al. (2019)'s estimator over a batch of N posteriors:
/// `I = E_x[−H(q(z|x))] − E_{x, z~q(z|x)}[log q(z)]`, `log q(z) ≈ logsumexp_n log q(z | x_n) − log N`,
/// the second expectation over the M draws `z = μ + σ ⊙ ε` per posterior that `eps` gives (so a
/// caller that seeds `eps` gets the same estimate every time). The N × N densities are evaluated a
/// block of draws at a time, so memory stays O(N · d) whatever N.
///
/// # Shapes
/// - posterior: `[n, d_latent]`
/// - eps: `[m, n, d_latent]`
pub fn mutual_information<B: Backend>(posterior: &DiagonalGaussian<B>, eps: Tensor<B, 3>) -> f64 {
    let [n, d_latent] = posterior.dims();
    let [m, _, _] = eps.dims();
    let neg_entropy = posterior.entropy().neg().mean().into_scalar().elem::<f64>(); // E_x[−H]
    let z = posterior.reparameterize(eps).reshape([m * n, 1, d_latent]);
    // Blocks of draws of about 2^22 densities' worth of elements each.
    let block = ((1usize << 22) / (n * d_latent).max(1)).clamp(1, (m * n).max(1));
    let mut sum_log_qz = 0.0;
    for start in (0..m * n).step_by(block) {
        let rows = block.min(m * n - start);
        // log q(z_i | x_j) for every draw i of the block against every posterior j.
        let z = z.clone().narrow(0, start, rows).expand([rows, n, d_latent]); // [i, j, d]
        let log_density = posterior.log_prob(z); // [i, j]
        let log_qz = logsumexp(log_density, 1) - (n as f64).ln(); // [i, 1]
        sum_log_qz += log_qz.sum().into_scalar().elem::<f64>();
    }
    neg_entropy - sum_log_qz / (m * n) as f64
}

/// Active units: the number of dimensions d with `Var_x(E_q[z_d]) > threshold` (0.01 in the
/// literature) across the rows of `means` `[n, d_latent]` ([`MeanMoments::active_units`]).
pub fn active_units<B: Backend>(means: Tensor<B, 2>, threshold: f64) -> usize {
    MeanMoments::of(means).active_units(threshold)
}

/// The per-dimension mean and sum of squared deviations of posterior means `E_q[z]` over n
/// examples — what [`active_units`] needs — mergeable across chunks of data without keeping the
/// means (Chan et al.'s pairwise update: `M2 = M2_a + M2_b + δ² n_a n_b / n`, `δ = mean_b − mean_a`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeanMoments {
    /// Examples seen.
    pub n: usize,
    /// Per dimension, the mean of `E_q[z_d]`.
    pub mean: Vec<f64>,
    /// Per dimension, `Σ_x (E_q[z_d] − mean_d)²`.
    pub m2: Vec<f64>,
}

impl MeanMoments {
    /// The moments of the rows of `means` `[n, d_latent]`.
    pub fn of<B: Backend>(means: Tensor<B, 2>) -> Self {
        let [n, d] = means.dims();
        let values = means
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64 data");
        let mut mean = vec![0.0; d];
        for row in values.chunks_exact(d.max(1)) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n as f64;
            }
        }
        let mut m2 = vec![0.0; d];
        for row in values.chunks_exact(d.max(1)) {
            for ((s, v), m) in m2.iter_mut().zip(row).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        Self { n, mean, m2 }
    }

    /// Adds the examples of `other` (same dimension, or either empty).
    pub fn merge(&mut self, other: &Self) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = other.clone();
            return;
        }
        let n = (self.n + other.n) as f64;
        let (n_a, n_b) = (self.n as f64, other.n as f64);
        for d in 0..self.mean.len() {
            let delta = other.mean[d] - self.mean[d];
            self.m2[d] += other.m2[d] + delta * delta * n_a * n_b / n;
            self.mean[d] += delta * n_b / n;
        }
        self.n += other.n;
    }

    /// Dimensions whose sample variance `M2 / (n − 1)` exceeds `threshold` (none for n < 2).
    pub fn active_units(&self, threshold: f64) -> usize {
        if self.n < 2 {
            return 0;
        }
        self.m2
            .iter()
            .filter(|&&m2| m2 / (self.n as f64 - 1.0) > threshold)
            .count()
    }
}
