//! The joint chorus model.
//!
//! [`Chorus`] holds a base LM (model 0, which carries the [selector](chorus_latent::Selector) and
//! provides the posterior's features), assistant LMs (models 1..K-1, frozen by default), one
//! [`ZAdapter`](chorus_lm_adapters::ZAdapter) per model that reads z, the posterior q(z | x, c) and
//! the prior p(z | c). [`Chorus::forward_elbo`] returns the ELBO terms of DESIGN §2 and the exact
//! router posterior; [`Chorus::iw_log_likelihood`] the evaluation bound of §3. [`ChorusConfig`]
//! switches give the ablations from the same code path: no z (Co-LLM), K = 1 (VAE), assistants with
//! cached log-probs.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use chorus_lm::{Gpt2Config, LlamaConfig, LmConfig};
//! use chorus_model::{Chorus, ChorusBatch, ChorusConfig};
//!
//! let device = Default::default();
//! let base = LmConfig::Llama(LlamaConfig {
//!     vocab_size: 16, d_model: 8, n_layers: 1, n_heads: 2, n_kv_heads: 1, d_ff: 16,
//!     rope_theta: 10_000.0, norm_eps: 1e-5, tie_embeddings: true, max_seq_len: 16,
//! });
//! let assistant = LmConfig::Gpt2(Gpt2Config {
//!     vocab_size: 16, d_model: 8, n_layers: 1, n_heads: 2, d_ff: 16, max_seq_len: 16,
//!     norm_eps: 1e-5, tie_embeddings: true,
//! });
//! let chorus = Chorus::new(
//!     ChorusConfig::default(),
//!     base.init::<NdArray>(&device)?,
//!     vec![assistant.init::<NdArray>(&device)?],
//!     &device,
//! )?;
//! let batch = ChorusBatch {
//!     tokens: Tensor::from_data([[1, 2, 3, 4]], &device),
//!     targets: Tensor::from_data([[2, 3, 4, 5]], &device),
//!     target_mask: Tensor::from_data([[0.0, 1.0, 1.0, 1.0]], &device), // x = 3 4 5
//!     context_mask: Tensor::from_data([[1.0, 1.0, 0.0, 0.0]], &device), // c = 1 2
//!     padding: Tensor::from_data([[false; 4]], &device),
//!     assistant_log_probs: None,
//! };
//! let beta = 1.0; // the KL weight (training anneals it: chorus-train's `train.kl_schedule`)
//! let out = chorus.forward_elbo(&batch, beta)?;
//! assert_eq!(out.terms.loss.dims(), [1]);
//! assert_eq!(out.router.dims(), [1, 4, 2]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod assistant;
mod calibrate;
mod chorus;
mod config;
mod decode;
mod remote;
mod saved;

pub use assistant::{Assistant, AssistantDecoder, LocalLm, ScoreRows};
pub use calibrate::{DECODING_FILE, EtaCalibration, EtaCandidate};
pub use chorus::{
    BatchEvaluation, Chorus, ChorusBatch, ChorusOutput, LatentDistributions, seeded_noise,
};
pub use config::ChorusConfig;
pub use decode::{
    AssistantUpdate, DecodeConfig, Decoded, WriterStrategy, ZSource, mixture_probs, tempered_probs,
    top1_prob, truncate_probs,
};
pub use remote::{RemoteAssistant, RemoteSettings, TOKENIZER_PROBE, is_server_url};
pub use saved::{ChorusManifest, MANIFEST_FILE, SavedChorus, TOKENIZER_FILE, WEIGHTS_FILE};

/// Errors of `chorus-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// One config value outside its range.
    #[error("invalid config: {key} = {value} must be {expected}")]
    OutOfRange {
        /// The key, e.g. `free_bits` or `top_p`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A config value that contradicts another setting.
    #[error("invalid config: {key} = {value}: {reason}")]
    Conflict {
        /// The key, e.g. `memory_slots`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What it contradicts.
        reason: &'static str,
    },
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
    /// An operation the model cannot do (e.g. η calibration without a selector).
    #[error("{operation}: {reason}")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// Why the model cannot.
        reason: String,
    },
    /// A tensor of a batch whose shape does not fit the model.
    #[error("batch: {tensor} is {dims:?}, expected {expected:?}")]
    BatchShape {
        /// The tensor, e.g. `assistant_log_probs`.
        tensor: &'static str,
        /// Its dims.
        dims: Vec<usize>,
        /// The dims the model needs.
        expected: Vec<usize>,
    },
    /// An input of a call that the model cannot use (an empty prompt, a prompt past the context
    /// window, z given to a model without z, …).
    #[error("{input}: {reason}")]
    InvalidInput {
        /// The input, e.g. `prompt` or `z`.
        input: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Tensor data that could not be read back to the host as the expected element type.
    #[error("reading {tensor} to the host: {reason}")]
    HostRead {
        /// The tensor.
        tensor: &'static str,
        /// burn's error.
        reason: String,
    },
    /// An assistant server that is unreachable, answers badly, or tokenizes differently.
    #[error("assistant server {url}: {reason}")]
    Remote {
        /// The server's base URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A saved model directory that is missing, incomplete or corrupt.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The directory or file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
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

impl ModelError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod decode_tests;
#[cfg(any(test, feature = "fake-server"))]
pub mod fake_server;
#[cfg(test)]
mod remote_tests;
#[cfg(test)]
mod tests;
