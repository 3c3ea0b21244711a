//! From task examples to padded, length-bucketed batches.
//!
//! Row layout (one example): `[EOS] c₁ … c_m x₁ … x_n [EOS]`, read teacher-forced: position t reads
//! `row[t]` and predicts `row[t + 1]`. Context positions `1..=m` feed the prior; targets are scored
//! from position `m` on (the first x token is predicted from the last context token, or from the
//! leading EOS when the context is empty). The leading EOS marks the start of a text, as in GPT-2.

use burn::prelude::*;
use chorus_data::rng::{SplitMix64, stable_hash};
use chorus_data::{Example, Split, Task};
use chorus_lm::Tokenizer;
use chorus_model::ChorusBatch;

use crate::{DataConfig, ScoreCache, TrainError};

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Its task.
    pub task: Task,
    /// `[EOS] c x [EOS]` (the final EOS is dropped when x was truncated).
    pub tokens: Vec<u32>,
    /// m, the number of context tokens (after truncation).
    pub context_len: usize,
    /// UTF-8 bytes of the scored target text: x without its closing EOS, or the part of x kept
    /// when it was truncated (for bits per byte, a scale shared by every tokenizer).
    pub target_bytes: usize,
}

impl Encoded {
    /// Input positions of the row (`tokens.len() − 1`).
    pub fn input_len(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Scored target tokens (x and its EOS).
    pub fn n_targets(&self) -> usize {
        self.tokens.len() - 1 - self.context_len
    }

    /// The positions whose next token is a target (`m .. len − 1`; position t predicts
    /// `tokens[t + 1]`), the ones a batch's target mask covers.
    pub fn target_positions(&self) -> std::ops::Range<usize> {
        self.context_len..self.tokens.len() - 1
    }
}

/// Fisher–Yates.
fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.index(i + 1);
        items.swap(i, j);
    }
}

/// The examples of `split` for the configured tasks, at most `limit` per task (0 = all), chosen
/// by a fixed hash of (document, position) so the subset is the same on every run and machine.
/// A task without any example in the split is an error.
pub fn load_task_examples(
    all: &[Example],
    config: &DataConfig,
    split: Split,
    limit: usize,
) -> Result<Vec<Example>, TrainError> {
    let mut out = Vec::new();
    for task in &config.tasks {
        let mut chosen: Vec<(u64, &Example)> = all
            .iter()
            .filter(|e| e.task == *task && e.split == split)
            .enumerate()
            .map(|(i, e)| (stable_hash(&format!("{}#{i}", e.document)), e))
            .collect();
        if chosen.is_empty() {
            return Err(TrainError::EmptyData {
                data: format!("task {task}, {split:?} split"),
                reason: "no examples (is the corpus fetched? run `chorus data fetch`)".into(),
            });
        }
        if limit > 0 && chosen.len() > limit {
            chosen.sort_by_key(|(h, _)| *h);
            chosen.truncate(limit);
        }
        out.extend(chosen.into_iter().map(|(_, e)| e.clone()));
    }
    Ok(out)
}

/// Tokenises examples into rows of at most `max_seq_len` input positions. Over-long rows keep the
/// target whole when they can (cutting the context from the left, keeping its most recent tokens)
/// but always keep at least a quarter of the budget for context when there is one; the target is
/// cut from the right only when it alone is too long (and then loses its final EOS).
pub fn encode_examples(
    examples: &[Example],
    tokenizer: &Tokenizer,
    eos_token: &str,
    max_seq_len: usize,
) -> Result<Vec<Encoded>, TrainError> {
    let eos = tokenizer
        .token_to_id(eos_token)
        .ok_or_else(|| TrainError::Config {
            file: tokenizer.source().to_string(),
            reason: format!("the tokenizer has no token {eos_token:?} (data.eos_token)"),
        })?;
    if max_seq_len < 4 {
        return Err(TrainError::Config {
            file: "data.max_seq_len".into(),
            reason: format!("{max_seq_len} is too short"),
        });
    }
    let budget = max_seq_len; // tokens besides the leading EOS (inputs = budget)
    examples
        .iter()
        .map(|e| {
            let context = tokenizer.encode(&e.context)?;
            let mut target = tokenizer.encode(&e.target)?;
            target.push(eos);
            let (lc, lx) = (context.len(), target.len());
            let (keep_c, keep_x) = if lc + lx <= budget {
                (lc, lx)
            } else {
                let min_c = lc.min(budget / 4);
                let keep_x = lx.min(budget - min_c);
                (lc.min(budget - keep_x), keep_x)
            };
            let target_bytes = if keep_x == lx {
                e.target.len()
            } else {
                tokenizer.decode(&target[..keep_x])?.len()
            };
            let mut tokens = Vec::with_capacity(1 + keep_c + keep_x);
            tokens.push(eos);
            tokens.extend_from_slice(&context[lc - keep_c..]);
            tokens.extend_from_slice(&target[..keep_x]);
            Ok(Encoded {
                task: e.task,
                tokens,
                context_len: keep_c,
                target_bytes,
            })
        })
        .collect()
}

/// The batches of one epoch as lists of example indices: shuffle (seeded by `seed` and `epoch`),
/// sort windows of 50 batches by length so rows of a batch pad little, then shuffle the batches.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch_size * 50) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

/// A padded batch on the host, ready to become a [`ChorusBatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Rows.
    pub rows: usize,
    /// Positions per row (the longest input in the batch).
    pub seq: usize,
    /// `[rows · seq]` input ids (0 at padding).
    pub tokens: Vec<i64>,
    /// `[rows · seq]` next-token ids (0 at padding).
    pub targets: Vec<i64>,
    /// `[rows · seq]` 1 where the target is a scored token of x.
    pub target_mask: Vec<f32>,
    /// `[rows · seq]` 1 where the input is a context token.
    pub context_mask: Vec<f32>,
    /// `[rows · seq]` true at padding.
    pub padding: Vec<bool>,
    /// `[rows · seq · n_assistants]` cached assistant log-probs, when scored.
    pub assistant_log_probs: Option<(Vec<f32>, usize)>,
}

impl TokenBatch {
    /// Pads `examples` into one batch.
    pub fn new(examples: &[&Encoded]) -> Self {
        let rows = examples.len();
        let seq = examples.iter().map(|e| e.input_len()).max().unwrap_or(0);
        let n = rows * seq;
        let mut b = Self {
            rows,
            seq,
            tokens: vec![0; n],
            targets: vec![0; n],
            target_mask: vec![0.0; n],
            context_mask: vec![0.0; n],
            padding: vec![true; n],
            assistant_log_probs: None,
        };
        for (r, e) in examples.iter().enumerate() {
            for t in 0..e.input_len() {
                let i = r * seq + t;
                b.tokens[i] = e.tokens[t] as i64;
                b.targets[i] = e.tokens[t + 1] as i64;
                b.padding[i] = false;
                if t >= e.context_len {
                    b.target_mask[i] = 1.0;
                }
                if (1..=e.context_len).contains(&t) {
                    b.context_mask[i] = 1.0;
                }
            }
        }
        b
    }

    /// Fills [`TokenBatch::assistant_log_probs`] for examples `ids` of `scores`.
    pub fn with_scores(mut self, scores: &ScoreCache, ids: &[usize]) -> Result<Self, TrainError> {
        let k = scores.n_assistants();
        let mut out = vec![0f32; self.rows * self.seq * k];
        for (r, &id) in ids.iter().enumerate() {
            let values = scores.example(id)?;
            let len = values.len() / k;
            if len > self.seq {
                return Err(TrainError::ScoreCache {
                    path: scores.path().to_path_buf(),
                    reason: format!(
                        "example {id} has {len} scored positions, batch has {}",
                        self.seq
                    ),
                });
            }
            out[r * self.seq * k..(r * self.seq + len) * k].copy_from_slice(&values);
        }
        self.assistant_log_probs = Some((out, k));
        Ok(self)
    }

    /// Scored tokens in the batch.
    pub fn n_targets(&self) -> usize {
        self.target_mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// The batch as tensors on `device`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> ChorusBatch<B> {
        let shape = [self.rows, self.seq];
        let int =
            |v: &[i64]| Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), shape), device);
        let float = |v: &[f32]| {
            Tensor::<B, 2>::from_data(
                TensorData::new(v.to_vec(), shape).convert::<B::FloatElem>(),
                device,
            )
        };
        ChorusBatch {
            tokens: int(&self.tokens),
            targets: int(&self.targets),
            target_mask: float(&self.target_mask),
            context_mask: float(&self.context_mask),
            padding: Tensor::<B, 2, Bool>::from_data(
                TensorData::new(self.padding.clone(), shape),
                device,
            ),
            assistant_log_probs: self.assistant_log_probs.as_ref().map(|(v, k)| {
                Tensor::<B, 3>::from_data(
                    TensorData::new(v.clone(), [self.rows, self.seq, *k]).convert::<B::FloatElem>(),
                    device,
                )
            }),
        }
    }
}
