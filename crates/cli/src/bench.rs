//! `chorus bench-step`: tokens/s of one training step (forward, loss, backward, AdamW) at a fixed
//! shape — one LM's cross-entropy, or with `--joint` the joint model's ELBO — for `cargo xtask
//! bench` to set beside its PyTorch twin (`benches/twin/train_step.py`, same shapes, loss and
//! optimiser).

use std::time::Instant;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_lm::{LlamaConfig, Lm, LmConfig, LmInput};
use chorus_model::{Assistant, Chorus, ChorusBatch, ChorusConfig, LocalLm, ScoreRows};
use chorus_train::AdamW;
use clap::ValueEnum;
use serde::Serialize;

/// The model shapes the bench knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    /// llama d 256 × 4 layers, 8 heads / 4 kv heads, d_ff 688, vocab 4096 (the `lm_step` bench).
    Small,
    /// SmolLM2-135M: d 576 × 30 layers, 9 heads / 3 kv heads, d_ff 1536, vocab 49,152, tied.
    Smollm2,
}

impl Shape {
    fn config(self, seq: usize) -> LlamaConfig {
        let (vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff) = match self {
            Shape::Small => (4096, 256, 4, 8, 4, 688),
            Shape::Smollm2 => (49_152, 576, 30, 9, 3, 1536),
        };
        LlamaConfig {
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            d_ff,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            max_seq_len: seq,
        }
    }
}

/// Which joint-model step `--joint` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Joint {
    /// Base + 2 frozen assistants whose log-probs are given (Co-LLM's scoring step); no assistant
    /// adapters.
    Cached,
    /// Base + 2 frozen assistants run in the step, each reading z through its adapter.
    Live,
}

#[derive(Debug, Serialize)]
struct Report {
    system: &'static str,
    joint: Option<Joint>,
    shape: String,
    batch: usize,
    seq: usize,
    steps: usize,
    /// The two warm-up steps: on burn-cuda and wgpu they include compiling and autotuning kernels.
    warm_up_s: f64,
    seconds_per_step: f64,
    tokens_per_s: f64,
    peak_rss_mb: f64,
}

type A<B> = Autodiff<B>;

/// Runs two warm-up steps and `steps` timed steps; prints a JSON line.
pub fn run<B: Backend>(
    shape: Shape,
    joint: Option<Joint>,
    batch: usize,
    seq: usize,
    steps: usize,
    device: &B::Device,
) -> Result<()> {
    A::<B>::seed(device, 0);
    let data = Tensor::<A<B>, 2>::random(
        [batch, seq + 1],
        Distribution::Uniform(0.0, shape.config(seq).vocab_size as f64),
        device,
    )
    .int();
    let (warm_up_s, seconds) = match joint {
        None => time_lm_steps::<B>(shape, data, steps, device)?,
        Some(joint) => time_joint_steps::<B>(shape, joint, data, steps, device)?,
    };
    let report = Report {
        system: "chorus",
        joint,
        shape: format!("{shape:?}").to_lowercase(),
        batch,
        seq,
        steps,
        warm_up_s,
        seconds_per_step: seconds,
        tokens_per_s: (batch * seq) as f64 / seconds,
        peak_rss_mb: crate::reference::peak_rss_mb(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The warm-up and per-step seconds of one LM's training step: cross-entropy over every
/// position, AdamW.
fn time_lm_steps<B: Backend>(
    shape: Shape,
    data: Tensor<A<B>, 2, Int>,
    steps: usize,
    device: &B::Device,
) -> Result<(f64, f64)> {
    let [batch, seq] = data.dims();
    let seq = seq - 1;
    let config = shape.config(seq);
    let vocab = config.vocab_size;
    let model: Lm<A<B>> = LmConfig::Llama(config).init(device)?;
    let optimizer = AdamW {
        weight_decay: 0.1,
        ..AdamW::default()
    }
    .init::<A<B>, Lm<A<B>>>();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let inputs = data.clone().narrow(1, 0, seq);
    let targets = data.narrow(1, 1, seq).reshape([batch * seq]);
    time_steps(model, optimizer, steps, device, |model| {
        let logits = model
            .forward(LmInput::new(inputs.clone()), None)?
            .logits
            .reshape([batch * seq, vocab]);
        Ok(loss_fn.forward(logits, targets.clone()))
    })
}

/// The warm-up and per-step seconds of the joint ELBO (`Chorus::forward_elbo`, default
/// `ChorusConfig`: z of 32 dims, conditional prior, one memory slot and an embedding offset per
/// model) over a base and two frozen assistants of the shape; the first quarter of each row is
/// context.
fn time_joint_steps<B: Backend>(
    shape: Shape,
    joint: Joint,
    data: Tensor<A<B>, 2, Int>,
    steps: usize,
    device: &B::Device,
) -> Result<(f64, f64)> {
    let [batch, seq] = data.dims();
    let seq = seq - 1;
    let lm = LmConfig::Llama(shape.config(seq));
    let config = ChorusConfig {
        assistant_adapters: joint == Joint::Live,
        ..ChorusConfig::default()
    };
    let assistants = vec![lm.init(device)?, lm.init(device)?];
    let model = Chorus::new(config, lm.init(device)?, assistants, device)?;
    let optimizer = AdamW {
        weight_decay: 0.1,
        ..AdamW::default()
    }
    .init::<A<B>, Chorus<A<B>>>();
    let position = Tensor::<A<B>, 1, Int>::arange(0..seq as i64, device)
        .float()
        .unsqueeze_dim::<2>(0)
        .repeat_dim(0, batch);
    let context = seq / 4;
    let chorus_batch = ChorusBatch {
        tokens: data.clone().narrow(1, 0, seq),
        targets: data.narrow(1, 1, seq),
        target_mask: position
            .clone()
            .greater_equal_elem((context - 1) as f64)
            .float(),
        context_mask: position.lower_elem(context as f64).float(),
        padding: Tensor::from_data(
            TensorData::new(vec![false; batch * seq], [batch, seq]),
            device,
        ),
        assistant_log_probs: (joint == Joint::Cached)
            .then(|| Tensor::random([batch, seq, 2], Distribution::Uniform(-10.0, 0.0), device)),
    };
    time_steps(model, optimizer, steps, device, |model| {
        Ok(model.forward_elbo(&chorus_batch, 1.0)?.terms.loss)
    })
}

/// Two warm-up steps (allocations, lazy initialisation, kernel compilation and autotuning on GPU
/// backends; AdamW's first step has no moments yet, its second has), then `steps` timed steps of
/// `loss → backward → AdamW (lr 1e-4)`; the seconds of the warm-up and per timed step.
fn time_steps<B: Backend, M, O>(
    mut model: M,
    mut optimizer: O,
    steps: usize,
    device: &B::Device,
    loss: impl Fn(&M) -> Result<Tensor<A<B>, 1>>,
) -> Result<(f64, f64)>
where
    M: burn::module::AutodiffModule<A<B>>,
    O: Optimizer<M, A<B>>,
{
    let mut step = |model: M| -> Result<M> {
        let grads = GradientsParams::from_grads(loss(&model)?.backward(), &model);
        Ok(optimizer.step(1e-4, model, grads))
    };
    let warm_up = Instant::now();
    for _ in 0..2 {
        model = step(model)?;
    }
    let _ = B::sync(device);
    let warm_up_s = warm_up.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..steps {
        model = step(model)?;
    }
    // Wait for the device before stopping the clock.
    let _ = B::sync(device);
    Ok((warm_up_s, started.elapsed().as_secs_f64() / steps as f64))
}

/// The token at row `r`, position `t` of the scoring workload: a fixed pattern that
/// `benches/twin/score.py` reproduces, so chorus and its peers score the same ids.
pub fn score_token(r: usize, t: usize, vocab: usize) -> u32 {
    ((r * 7919 + t * 104_729 + 13) % vocab) as u32
}

#[derive(Debug, Serialize)]
struct ScoreReport {
    system: &'static str,
    batch: usize,
    seq: usize,
    repeats: usize,
    /// The warm-up pass: on burn-cuda and wgpu it includes compiling and autotuning kernels.
    first_pass_s: f64,
    seconds: f64,
    tokens_per_s: f64,
    nll_per_token: f64,
    peak_rss_mb: f64,
}

/// The weights `chorus bench-score` scores with.
#[derive(Debug, Clone, Copy)]
pub enum ScoreWeights<'a> {
    /// A GGUF file, loaded as `chorus score` loads it.
    Gguf(&'a std::path::Path),
    /// Random f32 weights of a shape.
    Random(Shape),
}

/// `chorus bench-score`: [`score_report`] as a JSON line.
pub fn score<B: Backend>(
    weights: ScoreWeights,
    batch: usize,
    seq: usize,
    repeats: usize,
    device: &B::Device,
) -> Result<()> {
    let report = score_report::<B>(weights, batch, seq, repeats, device)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Scores `batch` rows of `seq + 1` tokens ([`score_token`]) with a GGUF model (or random weights
/// of a shape, seeded: the same in every run) — one batched forward and the log-probs of the given
/// next tokens through [`Assistant::token_log_probs`], the call `chorus score` and `chorus eval`
/// make (`logits[x_t] − logsumexp_v logits[v]`, no `[batch, seq, vocab]` log-softmax) —
/// `repeats` times after one warm-up: the scored tokens/s and the mean NLL (for a GGUF, equal
/// across peers up to rounding: a check that they do the same work).
fn score_report<B: Backend>(
    weights: ScoreWeights,
    batch: usize,
    seq: usize,
    repeats: usize,
    device: &B::Device,
) -> Result<ScoreReport> {
    let model = match weights {
        ScoreWeights::Gguf(path) => Lm::<B>::from_gguf(&chorus_lm::GgufFile::open(path)?, device)?,
        ScoreWeights::Random(shape) => {
            B::seed(device, 0);
            LmConfig::Llama(shape.config(seq)).init(device)?
        }
    };
    let vocab = model.dims().vocab_size;
    let ids: Vec<i64> = (0..batch)
        .flat_map(|r| (0..=seq).map(move |t| i64::from(score_token(r, t, vocab))))
        .collect();
    let rows = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq + 1]), device);
    let rows = ScoreRows {
        tokens: rows.clone().narrow(1, 0, seq),
        targets: rows.narrow(1, 1, seq),
        padding: Tensor::from_data(
            TensorData::new(vec![false; batch * seq], [batch, seq]),
            device,
        ),
    };
    let scorer = LocalLm::new(&model);
    let pass = || -> Result<f64> {
        let log_probs = scorer.token_log_probs(&rows, None)?;
        Ok(-log_probs.sum().into_scalar().elem::<f64>())
    };
    let warm_up = Instant::now();
    pass()?; // reads its result back: the device is done
    let first_pass_s = warm_up.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut nll = 0.0;
    for _ in 0..repeats {
        nll = pass()?;
    }
    let seconds = started.elapsed().as_secs_f64() / repeats as f64;
    Ok(ScoreReport {
        system: "chorus",
        batch,
        seq,
        repeats,
        first_pass_s,
        seconds,
        tokens_per_s: (batch * seq) as f64 / seconds,
        nll_per_token: nll / (batch * seq) as f64,
        peak_rss_mb: crate::reference::peak_rss_mb(),
    })
}

/// What `chorus bench-rows` prints.
#[derive(Serialize)]
struct RowsReport {
    system: &'static str,
    context: usize,
    repeats: usize,
    /// Per row count: the median seconds of one step.
    steps: Vec<RowsStep>,
    /// Weights of the transformer blocks (`blk.*` matrices): the multiply-adds of every row.
    block_weights: u64,
    /// Weights of the output layer: the multiply-adds of the one row whose logits a step makes.
    output_weights: u64,
    /// The CPU's f32 multiply-add rate on the team's threads ([`chorus_lm::multiply_add_gflops`]):
    /// a step of n rows takes at least `2 (n · block_weights + output_weights) / rate`.
    multiply_add_gflops: f64,
    /// Per pause length (`--pause-ms`): one-row decoding steps with the decoding thread asleep
    /// that long before every [`PAUSE_EVERY`]th step, as a lazy assistant's catch-up holds the
    /// base back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    steps_with_pauses: Vec<PausedSteps>,
}

#[derive(Serialize)]
struct RowsStep {
    rows: usize,
    seconds: f64,
}

/// One-row steps decoded with pauses: the median step, and the median of the steps `k` after a
/// pause (`after_pause[k]`, k < [`PAUSE_EVERY`]).
#[derive(Serialize)]
struct PausedSteps {
    pause_ms: f64,
    every: usize,
    seconds: f64,
    after_pause: Vec<f64>,
}

/// Steps between pauses in `chorus bench-rows --pause-ms`: about the gap between a lazy
/// assistant's catch-ups at the bench's 17 % deferral.
const PAUSE_EVERY: usize = 6;

/// One-row steps per pause length in `chorus bench-rows --pause-ms`.
const PAUSED_STEPS: usize = 96;

/// `chorus bench-rows`: for each row count `n` in `rows`, `repeats` times: a fresh cache takes
/// `context` tokens, then one step of `n` more (the logits of the last only, as decoding asks
/// for) is timed; prints a JSON line with each count's median step time, the model's weights
/// and the CPU's f32 multiply-add rate (the compute floor of a step). A step of one row is
/// single-stream decoding; more rows are a lazy assistant's catch-up, whose cost beyond one row
/// decides how collaborative decoding compares with decoding alone (docs/performance.md).
///
/// For each length in `pauses_ms`, a fresh cache takes `context` tokens, then [`PAUSED_STEPS`]
/// one-row steps are timed, the thread sleeping that long before every [`PAUSE_EVERY`]th:
/// whether a step is slower after the base was held back, whatever held it.
pub fn rows<B: Backend>(
    gguf: &std::path::Path,
    context: usize,
    rows: &[usize],
    repeats: usize,
    pauses_ms: &[f64],
    from_blocks: bool,
    device: &B::Device,
) -> Result<()> {
    if let Some(bad) = pauses_ms.iter().find(|p| !(p.is_finite() && **p >= 0.0)) {
        anyhow::bail!("--pause-ms {bad}: a pause is a finite number of milliseconds ≥ 0");
    }
    let file = chorus_lm::GgufFile::open(gguf)?;
    let model = if from_blocks {
        Lm::<B>::from_gguf_for_decoding(&file, device)?
    } else {
        Lm::<B>::from_gguf(&file, device)?
    };
    let vocab = model.dims().vocab_size;
    let tokens = |start: usize, n: usize| {
        let ids: Vec<i64> = (start..start + n)
            .map(|t| i64::from(score_token(0, t, vocab)))
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device)
    };
    // A fresh cache holding `context` tokens.
    let prefilled = || -> Result<_> {
        let mut cache = model.new_cache();
        if context > 0 {
            model.forward(
                LmInput::new(tokens(0, context)).with_last_logits_only(),
                Some(&mut cache),
            )?;
        }
        Ok(cache)
    };
    // Seconds of one step of `n` tokens from position `start` (the last one's logits, to the host).
    let timed_step = |cache: &mut _, start: usize, n: usize| -> Result<f64> {
        let started = Instant::now();
        let logits = model
            .forward(
                LmInput::new(tokens(start, n)).with_last_logits_only(),
                Some(cache),
            )?
            .logits;
        logits.into_data();
        Ok(started.elapsed().as_secs_f64())
    };
    let median = |mut seconds: Vec<f64>| {
        seconds.sort_by(f64::total_cmp);
        seconds.get(seconds.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut steps = Vec::with_capacity(rows.len());
    for &n in rows {
        let mut seconds = Vec::with_capacity(repeats);
        // One untimed round first (warm-up), then the timed ones.
        for round in 0..=repeats {
            let step = timed_step(&mut prefilled()?, context, n)?;
            if round > 0 {
                seconds.push(step);
            }
        }
        steps.push(RowsStep {
            rows: n,
            seconds: median(seconds),
        });
    }
    let mut steps_with_pauses = Vec::with_capacity(pauses_ms.len());
    for &pause_ms in pauses_ms {
        let mut cache = prefilled()?;
        // (steps since the last pause, seconds) of each timed step.
        let mut timed = Vec::with_capacity(PAUSED_STEPS);
        for i in 0..PAUSED_STEPS {
            if i % PAUSE_EVERY == 0 && pause_ms > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(pause_ms / 1e3));
            }
            timed.push((i % PAUSE_EVERY, timed_step(&mut cache, context + i, 1)?));
        }
        steps_with_pauses.push(PausedSteps {
            pause_ms,
            every: PAUSE_EVERY,
            seconds: median(timed.iter().map(|t| t.1).collect()),
            after_pause: (0..PAUSE_EVERY)
                .map(|k| median(timed.iter().filter(|t| t.0 == k).map(|t| t.1).collect()))
                .collect(),
        });
    }
    let weights = |keep: &dyn Fn(&str) -> bool| -> u64 {
        file.tensors
            .iter()
            .filter(|t| t.dims.len() == 2 && keep(&t.name))
            .map(|t| t.n_elements())
            .sum()
    };
    let output = if file.tensor_info("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let report = RowsReport {
        system: "chorus",
        context,
        repeats,
        steps,
        block_weights: weights(&|name| name.starts_with("blk.")),
        output_weights: weights(&|name| name == output),
        multiply_add_gflops: chorus_lm::multiply_add_gflops(),
        steps_with_pauses,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn random_weights_score_the_same_in_every_run() {
        let device = Default::default();
        let score = || {
            score_report::<NdArray<f32>>(ScoreWeights::Random(Shape::Small), 2, 8, 1, &device)
                .unwrap()
                .nll_per_token
        };
        let (first, second) = (score(), score());
        // Random weights near zero give nearly uniform predictions: ≈ ln(vocab) nats.
        assert!((first - (4096f64).ln()).abs() < 0.5, "{first}");
        assert_eq!(first, second);
    }
}
