//! Plain text: paragraphs and sentences.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::DataError;

/// Paragraphs of a plain-text file (separated by blank lines; whitespace inside a paragraph is
/// collapsed to single spaces). An empty or missing file is an error naming it.
pub fn plain_text(path: impl AsRef<Path>) -> Result<Vec<String>, DataError> {
    let path = path.as_ref();
    let paragraphs = Paragraphs::open(path)?.collect::<Result<Vec<String>, DataError>>()?;
    if paragraphs.is_empty() {
        return Err(DataError::Empty {
            file: path.display().to_string(),
            reason: "no non-blank text".into(),
        });
    }
    Ok(paragraphs)
}

/// The paragraphs of a plain-text file read one at a time, as [`plain_text`] splits them (a line
/// of whitespace ends a paragraph): memory holds one paragraph, not the file.
pub struct Paragraphs {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
}

impl Paragraphs {
    /// Opens `path`; a missing or unreadable file is an error naming it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self {
            lines: BufReader::new(file).lines(),
            path: path.to_path_buf(),
        })
    }
}

impl Iterator for Paragraphs {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut paragraph = String::new();
        for line in self.lines.by_ref() {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            };
            let mut words = line.split_whitespace().peekable();
            if words.peek().is_none() {
                if paragraph.is_empty() {
                    continue;
                }
                return Some(Ok(paragraph));
            }
            for word in words {
                if !paragraph.is_empty() {
                    paragraph.push(' ');
                }
                paragraph.push_str(word);
            }
        }
        (!paragraph.is_empty()).then_some(Ok(paragraph))
    }
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
        // Closing quotes and brackets after the punctuation stay with their sentence; an opening
        // bracket does not start one.
        assert_eq!(
            sentences("He said \"Stop.\" Then he left. (It was late.) Done."),
            vec!["He said \"Stop.\"", "Then he left. (It was late.)", "Done."]
        );
        // A sentence needs whitespace after its punctuation; trailing whitespace ends the text.
        assert_eq!(
            sentences("It ended.Then it began.  "),
            vec!["It ended.Then it began."]
        );
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
        // A line of spaces ends a paragraph too; paragraphs stream one at a time.
        std::fs::write(&file, "a b\n   \nc\r\n\r\nd").unwrap();
        let streamed: Vec<String> = Paragraphs::open(&file)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(streamed, vec!["a b", "c", "d"]);
        std::fs::write(&file, b"ok\n\n\xff\xfe\n").unwrap();
        let error = plain_text(&file).unwrap_err().to_string();
        assert!(error.contains("a.txt"), "{error}");
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
