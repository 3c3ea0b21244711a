//! A thin wrapper over Hugging Face's `tokenizers` with errors that name the files.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::{GgufFile, GgufValue, LmError};

/// llama.cpp's token type for control tokens (`<|im_start|>`, ...).
const GGUF_TOKEN_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined added tokens.
const GGUF_TOKEN_USER_DEFINED: i64 = 4;

/// The Hugging Face file beside `tokenizer.json` that names the special tokens (chorus reads and
/// writes its `bos_token`).
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// A text ⇄ token-id mapping shared by every model of a chorus.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    chat_template: Option<String>,
    /// The beginning-of-sequence id a GGUF names (`tokenizer.ggml.bos_token_id`).
    bos: Option<u32>,
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
        let text = std::fs::read_to_string(path).map_err(|e| LmError::Tokenizer {
            path: source.clone(),
            reason: e.to_string(),
        })?;
        // Syntax first: tokenizers 0.23 panics (`expect("Helper")`) on a syntax error inside the
        // decoder instead of returning an error.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| LmError::Tokenizer {
            path: source.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        let mut inner: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| LmError::Tokenizer {
                    path: source.clone(),
                    reason: e.to_string(),
                })?;
        // chorus pads and truncates its own batches (MiniLM's file pads every text to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| LmError::Tokenizer {
                path: source.clone(),
                reason: e.to_string(),
            })?;
        let mut tokenizer = Self {
            inner,
            source,
            chat_template: None,
            bos: None,
        };
        tokenizer.bos = tokenizer.bos_from_config(&path.with_file_name(TOKENIZER_CONFIG))?;
        Ok(tokenizer)
    }

    /// The BOS named by `bos_token` in a Hugging Face `tokenizer_config.json` (a string or
    /// `{"content": …}`), if the file is there and names one.
    fn bos_from_config(&self, config: &Path) -> Result<Option<u32>, LmError> {
        if !config.is_file() {
            return Ok(None);
        }
        let bad = |reason: String| LmError::Tokenizer {
            path: config.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(config).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let token = match &value["bos_token"] {
            serde_json::Value::String(s) => s.as_str(),
            serde_json::Value::Object(o) => match o.get("content") {
                Some(serde_json::Value::String(s)) => s.as_str(),
                _ => return Err(bad("bos_token has no string `content`".into())),
            },
            _ => return Ok(None),
        };
        self.token_to_id(token)
            .map(Some)
            .ok_or_else(|| bad(format!("bos_token {token:?} is not in the vocabulary")))
    }

    /// Opens a `tokenizer.json`, the tokenizer inside a `.gguf` file, or the `tokenizer.json` of a
    /// model directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LmError> {
        let path = path.as_ref();
        if path.extension().is_some_and(|e| e == "gguf") {
            Self::from_gguf(&GgufFile::open(path)?)
        } else if path.is_dir() {
            Self::from_file(path.join("tokenizer.json"))
        } else {
            Self::from_file(path)
        }
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
        Ok(Self {
            inner,
            source,
            chat_template: None,
            bos: None,
        })
    }

    /// The byte-level BPE stored in a GGUF file (`tokenizer.ggml.model = gpt2`): vocabulary, merges,
    /// control tokens as special tokens, the pre-tokenizer named by `tokenizer.ggml.pre`, and the
    /// chat template.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LmError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(g.error(format!(
                "tokenizer model `{model}` is not supported (gpt2-style BPE is)"
            )));
        }
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = g
            .get_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        g.error(format!("merge `{m}` is not two space-separated tokens"))
                    })
            })
            .collect::<Result<_, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let source = g.path().display().to_string();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| g.error(format!("tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // llama.cpp splits digits one by one before the GPT-2 regex for these.
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(g.error(format!(
                    "pre-tokenizer `{other}` is not supported (gpt2, smollm are)"
                )));
            }
        };
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevel::default()));
        if let Ok(GgufValue::Array(types)) = g.get("tokenizer.ggml.token_type") {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| {
                    matches!(
                        t,
                        GgufValue::Int(GGUF_TOKEN_CONTROL | GGUF_TOKEN_USER_DEFINED)
                    )
                })
                .map(|(_, tok)| AddedToken::from(tok.to_string(), true))
                .collect();
            inner
                .add_special_tokens(special)
                .map_err(|e| g.error(format!("special tokens: {e}")))?;
        }
        let chat_template = g
            .get_str("tokenizer.chat_template")
            .ok()
            .map(str::to_string);
        let bos = g
            .get_uint("tokenizer.ggml.bos_token_id")
            .ok()
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| (id as usize) < tokens.len());
        Ok(Self {
            inner,
            source,
            chat_template,
            bos,
        })
    }

    /// Trains a GPT-2-style byte-level BPE with `vocab_size` ids (special tokens included, listed
    /// first so they get ids 0, 1, ...) on `texts`. Deterministic for a given input.
    pub fn train_bpe<I, S>(
        texts: I,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self, LmError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let source = format!("byte-level BPE trained to {vocab_size} tokens");
        let error = |reason: String| LmError::Tokenizer {
            path: source.clone(),
            reason,
        };
        let alphabet = ByteLevel::alphabet().len();
        if vocab_size < alphabet + special_tokens.len() {
            return Err(error(format!(
                "vocab_size {vocab_size} is below the {alphabet} byte symbols plus {} special tokens",
                special_tokens.len()
            )));
        }
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(
                special_tokens
                    .iter()
                    .map(|t| AddedToken::from(t.to_string(), true))
                    .collect(),
            )
            .build()
            .into();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()));
        inner
            .train(&mut trainer, texts)
            .map_err(|e| error(e.to_string()))?;
        inner
            .add_special_tokens(
                special_tokens
                    .iter()
                    .map(|t| AddedToken::from(t.to_string(), true)),
            )
            .map_err(|e| error(e.to_string()))?;
        Ok(Self {
            inner,
            source,
            chat_template: None,
            bos: None,
        })
    }

    /// The beginning-of-sequence id the model file names (GGUF only), if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The Jinja chat template that came with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Fails unless `other` maps text to ids and back exactly as `self` does: same vocabulary,
    /// same model (merges and options), same added tokens, normaliser, pre-tokenizer,
    /// post-processor and decoder. Models of one chorus must share a tokenizer. (Vocabulary and
    /// merges alone are not enough: GGUF's `gpt2` and `smollm` pre-tokenizers share both and split
    /// "12" differently.)
    pub fn check_same(&self, other: &Tokenizer) -> Result<(), LmError> {
        let mismatch = |reason: String| LmError::TokenizerMismatch {
            first: self.source.clone(),
            second: other.source.clone(),
            reason,
        };
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Err(mismatch(format!("{} vs {} tokens", a.len(), b.len())));
        }
        let mut differing: Vec<&String> = a
            .iter()
            .filter(|(tok, id)| b.get(*tok) != Some(id))
            .map(|(t, _)| t)
            .collect();
        differing.sort();
        if let Some(token) = differing.first() {
            return Err(mismatch(format!(
                "token {token:?} has id {} vs {:?}",
                a[*token],
                b.get(*token)
            )));
        }
        let as_json = |t: &tokenizers::Tokenizer| -> Result<serde_json::Value, LmError> {
            let text = t.to_string(false).map_err(|e| mismatch(e.to_string()))?;
            serde_json::from_str(&text).map_err(|e| mismatch(e.to_string()))
        };
        let (ja, jb) = (as_json(&self.inner)?, as_json(&other.inner)?);
        let (ma, mb) = (&ja["model"]["merges"], &jb["model"]["merges"]);
        if ma != mb {
            let (la, lb) = (
                ma.as_array().map_or(0, Vec::len),
                mb.as_array().map_or(0, Vec::len),
            );
            return Err(mismatch(format!("merges differ ({la} vs {lb} merges)")));
        }
        // Every other part of the pipeline, by its tokenizer.json key. (Padding and truncation
        // are off in both: chorus pads its own batches.)
        for part in [
            "model",
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
        ] {
            if ja[part] != jb[part] {
                let brief = |v: &serde_json::Value| {
                    let s = v.to_string();
                    if s.chars().count() > 120 {
                        format!("{}…", s.chars().take(120).collect::<String>())
                    } else {
                        s
                    }
                };
                return Err(mismatch(format!(
                    "the {} differs: {} vs {}",
                    part.replace('_', "-"),
                    brief(&ja[part]),
                    brief(&jb[part])
                )));
            }
        }
        Ok(())
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LmError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error(format!("cannot encode {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with the tokenizer's own special tokens (BERT's `[CLS] … [SEP]`), as
    /// encoders expect.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, LmError> {
        let encoding = self
            .inner
            .encode(text, true)
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
    ///
    /// A tokenizer that names a BOS (a GGUF's does) also writes `tokenizer_config.json` beside
    /// it with `bos_token`, as Hugging Face does, and [`Tokenizer::from_file`] reads it back:
    /// llama.cpp's server needs the BOS to align its log-probs.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), LmError> {
        let path = path.as_ref();
        let error = |path: &Path, reason: String| LmError::Tokenizer {
            path: path.display().to_string(),
            reason,
        };
        self.inner
            .save(path, false)
            .map_err(|e| error(path, e.to_string()))?;
        if let Some(bos) = self.bos {
            let config = path.with_file_name(TOKENIZER_CONFIG);
            let token = self
                .inner
                .id_to_token(bos)
                .ok_or_else(|| error(&config, format!("BOS id {bos} is not in the vocabulary")))?;
            let text = serde_json::json!({ "bos_token": token }).to_string();
            let tmp = config.with_extension("json.tmp");
            std::fs::write(&tmp, text).map_err(|e| error(&tmp, e.to_string()))?;
            std::fs::rename(&tmp, &config).map_err(|e| error(&config, e.to_string()))?;
        }
        Ok(())
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
    fn trained_bpe_round_trips_and_saves() {
        let texts = [
            "the cat sat on the mat",
            "the dog sat on the log",
            "a cat and a dog",
        ];
        let tok =
            Tokenizer::train_bpe(texts.iter().cycle().take(30), 300, &["<|endoftext|>"]).unwrap();
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 256);
        let ids = tok.encode("the cat sat<|endoftext|>").unwrap();
        assert_eq!(*ids.last().unwrap(), 0);
        assert!(
            ids.len() < "the cat sat".len(),
            "merges were learned: {ids:?}"
        );
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sat<|endoftext|>");
        // Without a post-processor there is nothing of its own to add.
        assert_eq!(
            tok.encode_with_special_tokens("the dog").unwrap(),
            tok.encode("the dog").unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        back.check_same(&tok).unwrap();
        assert_eq!(
            back.encode("the dog").unwrap(),
            tok.encode("the dog").unwrap()
        );
        let err = Tokenizer::train_bpe(texts.iter(), 100, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab_size 100 is below"), "{err}");
        // The bound is the 256 byte symbols plus the special tokens: exactly that is enough.
        let specials = ["<|endoftext|>", "<pad>"];
        let exact = Tokenizer::train_bpe(texts.iter(), 258, &specials).unwrap();
        assert_eq!(exact.vocab_size(), 258);
        let err = Tokenizer::train_bpe(texts.iter(), 257, &specials)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vocab_size 257 is below the 256 byte symbols plus 2 special tokens"),
            "{err}"
        );
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
