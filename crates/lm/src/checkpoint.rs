//! chorus's own checkpoint layout: a directory holding `config.json` ([`LmConfig`]) and
//! `model.safetensors` (tensors named by module path, e.g. `layers.0.self_attn.q_proj.weight`).
//!
//! Files are written to a temporary name and renamed into place, so an interrupted save never
//! replaces a good checkpoint with a partial one.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn_store::{ApplyError, ModuleSnapshot, SafetensorsStore};

use crate::{Lm, LmConfig, LmError};

/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

impl<B: Backend> Lm<B> {
    /// The config this model was built from.
    pub fn config(&self) -> LmConfig {
        match self {
            Lm::Llama(m) => LmConfig::Llama(m.config.clone()),
            Lm::Gpt2(m) => LmConfig::Gpt2(m.config.clone()),
        }
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` atomically (temp file + rename),
    /// creating `dir` if needed. Equal weights write equal bytes: the safetensors header holds
    /// no `__metadata__` (burn-store's default, three entries from a hash map, came out in
    /// another order from one save to the next; nothing reads them).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), LmError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LmError::io(dir, e))?;
        let config = serde_json::to_string_pretty(&self.config()).expect("configs serialize");
        write_atomic(&dir.join(CONFIG_FILE), |tmp| {
            std::fs::write(tmp, &config).map_err(|e| LmError::io(tmp, e))
        })?;
        write_atomic(&dir.join(WEIGHTS_FILE), |tmp| {
            let mut store = SafetensorsStore::from_file(tmp)
                .skip_enum_variants(true)
                .clear_metadata();
            self.save_into(&mut store).map_err(|e| LmError::Weights {
                path: tmp.to_path_buf(),
                reason: e.to_string(),
            })
        })
    }

    /// Reads a checkpoint written by [`Lm::save`].
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, LmError> {
        let dir = dir.as_ref();
        let config = LmConfig::load(dir.join(CONFIG_FILE))?;
        // Before allocating: the config must not describe far more f32 weights than the file
        // holds (a corrupt config would otherwise allocate without bound; a near miss is left to
        // the exact per-tensor checks, which name the tensor).
        let weights = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::metadata(&weights)
            .map_err(|e| LmError::io(&weights, e))?
            .len();
        let described = config.min_parameters();
        if described.is_none_or(|n| n.saturating_mul(4) > bytes.saturating_mul(2) + (1 << 20)) {
            return Err(LmError::Weights {
                path: weights,
                reason: format!(
                    "{CONFIG_FILE} describes at least {} parameters, far more than its {bytes} bytes hold",
                    described.map_or("2^64".into(), |n| n.to_string())
                ),
            });
        }
        let mut model = config.init::<B>(device)?;
        model.load_weights(weights)?;
        Ok(model)
    }

    /// Opens a model from any format chorus reads: a `.gguf` file, a chorus checkpoint directory
    /// (`config.json` with a `family` field) or a Hugging Face directory.
    pub fn open(path: impl AsRef<Path>, device: &B::Device) -> Result<Self, LmError> {
        let path = path.as_ref();
        if is_gguf_file(path) {
            return Self::from_gguf(&crate::GgufFile::open(path)?, device);
        }
        let config = path.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config).map_err(|e| LmError::io(&config, e))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LmError::Json {
                path: config.clone(),
                source,
            })?;
        if raw.get("family").is_some() {
            Self::load(path, device)
        } else {
            Self::from_hf_dir(path, device)
        }
    }

    /// [`Lm::open`], with a GGUF file loaded by [`Lm::from_gguf_for_decoding`] (its quantised
    /// blocks kept for few-row products on the CPU).
    pub fn open_for_decoding(path: impl AsRef<Path>, device: &B::Device) -> Result<Self, LmError> {
        let path = path.as_ref();
        if is_gguf_file(path) {
            return Self::from_gguf_for_decoding(&crate::GgufFile::open(path)?, device);
        }
        Self::open(path, device)
    }

    /// Replaces every parameter with the tensor of the same name in a safetensors file. Every
    /// parameter must be present with its exact shape, and every tensor in the file must be used.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<(), LmError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(LmError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let mut store = SafetensorsStore::from_file(path)
            .skip_enum_variants(true)
            .validate(false)
            .allow_partial(true);
        let result = self.load_from(&mut store).map_err(|e| LmError::Weights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if let Some(error) = result.errors.first() {
            let (tensor, reason) = match error {
                ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } => (
                    path.clone(),
                    format!("shape {found:?} in the file, the config needs {expected:?}"),
                ),
                ApplyError::DTypeMismatch {
                    path,
                    expected,
                    found,
                } => (
                    path.clone(),
                    format!("dtype {found:?}, expected {expected:?}"),
                ),
                ApplyError::AdapterError { path, message }
                | ApplyError::LoadError { path, message } => (path.clone(), message.clone()),
            };
            return Err(LmError::TensorMismatch {
                path: path.to_path_buf(),
                tensor,
                reason,
            });
        }
        if let Some((tensor, _)) = result.missing.first() {
            return Err(LmError::MissingTensor {
                path: path.to_path_buf(),
                tensor: tensor.clone(),
            });
        }
        if let Some(tensor) = result.unused.first() {
            return Err(LmError::UnexpectedTensor {
                path: path.to_path_buf(),
                tensor: tensor.clone(),
            });
        }
        Ok(())
    }
}

/// Writes `path` through `write(tmp)` to a sibling temporary file, then renames it into place.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), LmError>,
) -> Result<(), LmError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| LmError::io(&tmp, e))?;
    }
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| LmError::io(path, e))
}

/// A `.gguf` file (what [`Lm::open`] reads as llama.cpp's format).
fn is_gguf_file(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "gguf")
}
