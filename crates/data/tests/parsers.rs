//! Parsers on small committed excerpts of each real format, malformed entries included.

use chorus_data::{DataError, brown, chitchat, sotu};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn brown_tags_are_stripped_and_punctuation_rejoined() {
    let sentences = brown::parse("ca01", &fixture("brown_ca01.txt")).unwrap();
    assert_eq!(
        sentences[0],
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary \
         election produced \"no evidence\" that any irregularities took place."
    );
    assert!(
        sentences
            .iter()
            .all(|s| !s.contains("/at") && !s.contains("/nn"))
    );
    // The malformed line: an untagged token is kept as it is, the rest is stripped.
    let last = sentences.last().unwrap();
    assert_eq!(last, "This line has a broken token without-a-tag and ends.");
    let err = brown::parse("empty", "\n\n  \n").unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn brown_brackets_open_onto_the_next_word_and_untagged_tokens_stay_whole() {
    // A bracket attaches to the word after it, its closing one to the word before; a token whose
    // only `/` is its first character has no tag and is kept as it is.
    let sentences = brown::parse(
        "cx01",
        "\n\n\tHe/pps left/vbd (/( quietly/rb )/) at/in [/( 9/cd ]/) ,/, /home ./.\n",
    )
    .unwrap();
    assert_eq!(sentences, vec!["He left (quietly) at [9], /home."]);
}

#[test]
fn brown_categories_separate_fiction() {
    let err = brown::parse_categories(&fixture("cats.txt")).unwrap_err();
    assert!(err.to_string().contains("cats.txt line 5"), "{err}");
    let cats =
        brown::parse_categories("ca01 news\ncn01 adventure\ncp01 romance\ncj01 learned\n").unwrap();
    let fiction: Vec<&str> = cats
        .iter()
        .filter(|(_, g)| brown::is_fiction(g))
        .map(|(f, _)| f.as_str())
        .collect();
    assert_eq!(fiction, vec!["cn01", "cp01"]);
    let story = brown::parse("cn01", &fixture("brown_cn01.txt")).unwrap();
    assert!(story.len() > 3);
}

#[test]
fn chitchat_conversations_become_turns_and_malformed_entries_are_named() {
    let text = fixture("chitchat_excerpt.json");
    let err = chitchat::parse("dataset.json", &text).unwrap_err();
    assert!(
        matches!(&err, DataError::Malformed { file, .. } if file.contains("broken-entry")),
        "{err}"
    );
    // Without the broken entry: three conversations (the empty one is dropped), speakers alternate.
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value.as_object_mut().unwrap().remove("broken-entry");
    let conversations = chitchat::parse("dataset.json", &value.to_string()).unwrap();
    assert_eq!(conversations.len(), 3);
    let first = conversations
        .iter()
        .find(|c| c.id == "a07edb12-6b91-4138-b11e-02421888d699")
        .unwrap();
    assert_eq!(first.turns[0].text, "Hello How are you doing today?");
    assert_eq!(first.turns[0].speaker, 0);
    assert_eq!(first.turns[1].speaker, 1);
    assert_eq!(
        first.turns[1].text,
        "whats up MD im doing good how are you doing?"
    );
    for bad in ["{not json", "{}"] {
        let err = chitchat::parse("x.json", bad).unwrap_err().to_string();
        assert!(err.contains("x.json"), "{bad}: {err}");
    }
}

#[test]
fn sotu_addresses_become_sentences() {
    let address = sotu::parse(
        "1790_george_washington_n.txt",
        &fixture("sotu_1790_george_washington_n.txt"),
    )
    .unwrap();
    assert_eq!(address.year, 1790);
    assert_eq!(address.id, "1790_george_washington_n");
    assert!(
        address.sentences[0]
            .starts_with("Fellow-Citizens of the Senate and House of Representatives:")
    );
    assert!(address.sentences.len() > 5);
    let err = sotu::parse("george.txt", "Some text.")
        .unwrap_err()
        .to_string();
    assert!(err.contains("george.txt"), "{err}");
    let err = sotu::parse("1790_x.txt", "   ").unwrap_err().to_string();
    assert!(err.contains("1790_x.txt"), "{err}");
}
