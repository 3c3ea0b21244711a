//! Experiment configs: TOML files with `--set key.path=value` overrides, validated before any work.

use std::path::{Path, PathBuf};

use chorus_data::Task;
use chorus_elbo::KlSchedule;
use chorus_lm::LmConfig;
use chorus_model::ChorusConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Which examples to use and how to batch them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Tasks to train and validate on. Default: all three.
    #[serde(default = "all_tasks")]
    pub tasks: Vec<Task>,
    /// Longest input row in tokens (context is cut from the left, then the target from the right).
    /// Default 128.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Rows per micro-batch. Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// At most this many training examples per task, drawn deterministically (0 = all). Default 0.
    #[serde(default)]
    pub max_train_examples: usize,
    /// Validation examples per task (a fixed subset, the same at every evaluation). Default 64.
    #[serde(default = "default_valid_examples")]
    pub valid_examples: usize,
    /// The token that starts and ends every row. Default `<|endoftext|>`.
    #[serde(default = "default_eos")]
    pub eos_token: String,
    /// Corpus cache (default `$CHORUS_CACHE` or `~/.cache/chorus`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

/// The optimiser, the schedules and the loop's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Optimiser steps (each of `accumulation` micro-batches). Default 1000.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Peak learning rate. Default 1e-3.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`. Default 100.
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// The cosine decays from `lr` to `min_lr_ratio · lr` at the last step. Default 0.1.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// AdamW's decoupled weight decay. Default 0.01.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW β₁. Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW β₂. Default 0.99.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW ε (added to the root of the second moment). Default 1e-8.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Clip the global gradient norm to this (0 disables). Default 1.0.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Micro-batches per optimiser step. Default 1.
    #[serde(default = "default_accumulation")]
    pub accumulation: usize,
    /// Seeds data order and every random draw (z noise, initialisation). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Log a line every this many steps. Default 10.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Validate every this many steps (0: only at the end). Default 200.
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// z samples for the validation IW-NLL. Default 8.
    #[serde(default = "default_iw_samples")]
    pub iw_samples: usize,
    /// Write a checkpoint every this many steps (0: only at the end). Default 200.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints (plus `best`). Default 2.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Co-LLM's first phase: fit the selector on pseudo-labels for this many steps before the
    /// ELBO (0 skips it). Default 0.
    #[serde(default)]
    pub selector_init_steps: u64,
    /// The selector's learning rate is `lr` times this: a fresh head of K outputs (a static
    /// mixture's K biases) moves its logits by about `lr` per AdamW step, so at `lr = 1e-3` a
    /// hundred steps barely leave π(base) = 0.9. Default 1.
    #[serde(default = "default_one")]
    pub selector_lr_scale: f64,
    /// The KL weight β by global step (annealing). Schedules with `total_steps` must span the
    /// run: `total_steps = steps`. Default constant 1.
    #[serde(default = "default_kl_schedule")]
    pub kl_schedule: KlSchedule,
}

/// `chorus pretrain`: one LM from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// The tokenizer (`tokenizer.json`, a `.gguf`, or a model directory).
    pub tokenizer: PathBuf,
    /// The architecture; `vocab_size` must equal the tokenizer's.
    pub model: LmConfig,
    /// Start from this LM's weights instead of a random initialisation (continued pre-training,
    /// e.g. a domain expert from the base): a chorus LM directory, Hugging Face directory or
    /// `.gguf` whose config equals `model`. Default: none (from scratch).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// The data.
    #[serde(default)]
    pub data: DataConfig,
    /// The optimiser.
    #[serde(default)]
    pub train: OptimConfig,
}

/// `chorus train`: the joint model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The tokenizer every model shares.
    pub tokenizer: PathBuf,
    /// The base model (chorus checkpoint, Hugging Face directory or `.gguf`).
    pub base: PathBuf,
    /// The assistants (same formats), or OpenAI-compatible servers (`http://…`) after the local
    /// ones: a server's assistant trains from its cached log-probs (`scores`, written by `chorus
    /// score`) and must be up to check them. Empty: K = 1.
    #[serde(default)]
    pub assistants: Vec<PathBuf>,
    /// Assistant log-probs written by `chorus score` (only with `chorus.assistant_adapters = false`).
    #[serde(default)]
    pub scores: Option<PathBuf>,
    /// The joint model's switches.
    #[serde(default)]
    pub chorus: ChorusConfig,
    /// The data.
    #[serde(default)]
    pub data: DataConfig,
    /// The optimiser.
    #[serde(default)]
    pub train: OptimConfig,
}

fn all_tasks() -> Vec<Task> {
    Task::ALL.to_vec()
}
fn default_max_seq_len() -> usize {
    128
}
fn default_batch_size() -> usize {
    8
}
fn default_valid_examples() -> usize {
    64
}
fn default_eos() -> String {
    "<|endoftext|>".into()
}
fn default_one() -> f64 {
    1.0
}
fn default_steps() -> u64 {
    1000
}
fn default_lr() -> f64 {
    1e-3
}
fn default_warmup() -> u64 {
    100
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_epsilon() -> f64 {
    1e-8
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_accumulation() -> usize {
    1
}
fn default_log_every() -> u64 {
    10
}
fn default_eval_every() -> u64 {
    200
}
fn default_iw_samples() -> usize {
    8
}
fn default_checkpoint_every() -> u64 {
    200
}
fn default_keep_last() -> usize {
    2
}
fn default_kl_schedule() -> KlSchedule {
    KlSchedule::Constant { beta: 1.0 }
}

impl Default for DataConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// Why a config is refused: the key, its value and what it must be (or what it contradicts).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One value outside its range.
    #[error("{key} = {value} must be {expected}")]
    OutOfRange {
        /// The dotted key, e.g. `train.lr`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A value that contradicts another setting.
    #[error("{key} = {value}: {reason}")]
    Conflict {
        /// The dotted key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What it contradicts.
        reason: String,
    },
    /// The `[model]` table (an LM config).
    #[error("model: {0}")]
    Model(#[from] chorus_lm::LmError),
    /// The `[chorus]` table (the joint model's config).
    #[error(transparent)]
    Chorus(#[from] chorus_model::ModelError),
    /// `train.kl_schedule` (its own checks, in chorus-elbo).
    #[error("train.kl_schedule: {0}")]
    KlSchedule(#[from] chorus_elbo::ElboError),
}

/// `Err(OutOfRange)` unless `ok`.
fn check(
    ok: bool,
    key: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            key,
            value: value.to_string(),
            expected,
        })
    }
}

impl DataConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(!self.tasks.is_empty(), "data.tasks", "[]", "non-empty")?;
        check(
            self.max_seq_len >= 4,
            "data.max_seq_len",
            self.max_seq_len,
            "≥ 4",
        )?;
        check(
            self.batch_size > 0,
            "data.batch_size",
            self.batch_size,
            "≥ 1",
        )?;
        Ok(())
    }

    /// The corpus cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .clone()
            .unwrap_or_else(chorus_data::fetch::cache_dir)
    }
}

impl OptimConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.lr.is_finite() && self.lr > 0.0,
            "train.lr",
            self.lr,
            "finite and > 0",
        )?;
        check(self.steps > 0, "train.steps", self.steps, "≥ 1")?;
        check(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "train.min_lr_ratio",
            self.min_lr_ratio,
            "in [0, 1]",
        )?;
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "train.weight_decay",
            self.weight_decay,
            "≥ 0",
        )?;
        check(
            (0.0..1.0).contains(&self.beta1),
            "train.beta1",
            self.beta1,
            "in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&self.beta2),
            "train.beta2",
            self.beta2,
            "in [0, 1)",
        )?;
        check(
            self.epsilon.is_finite() && self.epsilon > 0.0,
            "train.epsilon",
            self.epsilon,
            "finite and > 0",
        )?;
        check(
            self.grad_clip.is_finite() && self.grad_clip >= 0.0,
            "train.grad_clip",
            self.grad_clip,
            "≥ 0 (0 disables)",
        )?;
        check(
            self.selector_lr_scale.is_finite() && self.selector_lr_scale > 0.0,
            "train.selector_lr_scale",
            self.selector_lr_scale,
            "finite and > 0",
        )?;
        check(
            self.accumulation > 0,
            "train.accumulation",
            self.accumulation,
            "≥ 1",
        )?;
        check(
            self.iw_samples > 0,
            "train.iw_samples",
            self.iw_samples,
            "≥ 1",
        )?;
        check(self.log_every > 0, "train.log_every", self.log_every, "≥ 1")?;
        check(self.keep_last > 0, "train.keep_last", self.keep_last, "≥ 1")?;
        if self.selector_init_steps >= self.steps {
            return Err(ConfigError::Conflict {
                key: "train.selector_init_steps",
                value: self.selector_init_steps.to_string(),
                reason: format!("leaves no ELBO steps of train.steps = {}", self.steps),
            });
        }
        self.kl_schedule.validate()?;
        if let KlSchedule::Cyclical { total_steps, .. }
        | KlSchedule::ZeroThenLinear { total_steps, .. } = self.kl_schedule
            && total_steps != self.steps
        {
            return Err(ConfigError::Conflict {
                key: "train.kl_schedule.total_steps",
                value: total_steps.to_string(),
                reason: format!(
                    "but train.steps = {}: the β cycles must span the run (set both)",
                    self.steps
                ),
            });
        }
        Ok(())
    }
}

/// Just a `[data]` table, for commands that read data but train nothing (`chorus eval` without a
/// train config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The data settings.
    #[serde(default)]
    pub data: DataConfig,
}

/// A config that can check itself.
pub trait Validate {
    /// Every range and combination that can be checked without loading models.
    fn validate(&self) -> Result<(), ConfigError>;
}

impl Validate for DataSection {
    fn validate(&self) -> Result<(), ConfigError> {
        self.data.validate()
    }
}

impl Validate for PretrainConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.data.validate()?;
        self.train.validate()?;
        if self.train.selector_init_steps > 0 {
            return Err(ConfigError::Conflict {
                key: "train.selector_init_steps",
                value: self.train.selector_init_steps.to_string(),
                reason: "needs assistants (pretrain has none)".into(),
            });
        }
        Ok(())
    }
}

impl Validate for TrainConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.chorus.remote_assistants != 0 {
            return Err(ConfigError::Conflict {
                key: "chorus.remote_assistants",
                value: self.chorus.remote_assistants.to_string(),
                reason: "set by `chorus train` from the servers among `assistants`, not by hand"
                    .into(),
            });
        }
        self.chorus.validate()?;
        self.data.validate()?;
        self.train.validate()?;
        let conflict = |key, value: String, reason: &str| {
            Err(ConfigError::Conflict {
                key,
                value,
                reason: reason.to_string(),
            })
        };
        if self.train.selector_init_steps > 0 && self.assistants.is_empty() {
            return conflict(
                "train.selector_init_steps",
                self.train.selector_init_steps.to_string(),
                "needs at least one assistant",
            );
        }
        if let Some(first) = self.assistants.iter().position(chorus_model::is_server_url) {
            if let Some(local) = self.assistants[first..]
                .iter()
                .find(|p| !chorus_model::is_server_url(p))
            {
                return conflict(
                    "assistants",
                    local.display().to_string(),
                    "local assistants come before servers (models are numbered local first)",
                );
            }
            if self.scores.is_none() {
                return conflict(
                    "assistants",
                    self.assistants[first].display().to_string(),
                    "an assistant behind a server trains from its cached log-probs: write them \
                     with `chorus score` and set `scores`",
                );
            }
        }
        if let Some(scores) = &self.scores {
            if self.assistants.is_empty() {
                return conflict(
                    "scores",
                    scores.display().to_string(),
                    "scores are assistant log-probs, but there are no assistants",
                );
            }
            if self.chorus.has_z() && self.chorus.assistant_adapters {
                return conflict(
                    "scores",
                    scores.display().to_string(),
                    "cached assistant log-probs need chorus.assistant_adapters = false: adapted \
                     assistants depend on z",
                );
            }
        }
        Ok(())
    }
}

/// Reads a TOML config (or starts from defaults when `path` is `None`), applies `key.path=value`
/// overrides (values in TOML syntax; bare words are strings), then deserialises and validates.
/// Unknown keys, wrong types and out-of-range values are errors naming the file and the key.
pub fn load_config<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T, TrainError> {
    let file = path.map_or("defaults + --set".to_string(), |p| p.display().to_string());
    let err = |reason: String| TrainError::Config {
        file: file.clone(),
        reason,
    };
    let mut table: toml::Table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?;
            toml::from_str(&text).map_err(|e| err(e.to_string()))?
        }
        None => toml::Table::new(),
    };
    for item in overrides {
        apply_override(&mut table, item).map_err(|reason| TrainError::Config {
            file: format!("--set {item}"),
            reason,
        })?;
    }
    let config: T = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    config.validate().map_err(|e| err(e.to_string()))?;
    Ok(config)
}

fn apply_override(table: &mut toml::Table, item: &str) -> Result<(), String> {
    let (key, value) = item
        .split_once('=')
        .ok_or("expected key.path=value".to_string())?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("bad key `{key}`"));
    }
    let mut cursor = table;
    for part in &parts[..parts.len() - 1] {
        cursor = cursor
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or(format!("`{part}` in `{key}` is not a table"))?;
    }
    cursor.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
