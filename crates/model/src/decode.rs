//! Collaborative decoding (DESIGN §4): every model keeps its own KV cache and consumes every
//! emitted token; the selector on the base picks the writer of each token.
//!
//! Per step, with π = softmax(selector(h_base)):
//! - *sample*: writer j ~ π; *greedy*: j = argmax π;
//! - *threshold* (Co-LLM): j* = argmax_{j≥1} π_j writes when π_{j*} > η, else the base;
//! - *mixture*: the token is drawn from Σ_j π_j P_j (its provenance is the model with the largest
//!   responsibility π_j P_j(token) / Σ_k π_k P_k(token));
//! - *confidence* (needs no selector, so it also drives training-free compositions, see
//!   [`Chorus::compose`]): the base writes unless its top-1 probability max_v P_0(v) falls below τ;
//!   then the assistant with the highest top-1 probability writes (Nudging's rule).
//!
//! The writer's distribution is tempered (`P^{1/T}`, renormalised), cut to its top-k and to the
//! smallest top-p set, and sampled with a seeded generator; temperature 0 takes the argmax. For the
//! mixture, each P_j is tempered before mixing and the cuts apply to the mixture.

use std::fmt;
use std::str::FromStr;

use crate::{Assistant, AssistantDecoder, Chorus, ChorusBatch, LocalLm, ModelError, seeded_noise};
use burn::prelude::*;
use chorus_data::rng::SplitMix64;
use chorus_latent::DiagonalGaussian;

/// How the writer of each token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WriterStrategy {
    /// Z_t ~ π.
    Sample,
    /// argmax π.
    Greedy,
    /// Co-LLM: the most likely assistant writes when its π exceeds η.
    Threshold {
        /// η ∈ [0, 1]: 1 never defers, 0 always defers.
        eta: f64,
    },
    /// Σ_j π_j P_j.
    Mixture,
    /// The base writes while its top-1 probability is ≥ τ, else the most confident assistant.
    Confidence {
        /// τ ∈ [0, 1]: 0 never defers, 1 always defers.
        tau: f64,
    },
}

impl WriterStrategy {
    /// Whether the rule reads the selector's π (all but [`WriterStrategy::Confidence`]).
    pub fn needs_selector(&self) -> bool {
        !matches!(self, Self::Confidence { .. })
    }
}

impl fmt::Display for WriterStrategy {
    /// The form [`FromStr`] reads: `sample`, `greedy`, `mixture`, `threshold:η`, `confidence:τ`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sample => write!(f, "sample"),
            Self::Greedy => write!(f, "greedy"),
            Self::Mixture => write!(f, "mixture"),
            Self::Threshold { eta } => write!(f, "threshold:{eta}"),
            Self::Confidence { tau } => write!(f, "confidence:{tau}"),
        }
    }
}

impl FromStr for WriterStrategy {
    type Err = String;

    /// `sample`, `greedy`, `mixture`, `threshold` (η = 0.5), `threshold:η`, `confidence`
    /// (τ = 0.5) or `confidence:τ`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unit = |name: &str, value: &str| match value.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err(format!("`{s}`: {name} must be a number in [0, 1]")),
        };
        match s {
            "sample" => Ok(Self::Sample),
            "greedy" => Ok(Self::Greedy),
            "mixture" => Ok(Self::Mixture),
            "threshold" => Ok(Self::Threshold { eta: 0.5 }),
            "confidence" => Ok(Self::Confidence { tau: 0.5 }),
            other => {
                if let Some(eta) = other.strip_prefix("threshold:") {
                    Ok(Self::Threshold {
                        eta: unit("η", eta)?,
                    })
                } else if let Some(tau) = other.strip_prefix("confidence:") {
                    Ok(Self::Confidence {
                        tau: unit("τ", tau)?,
                    })
                } else {
                    Err(format!(
                        "unknown strategy `{other}`: expected sample, greedy, threshold[:η], \
                         mixture or confidence[:τ]"
                    ))
                }
            }
        }
    }
}

/// How assistants are kept up to date with the emitted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AssistantUpdate {
    /// Every assistant consumes every token as it is emitted (one forward per token and model).
    Eager,
    /// An assistant consumes the tokens it missed in one batched forward when it is next needed.
    #[default]
    Lazy,
    /// Co-LLM's way: no assistant cache; an assistant re-encodes the whole prefix whenever needed.
    Reencode,
}

/// Decoding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeConfig {
    /// Who writes each token.
    pub strategy: WriterStrategy,
    /// Temperature (0 = argmax token).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set with this much probability (1 = all).
    pub top_p: f64,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Stop a row at this token (it is kept in the output).
    pub eos: Option<u32>,
    /// Seeds writer and token sampling.
    pub seed: u64,
    /// Assistant cache policy.
    pub assistants: AssistantUpdate,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            strategy: WriterStrategy::Sample,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            eos: None,
            seed: 0,
            assistants: AssistantUpdate::Lazy,
        }
    }
}

impl DecodeConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ModelError> {
        let out_of_range = |key, value: f64, expected| {
            Err(ModelError::OutOfRange {
                key,
                value: value.to_string(),
                expected,
            })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return out_of_range("temperature", self.temperature, "finite and ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return out_of_range("top_p", self.top_p, "in (0, 1]");
        }
        match self.strategy {
            WriterStrategy::Threshold { eta } if !(0.0..=1.0).contains(&eta) => {
                out_of_range("η", eta, "in [0, 1]")
            }
            WriterStrategy::Confidence { tau } if !(0.0..=1.0).contains(&tau) => {
                out_of_range("τ", tau, "in [0, 1]")
            }
            _ => Ok(()),
        }
    }
}

/// One generated continuation with its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// The model that wrote each token (0 = base).
    pub writers: Vec<usize>,
    /// π over the K models at each token: the selector's, or, for a composition without one,
    /// the rule's choice as one-hot.
    pub pi: Vec<Vec<f32>>,
}

impl Decoded {
    /// Tokens written by each of `k` models.
    pub fn counts(&self, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for &w in &self.writers {
            c[w] += 1;
        }
        c
    }

    /// Share of tokens written by assistants (decode-time deferral rate).
    pub fn deferral_rate(&self) -> f64 {
        if self.writers.is_empty() {
            return 0.0;
        }
        self.writers.iter().filter(|&&w| w != 0).count() as f64 / self.writers.len() as f64
    }
}

/// An index drawn from unnormalised non-negative weights: the first i with `u · Σw < Σ_{j≤i} w_j`.
pub(crate) fn categorical(rng: &mut SplitMix64, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// The index of the first largest value (0 when there is none, NaNs never chosen).
pub(crate) fn argmax<T: Copy + Into<f64>>(values: &[T]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            let v = v.into();
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// `max_v softmax(logits)_v = 1 / Σ_v exp(l_v − max_u l_u)`, the top-1 probability at
/// temperature 1 ([`chorus_lm::shifted_exp_sum`]).
pub fn top1_prob(logits: &[f32]) -> f64 {
    1.0 / chorus_lm::shifted_exp_sum(logits)
}

/// softmax(logits / T) in f64 (T = 0: one-hot argmax).
pub fn tempered_probs(logits: &[f32], temperature: f64) -> Vec<f64> {
    if temperature == 0.0 {
        let mut p = vec![0.0; logits.len()];
        p[argmax(logits)] = 1.0;
        return p;
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / temperature).exp())
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// Zeroes everything outside the top-k and outside the smallest set of mass ≥ top_p (top_k = 0
/// and top_p ≥ 1 keep everything): with the tokens ordered by probability, most likely first
/// (ties by id), token `rank` is kept while `(top_k = 0 ∨ rank < top_k) ∧ (m_rank < top_p ·
/// Σ_v p_v ∨ rank = 0)`, where `m_rank` is the kept mass before it, summed in that order.
///
/// The kept tokens are a prefix of that order, so only a prefix is sorted: one pass counts the
/// tokens and their mass in each binade below the largest probability ([`binades_below`]), and
/// the prefix is every binade down to the first where the count reaches top_k or the mass reaches
/// top_p · Σ_v p_v (with a margin far above the rounding of a sum of them in another order), so
/// the walk stops inside it or at its end; the prefix is sorted by [`radix_sort`] on its
/// probabilities' bits. The same tokens as a sort of the whole vocabulary, whose ≈ 50,000
/// comparisons per token had taken as long as a SmolLM2 decoding step (docs/performance.md).
pub fn truncate_probs(p: &mut [f64], top_k: usize, top_p: f64) {
    if (top_k == 0 || top_k >= p.len()) && top_p >= 1.0 {
        return;
    }
    let total: f64 = p.iter().sum();
    let target = top_p * total;
    // Walks the tokens in that order, keeping each until one is not kept.
    let mut keep = vec![false; p.len()];
    let mut mass = 0.0;
    let mut walk = |order: &mut dyn Iterator<Item = usize>| {
        for (rank, v) in order.enumerate() {
            let kept = (top_k == 0 || rank < top_k) && (mass < target || rank == 0);
            if !kept {
                break;
            }
            mass += p[v];
            keep[v] = true;
        }
    };
    match prefix_binades(p, top_k, target) {
        Some((binade, last)) => SORT_SCRATCH.with_borrow_mut(|[keys, spare]| {
            // The prefix's values are positive, so their bits order them as numbers do: one
            // integer key per token, `(u64::MAX − bits(p_v), v)`, sorted without reading `p`.
            keys.clear();
            keys.extend(
                (0..p.len())
                    .filter(|&v| binade(p[v]) <= last)
                    .map(|v| (u64::MAX - p[v].to_bits(), v)),
            );
            radix_sort(keys, spare);
            walk(&mut keys.iter().map(|&(_, v)| v));
        }),
        None => {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            walk(&mut order.into_iter());
        }
    }
    for (value, keep) in p.iter_mut().zip(keep) {
        if !keep {
            *value = 0.0;
        }
    }
}

thread_local! {
    /// [`truncate_probs`]'s sort keys and [`radix_sort`]'s second buffer, kept from token to
    /// token: allocated afresh, their pages (16 bytes per token of the prefix each) were zeroed by
    /// the kernel at every token (docs/performance.md).
    static SORT_SCRATCH: std::cell::RefCell<[Vec<(u64, usize)>; 2]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new()])
    };
}

/// Sorts `keys` by their `u64` in increasing order, equal ones kept in their order: a stable
/// least-significant-digit radix sort, a byte a pass (the passes whose byte is the same in every
/// key skipped), through `spare` (its contents replaced).
pub(crate) fn radix_sort<T: Copy>(keys: &mut Vec<(u64, T)>, spare: &mut Vec<(u64, T)>) {
    let mut counts = [[0usize; 256]; 8];
    for &(key, _) in keys.iter() {
        for (byte, counts) in counts.iter_mut().enumerate() {
            counts[(key >> (8 * byte)) as usize & 0xff] += 1;
        }
    }
    spare.clear();
    spare.extend_from_slice(keys);
    for (byte, counts) in counts.iter().enumerate() {
        if counts.contains(&keys.len()) {
            continue;
        }
        let mut next = [0usize; 256];
        let mut start = 0;
        for (next, &count) in next.iter_mut().zip(counts) {
            *next = start;
            start += count;
        }
        for &(key, value) in keys.iter() {
            let digit = (key >> (8 * byte)) as usize & 0xff;
            spare[next[digit]] = (key, value);
            next[digit] += 1;
        }
        std::mem::swap(keys, spare);
    }
}

/// [`truncate_probs`]'s prefix: the binade of each value and the last binade whose tokens are
/// sorted; `None` to sort every token (a NaN, which sorts before every number, or no binade
/// before the last that decides the walk).
pub(crate) fn prefix_binades(
    p: &[f64],
    top_k: usize,
    target: f64,
) -> Option<(impl Fn(f64) -> usize + use<>, usize)> {
    if p.iter().any(|v| v.is_nan()) {
        return None;
    }
    let binade = binades_below(p);
    let mut count = vec![0usize; LAST_BINADE + 1];
    let mut mass = vec![0.0f64; LAST_BINADE + 1];
    for &v in p {
        let b = binade(v);
        count[b] += 1;
        mass[b] += v;
    }
    let (mut seen, mut seen_mass) = (0, 0.0);
    let last = (0..LAST_BINADE).find(|&b| {
        seen += count[b];
        seen_mass += mass[b];
        (top_k > 0 && seen >= top_k) || seen_mass >= target * (1.0 + 1e-6)
    })?;
    Some((binade, last))
}

/// The binade of the largest value for zeros and negative values, below every positive one's.
pub(crate) const LAST_BINADE: usize = 2048;

/// For values `p` without NaNs: `v ↦` how many binades `v` lies below the largest of `p` (the
/// difference of their f64 exponents; subnormals count as one binade), [`LAST_BINADE`] for
/// `v ≤ 0`. Never smaller for a smaller value, so the values down to any binade are a prefix of
/// `p` in decreasing order.
fn binades_below(p: &[f64]) -> impl Fn(f64) -> usize + use<> {
    let exponent = |v: f64| ((v.to_bits() >> 52) & 0x7ff) as usize;
    let top = exponent(p.iter().copied().fold(0.0, f64::max));
    move |v| {
        if v > 0.0 {
            top - exponent(v)
        } else {
            LAST_BINADE
        }
    }
}

/// The mixture `Σ_j π_j P_j` over the vocabulary.
pub fn mixture_probs(pi: &[f64], per_model: &[Vec<f64>]) -> Vec<f64> {
    let vocab = per_model.first().map_or(0, Vec::len);
    (0..vocab)
        .map(|v| pi.iter().zip(per_model).map(|(p, m)| p * m[v]).sum())
        .collect()
}

/// Where decoding's z comes from ([`Chorus::decoding_z`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ZSource<'a> {
    /// A sample `μ + σ ⊙ ε` of the prior p(z | c): row r's ε from its own generator, seeded with
    /// the r-th draw of `SplitMix64(seed)` ([`crate::seeded_noise`]), so the same on every backend.
    PriorSample {
        /// The seed of ε.
        seed: u64,
    },
    /// The prior's mean.
    PriorMean,
    /// The posterior mean of q(z | x = reference, c) (reconstruction).
    Posterior {
        /// Token ids of x, ending with EOS.
        reference: &'a [u32],
    },
    /// `(1 − α) · E q(z | from, c) + α · E q(z | to, c)`.
    Interpolate {
        /// Token ids of the first reference, ending with EOS.
        from: &'a [u32],
        /// Token ids of the second reference, ending with EOS.
        to: &'a [u32],
        /// α in [0, 1].
        alpha: f64,
    },
}

/// The training row that a prompt (token ids starting with EOS, as [`Chorus::generate`] takes
/// them) and a reference text `x` (ending with EOS) make: inputs `prompt ++ x` without its last
/// token, targets without its first, x's tokens the targets, the prompt's tokens after the leading
/// EOS the context.
///
/// # Shapes
/// - every tensor of the batch: `[1, prompt.len() + x.len() − 1]`
pub(crate) fn reference_row<B: Backend>(
    prompt: &[u32],
    text: &[u32],
    device: &B::Device,
) -> Result<ChorusBatch<B>, ModelError> {
    let row: Vec<u32> = prompt.iter().chain(text).copied().collect();
    if row.len() < 2 {
        return Err(ModelError::InvalidInput {
            input: "reference",
            reason: "the reference text is empty".into(),
        });
    }
    let n = row.len() - 1;
    let ints = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), device);
    let floats = |v: Vec<f32>| {
        Tensor::<B, 2>::from_data(TensorData::new(v, [1, n]).convert::<B::FloatElem>(), device)
    };
    let m = prompt.len().saturating_sub(1);
    Ok(ChorusBatch {
        tokens: ints(row[..n].iter().map(|&t| t as i64).collect()),
        targets: ints(row[1..].iter().map(|&t| t as i64).collect()),
        target_mask: floats((0..n).map(|t| f32::from(u8::from(t >= m))).collect()),
        context_mask: floats(
            (0..n)
                .map(|t| f32::from(u8::from((1..=m).contains(&t))))
                .collect(),
        ),
        padding: Tensor::<B, 2, Int>::zeros([1, n], device).bool(),
        assistant_log_probs: None,
    })
}

impl<B: Backend> Chorus<B> {
    /// p(z | c) for prompts `[rows, len]` whose positions `1..` are context (position 0 is the
    /// leading EOS, as in training). `None` without z.
    pub fn prior_for_prompt(
        &self,
        prompt: Tensor<B, 2, Int>,
    ) -> Result<Option<DiagonalGaussian<B>>, ModelError> {
        let [rows, len] = prompt.dims();
        let device = prompt.device();
        let context_mask = Tensor::<B, 2>::ones([rows, len], &device)
            .slice_assign([0..rows, 0..1], Tensor::zeros([rows, 1], &device));
        let batch = ChorusBatch {
            targets: prompt.clone(),
            tokens: prompt,
            target_mask: context_mask.zeros_like(),
            context_mask,
            padding: Tensor::<B, 2, Int>::zeros([rows, len], &device).bool(),
            assistant_log_probs: None,
        };
        Ok(self.latent_distributions(&batch)?.map(|l| l.prior))
    }

    /// q(z | x, c) for a prompt (as in [`Chorus::prior_for_prompt`]) followed by a reference text
    /// `x` (token ids, ending with EOS as in training). `None` without z.
    pub fn posterior_for_text(
        &self,
        prompt: &[u32],
        text: &[u32],
        device: &B::Device,
    ) -> Result<Option<DiagonalGaussian<B>>, ModelError> {
        let batch = reference_row(prompt, text, device)?;
        Ok(self.latent_distributions(&batch)?.map(|l| l.posterior))
    }

    /// z `[rows, d_latent]` for decoding after `prompt` (token ids starting with EOS, as
    /// [`Chorus::generate`] takes them), from `source`; `None` when the model has no z.
    /// References are token ids ending with EOS, as training's x.
    pub fn decoding_z(
        &self,
        source: &ZSource<'_>,
        prompt: &[u32],
        rows: usize,
        device: &B::Device,
    ) -> Result<Option<Tensor<B, 2>>, ModelError> {
        if !self.config.has_z() {
            return Ok(None);
        }
        let d_latent = self.config.d_latent;
        let posterior_mean = |text: &[u32]| -> Result<Tensor<B, 2>, ModelError> {
            let q = self
                .posterior_for_text(prompt, text, device)?
                .expect("the model has z");
            Ok(q.mean.reshape([1, d_latent]).repeat_dim(0, rows))
        };
        let prior = || -> Result<DiagonalGaussian<B>, ModelError> {
            let ids = prompt.iter().map(|&t| i64::from(t)).collect::<Vec<_>>();
            let tokens =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), device)
                    .repeat_dim(0, rows);
            Ok(self.prior_for_prompt(tokens)?.expect("the model has z"))
        };
        if self.config.z_at_prior_mean {
            // The control reads nothing else.
            return Ok(Some(prior()?.mean));
        }
        Ok(Some(match *source {
            ZSource::PriorMean => prior()?.mean,
            ZSource::PriorSample { seed } => {
                let p = prior()?;
                let mut seeds = SplitMix64(seed);
                let row_seeds: Vec<u64> = (0..rows).map(|_| seeds.next_u64()).collect();
                let eps =
                    seeded_noise::<B>(1, &row_seeds, d_latent, device).reshape([rows, d_latent]);
                p.std() * eps + p.mean
            }
            ZSource::Posterior { reference } => posterior_mean(reference)?,
            ZSource::Interpolate { from, to, alpha } => {
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(ModelError::OutOfRange {
                        key: "alpha",
                        value: alpha.to_string(),
                        expected: "in [0, 1]",
                    });
                }
                posterior_mean(from)?.mul_scalar(1.0 - alpha)
                    + posterior_mean(to)?.mul_scalar(alpha)
            }
        }))
    }

    /// Generates up to `config.max_new_tokens` after `prompt` for `rows` rows at once (the same
    /// prompt, e.g. several samples; `z` is `[rows, d_latent]`, `None` without z). `prompt` should
    /// start with the EOS token, as training rows do. `on_token(row, token, writer)` is called as
    /// each token is chosen (for streaming); returning `false` stops that row (stop strings).
    pub fn generate(
        &self,
        prompt: &[u32],
        rows: usize,
        z: Option<Tensor<B, 2>>,
        config: &DecodeConfig,
        device: &B::Device,
        on_token: impl FnMut(usize, u32, usize) -> bool,
    ) -> Result<Vec<Decoded>, ModelError> {
        self.generate_with(&[], prompt, rows, z, config, device, on_token)
    }

    /// [`Chorus::generate`] with further assistants after the chorus's own (models K, K + 1, …),
    /// e.g. [`RemoteAssistant`](crate::RemoteAssistant)s. Only a composition without a selector
    /// takes them (a selector was trained for its K models).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with(
        &self,
        extra: &[&dyn Assistant<B>],
        prompt: &[u32],
        rows: usize,
        z: Option<Tensor<B, 2>>,
        config: &DecodeConfig,
        device: &B::Device,
        mut on_token: impl FnMut(usize, u32, usize) -> bool,
    ) -> Result<Vec<Decoded>, ModelError> {
        config.validate()?;
        let members: Vec<LocalLm<'_, B>> = (1..self.n_local()).map(|j| self.member(j)).collect();
        let assistants: Vec<&dyn Assistant<B>> = members
            .iter()
            .map(|m| m as &dyn Assistant<B>)
            .chain(extra.iter().copied())
            .collect();
        let k = 1 + assistants.len();
        if self.selector.is_some() && extra.len() != self.config.remote_assistants {
            return Err(ModelError::Unsupported {
                operation: "decoding",
                reason: format!(
                    "the selector was trained for {} models, {} of them remote, but {} servers \
                     were given: a trained chorus decodes with exactly its remote assistants \
                     (further ones join only a composition without a selector)",
                    self.n_models(),
                    self.config.remote_assistants,
                    extra.len()
                ),
            });
        }
        let vocab = self.base.dims().vocab_size;
        for (i, a) in assistants.iter().enumerate() {
            if a.vocab_size() != vocab {
                return Err(ModelError::VocabMismatch {
                    base: vocab,
                    assistant: i + 1,
                    vocab: a.vocab_size(),
                });
            }
        }
        let max_len = std::iter::once(self.base.dims().max_seq_len)
            .chain(assistants.iter().map(|a| a.max_seq_len()))
            .min()
            .unwrap_or(0);
        if prompt.is_empty() {
            return Err(ModelError::InvalidInput {
                input: "prompt",
                reason: "empty: start it with the EOS token".into(),
            });
        }
        if prompt.len() + config.max_new_tokens > max_len {
            return Err(ModelError::InvalidInput {
                input: "prompt",
                reason: format!(
                    "{} prompt tokens + {} new tokens exceed the context window of {max_len}: shorten the prompt or ask for fewer new tokens",
                    prompt.len(),
                    config.max_new_tokens
                ),
            });
        }
        if let Some((i, t)) = prompt
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return Err(ModelError::InvalidInput {
                input: "prompt",
                reason: format!(
                    "token {t} at position {i} is outside the vocabulary of {vocab}: was the \
                     prompt encoded with another model's tokenizer?"
                ),
            });
        }
        if self.selector.is_none() && k > 1 && config.strategy.needs_selector() {
            return Err(ModelError::Unsupported {
                operation: "decoding",
                reason: format!(
                    "{} reads the selector's π, which a composition of {k} models without \
                     training does not have: use confidence:τ",
                    config.strategy
                ),
            });
        }
        if self.config.has_z() != z.is_some() {
            return Err(ModelError::InvalidInput {
                input: "z",
                reason: if z.is_some() {
                    "given to a model without z".into()
                } else {
                    "this model reads z: pass one (prior sample, prior mean or posterior)".into()
                },
            });
        }
        let rows = rows.max(1);
        let tokens_tensor = |rows_tokens: &[Vec<u32>]| {
            let n = rows_tokens[0].len();
            let flat: Vec<i64> = rows_tokens.iter().flatten().map(|&t| t as i64).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows_tokens.len(), n]), device)
        };
        let prompt_rows: Vec<Vec<u32>> = vec![prompt.to_vec(); rows];
        let mut rng = SplitMix64(config.seed);

        // Prefill: the base reads the prompt; the assistants when they are first needed (eager
        // ones at once).
        let base = self.member(0);
        let mut base_cache = self.base.new_cache();
        let (mut base_logits, mut hidden) = base.step(
            tokens_tensor(&prompt_rows),
            z.clone(),
            Some(&mut base_cache),
        )?;
        let mut decoders: Vec<Box<dyn AssistantDecoder + '_>> = assistants
            .iter()
            .map(|a| a.decoder(rows, z.clone(), config.assistants, device))
            .collect();
        for d in &mut decoders {
            d.push(&prompt_rows);
        }
        let mut out: Vec<Decoded> = (0..rows)
            .map(|_| Decoded {
                tokens: Vec::new(),
                writers: Vec::new(),
                pi: Vec::new(),
            })
            .collect();
        let mut done = vec![false; rows];

        for _ in 0..config.max_new_tokens {
            let pi: Vec<Vec<f64>> = match &self.selector {
                Some(selector) => {
                    let log_pi = selector.forward(hidden.clone().unsqueeze_dim::<3>(1));
                    log_pi
                        .exp()
                        .reshape([rows, k])
                        .into_data()
                        .convert::<f64>()
                        .to_vec::<f64>()
                        .map_err(|e| ModelError::HostRead {
                            tensor: "π",
                            reason: format!("{e:?}"),
                        })?
                        .chunks(k)
                        .map(<[f64]>::to_vec)
                        .collect()
                }
                // A composition: no π; the confidence rule decides alone.
                None => vec![vec![1.0 / k as f64; k]; rows],
            };
            let deferring: Vec<bool> = match config.strategy {
                WriterStrategy::Confidence { tau } if k > 1 => base_logits
                    .iter()
                    .zip(&done)
                    .map(|(l, &d)| !d && top1_prob(l) < tau)
                    .collect(),
                _ => vec![false; rows],
            };
            // Who writes, per row, where π alone decides (`None`: the mixture, or the confidence
            // rule among several assistants, which compares their top-1 probabilities).
            let mut writers: Vec<Option<usize>> = pi
                .iter()
                .enumerate()
                .map(|(r, p)| match config.strategy {
                    WriterStrategy::Sample => Some(categorical(&mut rng, p)),
                    WriterStrategy::Greedy => Some(argmax(p)),
                    WriterStrategy::Threshold { .. } | WriterStrategy::Confidence { .. }
                        if k == 1 =>
                    {
                        Some(0)
                    }
                    WriterStrategy::Threshold { eta } => {
                        let j = 1 + argmax(&p[1..]);
                        Some(if p[j] > eta { j } else { 0 })
                    }
                    WriterStrategy::Mixture => None,
                    WriterStrategy::Confidence { .. } if !deferring[r] => Some(0),
                    WriterStrategy::Confidence { .. } if k == 2 => Some(1),
                    WriterStrategy::Confidence { .. } => None,
                })
                .collect();
            // The assistants whose logits this step reads: every one when eager, else the writers.
            let needed: Vec<bool> = (1..k)
                .map(|j| {
                    config.assistants == AssistantUpdate::Eager
                        || writers
                            .iter()
                            .zip(&done)
                            .any(|(w, d)| !d && (w.is_none() || *w == Some(j)))
                })
                .collect();
            let mut current: Vec<Option<&[Vec<f32>]>> = Vec::with_capacity(k - 1);
            for (d, &need) in decoders.iter_mut().zip(&needed) {
                current.push(if need { Some(d.next_logits()?) } else { None });
            }
            let logits_of = |j: usize, r: usize| -> &[f32] {
                if j == 0 {
                    &base_logits[r]
                } else {
                    &current[j - 1].expect("fetched for the writers")[r]
                }
            };
            if let WriterStrategy::Confidence { .. } = config.strategy {
                for (r, w) in writers.iter_mut().enumerate() {
                    if w.is_none() {
                        let confidence: Vec<f64> =
                            (1..k).map(|j| top1_prob(logits_of(j, r))).collect();
                        *w = Some(1 + argmax(&confidence));
                    }
                }
            }
            let mut next = Vec::with_capacity(rows);
            for r in 0..rows {
                if done[r] {
                    next.push(config.eos.unwrap_or(0));
                    continue;
                }
                let (token, writer_of) = match writers[r] {
                    // Greedy from one writer: the argmax of its logits, which is the one-hot
                    // `tempered_probs` gives at T = 0 (no vector over the vocabulary needed).
                    Some(j) if config.temperature == 0.0 => (argmax(logits_of(j, r)), None),
                    Some(j) => {
                        let mut probs = tempered_probs(logits_of(j, r), config.temperature);
                        truncate_probs(&mut probs, config.top_k, config.top_p);
                        (categorical(&mut rng, &probs), None)
                    }
                    None => {
                        let per_model: Vec<Vec<f64>> = (0..k)
                            .map(|j| tempered_probs(logits_of(j, r), config.temperature))
                            .collect();
                        let mut probs = mixture_probs(&pi[r], &per_model);
                        // Greedy tokens are the argmax, which truncation always keeps: skip its
                        // sort over the vocabulary.
                        let token = if config.temperature == 0.0 {
                            argmax(&probs)
                        } else {
                            truncate_probs(&mut probs, config.top_k, config.top_p);
                            categorical(&mut rng, &probs)
                        };
                        (token, Some(per_model))
                    }
                };
                let token = token as u32;
                let writer = match (writers[r], writer_of) {
                    (Some(j), _) => j,
                    (None, Some(per_model)) => argmax(
                        &(0..k)
                            .map(|j| pi[r][j] * per_model[j][token as usize])
                            .collect::<Vec<_>>(),
                    ),
                    (None, None) => unreachable!("mixture keeps per-model probabilities"),
                };
                let keep_going = on_token(r, token, writer);
                out[r].tokens.push(token);
                out[r].writers.push(writer);
                out[r].pi.push(match self.selector {
                    Some(_) => pi[r].iter().map(|&p| p as f32).collect(),
                    None => (0..k).map(|j| f32::from(u8::from(j == writer))).collect(),
                });
                if config.eos == Some(token) || !keep_going {
                    done[r] = true;
                }
                next.push(token);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            let column: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            for d in &mut decoders {
                d.push(&column);
            }
            (base_logits, hidden) =
                base.step(tokens_tensor(&column), z.clone(), Some(&mut base_cache))?;
        }
        Ok(out)
    }

    /// π and each model's tempered next-token distribution after `prompt` (one row), through the
    /// same cached path as [`Chorus::generate`]'s first step.
    pub fn next_token_distributions(
        &self,
        prompt: &[u32],
        z: Option<Tensor<B, 2>>,
        temperature: f64,
        device: &B::Device,
    ) -> Result<(Vec<f64>, Vec<Vec<f64>>), ModelError> {
        self.check_all_local()?;
        let n = prompt.len();
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
            device,
        );
        let mut per_model = Vec::new();
        let mut base_hidden = None;
        for j in 0..self.n_models() {
            let mut cache = if j == 0 {
                self.base.new_cache()
            } else {
                self.assistants[j - 1].new_cache()
            };
            let (logits, hidden) =
                self.member(j)
                    .step(tokens.clone(), z.clone(), Some(&mut cache))?;
            per_model.push(tempered_probs(&logits[0], temperature));
            if j == 0 {
                base_hidden = Some(hidden);
            }
        }
        let pi = match (&self.selector, base_hidden) {
            (Some(selector), Some(h)) => selector
                .forward(h.unsqueeze_dim::<3>(1))
                .exp()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .map_err(|e| ModelError::HostRead {
                    tensor: "π",
                    reason: format!("{e:?}"),
                })?,
            _ => vec![1.0],
        };
        Ok((pi, per_model))
    }
}
