//! The GPT-2 family: LayerNorm, learned absolute positions, GELU (tanh approximation), biases.
//!
//! Field names are chorus's own (`wte`, `wpe`, `h.N.attn.q_proj`, `mlp.c_fc`); Hugging Face's fused
//! `c_attn` is split into q/k/v at import time.

use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

use crate::attention::{Attention, AttentionConfig, LayerMemory};
use crate::cache::{KvCache, LayerCache};
use crate::model::{
    LmInput, LmOutput, add_offset, init_normal, logit_positions, prepare_step, tied_logits,
};
use crate::names::{Layout, WeightName};
use crate::{Gpt2Config, LmConfig, LmDims, LmError};

/// Where each parameter of a [`Gpt2`] lives in Hugging Face's `GPT2LMHeadModel` checkpoints (read by
/// `crate::names`: HF import and export; llama.cpp's GGUF GPT-2 is not loaded). Hugging Face's
/// linear layers here are Conv1D, already `[in, out]` as burn's, and q, k, v share one fused
/// `c_attn`.
pub(crate) const GPT2_NAMES: &[WeightName] = &[
    // chorus path, Hugging Face name, layout.
    name("wte.weight", "transformer.wte.weight", Layout::Same),
    name("wpe.weight", "transformer.wpe.weight", Layout::Same),
    name("ln_f.gamma", "transformer.ln_f.weight", Layout::Same),
    name("ln_f.beta", "transformer.ln_f.bias", Layout::Same),
    name("lm_head.weight", "lm_head.weight", Layout::Linear),
    name(
        "h.{i}.ln_1.gamma",
        "transformer.h.{i}.ln_1.weight",
        Layout::Same,
    ),
    name(
        "h.{i}.ln_1.beta",
        "transformer.h.{i}.ln_1.bias",
        Layout::Same,
    ),
    name(
        "h.{i}.ln_2.gamma",
        "transformer.h.{i}.ln_2.weight",
        Layout::Same,
    ),
    name(
        "h.{i}.ln_2.beta",
        "transformer.h.{i}.ln_2.bias",
        Layout::Same,
    ),
    name(
        "h.{i}.attn.q_proj.weight",
        "transformer.h.{i}.attn.c_attn.weight",
        Layout::FusedQkv { part: 0 },
    ),
    name(
        "h.{i}.attn.k_proj.weight",
        "transformer.h.{i}.attn.c_attn.weight",
        Layout::FusedQkv { part: 1 },
    ),
    name(
        "h.{i}.attn.v_proj.weight",
        "transformer.h.{i}.attn.c_attn.weight",
        Layout::FusedQkv { part: 2 },
    ),
    name(
        "h.{i}.attn.q_proj.bias",
        "transformer.h.{i}.attn.c_attn.bias",
        Layout::FusedQkv { part: 0 },
    ),
    name(
        "h.{i}.attn.k_proj.bias",
        "transformer.h.{i}.attn.c_attn.bias",
        Layout::FusedQkv { part: 1 },
    ),
    name(
        "h.{i}.attn.v_proj.bias",
        "transformer.h.{i}.attn.c_attn.bias",
        Layout::FusedQkv { part: 2 },
    ),
    name(
        "h.{i}.attn.o_proj.weight",
        "transformer.h.{i}.attn.c_proj.weight",
        Layout::Same,
    ),
    name(
        "h.{i}.attn.o_proj.bias",
        "transformer.h.{i}.attn.c_proj.bias",
        Layout::Same,
    ),
    name(
        "h.{i}.mlp.c_fc.weight",
        "transformer.h.{i}.mlp.c_fc.weight",
        Layout::Same,
    ),
    name(
        "h.{i}.mlp.c_fc.bias",
        "transformer.h.{i}.mlp.c_fc.bias",
        Layout::Same,
    ),
    name(
        "h.{i}.mlp.c_proj.weight",
        "transformer.h.{i}.mlp.c_proj.weight",
        Layout::Same,
    ),
    name(
        "h.{i}.mlp.c_proj.bias",
        "transformer.h.{i}.mlp.c_proj.bias",
        Layout::Same,
    ),
];

const fn name(chorus: &'static str, hf: &'static str, layout: Layout) -> WeightName {
    WeightName {
        chorus,
        hf,
        gguf: None,
        layout,
    }
}

/// GELU MLP: `c_proj(gelu_tanh(c_fc(x)))`.
#[derive(Module, Debug)]
pub struct Gpt2Mlp<B: Backend> {
    /// `[d_model, d_ff]`
    pub c_fc: Linear<B>,
    /// `[d_ff, d_model]`
    pub c_proj: Linear<B>,
}

/// One pre-norm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend> {
    /// Norm before attention.
    pub ln_1: LayerNorm<B>,
    /// Multi-head self-attention with biases.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub ln_2: LayerNorm<B>,
    /// GELU MLP.
    pub mlp: Gpt2Mlp<B>,
}

/// A GPT-2-family decoder. Build with [`LmConfig::init`].
#[derive(Module, Debug)]
pub struct Gpt2<B: Backend> {
    /// Token embedding `[vocab_size, d_model]`.
    pub wte: Embedding<B>,
    /// Position embedding `[max_seq_len, d_model]`.
    pub wpe: Embedding<B>,
    /// The blocks.
    pub h: Vec<Gpt2Block<B>>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm<B>,
    /// Output projection `[d_model, vocab_size]`; `None` when tied to `wte`.
    pub lm_head: Option<Linear<B>>,
    /// The config the model was built from.
    #[module(skip)]
    pub config: Gpt2Config,
}

impl<B: Backend> Gpt2<B> {
    /// Allocates a model with GPT-2's initialisation (call [`LmConfig::init`], which validates).
    pub(crate) fn new(c: &Gpt2Config, device: &B::Device) -> Self {
        let std = 0.02;
        let residual_std = std / (2.0 * c.n_layers as f64).sqrt();
        let linear = |d_in, d_out, std| {
            LinearConfig::new(d_in, d_out)
                .with_initializer(init_normal(std))
                .init(device)
        };
        let norm = || {
            LayerNormConfig::new(c.d_model)
                .with_epsilon(c.norm_eps)
                .init(device)
        };
        let embedding = |n, std| {
            EmbeddingConfig::new(n, c.d_model)
                .with_initializer(init_normal(std))
                .init(device)
        };
        let h = (0..c.n_layers)
            .map(|_| {
                let mut attn = AttentionConfig {
                    d_model: c.d_model,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_heads,
                    bias: true,
                }
                .init(device);
                attn.o_proj = linear(c.d_model, c.d_model, residual_std);
                Gpt2Block {
                    ln_1: norm(),
                    attn,
                    ln_2: norm(),
                    mlp: Gpt2Mlp {
                        c_fc: linear(c.d_model, c.d_ff, std),
                        c_proj: linear(c.d_ff, c.d_model, residual_std),
                    },
                }
            })
            .collect();
        Self {
            wte: embedding(c.vocab_size, std),
            wpe: embedding(c.max_seq_len, 0.01),
            h,
            ln_f: norm(),
            // GPT-2's output projection has no bias.
            lm_head: (!c.tie_embeddings).then(|| {
                LinearConfig::new(c.d_model, c.vocab_size)
                    .with_bias(false)
                    .with_initializer(init_normal(std))
                    .init(device)
            }),
            config: c.clone(),
        }
    }

    /// See [`crate::Lm::dims`].
    pub fn dims(&self) -> LmDims {
        LmConfig::Gpt2(self.config.clone()).dims()
    }

    /// See [`crate::Lm::forward`].
    pub fn forward(
        &self,
        input: LmInput<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<LmOutput<B>, LmError> {
        let step = prepare_step(&self.dims(), &input, cache.as_deref_mut())?;
        let last_only = input.last_logits_only;
        let [batch, seq] = input.tokens.dims();
        let device = input.tokens.device();
        let positions =
            Tensor::<B, 1, Int>::arange(step.start as i64..(step.start + seq) as i64, &device)
                .unsqueeze_dim::<2>(0)
                .expand([batch, seq]);
        let x = self.wte.forward(input.tokens) + self.wpe.forward(positions);
        let mut x = add_offset(x, input.embedding_offset.as_ref());
        let mask = step.mask();
        for (i, block) in self.h.iter().enumerate() {
            let memory: Option<&LayerMemory<B>> = input.memory.as_ref().map(|m| &m[i]);
            let layer_cache: Option<&mut LayerCache<B>> =
                cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let attended = block.attn.forward(
                block.ln_1.forward(x.clone()),
                None,
                mask.clone(),
                memory,
                layer_cache,
            );
            x = x + attended;
            let mlp_in = block.ln_2.forward(x.clone());
            x = x + block
                .mlp
                .c_proj
                .forward(gelu_approximate(block.mlp.c_fc.forward(mlp_in)));
        }
        let hidden = self.ln_f.forward(x);
        let logits = match &self.lm_head {
            Some(head) => head.forward(logit_positions(&hidden, last_only)),
            None => tied_logits(logit_positions(&hidden, last_only), self.wte.weight.val()),
        };
        Ok(LmOutput { logits, hidden })
    }
}
