//! The learning-rate schedule.

use crate::OptimConfig;

/// Linear warm-up then cosine decay, for 0-based optimiser step `s` of `S = steps`:
///
/// - `s < W`: `lr · (s + 1) / W`
/// - otherwise, with `p = (s − W) / max(1, S − 1 − W)` clamped to [0, 1]:
///   `lr · (m + (1 − m) · (1 + cos(π p)) / 2)`, `m = min_lr_ratio`.
pub fn learning_rate(config: &OptimConfig, step: u64) -> f64 {
    let (w, s) = (config.warmup_steps, config.steps);
    if step < w {
        return config.lr * (step + 1) as f64 / w as f64;
    }
    let span = s.saturating_sub(1).saturating_sub(w).max(1);
    let p = ((step - w) as f64 / span as f64).clamp(0.0, 1.0);
    let m = config.min_lr_ratio;
    config.lr * (m + (1.0 - m) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}
