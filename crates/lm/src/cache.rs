//! Key/value caches for incremental decoding.

use burn::prelude::*;

/// One layer's cached keys and values (rotated keys for RoPE models), memory slots excluded.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `[batch, n_kv_heads, len, head_dim]`, or `None` before the first step.
    pub key: Option<Tensor<B, 4>>,
    /// `[batch, n_kv_heads, len, head_dim]`.
    pub value: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends this step's keys/values and returns the full sequences.
    pub(crate) fn append(
        &mut self,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let key = match self.key.take() {
            Some(past) => Tensor::cat(vec![past, key], 2),
            None => key,
        };
        let value = match self.value.take() {
            Some(past) => Tensor::cat(vec![past, value], 2),
            None => value,
        };
        self.key = Some(key.clone());
        self.value = Some(value.clone());
        (key, value)
    }
}

/// The whole model's cache: one [`LayerCache`] per block, the key padding mask of every cached
/// position, and the number of positions consumed (the next token's position).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerCache<B>>,
    /// `[batch, len]`, true where a cached position is padding.
    pub(crate) padding: Option<Tensor<B, 2, Bool>>,
    pub(crate) len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerCache {
                    key: None,
                    value: None,
                })
                .collect(),
            padding: None,
            len: 0,
        }
    }

    /// Number of positions already consumed; the next token is at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything, keeping the layer count.
    pub fn reset(&mut self) {
        *self = Self::new(self.layers.len());
    }
}
