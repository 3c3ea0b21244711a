//! What the `chorus` binary's integration tests share: running it, a tiny tokenizer and llama LM
//! made through the same save → load path as real models, and the real corpus cache.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use chorus_lm::{LlamaConfig, Lm, LmConfig, Tokenizer};

/// The backend the fixtures are made on.
pub type B = NdArray<f32>;

/// Runs `chorus ARGS` with `cache` as its corpus cache (`CHORUS_CACHE`) and returns (exit code,
/// stderr).
pub fn chorus(cache: &Path, args: &[&str]) -> (i32, String) {
    chorus_with_env(cache, &[], args)
}

/// [`chorus`] with further environment variables.
pub fn chorus_with_env(cache: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .envs(env.iter().copied())
        .env("CHORUS_CACHE", cache)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the chorus binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `chorus ARGS` fails with exit code 1 and exactly one line `error: …` on stderr
/// that contains every string of `says`.
#[track_caller]
pub fn fails(cache: &Path, args: &[&str], says: &[&str]) {
    fails_with_env(cache, &[], args, says)
}

/// [`fails`] with further environment variables.
#[track_caller]
pub fn fails_with_env(cache: &Path, env: &[(&str, &str)], args: &[&str], says: &[&str]) {
    let (code, stderr) = chorus_with_env(cache, env, args);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let error_lines: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "chorus {args:?} panicked:\n{stderr}"
    );
    assert_eq!(code, 1, "chorus {args:?} exited {code}:\n{stderr}");
    assert_eq!(
        error_lines.len(),
        1,
        "chorus {args:?}: not one error line:\n{stderr}"
    );
    let line = error_lines[0];
    // `cargo test -p chorus-cli --test bad_input -- --nocapture` prints the table of
    // docs/reliability.md.
    println!("| `chorus {}` | {line} |", args.join(" "));
    for s in says {
        assert!(
            line.contains(s),
            "chorus {args:?}: {line:?} does not say {s:?}"
        );
    }
}

/// The fixture's llama LM over `vocab` tokens, initialised from `seed`: the same weights in every
/// run, so that what a test's greedy decoding writes (e.g. whether it ends early on
/// `<|endoftext|>`) does not change from run to run. The backend's generator is global and tests
/// run on parallel threads, so seeding and drawing hold one lock.
pub fn seeded_llama(vocab: usize, seed: u64) -> Lm<B> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _drawing = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    B::seed(&device, seed);
    llama(vocab).init::<B>(&device).unwrap()
}

/// A tiny tokenizer (`tokenizer.json`) and llama LM (`lm/`, with its tokenizer) in `dir`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    pub vocab: usize,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let texts = ["the cat sat on the mat.", "a dog ran to the log!"];
        let tok =
            Tokenizer::train_bpe(texts.iter().cycle().take(40), 280, &["<|endoftext|>"]).unwrap();
        tok.save(dir.path().join("tokenizer.json")).unwrap();
        let vocab = tok.vocab_size();
        let lm = seeded_llama(vocab, 0);
        lm.save(dir.path().join("lm")).unwrap();
        tok.save(dir.path().join("lm/tokenizer.json")).unwrap();
        let cache = dir.path().join("empty-cache");
        std::fs::create_dir(&cache).unwrap();
        Self { dir, cache, vocab }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let p = self.dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, contents).unwrap();
        p.display().to_string()
    }

    /// A second LM of the same shape and tokenizer (another initialisation) at `lm2/`.
    pub fn second_lm(&self) {
        let other = seeded_llama(self.vocab, 1);
        other.save(self.dir.path().join("lm2")).unwrap();
        std::fs::copy(
            self.dir.path().join("tokenizer.json"),
            self.dir.path().join("lm2/tokenizer.json"),
        )
        .unwrap();
    }

    pub fn fails(&self, args: &[&str], says: &[&str]) {
        fails(&self.cache, args, says)
    }

    /// Runs `chorus ARGS --json <dir>/JSON`, requires success and returns what it wrote there.
    pub fn succeeds(&self, args: &[&str], json: &str) -> serde_json::Value {
        let path = self.path(json);
        let mut args = args.to_vec();
        args.extend(["--json", path.as_str()]);
        let (code, stderr) = chorus(&self.cache, &args);
        assert_eq!(code, 0, "chorus {args:?}:\n{stderr}");
        read_json(&path)
    }

    /// A one-step Co-LLM config (`joint.toml`): the fixture's LM as the base, `assistant` (a
    /// model directory under the fixture) as the assistant, `extra` lines at the top (e.g.
    /// `scores = …`).
    pub fn co_llm_toml(&self, assistant: &str, extra: &str) -> String {
        self.write(
            "joint.toml",
            format!(
                "tokenizer = {:?}\nbase = {:?}\nassistants = [{:?}]\n{extra}\n\
                 [chorus]\nd_latent = 0\nassistant_adapters = false\n\
                 [data]\nmax_seq_len = 32\nbatch_size = 4\nmax_train_examples = 4\nvalid_examples = 4\n\
                 [train]\nsteps = 1\nselector_init_steps = 0\n",
                self.path("tokenizer.json"),
                self.path("lm"),
                self.path(assistant),
            ),
        )
    }

    /// A pre-training config for the fixture's LM shape.
    pub fn pretrain_toml(&self, extra: &str) -> String {
        format!(
            "tokenizer = {:?}\n{extra}\n[model]\nfamily = \"llama\"\nvocab_size = {}\nd_model = 16\nn_layers = 1\nn_heads = 2\nn_kv_heads = 1\nd_ff = 32\nmax_seq_len = 32\n",
            self.path("tokenizer.json"),
            self.vocab
        )
    }
}

pub fn llama(vocab: usize) -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: vocab,
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 32,
    })
}

/// The corpus cache `chorus data fetch` fills (`.ci/run` fetches it), if it is there.
pub fn real_cache() -> Option<PathBuf> {
    let cache = chorus_data::fetch::cache_dir();
    let ready = ["brown", "chitchat", "sotu"]
        .iter()
        .all(|c| cache.join("corpora").join(c).join(".unpacked").is_file());
    if ready {
        Some(cache)
    } else {
        eprintln!(
            "skipped: the corpora are not in {} (run `chorus data fetch`)",
            cache.display()
        );
        None
    }
}

/// The SmolLM2-135M-Instruct GGUF in the cache, if `chorus data fetch --models` put it there.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = chorus_data::smollm2_gguf(&chorus_data::fetch::cache_dir());
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is not there (run `chorus data fetch --models`)",
            path.display()
        );
        None
    }
}

/// Runs `chorus --device DEVICE check-reference` on the SmolLM2 GGUF against
/// `tests/fixtures/FIXTURE` with `extra` flags, requires success and identical token ids for the
/// 10 tricky strings, and returns its printed report and its JSON (`None`, saying why, without the
/// GGUF).
pub fn check_reference(
    device: &str,
    fixture: &str,
    extra: &[&str],
) -> Option<(String, serde_json::Value)> {
    let gguf = smollm2_gguf()?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["--device", device, "check-reference", "--gguf"])
        .arg(&gguf)
        .arg("--reference")
        .arg(&fixture)
        .arg("--json")
        .arg(json.path())
        .args(extra)
        .output()
        .expect("chorus runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10/10 strings give identical ids"),
        "{stdout}"
    );
    let report = read_json(json.path());
    Some((stdout, report))
}

/// Asserts that every prompt of a `check-reference` JSON report continued greedily, one token at a
/// time through the KV cache, exactly as the reference did.
#[track_caller]
pub fn assert_greedy_agrees(report: &serde_json::Value) {
    for prompt in report["prompts"].as_array().unwrap() {
        assert_eq!(
            prompt["greedy_agree"], prompt["greedy_len"],
            "greedy continuation of {}: chorus {}, reference {}",
            prompt["text"], prompt["greedy_chorus"], prompt["greedy_reference"]
        );
    }
}

/// A JSON file a command wrote.
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
