use std::path::PathBuf;

/// Everything that can go wrong in `chorus-lm`: each variant names the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid model config: {field} {reason}")]
    InvalidConfig {
        /// The offending field, e.g. `n_kv_heads`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An input that does not fit the model (sequence too long, wrong batch size, ...).
    #[error("invalid model input: {input}: {reason}")]
    InvalidInput {
        /// The input, e.g. `tokens` or `padding`.
        input: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config, tokenizer) could not be parsed.
    #[error("{path}: cannot parse JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A Hugging Face `config.json` lacks a key chorus needs or names another architecture.
    #[error("{path}: not a Hugging Face config chorus can load: {reason}")]
    HfConfig {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A weights file is not a readable safetensors file (truncated, corrupt header, ...).
    #[error("{path}: not a readable safetensors file: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        reason: String,
    },
    /// A tensor the model needs is not in the weights file.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor in the weights file is not used by the model (wrong architecture or config).
    #[error("{path}: unexpected tensor `{tensor}` (the config does not describe this checkpoint)")]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor has a different shape or dtype than the config implies.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    TensorMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Expected vs found.
        reason: String,
    },
    /// A GGUF file is malformed or describes something chorus cannot load.
    #[error("{path}: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two models that must share a tokenizer do not.
    #[error("tokenizers differ: {first} and {second}: {reason}")]
    TokenizerMismatch {
        /// The first model's tokenizer source.
        first: String,
        /// The second model's tokenizer source.
        second: String,
        /// The first difference found.
        reason: String,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The file(s) it was built from.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

impl LmError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
