//! `chorus data fetch|stats`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use chorus_data::{Split, Task, fetch::cache_dir, fetch_corpora, load_examples};
use chorus_lm::{GgufFile, Tokenizer};

pub fn fetch(models: bool) -> Result<()> {
    let cache = cache_dir();
    for dir in fetch_corpora(&cache)? {
        println!("ready  {}", dir.display());
    }
    if models {
        println!("ready  {}", chorus_data::fetch_smollm2(&cache)?.display());
    }
    Ok(())
}

/// One line of the stats table.
#[derive(Default)]
struct Row<'a> {
    documents: std::collections::BTreeSet<&'a str>,
    examples: usize,
    context: usize,
    target: usize,
}

pub fn stats(tokenizer: Option<&Path>) -> Result<()> {
    // The tokenizer first: a bad path fails before the corpora are read.
    let tokenizer = match tokenizer {
        None => None,
        Some(p) if p.extension().is_some_and(|e| e == "gguf") => {
            Some(Tokenizer::from_gguf(&GgufFile::open(p)?)?)
        }
        Some(p) if p.is_file() => Some(Tokenizer::from_file(p)?),
        Some(p) => bail!("{}: no such tokenizer.json or .gguf file", p.display()),
    };
    let cache = cache_dir();
    let examples = load_examples(&cache)?;
    let mut table: BTreeMap<(Task, &str), Row> = BTreeMap::new();
    for e in &examples {
        let split = match e.split {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        };
        let count = |text: &str| -> Result<usize> {
            Ok(match &tokenizer {
                Some(t) => t.encode(text)?.len(),
                None => text.split_whitespace().count(),
            })
        };
        let row = table.entry((e.task, split)).or_default();
        row.documents.insert(&e.document);
        row.examples += 1;
        row.context += count(&e.context)?;
        row.target += count(&e.target)?;
    }
    let unit = if tokenizer.is_some() {
        "tokens"
    } else {
        "words"
    };
    println!("cache: {}", cache.display());
    println!(
        "{:<12}{:<7}{:>10}{:>10}{:>16}{:>16}",
        "task",
        "split",
        "documents",
        "examples",
        format!("context {unit}"),
        format!("target {unit}")
    );
    for ((task, split), row) in &table {
        println!(
            "{:<12}{:<7}{:>10}{:>10}{:>16}{:>16}",
            task.name(),
            split,
            row.documents.len(),
            row.examples,
            row.context,
            row.target
        );
    }
    Ok(())
}
