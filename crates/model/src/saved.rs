//! A joint model on disk: one directory holding
//!
//! - `chorus.json` ([`ChorusManifest`]): every model's config, the chorus switches, where each model
//!   came from, and the sha256 of the two files below;
//! - `tokenizer.json`: the tokenizer all models share (and `tokenizer_config.json` naming its BOS,
//!   when it has one);
//! - `model.mpk`: every parameter, with its id (burn's named MessagePack record, full precision).
//!
//! [`Chorus::save`] writes the weights and the tokenizer first and the manifest last, each to a
//! temporary name renamed into place, so a crash mid-save leaves a manifest whose checksums do not
//! match rather than a directory that loads wrong. [`Chorus::load`] checks the checksums, refuses a
//! manifest that describes more weights than `model.mpk` can hold before allocating them, and turns
//! burn's panic on a record that does not fit the model into an error naming the files.
//!
//! Training checkpoints (chorus-train) are this directory plus the optimiser state and the loop's
//! position; `chorus generate`, `inspect` and `calibrate` read it through [`Chorus::load`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use chorus_lm::{LmConfig, TOKENIZER_CONFIG, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::{Chorus, ChorusConfig, ModelError};

/// File name of the manifest inside a model directory.
pub const MANIFEST_FILE: &str = "chorus.json";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the parameters inside a model directory (burn adds the `.mpk`).
pub const WEIGHTS_FILE: &str = "model.mpk";

/// `chorus.json`: the architecture of a saved joint model (enough to rebuild its skeleton before
/// loading weights) and the checksums of the files beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChorusManifest {
    /// The base's config.
    pub base: LmConfig,
    /// Each assistant's config.
    pub assistants: Vec<LmConfig>,
    /// The chorus switches.
    pub chorus: ChorusConfig,
    /// Where each model came from (for messages and `inspect`).
    #[serde(default)]
    pub sources: Vec<String>,
    /// sha256 (hex) of `tokenizer.json` and `model.mpk` as written. Empty in directories written
    /// before checksums moved here (their training checkpoint's `state.json` holds them).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// What [`Chorus::load`] returns.
#[derive(Debug)]
pub struct SavedChorus<B: Backend> {
    /// The model.
    pub model: Chorus<B>,
    /// Its manifest as read.
    pub manifest: ChorusManifest,
    /// The tokenizer saved with it.
    pub tokenizer: Tokenizer,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn bad(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// sha256 of a file (hex), read errors naming it.
fn sha256(path: &Path) -> Result<String, ModelError> {
    chorus_data::fetch::sha256_file(path).map_err(|e| bad(path, e.to_string()))
}

/// Writes `path` through `path.tmp` and a rename.
fn write_then_rename(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

impl<B: Backend> Chorus<B> {
    /// Writes the model into `dir` (created if needed) as described in the module docs, with
    /// `sources` naming where each model came from. Returns the manifest written.
    pub fn save(
        &self,
        dir: &Path,
        tokenizer: &Tokenizer,
        sources: &[String],
    ) -> Result<ChorusManifest, ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let weights = dir.join(WEIGHTS_FILE);
        // burn sets the extension `.mpk` on the path it is given.
        recorder()
            .record(self.clone().into_record(), dir.join("model-partial"))
            .map_err(|e| bad(dir, format!("writing the model: {e}")))?;
        std::fs::rename(dir.join("model-partial.mpk"), &weights)
            .map_err(|e| ModelError::io(&weights, e))?;
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        write_then_rename(&tokenizer_path, |tmp| Ok(tokenizer.save(tmp)?))?;
        let mut files = BTreeMap::new();
        for file in [TOKENIZER_FILE, WEIGHTS_FILE, TOKENIZER_CONFIG] {
            if file != TOKENIZER_CONFIG || dir.join(file).is_file() {
                files.insert(file.to_string(), sha256(&dir.join(file))?);
            }
        }
        let manifest = ChorusManifest {
            base: self.base.config(),
            assistants: self.assistants.iter().map(|a| a.config()).collect(),
            chorus: self.config.clone(),
            sources: sources.to_vec(),
            files,
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest).expect("manifests serialize");
        write_then_rename(&manifest_path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| ModelError::io(tmp, e))
        })?;
        Ok(manifest)
    }

    /// Reads a model written by [`Chorus::save`] (or a training checkpoint) from `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<SavedChorus<B>, ModelError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let manifest: ChorusManifest = serde_json::from_str(&text).map_err(|e| {
            let e = e.to_string();
            // Keys that chorus.json held before the KL schedule moved to the train config and the
            // separate posterior encoder was removed (2026-11-28).
            let hint = if e.contains("`kl_schedule`") || e.contains("`encoder`") {
                ": written by an older chorus (delete `chorus.kl_schedule` — it is \
                 `train.kl_schedule` now — and `chorus.encoder` from it, or retrain)"
            } else {
                ""
            };
            bad(&path, format!("not a chorus manifest: {e}{hint}"))
        })?;
        for (file, expected) in &manifest.files {
            let p = dir.join(file);
            let actual = sha256(&p)?;
            if &actual != expected {
                return Err(bad(
                    &p,
                    format!(
                        "sha256 {actual} ≠ {expected} recorded in {MANIFEST_FILE}: the file is truncated or corrupt"
                    ),
                ));
            }
        }
        let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))?;
        // Every config valid (the size bound below reads their dims)…
        manifest.chorus.validate()?;
        for config in std::iter::once(&manifest.base).chain(&manifest.assistants) {
            config.validate()?;
        }
        // …and, before allocating: the configs must not describe far more f32 weights than
        // model.mpk can hold (a corrupt manifest would otherwise allocate without bound).
        let weights = dir.join(WEIGHTS_FILE);
        let model_bytes = std::fs::metadata(&weights)
            .map_err(|e| ModelError::io(&weights, e))?
            .len();
        let described = manifest
            .chorus
            .min_parameters(&manifest.base, &manifest.assistants);
        if described.is_none_or(|n| n.saturating_mul(4) > model_bytes.saturating_mul(2) + (1 << 20))
        {
            return Err(bad(
                &path,
                format!(
                    "describes models of at least {} parameters but {WEIGHTS_FILE} has {model_bytes} bytes",
                    described.map_or("2^64".into(), |n| n.to_string())
                ),
            ));
        }
        let base = manifest.base.init::<B>(device)?;
        let assistants = manifest
            .assistants
            .iter()
            .map(|c| c.init::<B>(device))
            .collect::<Result<Vec<_>, _>>()?;
        let skeleton = Chorus::skeleton(manifest.chorus.clone(), base, assistants, device)?;
        let record = recorder()
            .load(dir.join("model"), device)
            .map_err(|e| bad(&weights, format!("cannot load: {e}")))?;
        // burn asserts (panics) when a record's structure differs from the module's, e.g. a
        // chorus.json edited after the fact; make that an error naming the files.
        let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            skeleton.load_record(record)
        }))
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the record does not fit the model");
            bad(
                &weights,
                format!(
                    "does not fit the models described by {MANIFEST_FILE}: {}",
                    what.lines().next().unwrap_or(what).trim()
                ),
            )
        })?;
        Ok(SavedChorus {
            model,
            manifest,
            tokenizer,
        })
    }
}

impl<B: Backend> SavedChorus<B> {
    /// Lets every frozen member that came from a GGUF file (its entry in `manifest.sources`)
    /// decode from that file's quantised blocks again ([`chorus_lm::Lm::attach_gguf_blocks`],
    /// which first checks that the file still holds the member's weights): the checkpoint keeps
    /// such a member in f32, 538 MB read per decoded token for SmolLM2 against 97 MB from its
    /// Q4_1 blocks. For decoding on the CPU, as `Lm::from_gguf_for_decoding`. Returns one line for
    /// each such member that stays on its f32 weights, saying why (its file moved, or changed).
    pub fn attach_gguf_blocks(&mut self) -> Vec<String> {
        let config = &self.model.config;
        let members = std::iter::once((
            !config.train_base,
            "the base".to_string(),
            &mut self.model.base,
        ))
        .chain(
            self.model
                .assistants
                .iter_mut()
                .enumerate()
                .map(|(i, lm)| (!config.train_assistants, format!("assistant {}", i + 1), lm)),
        );
        let mut notes = Vec::new();
        for ((frozen, name, lm), source) in members.zip(&self.manifest.sources) {
            let is_gguf = Path::new(source)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            if frozen
                && is_gguf
                && let Err(e) = lm.attach_gguf_blocks(Path::new(source))
            {
                notes.push(format!(
                    "{name} decodes from its f32 weights, not {source}'s blocks: {e}"
                ));
            }
        }
        notes
    }
}
