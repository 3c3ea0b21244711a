//! The family-independent face of a language model: [`LmInput`], [`LmOutput`], and the [`Lm`]
//! enum that dispatches to an architecture.

use burn::nn::Initializer;
use burn::prelude::*;

use crate::attention::{LayerMemory, attention_mask};
use crate::cache::KvCache;
use crate::gpt2::Gpt2;
use crate::llama::Llama;
use crate::{LmConfig, LmDims, LmError};

/// What one forward pass reads.
#[derive(Debug, Clone)]
pub struct LmInput<B: Backend> {
    /// `[batch, seq]` token ids, at positions `cache.len()..cache.len() + seq`.
    pub tokens: Tensor<B, 2, Int>,
    /// `[batch, seq]`, true at padding positions: no query attends to them. `None`: no padding.
    pub padding: Option<Tensor<B, 2, Bool>>,
    /// One [`LayerMemory`] per block: key/value slots every position attends to (conditioning on z).
    pub memory: Option<Vec<LayerMemory<B>>>,
    /// `[batch, d_model]`, added to every input embedding (conditioning on z).
    pub embedding_offset: Option<Tensor<B, 2>>,
    /// Compute logits at the last position only (decoding: prefill and catch-up need no more),
    /// skipping the output layer for the others.
    pub last_logits_only: bool,
}

impl<B: Backend> LmInput<B> {
    /// Plain tokens, no padding, no conditioning.
    pub fn new(tokens: Tensor<B, 2, Int>) -> Self {
        Self {
            tokens,
            padding: None,
            memory: None,
            embedding_offset: None,
            last_logits_only: false,
        }
    }

    /// Logits at the last position only: [`LmOutput::logits`] is then `[batch, 1, vocab]`.
    pub fn with_last_logits_only(mut self) -> Self {
        self.last_logits_only = true;
        self
    }

    /// Marks padding positions (true = padding).
    pub fn with_padding(mut self, padding: Tensor<B, 2, Bool>) -> Self {
        self.padding = Some(padding);
        self
    }

    /// Adds per-layer memory slots.
    pub fn with_memory(mut self, memory: Vec<LayerMemory<B>>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Adds an offset to every input embedding.
    pub fn with_embedding_offset(mut self, offset: Tensor<B, 2>) -> Self {
        self.embedding_offset = Some(offset);
        self
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct LmOutput<B: Backend> {
    /// `[batch, seq, vocab_size]` next-token logits (`[batch, 1, vocab_size]`, the last position's,
    /// with [`LmInput::last_logits_only`]).
    pub logits: Tensor<B, 3>,
    /// `[batch, seq, d_model]` final hidden states (after the last norm, as the LM head sees them).
    pub hidden: Tensor<B, 3>,
}

/// Per-call facts every family needs, checked once: the first position and the padding of every
/// position the step sees (cache included).
pub(crate) struct Step<B: Backend> {
    pub start: usize,
    /// `[batch, start + seq]`, true at padding; `None` when no position is padding.
    pub padding: Option<Tensor<B, 2, Bool>>,
    batch: usize,
    seq: usize,
    device: B::Device,
}

impl<B: Backend> Step<B> {
    /// The step's causal + padding mask ([`attention_mask`]), `[batch, seq, start + seq]`.
    pub fn mask(&self) -> Tensor<B, 3, Bool> {
        attention_mask(
            self.batch,
            self.seq,
            self.start,
            self.padding.clone(),
            &self.device,
        )
    }
}

/// Refuses token ids outside `0..vocab`: an embedding lookup would panic on them (ndarray) or read
/// past its table (a GPU). One read of the ids to the host (a sync on a GPU), naming the first
/// offender.
///
/// # Shapes
/// - tokens: `[batch, seq]`
pub(crate) fn check_token_ids<B: Backend>(
    tokens: &Tensor<B, 2, Int>,
    vocab: usize,
) -> Result<(), LmError> {
    let [_, seq] = tokens.dims();
    let vocab_ids = 0..vocab as i64;
    match tokens
        .to_data()
        .iter::<i64>()
        .enumerate()
        .find(|(_, id)| !vocab_ids.contains(id))
    {
        None => Ok(()),
        Some((index, id)) => Err(LmError::InvalidInput {
            input: "tokens",
            reason: format!(
                "token id {id} at row {}, position {} is outside the vocabulary of {vocab}: \
                 were the tokens encoded with another model's tokenizer?",
                index / seq.max(1),
                index % seq.max(1)
            ),
        }),
    }
}

/// Validates `input` against the model's dims and the cache, and advances the cache's length and
/// padding.
pub(crate) fn prepare_step<B: Backend>(
    dims: &LmDims,
    input: &LmInput<B>,
    cache: Option<&mut KvCache<B>>,
) -> Result<Step<B>, LmError> {
    let [batch, seq] = input.tokens.dims();
    let device = input.tokens.device();
    if seq == 0 {
        return Err(LmError::InvalidInput {
            input: "tokens",
            reason: "an empty sequence".into(),
        });
    }
    check_token_ids(&input.tokens, dims.vocab_size)?;
    let start = cache.as_ref().map_or(0, |c| c.len);
    if start + seq > dims.max_seq_len {
        return Err(LmError::InvalidInput {
            input: "tokens",
            reason: format!(
                "{} positions ({} cached + {seq} new) exceed the context window of {}",
                start + seq,
                start,
                dims.max_seq_len
            ),
        });
    }
    if let Some(padding) = &input.padding
        && padding.dims() != [batch, seq]
    {
        return Err(LmError::InvalidInput {
            input: "padding",
            reason: format!(
                "padding mask is {:?}, tokens are [{batch}, {seq}]",
                padding.dims()
            ),
        });
    }
    if let Some(offset) = &input.embedding_offset
        && offset.dims() != [batch, dims.d_model]
    {
        return Err(LmError::InvalidInput {
            input: "embedding offset",
            reason: format!(
                "embedding offset is {:?}, expected [{batch}, {}]",
                offset.dims(),
                dims.d_model
            ),
        });
    }
    if let Some(memory) = &input.memory {
        if memory.len() != dims.n_layers {
            return Err(LmError::InvalidInput {
                input: "memory",
                reason: format!(
                    "{} memory layers for a model with {} layers",
                    memory.len(),
                    dims.n_layers
                ),
            });
        }
        let n_slots = memory[0].key.dims()[1];
        for (layer, m) in memory.iter().enumerate() {
            let expected = [batch, n_slots, dims.kv_dim()];
            if m.key.dims() != expected || m.value.dims() != expected {
                return Err(LmError::InvalidInput {
                    input: "memory",
                    reason: format!(
                        "memory of layer {layer}: key {:?}, value {:?}, expected {expected:?}",
                        m.key.dims(),
                        m.value.dims()
                    ),
                });
            }
        }
    }
    let no_padding = |len: usize| {
        Tensor::<B, 2, Bool>::from_data(
            TensorData::new(vec![false; batch * len], [batch, len]),
            &device,
        )
    };
    let padding = match cache {
        None => input.padding.clone(),
        Some(cache) => {
            if let Some(past) = &cache.padding
                && past.dims()[0] != batch
            {
                return Err(LmError::InvalidInput {
                    input: "cache",
                    reason: format!("batch of {batch} for a cache holding {}", past.dims()[0]),
                });
            }
            let padding = match (cache.padding.take(), input.padding.clone()) {
                (None, None) => None,
                (past, step) => Some(Tensor::cat(
                    vec![
                        past.unwrap_or_else(|| no_padding(start)),
                        step.unwrap_or_else(|| no_padding(seq)),
                    ],
                    1,
                )),
            };
            cache.padding = padding.clone();
            cache.len += seq;
            padding
        }
    };
    Ok(Step {
        start,
        padding,
        batch,
        seq,
        device,
    })
}

/// Adds the embedding offset `[batch, d_model]` to every position of `x` `[batch, seq, d_model]`.
pub(crate) fn add_offset<B: Backend>(
    x: Tensor<B, 3>,
    offset: Option<&Tensor<B, 2>>,
) -> Tensor<B, 3> {
    match offset {
        Some(offset) => x + offset.clone().unsqueeze_dim::<3>(1),
        None => x,
    }
}

/// The hidden states the output layer reads: all positions, or the last one with
/// [`LmInput::last_logits_only`].
///
/// # Shapes
/// - hidden: `[batch, seq, d_model]`; output: `[batch, seq or 1, d_model]`
pub(crate) fn logit_positions<B: Backend>(hidden: &Tensor<B, 3>, last_only: bool) -> Tensor<B, 3> {
    let seq = hidden.dims()[1];
    if last_only && seq > 1 {
        hidden.clone().narrow(1, seq - 1, 1)
    } else {
        hidden.clone()
    }
}

/// Output logits through a tied embedding matrix `[vocab, d_model]`: `h Eᵀ`, in row-major
/// `[batch, seq, vocab]` layout. (Computing `(E hᵀ)ᵀ` instead, to spare the backend a transposed
/// `E`, left the logits as a transposed view: LibTorch then reduced and mapped the vocabulary axis
/// with a stride of `batch · seq` — a row max over SmolLM2's logits took 15× as long as on
/// row-major ones, docs/performance.md.) For a few rows chorus's burn-ndarray reads `Eᵀ` in place
/// (vendor/burn-ndarray/CHORUS.md); for more, copying `Eᵀ` once is small beside the product.
///
/// # Shapes
/// - hidden: `[batch, seq, d_model]`, embedding: `[vocab, d_model]`
/// - output: `[batch, seq, vocab]`
pub(crate) fn tied_logits<B: Backend>(
    hidden: Tensor<B, 3>,
    embedding: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [batch, seq, d_model] = hidden.dims();
    let [vocab, _] = embedding.dims();
    hidden
        .reshape([batch * seq, d_model])
        .matmul(embedding.transpose())
        .reshape([batch, seq, vocab])
}

/// The weight initialisation of a model trained from scratch (GPT-2's): N(0, 0.02), residual
/// output projections N(0, 0.02/√(2·n_layers)).
pub(crate) fn init_normal(std: f64) -> Initializer {
    Initializer::Normal { mean: 0.0, std }
}

/// A decoder-only language model of any supported family.
// One model per value, built once and rarely moved: boxing would only add an indirection (and
// burn's `Module` derive does not see through `Box`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Lm<B: Backend> {
    /// See [`Llama`].
    Llama(Llama<B>),
    /// See [`Gpt2`].
    Gpt2(Gpt2<B>),
}

impl LmConfig {
    /// Validates the config and allocates a freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Lm<B>, LmError> {
        self.validate()?;
        Ok(match self {
            LmConfig::Llama(c) => Lm::Llama(Llama::new(c, device)),
            LmConfig::Gpt2(c) => Lm::Gpt2(Gpt2::new(c, device)),
        })
    }
}

impl<B: Backend> Lm<B> {
    /// Runs the model on `input`, appending to `cache` when given.
    ///
    /// # Shapes
    /// - input.tokens: `[batch, seq]`
    /// - output.logits: `[batch, seq, vocab_size]`, output.hidden: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input: LmInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<LmOutput<B>, LmError> {
        match self {
            Lm::Llama(m) => m.forward(input, cache),
            Lm::Gpt2(m) => m.forward(input, cache),
        }
    }

    /// The shape facts (vocab, widths, layers).
    pub fn dims(&self) -> LmDims {
        match self {
            Lm::Llama(m) => m.dims(),
            Lm::Gpt2(m) => m.dims(),
        }
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.dims().n_layers)
    }

    /// The ids of the weights that a model read for decoding makes from its GGUF blocks when
    /// something first reads them in f32 and has not made yet
    /// ([`Lm::from_gguf_for_decoding`]). Unlike a freshly initialised parameter's, their values
    /// are fixed, so a copy of the model may leave them unmade: every copy makes the same values.
    pub fn weights_made_on_use(&self) -> Vec<burn::module::ParamId> {
        match self {
            Lm::Llama(m) => m.weights_made_on_use(),
            Lm::Gpt2(_) => Vec::new(),
        }
    }
}

/// A tensor's values as f32 on the host (for the host steps and the block checks); the error is
/// burn's, for the caller to name what it was reading.
pub(crate) fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, String> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))
}
