//! The token mixture: `log p(x | z, c) = Σ_t logsumexp_j [log π_j(t) + log P_j(x_t)]`.

use burn::prelude::*;

/// Numerically stable `log Σ_i exp(x_i)` along `dim` (kept, size 1):
/// `m + log Σ_i exp(x_i − m)` with `m = max_i x_i` (detached: its gradient cancels exactly).
///
/// Rows must contain at least one finite value; masked entries should be large negative finite
/// numbers rather than −∞.
pub fn logsumexp<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let max = x.clone().max_dim(dim).detach();
    (x - max.clone()).exp().sum_dim(dim).log() + max
}

/// Per-token `log P(x_t)` from logits without a full log-softmax:
/// `logits[x_t] − logsumexp_v logits[v]`.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - targets: `[batch, seq]`
/// - output: `[batch, seq]`
pub fn token_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let target_logit = logits.clone().gather(2, targets.unsqueeze_dim::<3>(2)); // [b, t, 1]
    (target_logit - logsumexp(logits, 2)).squeeze_dim::<2>(2)
}

/// The token-mixture log-likelihood, per token and per sequence.
#[derive(Debug, Clone)]
pub struct MixtureLikelihood<B: Backend> {
    /// `[batch, seq]`: `logsumexp_j [log π_j(t) + log P_j(x_t)]`, zero at masked positions.
    pub per_token: Tensor<B, 2>,
    /// `[batch]`: the sum over the sequence's unmasked tokens.
    pub per_sequence: Tensor<B, 1>,
}

/// `log p(x | z, c) = Σ_t m_t · logsumexp_j [log π_j(t) + log P_j(x_t)]`: the exact marginal over
/// the per-token writer Z_t (all models read the same prefix, so Z_t only affects x_t).
///
/// # Shapes
/// - log_pi: `[batch, seq, n_models]` (log π, normalised over models)
/// - log_p: `[batch, seq, n_models]` (each model's `log P_j(x_t)`)
/// - mask: `[batch, seq]`, 1.0 for target tokens, 0.0 for padding and context
pub fn mixture_log_likelihood<B: Backend>(
    log_pi: Tensor<B, 3>,
    log_p: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> MixtureLikelihood<B> {
    let per_token = logsumexp(log_pi + log_p, 2).squeeze_dim::<2>(2) * mask;
    let per_sequence = per_token.clone().sum_dim(1).squeeze_dim::<1>(1);
    MixtureLikelihood {
        per_token,
        per_sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend as F64;
    use burn::tensor::Distribution;

    #[test]
    fn logsumexp_is_stable_at_large_magnitudes() {
        let device = Default::default();
        let x = Tensor::<crate::TestBackend, 2>::from_data(
            [[1e4f64, 1e4 - 1.0, -1e4], [-1e4, -1e4 - 2.0, -1e4 - 50.0]],
            &device,
        );
        let out = logsumexp(x, 1).into_data().to_vec::<f64>().unwrap();
        let expected = [
            1e4 + (1.0 + (-1.0f64).exp()).ln(),
            -1e4 + (1.0 + (-2.0f64).exp()).ln(),
        ];
        for (o, e) in out.iter().zip(expected) {
            assert!(o.is_finite());
            assert!((o - e).abs() < 1e-9, "{o} vs {e}");
        }
    }

    #[test]
    fn logsumexp_equals_the_naive_formula_at_small_magnitudes() {
        let device = Default::default();
        let x = Tensor::<F64, 3>::random([3, 4, 5], Distribution::Normal(0.0, 3.0), &device);
        let naive = x.clone().exp().sum_dim(2).log();
        let diff: f64 = (logsumexp(x, 2) - naive).abs().max().into_scalar();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn token_log_probs_equal_log_softmax_at_the_target() {
        let device = Default::default();
        let logits = Tensor::<F64, 3>::random([2, 3, 7], Distribution::Normal(0.0, 2.0), &device);
        let targets = Tensor::<F64, 2, Int>::from_data([[0, 6, 3], [2, 2, 5]], &device);
        let ours = token_log_probs(logits.clone(), targets.clone());
        let reference = burn::tensor::activation::log_softmax(logits, 2)
            .gather(2, targets.unsqueeze_dim(2))
            .squeeze_dim::<2>(2);
        let diff: f64 = (ours - reference).abs().max().into_scalar();
        assert!(diff < 1e-12, "{diff}");
    }
}
