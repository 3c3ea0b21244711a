//! Decoder-only transformer language models for chorus, generic over any burn [`Backend`].
//!
//! - [`LmConfig`] describes a model ([`LlamaConfig`]: RMSNorm, RoPE, SwiGLU, GQA;
//!   [`Gpt2Config`]: LayerNorm, learned positions, GELU) and is validated before allocation.
//! - [`Lm`] is the model; [`Lm::forward`] takes an [`LmInput`] (tokens, padding mask, and the two
//!   hooks for conditioning on a latent: per-layer [`LayerMemory`] slots and an embedding offset)
//!   and returns an [`LmOutput`] (logits and final hidden states).
//! - [`KvCache`] makes decoding incremental: pass the same cache to successive calls.
//! - [`Lm::save`] / [`Lm::load`] read and write chorus checkpoints (`config.json` +
//!   `model.safetensors`); [`Tokenizer`] wraps Hugging Face's `tokenizers`.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use chorus_lm::{LlamaConfig, LmConfig, LmInput};
//!
//! let config = LmConfig::Llama(LlamaConfig {
//!     vocab_size: 32, d_model: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 32,
//!     rope_theta: 10_000.0, norm_eps: 1e-5, tie_embeddings: true, max_seq_len: 64,
//! });
//! let device = Default::default();
//! let model = config.init::<NdArray>(&device)?;
//! let tokens = Tensor::<NdArray, 2, Int>::from_data([[1, 2, 3]], &device);
//! let out = model.forward(LmInput::new(tokens), None)?;
//! assert_eq!(out.logits.dims(), [1, 3, 32]);
//! # Ok::<(), chorus_lm::LmError>(())
//! ```
//!
//! [`Backend`]: burn::tensor::backend::Backend

mod attention;
mod bert;
mod cache;
mod checkpoint;
mod config;
mod error;
mod gguf;
mod gpt2;
mod host_step;
mod huge_pages;
mod import;
mod llama;
mod model;
mod names;
mod norm;
mod peak;
mod quantised;
mod rope;
mod team;
mod tokenizer;

pub use attention::{Attention, AttentionConfig, LayerMemory, attention_mask};
pub use bert::{Bert, BertConfig, BertLayer};
pub use cache::{KvCache, LayerCache};
pub use checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
pub use config::{Gpt2Config, LlamaConfig, LmConfig, LmDims};
pub use error::LmError;
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufValue};
pub use gpt2::{Gpt2, Gpt2Block, Gpt2Mlp};
pub use host_step::shifted_exp_sum;
pub use import::{
    NamedTensors, config_from_hf, gpt2_from_hf, hf_config, llama_config_from_gguf, llama_from_hf,
    to_hf_tensors,
};
pub use llama::{Llama, LlamaBlock, SwiGlu};
pub use model::{Lm, LmInput, LmOutput};
pub use names::NamedTensor;
pub use norm::RmsNorm;
pub use peak::multiply_add_gflops;
pub use quantised::{BlockMatrix, MAX_BLOCK_ROWS};
pub use rope::{Rope, RopeTables};
pub use tokenizer::{TOKENIZER_CONFIG, Tokenizer};

/// Whether chorus-lm was compiled with debug assertions and overflow checks. The `test` profile
/// keeps them (Cargo.toml), so that its tests check the preconditions of every SIMD load, and
/// `cargo test` builds the `chorus` binary with them too: its decoding kernels then run ≈ 3×
/// slower than the `dev` profile's (docs/performance.md). Commands that report speeds say so.
pub const CHECKED_BUILD: bool = cfg!(debug_assertions);

#[cfg(test)]
mod forward_tests;
#[cfg(test)]
mod gguf_tests;
#[cfg(test)]
mod gguf_writer;
#[cfg(test)]
mod tests;

/// The backend the unit tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::NdArray<f32>;
