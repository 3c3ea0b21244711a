//! One optimiser step, top to bottom: per micro-batch the loss (the negative ELBO at the step's β,
//! or Co-LLM's pseudo-label loss while the selector is initialised) and its gradient divided by
//! the number of micro-batches; then the accumulated gradient's global norm, clipping, and AdamW.

use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use chorus_elbo::posterior_deferral;
use chorus_model::Chorus;

use crate::grads::clip_global_norm;
use crate::metrics::MetricWindow;
use crate::{TokenBatch, TrainError};

/// Sees (and may change) each step's accumulated gradients: `(step, gradients)`.
pub(crate) type GradientHook = dyn Fn(u64, &mut GradientsParams);

/// What a step optimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Objective {
    /// Co-LLM's first phase: the selector's cross-entropy against pseudo-labels.
    SelectorInit,
    /// The negative ELBO with KL weight β.
    Elbo {
        /// β at this step.
        beta: f64,
    },
}

/// The step's settings.
pub(crate) struct StepSettings<'a> {
    /// The optimiser step (0-based), for errors and the gradient hook.
    pub(crate) step: u64,
    /// The learning rate at this step.
    pub(crate) lr: f64,
    /// The selector's learning rate is `lr · selector_lr_scale`.
    pub(crate) selector_lr_scale: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub(crate) grad_clip: f64,
    /// What the step optimises.
    pub(crate) objective: Objective,
    /// Called on the accumulated gradients before they are checked and clipped.
    pub(crate) gradient_hook: Option<&'a GradientHook>,
}

fn non_finite(step: u64, what: String) -> TrainError {
    TrainError::NonFinite {
        step,
        what,
        last_good: None,
    }
}

/// One optimiser step on `micro_batches`; adds the step's sums to `window`. A non-finite loss or
/// gradient norm is [`TrainError::NonFinite`] (without `last_good`: the caller knows it), and the
/// model is not updated.
pub(crate) fn optimiser_step<B, O>(
    model: Chorus<B>,
    optimizer: &mut O,
    micro_batches: &[TokenBatch],
    settings: &StepSettings<'_>,
    window: &mut MetricWindow,
    device: &B::Device,
) -> Result<Chorus<B>, TrainError>
where
    B: AutodiffBackend,
    O: Optimizer<Chorus<B>, B>,
{
    let step = settings.step;
    let n_micro = micro_batches.len() as f64;
    let mut accumulator = GradientsAccumulator::<Chorus<B>>::new();
    for host in micro_batches {
        let batch = host.to_device::<B>(device);
        let loss = match settings.objective {
            Objective::SelectorInit => {
                let (loss, share) = model.selector_pseudo_label_loss(&batch)?;
                window.deferral += share * host.n_targets() as f64;
                loss
            }
            Objective::Elbo { beta } => {
                let out = model.forward_elbo(&batch, beta)?;
                window.deferral += posterior_deferral(out.router, batch.target_mask.clone())
                    .into_scalar()
                    .elem::<f64>();
                window.log_px += out.terms.reconstruction.sum().into_scalar().elem::<f64>();
                window.kl += out.terms.kl.sum().into_scalar().elem::<f64>();
                if let Some(bow) = out.terms.bag_of_words.clone() {
                    *window.bag_of_words.get_or_insert(0.0) +=
                        bow.sum().into_scalar().elem::<f64>();
                }
                window.beta = out.terms.beta;
                out.terms.loss
            }
        };
        let value = loss.clone().into_scalar().elem::<f64>();
        if !value.is_finite() {
            return Err(non_finite(step, format!("loss ({value})")));
        }
        window.loss += value;
        window.rows += host.rows;
        window.tokens += host.n_targets();
        let grads = loss.div_scalar(n_micro).backward();
        accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
    }
    let mut grads = accumulator.grads();
    if let Some(hook) = settings.gradient_hook {
        hook(step, &mut grads);
    }
    let norm = clip_global_norm(&model, &mut grads, settings.grad_clip);
    if !norm.is_finite() {
        return Err(non_finite(step, format!("gradient norm ({norm})")));
    }
    window.grad_norm += norm;
    window.steps += 1;
    // The selector (a fresh head with K outputs on a pretrained base) takes its own step first,
    // at `lr · selector_lr_scale`; AdamW keeps its moments per parameter, so two calls on disjoint
    // parameters are one AdamW step with two learning rates.
    let mut model = model;
    if settings.selector_lr_scale != 1.0
        && let Some(selector) = &model.selector
    {
        let mut selector_grads = GradientsParams::new();
        let weight = selector.proj.weight.id;
        if let Some(g) = grads.remove::<B::InnerBackend, 2>(weight) {
            selector_grads.register(weight, g);
        }
        if let Some(bias) = &selector.proj.bias
            && let Some(g) = grads.remove::<B::InnerBackend, 1>(bias.id)
        {
            selector_grads.register(bias.id, g);
        }
        model = optimizer.step(
            settings.lr * settings.selector_lr_scale,
            model,
            selector_grads,
        );
    }
    Ok(optimizer.step(settings.lr, model, grads))
}
