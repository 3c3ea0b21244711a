//! The chitchat dataset (PyPI `chitchat-dataset`): `dataset.json`, an object uuid →
//! `{prompt, ratings, start, messages}` where `messages` is a list of turns and each turn a list of
//! `{text, sender, timestamp}` messages from one sender.

use serde_json::Value;

use crate::DataError;

/// One turn: consecutive messages of one speaker, joined with spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// 0 for the conversation's first speaker, 1 for the second, ...
    pub speaker: usize,
    /// The turn's text.
    pub text: String,
}

/// One conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Its uuid (the document id for splits).
    pub id: String,
    /// Its turns, in order.
    pub turns: Vec<Turn>,
}

/// Parses `dataset.json`. A conversation whose structure is wrong (messages not a list of lists of
/// objects with a string `text` and `sender`) is an error naming its uuid; conversations with no
/// non-empty turn are dropped. `name` labels errors.
pub fn parse(name: &str, content: &str) -> Result<Vec<Conversation>, DataError> {
    let root: Value = serde_json::from_str(content).map_err(|e| DataError::Malformed {
        file: name.to_string(),
        reason: format!("not JSON: {e}"),
    })?;
    let entries = root.as_object().ok_or_else(|| DataError::Malformed {
        file: name.to_string(),
        reason: "expected an object of conversations by uuid".into(),
    })?;
    let mut out = Vec::new();
    for (id, entry) in entries {
        let bad = |reason: &str| DataError::Malformed {
            file: format!("{name}, conversation {id}"),
            reason: reason.to_string(),
        };
        let turns = entry
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`messages` is not a list"))?;
        let mut senders: Vec<String> = Vec::new();
        let mut conversation = Vec::new();
        for turn in turns {
            let messages = turn
                .as_array()
                .ok_or_else(|| bad("a turn is not a list of messages"))?;
            let mut texts = Vec::new();
            let mut speaker = None;
            for m in messages {
                let text = m
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a message has no string `text`"))?;
                let sender = m
                    .get("sender")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a message has no string `sender`"))?;
                let index = match senders.iter().position(|s| s == sender) {
                    Some(i) => i,
                    None => {
                        senders.push(sender.to_string());
                        senders.len() - 1
                    }
                };
                speaker.get_or_insert(index);
                let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if !text.is_empty() {
                    texts.push(text);
                }
            }
            if let (Some(speaker), false) = (speaker, texts.is_empty()) {
                conversation.push(Turn {
                    speaker,
                    text: texts.join(" "),
                });
            }
        }
        if !conversation.is_empty() {
            out.push(Conversation {
                id: id.clone(),
                turns: conversation,
            });
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            file: name.to_string(),
            reason: "no conversation with a non-empty turn".into(),
        });
    }
    Ok(out)
}
