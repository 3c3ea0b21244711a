//! The wgpu backend (burn-wgpu: fused, autotuned WGSL kernels) on the same work as the CPU backend:
//! SmolLM2 against the f32 numpy reference, and a joint model trained, evaluated and decoded on
//! both, compared number by number. Built only with the `wgpu` feature:
//!
//! ```sh
//! cargo test -p chorus-cli --features wgpu --test wgpu_backend
//! ```
//!
//! It needs a Vulkan, Metal or DX12 adapter. Without a GPU, Mesa's lavapipe runs the same shaders
//! on the CPU (Debian: `apt install mesa-vulkan-drivers`); `.ci/run` does that. This checks that
//! the GPU code path computes what the CPU path does; it measures no speed.

mod common;

use common::{
    Fixture, assert_greedy_agrees, check_reference, chorus, fails_with_env, read_json, real_cache,
};

/// What `chorus` names the wgpu backend in its reports (`check-reference`'s speed table).
const WGPU_BACKEND: &str = "wgpu<wgsl>";

/// SmolLM2-135M from its Q4_1 GGUF, run on wgpu: the same tokens as llama.cpp, the same 20
/// largest logits as the f32 numpy forward to 1e-3 and the same 8 greedy tokens — the same check
/// as on the CPU (`smollm2_reference.rs`), here through burn's forward and KV cache rather than
/// the CPU's host steps; and the report names the wgpu backend, so a silent fall-back to the CPU
/// cannot pass.
#[test]
fn smollm2_on_wgpu_matches_the_f32_numpy_reference() {
    let Some((printed, report)) =
        check_reference("wgpu", "smollm2_numpy.json", &["--tolerance", "1e-3"])
    else {
        return;
    };
    assert!(
        printed.contains(WGPU_BACKEND),
        "not run on wgpu:\n{printed}"
    );
    assert_greedy_agrees(&report);
}

/// One joint model's whole life on both backends: base + assistant, z read by both through their
/// adapters (memory slot, embedding offset) and the selector.
///
/// - Training, 3 steps with z at the prior mean (so no step draws from the backend's RNG): every
///   logged loss equal to 1e-4 relatively, and the loss moved — the forward, the backward and
///   AdamW agree. AdamW's ε is 1, so that a small gradient moves its weight in proportion
///   (lr · g / (|g| + ε) on the first step): with the usual ε every step is ≈ lr · sign(g), and a
///   gradient entry near 0 takes opposite signs on the two backends from rounding alone, which
///   moves the next loss by far more than the rounding did.
/// - Evaluation of a model trained with sampled z (q(z | x, c), p(z | c), the KL): every example's
///   importance-weighted bound, from the same seeded noise, equal to 1e-4.
/// - Greedy collaborative decoding at the prior mean and at a prior sample (`--seed 3`, drawn on
///   the host, not by the backend's generator): the same tokens from the same writers, and z and
///   π equal to 1e-4.
#[test]
fn a_joint_model_trains_evaluates_and_decodes_alike_on_wgpu_and_the_cpu() {
    let Some(cache) = real_cache() else { return };
    let f = Fixture::new();
    f.second_lm();
    let config = |name: &str, z: &str| {
        f.write(
            name,
            format!(
                "tokenizer = {:?}\nbase = {:?}\nassistants = [{:?}]\n\
                 [chorus]\nd_latent = 4\nmemory_slots = 1\nembedding_offset = true\n\
                 assistant_adapters = true\n{z}\n\
                 [data]\ntasks = [\"story\"]\nmax_seq_len = 32\nbatch_size = 4\n\
                 max_train_examples = 8\nvalid_examples = 4\n\
                 [train]\nsteps = 3\nlr = 0.05\nepsilon = 1.0\nwarmup_steps = 0\nlog_every = 1\n\
                 eval_every = 100\nselector_init_steps = 0\niw_samples = 2\n",
                f.path("tokenizer.json"),
                f.path("lm"),
                f.path("lm2"),
            ),
        )
    };
    let run = |args: &[&str]| {
        let (code, stderr) = chorus(&cache, args);
        assert_eq!(code, 0, "chorus {args:?}:\n{stderr}");
    };

    // Training.
    let at_prior_mean = config("prior-mean.toml", "z_at_prior_mean = true");
    let losses = |device: &str| -> Vec<f64> {
        let out = f.path(&format!("prior-mean-{device}"));
        run(&[
            "--device",
            device,
            "train",
            "--config",
            &at_prior_mean,
            "--out",
            &out,
        ]);
        std::fs::read_to_string(format!("{out}/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|row| row["loss"].as_f64())
            .collect()
    };
    let (cpu, wgpu) = (losses("cpu"), losses("wgpu"));
    assert_eq!(cpu.len(), 3, "one loss per step: {cpu:?}");
    assert_close("training loss", &cpu, &wgpu);
    assert!(
        (cpu[2] - cpu[0]).abs() > 1e-3,
        "the loss did not move, so the steps compared nothing: {cpu:?}"
    );

    // Evaluation, of a model trained (on the CPU) with sampled z.
    let sampled = config("sampled.toml", "");
    let trained = f.path("sampled");
    run(&["train", "--config", &sampled, "--out", &trained]);
    let joint = format!("joint={trained}/checkpoints/best");
    let bounds = |device: &str| -> Vec<f64> {
        let json = f.path(&format!("eval-{device}.json"));
        run(&[
            "--device",
            device,
            "eval",
            "--model",
            &joint,
            "--config",
            &sampled,
            "--split",
            "test",
            "--max-examples",
            "4",
            "--iw-samples",
            "2",
            "--json",
            &json,
        ]);
        let report = read_json(&json);
        report["rows"][0]["per_example"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["log_p"].as_f64().unwrap())
            .collect()
    };
    let (cpu, wgpu) = (bounds("cpu"), bounds("wgpu"));
    assert_eq!(cpu.len(), 4, "four examples: {cpu:?}");
    assert_close("importance-weighted bound", &cpu, &wgpu);

    // Decoding.
    let decode = |device: &str, z: &str| -> (serde_json::Value, Vec<f64>) {
        let json = f.path(&format!("generate-{device}-{z}.json"));
        run(&[
            "--device",
            device,
            "generate",
            "--model",
            &format!("{trained}/checkpoints/best"),
            "--z",
            z,
            "--seed",
            "3",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "the cat",
            "--json",
            &json,
        ]);
        let report = read_json(&json);
        let tokens = report["samples"][0]["tokens"].as_array().unwrap();
        // z, then every token's π.
        let numbers = report["samples"][0]["z"]
            .as_array()
            .unwrap()
            .iter()
            .chain(tokens.iter().flat_map(|t| t["pi"].as_array().unwrap()))
            .map(|p| p.as_f64().unwrap())
            .collect();
        let ids = tokens
            .iter()
            .map(|t| serde_json::json!([t["id"], t["writer"]]))
            .collect();
        (ids, numbers)
    };
    for z in ["prior-mean", "prior"] {
        let ((cpu, cpu_numbers), (wgpu, wgpu_numbers)) = (decode("cpu", z), decode("wgpu", z));
        assert_eq!(cpu.as_array().unwrap().len(), 12, "{cpu}");
        assert_eq!(
            cpu, wgpu,
            "--z {z}: greedy tokens and writers (cpu, then wgpu)"
        );
        assert_close(&format!("--z {z}: z and π"), &cpu_numbers, &wgpu_numbers);
    }
}

/// Without an adapter (the Vulkan loader pointed at no driver), `--device wgpu` is one error line
/// naming the device and what is missing, before burn-wgpu starts — not its panic.
#[test]
fn no_wgpu_adapter_is_an_error_not_a_panic() {
    let no_driver = "/nonexistent/chorus-no-such-icd.json";
    let cache = tempfile::tempdir().unwrap();
    fails_with_env(
        cache.path(),
        &[
            ("VK_ICD_FILENAMES", no_driver),
            ("VK_DRIVER_FILES", no_driver),
        ],
        &[
            "--device",
            "wgpu",
            "bench-step",
            "--batch",
            "1",
            "--seq",
            "8",
            "--steps",
            "1",
        ],
        &["device `wgpu`", "no Vulkan adapter"],
    );
}

/// Asserts that `wgpu` holds the same numbers as `cpu` to 1e-4 relatively.
#[track_caller]
fn assert_close(what: &str, cpu: &[f64], wgpu: &[f64]) {
    assert_eq!(cpu.len(), wgpu.len(), "{what}: cpu {cpu:?}, wgpu {wgpu:?}");
    let largest = cpu
        .iter()
        .zip(wgpu)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0.0, f64::max);
    println!("{what}: cpu {cpu:?}, wgpu {wgpu:?}, largest relative difference {largest:.1e}");
    assert!(largest <= 1e-4, "{what}: cpu {cpu:?}, wgpu {wgpu:?}");
}
