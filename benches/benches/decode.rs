//! Collaborative decoding speed on the CPU backend (tokens/s, one row, z at the prior mean).
//!
//! Base and assistant: the same llama shape (d_model 256, 4 layers, 4/2 heads, vocab 4096).
//! The selector is set to π = (0.9, 0.1) and writers are sampled, so about 10 % of tokens are
//! deferred. Compared, at 128 and 512 new tokens:
//! - `base_alone`: the base decoding by itself (a K = 1 chorus, same settings);
//! - `lazy`: assistants catch up in one batched forward when they next write (the default);
//! - `eager`: every model consumes every token as it is emitted;
//! - `reencode`: Co-LLM's way — the assistant re-reads the whole prefix for each of its tokens.
//!
//! `sampling`: one token's nucleus truncation (`truncate_probs`, top-p 0.95, `chorus generate`'s
//! default) over SmolLM2's 49,152-token vocabulary, from logits ~ N(0, σ²) at temperature 0.8:
//! σ = 3 (a peaked distribution; its nucleus a small share of the vocabulary) and σ = 0.1 (nearly
//! flat: the nucleus is most of the vocabulary, so most of it is sorted).

use burn::backend::NdArray;
use burn::module::Param;
use burn::prelude::*;
use chorus_data::rng::SplitMix64;
use chorus_lm::{LlamaConfig, LmConfig};
use chorus_model::{
    AssistantUpdate, Chorus, ChorusConfig, DecodeConfig, WriterStrategy, tempered_probs,
    truncate_probs,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

type B = NdArray;

fn llama() -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: 4096,
        d_model: 256,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 688,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 640,
    })
}

fn chorus(n_assistants: usize) -> Chorus<B> {
    let device = Default::default();
    B::seed(&device, 3);
    let config = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let assistants = (0..n_assistants)
        .map(|_| llama().init::<B>(&device).expect("valid"))
        .collect();
    let mut m = Chorus::new(
        config,
        llama().init::<B>(&device).expect("valid"),
        assistants,
        &device,
    )
    .expect("valid chorus");
    if let Some(selector) = m.selector.as_mut() {
        // Zero weights, bias log(0.9 / 0.1): π = (0.9, 0.1) at every step.
        selector.proj.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![(9.0f32).ln(), 0.0], [2]),
            &device,
        )));
    }
    m
}

fn decode(c: &mut Criterion) {
    let device = Default::default();
    let base = chorus(0);
    let joint = chorus(1);
    let prompt: Vec<u32> = (0..16).collect();
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    for tokens in [128usize, 512] {
        group.throughput(Throughput::Elements(tokens as u64));
        let config = |assistants| DecodeConfig {
            strategy: WriterStrategy::Sample,
            temperature: 1.0,
            max_new_tokens: tokens,
            seed: 1,
            assistants,
            ..DecodeConfig::default()
        };
        let run = |m: &Chorus<B>, update| {
            let out = m
                .generate(&prompt, 1, None, &config(update), &device, |_, _, _| true)
                .expect("decodes");
            assert_eq!(out[0].tokens.len(), tokens);
            out
        };
        let deferral = run(&joint, AssistantUpdate::Lazy)[0].deferral_rate();
        eprintln!("{tokens} tokens: deferral rate {:.1} %", 100.0 * deferral);
        group.bench_function(BenchmarkId::new("base_alone", tokens), |b| {
            b.iter(|| run(&base, AssistantUpdate::Lazy))
        });
        for (name, update) in [
            ("lazy", AssistantUpdate::Lazy),
            ("eager", AssistantUpdate::Eager),
            ("reencode", AssistantUpdate::Reencode),
        ] {
            group.bench_function(BenchmarkId::new(name, tokens), |b| {
                b.iter(|| run(&joint, update))
            });
        }
    }
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sampling");
    let mut rng = SplitMix64(5);
    for (name, sigma) in [("peaked", 3.0), ("flat", 0.1)] {
        let logits: Vec<f32> = (0..49_152)
            .map(|_| (sigma * rng.standard_normal()) as f32)
            .collect();
        let probs = tempered_probs(&logits, 0.8);
        group.bench_function(BenchmarkId::new("truncate_top_p_0.95", name), |b| {
            b.iter(|| {
                let mut p = probs.clone();
                truncate_probs(&mut p, 0, 0.95);
                p
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, sampling);
criterion_main!(benches);
