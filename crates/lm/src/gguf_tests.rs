//! GGUF and Hugging Face import/export: dequantisation, the llama.cpp Q/K permutation, tokenizer,
//! round trips, malformed files, and a mutation fuzzer over the reader.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_data::rng::SplitMix64;

use crate::gguf_writer::{Store, Writer};
use crate::tests::{tiny_gpt2, tiny_llama};
use crate::{GgufFile, GgufValue, Lm, LmConfig, LmError, LmInput, TestBackend, Tokenizer};

type B = TestBackend;

fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn parse(w: &Writer) -> Result<GgufFile, LmError> {
    GgufFile::parse(w.bytes(), "test.gguf")
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.7)
        .collect()
}

#[test]
fn dequantisation_is_within_one_quantisation_step() {
    let values = ramp(128);
    for (store, tolerance) in [
        (Store::F32, 0.0),
        (Store::F16, 1e-3),
        (Store::Q8_0, 1.7 / 127.0 / 2.0 + 1e-3),
        // Q4_0's 16 levels run from −8d to 7d: the extreme opposite to the largest value clamps a full step.
        (Store::Q4_0, 1.7 / 8.0 + 1e-3),
        (Store::Q4_1, 3.4 / 15.0 / 2.0 + 1e-3),
    ] {
        let mut w = Writer::new();
        w.tensor("t", &[4, 32], &values, store);
        let file = parse(&w).unwrap();
        let (shape, out) = file.tensor_f32(&file.tensors[0]).unwrap();
        assert_eq!(shape, vec![4, 32]);
        let err = values
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= tolerance, "{store:?}: max error {err} > {tolerance}");
    }
}

#[test]
fn q4_1_block_by_hand() {
    // d = 0.5, m = −1; byte j holds element j (low nibble) and j + 16 (high nibble).
    let mut block = Vec::new();
    block.extend(half::f16::from_f32(0.5).to_le_bytes());
    block.extend(half::f16::from_f32(-1.0).to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut w = Writer::new();
    w.raw_tensor("t", vec![32], 3, block);
    let file = parse(&w).unwrap();
    let (_, out) = file.tensor_f32(&file.tensors[0]).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], 0.5 * j as f32 - 1.0);
        assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
}

/// Writes a chorus llama the way llama.cpp's converter does: GGUF names, Q/K rows interleaved.
fn llama_to_gguf(model: &Lm<B>, store: Store) -> Writer {
    let LmConfig::Llama(c) = model.config() else {
        unreachable!()
    };
    let mut w = Writer::new();
    w.meta("general.architecture", GgufValue::String("llama".into()))
        .meta("llama.block_count", GgufValue::Uint(c.n_layers as u64))
        .meta(
            "llama.context_length",
            GgufValue::Uint(c.max_seq_len as u64),
        )
        .meta("llama.embedding_length", GgufValue::Uint(c.d_model as u64))
        .meta("llama.feed_forward_length", GgufValue::Uint(c.d_ff as u64))
        .meta(
            "llama.attention.head_count",
            GgufValue::Uint(c.n_heads as u64),
        )
        .meta(
            "llama.attention.head_count_kv",
            GgufValue::Uint(c.n_kv_heads as u64),
        )
        .meta("llama.rope.freq_base", GgufValue::Float(c.rope_theta))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::Float(c.norm_eps),
        )
        .meta("llama.vocab_size", GgufValue::Uint(c.vocab_size as u64));
    for (name, shape, values) in crate::to_hf_tensors(model).unwrap() {
        let gguf_name = name
            .replace("model.embed_tokens.weight", "token_embd.weight")
            .replace("model.norm.weight", "output_norm.weight")
            .replace("lm_head.weight", "output.weight")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        let heads = if name.contains("q_proj") {
            Some(c.n_heads)
        } else if name.contains("k_proj") {
            Some(c.n_kv_heads)
        } else {
            None
        };
        let values = match heads {
            // llama.cpp's permute: HF row h·hd + part·hd/2 + i goes to h·hd + 2i + part.
            Some(heads) => {
                let (rows, cols) = (shape[0], shape[1]);
                let hd = rows / heads;
                let mut out = vec![0.0; values.len()];
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        for part in 0..2 {
                            let src = h * hd + part * hd / 2 + i;
                            let dst = h * hd + 2 * i + part;
                            out[dst * cols..(dst + 1) * cols]
                                .copy_from_slice(&values[src * cols..(src + 1) * cols]);
                        }
                    }
                }
                out
            }
            None => values,
        };
        let store = if shape.len() == 2 { store } else { Store::F32 };
        w.tensor(&gguf_name, &shape, &values, store);
    }
    w
}

fn gguf_llama() -> LmConfig {
    let mut config = tiny_llama(4, 2);
    if let LmConfig::Llama(c) = &mut config {
        c.vocab_size = 64; // rows of 32-element blocks
        c.norm_eps = 1.0 / 131_072.0; // exact in f32, as GGUF stores it
    }
    config
}

#[test]
fn a_llama_written_as_gguf_loads_back_with_identical_logits() {
    let _rng = crate::tests::seeded(0);
    let model = gguf_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::F32)).unwrap();
    let loaded = Lm::<B>::from_gguf(&file, &device()).unwrap();
    assert_eq!(loaded.config(), model.config());
    let ids = Tensor::<B, 2, Int>::from_data([[1, 5, 9, 2, 33, 7]], &device());
    let a = model
        .forward(LmInput::new(ids.clone()), None)
        .unwrap()
        .logits;
    let b = loaded
        .forward(LmInput::new(ids.clone()), None)
        .unwrap()
        .logits;
    let diff: f32 = (a.clone() - b).abs().max().into_scalar();
    assert!(diff < 1e-5, "|Δ| = {diff}");
    // Quantised to Q8_0 the logits move, but only a little.
    let file = parse(&llama_to_gguf(&model, Store::Q8_0)).unwrap();
    let q8 = Lm::<B>::from_gguf(&file, &device()).unwrap();
    let b = q8.forward(LmInput::new(ids), None).unwrap().logits;
    let diff: f32 = (a - b).abs().max().into_scalar();
    assert!(diff > 0.0 && diff < 0.05, "Q8_0 |Δ| = {diff}");
}

/// `Lm::open` reads a file whose name ends in `.gguf` as GGUF and a directory as a chorus
/// checkpoint or a Hugging Face directory, even one named `….gguf`; any other file is read as a
/// directory, and the error names the config it looked for.
#[test]
fn open_reads_a_gguf_file_and_each_kind_of_directory() {
    let _rng = crate::tests::seeded(3);
    let model = gguf_llama().init::<B>(&device()).unwrap();
    let gguf = llama_to_gguf(&model, Store::F32).bytes();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    std::fs::write(&file, &gguf).unwrap();
    let chorus = dir.path().join("checkpoint.gguf");
    model.save(&chorus).unwrap();
    let hf = dir.path().join("hf");
    model.save_hf_dir(&hf).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data([[1, 5, 9, 2]], &device());
    let logits = |m: &Lm<B>| m.forward(LmInput::new(ids.clone()), None).unwrap().logits;
    let expected = logits(&model);
    for path in [&file, &chorus, &hf] {
        let opened = Lm::<B>::open(path, &device()).unwrap();
        assert_eq!(opened.config(), model.config(), "{}", path.display());
        let diff: f32 = (logits(&opened) - expected.clone())
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "{}: |Δ| = {diff}", path.display());
    }
    let unnamed = dir.path().join("model.bin");
    std::fs::write(&unnamed, &gguf).unwrap();
    let err = Lm::<B>::open(&unnamed, &device()).unwrap_err().to_string();
    assert!(err.contains("model.bin/config.json"), "{err}");
}

#[test]
fn hugging_face_round_trip_is_bit_identical_for_both_families() {
    let _rng = crate::tests::seeded(1);
    for config in [tiny_llama(4, 2), tiny_gpt2()] {
        let dir = tempfile::tempdir().unwrap();
        let model = config.init::<B>(&device()).unwrap();
        model.save_hf_dir(dir.path()).unwrap();
        let loaded = Lm::<B>::from_hf_dir(dir.path(), &device()).unwrap();
        assert_eq!(loaded.config(), config);
        let ids = Tensor::<B, 2, Int>::from_data([[3, 1, 4, 1, 5]], &device());
        let a = model
            .forward(LmInput::new(ids.clone()), None)
            .unwrap()
            .logits;
        let b = loaded.forward(LmInput::new(ids), None).unwrap().logits;
        assert_eq!(a.into_data(), b.into_data(), "{config:?}");
    }
}

/// A Hugging Face `config.json` without its optional keys takes Hugging Face's defaults: llama's
/// `num_key_value_heads` = `num_attention_heads`, `rope_theta` 10,000, `rms_norm_eps` 10⁻⁶ and
/// untied embeddings; GPT-2's `n_inner` = 4 · `n_embd`, `layer_norm_epsilon` 10⁻⁵ and tied
/// embeddings. A required key missing or a `model_type` other than theirs is an error naming it.
#[test]
fn a_hugging_face_config_without_optional_keys_takes_hugging_faces_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let read = |json: serde_json::Value| {
        std::fs::write(&path, json.to_string()).unwrap();
        crate::config_from_hf(&path)
    };
    let llama = serde_json::json!({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64,
    });
    let expected = LmConfig::Llama(crate::LlamaConfig {
        vocab_size: 50,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_ff: 48,
        rope_theta: 10_000.0,
        norm_eps: 1e-6,
        tie_embeddings: false,
        max_seq_len: 64,
    });
    assert_eq!(read(llama.clone()).unwrap(), expected);
    let gpt2 = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "n_positions": 64,
    });
    let expected = LmConfig::Gpt2(crate::Gpt2Config {
        vocab_size: 50,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: 128,
        max_seq_len: 64,
        norm_eps: 1e-5,
        tie_embeddings: true,
    });
    assert_eq!(read(gpt2).unwrap(), expected);
    // Every key that a config writes reads back.
    for config in [tiny_llama(4, 2), tiny_gpt2()] {
        assert_eq!(read(crate::hf_config(&config)).unwrap(), config);
    }

    let mut without_width = llama.clone();
    without_width.as_object_mut().unwrap().remove("hidden_size");
    let err = read(without_width).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("`hidden_size`"),
        "{err}"
    );
    let mut mamba = llama;
    mamba["model_type"] = "mamba".into();
    let err = read(mamba).unwrap_err().to_string();
    assert!(err.contains("\"mamba\" is not supported"), "{err}");
}

#[test]
fn malformed_gguf_files_are_clear_errors() {
    let _rng = crate::tests::seeded(2);
    let model = gguf_llama().init::<B>(&device()).unwrap();
    let good = llama_to_gguf(&model, Store::Q4_1).bytes();
    let message = |bytes: Vec<u8>| -> String {
        match GgufFile::parse(bytes, "bad.gguf") {
            Err(e) => e.to_string(),
            Ok(file) => Lm::<B>::from_gguf(&file, &device())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        }
    };
    let mut wrong_magic = good.clone();
    wrong_magic[..4].copy_from_slice(b"GGML");
    assert!(message(wrong_magic).contains("not a GGUF file"));
    for keep in [0, 3, 10, 40, good.len() / 3, good.len() - 5] {
        let err = message(good[..keep].to_vec());
        assert!(
            err.contains("bad.gguf") && (err.contains("truncated") || err.contains("past the end")),
            "{keep}: {err}"
        );
    }
    // An unknown quantisation type: the tensor and the type are named.
    let mut w = llama_to_gguf(&model, Store::F32);
    w.raw_tensor("blk.9.attn_q.weight", vec![32, 2], 12, vec![0; 400]);
    let err = message(w.bytes());
    assert!(
        err.contains("blk.9.attn_q.weight") && err.contains("type 12"),
        "{err}"
    );
    // A missing tokenizer (misshapen and missing tensors: see the next test).
    let file = parse(&llama_to_gguf(&model, Store::F32)).unwrap();
    let err = Tokenizer::from_gguf(&file).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("test.gguf"),
        "{err}"
    );
}

#[test]
fn every_metadata_value_type_reads_back_as_written() {
    // GGUF v3 with no tensor and 13 keys, one of each value type (0–12), written by hand: the
    // test writer only writes types 4–9. The file ends with the last value.
    let mut string = 2u64.to_le_bytes().to_vec();
    string.extend(b"hi");
    let mut array = 0u32.to_le_bytes().to_vec();
    array.extend(3u64.to_le_bytes());
    array.extend([7, 0, 255]);
    let bytes = metadata_gguf(&[
        ("u8", 0, &[200]),
        ("i8", 1, &(-5i8).to_le_bytes()),
        ("u16", 2, &60_000u16.to_le_bytes()),
        ("i16", 3, &(-300i16).to_le_bytes()),
        ("u32", 4, &4_000_000_000u32.to_le_bytes()),
        ("i32", 5, &(-70_000i32).to_le_bytes()),
        ("f32", 6, &0.25f32.to_le_bytes()),
        ("bool", 7, &[1]),
        ("string", 8, &string),
        ("array", 9, &array),
        ("u64", 10, &(1u64 << 40).to_le_bytes()),
        ("i64", 11, &(-(1i64 << 40)).to_le_bytes()),
        ("f64", 12, &0.1f64.to_le_bytes()),
    ]);
    let file = GgufFile::parse(bytes, "every.gguf").unwrap();
    let expected = [
        ("u8", GgufValue::Uint(200)),
        ("i8", GgufValue::Int(-5)),
        ("u16", GgufValue::Uint(60_000)),
        ("i16", GgufValue::Int(-300)),
        ("u32", GgufValue::Uint(4_000_000_000)),
        ("i32", GgufValue::Int(-70_000)),
        ("f32", GgufValue::Float(0.25)),
        ("bool", GgufValue::Bool(true)),
        ("string", GgufValue::String("hi".into())),
        (
            "array",
            GgufValue::Array(vec![
                GgufValue::Uint(7),
                GgufValue::Uint(0),
                GgufValue::Uint(255),
            ]),
        ),
        ("u64", GgufValue::Uint(1 << 40)),
        ("i64", GgufValue::Int(-(1 << 40))),
        ("f64", GgufValue::Float(0.1)),
    ];
    let expected: std::collections::BTreeMap<String, GgufValue> = expected
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(file.metadata, expected);
    assert!(file.tensors.is_empty());
}

/// A GGUF v3 file with no tensor and the metadata `(key, type id, value bytes)`, in order; it
/// ends with the last value.
fn metadata_gguf(keys: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((keys.len() as u64).to_le_bytes());
    for (key, type_id, value) in keys {
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key.as_bytes());
        bytes.extend(type_id.to_le_bytes());
        bytes.extend(*value);
    }
    bytes
}

/// [`metadata_gguf`] with one key, `k`.
fn one_key_gguf(type_id: u32, value: &[u8]) -> Vec<u8> {
    metadata_gguf(&[("k", type_id, value)])
}

#[test]
fn metadata_arrays_nest_three_deep_and_hold_no_more_items_than_bytes() {
    // An array (type 9) of `levels` nested arrays, the innermost holding the byte 7.
    let nested = |levels: usize| -> Vec<u8> {
        let mut value = 0u32.to_le_bytes().to_vec();
        value.extend(1u64.to_le_bytes());
        value.push(7);
        for _ in 1..levels {
            let mut outer = 9u32.to_le_bytes().to_vec();
            outer.extend(1u64.to_le_bytes());
            outer.extend(value);
            value = outer;
        }
        one_key_gguf(9, &value)
    };
    let file = GgufFile::parse(nested(3), "nested.gguf").unwrap();
    let seven = GgufValue::Array(vec![GgufValue::Uint(7)]);
    let expected = GgufValue::Array(vec![GgufValue::Array(vec![seven])]);
    assert_eq!(file.metadata["k"], expected);
    let err = GgufFile::parse(nested(4), "nested.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nested.gguf") && err.contains("nested too deeply"),
        "{err}"
    );

    // Three one-byte items that end the file fit; a fourth is more items than bytes.
    let items = |count: u64| -> Vec<u8> {
        let mut value = 0u32.to_le_bytes().to_vec();
        value.extend(count.to_le_bytes());
        value.extend([1, 2, 3]);
        one_key_gguf(9, &value)
    };
    let file = GgufFile::parse(items(3), "items.gguf").unwrap();
    let bytes: Vec<GgufValue> = (1..=3).map(GgufValue::Uint).collect();
    assert_eq!(file.metadata["k"], GgufValue::Array(bytes));
    let err = GgufFile::parse(items(4), "items.gguf")
        .unwrap_err()
        .to_string();
    assert!(err.contains("array of 4 items in 3 bytes"), "{err}");
}

#[test]
fn a_signed_metadata_integer_is_unsigned_only_when_it_is_not_negative() {
    for (value, expected) in [(5i32, Some(5u64)), (0, Some(0)), (-1, None)] {
        let file = GgufFile::parse(one_key_gguf(5, &value.to_le_bytes()), "int.gguf").unwrap();
        match (file.get_uint("k"), expected) {
            (Ok(got), Some(expected)) => assert_eq!(got, expected),
            (Err(e), None) => assert!(e.to_string().contains("not an unsigned integer"), "{e}"),
            (got, _) => panic!("{value}: {got:?}"),
        }
    }
}

#[test]
fn a_tensor_count_the_file_cannot_hold_is_refused_before_any_is_read() {
    // 40 tensors claimed in a 48-byte file (each takes at least 24 bytes).
    let mut bytes = one_key_gguf(4, &7u32.to_le_bytes());
    bytes[8..16].copy_from_slice(&40u64.to_le_bytes());
    bytes.resize(48, 0);
    let err = GgufFile::parse(bytes, "count.gguf")
        .unwrap_err()
        .to_string();
    assert!(err.contains("40 tensors cannot fit in 48 bytes"), "{err}");
}

#[test]
fn a_tensor_has_one_to_eight_dimensions() {
    let with_dims = |n: usize| {
        let mut w = Writer::new();
        let mut dims = vec![1u64; n];
        if let Some(first) = dims.first_mut() {
            *first = 2;
        }
        w.raw_tensor(
            "t",
            dims,
            0,
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        GgufFile::parse(w.bytes(), "dims.gguf")
    };
    for n in [1, 8] {
        let file = with_dims(n).unwrap();
        let (shape, values) = file.tensor_f32(&file.tensors[0]).unwrap();
        let mut expected = vec![1; n];
        expected[n - 1] = 2;
        assert_eq!(
            (shape, values),
            (expected, vec![1.5, -2.0]),
            "{n} dimensions"
        );
    }
    for n in [0, 9] {
        let err = with_dims(n).unwrap_err().to_string();
        assert!(
            err.contains(&format!("tensor `t`: {n} dimensions")),
            "{err}"
        );
    }
}

#[test]
fn general_alignment_places_the_data_and_must_be_a_power_of_two() {
    let values = ramp(64);
    let aligned = |alignment: u64| {
        let mut w = Writer::new();
        w.meta("general.alignment", GgufValue::Uint(alignment));
        w.tensor("a", &[2, 32], &values, Store::F32);
        w.tensor(
            "b",
            &[64],
            &values[..].iter().rev().copied().collect::<Vec<_>>(),
            Store::F32,
        );
        w.bytes()
    };
    let bytes = aligned(256);
    assert_eq!(bytes.len() % 256, 0);
    let file = GgufFile::parse(bytes, "aligned.gguf").unwrap();
    assert_eq!(file.tensor_f32(&file.tensors[0]).unwrap().1, values);
    let reversed: Vec<f32> = values.iter().rev().copied().collect();
    assert_eq!(file.tensor_f32(&file.tensors[1]).unwrap().1, reversed);
    for bad in [0, 48] {
        let err = GgufFile::parse(aligned(bad), "aligned.gguf")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("general.alignment") && err.contains("power of two"),
            "{bad}: {err}"
        );
    }
}

/// A tensor the config needs but the file lacks, one of another shape, and one the config does not
/// describe are each an error naming the tensor, from a GGUF file and from a Hugging Face
/// directory.
#[test]
fn missing_misshapen_and_unexpected_tensors_are_named() {
    let _rng = crate::tests::seeded(3);
    let model = gguf_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::F32)).unwrap();
    let rebuild = |skip: &str, halve: &str, extra: Option<&str>| {
        let mut w = Writer::new();
        for (k, v) in &file.metadata {
            w.meta(k, v.clone());
        }
        for info in &file.tensors {
            let (shape, values) = file.tensor_f32(info).unwrap();
            if info.name == skip {
                continue;
            }
            if info.name == halve {
                w.tensor(
                    &info.name,
                    &[shape[0] / 2, shape[1]],
                    &values[..values.len() / 2],
                    Store::F32,
                );
            } else {
                w.tensor(&info.name, &shape, &values, Store::F32);
            }
            if Some(info.name.as_str()) == extra.map(|_| "blk.1.ffn_gate.weight") {
                w.tensor(extra.unwrap(), &shape, &values, Store::F32);
            }
        }
        Lm::<B>::from_gguf(&parse(&w).unwrap(), &device()).unwrap_err()
    };
    let err = rebuild("blk.1.ffn_gate.weight", "", None);
    assert!(
        matches!(&err, LmError::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.gate_proj.weight"),
        "{err}"
    );
    let err = rebuild("", "blk.0.ffn_up.weight", None);
    assert!(
        matches!(&err, LmError::TensorMismatch { tensor, .. } if tensor == "model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
    // A third layer's gate in a file whose config has two.
    let err = rebuild("", "", Some("blk.2.ffn_gate.weight"));
    assert!(
        matches!(&err, LmError::UnexpectedTensor { tensor, .. } if tensor == "model.layers.2.mlp.gate_proj.weight"),
        "{err}"
    );

    // A Hugging Face directory whose config.json says one layer where its weights hold two.
    let dir = tempfile::tempdir().unwrap();
    model.save_hf_dir(dir.path()).unwrap();
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 1.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = Lm::<B>::from_hf_dir(dir.path(), &device()).unwrap_err();
    assert!(
        matches!(&err, LmError::UnexpectedTensor { path, tensor }
            if tensor.starts_with("model.layers.1.") && path.ends_with("model.safetensors")),
        "{err}"
    );
}

fn tokenizer_gguf(pre: &str) -> Writer {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let merges = ["t h", "th e", "Ġ the", "1 2"];
    tokens.extend(["th", "the", "Ġthe", "12"].iter().map(|s| s.to_string()));
    let types: Vec<GgufValue> = (0..tokens.len())
        .map(|i| GgufValue::Int(if i < 3 { 3 } else { 1 }))
        .collect();
    let mut w = Writer::new();
    w.meta("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", GgufValue::String(pre.into()))
        .meta(
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
        )
        .meta("tokenizer.ggml.token_type", GgufValue::Array(types))
        .meta(
            "tokenizer.ggml.merges",
            GgufValue::Array(
                merges
                    .iter()
                    .map(|m| GgufValue::String(m.to_string()))
                    .collect(),
            ),
        )
        .meta(
            "tokenizer.chat_template",
            GgufValue::String("{{ messages }}".into()),
        );
    w
}

#[test]
fn gguf_tokenizer_keeps_control_tokens_digits_and_template() {
    let gpt2 = Tokenizer::from_gguf(&parse(&tokenizer_gguf("gpt2")).unwrap()).unwrap();
    let smollm = Tokenizer::from_gguf(&parse(&tokenizer_gguf("smollm")).unwrap()).unwrap();
    assert_eq!(smollm.chat_template(), Some("{{ messages }}"));
    let ids = smollm.encode("<|im_start|>the the<|im_end|>").unwrap();
    let the = smollm.token_to_id("the").unwrap();
    let space_the = smollm.token_to_id("Ġthe").unwrap();
    assert_eq!(ids, vec![1, the, space_the, 2]);
    // "smollm" splits digits one by one (so the merge "1 2" never applies); "gpt2" does not.
    let twelve = gpt2.token_to_id("12").unwrap();
    assert_eq!(gpt2.encode("12").unwrap(), vec![twelve]);
    assert_eq!(smollm.encode("12").unwrap().len(), 2);
    for text in ["the cat", "ünï 42 \n\t x", ""] {
        assert_eq!(smollm.decode(&smollm.encode(text).unwrap()).unwrap(), text);
    }
    let err = Tokenizer::from_gguf(&parse(&tokenizer_gguf("mystery")).unwrap()).unwrap_err();
    assert!(err.to_string().contains("mystery"), "{err}");
}

/// The GGUF's BOS survives saving as tokenizer.json (in `tokenizer_config.json` beside it, as
/// Hugging Face writes it): llama.cpp's server needs it to align log-probs. A `bos_token` that is
/// not in the vocabulary is an error naming the file.
#[test]
fn a_saved_gguf_tokenizer_keeps_its_bos() {
    let mut w = tokenizer_gguf("smollm");
    w.meta("tokenizer.ggml.bos_token_id", GgufValue::Uint(1));
    let gguf = Tokenizer::from_gguf(&parse(&w).unwrap()).unwrap();
    assert_eq!(gguf.bos_id(), Some(1));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    gguf.save(&path).unwrap();
    let back = Tokenizer::open(dir.path()).unwrap();
    assert_eq!(back.bos_id(), Some(1));
    back.check_same(&gguf).unwrap();
    // `open` takes the tokenizer.json itself and the .gguf file too.
    let gguf_path = dir.path().join("model.gguf");
    std::fs::write(&gguf_path, w.bytes()).unwrap();
    for source in [&path, &gguf_path] {
        let opened = Tokenizer::open(source).unwrap();
        assert_eq!(opened.source(), source.display().to_string());
        assert_eq!(opened.bos_id(), Some(1));
        opened.check_same(&gguf).unwrap();
    }
    let config = dir.path().join(crate::TOKENIZER_CONFIG);
    std::fs::write(&config, r#"{"bos_token": {"content": "<s>"}}"#).unwrap();
    let err = Tokenizer::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("<s>"),
        "{err}"
    );
}

#[test]
fn a_gguf_bos_is_one_of_its_tokens_or_none() {
    let file = parse(&tokenizer_gguf("smollm")).unwrap();
    let tokens = file.get_strings("tokenizer.ggml.tokens").unwrap().len();
    assert_eq!(Tokenizer::from_gguf(&file).unwrap().bos_id(), None);
    for (id, bos) in [
        (2, Some(2)),
        (tokens - 1, Some(tokens as u32 - 1)),
        (tokens, None),
    ] {
        let mut w = tokenizer_gguf("smollm");
        w.meta("tokenizer.ggml.bos_token_id", GgufValue::Uint(id as u64));
        let tokenizer = Tokenizer::from_gguf(&parse(&w).unwrap()).unwrap();
        assert_eq!(
            tokenizer.bos_id(),
            bos,
            "bos_token_id {id} of {tokens} tokens"
        );
    }
}

#[test]
fn tokenizers_of_one_chorus_must_match() {
    let a = Tokenizer::from_gguf(&parse(&tokenizer_gguf("gpt2")).unwrap()).unwrap();
    let b = Tokenizer::from_gguf(&parse(&tokenizer_gguf("gpt2")).unwrap()).unwrap();
    a.check_same(&b).unwrap();
    let mut other = tokenizer_gguf("gpt2");
    other.meta(
        "tokenizer.ggml.merges",
        GgufValue::Array(vec![GgufValue::String("t h".into())]),
    );
    // The later key wins in the parsed map: fewer merges.
    let c = Tokenizer::from_gguf(&GgufFile::parse(other.bytes(), "other.gguf").unwrap()).unwrap();
    let err = a.check_same(&c).unwrap_err().to_string();
    assert!(
        err.contains("test.gguf") && err.contains("other.gguf") && err.contains("merges"),
        "{err}"
    );
    // Same vocabulary and merges, another pre-tokenizer ("12" is one token or two): refused.
    let smollm = Tokenizer::from_gguf(&parse(&tokenizer_gguf("smollm")).unwrap()).unwrap();
    assert_ne!(a.encode("12").unwrap(), smollm.encode("12").unwrap());
    let err = a.check_same(&smollm).unwrap_err().to_string();
    assert!(err.contains("pre-tokenizer differs"), "{err}");
    // Each side in full up to 120 characters, else its first 120 and "…": gpt2's ByteLevel is
    // short, smollm's sequence of Digits and ByteLevel long.
    let pre_tokenizer = |t: &Tokenizer| {
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path().join("tokenizer.json")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["pre_tokenizer"].to_string()
    };
    let (short, long) = (pre_tokenizer(&a), pre_tokenizer(&smollm));
    assert!(short.chars().count() <= 120 && long.chars().count() > 120);
    let long: String = long.chars().take(120).collect();
    assert!(
        err.ends_with(&format!("differs: {short} vs {long}…")),
        "{err}"
    );
    // A normaliser or a decoder of its own, through tokenizer.json: refused, naming the part.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    a.save(&path).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (part, value, says) in [
        (
            "normalizer",
            serde_json::json!({"type": "Lowercase"}),
            "normalizer differs",
        ),
        (
            "decoder",
            serde_json::json!({"type": "Replace", "pattern": {"String": "Ġ"}, "content": " "}),
            "decoder differs",
        ),
    ] {
        let mut changed = json.clone();
        changed[part] = value;
        let edited = dir.path().join(format!("{part}.json"));
        std::fs::write(&edited, changed.to_string()).unwrap();
        let other = Tokenizer::from_file(&edited).unwrap();
        let err = a.check_same(&other).unwrap_err().to_string();
        assert!(
            err.contains(says) && err.contains(&format!("{part}.json")),
            "{err}"
        );
    }
    Tokenizer::from_file(&path).unwrap().check_same(&a).unwrap();
}

/// Mutates a valid GGUF (bit flips, boundary values over length and count fields, truncation,
/// insertion, splicing) and requires the reader to return Ok or Err — never panic — and every
/// tensor it accepts to dequantise without panicking. Runs for `CHORUS_FUZZ_SECS` seconds
/// (default 3); `CHORUS_FUZZ_SECS=600 cargo test -p chorus-lm --release gguf_reader_survives` is the
/// long run.
#[test]
fn gguf_reader_survives_random_mutations() {
    let _rng = crate::tests::seeded(4);
    let model = gguf_llama().init::<B>(&device()).unwrap();
    let mut seeds = vec![
        llama_to_gguf(&model, Store::Q4_1).bytes(),
        tokenizer_gguf("smollm").bytes(),
    ];
    let mut w = Writer::new();
    for (i, store) in [
        Store::F32,
        Store::F16,
        Store::Q8_0,
        Store::Q4_0,
        Store::Q4_1,
    ]
    .into_iter()
    .enumerate()
    {
        w.tensor(&format!("t{i}"), &[2, 32], &ramp(64), store);
    }
    seeds.push(w.bytes());
    let secs: u64 = std::env::var("CHORUS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut rng = SplitMix64(0x9E37_79B9_7F4A_7C15);
    let (mut runs, mut accepted) = (0u64, 0u64);
    while std::time::Instant::now() < deadline {
        let mut bytes = seeds[rng.index(seeds.len())].clone();
        for _ in 0..1 + rng.index(4) {
            let len = bytes.len();
            match rng.index(6) {
                0 => bytes[rng.index(len)] ^= 1 << rng.index(8),
                1 if len >= 8 => {
                    let at = rng.index(len - 7);
                    let v = [0u64, u64::MAX, u32::MAX as u64, 1 << 40, 0x7f, 31][rng.index(6)];
                    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                2 => bytes.truncate(rng.index(len)),
                3 => {
                    let at = rng.index(len);
                    bytes.insert(at, rng.next_u64() as u8);
                }
                4 => {
                    let (a, b) = (rng.index(len), rng.index(len));
                    let n = rng.index(64).min(len - a.max(b));
                    let chunk = bytes[a..a + n].to_vec();
                    bytes[b..b + n].copy_from_slice(&chunk);
                }
                _ => bytes[rng.index(len)] = [0, 0xff, 0x80, 0x7f][rng.index(4)],
            }
            if bytes.is_empty() {
                break;
            }
        }
        runs += 1;
        if let Ok(file) = GgufFile::parse(bytes, "fuzz.gguf") {
            accepted += 1;
            for info in &file.tensors {
                let _ = file.tensor_f32(info);
            }
            let _ = Tokenizer::from_gguf(&file);
            let _ = crate::llama_config_from_gguf(&file);
        }
    }
    eprintln!("gguf fuzz: {runs} mutated files in {secs} s, {accepted} parsed, no panic");
    assert!(runs > 0);
}

/// [`gguf_llama`] with every matrix row a whole number of 32-value blocks.
fn block_llama() -> LmConfig {
    let mut config = gguf_llama();
    if let LmConfig::Llama(c) = &mut config {
        c.d_ff = 64;
    }
    config
}

#[test]
fn block_products_equal_products_with_the_dequantised_weights() {
    use crate::quantised::{BlockMatrix, Kernel, matmul_rows_all};
    let mut rng = SplitMix64(7);
    let kernels = Kernel::available();
    // 5 × 64: one thread; 7 × 160: an odd number of blocks per row (the one-row kernels' two
    // chains, crate::quantised::two_chains); 37 × 96: groups of 16 weight rows and a partial one
    // (crate::quantised::tiles_by_row_groups); 257 × 384: split across the pool, each chunk's
    // outputs written into its columns (crate::quantised::write_columns; Q8_0: two chunks of 128
    // weight rows and a last of one). 43 and 64 rows of activations are six and eight tiles. An
    // AVX-512 tile holds two weight rows (crate::quantised::avx512::WEIGHT_ROWS_PER_TILE); 5, 7,
    // 37 and 257 weight rows end on one.
    let mut all = Vec::new();
    for (rows, cols) in [(5, 64), (7, 160), (37, 96), (257, 384)] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        for store in [Store::Q8_0, Store::Q4_0, Store::Q4_1] {
            let mut w = Writer::new();
            w.tensor("m", &[rows, cols], &values, store);
            let file = parse(&w).unwrap();
            let info = file.tensor_info("m").unwrap();
            let (_, weights) = file.tensor_f32(info).unwrap();
            let blocks = BlockMatrix::from_gguf(&file, info, None).unwrap().unwrap();
            assert_eq!((blocks.rows(), blocks.cols()), (rows, cols));
            assert_eq!(
                format!("{blocks:?}"),
                format!("BlockMatrix({store:?}, {rows}×{cols})")
            );
            let block_bytes = match store {
                Store::Q8_0 => 34,
                Store::Q4_0 => 18,
                _ => 20,
            };
            assert_eq!(blocks.bytes(), rows * cols / 32 * block_bytes, "{store:?}");
            assert_eq!(blocks.dequantise(), weights, "{store:?}");
            // A step reads every block: they lie where the kernel may use 2 MiB pages.
            #[cfg(target_os = "linux")]
            assert_ne!(
                crate::huge_pages::advised_for_huge_pages(blocks.blocks_address()),
                Some(false),
                "{store:?} blocks in memory not advised for huge pages"
            );
            for n in [1, 2, 3, 11, 16, 43, 64] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
                    .collect();
                for &kernel in &kernels {
                    let [y] = matmul_rows_all([&blocks], &x, n, kernel);
                    for i in 0..n {
                        for r in 0..rows {
                            let (mut exact, mut scale) = (0.0f64, 0.0f64);
                            for c in 0..cols {
                                let term = weights[r * cols + c] as f64 * x[i * cols + c] as f64;
                                exact += term;
                                scale += term.abs();
                            }
                            let got = y[i * rows + r] as f64;
                            assert!(
                                (got - exact).abs() <= 1e-5 * scale + 1e-6,
                                "{store:?} {kernel:?} n={n} [{i}, {r}]: {got} against {exact}"
                            );
                        }
                    }
                }
            }
            if cols == 384 {
                all.push(blocks);
            }
        }
    }
    // Several matrices in one pass: each product as alone, bit for bit.
    for n in [2, 40] {
        let x: Vec<f32> = (0..n * 384).map(|i| (i % 7) as f32 - 3.0).collect();
        let together = matmul_rows_all([&all[0], &all[1], &all[2]], &x, n, Kernel::detect());
        for (blocks, y) in all.iter().zip(together) {
            assert_eq!(y, blocks.matmul_rows(&x, n), "n = {n}");
        }
    }
    // A row that is not whole blocks is an error naming the tensor.
    let mut w = Writer::new();
    w.raw_tensor("ragged", vec![48, 2], 8, vec![0; 3 * 34]);
    let file = parse(&w).unwrap();
    let err = BlockMatrix::from_gguf(&file, file.tensor_info("ragged").unwrap(), None).unwrap_err();
    assert!(
        err.to_string().contains("`ragged` has rows of 48 values"),
        "{err}"
    );
}

/// 40 tokens in each of 2 sequences: 80 rows, more than the blocks take.
fn long_prompt() -> Tensor<B, 2, Int> {
    const { assert!(80 > crate::MAX_BLOCK_ROWS) };
    let prompt: Vec<i64> = (0..80).map(|i| (i * 7 + 3) % 64).collect();
    Tensor::<B, 1, Int>::from_data(prompt.as_slice(), &device()).reshape([2, 40])
}

/// The logits of [`long_prompt`] in one forward without a cache: burn's products with the f32
/// weights, however the model was read.
fn uncached_forward(model: &Lm<B>) -> Tensor<B, 3> {
    model
        .forward(LmInput::new(long_prompt()), None)
        .unwrap()
        .logits
}

/// Logits of a 40-token prefill (batch 2: 80 rows, so a model decoding from blocks runs it as
/// steps of 32 positions) and of 6 single-token steps after it, with a cache.
fn prefill_and_steps(model: &Lm<B>) -> (Tensor<B, 3>, Vec<Tensor<B, 3>>) {
    let tokens = long_prompt();
    let mut cache = model.new_cache();
    let prefill = model
        .forward(LmInput::new(tokens), Some(&mut cache))
        .unwrap()
        .logits;
    let steps = (0..6)
        .map(|s| {
            let next = Tensor::<B, 2, Int>::from_data([[s * 5 + 1], [s * 3 + 2]], &device());
            model
                .forward(LmInput::new(next), Some(&mut cache))
                .unwrap()
                .logits
        })
        .collect();
    (prefill, steps)
}

fn max_abs_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn a_gguf_model_decodes_from_its_blocks_as_from_its_f32_weights() {
    let _rng = crate::tests::seeded(5);
    let model = block_llama().init::<B>(&device()).unwrap();
    for store in [Store::Q4_1, Store::Q8_0, Store::Q4_0] {
        let file = parse(&llama_to_gguf(&model, store)).unwrap();
        let loaded = Lm::<B>::from_gguf(&file, &device()).unwrap();
        let decoding = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
        let (f32_prefill, f32_steps) = prefill_and_steps(&loaded);
        let (prefill, steps) = prefill_and_steps(&decoding);
        // The cached prefill in steps of 32 positions and the single-token steps: the blocks,
        // equal up to f32 rounding.
        let diff = max_abs_diff(prefill, f32_prefill);
        assert!(diff < 1e-4, "{store:?} prefill: |Δ| = {diff}");
        for (s, (a, b)) in steps.into_iter().zip(f32_steps).enumerate() {
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-4, "{store:?} step {s}: |Δ| = {diff}");
        }
        // Eighty rows without a cache: the f32 weights, bit for bit.
        let diff = max_abs_diff(uncached_forward(&decoding), uncached_forward(&loaded));
        assert_eq!(diff, 0.0, "{store:?}");
    }
    // Cached forwards read the blocks, an uncached one of many rows does not: another model's
    // blocks change only the former.
    let other = block_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::Q8_0)).unwrap();
    let other_file = parse(&llama_to_gguf(&other, Store::Q8_0)).unwrap();
    let own = Lm::<B>::from_gguf(&file, &device()).unwrap();
    let (own_prefill, own_steps) = prefill_and_steps(&own);
    let mut mixed = Lm::<B>::from_gguf(&file, &device()).unwrap();
    let Lm::Llama(llama) = &mut mixed else {
        unreachable!()
    };
    llama.attach_gguf_blocks(&other_file).unwrap();
    let diff = max_abs_diff(uncached_forward(&mixed), uncached_forward(&own));
    assert_eq!(diff, 0.0);
    let (prefill, steps) = prefill_and_steps(&mixed);
    let diff = max_abs_diff(prefill, own_prefill);
    assert!(
        diff > 1e-2,
        "another model's blocks left the prefill unchanged: |Δ| = {diff}"
    );
    let diff = max_abs_diff(steps[0].clone(), own_steps[0].clone());
    assert!(
        diff > 1e-2,
        "another model's blocks left the step unchanged: |Δ| = {diff}"
    );
    // A padded forward of a few rows stays on burn's path (no host step), whose products read
    // the blocks as well.
    let padded = |lm: &Lm<B>| {
        let tokens = Tensor::<B, 2, Int>::from_data([[1, 5, 9], [3, 3, 8]], &device());
        let padding =
            Tensor::<B, 2, Bool>::from_data([[true, false, false], [false; 3]], &device());
        let input = LmInput::new(tokens).with_padding(padding);
        lm.forward(input, None).unwrap().logits
    };
    let own = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
    let diff = max_abs_diff(padded(&mixed), padded(&own));
    assert!(
        diff > 1e-2,
        "another model's blocks left a padded forward unchanged: |Δ| = {diff}"
    );
}

/// A model decoding from its blocks refuses a token id outside its vocabulary in a prefill and in
/// a step, as a dense model does (`token_ids_outside_the_vocabulary_are_errors`).
#[test]
fn a_decoding_model_refuses_token_ids_outside_its_vocabulary() {
    let _rng = crate::tests::seeded(5);
    let model = block_llama().init::<B>(&device()).unwrap();
    let vocab = model.dims().vocab_size as i64;
    let file = parse(&llama_to_gguf(&model, Store::Q4_1)).unwrap();
    let decoding = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
    let mut cache = decoding.new_cache();
    let prompt = Tensor::<B, 2, Int>::from_data([[1, vocab, 2]], &device());
    let err = decoding
        .forward(LmInput::new(prompt), Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("token id {vocab} at row 0, position 1 is outside")),
        "{err}"
    );
    let prompt = Tensor::<B, 2, Int>::from_data([[1, vocab - 1, 2]], &device());
    decoding
        .forward(LmInput::new(prompt), Some(&mut cache))
        .unwrap();
    let step = Tensor::<B, 2, Int>::from_data([[-3]], &device());
    let err = decoding
        .forward(LmInput::new(step), Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id -3 at row 0, position 0 is outside"),
        "{err}"
    );
    assert_eq!(cache.len(), 3);
}

/// Whether each of a llama's block-quantised matrices (q, k, v, o, gate, up, down of every layer,
/// then the tied embedding) has its f32 weights.
fn f32_weights_made(model: &Lm<B>) -> Vec<bool> {
    let Lm::Llama(llama) = model else {
        unreachable!("a llama")
    };
    let mut made = Vec::new();
    for layer in &llama.layers {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        for linear in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
            made.push(linear.weight.is_initialized());
        }
        for linear in [&m.gate_proj, &m.up_proj, &m.down_proj] {
            made.push(linear.weight.is_initialized());
        }
    }
    made.push(llama.embed_tokens.weight.is_initialized());
    made
}

/// A model read for decoding holds its block-quantised matrices as blocks alone while it decodes
/// (steps of a few rows, a long prompt's prefill in steps of as many rows as the blocks take, the
/// embedding read from the tied output layer's blocks); a product the blocks do not serve (80
/// rows without a cache) makes the f32 weights from them, the values `from_gguf` loads bit for
/// bit, after which the model decodes as before.
#[test]
fn a_decoding_model_makes_f32_weights_only_for_products_the_blocks_cannot_serve() {
    let _rng = crate::tests::seeded(6);
    let model = block_llama().init::<B>(&device()).unwrap();
    for store in [Store::Q4_1, Store::Q8_0] {
        let file = parse(&llama_to_gguf(&model, store)).unwrap();
        let loaded = Lm::<B>::from_gguf(&file, &device()).unwrap();
        let decoding = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
        assert!(!f32_weights_made(&decoding).contains(&true), "{store:?}");
        let unmade = f32_weights_made(&decoding).len();
        assert_eq!(decoding.weights_made_on_use().len(), unmade, "{store:?}");
        assert_eq!(loaded.weights_made_on_use(), vec![], "{store:?}");
        let steps = |lm: &Lm<B>| {
            let mut cache = lm.new_cache();
            let prompt = Tensor::<B, 2, Int>::from_data([[3, 9, 27, 17]], &device());
            let mut logits = vec![lm.forward(LmInput::new(prompt), Some(&mut cache)).unwrap()];
            for s in 0..3 {
                let next = Tensor::<B, 2, Int>::from_data([[s * 11 + 5]], &device());
                logits.push(lm.forward(LmInput::new(next), Some(&mut cache)).unwrap());
            }
            logits.into_iter().map(|out| out.logits).collect::<Vec<_>>()
        };
        let before = steps(&decoding);
        assert!(!f32_weights_made(&decoding).contains(&true), "{store:?}");
        for (s, (a, b)) in before.iter().zip(steps(&loaded)).enumerate() {
            let diff = max_abs_diff(a.clone(), b);
            assert!(diff < 1e-4, "{store:?} step {s}: |Δ| = {diff}");
        }
        // A long prompt's cached prefill runs in steps the blocks take.
        prefill_and_steps(&decoding);
        assert!(!f32_weights_made(&decoding).contains(&true), "{store:?}");
        let logits = uncached_forward(&decoding);
        assert!(!f32_weights_made(&decoding).contains(&false), "{store:?}");
        assert_eq!(decoding.weights_made_on_use(), vec![], "{store:?}");
        let diff = max_abs_diff(logits, uncached_forward(&loaded));
        assert_eq!(diff, 0.0, "{store:?}");
        for (s, (a, b)) in steps(&decoding).into_iter().zip(before).enumerate() {
            assert_eq!(
                max_abs_diff(a, b),
                0.0,
                "{store:?} step {s} after the prefill"
            );
        }
    }
}

/// The matrices a model read for decoding keeps as blocks, and so leaves out of its f32 import
/// (`quantised::block_matrix_names`), are exactly the file's block-quantised tensors but an
/// untied embedding (read by lookups, in f32): every layer's seven and the output layer (the tied
/// embedding, or `output.weight`). A name missing from the set would be loaded in f32 beside its
/// blocks, doubling what the import holds.
#[test]
fn the_matrices_kept_as_blocks_are_the_files_block_quantised_tensors() {
    use crate::quantised::{block_matrix_names, llama_blocks};
    let _rng = crate::tests::seeded(8);
    for tie in [true, false] {
        let mut config = block_llama();
        if let LmConfig::Llama(c) = &mut config {
            c.tie_embeddings = tie;
        }
        let model = config.init::<B>(&device()).unwrap();
        let file = parse(&llama_to_gguf(&model, Store::Q8_0)).unwrap();
        let quantised: std::collections::BTreeSet<String> = file
            .tensors
            .iter()
            .filter(|t| t.dtype == crate::GgmlType::Q8_0)
            .map(|t| t.name.clone())
            .collect();
        let config = crate::llama_config_from_gguf(&file).unwrap();
        assert_eq!(quantised.len(), 7 * config.n_layers + 2 - tie as usize);
        let mut expected = quantised;
        if !tie {
            assert!(expected.remove("token_embd.weight"));
            assert!(expected.contains("output.weight"));
        }
        let (layers, output) = llama_blocks(&file, &config).unwrap();
        let kept = block_matrix_names(&layers, output.as_deref(), &config);
        assert_eq!(kept, expected, "tied: {tie}");
    }
}

/// A model whose weights came from a GGUF file by another road (a joint checkpoint saves a
/// frozen GGUF assistant in f32; here a chorus LM directory, save → load) decodes from that
/// file's blocks once they are attached, as the model read for decoding does; the blocks of any
/// other file are refused, naming the file and the first matrix that differs, and the model
/// stays as it was.
#[test]
fn blocks_attach_only_to_the_model_whose_weights_they_hold() {
    let _rng = crate::tests::seeded(7);
    let model = block_llama().init::<B>(&device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, model: &Lm<B>| {
        let path = dir.path().join(name);
        std::fs::write(&path, llama_to_gguf(model, Store::Q4_1).bytes()).unwrap();
        path
    };
    // Written first: it initialises the model's lazy weights, which its clones share then.
    let own = write("own.gguf", &model);
    // Two files that differ from the model's in one matrix each: the last layer's down
    // projection, the (tied) output layer.
    let changed = |edit: fn(&mut crate::Llama<B>)| {
        let mut other = model.clone();
        let Lm::Llama(llama) = &mut other else {
            unreachable!()
        };
        edit(llama);
        other
    };
    fn random(w: Tensor<B, 2>) -> Param<Tensor<B, 2>> {
        Param::from_tensor(w.random_like(Distribution::Default))
    }
    let down = changed(|l| {
        let mlp = &mut l.layers.last_mut().unwrap().mlp;
        mlp.down_proj.weight = random(mlp.down_proj.weight.val());
    });
    let output = changed(|l| l.embed_tokens.weight = random(l.embed_tokens.weight.val()));
    let file = GgufFile::open(&own).unwrap();
    let decoding = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
    Lm::<B>::from_gguf(&file, &device())
        .unwrap()
        .save(dir.path().join("lm"))
        .unwrap();
    let saved = || Lm::<B>::load(dir.path().join("lm"), &device()).unwrap();
    let has_blocks = |lm: &Lm<B>| matches!(lm, Lm::Llama(l) if l.host_blocks().is_some());
    let (_, expected) = prefill_and_steps(&decoding);
    let (_, f32_steps) = prefill_and_steps(&saved());

    let mut attached = saved();
    assert!(!has_blocks(&attached));
    attached.attach_gguf_blocks(&own).unwrap();
    assert!(has_blocks(&attached));
    let (_, steps) = prefill_and_steps(&attached);
    for (s, (a, b)) in steps.into_iter().zip(expected).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "step {s}: not the blocks' numbers");
    }
    assert!(
        max_abs_diff(
            f32_steps[0].clone(),
            prefill_and_steps(&attached).1[0].clone()
        ) > 0.0
    );

    let mut refused = saved();
    let last = block_llama().dims().n_layers - 1;
    for (other, name) in [
        (&down, format!("blk.{last}.ffn_down.weight")),
        (&output, "token_embd.weight".into()),
    ] {
        let path = write("other.gguf", other);
        let err = refused.attach_gguf_blocks(&path).unwrap_err().to_string();
        assert!(
            err.contains("other.gguf") && err.contains(&format!("`{name}` differs")),
            "{err}"
        );
        assert!(
            !has_blocks(&refused),
            "the model changed although the blocks were refused"
        );
    }
    // A file of another shape (a wider MLP), and no file at all.
    let mut wider = block_llama();
    if let LmConfig::Llama(c) = &mut wider {
        c.d_ff = 96;
    }
    let path = write("wider.gguf", &wider.init::<B>(&device()).unwrap());
    let err = refused.attach_gguf_blocks(&path).unwrap_err().to_string();
    assert!(
        err.contains("wider.gguf") && err.contains("`blk.0.ffn_gate.weight` is [96, 32]"),
        "{err}"
    );
    let err = refused
        .attach_gguf_blocks(&dir.path().join("moved.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("moved.gguf"), "{err}");
    assert!(!has_blocks(&refused));
}

#[test]
fn a_gguf_model_that_trains_takes_gradients_through_its_f32_weights() {
    let _rng = crate::tests::seeded(8);
    type AD = burn::backend::Autodiff<B>;
    let model = block_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::Q4_1)).unwrap();
    let trained = Lm::<AD>::from_gguf_for_decoding(&file, &device()).unwrap();
    // Two tokens (with one, attention ignores q and q_proj's gradient is zero).
    let token = Tensor::<AD, 2, Int>::from_data([[3, 9]], &device());
    let grads = trained
        .forward(LmInput::new(token), None)
        .unwrap()
        .logits
        .sum()
        .backward();
    let Lm::Llama(llama) = &trained else {
        unreachable!()
    };
    let layer = &llama.layers[0];
    for (name, weight) in [
        ("q_proj", &layer.self_attn.q_proj.weight),
        ("o_proj", &layer.self_attn.o_proj.weight),
        ("down_proj", &layer.mlp.down_proj.weight),
    ] {
        let grad = weight.grad(&grads).expect(name);
        let norm: f32 = grad.abs().sum().into_scalar();
        assert!(norm > 0.0, "{name} got a zero gradient");
    }
    // The tied output layer's gradient includes the logits' (the embedding lookups alone would
    // touch two rows).
    let embedding = llama.embed_tokens.weight.grad(&grads).unwrap();
    let rows_touched: usize = embedding
        .abs()
        .sum_dim(1)
        .greater_elem(0.0)
        .int()
        .sum()
        .into_scalar() as usize;
    assert_eq!(rows_touched, 64);
}

/// A frozen decoding model (no weight takes a gradient) whose memory slots or embedding offset
/// do — a z-adapter's, in training — runs through burn's path, not the host steps or the blocks'
/// products, so that they get their gradients: keys marked themselves, values computed from a
/// marked tensor (burn's `is_require_grad` is false for those), an offset computed likewise.
#[test]
fn memory_and_offsets_that_take_a_gradient_get_it_through_a_frozen_decoding_model() {
    let _rng = crate::tests::seeded(10);
    type AD = burn::backend::Autodiff<B>;
    let model = block_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::Q4_1)).unwrap();
    let frozen = Lm::<AD>::from_gguf_for_decoding(&file, &device())
        .unwrap()
        .no_grad();
    let dims = block_llama().dims();
    let tokens = Tensor::<AD, 2, Int>::from_data([[3, 9]], &device());
    let marked = |shape: [usize; 3]| {
        Tensor::<AD, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device()).require_grad()
    };
    let slots = [1, 2, dims.kv_dim()];
    for case in ["keys", "values", "offset"] {
        let leaves: Vec<Tensor<AD, 3>> = (0..dims.n_layers).map(|_| marked(slots)).collect();
        let input = match case {
            "keys" => LmInput::new(tokens.clone()).with_memory(
                leaves
                    .iter()
                    .map(|key| crate::LayerMemory {
                        key: key.clone(),
                        value: Tensor::random(slots, Distribution::Default, &device()),
                    })
                    .collect(),
            ),
            "values" => LmInput::new(tokens.clone()).with_memory(
                leaves
                    .iter()
                    .map(|value| crate::LayerMemory {
                        key: Tensor::random(slots, Distribution::Default, &device()),
                        value: value.clone() * 2.0,
                    })
                    .collect(),
            ),
            _ => {
                let offset = leaves[0]
                    .clone()
                    .narrow(1, 0, 1)
                    .narrow(2, 0, 1)
                    .reshape([1, 1]);
                let offset = offset.expand([1, dims.d_model]) * 2.0;
                LmInput::new(tokens.clone()).with_embedding_offset(offset)
            }
        };
        let grads = frozen.forward(input, None).unwrap().logits.sum().backward();
        let read = if case == "offset" {
            &leaves[..1]
        } else {
            &leaves[..]
        };
        for (layer, leaf) in read.iter().enumerate() {
            let grad = leaf
                .grad(&grads)
                .unwrap_or_else(|| panic!("{case}, layer {layer}: no gradient"));
            let norm: f32 = grad.abs().sum().into_scalar();
            assert!(norm > 0.0, "{case}, layer {layer}: a zero gradient");
        }
    }
}

/// A long cached prompt that a decoding model runs in steps of the blocks' rows returns, with
/// `last_logits_only`, its last position's logits (the whole prefill's last row); one that would
/// pass the context window is refused before any step, its cache left empty.
#[test]
fn a_long_prompt_in_steps_keeps_its_last_logits_and_one_past_the_window_changes_nothing() {
    let _rng = crate::tests::seeded(11);
    let model = block_llama().init::<B>(&device()).unwrap();
    let file = parse(&llama_to_gguf(&model, Store::Q8_0)).unwrap();
    let decoding = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
    let (prefill, _) = prefill_and_steps(&decoding);
    let [batch, seq, vocab] = prefill.dims();
    let mut cache = decoding.new_cache();
    let input = LmInput::new(long_prompt()).with_last_logits_only();
    let last = decoding.forward(input, Some(&mut cache)).unwrap().logits;
    assert_eq!(last.dims(), [batch, 1, vocab]);
    let diff = max_abs_diff(last, prefill.slice([0..batch, seq - 1..seq, 0..vocab]));
    assert!(diff < 1e-5, "|Δ| = {diff}");
    assert_eq!(cache.len, seq);

    let window = decoding.dims().max_seq_len;
    let too_long: Vec<i64> = (0..window as i64 + 6).map(|i| i % 64).collect();
    let too_long = Tensor::<B, 1, Int>::from_data(too_long.as_slice(), &device()).unsqueeze();
    let mut cache = decoding.new_cache();
    let err = decoding
        .forward(LmInput::new(too_long), Some(&mut cache))
        .unwrap_err();
    assert!(err.to_string().contains("context window of 64"), "{err}");
    assert!(
        cache.is_empty(),
        "a refused prompt left {} positions",
        cache.len
    );
}

/// The host steps (`crate::host_step`) against burn's path over the same blocks, step by step
/// through every move of the cache: filled on the host, moved to the backend by a step of more
/// rows than the blocks take, back to the host, grown on the host. Batch 2, grouped-query heads,
/// memory slots on every other step.
#[test]
fn host_steps_equal_burn_steps_through_every_move_of_the_cache() {
    let _rng = crate::tests::seeded(9);
    use crate::cache::Buffers;
    let mut config = block_llama();
    if let LmConfig::Llama(c) = &mut config {
        c.max_seq_len = 160;
    }
    let mut model = config.init::<B>(&device()).unwrap();
    // Norms of their own (a fresh model's are all ones, alike).
    let Lm::Llama(llama) = &mut model else {
        unreachable!()
    };
    for layer in &mut llama.layers {
        for norm in [
            &mut layer.input_layernorm,
            &mut layer.post_attention_layernorm,
        ] {
            norm.weight = burn::module::Param::from_tensor(Tensor::random(
                [32],
                burn::tensor::Distribution::Uniform(0.5, 1.5),
                &device(),
            ));
        }
    }
    // Positions per sequence of each step: host (6 rows), host, host, a catch-up on the host
    // (14 rows), burn (70 rows, the host norms taken away for this step, which a long prompt
    // would otherwise run on the host in steps of 32 positions: the cache moves to the
    // backend), host (it moves back), a catch-up that grows the host buffers past their 67
    // positions, host, host.
    let steps = [3, 1, 1, 7, 35, 1, 20, 1, 1];
    // Two memory slots per layer, their own for each layer and sequence (the odd steps read
    // them, as a z-adapter's would).
    let dims = config.dims();
    let memory: Vec<crate::LayerMemory<B>> = (0..dims.n_layers)
        .map(|_| {
            let slots = || {
                Tensor::random(
                    [2, 2, dims.kv_dim()],
                    burn::tensor::Distribution::Normal(0.0, 1.0),
                    &device(),
                )
            };
            crate::LayerMemory {
                key: slots(),
                value: slots(),
            }
        })
        .collect();
    let input = |tokens: Tensor<B, 2, Int>, s: usize| {
        let input = LmInput::new(tokens);
        if s % 2 == 1 {
            input.with_memory(memory.clone())
        } else {
            input
        }
    };
    for store in [Store::Q4_1, Store::Q8_0, Store::Q4_0] {
        let file = parse(&llama_to_gguf(&model, store)).unwrap();
        let mut on_host = Lm::<B>::from_gguf_for_decoding(&file, &device()).unwrap();
        let mut through_burn = on_host.clone();
        let Lm::Llama(llama) = &mut through_burn else {
            unreachable!()
        };
        for layer in &mut llama.layers {
            layer.host_norms = None;
        }
        let (mut host_cache, mut burn_cache) = (on_host.new_cache(), through_burn.new_cache());
        let mut position = 0i64;
        for (s, &n) in steps.iter().enumerate() {
            let ids: Vec<i64> = (0..2 * n as i64)
                .map(|i| (i * 11 + position * 5 + 3) % 64)
                .collect();
            position += n as i64;
            let tokens = Tensor::<B, 1, Int>::from_data(ids.as_slice(), &device()).reshape([2, n]);
            let Lm::Llama(llama) = &mut on_host else {
                unreachable!()
            };
            let long = 2 * n > crate::MAX_BLOCK_ROWS;
            let norms: Vec<_> = llama
                .layers
                .iter_mut()
                .map(|l| {
                    if long {
                        l.host_norms.take()
                    } else {
                        l.host_norms.clone()
                    }
                })
                .collect();
            let host = on_host
                .forward(input(tokens.clone(), s), Some(&mut host_cache))
                .unwrap();
            let Lm::Llama(llama) = &mut on_host else {
                unreachable!()
            };
            for (layer, norms) in llama.layers.iter_mut().zip(norms) {
                layer.host_norms = norms;
            }
            let burn = through_burn
                .forward(input(tokens, s), Some(&mut burn_cache))
                .unwrap();
            let diff = max_abs_diff(host.logits, burn.logits);
            assert!(diff < 2e-5, "{store:?} step {s} ({n} rows): |Δ| = {diff}");
            let diff = max_abs_diff(host.hidden, burn.hidden);
            assert!(diff < 2e-5, "{store:?} step {s}: hidden |Δ| = {diff}");
            let on_the_host = matches!(host_cache.layers[1].buffers, Buffers::Host(_));
            assert_eq!(on_the_host, 2 * n <= crate::MAX_BLOCK_ROWS, "step {s}");
            assert!(matches!(
                burn_cache.layers[1].buffers,
                Buffers::Tensors { .. }
            ));
        }
        assert_eq!(host_cache.layers[0].capacity(), 2 * 68);
        // Without a cache: one forward of 5 positions, without and with memory slots.
        let tokens = Tensor::<B, 2, Int>::from_data([[1, 5, 9, 2, 7], [3, 3, 8, 0, 4]], &device());
        for s in [0, 1] {
            let diff = max_abs_diff(
                on_host
                    .forward(input(tokens.clone(), s), None)
                    .unwrap()
                    .logits,
                through_burn
                    .forward(input(tokens.clone(), s), None)
                    .unwrap()
                    .logits,
            );
            assert!(diff < 2e-5, "{store:?} without a cache ({s}): |Δ| = {diff}");
        }
        // Padding keeps burn's path (the host step has no padding mask): the same logits.
        let padding = Tensor::<B, 2, Bool>::from_data(
            [[true, true, false, false, false], [false; 5]],
            &device(),
        );
        let padded = |model: &Lm<B>| {
            model
                .forward(
                    LmInput::new(tokens.clone()).with_padding(padding.clone()),
                    None,
                )
                .unwrap()
                .logits
        };
        let diff = max_abs_diff(padded(&on_host), padded(&through_burn));
        assert_eq!(diff, 0.0, "{store:?} with padding");
    }
}
