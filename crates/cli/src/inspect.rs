//! `chorus inspect`: what a checkpoint, Hugging Face directory or GGUF file holds.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use chorus_lm::{GgufFile, GgufValue, Lm, LmConfig, Tokenizer};

pub fn run<B: Backend>(path: &Path, device: &B::Device) -> Result<()> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return gguf::<B>(path, device);
    }
    if path.join("chorus.json").is_file() {
        return joint::<B>(path, device);
    }
    if !path.is_dir() {
        bail!(
            "{}: expected a .gguf file or a model directory",
            path.display()
        );
    }
    let config = path.join(chorus_lm::CONFIG_FILE);
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", config.display()))?;
    let (kind, model) = if raw.get("family").is_some() {
        ("chorus checkpoint", Lm::<B>::load(path, device)?)
    } else {
        (
            "Hugging Face directory",
            Lm::<B>::from_hf_dir(path, device)?,
        )
    };
    println!("{:<14}{} ({kind})", "path", path.display());
    describe(&model.config(), model.num_params());
    println!("{:<14}F32 (as loaded)", "dtypes");
    let tokenizer = path.join("tokenizer.json");
    if tokenizer.is_file() {
        let t = Tokenizer::from_file(&tokenizer)?;
        println!(
            "{:<14}{} tokens ({})",
            "tokenizer",
            t.vocab_size(),
            tokenizer.display()
        );
    } else {
        println!("{:<14}none in the directory", "tokenizer");
    }
    Ok(())
}

/// A joint-model checkpoint: its models, the chorus switches, parameter counts and training state.
fn joint<B: Backend>(path: &Path, device: &B::Device) -> Result<()> {
    let (saved, state) = chorus_train::load_chorus::<B>(path, device)?;
    let chorus_model::SavedChorus {
        model,
        manifest,
        tokenizer,
    } = saved;
    println!("{:<14}{} (chorus joint checkpoint)", "path", path.display());
    let roles = std::iter::once(("base", &model.base))
        .chain(model.assistants.iter().map(|a| ("assistant", a)));
    for (i, (role, lm)) in roles.enumerate() {
        let source = manifest.sources.get(i).map_or("", String::as_str);
        println!("\nmodel {i} ({role}) from {source}");
        describe(&lm.config(), lm.num_params());
    }
    let total = Module::num_params(&model);
    let members: usize = model.base.num_params()
        + model
            .assistants
            .iter()
            .map(|a| a.num_params())
            .sum::<usize>();
    println!();
    println!(
        "{:<14}{}",
        "chorus",
        serde_json::to_string(&manifest.chorus)?
    );
    println!(
        "{:<14}{total} total, {} in latent/selector/adapters",
        "parameters",
        total - members
    );
    println!(
        "{:<14}{} tokens ({})",
        "tokenizer",
        tokenizer.vocab_size(),
        tokenizer.source()
    );
    println!(
        "{:<14}step {} of {}, seed {}, {} target tokens seen",
        "training", state.step, state.total_steps, state.seed, state.tokens_seen
    );
    if let Some((step, nll)) = state.best {
        println!("{:<14}valid NLL/token {nll:.4} at step {step}", "best");
    }
    if let Some(nll) = state.valid_nll {
        println!("{:<14}valid NLL/token {nll:.4} at this step", "validation");
    }
    match chorus_model::EtaCalibration::load(path)? {
        Some(c) => println!(
            "{:<14}η = {:.4} (calibrated on {} validation tokens)",
            "decoding", c.eta, c.tokens
        ),
        None if model.n_models() > 1 => {
            println!(
                "{:<14}η not calibrated (run `chorus calibrate`)",
                "decoding"
            )
        }
        None => {}
    }
    Ok(())
}

fn describe(config: &LmConfig, params: usize) {
    let d = config.dims();
    let (family, extra) = match config {
        LmConfig::Llama(c) => (
            "llama",
            format!(
                "{} heads / {} kv heads, d_ff {}, RoPE θ {}, RMSNorm ε {:e}, tied embeddings {}",
                c.n_heads, c.n_kv_heads, c.d_ff, c.rope_theta, c.norm_eps, c.tie_embeddings
            ),
        ),
        LmConfig::Gpt2(c) => (
            "gpt2",
            format!(
                "{} heads, d_ff {}, LayerNorm ε {:e}, tied embeddings {}",
                c.n_heads, c.d_ff, c.norm_eps, c.tie_embeddings
            ),
        ),
    };
    println!(
        "{:<14}{family}: {} layers, d_model {}, vocab {}",
        "architecture", d.n_layers, d.d_model, d.vocab_size
    );
    println!("{:<14}{extra}", "");
    println!("{:<14}{} tokens", "context", d.max_seq_len);
    println!(
        "{:<14}{} ({:.1} M)",
        "parameters",
        params,
        params as f64 / 1e6
    );
}

fn gguf<B: Backend>(path: &Path, device: &B::Device) -> Result<()> {
    let file = GgufFile::open(path)?;
    println!("{:<14}{} (GGUF v{})", "path", path.display(), file.version);
    if let Ok(name) = file.get_str("general.name") {
        println!("{:<14}{name}", "name");
    }
    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &file.tensors {
        let entry = dtypes.entry(t.dtype.name()).or_default();
        entry.0 += 1;
        entry.1 += t.n_elements();
    }
    let config = chorus_lm::llama_config_from_gguf(&file)?;
    let params: u64 = file.tensors.iter().map(|t| t.n_elements()).sum();
    describe(&LmConfig::Llama(config), params as usize);
    let listed: Vec<String> = dtypes
        .iter()
        .map(|(k, (n, elems))| format!("{k} × {n} tensors ({:.1} M values)", *elems as f64 / 1e6))
        .collect();
    println!("{:<14}{}", "dtypes", listed.join(", "));
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let merges = file
        .get_strings("tokenizer.ggml.merges")
        .map_or(0, |m| m.len());
    let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
    println!(
        "{:<14}byte-level BPE, {} tokens, {merges} merges, pre-tokenizer `{pre}`",
        "tokenizer",
        tokenizer.vocab_size()
    );
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        if let Ok(GgufValue::Uint(id)) = file.get(key) {
            let token = tokenizer.decode(&[*id as u32]).unwrap_or_default();
            println!(
                "{:<14}{id} {token:?}",
                key.trim_start_matches("tokenizer.ggml.")
            );
        }
    }
    match tokenizer.chat_template() {
        Some(t) => println!("{:<14}{} characters (Jinja)", "chat template", t.len()),
        None => println!("{:<14}none", "chat template"),
    }
    // Loading proves the tensors map onto chorus's llama.
    let model = Lm::<B>::from_gguf(&file, device)?;
    println!(
        "{:<14}loads into chorus ({} parameters after dequantisation)",
        "check",
        model.num_params()
    );
    Ok(())
}
