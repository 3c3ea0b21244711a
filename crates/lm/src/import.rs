//! Loading pretrained weights: GGUF files (llama.cpp) and Hugging Face directories
//! (`config.json` + `model.safetensors` or a sharded index), and exporting chorus models back to the
//! Hugging Face layout.
//!
//! Both importers go through [`NamedTensors`]: f32 tensors under Hugging Face names, linear weights
//! as `[out, in]`. One table per family ([`llama_from_hf`], [`gpt2_from_hf`]) maps those names onto
//! chorus's modules, reporting missing, misshapen and unused tensors by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::prelude::*;
use serde_json::{Value, json};

use crate::attention::Attention;
use crate::gguf::GgufFile;
use crate::gpt2::{Gpt2, Gpt2Block, Gpt2Mlp};
use crate::llama::{Llama, LlamaBlock, SwiGlu};
use crate::norm::RmsNorm;
use crate::{Gpt2Config, LlamaConfig, Lm, LmConfig, LmError};

/// f32 tensors by (Hugging Face) name, each with its row-major shape, taken one by one.
#[derive(Debug, Default)]
pub struct NamedTensors {
    source: PathBuf,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl NamedTensors {
    /// An empty set whose errors name `source`.
    pub fn new(source: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Adds a tensor.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) {
        self.tensors.insert(name.into(), (shape, values));
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns `name`, which must have exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LmError> {
        let (found, values) = self
            .tensors
            .remove(name)
            .ok_or_else(|| LmError::MissingTensor {
                path: self.source.clone(),
                tensor: name.to_string(),
            })?;
        if found != shape {
            return Err(LmError::TensorMismatch {
                path: self.source.clone(),
                tensor: name.to_string(),
                reason: format!("shape {found:?} in the file, the config needs {shape:?}"),
            });
        }
        Ok(values)
    }

    /// The same tensors with `prefix` removed from the names that carry it.
    pub fn strip_prefix(self, prefix: &str) -> Self {
        let tensors = self
            .tensors
            .into_iter()
            .map(|(name, t)| {
                (
                    name.strip_prefix(prefix)
                        .map_or(name.clone(), str::to_string),
                    t,
                )
            })
            .collect();
        Self {
            source: self.source,
            tensors,
        }
    }

    /// Drops a tensor that is not a parameter (a buffer), if present.
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Fails on the first tensor nobody took.
    pub fn finish(self) -> Result<(), LmError> {
        match self.tensors.into_keys().next() {
            None => Ok(()),
            Some(tensor) => Err(LmError::UnexpectedTensor {
                path: self.source,
                tensor,
            }),
        }
    }
}

fn tensor<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(values, shape).convert::<B::FloatElem>(),
        device,
    )
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A linear layer from a PyTorch `[out, in]` weight (burn stores `[in, out]`).
pub(crate) fn linear<B: Backend>(
    t: &mut NamedTensors,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, LmError> {
    let weight = transpose(
        &t.take(&format!("{name}.weight"), &[d_out, d_in])?,
        d_out,
        d_in,
    );
    let bias = if bias {
        Some(Param::from_tensor(tensor(
            t.take(&format!("{name}.bias"), &[d_out])?,
            [d_out],
            device,
        )))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(tensor(weight, [d_in, d_out], device)),
        bias,
    })
}

fn embedding<B: Backend>(
    t: &mut NamedTensors,
    name: &str,
    n: usize,
    d: usize,
    device: &B::Device,
) -> Result<Embedding<B>, LmError> {
    let weight = t.take(name, &[n, d])?;
    Ok(Embedding {
        weight: Param::from_tensor(tensor(weight, [n, d], device)),
    })
}

/// Builds a llama model from tensors named as Hugging Face's `LlamaForCausalLM` writes them.
pub fn llama_from_hf<B: Backend>(
    c: &LlamaConfig,
    t: &mut NamedTensors,
    device: &B::Device,
) -> Result<Llama<B>, LmError> {
    LmConfig::Llama(c.clone()).validate()?;
    let head_dim = c.d_model / c.n_heads;
    let kv_dim = c.n_kv_heads * head_dim;
    let norm = |t: &mut NamedTensors, name: &str| -> Result<RmsNorm<B>, LmError> {
        let weight = t.take(name, &[c.d_model])?;
        Ok(RmsNorm {
            weight: Param::from_tensor(tensor(weight, [c.d_model], device)),
            eps: c.norm_eps,
        })
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        layers.push(LlamaBlock {
            input_layernorm: norm(t, &format!("{p}.input_layernorm.weight"))?,
            self_attn: Attention {
                q_proj: linear(
                    t,
                    &format!("{p}.self_attn.q_proj"),
                    c.d_model,
                    c.d_model,
                    false,
                    device,
                )?,
                k_proj: linear(
                    t,
                    &format!("{p}.self_attn.k_proj"),
                    c.d_model,
                    kv_dim,
                    false,
                    device,
                )?,
                v_proj: linear(
                    t,
                    &format!("{p}.self_attn.v_proj"),
                    c.d_model,
                    kv_dim,
                    false,
                    device,
                )?,
                o_proj: linear(
                    t,
                    &format!("{p}.self_attn.o_proj"),
                    c.d_model,
                    c.d_model,
                    false,
                    device,
                )?,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim,
            },
            post_attention_layernorm: norm(t, &format!("{p}.post_attention_layernorm.weight"))?,
            mlp: SwiGlu {
                gate_proj: linear(
                    t,
                    &format!("{p}.mlp.gate_proj"),
                    c.d_model,
                    c.d_ff,
                    false,
                    device,
                )?,
                up_proj: linear(
                    t,
                    &format!("{p}.mlp.up_proj"),
                    c.d_model,
                    c.d_ff,
                    false,
                    device,
                )?,
                down_proj: linear(
                    t,
                    &format!("{p}.mlp.down_proj"),
                    c.d_ff,
                    c.d_model,
                    false,
                    device,
                )?,
            },
        });
    }
    let embed_tokens = embedding(
        t,
        "model.embed_tokens.weight",
        c.vocab_size,
        c.d_model,
        device,
    )?;
    let norm = norm(t, "model.norm.weight")?;
    let lm_head = if c.tie_embeddings {
        None
    } else {
        Some(linear(
            t,
            "lm_head",
            c.d_model,
            c.vocab_size,
            false,
            device,
        )?)
    };
    Ok(Llama {
        embed_tokens,
        layers,
        norm,
        lm_head,
        config: c.clone(),
    })
}

/// Builds a GPT-2 model from tensors named as Hugging Face's `GPT2LMHeadModel` writes them
/// (`transformer.h.N.attn.c_attn` is a Conv1D `[in, 3·out]`, split here into q/k/v).
pub fn gpt2_from_hf<B: Backend>(
    c: &Gpt2Config,
    t: &mut NamedTensors,
    device: &B::Device,
) -> Result<Gpt2<B>, LmError> {
    LmConfig::Gpt2(c.clone()).validate()?;
    let d = c.d_model;
    // Conv1D weights are already [in, out], burn's layout.
    let conv1d = |t: &mut NamedTensors,
                  name: &str,
                  d_in: usize,
                  d_out: usize|
     -> Result<Linear<B>, LmError> {
        let weight = t.take(&format!("{name}.weight"), &[d_in, d_out])?;
        let bias = t.take(&format!("{name}.bias"), &[d_out])?;
        Ok(Linear {
            weight: Param::from_tensor(tensor(weight, [d_in, d_out], device)),
            bias: Some(Param::from_tensor(tensor(bias, [d_out], device))),
        })
    };
    let layer_norm = |t: &mut NamedTensors, name: &str| -> Result<LayerNorm<B>, LmError> {
        let mut norm = burn::nn::LayerNormConfig::new(d)
            .with_epsilon(c.norm_eps)
            .init(device);
        norm.gamma = Param::from_tensor(tensor(
            t.take(&format!("{name}.weight"), &[d])?,
            [d],
            device,
        ));
        norm.beta = Some(Param::from_tensor(tensor(
            t.take(&format!("{name}.bias"), &[d])?,
            [d],
            device,
        )));
        Ok(norm)
    };
    let mut h = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("transformer.h.{i}");
        let fused = conv1d(t, &format!("{p}.attn.c_attn"), d, 3 * d)?;
        let split = |k: usize| -> Linear<B> {
            Linear {
                weight: Param::from_tensor(fused.weight.val().narrow(1, k * d, d)),
                bias: fused
                    .bias
                    .as_ref()
                    .map(|b| Param::from_tensor(b.val().narrow(0, k * d, d))),
            }
        };
        h.push(Gpt2Block {
            ln_1: layer_norm(t, &format!("{p}.ln_1"))?,
            attn: Attention {
                q_proj: split(0),
                k_proj: split(1),
                v_proj: split(2),
                o_proj: conv1d(t, &format!("{p}.attn.c_proj"), d, d)?,
                n_heads: c.n_heads,
                n_kv_heads: c.n_heads,
                head_dim: d / c.n_heads,
            },
            ln_2: layer_norm(t, &format!("{p}.ln_2"))?,
            mlp: Gpt2Mlp {
                c_fc: conv1d(t, &format!("{p}.mlp.c_fc"), d, c.d_ff)?,
                c_proj: conv1d(t, &format!("{p}.mlp.c_proj"), c.d_ff, d)?,
            },
        });
    }
    let wte = embedding(t, "transformer.wte.weight", c.vocab_size, d, device)?;
    let wpe = embedding(t, "transformer.wpe.weight", c.max_seq_len, d, device)?;
    let ln_f = layer_norm(t, "transformer.ln_f")?;
    // Tied checkpoints often still carry lm_head.weight (a copy of wte): accept and drop it.
    let lm_head = if c.tie_embeddings {
        if t.contains("lm_head.weight") {
            t.take("lm_head.weight", &[c.vocab_size, d])?;
        }
        None
    } else {
        Some(linear(t, "lm_head", d, c.vocab_size, false, device)?)
    };
    Ok(Gpt2 {
        wte,
        wpe,
        h,
        ln_f,
        lm_head,
        config: c.clone(),
    })
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32")
}

/// The model's tensors under Hugging Face names and layouts (the inverse of the importers).
pub fn to_hf_tensors<B: Backend>(model: &Lm<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let push_linear_t =
        |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: String, l: &Linear<B>| {
            let [d_in, d_out] = l.weight.dims();
            out.push((
                format!("{name}.weight"),
                vec![d_out, d_in],
                transpose(&values(l.weight.val()), d_in, d_out),
            ));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), vec![d_out], values(b.val())));
            }
        };
    match model {
        Lm::Llama(m) => {
            let c = &m.config;
            out.push((
                "model.embed_tokens.weight".into(),
                vec![c.vocab_size, c.d_model],
                values(m.embed_tokens.weight.val()),
            ));
            for (i, l) in m.layers.iter().enumerate() {
                let p = format!("model.layers.{i}");
                out.push((
                    format!("{p}.input_layernorm.weight"),
                    vec![c.d_model],
                    values(l.input_layernorm.weight.val()),
                ));
                out.push((
                    format!("{p}.post_attention_layernorm.weight"),
                    vec![c.d_model],
                    values(l.post_attention_layernorm.weight.val()),
                ));
                push_linear_t(
                    &mut out,
                    format!("{p}.self_attn.q_proj"),
                    &l.self_attn.q_proj,
                );
                push_linear_t(
                    &mut out,
                    format!("{p}.self_attn.k_proj"),
                    &l.self_attn.k_proj,
                );
                push_linear_t(
                    &mut out,
                    format!("{p}.self_attn.v_proj"),
                    &l.self_attn.v_proj,
                );
                push_linear_t(
                    &mut out,
                    format!("{p}.self_attn.o_proj"),
                    &l.self_attn.o_proj,
                );
                push_linear_t(&mut out, format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj);
                push_linear_t(&mut out, format!("{p}.mlp.up_proj"), &l.mlp.up_proj);
                push_linear_t(&mut out, format!("{p}.mlp.down_proj"), &l.mlp.down_proj);
            }
            out.push((
                "model.norm.weight".into(),
                vec![c.d_model],
                values(m.norm.weight.val()),
            ));
            if let Some(head) = &m.lm_head {
                push_linear_t(&mut out, "lm_head".into(), head);
            }
        }
        Lm::Gpt2(m) => {
            let c = &m.config;
            let d = c.d_model;
            let conv1d =
                |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: String, l: &Linear<B>| {
                    let [d_in, d_out] = l.weight.dims();
                    out.push((
                        format!("{name}.weight"),
                        vec![d_in, d_out],
                        values(l.weight.val()),
                    ));
                    let bias = l.bias.as_ref().expect("gpt2 linears have biases");
                    out.push((format!("{name}.bias"), vec![d_out], values(bias.val())));
                };
            let layer_norm =
                |out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: String, n: &LayerNorm<B>| {
                    out.push((format!("{name}.weight"), vec![d], values(n.gamma.val())));
                    let beta = n.beta.as_ref().expect("gpt2 norms have biases");
                    out.push((format!("{name}.bias"), vec![d], values(beta.val())));
                };
            out.push((
                "transformer.wte.weight".into(),
                vec![c.vocab_size, d],
                values(m.wte.weight.val()),
            ));
            out.push((
                "transformer.wpe.weight".into(),
                vec![c.max_seq_len, d],
                values(m.wpe.weight.val()),
            ));
            for (i, b) in m.h.iter().enumerate() {
                let p = format!("transformer.h.{i}");
                layer_norm(&mut out, format!("{p}.ln_1"), &b.ln_1);
                layer_norm(&mut out, format!("{p}.ln_2"), &b.ln_2);
                let a = &b.attn;
                let fused = Linear {
                    weight: Param::from_tensor(Tensor::cat(
                        vec![
                            a.q_proj.weight.val(),
                            a.k_proj.weight.val(),
                            a.v_proj.weight.val(),
                        ],
                        1,
                    )),
                    bias: Some(Param::from_tensor(Tensor::cat(
                        [&a.q_proj, &a.k_proj, &a.v_proj]
                            .iter()
                            .map(|l| l.bias.as_ref().expect("gpt2 linears have biases").val())
                            .collect(),
                        0,
                    ))),
                };
                conv1d(&mut out, format!("{p}.attn.c_attn"), &fused);
                conv1d(&mut out, format!("{p}.attn.c_proj"), &a.o_proj);
                conv1d(&mut out, format!("{p}.mlp.c_fc"), &b.mlp.c_fc);
                conv1d(&mut out, format!("{p}.mlp.c_proj"), &b.mlp.c_proj);
            }
            layer_norm(&mut out, "transformer.ln_f".into(), &m.ln_f);
            if let Some(head) = &m.lm_head {
                push_linear_t(&mut out, "lm_head".into(), head);
            }
        }
    }
    out
}

/// Hugging Face `config.json` for a chorus config.
pub fn hf_config(config: &LmConfig) -> Value {
    match config {
        LmConfig::Llama(c) => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "intermediate_size": c.d_ff,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }),
        LmConfig::Gpt2(c) => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.d_model,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_inner": c.d_ff,
            "n_positions": c.max_seq_len,
            "layer_norm_epsilon": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings,
            "activation_function": "gelu_new",
            "torch_dtype": "float32",
        }),
    }
}

/// Reads a Hugging Face `config.json` into a chorus config.
pub fn config_from_hf(path: &Path) -> Result<LmConfig, LmError> {
    let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| LmError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| LmError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let usize_of = |key: &str| -> Result<usize, LmError> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("missing or non-integer `{key}`")))
    };
    let f64_or = |key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
    let bool_or = |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
    let config = match v.get("model_type").and_then(Value::as_str) {
        Some("llama") => {
            let n_heads = usize_of("num_attention_heads")?;
            LmConfig::Llama(LlamaConfig {
                vocab_size: usize_of("vocab_size")?,
                d_model: usize_of("hidden_size")?,
                n_layers: usize_of("num_hidden_layers")?,
                n_heads,
                n_kv_heads: v
                    .get("num_key_value_heads")
                    .and_then(Value::as_u64)
                    .map_or(n_heads, |x| x as usize),
                d_ff: usize_of("intermediate_size")?,
                rope_theta: f64_or("rope_theta", 10_000.0),
                norm_eps: f64_or("rms_norm_eps", 1e-6),
                tie_embeddings: bool_or("tie_word_embeddings", false),
                max_seq_len: usize_of("max_position_embeddings")?,
            })
        }
        Some("gpt2") => {
            let d_model = usize_of("n_embd")?;
            LmConfig::Gpt2(Gpt2Config {
                vocab_size: usize_of("vocab_size")?,
                d_model,
                n_layers: usize_of("n_layer")?,
                n_heads: usize_of("n_head")?,
                d_ff: v
                    .get("n_inner")
                    .and_then(Value::as_u64)
                    .map_or(4 * d_model, |x| x as usize),
                max_seq_len: usize_of("n_positions")?,
                norm_eps: f64_or("layer_norm_epsilon", 1e-5),
                tie_embeddings: bool_or("tie_word_embeddings", true),
            })
        }
        other => {
            return Err(bad(format!(
                "model_type {other:?} is not supported (llama, gpt2 are)"
            )));
        }
    };
    config.validate()?;
    Ok(config)
}

/// Reads every float tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted; integer
/// and boolean tensors are buffers such as BERT's `position_ids`, never parameters, and are skipped).
pub(crate) fn read_safetensors(path: &Path, into: &mut NamedTensors) -> Result<(), LmError> {
    let bytes = std::fs::read(path).map_err(|e| LmError::io(path, e))?;
    let bad = |reason: String| LmError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BOOL
            | safetensors::Dtype::U8
            | safetensors::Dtype::I8
            | safetensors::Dtype::I16
            | safetensors::Dtype::U16
            | safetensors::Dtype::I32
            | safetensors::Dtype::U32
            | safetensors::Dtype::I64
            | safetensors::Dtype::U64 => continue,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?} (F32, F16, BF16 are supported)"
                )));
            }
        };
        into.insert(name, view.shape().to_vec(), values);
    }
    Ok(())
}

impl<B: Backend> Lm<B> {
    /// Loads a Hugging Face directory: `config.json` and `model.safetensors` or
    /// `model.safetensors.index.json` with its shards.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, LmError> {
        let dir = dir.as_ref();
        let config = config_from_hf(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut tensors = NamedTensors::new(if single.is_file() {
            single.clone()
        } else {
            index.clone()
        });
        if single.is_file() {
            read_safetensors(&single, &mut tensors)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| LmError::io(&index, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|source| LmError::Json {
                path: index.clone(),
                source,
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| LmError::Weights {
                    path: index.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                read_safetensors(&dir.join(shard), &mut tensors)?;
            }
        } else {
            return Err(LmError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json",
                ),
            ));
        }
        let model = match &config {
            LmConfig::Llama(c) => Lm::Llama(llama_from_hf(c, &mut tensors, device)?),
            LmConfig::Gpt2(c) => Lm::Gpt2(gpt2_from_hf(c, &mut tensors, device)?),
        };
        tensors.finish()?;
        Ok(model)
    }

    /// Writes a Hugging Face directory (`config.json`, `model.safetensors` in F32) that
    /// `transformers` and [`Lm::from_hf_dir`] load.
    pub fn save_hf_dir(&self, dir: impl AsRef<Path>) -> Result<(), LmError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LmError::io(dir, e))?;
        let config = serde_json::to_string_pretty(&hf_config(&self.config())).expect("json");
        crate::checkpoint::write_atomic(&dir.join("config.json"), |tmp| {
            std::fs::write(tmp, &config).map_err(|e| LmError::io(tmp, e))
        })?;
        let tensors = to_hf_tensors(self);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(name, shape, values)| {
                (
                    name,
                    shape,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LmError::Weights {
                path: dir.join("model.safetensors"),
                reason: e.to_string(),
            })?;
        crate::checkpoint::write_atomic(&dir.join("model.safetensors"), |tmp| {
            safetensors::serialize_to_file(views, None, tmp).map_err(|e| LmError::Weights {
                path: tmp.to_path_buf(),
                reason: e.to_string(),
            })
        })
    }

    /// Loads a llama-architecture GGUF file (dequantised to f32), undoing llama.cpp's Q/K row
    /// permutation so the weights match chorus's rotate-half RoPE.
    pub fn from_gguf(gguf: &GgufFile, device: &B::Device) -> Result<Self, LmError> {
        let config = llama_config_from_gguf(gguf)?;
        let mut tensors = gguf_to_hf(gguf, &config)?;
        let model = llama_from_hf(&config, &mut tensors, device)?;
        tensors.finish()?;
        Ok(Lm::Llama(model))
    }
}

/// The llama config a GGUF file describes.
pub fn llama_config_from_gguf(g: &GgufFile) -> Result<LlamaConfig, LmError> {
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(g.error(format!("architecture `{arch}` is not supported (llama is)")));
    }
    let n_heads = g.get_uint("llama.attention.head_count")? as usize;
    let vocab_size = match g.get_uint("llama.vocab_size") {
        Ok(v) => v as usize,
        Err(_) => g.get_strings("tokenizer.ggml.tokens")?.len(),
    };
    let config = LlamaConfig {
        vocab_size,
        d_model: g.get_uint("llama.embedding_length")? as usize,
        n_layers: g.get_uint("llama.block_count")? as usize,
        n_heads,
        n_kv_heads: g
            .get_uint("llama.attention.head_count_kv")
            .map_or(n_heads, |v| v as usize),
        d_ff: g.get_uint("llama.feed_forward_length")? as usize,
        rope_theta: g.get_float("llama.rope.freq_base").unwrap_or(10_000.0),
        norm_eps: g.get_float("llama.attention.layer_norm_rms_epsilon")?,
        tie_embeddings: g.tensor_info("output.weight").is_none(),
        max_seq_len: g.get_uint("llama.context_length")? as usize,
    };
    LmConfig::Llama(config.clone())
        .validate()
        .map_err(|e| g.error(e.to_string()))?;
    Ok(config)
}

/// llama.cpp stores each head's Q/K rows interleaved (pairs (i, i + head_dim/2) adjacent); Hugging
/// Face keeps the two halves apart. Row `h·hd + 2i + half` of the GGUF tensor is row
/// `h·hd + half·hd/2 + i` in Hugging Face's.
fn unpermute_rows(values: &[f32], n_heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for part in 0..2 {
                let src = h * head_dim + 2 * i + part;
                let dst = h * head_dim + part * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Dequantises every tensor of a llama GGUF under its Hugging Face name and layout.
fn gguf_to_hf(g: &GgufFile, c: &LlamaConfig) -> Result<NamedTensors, LmError> {
    let mut out = NamedTensors::new(g.path());
    for info in &g.tensors {
        let hf_name = hf_name_of_gguf(&info.name)
            .ok_or_else(|| g.error(format!("tensor `{}` has no llama counterpart", info.name)))?;
        let (shape, mut values) = g.tensor_f32(info)?;
        if shape.len() == 2
            && (info.name.ends_with("attn_q.weight") || info.name.ends_with("attn_k.weight"))
        {
            let heads = if info.name.ends_with("attn_q.weight") {
                c.n_heads
            } else {
                c.n_kv_heads
            };
            if shape[0] % (2 * heads) != 0 {
                return Err(g.error(format!(
                    "tensor `{}`: {} rows do not split into {heads} heads",
                    info.name, shape[0]
                )));
            }
            values = unpermute_rows(&values, heads, shape[0], shape[1]);
        }
        out.insert(hf_name, shape, values);
    }
    Ok(out)
}

/// `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, and so on.
fn hf_name_of_gguf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tensor {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}
