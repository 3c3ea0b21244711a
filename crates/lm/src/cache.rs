//! Key/value caches for incremental decoding.

use burn::prelude::*;

/// One layer's cached keys and values (rotated keys for RoPE models), memory slots excluded, in
/// buffers allocated ahead: appending writes the new positions in place (doubling the buffer when
/// it is full) instead of copying the whole past on every step.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// `[batch, n_kv_heads, capacity, head_dim]`, or `None` before the first step; positions
    /// `len..capacity` are unused.
    pub key: Option<Tensor<B, 4>>,
    /// `[batch, n_kv_heads, capacity, head_dim]`.
    pub value: Option<Tensor<B, 4>>,
    /// Positions filled.
    pub len: usize,
}

/// Positions the first append reserves beyond the ones it writes.
const INITIAL_SPARE: usize = 64;

impl<B: Backend> LayerCache<B> {
    /// Appends this step's keys/values and returns the full sequences.
    ///
    /// # Shapes
    /// - key, value: `[batch, n_kv_heads, new, head_dim]`
    /// - output: `[batch, n_kv_heads, len + new, head_dim]` each
    pub(crate) fn append(
        &mut self,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, heads, new, head_dim] = key.dims();
        let (start, end) = (self.len, self.len + new);
        let write = |buffer: Option<Tensor<B, 4>>, fresh: Tensor<B, 4>| {
            let buffer = match buffer {
                Some(buffer) if buffer.dims()[2] >= end => buffer,
                old => {
                    let capacity = (2 * end).max(end + INITIAL_SPARE);
                    let grown = Tensor::zeros([batch, heads, capacity, head_dim], &fresh.device());
                    match old {
                        Some(old) if start > 0 => grown.slice_assign(
                            [0..batch, 0..heads, 0..start, 0..head_dim],
                            old.narrow(2, 0, start),
                        ),
                        _ => grown,
                    }
                }
            };
            buffer.slice_assign([0..batch, 0..heads, start..end, 0..head_dim], fresh)
        };
        let key_buffer = write(self.key.take(), key);
        let value_buffer = write(self.value.take(), value);
        self.len = end;
        let (key, value) = (
            key_buffer.clone().narrow(2, 0, end),
            value_buffer.clone().narrow(2, 0, end),
        );
        self.key = Some(key_buffer);
        self.value = Some(value_buffer);
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
                    len: 0,
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
