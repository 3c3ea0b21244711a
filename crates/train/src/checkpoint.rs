//! Training checkpoints: self-contained directories written atomically.
//!
//! `<out>/checkpoints/step-00000100/` is a saved joint model ([`Chorus::save`]: `chorus.json`,
//! `tokenizer.json`, `model.mpk`) plus `optimizer.mpk` (AdamW moments) and `state.json` (step,
//! validation history, the sha256 of every other file). Everything is written under `.tmp-…` and the directory is renamed into place, so a
//! crash mid-write leaves the previous checkpoints untouched; `state.json` checksums catch files
//! damaged afterwards. The random state is a pure function of (seed, step): each step re-seeds the
//! backend with both, and the data order is derived from them, so (step, seed) is the whole RNG
//! state. `best/` is a copy of the checkpoint with the lowest validation NLL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use chorus_data::fetch::sha256_file;
use chorus_lm::{TOKENIZER_CONFIG, Tokenizer};
use chorus_model::{Chorus, MANIFEST_FILE, SavedChorus, TOKENIZER_FILE, WEIGHTS_FILE};
use serde::{Deserialize, Serialize};

use crate::TrainError;

const OPTIMIZER: &str = "optimizer";
const OPTIMIZER_FILE: &str = "optimizer.mpk";
const STATE: &str = "state.json";
const CHECKPOINTS: &str = "checkpoints";

/// `state.json`: the loop's position and history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Steps in the run's config.
    pub total_steps: u64,
    /// The seed of the run.
    pub seed: u64,
    /// Target tokens trained on so far.
    pub tokens_seen: u64,
    /// Validation NLL per token at this step, if validated.
    pub valid_nll: Option<f64>,
    /// Lowest validation NLL per token so far, and its step.
    pub best: Option<(u64, f64)>,
    /// The metric sums since the last logged row.
    #[serde(default)]
    pub window: crate::MetricWindow,
    /// sha256 of every other file in the directory.
    pub files: BTreeMap<String, String>,
}

#[cfg(test)]
impl CheckpointState {
    /// Step `step` of `total_steps` of a run with seed 0, nothing validated, no file recorded yet:
    /// what tests hand to [`save_checkpoint`].
    pub(crate) fn at_step(step: u64, total_steps: u64) -> Self {
        Self {
            step,
            total_steps,
            seed: 0,
            tokens_seen: 0,
            valid_nll: None,
            best: None,
            window: Default::default(),
            files: Default::default(),
        }
    }
}

/// Writes `text` to `path` through `<name>.tmp` beside it and a rename, so that a reader sees the
/// old file or the new one, never half of one.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), TrainError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `<out>/checkpoints`.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join(CHECKPOINTS)
}

/// `<out>/checkpoints/best`.
pub fn best_dir(out: &Path) -> PathBuf {
    checkpoints_dir(out).join("best")
}

/// Complete checkpoints under `<out>/checkpoints`, oldest first, as (step, dir).
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(out)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    list_checkpoints(out).pop().map(|(_, p)| p)
}

/// Reads and verifies `state.json` of a checkpoint: every listed file must exist with its sha256.
pub fn read_state(dir: &Path) -> Result<CheckpointState, TrainError> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        bad(
            dir,
            format!("cannot read {STATE} ({e}): incomplete checkpoint"),
        )
    })?;
    let state: CheckpointState = serde_json::from_str(&text)
        .map_err(|e| bad(&path, format!("not a checkpoint state: {e}")))?;
    for (file, expected) in &state.files {
        let p = dir.join(file);
        let actual = sha256_file(&p).map_err(|e| bad(&p, format!("missing or unreadable: {e}")))?;
        if &actual != expected {
            return Err(bad(
                &p,
                format!(
                    "sha256 {actual} ≠ {expected} recorded at save: the file is truncated or corrupt"
                ),
            ));
        }
    }
    Ok(state)
}

/// Writes a checkpoint of `model` and `optimizer` at `state.step` atomically, then keeps only the
/// `keep_last` newest `step-*` directories. Returns the new directory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint<B, O>(
    out: &Path,
    model: &Chorus<B>,
    optimizer: &O,
    sources: &[String],
    tokenizer: &Tokenizer,
    mut state: CheckpointState,
    keep_last: usize,
) -> Result<PathBuf, TrainError>
where
    B: AutodiffBackend,
    O: Optimizer<Chorus<B>, B>,
{
    let root = checkpoints_dir(out);
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let dest = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    model.save(&tmp, tokenizer, sources)?;
    recorder()
        .record(optimizer.to_record(), tmp.join(OPTIMIZER))
        .map_err(|e| bad(&tmp, format!("writing the optimizer: {e}")))?;
    for file in [
        MANIFEST_FILE,
        TOKENIZER_FILE,
        WEIGHTS_FILE,
        OPTIMIZER_FILE,
        TOKENIZER_CONFIG,
    ] {
        if file == TOKENIZER_CONFIG && !tmp.join(file).is_file() {
            continue;
        }
        let sha = sha256_file(&tmp.join(file))?;
        state.files.insert(file.to_string(), sha);
    }
    let state_path = tmp.join(STATE);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(&state).expect("serializes"),
    )
    .map_err(|e| TrainError::io(&state_path, e))?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    let all = list_checkpoints(out);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
        std::fs::remove_dir_all(old).map_err(|e| TrainError::io(old, e))?;
    }
    Ok(dest)
}

/// Puts `best/` back if a run was killed between moving the old one aside and renaming the new
/// one into place (see [`update_best`]).
fn recover_best(out: &Path) -> Result<(), TrainError> {
    let old = checkpoints_dir(out).join(".old-best");
    let best = best_dir(out);
    if old.is_dir() && !best.exists() {
        std::fs::rename(&old, &best).map_err(|e| TrainError::io(&best, e))?;
    }
    Ok(())
}

/// Copies checkpoint `src` to `<out>/checkpoints/best` (via a temp copy and renames).
pub(crate) fn update_best(out: &Path, src: &Path) -> Result<(), TrainError> {
    let root = checkpoints_dir(out);
    let tmp = root.join(".tmp-best");
    let old = root.join(".old-best");
    let best = best_dir(out);
    for d in [&tmp, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| TrainError::io(d, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| TrainError::io(src, e))? {
        let entry = entry.map_err(|e| TrainError::io(src, e))?;
        // The optimizer is not needed to use the best model; skip it to halve the copy.
        if entry.file_name() == OPTIMIZER_FILE {
            continue;
        }
        let to = tmp.join(entry.file_name());
        std::fs::copy(entry.path(), &to).map_err(|e| TrainError::io(&to, e))?;
    }
    // Record only the files that were copied.
    let state_path = tmp.join(STATE);
    let mut state: CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?,
    )
    .map_err(|e| bad(&state_path, e.to_string()))?;
    state.files.remove(OPTIMIZER_FILE);
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(&state).expect("serializes"),
    )
    .map_err(|e| TrainError::io(&state_path, e))?;
    if best.exists() {
        std::fs::rename(&best, &old).map_err(|e| TrainError::io(&best, e))?;
    }
    std::fs::rename(&tmp, &best).map_err(|e| TrainError::io(&best, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}

/// Rebuilds a joint model from a checkpoint (or `best/`) directory after verifying every file
/// against `state.json` ([`read_state`], then [`Chorus::load`]).
pub fn load_chorus<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(SavedChorus<B>, CheckpointState), TrainError> {
    let state = read_state(dir)?;
    Ok((Chorus::load(dir, device)?, state))
}

/// Where a resumed run continues.
pub(crate) struct Resumed<B: AutodiffBackend, O> {
    /// The checkpoint's model.
    pub(crate) model: Chorus<B>,
    /// The checkpoint's optimiser.
    pub(crate) optimizer: O,
    /// The loop's position and history.
    pub(crate) state: CheckpointState,
    /// The checkpoint it came from.
    pub(crate) dir: PathBuf,
}

/// Loads the newest checkpoint under `out` for `--resume` after checking that it was written for
/// the same models (`fresh`'s configs and `sources`) and the same seed.
pub(crate) fn resume<B, O>(
    out: &Path,
    sources: &[String],
    fresh: &Chorus<B>,
    optimizer: O,
    seed: u64,
    device: &B::Device,
) -> Result<Resumed<B, O>, TrainError>
where
    B: AutodiffBackend,
    O: Optimizer<Chorus<B>, B>,
{
    recover_best(out)?;
    let dir = latest_checkpoint(out).ok_or_else(|| TrainError::Checkpoint {
        path: checkpoints_dir(out),
        reason: "--resume: no checkpoint to resume from".into(),
    })?;
    let (loaded, state) = load_chorus::<B>(&dir, device)?;
    let m = &loaded.manifest;
    let same_models = m.base == fresh.base.config()
        && m.assistants
            == fresh
                .assistants
                .iter()
                .map(|a| a.config())
                .collect::<Vec<_>>()
        && m.chorus == fresh.config
        && m.sources == sources;
    if !same_models {
        return Err(bad(
            &dir,
            "--resume: the checkpoint's models or chorus settings differ from the config",
        ));
    }
    if state.seed != seed {
        return Err(bad(
            &dir,
            format!(
                "--resume: written with seed {} but the config says {seed} (resuming would not be exact)",
                state.seed
            ),
        ));
    }
    Ok(Resumed {
        optimizer: load_optimizer(&dir, optimizer, device)?,
        model: loaded.model,
        state,
        dir,
    })
}

/// Loads the optimiser state of a checkpoint into `optimizer`.
fn load_optimizer<B, O>(dir: &Path, optimizer: O, device: &B::Device) -> Result<O, TrainError>
where
    B: AutodiffBackend,
    O: Optimizer<Chorus<B>, B>,
{
    let record = recorder()
        .load(dir.join(OPTIMIZER), device)
        .map_err(|e| bad(&dir.join(OPTIMIZER_FILE), format!("cannot load: {e}")))?;
    Ok(optimizer.load_record(record))
}
