//! Bad input at every door: the `chorus` binary, run on missing, malformed and truncated files,
//! bad configs and unwritable outputs, must exit non-zero with one line naming the file and the
//! problem — no panic, no backtrace, nothing already written lost. docs/reliability.md lists the
//! cases.

mod common;

use std::path::Path;

use common::{B, Fixture, chorus, fails, read_json, real_cache};

#[test]
fn missing_files_name_themselves() {
    let f = Fixture::new();
    let nowhere = f.path("nowhere");
    f.fails(&["inspect", &nowhere], &["nowhere"]);
    f.fails(
        &["pretrain", "--config", &nowhere, "--out", &f.path("o")],
        &["nowhere"],
    );
    f.fails(
        &["train", "--config", &nowhere, "--out", &f.path("o")],
        &["nowhere"],
    );
    f.fails(
        &["score", "--config", &nowhere, "--out", &f.path("o")],
        &["nowhere"],
    );
    f.fails(&["eval", "--model", &nowhere], &["nowhere"]);
    f.fails(&["generate", "--model", &nowhere, "hi"], &["nowhere"]);
    f.fails(&["calibrate", "--model", &nowhere], &["nowhere"]);
    f.fails(&["embed", "--encoder", &nowhere, "hi"], &["nowhere"]);
    f.fails(
        &[
            "check-reference",
            "--gguf",
            &nowhere,
            "--reference",
            &nowhere,
        ],
        &["nowhere"],
    );
    f.fails(&["data", "stats", "--tokenizer", &nowhere], &["nowhere"]);
    // A text file to evaluate on that is not there.
    f.fails(
        &["eval", "--model", &f.path("lm"), "--text-file", &nowhere],
        &["nowhere"],
    );
}

#[test]
fn malformed_and_truncated_model_files_are_named() {
    let f = Fixture::new();
    // GGUF: not one, and cut inside the header.
    let junk = f.write("junk.gguf", b"this is not a gguf file at all");
    f.fails(&["inspect", &junk], &["junk.gguf"]);
    let cut = f.write("cut.gguf", b"GGUF\x03\x00\x00\x00\x05");
    f.fails(&["inspect", &cut], &["cut.gguf"]);
    // safetensors: truncated, and a garbage header.
    let lm = f.dir.path().join("lm");
    let weights = std::fs::read(lm.join("model.safetensors")).unwrap();
    std::fs::create_dir(f.dir.path().join("cut-lm")).unwrap();
    std::fs::copy(
        lm.join("config.json"),
        f.dir.path().join("cut-lm/config.json"),
    )
    .unwrap();
    f.write("cut-lm/model.safetensors", &weights[..weights.len() / 2]);
    f.fails(&["inspect", &f.path("cut-lm")], &["model.safetensors"]);
    f.write(
        "cut-lm/model.safetensors",
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    );
    f.fails(&["inspect", &f.path("cut-lm")], &["model.safetensors"]);
    // config.json: malformed, and a valid JSON with an out-of-range value.
    f.write("cut-lm/model.safetensors", &weights);
    f.write(
        "cut-lm/config.json",
        b"{\"family\": \"llama\", \"vocab_size\": ",
    );
    f.fails(&["inspect", &f.path("cut-lm")], &["config.json"]);
    // A Hugging Face config.json of an architecture chorus does not load, and a chorus LM's
    // where a BERT encoder's is expected: the file named, not its weights.
    f.write(
        "cut-lm/config.json",
        b"{\"model_type\": \"mistral\", \"vocab_size\": 10}",
    );
    f.fails(
        &["inspect", &f.path("cut-lm")],
        &["config.json: not a Hugging Face config", "\"mistral\""],
    );
    f.fails(
        &["embed", "--encoder", &f.path("lm"), "hi"],
        &["config.json: not a Hugging Face config", "bert"],
    );
    // tokenizer.json: truncated, next to a model being evaluated.
    std::fs::copy(
        lm.join("config.json"),
        f.dir.path().join("cut-lm/config.json"),
    )
    .unwrap();
    let tok = std::fs::read(lm.join("tokenizer.json")).unwrap();
    f.write("cut-lm/tokenizer.json", &tok[..tok.len() / 3]);
    f.fails(
        &[
            "eval",
            "--model",
            &f.path("cut-lm"),
            "--text-file",
            &f.path("tokenizer.json"),
        ],
        &["tokenizer.json"],
    );
    f.fails(
        &[
            "data",
            "stats",
            "--tokenizer",
            &f.path("cut-lm/tokenizer.json"),
        ],
        &["tokenizer.json"],
    );
}

#[test]
fn bad_configs_name_the_file_and_the_key() {
    let f = Fixture::new();
    let out = f.path("out");
    let run = |toml: &str, sets: &[&str], says: &[&str]| {
        let config = f.write("bad.toml", toml);
        let mut args = vec![
            "pretrain",
            "--config",
            config.as_str(),
            "--out",
            out.as_str(),
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        f.fails(&args, says);
    };
    // Malformed and truncated TOML.
    run("tokenizer = \"x\n[model", &[], &["bad.toml"]);
    // Unknown keys, wrong types, out-of-range values, in the file and through --set.
    run(
        &f.pretrain_toml("[train]\nlrr = 1e-3"),
        &[],
        &["bad.toml", "lrr"],
    );
    run(
        &f.pretrain_toml("[train]\nsteps = \"many\""),
        &[],
        &["bad.toml", "steps"],
    );
    run(&f.pretrain_toml(""), &["train.lr=-1"], &["train.lr = -1"]);
    run(
        &f.pretrain_toml(""),
        &["data.batch_size=0"],
        &["batch_size"],
    );
    run(&f.pretrain_toml(""), &["train.steps"], &["key.path=value"]);
    // A vocabulary that is not the tokenizer's.
    run(
        &f.pretrain_toml(""),
        &["model.vocab_size=7"],
        &["model.vocab_size", "7"],
    );
    // An empty corpus cache.
    run(&f.pretrain_toml(""), &[], &["chorus data fetch"]);
    // Continued pre-training from an LM of another shape (checked before any data is read).
    run(
        &f.pretrain_toml(&format!("init = {:?}", f.path("lm"))),
        &["model.d_ff=48"],
        &["init", "lm", "architecture"],
    );
    // `calibrate --set` without --config applies to the data defaults (it used to be ignored).
    f.fails(
        &[
            "calibrate",
            "--model",
            &f.path("lm"),
            "--set",
            "data.batch_size=0",
        ],
        &["data.batch_size"],
    );
    assert!(!Path::new(&out).join("checkpoints").exists());
}

#[test]
fn mismatched_tokenizers_are_refused() {
    let f = Fixture::new();
    // The same vocabulary and merges with a lower-casing normaliser.
    let text = std::fs::read_to_string(f.dir.path().join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::create_dir(f.dir.path().join("other")).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            f.dir.path().join("lm").join(file),
            f.dir.path().join("other").join(file),
        )
        .unwrap();
    }
    f.write("other/tokenizer.json", json.to_string());
    let text_file = f.write("passages.txt", "The cat sat.\n\nA dog ran.\n");
    f.fails(
        &[
            "eval",
            "--model",
            &f.path("lm"),
            "--model",
            &f.path("other"),
            "--text-file",
            &text_file,
        ],
        &["other/tokenizer.json", "normalizer"],
    );
    let config = f.write(
        "joint.toml",
        format!(
            "tokenizer = {:?}\nbase = {:?}\nassistants = [{:?}]\n",
            f.path("tokenizer.json"),
            f.path("lm"),
            f.path("other")
        ),
    );
    f.fails(
        &["train", "--config", &config, "--out", &f.path("out")],
        &["other/tokenizer.json", "normalizer"],
    );
    f.fails(
        &[
            "generate",
            "--base",
            &f.path("lm"),
            "--assistant",
            &f.path("other"),
            "the cat",
        ],
        &["other", "does not share the base's tokenizer", "normalizer"],
    );
}

#[test]
fn unwritable_outputs_and_empty_inputs_are_clear() {
    let f = Fixture::new();
    let text_file = f.write(
        "passages.txt",
        "The cat sat on the mat. A dog ran to the log. ".repeat(4),
    );
    // An output directory under a regular file cannot be created (root ignores permission bits,
    // so a read-only directory is simulated by a file in the way).
    let blocker = f.write("blocker", "a file");
    let config = f.write("pre.toml", f.pretrain_toml(""));
    f.fails(
        &[
            "pretrain",
            "--config",
            &config,
            "--out",
            &format!("{blocker}/out"),
        ],
        &["blocker"],
    );
    f.fails(
        &[
            "data",
            "tokenizer",
            "--vocab-size",
            "300",
            "--out",
            &format!("{blocker}/t.json"),
        ],
        &["blocker"],
    );
    // A full disk: /dev/full refuses every write.
    if Path::new("/dev/full").exists() {
        f.fails(
            &[
                "eval",
                "--model",
                &f.path("lm"),
                "--text-file",
                &text_file,
                "--json",
                "/dev/full",
            ],
            &["/dev/full"],
        );
    }
    // An empty text file to evaluate on.
    let empty = f.write("empty.txt", "\n\n  \n");
    f.fails(
        &["eval", "--model", &f.path("lm"), "--text-file", &empty],
        &["empty.txt"],
    );
    // A joint checkpoint whose manifest is empty and whose state.json is cut short: inference
    // reads the model (chorus.json), evaluation and inspection the training state too.
    f.write("joint/chorus.json", "{}");
    f.write("joint/state.json", "{\"step\": 3, \"tot");
    for cmd in ["generate", "calibrate"] {
        f.fails(
            &[cmd, "--model", &f.path("joint")],
            &["chorus.json", "not a chorus manifest"],
        );
    }
    f.fails(&["eval", "--model", &f.path("joint")], &["state.json"]);
    f.fails(&["inspect", &f.path("joint")], &["state.json"]);
    // A reference for `check-reference` that states no tolerance, and tolerances that are none.
    let reference = f.write(
        "reference.json",
        "{\"prompts\": [], \"tokenizer\": [], \"timing\": null}",
    );
    let check = [
        "check-reference",
        "--gguf",
        "g.gguf",
        "--reference",
        &reference,
    ];
    f.fails(
        &check,
        &["reference.json", "no logit_tolerance", "--tolerance"],
    );
    for bad in ["NaN", "-1"] {
        f.fails(
            &[&check[..], &[&format!("--tolerance={bad}")]].concat(),
            &["--tolerance", bad],
        );
    }
    let stated = f.write(
        "stated.json",
        "{\"logit_tolerance\": -0.5, \"prompts\": [], \"tokenizer\": []}",
    );
    f.fails(
        &[
            "check-reference",
            "--gguf",
            "g.gguf",
            "--reference",
            &stated,
        ],
        &["stated.json", "logit_tolerance", "-0.5"],
    );
}

/// A generation the decoder refuses (more tokens than the context window) is one error line and
/// nothing on stdout: the prompt is streamed only once decoding has started.
#[test]
fn a_refused_generation_prints_only_its_error() {
    let f = Fixture::new();
    let args = [
        "generate",
        "--model",
        &f.path("lm"),
        "--max-tokens",
        "100000",
        "The cat sat",
    ];
    f.fails(&args, &["context window", "100000 new tokens"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(args)
        .env("CHORUS_CACHE", &f.cache)
        .output()
        .expect("the chorus binary runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn sampling_flags_and_counts_out_of_range_are_refused_by_name() {
    let f = Fixture::new();
    let lm = f.path("lm");
    for (flag, value, says) in [
        ("--stop", "", "--stop \"\""),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
        ("--temperature", "NaN", "temperature"),
    ] {
        f.fails(
            &["generate", "--model", &lm, flag, value, "The cat sat"],
            &[says],
        );
    }
    // Counts of nothing: refused by the argument parser (exit code 2), before any work, where
    // they were taken as 1 (`--samples`), gave a bound of 0 samples (`--iw-samples`), a rate
    // over no steps (`--steps`) or a panic (`--batch`).
    for (flag, args) in [
        (
            "--samples",
            vec!["generate", "--model", &lm, "--samples", "0", "The cat sat"],
        ),
        (
            "--iw-samples",
            vec!["eval", "--model", &lm, "--iw-samples", "0"],
        ),
        ("--steps", vec!["bench-step", "--steps", "0"]),
        ("--batch", vec!["bench-step", "--batch", "0"]),
        (
            "--seq",
            vec!["bench-score", "--shape", "small", "--seq", "0"],
        ),
        ("--rows", vec!["bench-rows", "--gguf", &lm, "--rows", "1,0"]),
    ] {
        let (code, stderr) = chorus(&f.cache, &args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("for '{flag} ")) && stderr.contains("must be at least 1"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn flags_that_cannot_apply_are_refused_and_max_examples_applies_to_text_files() {
    let f = Fixture::new();
    // 60 sentences: 15 passages of four.
    let passages: String = (0..60)
        .map(|i| format!("Sentence {i}: the cat sat on the mat.\n\n"))
        .collect();
    let text_file = f.write("many.txt", passages);
    let (code, stderr) = chorus(
        &f.cache,
        &[
            "eval",
            "--model",
            &f.path("lm"),
            "--text-file",
            &text_file,
            "--split",
            "valid",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--split"), "{stderr}");
    // Two models of one name (the same path twice, or one NAME= twice): their rows and paired
    // comparison could not be told apart.
    let lm = f.path("lm");
    for (first, second) in [
        (lm.clone(), lm.clone()),
        (format!("a={lm}"), format!("a={lm}")),
    ] {
        let name = if first.starts_with("a=") { "a" } else { &lm };
        f.fails(
            &[
                "eval",
                "--model",
                &first,
                "--model",
                &second,
                "--text-file",
                &text_file,
            ],
            &[&format!("two models named `{name}`")],
        );
    }
    // Flags for joint models, given none: refused, where they were ignored.
    for (extra, says) in [
        (&["--members"][..], &["--members", "no joint model"][..]),
        (
            &["--scores", &f.path("scores")],
            &["--scores", "no joint model"],
        ),
    ] {
        let args = [
            &["eval", "--model", &lm, "--text-file", &text_file][..],
            extra,
        ]
        .concat();
        f.fails(&args, says);
    }
    let report = f.succeeds(
        &[
            "eval",
            "--model",
            &f.path("lm"),
            "--text-file",
            &text_file,
            "--max-examples",
            "10",
        ],
        "eval.json",
    );
    let rows = report["rows"].as_array().unwrap();
    let examples: u64 = rows.iter().map(|r| r["examples"].as_u64().unwrap()).sum();
    assert_eq!(examples, 10, "{report}");
    assert!(
        report["data"].as_str().unwrap().contains("first 10 of 15"),
        "{report}"
    ); // Two models on the same passages: rows with bits per byte, and the first compared with the
    // second example by example (the same LM twice: Δ = 0 with a zero-width interval).
    let report = f.succeeds(
        &[
            "eval",
            "--model",
            &format!("a={}", f.path("lm")),
            "--model",
            &format!("b={}", f.path("lm")),
            "--text-file",
            &text_file,
            "--max-examples",
            "6",
        ],
        "eval.json",
    );
    let row = &report["rows"][0];
    let (nll, tokens, bytes) = (
        row["nll"].as_f64().unwrap(),
        row["tokens"].as_f64().unwrap(),
        row["bytes"].as_f64().unwrap(),
    );
    let bpb = row["bits_per_byte"].as_f64().unwrap();
    assert!(
        (bpb - nll * tokens / (bytes * std::f64::consts::LN_2)).abs() < 1e-9,
        "{row}"
    );
    let paired = report["paired"].as_array().unwrap();
    assert_eq!(paired.len(), 1, "{report}");
    assert_eq!(paired[0]["model"], "a");
    assert_eq!(paired[0]["baseline"], "b");
    assert_eq!(paired[0]["examples"], 6);
    assert_eq!(paired[0]["nll_difference"], 0.0);
    assert_eq!(paired[0]["interval"], serde_json::json!([0.0, 0.0]));
}

/// The fixture is the same in every run (seeded weights, a deterministic tokenizer), so that a
/// test's greedy decoding writes the same tokens each time: an unseeded fixture once wrote
/// `<|endoftext|>` as the second token and ended `a_single_lm_in_any_format_generates` early.
#[test]
fn the_fixture_is_the_same_in_every_run() {
    let (a, b) = (Fixture::new(), Fixture::new());
    // Byte for byte: equal LMs write equal files (`Lm::save`).
    for file in ["tokenizer.json", "lm/config.json", "lm/model.safetensors"] {
        let read = |f: &Fixture| std::fs::read(f.dir.path().join(file)).unwrap();
        assert!(read(&a) == read(&b), "the fixtures' {file} differ");
    }
}

#[test]
fn a_single_lm_in_any_format_generates() {
    let f = Fixture::new();
    let report = f.succeeds(
        &[
            "generate",
            "--model",
            &f.path("lm"),
            "the cat",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
        "out.json",
    );
    let tokens = report["samples"][0]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5, "{report}");
    assert!(tokens.iter().all(|t| t["writer"] == 0), "{report}");
}

/// `chorus generate`'s flags that the model cannot read are refused, where they were ignored: a
/// writer strategy or an assistant update for a model without assistants, a choice of z for a model without z,
/// references and `--alpha` that the chosen z does not read, and (with the corpora, to train it)
/// any z but the prior mean for the control that fixes z there.
#[test]
fn generate_refuses_flags_the_model_cannot_read() {
    let f = Fixture::new();
    let lm = f.path("lm");
    for (extra, says) in [
        (
            &["--strategy", "mixture"][..],
            &["--strategy mixture", "without assistants"][..],
        ),
        (
            &["--assistant-update", "eager"],
            &["--assistant-update", "no assistants"],
        ),
        (
            &["--z", "posterior", "--reference", "a dog"],
            &["--z posterior", "no latent z"],
        ),
        (&["--z", "prior-mean"], &["--z prior-mean", "no latent z"]),
        (&["--reference", "a dog"], &["--reference", "--z posterior"]),
        (&["--alpha", "0.3"], &["--alpha", "--z interpolate"]),
    ] {
        let args = [
            &["generate", "--model", lm.as_str()][..],
            extra,
            &["The cat"],
        ]
        .concat();
        f.fails(&args, says);
    }
    let composition = [
        "generate",
        "--base",
        lm.as_str(),
        "--assistant",
        lm.as_str(),
    ];
    // A composition has assistants but no z; its strategy is named as it was written.
    for (extra, says) in [
        (
            &["--z", "interpolate", "--reference", "a", "--reference", "b"][..],
            &["--z interpolate", "no latent z"][..],
        ),
        (
            &["--strategy", "threshold:0.3"],
            &["threshold:0.3 reads the selector"],
        ),
    ] {
        let args = [&composition[..], extra, &["--max-tokens", "4", "The cat"]].concat();
        f.fails(&args, says);
    }
    // What applies still runs.
    let report = f.succeeds(
        &[
            &composition[..],
            &[
                "--assistant-update",
                "eager",
                "--strategy",
                "confidence:0.5",
                "--max-tokens",
                "3",
                "The cat",
            ],
        ]
        .concat(),
        "composition.json",
    );
    assert_eq!(report["strategy"], "confidence:0.5", "{report}");
    let Some(cache) = real_cache() else { return };
    f.second_lm();
    // The one-step Co-LLM config, with z fixed at the prior mean.
    let config = f.co_llm_toml("lm2", "");
    let (code, stderr) = chorus(
        &cache,
        &[
            "train",
            "--config",
            &config,
            "--set",
            "chorus.d_latent=4",
            "--set",
            "chorus.z_at_prior_mean=true",
            "--out",
            &f.path("control"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let control = f.path("control/checkpoints/best");
    fails(
        &cache,
        &[
            "generate",
            "--model",
            &control,
            "--z",
            "posterior",
            "--reference",
            "a dog",
            "The cat",
        ],
        &["--z posterior", "fixes z at the prior mean"],
    );
    // Without --z it decodes at the prior mean, and its report says so (it said "prior sample").
    let json = f.path("control.json");
    let (code, stderr) = chorus(
        &cache,
        &[
            "generate",
            "--model",
            &control,
            "--max-tokens",
            "3",
            "The cat",
            "--json",
            &json,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let report = read_json(&json);
    assert!(
        report["z"].as_str().unwrap().starts_with("prior mean"),
        "{report}"
    );
}

/// A binary built by `cargo test` has chorus-lm's debug assertions (the `test` profile), which
/// make decoding ≈ 3× slower: the commands that report speeds say so, and only then.
#[test]
fn a_checked_build_says_its_speeds_mislead() {
    let f = Fixture::new();
    let (code, stderr) = chorus(
        &f.cache,
        &[
            "generate",
            "--model",
            &f.path("lm"),
            "the cat",
            "--max-tokens",
            "2",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stderr.contains("warning: this chorus was built with chorus-lm's debug assertions"),
        chorus_lm::CHECKED_BUILD,
        "{stderr}"
    );
    let (_, stderr) = chorus(&f.cache, &["inspect", &f.path("lm")]);
    assert!(!stderr.contains("debug assertions"), "{stderr}");
}

#[test]
fn lms_compose_without_training_under_the_confidence_rule() {
    let f = Fixture::new();
    let run = |strategy: &str| {
        let report = f.succeeds(
            &[
                "generate",
                "--base",
                &f.path("lm"),
                "--assistant",
                &f.path("lm"),
                "--strategy",
                strategy,
                "the cat",
                "--max-tokens",
                "6",
                "--temperature",
                "0",
            ],
            "out.json",
        );
        let tokens = report["samples"][0]["tokens"].as_array().unwrap().clone();
        assert_eq!(tokens.len(), 6, "{report}");
        tokens
    };
    // τ = 0: the base never defers; τ = 1: it always does (its top-1 probability is < 1).
    assert!(run("confidence:0").iter().all(|t| t["writer"] == 0));
    assert!(run("confidence:1").iter().all(|t| t["writer"] == 1));
    f.fails(
        &[
            "generate",
            "--base",
            &f.path("lm"),
            "--assistant",
            &f.path("lm"),
            "--strategy",
            "greedy",
            "the cat",
            "--max-tokens",
            "4",
        ],
        &["use confidence:τ"],
    );
}

/// `eval --composition` scores each target token with the model the confidence rule picks: τ = 0
/// gives exactly the base's NLL, τ = 1 exactly the assistant's, with deferral 0 and 1.
#[test]
fn compositions_evaluate_under_the_confidence_rule() {
    let f = Fixture::new();
    f.second_lm();
    let text_file = f.write(
        "passages.txt",
        "The cat sat on the mat. A dog ran to the log. ".repeat(6),
    );
    let (lm, lm2) = (f.path("lm"), f.path("lm2"));
    let (never, always) = (
        format!("never={lm}+{lm2}@0"),
        format!("always={lm}+{lm2}@1"),
    );
    let report = f.succeeds(
        &[
            "eval",
            "--model",
            &format!("base={lm}"),
            "--model",
            &format!("assistant={lm2}"),
            "--composition",
            &never,
            "--composition",
            &always,
            "--text-file",
            &text_file,
        ],
        "eval.json",
    );
    let row = |name: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == name)
            .unwrap_or_else(|| panic!("no row {name}: {report}"))
            .clone()
    };
    // Each example's score, not only the mean: two near-uniform random inits can have mean NLLs
    // within 1e-4 of each other while their examples' scores differ by 0.1 nats.
    let log_ps = |name: &str| -> Vec<f64> {
        let row = row(name);
        row["per_example"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["log_p"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(log_ps("never"), log_ps("base"), "{report}");
    assert_eq!(log_ps("always"), log_ps("assistant"), "{report}");
    assert_eq!(row("never")["nll"], row("base")["nll"], "{report}");
    assert_eq!(row("always")["nll"], row("assistant")["nll"], "{report}");
    let largest_difference = log_ps("base")
        .iter()
        .zip(log_ps("assistant"))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        largest_difference > 1e-3,
        "the two LMs score alike: {report}"
    );
    assert_eq!(row("never")["deferral"], 0.0);
    assert_eq!(row("always")["deferral"], 1.0);
    f.fails(
        &[
            "eval",
            "--composition",
            &format!("{lm}@2"),
            "--text-file",
            &text_file,
        ],
        &["τ after `@` must be a number in [0, 1]"],
    );
}

/// `chorus eval-mean` averages evaluations of the same examples (two identical evaluations average
/// to themselves, their paired Δ included) and refuses, naming the file, a file that is no report
/// and a report of other examples.
#[test]
fn evaluations_of_the_same_examples_average_and_others_are_refused() {
    let f = Fixture::new();
    f.second_lm();
    let text_file = f.write(
        "passages.txt",
        "The cat sat on the mat. A dog ran to the log. ".repeat(6),
    );
    let (lm, lm2) = (f.path("lm"), f.path("lm2"));
    let eval = |json: &str, max: &str| {
        f.succeeds(
            &[
                "eval",
                "--model",
                &format!("base={lm}"),
                "--model",
                &format!("assistant={lm2}"),
                "--text-file",
                &text_file,
                "--max-examples",
                max,
            ],
            json,
        )
    };
    let one = eval("one.json", "3");
    eval("two.json", "3");
    eval("fewer.json", "2");
    let mean = f.succeeds(
        &["eval-mean", &f.path("one.json"), &f.path("two.json")],
        "mean.json",
    );
    for (a, b) in one["rows"]
        .as_array()
        .unwrap()
        .iter()
        .zip(mean["rows"].as_array().unwrap())
    {
        assert_eq!(a["model"], b["model"]);
        assert!((a["nll"].as_f64().unwrap() - b["nll"].as_f64().unwrap()).abs() < 1e-12);
    }
    assert_eq!(
        one["paired"][0]["nll_difference"],
        mean["paired"][0]["nll_difference"]
    );
    let not_json = f.write("notes.json", "not a report");
    f.fails(
        &["eval-mean", &f.path("one.json"), &not_json],
        &["notes.json", "not a `chorus eval --json` report"],
    );
    f.fails(
        &["eval-mean", &f.path("one.json"), &f.path("fewer.json")],
        &["fewer.json", "cannot be compared", "first 2 of 3 passages"],
    );
}

/// A text file longer than one chunk (256 passages) is read and scored a chunk at a time; every
/// passage gets the score it gets when it is scored with no chunk boundary before it: the first
/// 256 alone (`--max-examples`), the rest as a file of their own sentences (the same passages, the
/// same contexts). The oracle and the paired comparison cover every passage, once.
#[test]
fn a_long_text_file_is_evaluated_in_chunks_as_in_one_piece() {
    let f = Fixture::new();
    f.second_lm();
    // 1,210 sentences in paragraphs of 7: 302 passages of four (two sentences left over).
    let text = |from: usize, to: usize| {
        (from..to)
            .map(|i| format!("Line {i}: the cat sat on the mat."))
            .collect::<Vec<_>>()
            .chunks(7)
            .map(|p| p.join("\n"))
            .collect::<Vec<_>>()
            .join("\n\n")
    };
    let full = f.write("long.txt", text(0, 1210));
    let tail = f.write("tail.txt", text(1024, 1210));
    let (lm, lm2) = (
        format!("a={}", f.path("lm")),
        format!("b={}", f.path("lm2")),
    );
    let eval = |file: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--model", &lm, "--model", &lm2, "--text-file", file];
        args.extend(extra);
        f.succeeds(&args, "eval.json")
    };
    let scores = |report: &serde_json::Value, model: &str| -> Vec<(u64, f64)> {
        let row = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"].as_str().unwrap().starts_with(model))
            .unwrap_or_else(|| panic!("no row {model}: {report}"));
        let mut s: Vec<(u64, f64)> = row["per_example"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["index"].as_u64().unwrap(), e["log_p"].as_f64().unwrap()))
            .collect();
        s.sort_by_key(|e| e.0);
        s
    };
    let whole = eval(&full, &["--oracle"]);
    let head = eval(&full, &["--oracle", "--max-examples", "256"]);
    let rest = eval(&tail, &["--oracle"]);
    for model in ["a", "b", "oracle"] {
        let (w, h, r) = (
            scores(&whole, model),
            scores(&head, model),
            scores(&rest, model),
        );
        assert_eq!((w.len(), h.len(), r.len()), (302, 256, 46), "{model}");
        let expected = h.iter().chain(&r).map(|e| e.1);
        for (i, ((index, got), want)) in w.iter().zip(expected).enumerate() {
            assert_eq!(*index, i as u64, "{model}: every passage once, in order");
            assert!(
                (got - want).abs() < 1e-4,
                "{model} passage {i}: {got} vs {want}"
            );
        }
    }
    let paired = whole["paired"].as_array().unwrap();
    assert!(paired.iter().all(|p| p["examples"] == 302), "{whole}");
    assert!(
        whole["data"].as_str().unwrap().ends_with("long.txt"),
        "{whole}"
    );
}

#[test]
fn continued_pre_training_starts_from_the_init_weights() {
    let Some(cache) = real_cache() else { return };
    let f = Fixture::new();
    // One step at a negligible learning rate: the exported LM is the init LM, not a fresh one.
    let config = f.write(
        "continue.toml",
        f.pretrain_toml(&format!(
            "init = {:?}\n[data]\ntasks = [\"story\"]\nmax_seq_len = 32\nbatch_size = 2\n\
             max_train_examples = 4\nvalid_examples = 2\n[train]\nsteps = 1\nwarmup_steps = 0\n\
             lr = 1e-30\nweight_decay = 0.0\niw_samples = 1",
            f.path("lm")
        )),
    );
    let (code, stderr) = chorus(
        &cache,
        &[
            "pretrain",
            "--config",
            &config,
            "--out",
            &f.path("continued"),
            // The fixture's LM ties its embeddings.
            "--set",
            "model.tie_embeddings=true",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let device = Default::default();
    let weights = |dir: &str| -> Vec<f32> {
        match chorus_lm::Lm::<B>::open(Path::new(&f.path(dir)), &device).unwrap() {
            chorus_lm::Lm::Llama(l) => l.embed_tokens.weight.val().into_data().to_vec().unwrap(),
            chorus_lm::Lm::Gpt2(_) => unreachable!("the fixture is a llama"),
        }
    };
    let (init, continued) = (weights("lm"), weights("continued/lm"));
    let max_diff = init
        .iter()
        .zip(&continued)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-6, "the continued LM moved by {max_diff}");
}

/// `chorus eval --routing`: one JSON line per example of the first joint model with assistants,
/// each target token's router posterior a distribution over the models, as many tokens as the
/// example's score counts, and the posteriors averaging to the deferral the evaluation reports;
/// without a joint model it is refused.
#[test]
fn router_posteriors_are_written_one_line_per_example() {
    let Some(cache) = real_cache() else { return };
    let f = Fixture::new();
    f.second_lm();
    let config = f.co_llm_toml("lm2", "");
    let (code, stderr) = chorus(
        &cache,
        &["train", "--config", &config, "--out", &f.path("out")],
    );
    assert_eq!(code, 0, "{stderr}");
    let routing = f.path("routing.jsonl");
    let eval = |models: &[String], json: &str| {
        let mut args = vec!["eval".to_string()];
        for m in models {
            args.extend(["--model".to_string(), m.clone()]);
        }
        args.extend(
            [
                "--config",
                &config,
                "--split",
                "test",
                "--max-examples",
                "2",
                "--iw-samples",
                "1",
                "--routing",
                &routing,
                "--json",
                json,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        chorus(&cache, &args)
    };
    let json = f.path("eval.json");
    let joint = format!("joint={}", f.path("out/checkpoints/best"));
    let (code, stderr) = eval(&[format!("base={}", f.path("lm")), joint], &json);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let joint_rows: Vec<&serde_json::Value> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["model"] == "joint")
        .collect();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&routing)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2 * joint_rows.len(), "two examples per task");
    for row in joint_rows {
        let task = row["task"].as_str().unwrap();
        let (mut deferred, mut tokens) = (0.0, 0usize);
        for line in lines.iter().filter(|l| l["task"] == task) {
            assert_eq!(line["model"], "joint");
            assert_eq!(line["models"].as_array().unwrap().len(), 2);
            let scored = row["per_example"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["index"] == line["example"])
                .unwrap_or_else(|| panic!("no score of {line}"));
            let per_token = line["tokens"].as_array().unwrap();
            assert_eq!(per_token.len() as u64, scored["tokens"].as_u64().unwrap());
            for token in per_token {
                let r: Vec<f64> = token["r"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert!(r.iter().all(|&p| (0.0..=1.0).contains(&p)), "{r:?}");
                assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{r:?}");
                deferred += 1.0 - r[0];
                tokens += 1;
            }
        }
        let reported = row["deferral"].as_f64().unwrap();
        assert!(
            (deferred / tokens as f64 - reported).abs() < 1e-5,
            "{task}: the posteriors average to {} deferral, the evaluation reports {reported}",
            deferred / tokens as f64
        );
    }
    // No joint model: nothing to record.
    let (code, stderr) = eval(&[format!("base={}", f.path("lm"))], &json);
    assert!(
        code == 1 && stderr.contains("--routing") && stderr.contains("no joint model"),
        "{code}: {stderr}"
    );
}

#[test]
fn a_corrupt_or_half_written_score_cache_is_named_and_never_used() {
    let Some(cache) = real_cache() else { return };
    let f = Fixture::new();
    // A second model to score: the fixture's LM under another name.
    std::fs::create_dir(f.dir.path().join("assistant")).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            f.dir.path().join("lm").join(file),
            f.dir.path().join("assistant").join(file),
        )
        .unwrap();
    }
    let config = f.co_llm_toml("assistant", &format!("scores = {:?}", f.path("scores")));
    let (code, stderr) = chorus(
        &cache,
        &["score", "--config", &config, "--out", &f.path("scores")],
    );
    assert_eq!(code, 0, "{stderr}");
    let train = [
        "train",
        "--config",
        config.as_str(),
        "--out",
        &f.path("out"),
    ];
    // Truncated values.
    let values = f.dir.path().join("scores/train/scores.f32");
    let bytes = std::fs::read(&values).unwrap();
    std::fs::write(&values, &bytes[..bytes.len() - 8]).unwrap();
    fails(&cache, &train, &["score cache", "scores.f32", "truncated"]);
    // Half-written: the values are there, the index (written last) is not.
    std::fs::write(&values, &bytes).unwrap();
    std::fs::remove_file(f.dir.path().join("scores/train/scores.json")).unwrap();
    fails(
        &cache,
        &train,
        &["score cache", "no scores.json", "incomplete"],
    );
    assert!(
        !f.dir.path().join("out/checkpoints").exists(),
        "a run started on a broken cache"
    );
}
