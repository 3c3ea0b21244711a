//! `pretrain` and `train`: the optimisation loop shared by both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use chorus_data::Split;
use chorus_lm::{Lm, Tokenizer};
use chorus_model::{Assistant, Chorus, ChorusConfig, LocalLm, RemoteAssistant, RemoteSettings};
use serde::Serialize;

use crate::adamw::AdamW;
use crate::checkpoint::{CheckpointState, load_chorus, resume, save_checkpoint, update_best};
use crate::metrics::{MetricWindow, Metrics};
use crate::progress::Progress;
use crate::scores::fingerprint;
use crate::step::{GradientHook, Objective, StepSettings, optimiser_step};
use crate::{
    AssistantScores, DataConfig, Encoded, EvalSet, OptimConfig, PretrainConfig, ScoreCache, Silent,
    TokenBatch, TrainConfig, TrainError, encode_examples, epoch_batches, evaluate_chorus,
    learning_rate, load_task_examples,
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
    B::seed(device, config.train.seed);
    let (base, source) = match &config.init {
        None => (config.model.init::<B>(device)?, "scratch".to_string()),
        Some(path) => {
            let lm = Lm::<B>::open(path, device)?;
            if lm.config() != config.model {
                return Err(TrainError::Config {
                    file: "init".into(),
                    reason: format!(
                        "{} has the config {:?}, which differs from [model] {:?}: continued \
                         pre-training keeps the architecture",
                        path.display(),
                        lm.config(),
                        config.model
                    ),
                });
            }
            (lm, path.display().to_string())
        }
    };
    let (train, valid) = prepare_data(&config.data, &tokenizer)?;
    let chorus_config = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let sources = vec![source];
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
pub(crate) fn model_identity(path: &Path) -> Result<String, TrainError> {
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

/// A train config's models: the shared tokenizer, the base, the local assistants and the
/// assistants behind servers (connected, their tokenization checked).
pub(crate) struct Models<B: Backend> {
    pub(crate) tokenizer: Tokenizer,
    pub(crate) base: Lm<B>,
    pub(crate) assistants: Vec<Lm<B>>,
    pub(crate) remotes: Vec<RemoteAssistant>,
    /// Where the local assistants came from.
    local_paths: Vec<PathBuf>,
}

impl<B: Backend> Models<B> {
    /// What a score cache records of each assistant ([`assistant_identities`]); hashes every
    /// local assistant's weights, so only asked for when a cache is written or read.
    pub(crate) fn identities(&self) -> Result<Vec<String>, TrainError> {
        assistant_identities::<B>(&self.local_paths, &self.remotes)
    }
}

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
    let (servers, locals): (Vec<&PathBuf>, Vec<&PathBuf>) = config
        .assistants
        .iter()
        .partition(|p| chorus_model::is_server_url(p));
    let assistants = locals
        .iter()
        .enumerate()
        .map(|(i, p)| open(p, &format!("assistant {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    // Before any data is read: every model must share the base's vocabulary.
    let vocab = base.dims().vocab_size;
    for (a, path) in assistants.iter().zip(&locals) {
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
    let remotes = servers
        .iter()
        .map(|url| {
            let url = url.display().to_string();
            RemoteAssistant::connect(&url, &tokenizer, RemoteSettings::default())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Models {
        tokenizer,
        base,
        assistants,
        remotes,
        local_paths: locals.into_iter().cloned().collect(),
    })
}

/// What a score cache records of each assistant: the sha256 of a local model's weights, the URL
/// and served model of a remote one.
fn assistant_identities<B: Backend>(
    local: &[PathBuf],
    remotes: &[RemoteAssistant],
) -> Result<Vec<String>, TrainError> {
    let mut ids = local
        .iter()
        .map(|p| model_identity(p))
        .collect::<Result<Vec<_>, _>>()?;
    ids.extend(
        remotes
            .iter()
            .map(|r| format!("remote {}", Assistant::<B>::describe(r))),
    );
    Ok(ids)
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
        let models = open_models::<B>(config, device)?;
        let ids = models.identities()?;
        (models.tokenizer, models.assistants, models.remotes, ids)
    } else {
        let tokenizer = Tokenizer::open(&config.tokenizer)?;
        let remotes = remotes
            .iter()
            .map(|url| RemoteAssistant::connect(url, &tokenizer, RemoteSettings::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = assistant_identities::<B>(&[], &remotes)?;
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
    let models = open_models::<B>(config, device)?;
    let (train, valid) = prepare_data(&config.data, &models.tokenizer)?;
    let (train_scores, valid_scores) = match &config.scores {
        Some(dir) => {
            let identities = models.identities()?;
            let (fp_train, fp_valid) = (
                fingerprint(&train, &identities),
                fingerprint(&valid, &identities),
            );
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
    let chorus = ChorusConfig {
        remote_assistants: models.remotes.len(),
        ..config.chorus.clone()
    };
    let Models {
        tokenizer,
        base,
        assistants,
        ..
    } = models;
    let model = Chorus::new(chorus, base, assistants, device)?;
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

/// The per-step seed: a fixed mix of the run's seed and the step.
pub(crate) fn step_seed(seed: u64, step: u64) -> u64 {
    chorus_data::rng::SplitMix64(seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// The loop: resume (if asked), then per step the micro-batches of the epoch's order, one
/// [`optimiser_step`], the metrics row every `log_every` steps, validation every `eval_every`,
/// and a checkpoint every `checkpoint_every` (and at a new best and at the end).
pub(crate) fn run_loop<B: AutodiffBackend>(
    l: Loop<'_>,
    mut model: Chorus<B>,
    device: &B::Device,
) -> Result<TrainSummary, TrainError> {
    let started = Instant::now();
    let cfg = l.optim;
    if l.train.is_empty() {
        return Err(TrainError::EmptyData {
            data: "training examples".into(),
            reason: "none after tokenisation".into(),
        });
    }
    std::fs::create_dir_all(l.out).map_err(|e| TrainError::io(l.out, e))?;
    let mut optimizer = AdamW {
        beta_1: cfg.beta1 as f32,
        beta_2: cfg.beta2 as f32,
        epsilon: cfg.epsilon as f32,
        weight_decay: cfg.weight_decay as f32,
    }
    .init::<B, Chorus<B>>();
    let (mut step, mut best, mut tokens_seen) = (0u64, None::<(u64, f64)>, 0u64);
    let mut window = MetricWindow::default();
    let mut last_good = None;
    if l.resume {
        let resumed = resume(l.out, &l.sources, &model, optimizer, cfg.seed, device)?;
        (model, optimizer) = (resumed.model, resumed.optimizer);
        let state = resumed.state;
        (step, best, tokens_seen, window) =
            (state.step, state.best, state.tokens_seen, state.window);
        last_good = Some(resumed.dir);
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
    let accum = cfg.accumulation as u64;
    let mut last_checkpoint = last_good.clone().unwrap_or_default();
    while step < cfg.steps {
        window.started.get_or_insert_with(Instant::now);
        B::seed(device, step_seed(cfg.seed, step));
        let selector_phase = step < cfg.selector_init_steps;
        let settings = StepSettings {
            step,
            lr: learning_rate(cfg, step),
            selector_lr_scale: cfg.selector_lr_scale,
            grad_clip: cfg.grad_clip,
            objective: if selector_phase {
                Objective::SelectorInit
            } else {
                Objective::Elbo {
                    beta: cfg.kl_schedule.beta(step),
                }
            },
            gradient_hook: l.gradient_hook,
        };
        // Micro-batch m of the run is batch m mod n of epoch m div n (each epoch its own order).
        let mut micro_batches = Vec::with_capacity(cfg.accumulation);
        for m in step * accum..(step + 1) * accum {
            let (epoch, index) = (m / n_batches, (m % n_batches) as usize);
            if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let order = epoch_batches(&lengths, l.batch_size, cfg.seed, epoch);
                epoch_cache = Some((epoch, order));
            }
            let ids = &epoch_cache.as_ref().expect("just set").1[index];
            let rows: Vec<&Encoded> = ids.iter().map(|&i| &l.train[i]).collect();
            let mut host = TokenBatch::new(&rows);
            if let Some(scores) = l.train_scores {
                host = host.with_scores(scores, ids)?;
            }
            micro_batches.push(host);
        }
        model = match optimiser_step(
            model,
            &mut optimizer,
            &micro_batches,
            &settings,
            &mut window,
            device,
        ) {
            Ok(model) => model,
            Err(e) => {
                progress.end(false);
                return Err(e.with_last_good(last_good));
            }
        };
        step += 1;
        tokens_seen += micro_batches
            .iter()
            .map(|b| b.n_targets() as u64)
            .sum::<u64>();
        progress.update(step, "");

        let last = step == cfg.steps;
        if step % cfg.log_every == 0 || last {
            let (row, line) = window.row(step, settings.lr, selector_phase, accum);
            metrics.write(&row)?;
            progress.update(step, &line);
            window = MetricWindow::default();
        }

        let validate = last || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
        let mut valid_nll = None;
        if validate && !l.valid.is_empty() {
            let set = EvalSet {
                data: l.valid,
                batch_size: l.batch_size,
                device,
            };
            // The run's own bar stays; validation reports through its lines below.
            let rows = evaluate_chorus(
                &model.valid(),
                "valid",
                &set,
                l.valid_scores
                    .map_or(AssistantScores::Local, AssistantScores::Cache),
                cfg.iw_samples,
                &mut Silent,
                None,
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
            let new_best = best.is_none_or(|(_, b)| nll < b);
            progress.line(&format!(
                "step {step}: valid NLL/token {nll:.4} (PPL {:.2}; {}){}",
                nll.exp(),
                per_task.join(", "),
                if new_best { " — new best" } else { "" }
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

/// Elements of the parameters that receive gradients (the frozen models' are left out).
pub(crate) fn trainable_params<B: AutodiffBackend>(model: &Chorus<B>) -> usize {
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
