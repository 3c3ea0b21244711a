//! Forward + backward of the joint model's ELBO on the CPU backend; reports target tokens/s.
//!
//! Base: llama d_model 128, 4 layers, 4 heads / 2 kv heads; assistant: gpt2 d_model 96, 3 layers;
//! vocab 2048; z of 32 dims read through memory slots and embedding offsets by both models;
//! batch 8 × 64 tokens (16 of context, 48 of text), one z sample.

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_lm::{Gpt2Config, LlamaConfig, LmConfig};
use chorus_model::{Chorus, ChorusBatch, ChorusConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

type B = Autodiff<NdArray>;

const BATCH: usize = 8;
const SEQ: usize = 64;
const CONTEXT: usize = 16;
const VOCAB: usize = 2048;

fn elbo_step(c: &mut Criterion) {
    let device = Default::default();
    let base = LmConfig::Llama(LlamaConfig {
        vocab_size: VOCAB,
        d_model: 128,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 344,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: SEQ,
    });
    let assistant = LmConfig::Gpt2(Gpt2Config {
        vocab_size: VOCAB,
        d_model: 96,
        n_layers: 3,
        n_heads: 4,
        d_ff: 384,
        max_seq_len: SEQ,
        norm_eps: 1e-5,
        tie_embeddings: true,
    });
    let model = Chorus::new(
        ChorusConfig::default(),
        base.init::<B>(&device).expect("valid base"),
        vec![assistant.init::<B>(&device).expect("valid assistant")],
        &device,
    )
    .expect("valid chorus");

    let data = Tensor::<B, 2>::random(
        [BATCH, SEQ + 1],
        Distribution::Uniform(0.0, VOCAB as f64),
        &device,
    )
    .int();
    let position = Tensor::<B, 1, Int>::arange(0..SEQ as i64, &device)
        .float()
        .unsqueeze_dim::<2>(0);
    let context_mask = position
        .clone()
        .lower_elem(CONTEXT as f64)
        .float()
        .repeat_dim(0, BATCH);
    let batch = ChorusBatch {
        tokens: data.clone().narrow(1, 0, SEQ),
        targets: data.narrow(1, 1, SEQ),
        // targets from position CONTEXT-1 on are the text x
        target_mask: position
            .greater_equal_elem((CONTEXT - 1) as f64)
            .float()
            .repeat_dim(0, BATCH),
        context_mask,
        padding: Tensor::from_data(
            TensorData::new(vec![false; BATCH * SEQ], [BATCH, SEQ]),
            &device,
        ),
        assistant_log_probs: None,
    };
    let text_tokens = (BATCH * (SEQ - CONTEXT + 1)) as u64;

    let mut group = c.benchmark_group("elbo_step");
    group.throughput(Throughput::Elements(text_tokens));
    group.sample_size(10);
    group.bench_function("llama128x4_gpt2_96x3_z32_b8x64_fwd_bwd", |b| {
        b.iter(|| {
            let out = model.forward_elbo(&batch, 1.0).expect("valid batch");
            std::hint::black_box(out.terms.loss.backward());
        })
    });
    group.finish();
}

criterion_group!(benches, elbo_step);
criterion_main!(benches);
