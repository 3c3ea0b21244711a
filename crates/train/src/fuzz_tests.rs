//! Mutation fuzzing of every file chorus reads besides GGUF (whose fuzzer lives in chorus-lm):
//! safetensors weights and their config.json, tokenizer.json, TOML run configs, score caches and
//! checkpoints (state.json, chorus.json, model.mpk). Each target must return `Ok` or `Err` for any
//! input — never panic, hang or allocate without bound.
//!
//! Each target runs 2 s in `cargo test`; the long run is
//! `CHORUS_FUZZ_SECS=600 cargo test -p chorus-train --lib fuzz_ -- --nocapture --test-threads 1`
//! (`CHORUS_FUZZ_ONLY=chorus.json,model.mpk` runs only those targets).
//! A panicking input is saved under the system temp dir and named in the failure.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use chorus_data::rng::SplitMix64;
use chorus_lm::{LlamaConfig, Lm, LmConfig, Tokenizer};
use chorus_model::{Chorus, ChorusConfig};

use crate::checkpoint::{CheckpointState, save_checkpoint};
use crate::{Encoded, ScoreCache, TrainConfig, load_chorus, load_config, read_state};

type B = NdArray<f32>;
type AD = Autodiff<B>;

/// One to four edits: bit flips, boundary integers (binary and decimal), truncation, insertion,
/// deletion and duplication of a span.
fn mutate(rng: &mut SplitMix64, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.index(4) {
        let len = b.len().max(1);
        match rng.index(8) {
            0 if !b.is_empty() => {
                let at = rng.index(b.len());
                b[at] ^= 1 << rng.index(8);
            }
            1 if b.len() >= 8 => {
                let at = rng.index(b.len() - 7);
                let v = [0u64, u64::MAX, u32::MAX as u64, 1 << 40, 0x7f, 1 << 31][rng.index(6)];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            2 => b.truncate(rng.index(len)),
            3 => {
                let at = rng.index(len);
                let text = [
                    "-1",
                    "1e309",
                    "18446744073709551615",
                    "NaN",
                    "\"",
                    "[",
                    "{",
                    "\0",
                ][rng.index(8)];
                b.splice(at.min(b.len())..at.min(b.len()), text.bytes());
            }
            4 if !b.is_empty() => {
                let at = rng.index(b.len());
                let n = rng.index(16).min(b.len() - at);
                b.drain(at..at + n);
            }
            5 if !b.is_empty() => {
                let at = rng.index(b.len());
                let n = rng.index(64).min(b.len() - at);
                let span: Vec<u8> = b[at..at + n].to_vec();
                let to = rng.index(b.len());
                b.splice(to..to, span);
            }
            6 if !b.is_empty() => {
                // A digit run replaced by a huge number (counts, lengths, shapes in text formats).
                if let Some(at) = (0..b.len())
                    .map(|i| (i + rng.index(b.len())) % b.len())
                    .find(|&i| b[i].is_ascii_digit())
                {
                    b.splice(at..at + 1, *b"99999999999");
                }
            }
            _ => {
                let at = rng.index(len);
                b.insert(at.min(b.len()), rng.next_u64() as u8);
            }
        }
    }
    b
}

/// Runs `target` on mutations of `seeds` for CHORUS_FUZZ_SECS (default 2) seconds; with
/// CHORUS_FUZZ_ONLY set, only targets whose name contains one of its comma-separated words.
fn fuzz(name: &str, seeds: &[Vec<u8>], mut target: impl FnMut(&[u8])) {
    if let Ok(only) = std::env::var("CHORUS_FUZZ_ONLY")
        && !only.split(',').any(|w| name.contains(w.trim()))
    {
        return;
    }
    let secs: u64 = std::env::var("CHORUS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rng = SplitMix64(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut runs = 0u64;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        let seed = &seeds[rng.index(seeds.len())];
        let input = mutate(&mut rng, seed);
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            std::panic::set_hook(quiet);
            let path = std::env::temp_dir().join(format!("chorus-fuzz-{name}-{runs}.bin"));
            std::fs::write(&path, &input).unwrap();
            // Run it again with the hook back, so the panic message is shown.
            target(&input);
            panic!("{name}: input {} panicked", path.display());
        }
    }
    std::panic::set_hook(quiet);
    println!("fuzz {name}: {runs} inputs in {secs} s, no panic");
}

fn tiny_llama(vocab: usize) -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: vocab,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 16,
    })
}

fn tokenizer() -> Tokenizer {
    Tokenizer::train_bpe(
        ["the cat sat on the mat.", "a dog ran!"]
            .iter()
            .cycle()
            .take(20),
        270,
        &["<|endoftext|>"],
    )
    .unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn fuzz_safetensors_weights_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let lm = tiny_llama(20).init::<B>(&Default::default()).unwrap();
    lm.save(dir.path()).unwrap();
    let weights = std::fs::read(dir.path().join(chorus_lm::WEIGHTS_FILE)).unwrap();
    let config = std::fs::read(dir.path().join(chorus_lm::CONFIG_FILE)).unwrap();
    fuzz("safetensors", std::slice::from_ref(&weights), |bytes| {
        write(dir.path(), chorus_lm::WEIGHTS_FILE, bytes);
        let _ = Lm::<B>::load(dir.path(), &Default::default());
    });
    write(dir.path(), chorus_lm::WEIGHTS_FILE, &weights);
    fuzz("lm-config", &[config], |bytes| {
        write(dir.path(), chorus_lm::CONFIG_FILE, bytes);
        let _ = Lm::<B>::load(dir.path(), &Default::default());
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tokenizer().save(&path).unwrap();
    let seed = std::fs::read(&path).unwrap();
    fuzz("tokenizer", &[seed], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(t) = Tokenizer::from_file(&path)
            && let Ok(ids) = t.encode("the cat, 12 dogs!")
        {
            let _ = t.decode(&ids);
        }
    });
}

#[test]
fn fuzz_toml_configs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let seeds: Vec<Vec<u8>> = [
        include_str!("../../../configs/joint.toml"),
        include_str!("../../../configs/base.toml"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("toml", &seeds, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = load_config::<TrainConfig>(Some(&path), &[]);
        let _ = load_config::<crate::PretrainConfig>(Some(&path), &[]);
    });
}

#[test]
fn fuzz_score_cache() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let lm = tiny_llama(20).init::<B>(&device).unwrap();
    let data: Vec<Encoded> = (0..5)
        .map(|i| Encoded {
            task: chorus_data::Task::Story,
            tokens: (0..4 + i).map(|t| (t % 19) as u32).collect(),
            context_len: 1,
            target_bytes: 8,
        })
        .collect();
    let fp = crate::scores::fingerprint(&data, &["a".into()]);
    crate::score_assistants(
        &[&chorus_model::LocalLm::new(&lm) as &dyn chorus_model::Assistant<B>],
        &data,
        &fp,
        2,
        dir.path(),
        &device,
        |_| {},
    )
    .unwrap();
    let index = std::fs::read(dir.path().join("scores.json")).unwrap();
    let values = std::fs::read(dir.path().join("scores.f32")).unwrap();
    let read_all = || {
        if let Ok(cache) = ScoreCache::open(dir.path(), &fp) {
            for i in 0..data.len() + 2 {
                let _ = cache.example(i);
            }
        }
    };
    fuzz("score-index", std::slice::from_ref(&index), |bytes| {
        write(dir.path(), "scores.json", bytes);
        read_all();
    });
    write(dir.path(), "scores.json", &index);
    fuzz("score-data", &[values], |bytes| {
        write(dir.path(), "scores.f32", bytes);
        read_all();
    });
}

#[test]
fn fuzz_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let config = ChorusConfig {
        d_latent: 2,
        ..ChorusConfig::default()
    };
    let base = tiny_llama(20).init::<AD>(&device).unwrap();
    let assistant = tiny_llama(20).init::<AD>(&device).unwrap();
    let model = Chorus::new(config.clone(), base, vec![assistant], &device).unwrap();
    // Training's optimiser, as `run` builds it.
    let optimizer = crate::AdamW::default().init::<AD, Chorus<AD>>();
    let sources = Vec::<String>::new();
    let state = CheckpointState::at_step(1, 2);
    let ckpt = save_checkpoint(
        dir.path(),
        &model,
        &optimizer,
        &sources,
        &tokenizer(),
        state,
        1,
    )
    .unwrap();
    let original: Vec<(String, Vec<u8>)> = ["state.json", "chorus.json", "model.mpk"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(ckpt.join(f)).unwrap()))
        .collect();
    let restore = || {
        for (f, bytes) in &original {
            write(&ckpt, f, bytes);
        }
    };
    // state.json as it is (its hashes then guard the other files).
    fuzz("checkpoint-state", &[original[0].1.clone()], |bytes| {
        write(&ckpt, "state.json", bytes);
        let _ = read_state(&ckpt);
        let _ = load_chorus::<B>(&ckpt, &device);
    });
    // chorus.json with state.json's hash updated, so loading reaches its parser and the model
    // configs in it.
    restore();
    fuzz("chorus.json", &[original[1].1.clone()], |bytes| {
        write(&ckpt, "chorus.json", bytes);
        let mut state: serde_json::Value = serde_json::from_slice(&original[0].1).unwrap();
        state["files"]["chorus.json"] = serde_json::Value::String(
            chorus_data::fetch::sha256_file(&ckpt.join("chorus.json")).unwrap(),
        );
        write(&ckpt, "state.json", state.to_string().as_bytes());
        let _ = load_chorus::<B>(&ckpt, &device);
    });
    // model.mpk as corruption leaves it: its sha256 in state.json no longer matches. (With the
    // hash forged to match, burn's MessagePack reader trusts declared lengths and can try to
    // allocate petabytes: docs/reliability.md.)
    restore();
    fuzz("model.mpk", &[original[2].1.clone()], |bytes| {
        write(&ckpt, "model.mpk", bytes);
        let _ = load_chorus::<B>(&ckpt, &device);
    });
}
