//! What the joint model needs from a model it does not train through: per-token log-probs of given
//! rows (scoring, training with cached or live assistants, evaluation) and incremental decoding.
//!
//! Two implementations: [`LocalLm`], an LM held in memory with its optional z-adapter (the base and
//! the assistants of a [`Chorus`](crate::Chorus) are read through it), and
//! [`RemoteAssistant`](crate::RemoteAssistant), an LM behind an OpenAI-compatible completions server.

use burn::prelude::*;
use chorus_elbo::token_log_probs;
use chorus_lm::{KvCache, Lm, LmInput, LmOutput};
use chorus_lm_adapters::ZAdapter;

use crate::{AssistantUpdate, ModelError};

/// Teacher-forced rows to score: `tokens[b, t]` is read at position t, `targets[b, t]` follows it.
#[derive(Debug, Clone)]
pub struct ScoreRows<B: Backend> {
    /// `[batch, seq]` input ids.
    pub tokens: Tensor<B, 2, Int>,
    /// `[batch, seq]` the next token at each position.
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, seq]`, true at padding (a padded row is a prefix of `seq` positions).
    pub padding: Tensor<B, 2, Bool>,
}

/// A model that scores rows and decodes incrementally. Object safe: a chorus reads local and remote
/// assistants through `&dyn Assistant<B>`.
pub trait Assistant<B: Backend> {
    /// Where the model comes from (a file, a URL), for messages and score-cache fingerprints.
    fn describe(&self) -> String;

    /// Its vocabulary size (it must equal the base's).
    fn vocab_size(&self) -> usize;

    /// The longest row (prompt + new tokens) it reads.
    fn max_seq_len(&self) -> usize;

    /// `log P(targets[b, t] | tokens[b, ..=t])` (conditioned on z `[batch, d_latent]` where the model
    /// has an adapter); padding positions hold an arbitrary finite value that callers mask.
    ///
    /// # Shapes
    /// - output: `[batch, seq]`
    fn token_log_probs(
        &self,
        rows: &ScoreRows<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError>;

    /// A decoding state for `rows` rows that starts empty; `z` `[rows, d_latent]` conditions a model
    /// with an adapter.
    fn decoder<'a>(
        &'a self,
        rows: usize,
        z: Option<Tensor<B, 2>>,
        update: AssistantUpdate,
        device: &B::Device,
    ) -> Box<dyn AssistantDecoder + 'a>;
}

/// An assistant's running state during decoding: it is told every emitted token and asked for its
/// next-token logits only when the writer rule needs them.
pub trait AssistantDecoder {
    /// Appends the same number of tokens to every row (the prompt, then one token per step).
    fn push(&mut self, tokens: &[Vec<u32>]);

    /// `[rows][vocab]` next-token logits after everything pushed so far (computed on first call
    /// after a push, then kept). A remote assistant gives its top log-probs and `-∞` elsewhere.
    fn next_logits(&mut self) -> Result<&[Vec<f32>], ModelError>;
}

/// An LM held in memory with its optional z-adapter: model j of a chorus.
#[derive(Debug)]
pub struct LocalLm<'a, B: Backend> {
    /// The LM.
    pub lm: &'a Lm<B>,
    /// Its reader of z, if it has one.
    pub adapter: Option<&'a ZAdapter<B>>,
}

impl<B: Backend> Clone for LocalLm<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for LocalLm<'_, B> {}

impl<'a, B: Backend> LocalLm<'a, B> {
    /// An LM without an adapter.
    pub fn new(lm: &'a Lm<B>) -> Self {
        Self { lm, adapter: None }
    }

    /// Runs the LM on `input` (through `cache` when given), conditioned on z `[batch, d_latent]`
    /// when it has an adapter.
    pub fn forward(
        &self,
        input: LmInput<B>,
        z: Option<Tensor<B, 2>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<LmOutput<B>, ModelError> {
        let input = match (self.adapter, z) {
            (Some(adapter), Some(z)) => adapter.condition(input, z),
            _ => input,
        };
        Ok(self.lm.forward(input, cache)?)
    }

    /// Reads `tokens` `[rows, n]` through `cache` and returns the last position's logits per row and
    /// the last hidden state `[rows, d_model]`.
    pub fn step(
        &self,
        tokens: Tensor<B, 2, Int>,
        z: Option<Tensor<B, 2>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<(Vec<Vec<f32>>, Tensor<B, 2>), ModelError> {
        let [rows, n] = tokens.dims();
        let out = self.forward(LmInput::new(tokens).with_last_logits_only(), z, cache)?;
        let vocab = out.logits.dims()[2];
        let last = out
            .logits
            .reshape([rows, vocab])
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| ModelError::HostRead {
                tensor: "logits",
                reason: format!("{e:?}"),
            })?;
        let d = out.hidden.dims()[2];
        let hidden = out.hidden.narrow(1, n - 1, 1).reshape([rows, d]);
        Ok((last.chunks(vocab).map(<[f32]>::to_vec).collect(), hidden))
    }
}

impl<B: Backend> Assistant<B> for LocalLm<'_, B> {
    fn describe(&self) -> String {
        let dims = self.lm.dims();
        format!(
            "a local LM (d {} × {} layers, vocab {})",
            dims.d_model, dims.n_layers, dims.vocab_size
        )
    }

    fn vocab_size(&self) -> usize {
        self.lm.dims().vocab_size
    }

    fn max_seq_len(&self) -> usize {
        self.lm.dims().max_seq_len
    }

    fn token_log_probs(
        &self,
        rows: &ScoreRows<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let input = LmInput::new(rows.tokens.clone()).with_padding(rows.padding.clone());
        let logits = self.forward(input, z, None)?.logits;
        Ok(token_log_probs(logits, rows.targets.clone()))
    }

    fn decoder<'a>(
        &'a self,
        rows: usize,
        z: Option<Tensor<B, 2>>,
        update: AssistantUpdate,
        device: &B::Device,
    ) -> Box<dyn AssistantDecoder + 'a> {
        Box::new(LocalDecoder {
            model: *self,
            z,
            update,
            device: device.clone(),
            cache: self.lm.new_cache(),
            history: vec![Vec::new(); rows],
            pending: vec![Vec::new(); rows],
            logits: None,
        })
    }
}

/// A local LM's decoding state: a KV cache and the tokens it has not read yet.
struct LocalDecoder<'a, B: Backend> {
    model: LocalLm<'a, B>,
    z: Option<Tensor<B, 2>>,
    update: AssistantUpdate,
    device: B::Device,
    cache: KvCache<B>,
    /// Every token pushed (re-encoded whole under [`AssistantUpdate::Reencode`]).
    history: Vec<Vec<u32>>,
    /// Tokens pushed but not yet read into the cache.
    pending: Vec<Vec<u32>>,
    logits: Option<Vec<Vec<f32>>>,
}

impl<B: Backend> AssistantDecoder for LocalDecoder<'_, B> {
    fn push(&mut self, tokens: &[Vec<u32>]) {
        for ((h, p), t) in self.history.iter_mut().zip(&mut self.pending).zip(tokens) {
            h.extend_from_slice(t);
            p.extend_from_slice(t);
        }
        self.logits = None;
    }

    fn next_logits(&mut self) -> Result<&[Vec<f32>], ModelError> {
        if self.logits.is_none() {
            let (source, cache) = match self.update {
                AssistantUpdate::Reencode => (&self.history, None),
                _ => (&self.pending, Some(&mut self.cache)),
            };
            let (rows, n) = (source.len(), source[0].len());
            if n == 0 {
                return Err(ModelError::InvalidInput {
                    input: "tokens",
                    reason: "an assistant was asked for logits before reading any token".into(),
                });
            }
            let flat: Vec<i64> = source.iter().flatten().map(|&t| t as i64).collect();
            let tokens =
                Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows, n]), &self.device);
            let (logits, _) = self.model.step(tokens, self.z.clone(), cache)?;
            self.logits = Some(logits);
            for p in &mut self.pending {
                p.clear();
            }
        }
        Ok(self.logits.as_deref().expect("computed above"))
    }
}
