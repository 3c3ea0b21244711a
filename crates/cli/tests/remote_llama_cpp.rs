//! A remote assistant end to end: a real llama.cpp server (`llama-cpp-python[server]`) on
//! 127.0.0.1 serving the SmolLM2 GGUF, started and stopped by the test. Its scores must equal
//! chorus's local scores of the same GGUF to the tolerance docs/models.md explains (llama.cpp
//! rounds activations to 8 bits in its Q4_1 kernels: |Δlogit| up to ≈ 0.9), and it must write the
//! tokens routed to it in `chorus generate`; and a joint model must train with it as a remote
//! assistant (its log-probs cached by `chorus score`), then generate, evaluate and calibrate with
//! the server standing in for it.
//!
//! Needs the GGUF (`chorus data fetch --models`) and a Python with `llama_cpp.server`
//! (`$CHORUS_PYTHON`, else `$CHORUS_CACHE/venv/bin/python`; `.ci/run` installs it there); without
//! either the test prints why it is skipped and passes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::prelude::*;
use chorus_lm::{Lm, Tokenizer};
use chorus_model::{Assistant, LocalLm, RemoteAssistant, RemoteSettings, ScoreRows};

type B = NdArray;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> PathBuf {
    std::env::var_os("CHORUS_PYTHON").map_or_else(
        || chorus_data::fetch::cache_dir().join("venv/bin/python"),
        PathBuf::from,
    )
}

/// The server on a free port, once it answers; `None` (with the reason printed) where the GGUF or
/// the package is missing.
fn start_server() -> Option<(Server, String, PathBuf)> {
    let gguf = common::smollm2_gguf()?;
    let python = python();
    let has_server = Command::new(&python)
        .args(["-c", "import llama_cpp.server.app"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_server {
        eprintln!(
            "skipped: {} cannot import llama_cpp.server (install `llama-cpp-python[server]` there, as .ci/run does, or set CHORUS_PYTHON)",
            python.display()
        );
        return None;
    }
    // The server binds a port the OS picks and prints it first (tests/llama_cpp_server.py).
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/llama_cpp_server.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&gguf)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut server = Server(child);
    let mut first_line = String::new();
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .expect("the server's stdout is readable");
    let port: u16 = first_line.trim().parse().unwrap_or_else(|_| {
        panic!(
            "{} printed {first_line:?}, not a port (its stderr is above)",
            script.display()
        )
    });
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = server.0.try_wait().expect("the server's status") {
            panic!(
                "the llama.cpp server exited ({status}) before it listened; its stderr is above"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the llama.cpp server did not start within 2 min"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Some((server, url, gguf))
}

#[test]
fn llama_cpp_server_scores_like_chorus_and_writes_routed_tokens() {
    let Some((_server, url, gguf)) = start_server() else {
        return;
    };
    let device = Default::default();
    let tokenizer = Tokenizer::open(&gguf).unwrap();
    let remote = RemoteAssistant::connect(&url, &tokenizer, RemoteSettings::default())
        .expect("the server answers and tokenizes like the GGUF's tokenizer");
    let lm = Lm::<B>::open(&gguf, &device).unwrap();
    let bos = tokenizer.bos_id().expect("the GGUF names a BOS");

    // Rows as training makes them (EOS first), of text none of the tests was tuned on.
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap();
    let texts = [
        "The old lighthouse keeper climbed the stairs every evening, counting each of the 112 steps.",
        "\"Are you coming to the market tomorrow?\" asked Mira. \"Only if it stops raining,\" said Tom.",
        "In 1865, after four years of civil war, the United States faced the task of rebuilding.",
    ];
    let (mut n, mut sum_abs, mut max_abs, mut nll_remote, mut nll_local) =
        (0, 0.0, 0.0f64, 0.0, 0.0);
    for text in texts {
        let mut row = vec![eos];
        row.extend(tokenizer.encode(text).unwrap());
        let served = remote.score_row(&row).unwrap();
        assert_eq!(served.len(), row.len() - 1);
        // chorus on the same ids: the server reads its BOS before the row (module docs of
        // chorus_model::RemoteAssistant), so chorus scores [BOS] + row and drops BOS → row[0].
        let ids: Vec<u32> = std::iter::once(bos).chain(row.iter().copied()).collect();
        let ints = |v: &[u32]| {
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(v.iter().map(|&t| t as i64).collect(), [1, v.len()]),
                &device,
            )
        };
        let rows = ScoreRows {
            tokens: ints(&ids[..ids.len() - 1]),
            targets: ints(&ids[1..]),
            padding: Tensor::<B, 2, Int>::zeros([1, ids.len() - 1], &device).bool(),
        };
        let local: Vec<f32> = LocalLm::new(&lm)
            .token_log_probs(&rows, None)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        for (s, l) in served.iter().zip(&local[1..]) {
            let d = (*s as f64 - *l as f64).abs();
            sum_abs += d;
            max_abs = max_abs.max(d);
            n += 1;
            nll_remote -= *s as f64;
            nll_local -= *l as f64;
        }
    }
    let mean_abs = sum_abs / n as f64;
    println!(
        "{n} tokens: mean |Δ log p| {mean_abs:.4}, max {max_abs:.4}; NLL/token server {:.4}, chorus {:.4}",
        nll_remote / n as f64,
        nll_local / n as f64
    );
    // From docs/models.md's llama.cpp comparison: |Δlogit| ≤ 0.9 (mean ≈ 0.1), and
    // |Δ log p| ≤ |Δ logit of the token| + |Δ log Σ exp logits| ≤ 2 × 0.9.
    assert!(mean_abs < 0.15, "mean |Δ log p| {mean_abs}");
    assert!(max_abs < 1.8, "max |Δ log p| {max_abs}");
    assert!(
        ((nll_remote - nll_local) / nll_local).abs() < 0.02,
        "total NLL {nll_remote} vs {nll_local}"
    );

    // `chorus generate`: the local GGUF as base, the server as assistant, τ = 1 (always defer):
    // every token is the server's, greedy.
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["generate", "--base"])
        .arg(&gguf)
        .args([
            "--assistant",
            &url,
            "--strategy",
            "confidence:1",
            "--temperature",
            "0",
        ])
        .args(["--max-tokens", "6", "--color", "never"])
        .arg("Once upon a time, in a small village by the sea,")
        .output()
        .expect("chorus runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}\n{stderr}");
    assert!(
        stderr.contains("written by assistants: 100.0 %"),
        "every token deferred to the server: {stderr}"
    );
}

/// Runs the `chorus` binary, failing the test with its output unless it succeeds; returns stdout
/// and stderr.
fn chorus(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .output()
        .expect("chorus runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "chorus {args:?}\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn a_joint_model_trains_with_the_server_as_its_remote_assistant() {
    let Some((_server, url, gguf)) = start_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let vocab = Tokenizer::open(&gguf).unwrap().vocab_size();
    // A tiny base on SmolLM2's tokenizer, and a joint config whose one assistant is the server.
    let data = "[data]\ntasks = [\"story\"]\nmax_seq_len = 48\nbatch_size = 4\n\
                max_train_examples = 8\nvalid_examples = 4\n";
    let base = format!(
        "tokenizer = \"{}\"\n[model]\nfamily = \"llama\"\nvocab_size = {vocab}\nd_model = 16\n\
         n_layers = 1\nn_heads = 2\nn_kv_heads = 1\nd_ff = 32\nmax_seq_len = 64\n{data}\
         [train]\nsteps = 2\nwarmup_steps = 1\niw_samples = 1\n",
        gguf.display()
    );
    std::fs::write(path("base.toml"), base).unwrap();
    chorus(&[
        "pretrain",
        "--config",
        &path("base.toml"),
        "--out",
        &path("base"),
    ]);
    let joint = format!(
        "tokenizer = \"{}\"\nbase = \"{}\"\nassistants = [\"{url}\"]\nscores = \"{}\"\n\
         [chorus]\nd_latent = 4\nassistant_adapters = false\n{data}\
         [train]\nsteps = 3\nwarmup_steps = 1\neval_every = 3\niw_samples = 2\n",
        gguf.display(),
        path("base/lm"),
        path("scores")
    );
    std::fs::write(path("joint.toml"), joint).unwrap();
    // Training before the scores exist is refused, naming the cache.
    let refused = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args([
            "train",
            "--config",
            &path("joint.toml"),
            "--out",
            &path("joint"),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("scores"));
    chorus(&[
        "score",
        "--config",
        &path("joint.toml"),
        "--out",
        &path("scores"),
    ]);
    let (_, stderr) = chorus(&[
        "train",
        "--config",
        &path("joint.toml"),
        "--out",
        &path("joint"),
    ]);
    println!("{stderr}");
    let model = path("joint/checkpoints/best");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{model}/chorus.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["chorus"]["remote_assistants"], 1);
    assert_eq!(manifest["sources"][1], url.as_str());
    // η = 0 defers every token the selector offers: the server writes them all.
    let (_, stderr) = chorus(&[
        "generate",
        "--model",
        &model,
        "--strategy",
        "threshold:0",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--color",
        "never",
        "Once upon a time",
    ]);
    assert!(
        stderr.contains("written by assistants: 100.0 %"),
        "the remote assistant writes every token at η = 0: {stderr}"
    );
    // Evaluation and calibration ask the server for the assistant's log-probs.
    let (table, _) = chorus(&[
        "eval",
        "--model",
        &model,
        "--config",
        &path("joint.toml"),
        "--split",
        "valid",
        "--max-examples",
        "2",
        "--members",
    ]);
    println!("{table}");
    assert!(table.contains("assistant 1"), "{table}");
    let (out, _) = chorus(&[
        "calibrate",
        "--model",
        &model,
        "--config",
        &path("joint.toml"),
        "--max-examples",
        "2",
    ]);
    assert!(out.contains("← chosen"), "{out}");
}
