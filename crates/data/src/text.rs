//! Plain text: paragraphs and sentences.

use std::path::Path;

use crate::DataError;

/// Paragraphs of a plain-text file (separated by blank lines; whitespace inside a paragraph is
/// collapsed to single spaces). An empty or missing file is an error naming it.
pub fn plain_text(path: impl AsRef<Path>) -> Result<Vec<String>, DataError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect();
    if paragraphs.is_empty() {
        return Err(DataError::Empty {
            file: path.display().to_string(),
            reason: "no non-blank text".into(),
        });
    }
    Ok(paragraphs)
}

/// Splits prose into sentences at `.`, `?` or `!` (optionally followed by closing quotes or
/// brackets) followed by whitespace and an uppercase letter, digit or opening quote. A heuristic:
/// "Mr. Smith" splits wrongly; good enough to cut passages for the tasks.
pub fn sentences(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '?' | '!') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '"' | '\'' | ')' | '”' | '’') {
                end += 1;
            }
            let mut next = end;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let boundary = next > end
                && next < chars.len()
                && (chars[next].is_uppercase()
                    || chars[next].is_ascii_digit()
                    || matches!(chars[next], '"' | '“'));
            if boundary {
                let sentence: String = chars[start..end].iter().collect();
                out.push(sentence.trim().to_string());
                start = next;
                i = next;
                continue;
            }
        }
        i += 1;
    }
    let rest: String = chars[start..].iter().collect();
    if !rest.trim().is_empty() {
        out.push(rest.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_terminal_punctuation() {
        let s = sentences("It rained. Did it? \"Yes!\" he said. 1865 was long. e.g. this stays");
        assert_eq!(
            s,
            vec![
                "It rained.",
                "Did it?",
                "\"Yes!\" he said.",
                "1865 was long. e.g. this stays"
            ]
        );
        assert!(sentences("   ").is_empty());
    }

    #[test]
    fn plain_text_paragraphs_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "One  line\nwraps.\n\n\n\nSecond   paragraph.\n").unwrap();
        assert_eq!(
            plain_text(&file).unwrap(),
            vec!["One line wraps.", "Second paragraph."]
        );
        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "\n \n\t\n").unwrap();
        assert!(
            plain_text(&empty)
                .unwrap_err()
                .to_string()
                .contains("empty.txt")
        );
        assert!(
            plain_text(dir.path().join("missing.txt"))
                .unwrap_err()
                .to_string()
                .contains("missing.txt")
        );
    }
}
