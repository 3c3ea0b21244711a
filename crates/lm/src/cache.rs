//! Key/value caches for incremental decoding.

use burn::prelude::*;

use crate::LmError;
use crate::host_step::HostKv;
use crate::model::host_f32;

/// One layer's cached keys and values (rotated keys for RoPE models), memory slots excluded, in
/// buffers allocated ahead: appending writes the new positions in place (doubling the buffer when
/// it is full) instead of copying the whole past on every step. The buffers are the backend's
/// tensors, or host vectors while a GGUF llama decodes on the host
/// ([`crate::host_step`]); each path moves them to its side when it needs them.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub(crate) buffers: Buffers<B>,
    /// Positions filled.
    pub len: usize,
}

/// Where a [`LayerCache`]'s keys and values live.
#[derive(Debug, Clone)]
pub(crate) enum Buffers<B: Backend> {
    /// Before the first step.
    Empty,
    /// `[batch, n_kv_heads, capacity, head_dim]` each; positions `len..capacity` are unused.
    Tensors {
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
    },
    /// The same layout on the host.
    Host(HostKv),
}

/// Positions the first append reserves beyond the ones it writes.
const INITIAL_SPARE: usize = 64;

/// The capacity a buffer grows to when `end` positions do not fit.
pub(crate) fn grown_capacity(end: usize) -> usize {
    (2 * end).max(end + INITIAL_SPARE)
}

impl<B: Backend> LayerCache<B> {
    /// Positions the buffers hold before they grow (0 before the first step).
    pub fn capacity(&self) -> usize {
        match &self.buffers {
            Buffers::Empty => 0,
            Buffers::Tensors { key, .. } => key.dims()[2],
            Buffers::Host(host) => host.capacity,
        }
    }

    /// The buffers as tensors on `device` (moved there from the host if they were on it).
    fn tensors(&mut self, device: &B::Device) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        match std::mem::replace(&mut self.buffers, Buffers::Empty) {
            Buffers::Empty => None,
            Buffers::Tensors { key, value } => Some((key, value)),
            Buffers::Host(host) => {
                let shape = host.shape();
                let tensor = |values: Vec<f32>| {
                    Tensor::from_data(
                        TensorData::new(values, shape).convert::<B::FloatElem>(),
                        device,
                    )
                };
                Some((tensor(host.key), tensor(host.value)))
            }
        }
    }

    /// The buffers on the host (moved there from the backend if they were on it), for a cache of
    /// `batch` rows of `n_kv_heads × head_dim`.
    pub(crate) fn host(
        &mut self,
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<&mut HostKv, LmError> {
        let host = match std::mem::replace(&mut self.buffers, Buffers::Empty) {
            Buffers::Host(host) => host,
            Buffers::Empty => HostKv::new(batch, n_kv_heads, head_dim),
            Buffers::Tensors { key, value } => {
                let shape = key.dims();
                let values = |t: Tensor<B, 4>| {
                    host_f32(t).map_err(|e| LmError::InvalidInput {
                        input: "cache",
                        reason: format!("cannot read the cached keys and values: {e}"),
                    })
                };
                HostKv::from_buffers(shape, values(key)?, values(value)?)
            }
        };
        if host.shape()[0] != batch {
            let reason = format!("batch of {batch} for a cache holding {}", host.shape()[0]);
            self.buffers = Buffers::Host(host);
            return Err(LmError::InvalidInput {
                input: "cache",
                reason,
            });
        }
        self.buffers = Buffers::Host(host);
        match &mut self.buffers {
            Buffers::Host(host) => Ok(host),
            _ => unreachable!("set just above"),
        }
    }

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
        let old = self.tensors(&key.device());
        let write = |buffer: Option<Tensor<B, 4>>, fresh: Tensor<B, 4>| {
            let buffer = match buffer {
                Some(buffer) if buffer.dims()[2] >= end => buffer,
                old => {
                    let capacity = grown_capacity(end);
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
        let (old_key, old_value) = old.unzip();
        let key_buffer = write(old_key, key);
        let value_buffer = write(old_value, value);
        self.len = end;
        let (key, value) = (
            key_buffer.clone().narrow(2, 0, end),
            value_buffer.clone().narrow(2, 0, end),
        );
        self.buffers = Buffers::Tensors {
            key: key_buffer,
            value: value_buffer,
        };
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
                    buffers: Buffers::Empty,
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
