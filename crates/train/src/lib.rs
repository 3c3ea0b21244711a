//! Training and evaluation for chorus: the data pipeline from examples to padded batches, the
//! assistants' scoring cache, the optimisation loop (AdamW, warm-up + cosine LR, global-norm
//! clipping, gradient accumulation, KL schedule by global step, Co-LLM selector initialisation),
//! atomic checkpoints with exact resume, and evaluation (IW-NLL/PPL, KL, MI, AU, deferral rate).
//!
//! Pre-training a single LM is the same loop on a chorus with K = 1 and no z (plain maximum
//! likelihood), so every feature of the loop serves both.
//!
//! ```no_run
//! use burn::backend::{Autodiff, NdArray};
//! use chorus_train::{Silent, TrainConfig, load_config, train};
//!
//! let config: TrainConfig = load_config(Some("configs/joint.toml".as_ref()), &["train.steps=10".into()])?;
//! let out = "out/joint".as_ref();
//! let summary = train::<Autodiff<NdArray>>(&config, out, false, &Default::default(), &mut Silent)?;
//! println!("best valid NLL/token {:?}", summary.best_valid_nll);
//! # Ok::<(), chorus_train::TrainError>(())
//! ```

mod adamw;
mod batch;
mod checkpoint;
mod config;
mod eval;
mod grads;
mod metrics;
mod progress;
mod run;
mod schedule;
mod scores;
mod step;

pub use adamw::AdamW;
pub use batch::{Encoded, TokenBatch, encode_examples, epoch_batches, load_task_examples};
pub use checkpoint::{
    CheckpointState, best_dir, latest_checkpoint, list_checkpoints, load_chorus, read_state,
};
pub use config::{
    ConfigError, DataConfig, DataSection, OptimConfig, PretrainConfig, TrainConfig, Validate,
    load_config,
};
pub use eval::{
    ACTIVE_UNIT_THRESHOLD, AssistantScores, ChunkedRows, EvalReport, EvalRow, EvalSet,
    ExampleScore, PairedDifference, RouterRecord, TOKEN_CONVENTION, TargetLogProbs, TextFile,
    assistant_scores, evaluate_chorus, evaluate_composition, evaluate_lm, evaluate_oracle,
    paired_difference, uncacheable_assistants,
};
pub use metrics::MetricWindow;
pub use progress::{Progress, Silent};
pub use run::{TrainSummary, pretrain, score, train};
pub use schedule::learning_rate;
pub use scores::{ScoreCache, score_assistants};

use std::path::PathBuf;

/// Errors of `chorus-train`; each names the file, key or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config file or override that does not parse or is out of range.
    #[error("{file}: {reason}")]
    Config {
        /// The config file (or `--set` for overrides).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint that is missing, incomplete or corrupt.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A score cache (`chorus score`'s output) that is missing, incomplete, corrupt or for other
    /// data.
    #[error("score cache {path}: {reason}")]
    ScoreCache {
        /// The cache directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A NaN or infinite loss or gradient: training stopped before the bad update.
    #[error(
        "non-finite {what} at step {step}: training stopped before applying it; {}",
        match last_good {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint had been written yet".to_string(),
        }
    )]
    NonFinite {
        /// The optimiser step.
        step: u64,
        /// Which quantity (loss, gradient norm).
        what: String,
        /// The newest intact checkpoint.
        last_good: Option<PathBuf>,
    },
    /// A dataset with nothing to train or evaluate on.
    #[error("empty dataset: {data}: {reason}")]
    EmptyData {
        /// Which data (a task and split, a file).
        data: String,
        /// What is missing, and what would fix it.
        reason: String,
    },
    /// Evaluations or scores that do not cover the same examples, so cannot be paired or
    /// averaged.
    #[error("{what} cannot be compared: {reason}")]
    Incomparable {
        /// What was compared (the models, the reports).
        what: String,
        /// What differs.
        reason: String,
    },
    /// From the corpora.
    #[error(transparent)]
    Data(#[from] chorus_data::DataError),
    /// From a language model or tokenizer.
    #[error(transparent)]
    Lm(#[from] chorus_lm::LmError),
    /// From the joint model.
    #[error(transparent)]
    Model(#[from] chorus_model::ModelError),
}

impl TrainError {
    /// A [`TrainError::NonFinite`] with the newest intact checkpoint filled in; other errors as
    /// they are.
    pub(crate) fn with_last_good(self, dir: Option<PathBuf>) -> Self {
        match self {
            Self::NonFinite { step, what, .. } => Self::NonFinite {
                step,
                what,
                last_good: dir,
            },
            other => other,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
