//! BERT's, GPT-2's and llama's forwards against the same forwards written out in f64, one vector
//! at a time (the llama forward also has references outside the crate: SmolLM2 against an f32
//! numpy forward and llama.cpp, in chorus-cli's tests).

use std::collections::HashMap;

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use chorus_data::rng::SplitMix64;

use crate::import::write_safetensors;
use crate::tests::{seeded, tiny_gpt2, tiny_llama};
use crate::{Bert, KvCache, LayerMemory, Lm, LmConfig, LmInput, RmsNorm, TestBackend};

type B = TestBackend;

/// A model's tensors by name, in f64: matrices as `[out, in]` rows.
type Weights = HashMap<String, Vec<f64>>;

fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

/// `(x − mean(x)) / √(var(x) + ε) · g + b`.
fn layer_norm(x: &[f64], w: &Weights, name: &str, eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let (g, b) = (&w[&format!("{name}.weight")], &w[&format!("{name}.bias")]);
    (0..x.len())
        .map(|i| (x[i] - mean) / (var + eps).sqrt() * g[i] + b[i])
        .collect()
}

/// `W x + b` for `W` stored as `[out, in]`.
fn affine(x: &[f64], w: &Weights, name: &str) -> Vec<f64> {
    let (weight, bias) = (&w[&format!("{name}.weight")], &w[&format!("{name}.bias")]);
    (0..bias.len())
        .map(|o| {
            bias[o]
                + (0..x.len())
                    .map(|i| weight[o * x.len() + i] * x[i])
                    .sum::<f64>()
        })
        .collect()
}

/// Each query head h's `softmax_j(q_i,h · k_j,g / √head_dim) v_j,g` over the keys j that query i
/// sees, the heads side by side; key/value head `g = h / (heads / kv_heads)` serves query head h.
fn attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    [heads, kv_heads]: [usize; 2],
    sees: impl Fn(usize, usize) -> bool,
) -> Vec<Vec<f64>> {
    let width = q[0].len();
    let head_dim = width / heads;
    let group = heads / kv_heads;
    (0..q.len())
        .map(|i| {
            let mut out = vec![0.0; width];
            for h in 0..heads {
                let g = h / group;
                let dot = |j: usize| -> f64 {
                    (0..head_dim)
                        .map(|c| q[i][h * head_dim + c] * k[j][g * head_dim + c])
                        .sum()
                };
                let scores: Vec<(usize, f64)> = (0..k.len())
                    .filter(|&j| sees(i, j))
                    .map(|j| (j, dot(j) / (head_dim as f64).sqrt()))
                    .collect();
                let max = scores.iter().map(|s| s.1).fold(f64::MIN, f64::max);
                let total: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
                for &(j, score) in &scores {
                    for c in 0..head_dim {
                        out[h * head_dim + c] +=
                            (score - max).exp() / total * v[j][g * head_dim + c];
                    }
                }
            }
            out
        })
        .collect()
}

/// `x Φ(x)`, with erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5·10⁻⁷).
fn gelu(x: f64) -> f64 {
    let z = (x / std::f64::consts::SQRT_2).abs();
    let s = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = s
        * (0.254_829_592
            + s * (-0.284_496_736
                + s * (1.421_413_741 + s * (-1.453_152_027 + s * 1.061_405_429))));
    let erf = (1.0 - poly * (-z * z).exp()).copysign(x);
    0.5 * x * (1.0 + erf)
}

/// GPT-2's GELU: `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
fn gelu_tanh(x: f64) -> f64 {
    let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x.powi(3));
    0.5 * x * (1.0 + inner.tanh())
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn assert_close(got: &[f32], want: &[Vec<f64>], what: &str) {
    let width = want[0].len();
    assert_eq!(got.len(), want.len() * width, "{what}");
    for (row, features) in want.iter().enumerate() {
        for (c, want) in features.iter().enumerate() {
            let got = got[row * width + c] as f64;
            assert!(
                (got - want).abs() < 1e-4,
                "{what}, row {row}, feature {c}: {got} against {want}"
            );
        }
    }
}

const BERT_WIDTH: usize = 8;
const BERT_HEADS: usize = 2;
const BERT_LAYERS: usize = 2;
const BERT_POSITIONS: usize = 10;

/// Writes a Hugging Face `BertModel` directory of a tiny BERT (vocabulary 12, 2 layers of 2 heads
/// of 4, feed-forward 16, 10 positions): one layer's keys with the `bert.` prefix, a pooler it
/// must skip, every tensor drawn at random. Returns the tensors as written.
fn tiny_bert_dir(dir: &std::path::Path) -> Weights {
    let (vocab, d, d_ff) = (12, BERT_WIDTH, 16);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, d]),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![BERT_POSITIONS, d],
        ),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, d]),
        ("embeddings.LayerNorm.weight".into(), vec![d]),
        ("embeddings.LayerNorm.bias".into(), vec![d]),
        ("pooler.dense.weight".into(), vec![d, d]),
        ("pooler.dense.bias".into(), vec![d]),
    ];
    for i in 0..BERT_LAYERS {
        let p = format!("encoder.layer.{i}");
        for (name, d_out, d_in) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", d_ff, d),
            ("output.dense", d, d_ff),
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![d_out, d_in]));
            shapes.push((format!("{p}.{name}.bias"), vec![d_out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{norm}.weight"), vec![d]));
            shapes.push((format!("{p}.{norm}.bias"), vec![d]));
        }
    }
    let mut rng = SplitMix64(21);
    let mut weights = Weights::new();
    let mut stored = Vec::new();
    for (name, shape) in shapes {
        // Norm scales near 1, so that every layer's output stays in a range where 10⁻⁴ is tight.
        let offset = if name.ends_with("LayerNorm.weight") {
            1.0
        } else {
            0.0
        };
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|_| (offset + 0.5 * rng.standard_normal()) as f32)
            .collect();
        // BertModel writes names without the prefix, BertForPreTraining with it.
        let key = if name.starts_with("encoder.layer.1.") {
            format!("bert.{name}")
        } else {
            name.clone()
        };
        weights.insert(name, values.iter().map(|&v| v as f64).collect());
        stored.push((key, shape, values));
    }
    write_safetensors(&dir.join("model.safetensors"), &stored).unwrap();
    let config = serde_json::json!({
        "model_type": "bert", "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": BERT_LAYERS, "num_attention_heads": BERT_HEADS,
        "intermediate_size": d_ff, "max_position_embeddings": BERT_POSITIONS,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    weights
}

/// BERT written out: the word, position and segment-0 embeddings summed and normalised, then per
/// layer `h = LN(x + attn(x))` and `x = LN(h + W₂ gelu(W₁ h + b₁) + b₂)`, every query seeing
/// every key that is not padding.
fn bert_by_hand(w: &Weights, ids: &[usize], padding: &[bool]) -> Vec<Vec<f64>> {
    let d = BERT_WIDTH;
    let eps = 1e-12;
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .enumerate()
        .map(|(position, &id)| {
            let sum: Vec<f64> = (0..d)
                .map(|c| {
                    w["embeddings.word_embeddings.weight"][id * d + c]
                        + w["embeddings.position_embeddings.weight"][position * d + c]
                        + w["embeddings.token_type_embeddings.weight"][c]
                })
                .collect();
            layer_norm(&sum, w, "embeddings.LayerNorm", eps)
        })
        .collect();
    for layer in 0..BERT_LAYERS {
        let p = format!("encoder.layer.{layer}");
        let project = |name: &str| -> Vec<Vec<f64>> {
            let name = format!("{p}.attention.self.{name}");
            x.iter().map(|row| affine(row, w, &name)).collect()
        };
        let attended = attention(
            &project("query"),
            &project("key"),
            &project("value"),
            [BERT_HEADS; 2],
            |_, j| !padding[j],
        );
        x = x
            .iter()
            .zip(&attended)
            .map(|(x, attended)| {
                let attended = affine(attended, w, &format!("{p}.attention.output.dense"));
                let h = layer_norm(
                    &add(x, &attended),
                    w,
                    &format!("{p}.attention.output.LayerNorm"),
                    eps,
                );
                let inner: Vec<f64> = affine(&h, w, &format!("{p}.intermediate.dense"))
                    .into_iter()
                    .map(gelu)
                    .collect();
                let ff = affine(&inner, w, &format!("{p}.output.dense"));
                layer_norm(&add(&h, &ff), w, &format!("{p}.output.LayerNorm"), eps)
            })
            .collect();
    }
    x
}

/// `Bert::from_hf_dir` then `forward` equal BERT written out, with and without padding; lengths
/// past the learned positions or empty, and configs that are not BERT's, are errors.
#[test]
fn a_bert_directory_encodes_as_bert_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_bert_dir(dir.path());
    let bert = Bert::<B>::from_hf_dir(dir.path(), &device()).unwrap();
    let rows: [[usize; 6]; 2] = [[1, 7, 3, 11, 0, 5], [4, 4, 9, 2, 0, 0]];
    let padding = [[false; 6], [false, false, false, false, true, true]];
    let ids = Tensor::<B, 2, Int>::from_data(rows.map(|r| r.map(|v| v as i64)), &device());
    for padded in [false, true] {
        let mask = padded.then(|| Tensor::<B, 2, Bool>::from_data(padding, &device()));
        let out = bert.forward(ids.clone(), mask).unwrap();
        assert_eq!(out.dims(), [2, 6, BERT_WIDTH]);
        let out = out.into_data().to_vec::<f32>().unwrap();
        for (b, row) in rows.iter().enumerate() {
            let keys = if padded { padding[b] } else { [false; 6] };
            let expected = bert_by_hand(&weights, row, &keys);
            let got = &out[b * 6 * BERT_WIDTH..(b + 1) * 6 * BERT_WIDTH];
            assert_close(got, &expected, &format!("padding {padded}, row {b}"));
        }
    }
    for (seq, accepted) in [
        (BERT_POSITIONS, true),
        (BERT_POSITIONS + 1, false),
        (0, false),
    ] {
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64; seq], [1, seq]), &device());
        let result = bert.forward(ids, None);
        assert_eq!(result.is_ok(), accepted, "{seq} tokens: {:?}", result.err());
    }
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    for ((from, to), expected) in [
        (("\"bert\"", "\"roberta\""), "model_type is not \"bert\""),
        (
            ("\"num_attention_heads\":2", "\"num_attention_heads\":3"),
            "must divide d_model",
        ),
        (
            ("\"num_attention_heads\":2", "\"num_attention_heads\":0"),
            "must divide d_model",
        ),
    ] {
        assert_eq!(config.matches(from).count(), 1, "{config}");
        std::fs::write(dir.path().join("config.json"), config.replace(from, to)).unwrap();
        let err = Bert::<B>::from_hf_dir(dir.path(), &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
}

/// A tensor's values in f64, in row-major order.
fn f64_values(t: Tensor<B, 2>) -> Vec<f64> {
    let values = t.into_data().to_vec::<f32>().unwrap();
    values.into_iter().map(f64::from).collect()
}

/// A linear layer's weight as `[out, in]` rows and its bias (zeros where it has none).
fn linear_weights(w: &mut Weights, name: &str, linear: &Linear<B>) {
    let [_, d_out] = linear.weight.dims();
    w.insert(
        format!("{name}.weight"),
        f64_values(linear.weight.val().transpose()),
    );
    let bias = match &linear.bias {
        Some(bias) => f64_values(bias.val().unsqueeze_dim(0)),
        None => vec![0.0; d_out],
    };
    w.insert(format!("{name}.bias"), bias);
}

/// Draws a LayerNorm's scale near 1 and its shift near 0 (a new one has 1 and 0, which would
/// hide the two swapped), and records them.
fn drawn_layer_norm(w: &mut Weights, name: &str, norm: &mut LayerNorm<B>, rng: &mut SplitMix64) {
    let d = norm.gamma.dims()[0];
    let mut draw = |offset: f64| -> Vec<f32> {
        (0..d)
            .map(|_| (offset + 0.3 * rng.standard_normal()) as f32)
            .collect()
    };
    let (scale, shift) = (draw(1.0), draw(0.0));
    let tensor = |v: &[f32]| Param::from_tensor(Tensor::<B, 1>::from_floats(v, &device()));
    norm.gamma = tensor(&scale);
    norm.beta = Some(tensor(&shift));
    w.insert(
        format!("{name}.weight"),
        scale.iter().map(|&v| v as f64).collect(),
    );
    w.insert(
        format!("{name}.bias"),
        shift.iter().map(|&v| v as f64).collect(),
    );
}

/// `Lm::forward` of a GPT-2 equals GPT-2 written out: token and position embeddings summed, per
/// block `x += attn(LN₁(x))` over the keys up to the query's own position and
/// `x += W₂ gelu_tanh(W₁ LN₂(x) + b₁) + b₂`, then `LN_f` and the output layer (the token
/// embedding's transpose when tied), for both settings of `tie_embeddings`.
#[test]
fn a_gpt2_forward_equals_gpt2_written_out() {
    let _rng = seeded(16);
    let ids = [3usize, 41, 7, 7, 19];
    for tied in [false, true] {
        let LmConfig::Gpt2(mut config) = tiny_gpt2() else {
            unreachable!()
        };
        config.tie_embeddings = tied;
        let (d, heads, eps) = (config.d_model, config.n_heads, config.norm_eps);
        let Lm::Gpt2(mut model) = LmConfig::Gpt2(config).init::<B>(&device()).unwrap() else {
            unreachable!()
        };
        let mut rng = SplitMix64(16);
        let mut w = Weights::new();
        let wte = f64_values(model.wte.weight.val());
        let wpe = f64_values(model.wpe.weight.val());
        for (i, block) in model.h.iter_mut().enumerate() {
            let attn = &block.attn;
            for (name, linear) in [
                ("q", &attn.q_proj),
                ("k", &attn.k_proj),
                ("v", &attn.v_proj),
                ("o", &attn.o_proj),
                ("fc", &block.mlp.c_fc),
                ("proj", &block.mlp.c_proj),
            ] {
                linear_weights(&mut w, &format!("{i}.{name}"), linear);
            }
            drawn_layer_norm(&mut w, &format!("{i}.ln_1"), &mut block.ln_1, &mut rng);
            drawn_layer_norm(&mut w, &format!("{i}.ln_2"), &mut block.ln_2, &mut rng);
        }
        drawn_layer_norm(&mut w, "ln_f", &mut model.ln_f, &mut rng);
        match &model.lm_head {
            Some(head) => linear_weights(&mut w, "head", head),
            None => {
                w.insert("head.weight".into(), wte.clone());
                w.insert("head.bias".into(), vec![0.0; wte.len() / d]);
            }
        }

        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| (0..d).map(|c| wte[id * d + c] + wpe[t * d + c]).collect())
            .collect();
        for i in 0..model.h.len() {
            let normed: Vec<Vec<f64>> = x
                .iter()
                .map(|row| layer_norm(row, &w, &format!("{i}.ln_1"), eps))
                .collect();
            let project = |name: &str| -> Vec<Vec<f64>> {
                normed
                    .iter()
                    .map(|row| affine(row, &w, &format!("{i}.{name}")))
                    .collect()
            };
            let attended = attention(
                &project("q"),
                &project("k"),
                &project("v"),
                [heads; 2],
                |q, k| k <= q,
            );
            x = x
                .iter()
                .zip(&attended)
                .map(|(x, attended)| {
                    let x = add(x, &affine(attended, &w, &format!("{i}.o")));
                    let inner: Vec<f64> = affine(
                        &layer_norm(&x, &w, &format!("{i}.ln_2"), eps),
                        &w,
                        &format!("{i}.fc"),
                    )
                    .into_iter()
                    .map(gelu_tanh)
                    .collect();
                    add(&x, &affine(&inner, &w, &format!("{i}.proj")))
                })
                .collect();
        }
        let expected: Vec<Vec<f64>> = x
            .iter()
            .map(|row| affine(&layer_norm(row, &w, "ln_f", eps), &w, "head"))
            .collect();

        let tokens = Tensor::<B, 1, Int>::from_ints(ids.map(|v| v as i32), &device()).unsqueeze();
        let logits = Lm::Gpt2(model)
            .forward(LmInput::new(tokens), None)
            .unwrap()
            .logits;
        let logits = logits.into_data().to_vec::<f32>().unwrap();
        assert_close(&logits, &expected, &format!("tied {tied}"));
    }
}

/// `x / √(mean(x²) + ε) ⊙ w`.
fn rms_norm(x: &[f64], w: &Weights, name: &str, eps: f64) -> Vec<f64> {
    let mean_square = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let weight = &w[&format!("{name}.weight")];
    let rms = (mean_square + eps).sqrt();
    x.iter().zip(weight).map(|(v, g)| v / rms * g).collect()
}

/// Hugging Face llama's RoPE at `position`: in each head the pair `(i, i + head_dim/2)` turned by
/// the angle `position · θ^(−2i/head_dim)`.
fn rope(x: &[f64], heads: usize, position: usize, theta: f64) -> Vec<f64> {
    let head_dim = x.len() / heads;
    let half = head_dim / 2;
    let mut out = x.to_vec();
    for h in 0..heads {
        for i in 0..half {
            let angle = position as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            let (a, b) = (x[h * head_dim + i], x[h * head_dim + i + half]);
            out[h * head_dim + i] = a * angle.cos() - b * angle.sin();
            out[h * head_dim + i + half] = b * angle.cos() + a * angle.sin();
        }
    }
    out
}

/// `x / (1 + e^(−x))`.
fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Draws an RMSNorm's weight near 1 (a new one is all ones, which would hide a norm that skips
/// it) and records it.
fn drawn_rms_norm(w: &mut Weights, name: &str, norm: &mut RmsNorm<B>, rng: &mut SplitMix64) {
    let weight: Vec<f32> = (0..norm.weight.dims()[0])
        .map(|_| (1.0 + 0.3 * rng.standard_normal()) as f32)
        .collect();
    norm.weight = Param::from_tensor(Tensor::from_floats(weight.as_slice(), &device()));
    w.insert(
        format!("{name}.weight"),
        weight.iter().map(|&v| v as f64).collect(),
    );
}

/// `n` values drawn from N(0, std²).
fn drawn(rng: &mut SplitMix64, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (std * rng.standard_normal()) as f32)
        .collect()
}

/// `Lm::forward` of a llama equals llama written out: the token embedding plus the conditioning
/// offset; per block, for `n = RMSNorm₁(x)`, `x += W_o (attn + memory)` where `attn` reads
/// `RoPE(W_q n)` against `RoPE(W_k n)` and `W_v n` over the keys up to the query's own position,
/// each key/value head serving two query heads, and `memory` is each head's own softmax over its
/// key/value head's memory slots; then, for `n = RMSNorm₂(x)`, `x += W_down (silu(W_gate n) ⊙
/// W_up n)`; then the final RMSNorm and the output layer (the embedding's transpose when tied).
/// Checked uncached over 5 positions and through a cache in two steps of 3 and 2 positions (the
/// second turned by the angles of positions 3 and 4). The weights are 10× their initial scale, so
/// that the activations are of order 1 (near 0, SwiGLU with its gate and up swapped looks alike).
#[test]
fn a_llama_forward_equals_llama_written_out() {
    let _rng = seeded(17);
    let ids = [3usize, 41, 7, 7, 19];
    let n_slots = 2;
    for tied in [true, false] {
        let LmConfig::Llama(mut config) = tiny_llama(4, 2) else {
            unreachable!()
        };
        config.tie_embeddings = tied;
        let (d, heads, kv_heads) = (config.d_model, config.n_heads, config.n_kv_heads);
        let (eps, theta) = (config.norm_eps, config.rope_theta);
        let kv_dim = kv_heads * d / heads;
        let Lm::Llama(mut model) = LmConfig::Llama(config).init::<B>(&device()).unwrap() else {
            unreachable!()
        };
        let scaled = |linear: &mut Linear<B>| {
            linear.weight = Param::from_tensor(linear.weight.val() * 10.0);
        };
        let mut rng = SplitMix64(17);
        let mut w = Weights::new();
        model.embed_tokens.weight = Param::from_tensor(model.embed_tokens.weight.val() * 10.0);
        let embedding = f64_values(model.embed_tokens.weight.val());
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let (attn, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            for (name, linear) in [
                ("q", &mut attn.q_proj),
                ("k", &mut attn.k_proj),
                ("v", &mut attn.v_proj),
                ("o", &mut attn.o_proj),
                ("gate", &mut mlp.gate_proj),
                ("up", &mut mlp.up_proj),
                ("down", &mut mlp.down_proj),
            ] {
                scaled(linear);
                linear_weights(&mut w, &format!("{i}.{name}"), linear);
            }
            drawn_rms_norm(
                &mut w,
                &format!("{i}.norm_1"),
                &mut layer.input_layernorm,
                &mut rng,
            );
            let norm_2 = &mut layer.post_attention_layernorm;
            drawn_rms_norm(&mut w, &format!("{i}.norm_2"), norm_2, &mut rng);
        }
        drawn_rms_norm(&mut w, "norm", &mut model.norm, &mut rng);
        match &mut model.lm_head {
            Some(head) => {
                scaled(head);
                linear_weights(&mut w, "head", head);
            }
            None => {
                w.insert("head.weight".into(), embedding.clone());
                w.insert("head.bias".into(), vec![0.0; embedding.len() / d]);
            }
        }
        let offset = drawn(&mut rng, d, 0.3);
        // Each layer's memory slots, keys and values: `[n_slots, kv_dim]` row-major.
        let slots: Vec<[Vec<f32>; 2]> = (0..model.layers.len())
            .map(|_| [0, 1].map(|_| drawn(&mut rng, n_slots * kv_dim, 1.0)))
            .collect();

        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&id| {
                (0..d)
                    .map(|c| embedding[id * d + c] + offset[c] as f64)
                    .collect()
            })
            .collect();
        for (i, [memory_keys, memory_values]) in slots.iter().enumerate() {
            let normed: Vec<Vec<f64>> = x
                .iter()
                .map(|row| rms_norm(row, &w, &format!("{i}.norm_1"), eps))
                .collect();
            let project = |name: &str, heads: usize| -> Vec<Vec<f64>> {
                normed
                    .iter()
                    .enumerate()
                    .map(|(t, row)| {
                        let projected = affine(row, &w, &format!("{i}.{name}"));
                        match name {
                            "v" => projected,
                            _ => rope(&projected, heads, t, theta),
                        }
                    })
                    .collect()
            };
            let q = project("q", heads);
            let attended = attention(
                &q,
                &project("k", kv_heads),
                &project("v", kv_heads),
                [heads, kv_heads],
                |q, k| k <= q,
            );
            let rows = |values: &[f32]| -> Vec<Vec<f64>> {
                let rows = values.chunks_exact(kv_dim);
                rows.map(|row| row.iter().map(|&v| v as f64).collect())
                    .collect()
            };
            let from_memory = attention(
                &q,
                &rows(memory_keys),
                &rows(memory_values),
                [heads, kv_heads],
                |_, _| true,
            );
            x = x
                .iter()
                .zip(attended.iter().zip(&from_memory))
                .map(|(x, (attended, from_memory))| {
                    let o = affine(&add(attended, from_memory), &w, &format!("{i}.o"));
                    let x = add(x, &o);
                    let n = rms_norm(&x, &w, &format!("{i}.norm_2"), eps);
                    let gate = affine(&n, &w, &format!("{i}.gate"));
                    let up = affine(&n, &w, &format!("{i}.up"));
                    let inner: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
                    add(&x, &affine(&inner, &w, &format!("{i}.down")))
                })
                .collect();
        }
        let expected: Vec<Vec<f64>> = x
            .iter()
            .map(|row| affine(&rms_norm(row, &w, "norm", eps), &w, "head"))
            .collect();

        let memory: Vec<LayerMemory<B>> = slots
            .iter()
            .map(|[key, value]| {
                let tensor = |v: &[f32]| {
                    Tensor::<B, 1>::from_floats(v, &device()).reshape([1, n_slots, kv_dim])
                };
                LayerMemory {
                    key: tensor(key),
                    value: tensor(value),
                }
            })
            .collect();
        let offset = Tensor::<B, 1>::from_floats(offset.as_slice(), &device()).unsqueeze();
        let model = Lm::Llama(model);
        let logits = |ids: &[usize], cache: Option<&mut KvCache<B>>| -> Vec<f32> {
            let ids: Vec<i32> = ids.iter().map(|&v| v as i32).collect();
            let tokens = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device()).unsqueeze();
            let input = LmInput::new(tokens)
                .with_memory(memory.clone())
                .with_embedding_offset(offset.clone());
            let logits = model.forward(input, cache).unwrap().logits;
            logits.into_data().to_vec::<f32>().unwrap()
        };
        assert_close(&logits(&ids, None), &expected, &format!("tied {tied}"));
        let mut cache = model.new_cache();
        let first = logits(&ids[..3], Some(&mut cache));
        assert_close(
            &first,
            &expected[..3],
            &format!("tied {tied}, cached, first step"),
        );
        let second = logits(&ids[3..], Some(&mut cache));
        assert_close(
            &second,
            &expected[3..],
            &format!("tied {tied}, cached, second step"),
        );
    }
}
