//! `pretrain` and `train`: the optimisation loop shared by both.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use chorus_data::Split;
use chorus_elbo::posterior_deferral;
use chorus_lm::{Lm, Tokenizer};
use chorus_model::{Assistant, Chorus, ChorusConfig, LocalLm, RemoteAssistant, RemoteSettings};
use serde::Serialize;

use crate::batch::splitmix;
use crate::checkpoint::{
    CheckpointState, latest_checkpoint, load_chorus, load_optimizer, save_checkpoint, update_best,
};
use crate::grads::clip_global_norm;
use crate::progress::Progress;
use crate::scores::fingerprint;
use crate::{
    DataConfig, Encoded, OptimConfig, PretrainConfig, ScoreCache, TokenBatch, TrainConfig,
    TrainError, encode_examples, epoch_batches, evaluate_chorus, learning_rate, load_task_examples,
};

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Optimiser steps completed (including those of the runs this one resumed).
    pub steps: u64,
    /// Optimiser steps this process took (`steps` minus the step it resumed at).
    pub steps_run: u64,
    /// The last checkpoint written.
    pub last_checkpoint: PathBuf,
    /// The exported model (`<out>/model`).
    pub model: PathBuf,
    /// Lowest validation NLL per token, and its step.
    pub best_valid_nll: Option<(u64, f64)>,
    /// Target tokens trained on (this run and the runs it resumed).
    pub tokens_seen: u64,
    /// Wall time of this run (seconds).
    pub seconds: f64,
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} steps ({} in this run) in {:.0} s ({} target tokens); best valid NLL/token {}; model: {}",
            self.steps,
            self.steps_run,
            self.seconds,
            self.tokens_seen,
            self.best_valid_nll
                .map_or("–".into(), |(s, v)| format!("{v:.4} (step {s})")),
            self.model.display()
        )
    }
}

/// Train and validation examples of a data config, tokenised.
pub(crate) fn prepare_data(
    data: &DataConfig,
    tokenizer: &Tokenizer,
) -> Result<(Vec<Encoded>, Vec<Encoded>), TrainError> {
    let cache = data.cache_dir();
    let all = chorus_data::load_examples(&cache)?;
    let train = load_task_examples(&all, data, Split::Train, data.max_train_examples)?;
    let valid = load_task_examples(&all, data, Split::Valid, data.valid_examples)?;
    let encode = |e| encode_examples(e, tokenizer, &data.eos_token, data.max_seq_len);
    Ok((encode(&train)?, encode(&valid)?))
}

/// Opens the shared tokenizer and checks it against a model's vocabulary.
fn check_vocab(tokenizer: &Tokenizer, vocab: usize, what: &str) -> Result<(), TrainError> {
    if tokenizer.vocab_size() > vocab {
        return Err(TrainError::Config {
            file: what.to_string(),
            reason: format!(
                "the model's vocabulary has {vocab} tokens but the tokenizer {} has {}: they do not belong together",
                tokenizer.source(),
                tokenizer.vocab_size()
            ),
        });
    }
    Ok(())
}

/// Pre-trains one LM from scratch (a chorus with K = 1 and no z: plain maximum likelihood) and
/// exports it to `<out>/model` (config.json + model.safetensors + tokenizer.json).
pub fn pretrain<B: AutodiffBackend>(
    config: &PretrainConfig,
    out: &Path,
    resume: bool,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    let tokenizer = Tokenizer::open(&config.tokenizer)?;
    let vocab = config.model.dims().vocab_size;
    if vocab != tokenizer.vocab_size() {
        return Err(TrainError::Config {
            file: "model.vocab_size".into(),
            reason: format!(
                "{vocab} ≠ {} tokens of {}",
                tokenizer.vocab_size(),
                tokenizer.source()
            ),
        });
    }
    let (train, valid) = prepare_data(&config.data, &tokenizer)?;
    B::seed(device, config.train.seed);
    let base = config.model.init::<B>(device)?;
    let chorus_config = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let sources = vec!["scratch".to_string()];
    let model = Chorus::new(chorus_config, base, Vec::new(), device)?;
    let summary = run_loop(
        Loop {
            sources,
            tokenizer: &tokenizer,
            train: &train,
            valid: &valid,
            train_scores: None,
            valid_scores: None,
            optim: &config.train,
            batch_size: config.data.batch_size,
            out,
            resume,
            gradient_hook: None,
            progress,
        },
        model,
        device,
    )?;
    // Export the best base as a plain LM checkpoint.
    let (best, _) = load_chorus::<B::InnerBackend>(&summary.model, device)?;
    let export = out.join("lm");
    best.model.base.save(&export)?;
    tokenizer.save(export.join("tokenizer.json"))?;
    Ok(TrainSummary {
        model: export,
        ..summary
    })
}

/// A stable identity for a model file or directory (for score caches): the sha256 of its weights.
fn model_identity(path: &Path) -> Result<String, TrainError> {
    let weights = if path.is_dir() {
        let single = path.join(chorus_lm::WEIGHTS_FILE);
        if single.is_file() {
            single
        } else {
            path.join("model.safetensors.index.json")
        }
    } else {
        path.to_path_buf()
    };
    Ok(chorus_data::fetch::sha256_file(&weights)?)
}

/// The shared tokenizer, the base and the assistants of a train config.
type Models<B> = (Tokenizer, Lm<B>, Vec<Lm<B>>);

/// The models of a train config, with every tokenizer found next to them checked against the
/// shared one.
pub(crate) fn open_models<B: Backend>(
    config: &TrainConfig,
    device: &B::Device,
) -> Result<Models<B>, TrainError> {
    let tokenizer = Tokenizer::open(&config.tokenizer)?;
    let open = |path: &Path, role: &str| -> Result<Lm<B>, TrainError> {
        let lm = Lm::<B>::open(path, device)?;
        check_vocab(
            &tokenizer,
            lm.dims().vocab_size,
            &format!("{role} {}", path.display()),
        )?;
        let own = if path.is_dir() {
            Some(path.join("tokenizer.json")).filter(|p| p.is_file())
        } else {
            Some(path.to_path_buf())
        };
        if let Some(own) = own {
            tokenizer.check_same(&Tokenizer::open(&own)?)?;
        }
        Ok(lm)
    };
    let base = open(&config.base, "base")?;
    let assistants = config
        .assistants
        .iter()
        .enumerate()
        .map(|(i, p)| open(p, &format!("assistant {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    // Before any data is read: every model must share the base's vocabulary.
    let vocab = base.dims().vocab_size;
    for (a, path) in assistants.iter().zip(&config.assistants) {
        if a.dims().vocab_size != vocab {
            return Err(TrainError::Config {
                file: format!("assistant {}", path.display()),
                reason: format!(
                    "its vocabulary has {} tokens but the base {} has {vocab}: all models of a chorus share one tokenizer",
                    a.dims().vocab_size,
                    config.base.display()
                ),
            });
        }
    }
    Ok((tokenizer, base, assistants))
}

/// Fingerprints of (train, valid) for score caches of `config`.
pub(crate) fn score_fingerprints(
    config: &TrainConfig,
    train: &[Encoded],
    valid: &[Encoded],
) -> Result<(String, String), TrainError> {
    let ids = config
        .assistants
        .iter()
        .map(|p| model_identity(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((fingerprint(train, &ids), fingerprint(valid, &ids)))
}

/// `chorus score`: the assistants' log-probs of the train and valid examples of `config`, written
/// to `<dir>/train` and `<dir>/valid`; with `remotes`, those of the assistants behind these
/// OpenAI-compatible servers instead of the config's (each checked to tokenize like
/// `config.tokenizer`). Rerun after a failure, it continues where it stopped.
pub fn score<B: Backend>(
    config: &TrainConfig,
    remotes: &[String],
    dir: &Path,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> Result<(usize, usize), TrainError> {
    if config.assistants.is_empty() && remotes.is_empty() {
        return Err(TrainError::Config {
            file: "assistants".into(),
            reason: "there are no assistants to score".into(),
        });
    }
    let (tokenizer, locals, remotes, ids) = if remotes.is_empty() {
        let (tokenizer, _, assistants) = open_models::<B>(config, device)?;
        let ids = config
            .assistants
            .iter()
            .map(|p| model_identity(p))
            .collect::<Result<Vec<_>, _>>()?;
        (tokenizer, assistants, Vec::new(), ids)
    } else {
        let tokenizer = Tokenizer::open(&config.tokenizer)?;
        let remotes = remotes
            .iter()
            .map(|url| RemoteAssistant::connect(url, &tokenizer, RemoteSettings::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = remotes
            .iter()
            .map(|r| format!("remote {}", Assistant::<B>::describe(r)))
            .collect();
        (tokenizer, Vec::new(), remotes, ids)
    };
    let members: Vec<LocalLm<'_, B>> = locals.iter().map(LocalLm::new).collect();
    let assistants: Vec<&dyn Assistant<B>> = members
        .iter()
        .map(|m| m as &dyn Assistant<B>)
        .chain(remotes.iter().map(|r| r as &dyn Assistant<B>))
        .collect();
    let (train, valid) = prepare_data(&config.data, &tokenizer)?;
    for (name, data) in [("train", &train), ("valid", &valid)] {
        let fp = fingerprint(data, &ids);
        progress.begin(&format!("scoring {name}"), data.len() as u64, 0);
        let scored = crate::score_assistants(
            &assistants,
            data,
            &fp,
            config.data.batch_size * 4,
            &dir.join(name),
            device,
            |done| progress.update(done.min(data.len()) as u64, ""),
        );
        progress.end(scored.is_ok());
        scored?;
    }
    Ok((train.len(), valid.len()))
}

/// Trains the joint model of `config` into `out`; `resume` continues from the newest checkpoint.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    out: &Path,
    resume: bool,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    B::seed(device, config.train.seed);
    let (tokenizer, base, assistants) = open_models::<B>(config, device)?;
    let (train, valid) = prepare_data(&config.data, &tokenizer)?;
    let (train_scores, valid_scores) = match &config.scores {
        Some(dir) => {
            let (fp_train, fp_valid) = score_fingerprints(config, &train, &valid)?;
            (
                Some(ScoreCache::open(&dir.join("train"), &fp_train)?),
                Some(ScoreCache::open(&dir.join("valid"), &fp_valid)?),
            )
        }
        None => (None, None),
    };
    let sources = std::iter::once(&config.base)
        .chain(&config.assistants)
        .map(|p| p.display().to_string())
        .collect();
    let model = Chorus::new(config.chorus.clone(), base, assistants, device)?;
    run_loop(
        Loop {
            sources,
            tokenizer: &tokenizer,
            train: &train,
            valid: &valid,
            train_scores: train_scores.as_ref(),
            valid_scores: valid_scores.as_ref(),
            optim: &config.train,
            batch_size: config.data.batch_size,
            out,
            resume,
            gradient_hook: None,
            progress,
        },
        model,
        device,
    )
}

/// Sees (and may change) each step's accumulated gradients: `(step, gradients)`.
pub(crate) type GradientHook = dyn Fn(u64, &mut GradientsParams);

pub(crate) struct Loop<'a> {
    /// Where each model came from, saved in the checkpoints' manifests.
    pub(crate) sources: Vec<String>,
    pub(crate) tokenizer: &'a Tokenizer,
    pub(crate) train: &'a [Encoded],
    pub(crate) valid: &'a [Encoded],
    pub(crate) train_scores: Option<&'a ScoreCache>,
    pub(crate) valid_scores: Option<&'a ScoreCache>,
    pub(crate) optim: &'a OptimConfig,
    pub(crate) batch_size: usize,
    pub(crate) out: &'a Path,
    pub(crate) resume: bool,
    /// Called on each step's accumulated gradients before they are checked and clipped (tests
    /// inject non-finite gradients through it).
    pub(crate) gradient_hook: Option<&'a GradientHook>,
    /// Where progress goes.
    pub(crate) progress: &'a mut dyn Progress,
}

/// Appends metric rows to `<out>/metrics.jsonl` and `<out>/metrics.csv`.
struct Metrics {
    jsonl: PathBuf,
    csv: PathBuf,
}

const CSV_COLUMNS: [&str; 11] = [
    "step",
    "kind",
    "lr",
    "loss",
    "nll_per_token",
    "kl",
    "beta",
    "deferral",
    "grad_norm",
    "tokens_per_s",
    "valid_nll",
];

impl Metrics {
    /// Opens the files, keeping the rows up to step `keep_until` (a resumed run rewrites what
    /// followed its checkpoint). A line torn by a kill is dropped; the CSV is rebuilt from the
    /// JSONL; both are replaced atomically, so a kill here loses nothing.
    fn open(out: &Path, keep_until: u64) -> Result<Self, TrainError> {
        let m = Self {
            jsonl: out.join("metrics.jsonl"),
            csv: out.join("metrics.csv"),
        };
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&m.jsonl)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|row| row["step"].as_u64().is_some_and(|s| s <= keep_until))
            .collect();
        let jsonl: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let csv: String = std::iter::once(CSV_COLUMNS.join(","))
            .chain(rows.iter().map(csv_line))
            .map(|l| l + "\n")
            .collect();
        write_atomically(&m.jsonl, &jsonl)?;
        write_atomically(&m.csv, &csv)?;
        Ok(m)
    }

    fn write(&self, row: &serde_json::Value) -> Result<(), TrainError> {
        let append = |path: &Path, line: String| -> Result<(), TrainError> {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| TrainError::io(path, e))?;
            writeln!(f, "{line}").map_err(|e| TrainError::io(path, e))
        };
        append(&self.jsonl, row.to_string())?;
        append(&self.csv, csv_line(row))
    }
}

/// A metrics row as a CSV line of [`CSV_COLUMNS`].
fn csv_line(row: &serde_json::Value) -> String {
    CSV_COLUMNS
        .iter()
        .map(|c| match &row[*c] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, text: &str) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// The per-step seed: a fixed mix of the run's seed and the step.
fn step_seed(seed: u64, step: u64) -> u64 {
    let mut s = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    splitmix(&mut s)
}

/// The sums behind the next metrics row. Saved with each checkpoint, so that a resumed run logs
/// the same rows as an uninterrupted one (only `tokens_per_s`, a wall-clock rate, differs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct MetricWindow {
    /// Σ loss over micro-batches.
    pub loss: f64,
    /// Σ log p(x | z, c) over rows.
    pub log_px: f64,
    /// Σ KL over rows.
    pub kl: f64,
    /// Rows seen.
    pub rows: usize,
    /// Target tokens seen.
    pub tokens: usize,
    /// Σ posterior deferral over target tokens.
    pub deferral: f64,
    /// β at the last step.
    pub beta: f64,
    /// Σ gradient norm over steps.
    pub grad_norm: f64,
    /// Optimiser steps in the window.
    pub steps: u64,
    /// When this process started filling it (not saved).
    #[serde(skip)]
    started: Option<Instant>,
}

pub(crate) fn run_loop<B: AutodiffBackend>(
    l: Loop<'_>,
    mut model: Chorus<B>,
    device: &B::Device,
) -> Result<TrainSummary, TrainError> {
    let started = Instant::now();
    let cfg = l.optim;
    if l.train.is_empty() {
        return Err(TrainError::EmptyData("no training examples".into()));
    }
    std::fs::create_dir_all(l.out).map_err(|e| TrainError::io(l.out, e))?;
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(cfg.beta1 as f32)
        .with_beta_2(cfg.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(cfg.weight_decay as f32)
        .init::<B, Chorus<B>>();
    let (mut step, mut best, mut tokens_seen) = (0u64, None::<(u64, f64)>, 0u64);
    let mut last_good = None;
    let mut resumed_window = None;
    if l.resume {
        crate::checkpoint::recover_best(l.out)?;
        let dir = latest_checkpoint(l.out).ok_or_else(|| TrainError::Checkpoint {
            path: crate::checkpoint::checkpoints_dir(l.out),
            reason: "--resume: no checkpoint to resume from".into(),
        })?;
        let (loaded, state) = load_chorus::<B>(&dir, device)?;
        let m = &loaded.manifest;
        let same_models = m.base == model.base.config()
            && m.assistants
                == model
                    .assistants
                    .iter()
                    .map(|a| a.config())
                    .collect::<Vec<_>>()
            && m.chorus == model.config
            && m.sources == l.sources;
        if !same_models {
            return Err(TrainError::Checkpoint {
                path: dir,
                reason:
                    "--resume: the checkpoint's models or chorus settings differ from the config"
                        .into(),
            });
        }
        if state.seed != cfg.seed {
            return Err(TrainError::Checkpoint {
                path: dir,
                reason: format!(
                    "--resume: written with seed {} but the config says {} (resuming would not be exact)",
                    state.seed, cfg.seed
                ),
            });
        }
        optimizer = load_optimizer(&dir, optimizer, device)?;
        model = loaded.model;
        (step, best, tokens_seen) = (state.step, state.best, state.tokens_seen);
        resumed_window = Some(state.window);
        last_good = Some(dir);
    }
    let first_step = step;
    let metrics = Metrics::open(l.out, step)?;
    let lengths: Vec<usize> = l.train.iter().map(Encoded::input_len).collect();
    let mut epoch_cache: Option<(u64, Vec<Vec<usize>>)> = None;
    let n_batches = lengths.len().div_ceil(l.batch_size) as u64;
    let progress = l.progress;
    progress.begin("train", cfg.steps, step);
    progress.line(
        &format!(
            "training {} parameters ({} trainable) on {} examples ({} batches of {}), {} valid examples; out {}",
            model.num_params(),
            trainable_params(&model),
            l.train.len(),
            n_batches,
            l.batch_size,
            l.valid.len(),
            l.out.display()
        ),
    );
    let mut window = resumed_window.unwrap_or_default();
    let accum = cfg.accumulation as u64;
    let mut last_checkpoint = last_good.clone().unwrap_or_default();
    while step < cfg.steps {
        window.started.get_or_insert_with(Instant::now);
        B::seed(device, step_seed(cfg.seed, step));
        let lr = learning_rate(cfg, step);
        let selector_phase = step < cfg.selector_init_steps;
        let mut accumulator = GradientsAccumulator::<Chorus<B>>::new();
        let mut step_tokens = 0usize;
        for a in 0..accum {
            let m = step * accum + a;
            let (epoch, index) = (m / n_batches, (m % n_batches) as usize);
            if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_cache = Some((
                    epoch,
                    epoch_batches(&lengths, l.batch_size, cfg.seed, epoch),
                ));
            }
            let ids = &epoch_cache.as_ref().expect("just set").1[index];
            let refs: Vec<&Encoded> = ids.iter().map(|&i| &l.train[i]).collect();
            let mut host = TokenBatch::new(&refs);
            if let Some(scores) = l.train_scores {
                host = host.with_scores(scores, ids)?;
            }
            let batch = host.to_device::<B>(device);
            let loss = if selector_phase {
                let (loss, share) = model.selector_pseudo_label_loss(&batch)?;
                window.deferral += share * host.n_targets() as f64;
                loss
            } else {
                let beta = model.config.kl_schedule.beta(step);
                let out = model.forward_elbo(&batch, beta)?;
                window.deferral +=
                    posterior_deferral(out.router.clone(), batch.target_mask.clone())
                        .into_scalar()
                        .elem::<f64>();
                window.log_px += out.terms.reconstruction.sum().into_scalar().elem::<f64>();
                window.kl += out.terms.kl.sum().into_scalar().elem::<f64>();
                window.beta = out.terms.beta;
                out.terms.loss
            };
            let value = loss.clone().into_scalar().elem::<f64>();
            if !value.is_finite() {
                progress.end(false);
                return Err(TrainError::NonFinite {
                    step,
                    what: format!("loss ({value})"),
                    last_good,
                });
            }
            window.loss += value;
            window.rows += host.rows;
            window.tokens += host.n_targets();
            step_tokens += host.n_targets();
            let grads = loss.div_scalar(accum as f64).backward();
            accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let mut grads = accumulator.grads();
        if let Some(hook) = l.gradient_hook {
            hook(step, &mut grads);
        }
        let norm = clip_global_norm(&model, &mut grads, cfg.grad_clip);
        if !norm.is_finite() {
            progress.end(false);
            return Err(TrainError::NonFinite {
                step,
                what: format!("gradient norm ({norm})"),
                last_good,
            });
        }
        model = optimizer.step(lr, model, grads);
        step += 1;
        tokens_seen += step_tokens as u64;
        window.grad_norm += norm;
        window.steps += 1;
        progress.update(step, "");

        let last = step == cfg.steps;
        if step % cfg.log_every == 0 || last {
            let secs = window.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
            let tokens = window.tokens.max(1) as f64;
            let batches = (window.steps * accum) as f64;
            let row = serde_json::json!({
                "step": step,
                "kind": if selector_phase { "selector_init" } else { "train" },
                "lr": lr,
                "loss": window.loss / batches,
                "nll_per_token": (!selector_phase).then(|| -window.log_px / tokens),
                "kl": (!selector_phase).then(|| window.kl / window.rows.max(1) as f64),
                "beta": (!selector_phase).then_some(window.beta),
                "deferral": window.deferral / tokens,
                "grad_norm": window.grad_norm / window.steps as f64,
                "tokens_per_s": window.tokens as f64 / secs.max(1e-9),
            });
            metrics.write(&row)?;
            let msg = if selector_phase {
                format!(
                    "selector-init loss {:.3} | pseudo-labels to assistants {:.1}% | {:.0} tok/s",
                    window.loss / batches,
                    100.0 * window.deferral / tokens,
                    window.tokens as f64 / secs.max(1e-9)
                )
            } else {
                format!(
                    "loss {:.3} | nll/tok {:.3} | KL {:.2} | β {:.2} | defer {:.1}% | {:.0} tok/s",
                    window.loss / batches,
                    -window.log_px / tokens,
                    window.kl / window.rows.max(1) as f64,
                    window.beta,
                    100.0 * window.deferral / tokens,
                    window.tokens as f64 / secs.max(1e-9)
                )
            };
            progress.update(step, &msg);
            window = MetricWindow::default();
        }

        let validate = last || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
        let mut valid_nll = None;
        if validate && !l.valid.is_empty() {
            let inner = model.valid();
            let rows = evaluate_chorus(
                &inner,
                "valid",
                l.valid,
                l.valid_scores,
                cfg.iw_samples,
                l.batch_size,
                device,
            )?;
            let tokens: usize = rows.iter().map(|r| r.tokens).sum();
            let nll =
                rows.iter().map(|r| r.nll * r.tokens as f64).sum::<f64>() / tokens.max(1) as f64;
            if !nll.is_finite() {
                progress.end(false);
                return Err(TrainError::NonFinite {
                    step,
                    what: format!("validation NLL ({nll})"),
                    last_good,
                });
            }
            valid_nll = Some(nll);
            let per_task: Vec<String> = rows
                .iter()
                .map(|r| format!("{} {:.3}", r.task, r.nll))
                .collect();
            progress.line(&format!(
                "step {step}: valid NLL/token {nll:.4} (PPL {:.2}; {}){}",
                nll.exp(),
                per_task.join(", "),
                match best {
                    Some((_, b)) if nll < b => " — new best",
                    None => " — new best",
                    _ => "",
                }
            ));
            metrics.write(&serde_json::json!({
                "step": step,
                "kind": "valid",
                "valid_nll": nll,
                "tasks": rows,
            }))?;
        }
        let is_best = valid_nll.is_some_and(|v| best.is_none_or(|(_, b)| v < b));
        if is_best {
            best = Some((step, valid_nll.expect("checked")));
        }
        if is_best || last || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) {
            let state = CheckpointState {
                step,
                total_steps: cfg.steps,
                seed: cfg.seed,
                tokens_seen,
                valid_nll,
                best,
                window: window.clone(),
                files: Default::default(),
            };
            let dir = save_checkpoint(
                l.out,
                &model,
                &optimizer,
                &l.sources,
                l.tokenizer,
                state,
                cfg.keep_last,
            )?;
            if is_best {
                update_best(l.out, &dir)?;
            }
            last_good = Some(dir.clone());
            last_checkpoint = dir;
        }
    }
    progress.end(true);
    let best_dir = crate::best_dir(l.out);
    let model_dir = if best_dir.is_dir() {
        best_dir
    } else {
        last_checkpoint.clone()
    };
    let summary = TrainSummary {
        steps: step,
        steps_run: step - first_step,
        last_checkpoint,
        model: model_dir,
        best_valid_nll: best,
        tokens_seen,
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::write(
        l.out.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("serializes"),
    )
    .map_err(|e| TrainError::io(l.out.join("summary.json"), e))?;
    Ok(summary)
}

fn trainable_params<B: AutodiffBackend>(model: &Chorus<B>) -> usize {
    struct Count(usize);
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                self.0 += param.shape().num_elements();
            }
        }
    }
    let mut c = Count(0);
    model.visit(&mut c);
    c.0
}
