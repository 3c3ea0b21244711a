//! Causal self-attention shared by every family: grouped-query heads, optional RoPE, KV cache,
//! and memory slots (extra keys/values every position attends to).
//!
//! Memory slots are read by a parallel attention branch that shares the queries but has its own
//! softmax: `out = softmax(q Kᵀ + mask) V + softmax(q K_memᵀ) V_mem`. Unlike Optimus's joint softmax,
//! slots with zero values then leave the layer exactly unchanged, so a zero-initialised adapter is an
//! exact no-op and still receives gradients through its value projection.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use std::sync::Arc;

use crate::cache::LayerCache;
use crate::quantised::{BlockMatrix, project, project_all};
use crate::rope::RopeTables;

/// Score given to masked (future or padding) keys before the softmax: finite, so a row whose keys
/// are all masked (a padding query) yields a uniform, finite distribution instead of NaN.
const MASKED_SCORE: f32 = -1.0e9;

/// Per-layer memory slots that every position attends to, in the layer's key/value space. They
/// carry no position (no RoPE), are never masked, and are attended in their own softmax.
#[derive(Debug, Clone)]
pub struct LayerMemory<B: Backend> {
    /// `[batch, n_slots, n_kv_heads * head_dim]`.
    pub key: Tensor<B, 3>,
    /// `[batch, n_slots, n_kv_heads * head_dim]`.
    pub value: Tensor<B, 3>,
}

/// Configuration of [`Attention`].
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Residual width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Biases on the four projections (GPT-2: yes, llama: no).
    pub bias: bool,
}

impl AttentionConfig {
    /// Allocates the projections.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let head_dim = self.d_model / self.n_heads;
        let kv_dim = self.n_kv_heads * head_dim;
        let linear = |d_in, d_out| {
            LinearConfig::new(d_in, d_out)
                .with_bias(self.bias)
                .init(device)
        };
        Attention {
            q_proj: linear(self.d_model, self.d_model),
            k_proj: linear(self.d_model, kv_dim),
            v_proj: linear(self.d_model, kv_dim),
            o_proj: linear(self.d_model, self.d_model),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim,
            gguf_blocks: None,
        }
    }
}

/// Multi-head causal self-attention with `n_kv_heads ≤ n_heads` key/value heads:
/// `softmax(q kᵀ / √head_dim + mask) v`, each key/value head shared by `n_heads / n_kv_heads`
/// query heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `[d_model, d_model]`.
    pub q_proj: Linear<B>,
    /// Key projection `[d_model, n_kv_heads * head_dim]`.
    pub k_proj: Linear<B>,
    /// Value projection `[d_model, n_kv_heads * head_dim]`.
    pub v_proj: Linear<B>,
    /// Output projection `[d_model, d_model]`.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The four projections' GGUF blocks (q, k, v, o), for few-row products on the CPU
    /// ([`Lm::from_gguf_for_decoding`](crate::Lm::from_gguf_for_decoding)).
    #[module(skip)]
    pub gguf_blocks: Option<Arc<[BlockMatrix; 4]>>,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - x: `[batch, seq, d_model]`; `rope`, when given, holds the tables for these positions
    /// - mask: `[batch, seq, start + seq]`, true where a key must be ignored (see [`attention_mask`])
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: Option<&RopeTables<B>>,
        mask: Tensor<B, 3, Bool>,
        memory: Option<&LayerMemory<B>>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, d_model] = x.dims();
        let (n_heads, n_kv_heads, head_dim) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let blocks = self.gguf_blocks.as_deref();
        let [q, k, v] = project_all(
            [&self.q_proj, &self.k_proj, &self.v_proj],
            blocks.map(|[q, k, v, _]| [q, k, v]),
            x,
        );
        let (mut q, mut k, v) = (
            heads(q, n_heads),
            heads(k, n_kv_heads),
            heads(v, n_kv_heads),
        );
        if let Some(rope) = rope {
            q = rope.apply(q);
            k = rope.apply(k);
        }
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let scale = (head_dim as f64).sqrt();
        // Each key/value head serves the `group = n_heads / n_kv_heads` query heads h = kv·group + g:
        // stack those queries as rows, [batch, heads, seq, hd] -> [batch, kv, group·seq, hd], and
        // multiply by the shared keys and values as they are (no copy of them per query head).
        let group = n_heads / n_kv_heads;
        let grouped = |t: Tensor<B, 4>| {
            let [_, _, _, last] = t.dims();
            t.reshape([batch, n_kv_heads, group * seq, last])
        };
        let per_head = |t: Tensor<B, 4>| {
            let [_, _, _, last] = t.dims();
            t.reshape([batch, n_heads, seq, last])
        };
        let q = grouped(q);
        let scores = per_head(q.clone().matmul(k.swap_dims(2, 3))) / scale; // [b, h, seq, keys]
        let scores = scores.mask_fill(mask.unsqueeze_dim::<4>(1), MASKED_SCORE);
        let mut out = per_head(grouped(softmax(scores, 3)).matmul(v)); // [b, h, seq, hd]
        if let Some(memory) = memory {
            let [_, n_slots, _] = memory.key.dims();
            if n_slots > 0 {
                let slots = |t: Tensor<B, 3>| {
                    t.reshape([batch, n_slots, n_kv_heads, head_dim])
                        .swap_dims(1, 2)
                };
                let mem_scores = q.matmul(slots(memory.key.clone()).swap_dims(2, 3)) / scale;
                let mem_out = softmax(mem_scores, 3).matmul(slots(memory.value.clone()));
                out = out + per_head(mem_out);
            }
        }
        let out = out.swap_dims(1, 2).reshape([batch, seq, d_model]);
        project(&self.o_proj, blocks.map(|[_, _, _, o]| o), out)
    }
}

/// Builds the causal + padding mask for `seq` new tokens at positions `start..start + seq` that
/// see all `start + seq` token positions (memory slots are never masked and not part of it).
///
/// Query `i` may attend to key `j` when `j ≤ start + i` and key `j` is not padding.
///
/// # Shapes
/// - padding: `[batch, start + seq]`, true at padding positions (cache included)
/// - output: `[batch, seq, start + seq]`, true where masked
pub fn attention_mask<B: Backend>(
    batch: usize,
    seq: usize,
    start: usize,
    padding: Option<Tensor<B, 2, Bool>>,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let n_keys = start + seq;
    let causal: Vec<bool> = (0..seq)
        .flat_map(|i| (0..n_keys).map(move |j| j > start + i))
        .collect();
    let causal = Tensor::<B, 2, Bool>::from_data(TensorData::new(causal, [seq, n_keys]), device)
        .unsqueeze_dim::<3>(0)
        .expand([batch, seq, n_keys]);
    match padding {
        None => causal,
        Some(padding) => causal.bool_or(padding.unsqueeze_dim::<3>(1).expand([batch, seq, n_keys])),
    }
}
