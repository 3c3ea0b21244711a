//! Loading pretrained weights: GGUF files (llama.cpp) and Hugging Face directories
//! (`config.json` + `model.safetensors` or a sharded index), and exporting chorus models back to the
//! Hugging Face layout.
//!
//! Both importers go through [`NamedTensors`]: f32 tensors under Hugging Face names, linear weights
//! as `[out, in]`. One declarative table per family (`LLAMA_NAMES` in llama.rs, `GPT2_NAMES` in
//! gpt2.rs, read through `names.rs`) maps those names onto chorus's modules for import, export and
//! GGUF loading, reporting missing, misshapen and unused tensors by name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use serde_json::{Value, json};

use crate::gguf::GgufFile;
use crate::gpt2::{GPT2_NAMES, Gpt2};
use crate::llama::{LLAMA_NAMES, Llama};
use crate::names::{Heads, NamedTensor, export_hf, hf_name_of_gguf, import_hf, transpose};
use crate::quantised::{block_matrix_names, llama_blocks};
use crate::{Gpt2Config, LlamaConfig, Lm, LmConfig, LmError};

/// f32 tensors by (Hugging Face) name, each with its row-major shape, taken one by one.
#[derive(Debug, Default)]
pub struct NamedTensors {
    source: PathBuf,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Names read with [`NamedTensors::get`] (a fused tensor is read once per part).
    used: BTreeSet<String>,
    /// Names whose values the caller supplies after the import ([`NamedTensors::defer`]).
    deferred: BTreeSet<String>,
}

impl NamedTensors {
    /// An empty set whose errors name `source`.
    pub fn new(source: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            tensors: BTreeMap::new(),
            used: BTreeSet::new(),
            deferred: BTreeSet::new(),
        }
    }

    /// Adds a tensor.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) {
        self.tensors.insert(name.into(), (shape, values));
    }

    /// Marks `name` as a tensor whose values the caller puts in place after the import: the
    /// importer leaves its parameter as it is, uninitialised (a decoding model's weights made
    /// from the file's blocks on first use, [`Lm::from_gguf_for_decoding`]).
    pub(crate) fn defer(&mut self, name: impl Into<String>) {
        self.deferred.insert(name.into());
    }

    /// Whether `name` was deferred ([`NamedTensors::defer`]).
    pub(crate) fn is_deferred(&self, name: &str) -> bool {
        self.deferred.contains(name)
    }

    /// Removes and returns `name`, which must have exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LmError> {
        self.get(name, shape)?;
        self.used.remove(name);
        Ok(self.tensors.remove(name).expect("just found").1)
    }

    /// Reads `name`, which must have exactly `shape`, and marks it used.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<&[f32], LmError> {
        let (found, values) = self
            .tensors
            .get(name)
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
        self.used.insert(name.to_string());
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
            used: self.used,
            deferred: self.deferred,
        }
    }

    /// Drops a tensor that is not a parameter (a buffer), if present.
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Fails on the first tensor nobody took or read.
    pub fn finish(self) -> Result<(), LmError> {
        let used = self.used;
        match self.tensors.into_keys().find(|name| !used.contains(name)) {
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

/// Writes f32 tensors to a safetensors file at `path`, without `__metadata__`.
pub(crate) fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<(), LmError> {
    let error = |e: safetensors::SafeTensorError| LmError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    safetensors::serialize_to_file(views, None, path).map_err(error)
}

/// Builds a llama model from tensors named as Hugging Face's `LlamaForCausalLM` writes them
/// ([`LLAMA_NAMES`](crate::llama::LLAMA_NAMES)); every tensor must be used.
pub fn llama_from_hf<B: Backend>(
    c: &LlamaConfig,
    t: &mut NamedTensors,
    device: &B::Device,
) -> Result<Llama<B>, LmError> {
    LmConfig::Llama(c.clone()).validate()?;
    import_hf(Llama::new(c, device), LLAMA_NAMES, &[], t)
}

/// Builds a GPT-2 model from tensors named as Hugging Face's `GPT2LMHeadModel` writes them
/// ([`GPT2_NAMES`](crate::gpt2::GPT2_NAMES): `c_attn`, a Conv1D `[in, 3·out]`, is split into q/k/v).
/// A tied model accepts and drops the copy of `wte` that checkpoints often carry as `lm_head`.
pub fn gpt2_from_hf<B: Backend>(
    c: &Gpt2Config,
    t: &mut NamedTensors,
    device: &B::Device,
) -> Result<Gpt2<B>, LmError> {
    LmConfig::Gpt2(c.clone()).validate()?;
    let droppable: &[&str] = if c.tie_embeddings {
        &["lm_head.weight"]
    } else {
        &[]
    };
    import_hf(Gpt2::new(c, device), GPT2_NAMES, droppable, t)
}

/// The model's tensors under Hugging Face names and layouts (the inverse of the importers).
pub fn to_hf_tensors<B: Backend>(model: &Lm<B>) -> Result<Vec<NamedTensor>, LmError> {
    match model {
        Lm::Llama(m) => export_hf(m, LLAMA_NAMES),
        Lm::Gpt2(m) => export_hf(m, GPT2_NAMES),
    }
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
    let bad = |reason: String| LmError::HfConfig {
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
        Some(other) => {
            return Err(bad(format!(
                "model_type \"{other}\" is not supported (llama, gpt2 are)"
            )));
        }
        None => return Err(bad("no `model_type` (llama or gpt2)".into())),
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
        let tensors = to_hf_tensors(self)?;
        crate::checkpoint::write_atomic(&dir.join("model.safetensors"), |tmp| {
            write_safetensors(tmp, &tensors)
        })
    }

    /// Loads a llama-architecture GGUF file (dequantised to f32), undoing llama.cpp's Q/K row
    /// permutation so the weights match chorus's rotate-half RoPE.
    pub fn from_gguf(gguf: &GgufFile, device: &B::Device) -> Result<Self, LmError> {
        let config = llama_config_from_gguf(gguf)?;
        let mut tensors = gguf_to_hf(gguf, &config, &BTreeSet::new())?;
        let model = llama_from_hf(&config, &mut tensors, device)?;
        tensors.finish()?;
        Ok(Lm::Llama(model))
    }

    /// [`Lm::from_gguf`], keeping every block-quantised matrix (Q8_0, Q4_0, Q4_1) as its blocks:
    /// products of at most [`MAX_BLOCK_ROWS`](crate::MAX_BLOCK_ROWS) rows that need no gradient
    /// (decoding) read the blocks — ≈ 4.5–8.5 bits per weight instead of 32 —, and a tied
    /// embedding's lookup reads them too. On a backend without autodiff the f32 weights of those
    /// matrices are made from the blocks (the values [`Lm::from_gguf`] loads) only when something
    /// needs them — a product of more rows, a padded batch —, so a model that only decodes holds
    /// its matrices once, as blocks; on one with autodiff they are loaded beside the blocks. For
    /// inference on the CPU: the blocks are not updated by training, so a model that trains must
    /// come from [`Lm::from_gguf`] (a weight that requires a gradient never uses them), and on a
    /// GPU each product would cross to the host.
    pub fn from_gguf_for_decoding(gguf: &GgufFile, device: &B::Device) -> Result<Self, LmError> {
        if B::ad_enabled(device) {
            let mut model = Self::from_gguf(gguf, device)?;
            if let Lm::Llama(llama) = &mut model {
                llama.attach_gguf_blocks(gguf)?;
            }
            return Ok(model);
        }
        let config = llama_config_from_gguf(gguf)?;
        let (layers, output) = llama_blocks(gguf, &config)?;
        let deferred = block_matrix_names(&layers, output.as_deref(), &config);
        let mut tensors = gguf_to_hf(gguf, &config, &deferred)?;
        let mut model = llama_from_hf(&config, &mut tensors, device)?;
        tensors.finish()?;
        model.attach_blocks_as_weights(gguf, layers, output)?;
        Ok(Lm::Llama(model))
    }

    /// Attaches the quantised blocks of the GGUF file at `path` to a model whose weights are that
    /// file's, read by another road (a joint checkpoint saves a frozen GGUF assistant in f32), so
    /// that it decodes from the blocks as [`Lm::from_gguf_for_decoding`]'s model does. Every
    /// matrix is compared with its blocks first: when one differs (or the file does not describe
    /// this model) the error names the file and the matrix, and the model is left as it was.
    pub fn attach_gguf_blocks(&mut self, path: &Path) -> Result<(), LmError> {
        let gguf = GgufFile::open(path)?;
        match self {
            Lm::Llama(llama) => llama.attach_gguf_blocks_if_equal(&gguf),
            Lm::Gpt2(_) => Err(gguf.error("blocks attach to llama models; this one is a GPT-2")),
        }
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

/// Dequantises every tensor of a llama GGUF under its Hugging Face name and layout
/// ([`LLAMA_NAMES`](crate::llama::LLAMA_NAMES)), except those named in `deferred`, which are
/// marked deferred ([`NamedTensors::defer`]).
fn gguf_to_hf(
    g: &GgufFile,
    c: &LlamaConfig,
    deferred: &BTreeSet<String>,
) -> Result<NamedTensors, LmError> {
    let heads = Heads {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
    };
    let mut out = NamedTensors::new(g.path());
    for info in &g.tensors {
        let (hf_name, layout) = hf_name_of_gguf(LLAMA_NAMES, &info.name)
            .ok_or_else(|| g.error(format!("tensor `{}` has no llama counterpart", info.name)))?;
        if deferred.contains(&info.name) {
            out.defer(hf_name);
            continue;
        }
        let (shape, values) = g.tensor_f32(info)?;
        let values = layout
            .hf_values_from_gguf(values, &shape, heads)
            .map_err(|reason| g.error(format!("tensor `{}`: {reason}", info.name)))?;
        out.insert(hf_name, shape, values);
    }
    Ok(out)
}
