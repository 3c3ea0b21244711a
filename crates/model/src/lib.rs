//! The joint chorus model.
//!
//! [`Chorus`] holds a base LM (model 0, which carries the [selector](chorus_latent::Selector) and
//! provides the posterior's features), assistant LMs (models 1..K-1, frozen by default), one
//! [`ZAdapter`](chorus_lm_adapters::ZAdapter) per model that reads z, the posterior q(z | x, c) and
//! the prior p(z | c). [`Chorus::forward_elbo`] returns the ELBO terms of DESIGN §2 and the exact
//! router posterior; [`Chorus::iw_log_likelihood`] the evaluation bound of §3. [`ChorusConfig`]
//! switches give the ablations from the same code path: no z (Co-LLM), K = 1 (VAE), assistants with
//! cached log-probs.

mod chorus;
mod config;

pub use chorus::{Chorus, ChorusBatch, ChorusOutput, LatentDistributions};
pub use config::{ChorusConfig, EncoderKind};

/// Errors of `chorus-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config value out of range or an impossible combination.
    #[error("invalid chorus config: {0}")]
    InvalidConfig(String),
    /// Models that do not share a vocabulary.
    #[error(
        "model {assistant} has a vocabulary of {vocab} tokens but the base has {base}: all models of a chorus must share one tokenizer"
    )]
    VocabMismatch {
        /// The base's vocabulary size.
        base: usize,
        /// The assistant's index (1-based, as model j).
        assistant: usize,
        /// The assistant's vocabulary size.
        vocab: usize,
    },
    /// A batch that does not fit the model.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// From a language model.
    #[error(transparent)]
    Lm(#[from] chorus_lm::LmError),
    /// From the latent parts.
    #[error(transparent)]
    Latent(#[from] chorus_latent::LatentError),
    /// From an adapter.
    #[error(transparent)]
    Adapter(#[from] chorus_lm_adapters::AdapterError),
}

#[cfg(test)]
mod tests;
