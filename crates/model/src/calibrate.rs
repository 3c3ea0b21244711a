//! η calibration for Co-LLM's threshold rule (DESIGN §4): on validation text, with z at the prior
//! mean (as decoding uses it), collect `π* = max_{j≥1} π_j` at every target token; candidate η are
//! quantiles of π*, plus η = 0 (always defer) and η = 1 (never): the quantiles alone cannot
//! defer the tokens at the smallest π*, so when π* barely varies they could not express "always
//! defer"; each is scored by the NLL of *hard* routing — token t scored by the assistant
//! `j* = argmax_{j≥1} π_j` (the first of ties, as decoding takes it) when `π* > η`, else by the
//! base — and the lowest wins. The result is stored next to the model as `decoding.json` and is
//! `chorus generate`'s default η.

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::decode::argmax;
use crate::{Chorus, ChorusBatch, ModelError};

/// File name of the calibration inside a checkpoint directory.
pub const DECODING_FILE: &str = "decoding.json";

/// One candidate η.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EtaCandidate {
    /// The quantile of π* it came from (`None` for the extremes η = 0, always defer, and η = 1,
    /// never defer).
    pub quantile: Option<f64>,
    /// η.
    pub eta: f64,
    /// Validation NLL per token of hard threshold routing.
    pub nll: f64,
    /// Share of validation tokens routed to assistants.
    pub deferral: f64,
}

/// The chosen η and every candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EtaCalibration {
    /// The η with the lowest validation NLL.
    pub eta: f64,
    /// Target tokens it was measured on.
    pub tokens: usize,
    /// All candidates, in quantile order.
    pub candidates: Vec<EtaCandidate>,
}

impl EtaCalibration {
    /// Reads `decoding.json` from a model directory, if present.
    pub fn load(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(DECODING_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Checkpoint {
                path,
                reason: format!("not an η calibration: {e}"),
            })
    }

    /// Writes `decoding.json` into a model directory (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(DECODING_FILE);
        let tmp = dir.join(format!("{DECODING_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(self).expect("serializes"),
        )
        .map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::io(&path, e))
    }
}

impl<B: Backend> Chorus<B> {
    /// Calibrates η for [`crate::WriterStrategy::Threshold`] on validation `batches` (see the
    /// module docs). Needs a selector (K ≥ 2).
    pub fn calibrate_eta(
        &self,
        batches: impl IntoIterator<Item = ChorusBatch<B>>,
    ) -> Result<EtaCalibration, ModelError> {
        let model = self;
        let k = model.n_models();
        if model.selector.is_none() {
            return Err(ModelError::Unsupported {
            operation: "η calibration",
            reason: "the model has no selector (no assistants to defer to, or a training-free composition)".into(),
        });
        }
        // Per target token: (π*, log P_base, log P_{j*}).
        let mut tokens: Vec<(f64, f64, f64)> = Vec::new();
        for batch in batches {
            let z = model.latent_distributions(&batch)?.map(|l| l.prior.mean);
            let (log_pi, log_p) = model.token_terms(&batch, z)?;
            let [rows, seq, _] = log_pi.dims();
            let host = |t: Tensor<B, 3>| -> Vec<f64> {
                t.into_data()
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .expect("f64 data")
            };
            let (pi, lp) = (host(log_pi.exp()), host(log_p));
            let mask: Vec<f32> = batch
                .target_mask
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 data");
            for i in 0..rows * seq {
                if mask[i] == 0.0 {
                    continue;
                }
                let row = &pi[i * k..(i + 1) * k];
                let j = 1 + argmax(&row[1..]);
                tokens.push((row[j], lp[i * k], lp[i * k + j]));
            }
        }
        if tokens.is_empty() {
            return Err(ModelError::Unsupported {
                operation: "η calibration",
                reason: "the validation batches have no target tokens".into(),
            });
        }
        let mut sorted: Vec<f64> = tokens.iter().map(|t| t.0).collect();
        sorted.sort_by(f64::total_cmp);
        let quantile = |q: f64| sorted[((q * (sorted.len() - 1) as f64).round()) as usize];
        let score = |eta: f64| {
            let (mut nll, mut deferred) = (0.0, 0usize);
            for &(p, base, assistant) in &tokens {
                if p > eta {
                    nll -= assistant;
                    deferred += 1;
                } else {
                    nll -= base;
                }
            }
            (
                nll / tokens.len() as f64,
                deferred as f64 / tokens.len() as f64,
            )
        };
        let (nll, deferral) = score(0.0);
        let mut candidates = vec![EtaCandidate {
            quantile: None,
            eta: 0.0,
            nll,
            deferral,
        }];
        candidates.extend(
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
                .into_iter()
                .map(|q| {
                    let eta = quantile(q);
                    let (nll, deferral) = score(eta);
                    EtaCandidate {
                        quantile: Some(q),
                        eta,
                        nll,
                        deferral,
                    }
                }),
        );
        let (nll, deferral) = score(1.0);
        candidates.push(EtaCandidate {
            quantile: None,
            eta: 1.0,
            nll,
            deferral,
        });
        let best = candidates
            .iter()
            .min_by(|a, b| a.nll.total_cmp(&b.nll))
            .expect("candidates");
        Ok(EtaCalibration {
            eta: best.eta,
            tokens: tokens.len(),
            candidates,
        })
    }
}
