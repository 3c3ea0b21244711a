//! The three tasks, each a list of (context, target) examples with the document they come from.
//! Definitions are in `docs/data.md`; this module is their implementation.

use serde::{Deserialize, Serialize};

use crate::chitchat::Conversation;
use crate::sotu::Address;
use crate::{Split, split_of};

/// Sentences of context in a story-continuation example.
pub const STORY_CONTEXT_SENTENCES: usize = 3;
/// Sentences of target in a story-continuation example.
pub const STORY_TARGET_SENTENCES: usize = 2;
/// Previous turns shown in a dialogue example.
pub const DIALOGUE_HISTORY_TURNS: usize = 4;
/// Sentences per open-ended passage.
pub const OPEN_PASSAGE_SENTENCES: usize = 4;
/// Share of documents in the validation split.
pub const VALID_FRACTION: f64 = 0.05;
/// Share of documents in the test split.
pub const TEST_FRACTION: f64 = 0.05;

/// Which task an example belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Brown fiction: preceding sentences → the next ones.
    Story,
    /// chitchat: previous turns with speaker markers → the next turn.
    Dialogue,
    /// State of the Union + Brown non-fiction passages, empty or first-sentence context.
    OpenEnded,
}

impl Task {
    /// All tasks, in table order.
    pub const ALL: [Task; 3] = [Task::Story, Task::Dialogue, Task::OpenEnded];

    /// The task's name in tables and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Story => "story",
            Task::Dialogue => "dialogue",
            Task::OpenEnded => "open_ended",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task `{s}`: expected story, dialogue or open_ended"))
    }
}

/// One example: the model reads `context` and is scored on `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// The task.
    pub task: Task,
    /// The source document (file name, conversation uuid, address id).
    pub document: String,
    /// The document's split.
    pub split: Split,
    /// What the model reads first (possibly empty).
    pub context: String,
    /// What the model is scored on.
    pub target: String,
}

fn split(document: &str) -> Split {
    split_of(document, VALID_FRACTION, TEST_FRACTION)
}

/// Story continuation: non-overlapping windows of 3 context + 2 target sentences over each fiction
/// document.
pub fn story_examples(document: &str, sentences: &[String]) -> Vec<Example> {
    let window = STORY_CONTEXT_SENTENCES + STORY_TARGET_SENTENCES;
    sentences
        .chunks_exact(window)
        .map(|w| Example {
            task: Task::Story,
            document: document.to_string(),
            split: split(document),
            context: w[..STORY_CONTEXT_SENTENCES].join(" "),
            target: format!(" {}", w[STORY_CONTEXT_SENTENCES..].join(" ")),
        })
        .collect()
}

/// Speaker marker: `A`, `B`, `C`, ... by order of first appearance.
fn marker(speaker: usize) -> char {
    (b'A' + (speaker % 26) as u8) as char
}

/// Dialogue response: for every turn after the first, the previous (up to 4) turns as
/// `"A: …\nB: …\n"` followed by the next speaker's marker `"A:"`; the target is the turn's text.
pub fn dialogue_examples(conversation: &Conversation) -> Vec<Example> {
    (1..conversation.turns.len())
        .map(|k| {
            let first = k.saturating_sub(DIALOGUE_HISTORY_TURNS);
            let mut context: String = conversation.turns[first..k]
                .iter()
                .map(|t| format!("{}: {}\n", marker(t.speaker), t.text))
                .collect();
            context.push(marker(conversation.turns[k].speaker));
            context.push(':');
            Example {
                task: Task::Dialogue,
                document: conversation.id.clone(),
                split: split(&conversation.id),
                context,
                target: format!(" {}", conversation.turns[k].text),
            }
        })
        .collect()
}

/// Open-ended generation: non-overlapping passages of 4 sentences; even passages have an empty
/// context (the model writes all 4 sentences), odd ones get the first sentence as context.
pub fn open_ended_examples(document: &str, sentences: &[String]) -> Vec<Example> {
    sentences
        .chunks_exact(OPEN_PASSAGE_SENTENCES)
        .enumerate()
        .map(|(i, p)| open_ended_example(document, i, p))
        .collect()
}

/// Passage `index` (its [`OPEN_PASSAGE_SENTENCES`] sentences) of [`open_ended_examples`].
fn open_ended_example(document: &str, index: usize, passage: &[String]) -> Example {
    let (context, target) = if index.is_multiple_of(2) {
        (String::new(), passage.join(" "))
    } else {
        (passage[0].clone(), format!(" {}", passage[1..].join(" ")))
    };
    Example {
        task: Task::OpenEnded,
        document: document.to_string(),
        split: split(document),
        context,
        target,
    }
}

/// The open-ended examples of a plain-text file ([`open_ended_examples`] over the sentences of its
/// [`Paragraphs`](crate::Paragraphs)), read one passage at a time: memory holds a paragraph and
/// the sentences of one passage, not the file. The document is the file's path.
pub struct TextFilePassages {
    paragraphs: crate::Paragraphs,
    document: String,
    /// Sentences of the current paragraph not yet in a passage, next first.
    pending: std::collections::VecDeque<String>,
    passage: Vec<String>,
    index: usize,
}

impl TextFilePassages {
    /// Opens `path`; a missing or unreadable file is an error naming it.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self, crate::DataError> {
        let path = path.as_ref();
        Ok(Self {
            paragraphs: crate::Paragraphs::open(path)?,
            document: path.display().to_string(),
            pending: Default::default(),
            passage: Vec::with_capacity(OPEN_PASSAGE_SENTENCES),
            index: 0,
        })
    }
}

impl Iterator for TextFilePassages {
    type Item = Result<Example, crate::DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            while let Some(sentence) = self.pending.pop_front() {
                self.passage.push(sentence);
                if self.passage.len() == OPEN_PASSAGE_SENTENCES {
                    let example = open_ended_example(&self.document, self.index, &self.passage);
                    self.passage.clear();
                    self.index += 1;
                    return Some(Ok(example));
                }
            }
            match self.paragraphs.next()? {
                Ok(paragraph) => self.pending.extend(crate::sentences(&paragraph)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Open-ended examples from one State of the Union address.
pub fn sotu_examples(address: &Address) -> Vec<Example> {
    open_ended_examples(&address.id, &address.sentences)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chitchat::Turn;

    fn sentences(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("Sentence {i}.")).collect()
    }

    #[test]
    fn a_tasks_name_parses_back_to_it() {
        let names: Vec<String> = Task::ALL.iter().map(Task::to_string).collect();
        assert_eq!(names, ["story", "dialogue", "open_ended"]);
        for task in Task::ALL {
            assert_eq!(task.name().parse::<Task>(), Ok(task));
        }
        let err = "stories".parse::<Task>().unwrap_err();
        assert!(err.contains("`stories`"), "{err}");
    }

    #[test]
    fn text_file_passages_stream_the_examples_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("novel.txt");
        // Sentences cross paragraph breaks: 3 + 7 + 5 = 15 sentences, 3 passages, 3 left over.
        let text = [3, 7, 5]
            .iter()
            .scan(0, |next, &n| {
                let p: Vec<String> = (*next..*next + n)
                    .map(|i| format!("Line {i} here."))
                    .collect();
                *next += n;
                Some(p.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        std::fs::write(&file, &text).unwrap();
        let streamed: Vec<Example> = TextFilePassages::open(&file)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let all: Vec<String> = crate::plain_text(&file)
            .unwrap()
            .iter()
            .flat_map(|p| crate::sentences(p))
            .collect();
        let name = file.display().to_string();
        assert_eq!(streamed, open_ended_examples(&name, &all));
        assert_eq!(streamed.len(), 3);
        assert_eq!(streamed[1].context, "Line 4 here.");
        assert!(TextFilePassages::open(dir.path().join("gone.txt")).is_err());
    }

    #[test]
    fn story_windows_never_put_the_target_in_the_context() {
        let examples = story_examples("cn01", &sentences(12));
        assert_eq!(examples.len(), 2); // 12 sentences → two windows of 5, 2 left over
        assert_eq!(examples[0].context, "Sentence 0. Sentence 1. Sentence 2.");
        assert_eq!(examples[0].target, " Sentence 3. Sentence 4.");
        for e in &examples {
            for sentence in e.target.trim().split_inclusive('.') {
                assert!(!e.context.contains(sentence.trim()), "{e:?}");
            }
            assert_eq!(e.split, examples[0].split, "one document, one split");
        }
    }

    #[test]
    fn dialogue_context_has_speaker_markers_and_ends_with_the_next_speaker() {
        let conversation = Conversation {
            id: "c1".into(),
            turns: (0..6)
                .map(|i| Turn {
                    speaker: i % 2,
                    text: format!("turn {i}"),
                })
                .collect(),
        };
        let examples = dialogue_examples(&conversation);
        assert_eq!(examples.len(), 5);
        assert_eq!(examples[0].context, "A: turn 0\nB:");
        assert_eq!(examples[0].target, " turn 1");
        // The last one shows only the 4 previous turns.
        assert_eq!(
            examples[4].context,
            "B: turn 1\nA: turn 2\nB: turn 3\nA: turn 4\nB:"
        );
        assert!(
            examples
                .iter()
                .all(|e| !e.context.contains(e.target.trim()))
        );
    }

    #[test]
    fn open_ended_alternates_empty_and_first_sentence_context() {
        let examples = open_ended_examples("doc", &sentences(9));
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].context, "");
        assert_eq!(
            examples[0].target,
            "Sentence 0. Sentence 1. Sentence 2. Sentence 3."
        );
        assert_eq!(examples[1].context, "Sentence 4.");
        assert_eq!(examples[1].target, " Sentence 5. Sentence 6. Sentence 7.");
    }
}
