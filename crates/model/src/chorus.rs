//! The joint model `Chorus<B>` and its ELBO forward pass.

use std::collections::HashSet;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use chorus_data::rng::SplitMix64;
use chorus_elbo::{
    ElboTerms, bag_of_words_log_likelihood, elbo_terms, iw_log_likelihood, mixture_log_likelihood,
    pseudo_label_loss, token_log_probs, with_bag_of_words,
};
use chorus_latent::{
    DiagonalGaussian, GaussianHead, GaussianHeadConfig, Prior, Selector, SelectorConfig,
    masked_mean_pool, router_posterior,
};
use chorus_lm::{Lm, LmInput};
use chorus_lm_adapters::{ZAdapter, ZAdapterConfig};

use crate::{Assistant, ChorusConfig, LocalLm, ModelError, ScoreRows};

/// One training or evaluation batch: `c` then `x` in one row, teacher-forced.
///
/// Row layout: `tokens[t]` is read at position t and `targets[t]` is the token that follows it.
/// The posterior pools the base's hidden states over all non-padding input tokens, so `x` should end
/// with an EOS target (then every real token of x is read).
#[derive(Debug, Clone)]
pub struct ChorusBatch<B: Backend> {
    /// `[batch, seq]` input token ids.
    pub tokens: Tensor<B, 2, Int>,
    /// `[batch, seq]` the next token at each position.
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, seq]`, 1.0 where `targets[t]` is a token of x (scored), 0.0 for context and padding.
    pub target_mask: Tensor<B, 2>,
    /// `[batch, seq]`, 1.0 where `tokens[t]` belongs to the context c (read by the prior).
    pub context_mask: Tensor<B, 2>,
    /// `[batch, seq]`, true where `tokens[t]` is padding.
    pub padding: Tensor<B, 2, Bool>,
    /// `[batch, seq, n_assistants]`: precomputed `log P_j(targets[t])` of frozen assistants without
    /// adapters (Co-LLM's scoring step). When present, the assistants are not run.
    pub assistant_log_probs: Option<Tensor<B, 3>>,
}

impl<B: Backend> ChorusBatch<B> {
    /// The rows without the masks, for an [`Assistant`] to score.
    pub fn score_rows(&self) -> ScoreRows<B> {
        ScoreRows {
            tokens: self.tokens.clone(),
            targets: self.targets.clone(),
            padding: self.padding.clone(),
        }
    }
}

/// What [`Chorus::evaluate_batch`] returns.
#[derive(Debug, Clone)]
pub struct BatchEvaluation<B: Backend> {
    /// `[batch]` importance-weighted `log p̂(x | c)` (exact without z).
    pub iw_log_likelihood: Tensor<B, 1>,
    /// q(z | x, c) and p(z | c) (`None` without z, and with z fixed at the prior mean).
    pub latent: Option<LatentDistributions<B>>,
    /// `[batch, seq, K]` the router posterior at z = E q (`None` when K = 1).
    pub router: Option<Tensor<B, 3>>,
}

/// What [`Chorus::forward_elbo`] returns.
#[derive(Debug, Clone)]
pub struct ChorusOutput<B: Backend> {
    /// The ELBO terms (loss, reconstruction, KL, β, token count).
    pub terms: ElboTerms<B>,
    /// `[batch, seq, n_models]`: the exact router posterior r_t(j) under the first z sample.
    pub router: Tensor<B, 3>,
    /// `[batch, seq, n_models]`: log π(j) under the first z sample.
    pub log_pi: Tensor<B, 3>,
    /// The posterior q(z | x, c), when z is on.
    pub posterior: Option<DiagonalGaussian<B>>,
}

/// q(z | x, c) and p(z | c) for one batch.
#[derive(Debug, Clone)]
pub struct LatentDistributions<B: Backend> {
    /// q(z | x, c), `[batch, d_latent]`.
    pub posterior: DiagonalGaussian<B>,
    /// p(z | c), `[batch, d_latent]`.
    pub prior: DiagonalGaussian<B>,
}

/// `log p(x | z_s, c)` per sample with the per-token pieces it was built from.
struct SampleLikelihood<B: Backend> {
    /// `[n_samples, batch]`
    log_px: Tensor<B, 2>,
    /// `[n_samples · batch, seq, K]`
    log_pi: Tensor<B, 3>,
    /// `[n_samples · batch, seq, K]`
    log_p: Tensor<B, 3>,
}

/// The joint model: base + assistants + per-model z-adapters + posterior + prior + selector.
#[derive(Module, Debug)]
pub struct Chorus<B: Backend> {
    /// Model 0: carries the selector and the posterior's features.
    pub base: Lm<B>,
    /// Models 1..K-1.
    pub assistants: Vec<Lm<B>>,
    /// The base's reader of z (`None` without z).
    pub base_adapter: Option<ZAdapter<B>>,
    /// Each assistant's reader of z (empty without z or with `assistant_adapters = false`).
    pub assistant_adapters: Vec<ZAdapter<B>>,
    /// q(z | x, c) from the pooled base hidden states (`None` without z).
    pub posterior: Option<GaussianHead<B>>,
    /// p(z | c) (`None` without z).
    pub prior: Option<Prior<B>>,
    /// π(j | ·) over K models (`None` when K = 1).
    pub selector: Option<Selector<B>>,
    /// The bag-of-words head `W z + b` over the vocabulary (`None` unless
    /// `config.bag_of_words > 0`).
    pub bag_of_words: Option<Linear<B>>,
    /// The switches.
    #[module(skip)]
    pub config: ChorusConfig,
}

/// `module` with every parameter frozen (no gradient), as `Module::no_grad`, but without drawing
/// the initial values of parameters not yet initialised: a skeleton built to load a checkpoint
/// into stays lazy until the record replaces its values (burn's `no_grad` maps every tensor,
/// which draws SmolLM2's 135 M random weights only to discard them).
fn frozen<B: Backend, M: Module<B>>(module: M) -> M {
    struct Freeze;
    impl<B: Backend> ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}

impl<B: Backend> Chorus<B> {
    /// Assembles a joint model around existing LMs. Rejects a config out of range and models whose
    /// vocabularies differ. Assistants are frozen unless `config.train_assistants`, the base
    /// unless `config.train_base`.
    pub fn new(
        config: ChorusConfig,
        base: Lm<B>,
        assistants: Vec<Lm<B>>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Ok(Self::skeleton(config, base, assistants, device)?.number_parameters())
    }

    /// [`Chorus::new`] without its last step: parameters not yet initialised stay so (burn
    /// initialises them lazily), for [`Chorus::load`] to fill from the record without first drawing
    /// values it would discard — SmolLM2's 135 M of them for a frozen assistant. Not for use as a
    /// model: the clone of a lazy parameter draws values of its own.
    pub(crate) fn skeleton(
        config: ChorusConfig,
        base: Lm<B>,
        assistants: Vec<Lm<B>>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let base_dims = base.dims();
        for (i, assistant) in assistants.iter().enumerate() {
            let vocab = assistant.dims().vocab_size;
            if vocab != base_dims.vocab_size {
                return Err(ModelError::VocabMismatch {
                    base: base_dims.vocab_size,
                    assistant: i + 1,
                    vocab,
                });
            }
        }
        if !config.train_base
            && !config.has_z()
            && assistants.is_empty()
            && config.remote_assistants == 0
        {
            return Err(ModelError::Conflict {
                key: "train_base",
                value: "false".into(),
                reason: "with no z and no assistants a frozen base leaves nothing to train: \
                         set train_base = true, d_latent > 0 or add assistants",
            });
        }
        let base = if config.train_base {
            base
        } else {
            frozen(base)
        };
        let assistants: Vec<Lm<B>> = if config.train_assistants {
            assistants
        } else {
            assistants.into_iter().map(frozen).collect()
        };
        let adapter = |dims: &chorus_lm::LmDims| {
            ZAdapterConfig {
                d_latent: config.d_latent,
                memory_slots: config.memory_slots,
                embedding: config.embedding_offset,
            }
            .init(dims, device)
        };
        let (base_adapter, assistant_adapters, posterior, prior) = if config.has_z() {
            let assistant_adapters = if config.assistant_adapters {
                assistants
                    .iter()
                    .map(|a| adapter(&a.dims()))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            let head = GaussianHeadConfig {
                d_hidden: base_dims.d_model,
                d_latent: config.d_latent,
            };
            (
                Some(adapter(&base_dims)?),
                assistant_adapters,
                Some(head.init(device)?),
                Some(
                    config
                        .prior
                        .init(base_dims.d_model, config.d_latent, device)?,
                ),
            )
        } else {
            (None, Vec::new(), None, None)
        };
        let n_models = 1 + assistants.len() + config.remote_assistants;
        let selector = (n_models > 1)
            .then(|| {
                SelectorConfig {
                    d_hidden: base_dims.d_model,
                    n_models,
                    kind: config.selector,
                }
                .init(device)
            })
            .transpose()?;
        let bag_of_words = (config.bag_of_words > 0.0 && config.has_z())
            .then(|| LinearConfig::new(config.d_latent, base_dims.vocab_size).init(device));
        Ok(Self {
            base,
            assistants,
            base_adapter,
            assistant_adapters,
            posterior,
            prior,
            selector,
            bag_of_words,
            config,
        })
    }

    /// A training-free composition of LMs that share a tokenizer: no z, no selector, so only the
    /// rules that need no π decode it ([`crate::WriterStrategy::Confidence`]). Rejects models whose
    /// vocabularies differ (the caller checks that the tokenizers are the same).
    pub fn compose(
        base: Lm<B>,
        assistants: Vec<Lm<B>>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let config = ChorusConfig {
            d_latent: 0,
            ..ChorusConfig::default()
        };
        let mut model = Self::new(config, base, assistants, device)?;
        model.selector = None;
        Ok(model)
    }

    /// Gives every parameter the id of its place in module order (0, 1, …) instead of a random
    /// one. burn serialises parameter ids, so without this two runs that compute the same
    /// parameters would still write different checkpoint bytes, and a checksum could not show
    /// that a resumed run equals an uninterrupted one. Initialises every parameter, so that the
    /// model's clones hold the same values — except the weights a member read for decoding makes
    /// from its blocks ([`Lm::weights_made_on_use`]), whose values are fixed: they stay unmade,
    /// and a model that only decodes holds those matrices once, as blocks.
    fn number_parameters(self) -> Self {
        struct Numbering {
            next: u64,
            made_on_use: HashSet<ParamId>,
        }
        impl<B: Backend> ModuleMapper<B> for Numbering {
            fn map_float<const D: usize>(
                &mut self,
                mut param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let id = ParamId::from(self.next);
                self.next += 1;
                if self.made_on_use.contains(&param.id) {
                    param.id = id;
                    return param;
                }
                let (_, value, mapper) = param.consume();
                Param::from_mapped_value(id, value, mapper)
            }
        }
        let made_on_use = std::iter::once(&self.base)
            .chain(&self.assistants)
            .flat_map(Lm::weights_made_on_use)
            .collect();
        self.map(&mut Numbering {
            next: 0,
            made_on_use,
        })
    }

    /// K, the number of models (local and remote).
    pub fn n_models(&self) -> usize {
        1 + self.assistants.len() + self.config.remote_assistants
    }

    /// The models held in memory: the base and the local assistants, models `0 .. n_local`.
    pub fn n_local(&self) -> usize {
        1 + self.assistants.len()
    }

    /// Model `j` (0 = base) with its z-adapter, as an [`Assistant`] that scores and decodes.
    ///
    /// # Panics
    /// When `j` is not a local model (`j ≥` [`Chorus::n_local`]).
    pub fn member(&self, j: usize) -> LocalLm<'_, B> {
        match j {
            0 => LocalLm {
                lm: &self.base,
                adapter: self.base_adapter.as_ref(),
            },
            j => LocalLm {
                lm: &self.assistants[j - 1],
                adapter: self.assistant_adapters.get(j - 1),
            },
        }
    }

    /// q(z | x, c) and p(z | c) for a batch (`None` without z), from one unconditioned base pass:
    /// the base is causal, so its hidden states at context positions see the context only.
    pub fn latent_distributions(
        &self,
        batch: &ChorusBatch<B>,
    ) -> Result<Option<LatentDistributions<B>>, ModelError> {
        let (Some(posterior), Some(prior)) = (&self.posterior, &self.prior) else {
            return Ok(None);
        };
        let [n_rows, _] = batch.tokens.dims();
        let device = batch.tokens.device();
        // The base's unconditioned hidden states feed both the posterior (pooled over every
        // non-padding position) and the conditional prior (pooled over the context).
        let input = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
        let hidden = self.base.forward(input, None)?.hidden;
        let features = masked_mean_pool(hidden.clone(), batch.padding.clone().bool_not().float());
        let q = posterior.forward(features);
        let context_present = batch
            .context_mask
            .clone()
            .sum_dim(1)
            .squeeze_dim::<1>(1)
            .greater_elem(0.0)
            .float();
        let context = Some((
            masked_mean_pool(hidden, batch.context_mask.clone()),
            context_present,
        ));
        let p = prior.forward(n_rows, context, &device);
        Ok(Some(LatentDistributions {
            // The control without a posterior: q(z | x, c) := p(z | c) ([`Chorus::noise`] then
            // samples it at its mean).
            posterior: if self.config.z_at_prior_mean {
                p.clone()
            } else {
                q
            },
            prior: p,
        }))
    }

    /// Standard-normal noise `[n_samples, rows, d_latent]` for z = μ + σ ⊙ ε from `draw` (`None`
    /// without z); with `z_at_prior_mean`, one sample of zeros, so that z is the mean.
    fn noise(
        &self,
        rows: usize,
        device: &B::Device,
        draw: impl FnOnce() -> Tensor<B, 3>,
    ) -> Option<Tensor<B, 3>> {
        if !self.config.has_z() {
            None
        } else if self.config.z_at_prior_mean {
            Some(Tensor::zeros([1, rows, self.config.d_latent], device))
        } else {
            Some(draw())
        }
    }

    /// `log p(x | z_s, c)` for each sample, with the per-model log-probs and log π.
    ///
    /// # Shapes
    /// - z: `[n_samples, batch, d_latent]`, or `None` without z (then n_samples = 1)
    /// - output: log_px `[n_samples, batch]`; log_pi and log_p `[n_samples · batch, seq, K]`
    fn log_px(
        &self,
        batch: &ChorusBatch<B>,
        z: Option<Tensor<B, 3>>,
    ) -> Result<SampleLikelihood<B>, ModelError> {
        let [n_rows, seq] = batch.tokens.dims();
        let n_samples = z.as_ref().map_or(1, |z| z.dims()[0]);
        let flat_z = z.map(|z| {
            let [s, b, d] = z.dims();
            z.reshape([s * b, d]) // sample-major rows: s · batch + b
        });
        let repeat2 = |t: Tensor<B, 2>| {
            if n_samples == 1 {
                t
            } else {
                t.repeat_dim(0, n_samples)
            }
        };
        let tokens = if n_samples == 1 {
            batch.tokens.clone()
        } else {
            batch.tokens.clone().repeat_dim(0, n_samples)
        };
        let targets = if n_samples == 1 {
            batch.targets.clone()
        } else {
            batch.targets.clone().repeat_dim(0, n_samples)
        };
        let padding = if n_samples == 1 {
            batch.padding.clone()
        } else {
            batch.padding.clone().repeat_dim(0, n_samples)
        };
        let input = || LmInput::new(tokens.clone()).with_padding(padding.clone());

        let base = self.member(0).forward(input(), flat_z.clone(), None)?;
        let mut log_p = vec![token_log_probs(base.logits, targets.clone())];
        match &batch.assistant_log_probs {
            Some(cached) => {
                let dims = cached.dims();
                let n_assistants = self.n_models() - 1;
                if dims != [n_rows, seq, n_assistants] {
                    return Err(ModelError::BatchShape {
                        tensor: "assistant_log_probs",
                        dims: dims.to_vec(),
                        expected: vec![n_rows, seq, n_assistants],
                    });
                }
                if !self.assistant_adapters.is_empty() {
                    return Err(ModelError::Unsupported {
                        operation: "cached assistant log-probs",
                        reason:
                            "they need assistant_adapters = false (adapted assistants depend on z)"
                                .into(),
                    });
                }
                let cached = if n_samples == 1 {
                    cached.clone()
                } else {
                    cached.clone().repeat_dim(0, n_samples)
                };
                log_p.extend(
                    (0..n_assistants).map(|j| cached.clone().narrow(2, j, 1).squeeze_dim::<2>(2)),
                );
            }
            None => {
                self.check_all_local()?;
                for j in 1..self.n_models() {
                    let lp = if self.assistant_adapters.is_empty() {
                        // Independent of z: run once on the batch and repeat over samples.
                        repeat2(self.member(j).token_log_probs(&batch.score_rows(), None)?)
                    } else {
                        let rows = ScoreRows {
                            tokens: tokens.clone(),
                            targets: targets.clone(),
                            padding: padding.clone(),
                        };
                        self.member(j).token_log_probs(&rows, flat_z.clone())?
                    };
                    log_p.push(lp);
                }
            }
        }
        let log_p = Tensor::stack::<3>(log_p, 2); // [S·B, seq, K]
        let log_pi = match &self.selector {
            Some(selector) => selector.forward(base.hidden),
            None => Tensor::zeros([n_samples * n_rows, seq, 1], &batch.tokens.device()),
        };
        let mask = repeat2(batch.target_mask.clone());
        let ll = mixture_log_likelihood(log_pi.clone(), log_p.clone(), mask);
        let log_px = ll.per_sequence.reshape([n_samples, n_rows]);
        Ok(SampleLikelihood {
            log_px,
            log_pi,
            log_p,
        })
    }

    /// `log p_bow(x | z)` per row ([`bag_of_words_log_likelihood`]) with the head's logits
    /// `W z + b`, averaged over z's samples.
    ///
    /// # Shapes
    /// - z: `[n_samples, batch, d_latent]`
    /// - output: `[batch]`
    fn bag_of_words_log_likelihood(
        &self,
        head: &Linear<B>,
        batch: &ChorusBatch<B>,
        z: Tensor<B, 3>,
    ) -> Tensor<B, 1> {
        let [n_samples, rows, d_latent] = z.dims();
        let logits = head.forward(z.reshape([n_samples * rows, d_latent])); // sample-major rows
        let log_bow = bag_of_words_log_likelihood(
            logits,
            batch.targets.clone().repeat_dim(0, n_samples),
            batch.target_mask.clone().repeat_dim(0, n_samples),
        );
        log_bow
            .reshape([n_samples, rows])
            .mean_dim(0)
            .squeeze_dim::<1>(0)
    }

    /// The ELBO terms with KL weight `beta` (the training loop's schedule at its step,
    /// `train.kl_schedule.beta(step)` in chorus-train), sampling `config.n_samples` z per row from the backend's
    /// RNG.
    pub fn forward_elbo(
        &self,
        batch: &ChorusBatch<B>,
        beta: f64,
    ) -> Result<ChorusOutput<B>, ModelError> {
        let [n_rows, _] = batch.tokens.dims();
        let device = batch.tokens.device();
        let eps = self.noise(n_rows, &device, || {
            Tensor::random(
                [self.config.n_samples, n_rows, self.config.d_latent],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
        });
        self.forward_elbo_with_noise(batch, beta, eps)
    }

    /// [`Chorus::forward_elbo`] with given standard-normal noise `eps` `[n_samples, batch, d_latent]`
    /// (`z = μ + σ ε`), for reproducible estimates and gradient checks.
    pub fn forward_elbo_with_noise(
        &self,
        batch: &ChorusBatch<B>,
        beta: f64,
        eps: Option<Tensor<B, 3>>,
    ) -> Result<ChorusOutput<B>, ModelError> {
        let [n_rows, _] = batch.tokens.dims();
        let device = batch.tokens.device();
        let latent = self.latent_distributions(batch)?;
        let (z, kl, posterior) = match (latent, eps) {
            (
                Some(LatentDistributions {
                    posterior: q,
                    prior: p,
                }),
                Some(eps),
            ) => {
                let z = q.reparameterize(eps);
                let kl = q.kl(&p);
                (Some(z), kl, Some(q))
            }
            (None, _) => (None, Tensor::zeros([n_rows, 1], &device), None),
            (Some(_), None) => {
                return Err(ModelError::InvalidInput {
                    input: "noise",
                    reason: "the model has z but no noise was given".into(),
                });
            }
        };
        let log_bow = match (&self.bag_of_words, &z) {
            (Some(head), Some(z)) => Some(self.bag_of_words_log_likelihood(head, batch, z.clone())),
            _ => None,
        };
        let SampleLikelihood {
            log_px,
            log_pi,
            log_p,
        } = self.log_px(batch, z)?;
        let mut terms = elbo_terms(log_px, kl, beta, self.config.free_bits);
        if let Some(log_bow) = log_bow {
            terms = with_bag_of_words(terms, log_bow, self.config.bag_of_words);
        }
        let first = |t: Tensor<B, 3>| t.narrow(0, 0, n_rows);
        let log_pi = first(log_pi);
        let router = router_posterior(log_pi.clone(), first(log_p));
        Ok(ChorusOutput {
            terms,
            router,
            log_pi,
            posterior,
        })
    }

    /// Importance-weighted `log p̂(x | c)` per row with `n_samples` z from q (DESIGN §3); without z
    /// this is the exact `log p(x | c)`.
    ///
    /// # Shapes
    /// - output: `[batch]`
    pub fn iw_log_likelihood(
        &self,
        batch: &ChorusBatch<B>,
        n_samples: usize,
    ) -> Result<Tensor<B, 1>, ModelError> {
        let latent = self.latent_distributions(batch)?;
        let [rows, _] = batch.tokens.dims();
        let device = batch.tokens.device();
        let noise = self.noise(rows, &device, || {
            Tensor::random(
                [n_samples.max(1), rows, self.config.d_latent],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
        });
        Ok(self.iw_given(batch, latent.as_ref(), noise)?.0)
    }

    /// [`Chorus::iw_log_likelihood`] with q and p already computed and z = μ + σ ⊙ `noise`
    /// (`[n_samples, batch, d_latent]`, given when the model has z); also returns the sample
    /// terms when there is no z (then they are the exact, z-free terms).
    fn iw_given(
        &self,
        batch: &ChorusBatch<B>,
        latent: Option<&LatentDistributions<B>>,
        noise: Option<Tensor<B, 3>>,
    ) -> Result<(Tensor<B, 1>, Option<SampleLikelihood<B>>), ModelError> {
        match latent {
            None => {
                let terms = self.log_px(batch, None)?;
                Ok((terms.log_px.clone().squeeze_dim::<1>(0), Some(terms)))
            }
            Some(LatentDistributions {
                posterior: q,
                prior: p,
            }) => {
                let noise = noise.ok_or_else(|| ModelError::Unsupported {
                    operation: "the importance-weighted bound",
                    reason: "q(z | x, c) without noise to sample it".into(),
                })?;
                let z = q.reparameterize(noise);
                let log_px = self.log_px(batch, Some(z.clone()))?.log_px;
                let iw = iw_log_likelihood(log_px, p.log_prob(z.clone()), q.log_prob(z));
                Ok((iw, None))
            }
        }
    }

    /// What evaluation reads from one batch, with the base's unconditioned pass (q and p) run
    /// once: the importance-weighted bound with `iw_samples` z from q ([`Chorus::iw_log_likelihood`]),
    /// q and p, and with K ≥ 2 the router posterior r_t(j) at z = E q (exact without z).
    ///
    /// Row r's z are drawn with its own generator, `SplitMix64(row_seeds[r])` ([`seeded_noise`]),
    /// so a row's bound depends on its seed, not on the run, its batch or its place in it: give an
    /// example the same seed and a rerun reproduces its score.
    pub fn evaluate_batch(
        &self,
        batch: &ChorusBatch<B>,
        iw_samples: usize,
        row_seeds: &[u64],
    ) -> Result<BatchEvaluation<B>, ModelError> {
        let [rows, _] = batch.tokens.dims();
        if row_seeds.len() != rows {
            return Err(ModelError::InvalidInput {
                input: "row_seeds",
                reason: format!("{} seeds for a batch of {rows} rows", row_seeds.len()),
            });
        }
        let latent = self.latent_distributions(batch)?;
        // With z, the bound and the router below are two passes; assistants that read no z give
        // both the same log-probs, so they run once, here, instead of once per pass.
        let scored;
        let batch = if latent.is_some()
            && self.n_models() > 1
            && self.assistant_adapters.is_empty()
            && batch.assistant_log_probs.is_none()
            && self.config.remote_assistants == 0
        {
            scored = ChorusBatch {
                assistant_log_probs: Some(self.local_assistant_log_probs(batch)?),
                ..batch.clone()
            };
            &scored
        } else {
            batch
        };
        let device = batch.tokens.device();
        let noise = self.noise(rows, &device, || {
            seeded_noise(iw_samples.max(1), row_seeds, self.config.d_latent, &device)
        });
        let (iw, z_free_terms) = self.iw_given(batch, latent.as_ref(), noise)?;
        let router = if self.n_models() > 1 {
            let terms = match z_free_terms {
                Some(terms) => terms,
                None => {
                    let mean = latent
                        .as_ref()
                        .map(|l| l.posterior.mean.clone().unsqueeze_dim(0));
                    self.log_px(batch, mean)?
                }
            };
            Some(router_posterior(terms.log_pi, terms.log_p))
        } else {
            None
        };
        Ok(BatchEvaluation {
            iw_log_likelihood: iw,
            // The control's q is p: no KL, MI or active units to report.
            latent: latent.filter(|_| !self.config.z_at_prior_mean),
            router,
        })
    }

    /// Co-LLM's selector initialisation ([`pseudo_label_loss`], DESIGN §2) on a batch: the models
    /// run without z (cached assistant log-probs are used when the batch has them) and only the
    /// selector receives gradients (the base's hidden states are detached). Also returns the share
    /// of tokens labelled to assistants.
    pub fn selector_pseudo_label_loss(
        &self,
        batch: &ChorusBatch<B>,
    ) -> Result<(Tensor<B, 1>, f64), ModelError> {
        let Some(selector) = &self.selector else {
            return Err(ModelError::Unsupported {
                operation: "selector initialisation",
                reason: "the model has no selector: it needs assistants (K ≥ 2)".into(),
            });
        };
        let plain = LmInput::new(batch.tokens.clone()).with_padding(batch.padding.clone());
        let base = self.base.forward(plain, None)?;
        let lp0 = token_log_probs(base.logits, batch.targets.clone()).detach();
        let assistants = match &batch.assistant_log_probs {
            Some(cached) => cached.clone(),
            None => self.local_assistant_log_probs(batch)?,
        }
        .detach();
        let log_p = Tensor::cat(vec![lp0.unsqueeze_dim::<3>(2), assistants], 2);
        let log_pi = selector.forward(base.hidden.detach()); // [B, T, K]
        Ok(pseudo_label_loss(log_pi, log_p, batch.target_mask.clone()))
    }

    /// `log π(j)` and `log P_j(targets[t])` per position, `[batch, seq, K]` each, with a given z
    /// `[batch, d_latent]` (`None` without z), e.g. the prior mean for decoding-time statistics.
    pub fn token_terms(
        &self,
        batch: &ChorusBatch<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>), ModelError> {
        let terms = self.log_px(batch, z.map(|z| z.unsqueeze_dim::<3>(0)))?;
        Ok((terms.log_pi, terms.log_p))
    }

    /// The assistants' `log P_j(targets[t])` `[batch, seq, n_assistants]`, to store and pass back as
    /// [`ChorusBatch::assistant_log_probs`]. Only for assistants that do not read z.
    pub fn assistant_log_probs(&self, batch: &ChorusBatch<B>) -> Result<Tensor<B, 3>, ModelError> {
        if !self.assistant_adapters.is_empty() {
            return Err(ModelError::Unsupported {
                operation: "scoring the assistants once",
                reason: "assistants with z-adapters have log-probs that depend on z".into(),
            });
        }
        Ok(self.local_assistant_log_probs(batch)?.detach())
    }

    /// `batch` with [`ChorusBatch::assistant_log_probs`] filled in `[batch, seq, K − 1]`: the local
    /// assistants run here, the remote ones asked of `remotes` (this model's remote assistants, in
    /// order). For evaluating or calibrating a model with remote assistants on text that no score
    /// cache covers. Only for assistants that do not read z.
    pub fn with_assistant_log_probs(
        &self,
        mut batch: ChorusBatch<B>,
        remotes: &[&dyn Assistant<B>],
    ) -> Result<ChorusBatch<B>, ModelError> {
        if remotes.len() != self.config.remote_assistants {
            return Err(ModelError::InvalidInput {
                input: "remote assistants",
                reason: format!(
                    "the model has {} remote assistants but {} servers were given",
                    self.config.remote_assistants,
                    remotes.len()
                ),
            });
        }
        if !self.assistant_adapters.is_empty() {
            return Err(ModelError::Unsupported {
                operation: "scoring the assistants once",
                reason: "assistants with z-adapters have log-probs that depend on z".into(),
            });
        }
        let columns = self.assistant_columns(&batch, remotes)?;
        if !columns.is_empty() {
            batch.assistant_log_probs = Some(Tensor::stack::<3>(columns, 2).detach());
        }
        Ok(batch)
    }

    /// `[batch, seq, K − 1]` z-free log-probs of every assistant, run here: all must be local.
    fn local_assistant_log_probs(
        &self,
        batch: &ChorusBatch<B>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.check_all_local()?;
        Ok(Tensor::stack::<3>(self.assistant_columns(batch, &[])?, 2))
    }

    /// `[batch, seq]` z-free log-probs of each local assistant, then of each of `remotes`.
    fn assistant_columns(
        &self,
        batch: &ChorusBatch<B>,
        remotes: &[&dyn Assistant<B>],
    ) -> Result<Vec<Tensor<B, 2>>, ModelError> {
        let rows = batch.score_rows();
        (1..self.n_local())
            .map(|j| self.member(j).token_log_probs(&rows, None))
            .chain(remotes.iter().map(|r| r.token_log_probs(&rows, None)))
            .collect()
    }

    /// An error unless every model is held in memory (remote assistants are known to a batch
    /// only through its cached log-probs).
    pub(crate) fn check_all_local(&self) -> Result<(), ModelError> {
        if self.config.remote_assistants == 0 {
            return Ok(());
        }
        Err(ModelError::InvalidInput {
            input: "assistant_log_probs",
            reason: format!(
                "models {}..{} are served remotely: batches need their cached log-probs \
                 (`chorus score`)",
                self.n_local(),
                self.n_models() - 1
            ),
        })
    }
}

/// Standard-normal noise for z, row by row from its own generator: entry `[s, r, d]` is draw
/// `s · d_latent + d` of `SplitMix64(row_seeds[r])` ([`SplitMix64::standard_normal`]), so a row's
/// noise does not depend on the others, the batch size or the backend's RNG.
///
/// # Shapes
/// - output: `[n_samples, row_seeds.len(), d_latent]`
pub fn seeded_noise<B: Backend>(
    n_samples: usize,
    row_seeds: &[u64],
    d_latent: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let rows = row_seeds.len();
    let mut values = vec![0.0f32; n_samples * rows * d_latent];
    for (r, &seed) in row_seeds.iter().enumerate() {
        let mut rng = SplitMix64(seed);
        for s in 0..n_samples {
            let start = (s * rows + r) * d_latent;
            for v in &mut values[start..start + d_latent] {
                *v = rng.standard_normal() as f32;
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [n_samples, rows, d_latent]), device)
}
