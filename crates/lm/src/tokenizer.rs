//! A thin wrapper over Hugging Face's `tokenizers` with errors that name the files.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::LmError;

/// A text ⇄ token-id mapping shared by every model of a chorus.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` (the Hugging Face format).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, LmError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        if !path.is_file() {
            return Err(LmError::Tokenizer {
                path: source,
                reason: "no such file".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| LmError::Tokenizer {
            path: source.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { inner, source })
    }

    /// Builds a GPT-2-style byte-level BPE from a `vocab.json` (token → id) and a `merges.txt`
    /// (one merge `a b` per line, optional `#version` header).
    pub fn from_bpe_files(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<Self, LmError> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        let source = format!("{} + {}", vocab.display(), merges.display());
        for file in [vocab, merges] {
            if !file.is_file() {
                return Err(LmError::Tokenizer {
                    path: file.display().to_string(),
                    reason: "no such file".into(),
                });
            }
        }
        let bpe = BPE::from_file(&vocab.display().to_string(), &merges.display().to_string())
            .build()
            .map_err(|e| LmError::Tokenizer {
                path: source.clone(),
                reason: e.to_string(),
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()));
        Ok(Self { inner, source })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LmError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error(format!("cannot encode {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, LmError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| self.error(format!("cannot decode {ids:?}: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Where the tokenizer came from (for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Writes a `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), LmError> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| LmError::Tokenizer {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    fn error(&self, reason: String) -> LmError {
        LmError::Tokenizer {
            path: self.source.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Writes a byte-level BPE with every byte as a base token and a few merges.
    fn write_bpe(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        let mut vocab: BTreeMap<String, u32> = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let merges = [
            ("t", "h"),
            ("th", "e"),
            ("Ġ", "the"),
            ("i", "n"),
            ("Ġ", "in"),
        ];
        for (a, b) in merges {
            let id = vocab.len() as u32;
            vocab.insert(format!("{a}{b}"), id);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        std::fs::write(&vocab_path, serde_json::to_string(&vocab).unwrap()).unwrap();
        let merges_text: String = std::iter::once("#version: 0.2\n".to_string())
            .chain(merges.iter().map(|(a, b)| format!("{a} {b}\n")))
            .collect();
        std::fs::write(&merges_path, merges_text).unwrap();
        (vocab_path, merges_path)
    }

    #[test]
    fn bpe_from_vocab_and_merges_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, merges) = write_bpe(dir.path());
        let tokenizer = Tokenizer::from_bpe_files(&vocab, &merges).unwrap();
        assert_eq!(tokenizer.vocab_size(), 256 + 5);
        for text in [
            "the cat in the hat",
            "  spaces\tand\nlines  ",
            "ünïcödé ✓ 123",
            "",
        ] {
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        }
        // The merges apply: "the in the" → [the, Ġin, Ġthe].
        let ids = tokenizer.encode("the in the").unwrap();
        let expected: Vec<u32> = ["the", "Ġin", "Ġthe"]
            .iter()
            .map(|t| tokenizer.token_to_id(t).unwrap())
            .collect();
        assert_eq!(ids, expected);
        // Saved as tokenizer.json and reloaded, it encodes the same.
        let json = dir.path().join("tokenizer.json");
        tokenizer.save(&json).unwrap();
        let reloaded = Tokenizer::from_file(&json).unwrap();
        assert_eq!(reloaded.encode("the in the").unwrap(), expected);
    }

    #[test]
    fn missing_or_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_file(dir.path().join("absent.json")).unwrap_err();
        assert!(err.to_string().contains("absent.json"), "{err}");
        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, "{not json").unwrap();
        let err = Tokenizer::from_file(&broken).unwrap_err();
        assert!(err.to_string().contains("broken.json"), "{err}");
        let (vocab, _) = write_bpe(dir.path());
        let bad_merges = dir.path().join("bad_merges.txt");
        std::fs::write(&bad_merges, "#version: 0.2\nzz qq\n").unwrap();
        let err = Tokenizer::from_bpe_files(&vocab, &bad_merges).unwrap_err();
        assert!(err.to_string().contains("bad_merges.txt"), "{err}");
    }
}
