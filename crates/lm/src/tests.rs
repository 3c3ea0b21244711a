//! Family-level tests: cache ≡ full forward, causality, conditioning hooks, GQA, checkpoints.

use burn::prelude::*;
use burn::tensor::Distribution;

use crate::{Gpt2Config, LayerMemory, LlamaConfig, Lm, LmConfig, LmError, LmInput, TestBackend};

type B = TestBackend;

pub(crate) fn tiny_llama(n_heads: usize, n_kv_heads: usize) -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: 50,
        d_model: 32,
        n_layers: 2,
        n_heads,
        n_kv_heads,
        d_ff: 48,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 64,
    })
}

pub(crate) fn tiny_gpt2() -> LmConfig {
    LmConfig::Gpt2(Gpt2Config {
        vocab_size: 50,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: 64,
        max_seq_len: 64,
        norm_eps: 1e-5,
        tie_embeddings: false,
    })
}

fn families() -> Vec<(&'static str, LmConfig)> {
    vec![("llama-gqa", tiny_llama(4, 2)), ("gpt2", tiny_gpt2())]
}

/// burn-ndarray's RNG is one process-wide generator: the crate's tests that draw from it (model
/// initialisation included) take turns and seed it first, so a seed pins every draw and a failure
/// reproduces.
pub(crate) fn seeded(seed: u64) -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(&device(), seed);
    guard
}

fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn tokens(rows: &[&[i64]]) -> Tensor<B, 2, Int> {
    let (batch, seq) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [batch, seq]), &device())
}

fn random_memory(model: &Lm<B>, batch: usize, n_slots: usize) -> Vec<LayerMemory<B>> {
    let dims = model.dims();
    let shape = [batch, n_slots, dims.kv_dim()];
    (0..dims.n_layers)
        .map(|_| LayerMemory {
            key: Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device()),
            value: Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device()),
        })
        .collect()
}

fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn cached_decoding_equals_full_forward() {
    let _rng = seeded(0);
    let ids: &[&[i64]] = &[&[3, 14, 15, 9, 2, 6, 5, 35], &[8, 9, 7, 9, 3, 2, 38, 4]];
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        for n_slots in [0, 2] {
            let memory = (n_slots > 0).then(|| random_memory(&model, 2, n_slots));
            let input = |t: Tensor<B, 2, Int>| {
                let input = LmInput::new(t);
                match &memory {
                    Some(m) => input.with_memory(m.clone()),
                    None => input,
                }
            };
            let full = model.forward(input(tokens(ids)), None).unwrap();
            let mut cache = model.new_cache();
            // a 3-token prefill, then one token at a time
            let mut logits = vec![
                model
                    .forward(input(tokens(ids).narrow(1, 0, 3)), Some(&mut cache))
                    .unwrap()
                    .logits,
            ];
            for t in 3..ids[0].len() {
                let step = model
                    .forward(input(tokens(ids).narrow(1, t, 1)), Some(&mut cache))
                    .unwrap();
                logits.push(step.logits);
            }
            assert_eq!(cache.len(), ids[0].len());
            let diff = max_abs_diff(full.logits, Tensor::cat(logits, 1));
            assert!(diff < 1e-4, "{name}, {n_slots} slots: |Δ| = {diff}");
        }
    }
}

/// The cache's buffers start at prefill + 64 positions and double when full: decoding 150
/// positions one at a time crosses two growths and still equals the full forward.
#[test]
fn cached_decoding_across_buffer_growth_equals_full_forward() {
    let _rng = seeded(1);
    let LmConfig::Llama(mut config) = tiny_llama(4, 2) else {
        unreachable!()
    };
    config.max_seq_len = 160;
    let model = LmConfig::Llama(config).init::<B>(&device()).unwrap();
    let ids: Vec<i64> = (0..2 * 150).map(|i| (i * 7 + 3) % 50).collect();
    let all = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 150]), &device());
    let full = model.forward(LmInput::new(all.clone()), None).unwrap();
    let mut cache = model.new_cache();
    let mut logits = vec![
        model
            .forward(LmInput::new(all.clone().narrow(1, 0, 3)), Some(&mut cache))
            .unwrap()
            .logits,
    ];
    for t in 3..150 {
        let step = model
            .forward(LmInput::new(all.clone().narrow(1, t, 1)), Some(&mut cache))
            .unwrap();
        logits.push(step.logits);
    }
    assert_eq!(cache.len(), 150);
    let capacity = cache.layers[0].capacity();
    assert!(capacity >= 150, "{capacity}"); // 67 → 136 → 274
    let diff = max_abs_diff(full.logits, Tensor::cat(logits, 1));
    assert!(diff < 1e-4, "|Δ| = {diff}");
}

/// A cache is empty until its first step; `reset` forgets every position, so decoding after it
/// equals decoding from scratch.
#[test]
fn a_reset_cache_decodes_as_a_new_one() {
    let _rng = seeded(13);
    let model = tiny_llama(4, 2).init::<B>(&device()).unwrap();
    let mut cache = model.new_cache();
    assert!(cache.is_empty());
    model
        .forward(LmInput::new(tokens(&[&[3, 14, 15]])), Some(&mut cache))
        .unwrap();
    assert!(!cache.is_empty());
    cache.reset();
    assert!(cache.is_empty());
    assert_eq!(cache.layers.len(), 2);
    let after_reset = model
        .forward(LmInput::new(tokens(&[&[8, 9]])), Some(&mut cache))
        .unwrap()
        .logits;
    assert_eq!(cache.len(), 2);
    let fresh = model
        .forward(LmInput::new(tokens(&[&[8, 9]])), None)
        .unwrap()
        .logits;
    let diff = max_abs_diff(after_reset, fresh);
    assert!(diff < 1e-5, "|Δ| = {diff}");
}

#[test]
fn last_logits_only_is_the_last_position_of_the_full_logits() {
    let _rng = seeded(2);
    let ids: &[&[i64]] = &[&[3, 14, 15, 9, 2], &[8, 9, 7, 9, 3]];
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let full = model.forward(LmInput::new(tokens(ids)), None).unwrap();
        let last = model
            .forward(LmInput::new(tokens(ids)).with_last_logits_only(), None)
            .unwrap();
        assert_eq!(last.logits.dims(), [2, 1, 50], "{name}");
        assert_eq!(last.hidden.dims(), full.hidden.dims(), "{name}");
        let diff = max_abs_diff(full.logits.narrow(1, 4, 1), last.logits);
        assert!(diff < 1e-5, "{name}: |Δ| = {diff}");
    }
}

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    let _rng = seeded(3);
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let a = model
            .forward(LmInput::new(tokens(&[&[1, 2, 3, 4, 5, 6]])), None)
            .unwrap();
        let b = model
            .forward(LmInput::new(tokens(&[&[1, 2, 3, 4, 40, 6]])), None)
            .unwrap();
        let before = max_abs_diff(
            a.logits.clone().narrow(1, 0, 4),
            b.logits.clone().narrow(1, 0, 4),
        );
        let after = max_abs_diff(a.logits.narrow(1, 4, 2), b.logits.narrow(1, 4, 2));
        assert_eq!(before, 0.0, "{name}: earlier logits moved by {before}");
        assert!(after > 1e-4, "{name}: the changed token had no effect");
    }
}

#[test]
fn padding_keys_are_ignored() {
    let _rng = seeded(4);
    // Right padding: the real tokens' logits must not depend on what the padding holds.
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let padding = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(vec![false, false, false, true, true], [1, 5]),
            &device(),
        );
        let run = |ids: &[i64]| {
            model
                .forward(
                    LmInput::new(tokens(&[ids])).with_padding(padding.clone()),
                    None,
                )
                .unwrap()
                .logits
                .narrow(1, 0, 3)
        };
        let diff = max_abs_diff(run(&[1, 2, 3, 0, 0]), run(&[1, 2, 3, 17, 44]));
        assert_eq!(diff, 0.0, "{name}");
        // A cache keeps the padding of the batch it was filled with, and refuses another batch.
        let mut cache = model.new_cache();
        let batch_of_two = tokens(&[&[1, 2, 3, 0, 0], &[4, 5, 6, 7, 8]]);
        model
            .forward(
                LmInput::new(batch_of_two).with_padding(padding.clone().repeat_dim(0, 2)),
                Some(&mut cache),
            )
            .unwrap();
        model
            .forward(LmInput::new(tokens(&[&[9], &[9]])), Some(&mut cache))
            .unwrap();
        let err = model
            .forward(LmInput::new(tokens(&[&[9]])), Some(&mut cache))
            .unwrap_err();
        assert!(
            err.to_string().contains("batch of 1 for a cache holding 2"),
            "{name}: {err}"
        );
        let plain = model
            .forward(LmInput::new(tokens(&[&[1, 2, 3]])), None)
            .unwrap()
            .logits;
        assert!(max_abs_diff(run(&[1, 2, 3, 9, 9]), plain) < 1e-5, "{name}");
    }
}

#[test]
fn zero_conditioning_is_a_no_op_and_nonzero_is_not() {
    let _rng = seeded(5);
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let dims = model.dims();
        let ids: &[&[i64]] = &[&[5, 6, 7, 8]];
        let plain = model
            .forward(LmInput::new(tokens(ids)), None)
            .unwrap()
            .logits;

        // A zero embedding offset is exactly the plain model.
        let zero = Tensor::<B, 2>::zeros([1, dims.d_model], &device());
        let offset = model
            .forward(LmInput::new(tokens(ids)).with_embedding_offset(zero), None)
            .unwrap()
            .logits;
        assert_eq!(
            max_abs_diff(plain.clone(), offset),
            0.0,
            "{name}: zero offset"
        );
        // (not a constant vector: LayerNorm would remove it exactly)
        let nonzero =
            Tensor::<B, 2>::random([1, dims.d_model], Distribution::Normal(0.0, 1.0), &device());
        let offset = model
            .forward(
                LmInput::new(tokens(ids)).with_embedding_offset(nonzero.clone()),
                None,
            )
            .unwrap();
        assert!(
            max_abs_diff(plain.clone(), offset.logits) > 1e-3,
            "{name}: offset ignored"
        );
        // The offset is added to every position's embedding: the same hidden states as a model
        // whose token embeddings each have it added.
        let mut shifted = model.clone();
        let embedding = match &mut shifted {
            Lm::Llama(m) => &mut m.embed_tokens,
            Lm::Gpt2(m) => &mut m.wte,
        };
        embedding.weight =
            burn::module::Param::from_tensor(embedding.weight.val() + nonzero.clone());
        let shifted = shifted
            .forward(LmInput::new(tokens(ids)), None)
            .unwrap()
            .hidden;
        let diff = max_abs_diff(offset.hidden, shifted);
        assert!(
            diff < 1e-5,
            "{name}: the offset added to the embeddings, |Δ| = {diff}"
        );

        // Memory slots whose values are zero contribute exactly nothing (whatever the keys).
        let mut zero_values = random_memory(&model, 1, 2);
        for m in &mut zero_values {
            m.value = m.value.clone().zeros_like();
        }
        let with_zero = model
            .forward(LmInput::new(tokens(ids)).with_memory(zero_values), None)
            .unwrap()
            .logits;
        assert_eq!(
            max_abs_diff(plain.clone(), with_zero),
            0.0,
            "{name}: zero memory"
        );
        let with_memory = model
            .forward(
                LmInput::new(tokens(ids)).with_memory(random_memory(&model, 1, 1)),
                None,
            )
            .unwrap()
            .logits;
        assert!(
            max_abs_diff(plain, with_memory) > 1e-3,
            "{name}: memory ignored"
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    let _rng = seeded(6);
    let model = tiny_llama(4, 2).init::<B>(&device()).unwrap();
    let long: Vec<i64> = vec![1; 65];
    let err = model
        .forward(LmInput::new(tokens(&[&long])), None)
        .unwrap_err();
    assert!(err.to_string().contains("context window of 64"), "{err}");
    assert!(
        model
            .forward(LmInput::new(tokens(&[&long[..64]])), None)
            .is_ok()
    );
    let err = model
        .forward(
            LmInput::new(tokens(&[&[1, 2]])).with_memory(random_memory(&model, 1, 1)[..1].to_vec()),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("1 memory layers"), "{err}");
    let mut memory = random_memory(&model, 1, 1);
    memory[1].value = random_memory(&model, 1, 2)[1].value.clone();
    let err = model
        .forward(LmInput::new(tokens(&[&[1, 2]])).with_memory(memory), None)
        .unwrap_err();
    assert!(err.to_string().contains("memory of layer 1"), "{err}");
    let err = model
        .forward(
            LmInput::new(tokens(&[&[1, 2]]))
                .with_embedding_offset(Tensor::zeros([1, 3], &device())),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, LmError::InvalidInput { .. }), "{err}");
}

/// A token id outside `0..vocab` reached the embedding's lookup, where burn-ndarray panicked
/// ("index < dim") and a GPU would read past the table; it is now refused before any forward
/// work, naming the id and where it sits.
#[test]
fn token_ids_outside_the_vocabulary_are_errors() {
    let _rng = seeded(13);
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let vocab = model.dims().vocab_size as i64;
        assert!(
            model
                .forward(LmInput::new(tokens(&[&[0, vocab - 1]])), None)
                .is_ok(),
            "{name}: the vocabulary's edges are tokens"
        );
        for (id, row, position) in [(vocab, 1, 2), (-1, 0, 0), (vocab + 7, 1, 0)] {
            let mut rows = [vec![1i64, 2, 3], vec![4, 5, 6]];
            rows[row][position] = id;
            let err = model
                .forward(LmInput::new(tokens(&[&rows[0], &rows[1]])), None)
                .unwrap_err()
                .to_string();
            let expected = format!(
                "token id {id} at row {row}, position {position} is outside the vocabulary of \
                 {vocab}"
            );
            assert!(err.contains(&expected), "{name}: {err}");
        }
        // A decoding step after a prefill, through the cache.
        let mut cache = model.new_cache();
        model
            .forward(LmInput::new(tokens(&[&[1, 2]])), Some(&mut cache))
            .unwrap();
        let err = model
            .forward(LmInput::new(tokens(&[&[vocab]])), Some(&mut cache))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{name}: {err}");
        assert_eq!(
            cache.len(),
            2,
            "{name}: a refused step leaves the cache as it was"
        );
    }
    let d = 8;
    let bert = crate::Bert::<B> {
        word_embeddings: burn::nn::EmbeddingConfig::new(10, d).init(&device()),
        position_embeddings: burn::nn::EmbeddingConfig::new(16, d).init(&device()),
        token_type_embeddings: burn::nn::EmbeddingConfig::new(2, d).init(&device()),
        embeddings_norm: burn::nn::LayerNormConfig::new(d).init(&device()),
        layers: Vec::new(),
        d_model: d,
        max_positions: 16,
    };
    assert!(bert.forward(tokens(&[&[0, 9]]), None).is_ok());
    let err = bert
        .forward(tokens(&[&[0, 10]]), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 10 at row 0, position 1 is outside the vocabulary of 10"),
        "{err}"
    );
}

#[test]
fn invalid_configs_are_rejected_before_allocation() {
    let _rng = seeded(7);
    let cases = [
        (tiny_llama(4, 3), "n_kv_heads"),
        (tiny_llama(5, 5), "n_heads"),
        (tiny_llama(0, 1), "n_heads"),
    ];
    for (config, field) in cases {
        let err = config.init::<B>(&device()).unwrap_err();
        assert!(
            matches!(&err, LmError::InvalidConfig { field: f, .. } if *f == field),
            "{err}"
        );
    }
    let mut odd = tiny_llama(4, 2);
    if let LmConfig::Llama(c) = &mut odd {
        c.d_model = 20; // head_dim 5 cannot be rotated
    }
    let err = odd.validate().unwrap_err().to_string();
    assert!(err.contains("head_dim") || err.contains("d_model"), "{err}");
    let unknown = r#"{"family":"llama","vocab_size":5,"d_model":8,"n_layers":1,"n_heads":2,
        "n_kv_heads":1,"d_ff":8,"dmodel":3}"#;
    let err = serde_json::from_str::<LmConfig>(unknown)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dmodel"), "{err}");
}

/// The parameter count, written out: llama's tied embedding, per block two RMSNorms, the query
/// and output projections (d²), the key and value ones (d · kv_dim) and three SwiGLU matrices, and
/// the final norm; GPT-2's token and position embeddings, per block two LayerNorms (scale and
/// shift), four biased projections and a biased two-matrix MLP, the final LayerNorm and an untied
/// output layer without bias.
#[test]
fn the_parameter_count_is_the_sum_of_each_familys_weights() {
    let _rng = seeded(14);
    let (vocab, d, kv_dim) = (50, 32, 16); // tiny_llama(4, 2): head_dim 8, 2 key/value heads
    let d_ff = 48;
    let llama_block = 2 * d + 2 * d * d + 2 * d * kv_dim + 3 * d * d_ff;
    let llama = tiny_llama(4, 2).init::<B>(&device()).unwrap();
    assert_eq!(llama.num_params(), vocab * d + 2 * llama_block + d);
    let (d_ff, positions) = (64, 64);
    let gpt2_block = 2 * 2 * d + 4 * (d * d + d) + (d * d_ff + d_ff) + (d_ff * d + d);
    let gpt2 = tiny_gpt2().init::<B>(&device()).unwrap();
    assert_eq!(
        gpt2.num_params(),
        (vocab + positions) * d + 2 * gpt2_block + 2 * d + d * vocab
    );
}

/// Each field's own rule, field by field: every count > 0 (GPT-2's key/value heads are its query
/// heads), ε > 0 and finite, and llama's θ > 1 and finite; an odd head width is refused only
/// where RoPE rotates it. The defaults a config file may leave out are the documented ones.
#[test]
fn every_config_field_is_checked_by_its_rule_and_defaults_are_as_documented() {
    let refused = |config: &LmConfig| match config.validate() {
        Err(LmError::InvalidConfig { field, .. }) => Some(field),
        Err(other) => panic!("{other}"),
        Ok(()) => None,
    };
    let llama = |edit: &dyn Fn(&mut LlamaConfig)| {
        let LmConfig::Llama(mut c) = tiny_llama(4, 2) else {
            unreachable!()
        };
        edit(&mut c);
        LmConfig::Llama(c)
    };
    let gpt2 = |edit: &dyn Fn(&mut Gpt2Config)| {
        let LmConfig::Gpt2(mut c) = tiny_gpt2() else {
            unreachable!()
        };
        edit(&mut c);
        LmConfig::Gpt2(c)
    };
    assert_eq!(refused(&llama(&|_| ())), None);
    assert_eq!(refused(&gpt2(&|_| ())), None);
    type Edit<C> = fn(&mut C);
    let zero_llama: [(&str, Edit<LlamaConfig>); 7] = [
        ("vocab_size", |c| c.vocab_size = 0),
        ("d_model", |c| c.d_model = 0),
        ("n_layers", |c| c.n_layers = 0),
        ("n_heads", |c| c.n_heads = 0),
        ("n_kv_heads", |c| c.n_kv_heads = 0),
        ("d_ff", |c| c.d_ff = 0),
        ("max_seq_len", |c| c.max_seq_len = 0),
    ];
    for (field, edit) in zero_llama {
        assert_eq!(refused(&llama(&edit)), Some(field));
    }
    let zero_gpt2: [(&str, Edit<Gpt2Config>); 6] = [
        ("vocab_size", |c| c.vocab_size = 0),
        ("d_model", |c| c.d_model = 0),
        ("n_layers", |c| c.n_layers = 0),
        ("n_heads", |c| c.n_heads = 0),
        ("d_ff", |c| c.d_ff = 0),
        ("max_seq_len", |c| c.max_seq_len = 0),
    ];
    for (field, edit) in zero_gpt2 {
        assert_eq!(refused(&gpt2(&edit)), Some(field));
    }
    for eps in [0.0, -1e-5, f64::NAN, f64::INFINITY] {
        assert_eq!(refused(&llama(&|c| c.norm_eps = eps)), Some("norm_eps"));
        assert_eq!(refused(&gpt2(&|c| c.norm_eps = eps)), Some("norm_eps"));
    }
    assert_eq!(refused(&llama(&|c| c.norm_eps = 1e-30)), None);
    for theta in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            refused(&llama(&|c| c.rope_theta = theta)),
            Some("rope_theta")
        );
    }
    assert_eq!(refused(&llama(&|c| c.rope_theta = 1.5)), None);
    // head_dim 5: no pair to rotate in llama; GPT-2 has no RoPE.
    assert_eq!(refused(&llama(&|c| c.d_model = 20)), Some("n_heads"));
    assert_eq!(refused(&gpt2(&|c| c.d_model = 20)), None);

    let minimal = r#""vocab_size":5,"d_model":8,"n_layers":1,"n_heads":2,"d_ff":8"#;
    let llama: LmConfig =
        serde_json::from_str(&format!(r#"{{"family":"llama",{minimal},"n_kv_heads":1}}"#)).unwrap();
    let LmConfig::Llama(c) = llama else {
        panic!("{llama:?}")
    };
    assert_eq!(
        (c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len),
        (10_000.0, 1e-5, false, 2048)
    );
    let gpt2: LmConfig =
        serde_json::from_str(&format!(r#"{{"family":"gpt2",{minimal}}}"#)).unwrap();
    let LmConfig::Gpt2(c) = gpt2 else {
        panic!("{gpt2:?}")
    };
    assert_eq!(
        (c.norm_eps, c.tie_embeddings, c.max_seq_len),
        (1e-5, true, 1024)
    );
}

#[test]
fn gqa_equals_mha_with_replicated_kv_heads() {
    let _rng = seeded(8);
    // n_kv_heads = 2 shared by 4 query heads ≡ 4 kv heads where heads (0,1) copy kv head 0 and
    // (2,3) copy kv head 1.
    let gqa = match tiny_llama(4, 2).init::<B>(&device()).unwrap() {
        Lm::Llama(m) => m,
        _ => unreachable!(),
    };
    // burn initialises parameters lazily and a clone of an uninitialised parameter draws its own
    // values: run the model once so the clones below copy real weights.
    let ids = tokens(&[&[4, 8, 15, 16, 23, 42]]);
    let a = gqa.forward(LmInput::new(ids.clone()), None).unwrap().logits;
    let mut mha = match tiny_llama(4, 4).init::<B>(&device()).unwrap() {
        Lm::Llama(m) => m,
        _ => unreachable!(),
    };
    mha.embed_tokens = gqa.embed_tokens.clone();
    mha.norm = gqa.norm.clone();
    let head_dim = 8;
    let replicate = |w: Tensor<B, 2>| {
        // [d_model, 2 * head_dim] -> [d_model, 4 * head_dim]
        let heads: Vec<_> = (0..2)
            .flat_map(|h| {
                let head = w.clone().narrow(1, h * head_dim, head_dim);
                [head.clone(), head]
            })
            .collect();
        Tensor::cat(heads, 1)
    };
    for (m, g) in mha.layers.iter_mut().zip(&gqa.layers) {
        let mut attn = g.self_attn.clone();
        attn.n_kv_heads = 4;
        attn.k_proj.weight = attn.k_proj.weight.map(&replicate);
        attn.v_proj.weight = attn.v_proj.weight.map(&replicate);
        m.self_attn = attn;
        m.input_layernorm = g.input_layernorm.clone();
        m.post_attention_layernorm = g.post_attention_layernorm.clone();
        m.mlp = g.mlp.clone();
    }
    let b = mha.forward(LmInput::new(ids), None).unwrap().logits;
    assert!(max_abs_diff(a, b) < 1e-5);
}

#[test]
fn attention_with_all_kv_heads_equals_burn_multi_head_attention() {
    let _rng = seeded(9);
    use burn::nn::attention::{MhaInput, MultiHeadAttentionConfig};
    let attn = crate::AttentionConfig {
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 4,
        bias: true,
    }
    .init::<B>(&device());
    let x = Tensor::<B, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device());
    let mask = crate::attention_mask::<B>(2, 5, 0, None, &device());
    // Runs first: burn initialises parameters lazily, and the clones below must copy real weights.
    let ours = attn.forward(x.clone(), None, mask.clone(), None, None);
    let mut reference = MultiHeadAttentionConfig::new(32, 4)
        .with_dropout(0.0)
        .init::<B>(&device());
    reference.query = attn.q_proj.clone();
    reference.key = attn.k_proj.clone();
    reference.value = attn.v_proj.clone();
    reference.output = attn.o_proj.clone();
    let theirs = reference
        .forward(MhaInput::self_attn(x).mask_attn(mask))
        .context;
    assert!(max_abs_diff(ours, theirs) < 1e-5);
}

#[test]
fn save_then_load_gives_identical_logits() {
    let _rng = seeded(10);
    for (name, config) in families() {
        let dir = tempfile::tempdir().unwrap();
        let model = config.init::<B>(&device()).unwrap();
        model.save(dir.path()).unwrap();
        let loaded = Lm::<B>::load(dir.path(), &device()).unwrap();
        assert_eq!(loaded.config(), config);
        let ids = tokens(&[&[1, 2, 3, 4]]);
        let a = model
            .forward(LmInput::new(ids.clone()), None)
            .unwrap()
            .logits;
        let b = loaded.forward(LmInput::new(ids), None).unwrap().logits;
        assert_eq!(a.into_data(), b.into_data(), "{name}");
    }
}

/// Equal weights make equal files: saving an LM again, or loading it and saving the copy, writes
/// the same bytes (checksums and diffs of checkpoints mean something).
#[test]
fn saving_the_same_weights_writes_the_same_bytes() {
    let _rng = seeded(11);
    for (name, config) in families() {
        let model = config.init::<B>(&device()).unwrap();
        let first = tempfile::tempdir().unwrap();
        model.save(first.path()).unwrap();
        let bytes = |dir: &std::path::Path| {
            ["config.json", "model.safetensors"].map(|f| std::fs::read(dir.join(f)).unwrap())
        };
        let expected = bytes(first.path());
        let reloaded = Lm::<B>::load(first.path(), &device()).unwrap();
        for (i, lm) in [&model, &model, &model, &reloaded, &reloaded]
            .into_iter()
            .enumerate()
        {
            let again = tempfile::tempdir().unwrap();
            lm.save(again.path()).unwrap();
            assert!(
                bytes(again.path()) == expected,
                "{name}: save {i} wrote other bytes"
            );
        }
    }
}

#[test]
fn broken_checkpoints_are_errors_naming_file_and_tensor() {
    let _rng = seeded(12);
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(4, 2).init::<B>(&device()).unwrap();
    model.save(dir.path()).unwrap();
    let weights = dir.path().join(crate::WEIGHTS_FILE);

    // A config that does not match the weights: the shape error names the tensor.
    let mismatched = dir.path().join("mismatched");
    std::fs::create_dir(&mismatched).unwrap();
    std::fs::copy(&weights, mismatched.join(crate::WEIGHTS_FILE)).unwrap();
    let mut wider = tiny_llama(4, 2);
    if let LmConfig::Llama(c) = &mut wider {
        c.d_ff = 40;
    }
    std::fs::write(
        mismatched.join(crate::CONFIG_FILE),
        serde_json::to_string(&wider).unwrap(),
    )
    .unwrap();
    let err = Lm::<B>::load(&mismatched, &device())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("mlp."),
        "{err}"
    );

    // Fewer layers in the config than in the file: unexpected tensors are named.
    let mut shallow = tiny_llama(4, 2);
    if let LmConfig::Llama(c) = &mut shallow {
        c.n_layers = 1;
    }
    std::fs::write(
        mismatched.join(crate::CONFIG_FILE),
        serde_json::to_string(&shallow).unwrap(),
    )
    .unwrap();
    let err = Lm::<B>::load(&mismatched, &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers.1."), "{err}");

    // More layers in the config than in the file: the missing tensor is named.
    let mut deep = tiny_llama(4, 2);
    if let LmConfig::Llama(c) = &mut deep {
        c.n_layers = 3;
    }
    std::fs::write(
        mismatched.join(crate::CONFIG_FILE),
        serde_json::to_string(&deep).unwrap(),
    )
    .unwrap();
    let err = Lm::<B>::load(&mismatched, &device()).unwrap_err();
    assert!(
        matches!(&err, LmError::MissingTensor { tensor, .. } if tensor.starts_with("layers.2.")),
        "{err}"
    );

    // A truncated weights file.
    let bytes = std::fs::read(&weights).unwrap();
    for keep in [bytes.len() / 2, 12, 3] {
        std::fs::write(&weights, &bytes[..keep]).unwrap();
        let err = Lm::<B>::load(dir.path(), &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    // A missing or malformed config.
    std::fs::write(
        dir.path().join(crate::CONFIG_FILE),
        "{\"family\": \"llama\"",
    )
    .unwrap();
    let err = Lm::<B>::load(dir.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    let err = Lm::<B>::load(dir.path().join("nowhere"), &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
}

/// `Lm::load` refuses a config that describes more weights than its file could hold, before
/// allocating them: `4 n > 2 · bytes + 2^20` for the config's lower bound n, checked on both sides
/// of the boundary, and a count past `u64`. At the boundary the file is read, and its zeros are
/// not safetensors.
#[test]
fn a_config_describing_far_more_weights_than_its_file_is_refused_before_allocation() {
    let _rng = seeded(15);
    let dir = tempfile::tempdir().unwrap();
    let LmConfig::Llama(mut c) = tiny_llama(4, 2) else {
        unreachable!()
    };
    c.vocab_size = 10_000;
    let write_config = |c: &LlamaConfig| {
        let json = serde_json::to_string(&LmConfig::Llama(c.clone())).unwrap();
        std::fs::write(dir.path().join(crate::CONFIG_FILE), json).unwrap();
    };
    write_config(&c);
    let n = LmConfig::Llama(c.clone()).min_parameters().unwrap();
    assert_eq!(n, 10_000 * 32 + 2 * (2 * 32 * 32 + 3 * 32 * 48));
    let weights = dir.path().join(crate::WEIGHTS_FILE);
    let boundary = 2 * n - (1 << 19);
    for (bytes, refused) in [(boundary - 1, true), (boundary, false)] {
        std::fs::write(&weights, vec![0u8; bytes as usize]).unwrap();
        let err = Lm::<B>::load(dir.path(), &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains(crate::WEIGHTS_FILE), "{err}");
        assert_eq!(
            err.contains(&format!("describes at least {n} parameters")),
            refused,
            "{bytes} bytes: {err}"
        );
    }
    c.vocab_size = usize::MAX;
    write_config(&c);
    let err = Lm::<B>::load(dir.path(), &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("describes at least 2^64 parameters"), "{err}");
}

/// chorus's burn-ndarray multiplies up to 8 rows without GEMM packing, reading the right-hand
/// matrix in its own layout (row-major, or a transposed view), and folds the batches of a
/// broadcast weight into one GEMM (vendor/burn-ndarray/CHORUS.md): every such product equals the
/// same rows of a many-row product to f32 rounding (sums of up to 96 unit-variance products).
#[test]
fn few_row_strided_and_folded_matmuls_equal_the_product_by_hand() {
    let _rng = seeded(13);
    let d = device();
    // x · w by hand, in f64, from the operands' values.
    let by_hand = |x: &Tensor<B, 2>, w: &Tensor<B, 2>| {
        let [m, k] = x.dims();
        let n = w.dims()[1];
        let x = x.clone().into_data().to_vec::<f32>().unwrap();
        let w = w.clone().into_data().to_vec::<f32>().unwrap();
        let out: Vec<f32> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k)
                    .map(|j| f64::from(x[r * k + j]) * f64::from(w[j * n + c]))
                    .sum::<f64>() as f32
            })
            .collect();
        Tensor::<B, 2>::from_data(TensorData::new(out, [m, n]), &d)
    };
    for (m, k, n) in [
        (1, 64, 10),
        (1, 96, 700),
        (3, 40, 2000),
        (8, 5, 300),
        (2, 1, 7),
        (4, 13, 50), // whole vectors of 8 and a remainder in each dot product
    ] {
        let x = Tensor::<B, 2>::random([12, k], Distribution::Normal(0.0, 1.0), &d);
        for transposed in [false, true] {
            let w = if transposed {
                Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &d).transpose()
            } else {
                Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &d)
            };
            let expected = by_hand(&x, &w);
            let what = format!("{m}×{k}·{k}×{n}, transposed {transposed}");
            // 12 rows: the GEMM (a transposed w read through its strides).
            let general = x.clone().matmul(w.clone());
            let diff = max_abs_diff(expected.clone(), general);
            assert!(diff < 1e-4, "{what}, 12 rows: |Δ| = {diff}");
            let expected = expected.narrow(0, 0, m);
            let few = x.clone().narrow(0, 0, m).matmul(w.clone());
            let diff = max_abs_diff(expected.clone(), few);
            assert!(diff < 1e-4, "{what}: |Δ| = {diff}");
            // [2, m, k] · [1, k, n]: batches of a broadcast weight.
            let batched = x
                .clone()
                .narrow(0, 0, m)
                .unsqueeze_dim::<3>(0)
                .repeat_dim(0, 2);
            let folded = batched.matmul(w.clone().unsqueeze_dim::<3>(0));
            let second = folded.narrow(0, 1, 1).squeeze_dim::<2>(0);
            let diff = max_abs_diff(expected, second);
            assert!(diff < 1e-4, "{what}, batched: |Δ| = {diff}");
        }
    }
    // Batches with weights of their own (attention's QKᵀ and PV), either operand transposed,
    // and products large enough for the GEMM to split them over threads.
    for (batches, m, k, n) in [(3, 12, 40, 33), (2, 70, 130, 90), (1, 200, 96, 150)] {
        for (lhs_transposed, rhs_transposed) in [(false, false), (true, false), (false, true)] {
            let x = if lhs_transposed {
                Tensor::<B, 3>::random([batches, k, m], Distribution::Normal(0.0, 1.0), &d)
                    .swap_dims(1, 2)
            } else {
                Tensor::<B, 3>::random([batches, m, k], Distribution::Normal(0.0, 1.0), &d)
            };
            let w = if rhs_transposed {
                Tensor::<B, 3>::random([batches, n, k], Distribution::Normal(0.0, 1.0), &d)
                    .swap_dims(1, 2)
            } else {
                Tensor::<B, 3>::random([batches, k, n], Distribution::Normal(0.0, 1.0), &d)
            };
            let product = x.clone().matmul(w.clone());
            for b in 0..batches {
                let batch = |t: &Tensor<B, 3>| t.clone().narrow(0, b, 1).squeeze_dim::<2>(0);
                let diff = max_abs_diff(by_hand(&batch(&x), &batch(&w)), batch(&product));
                let what = format!(
                    "{batches}×{m}×{k}·{k}×{n}, batch {b}, transposed \
                                    ({lhs_transposed}, {rhs_transposed})"
                );
                assert!(diff < 1e-3, "{what}: |Δ| = {diff}");
            }
        }
    }
}

/// Slices are views of their source's buffer in the burn-ndarray patch (vendor/burn-ndarray/
/// CHORUS.md), as reshapes are: each slice equals the elements it selects, read on the host; an
/// operation on a slice that shares its buffer leaves the source as it was, and one on a slice
/// that owns its buffer alone (the source dropped) works in place on the selected elements only;
/// and attention's products over a narrowed key/value cache buffer (QKᵀ with the keys transposed,
/// PV) equal the products by hand.
#[test]
fn slices_are_views_whose_writes_never_reach_their_source() {
    let _rng = seeded(14);
    let d = device();
    let dims = [2, 3, 10, 4];
    let values: Vec<f32> = (0..240).map(|i| i as f32).collect();
    let at = |b: usize, h: usize, p: usize, e: usize| values[((b * 3 + h) * 10 + p) * 4 + e];
    let fresh = || Tensor::<B, 4>::from_data(TensorData::new(values.clone(), dims), &d);
    let host = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    let source = fresh();

    // The host's selection of heads `heads` and positions `positions`, in row-major order.
    let select = |heads: std::ops::Range<usize>, positions: &[usize]| -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..2 {
            for h in heads.clone() {
                for &p in positions {
                    out.extend((0..4).map(|e| at(b, h, p, e)));
                }
            }
        }
        out
    };
    // A cache's `narrow(2, 0, end)`, here positions 2..7, and a stepped slice of heads and
    // positions.
    let narrowed = source.clone().narrow(2, 2, 5);
    let expected = select(0..3, &[2, 3, 4, 5, 6]);
    assert_eq!(host(narrowed.clone()), expected, "narrow(2, 2, 5)");
    let stepped = source
        .clone()
        .slice(burn::tensor::s![.., 1..3, 1..10;3, ..]);
    let expected_stepped = select(1..3, &[1, 4, 7]);
    assert_eq!(stepped.dims(), [2, 2, 3, 4]);
    assert_eq!(
        host(stepped.clone()),
        expected_stepped,
        "s![.., 1..3, 1..10;3, ..]"
    );

    // Operations on slices that share the source's buffer: the source is untouched.
    let plus: Vec<f32> = expected.iter().map(|v| v + 1.0).collect();
    assert_eq!(host(narrowed.clone() + 1.0), plus, "narrowed + 1");
    let zeros = Tensor::<B, 4>::zeros([2, 2, 3, 4], &d);
    let assigned = source
        .clone()
        .slice_assign(burn::tensor::s![.., 1..3, 1..10;3, ..], zeros);
    assert!(host(assigned).iter().zip(&values).any(|(a, v)| a != v));
    drop((narrowed, stepped));
    assert_eq!(
        host(source.clone()),
        values,
        "the source after operations on its slices"
    );

    // A slice that owns its buffer alone works in place, on its own elements only.
    let alone = fresh().narrow(2, 2, 5);
    assert_eq!(host(alone + 1.0), plus, "unshared narrowed + 1");
    let alone = fresh().slice(burn::tensor::s![.., 1..3, 1..10;3, ..]);
    let doubled: Vec<f32> = expected_stepped.iter().map(|v| v * 2.0).collect();
    assert_eq!(host(alone * 2.0), doubled, "unshared stepped · 2");

    // QKᵀ and PV over a cache buffer of 2 rows × 3 heads, capacity 16, holding 11 positions.
    let (batch, heads, rows, capacity, end, hd) = (2, 3, 4, 16, 11, 8);
    let normal =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &d);
    let keys = normal([batch, heads, capacity, hd]).narrow(2, 0, end);
    let cache_values = normal([batch, heads, capacity, hd]).narrow(2, 0, end);
    let q = normal([batch, heads, rows, hd]);
    let p = normal([batch, heads, rows, end]);
    let scores = q.clone().matmul(keys.clone().swap_dims(2, 3));
    let mixed = p.clone().matmul(cache_values.clone());
    let matrix = |t: &Tensor<B, 4>, b: usize, h: usize| {
        t.clone()
            .narrow(0, b, 1)
            .narrow(1, h, 1)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    // `out` against `a · b` by hand, `a` `[m, k]` row-major, `b[e, j]` read by `b_at(e, j)`.
    let check =
        |what: &str, a: &[f32], b_at: &dyn Fn(usize, usize) -> f32, out: &[f32], k: usize| {
            let m = a.len() / k;
            let n = out.len() / m;
            for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
                let by_hand: f64 = (0..k)
                    .map(|e| f64::from(a[i * k + e]) * f64::from(b_at(e, j)))
                    .sum();
                let diff = (by_hand as f32 - out[i * n + j]).abs();
                assert!(diff < 1e-4, "{what}, ({i}, {j}): |Δ| = {diff}");
            }
        };
    for (b, h) in (0..batch).flat_map(|b| (0..heads).map(move |h| (b, h))) {
        let (k, v) = (matrix(&keys, b, h), matrix(&cache_values, b, h));
        let what = format!("row {b}, head {h}");
        check(
            &format!("QKᵀ, {what}"),
            &matrix(&q, b, h),
            &|e, j| k[j * hd + e],
            &matrix(&scores, b, h),
            hd,
        );
        check(
            &format!("PV, {what}"),
            &matrix(&p, b, h),
            &|e, j| v[e * hd + j],
            &matrix(&mixed, b, h),
            end,
        );
    }
}

/// The element-wise operations that the burn-ndarray patch splits over threads for large tensors
/// (same-shape binary operations, operations with a scalar, exp, log and sqrt; in place when the
/// input is not shared, into a new buffer when it is) give every element exactly what the
/// operation gives it on the host, at a length that is split into ranges with an uneven last one.
#[test]
fn large_element_wise_operations_equal_the_elementwise_definition() {
    let _rng = seeded(15);
    let d = device();
    let n = 300_001;
    let host = |t: Tensor<B, 1>| t.into_data().to_vec::<f32>().unwrap();
    let a = Tensor::<B, 1>::random([n], Distribution::Uniform(0.5, 2.0), &d);
    let b = Tensor::<B, 1>::random([n], Distribution::Uniform(0.5, 2.0), &d);
    let (ha, hb) = (host(a.clone()), host(b.clone()));
    let check = |what: &str, got: Vec<f32>, f: &dyn Fn(f32, f32) -> f32| {
        assert_eq!(got.len(), n, "{what}");
        for (i, ((x, y), g)) in ha.iter().zip(&hb).zip(&got).enumerate() {
            let want = f(*x, *y);
            assert!(
                want.to_bits() == g.to_bits(),
                "{what}: element {i}: {g} ≠ {want}"
            );
        }
    };
    // `a` and `b` stay alive, so their buffers are shared: each result goes to a new buffer.
    check("a + b", host(a.clone() + b.clone()), &|x, y| x + y);
    check("a * b", host(a.clone() * b.clone()), &|x, y| x * y);
    check("a / b", host(a.clone() / b.clone()), &|x, y| x / y);
    check("a * 3", host(a.clone().mul_scalar(3.0)), &|x, _| x * 3.0);
    check("a - 0.25", host(a.clone().sub_scalar(0.25)), &|x, _| {
        x - 0.25
    });
    check("exp a", host(a.clone().exp()), &|x, _| x.exp());
    check("log a", host(a.clone().log()), &|x, _| x.ln());
    check("sqrt a", host(a.clone().sqrt()), &|x, _| x.sqrt());
    // Results of other operations are not shared: these run in place.
    let fresh = || a.clone() * 1.0;
    check("(a·1) + b", host(fresh() + b.clone()), &|x, y| x + y);
    check("(a·1) * 3", host(fresh().mul_scalar(3.0)), &|x, _| x * 3.0);
    check("exp (a·1)", host(fresh().exp()), &|x, _| x.exp());
    check("sqrt (a·1)", host(fresh().sqrt()), &|x, _| x.sqrt());
}
