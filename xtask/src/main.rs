//! `cargo xtask <task>`: project automation.
//!
//! `cargo xtask train` runs the whole recipe through the `chorus` binary: fetch the corpora, train
//! a tokenizer, pre-train a base and two domain experts, score the experts once, train the joint
//! model and its ablations, evaluate everything on the test split and print the comparison table.
//! Independent steps run two at a time (burn's CPU backend mostly uses one core per process).

mod bench;
mod crash;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(about = "chorus project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// Small models and short runs: about 15 minutes on a 2-core CPU.
    Cpu,
    /// Larger models, longer runs and 100 IW samples, on CUDA (builds with `--features cuda`).
    Gpu,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// fetch data → tokenizer → pretrain base + experts → score → train joint model and
    /// ablations → evaluate → print the comparison table.
    Train {
        /// Where everything goes.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Scale of the run.
        #[arg(long, value_enum, default_value_t = Preset::Cpu)]
        preset: Preset,
    },
    /// The experiment behind chorus's claim (SmolLM2 as a frozen assistant, a base and three
    /// experts on its tokenizer, five systems × seeds, the oracle, paired comparisons), run end
    /// to end; writes docs/results.md and docs/results/*.svg. Steps whose outputs exist are
    /// skipped, so a rerun continues an interrupted run or only rewrites the report.
    Report {
        /// Where the runs go.
        #[arg(long, default_value = "out/report")]
        out: PathBuf,
        /// Scale of the run (`cpu`: small budgets, about an hour on 2 cores).
        #[arg(long, value_enum, default_value_t = report::ReportPreset::Cpu)]
        preset: report::ReportPreset,
        /// Seeds per trained system.
        #[arg(long, default_value_t = 3)]
        seeds: u64,
    },
    /// Download and verify the corpora into $CHORUS_CACHE (default ~/.cache/chorus).
    FetchData,
    /// Run chorus and its peers (PyTorch twin, llama.cpp) back to back on the same work and write
    /// the table into docs/performance.md.
    Bench {
        /// Where raw outputs go.
        #[arg(long, default_value = "out/bench")]
        out: PathBuf,
        /// Back-to-back runs of chorus and its peers per training-step, scoring and
        /// collaborative-decoding row (the table gives the medians and the range of the pairs'
        /// ratios): this machine's run-to-run spread is larger than some targets' margins.
        #[arg(long, default_value_t = 3)]
        pairs: usize,
    },
    /// Install PyTorch 2.9.0 into $CHORUS_CACHE/venv and build `target/tch/debug/chorus` with the
    /// LibTorch backend (`--device tch`).
    SetupTorch,
    /// Train a small joint model, SIGKILL `chorus train` at random moments (some inside checkpoint
    /// writes), resume after each, and check that the final parameters and metrics equal an
    /// uninterrupted run's bit for bit.
    CrashTest {
        /// Where the runs go.
        #[arg(long, default_value = "out/crash-test")]
        out: PathBuf,
        /// How many times to kill.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Seed of the kill times.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Train { out, preset } => train(&out, preset),
        Task::Report { out, preset, seeds } => report::report(&out, preset, seeds),
        Task::FetchData => {
            let chorus = build(Preset::Cpu)?;
            run_now(&chorus, &["data", "fetch"])
        }
        Task::Bench { out, pairs } => bench::bench(&out, pairs),
        Task::SetupTorch => bench::setup_torch().map(|_| ()),
        Task::CrashTest { out, kills, seed } => {
            let report = crash::crash_test(&out, kills, seed)?;
            println!("{report}");
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the `chorus` binary and returns its path. The CPU preset uses the dev profile (whose
/// chorus-cli and dependencies are optimised) so it shares the test build.
fn build(preset: Preset) -> Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args(["build", "-p", "chorus-cli"]);
    if preset == Preset::Gpu {
        cmd.args(["--release", "--features", "cuda"]);
    }
    eprintln!("xtask: building chorus ({preset:?} preset)");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p chorus-cli failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let profile = if preset == Preset::Gpu {
        "release"
    } else {
        "debug"
    };
    Ok(target.join(profile).join("chorus"))
}

/// Fetches the corpora and trains `<out>/tokenizer.json` with `vocab` tokens unless it is there.
fn corpora_and_tokenizer(chorus: &Path, out: &Path, vocab: usize) -> Result<()> {
    run_now(chorus, &["data", "fetch"])?;
    let path = out.join("tokenizer.json");
    if !path.is_file() {
        let (vocab, path) = (vocab.to_string(), path.display().to_string());
        run_now(
            chorus,
            &["data", "tokenizer", "--vocab-size", &vocab, "--out", &path],
        )?;
    }
    Ok(())
}

/// Fetches the corpora and SmolLM2 (sha256-checked) into the cache and returns the GGUF's path.
fn fetch_smollm2(chorus: &Path) -> Result<String> {
    let output = Command::new(chorus)
        .args(["data", "fetch", "--models"])
        .output()
        .with_context(|| format!("running {}", chorus.display()))?;
    if !output.status.success() {
        bail!(
            "chorus data fetch --models failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ready"))
        .map(str::trim)
        .find(|path| path.ends_with(".gguf"))
        .map(str::to_string)
        .context("chorus data fetch --models did not name the SmolLM2 GGUF")
}

fn run_now(chorus: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(chorus)
        .args(args)
        .status()
        .with_context(|| format!("running {}", chorus.display()))?;
    if !status.success() {
        bail!("chorus {} failed", args.join(" "));
    }
    Ok(())
}

/// One `chorus` invocation, logged to `<out>/logs/<name>.log`, skipped when `output` exists (a
/// rerun picks up where a previous one stopped; delete the output directory to start over).
struct Step {
    name: String,
    args: Vec<String>,
    output: PathBuf,
}

fn step(name: impl Into<String>, mut args: Vec<String>, sets: &[String], output: PathBuf) -> Step {
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    Step {
        name: name.into(),
        args,
        output,
    }
}

/// Runs the steps of `lanes` on as many workers as there are lanes. Steps are taken in turn from
/// the lanes (the first of each, then the second, …) and steps whose output exists are skipped
/// first, so the work left is spread over the workers however much of it an earlier run did; a
/// single lane runs in order. A step gets one LibTorch/OpenMP thread while another step runs or
/// waits beside it (two processes of two threads on two cores thrash), all threads otherwise;
/// burn-ndarray's rayon pool is left alone.
/// Stops at the first failure with the tail of its log. Each finished step's wall time and
/// command go to `<out>/times.json`.
fn run_lanes(chorus: &Path, out: &Path, lanes: Vec<Vec<Step>>) -> Result<()> {
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();
    let workers = lanes.len().max(1);
    let mut lanes: Vec<std::vec::IntoIter<Step>> = lanes.into_iter().map(Vec::into_iter).collect();
    let mut queue = std::collections::VecDeque::new();
    while lanes.iter().any(|l| l.len() > 0) {
        for step in lanes.iter_mut().filter_map(Iterator::next) {
            if step.output.exists() {
                eprintln!(
                    "xtask: skip  {} ({} exists)",
                    step.name,
                    step.output.display()
                );
            } else {
                queue.push_back(step);
            }
        }
    }
    // Per worker: the running step, its process, start time and log.
    let mut running: Vec<Option<(Child, Step, Instant, PathBuf)>> =
        (0..workers).map(|_| None).collect();
    loop {
        for slot in running.iter_mut() {
            if let Some((child, running_step, t0, log)) = slot {
                let Some(status) = child.try_wait()? else {
                    continue;
                };
                let (name, t0, log) = (running_step.name.clone(), *t0, log.clone());
                let command = running_step.args.join(" ");
                *slot = None;
                if !status.success() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    for line in tail.iter().rev() {
                        eprintln!("  | {line}");
                    }
                    bail!("step `{name}` failed; full log: {}", log.display());
                }
                let seconds = t0.elapsed().as_secs_f64();
                eprintln!(
                    "xtask: done  {name} in {seconds:.0} s (at {:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                record_time(out, &name, seconds, &command)?;
            }
        }
        for i in 0..running.len() {
            if running[i].is_some() {
                continue;
            }
            let Some(next) = queue.pop_front() else {
                break;
            };
            let others = running.iter().filter(|s| s.is_some()).count() + queue.len();
            let log = logs.join(format!("{}.log", next.name));
            let file = std::fs::File::create(&log)?;
            eprintln!("xtask: start {} (log {})", next.name, log.display());
            let mut command = Command::new(chorus);
            if workers > 1 && others > 0 {
                command.env("OMP_NUM_THREADS", "1");
            }
            let child = command
                .args(&next.args)
                .stdout(Stdio::from(file.try_clone()?))
                .stderr(Stdio::from(file))
                .spawn()
                .with_context(|| format!("starting {}", chorus.display()))?;
            running[i] = Some((child, next, Instant::now(), log));
        }
        if queue.is_empty() && running.iter().all(Option::is_none) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Adds `name`'s wall time and command to `<out>/times.json`.
fn record_time(out: &Path, name: &str, seconds: f64, command: &str) -> Result<()> {
    let path = out.join("times.json");
    let mut times: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    // When it ended (seconds since the Unix epoch): with `seconds`, the interval it ran in, so
    // that a report can tell the run's elapsed time from the sum of its overlapping steps.
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    times.insert(
        name.to_string(),
        serde_json::json!({ "seconds": seconds, "ended": ended, "command": command }),
    );
    std::fs::write(&path, serde_json::to_string_pretty(&times)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn train(out: &Path, preset: Preset) -> Result<()> {
    let started = Instant::now();
    let chorus = build(preset)?;
    let build_s = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(out)?;
    let p = |rel: &str| out.join(rel).display().to_string();
    let device: &[&str] = match preset {
        Preset::Cpu => &[],
        Preset::Gpu => &["--device", "cuda"],
    };
    // Preset knobs: (pretrain steps base/expert, joint steps, IW samples, examples per task for
    // joint training, test examples per task, model overrides).
    let (base_steps, expert_steps, joint_steps, iw, joint_examples, test_examples) = match preset {
        Preset::Cpu => (300, 80, 100, 10, 200, 100),
        Preset::Gpu => (5000, 1500, 3000, 100, 0, 0),
    };
    let scale: Vec<String> = match preset {
        Preset::Cpu => Vec::new(),
        Preset::Gpu => [
            "model.d_model=512",
            "model.n_layers=8",
            "model.n_heads=8",
            "model.n_kv_heads=4",
            "model.d_ff=1536",
            "model.max_seq_len=256",
            "data.max_seq_len=256",
            "data.batch_size=32",
            "data.max_train_examples=0",
        ]
        .map(String::from)
        .to_vec(),
    };
    let with = |mut sets: Vec<String>, extra: &[String]| {
        sets.extend_from_slice(extra);
        sets
    };

    eprintln!("xtask: 1/5 corpora and SmolLM2-135M (its GGUF holds the shared tokenizer)");
    let gguf = fetch_smollm2(&chorus)?;
    // Every model reads SmolLM2's 49,152-token tokenizer; the small ones tie their embeddings,
    // which halves the parameters that vocabulary costs.
    let tokenizer = format!("tokenizer={gguf:?}");
    let lm_sets = with(
        vec![
            tokenizer.clone(),
            "model.vocab_size=49152".to_string(),
            "model.tie_embeddings=true".to_string(),
        ],
        &scale,
    );
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pretrain = |name: &'static str, config: &str, dir: &str, extra: Vec<String>| {
        let mut args = strings(&["pretrain", "--config", config, "--out", &p(dir)]);
        args.extend(strings(device));
        step(
            name,
            args,
            &with(lm_sets.clone(), &extra),
            out.join(dir).join("lm").join("config.json"),
        )
    };

    eprintln!("xtask: 2/5 pre-training the base, then two experts continuing it on their task");
    run_lanes(
        &chorus,
        out,
        vec![vec![pretrain(
            "pretrain-base",
            "configs/base.toml",
            "base",
            vec![format!("train.steps={base_steps}")],
        )]],
    )?;
    let expert = |name: &'static str, config: &str, dir: &str| {
        let sets = vec![
            format!("init={:?}", p("base/lm")),
            format!("train.steps={expert_steps}"),
            "train.lr=1e-3".to_string(),
            "train.warmup_steps=10".to_string(),
        ];
        vec![pretrain(name, config, dir, sets)]
    };
    run_lanes(
        &chorus,
        out,
        vec![
            expert(
                "pretrain-story",
                "configs/expert-story.toml",
                "expert-story",
            ),
            expert(
                "pretrain-dialogue",
                "configs/expert-dialogue.toml",
                "expert-dialogue",
            ),
        ],
    )?;

    let models = vec![
        tokenizer.clone(),
        format!("base={:?}", p("base/lm")),
        format!(
            "assistants=[{gguf:?}, {:?}, {:?}]",
            p("expert-story/lm"),
            p("expert-dialogue/lm")
        ),
        format!("data.max_train_examples={joint_examples}"),
        format!("train.steps={joint_steps}"),
    ];
    let scale_joint: Vec<String> = scale
        .iter()
        .filter(|s| s.starts_with("data."))
        .cloned()
        .collect();
    let joint_sets = with(models.clone(), &scale_joint);
    let scores = format!("scores={:?}", p("scores"));
    let train = |name: &'static str, dir: &str, extra: &[&str]| {
        let mut args = strings(&["train", "--config", "configs/joint.toml", "--out", &p(dir)]);
        args.extend(strings(device));
        step(
            name,
            args,
            &with(joint_sets.clone(), &strings(extra)),
            out.join(dir).join("summary.json"),
        )
    };

    eprintln!("xtask: 3/5 scoring the assistants (SmolLM2 and the experts) once");
    let mut score_args = strings(&[
        "score",
        "--config",
        "configs/joint.toml",
        "--out",
        &p("scores"),
    ]);
    score_args.extend(strings(device));
    let scored = out.join("scores/valid/scores.json");
    run_lanes(
        &chorus,
        out,
        vec![vec![step("score", score_args, &joint_sets, scored)]],
    )?;

    // Assistants read z only through their adapters; on CPU the joint model skips them, so its
    // assistants' log-probs come from the score caches in training (3x cheaper steps) and in
    // evaluation.
    let joint_assistants_blind = preset == Preset::Cpu;
    eprintln!("xtask: 4/5 training the joint model and its ablations");
    let single = [
        "assistants=[]",
        "chorus.d_latent=0",
        "train.selector_init_steps=0",
    ];
    let vae = ["assistants=[]", "train.selector_init_steps=0"];
    run_lanes(
        &chorus,
        out,
        vec![
            vec![
                if joint_assistants_blind {
                    train(
                        "train-joint",
                        "joint",
                        &[scores.as_str(), "chorus.assistant_adapters=false"],
                    )
                } else {
                    train("train-joint", "joint", &[])
                },
                train(
                    "train-co-llm",
                    "co-llm",
                    &[scores.as_str(), "chorus.d_latent=0"],
                ),
            ],
            vec![
                train("train-vae", "vae", &vae),
                train("train-base-finetuned", "base-finetuned", &single),
            ],
        ],
    )?;

    eprintln!("xtask: 5/5 evaluating on the test split");
    // Joint models whose assistants read no z take the assistants' test log-probs from one cache,
    // which the first of them fills.
    let eval_scores = p("eval-scores");
    let eval = |name: &'static str, models: &[(&str, String)], cached_assistants: bool| {
        let json = p(&format!("{name}.json"));
        let mut args: Vec<String> = vec!["eval".into()];
        if cached_assistants {
            args.extend(["--scores".to_string(), eval_scores.clone()]);
        }
        for (label, path) in models {
            args.push("--model".into());
            args.push(format!("{label}={path}"));
        }
        args.extend(
            [
                "--split",
                "test",
                "--iw-samples",
                &iw.to_string(),
                "--max-examples",
                &test_examples.to_string(),
                "--json",
                &json,
            ]
            .map(String::from),
        );
        args.extend(device.iter().map(|s| s.to_string()));
        args.extend(
            scale_joint
                .iter()
                .flat_map(|s| ["--set".to_string(), s.clone()]),
        );
        Step {
            name: name.to_string(),
            args,
            output: PathBuf::from(json),
        }
    };
    let best = |d: &str| p(&format!("{d}/checkpoints/best"));
    run_lanes(
        &chorus,
        out,
        vec![
            vec![eval(
                "eval-joint",
                &[("joint", best("joint"))],
                joint_assistants_blind,
            )],
            vec![
                eval("eval-vae", &[("VAE", best("vae"))], false),
                eval(
                    "eval-singles",
                    &[
                        ("base", p("base/lm")),
                        ("SmolLM2-135M", gguf.clone()),
                        ("story expert", p("expert-story/lm")),
                        ("dialogue expert", p("expert-dialogue/lm")),
                        ("base fine-tuned", best("base-finetuned")),
                    ],
                    false,
                ),
                eval("eval-co-llm", &[("Co-LLM", best("co-llm"))], true),
            ],
        ],
    )?;

    let mut rows = Vec::new();
    for name in ["eval-singles", "eval-co-llm", "eval-vae", "eval-joint"] {
        let path = out.join(format!("{name}.json"));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        rows.extend(report["rows"].as_array().cloned().unwrap_or_default());
    }
    let table = comparison_table(&rows);
    let wall = started.elapsed().as_secs_f64();
    let summary = format!(
        "# chorus: `cargo xtask train --preset {}`\n\nTest split, {} examples per task, IW-NLL with {iw} samples of z for z models; \
         NLL in nats per target token of SmolLM2's 49,152-token tokenizer, shared by every model (EOS included, context not scored).\n\n{table}\n\
         Wall time: {wall:.0} s in all ({build_s:.0} s building chorus).\n",
        match preset {
            Preset::Cpu => "cpu",
            Preset::Gpu => "gpu",
        },
        if test_examples == 0 {
            "all".to_string()
        } else {
            test_examples.to_string()
        },
    );
    std::fs::write(out.join("results.md"), &summary)?;
    println!("{summary}");
    println!(
        "Outputs in {}: results.md (this table), eval-*.json, logs/, and per model: checkpoints/ (best/ is the model), metrics.jsonl, metrics.csv.",
        out.display()
    );
    Ok(())
}

/// Rows grouped by task, with each row's NLL difference to the best single model of that task.
fn comparison_table(rows: &[serde_json::Value]) -> String {
    let singles = [
        "base",
        "SmolLM2-135M",
        "story expert",
        "dialogue expert",
        "base fine-tuned",
    ];
    let mut s = String::from(
        "| task | model | NLL/token | PPL | Δ NLL vs best single | KL | MI | AU | deferral |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut tasks: Vec<&str> = rows.iter().filter_map(|r| r["task"].as_str()).collect();
    tasks.sort();
    tasks.dedup();
    for task in tasks {
        let of_task: Vec<&serde_json::Value> = rows.iter().filter(|r| r["task"] == task).collect();
        let best_single = of_task
            .iter()
            .filter(|r| singles.contains(&r["model"].as_str().unwrap_or("")))
            .filter_map(|r| r["nll"].as_f64())
            .fold(f64::INFINITY, f64::min);
        for r in of_task {
            let nll = r["nll"].as_f64().unwrap_or(f64::NAN);
            let opt = |k: &str| r[k].as_f64().map_or("–".to_string(), |v| format!("{v:.3}"));
            s.push_str(&format!(
                "| {task} | {} | {nll:.4} | {:.1} | {:+.4} | {} | {} | {} | {} |\n",
                r["model"].as_str().unwrap_or("?"),
                nll.exp(),
                nll - best_single,
                opt("kl"),
                opt("mi"),
                r["active_units"]
                    .as_u64()
                    .map_or("–".to_string(), |v| v.to_string()),
                r["deferral"]
                    .as_f64()
                    .map_or("–".to_string(), |v| format!("{:.1} %", 100.0 * v)),
            ));
        }
    }
    s
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A step of `sh -c script` whose output is `dir/name`.
    fn shell_step(dir: &Path, name: &str, script: &str) -> Step {
        Step {
            name: name.into(),
            args: vec!["-c".into(), script.into()],
            output: dir.join(name),
        }
    }

    #[test]
    fn run_lanes_skips_done_steps_runs_every_other_once_and_keeps_one_lane_in_order() {
        let dir = std::env::temp_dir().join(format!("chorus-lanes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sh = Path::new("/bin/sh");
        let d = dir.display();
        // Each step appends its name to `order` and writes its OMP_NUM_THREADS into its output.
        let record = |name: &str| {
            format!("echo {name} >> {d}/order; echo \"${{OMP_NUM_THREADS:-all}}\" > {d}/{name}")
        };
        std::fs::write(dir.join("a"), "done before").unwrap();
        // Two lanes, the first of which an earlier run finished: `b` is the only step left and
        // runs with every thread.
        run_lanes(
            sh,
            &dir,
            vec![
                vec![shell_step(&dir, "a", &record("a"))],
                vec![shell_step(&dir, "b", &record("b"))],
            ],
        )
        .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("a"), "done before");
        assert_eq!(read("b").trim(), "all");
        // Side by side, every pending step runs once, with one thread while another is pending.
        run_lanes(
            sh,
            &dir,
            vec![
                vec![
                    shell_step(&dir, "c", &format!("sleep 0.3; {}", record("c"))),
                    shell_step(&dir, "d", &record("d")),
                ],
                vec![shell_step(&dir, "e", &record("e"))],
            ],
        )
        .unwrap();
        let mut ran: Vec<String> = read("order").lines().map(str::to_string).collect();
        assert_eq!(ran.remove(0), "b");
        ran.sort();
        assert_eq!(ran, ["c", "d", "e"]);
        assert_eq!(read("c").trim(), "1");
        assert_eq!(read("e").trim(), "1");
        // One lane runs in order (calibration before the generations that read it).
        std::fs::write(dir.join("order"), "").unwrap();
        run_lanes(
            sh,
            &dir,
            vec![vec![
                shell_step(&dir, "f", &format!("sleep 0.2; {}", record("f"))),
                shell_step(&dir, "g", &record("g")),
                shell_step(&dir, "h", &record("h")),
            ]],
        )
        .unwrap();
        assert_eq!(read("order"), "f\ng\nh\n");
        assert_eq!(read("h").trim(), "all");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
