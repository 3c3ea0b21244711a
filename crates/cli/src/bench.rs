//! `chorus bench-step`: tokens/s of one LM's training step (forward, cross-entropy, backward,
//! AdamW) at a fixed shape, for `cargo xtask bench` to set beside its PyTorch twin
//! (`benches/twin/train_step.py`, same shapes, loss and optimiser).

use std::time::Instant;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_lm::{LlamaConfig, Lm, LmConfig, LmInput};
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

#[derive(Debug, Serialize)]
struct Report {
    system: &'static str,
    shape: String,
    batch: usize,
    seq: usize,
    steps: usize,
    seconds_per_step: f64,
    tokens_per_s: f64,
    peak_rss_mb: f64,
}

/// Runs one warm-up step and `steps` timed steps; prints a JSON line.
pub fn run<B: Backend>(
    shape: Shape,
    batch: usize,
    seq: usize,
    steps: usize,
    device: &B::Device,
) -> Result<()> {
    type A<B> = Autodiff<B>;
    let config = shape.config(seq);
    let vocab = config.vocab_size;
    A::<B>::seed(device, 0);
    let mut model: Lm<A<B>> = LmConfig::Llama(config).init(device)?;
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(0.1)
        .init::<A<B>, Lm<A<B>>>();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let data = Tensor::<A<B>, 2>::random(
        [batch, seq + 1],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int();
    let inputs = data.clone().narrow(1, 0, seq);
    let targets = data.narrow(1, 1, seq).reshape([batch * seq]);
    let mut step = |model: Lm<A<B>>| -> Result<Lm<A<B>>> {
        let logits = model
            .forward(LmInput::new(inputs.clone()), None)?
            .logits
            .reshape([batch * seq, vocab]);
        let loss = loss_fn.forward(logits, targets.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        Ok(optimizer.step(1e-4, model, grads))
    };
    model = step(model)?; // warm-up (allocations, lazy initialisation)
    let started = Instant::now();
    for _ in 0..steps {
        model = step(model)?;
    }
    // Wait for the device before stopping the clock.
    let _ = B::sync(device);
    let seconds = started.elapsed().as_secs_f64() / steps.max(1) as f64;
    let report = Report {
        system: "chorus",
        shape: format!("{shape:?}").to_lowercase(),
        batch,
        seq,
        steps,
        seconds_per_step: seconds,
        tokens_per_s: (batch * seq) as f64 / seconds,
        peak_rss_mb: crate::reference::peak_rss_mb(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
