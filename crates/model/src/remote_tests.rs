//! [`RemoteAssistant`] against a fake completions server on 127.0.0.1 (real TCP, real HTTP) that
//! speaks either llama-cpp-python's dialect (`/extras/tokenize`, echoed log-probs aligned only
//! after a BOS) or the OpenAI one (`/tokenize`, as vLLM), and misbehaves on demand: scores and
//! next-token candidates arrive at the right tokens, transient faults are retried with doubling
//! backoff, everything else is one error naming the server and what it did.

use std::time::{Duration, Instant};

use burn::prelude::*;
use chorus_lm::Tokenizer;
use serde_json::{Value, json};

use crate::fake_server::{
    self, Dialect, FakeLm, FakeServer, Handler, Reply, Request, fake_log_prob,
};
use crate::{Assistant, RemoteAssistant, RemoteSettings, ScoreRows, TOKENIZER_PROBE};

/// f64 as the crate's other tests: burn-ndarray 0.21 backends of two element types in one test
/// process read each other's float type (an f64 tensor's data came back F32 while this ran on f32).
type B = burn::backend::NdArray<f64>;

/// A misbehaviour, for tables of them.
type Fault = fn() -> Reply;

/// An edit of a healthy answer's echoed log-probs.
type Edit = fn(&mut Vec<Value>);

/// A byte-level BPE (trained to at most 300 ids) whose `<|endoftext|>` (id 0) is its BOS, read back through
/// `tokenizer_config.json` as from a model directory.
fn tokenizer_with_bos() -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    fake_server::tokenizer()
        .save(dir.path().join("tokenizer.json"))
        .unwrap();
    std::fs::write(
        dir.path().join(chorus_lm::TOKENIZER_CONFIG),
        r#"{"bos_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(0));
    tokenizer
}

fn settings() -> RemoteSettings {
    RemoteSettings {
        timeout: Duration::from_millis(500),
        retries: 2,
        backoff: Duration::from_millis(40),
        concurrency: 2,
        top_logprobs: 5,
        max_seq_len: 16,
    }
}

/// A healthy fake of `dialect` and the assistant connected to it.
fn connected(dialect: Dialect) -> (FakeServer, RemoteAssistant, FakeLm) {
    let tokenizer = tokenizer_with_bos();
    let lm = FakeLm::new(&tokenizer, dialect);
    let served = lm.clone();
    let server = FakeServer::start(move |r| served.reply(r));
    let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings()).unwrap();
    (server, remote, lm)
}

/// The log-probs the fake LM gives `row`'s targets.
fn expected_scores(row: &[u32]) -> Vec<f32> {
    (1..row.len())
        .map(|i| fake_log_prob(row[i - 1], row[i], i) as f32)
        .collect()
}

/// Rows of the fixtures' text, none holding the BOS.
fn rows(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    [
        "the cat sat.",
        "a dog ran to the mat!",
        "what?",
        "the log.",
        "a cat ran.",
    ]
    .iter()
    .map(|t| tokenizer.encode(t).unwrap())
    .collect()
}

/// `n` tokens of whole words, each one token, so that their text tokenizes back to them.
fn words(tokenizer: &Tokenizer, n: usize) -> Vec<u32> {
    let ids: Vec<u32> = [" the", " cat", " sat", " dog"]
        .iter()
        .map(|w| tokenizer.encode(w).unwrap())
        .filter(|ids| ids.len() == 1)
        .map(|ids| ids[0])
        .collect();
    assert!(!ids.is_empty(), "no one-token word");
    ids.into_iter().cycle().take(n).collect()
}

fn message(result: Result<impl std::fmt::Debug, crate::ModelError>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn connecting_reads_the_served_model_and_checks_the_tokenizer() {
    let (server, remote, _) = connected(Dialect::OpenAi);
    assert_eq!(
        <RemoteAssistant as Assistant<B>>::describe(&remote),
        format!("{} (fake-lm)", server.url)
    );
    assert_eq!(
        <RemoteAssistant as Assistant<B>>::vocab_size(&remote),
        tokenizer_with_bos().vocab_size()
    );
    assert_eq!(<RemoteAssistant as Assistant<B>>::max_seq_len(&remote), 15);
    let probe = server.requests("/tokenize");
    assert_eq!(probe.len(), 1);
    assert_eq!(probe[0].body["prompt"], json!(TOKENIZER_PROBE));
    assert!(crate::is_server_url(&server.url) && !crate::is_server_url("models/a.gguf"));

    let tokenizer = tokenizer_with_bos();
    let refuse = |handler: Box<Handler>, tokenizer: &Tokenizer, why: &str| {
        let server = FakeServer::start(handler);
        let error = message(RemoteAssistant::connect(
            &format!("{}/", server.url),
            tokenizer,
            settings(),
        ));
        assert!(
            error.contains(&format!("assistant server {}: ", server.url)) && error.contains(why),
            "{error}"
        );
    };
    // A server that lists no model.
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    refuse(
        Box::new(move |r: &Request| match r.path.as_str() {
            "/v1/models" => Reply::json(json!({"data": []})),
            _ => lm.reply(r),
        }),
        &tokenizer,
        "/v1/models lists no model",
    );
    // One whose tokenizer differs at the probe's fourth token.
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    let local = tokenizer.encode(TOKENIZER_PROBE).unwrap();
    refuse(
        Box::new(move |r: &Request| match r.path.as_str() {
            "/tokenize" => {
                let mut ids = local.clone();
                ids[3] += 1;
                Reply::json(json!({ "tokens": ids }))
            }
            _ => lm.reply(r),
        }),
        &tokenizer,
        &format!(
            "the server tokenizes differently from {} (probe {TOKENIZER_PROBE:?}: {n} ids there, {n} here, first difference at token 3)",
            tokenizer.source(),
            n = tokenizer.encode(TOKENIZER_PROBE).unwrap().len()
        ),
    );
    // One whose tokenize endpoint answers without ids.
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    refuse(
        Box::new(move |r: &Request| match r.path.as_str() {
            "/tokenize" => Reply::json(json!({"tokens": [1, "two"]})),
            _ => lm.reply(r),
        }),
        &tokenizer,
        "tokenize answered without a `tokens` list of ids",
    );
    // llama-cpp-python with a local tokenizer that names no BOS.
    let lm = FakeLm::new(&tokenizer, Dialect::LlamaCppPython);
    refuse(
        Box::new(move |r: &Request| lm.reply(r)),
        &fake_server::tokenizer(),
        "aligned only after a BOS token (its issue #1983)",
    );
    // Neither tokenize endpoint: not a completions server chorus can check.
    refuse(
        Box::new(|r: &Request| match r.path.as_str() {
            "/v1/models" => Reply::json(json!({"data": [{"id": "m"}]})),
            _ => Reply::Answer(404, "{}".into()),
        }),
        &tokenizer,
        "/tokenize: not found (404): is this an OpenAI-compatible completions server?",
    );
    // A tokenize endpoint that keeps failing is not taken for a missing one.
    refuse(
        Box::new(|r: &Request| match r.path.as_str() {
            "/v1/models" => Reply::json(json!({"data": [{"id": "m"}]})),
            _ => Reply::Answer(503, "loading".into()),
        }),
        &tokenizer,
        "/extras/tokenize: no answer after 3 attempts: HTTP 503: loading",
    );
    let error = message(RemoteAssistant::connect(
        "https://127.0.0.1:1",
        &tokenizer,
        settings(),
    ));
    assert!(error.contains("only http:// URLs"), "{error}");
}

/// Both dialects give each target the server's log-prob of that token after its prefix: the
/// llama-cpp-python fake shifts its entries by one unless the prompt starts with the BOS.
#[test]
fn scores_are_the_servers_log_probs_of_each_target_in_both_dialects() {
    for dialect in [Dialect::LlamaCppPython, Dialect::OpenAi] {
        let (server, remote, lm) = connected(dialect);
        for row in rows(&lm.tokenizer) {
            assert_eq!(
                remote.score_row(&row).unwrap(),
                expected_scores(&row),
                "{dialect:?}"
            );
            let sent = server.requests("/v1/completions").pop().unwrap().body;
            let bos = lm.tokenizer.decode(&[0]).unwrap();
            assert_eq!(
                sent["prompt"].as_str().unwrap().starts_with(&bos),
                dialect == Dialect::LlamaCppPython
            );
            assert_eq!(sent["echo"], json!(true));
            assert_eq!(sent["add_special_tokens"], json!(false));
        }
        // Nothing to score: no request.
        let before = server.requests("/v1/completions").len();
        assert!(remote.score_row(&[]).unwrap().is_empty());
        assert!(remote.score_row(&[7]).unwrap().is_empty());
        assert_eq!(server.requests("/v1/completions").len(), before);
    }
    let (_, remote, _) = connected(Dialect::LlamaCppPython);
    let error = message(remote.score_row(&[5, 0, 6]));
    assert!(
        error.contains("holds the BOS token 0 at position 1"),
        "{error}"
    );
}

/// Rows up to the server's context window less the generated token are sent; longer ones are
/// refused before sending. A leading BOS counts.
#[test]
fn rows_longer_than_the_servers_window_are_refused_before_sending() {
    for (dialect, fits) in [(Dialect::OpenAi, 15), (Dialect::LlamaCppPython, 14)] {
        let (server, remote, lm) = connected(dialect);
        let row = words(&lm.tokenizer, fits + 1);
        assert_eq!(
            remote.score_row(&row[..fits]).unwrap(),
            expected_scores(&row[..fits])
        );
        let sent = server.requests("/v1/completions").len();
        let error = message(remote.score_row(&row));
        assert!(
            error.contains("a row of 16 tokens exceeds the server's context window of 16"),
            "{dialect:?}: {error}"
        );
        assert_eq!(server.requests("/v1/completions").len(), sent);
    }
}

/// A score is refused when the server's tokens or log-probs cannot be the row's.
#[test]
fn answers_that_cannot_be_the_rows_scores_are_refused() {
    let tokenizer = tokenizer_with_bos();
    let row = tokenizer.encode("the cat sat on the mat.").unwrap();
    let n = row.len();
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    let with = |edit: Edit| {
        let lm = lm.clone();
        move |r: &Request| match (r.path.as_str(), lm.reply(r)) {
            ("/v1/completions", Reply::Answer(200, body)) => {
                let mut body: Value = serde_json::from_str(&body).unwrap();
                let entries = body["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array_mut()
                    .unwrap();
                edit(entries);
                Reply::json(body)
            }
            (_, reply) => reply,
        }
    };
    let score = |handler: Box<Handler>| {
        let server = FakeServer::start(handler);
        let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings()).unwrap();
        remote.score_row(&row).map_err(|e| e.to_string())
    };
    // Log-probs a hair above 0 (rounding) are 0; above 1e-3 or not numbers they are refused.
    let mut want = expected_scores(&row);
    want[1] = 0.0;
    assert_eq!(
        score(Box::new(with(|e| e[2] = json!(0.001)))).unwrap(),
        want
    );
    let refused: [(Edit, &str); 3] = [
        (|e| e[2] = json!(0.0011), "0.0011"),
        (|e| e[3] = Value::Null, "null"),
        (|e| e[3] = json!("-1"), "\"-1\""),
    ];
    for (edit, shown) in refused {
        let error = score(Box::new(with(edit))).unwrap_err();
        assert!(
            error.contains(&format!(
                "a token log-prob is {shown}, not a finite number ≤ 0"
            )),
            "{error}"
        );
    }
    // One entry short: the row's last target has no log-prob (the generated token's entry is
    // dropped too, so that the count is short).
    let error = score(Box::new(with(|e| e.truncate(e.len() - 2)))).unwrap_err();
    assert!(
        error.contains(&format!(
            "/v1/completions echoed {} log-probs for a prompt of {n} tokens",
            n - 1
        )),
        "{error}"
    );
    // Exactly enough entries (no generated token's): accepted.
    assert_eq!(
        score(Box::new(with(|e| e.truncate(e.len() - 1)))).unwrap(),
        expected_scores(&row)
    );
    let error = score(Box::new(with(|e| e.clear()))).unwrap_err();
    assert!(error.contains("echoed 0 log-probs"), "{error}");
    // No log-probs at all.
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    let error = score(Box::new(move |r: &Request| match r.path.as_str() {
        "/v1/completions" => Reply::json(json!({"choices": [{"text": "x"}]})),
        _ => lm.reply(r),
    }))
    .unwrap_err();
    assert!(
        error.contains("answered without choices[0].logprobs.token_logprobs"),
        "{error}"
    );
    // A server that tokenizes the row's text differently from its last token on.
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    let error = score(Box::new(move |r: &Request| {
        let prompt = r.body["prompt"].as_str().unwrap_or("");
        match r.path.as_str() {
            "/tokenize" if prompt != TOKENIZER_PROBE => {
                let mut ids = lm.tokenizer.encode(prompt).unwrap();
                *ids.last_mut().unwrap() += 1;
                Reply::json(json!({ "tokens": ids }))
            }
            _ => lm.reply(r),
        }
    }))
    .unwrap_err();
    assert!(
        error.contains(&format!(
            "the server tokenizes a row's text differently (first difference at token {} of {n})",
            n - 1
        )),
        "{error}"
    );
}

/// Dropped connections, answers that break off, timeouts, 429 and 5xx are retried, waiting the
/// backoff and then twice as long (and nothing before the first attempt); a 4xx, a 404 or an
/// answer that is not JSON is final at once, quoted to its first 200 characters.
#[test]
fn transient_faults_are_retried_with_doubling_backoff_and_others_are_final() {
    let tokenizer = tokenizer_with_bos();
    let row = tokenizer.encode("a dog ran to the log!").unwrap();
    let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
    // No wait before a first attempt: with a 20 s backoff, a final 400 to the first request
    // comes back at once.
    let server = FakeServer::start(|_| Reply::Answer(400, "no".into()));
    let patient = RemoteSettings {
        backoff: Duration::from_secs(20),
        ..settings()
    };
    let started = Instant::now();
    let error = message(RemoteAssistant::connect(&server.url, &tokenizer, patient));
    assert!(error.contains("/v1/models: HTTP 400: no"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The first `failures` completions requests get `fault`, the rest a healthy answer.
    let run = |fault: Fault, failures: usize| {
        let lm = lm.clone();
        let server = FakeServer::start(move |r| {
            if r.path == "/v1/completions" && r.n < failures {
                fault()
            } else {
                lm.reply(r)
            }
        });
        let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings()).unwrap();
        let result = remote.score_row(&row).map_err(|e| e.to_string());
        (result, server.requests("/v1/completions"), server.url)
    };
    let faults: [(Fault, &str); 5] = [
        (|| Reply::Answer(503, "busy".into()), "HTTP 503: busy"),
        (
            || Reply::Answer(429, "slow down".into()),
            "HTTP 429: slow down",
        ),
        (|| Reply::Close, ""),
        (|| Reply::BrokenOff, "the answer broke off"),
        (|| Reply::Hang(Duration::from_millis(900)), ""),
    ];
    for (fault, last) in faults {
        // Two faults and then an answer: the retries (2) suffice, after 40 and 80 ms.
        let (result, seen, _) = run(fault, 2);
        assert_eq!(result.unwrap(), expected_scores(&row), "{last}");
        assert_eq!(seen.len(), 3, "{last}");
        assert!(
            seen[1].at - seen[0].at >= Duration::from_millis(40),
            "{last}"
        );
        assert!(
            seen[2].at - seen[1].at >= Duration::from_millis(80),
            "{last}"
        );
        // Three faults: no answer, the last fault named.
        let (result, seen, url) = run(fault, 3);
        let error = result.unwrap_err();
        assert!(
            error.starts_with(&format!(
                "assistant server {url}: /v1/completions: no answer after 3 attempts: {last}"
            )),
            "{error}"
        );
        assert_eq!(seen.len(), 3);
    }
    let finals: [(Fault, &str); 3] = [
        (
            || Reply::Answer(400, "bad prompt".into()),
            "/v1/completions: HTTP 400: bad prompt",
        ),
        (
            || Reply::Answer(200, "{\"choices\": [".into()),
            "/v1/completions: the answer is not JSON (EOF while parsing",
        ),
        (
            || Reply::Answer(404, "{}".into()),
            "/v1/completions: not found (404)",
        ),
    ];
    for (fault, what) in finals {
        let (result, seen, url) = run(fault, 3);
        let error = result.unwrap_err();
        assert!(
            error.starts_with(&format!("assistant server {url}: {what}")),
            "{error}"
        );
        assert_eq!(seen.len(), 1, "{what}: not retried");
    }
    // A long answer is quoted to its first 200 characters.
    let (result, _, _) = run(|| Reply::Answer(400, "é".repeat(150) + &"x".repeat(150)), 1);
    let error = result.unwrap_err();
    assert!(
        error.ends_with(&format!("HTTP 400: {}{}…", "é".repeat(150), "x".repeat(50))),
        "{error}"
    );
    let (result, _, _) = run(|| Reply::Answer(400, "x".repeat(200)), 1);
    assert!(
        result
            .unwrap_err()
            .ends_with(&format!(": {}", "x".repeat(200)))
    );
}

/// Several rows scored over `concurrency` connections come back in the rows' order.
#[test]
fn rows_scored_concurrently_come_back_in_order() {
    let tokenizer = tokenizer_with_bos();
    let lm = FakeLm::new(&tokenizer, Dialect::LlamaCppPython);
    let server = FakeServer::start(move |r| lm.reply(r));
    let rows = rows(&tokenizer);
    let want: Vec<Vec<f32>> = rows.iter().map(|r| expected_scores(r)).collect();
    for concurrency in [0, 1, 2, 3, 5, 8] {
        let settings = RemoteSettings {
            concurrency,
            ..settings()
        };
        let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings).unwrap();
        for n in [0, 1, 4, 5] {
            assert_eq!(
                remote.score_rows(&rows[..n]).unwrap(),
                want[..n],
                "{concurrency} workers, {n} rows"
            );
        }
    }
    // A failed row fails the whole call.
    let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings()).unwrap();
    let mut bad = rows.clone();
    bad[3].insert(1, 0);
    let error = message(remote.score_rows(&bad));
    assert!(
        error.contains("holds the BOS token 0 at position 1"),
        "{error}"
    );
}

/// Through the `Assistant` interface a padded batch is scored row by row: each row's unpadded
/// tokens and its last target, zeros at padding; z is refused.
#[test]
fn a_padded_batch_is_scored_through_the_assistant_interface() {
    let (server, remote, lm) = connected(Dialect::LlamaCppPython);
    let device = Default::default();
    let rows = rows(&lm.tokenizer);
    let seq = rows.iter().map(Vec::len).max().unwrap() - 1;
    // Row b's input is rows[b − 1] without its last token, padded; row 0 is all padding (the
    // first row, so that no earlier row's last target can stand in for its own).
    let batch = rows.len() + 1;
    let (mut tokens, mut targets, mut padding) = (vec![], vec![], vec![]);
    for b in 0..batch {
        let row = if b == 0 { &[][..] } else { &rows[b - 1] };
        let len = row.len().saturating_sub(1);
        for t in 0..seq {
            tokens.push(if t < len { row[t] as i64 } else { 9 });
            targets.push(if t < len { row[t + 1] as i64 } else { 9 });
            padding.push(t >= len);
        }
    }
    let score_rows = ScoreRows::<B> {
        tokens: Tensor::from_data(TensorData::new(tokens, [batch, seq]), &device),
        targets: Tensor::from_data(TensorData::new(targets, [batch, seq]), &device),
        padding: Tensor::from_data(TensorData::new(padding, [batch, seq]), &device),
    };
    let got = remote
        .token_log_probs(&score_rows, None)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    for b in 0..batch {
        let mut want = if b == 0 {
            vec![]
        } else {
            expected_scores(&rows[b - 1])
        };
        want.resize(seq, 0.0);
        assert_eq!(got[b * seq..(b + 1) * seq], want, "row {b}");
    }
    assert_eq!(server.requests("/v1/completions").len(), rows.len());
    let z = Tensor::<B, 2>::zeros([batch, 2], &device);
    let error = message(remote.token_log_probs(&score_rows, Some(z)));
    assert!(error.contains("cannot read z"), "{error}");
}

/// The next-token distribution is the server's top candidates at their ids (byte fragments left
/// out), −∞ elsewhere; a decoder asks again only after new tokens.
#[test]
fn next_token_logits_are_the_top_candidates_at_their_ids() {
    for dialect in [Dialect::LlamaCppPython, Dialect::OpenAi] {
        let (server, remote, lm) = connected(dialect);
        let rows = rows(&lm.tokenizer);
        let want = |row: &[u32]| {
            let mut logits = vec![f32::NEG_INFINITY; lm.tokenizer.vocab_size()];
            for (id, lp) in lm.candidates(row, 5) {
                logits[id as usize] = lp as f32;
            }
            logits
        };
        for row in &rows {
            assert_eq!(remote.next_logits(row).unwrap(), want(row), "{dialect:?}");
            let sent = server.requests("/v1/completions").pop().unwrap().body;
            assert_eq!(sent["logprobs"], json!(5));
        }
        let mut decoder = <RemoteAssistant as Assistant<B>>::decoder(
            &remote,
            2,
            None,
            crate::AssistantUpdate::Lazy,
            &Default::default(),
        );
        let asked = || server.requests("/v1/completions").len();
        decoder.push(&[rows[0].clone(), rows[1][..2].to_vec()]);
        let before = asked();
        assert_eq!(
            decoder.next_logits().unwrap(),
            [want(&rows[0]), want(&rows[1][..2])]
        );
        assert_eq!(decoder.next_logits().unwrap().len(), 2);
        assert_eq!(asked(), before + 2, "asked once a row until new tokens");
        decoder.push(&[vec![], rows[1][2..].to_vec()]);
        assert_eq!(
            decoder.next_logits().unwrap(),
            [want(&rows[0]), want(&rows[1])]
        );
        assert_eq!(asked(), before + 4);
    }
    // Candidates none of which is a local token, and no candidates at all.
    let tokenizer = tokenizer_with_bos();
    for (top, what) in [
        (
            json!([{"bytes:\\xff": -0.1}]),
            "none of the next-token candidates is a token of",
        ),
        (
            json!([]),
            "answered without choices[0].logprobs.top_logprobs[0]",
        ),
    ] {
        let lm = FakeLm::new(&tokenizer, Dialect::OpenAi);
        let server = FakeServer::start(move |r| match r.path.as_str() {
            "/v1/completions" => Reply::json(
                json!({"choices": [{"text": "x", "logprobs": {"top_logprobs": top.clone()}}]}),
            ),
            _ => lm.reply(r),
        });
        let remote = RemoteAssistant::connect(&server.url, &tokenizer, settings()).unwrap();
        let error = message(remote.next_logits(&[5, 6]));
        assert!(error.contains(what), "{error}");
    }
}
