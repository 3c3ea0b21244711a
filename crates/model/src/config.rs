//! [`ChorusConfig`]: every switch of the joint model, validated before allocation.

use chorus_latent::{PriorConfig, SelectorKind};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Every switch of the joint model. The ablations are settings of the same code path:
/// `d_latent = 0` is Co-LLM (no z), no assistants is an Optimus-style VAE (K = 1), both is plain LM
/// fine-tuning, and `d_latent = 0` with `selector = "static"` is a static mixture of the K models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChorusConfig {
    /// Dimension of z; 0 turns the continuous latent off. Default 32.
    #[serde(default = "default_d_latent")]
    pub d_latent: usize,
    /// The prior p(z | c). Default conditional.
    #[serde(default = "default_prior")]
    pub prior: PriorConfig,
    /// Memory slots per layer in each adapter (0: none). Default 1.
    #[serde(default = "default_memory_slots")]
    pub memory_slots: usize,
    /// Add an embedding offset from z in each adapter. Default true.
    #[serde(default = "default_true")]
    pub embedding_offset: bool,
    /// Assistants read z through their own adapters. Default true. When false, assistants do not
    /// depend on z and their log-probs can be precomputed (see [`crate::ChorusBatch`]).
    #[serde(default = "default_true")]
    pub assistant_adapters: bool,
    /// Train the assistants' weights too. Default false (frozen; their adapters still train).
    #[serde(default)]
    pub train_assistants: bool,
    /// Train the base's weights. Default true. False freezes a pretrained base (SmolLM2, say):
    /// its z-adapter, the posterior and prior heads and the selector still train, so the base
    /// reads the plan through trainable adapters only.
    #[serde(default = "default_true")]
    pub train_base: bool,
    /// Free bits λ per dimension (0 disables). Default 0.
    #[serde(default)]
    pub free_bits: f64,
    /// Assistants served by an OpenAI-compatible server rather than held in memory: models
    /// `K − remote_assistants .. K − 1`, after the local ones. Batches carry their cached
    /// log-probs (`chorus score`); decoding asks the server for their tokens. `chorus train` sets
    /// it from the URLs among its assistants. Default 0.
    #[serde(default)]
    pub remote_assistants: usize,
    /// What the writer choice π depends on: `per_token` (the selector head on the base's hidden
    /// state, Co-LLM's) or `static` (one learned π over the K models, the same at every token: a
    /// static mixture). Default `per_token`.
    #[serde(default)]
    pub selector: SelectorKind,
    /// z samples per sequence in the training estimate. Default 1.
    #[serde(default = "default_samples")]
    pub n_samples: usize,
    /// The control that separates what z carries from the adapters' plain adaptation: z is the
    /// prior mean `E p(z | c)` in training, evaluation and decoding — no posterior, no sample, no
    /// KL — so the adapters still read a context-dependent vector, but one that knows nothing of
    /// the target (`q(z | x, c) := p(z | c)`, sampled at its mean: the ELBO is `log p(x | c, μ_p)`).
    /// Default false.
    #[serde(default)]
    pub z_at_prior_mean: bool,
    /// Weight α of the bag-of-words term on z (Zhao et al., 2017): a head `ℓ = W z + b` over the
    /// vocabulary, trained with the model, and the training loss adds
    /// `−α Σ_{t ∈ x} log softmax(ℓ)_{x_t}` ([`chorus_elbo::with_bag_of_words`]), which rewards a z
    /// that predicts the target's words without the LMs. No part of the likelihood: evaluation and
    /// decoding ignore the head. Default 0 (off).
    #[serde(default)]
    pub bag_of_words: f64,
}

fn default_d_latent() -> usize {
    32
}
fn default_prior() -> PriorConfig {
    PriorConfig::Conditional
}
fn default_memory_slots() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_samples() -> usize {
    1
}

impl Default for ChorusConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl ChorusConfig {
    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.free_bits.is_finite() && self.free_bits >= 0.0) {
            return Err(ModelError::OutOfRange {
                key: "free_bits",
                value: self.free_bits.to_string(),
                expected: "finite and ≥ 0",
            });
        }
        if self.n_samples == 0 {
            return Err(ModelError::OutOfRange {
                key: "n_samples",
                value: "0".into(),
                expected: "≥ 1",
            });
        }
        if self.d_latent > 0 && self.memory_slots == 0 && !self.embedding_offset {
            return Err(ModelError::Conflict {
                key: "memory_slots",
                value: "0".into(),
                reason: "with d_latent > 0 and embedding_offset = false, no model could read z: \
                         set memory_slots > 0 or embedding_offset = true",
            });
        }
        if !(self.bag_of_words.is_finite() && self.bag_of_words >= 0.0) {
            return Err(ModelError::OutOfRange {
                key: "bag_of_words",
                value: self.bag_of_words.to_string(),
                expected: "finite and ≥ 0",
            });
        }
        if self.bag_of_words > 0.0 && (self.d_latent == 0 || self.z_at_prior_mean) {
            return Err(ModelError::Conflict {
                key: "bag_of_words",
                value: self.bag_of_words.to_string(),
                reason: "rewards what z carries about the target, but there is no z drawn from \
                         q(z | x, c) (d_latent = 0 or z_at_prior_mean = true)",
            });
        }
        if self.z_at_prior_mean && self.d_latent == 0 {
            return Err(ModelError::Conflict {
                key: "z_at_prior_mean",
                value: "true".into(),
                reason: "fixes z at the prior mean, but d_latent = 0 turns z off",
            });
        }
        if self.remote_assistants > 0 && self.d_latent > 0 && self.assistant_adapters {
            return Err(ModelError::Conflict {
                key: "remote_assistants",
                value: self.remote_assistants.to_string(),
                reason: "a server cannot read z: set assistant_adapters = false (or d_latent = 0)",
            });
        }
        Ok(())
    }

    /// A lower bound on the parameters of a chorus of these models under this config: the LMs'
    /// ([`chorus_lm::LmConfig::min_parameters`]), the posterior head `d_model · 2 d_latent` and
    /// each adapter's memory keys and values `2 · d_latent · slots · n_layers · kv_dim` and
    /// embedding offset `d_latent · d_model`, and the bag-of-words head `(d_latent + 1) · vocab` when
    /// it is on. `None` past `u64`. Lets a loader refuse a manifest
    /// that describes more weights than its file holds, before allocating them.
    pub fn min_parameters(
        &self,
        base: &chorus_lm::LmConfig,
        assistants: &[chorus_lm::LmConfig],
    ) -> Option<u64> {
        let z = self.d_latent as u64;
        let adapter = |c: &chorus_lm::LmConfig| -> Option<u64> {
            if c.validate().is_err() {
                return None; // its dims (head_dim = d_model / n_heads) are not defined
            }
            let d = c.dims();
            let memory = z
                .checked_mul(self.memory_slots as u64)?
                .checked_mul(d.n_layers as u64)?
                .checked_mul(d.kv_dim() as u64)?
                .checked_mul(2)?;
            let offset = if self.embedding_offset {
                z.checked_mul(d.d_model as u64)?
            } else {
                0
            };
            memory.checked_add(offset)
        };
        let mut total = base
            .min_parameters()?
            .checked_add(adapter(base)?)?
            .checked_add(
                (base.dims().d_model as u64)
                    .checked_mul(z)?
                    .checked_mul(2)?,
            )?;
        if self.bag_of_words > 0.0 && self.has_z() {
            let vocab = base.dims().vocab_size as u64;
            total = total.checked_add(z.checked_add(1)?.checked_mul(vocab)?)?;
        }
        for a in assistants {
            total = total.checked_add(a.min_parameters()?)?;
            if self.assistant_adapters {
                total = total.checked_add(adapter(a)?)?;
            }
        }
        Some(total)
    }

    /// Whether the continuous latent is on.
    pub fn has_z(&self) -> bool {
        self.d_latent > 0
    }
}
