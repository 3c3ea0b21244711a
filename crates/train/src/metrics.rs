//! The run's metrics: `<out>/metrics.jsonl` and `<out>/metrics.csv`, one row per logged window
//! of steps and one per validation, and the sums behind the next row ([`MetricWindow`]), which
//! checkpoints carry so that a resumed run logs the rows an uninterrupted one would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::TrainError;
use crate::checkpoint::write_atomically;

/// Appends metric rows to `<out>/metrics.jsonl` and `<out>/metrics.csv`.
pub(crate) struct Metrics {
    jsonl: PathBuf,
    csv: PathBuf,
}

const CSV_COLUMNS: [&str; 12] = [
    "step",
    "kind",
    "lr",
    "loss",
    "nll_per_token",
    "kl",
    "beta",
    "deferral",
    "grad_norm",
    "tokens_per_s",
    "valid_nll",
    "bow_nll_per_token",
];

impl Metrics {
    /// Opens the files, keeping the rows up to step `keep_until` (a resumed run rewrites what
    /// followed its checkpoint). A line torn by a kill is dropped; the CSV is rebuilt from the
    /// JSONL; both are replaced atomically, so a kill here loses nothing.
    pub(crate) fn open(out: &Path, keep_until: u64) -> Result<Self, TrainError> {
        let m = Self {
            jsonl: out.join("metrics.jsonl"),
            csv: out.join("metrics.csv"),
        };
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&m.jsonl)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|row| row["step"].as_u64().is_some_and(|s| s <= keep_until))
            .collect();
        let jsonl: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let csv: String = std::iter::once(CSV_COLUMNS.join(","))
            .chain(rows.iter().map(csv_line))
            .map(|l| l + "\n")
            .collect();
        write_atomically(&m.jsonl, &jsonl)?;
        write_atomically(&m.csv, &csv)?;
        Ok(m)
    }

    pub(crate) fn write(&self, row: &serde_json::Value) -> Result<(), TrainError> {
        let append = |path: &Path, line: String| -> Result<(), TrainError> {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| TrainError::io(path, e))?;
            writeln!(f, "{line}").map_err(|e| TrainError::io(path, e))
        };
        append(&self.jsonl, row.to_string())?;
        append(&self.csv, csv_line(row))
    }
}

/// A metrics row as a CSV line of [`CSV_COLUMNS`].
fn csv_line(row: &serde_json::Value) -> String {
    CSV_COLUMNS
        .iter()
        .map(|c| match &row[*c] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The sums behind the next metrics row. Saved with each checkpoint, so that a resumed run logs
/// the same rows as an uninterrupted one (only `tokens_per_s`, a wall-clock rate, differs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct MetricWindow {
    /// Σ loss over micro-batches.
    pub loss: f64,
    /// Σ log p(x | z, c) over rows.
    pub log_px: f64,
    /// Σ KL over rows.
    pub kl: f64,
    /// Rows seen.
    pub rows: usize,
    /// Target tokens seen.
    pub tokens: usize,
    /// Σ posterior deferral over target tokens.
    pub deferral: f64,
    /// β at the last step.
    pub beta: f64,
    /// Σ gradient norm over steps.
    pub grad_norm: f64,
    /// Optimiser steps in the window.
    pub steps: u64,
    /// Σ log p_bow(x | z) over rows, for a model with the bag-of-words term (`None` without it;
    /// absent from checkpoints written before it existed).
    #[serde(default)]
    pub bag_of_words: Option<f64>,
    /// When this process started filling it (not saved).
    #[serde(skip)]
    pub(crate) started: Option<Instant>,
}

impl MetricWindow {
    /// The `train` (or `selector_init`) metrics row at `step` and its progress line: means over
    /// the window's micro-batches (loss), target tokens (NLL, deferral), rows (KL) and steps
    /// (gradient norm).
    pub(crate) fn row(
        &self,
        step: u64,
        lr: f64,
        selector_phase: bool,
        accumulation: u64,
    ) -> (serde_json::Value, String) {
        let secs = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let tokens = self.tokens.max(1) as f64;
        let batches = (self.steps * accumulation) as f64;
        let tokens_per_s = self.tokens as f64 / secs.max(1e-9);
        let mut row = serde_json::json!({
            "step": step,
            "kind": if selector_phase { "selector_init" } else { "train" },
            "lr": lr,
            "loss": self.loss / batches,
            "nll_per_token": (!selector_phase).then(|| -self.log_px / tokens),
            "kl": (!selector_phase).then(|| self.kl / self.rows.max(1) as f64),
            "beta": (!selector_phase).then_some(self.beta),
            "deferral": self.deferral / tokens,
            "grad_norm": self.grad_norm / self.steps as f64,
            "tokens_per_s": tokens_per_s,
        });
        // −log p_bow per target token: what the bag-of-words head leaves unexplained of the words.
        let bow_nll = self.bag_of_words.map(|b| -b / tokens);
        if let (Some(bow), false) = (bow_nll, selector_phase) {
            row["bow_nll_per_token"] = serde_json::json!(bow);
        }
        let line = if selector_phase {
            format!(
                "selector-init loss {:.3} | pseudo-labels to assistants {:.1}% | {tokens_per_s:.0} tok/s",
                self.loss / batches,
                100.0 * self.deferral / tokens,
            )
        } else {
            format!(
                "loss {:.3} | nll/tok {:.3} | KL {:.2} | β {:.2} | defer {:.1}% | {tokens_per_s:.0} tok/s",
                self.loss / batches,
                -self.log_px / tokens,
                self.kl / self.rows.max(1) as f64,
                self.beta,
                100.0 * self.deferral / tokens,
            ) + &bow_nll.map_or(String::new(), |b| format!(" | bow nll/tok {b:.3}"))
        };
        (row, line)
    }
}
