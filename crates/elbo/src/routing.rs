//! The writer's side of the objective: Co-LLM's pseudo-label loss for the selector, and the
//! posterior deferral rate.

use burn::prelude::*;

/// Co-LLM's selector initialisation (DESIGN §2): label target t with the assistant
/// `y_t = argmax_{j≥1} log P_j(x_t)` when it beats the base (`log P_{y_t} > log P_0(x_t)`), else with
/// the base (0), and return the class-balanced cross-entropy
/// `−(1 / n_present) Σ_c (1 / n_c) Σ_{t: y_t = c} m_t log π(y_t)` — over the classes that occur
/// (n_present of them), the mean of each class's mean −log π over its n_c scored tokens — with the
/// share of scored tokens labelled to assistants (0 when none is scored).
///
/// # Shapes
/// - log_pi: `[batch, seq, K]`, the selector's log π (gradients flow into it)
/// - log_p: `[batch, seq, K]`, `log P_j(x_t)` with the base at j = 0 (treated as constants)
/// - mask: `[batch, seq]`, 1.0 on scored targets
/// - output: the loss `[1]` and the assistants' share of labels
pub fn pseudo_label_loss<B: Backend>(
    log_pi: Tensor<B, 3>,
    log_p: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, f64) {
    let [_, _, k] = log_p.dims();
    let log_p = log_p.detach();
    let lp0 = log_p.clone().narrow(2, 0, 1).squeeze_dim::<2>(2);
    let assistants = log_p.narrow(2, 1, k - 1);
    let best = assistants.clone().max_dim(2).squeeze_dim::<2>(2);
    let best_j = assistants.argmax(2).squeeze_dim::<2>(2).add_scalar(1);
    let labels = best_j.mask_fill(best.lower_equal(lp0), 0); // [B, T]
    let n = mask.clone().sum().into_scalar().elem::<f64>();
    // w_t = m_t / n_{y_t}: each class that occurs weighs 1 in all.
    let mut weights = mask.zeros_like();
    let mut present = 0usize;
    let mut n_base = 0.0;
    for c in 0..k {
        let is_c = labels.clone().equal_elem(c as i64).float() * mask.clone();
        let n_c = is_c.clone().sum().into_scalar().elem::<f64>();
        if c == 0 {
            n_base = n_c;
        }
        if n_c > 0.0 {
            weights = weights + is_c.div_scalar(n_c);
            present += 1;
        }
    }
    let picked = log_pi
        .gather(2, labels.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2);
    let loss = (picked * weights)
        .sum()
        .neg()
        .div_scalar(present.max(1) as f64);
    let assistant_share = if n > 0.0 { 1.0 - n_base / n } else { 0.0 };
    (loss, assistant_share)
}

/// Posterior deferral summed over scored tokens: `Σ_t m_t (1 − r_t(0))`, r the exact router
/// posterior (`chorus_latent::router_posterior`), so that dividing by `Σ_t m_t` gives the share of
/// tokens the posterior assigns to assistants.
///
/// # Shapes
/// - router: `[batch, seq, K]`, rows summing to 1; mask: `[batch, seq]`
/// - output: `[1]`
pub fn posterior_deferral<B: Backend>(router: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let base = router.narrow(2, 0, 1).squeeze_dim::<2>(2);
    (base.neg().add_scalar(1.0) * mask).sum()
}

/// `max_v softmax(logits)_v = exp(max_v l_v − logsumexp_v l_v)`, each position's top-1
/// probability.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; output: `[batch, seq]`
pub fn top1_probability<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let max = logits.clone().max_dim(2);
    (max - crate::logsumexp(logits, 2))
        .exp()
        .squeeze_dim::<2>(2)
}

/// The confidence rule of training-free compositions (docs/decoding.md), teacher-forced: token t
/// is written by the base (model 0) when its top-1 probability is at least τ, else by the
/// assistant with the highest top-1 probability (the first on ties); returns each token's
/// `log P_{w_t}(x_t)` and its writer `w_t`.
///
/// # Shapes
/// - top1, log_p: `[batch, seq, K]` (K ≥ 2), model 0 the base
/// - output: `[batch, seq]` each
pub fn confidence_routing<B: Backend>(
    top1: Tensor<B, 3>,
    log_p: Tensor<B, 3>,
    tau: f64,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [_, _, k] = top1.dims();
    let base = top1.clone().narrow(2, 0, 1).squeeze_dim::<2>(2);
    let best_assistant = top1
        .narrow(2, 1, k - 1)
        .argmax(2)
        .squeeze_dim::<2>(2)
        .add_scalar(1);
    let writer = best_assistant.mask_fill(base.greater_equal_elem(tau), 0);
    let log_p = log_p
        .gather(2, writer.clone().unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2);
    (log_p, writer)
}
