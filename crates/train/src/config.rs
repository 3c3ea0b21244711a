//! Experiment configs: TOML files with `--set key.path=value` overrides, validated before any work.

use std::path::{Path, PathBuf};

use chorus_data::Task;
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
}

/// `chorus pretrain`: one LM from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// The tokenizer (`tokenizer.json`, a `.gguf`, or a model directory).
    pub tokenizer: PathBuf,
    /// The architecture; `vocab_size` must equal the tokenizer's.
    pub model: LmConfig,
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
    /// The assistants (same formats). Empty: K = 1.
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

impl DataConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), String> {
        if self.tasks.is_empty() {
            return Err("data.tasks is empty".into());
        }
        if self.max_seq_len < 4 {
            return Err(format!(
                "data.max_seq_len = {} must be ≥ 4",
                self.max_seq_len
            ));
        }
        if self.batch_size == 0 {
            return Err("data.batch_size must be ≥ 1".into());
        }
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
    pub fn validate(&self) -> Result<(), String> {
        let finite_pos = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("train.{name} = {v} must be finite and > 0"))
            }
        };
        finite_pos("lr", self.lr)?;
        if self.steps == 0 {
            return Err("train.steps must be ≥ 1".into());
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!(
                "train.min_lr_ratio = {} must be in [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "train.weight_decay = {} must be ≥ 0",
                self.weight_decay
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(format!("train.{name} = {b} must be in [0, 1)"));
            }
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(format!(
                "train.grad_clip = {} must be ≥ 0 (0 disables)",
                self.grad_clip
            ));
        }
        if self.accumulation == 0 {
            return Err("train.accumulation must be ≥ 1".into());
        }
        if self.iw_samples == 0 {
            return Err("train.iw_samples must be ≥ 1".into());
        }
        if self.log_every == 0 {
            return Err("train.log_every must be ≥ 1".into());
        }
        if self.keep_last == 0 {
            return Err("train.keep_last must be ≥ 1".into());
        }
        if self.selector_init_steps >= self.steps {
            return Err(format!(
                "train.selector_init_steps = {} leaves no ELBO steps of train.steps = {}",
                self.selector_init_steps, self.steps
            ));
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
    fn validate(&self) -> Result<(), String>;
}

impl Validate for DataSection {
    fn validate(&self) -> Result<(), String> {
        self.data.validate()
    }
}

impl Validate for PretrainConfig {
    fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.data.validate()?;
        self.train.validate()?;
        if self.train.selector_init_steps > 0 {
            return Err("train.selector_init_steps needs assistants (pretrain has none)".into());
        }
        Ok(())
    }
}

impl Validate for TrainConfig {
    fn validate(&self) -> Result<(), String> {
        self.chorus.validate().map_err(|e| e.to_string())?;
        self.data.validate()?;
        self.train.validate()?;
        if self.train.selector_init_steps > 0 && self.assistants.is_empty() {
            return Err("train.selector_init_steps needs at least one assistant".into());
        }
        if self.scores.is_some() && self.assistants.is_empty() {
            return Err("scores are assistant log-probs, but there are no assistants".into());
        }
        if self.scores.is_some() && self.chorus.has_z() && self.chorus.assistant_adapters {
            return Err("scores (cached assistant log-probs) need chorus.assistant_adapters = false: adapted assistants depend on z".into());
        }
        if let chorus_elbo::KlSchedule::Cyclical { total_steps, .. }
        | chorus_elbo::KlSchedule::ZeroThenLinear { total_steps, .. } = self.chorus.kl_schedule
            && total_steps != self.train.steps
        {
            return Err(format!(
                "chorus.kl_schedule.total_steps = {total_steps} but train.steps = {}: the β cycles must span the run (set both)",
                self.train.steps
            ));
        }
        if self.chorus.encoder != chorus_model::EncoderKind::BaseLm {
            return Err(
                "chorus.encoder = bert is not supported by `chorus train` yet (use base_lm)".into(),
            );
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
    config.validate().map_err(err)?;
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
