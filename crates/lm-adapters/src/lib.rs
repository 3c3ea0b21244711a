//! Conditioning any `chorus-lm` model on the sequence latent z.
//!
//! A [`ZAdapter`] belongs to one model (its width and depth) and turns z into the two hooks that
//! [`chorus_lm::LmInput`] carries:
//!
//! - *memory*: `z → (K_l, V_l)` for every layer l, `memory_slots` key/value slots that every position
//!   attends to (Optimus's idea; chorus reads them in a parallel softmax, see `chorus_lm`);
//! - *embedding*: `z → W z`, added to every input embedding.
//!
//! The value and embedding projections start at zero, so an untrained adapter leaves its model
//! exactly as it was, while still receiving gradients.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use chorus_lm::{LlamaConfig, LmConfig, LmInput};
//! use chorus_lm_adapters::ZAdapterConfig;
//!
//! let device = Default::default();
//! let lm = LmConfig::Llama(LlamaConfig {
//!     vocab_size: 32, d_model: 16, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 32,
//!     rope_theta: 10_000.0, norm_eps: 1e-5, tie_embeddings: true, max_seq_len: 64,
//! })
//! .init::<NdArray>(&device)?;
//! let adapter = ZAdapterConfig { d_latent: 8, memory_slots: 1, embedding: true }
//!     .init::<NdArray>(&lm.dims(), &device)?;
//! let tokens = Tensor::<NdArray, 2, Int>::from_data([[1, 2, 3]], &device);
//! let z = Tensor::<NdArray, 2>::ones([1, 8], &device);
//! let plain = lm.forward(LmInput::new(tokens.clone()), None)?.logits;
//! let conditioned = lm.forward(adapter.condition(LmInput::new(tokens), z), None)?.logits;
//! assert_eq!(plain.into_data(), conditioned.into_data()); // zero-initialised: no change yet
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use chorus_lm::{LayerMemory, LmDims, LmInput};
use serde::{Deserialize, Serialize};

/// Errors of `chorus-lm-adapters`.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// `d_latent = 0`: there is no z to read.
    #[error("invalid adapter config: d_latent = 0 must be > 0")]
    NoLatent,
    /// `memory_slots = 0` and `embedding = false`: the adapter would have no way to read z.
    #[error(
        "invalid adapter config: memory_slots = 0 with embedding = false leaves no way to read z"
    )]
    NoReader,
}

/// How one model reads z.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZAdapterConfig {
    /// Dimension of z.
    pub d_latent: usize,
    /// Memory slots per layer (0: no memory conditioning; Optimus uses 1).
    pub memory_slots: usize,
    /// Add `W z` to every input embedding.
    pub embedding: bool,
}

impl ZAdapterConfig {
    /// Validates and allocates an adapter for a model of shape `dims`.
    pub fn init<B: Backend>(
        &self,
        dims: &LmDims,
        device: &B::Device,
    ) -> Result<ZAdapter<B>, AdapterError> {
        if self.d_latent == 0 {
            return Err(AdapterError::NoLatent);
        }
        if self.memory_slots == 0 && !self.embedding {
            return Err(AdapterError::NoReader);
        }
        let memory_width = self.memory_slots * dims.n_layers * dims.kv_dim();
        let linear = |d_out, initializer| {
            LinearConfig::new(self.d_latent, d_out)
                .with_bias(false)
                .with_initializer(initializer)
                .init(device)
        };
        let memory = self.memory_slots > 0;
        Ok(ZAdapter {
            memory_key: memory.then(|| {
                linear(
                    memory_width,
                    Initializer::Normal {
                        mean: 0.0,
                        std: 0.02,
                    },
                )
            }),
            memory_value: memory.then(|| linear(memory_width, Initializer::Zeros)),
            embedding: self
                .embedding
                .then(|| linear(dims.d_model, Initializer::Zeros)),
            memory_slots: self.memory_slots,
            n_layers: dims.n_layers,
            kv_dim: dims.kv_dim(),
        })
    }
}

/// One model's reader of z. Build with [`ZAdapterConfig::init`].
#[derive(Module, Debug)]
pub struct ZAdapter<B: Backend> {
    /// `[d_latent, memory_slots · n_layers · kv_dim]`: memory keys.
    pub memory_key: Option<Linear<B>>,
    /// `[d_latent, memory_slots · n_layers · kv_dim]`: memory values (zero at init).
    pub memory_value: Option<Linear<B>>,
    /// `[d_latent, d_model]`: the embedding offset (zero at init).
    pub embedding: Option<Linear<B>>,
    /// Memory slots per layer.
    pub memory_slots: usize,
    /// The model's layer count.
    pub n_layers: usize,
    /// The model's key/value width.
    pub kv_dim: usize,
}

impl<B: Backend> ZAdapter<B> {
    /// Adds z's memory slots and embedding offset to `input`.
    ///
    /// # Shapes
    /// - z: `[batch, d_latent]`, the batch of `input`
    pub fn condition(&self, input: LmInput<B>, z: Tensor<B, 2>) -> LmInput<B> {
        let [batch, _] = z.dims();
        let mut input = input;
        if let (Some(key), Some(value)) = (&self.memory_key, &self.memory_value) {
            // [batch, slots · layers · kv] -> [batch, slots, layers, kv] -> per layer [batch, slots, kv]
            let split =
                |t: Tensor<B, 2>| t.reshape([batch, self.memory_slots, self.n_layers, self.kv_dim]);
            let keys = split(key.forward(z.clone()));
            let values = split(value.forward(z.clone()));
            let memory = (0..self.n_layers)
                .map(|l| LayerMemory {
                    key: keys.clone().narrow(2, l, 1).squeeze_dim::<3>(2),
                    value: values.clone().narrow(2, l, 1).squeeze_dim::<3>(2),
                })
                .collect();
            input = input.with_memory(memory);
        }
        if let Some(embedding) = &self.embedding {
            input = input.with_embedding_offset(embedding.forward(z));
        }
        input
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use chorus_lm::{Gpt2Config, LlamaConfig, LmConfig};

    type B = burn::backend::NdArray<f32>;

    fn models() -> Vec<LmConfig> {
        vec![
            LmConfig::Llama(LlamaConfig {
                vocab_size: 40,
                d_model: 24,
                n_layers: 3,
                n_heads: 4,
                n_kv_heads: 2,
                d_ff: 32,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
                tie_embeddings: true,
                max_seq_len: 32,
            }),
            LmConfig::Gpt2(Gpt2Config {
                vocab_size: 40,
                d_model: 16,
                n_layers: 2,
                n_heads: 2,
                d_ff: 32,
                max_seq_len: 32,
                norm_eps: 1e-5,
                tie_embeddings: true,
            }),
        ]
    }

    #[test]
    fn zero_adapters_leave_each_model_exact_and_trained_ones_change_it() {
        let device = Default::default();
        let tokens = Tensor::<B, 2, Int>::from_data([[1, 5, 9, 2], [3, 3, 7, 0]], &device);
        let z = Tensor::<B, 2>::random([2, 6], Distribution::Normal(0.0, 1.0), &device);
        for config in models() {
            let lm = config.init::<B>(&device).unwrap();
            let plain = lm
                .forward(LmInput::new(tokens.clone()), None)
                .unwrap()
                .logits;
            for (slots, embedding) in [(1, false), (2, true), (0, true)] {
                let cfg = ZAdapterConfig {
                    d_latent: 6,
                    memory_slots: slots,
                    embedding,
                };
                let mut adapter = cfg.init::<B>(&lm.dims(), &device).unwrap();
                let out = lm
                    .forward(
                        adapter.condition(LmInput::new(tokens.clone()), z.clone()),
                        None,
                    )
                    .unwrap()
                    .logits;
                assert_eq!(out.into_data(), plain.clone().into_data(), "{cfg:?}");
                // Give the zero projections weights: now z matters.
                let bump = |l: &mut Option<Linear<B>>| {
                    if let Some(l) = l {
                        l.weight = l
                            .weight
                            .clone()
                            .map(|w| w.random_like(Distribution::Normal(0.0, 0.5)));
                    }
                };
                bump(&mut adapter.memory_value);
                bump(&mut adapter.embedding);
                let out = lm
                    .forward(
                        adapter.condition(LmInput::new(tokens.clone()), z.clone()),
                        None,
                    )
                    .unwrap()
                    .logits;
                let diff: f32 = (out - plain.clone()).abs().max().into_scalar();
                assert!(diff > 1e-3, "{cfg:?}: z has no effect");
            }
        }
    }

    /// Layer l's slot s reads columns `(s · n_layers + l) · kv_dim ..` of `z W` (the layout the
    /// doc of [`ZAdapter::memory_key`] gives), keys and values alike, and the embedding offset is
    /// `z W_e`: checked on the host against each projection's weights.
    #[test]
    fn each_layer_reads_its_own_slots_of_z_projected() {
        let device = Default::default();
        let dims = models()[0].dims();
        let (d_latent, slots) = (3, 2);
        let mut adapter = ZAdapterConfig {
            d_latent,
            memory_slots: slots,
            embedding: true,
        }
        .init::<B>(&dims, &device)
        .unwrap();
        let randomize = |l: &mut Linear<B>| {
            l.weight = l
                .weight
                .clone()
                .map(|w| w.random_like(Distribution::Normal(0.0, 1.0)));
        };
        for l in [
            &mut adapter.memory_key,
            &mut adapter.memory_value,
            &mut adapter.embedding,
        ] {
            randomize(l.as_mut().unwrap());
        }
        let batch = 2;
        let z = Tensor::<B, 2>::random([batch, d_latent], Distribution::Normal(0.0, 1.0), &device);
        let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
        let zs = host(z.clone());
        // (z W)[b, c] for W [d_latent, width].
        let project = |l: &Option<Linear<B>>, b: usize, c: usize| {
            let w = host(l.as_ref().unwrap().weight.val());
            let width = w.len() / d_latent;
            (0..d_latent)
                .map(|i| zs[b * d_latent + i] * w[i * width + c])
                .sum::<f32>()
        };
        let input = adapter.condition(LmInput::new(Tensor::zeros([batch, 1], &device)), z);
        let memory = input.memory.expect("memory slots");
        assert_eq!(memory.len(), dims.n_layers);
        let kv = dims.kv_dim();
        for (layer, m) in memory.into_iter().enumerate() {
            for (got, projection) in [
                (m.key, &adapter.memory_key),
                (m.value, &adapter.memory_value),
            ] {
                assert_eq!(got.dims(), [batch, slots, kv]);
                let got = got.into_data().to_vec::<f32>().unwrap();
                for b in 0..batch {
                    for s in 0..slots {
                        for c in 0..kv {
                            let expected =
                                project(projection, b, (s * dims.n_layers + layer) * kv + c);
                            let v = got[(b * slots + s) * kv + c];
                            assert!(
                                (v - expected).abs() < 1e-4,
                                "layer {layer}, row {b}, slot {s}, column {c}: {v} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
        let offset = host(input.embedding_offset.expect("an embedding offset"));
        for b in 0..batch {
            for c in 0..dims.d_model {
                let expected = project(&adapter.embedding, b, c);
                assert!((offset[b * dims.d_model + c] - expected).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn bad_configs_are_rejected() {
        let device = Default::default();
        let dims = models()[0].dims();
        for cfg in [
            ZAdapterConfig {
                d_latent: 0,
                memory_slots: 1,
                embedding: false,
            },
            ZAdapterConfig {
                d_latent: 4,
                memory_slots: 0,
                embedding: false,
            },
        ] {
            let err = cfg.init::<B>(&dims, &device).unwrap_err().to_string();
            let says = if cfg.d_latent == 0 {
                "d_latent = 0 must be > 0"
            } else {
                "memory_slots = 0 with embedding = false"
            };
            assert!(err.contains(says), "{cfg:?}: {err}");
        }
    }
}
