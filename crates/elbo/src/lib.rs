//! The chorus objective, on tensors of log-probabilities and Gaussian parameters only (no
//! transformer code), so every formula can be checked exactly.
//!
//! - [`token_log_probs`]: per-token `log P_j(x_t)` from logits, without a `[B, T, V]` log-softmax.
//! - [`mixture_log_likelihood`]: `Σ_t logsumexp_j [log π_j + log P_j(x_t)]`, the exact marginal over
//!   the per-token writer, with padding masks; [`logsumexp`] is the stable primitive.
//! - [`kl_free_bits`], [`KlSchedule`] (β as a pure function of the step) and [`elbo_terms`] assemble
//!   the loss, [`bag_of_words_log_likelihood`] and [`with_bag_of_words`] its optional auxiliary term
//!   on z; [`iw_log_likelihood`], [`mutual_information`] and [`active_units`] evaluate it.
//! - [`pseudo_label_loss`] (Co-LLM's selector initialisation) and [`posterior_deferral`] are the
//!   writer's side.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use chorus_elbo::{KlSchedule, mixture_log_likelihood};
//!
//! let device = Default::default();
//! // One sequence, two tokens, two models with π = (0.5, 0.5), P = (0.2, 0.6) at every token.
//! let log_pi = Tensor::<NdArray, 3>::from_data([[[0.5f32.ln(), 0.5f32.ln()]; 2]], &device);
//! let log_p = Tensor::<NdArray, 3>::from_data([[[0.2f32.ln(), 0.6f32.ln()]; 2]], &device);
//! let mask = Tensor::<NdArray, 2>::ones([1, 2], &device);
//! let ll = mixture_log_likelihood(log_pi, log_p, mask).per_sequence.into_scalar();
//! assert!((ll - 2.0 * 0.4f32.ln()).abs() < 1e-6);
//! assert_eq!(KlSchedule::Linear { warmup_steps: 10 }.beta(5), 0.5);
//! ```

mod mixture;
mod objective;
mod routing;
mod schedule;

pub use mixture::{MixtureLikelihood, logsumexp, mixture_log_likelihood, token_log_probs};
pub use objective::{
    ElboTerms, MeanMoments, active_units, bag_of_words_log_likelihood, elbo_terms,
    iw_log_likelihood, kl_free_bits, mutual_information, with_bag_of_words,
};
pub use routing::{confidence_routing, posterior_deferral, pseudo_label_loss, top1_probability};
pub use schedule::KlSchedule;

/// Errors of `chorus-elbo`.
#[derive(Debug, thiserror::Error)]
pub enum ElboError {
    /// A KL schedule value out of range.
    #[error("invalid KL schedule: {key} = {value} must be {expected}")]
    OutOfRange {
        /// The schedule's key, e.g. `cyclical.ratio`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
}

#[cfg(test)]
mod tests;

/// The backend the unit tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::NdArray<f64>;
