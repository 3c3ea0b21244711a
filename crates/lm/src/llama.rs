//! The llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.
//!
//! Field names follow Hugging Face's `LlamaForCausalLM` (`embed_tokens`, `layers.N.self_attn.q_proj`,
//! `mlp.gate_proj`, `norm`, `lm_head`), so checkpoint keys read the same in both worlds.

use burn::module::{Param, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use std::sync::Arc;

use crate::GgufFile;
use crate::attention::{Attention, AttentionConfig, LayerMemory};
use crate::cache::{KvCache, LayerCache};
use crate::host_step::{HostBlock, HostKv, HostMemory, StepShape, block_step};
use crate::model::{
    LmInput, LmOutput, add_offset, host_f32, init_normal, logit_positions, prepare_step,
    tied_logits,
};
use crate::names::{Layout, WeightName};
use crate::norm::RmsNorm;
use crate::quantised::{
    BlockMatrix, Kernel, LayerBlocks, MAX_BLOCK_ROWS, host_products_allowed, llama_blocks,
    products_from_blocks, project, project_all,
};
use crate::rope::Rope;
use crate::{LlamaConfig, LmConfig, LmDims, LmError};

/// Where each parameter of a [`Llama`] lives in Hugging Face's `LlamaForCausalLM` checkpoints and
/// in llama.cpp's GGUF files (read by `crate::names`: HF import and export, GGUF loading).
pub(crate) const LLAMA_NAMES: &[WeightName] = &[
    // chorus path, Hugging Face name, GGUF name, layout.
    name(
        "embed_tokens.weight",
        "model.embed_tokens.weight",
        "token_embd.weight",
        Layout::Same,
    ),
    name(
        "norm.weight",
        "model.norm.weight",
        "output_norm.weight",
        Layout::Same,
    ),
    name(
        "lm_head.weight",
        "lm_head.weight",
        "output.weight",
        Layout::Linear,
    ),
    name(
        "layers.{i}.input_layernorm.weight",
        "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_norm.weight",
        Layout::Same,
    ),
    name(
        "layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
        Layout::Same,
    ),
    // llama.cpp interleaves each head's Q and K rows for its RoPE; chorus rotates halves as HF.
    name(
        "layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_q.weight",
        Layout::RopeLinear { kv: false },
    ),
    name(
        "layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_k.weight",
        Layout::RopeLinear { kv: true },
    ),
    name(
        "layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_v.weight",
        Layout::Linear,
    ),
    name(
        "layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.weight",
        Layout::Linear,
    ),
    name(
        "layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_gate.weight",
        Layout::Linear,
    ),
    name(
        "layers.{i}.mlp.up_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_up.weight",
        Layout::Linear,
    ),
    name(
        "layers.{i}.mlp.down_proj.weight",
        "model.layers.{i}.mlp.down_proj.weight",
        "blk.{i}.ffn_down.weight",
        Layout::Linear,
    ),
];

const fn name(
    chorus: &'static str,
    hf: &'static str,
    gguf: &'static str,
    layout: Layout,
) -> WeightName {
    WeightName {
        chorus,
        hf,
        gguf: Some(gguf),
        layout,
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    /// `[d_model, d_ff]`
    pub gate_proj: Linear<B>,
    /// `[d_model, d_ff]`
    pub up_proj: Linear<B>,
    /// `[d_ff, d_model]`
    pub down_proj: Linear<B>,
    /// The three projections' GGUF blocks (gate, up, down), for few-row products on the CPU
    /// ([`Lm::from_gguf_for_decoding`](crate::Lm::from_gguf_for_decoding)).
    #[module(skip)]
    pub gguf_blocks: Option<Arc<[BlockMatrix; 3]>>,
}

impl<B: Backend> SwiGlu<B> {
    /// # Shapes
    /// - x, output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let blocks = self.gguf_blocks.as_deref();
        let [gate, up] = project_all(
            [&self.gate_proj, &self.up_proj],
            blocks.map(|[gate, up, _]| [gate, up]),
            x,
        );
        project(
            &self.down_proj,
            blocks.map(|[_, _, down]| down),
            silu(gate) * up,
        )
    }
}

/// One pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct LlamaBlock<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Grouped-query self-attention with RoPE.
    pub self_attn: Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub mlp: SwiGlu<B>,
    /// The two norms' weights on the host (before attention, before the MLP), for the host
    /// steps of a model decoding from GGUF blocks ([`crate::host_step`]): copied when the blocks
    /// are attached, so, like the blocks, they are the file's values even if the model trains.
    #[module(skip)]
    pub host_norms: Option<Arc<[Vec<f32>; 2]>>,
}

/// A llama-family decoder. Build with [`LmConfig::init`].
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding `[vocab_size, d_model]`.
    pub embed_tokens: Embedding<B>,
    /// The blocks.
    pub layers: Vec<LlamaBlock<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// Output projection `[d_model, vocab_size]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// The config the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The output layer's GGUF blocks (`lm_head`, or the tied embedding), for few-row products
    /// on the CPU ([`Lm::from_gguf_for_decoding`](crate::Lm::from_gguf_for_decoding)).
    #[module(skip)]
    pub output_blocks: Option<Arc<BlockMatrix>>,
}

impl<B: Backend> Llama<B> {
    /// Allocates a model with GPT-2-style initialisation (call [`LmConfig::init`], which validates).
    pub(crate) fn new(c: &LlamaConfig, device: &B::Device) -> Self {
        let std = 0.02;
        let residual_std = std / (2.0 * c.n_layers as f64).sqrt();
        let linear = |d_in, d_out, std| {
            LinearConfig::new(d_in, d_out)
                .with_bias(false)
                .with_initializer(init_normal(std))
                .init(device)
        };
        let norm = || RmsNorm::new(c.d_model, c.norm_eps, device);
        let layers = (0..c.n_layers)
            .map(|_| {
                let mut self_attn = AttentionConfig {
                    d_model: c.d_model,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    bias: false,
                }
                .init(device);
                self_attn.o_proj = linear(c.d_model, c.d_model, residual_std);
                LlamaBlock {
                    input_layernorm: norm(),
                    self_attn,
                    post_attention_layernorm: norm(),
                    mlp: SwiGlu {
                        gate_proj: linear(c.d_model, c.d_ff, std),
                        up_proj: linear(c.d_model, c.d_ff, std),
                        down_proj: linear(c.d_ff, c.d_model, residual_std),
                        gguf_blocks: None,
                    },
                    host_norms: None,
                }
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(c.vocab_size, c.d_model)
                .with_initializer(init_normal(std))
                .init(device),
            layers,
            norm: norm(),
            lm_head: (!c.tie_embeddings).then(|| linear(c.d_model, c.vocab_size, std)),
            config: c.clone(),
            output_blocks: None,
        }
    }

    /// Attaches the blocks of every block-quantised matrix of `gguf`, the file this model was
    /// loaded from ([`crate::quantised`]).
    pub(crate) fn attach_gguf_blocks(&mut self, gguf: &GgufFile) -> Result<(), LmError> {
        let (layers, output) = llama_blocks(gguf, &self.config)?;
        self.attach(gguf, layers, output)
    }

    /// [`Llama::attach_gguf_blocks`] for a model whose weights came from `gguf` by another road
    /// (a joint checkpoint that saved a frozen GGUF assistant in f32): only when every matrix
    /// that has blocks in `gguf` equals their dequantised values, value for value, so that
    /// decoding from the blocks computes what it would from the weights. Else an error naming
    /// the first matrix that differs, the model left as it was.
    pub(crate) fn attach_gguf_blocks_if_equal(&mut self, gguf: &GgufFile) -> Result<(), LmError> {
        let (layers, output) = llama_blocks(gguf, &self.config)?;
        // (name, the model's weight, whether it is `Wᵀ` — each `Linear` holds `[d_in, d_out]`,
        // the blocks `W`, `[d_out, d_in]` —, the blocks)
        let mut pairs: Vec<(String, Tensor<B, 2>, bool, &BlockMatrix)> = Vec::new();
        for (i, (layer, blocks)) in self.layers.iter().zip(&layers).enumerate() {
            let (attention, mlp) = (&layer.self_attn, &layer.mlp);
            let linears = [
                ("attn_q", &attention.q_proj),
                ("attn_k", &attention.k_proj),
                ("attn_v", &attention.v_proj),
                ("attn_output", &attention.o_proj),
            ]
            .into_iter()
            .zip(blocks.attention.iter().flat_map(|b| b.iter()))
            .chain(
                [
                    ("ffn_gate", &mlp.gate_proj),
                    ("ffn_up", &mlp.up_proj),
                    ("ffn_down", &mlp.down_proj),
                ]
                .into_iter()
                .zip(blocks.mlp.iter().flat_map(|b| b.iter())),
            );
            for ((name, linear), blocks) in linears {
                let name = format!("blk.{i}.{name}.weight");
                pairs.push((name, linear.weight.val(), true, blocks));
            }
        }
        if let Some(blocks) = output.as_deref() {
            pairs.push(match &self.lm_head {
                Some(head) => ("output.weight".into(), head.weight.val(), true, blocks),
                None => (
                    "token_embd.weight".into(),
                    self.embed_tokens.weight.val(),
                    false,
                    blocks,
                ),
            });
        }
        // Every shape first (a file of another model is named as such), then every value.
        for (name, weight, transposed, blocks) in &pairs {
            let [rows, cols] = weight.dims();
            let model = if *transposed {
                [cols, rows]
            } else {
                [rows, cols]
            };
            let file = [blocks.rows(), blocks.cols()];
            if model != file {
                return Err(gguf.error(format!(
                    "tensor `{name}` is {file:?} (outputs × inputs), the model's {model:?}"
                )));
            }
        }
        for (name, weight, transposed, blocks) in pairs {
            let [rows, cols] = weight.dims();
            let values = host_f32(weight)
                .map_err(|e| gguf.error(format!("cannot read the model's `{name}`: {e}")))?;
            let values = if transposed {
                crate::names::transpose(&values, rows, cols)
            } else {
                values
            };
            if !blocks.equals(&values) {
                return Err(gguf.error(format!(
                    "tensor `{name}` differs from the model's weights: not the file they came from"
                )));
            }
        }
        self.attach(gguf, layers, output)
    }

    /// [`Llama::attach_gguf_blocks`] for a model whose block-quantised matrices were left
    /// uninitialised by the import ([`Lm::from_gguf_for_decoding`](crate::Lm::from_gguf_for_decoding)):
    /// each becomes a weight made from its blocks on first use — `d·q + m` per weight, the values
    /// [`Lm::from_gguf`](crate::Lm::from_gguf) loads —, so that until something needs it in f32 the
    /// model holds the matrix once, as blocks.
    pub(crate) fn attach_blocks_as_weights(
        &mut self,
        gguf: &GgufFile,
        layers: Vec<LayerBlocks>,
        output: Option<Arc<BlockMatrix>>,
    ) -> Result<(), LmError> {
        self.attach(gguf, layers, output)?;
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            if let Some(blocks) = &a.gguf_blocks {
                let linears = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
                linears_made_on_use(linears, blocks);
            }
            let m = &mut layer.mlp;
            if let Some(blocks) = &m.gguf_blocks {
                linears_made_on_use([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj], blocks);
            }
        }
        if let Some(blocks) = self.output_blocks.clone() {
            match &mut self.lm_head {
                Some(head) => {
                    head.weight =
                        weight_made_on_use(&head.weight, move || blocks.dequantise_transposed());
                }
                None => {
                    let embedding = &mut self.embed_tokens.weight;
                    *embedding = weight_made_on_use(embedding, move || blocks.dequantise());
                }
            }
        }
        Ok(())
    }

    /// See [`Lm::weights_made_on_use`](crate::Lm::weights_made_on_use): a matrix that has blocks
    /// and whose weight is not made was left to them by [`Llama::attach_blocks_as_weights`] (an
    /// import or a load initialises every other).
    pub(crate) fn weights_made_on_use(&self) -> Vec<ParamId> {
        let mut ids = Vec::new();
        let mut add = |has_blocks: bool, param: &Param<Tensor<B, 2>>| {
            if has_blocks && !param.is_initialized() {
                ids.push(param.id);
            }
        };
        for layer in &self.layers {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for linear in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                add(a.gguf_blocks.is_some(), &linear.weight);
            }
            for linear in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                add(m.gguf_blocks.is_some(), &linear.weight);
            }
        }
        let output = self.output_blocks.is_some();
        match &self.lm_head {
            Some(head) => add(output, &head.weight),
            None => add(output, &self.embed_tokens.weight),
        }
        ids
    }

    /// The tokens' embeddings: the embedding's lookup, or, while a decoding model has not made
    /// its f32 embedding from the tied output layer's blocks
    /// ([`Llama::attach_blocks_as_weights`]), the same rows read from the blocks.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`; output: `[batch, seq, d_model]`
    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, LmError> {
        let blocks = match (&self.lm_head, self.output_blocks.as_deref()) {
            (None, Some(blocks)) if !self.embed_tokens.weight.is_initialized() => blocks,
            _ => return Ok(self.embed_tokens.forward(tokens)),
        };
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let d_model = blocks.cols();
        let mut rows = Vec::with_capacity(batch * seq * d_model);
        for id in tokens.into_data().convert::<i64>().iter::<i64>() {
            usize::try_from(id)
                .ok()
                .and_then(|row| blocks.dequantise_row(row, &mut rows))
                .ok_or_else(|| LmError::InvalidInput {
                    input: "tokens",
                    reason: format!(
                        "token id {id} is outside the vocabulary of {}",
                        blocks.rows()
                    ),
                })?;
        }
        Ok(Tensor::from_data(
            TensorData::new(rows, [batch, seq, d_model]).convert::<B::FloatElem>(),
            &device,
        ))
    }

    /// Puts the blocks of [`llama_blocks`] in place, with the host copies of the norms.
    fn attach(
        &mut self,
        gguf: &GgufFile,
        layers: Vec<LayerBlocks>,
        output: Option<Arc<BlockMatrix>>,
    ) -> Result<(), LmError> {
        let host = |norm: &RmsNorm<B>| {
            host_f32(norm.weight.val())
                .map_err(|e| gguf.error(format!("cannot read a norm's weights: {e}")))
        };
        for (layer, blocks) in self.layers.iter_mut().zip(layers) {
            layer.self_attn.gguf_blocks = blocks.attention;
            layer.mlp.gguf_blocks = blocks.mlp;
            layer.host_norms = Some(Arc::new([
                host(&layer.input_layernorm)?,
                host(&layer.post_attention_layernorm)?,
            ]));
        }
        self.output_blocks = output;
        Ok(())
    }

    /// Every block's norms and matrices for the host steps, when all of them were loaded from
    /// GGUF blocks ([`Llama::attach_gguf_blocks`]).
    pub(crate) fn host_blocks(&self) -> Option<Vec<HostBlock<'_>>> {
        self.layers
            .iter()
            .map(|layer| {
                Some(HostBlock {
                    norms: layer.host_norms.as_deref()?,
                    attention: layer.self_attn.gguf_blocks.as_deref()?,
                    mlp: layer.mlp.gguf_blocks.as_deref()?,
                })
            })
            .collect()
    }

    /// See [`crate::Lm::dims`].
    pub fn dims(&self) -> LmDims {
        LmConfig::Llama(self.config.clone()).dims()
    }

    /// See [`crate::Lm::forward`].
    pub fn forward(
        &self,
        input: LmInput<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<LmOutput<B>, LmError> {
        if let Some(cache) = cache.as_deref_mut()
            && let Some(positions) = self.positions_per_step(&input, cache)
        {
            return self.forward_in_steps(input, cache, positions);
        }
        let step = prepare_step(&self.dims(), &input, cache.as_deref_mut())?;
        let last_only = input.last_logits_only;
        let [_, seq] = input.tokens.dims();
        let rope = Rope {
            head_dim: self.config.d_model / self.config.n_heads,
            theta: self.config.rope_theta,
        };
        let device = input.tokens.device();
        let mut x = add_offset(self.embed(input.tokens)?, input.embedding_offset.as_ref());
        let [batch, _, d_model] = x.dims();
        let host_blocks = self.host_blocks().filter(|_| {
            batch * seq <= MAX_BLOCK_ROWS
                && step.padding.is_none()
                && host_products_allowed::<B>(&device)
        });
        if let Some(blocks) = host_blocks {
            // Every block on the host (crate::host_step): the activations leave the backend
            // once and come back once.
            let shape = StepShape {
                batch,
                seq,
                start: step.start,
                n_heads: self.config.n_heads,
                n_kv_heads: self.config.n_kv_heads,
                head_dim: rope.head_dim,
                norm_eps: self.config.norm_eps,
            };
            let [cos, sin] = rope.host_tables(step.start, seq);
            let mut rows: Vec<f32> = x.to_data().iter::<f32>().collect();
            let memory = match &input.memory {
                Some(layers) => Some(
                    layers
                        .iter()
                        .map(host_memory)
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            let kernel = Kernel::detect();
            for (i, block) in blocks.iter().enumerate() {
                let mut scratch = None;
                let kv = match cache.as_deref_mut() {
                    Some(c) => {
                        let layer = &mut c.layers[i];
                        layer.len = step.start + seq;
                        layer.host(batch, shape.n_kv_heads, shape.head_dim)?
                    }
                    None => scratch.insert(HostKv::new(batch, shape.n_kv_heads, shape.head_dim)),
                };
                let memory = memory.as_ref().map(|m| &m[i]);
                block_step(block, &shape, [&cos, &sin], &mut rows, kv, memory, kernel);
            }
            x = Tensor::from_data(
                TensorData::new(rows, [batch, seq, d_model]).convert::<B::FloatElem>(),
                &device,
            );
        } else {
            let rope = rope.tables::<B>(step.start, seq, &device);
            let mask = step.mask();
            for (i, layer) in self.layers.iter().enumerate() {
                let memory: Option<&LayerMemory<B>> = input.memory.as_ref().map(|m| &m[i]);
                let layer_cache: Option<&mut LayerCache<B>> =
                    cache.as_deref_mut().map(|c| &mut c.layers[i]);
                let attended = layer.self_attn.forward(
                    layer.input_layernorm.forward(x.clone()),
                    Some(&rope),
                    mask.clone(),
                    memory,
                    layer_cache,
                );
                x = x + attended;
                x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
            }
        }
        let hidden = self.norm.forward(x);
        let positions = logit_positions(&hidden, last_only);
        let output_blocks = self.output_blocks.as_deref();
        let logits = match &self.lm_head {
            Some(head) => project(head, output_blocks, positions),
            None => match products_from_blocks(output_blocks.map(|b| [b]), &positions) {
                Some([logits]) => logits,
                None => tied_logits(positions, self.embed_tokens.weight.val()),
            },
        };
        Ok(LmOutput { logits, hidden })
    }
}

impl<B: Backend> Llama<B> {
    /// Positions per step when a cached forward of more rows than the blocks take
    /// ([`MAX_BLOCK_ROWS`]) — a long prompt's prefill — would read them if it were split: a
    /// model decoding from its blocks, no padding, no autodiff ([`host_products_allowed`]).
    /// `None`: one step.
    fn positions_per_step(&self, input: &LmInput<B>, cache: &KvCache<B>) -> Option<usize> {
        let [batch, seq] = input.tokens.dims();
        let split = batch * seq > MAX_BLOCK_ROWS
            && batch <= MAX_BLOCK_ROWS
            && cache.len + seq <= self.config.max_seq_len
            && input.padding.is_none()
            && host_products_allowed::<B>(&input.tokens.device())
            && self.host_blocks().is_some();
        split.then_some(MAX_BLOCK_ROWS / batch)
    }

    /// [`Llama::forward`] of `input` through `cache` as steps of `positions` positions each
    /// (the same values as one step, up to the products' rounding): the f32 weights of a model
    /// decoding from its blocks are never made for a long prompt.
    fn forward_in_steps(
        &self,
        input: LmInput<B>,
        cache: &mut KvCache<B>,
        positions: usize,
    ) -> Result<LmOutput<B>, LmError> {
        let [batch, seq] = input.tokens.dims();
        let (mut logits, mut hidden) = (Vec::new(), Vec::new());
        for start in (0..seq).step_by(positions) {
            let end = (start + positions).min(seq);
            let step = LmInput {
                tokens: input.tokens.clone().slice([0..batch, start..end]),
                padding: None,
                memory: input.memory.clone(),
                embedding_offset: input.embedding_offset.clone(),
                // When the caller asks for the last position only, the other steps' last
                // positions are computed and dropped.
                last_logits_only: input.last_logits_only,
            };
            let out = self.forward(step, Some(cache))?;
            if !input.last_logits_only || end == seq {
                logits.push(out.logits);
            }
            hidden.push(out.hidden);
        }
        Ok(LmOutput {
            logits: Tensor::cat(logits, 1),
            hidden: Tensor::cat(hidden, 1),
        })
    }
}

/// A layer's memory slots read to the host for [`block_step`].
fn host_memory<B: Backend>(memory: &LayerMemory<B>) -> Result<HostMemory, LmError> {
    let [_, n_slots, _] = memory.key.dims();
    let host = |t: &Tensor<B, 3>| {
        host_f32(t.clone()).map_err(|e| LmError::InvalidInput {
            input: "memory",
            reason: format!("cannot read the memory slots: {e}"),
        })
    };
    Ok(HostMemory {
        key: host(&memory.key)?,
        value: host(&memory.value)?,
        n_slots,
    })
}

/// Makes each of `linears` a weight made on use ([`weight_made_on_use`]) from its `blocks`,
/// transposed to the `Linear`'s `[d_in, d_out]`.
fn linears_made_on_use<B: Backend, const N: usize>(
    linears: [&mut Linear<B>; N],
    blocks: &Arc<[BlockMatrix; N]>,
) {
    for (k, linear) in linears.into_iter().enumerate() {
        let blocks = blocks.clone();
        linear.weight =
            weight_made_on_use(&linear.weight, move || blocks[k].dequantise_transposed());
    }
}

/// A parameter with `param`'s id, shape and device whose value, `values()` row-major, is made
/// when it is first read ([`Param::val`]).
fn weight_made_on_use<B: Backend>(
    param: &Param<Tensor<B, 2>>,
    values: impl Fn() -> Vec<f32> + Send + Sync + 'static,
) -> Param<Tensor<B, 2>> {
    let shape = param.lazy_shape();
    let data_shape = shape.clone();
    Param::uninitialized(
        param.id,
        move |device: &B::Device, _| {
            let data = TensorData::new(values(), data_shape.clone());
            Tensor::from_data(data.convert::<B::FloatElem>(), device)
        },
        param.lazy_device(),
        false,
        shape,
    )
}
