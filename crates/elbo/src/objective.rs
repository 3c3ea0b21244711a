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
    /// Scalar: `mean_batch(−reconstruction + β · kl_free_bits)`, the loss to minimise.
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
        loss,
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
/// `I = E_x[−H(q(z|x))] − E_{x, z~q(z|x)}[log q(z)]`, `log q(z) ≈ logsumexp_n log q(z | x_n) − log N`.
///
/// Draws one z per row from the backend's RNG.
pub fn mutual_information<B: Backend>(posterior: &DiagonalGaussian<B>) -> f64 {
    let [n, d_latent] = posterior.dims();
    let neg_entropy = posterior.entropy().neg().mean(); // E_x[−H]
    let z = posterior.sample(1).squeeze_dim::<2>(0); // [n, d]
    // log q(z_i | x_j) for every pair: treat z as n samples against the batch of n posteriors.
    let z = z.reshape([n, 1, d_latent]).expand([n, n, d_latent]); // [i, j, d]
    let log_density = posterior.log_prob(z); // [i, j]
    let log_qz = logsumexp(log_density, 1).squeeze_dim::<1>(1) - (n as f64).ln(); // [i]
    let mi = neg_entropy - log_qz.mean();
    mi.into_scalar().elem::<f64>()
}

/// Active units: the number of dimensions d with `Var_x(E_q[z_d]) > threshold` (0.01 in the
/// literature) across the rows of `means` `[n, d_latent]`.
pub fn active_units<B: Backend>(means: Tensor<B, 2>, threshold: f64) -> usize {
    let [n, _] = means.dims();
    if n < 2 {
        return 0;
    }
    let centred = means.clone() - means.mean_dim(0);
    let var = centred.powf_scalar(2.0).sum_dim(0) / (n as f64 - 1.0); // [1, d]
    var.greater_elem(threshold)
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>() as usize
}
