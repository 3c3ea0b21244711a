//! `cargo xtask crash-test`: SIGKILL `chorus train` at random moments, resume after each kill, and
//! compare the end state with an uninterrupted run of the same config.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Preset, build, corpora_and_tokenizer, run_now};

/// xorshift64*: seeded kill times, so a campaign can be repeated.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(read(a)? == read(b)?)
}

/// Metric rows without the wall-clock throughput (the one column that depends on the machine's
/// speed, not on the computation).
fn metric_rows(run: &Path) -> Result<Vec<serde_json::Value>> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}: a torn line {l:?}", path.display()))?;
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_s");
            }
            Ok(v)
        })
        .collect()
}

fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

fn in_checkpoint_write(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints")).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with('.'))
    })
}

fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints")).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
    })
}

/// Runs the campaign under `out` and returns its report (Markdown).
pub fn crash_test(out: &Path, kills: usize, seed: u64) -> Result<String> {
    let chorus = build(Preset::Cpu)?;
    std::fs::create_dir_all(out)?;
    let p = |rel: &str| out.join(rel).display().to_string();
    let vocab = 1024;
    corpora_and_tokenizer(&chorus, out, vocab)?;
    let tokenizer = format!("tokenizer={:?}", p("tokenizer.json"));
    let small = [
        format!("model.vocab_size={vocab}"),
        "model.d_model=32".into(),
        "model.n_layers=2".into(),
        "model.n_heads=2".into(),
        "model.n_kv_heads=1".into(),
        "model.d_ff=64".into(),
        "model.max_seq_len=64".into(),
        "data.max_seq_len=64".into(),
        "data.max_train_examples=100".into(),
        "data.valid_examples=8".into(),
        "train.steps=3".into(),
        "train.eval_every=0".into(),
        "train.checkpoint_every=0".into(),
    ];
    for name in ["base", "assistant"] {
        if out.join(name).join("lm/config.json").is_file() {
            continue;
        }
        let mut args = vec![
            "pretrain".to_string(),
            "--config".into(),
            "configs/base.toml".into(),
            "--out".into(),
            p(name),
            "--set".into(),
            tokenizer.clone(),
        ];
        for s in &small {
            args.extend(["--set".into(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_now(&chorus, &args)?;
    }
    let steps = 40u64;
    let joint_sets = [
        tokenizer,
        format!("base={:?}", p("base/lm")),
        format!("assistants=[{:?}]", p("assistant/lm")),
        "chorus.d_latent=8".into(),
        "data.max_seq_len=64".into(),
        "data.batch_size=8".into(),
        "data.max_train_examples=60".into(),
        "data.valid_examples=8".into(),
        format!("train.steps={steps}"),
        "train.warmup_steps=4".into(),
        "train.checkpoint_every=1".into(),
        "train.eval_every=8".into(),
        "train.keep_last=3".into(),
        "train.log_every=2".into(),
        "train.iw_samples=2".into(),
        "train.selector_init_steps=3".into(),
    ];
    let train = |run: &Path, resume: bool, log: &Path| -> Result<std::process::Child> {
        let mut cmd = Command::new(&chorus);
        cmd.args(["train", "--config", "configs/joint.toml", "--out"])
            .arg(run);
        for s in &joint_sets {
            cmd.args(["--set", s]);
        }
        if resume {
            cmd.arg("--resume");
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("starting chorus train")
    };

    // The uninterrupted run, timing its start-up (until the first checkpoint) and its steps.
    let reference = out.join("reference");
    let crashed = out.join("crashed");
    for dir in [&reference, &crashed] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
    }
    eprintln!("xtask: crash-test: the uninterrupted run ({steps} steps)");
    let started = Instant::now();
    let mut child = train(&reference, false, &reference.join("train.log"))?;
    let mut first_checkpoint = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if first_checkpoint.is_none() && checkpoint(&reference, 1).is_dir() {
            first_checkpoint = Some(started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!(
            "the uninterrupted run failed; log: {}",
            reference.join("train.log").display()
        );
    }
    let total = started.elapsed().as_secs_f64();
    let startup = first_checkpoint.unwrap_or(total / 2.0);
    let per_step = (total - startup) / (steps - 1) as f64;
    if kills as u64 >= steps {
        bail!(
            "--kills {kills} needs fewer kills than the run's {steps} steps (each kill waits for one)"
        );
    }
    eprintln!(
        "xtask: crash-test: {total:.1} s ({startup:.1} s to the first checkpoint, {per_step:.2} s/step)"
    );

    // The crashed run: start (or resume), SIGKILL, repeat. A kill waits for progress (a newer
    // checkpoint than the run started from), then either strikes while the next checkpoint is
    // being written (a `.tmp-` entry exists; one kill in three) or after a random share of a step.
    let mut rng = Rng(seed.max(1));
    let log = crashed.join("train.log");
    let (mut during_write, mut before_first, mut finished_early, mut resumes) = (0, 0, 0, 0);
    let mut lines = Vec::new();
    let latest = |run: &Path| {
        (1..=steps)
            .rev()
            .find(|s| checkpoint(run, *s).join("state.json").is_file())
    };
    for kill in 1..=kills {
        let resume = has_checkpoint(&crashed);
        resumes += resume as usize;
        let from = latest(&crashed).unwrap_or(0);
        let in_write = rng.uniform() < 1.0 / 3.0;
        let extra = rng.uniform() * per_step;
        let mut child = train(&crashed, resume, &log)?;
        let t0 = Instant::now();
        let mut progressed = None;
        let finished = loop {
            if child.try_wait()?.is_some() {
                break true;
            }
            if progressed.is_none() && latest(&crashed).unwrap_or(0) > from {
                progressed = Some(Instant::now());
            }
            if let Some(at) = progressed {
                let strike = if in_write {
                    in_checkpoint_write(&crashed)
                } else {
                    at.elapsed().as_secs_f64() >= extra
                };
                if strike {
                    break false;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let delay = t0.elapsed().as_secs_f64();
        child.kill().ok(); // SIGKILL
        child.wait()?;
        let writing = in_checkpoint_write(&crashed);
        let latest = latest(&crashed);
        during_write += writing as usize;
        before_first += latest.is_none() as usize;
        finished_early += finished as usize;
        lines.push(format!(
            "| {kill} | {delay:.2} s | {} | {} | {} |",
            if resume { "resume" } else { "start" },
            latest.map_or("–".into(), |s| s.to_string()),
            if finished {
                "had already exited"
            } else if writing {
                "inside a checkpoint write"
            } else {
                ""
            }
        ));
    }
    eprintln!("xtask: crash-test: {kills} kills done; resuming to the end");
    resumes += has_checkpoint(&crashed) as usize;
    let status = train(&crashed, has_checkpoint(&crashed), &log)?.wait()?;
    if !status.success() {
        bail!("the final resume failed; log: {}", log.display());
    }

    // Compare the end states.
    let final_ref = checkpoint(&reference, steps);
    let final_crashed = checkpoint(&crashed, steps);
    let same_model = same_bytes(
        &final_ref.join("model.mpk"),
        &final_crashed.join("model.mpk"),
    )?;
    let best = |run: &Path| run.join("checkpoints/best/model.mpk");
    let same_best = same_bytes(&best(&reference), &best(&crashed))?;
    let (ref_rows, crashed_rows) = (metric_rows(&reference)?, metric_rows(&crashed)?);
    let same_metrics = ref_rows == crashed_rows;
    let identical = same_model && same_best && same_metrics;
    let report = format!(
        "{kills} SIGKILLs (seed {seed}) into a {steps}-step joint run with a checkpoint every step \
         ({during_write} inside a checkpoint write, {before_first} before the first checkpoint, \
         {finished_early} after the process had exited), {} resumes.\n\n\
         - final model.mpk (step {steps}) byte-identical to the uninterrupted run: {same_model}\n\
         - best/model.mpk byte-identical: {same_best}\n\
         - metrics.jsonl rows identical (all {} rows, `tokens_per_s` excepted): {same_metrics}\n\
         - verdict: {}\n\n\
         | kill | after | run | latest checkpoint after the kill | note |\n|---|---|---|---|---|\n{}\n",
        resumes,
        ref_rows.len(),
        if identical { "IDENTICAL" } else { "DIFFERENT" },
        lines.join("\n")
    );
    std::fs::write(out.join("report.md"), &report)?;
    if !identical {
        bail!("crash test: the resumed run differs from the uninterrupted one\n{report}");
    }
    Ok(report)
}
