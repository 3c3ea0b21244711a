//! KL annealing schedules: β as a pure function of the global step.

use serde::{Deserialize, Serialize};

use crate::ElboError;

/// How β_s, the weight of the KL term, moves with the step s. Ramps rise from 0 to 1 and hold 1
/// afterwards; `total_steps` is the length of the schedule (usually the training run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum KlSchedule {
    /// β = `beta` at every step.
    Constant {
        /// The weight.
        beta: f64,
    },
    /// β = min(1, s / warmup_steps).
    Linear {
        /// Steps to reach 1.
        warmup_steps: u64,
    },
    /// Fu et al. 2019: M cycles of length P = total_steps / M; with τ = (s mod P) / P,
    /// β = τ / R while τ < R, then 1. β = 1 after total_steps.
    Cyclical {
        /// Length of the whole schedule.
        total_steps: u64,
        /// M, the number of cycles.
        n_cycles: u32,
        /// R ∈ (0, 1], the share of each cycle spent rising.
        ratio: f64,
    },
    /// Li et al. 2019 as used by Optimus: in each cycle, β = 0 for the first `ratio_zero` of it,
    /// then rises linearly to 1 over the next `ratio_increase`, then holds 1. β = 1 after total_steps.
    ZeroThenLinear {
        /// Length of the whole schedule.
        total_steps: u64,
        /// Number of cycles (Optimus: 1 for pre-training, more for fine-tuning).
        n_cycles: u32,
        /// Share of each cycle at β = 0.
        ratio_zero: f64,
        /// Share of each cycle spent rising.
        ratio_increase: f64,
    },
}

impl KlSchedule {
    /// Checks ranges: β ∈ [0, ∞) finite, ratios in [0, 1] (R > 0), `ratio_zero + ratio_increase ≤ 1`,
    /// at least one cycle and one step.
    pub fn validate(&self) -> Result<(), ElboError> {
        let bad = |key, value: String, expected| {
            Err(ElboError::OutOfRange {
                key,
                value,
                expected,
            })
        };
        let cycles = |kind, n_cycles: u32, total_steps: u64| {
            bad(
                kind,
                format!("{n_cycles} cycles over total_steps = {total_steps}"),
                "1 ≤ n_cycles ≤ total_steps",
            )
        };
        match *self {
            KlSchedule::Constant { beta } if !(beta.is_finite() && beta >= 0.0) => {
                bad("constant.beta", beta.to_string(), "finite and ≥ 0")
            }
            KlSchedule::Linear { warmup_steps: 0 } => bad("linear.warmup_steps", "0".into(), "> 0"),
            KlSchedule::Cyclical {
                total_steps,
                n_cycles,
                ratio,
            } => {
                if total_steps == 0 || n_cycles == 0 || u64::from(n_cycles) > total_steps {
                    cycles("cyclical.n_cycles", n_cycles, total_steps)
                } else if !(ratio > 0.0 && ratio <= 1.0) {
                    bad("cyclical.ratio", ratio.to_string(), "in (0, 1]")
                } else {
                    Ok(())
                }
            }
            KlSchedule::ZeroThenLinear {
                total_steps,
                n_cycles,
                ratio_zero,
                ratio_increase,
            } => {
                if total_steps == 0 || n_cycles == 0 || u64::from(n_cycles) > total_steps {
                    cycles("zero_then_linear.n_cycles", n_cycles, total_steps)
                } else if !((0.0..=1.0).contains(&ratio_zero)
                    && ratio_increase > 0.0
                    && ratio_zero + ratio_increase <= 1.0 + 1e-12)
                {
                    bad(
                        "zero_then_linear.ratio_zero + ratio_increase",
                        format!("{ratio_zero} + {ratio_increase}"),
                        "0 ≤ ratio_zero, 0 < ratio_increase, sum ≤ 1",
                    )
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// β at global step `step` (0-based).
    pub fn beta(&self, step: u64) -> f64 {
        match *self {
            KlSchedule::Constant { beta } => beta,
            KlSchedule::Linear { warmup_steps } => (step as f64 / warmup_steps as f64).min(1.0),
            KlSchedule::Cyclical {
                total_steps,
                n_cycles,
                ratio,
            } => match cycle_position(step, total_steps, n_cycles) {
                None => 1.0,
                Some(tau) => (tau / ratio).min(1.0),
            },
            KlSchedule::ZeroThenLinear {
                total_steps,
                n_cycles,
                ratio_zero,
                ratio_increase,
            } => match cycle_position(step, total_steps, n_cycles) {
                None => 1.0,
                Some(tau) if tau < ratio_zero => 0.0,
                Some(tau) => ((tau - ratio_zero) / ratio_increase).min(1.0),
            },
        }
    }
}

/// τ ∈ [0, 1): the position of `step` within its cycle, or `None` past the schedule's end.
fn cycle_position(step: u64, total_steps: u64, n_cycles: u32) -> Option<f64> {
    if step >= total_steps {
        return None;
    }
    let period = total_steps as f64 / n_cycles as f64;
    let s = step as f64;
    Some((s - (s / period).floor() * period) / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_betas(schedule: &KlSchedule, expected: &[(u64, f64)]) {
        schedule.validate().unwrap();
        for &(step, beta) in expected {
            let got = schedule.beta(step);
            assert!(
                (got - beta).abs() < 1e-12,
                "{schedule:?} at step {step}: {got} ≠ {beta}"
            );
        }
    }

    #[test]
    fn constant_and_linear() {
        assert_betas(
            &KlSchedule::Constant { beta: 0.5 },
            &[(0, 0.5), (1_000_000, 0.5)],
        );
        assert_betas(
            &KlSchedule::Linear { warmup_steps: 100 },
            &[(0, 0.0), (25, 0.25), (99, 0.99), (100, 1.0), (5000, 1.0)],
        );
    }

    #[test]
    fn cyclical_by_hand() {
        // 1000 steps, 4 cycles of 250, rising over the first half (125 steps) of each.
        let s = KlSchedule::Cyclical {
            total_steps: 1000,
            n_cycles: 4,
            ratio: 0.5,
        };
        assert_betas(
            &s,
            &[
                (0, 0.0),
                (50, 0.4),
                (125, 1.0),
                (249, 1.0),
                (250, 0.0),
                (300, 0.4),
                (999, 1.0),
                (1000, 1.0),
            ],
        );
    }

    #[test]
    fn zero_then_linear_by_hand() {
        // Optimus fine-tuning style: 1000 steps, 2 cycles of 500; zero for 150, rise over 250, hold.
        let s = KlSchedule::ZeroThenLinear {
            total_steps: 1000,
            n_cycles: 2,
            ratio_zero: 0.3,
            ratio_increase: 0.5,
        };
        assert_betas(
            &s,
            &[
                (0, 0.0),
                (149, 0.0),
                (150, 0.0),
                (275, 0.5),
                (400, 1.0),
                (499, 1.0),
                (500, 0.0),
                (775, 0.5),
                (1200, 1.0),
            ],
        );
    }

    #[test]
    fn out_of_range_schedules_are_rejected() {
        // Each schedule with the field its message must name.
        let bad = [
            (KlSchedule::Constant { beta: -0.1 }, "beta = -0.1"),
            (KlSchedule::Constant { beta: f64::NAN }, "beta = NaN"),
            (KlSchedule::Linear { warmup_steps: 0 }, "warmup_steps"),
            (
                KlSchedule::Cyclical {
                    total_steps: 10,
                    n_cycles: 0,
                    ratio: 0.5,
                },
                "n_cycles",
            ),
            (
                KlSchedule::Cyclical {
                    total_steps: 10,
                    n_cycles: 2,
                    ratio: 1.5,
                },
                "ratio = 1.5",
            ),
            (
                KlSchedule::ZeroThenLinear {
                    total_steps: 10,
                    n_cycles: 1,
                    ratio_zero: 0.7,
                    ratio_increase: 0.5,
                },
                "ratio_zero",
            ),
        ];
        for (s, field) in bad {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{s:?}: {err}");
        }
        // Each range at its edges, on both sides (`cargo mutants` found these unguarded: ≥ for >,
        // && for ||, and no check of the cycles of zero_then_linear at all).
        let cyclical = |total_steps, n_cycles, ratio| KlSchedule::Cyclical {
            total_steps,
            n_cycles,
            ratio,
        };
        let zero_then_linear =
            |total_steps, n_cycles, ratio_zero, ratio_increase| KlSchedule::ZeroThenLinear {
                total_steps,
                n_cycles,
                ratio_zero,
                ratio_increase,
            };
        for (s, valid) in [
            (cyclical(10, 10, 0.5), true),
            (cyclical(10, 11, 0.5), false),
            (cyclical(0, 1, 0.5), false),
            (cyclical(10, 0, 0.5), false),
            (cyclical(10, 2, 1.0), true),
            (cyclical(10, 2, 0.0), false),
            (zero_then_linear(10, 10, 0.5, 0.5), true),
            (zero_then_linear(10, 11, 0.5, 0.5), false),
            (zero_then_linear(10, 0, 0.5, 0.5), false),
            (zero_then_linear(0, 1, 0.5, 0.5), false),
            (zero_then_linear(10, 1, 0.0, 1.0), true),
            (zero_then_linear(10, 1, 0.5, 0.0), false),
            (zero_then_linear(10, 1, -0.1, 0.5), false),
        ] {
            assert_eq!(s.validate().is_ok(), valid, "{s:?}");
        }
        let parsed: Result<KlSchedule, _> = serde_json::from_str(r#"{"kind":"linear","warmup":5}"#);
        let err = parsed.unwrap_err().to_string();
        assert!(err.contains("unknown field `warmup`"), "{err}");
    }
}
