//! `chorus calibrate`: η of the threshold rule on the validation split, saved next to the model.

use std::path::Path;

use anyhow::Result;
use burn::prelude::*;
use chorus_data::{Split, fetch::cache_dir, load_examples};
use chorus_model::{Assistant, Chorus, DECODING_FILE};
use chorus_train::{DataConfig, Encoded, TokenBatch, encode_examples, load_task_examples};

/// `chorus calibrate`: η for the threshold rule on the validation split, saved next to the model.
pub fn run<B: Backend>(
    model_dir: &Path,
    max_examples: usize,
    data: Option<DataConfig>,
    device: &B::Device,
) -> Result<()> {
    let saved = Chorus::<B>::load(model_dir, device)?;
    let remotes =
        crate::generate::connect_remotes(&saved.model, &saved.manifest.sources, &saved.tokenizer)?;
    let servers: Vec<&dyn Assistant<B>> = remotes.iter().map(|r| r as &dyn Assistant<B>).collect();
    let (model, tokenizer) = (saved.model, saved.tokenizer);
    let data = data.unwrap_or_default();
    let all = load_examples(&data.cache.clone().unwrap_or_else(cache_dir))?;
    let examples = load_task_examples(&all, &data, Split::Valid, max_examples)?;
    let encoded = encode_examples(&examples, &tokenizer, &data.eos_token, data.max_seq_len)?;
    // Remote assistants score each batch on their server (no score cache covers this split).
    let batches = encoded
        .chunks(data.batch_size.max(1))
        .map(|chunk| {
            let rows: Vec<&Encoded> = chunk.iter().collect();
            let batch = TokenBatch::new(&rows).to_device::<B>(device);
            if servers.is_empty() {
                Ok(batch)
            } else {
                model.with_assistant_log_probs(batch, &servers)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let calibration = model.calibrate_eta(batches)?;
    println!(
        "| quantile of π* | η | valid NLL/token (hard routing) | deferral |\n|---|---|---|---|"
    );
    for c in &calibration.candidates {
        println!(
            "| {} | {:.4} | {:.4} | {:.1} % |{}",
            match c.quantile {
                Some(q) => format!("{q:.2}"),
                None if c.eta == 0.0 => "always defer".into(),
                None => "never defer".into(),
            },
            c.eta,
            c.nll,
            100.0 * c.deferral,
            if c.eta == calibration.eta {
                " ← chosen"
            } else {
                ""
            }
        );
    }
    calibration.save(model_dir)?;
    println!(
        "η = {:.4} on {} validation tokens; saved to {}",
        calibration.eta,
        calibration.tokens,
        model_dir.join(DECODING_FILE).display()
    );
    Ok(())
}
