//! Forward + backward tokens/s of a small llama LM on the CPU backend.
//!
//! Shape: vocab 4096, d_model 256, 4 layers, 8 heads / 4 kv heads, d_ff 688, batch 8 × 128.

use burn::backend::{Autodiff, NdArray};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_lm::{LlamaConfig, LmConfig, LmInput};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

type B = Autodiff<NdArray>;

const BATCH: usize = 8;
const SEQ: usize = 128;

fn lm_step(c: &mut Criterion) {
    let device = Default::default();
    let config = LmConfig::Llama(LlamaConfig {
        vocab_size: 4096,
        d_model: 256,
        n_layers: 4,
        n_heads: 8,
        n_kv_heads: 4,
        d_ff: 688,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: SEQ + 1,
    });
    let model = config.init::<B>(&device).expect("valid config");
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let data = Tensor::<B, 2>::random(
        [BATCH, SEQ + 1],
        Distribution::Uniform(0.0, 4096.0),
        &device,
    )
    .int();
    let inputs = data.clone().narrow(1, 0, SEQ);
    let targets = data.narrow(1, 1, SEQ).reshape([BATCH * SEQ]);

    let mut group = c.benchmark_group("lm_step");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.sample_size(10);
    group.bench_function("llama_d256_l4_b8x128_fwd_bwd", |b| {
        b.iter(|| {
            let out = model
                .forward(LmInput::new(inputs.clone()), None)
                .expect("valid input");
            let logits = out.logits.reshape([BATCH * SEQ, 4096]);
            let loss = loss_fn.forward(logits, targets.clone());
            let grads = loss.backward();
            std::hint::black_box(grads);
        })
    });
    group.finish();
}

criterion_group!(benches, lm_step);
criterion_main!(benches);
