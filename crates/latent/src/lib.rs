//! The latent variables of chorus, with no transformer code: everything works on tensors of
//! hidden states, logits and Gaussian parameters.
//!
//! - [`DiagonalGaussian`]: reparameterised [sampling](DiagonalGaussian::sample),
//!   [log-density](DiagonalGaussian::log_prob) and per-dimension closed-form
//!   [KL](DiagonalGaussian::kl).
//! - The posterior q(z | x, c) is a [`GaussianHead`] over [`masked_mean_pool`]ed hidden states;
//!   the [`Prior`] is `N(0, I)` or a conditional [`GaussianHead`] over the pooled context.
//! - The [`Selector`] gives `log π(j | x_<t, c, z)` over K models from the base's hidden states, and
//!   [`router_posterior`] the exact `r_t(j)`.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use chorus_latent::DiagonalGaussian;
//!
//! let device = Default::default();
//! let q = DiagonalGaussian::<NdArray>::standard(2, 8, &device);
//! let z = q.sample(4); // [samples, batch, d_latent]
//! assert_eq!(z.dims(), [4, 2, 8]);
//! assert_eq!(q.kl(&q).sum().into_scalar(), 0.0);
//! ```

mod encoder;
mod gaussian;
mod selector;

pub use encoder::{GaussianHead, GaussianHeadConfig, Prior, PriorConfig, masked_mean_pool};
pub use gaussian::DiagonalGaussian;
pub use selector::{Selector, SelectorConfig, SelectorKind, router_posterior};

/// Errors of `chorus-latent`.
#[derive(Debug, thiserror::Error)]
pub enum LatentError {
    /// A configuration value out of range.
    #[error("invalid latent config: {component}.{key} = {value} must be {expected}")]
    OutOfRange {
        /// The component, e.g. `selector`.
        component: &'static str,
        /// The key, e.g. `n_models`.
        key: &'static str,
        /// The value as given.
        value: usize,
        /// What it must be.
        expected: &'static str,
    },
}

/// The backend the unit tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::NdArray<f64>;
