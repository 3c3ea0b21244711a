//! Scoring with a remote assistant against a fake OpenAI-compatible server on 127.0.0.1 (real TCP,
//! real HTTP) that answers well, drops connections, answers too slowly, returns malformed JSON or
//! tokenizes differently: every failure is one clear error naming the server, the score cache is
//! never readable half-written, and a rerun completes it to exactly the bytes of an uninterrupted
//! run.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use burn::backend::NdArray;
use chorus_lm::Tokenizer;
use chorus_model::fake_server::{self, Dialect, FakeLm, FakeServer, Reply, Request, fake_log_prob};
use chorus_model::{Assistant, RemoteAssistant, RemoteSettings};
use chorus_train::{Encoded, ScoreCache, score_assistants};
use serde_json::json;

type B = NdArray;

/// How the fake server answers `/v1/completions` requests from the `fail_from`-th on.
#[derive(Clone, Copy, PartialEq)]
enum Failure {
    None,
    /// Closes the connection without answering.
    Drop,
    /// Answers after 2 s.
    Slow,
    /// Answers 200 with a body that is not JSON.
    Malformed,
    /// Drops only the `fail_from`-th request (a transient fault).
    DropOnce,
}

/// A vLLM-like server of `tokenizer` (`shift` added to every id its tokenize endpoint gives, to
/// fake another tokenizer) whose `/v1/completions` requests fail as `failure` says.
fn fake_server(tokenizer: Tokenizer, failure: Failure, fail_from: usize, shift: u32) -> FakeServer {
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    FakeServer::start(move |r: &Request| {
        let failing = match failure {
            Failure::None => false,
            Failure::DropOnce => r.n == fail_from,
            _ => r.n >= fail_from,
        };
        match r.path.as_str() {
            "/tokenize" if shift > 0 => {
                let ids = lm
                    .tokenizer
                    .encode(r.body["prompt"].as_str().unwrap())
                    .unwrap();
                let ids: Vec<u32> = ids.into_iter().map(|t| t + shift).collect();
                Reply::json(json!({ "tokens": ids }))
            }
            "/v1/completions" if failing => match failure {
                Failure::Drop | Failure::DropOnce => Reply::Close,
                Failure::Slow => Reply::Hang(Duration::from_secs(2)),
                Failure::Malformed => Reply::Answer(200, r#"{"choices": [{"logprobs": "#.into()),
                Failure::None => unreachable!(),
            },
            _ => lm.reply(r),
        }
    })
}

/// How many `/v1/completions` requests `server` has had.
fn completions(server: &FakeServer) -> usize {
    server.requests("/v1/completions").len()
}

fn examples(tokenizer: &Tokenizer) -> Vec<Encoded> {
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap();
    [
        "the cat sat.",
        "a dog ran to the mat!",
        "what did the dog see?",
        "the log.",
        "a cat ran.",
        "what did the cat sit on?",
        "the dog sat on the log.",
    ]
    .iter()
    .map(|text| {
        let mut tokens = vec![eos];
        tokens.extend(tokenizer.encode(text).unwrap());
        tokens.push(eos);
        Encoded {
            task: chorus_data::Task::Story,
            tokens,
            context_len: 1,
            target_bytes: text.len(),
        }
    })
    .collect()
}

fn settings() -> RemoteSettings {
    RemoteSettings {
        timeout: Duration::from_millis(500),
        retries: 1,
        backoff: Duration::from_millis(10),
        concurrency: 2,
        ..RemoteSettings::default()
    }
}

/// Scores `data` with the assistant behind `url`, batches of 2.
fn score(url: &str, tokenizer: &Tokenizer, data: &[Encoded], dir: &Path) -> Result<(), String> {
    let remote = RemoteAssistant::connect(url, tokenizer, settings()).map_err(|e| e.to_string())?;
    let device = Default::default();
    score_assistants::<B>(
        &[&remote as &dyn Assistant<B>],
        data,
        "fp",
        2,
        dir,
        &device,
        |_| {},
    )
    .map_err(|e| e.to_string())
}

#[test]
fn a_healthy_server_scores_every_target_token() {
    let tok = fake_server::tokenizer();
    let data = examples(&tok);
    let server = fake_server(tok.clone(), Failure::None, 0, 0);
    let dir = tempfile::tempdir().unwrap();
    score(&server.url, &tok, &data, dir.path()).unwrap();
    let cache = ScoreCache::open(dir.path(), "fp").unwrap();
    for (i, e) in data.iter().enumerate() {
        // Target t is row token t + 1, scored at the server's prompt position t + 1.
        let expected: Vec<f32> = (0..e.input_len())
            .map(|t| fake_log_prob(e.tokens[t], e.tokens[t + 1], t + 1) as f32)
            .collect();
        assert_eq!(cache.example(i).unwrap(), expected, "example {i}");
    }
    assert_eq!(completions(&server), data.len());
}

#[test]
fn failures_give_one_clear_error_and_a_cache_that_completes_on_rerun() {
    let tok = fake_server::tokenizer();
    let data = examples(&tok);
    let reference = tempfile::tempdir().unwrap();
    let healthy = fake_server(tok.clone(), Failure::None, 0, 0);
    score(&healthy.url, &tok, &data, reference.path()).unwrap();
    let expected = std::fs::read(reference.path().join("scores.f32")).unwrap();

    for (failure, what) in [
        (Failure::Drop, "no answer after 2 attempts"),
        (Failure::Slow, "no answer after 2 attempts"),
        (Failure::Malformed, "not JSON"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Fails from the 3rd request on: the first batch (2 rows) is written, the second is not.
        let bad = fake_server(tok.clone(), failure, 2, 0);
        let error = score(&bad.url, &tok, &data, dir.path()).unwrap_err();
        assert!(
            error.contains(&bad.url) && error.contains(what),
            "one clear error naming the server: {error}"
        );
        let open = ScoreCache::open(dir.path(), "fp").unwrap_err().to_string();
        assert!(
            open.contains("incomplete: scoring stopped after 2 examples"),
            "{open}"
        );
        // Rerun against a working server: it continues after the 2 scored examples.
        let good = fake_server(tok.clone(), Failure::None, 0, 0);
        score(&good.url, &tok, &data, dir.path()).unwrap();
        assert_eq!(completions(&good), data.len() - 2);
        assert_eq!(
            std::fs::read(dir.path().join("scores.f32")).unwrap(),
            expected
        );
        assert!(!dir.path().join("scores.partial.json").exists());
        ScoreCache::open(dir.path(), "fp").unwrap();
    }
}

#[test]
fn a_dropped_connection_is_retried() {
    let tok = fake_server::tokenizer();
    let data = examples(&tok);
    let server = fake_server(tok.clone(), Failure::DropOnce, 3, 0);
    let dir = tempfile::tempdir().unwrap();
    score(&server.url, &tok, &data, dir.path()).unwrap();
    assert_eq!(completions(&server), data.len() + 1);
    ScoreCache::open(dir.path(), "fp").unwrap();
}

#[test]
fn a_server_that_tokenizes_differently_is_refused() {
    let tok = fake_server::tokenizer();
    let server = fake_server(tok.clone(), Failure::None, 0, 1);
    let error = RemoteAssistant::connect(&server.url, &tok, settings()).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&server.url) && message.contains("tokenizes differently"),
        "{message}"
    );
}

#[test]
fn an_unreachable_server_is_named() {
    let tok = fake_server::tokenizer();
    // A port held on 127.0.0.1 for the whole test, so that no other test's server gets it (a
    // port bound and closed again was once handed to a concurrent test's fake server, which
    // answered); nothing listens on it at 127.0.0.2, which is loopback too.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let url = format!("http://127.0.0.2:{port}");
    let message = RemoteAssistant::connect(&url, &tok, settings())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&url) && message.contains("no answer after 2 attempts"),
        "{message}"
    );
}
