//! Evaluation (DESIGN §3): importance-weighted NLL/PPL, KL, mutual information, active units and the
//! posterior deferral rate of a joint model, and exact NLL/PPL of a single LM, per task.
//!
//! Token convention (printed with every table): tokens of the shared tokenizer, counting the
//! target's tokens and its closing EOS; the context is read but not scored.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use chorus_data::{Example, Split, Task};
use chorus_elbo::{
    MeanMoments, confidence_routing, mutual_information, posterior_deferral, token_log_probs,
    top1_probability,
};
use chorus_latent::DiagonalGaussian;
use chorus_lm::LmInput;
use chorus_model::{Assistant, Chorus, ChorusBatch, seeded_noise};
use serde::{Deserialize, Serialize};

use crate::{Encoded, Progress, ScoreCache, TokenBatch, TrainError};

/// The token convention of every reported number.
pub const TOKEN_CONVENTION: &str =
    "per target token of the shared tokenizer, the closing EOS included, context not scored";

/// One model on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// The model (e.g. `joint`, `base`, `story expert`).
    pub model: String,
    /// The task.
    pub task: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Target tokens scored.
    pub tokens: usize,
    /// −log p̂(x | c) per token (IW bound for z models, exact otherwise), nats.
    pub nll: f64,
    /// exp(nll).
    pub ppl: f64,
    /// UTF-8 bytes of the scored target text (closing EOS excluded).
    #[serde(default)]
    pub bytes: usize,
    /// Bits per byte: −log₂ p̂ of all scored targets (closing EOS included) over `bytes`, a scale
    /// on which models with different tokenizers compare.
    #[serde(default)]
    pub bits_per_byte: f64,
    /// Mean Σ_d KL(q ‖ p) per example, nats (z models).
    pub kl: Option<f64>,
    /// I_q(x; z), He et al. 2019 estimator, nats (z models).
    pub mi: Option<f64>,
    /// Active units: dimensions with Var_x E_q[z_d] > 0.01 (z models).
    pub active_units: Option<usize>,
    /// Posterior deferral rate: mean over target tokens of 1 − r_t(base), with z = E_q[z] (K ≥ 2);
    /// for a composition, the share of target tokens its rule gives to assistants.
    pub deferral: Option<f64>,
    /// Every example's score, in evaluation order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_example: Vec<ExampleScore>,
    /// The moments of the posterior means behind `active_units`, to merge rows of chunks (z models).
    #[serde(skip)]
    pub posterior_means: Option<MeanMoments>,
}

impl EvalRow {
    /// A row with the NLL (and so PPL) of `tokens` target tokens; the latent and routing columns
    /// start empty.
    fn new(model: &str, task: Task, s: Sums) -> Self {
        Self::of_sums(model, task.name(), s)
    }

    /// [`EvalRow::new`] with the task by name: NLL = −Σ log p / tokens, bits per byte
    /// = −Σ log₂ p / bytes.
    fn of_sums(model: &str, task: &str, s: Sums) -> Self {
        let log_p = s.log_p;
        let nll = -log_p / s.tokens.max(1) as f64;
        Self {
            model: model.to_string(),
            task: task.to_string(),
            examples: s.examples,
            tokens: s.tokens,
            nll,
            ppl: nll.exp(),
            bytes: s.bytes,
            bits_per_byte: -log_p / (std::f64::consts::LN_2 * s.bytes.max(1) as f64),
            kl: None,
            mi: None,
            active_units: None,
            deferral: None,
            per_example: s.per_example,
            posterior_means: None,
        }
    }

    /// Adds `other`, the same model on the same task over further examples (the next chunk of a
    /// text file), whose `per_example` indices are already those of the whole evaluation. Counts,
    /// log-likelihoods and per-example scores add exactly; KL and MI become means over examples
    /// (MI: the mean of the chunks' estimates, as He et al. average per-batch estimates), deferral
    /// a mean over tokens, and active units are recounted from the merged moments.
    pub fn merge(&mut self, other: EvalRow) {
        let (n_a, n_b) = (self.examples as f64, other.examples as f64);
        let (t_a, t_b) = (self.tokens as f64, other.tokens as f64);
        let by_examples = |a: Option<f64>, b: Option<f64>| {
            a.zip(b)
                .map(|(a, b)| (a * n_a + b * n_b) / (n_a + n_b).max(1.0))
        };
        self.kl = by_examples(self.kl, other.kl);
        self.mi = by_examples(self.mi, other.mi);
        self.deferral = self
            .deferral
            .zip(other.deferral)
            .map(|(a, b)| (a * t_a + b * t_b) / (t_a + t_b).max(1.0));
        if let (Some(mine), Some(theirs)) = (&mut self.posterior_means, &other.posterior_means) {
            mine.merge(theirs);
            self.active_units = Some(mine.active_units(ACTIVE_UNIT_THRESHOLD));
        }
        self.per_example.extend(other.per_example);
        let merged = Sums {
            examples: self.examples + other.examples,
            tokens: self.tokens + other.tokens,
            bytes: self.bytes + other.bytes,
            log_p: self.per_example.iter().map(|e| e.log_p).sum(),
            deferred: 0.0,
            per_example: std::mem::take(&mut self.per_example),
        };
        *self = EvalRow {
            kl: self.kl,
            mi: self.mi,
            active_units: self.active_units,
            deferral: self.deferral,
            posterior_means: self.posterior_means.take(),
            ..EvalRow::of_sums(&self.model, &self.task, merged)
        };
    }
}

/// `Var_x E_q[z_d]` above which a dimension counts as an active unit (Burda et al.'s 0.01).
pub const ACTIVE_UNIT_THRESHOLD: f64 = 0.01;

/// Draws of z per example in the mutual-information estimate ([`mutual_information`]).
pub const MI_DRAWS: usize = 16;

/// The rows of an evaluation that runs chunk by chunk ([`EvalRow::merge`]): each chunk's rows
/// join the row of the same model and task, in the order rows first appeared.
#[derive(Debug, Default)]
pub struct ChunkedRows {
    rows: Vec<EvalRow>,
}

impl ChunkedRows {
    /// Adds the rows of one chunk whose first example is example `offset` of the evaluation.
    pub fn add(&mut self, chunk: Vec<EvalRow>, offset: usize) {
        let mut matched = vec![false; self.rows.len()];
        for mut row in chunk {
            for e in &mut row.per_example {
                e.index += offset;
            }
            let same = (0..self.rows.len()).find(|&i| {
                !matched[i] && self.rows[i].model == row.model && self.rows[i].task == row.task
            });
            match same {
                Some(i) => {
                    self.rows[i].merge(row);
                    matched[i] = true;
                }
                None => {
                    self.rows.push(row);
                    matched.push(true);
                }
            }
        }
    }

    /// The merged rows.
    pub fn into_rows(self) -> Vec<EvalRow> {
        self.rows
    }
}

/// Rows plus how they were computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split or text file evaluated.
    pub data: String,
    /// z samples per example for the IW bound.
    pub iw_samples: usize,
    /// What a token is.
    pub token_convention: String,
    /// One row per (model, task).
    pub rows: Vec<EvalRow>,
    /// Per task, the first model against each other one ([`paired_difference`]).
    #[serde(default)]
    pub paired: Vec<PairedDifference>,
}

impl EvalReport {
    /// A report of `rows`, with the first model of each task compared to every other one on the
    /// same examples (`resamples` bootstrap resamples, seeded by `seed`).
    pub fn new(
        data: String,
        iw_samples: usize,
        rows: Vec<EvalRow>,
        resamples: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let mut paired = Vec::new();
        let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
        tasks.sort();
        tasks.dedup();
        for task in tasks {
            let of_task: Vec<&EvalRow> = rows.iter().filter(|r| r.task == task).collect();
            if let Some((first, others)) = of_task.split_first() {
                for other in others {
                    paired.push(paired_difference(first, other, resamples, seed)?);
                }
            }
        }
        Ok(Self {
            data,
            iw_samples,
            token_convention: TOKEN_CONVENTION.to_string(),
            rows,
            paired,
        })
    }

    /// The mean of several evaluations of the same models on the same examples — the seeds of one
    /// training recipe, each evaluated with its rivals: each (model, task) row of the first report
    /// becomes the row whose per-example score is the mean over the reports,
    /// `log p̄_i = (1/R) Σ_r log p̂_r,i`, and so NLL = −Σ_i log p̄_i / Σ_i tokens_i, the mean of the
    /// reports' NLLs. KL, MI and deferral are their means; active units are not averaged (`None`).
    /// The paired comparisons are then those of [`EvalReport::new`] on the mean rows: per task,
    /// the first model against each other one, its Δ the mean over reports of their Δs and its
    /// bootstrap interval that of the seed-mean difference of each example.
    ///
    /// Each source is `(name, report)`; a report that lacks a row of the first, or scores other
    /// examples or tokens, is an error naming both sources.
    pub fn mean_of(
        sources: &[(String, EvalReport)],
        resamples: usize,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let Some(((first_name, first), others)) = sources.split_first() else {
            return Err(TrainError::EmptyData {
                data: "the evaluations to average".into(),
                reason: "none given".into(),
            });
        };
        let mismatch = |name: &str, reason: String| TrainError::Incomparable {
            what: format!("{name} and {first_name}"),
            reason,
        };
        for (name, report) in others {
            if report.data != first.data || report.iw_samples != first.iw_samples {
                return Err(mismatch(
                    name,
                    format!(
                        "evaluated {} with {} IW samples, not {} with {}",
                        report.data, report.iw_samples, first.data, first.iw_samples
                    ),
                ));
            }
        }
        let mut rows = Vec::with_capacity(first.rows.len());
        for row in &first.rows {
            let mut log_p: Vec<f64> = row.per_example.iter().map(|e| e.log_p).collect();
            let (mut kl, mut mi, mut deferral) = (row.kl, row.mi, row.deferral);
            for (name, report) in others {
                let same = report
                    .rows
                    .iter()
                    .find(|r| r.model == row.model && r.task == row.task)
                    .ok_or_else(|| {
                        mismatch(name, format!("no row of {} on {}", row.model, row.task))
                    })?;
                let alike = same.per_example.len() == row.per_example.len()
                    && same.bytes == row.bytes
                    && same
                        .per_example
                        .iter()
                        .zip(&row.per_example)
                        .all(|(a, b)| a.index == b.index && a.tokens == b.tokens);
                if !alike {
                    return Err(mismatch(
                        name,
                        format!(
                            "{} on {} scores other examples or tokens",
                            row.model, row.task
                        ),
                    ));
                }
                for (sum, e) in log_p.iter_mut().zip(&same.per_example) {
                    *sum += e.log_p;
                }
                let add = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a + b);
                kl = add(kl, same.kl);
                mi = add(mi, same.mi);
                deferral = add(deferral, same.deferral);
            }
            let count = sources.len() as f64;
            let per_example: Vec<ExampleScore> = row
                .per_example
                .iter()
                .zip(log_p)
                .map(|(e, sum)| ExampleScore {
                    log_p: sum / count,
                    ..e.clone()
                })
                .collect();
            let sums = Sums {
                examples: row.examples,
                tokens: row.tokens,
                bytes: row.bytes,
                log_p: per_example.iter().map(|e| e.log_p).sum(),
                deferred: 0.0,
                per_example,
            };
            rows.push(EvalRow {
                kl: kl.map(|v| v / count),
                mi: mi.map(|v| v / count),
                deferral: deferral.map(|v| v / count),
                ..EvalRow::of_sums(&row.model, &row.task, sums)
            });
        }
        Self::new(
            format!("{}, mean of {} evaluations", first.data, sources.len()),
            first.iw_samples,
            rows,
            resamples,
            seed,
        )
    }

    /// The paired comparisons as a Markdown table (empty without them).
    pub fn paired_table(&self) -> String {
        let Some(first) = self.paired.first() else {
            return String::new();
        };
        let mut s = format!(
            "Paired, per example (Δ = NLL/token of the first model − the other's; 95 % percentile \
             bootstrap interval over examples, {} resamples):\n\n\
             | task | model | against | examples | Δ NLL/token | 95 % interval |\n|---|---|---|---|---|---|\n",
            first.resamples
        );
        for d in &self.paired {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:+.4} | [{:+.4}, {:+.4}] |\n",
                d.task,
                d.model,
                d.baseline,
                d.examples,
                d.nll_difference,
                d.interval.0,
                d.interval.1
            ));
        }
        s
    }

    /// The rows as a Markdown table.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
        let mut s = String::from(
            "| task | model | examples | tokens | NLL/token | PPL | bits/byte | KL | MI | AU | deferral |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut rows = self.rows.clone();
        rows.sort_by(|a, b| a.task.cmp(&b.task));
        for r in &rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.4} | {:.2} | {:.4} | {} | {} | {} | {} |\n",
                r.task,
                r.model,
                r.examples,
                r.tokens,
                r.nll,
                r.ppl,
                r.bits_per_byte,
                opt(r.kl),
                opt(r.mi),
                r.active_units.map_or("–".to_string(), |a| a.to_string()),
                r.deferral
                    .map_or("–".to_string(), |d| format!("{:.1} %", 100.0 * d)),
            ));
        }
        s
    }
}

/// A paired comparison of two models on the same examples of one task: the difference in NLL per
/// target token, `Δ = Σ_i (nll_a,i − nll_b,i) / Σ_i tokens_i` (negative: `model` is better), with a
/// percentile bootstrap interval over examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// The task.
    pub task: String,
    /// Model a.
    pub model: String,
    /// Model b, the baseline.
    pub baseline: String,
    /// Examples paired.
    pub examples: usize,
    /// Δ on all examples, nats per token.
    pub nll_difference: f64,
    /// The 2.5 % and 97.5 % quantiles of Δ over `resamples` resamplings of the examples with
    /// replacement.
    pub interval: (f64, f64),
    /// Bootstrap resamples.
    pub resamples: usize,
}

/// Compares `a` with the baseline `b` example by example ([`PairedDifference`]); the resampling is
/// seeded by `seed`. Both rows must score the same examples of the same task, with the same tokens.
pub fn paired_difference(
    a: &EvalRow,
    b: &EvalRow,
    resamples: usize,
    seed: u64,
) -> Result<PairedDifference, TrainError> {
    let mismatch = |reason: String| TrainError::Incomparable {
        what: format!("{} and {} on {}", a.model, b.model, a.task),
        reason,
    };
    if a.task != b.task || a.per_example.len() != b.per_example.len() || a.per_example.is_empty() {
        return Err(mismatch(format!(
            "not the same examples: {} of {} against {} of {}",
            a.per_example.len(),
            a.task,
            b.per_example.len(),
            b.task
        )));
    }
    let by_index: BTreeMap<usize, &ExampleScore> =
        b.per_example.iter().map(|e| (e.index, e)).collect();
    // Per example: (nll_a − nll_b, tokens).
    let pairs: Vec<(f64, f64)> = a
        .per_example
        .iter()
        .map(|x| match by_index.get(&x.index) {
            Some(y) if y.tokens == x.tokens => Ok((y.log_p - x.log_p, x.tokens as f64)),
            _ => Err(mismatch(format!(
                "example {} is not scored alike by both",
                x.index
            ))),
        })
        .collect::<Result<_, _>>()?;
    let ratio = |sample: &mut dyn Iterator<Item = &(f64, f64)>| {
        let (d, t) = sample.fold((0.0, 0.0), |(d, t), (dd, tt)| (d + dd, t + tt));
        d / t.max(1.0)
    };
    let n = pairs.len();
    let mut rng = chorus_data::rng::SplitMix64(seed);
    let mut deltas: Vec<f64> = (0..resamples.max(1))
        .map(|_| ratio(&mut (0..n).map(|_| &pairs[rng.index(n)])))
        .collect();
    deltas.sort_by(f64::total_cmp);
    let quantile = |q: f64| deltas[((q * (deltas.len() - 1) as f64).round()) as usize];
    Ok(PairedDifference {
        task: a.task.clone(),
        model: a.model.clone(),
        baseline: b.model.clone(),
        examples: n,
        nll_difference: ratio(&mut pairs.iter()),
        interval: (quantile(0.025), quantile(0.975)),
        resamples: resamples.max(1),
    })
}

/// A plain-text file evaluated as open-ended passages ([`chorus_data::tasks::TextFilePassages`]:
/// its sentences in passages of four, alternately with an empty and a first-sentence context),
/// read in chunks so that memory holds one chunk of passages, not the file.
pub struct TextFile {
    path: std::path::PathBuf,
    passages: usize,
}

impl TextFile {
    /// Opens `path` and counts its passages (one streaming pass); a missing, unreadable or too
    /// short file is an error naming it.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let mut passages = 0;
        for passage in chorus_data::tasks::TextFilePassages::open(path)? {
            passage?;
            passages += 1;
        }
        if passages == 0 {
            return Err(TrainError::EmptyData {
                data: path.display().to_string(),
                reason: format!(
                    "fewer than {} sentences",
                    chorus_data::tasks::OPEN_PASSAGE_SENTENCES
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            passages,
        })
    }

    /// Passages in the file.
    pub fn passages(&self) -> usize {
        self.passages
    }

    /// The first `limit` passages (all: `None`) as test examples, `size` at a time.
    pub fn chunks(
        self,
        size: usize,
        limit: Option<usize>,
    ) -> Result<impl Iterator<Item = Result<Vec<Example>, TrainError>>, TrainError> {
        let mut passages = chorus_data::tasks::TextFilePassages::open(&self.path)?
            .take(limit.unwrap_or(usize::MAX))
            .map(|p| {
                p.map(|e| Example {
                    split: Split::Test,
                    ..e
                })
            });
        let size = size.max(1);
        Ok(std::iter::from_fn(move || {
            let mut chunk = Vec::with_capacity(size);
            for passage in passages.by_ref().take(size) {
                match passage {
                    Ok(e) => chunk.push(e),
                    Err(e) => return Some(Err(e.into())),
                }
            }
            (!chunk.is_empty()).then_some(Ok(chunk))
        }))
    }
}

/// Example indices grouped by task, each group sorted by length (less padding).
fn by_task(data: &[Encoded]) -> BTreeMap<Task, Vec<usize>> {
    let mut groups: BTreeMap<Task, Vec<usize>> = BTreeMap::new();
    for (i, e) in data.iter().enumerate() {
        groups.entry(e.task).or_default().push(i);
    }
    for ids in groups.values_mut() {
        ids.sort_by_key(|&i| data[i].tokens.len());
    }
    groups
}

/// The seed of an example's z draws for the IW bound: a hash of its tokens and of where its
/// target starts, so an example gets the same z whenever and wherever (batch, chunk, file) it is
/// evaluated, and a rerun reproduces its score.
pub(crate) fn iw_seed(example: &Encoded) -> u64 {
    let mut bytes: Vec<u8> = example
        .tokens
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    bytes.extend((example.context_len as u64).to_le_bytes());
    chorus_data::rng::stable_hash_bytes(&bytes)
}

fn batch_of<B: Backend>(
    data: &[Encoded],
    ids: &[usize],
    scores: Option<&ScoreCache>,
    device: &B::Device,
) -> Result<ChorusBatch<B>, TrainError> {
    let refs: Vec<&Encoded> = ids.iter().map(|&i| &data[i]).collect();
    let mut batch = TokenBatch::new(&refs);
    if let Some(scores) = scores {
        batch = batch.with_scores(scores, ids)?;
    }
    Ok(batch.to_device(device))
}

/// Where a joint model's evaluation gets the log-probs of assistants it does not run itself.
#[derive(Clone, Copy)]
pub enum AssistantScores<'a, B: Backend> {
    /// Every assistant is local (and runs), or none is needed.
    Local,
    /// A score cache covering the examples (`chorus score`).
    Cache(&'a ScoreCache),
    /// The model's remote assistants, asked batch by batch.
    Servers(&'a [&'a dyn Assistant<B>]),
}

/// The examples an evaluation reads, the rows per batch and the device.
pub struct EvalSet<'a, B: Backend> {
    /// The examples.
    pub data: &'a [Encoded],
    /// Rows per batch.
    pub batch_size: usize,
    /// Where the batches go.
    pub device: &'a B::Device,
}

impl<B: Backend> EvalSet<'_, B> {
    /// Runs `each(task, example indices)` on every batch of every task, each task's examples
    /// sorted by length (less padding), telling `progress` the examples done (phase
    /// `evaluating <name>`).
    fn for_each_batch(
        &self,
        name: &str,
        progress: &mut dyn Progress,
        mut each: impl FnMut(Task, &[usize]) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        progress.begin(&format!("evaluating {name}"), self.data.len() as u64, 0);
        let mut done = 0;
        for (task, ids) in by_task(self.data) {
            for chunk in ids.chunks(self.batch_size.max(1)) {
                if let Err(e) = each(task, chunk) {
                    progress.end(false);
                    return Err(e);
                }
                done += chunk.len();
                progress.update(done as u64, "");
            }
        }
        progress.end(true);
        Ok(())
    }
}

/// Per-task sums of an evaluation.
#[derive(Default)]
struct Sums {
    examples: usize,
    tokens: usize,
    bytes: usize,
    log_p: f64,
    deferred: f64,
    per_example: Vec<ExampleScore>,
}

impl Sums {
    /// Adds the examples `ids` of `data`, with `log_p` `[ids.len()]` each one's log-likelihood.
    fn add<B: Backend>(&mut self, data: &[Encoded], ids: &[usize], log_p: Tensor<B, 1>) {
        let log_p = log_p
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64 data");
        for (&index, log_p) in ids.iter().zip(log_p) {
            self.add_one(data, index, log_p);
        }
    }

    /// Adds example `index` of `data` with log-likelihood `log_p`.
    fn add_one(&mut self, data: &[Encoded], index: usize, log_p: f64) {
        let e = &data[index];
        self.examples += 1;
        self.tokens += e.n_targets();
        self.bytes += e.target_bytes;
        self.log_p += log_p;
        self.per_example.push(ExampleScore {
            index,
            tokens: e.n_targets(),
            log_p,
        });
    }
}

/// One example's score in an [`EvalRow`], for paired comparisons ([`paired_difference`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleScore {
    /// The example's index in the evaluated data.
    pub index: usize,
    /// Its target tokens.
    pub tokens: usize,
    /// log p̂(x | c), nats.
    pub log_p: f64,
}

/// Per-task sums of a joint model's evaluation: [`Sums`] and the latent's.
struct ChorusSums<B: Backend> {
    sums: Sums,
    kl: f64,
    means: Vec<Tensor<B, 2>>,
    log_vars: Vec<Tensor<B, 2>>,
    /// The examples' z seeds ([`iw_seed`]), in the order of `means`.
    seeds: Vec<u64>,
}

impl<B: Backend> Default for ChorusSums<B> {
    fn default() -> Self {
        Self {
            sums: Sums::default(),
            kl: 0.0,
            means: Vec::new(),
            log_vars: Vec::new(),
            seeds: Vec::new(),
        }
    }
}

/// The router posterior `r_t(j)` (at z = E q) of every target token of every evaluated example,
/// by example index: one `[K]` row per target token, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterRecord {
    /// Example index → per target token, `r_t(0..K)`.
    pub by_example: BTreeMap<usize, Vec<Vec<f64>>>,
}

/// Evaluates a joint model per task: IW-NLL with `iw_samples` z from q (each example's drawn from
/// its own seed, [`iw_seed`]: reruns reproduce), and, when z is on, KL, MI and
/// AU; with K ≥ 2, the posterior deferral rate, and, given `routing`, every target token's router
/// posterior.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_chorus<B: Backend>(
    model: &Chorus<B>,
    name: &str,
    set: &EvalSet<'_, B>,
    assistants: AssistantScores<'_, B>,
    iw_samples: usize,
    progress: &mut dyn Progress,
    mut routing: Option<&mut RouterRecord>,
) -> Result<Vec<EvalRow>, TrainError> {
    let mut sums: BTreeMap<Task, ChorusSums<B>> = BTreeMap::new();
    set.for_each_batch(name, progress, |task, chunk| {
        let cache = match assistants {
            AssistantScores::Cache(cache) => Some(cache),
            _ => None,
        };
        let mut batch = batch_of::<B>(set.data, chunk, cache, set.device)?;
        if let AssistantScores::Servers(remotes) = assistants {
            batch = model.with_assistant_log_probs(batch, remotes)?;
        }
        let s = sums.entry(task).or_default();
        let seeds: Vec<u64> = chunk.iter().map(|&i| iw_seed(&set.data[i])).collect();
        let evaluation = model.evaluate_batch(&batch, iw_samples, &seeds)?;
        s.sums.add(set.data, chunk, evaluation.iw_log_likelihood);
        if let Some(l) = evaluation.latent {
            s.kl += l.posterior.kl(&l.prior).sum().into_scalar().elem::<f64>();
            s.means.push(l.posterior.mean);
            s.log_vars.push(l.posterior.log_var);
            s.seeds.extend(&seeds);
        }
        if let (Some(router), Some(record)) = (&evaluation.router, routing.as_deref_mut()) {
            let [_, seq, k] = router.dims();
            let values = router
                .clone()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .expect("f64 data");
            for (r, &index) in chunk.iter().enumerate() {
                let rows = set.data[index]
                    .target_positions()
                    .map(|t| values[(r * seq + t) * k..(r * seq + t + 1) * k].to_vec())
                    .collect();
                record.by_example.insert(index, rows);
            }
        }
        if let Some(router) = evaluation.router {
            s.sums.deferred += posterior_deferral(router, batch.target_mask.clone())
                .into_scalar()
                .elem::<f64>();
        }
        Ok(())
    })?;
    let rows = sums
        .into_iter()
        .map(|(task, s)| {
            let (mi, au) = if s.means.is_empty() {
                (None, None)
            } else {
                let q = DiagonalGaussian {
                    mean: Tensor::cat(s.means, 0),
                    log_var: Tensor::cat(s.log_vars, 0),
                };
                let moments = MeanMoments::of(q.mean.clone());
                // Each example's draws from its own seed: a rerun gives the same MI.
                let eps = seeded_noise(MI_DRAWS, &s.seeds, model.config.d_latent, &q.mean.device());
                (Some(mutual_information(&q, eps)), Some(moments))
            };
            EvalRow {
                kl: model.config.has_z().then(|| s.kl / s.sums.examples as f64),
                mi,
                active_units: au.as_ref().map(|m| m.active_units(ACTIVE_UNIT_THRESHOLD)),
                posterior_means: au,
                deferral: (model.n_models() > 1)
                    .then(|| s.sums.deferred / s.sums.tokens.max(1) as f64),
                ..EvalRow::new(name, task, s.sums)
            }
        })
        .collect();
    Ok(rows)
}

/// Exact NLL/PPL per task of a training-free composition ([`Chorus::compose`]) under the
/// confidence rule with threshold `tau`, teacher-forced
/// ([`chorus_elbo::confidence_routing`]: each target token is scored by the model the rule would
/// have let write it), and the share of target tokens the rule defers to assistants.
pub fn evaluate_composition<B: Backend>(
    model: &Chorus<B>,
    tau: f64,
    name: &str,
    set: &EvalSet<'_, B>,
    progress: &mut dyn Progress,
) -> Result<Vec<EvalRow>, TrainError> {
    let mut sums: BTreeMap<Task, Sums> = BTreeMap::new();
    set.for_each_batch(name, progress, |task, chunk| {
        let batch = batch_of::<B>(set.data, chunk, None, set.device)?;
        let (mut top1, mut lp) = (Vec::new(), Vec::new());
        for j in 0..model.n_models() {
            let input = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
            let logits = model.member(j).forward(input, None, None)?.logits;
            top1.push(top1_probability(logits.clone()));
            lp.push(token_log_probs(logits, batch.targets.clone()));
        }
        let (routed, writer) =
            confidence_routing(Tensor::stack(top1, 2), Tensor::stack(lp, 2), tau);
        let mask = batch.target_mask.clone();
        let s = sums.entry(task).or_default();
        let per_row = (routed * mask.clone()).sum_dim(1).squeeze_dim::<1>(1);
        s.add(set.data, chunk, per_row);
        s.deferred += (writer.greater_elem(0).float() * mask)
            .sum()
            .into_scalar()
            .elem::<f64>();
        Ok(())
    })?;
    Ok(sums
        .into_iter()
        .map(|(task, s)| EvalRow {
            deferral: Some(s.deferred / s.tokens.max(1) as f64),
            ..EvalRow::new(name, task, s)
        })
        .collect())
}

/// Exact NLL/PPL per task of one LM on its own: held in memory ([`LocalLm`]) or behind a server.
/// With `per_token`, also keeps the log-prob of every target token (for [`evaluate_oracle`]).
pub fn evaluate_lm<B: Backend>(
    lm: &dyn Assistant<B>,
    name: &str,
    set: &EvalSet<'_, B>,
    progress: &mut dyn Progress,
    mut per_token: Option<&mut TargetLogProbs>,
) -> Result<Vec<EvalRow>, TrainError> {
    let mut sums: BTreeMap<Task, Sums> = BTreeMap::new();
    set.for_each_batch(name, progress, |task, chunk| {
        let batch = batch_of::<B>(set.data, chunk, None, set.device)?;
        let lp = lm.token_log_probs(&batch.score_rows(), None)? * batch.target_mask.clone();
        if let Some(kept) = per_token.as_deref_mut() {
            kept.add(set.data, chunk, lp.clone());
        }
        sums.entry(task)
            .or_default()
            .add(set.data, chunk, lp.sum_dim(1).squeeze_dim::<1>(1));
        Ok(())
    })?;
    Ok(sums
        .into_iter()
        .map(|(task, s)| EvalRow::new(name, task, s))
        .collect())
}

/// The log-prob one model gave each target token of each evaluated example (by example index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetLogProbs {
    by_example: BTreeMap<usize, Vec<f64>>,
}

impl TargetLogProbs {
    /// Keeps the target positions of `masked` `[ids.len(), seq]` (log-probs, zero off target).
    fn add<B: Backend>(&mut self, data: &[Encoded], ids: &[usize], masked: Tensor<B, 2>) {
        let seq = masked.dims()[1];
        let values = masked
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64 data");
        for (r, &index) in ids.iter().enumerate() {
            let e = &data[index];
            let row = &values[r * seq..(r + 1) * seq];
            let kept = e.target_positions().map(|t| row[t]).collect();
            self.by_example.insert(index, kept);
        }
    }
}

/// The per-token oracle over several models: each target token scored by the model that gave it
/// the highest probability, `log p̂(x) = Σ_t max_m log P_m(x_t | x_<t)` — the ceiling of any
/// router over these models that picks one writer per token (an upper bound on their mixtures
/// too, since `Σ_m π_m P_m ≤ max_m P_m`). Not a model: the choice looks at the token it scores.
pub fn evaluate_oracle(
    name: &str,
    data: &[Encoded],
    members: &[&TargetLogProbs],
) -> Result<Vec<EvalRow>, TrainError> {
    let Some(first) = members.first() else {
        return Err(TrainError::EmptyData {
            data: name.to_string(),
            reason: "the oracle needs at least one model's token log-probs".into(),
        });
    };
    let mut sums: BTreeMap<Task, Sums> = BTreeMap::new();
    for &index in first.by_example.keys() {
        let columns: Vec<&Vec<f64>> = members
            .iter()
            .map(|m| m.by_example.get(&index))
            .collect::<Option<_>>()
            .ok_or_else(|| TrainError::EmptyData {
                data: name.to_string(),
                reason: format!("example {index} was not scored by every model"),
            })?;
        let best: f64 = (0..columns[0].len())
            .map(|t| {
                columns
                    .iter()
                    .map(|c| c[t])
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .sum();
        sums.entry(data[index].task)
            .or_default()
            .add_one(data, index, best);
    }
    Ok(sums
        .into_iter()
        .map(|(task, s)| EvalRow::new(name, task, s))
        .collect())
}

/// Why a joint model's assistants have no fixed log-probs to cache, or `None` when they do: they
/// exist, are local, frozen and read no z.
pub fn uncacheable_assistants<B: Backend>(model: &Chorus<B>) -> Option<&'static str> {
    if model.n_models() < 2 {
        Some("the model has no assistants to score")
    } else if model.config.has_z() && model.config.assistant_adapters {
        Some("the assistants read z through adapters, so their log-probs cannot be cached")
    } else if model.config.train_assistants {
        Some(
            "the assistants were trained with the model, so their source files no longer \
             identify them",
        )
    } else if model.config.remote_assistants > 0 {
        Some("the model has remote assistants: they are asked batch by batch instead")
    } else {
        None
    }
}

/// The log-probs of a joint model's local assistants on `data`, from the score cache in `dir` when
/// it holds them (same examples, same assistant weights), else computed once and written there
/// first — so that evaluating several joint models around the same frozen assistants scores them
/// once. `sources` are the model's sources as saved (the assistants' files identify them).
/// Refused for assistants that read z or were trained, and for models with remote assistants.
pub fn assistant_scores<B: Backend>(
    model: &Chorus<B>,
    sources: &[String],
    data: &[Encoded],
    dir: &Path,
    batch_size: usize,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> Result<ScoreCache, TrainError> {
    let refuse = |reason: &str| TrainError::Config {
        file: dir.display().to_string(),
        reason: reason.to_string(),
    };
    if let Some(reason) = uncacheable_assistants(model) {
        return Err(refuse(reason));
    }
    let ids = sources
        .get(1..model.n_models())
        .ok_or_else(|| refuse("the model's manifest does not name its assistants' sources"))?
        .iter()
        .map(|s| crate::run::model_identity(Path::new(s)))
        .collect::<Result<Vec<_>, _>>()?;
    let fp = crate::scores::fingerprint(data, &ids);
    let members: Vec<chorus_model::LocalLm<'_, B>> =
        (1..model.n_models()).map(|j| model.member(j)).collect();
    let assistants: Vec<&dyn Assistant<B>> =
        members.iter().map(|m| m as &dyn Assistant<B>).collect();
    progress.begin("scoring the assistants", data.len() as u64, 0);
    let scored = crate::score_assistants(&assistants, data, &fp, batch_size, dir, device, |done| {
        progress.update(done.min(data.len()) as u64, "")
    });
    progress.end(scored.is_ok());
    scored?;
    ScoreCache::open(dir, &fp)
}
