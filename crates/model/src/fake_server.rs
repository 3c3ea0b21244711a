//! A completions server on 127.0.0.1 (real TCP, real HTTP, one thread a connection) that answers
//! through a handler, and a fake LM that answers it as llama-cpp-python or vLLM would: for tests of
//! remote assistants, chorus-model's own and (through the `fake-server` feature) chorus-train's.
//! Test support: it panics on what a test should not do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_lm::Tokenizer;
use serde_json::{Value, json};

/// One request as the fake server read it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request line's method (`GET`, `POST`).
    pub method: String,
    /// The request line's path (`/v1/completions`).
    pub path: String,
    /// The JSON body (null where there is none or it is not JSON).
    pub body: Value,
    /// How many earlier requests went to the same path.
    pub n: usize,
    /// When the server had read it.
    pub at: Instant,
}

/// What the fake server does with one request.
pub enum Reply {
    /// An answer with this status and body.
    Answer(u16, String),
    /// Headers promising more body than is sent, then the connection closed.
    BrokenOff,
    /// Closes the connection without answering.
    Close,
    /// Answers nothing for this long (longer than the client's timeout), then closes.
    Hang(Duration),
}

impl Reply {
    /// A 200 answer of `body`.
    pub fn json(body: Value) -> Self {
        Self::Answer(200, body.to_string())
    }
}

/// What answers the server's requests.
pub type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A server on an ephemeral port of 127.0.0.1, one thread per connection; it stops with the test.
pub struct FakeServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl FakeServer {
    /// Listens on an ephemeral port; `handler` answers every request.
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::<Request>::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (handler, log) = (handler.clone(), log.clone());
                std::thread::spawn(move || serve(stream, &*handler, &log));
            }
        });
        Self { url, seen }
    }

    /// The requests to `path` so far, in arrival order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|r| r.path == path).cloned().collect()
    }
}

fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let request = {
        let mut log = log.lock().unwrap();
        let request = Request {
            n: log.iter().filter(|r| r.path == path).count(),
            method,
            path,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            at: Instant::now(),
        };
        log.push(request.clone());
        request
    };
    let mut stream = stream;
    match handler(&request) {
        Reply::Answer(status, body) => {
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Reply::BrokenOff => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"choices\""
            );
        }
        Reply::Close => {}
        Reply::Hang(d) => std::thread::sleep(d),
    }
}

/// A byte-level BPE trained to at most 300 ids on three sentences, `<|endoftext|>` at id 0 (no
/// BOS named): the tokenizer the remote tests serve.
pub fn tokenizer() -> Tokenizer {
    let texts = [
        "the cat sat on the mat.",
        "a dog ran to the log!",
        "what did the cat see?",
    ];
    Tokenizer::train_bpe(texts.iter().cycle().take(60), 300, &["<|endoftext|>"]).unwrap()
}

/// Which server the fake imitates.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Dialect {
    /// `/extras/tokenize`; a prompt's log-probs follow the OpenAI convention only after a leading
    /// BOS, without one each entry is shifted to the token before (its issue #1983).
    LlamaCppPython,
    /// `/tokenize` (vLLM): the OpenAI convention.
    OpenAi,
}

/// `log P(token | …, previous)` at row position `at` as the fake LM gives it (exact in f32).
pub fn fake_log_prob(previous: u32, token: u32, at: usize) -> f64 {
    -0.25 * ((token as usize * 7 + previous as usize * 3 + at) % 40) as f64 - 0.125
}

/// A well-behaved server of `tokenizer`'s LM in `dialect`.
#[derive(Clone)]
pub struct FakeLm {
    /// The tokenizer it serves.
    pub tokenizer: Tokenizer,
    /// The server it imitates.
    pub dialect: Dialect,
    /// Ids whose text is their own (what a server's `top_logprobs` keys can name).
    named: Vec<u32>,
}

impl FakeLm {
    /// A server of `tokenizer`'s fake LM in `dialect`.
    pub fn new(tokenizer: &Tokenizer, dialect: Dialect) -> Self {
        let named = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| {
                let text = tokenizer.decode(&[id]).unwrap();
                !text.is_empty()
                    && !text.contains('\u{fffd}')
                    && tokenizer.encode(&text).unwrap() == [id]
            })
            .collect::<Vec<_>>();
        assert!(named.len() > 44, "five candidates 11 apart stay distinct");
        Self {
            tokenizer: tokenizer.clone(),
            dialect,
            named,
        }
    }

    /// The row the LM reads from a prompt, and whether a leading BOS aligned its log-probs.
    pub fn row(&self, prompt: &str) -> (Vec<u32>, bool) {
        let mut ids = self.tokenizer.encode(prompt).unwrap();
        let bos = self.tokenizer.bos_id();
        let aligned = match self.dialect {
            Dialect::OpenAi => true,
            Dialect::LlamaCppPython => bos.is_some() && ids.first() == bos.as_ref(),
        };
        if self.dialect == Dialect::LlamaCppPython && aligned {
            ids.remove(0);
        }
        (ids, aligned)
    }

    /// `top` candidates of the next token after `row`: named ids, log-probs −0.5, −1, …
    pub fn candidates(&self, row: &[u32], top: usize) -> Vec<(u32, f64)> {
        let last = row.last().copied().unwrap_or(0) as usize;
        (0..top)
            .map(|j| {
                let id = self.named[(last * 5 + row.len() * 3 + j * 11) % self.named.len()];
                (id, -0.5 * (j + 1) as f64)
            })
            .collect()
    }

    /// The answer to `request`: models, tokenize, completions (echoed log-probs by
    /// [`fake_log_prob`], top candidates by [`Self::candidates`]), 404 elsewhere, 405 for the
    /// wrong method.
    pub fn reply(&self, request: &Request) -> Reply {
        let tokenize = |text: &Value| {
            let ids = self.tokenizer.encode(text.as_str().unwrap_or("")).unwrap();
            Reply::json(json!({ "tokens": ids }))
        };
        let method = if request.path == "/v1/models" {
            "GET"
        } else {
            "POST"
        };
        if request.method != method {
            return Reply::Answer(405, r#"{"detail":"Method Not Allowed"}"#.into());
        }
        match (request.path.as_str(), self.dialect) {
            ("/v1/models", _) => Reply::json(json!({"data": [{"id": "fake-lm"}]})),
            ("/extras/tokenize", Dialect::LlamaCppPython) => tokenize(&request.body["input"]),
            ("/tokenize", Dialect::OpenAi) => tokenize(&request.body["prompt"]),
            ("/v1/completions", _) => {
                let (row, aligned) = self.row(request.body["prompt"].as_str().unwrap());
                let mut logprobs = json!({});
                if request.body["echo"] == json!(true) {
                    let mut entries: Vec<Value> = if aligned { vec![Value::Null] } else { vec![] };
                    entries.extend(
                        (1..row.len()).map(|i| json!(fake_log_prob(row[i - 1], row[i], i))),
                    );
                    entries.push(json!(-1.0)); // the generated token
                    logprobs["token_logprobs"] = json!(entries);
                }
                if let Some(top) = request.body["logprobs"].as_u64().filter(|&t| t > 0) {
                    let mut candidates = serde_json::Map::new();
                    for (id, lp) in self.candidates(&row, top as usize) {
                        candidates.insert(self.tokenizer.decode(&[id]).unwrap(), json!(lp));
                    }
                    // Byte fragments as servers write them (vLLM's `bytes:` escapes, a lone
                    // replacement character), ranked first: no token's own text, left out.
                    for fragment in ["bytes:\\xe2\\x80", "\u{fffd}", ""] {
                        candidates.insert(fragment.into(), json!(-0.01));
                    }
                    logprobs["top_logprobs"] = json!([candidates]);
                }
                Reply::json(json!({"choices": [{"text": "x", "logprobs": logprobs}]}))
            }
            _ => Reply::Answer(404, r#"{"detail":"Not Found"}"#.into()),
        }
    }
}
