//! Model configurations: one struct per architecture family and the tagged [`LmConfig`] over them.

use serde::{Deserialize, Serialize};

use crate::LmError;

/// A llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.
///
/// SmolLM2-135M is `LlamaConfig { vocab_size: 49152, d_model: 576, n_layers: 30, n_heads: 9,
/// n_kv_heads: 3, d_ff: 1536, rope_theta: 1e5, norm_eps: 1e-5, tie_embeddings: true,
/// max_seq_len: 8192 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads; `head_dim = d_model / n_heads`.
    pub n_heads: usize,
    /// Number of key/value heads (GQA); must divide `n_heads`. Equal to `n_heads` gives plain MHA.
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub d_ff: usize,
    /// RoPE base θ; default 10000.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm ε; default 1e-5.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the input embedding with the output projection; default false.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Longest sequence (cache included) the model accepts; default 2048.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
}

/// A GPT-2-family decoder: LayerNorm, learned positions, GELU (tanh approximation), biases everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpt2Config {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of attention heads.
    pub n_heads: usize,
    /// Hidden width of the MLP; GPT-2 uses `4 * d_model`.
    pub d_ff: usize,
    /// Number of learned positions (the context window); default 1024.
    #[serde(default = "default_gpt2_positions")]
    pub max_seq_len: usize,
    /// LayerNorm ε; default 1e-5.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the input embedding with the output projection; default true (as GPT-2).
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_max_seq_len() -> usize {
    2048
}
fn default_gpt2_positions() -> usize {
    1024
}
fn default_true() -> bool {
    true
}

/// Any supported architecture, tagged by `family` in JSON: `{"family": "llama", "d_model": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum LmConfig {
    /// See [`LlamaConfig`].
    Llama(LlamaConfig),
    /// See [`Gpt2Config`].
    Gpt2(Gpt2Config),
}

/// The shape facts every family shares, as the rest of chorus sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmDims {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Residual width.
    pub d_model: usize,
    /// Number of blocks (= number of memory slots an adapter must provide).
    pub n_layers: usize,
    /// Number of key/value heads.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence accepted.
    pub max_seq_len: usize,
}

impl LmDims {
    /// Width of one layer's keys (and values): `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

impl LmConfig {
    /// Checks every field before anything is allocated.
    pub fn validate(&self) -> Result<(), LmError> {
        let (vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq_len, eps) = match self {
            LmConfig::Llama(c) => (
                c.vocab_size,
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.d_ff,
                c.max_seq_len,
                c.norm_eps,
            ),
            LmConfig::Gpt2(c) => (
                c.vocab_size,
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.n_heads,
                c.d_ff,
                c.max_seq_len,
                c.norm_eps,
            ),
        };
        for (field, value) in [
            ("vocab_size", vocab),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("n_kv_heads", n_kv_heads),
            ("d_ff", d_ff),
            ("max_seq_len", max_seq_len),
        ] {
            if value == 0 {
                return Err(LmError::config(field, "must be > 0"));
            }
        }
        if d_model % n_heads != 0 {
            return Err(LmError::config(
                "n_heads",
                format!("= {n_heads} must divide d_model = {d_model}"),
            ));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(LmError::config(
                "n_kv_heads",
                format!("= {n_kv_heads} must divide n_heads = {n_heads}"),
            ));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(LmError::config("norm_eps", format!("= {eps} must be > 0")));
        }
        if let LmConfig::Llama(c) = self {
            if (d_model / n_heads) % 2 != 0 {
                return Err(LmError::config(
                    "n_heads",
                    format!("head_dim = {} must be even for RoPE", d_model / n_heads),
                ));
            }
            if !(c.rope_theta > 1.0 && c.rope_theta.is_finite()) {
                return Err(LmError::config(
                    "rope_theta",
                    format!("= {} must be > 1", c.rope_theta),
                ));
            }
        }
        Ok(())
    }

    /// A lower bound on the parameter count (embedding, learned positions, and per block the
    /// query and output projections and the feed-forward matrices), `None` past `u64`. Lets a
    /// loader refuse a config that describes far more weights than its file holds before
    /// allocating them.
    pub fn min_parameters(&self) -> Option<u64> {
        let (vocab, d, layers, d_ff, positions, ff_matrices) = match self {
            LmConfig::Llama(c) => (c.vocab_size, c.d_model, c.n_layers, c.d_ff, 0, 3),
            LmConfig::Gpt2(c) => (
                c.vocab_size,
                c.d_model,
                c.n_layers,
                c.d_ff,
                c.max_seq_len,
                2,
            ),
        };
        let [vocab, d, layers, d_ff, positions] =
            [vocab, d, layers, d_ff, positions].map(|v| v as u64);
        let embeddings = vocab.checked_add(positions)?.checked_mul(d)?;
        let block = d
            .checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(d_ff)?.checked_mul(ff_matrices)?)?;
        embeddings.checked_add(block.checked_mul(layers)?)
    }

    /// The shared shape facts.
    pub fn dims(&self) -> LmDims {
        match self {
            LmConfig::Llama(c) => LmDims {
                vocab_size: c.vocab_size,
                d_model: c.d_model,
                n_layers: c.n_layers,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.d_model / c.n_heads,
                max_seq_len: c.max_seq_len,
            },
            LmConfig::Gpt2(c) => LmDims {
                vocab_size: c.vocab_size,
                d_model: c.d_model,
                n_layers: c.n_layers,
                n_kv_heads: c.n_heads,
                head_dim: c.d_model / c.n_heads,
                max_seq_len: c.max_seq_len,
            },
        }
    }

    /// Reads a config from a JSON file, naming the file in any error.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, LmError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
        let config: LmConfig = serde_json::from_str(&text).map_err(|source| LmError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }
}
