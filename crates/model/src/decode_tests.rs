//! Decoding tests: cached decoding against a full-recompute reference, the threshold rule's
//! extremes and the confidence rule's edge, the mixture against Σ_j π_j P_j by hand, provenance
//! counts, which steps ask a lazy assistant for logits, bad input and every setting's range at its
//! edges, and the sampling functions against their definitions (softmax with temperature,
//! categorical draws, truncation and its sorted prefix, the radix sort).

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use chorus_lm::LmInput;

use crate::decode::{LAST_BINADE, argmax, categorical, prefix_binades, radix_sort, reference_row};
use crate::tests::{chorus, seeded};
use crate::{
    Assistant, AssistantDecoder, AssistantUpdate, Chorus, ChorusBatch, ChorusConfig, DecodeConfig,
    Decoded, LocalLm, ModelError, ScoreRows, WriterStrategy, ZSource, mixture_probs,
    tempered_probs, truncate_probs,
};
use chorus_data::rng::SplitMix64;

type B = burn::backend::NdArray<f64>;

/// A chorus whose selector and every adapter (memory keys and values, embedding offsets, on the
/// base and on the assistants) are random, so writers vary and z reaches every model.
/// Callers hold [`seeded`]'s lock.
pub(crate) fn model(n_assistants: usize, d_latent: usize) -> Chorus<B> {
    let mut m: Chorus<B> = chorus(
        ChorusConfig {
            d_latent,
            memory_slots: 1,
            embedding_offset: true,
            assistant_adapters: true,
            ..ChorusConfig::default()
        },
        n_assistants,
    );
    let random = |p: &mut Param<Tensor<B, 2>>, std: f64| {
        *p = Param::from_tensor(p.val().random_like(Distribution::Normal(0.0, std)));
    };
    let selector = m.selector.as_mut().unwrap();
    random(&mut selector.proj.weight, 1.0);
    selector.proj.bias = None; // no head start for the base: writers vary
    for a in m.base_adapter.iter_mut().chain(&mut m.assistant_adapters) {
        for linear in [&mut a.memory_key, &mut a.memory_value, &mut a.embedding]
            .into_iter()
            .flatten()
        {
            random(&mut linear.weight, 0.5);
        }
    }
    m
}

fn z_for(m: &Chorus<B>, rows: usize) -> Option<Tensor<B, 2>> {
    m.config.has_z().then(|| {
        Tensor::random(
            [rows, m.config.d_latent],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    })
}

/// `generate` by full recomputation: at every step every model re-reads every row's whole sequence
/// (no KV cache, no catch-up), then writer and token are chosen by the rules of DESIGN §4 with the
/// same seeded draws in the same order. `stop(row, n)` ends a row after its n-th token, as a stop
/// string does.
fn reference(
    m: &Chorus<B>,
    prompt: &[u32],
    rows: usize,
    z: Option<Tensor<B, 2>>,
    config: &DecodeConfig,
    stop: impl Fn(usize, usize) -> bool,
) -> Vec<Decoded> {
    let device = Default::default();
    let k = m.n_models();
    let mut rng = SplitMix64(config.seed);
    let mut seqs = vec![prompt.to_vec(); rows];
    let mut out = vec![
        Decoded {
            tokens: Vec::new(),
            writers: Vec::new(),
            pi: Vec::new(),
        };
        rows
    ];
    let mut done = vec![false; rows];
    for _ in 0..config.max_new_tokens {
        let len = seqs[0].len();
        let flat: Vec<i64> = seqs.iter().flatten().map(|&t| t as i64).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows, len]), &device);
        let outs: Vec<_> = (0..k)
            .map(|j| {
                m.member(j)
                    .forward(LmInput::new(tokens.clone()), z.clone(), None)
                    .unwrap()
            })
            .collect();
        // The last position of each row, as rows of f64.
        let last = |t: Tensor<B, 3>| -> Vec<Vec<f64>> {
            let d = t.dims()[2];
            t.narrow(1, len - 1, 1)
                .reshape([rows, d])
                .into_data()
                .to_vec::<f64>()
                .unwrap()
                .chunks(d)
                .map(<[f64]>::to_vec)
                .collect()
        };
        let pi = match &m.selector {
            Some(selector) => last(selector.forward(outs[0].hidden.clone()).exp()),
            None => vec![vec![1.0 / k as f64; k]; rows],
        };
        let logits: Vec<Vec<Vec<f32>>> = outs
            .iter()
            .map(|o| {
                last(o.logits.clone())
                    .into_iter()
                    .map(|row| row.into_iter().map(|l| l as f32).collect())
                    .collect()
            })
            .collect();
        let writers: Vec<Option<usize>> = pi
            .iter()
            .enumerate()
            .map(|(r, p)| match config.strategy {
                WriterStrategy::Sample => Some(categorical(&mut rng, p)),
                WriterStrategy::Greedy => Some(argmax(p)),
                WriterStrategy::Threshold { eta } => {
                    let j = 1 + argmax(&p[1..]);
                    Some(if p[j] > eta { j } else { 0 })
                }
                WriterStrategy::Mixture => None,
                // The base's top-1 probability against τ; else the most confident assistant.
                WriterStrategy::Confidence { tau } => {
                    let top1 = |j: usize| {
                        let probs = tempered_probs(&logits[j][r], 1.0);
                        probs.into_iter().fold(0.0, f64::max)
                    };
                    Some(if top1(0) >= tau {
                        0
                    } else {
                        1 + argmax(&(1..k).map(top1).collect::<Vec<_>>())
                    })
                }
            })
            .collect();
        for r in 0..rows {
            if done[r] {
                seqs[r].push(config.eos.unwrap_or(0));
                continue;
            }
            let per_model: Vec<Vec<f64>> = (0..k)
                .map(|j| tempered_probs(&logits[j][r], config.temperature))
                .collect();
            let mut probs = match writers[r] {
                Some(j) => per_model[j].clone(),
                None => mixture_probs(&pi[r], &per_model),
            };
            truncate_probs(&mut probs, config.top_k, config.top_p);
            let token = if config.temperature == 0.0 {
                argmax(&probs)
            } else {
                categorical(&mut rng, &probs)
            };
            let writer = writers[r].unwrap_or_else(|| {
                argmax(
                    &(0..k)
                        .map(|j| pi[r][j] * per_model[j][token])
                        .collect::<Vec<_>>(),
                )
            });
            out[r].tokens.push(token as u32);
            out[r].writers.push(writer);
            out[r].pi.push(match m.selector {
                Some(_) => pi[r].iter().map(|&p| p as f32).collect(),
                None => (0..k)
                    .map(|j| if j == writer { 1.0 } else { 0.0 })
                    .collect(),
            });
            seqs[r].push(token as u32);
            if config.eos == Some(token as u32) || stop(r, out[r].tokens.len()) {
                done[r] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    out
}

#[test]
fn cached_decoding_equals_full_recomputation_for_every_strategy_and_update_mode() {
    let _rng = seeded(11);
    let device = Default::default();
    let prompt = [0u32, 5, 9, 3];
    let rows = 3;
    // Row 1 stops after its 4th token (a stop string); EOS = 7 ends any row that writes it.
    let stop = |r: usize, n: usize| r == 1 && n == 4;
    let (mut deferred, mut eos_seen) = (0, false);
    for (k, d_latent) in [(2, 4), (1, 4), (2, 0)] {
        let m = model(k, d_latent);
        let z = z_for(&m, rows); // a different z per row
        for (strategy, temperature, top_k, top_p) in [
            (WriterStrategy::Greedy, 0.0, 0, 1.0),
            (WriterStrategy::Sample, 1.0, 0, 1.0),
            (WriterStrategy::Sample, 0.8, 6, 0.9),
            // Greedy tokens from sampled writers: only the writers draw from the generator.
            (WriterStrategy::Sample, 0.0, 0, 1.0),
            (WriterStrategy::Threshold { eta: 0.3 }, 0.7, 0, 0.8),
            (WriterStrategy::Mixture, 1.2, 8, 1.0),
            (WriterStrategy::Mixture, 0.0, 0, 1.0),
        ] {
            let config = DecodeConfig {
                strategy,
                temperature,
                top_k,
                top_p,
                max_new_tokens: 12,
                eos: Some(7),
                seed: 3,
                ..DecodeConfig::default()
            };
            let want = reference(&m, &prompt, rows, z.clone(), &config, stop);
            for assistants in [
                AssistantUpdate::Eager,
                AssistantUpdate::Lazy,
                AssistantUpdate::Reencode,
            ] {
                let config = DecodeConfig {
                    assistants,
                    ..config.clone()
                };
                let mut emitted = vec![0; rows];
                let got = m
                    .generate(&prompt, rows, z.clone(), &config, &device, |r, _, _| {
                        emitted[r] += 1;
                        !stop(r, emitted[r])
                    })
                    .unwrap();
                let what = format!("K = {} d_latent {d_latent} {config:?}", k + 1);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.tokens, w.tokens, "{what}");
                    assert_eq!(g.writers, w.writers, "{what}");
                    for (a, b) in g.pi.iter().flatten().zip(w.pi.iter().flatten()) {
                        assert!((a - b).abs() < 1e-6, "{what}: π {a} vs {b}");
                    }
                }
                deferred += got
                    .iter()
                    .flat_map(|d| &d.writers)
                    .filter(|&&w| w != 0)
                    .count();
                eos_seen |= got.iter().any(|d| d.tokens.last() == Some(&7));
            }
            // Rows read different z: with z on, they (almost surely) do not all agree.
            if d_latent > 0 && strategy == WriterStrategy::Greedy {
                assert!(want[0].tokens != want[2].tokens || want[0].pi != want[2].pi);
            }
        }
    }
    // The cases are not vacuous: assistants wrote tokens, EOS and the stop rule ended rows.
    assert!(deferred > 0 && eos_seen);
}

#[test]
fn a_composition_with_the_confidence_rule_equals_full_recomputation() {
    let _rng = seeded(14);
    let device = Default::default();
    let prompt = [0u32, 5, 9, 3];
    let rows = 3;
    let (mut by_base, mut by_assistants, mut by_second) = (0, 0, 0);
    for n_assistants in [1, 2] {
        let trained = model(n_assistants, 0);
        let m = Chorus::compose(trained.base.clone(), trained.assistants.clone(), &device).unwrap();
        assert!(m.selector.is_none() && !m.config.has_z());
        // The untrained models' top-1 probabilities are small: τ near them splits the writers.
        for (tau, temperature) in [(0.06, 0.0), (0.08, 0.9), (0.0, 0.0), (1.0, 0.0)] {
            let config = DecodeConfig {
                strategy: WriterStrategy::Confidence { tau },
                temperature,
                max_new_tokens: 12,
                seed: 5,
                ..DecodeConfig::default()
            };
            let want = reference(&m, &prompt, rows, None, &config, |_, _| false);
            for assistants in [
                AssistantUpdate::Eager,
                AssistantUpdate::Lazy,
                AssistantUpdate::Reencode,
            ] {
                let config = DecodeConfig {
                    assistants,
                    ..config.clone()
                };
                let got = m
                    .generate(&prompt, rows, None, &config, &device, |_, _, _| true)
                    .unwrap();
                assert_eq!(got, want, "{config:?}");
            }
            let writers: Vec<usize> = want.iter().flat_map(|d| d.writers.clone()).collect();
            match tau {
                0.0 => assert!(writers.iter().all(|&w| w == 0)),
                1.0 => assert!(writers.iter().all(|&w| w != 0)),
                _ => {
                    by_base += writers.iter().filter(|&&w| w == 0).count();
                    by_assistants += writers.iter().filter(|&&w| w != 0).count();
                    by_second += writers.iter().filter(|&&w| w == 2).count();
                }
            }
        }
        // Rules that read π are refused.
        let err = m
            .generate(
                &prompt,
                1,
                None,
                &DecodeConfig {
                    max_new_tokens: 4,
                    ..DecodeConfig::default()
                },
                &device,
                |_, _, _| true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("use confidence:τ"), "{err}");
    }
    // Not vacuous: both the base and the assistants wrote, and with two assistants the second too.
    assert!(
        by_base > 0 && by_assistants > 0 && by_second > 0,
        "{by_base} {by_assistants} {by_second}"
    );
}

#[test]
fn eta_one_is_the_base_alone_and_eta_zero_always_defers() {
    let _rng = seeded(12);
    let device = Default::default();
    let m = model(2, 4);
    let z = z_for(&m, 1);
    let prompt = [0u32, 7, 2];
    let threshold = |eta| DecodeConfig {
        strategy: WriterStrategy::Threshold { eta },
        temperature: 0.0,
        max_new_tokens: 10,
        ..DecodeConfig::default()
    };
    let never = m
        .generate(
            &prompt,
            1,
            z.clone(),
            &threshold(1.0),
            &device,
            |_, _, _| true,
        )
        .unwrap();
    assert!(never[0].writers.iter().all(|&w| w == 0));
    // The base alone: a K = 1 chorus holding the same base and adapter (cloned after first use,
    // when burn's lazily initialised parameters are materialised).
    let mut base_only = m.clone();
    base_only.assistants.clear();
    base_only.assistant_adapters.clear();
    base_only.selector = None;
    let alone = base_only
        .generate(
            &prompt,
            1,
            z.clone(),
            &threshold(1.0),
            &device,
            |_, _, _| true,
        )
        .unwrap();
    assert_eq!(never[0].tokens, alone[0].tokens);
    let always = m
        .generate(&prompt, 1, z, &threshold(0.0), &device, |_, _, _| true)
        .unwrap();
    assert!(always[0].writers.iter().all(|&w| w != 0));
    assert_eq!(always[0].deferral_rate(), 1.0);
}

#[test]
fn mixture_distribution_is_the_pi_weighted_sum_of_the_models() {
    let _rng = seeded(13);
    let device = Default::default();
    let m = model(2, 4);
    let z = z_for(&m, 1);
    let prompt = [0u32, 4, 8, 15, 16];
    let (pi, per_model) = m
        .next_token_distributions(&prompt, z.clone(), 1.0, &device)
        .unwrap();
    // By hand, from full forwards: π from the selector on the base's last hidden state, P_j by
    // softmax of each model's last logits.
    let input = || {
        LmInput::new(Tensor::<B, 2, Int>::from_data(
            TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, 5]),
            &device,
        ))
    };
    let outs: Vec<_> = (0..3)
        .map(|j| m.member(j).forward(input(), z.clone(), None).unwrap())
        .collect();
    let last = |t: Tensor<B, 3>| {
        t.narrow(1, 4, 1)
            .reshape([-1])
            .into_data()
            .to_vec::<f64>()
            .unwrap()
    };
    let pi_hand = last(
        m.selector
            .as_ref()
            .unwrap()
            .forward(outs[0].hidden.clone())
            .exp(),
    );
    let p_hand: Vec<Vec<f64>> = outs
        .iter()
        .map(|o| last(softmax(o.logits.clone(), 2)))
        .collect();
    let mix = mixture_probs(&pi, &per_model);
    let vocab = p_hand[0].len();
    for v in 0..vocab {
        let want: f64 = (0..3).map(|j| pi_hand[j] * p_hand[j][v]).sum();
        // The cached path and the full forward order their sums differently.
        assert!(
            (mix[v] - want).abs() < 1e-9,
            "token {v}: {} vs {want}",
            mix[v]
        );
    }
    assert!((mix.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    // A token drawn from the mixture is credited to argmax_j π_j P_j(token), the model most
    // likely to have written it; over 40 draws that rule and a sum π_j + P_j disagree somewhere.
    let mut sum_rule_differs = false;
    for seed in 0..40 {
        let config = DecodeConfig {
            strategy: WriterStrategy::Mixture,
            max_new_tokens: 1,
            seed,
            ..DecodeConfig::default()
        };
        let got = m
            .generate(&prompt, 1, z.clone(), &config, &device, |_, _, _| true)
            .unwrap();
        let token = got[0].tokens[0] as usize;
        let credit = |f: &dyn Fn(f64, f64) -> f64| {
            argmax(
                &(0..3)
                    .map(|j| f(pi[j], per_model[j][token]))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(got[0].writers[0], credit(&|p, q| p * q), "seed {seed}");
        sum_rule_differs |= credit(&|p, q| p + q) != credit(&|p, q| p * q);
    }
    assert!(sum_rule_differs, "the draws cannot tell the rules apart");
    // Tempering: T = 0 is one-hot on the argmax; T = 2 flattens.
    let logits = [1.0f32, 3.0, 2.0];
    assert_eq!(tempered_probs(&logits, 0.0), vec![0.0, 1.0, 0.0]);
    let hot = tempered_probs(&logits, 2.0);
    assert!(hot[1] > hot[2] && hot[2] > hot[0] && hot[1] < tempered_probs(&logits, 1.0)[1]);
}

#[test]
fn provenance_counts_and_deferral_rate_match_the_tokens() {
    let _rng = seeded(14);
    let device = Default::default();
    let m = model(2, 4);
    let z = z_for(&m, 3);
    let config = DecodeConfig {
        strategy: WriterStrategy::Sample,
        max_new_tokens: 15,
        seed: 5,
        ..DecodeConfig::default()
    };
    let mut streamed = vec![Vec::new(); 3];
    let out = m
        .generate(&[0, 1, 2], 3, z.clone(), &config, &device, |r, t, w| {
            streamed[r].push((t, w));
            true
        })
        .unwrap();
    for (r, d) in out.iter().enumerate() {
        let counts = d.counts(3);
        assert_eq!(counts.iter().sum::<usize>(), d.tokens.len());
        let assistants = counts[1] + counts[2];
        assert_eq!(d.deferral_rate(), assistants as f64 / d.tokens.len() as f64);
        let pairs: Vec<(u32, usize)> = d
            .tokens
            .iter()
            .copied()
            .zip(d.writers.iter().copied())
            .collect();
        assert_eq!(streamed[r], pairs, "streamed tokens are the returned ones");
        assert!(
            d.pi.iter()
                .all(|p| (p.iter().sum::<f32>() - 1.0).abs() < 1e-5)
        );
    }
    // The same seed gives the same samples; another seed (almost surely) not.
    let again = m
        .generate(&[0, 1, 2], 3, z.clone(), &config, &device, |_, _, _| true)
        .unwrap();
    assert_eq!(again, out);
    let other = DecodeConfig { seed: 6, ..config };
    assert_ne!(
        m.generate(&[0, 1, 2], 3, z, &other, &device, |_, _, _| true)
            .unwrap(),
        out
    );
}

#[test]
fn bad_decoding_input_is_a_clear_error() {
    let _rng = seeded(15);
    let device = Default::default();
    let m = model(1, 4);
    let z = z_for(&m, 1);
    let config = DecodeConfig::default();
    let err = m
        .generate(&[], 1, z.clone(), &config, &device, |_, _, _| true)
        .unwrap_err();
    assert!(err.to_string().contains("prompt: empty"), "{err}");
    let long: Vec<u32> = (0..30).collect();
    let err = m
        .generate(&long, 1, z.clone(), &config, &device, |_, _, _| true)
        .unwrap_err();
    assert!(err.to_string().contains("context window of 32"), "{err}");
    // The window's edge: prompt + new tokens = 32 decodes every token; one more is refused.
    let four = DecodeConfig {
        max_new_tokens: 4,
        ..DecodeConfig::default()
    };
    let fits: Vec<u32> = (0..28).map(|t| t % 20).collect();
    let got = m
        .generate(&fits, 1, z.clone(), &four, &device, |_, _, _| true)
        .unwrap();
    assert_eq!(got[0].tokens.len(), 4);
    let err = m
        .generate(
            &fits[..27],
            1,
            z.clone(),
            &DecodeConfig {
                max_new_tokens: 6,
                ..four.clone()
            },
            &device,
            |_, _, _| true,
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("27 prompt tokens + 6 new tokens exceed the context window of 32"),
        "{err}"
    );
    // A prompt token outside the vocabulary of 20.
    let err = m
        .generate(&[0, 19, 20], 1, z.clone(), &four, &device, |_, _, _| true)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("token 20 at position 2 is outside the vocabulary of 20"),
        "{err}"
    );
    // An extra assistant with another vocabulary is named by its place among the models (j = 2
    // after a composition's own assistant).
    let composed = Chorus::compose(m.base.clone(), m.assistants.clone(), &device).unwrap();
    let other = crate::tests::gpt2(21).init::<B>(&device).unwrap();
    let other = LocalLm::new(&other);
    let err = composed
        .generate_with(
            &[&other],
            &[0, 1],
            1,
            None,
            &DecodeConfig {
                strategy: WriterStrategy::Confidence { tau: 0.5 },
                ..four.clone()
            },
            &device,
            |_, _, _| true,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::VocabMismatch {
                base: 20,
                assistant: 2,
                vocab: 21
            }
        ),
        "{err}"
    );
    let short = DecodeConfig {
        max_new_tokens: 4,
        ..DecodeConfig::default()
    };
    let err = m
        .generate(&[0, 1], 1, None, &short, &device, |_, _, _| true)
        .unwrap_err();
    assert!(err.to_string().contains("reads z"), "{err}");
    let err = "beam".parse::<WriterStrategy>().unwrap_err();
    assert!(err.contains("unknown strategy `beam`"), "{err}");
    let err = "threshold:1.5".parse::<WriterStrategy>().unwrap_err();
    assert!(err.contains("1.5"), "{err}");
    assert_eq!(
        "threshold:0.25".parse::<WriterStrategy>().unwrap(),
        WriterStrategy::Threshold { eta: 0.25 }
    );
    // Each strategy prints as the text that reads back to it (errors and reports show that).
    for strategy in [
        WriterStrategy::Sample,
        WriterStrategy::Greedy,
        WriterStrategy::Mixture,
        WriterStrategy::Threshold { eta: 0.25 },
        WriterStrategy::Confidence { tau: 0.3 },
    ] {
        let text = strategy.to_string();
        assert_eq!(text.parse::<WriterStrategy>(), Ok(strategy), "{text}");
    }
    assert_eq!(
        WriterStrategy::Confidence { tau: 0.3 }.to_string(),
        "confidence:0.3"
    );
}

/// Every range of [`DecodeConfig::validate`] at its edges: each edge and a value just inside
/// accepted, a value just outside (and NaN, and ∞ where the range is open) refused, the error
/// naming the key and the value as given.
#[test]
fn every_decoding_range_is_checked_at_its_edges() {
    let below = |x: f64| x - 1e-12;
    let above = |x: f64| x + 1e-12;
    let with_temperature = |temperature| DecodeConfig {
        temperature,
        ..DecodeConfig::default()
    };
    let with_top_p = |top_p| DecodeConfig {
        top_p,
        ..DecodeConfig::default()
    };
    let with_strategy = |strategy| DecodeConfig {
        strategy,
        ..DecodeConfig::default()
    };
    let threshold = |eta| with_strategy(WriterStrategy::Threshold { eta });
    let confidence = |tau| with_strategy(WriterStrategy::Confidence { tau });
    let accepted = [
        ("temperature", with_temperature(0.0)),
        ("temperature", with_temperature(1e-12)),
        ("temperature", with_temperature(1e300)),
        ("top_p", with_top_p(1.0)),
        ("top_p", with_top_p(below(1.0))),
        ("top_p", with_top_p(1e-12)),
        ("η", threshold(0.0)),
        ("η", threshold(1.0)),
        ("η", threshold(above(0.0))),
        ("η", threshold(below(1.0))),
        ("τ", confidence(0.0)),
        ("τ", confidence(1.0)),
        ("τ", confidence(above(0.0))),
        ("τ", confidence(below(1.0))),
    ];
    for (key, config) in &accepted {
        assert!(config.validate().is_ok(), "{key}: {config:?}");
    }
    let refused = [
        ("temperature", -1e-12, with_temperature(-1e-12)),
        ("temperature", f64::NAN, with_temperature(f64::NAN)),
        (
            "temperature",
            f64::INFINITY,
            with_temperature(f64::INFINITY),
        ),
        ("top_p", 0.0, with_top_p(0.0)),
        ("top_p", above(1.0), with_top_p(above(1.0))),
        ("top_p", -0.5, with_top_p(-0.5)),
        ("top_p", f64::NAN, with_top_p(f64::NAN)),
        ("η", -1e-12, threshold(-1e-12)),
        ("η", above(1.0), threshold(above(1.0))),
        ("η", f64::NAN, threshold(f64::NAN)),
        ("τ", -1e-12, confidence(-1e-12)),
        ("τ", above(1.0), confidence(above(1.0))),
        ("τ", f64::NAN, confidence(f64::NAN)),
    ];
    for (key, value, config) in &refused {
        match config.validate() {
            Err(crate::ModelError::OutOfRange {
                key: named,
                value: given,
                ..
            }) => {
                assert_eq!((named, given), (*key, value.to_string()), "{config:?}")
            }
            other => panic!("{key} = {value}: {other:?}"),
        }
    }
    // The other strategies have no range of their own.
    for strategy in [
        WriterStrategy::Sample,
        WriterStrategy::Greedy,
        WriterStrategy::Mixture,
    ] {
        assert!(with_strategy(strategy).validate().is_ok(), "{strategy}");
    }
}

#[test]
fn truncation_keeps_the_top_k_and_the_smallest_nucleus() {
    let p = [0.15, 0.5, 0.05, 0.3];
    let kept = |top_k, top_p| {
        let mut q = p.to_vec();
        truncate_probs(&mut q, top_k, top_p);
        q
    };
    // Nucleus: the smallest set of the most likely tokens whose mass reaches top_p.
    assert_eq!(kept(0, 0.8), vec![0.0, 0.5, 0.0, 0.3]);
    assert_eq!(kept(0, 0.81), vec![0.15, 0.5, 0.0, 0.3]);
    assert_eq!(kept(0, 0.1), vec![0.0, 0.5, 0.0, 0.0]);
    assert_eq!(kept(0, 1.0), p.to_vec());
    // Top-k, and both at once (the stricter wins).
    assert_eq!(kept(2, 1.0), vec![0.0, 0.5, 0.0, 0.3]);
    assert_eq!(kept(3, 0.6), vec![0.0, 0.5, 0.0, 0.3]);
    assert_eq!(kept(1, 0.99), vec![0.0, 0.5, 0.0, 0.0]);
}

/// [`truncate_probs`]'s definition as it reads: the whole vocabulary sorted, most likely first
/// (ties by id), then walked.
fn truncated_by_sorting_everything(p: &[f64], top_k: usize, top_p: f64) -> Vec<f64> {
    let mut p = p.to_vec();
    if (top_k == 0 || top_k >= p.len()) && top_p >= 1.0 {
        return p;
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let total: f64 = p.iter().sum();
    let mut kept = 0.0;
    for (rank, &v) in order.iter().enumerate() {
        if (top_k == 0 || rank < top_k) && (kept < top_p * total || rank == 0) {
            kept += p[v];
        } else {
            p[v] = 0.0;
        }
    }
    p
}

#[test]
fn truncation_sorts_only_what_it_keeps_and_keeps_what_a_full_sort_keeps() {
    // Distributions from flat to one-hot (temperatures 0.01–50 over logits of spread 1–30), with
    // ties (logits rounded to a grid), exact zeros (underflow), Zipf's law (unnormalised), and
    // NaNs; every kept set must be the whole-vocabulary sort's, bit for bit.
    let mut rng = SplitMix64(11);
    let mut cases = 0;
    for &vocab in &[1usize, 2, 7, 300, 49_152] {
        for trial in 0..12 {
            let spread = [1.0, 5.0, 30.0][trial % 3];
            let temperature = [0.01, 0.8, 50.0, 1.0][trial % 4];
            let grid = if trial % 5 == 0 { 0.5 } else { 0.0 };
            let logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    let l = (rng.uniform() * 2.0 - 1.0) * spread;
                    (if grid > 0.0 {
                        (l / grid).round() * grid
                    } else {
                        l
                    }) as f32
                })
                .collect();
            let mut probs = tempered_probs(&logits, temperature);
            if trial % 4 == 3 {
                // Zipf's law, p ∝ rank^−s, over ids in a random order: the nucleus's edge
                // anywhere from the first few binades to the last.
                let s = [0.8, 1.1, 1.5][trial % 3];
                let ranks: Vec<f64> = probs.iter().map(|_| rng.uniform()).collect();
                let mut ids: Vec<usize> = (0..vocab).collect();
                ids.sort_by(|&a, &b| ranks[a].total_cmp(&ranks[b]));
                for (rank, &v) in ids.iter().enumerate() {
                    probs[v] = (rank as f64 + 1.0).powf(-s);
                }
            }
            if trial == 11 && vocab > 2 {
                probs[vocab / 2] = f64::NAN;
            }
            for &(top_k, top_p) in &[
                (0, 0.95),
                (0, 0.5),
                (0, 0.999_999),
                (0, 1e-9),
                (0, 0.7),
                (3, 1.0),
                (1000, 1.0),
                (40, 0.9),
                (vocab, 0.95),
                (0, 1.0),
            ] {
                let mut kept = probs.clone();
                truncate_probs(&mut kept, top_k, top_p);
                let expected = truncated_by_sorting_everything(&probs, top_k, top_p);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&kept),
                    bits(&expected),
                    "vocab {vocab}, trial {trial}, top_k {top_k}, top_p {top_p}"
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 5 * 12 * 10);
}

/// `tempered_probs` is `softmax(l / T)` in closed form: for logits small enough to exponentiate
/// unshifted, `exp(l_v / T) / Σ_u exp(l_u / T)` to 1e-14; shifted logits (±1000, where the
/// unshifted form overflows) give the same probabilities as the unshifted small ones; T = 0 is
/// one-hot on the first largest logit.
#[test]
fn tempered_probabilities_are_the_softmax_of_logits_over_temperature() {
    let logits = [0.5f32, -1.25, 2.0, 0.0, 2.0 - 0.125];
    for temperature in [0.3, 1.0, 2.0, 7.5] {
        let e: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l) / temperature).exp())
            .collect();
        let z: f64 = e.iter().sum();
        let p = tempered_probs(&logits, temperature);
        assert_eq!(p.len(), logits.len());
        for (v, (p, e)) in p.iter().zip(&e).enumerate() {
            assert!(
                (p - e / z).abs() <= 1e-14,
                "T = {temperature}, token {v}: {p} vs {}",
                e / z
            );
        }
        for shift in [1000.0f32, -1000.0] {
            let shifted: Vec<f32> = logits.iter().map(|l| l + shift).collect();
            let q = tempered_probs(&shifted, temperature);
            for (v, (q, e)) in q.iter().zip(&e).enumerate() {
                assert!(
                    (q - e / z).abs() <= 1e-14,
                    "T = {temperature}, shift {shift}, token {v}: {q} vs {}",
                    e / z
                );
            }
        }
    }
    assert_eq!(
        tempered_probs(&[1.0, 4.0, -2.0, 4.0], 0.0),
        vec![0.0, 1.0, 0.0, 0.0]
    );
}

/// `categorical` draws `u` from the generator once and returns the first index whose cumulative
/// weight exceeds `u · Σ w` (so never an index of weight 0), for weights with zeros first, last
/// and between; its draws follow the weights' proportions; without a positive weight, index 0.
#[test]
fn a_categorical_draw_is_the_first_index_whose_cumulative_weight_exceeds_u() {
    let cases: [&[f64]; 5] = [
        &[1.0],
        &[0.2, 0.3, 0.5],
        &[0.0, 0.0, 3.0, 0.0, 1.0, 0.0],
        &[5.0, 0.0, 0.0, 0.25],
        &[1e-300, 2.0, 1e-300],
    ];
    let mut rng = SplitMix64(23);
    for weights in cases {
        let total: f64 = weights.iter().sum();
        let mut counts = vec![0usize; weights.len()];
        let draws = 20_000;
        for _ in 0..draws {
            let mut after_one_draw = rng.clone();
            let u = after_one_draw.uniform();
            let mut cumulative = 0.0;
            let expected = weights
                .iter()
                .position(|w| {
                    cumulative += w;
                    u * total < cumulative
                })
                .unwrap();
            let drawn = categorical(&mut rng, weights);
            assert_eq!(drawn, expected, "{weights:?}, u = {u}");
            assert_eq!(rng, after_one_draw, "one draw from the generator");
            counts[drawn] += 1;
        }
        for (i, (&count, w)) in counts.iter().zip(weights).enumerate() {
            let share = count as f64 / draws as f64;
            assert!(
                (share - w / total).abs() < 0.015,
                "{weights:?}: index {i} drawn {share}"
            );
        }
    }
    // No positive weight: index 0 (the rule has no index; the fallback's last positive weight
    // has none either), after one draw.
    for zeros in [&[0.0][..], &[0.0, 0.0, 0.0]] {
        let mut after_one_draw = rng.clone();
        after_one_draw.uniform();
        assert_eq!(categorical(&mut rng, zeros), 0, "{zeros:?}");
        assert_eq!(rng, after_one_draw);
    }
}

/// [`truncate_probs`] sorts the tokens down to the first binade where the count reaches top_k or
/// the mass reaches top_p · Σ p (with its margin of 1e-6), and every token when none does. A
/// prefix longer than that keeps the same tokens, only slower, so the truncation tests cannot see
/// it: this test reads the prefix itself.
#[test]
fn the_sorted_prefix_ends_at_the_first_binade_that_reaches_top_k_or_the_nucleus() {
    // 0.4 and 0.3 lie in [2⁻², 2⁻¹), 0.2 one binade below, 0.05 three, 0.03 and 0.02 four; zero
    // after every positive value.
    let p = [0.4, 0.3, 0.2, 0.05, 0.03, 0.02, 0.0];
    let (binade, _) = prefix_binades(&p, 1, 1.0).unwrap();
    let binades: Vec<usize> = p.iter().map(|&v| binade(v)).collect();
    assert_eq!(binades, [0, 0, 1, 3, 4, 4, LAST_BINADE]);
    let last = |top_k, target| prefix_binades(&p, top_k, target).map(|(_, last)| last);
    assert_eq!(last(1, 1.0), Some(0), "the top token");
    assert_eq!(
        last(3, 1.0),
        Some(1),
        "two tokens in binade 0, the third in binade 1"
    );
    assert_eq!(last(0, 0.5), Some(0), "0.7 ≥ 0.5");
    assert_eq!(last(0, 0.8), Some(1), "0.9 ≥ 0.8");
    // 0.4 + 0.3 + 0.2 falls short of 0.9 · (1 + 1e-6); with 0.05 the mass is 0.95.
    assert_eq!(last(0, 0.9), Some(3));
    assert_eq!(last(3, 0.5), Some(0), "the mass first");
    // The whole mass is reached only with every token (and not past the margin): sort them all.
    assert_eq!(last(0, 1.0), None);
    // A NaN sorts before every number: sort them all.
    assert!(prefix_binades(&[0.5, f64::NAN, 0.25], 1, 1.0).is_none());
}

#[test]
fn the_radix_sort_orders_as_a_stable_sort_does() {
    // Keys that differ anywhere (every byte random), only in their lowest byte, only in their
    // highest, in a few values with many repeats, none at all; each tagged with its position, so
    // that equal keys must keep their order.
    let mut rng = SplitMix64(29);
    let mut random =
        move || (rng.uniform() * 2f64.powi(53)) as u64 ^ (rng.uniform() * 2048.0) as u64;
    let kinds: [(&str, &mut dyn FnMut(usize) -> u64); 5] = [
        ("any byte", &mut |_| random() << 11 ^ random()),
        ("lowest byte", &mut |i| {
            0x3f1a_0000_0000_0000 | (i as u64 * 2_654_435_761) & 0xff
        }),
        ("highest byte", &mut |i| ((i as u64 * 40_503) & 0xff) << 56),
        ("repeats", &mut |i| [7u64, 1 << 40, 7, u64::MAX][i % 4]),
        ("all equal", &mut |_| 42),
    ];
    for (kind, key) in kinds {
        for n in [0, 1, 2, 255, 256, 3000] {
            let mut keys: Vec<(u64, usize)> = (0..n).map(|i| (key(i), i)).collect();
            let mut expected = keys.clone();
            expected.sort_by_key(|&(key, _)| key);
            // A spare buffer longer than the keys, with other contents, as one left from a
            // larger sort.
            let mut spare = vec![(9, 9); n + 5];
            radix_sort(&mut keys, &mut spare);
            assert_eq!(keys, expected, "{kind}, {n} keys");
        }
    }
}

/// Decoding's q(z | x, c) and p(z | c) are those of the training row that the prompt and the
/// reference make — position 0 the leading EOS, the prompt's other tokens the context, then x
/// ending with EOS, x's tokens the targets — here written by hand; the shortest reference, EOS
/// alone, makes a row of one position, and an empty one is refused by name.
#[test]
fn decodings_posterior_and_prior_are_those_of_the_training_row() {
    let _rng = seeded(64);
    let device = Default::default();
    let m = model(1, 3);
    let ints = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), &device)
    };
    let floats = |v: Vec<f64>| {
        let n = v.len();
        Tensor::<B, 2>::from_data(TensorData::new(v, [1, n]), &device)
    };
    let by_hand = |tokens, targets, target_mask, context_mask| {
        let n = Vec::len(&tokens);
        ChorusBatch {
            tokens: ints(tokens),
            targets: ints(targets),
            target_mask: floats(target_mask),
            context_mask: floats(context_mask),
            padding: Tensor::<B, 2, Int>::zeros([1, n], &device).bool(),
            assistant_log_probs: None,
        }
    };
    let same_row = |got: &ChorusBatch<B>, want: &ChorusBatch<B>| {
        let ints = |t: &Tensor<B, 2, Int>| t.to_data().to_vec::<i64>().unwrap();
        let floats = |t: &Tensor<B, 2>| t.to_data().to_vec::<f64>().unwrap();
        assert_eq!(ints(&got.tokens), ints(&want.tokens), "inputs");
        assert_eq!(ints(&got.targets), ints(&want.targets), "targets");
        assert_eq!(
            floats(&got.target_mask),
            floats(&want.target_mask),
            "x's positions"
        );
        assert_eq!(
            floats(&got.context_mask),
            floats(&want.context_mask),
            "the context"
        );
        assert_eq!(got.padding.dims(), want.padding.dims());
        assert!(!got.padding.clone().any().into_scalar(), "padding");
        assert!(got.assistant_log_probs.is_none());
    };
    // Prompt [EOS, 4, 5], x = [6, 7, EOS]: inputs EOS 4 5 6 7, targets 4 5 6 7 EOS.
    let (prompt, x) = ([0u32, 4, 5], [6u32, 7, 0]);
    let want = by_hand(
        vec![0, 4, 5, 6, 7],
        vec![4, 5, 6, 7, 0],
        vec![0.0, 0.0, 1.0, 1.0, 1.0],
        vec![0.0, 1.0, 1.0, 0.0, 0.0],
    );
    same_row(&reference_row::<B>(&prompt, &x, &device).unwrap(), &want);
    let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f64>().unwrap();
    let want = m.latent_distributions(&want).unwrap().unwrap();
    let q = m.posterior_for_text(&prompt, &x, &device).unwrap().unwrap();
    assert_eq!(host(q.mean), host(want.posterior.mean), "q's mean");
    assert_eq!(
        host(q.log_var),
        host(want.posterior.log_var),
        "q's log-variance"
    );
    // The prompt alone gives the same prior up to rounding: its positions' hidden states are the
    // row's (causal attention), and the context is pooled over the same ones.
    let p = m.prior_for_prompt(ints(vec![0, 4, 5])).unwrap().unwrap();
    for (got, want, what) in [
        (p.mean, want.prior.mean, "p's mean"),
        (p.log_var, want.prior.log_var, "p's log-variance"),
    ] {
        let (got, want) = (host(got), host(want));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{what}: {got:?} vs {want:?}");
        }
    }
    // The shortest row: EOS, then x = EOS alone.
    let shortest = reference_row::<B>(&[0], &[0], &device).unwrap();
    same_row(&shortest, &by_hand(vec![0], vec![0], vec![1.0], vec![0.0]));
    assert!(m.posterior_for_text(&[0], &[0], &device).unwrap().is_some());
    let Err(err) = m.posterior_for_text(&[0], &[], &device) else {
        panic!("an empty reference was scored")
    };
    assert!(
        matches!(
            err,
            ModelError::InvalidInput {
                input: "reference",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn decoding_z_comes_from_the_source_it_names() {
    let _rng = seeded(47);
    let device = Default::default();
    let m = model(1, 3);
    let prompt = [0u32, 4, 5];
    let (a, b) = ([6u32, 7, 0], [9u32, 3, 3, 0]);
    let rows = 2;
    let z = |source: ZSource<'_>| {
        m.decoding_z(&source, &prompt, rows, &device)
            .unwrap()
            .unwrap()
    };
    let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f64>().unwrap();
    let posterior = |x: &[u32]| -> Vec<f64> {
        let mean = m
            .posterior_for_text(&prompt, x, &device)
            .unwrap()
            .unwrap()
            .mean;
        host(mean.repeat_dim(0, rows))
    };
    let close = |got: Vec<f64>, want: Vec<f64>, what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{what}: {got:?} vs {want:?}");
        }
    };
    // The prior's mean, for every row.
    let ids = Tensor::<B, 2, Int>::from_data([[0, 4, 5], [0, 4, 5]], &device);
    let prior = m.prior_for_prompt(ids).unwrap().unwrap();
    close(
        host(z(ZSource::PriorMean)),
        host(prior.mean.clone()),
        "prior mean",
    );
    // A prior sample: μ + σ ε with row r's ε the standard normal draws of SplitMix64 seeded with
    // the r-th draw of SplitMix64(seed) — the backend's generator plays no part — the same for
    // the same seed, another for another seed.
    let s1 = host(z(ZSource::PriorSample { seed: 5 }));
    let d_latent = m.config.d_latent;
    let mut seeds = SplitMix64(5);
    let eps: Vec<f64> = (0..rows)
        .flat_map(|_| {
            let mut rng = SplitMix64(seeds.next_u64());
            (0..d_latent).map(move |_| rng.standard_normal() as f32 as f64)
        })
        .collect();
    let (mu, sigma) = (host(prior.mean.clone()), host(prior.std()));
    let by_hand = (0..rows * d_latent)
        .map(|i| mu[i] + sigma[i] * eps[i])
        .collect();
    close(s1.clone(), by_hand, "prior sample");
    assert!(s1[..d_latent] != s1[d_latent..], "the rows draw alike");
    // The backend's generator, seeded anyhow, changes nothing.
    B::seed(&device, 99);
    close(
        host(z(ZSource::PriorSample { seed: 5 })),
        s1.clone(),
        "same seed",
    );
    assert!(
        host(z(ZSource::PriorSample { seed: 6 })) != s1,
        "another seed"
    );
    assert!(s1 != host(prior.mean), "a sample is not the mean");
    // Posterior means and the straight line between them.
    close(
        host(z(ZSource::Posterior { reference: &a })),
        posterior(&a),
        "posterior",
    );
    let line = |alpha: f64| {
        host(z(ZSource::Interpolate {
            from: &a,
            to: &b,
            alpha,
        }))
    };
    close(line(0.0), posterior(&a), "α = 0");
    close(line(1.0), posterior(&b), "α = 1");
    let mid: Vec<f64> = posterior(&a)
        .iter()
        .zip(posterior(&b))
        .map(|(x, y)| 0.75 * x + 0.25 * y)
        .collect();
    close(line(0.25), mid, "α = 0.25");
    let err = m
        .decoding_z(
            &ZSource::Interpolate {
                from: &a,
                to: &b,
                alpha: 1.5,
            },
            &prompt,
            rows,
            &device,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("alpha") && err.contains("1.5"), "{err}");
    // A model without z has none.
    let no_z = model(1, 0);
    assert!(
        no_z.decoding_z(&ZSource::PriorMean, &prompt, rows, &device)
            .unwrap()
            .is_none()
    );
}

/// A chorus whose last assistant is remote behaves exactly like the same chorus holding that
/// assistant in memory: the same ELBO from its cached log-probs, the same IW bound with its
/// log-probs asked of the "server" (here the same LM behind the `Assistant` interface), the same
/// tokens and writers when it decodes as an extra assistant; and without its log-probs or its
/// server the model refuses clearly.
#[test]
fn a_remote_assistant_stands_in_exactly_for_the_same_model_held_locally() {
    let _rng = seeded(53);
    let device = Default::default();
    let config = ChorusConfig {
        d_latent: 3,
        assistant_adapters: false,
        ..ChorusConfig::default()
    };
    let full: Chorus<B> = chorus(config, 2);
    let mut remote = full.clone();
    let served = remote.assistants.pop().unwrap();
    remote.config.remote_assistants = 1;
    assert_eq!(remote.n_models(), 3);
    assert_eq!(remote.n_local(), 2);
    let server = LocalLm::new(&served);
    let servers: [&dyn Assistant<B>; 1] = [&server];

    let batch = crate::tests::batch::<B>();
    let eps = Tensor::<B, 3>::random([1, 2, 3], Distribution::Normal(0.0, 1.0), &device);
    let want = full
        .forward_elbo_with_noise(&batch, 0.5, Some(eps.clone()))
        .unwrap();
    let err = remote
        .forward_elbo_with_noise(&batch, 0.5, Some(eps.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("served remotely"), "{err}");
    let mut cached = batch.clone();
    cached.assistant_log_probs = Some(full.assistant_log_probs(&batch).unwrap());
    let got = remote
        .forward_elbo_with_noise(&cached, 0.5, Some(eps))
        .unwrap();
    let loss = |o: &crate::ChorusOutput<B>| o.terms.loss.clone().into_scalar();
    assert!(
        (loss(&got) - loss(&want)).abs() < 1e-12,
        "{} vs {}",
        loss(&got),
        loss(&want)
    );

    // Log-probs asked of the server give the same bound as running the model here.
    let filled = remote
        .with_assistant_log_probs(batch.clone(), &servers)
        .unwrap();
    B::seed(&device, 3);
    let want_iw = full.iw_log_likelihood(&batch, 4).unwrap().into_data();
    B::seed(&device, 3);
    let got_iw = remote.iw_log_likelihood(&filled, 4).unwrap().into_data();
    got_iw.assert_approx_eq::<f64>(&want_iw, burn::tensor::Tolerance::absolute(1e-12));
    assert!(remote.with_assistant_log_probs(batch, &[]).is_err());

    // Decoding with the server as the remote assistant: the same tokens and writers.
    let decode = DecodeConfig {
        strategy: WriterStrategy::Sample,
        max_new_tokens: 8,
        seed: 11,
        ..DecodeConfig::default()
    };
    let z = z_for(&full, 2);
    let prompt = [0u32, 4, 9];
    let a = full
        .generate(&prompt, 2, z.clone(), &decode, &device, |_, _, _| true)
        .unwrap();
    let b = remote
        .generate_with(
            &servers,
            &prompt,
            2,
            z.clone(),
            &decode,
            &device,
            |_, _, _| true,
        )
        .unwrap();
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.writers, b.writers);
    }
    assert!(
        a.iter().any(|d| d.writers.contains(&2)),
        "the remote model writes some tokens"
    );
    let err = remote
        .generate_with(&[], &prompt, 2, z, &decode, &device, |_, _, _| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 of them remote, but 0 servers"), "{err}");
}

/// An assistant that records, each time decoding asks it for logits, how many tokens per row it
/// had been told by then (the prompt's length plus the step).
struct Recorded<'a> {
    lm: LocalLm<'a, B>,
    asked: std::cell::RefCell<Vec<usize>>,
}

struct RecordedDecoder<'a> {
    inner: Box<dyn AssistantDecoder + 'a>,
    told: usize,
    asked: &'a std::cell::RefCell<Vec<usize>>,
}

impl AssistantDecoder for RecordedDecoder<'_> {
    fn push(&mut self, tokens: &[Vec<u32>]) {
        self.told += tokens[0].len();
        self.inner.push(tokens);
    }

    fn next_logits(&mut self) -> Result<&[Vec<f32>], ModelError> {
        self.asked.borrow_mut().push(self.told);
        self.inner.next_logits()
    }
}

impl Assistant<B> for Recorded<'_> {
    fn describe(&self) -> String {
        self.lm.describe()
    }

    fn vocab_size(&self) -> usize {
        Assistant::<B>::vocab_size(&self.lm)
    }

    fn max_seq_len(&self) -> usize {
        Assistant::<B>::max_seq_len(&self.lm)
    }

    fn token_log_probs(
        &self,
        rows: &ScoreRows<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        self.lm.token_log_probs(rows, z)
    }

    fn decoder<'a>(
        &'a self,
        rows: usize,
        z: Option<Tensor<B, 2>>,
        update: AssistantUpdate,
        device: &burn::tensor::Device<B>,
    ) -> Box<dyn AssistantDecoder + 'a> {
        Box::new(RecordedDecoder {
            inner: self.lm.decoder(rows, z, update, device),
            told: 0,
            asked: &self.asked,
        })
    }
}

/// The saving that lazy assistants exist for: an eager assistant is asked for its logits at every
/// step; a lazy or re-encoding one only at the steps where a row still going may take its token
/// (it drew the writer, or the mixture reads every model), never for rows already stopped. Checked
/// for a trained chorus's rules (the assistant served as its remote one, so decoding can be watched),
/// with a row stopped early, and the tokens the same under every update mode.
#[test]
fn a_lazy_assistant_is_asked_for_logits_only_at_the_steps_it_may_write() {
    let _rng = seeded(61);
    let device = Default::default();
    let mut m = model(1, 0);
    let served = m.assistants.pop().unwrap();
    m.config.remote_assistants = 1;
    assert!(m.assistant_adapters.is_empty(), "the served LM reads no z");
    let prompt = [0u32, 4, 9];
    let rows = 3;
    // Rows 1 and 2 stop after their first token, row 0 runs to the end: the stopped rows' writers
    // are still drawn (the same draws in the same order), but nobody takes their tokens.
    let stop = |r: usize, n: usize| r > 0 && n == 1;
    let (mut skipped, mut asked_lazily) = (0, 0);
    for (strategy, temperature, seed) in [
        (WriterStrategy::Sample, 1.0, 8),
        (WriterStrategy::Sample, 1.0, 9),
        (WriterStrategy::Sample, 0.7, 10),
        (WriterStrategy::Greedy, 0.0, 0),
        (WriterStrategy::Threshold { eta: 0.4 }, 0.8, 8),
        (WriterStrategy::Threshold { eta: 0.2 }, 1.0, 9),
        (WriterStrategy::Mixture, 1.0, 8),
    ] {
        let mut tokens_of_first_mode = None;
        for update in [
            AssistantUpdate::Eager,
            AssistantUpdate::Lazy,
            AssistantUpdate::Reencode,
        ] {
            let config = DecodeConfig {
                strategy,
                temperature,
                max_new_tokens: 10,
                seed,
                assistants: update,
                ..DecodeConfig::default()
            };
            let recorded = Recorded {
                lm: LocalLm::new(&served),
                asked: Default::default(),
            };
            let mut emitted = vec![0; rows];
            let got = m
                .generate_with(
                    &[&recorded],
                    &prompt,
                    rows,
                    None,
                    &config,
                    &device,
                    |r, _, _| {
                        emitted[r] += 1;
                        !stop(r, emitted[r])
                    },
                )
                .unwrap();
            let steps = got.iter().map(|d| d.tokens.len()).max().unwrap();
            assert_eq!(steps, 10, "{config:?}");
            // A row still going at step t wrote a token there.
            let may_write = |t: usize| {
                got.iter().any(|d| match strategy {
                    WriterStrategy::Mixture => d.tokens.len() > t,
                    _ => d.writers.get(t) == Some(&1),
                })
            };
            let want: Vec<usize> = (0..steps)
                .filter(|&t| update == AssistantUpdate::Eager || may_write(t))
                .map(|t| prompt.len() + t)
                .collect();
            assert_eq!(*recorded.asked.borrow(), want, "{config:?}");
            if update == AssistantUpdate::Lazy {
                skipped += steps - want.len();
                asked_lazily += want.len();
            }
            let tokens: Vec<Vec<u32>> = got.iter().map(|d| d.tokens.clone()).collect();
            assert_eq!(
                *tokens_of_first_mode.get_or_insert_with(|| tokens.clone()),
                tokens,
                "{config:?}"
            );
        }
    }
    // Not vacuous: lazy decoding both skipped the assistant and asked it.
    assert!(skipped > 0 && asked_lazily > 0, "{skipped} {asked_lazily}");
}

/// Each rule's edge. Confidence: the base writes while its top-1 probability is ≥ τ, so at τ equal
/// to it (the same f64 the rule computes, from the same cached step) the base writes, and at the
/// next f64 above it the assistant does. Threshold: the assistant writes when its π exceeds η, so
/// at η equal to π the base writes, and at the f64 below it the assistant does.
#[test]
fn the_base_writes_at_the_edge_of_the_confidence_and_threshold_rules() {
    let _rng = seeded(62);
    let device = Default::default();
    let trained = model(1, 0);
    let m = Chorus::compose(trained.base.clone(), trained.assistants.clone(), &device).unwrap();
    let prompt = [0u32, 6, 2, 11];
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, 4]),
        &device,
    );
    let mut cache = m.base.new_cache();
    let (logits, _) = m.member(0).step(tokens, None, Some(&mut cache)).unwrap();
    let top1 = crate::top1_prob(&logits[0]);
    let first_writer = |m: &Chorus<B>, strategy| {
        let config = DecodeConfig {
            strategy,
            temperature: 0.0,
            max_new_tokens: 1,
            ..DecodeConfig::default()
        };
        m.generate(&prompt, 1, None, &config, &device, |_, _, _| true)
            .unwrap()[0]
            .writers[0]
    };
    let confidence = |tau| WriterStrategy::Confidence { tau };
    assert_eq!(first_writer(&m, confidence(top1)), 0, "τ = {top1}");
    assert_eq!(first_writer(&m, confidence(top1.next_up())), 1);
    let (pi, _) = trained
        .next_token_distributions(&prompt, None, 1.0, &device)
        .unwrap();
    let threshold = |eta| WriterStrategy::Threshold { eta };
    assert_eq!(first_writer(&trained, threshold(pi[1])), 0, "η = {}", pi[1]);
    assert_eq!(first_writer(&trained, threshold(pi[1].next_down())), 1);
}
