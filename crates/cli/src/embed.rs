//! `chorus embed`: sentence embeddings from a BERT encoder, as JSON.

use std::path::Path;

use anyhow::Result;
use burn::prelude::*;
use chorus_lm::{Bert, Tokenizer};

pub fn run<B: Backend>(encoder: &Path, texts: &[String], device: &B::Device) -> Result<()> {
    let model = Bert::<B>::from_hf_dir(encoder, device)?;
    let tokenizer = Tokenizer::from_file(encoder.join("tokenizer.json"))?;
    let mut out = Vec::new();
    for text in texts {
        let ids = tokenizer.encode_with_special_tokens(text)?;
        let n = ids.len();
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
            device,
        );
        let hidden = model.forward(tokens, None)?; // [1, n, d]
        let pooled = hidden.mean_dim(1).reshape([model.d_model]);
        let norm = pooled.clone().powf_scalar(2.0).sum().sqrt();
        let embedding = (pooled / norm)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32");
        out.push(serde_json::json!({ "text": text, "tokens": ids, "embedding": embedding }));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
