//! Co-LLM's scoring step: frozen assistants' per-token log-probs, computed once and memory-mapped.
//!
//! A cache directory holds `scores.json` (assistant count, a fingerprint of the examples and the
//! assistants, per-example offsets) and `scores.f32` (little-endian f32, example-major, then
//! position, then assistant). The fingerprint is checked on open, so a cache never silently serves
//! other data or other models.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use chorus_model::{Assistant, ScoreRows};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomically;
use crate::{Encoded, TokenBatch, TrainError};
use chorus_data::rng::stable_hash;

const INDEX: &str = "scores.json";
const DATA: &str = "scores.f32";
/// A cache being written: the examples scored so far and their values.
const PARTIAL: &str = "scores.partial.json";
const DATA_PARTIAL: &str = "scores.f32.partial";
/// Held (an advisory lock, released when its writer exits, even by a crash) while a writer fills
/// the cache, so that concurrent writers of one directory take turns.
const LOCK: &str = "scores.lock";

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
    let mut h = stable_hash(&text);
    for e in examples {
        for &t in &e.tokens {
            h = stable_hash(&format!("{h:x}:{t}"));
        }
        h = stable_hash(&format!("{h:x}|{}", e.context_len));
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
            return Err(bad(match read_partial(&dir.join(PARTIAL)) {
                Some(partial) => format!(
                    "incomplete: scoring stopped after {} examples; rerun `chorus score` to complete it",
                    partial.lengths.len()
                ),
                None => format!(
                    "no {INDEX}: the cache is incomplete or was never written; run `chorus score`"
                ),
            }));
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
/// every next token to `dir`. Resumable: after each batch the scored examples are synced to
/// `scores.f32.partial` and listed in `scores.partial.json`, so a run that stops (a server that
/// fails, an interrupt) continues where it stopped when rerun with the same examples and
/// assistants; the cache becomes readable ([`ScoreCache::open`]) only when complete. A complete
/// cache for the same fingerprint is left as it is.
#[allow(clippy::too_many_arguments)]
pub fn score_assistants<B: Backend>(
    assistants: &[&dyn Assistant<B>],
    examples: &[Encoded],
    fingerprint: &str,
    batch_size: usize,
    dir: &Path,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    // Two writers of one directory used to interleave their truncations and renames and leave
    // a complete-looking cache of zeros; now the second waits and then finds the cache done.
    let lock_path = dir.join(LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| TrainError::io(&lock_path, e))?;
    lock.lock().map_err(|e| TrainError::io(&lock_path, e))?;
    let k = assistants.len();
    if ScoreCache::open(dir, fingerprint).is_ok_and(|c| c.n_assistants() == k) {
        progress(examples.len());
        return Ok(());
    }
    let partial_path = dir.join(PARTIAL);
    let data_partial = dir.join(DATA_PARTIAL);
    let mut index = read_partial(&partial_path)
        .filter(|p| p.fingerprint == fingerprint && p.n_assistants == k)
        .unwrap_or(Index {
            n_assistants: k,
            fingerprint: fingerprint.to_string(),
            offsets: Vec::new(),
            lengths: Vec::new(),
        });
    let mut offset: u64 = index
        .offsets
        .last()
        .zip(index.lengths.last())
        .map_or(0, |(&o, &l)| o + (l * k) as u64);
    // Keep exactly the listed examples' values: a tail written after the last listing goes.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&data_partial)
        .map_err(|e| TrainError::io(&data_partial, e))?;
    file.set_len(offset * 4)
        .map_err(|e| TrainError::io(&data_partial, e))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| TrainError::io(&data_partial, e))?;
    let start = index.lengths.len().min(examples.len());
    progress(start);
    for chunk in examples[start..].chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = TokenBatch::new(&refs).to_device::<B>(device);
        let rows = ScoreRows {
            tokens: batch.tokens.clone(),
            targets: batch.targets.clone(),
            padding: batch.padding.clone(),
        };
        let columns: Vec<Vec<f32>> = assistants
            .iter()
            .map(|a| {
                let lp = a.token_log_probs(&rows, None)?;
                Ok(lp
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32 data"))
            })
            .collect::<Result<_, TrainError>>()?;
        let seq = batch.tokens.dims()[1];
        let mut bytes = Vec::new();
        for (r, e) in chunk.iter().enumerate() {
            let len = e.input_len();
            for t in 0..len {
                for column in &columns {
                    bytes.extend_from_slice(&column[r * seq + t].to_le_bytes());
                }
            }
            index.offsets.push(offset);
            index.lengths.push(len);
            offset += (len * k) as u64;
        }
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| TrainError::io(&data_partial, e))?;
        // The listing follows the data it describes.
        write_atomically(
            &partial_path,
            &serde_json::to_string(&index).expect("serializes"),
        )?;
        progress(index.lengths.len());
    }
    drop(file);
    // Complete: the data under its final name first, then the index that makes it readable.
    let _ = std::fs::remove_file(dir.join(INDEX));
    std::fs::rename(&data_partial, dir.join(DATA))
        .map_err(|e| TrainError::io(dir.join(DATA), e))?;
    write_atomically(
        &dir.join(INDEX),
        &serde_json::to_string(&index).expect("serializes"),
    )?;
    std::fs::remove_file(&partial_path).map_err(|e| TrainError::io(&partial_path, e))?;
    Ok(())
}

/// The listing of a half-written cache, if there is a readable one.
fn read_partial(path: &Path) -> Option<Index> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
