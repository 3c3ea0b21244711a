//! `chorus`: train, evaluate and inspect collaborative language models.

mod device;

use std::path::PathBuf;

use anyhow::{Context, Result};
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
enum Command {
    /// Print a checkpoint's architecture, shapes and parameter count.
    ///
    /// Example: chorus inspect runs/base/checkpoint
    Inspect {
        /// A chorus checkpoint directory (config.json + model.safetensors).
        path: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { path } => {
            with_backend!(cli.device, |B, device| inspect::<B>(&path, &device))
        }
    }
}

fn inspect<B: burn::tensor::backend::Backend>(
    path: &std::path::Path,
    device: &B::Device,
) -> Result<()> {
    let model = chorus_lm::Lm::<B>::load(path, device)
        .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let config = model.config();
    let dims = config.dims();
    println!("checkpoint   {}", path.display());
    println!("config       {}", serde_json::to_string(&config)?);
    println!(
        "shape        vocab {} · d_model {} · {} layers · {} kv heads × {} · context {}",
        dims.vocab_size,
        dims.d_model,
        dims.n_layers,
        dims.n_kv_heads,
        dims.head_dim,
        dims.max_seq_len
    );
    println!("parameters   {}", model.num_params());
    Ok(())
}
