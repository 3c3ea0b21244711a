//! Co-LLM's scoring step: frozen assistants' per-token log-probs, computed once and memory-mapped.
//!
//! A cache directory holds `scores.json` (assistant count, a fingerprint of the examples and the
//! assistants, per-example offsets) and `scores.f32` (little-endian f32, example-major, then
//! position, then assistant). The fingerprint is checked on open, so a cache never silently serves
//! other data or other models.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use chorus_elbo::token_log_probs;
use chorus_lm::{Lm, LmInput};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::batch::hash_str;
use crate::{Encoded, TokenBatch, TrainError};

const INDEX: &str = "scores.json";
const DATA: &str = "scores.f32";

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    n_assistants: usize,
    fingerprint: String,
    /// Start of each example, in f32 values.
    offsets: Vec<u64>,
    /// Scored positions (input length) of each example.
    lengths: Vec<usize>,
}

/// Read-only, memory-mapped assistant log-probs.
#[derive(Debug)]
pub struct ScoreCache {
    dir: PathBuf,
    index: Index,
    data: Mmap,
}

/// Fingerprint of (examples, assistants): a hash of every token id and of the assistants' ids.
pub fn fingerprint(examples: &[Encoded], assistants: &[String]) -> String {
    let mut text = String::new();
    for a in assistants {
        text.push_str(a);
        text.push('\n');
    }
    let mut h = hash_str(&text);
    for e in examples {
        for &t in &e.tokens {
            h = hash_str(&format!("{h:x}:{t}"));
        }
        h = hash_str(&format!("{h:x}|{}", e.context_len));
    }
    format!("{h:016x}-{}", examples.len())
}

impl ScoreCache {
    /// Opens a cache and checks it was computed for exactly these examples and assistants.
    pub fn open(dir: &Path, expected_fingerprint: &str) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::ScoreCache {
            path: dir.to_path_buf(),
            reason,
        };
        let index_path = dir.join(INDEX);
        if !index_path.is_file() {
            // The index is written last: without it the cache is incomplete (or was never made).
            return Err(bad(format!(
                "no {INDEX}: the cache is incomplete or was never written; run `chorus score`"
            )));
        }
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| TrainError::io(&index_path, e))?;
        let index: Index = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{INDEX} is not a score index: {e}")))?;
        if index.fingerprint != expected_fingerprint {
            return Err(bad(format!(
                "scored for other examples or assistants (fingerprint {} ≠ {expected_fingerprint}): rerun `chorus score`",
                index.fingerprint
            )));
        }
        let data_path = dir.join(DATA);
        let file = std::fs::File::open(&data_path).map_err(|e| TrainError::io(&data_path, e))?;
        // SAFETY: the file is only ever written to a temporary name and renamed into place, so no
        // writer modifies it while it is mapped.
        let data = unsafe { Mmap::map(&file) }.map_err(|e| TrainError::io(&data_path, e))?;
        // Every example's span must lie inside the data file (checked arithmetic: the index may
        // be corrupt).
        if index.n_assistants == 0 || index.offsets.len() != index.lengths.len() {
            return Err(bad(format!(
                "{INDEX} is corrupt: {} assistants, {} offsets for {} examples",
                index.n_assistants,
                index.offsets.len(),
                index.lengths.len()
            )));
        }
        let values = |l: usize| (l as u64).checked_mul(index.n_assistants as u64);
        let expected = index
            .lengths
            .iter()
            .try_fold(0u64, |sum, &l| sum.checked_add(values(l)?))
            .and_then(|v| v.checked_mul(4));
        if expected != Some(data.len() as u64) {
            return Err(bad(format!(
                "{DATA} has {} bytes, the index describes {} (truncated?)",
                data.len(),
                expected.map_or("more than 2^64".into(), |b| b.to_string())
            )));
        }
        let total = data.len() as u64 / 4;
        for (i, (&offset, &len)) in index.offsets.iter().zip(&index.lengths).enumerate() {
            let end = values(len).and_then(|v| v.checked_add(offset));
            if end.is_none_or(|end| end > total) {
                return Err(bad(format!(
                    "{INDEX} is corrupt: example {i} (offset {offset}, {len} positions) lies outside {DATA}"
                )));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            data,
        })
    }

    /// The cache directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Assistants per position.
    pub fn n_assistants(&self) -> usize {
        self.index.n_assistants
    }

    /// Example `id`'s log-probs, `[input_len, n_assistants]` row-major.
    pub fn example(&self, id: usize) -> Result<Vec<f32>, TrainError> {
        let (Some(&offset), Some(&len)) = (self.index.offsets.get(id), self.index.lengths.get(id))
        else {
            return Err(TrainError::ScoreCache {
                path: self.dir.clone(),
                reason: format!(
                    "no example {id} (the cache holds {})",
                    self.index.lengths.len()
                ),
            });
        };
        let start = offset as usize * 4;
        let end = start + len * self.index.n_assistants * 4;
        Ok(self.data[start..end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Runs each assistant once over `examples` (batches of `batch_size`) and writes their log-probs of
/// every next token to `dir` (atomically: temp files, then rename).
pub fn score_assistants<B: Backend>(
    assistants: &[Lm<B>],
    examples: &[Encoded],
    fingerprint: &str,
    batch_size: usize,
    dir: &Path,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let k = assistants.len();
    let data_tmp = dir.join(format!("{DATA}.tmp"));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&data_tmp).map_err(|e| TrainError::io(&data_tmp, e))?,
    );
    let mut offsets = Vec::with_capacity(examples.len());
    let mut lengths = Vec::with_capacity(examples.len());
    let mut offset = 0u64;
    for (b, chunk) in examples.chunks(batch_size.max(1)).enumerate() {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = TokenBatch::new(&refs).to_device::<B>(device);
        let columns: Vec<Vec<f32>> = assistants
            .iter()
            .map(|lm| {
                let input = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
                let logits = lm.forward(input, None)?.logits;
                let lp = token_log_probs(logits, batch.targets.clone());
                Ok(lp
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32 data"))
            })
            .collect::<Result<_, TrainError>>()?;
        let seq = batch.tokens.dims()[1];
        for (r, e) in chunk.iter().enumerate() {
            let len = e.input_len();
            for t in 0..len {
                for column in &columns {
                    out.write_all(&column[r * seq + t].to_le_bytes())
                        .map_err(|e| TrainError::io(&data_tmp, e))?;
                }
            }
            offsets.push(offset);
            lengths.push(len);
            offset += (len * k) as u64;
        }
        progress((b + 1) * batch_size.max(1));
    }
    out.flush().map_err(|e| TrainError::io(&data_tmp, e))?;
    drop(out);
    let index = Index {
        n_assistants: k,
        fingerprint: fingerprint.to_string(),
        offsets,
        lengths,
    };
    let index_tmp = dir.join(format!("{INDEX}.tmp"));
    std::fs::write(
        &index_tmp,
        serde_json::to_string(&index).expect("serializes"),
    )
    .map_err(|e| TrainError::io(&index_tmp, e))?;
    // Data first: an index is only ever next to the data it describes.
    let _ = std::fs::remove_file(dir.join(INDEX));
    std::fs::rename(&data_tmp, dir.join(DATA)).map_err(|e| TrainError::io(dir.join(DATA), e))?;
    std::fs::rename(&index_tmp, dir.join(INDEX)).map_err(|e| TrainError::io(dir.join(INDEX), e))?;
    Ok(())
}
