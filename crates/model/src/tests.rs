//! Joint-model tests: gradients by finite differences, zero adapters, IW bound, cached assistants,
//! ablations against independent formulas.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_elbo::token_log_probs;
use chorus_latent::PriorConfig;
use chorus_lm::{Gpt2Config, LlamaConfig, Lm, LmConfig, LmInput};

use crate::{Chorus, ChorusBatch, ChorusConfig, ModelError};

type F64 = burn::backend::NdArray<f64>;
type AD = Autodiff<F64>;

pub(crate) fn llama(vocab: usize, d_model: usize) -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: vocab,
        d_model,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 32,
    })
}

pub(crate) fn gpt2(vocab: usize) -> LmConfig {
    LmConfig::Gpt2(Gpt2Config {
        vocab_size: vocab,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        d_ff: 16,
        max_seq_len: 32,
        norm_eps: 1e-5,
        tie_embeddings: false,
    })
}

/// Base (llama, d 12) + assistants (gpt2 d 8, llama d 8): different widths and families.
pub(crate) fn chorus<B: Backend>(config: ChorusConfig, n_assistants: usize) -> Chorus<B> {
    let device = Default::default();
    let base = llama(20, 12).init::<B>(&device).unwrap();
    let assistants: Vec<Lm<B>> = [gpt2(20), llama(20, 8)]
        .into_iter()
        .take(n_assistants)
        .map(|c| c.init::<B>(&device).unwrap())
        .collect();
    Chorus::new(config, base, assistants, &device).unwrap()
}

/// Two rows of 6 positions: row 0 has 2 context tokens; row 1 has no context and one padding slot.
pub(crate) fn batch<B: Backend>() -> ChorusBatch<B> {
    let device = Default::default();
    let seq: [[i64; 7]; 2] = [[3, 7, 1, 4, 1, 5, 2], [9, 2, 6, 5, 3, 2, 0]];
    let tokens: Vec<i64> = seq.iter().flat_map(|r| r[..6].to_vec()).collect();
    let targets: Vec<i64> = seq.iter().flat_map(|r| r[1..].to_vec()).collect();
    ChorusBatch {
        tokens: Tensor::from_data(TensorData::new(tokens, [2, 6]), &device),
        targets: Tensor::from_data(TensorData::new(targets, [2, 6]), &device),
        // Row 0: targets from position 1 on are x (x starts after the 2 context tokens).
        target_mask: Tensor::from_data(
            [
                [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
            ],
            &device,
        ),
        context_mask: Tensor::from_data([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0; 6]], &device),
        padding: Tensor::from_data(
            TensorData::new(
                vec![
                    false, false, false, false, false, false, false, false, false, false, false,
                    true,
                ],
                [2, 6],
            ),
            &device,
        ),
        assistant_log_probs: None,
    }
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

/// The KL weight β of the tests that do not need β = 1.
const BETA: f64 = 0.7;

/// A 270-token BPE for the save → load round trips.
fn tiny_tokenizer() -> chorus_lm::Tokenizer {
    chorus_lm::Tokenizer::train_bpe(
        ["the cat sat on the mat."].iter().cycle().take(20),
        270,
        &["<|endoftext|>"],
    )
    .unwrap()
}

fn full_config() -> ChorusConfig {
    ChorusConfig {
        d_latent: 4,
        memory_slots: 1,
        embedding_offset: true,
        free_bits: 0.0,
        ..ChorusConfig::default()
    }
}

/// burn-ndarray's RNG is one process-wide generator: tests that draw from it (model initialisation
/// included) take turns and seed it first, so a seed pins every draw and a failure reproduces.
pub(crate) fn seeded(seed: u64) -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    F64::seed(&Default::default(), seed);
    guard
}

type ParamOf = fn(&mut Chorus<AD>) -> &mut Param<Tensor<AD, 2>>;

/// The base's first-layer weights, for finite differences through the base LM itself.
fn base_llama(m: &mut Chorus<AD>) -> &mut chorus_lm::Llama<AD> {
    match &mut m.base {
        Lm::Llama(l) => l,
        Lm::Gpt2(_) => unreachable!("the test base is a llama"),
    }
}

/// Autodiff against central differences on one entry of each of: posterior, conditional prior,
/// selector, the base's attention and embedding, the base's memory key and value and embedding
/// offset, both assistants' adapters. With `free_bits` on, λ is put between the per-dimension KLs
/// so some dimensions are clamped (zero gradient) and some are not.
fn check_finite_differences(free_bits: bool) {
    let _rng = seeded(17);
    let device = Default::default();
    // Two memory slots: with one, the softmax over slots is constant and keys are inert.
    let config = ChorusConfig {
        memory_slots: 2,
        ..full_config()
    };
    let mut model = chorus::<AD>(config, 2);
    // Move the zero-initialised adapter projections off zero so every path carries signal.
    let perturb = |p: &mut Param<Tensor<AD, 2>>| {
        *p = Param::from_tensor(p.val().random_like(Distribution::Normal(0.0, 0.3)));
    };
    for a in model
        .base_adapter
        .iter_mut()
        .chain(&mut model.assistant_adapters)
    {
        for linear in [&mut a.memory_key, &mut a.memory_value, &mut a.embedding]
            .into_iter()
            .flatten()
        {
            perturb(&mut linear.weight);
        }
    }
    perturb(&mut model.selector.as_mut().unwrap().proj.weight);
    let batch = batch::<AD>();
    if free_bits {
        let latent = model.latent_distributions(&batch).unwrap().unwrap();
        let mut kl = latent
            .posterior
            .kl(&latent.prior)
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        kl.sort_by(f64::total_cmp);
        let mid = kl.len() / 2;
        assert!(kl[mid] - kl[mid - 1] > 1e-5, "KLs too close: {kl:?}");
        model.config.free_bits = 0.5 * (kl[mid - 1] + kl[mid]);
    }
    let eps = Tensor::<AD, 3>::random([2, 2, 4], Distribution::Normal(0.0, 1.0), &device);
    let loss = |m: &Chorus<AD>| {
        scalar(
            m.forward_elbo_with_noise(&batch, BETA, Some(eps.clone()))
                .unwrap()
                .terms
                .loss,
        )
    };
    if free_bits {
        let mut plain = model.clone();
        plain.config.free_bits = 0.0;
        assert!(loss(&plain) < loss(&model), "λ clamps no dimension");
    }

    let checks: [(&str, ParamOf, [usize; 2]); 10] = [
        (
            "posterior",
            |m| &mut m.posterior.as_mut().unwrap().proj.weight,
            [3, 5],
        ),
        (
            "prior",
            |m| &mut m.prior.as_mut().unwrap().head.as_mut().unwrap().proj.weight,
            [2, 1],
        ),
        (
            "selector",
            |m| &mut m.selector.as_mut().unwrap().proj.weight,
            [4, 2],
        ),
        (
            "base q_proj",
            |m| &mut base_llama(m).layers[0].self_attn.q_proj.weight,
            [5, 3],
        ),
        (
            "base embedding",
            |m| &mut base_llama(m).embed_tokens.weight,
            [4, 6],
        ),
        (
            "base memory key",
            |m| {
                let a = m.base_adapter.as_mut().unwrap();
                &mut a.memory_key.as_mut().unwrap().weight
            },
            [2, 1],
        ),
        (
            "base memory value",
            |m| {
                let a = m.base_adapter.as_mut().unwrap();
                &mut a.memory_value.as_mut().unwrap().weight
            },
            [1, 7],
        ),
        (
            "base embedding offset",
            |m| {
                let a = m.base_adapter.as_mut().unwrap();
                &mut a.embedding.as_mut().unwrap().weight
            },
            [3, 2],
        ),
        (
            "assistant 1 memory key",
            |m| &mut m.assistant_adapters[0].memory_key.as_mut().unwrap().weight,
            [0, 2],
        ),
        (
            "assistant 2 embedding offset",
            |m| &mut m.assistant_adapters[1].embedding.as_mut().unwrap().weight,
            [0, 3],
        ),
    ];
    let out = model
        .forward_elbo_with_noise(&batch, BETA, Some(eps.clone()))
        .unwrap();
    let grads = out.terms.loss.backward();
    for (name, param, [i, j]) in checks {
        let p = param(&mut model).clone();
        let [_, cols] = p.dims();
        let analytic = p.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap()[i * cols + j];
        let h = 1e-5;
        let shifted = |delta: f64| {
            let mut m = model.clone();
            let target = param(&mut m);
            let mut values = target.val().into_data().to_vec::<f64>().unwrap();
            values[i * cols + j] += delta;
            *target = Param::from_tensor(Tensor::from_data(
                TensorData::new(values, target.dims()),
                &device,
            ));
            loss(&m)
        };
        let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
        let tolerance = 1e-6 * analytic.abs().max(1.0);
        assert!(
            (numeric - analytic).abs() < tolerance,
            "{name} (free bits {free_bits}): autodiff {analytic} vs finite difference {numeric}"
        );
        assert!(
            analytic.abs() > 1e-9,
            "{name}: gradient is zero, the check is vacuous"
        );
    }
}

#[test]
fn elbo_gradients_match_finite_differences() {
    check_finite_differences(false);
}

#[test]
fn elbo_gradients_match_finite_differences_with_free_bits() {
    check_finite_differences(true);
}

#[test]
fn zero_initialised_adapters_leave_every_model_unchanged() {
    let _rng = seeded(32);
    let device = Default::default();
    let model = chorus::<F64>(full_config(), 2);
    let batch = batch::<F64>();
    let z = Tensor::<F64, 2>::random([2, 4], Distribution::Normal(0.0, 2.0), &device);
    let bare: [&Lm<F64>; 3] = [&model.base, &model.assistants[0], &model.assistants[1]];
    for (j, lm) in bare.into_iter().enumerate() {
        let input = || LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
        let conditioned = model
            .member(j)
            .forward(input(), Some(z.clone()), None)
            .unwrap()
            .logits;
        let plain = lm.forward(input(), None).unwrap().logits;
        assert_eq!(conditioned.into_data(), plain.into_data(), "model {j}");
    }
}

#[test]
fn iw_bound_is_above_the_elbo_and_rises_with_samples() {
    let _rng = seeded(33);
    let device = Default::default();
    F64::seed(&device, 99);
    let mut model = chorus::<F64>(full_config(), 1);
    // Make z matter and q imperfect, so the bounds are distinguishable.
    let adapter = model.base_adapter.as_mut().unwrap();
    let w = adapter.embedding.as_ref().unwrap().weight.val();
    adapter.embedding.as_mut().unwrap().weight =
        Param::from_tensor(w.random_like(Distribution::Normal(0.0, 1.0)));
    let q_w = model.posterior.as_ref().unwrap().proj.weight.val();
    model.posterior.as_mut().unwrap().proj.weight =
        Param::from_tensor(q_w.random_like(Distribution::Normal(0.0, 0.3)));
    let batch = batch::<F64>();
    let mean_over =
        |reps: usize, f: &dyn Fn() -> f64| (0..reps).map(|_| f()).sum::<f64>() / reps as f64;
    let elbo = mean_over(400, &|| {
        -scalar(model.forward_elbo(&batch, 1.0).unwrap().terms.loss) * 2.0
    });
    let iw = |s: usize, reps: usize| {
        mean_over(reps, &|| {
            scalar(model.iw_log_likelihood(&batch, s).unwrap().sum())
        })
    };
    let (iw1, iw8, iw64) = (iw(1, 400), iw(8, 100), iw(64, 25));
    // S = 1 is an unbiased estimate of the ELBO itself.
    assert!(
        (iw1 - elbo).abs() < 0.05 * elbo.abs(),
        "IW(1) {iw1} vs ELBO {elbo}"
    );
    assert!(
        iw8 > elbo && iw64 >= iw8 - 1e-3,
        "ELBO {elbo}, IW(8) {iw8}, IW(64) {iw64}"
    );
}

#[test]
fn cached_assistant_log_probs_give_the_same_loss_as_live_assistants() {
    let _rng = seeded(34);
    let device = Default::default();
    let config = ChorusConfig {
        assistant_adapters: false,
        n_samples: 3,
        ..full_config()
    };
    let model = chorus::<F64>(config, 2);
    let mut batch = batch::<F64>();
    // S = 3 samples of z per row: the cached log-probs are broadcast over samples.
    let eps = Tensor::<F64, 3>::random([3, 2, 4], Distribution::Normal(0.0, 1.0), &device);
    let live = scalar(
        model
            .forward_elbo_with_noise(&batch, BETA, Some(eps.clone()))
            .unwrap()
            .terms
            .loss,
    );
    batch.assistant_log_probs = Some(model.assistant_log_probs(&batch).unwrap());
    let cached = scalar(
        model
            .forward_elbo_with_noise(&batch, BETA, Some(eps))
            .unwrap()
            .terms
            .loss,
    );
    assert!((live - cached).abs() < 1e-12, "{live} vs {cached}");
    // Adapted assistants depend on z and cannot be cached.
    let adapted = chorus::<F64>(full_config(), 1);
    let err = adapted.assistant_log_probs(&batch).unwrap_err().to_string();
    assert!(err.contains("depend on z"), "{err}");
}

#[test]
fn without_z_k2_is_co_llm_and_k1_is_the_plain_lm() {
    let _rng = seeded(35);
    let batch = batch::<F64>();
    let no_z = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    // K = 1, no z: loss = Σ_t −log P_base(x_t), averaged over rows.
    let lm_only = chorus::<F64>(no_z.clone(), 0);
    let loss = scalar(lm_only.forward_elbo(&batch, 1.0).unwrap().terms.loss);
    let logits = lm_only
        .base
        .forward(
            LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone()),
            None,
        )
        .unwrap()
        .logits;
    let nll = -(token_log_probs(logits, batch.targets.clone()) * batch.target_mask.clone())
        .sum()
        .into_scalar()
        / 2.0;
    assert!((loss - nll).abs() < 1e-10, "{loss} vs {nll}");
    // K = 2, no z: −log(σ(−d) P_base + σ(d) P_asst) with d the selector's deferral logit. The
    // selector is random (its zero initialisation would make d = 0 whatever hidden state it read).
    let mut co_llm = chorus::<F64>(no_z, 1);
    let selector = co_llm.selector.as_mut().unwrap();
    selector.proj.weight = Param::from_tensor(
        selector
            .proj
            .weight
            .val()
            .random_like(Distribution::Normal(0.0, 1.0)),
    );
    let out = co_llm.forward_elbo(&batch, 1.0).unwrap();
    let input = || LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
    let base = co_llm.base.forward(input(), None).unwrap();
    let asst = co_llm.assistants[0].forward(input(), None).unwrap().logits;
    let p_base = token_log_probs(base.logits, batch.targets.clone()).exp();
    let p_asst = token_log_probs(asst, batch.targets.clone()).exp();
    let logits = co_llm.selector.as_ref().unwrap().proj.forward(base.hidden); // [b, t, 2]
    let d = logits.clone().narrow(2, 1, 1) - logits.narrow(2, 0, 1);
    let d = d.squeeze_dim::<2>(2);
    // σ(x) = 1 / (1 + e^{−x}) by hand: burn's sigmoid rounds through f32.
    let sigmoid = |x: Tensor<F64, 2>| (x.neg().exp() + 1.0).recip();
    let per_token = -(sigmoid(d.clone().neg()) * p_base + sigmoid(d) * p_asst).log();
    let expected = (per_token * batch.target_mask.clone()).sum().into_scalar() / 2.0;
    let loss = scalar(out.terms.loss);
    assert!(
        (loss - expected).abs() < 1e-10,
        "{loss} vs Co-LLM {expected}"
    );
    // The router posterior is a distribution over models at every position.
    let sums = out.router.sum_dim(2);
    assert!((sums - 1.0).abs().max().into_scalar() < 1e-12);
}

#[test]
fn models_with_different_vocabularies_are_rejected() {
    let _rng = seeded(36);
    let device = Default::default();
    let base = llama(20, 12).init::<F64>(&device).unwrap();
    let other = gpt2(21).init::<F64>(&device).unwrap();
    let err = Chorus::new(ChorusConfig::default(), base, vec![other], &device).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::VocabMismatch {
                base: 20,
                assistant: 1,
                vocab: 21
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("share one tokenizer"));
}

/// The selector chooses among every model, K = 1 + local + remote assistants: a model built
/// with remote assistants (served elsewhere, so absent from `Chorus::new`'s list) still has a
/// log π over all K.
#[test]
fn the_selector_chooses_among_local_and_remote_assistants() {
    let _rng = seeded(63);
    let device = Default::default();
    for (local, remote) in [(0, 1), (1, 2), (2, 0)] {
        let config = ChorusConfig {
            remote_assistants: remote,
            assistant_adapters: false,
            ..full_config()
        };
        let base = llama(20, 12).init::<F64>(&device).unwrap();
        let assistants = (0..local)
            .map(|_| llama(20, 8).init::<F64>(&device).unwrap())
            .collect();
        let m = Chorus::new(config, base, assistants, &device).unwrap();
        let k = 1 + local + remote;
        assert_eq!(m.n_models(), k, "{local} local, {remote} remote");
        let hidden = Tensor::<F64, 3>::zeros([1, 2, 12], &device);
        let log_pi = m
            .selector
            .as_ref()
            .expect("K > 1 has a selector")
            .forward(hidden);
        assert_eq!(log_pi.dims(), [1, 2, k], "{local} local, {remote} remote");
    }
}

#[test]
fn bad_configs_are_rejected() {
    let _rng = seeded(37);
    for (bad, says) in [
        (r#"{"free_bits": -1.0}"#, "free_bits = -1"),
        (r#"{"n_samples": 0}"#, "n_samples = 0 must be ≥ 1"),
        (
            r#"{"memory_slots": 0, "embedding_offset": false}"#,
            "memory_slots > 0 or embedding_offset",
        ),
    ] {
        let config: ChorusConfig = serde_json::from_str(bad).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
    let config: ChorusConfig = serde_json::from_str(r#"{"free_bits": -1.0}"#).unwrap();
    assert!(
        matches!(
            config.validate(),
            Err(ModelError::OutOfRange { key: "free_bits", ref value, .. }) if value == "-1"
        ),
        "the error names the key and the value"
    );
    let err = serde_json::from_str::<ChorusConfig>(r#"{"d_latnet": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `d_latnet`"), "{err}");
    let _ = PriorConfig::StandardNormal;
}

#[test]
fn frozen_assistants_get_no_gradient_while_their_adapters_train() {
    let _rng = seeded(38);
    let device = Default::default();
    // Two slots: with a single slot the softmax over slots is constant and its keys get no gradient.
    let config = ChorusConfig {
        memory_slots: 2,
        ..full_config()
    };
    let mut model = chorus::<AD>(config, 1);
    let w = model.assistant_adapters[0]
        .memory_value
        .as_ref()
        .unwrap()
        .weight
        .val();
    model.assistant_adapters[0]
        .memory_value
        .as_mut()
        .unwrap()
        .weight = Param::from_tensor(w.random_like(Distribution::Normal(0.0, 0.3)));
    let batch = batch::<AD>();
    let eps = Tensor::<AD, 3>::random([1, 2, 4], Distribution::Normal(0.0, 1.0), &device);
    let loss = model
        .forward_elbo_with_noise(&batch, BETA, Some(eps))
        .unwrap()
        .terms
        .loss;
    let grads = loss.backward();
    let chorus_lm::Lm::Gpt2(assistant) = &model.assistants[0] else {
        unreachable!()
    };
    assert!(
        assistant.h[0].mlp.c_fc.weight.grad(&grads).is_none(),
        "frozen weights got a gradient"
    );
    let adapter = &model.assistant_adapters[0];
    for (name, linear) in [
        ("key", &adapter.memory_key),
        ("value", &adapter.memory_value),
        ("embedding", &adapter.embedding),
    ] {
        let grad = linear.as_ref().unwrap().weight.grad(&grads);
        assert!(
            grad.is_some_and(|g| g.abs().sum().into_scalar() > 0.0),
            "adapter {name} has no gradient"
        );
    }
}

/// A frozen base (`train_base = false`, e.g. SmolLM2 as the base): no gradient reaches its
/// weights, while its z-adapter, the posterior head and the selector train; the freeze survives
/// save → load. A frozen base with nothing else to train is refused.
#[test]
fn a_frozen_base_gets_no_gradient_while_its_adapter_posterior_and_selector_train() {
    let _rng = seeded(39);
    let device = Default::default();
    let frozen = ChorusConfig {
        memory_slots: 2,
        train_base: false,
        ..full_config()
    };
    let gradients = |mut model: Chorus<AD>| {
        let w = model
            .base_adapter
            .as_ref()
            .unwrap()
            .memory_value
            .as_ref()
            .unwrap()
            .weight
            .val();
        model
            .base_adapter
            .as_mut()
            .unwrap()
            .memory_value
            .as_mut()
            .unwrap()
            .weight = Param::from_tensor(w.random_like(Distribution::Normal(0.0, 0.3)));
        let eps = Tensor::<AD, 3>::random([1, 2, 4], Distribution::Normal(0.0, 1.0), &device);
        let grads = model
            .forward_elbo_with_noise(&batch::<AD>(), BETA, Some(eps))
            .unwrap()
            .terms
            .loss
            .backward();
        let has = |g: Option<Tensor<F64, 2>>| g.is_some_and(|g| g.abs().sum().into_scalar() > 0.0);
        let base = base_llama(&mut model);
        let base_weights = [
            base.layers[0].mlp.gate_proj.weight.grad(&grads),
            base.layers[0].self_attn.q_proj.weight.grad(&grads),
            base.embed_tokens.weight.grad(&grads),
        ]
        .map(|g| g.is_some());
        let adapter = model.base_adapter.as_ref().unwrap();
        let trained = [
            has(adapter.memory_key.as_ref().unwrap().weight.grad(&grads)),
            has(adapter.embedding.as_ref().unwrap().weight.grad(&grads)),
            has(model.posterior.as_ref().unwrap().proj.weight.grad(&grads)),
            has(model.selector.as_ref().unwrap().proj.weight.grad(&grads)),
        ];
        (base_weights, trained)
    };
    let (base, trained) = gradients(chorus::<AD>(frozen.clone(), 1));
    assert_eq!(base, [false; 3], "frozen base weights got a gradient");
    assert_eq!(
        trained, [true; 4],
        "adapter key/embedding, posterior, selector"
    );
    // The same model with its base trainable: the base's weights do get gradients.
    let (base, _) = gradients(chorus::<AD>(full_config(), 1));
    assert_eq!(base, [true; 3]);
    // Saved and loaded, the base is still frozen.
    let tokenizer = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    chorus::<AD>(frozen.clone(), 1)
        .save(dir.path(), &tokenizer, &["base".to_string(), "a".into()])
        .unwrap();
    let loaded = Chorus::<AD>::load(dir.path(), &device).unwrap().model;
    let (base, trained) = gradients(loaded);
    assert_eq!(
        (base, trained),
        ([false; 3], [true; 4]),
        "after save → load"
    );
    // Nothing to train: no z, no assistants, a frozen base.
    let nothing = ChorusConfig {
        d_latent: 0,
        ..frozen
    };
    let base = llama(20, 12).init::<AD>(&device).unwrap();
    let Err(err) = Chorus::new(nothing, base, Vec::new(), &device) else {
        panic!("a frozen base with nothing to train was accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("train_base") && err.contains("nothing to train"),
        "{err}"
    );
}

/// The skeleton [`Chorus::load`] fills from the record draws none of the weights its frozen
/// models have not initialised yet (burn's `no_grad` would draw every weight of a frozen SmolLM2
/// only to discard it), and freezes them all the same; [`Chorus::new`] initialises every
/// parameter, so that a clone of the model holds the same values.
#[test]
fn a_skeleton_draws_no_weights_and_a_new_model_holds_all_of_its_own() {
    use burn::module::{Module, ModuleVisitor};
    struct Drawn(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Drawn {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += usize::from(param.is_initialized());
            self.1 += 1;
        }
    }
    fn drawn<M: Module<AD>>(module: &M) -> Drawn {
        let mut visitor = Drawn(0, 0);
        module.visit(&mut visitor);
        visitor
    }
    let device = Default::default();
    let models = || {
        let base = llama(20, 12).init::<AD>(&device).unwrap();
        let assistant = llama(20, 8).init::<AD>(&device).unwrap();
        (base, assistant)
    };
    let config = ChorusConfig {
        train_base: false,
        ..full_config()
    };
    let (base, assistant) = models();
    // The norms' weights start initialised (ones); the matrices are lazy.
    let before = [drawn(&base), drawn(&assistant)].map(|Drawn(initialised, _)| initialised);
    let skeleton = Chorus::skeleton(config.clone(), base, vec![assistant], &device).unwrap();
    for ((name, lm), before) in [
        ("base", &skeleton.base),
        ("assistant", &skeleton.assistants[0]),
    ]
    .into_iter()
    .zip(before)
    {
        let Drawn(initialised, all) = drawn(lm);
        assert!(
            before < all,
            "{name}: {before} of {all} initialised at first"
        );
        assert_eq!(
            initialised - before,
            0,
            "freezing the {name} drew {} of its {all} weights",
            initialised - before
        );
        assert!(!lm_weight(lm).is_require_grad(), "the {name} is not frozen");
    }
    let (base, assistant) = models();
    let model = Chorus::new(config, base, vec![assistant], &device).unwrap();
    let Drawn(initialised, all) = drawn(&model);
    assert_eq!(initialised, all, "Chorus::new left parameters lazy");
    let diff = (lm_weight(&model.assistants[0]) - lm_weight(&model.clone().assistants[0]))
        .abs()
        .max()
        .into_scalar();
    assert_eq!(diff, 0.0, "a clone holds other values");
}

/// The first layer's query weights of a test llama.
fn lm_weight(lm: &Lm<AD>) -> Tensor<AD, 2> {
    match lm {
        Lm::Llama(l) => l.layers[0].self_attn.q_proj.weight.val(),
        Lm::Gpt2(_) => unreachable!("a llama"),
    }
}

/// [`crate::SavedChorus::attach_gguf_blocks`] tries the frozen members whose source is a GGUF
/// file, only those and each with its own source, and says why each one it could not attach
/// stays on its f32 weights (here: every file is missing; the success is chorus-lm's
/// `blocks_attach_only_to_the_model_whose_weights_they_hold`).
#[test]
fn only_frozen_members_from_gguf_files_are_given_their_blocks() {
    let _rng = seeded(41);
    let device = Default::default();
    let tokenizer = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let sources = ["base.gguf", "a/lm", "b.GGUF"].map(|s| dir.path().join(s).display().to_string());
    let note = |who: &str, source: &str| {
        format!("{who} decodes from its f32 weights, not {source}'s blocks: {source}: ")
    };
    for (train_base, train_assistants, expected) in [
        (true, false, vec![note("assistant 2", &sources[2])]),
        (false, true, vec![note("the base", &sources[0])]),
        (true, true, vec![]),
    ] {
        let config = ChorusConfig {
            train_base,
            train_assistants,
            ..full_config()
        };
        chorus::<F64>(config, 2)
            .save(dir.path(), &tokenizer, &sources)
            .unwrap();
        let notes = Chorus::<F64>::load(dir.path(), &device)
            .unwrap()
            .attach_gguf_blocks();
        assert_eq!(notes.len(), expected.len(), "{notes:?}");
        for (note, expected) in notes.iter().zip(&expected) {
            assert!(note.starts_with(expected), "{note:?} is not {expected:?}…");
        }
    }
}

/// The control with z fixed at the prior mean: its ELBO and its evaluation are exactly
/// `log p(x | c, z = E p(z | c))` — the sum over writers of [`Chorus::token_terms`] at the prior
/// mean, by hand — whatever the noise, seeds or sample count; its KL is zero; the prior and the
/// adapters train and the posterior gets no gradient; decoding reads the prior mean whatever the
/// source; and it needs z.
#[test]
fn z_fixed_at_the_prior_mean_is_the_likelihood_at_the_prior_mean() {
    use crate::ZSource;
    let _rng = seeded(41);
    let device = Default::default();
    let config = ChorusConfig {
        z_at_prior_mean: true,
        ..full_config()
    };
    let mut model = chorus::<AD>(config.clone(), 2);
    // Non-zero adapters, so that z changes the likelihood.
    let adapter = model.base_adapter.as_mut().unwrap();
    let embedding = adapter.embedding.as_mut().unwrap();
    embedding.weight = Param::from_tensor(
        embedding
            .weight
            .val()
            .random_like(Distribution::Normal(0.0, 0.5)),
    );
    let batch = batch::<AD>();
    let prior_mean = model
        .latent_distributions(&batch)
        .unwrap()
        .unwrap()
        .prior
        .mean;
    let by_hand = |z: Tensor<AD, 2>| -> Vec<f64> {
        let (log_pi, log_p) = model.token_terms(&batch, Some(z)).unwrap();
        let per_token = (log_pi + log_p).exp().sum_dim(2).log().squeeze_dim::<2>(2);
        (per_token * batch.target_mask.clone())
            .sum_dim(1)
            .squeeze_dim::<1>(1)
            .into_data()
            .to_vec::<f64>()
            .unwrap()
    };
    let expected = by_hand(prior_mean.clone());
    let other = by_hand(prior_mean.clone().add_scalar(1.0));
    assert!(
        expected
            .iter()
            .zip(&other)
            .any(|(a, b)| (a - b).abs() > 1e-6),
        "z does not change the likelihood: the test would prove nothing"
    );
    let close = |got: Vec<f64>, what: &str| {
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-9, "{what}: {got:?} against {expected:?}");
        }
    };
    for (samples, seeds) in [(1, [1, 2]), (7, [3, 4])] {
        let evaluation = model.evaluate_batch(&batch, samples, &seeds).unwrap();
        assert!(
            evaluation.latent.is_none(),
            "the control reports no posterior"
        );
        close(
            evaluation.iw_log_likelihood.into_data().to_vec().unwrap(),
            "evaluation",
        );
    }
    let output = model.forward_elbo(&batch, BETA).unwrap();
    assert_eq!(
        output.terms.kl.clone().abs().sum().into_scalar(),
        0.0,
        "KL(p ‖ p)"
    );
    close(
        output
            .terms
            .reconstruction
            .clone()
            .into_data()
            .to_vec()
            .unwrap(),
        "the ELBO's reconstruction",
    );
    let grads = output.terms.loss.backward();
    let norm = |g: Option<Tensor<F64, 2>>| g.map_or(0.0, |g| g.abs().sum().into_scalar());
    let prior_head = model.prior.as_ref().unwrap().head.as_ref().unwrap();
    let adapter = model.base_adapter.as_ref().unwrap();
    assert!(
        norm(prior_head.proj.weight.grad(&grads)) > 0.0,
        "the prior trains"
    );
    assert!(
        norm(adapter.embedding.as_ref().unwrap().weight.grad(&grads)) > 0.0,
        "the adapter trains"
    );
    assert_eq!(
        norm(model.posterior.as_ref().unwrap().proj.weight.grad(&grads)),
        0.0,
        "the posterior is not used"
    );
    // Decoding: the prior mean, whatever the source.
    let prompt = [3u32, 7, 1];
    let mean = model
        .decoding_z(&ZSource::PriorMean, &prompt, 1, &device)
        .unwrap()
        .unwrap();
    for source in [
        ZSource::PriorSample { seed: 5 },
        ZSource::Posterior {
            reference: &[4, 1, 5],
        },
    ] {
        let z = model
            .decoding_z(&source, &prompt, 1, &device)
            .unwrap()
            .unwrap();
        assert_eq!(
            z.into_data().to_vec::<f64>().unwrap(),
            mean.clone().into_data().to_vec::<f64>().unwrap(),
            "{source:?}"
        );
    }
    // It needs z.
    let base = llama(20, 12).init::<AD>(&device).unwrap();
    let without_z = ChorusConfig {
        d_latent: 0,
        ..config
    };
    let Err(err) = Chorus::new(without_z, base, Vec::new(), &device) else {
        panic!("z at the prior mean without z was accepted")
    };
    let err = err.to_string();
    assert!(err.contains("z_at_prior_mean"), "{err}");
}

/// Every float parameter of a model, in module order.
fn parameter_values<B: Backend>(model: &Chorus<B>) -> Vec<f64> {
    struct Collect(Vec<f64>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f64>();
            self.0.extend(data.to_vec::<f64>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    burn::module::Module::visit(model, &mut c);
    c.0
}

/// The bag-of-words term: the loss is the ELBO's minus α · mean_rows log p_bow(x | z), with
/// log p_bow evaluated by hand from the head's logits at the same z; its gradient reaches the head
/// and, through z, the posterior; evaluation ignores it; bad values are named.
#[test]
fn the_bag_of_words_term_by_hand_trains_the_head_and_leaves_evaluation_alone() {
    let _rng = seeded(43);
    let device = Default::default();
    let alpha = 0.5;
    let model = chorus::<AD>(
        ChorusConfig {
            bag_of_words: alpha,
            ..full_config()
        },
        2,
    );
    let mut plain = model.clone();
    plain.bag_of_words = None;
    plain.config.bag_of_words = 0.0;
    let batch = batch::<AD>();
    let eps = Tensor::<AD, 3>::random([1, 2, 4], Distribution::Normal(0.0, 1.0), &device);
    let with = model
        .forward_elbo_with_noise(&batch, BETA, Some(eps.clone()))
        .unwrap();
    let without = plain
        .forward_elbo_with_noise(&batch, BETA, Some(eps.clone()))
        .unwrap();
    // By hand: z = μ + σ ε, the head's logits at z, log-softmax and the target's tokens on the host.
    let q = model
        .latent_distributions(&batch)
        .unwrap()
        .unwrap()
        .posterior;
    let z = q.reparameterize(eps).squeeze_dim::<2>(0);
    let logits = model.bag_of_words.as_ref().unwrap().forward(z);
    let [rows, vocab] = logits.dims();
    let logits: Vec<f64> = logits.into_data().to_vec().unwrap();
    let targets: Vec<i64> = batch.targets.clone().into_data().to_vec().unwrap();
    let mask: Vec<f64> = batch.target_mask.clone().into_data().to_vec().unwrap();
    let seq = targets.len() / rows;
    let by_hand: Vec<f64> = (0..rows)
        .map(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let log_z = row.iter().map(|l| l.exp()).sum::<f64>().ln();
            (0..seq)
                .map(|t| mask[r * seq + t] * (row[targets[r * seq + t] as usize] - log_z))
                .sum()
        })
        .collect();
    let got: Vec<f64> = with
        .terms
        .bag_of_words
        .clone()
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    for (g, h) in got.iter().zip(&by_hand) {
        assert!((g - h).abs() < 1e-9, "{got:?} against {by_hand:?}");
    }
    let mean = by_hand.iter().sum::<f64>() / rows as f64;
    let (loss, plain_loss) = (
        scalar(with.terms.loss.clone()),
        scalar(without.terms.loss.clone()),
    );
    assert!(
        (loss - (plain_loss - alpha * mean)).abs() < 1e-9,
        "{loss} against {plain_loss} − {alpha} · {mean}"
    );
    assert!(without.terms.bag_of_words.is_none());
    // Gradients: the head trains, and the term moves the posterior through z.
    let grads = with.terms.loss.backward();
    let plain_grads = without.terms.loss.backward();
    let head = model.bag_of_words.as_ref().unwrap();
    assert!(head.weight.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
    let posterior_grad =
        |m: &Chorus<AD>, g: &<AD as burn::tensor::backend::AutodiffBackend>::Gradients| {
            m.posterior.as_ref().unwrap().proj.weight.grad(g).unwrap()
        };
    let moved = (posterior_grad(&model, &grads) - posterior_grad(&plain, &plain_grads))
        .abs()
        .sum()
        .into_scalar();
    assert!(moved > 1e-9, "the term does not reach the posterior");
    // Evaluation is the likelihood alone.
    let seeds = [5, 6];
    let iw = |m: &Chorus<AD>| -> Vec<f64> {
        m.evaluate_batch(&batch, 3, &seeds)
            .unwrap()
            .iw_log_likelihood
            .into_data()
            .to_vec()
            .unwrap()
    };
    assert_eq!(iw(&model), iw(&plain));
    // Bad values, each named.
    for (alpha, d_latent, at_prior_mean, key) in [
        (-1.0, 4, false, "bag_of_words"),
        (f64::NAN, 4, false, "bag_of_words"),
        (1.0, 0, false, "bag_of_words"),
        (1.0, 4, true, "bag_of_words"),
    ] {
        let config = ChorusConfig {
            bag_of_words: alpha,
            d_latent,
            z_at_prior_mean: at_prior_mean,
            ..full_config()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains(key),
            "{alpha} {d_latent} {at_prior_mean}: {err}"
        );
    }
}

#[test]
fn a_saved_model_loads_to_the_same_parameters_and_damage_is_named() {
    let _rng = seeded(41);
    let device = Default::default();
    // With the bag-of-words head, so that its weights make the round trip too.
    let config = ChorusConfig {
        bag_of_words: 0.5,
        ..full_config()
    };
    let model = chorus::<F64>(config, 2);
    // Read first: burn initialises parameters lazily, at their first use.
    let before = parameter_values(&model);
    let tokenizer = chorus_lm::Tokenizer::train_bpe(
        ["the cat sat on the mat.", "a dog ran to the log!"]
            .iter()
            .cycle()
            .take(40),
        270,
        &["<|endoftext|>"],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sources = vec!["base.gguf".to_string(), "a".into(), "b".into()];
    let written = model.save(dir.path(), &tokenizer, &sources).unwrap();
    let saved = Chorus::<F64>::load(dir.path(), &device).unwrap();
    assert_eq!(saved.manifest, written);
    assert_eq!(saved.manifest.sources, sources);
    assert_eq!(saved.model.config, model.config);
    assert_eq!(saved.tokenizer.vocab_size(), tokenizer.vocab_size());
    let after = parameter_values(&saved.model);
    assert_eq!(before.len(), after.len());
    // Saved at burn's full precision, f32: what training's f32 backends hold exactly.
    let first_diff = before
        .iter()
        .zip(&after)
        .position(|(b, a)| *b as f32 != *a as f32);
    assert!(
        first_diff.is_none(),
        "parameters changed through save → load: first at {first_diff:?} of {}: {:?}",
        before.len(),
        first_diff.map(|i| (before[i], after[i]))
    );
    // One flipped byte in the weights, or in the tokenizer, is caught by the manifest's sha256.
    for file in [crate::WEIGHTS_FILE, crate::TOKENIZER_FILE] {
        let path = dir.path().join(file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = Chorus::<F64>::load(dir.path(), &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains(file) && err.contains("sha256"), "{err}");
        std::fs::write(&path, &good).unwrap();
    }
    // A manifest of an older chorus (the KL schedule lived in it): an error that says what to do.
    let manifest_path = dir.path().join(crate::MANIFEST_FILE);
    let mut old = serde_json::to_value(&written).unwrap();
    old["chorus"]["kl_schedule"] = serde_json::json!({"kind": "constant", "beta": 1.0});
    std::fs::write(&manifest_path, old.to_string()).unwrap();
    let err = Chorus::<F64>::load(dir.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.kl_schedule") && err.contains("older chorus"),
        "{err}"
    );
    // A manifest that describes other models than the weights: an error naming both files.
    let mut other = written.clone();
    other.assistants.swap(0, 1);
    std::fs::write(&manifest_path, serde_json::to_string(&other).unwrap()).unwrap();
    let err = Chorus::<F64>::load(dir.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.mpk") && err.contains("chorus.json"),
        "{err}"
    );
}

/// A composition of models read for decoding keeps the weights they make from their GGUF blocks
/// unmade ([`Chorus::new`] numbers the parameters without reading those), and a member's steps
/// leave them unmade: such a model holds its matrices once, as blocks. Reads SmolLM2's GGUF from
/// the cache (`chorus data fetch --models`, which `.ci/run` does); without it the test says so and
/// passes.
#[test]
fn a_composition_of_decoding_models_leaves_their_block_weights_unmade() {
    // The other tests' backend: NdArray<f32> and NdArray<f64> share a device, and burn's default
    // float type is the device's, so mixing them in one test process fails.
    type Cpu = F64;
    let path = chorus_data::smollm2_gguf(&chorus_data::fetch::cache_dir());
    if !path.is_file() {
        eprintln!(
            "skipped: {} is not there (run `chorus data fetch --models`)",
            path.display()
        );
        return;
    }
    let device = Default::default();
    let file = chorus_lm::GgufFile::open(&path).unwrap();
    let open = || Lm::<Cpu>::from_gguf_for_decoding(&file, &device).unwrap();
    let (base, assistant) = (open(), open());
    // Seven matrices in each of 30 layers and the tied embedding.
    let unmade = base.weights_made_on_use().len();
    assert_eq!(unmade, 30 * 7 + 1);
    let model = Chorus::compose(base, vec![assistant], &device).unwrap();
    for lm in std::iter::once(&model.base).chain(&model.assistants) {
        assert_eq!(lm.weights_made_on_use().len(), unmade);
    }
    let mut cache = model.base.new_cache();
    let prompt = Tensor::<Cpu, 2, Int>::from_data([[1, 504, 3458, 314]], &device);
    model
        .base
        .forward(LmInput::new(prompt), Some(&mut cache))
        .unwrap();
    assert_eq!(model.base.weights_made_on_use().len(), unmade);
}

/// Evaluation's two by-products that the bound does not show: the router posterior is
/// `r_t(j) ∝ π(j) P_j(x_t)` at z = E q for K ≥ 2 and absent for K = 1, and the seeded noise of
/// row r, sample s is draws `s · d .. (s + 1) · d` of `SplitMix64(seed_r)` whatever rows stand
/// beside it.
#[test]
fn evaluation_routes_at_the_posterior_mean_and_seeds_each_row_alone() {
    let _rng = seeded(35);
    let device = Default::default();
    let batch = batch::<F64>();
    let model = chorus::<F64>(full_config(), 1);
    let seeds = [5, 6];
    let router = model
        .evaluate_batch(&batch, 2, &seeds)
        .unwrap()
        .router
        .expect("K = 2 has a router posterior");
    let mean = model
        .latent_distributions(&batch)
        .unwrap()
        .unwrap()
        .posterior
        .mean;
    let (log_pi, log_p) = model.token_terms(&batch, Some(mean)).unwrap();
    let expected = chorus_latent::router_posterior(log_pi, log_p);
    assert_eq!(router.dims(), [2, 6, 2]);
    let diff = (router - expected).abs().max().into_scalar();
    assert!(diff < 1e-12, "router posterior off by {diff}");
    let alone = chorus::<F64>(full_config(), 0);
    assert!(
        alone
            .evaluate_batch(&batch, 2, &seeds)
            .unwrap()
            .router
            .is_none(),
        "K = 1 routes nothing"
    );

    let (samples, d) = (3, 4);
    let row_seeds = [11u64, 22, 33];
    let noise = crate::seeded_noise::<F64>(samples, &row_seeds, d, &device)
        .into_data()
        .to_vec::<f64>()
        .unwrap();
    for (r, &seed) in row_seeds.iter().enumerate() {
        let mut rng = chorus_data::rng::SplitMix64(seed);
        let draws: Vec<f64> = (0..samples * d)
            .map(|_| f64::from(rng.standard_normal() as f32))
            .collect();
        for s in 0..samples {
            let got = &noise[(s * row_seeds.len() + r) * d..][..d];
            assert_eq!(got, &draws[s * d..(s + 1) * d], "row {r}, sample {s}");
        }
    }
}

/// η calibration against its rule computed here from the model's per-token terms at z = the prior
/// mean: π* = max_{j≥1} π_j; candidates η = 0, the nearest-rank quantiles `sorted[round(q (n − 1))]`
/// of π*, η = 1; each scored by hard routing (the assistant j* = argmax_{j≥1} π_j where π* > η,
/// else the base); the lowest NLL chosen. K = 3 with a random selector, so that j* is a choice and
/// every π* differs. `decoding.json` round-trips, and a damaged one is named.
#[test]
fn calibration_scores_hard_routing_at_every_quantile_of_the_top_assistant_probability() {
    let _rng = seeded(61);
    let model = crate::decode_tests::model(2, 3);
    let batch = batch::<F64>();
    let host = |t: Tensor<F64, 3>| t.into_data().to_vec::<f64>().unwrap();
    let prior_mean = model
        .latent_distributions(&batch)
        .unwrap()
        .map(|l| l.prior.mean);
    let (log_pi, log_p) = model.token_terms(&batch, prior_mean.clone()).unwrap();
    let (pi, log_p) = (host(log_pi.exp()), host(log_p));
    let mask = batch
        .target_mask
        .clone()
        .into_data()
        .to_vec::<f64>()
        .unwrap();
    // (π*, log P_base, log P_j*) of every target token.
    let mut tokens = Vec::new();
    let mut writers = [0; 3];
    for (i, &m) in mask.iter().enumerate() {
        if m == 1.0 {
            let j = if pi[i * 3 + 2] > pi[i * 3 + 1] { 2 } else { 1 };
            writers[j] += 1;
            tokens.push((pi[i * 3 + j], log_p[i * 3], log_p[i * 3 + j]));
        }
    }
    assert_eq!(tokens.len(), 10);
    assert!(writers[1] > 0 && writers[2] > 0, "j* varies: {writers:?}");
    let mut sorted: Vec<f64> = tokens.iter().map(|t| t.0).collect();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted.windows(2).all(|w| w[0] < w[1]), "π* all differ");
    let routed_among = |tokens: &[(f64, f64, f64)], eta: f64| {
        let deferred: Vec<bool> = tokens.iter().map(|t| t.0 > eta).collect();
        let nll = tokens
            .iter()
            .zip(&deferred)
            .map(|(t, &d)| if d { -t.2 } else { -t.1 })
            .sum::<f64>()
            / 10.0;
        (nll, deferred.iter().filter(|&&d| d).count() as f64 / 10.0)
    };
    let routed = |eta: f64| routed_among(&tokens, eta);
    let quantiles = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];
    let mut want = vec![(None, 0.0)];
    want.extend(quantiles.map(|q| (Some(q), sorted[(q * 9.0_f64).round() as usize])));
    want.push((None, 1.0));

    let c = model.calibrate_eta([batch.clone()]).unwrap();
    assert_eq!(c.tokens, 10);
    assert_eq!(c.candidates.len(), want.len());
    for (got, &(quantile, eta)) in c.candidates.iter().zip(&want) {
        let (nll, deferral) = routed(eta);
        assert_eq!((got.quantile, got.eta), (quantile, eta));
        assert!((got.nll - nll).abs() < 1e-12, "{got:?}: nll {nll}");
        assert_eq!(got.deferral, deferral, "{got:?}");
    }
    // η = 0 defers every token, η = 1 none; a quantile η keeps its own token with the base.
    assert_eq!(
        (c.candidates[0].deferral, c.candidates[13].deferral),
        (1.0, 0.0)
    );
    assert_eq!(c.candidates[1].deferral, 0.9);
    let best = c
        .candidates
        .iter()
        .map(|k| k.nll)
        .fold(f64::INFINITY, f64::min);
    let first_best = c.candidates.iter().find(|k| k.nll == best).unwrap();
    assert_eq!(c.eta, first_best.eta);
    assert!(
        c.candidates.iter().any(|k| k.nll > best + 1e-3),
        "the choice matters: {c:?}"
    );

    // Tied assistants (π_1 = π_2 at every token): j* is the first, as decoding's argmax takes it.
    let mut tied = model.clone();
    let proj = &mut tied.selector.as_mut().unwrap().proj.weight;
    let w = proj.val();
    let [d, _] = w.dims();
    *proj = Param::from_tensor(w.clone().slice_assign([0..d, 2..3], w.slice([0..d, 1..2])));
    let (log_pi, log_p) = tied.token_terms(&batch, prior_mean).unwrap();
    let (pi, log_p) = (host(log_pi.exp()), host(log_p));
    let first: Vec<(f64, f64, f64)> = (0..mask.len())
        .filter(|&i| mask[i] == 1.0)
        .map(|i| {
            assert_eq!(pi[i * 3 + 1], pi[i * 3 + 2], "tied");
            (pi[i * 3 + 1], log_p[i * 3], log_p[i * 3 + 1])
        })
        .collect();
    assert!((0..mask.len()).any(|i| mask[i] == 1.0 && log_p[i * 3 + 1] != log_p[i * 3 + 2]));
    let c_tied = tied.calibrate_eta([batch.clone()]).unwrap();
    for got in &c_tied.candidates {
        let (nll, _) = routed_among(&first, got.eta);
        assert!((got.nll - nll).abs() < 1e-12, "tied, {got:?}: nll {nll}");
    }

    // Batches pool their tokens.
    let twice = model.calibrate_eta([batch.clone(), batch.clone()]).unwrap();
    assert_eq!(twice.tokens, 20);
    assert_eq!(twice.candidates[0], c.candidates[0]);
    assert_eq!(twice.candidates[13], c.candidates[13]);

    // decoding.json: absent, round trip, damage named.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(crate::EtaCalibration::load(dir.path()).unwrap(), None);
    c.save(dir.path()).unwrap();
    assert_eq!(crate::EtaCalibration::load(dir.path()).unwrap(), Some(c));
    let path = dir.path().join(crate::DECODING_FILE);
    std::fs::write(&path, r#"{"eta": 0.5}"#).unwrap();
    let err = crate::EtaCalibration::load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not an η calibration"),
        "{err}"
    );

    // Refused: no selector to calibrate; no target token to calibrate on.
    let alone = chorus::<F64>(ChorusConfig::default(), 0);
    let err = alone
        .calibrate_eta([batch.clone()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no selector"), "{err}");
    let mut unmasked = batch;
    unmasked.target_mask = unmasked.target_mask.zeros_like();
    let err = model.calibrate_eta([unmasked]).unwrap_err().to_string();
    assert!(err.contains("no target tokens"), "{err}");
}
