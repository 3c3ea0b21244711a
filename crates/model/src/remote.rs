//! An assistant behind an OpenAI-compatible completions server (llama.cpp's server as shipped by
//! `llama-cpp-python[server]`, vLLM): scoring through echoed prompt log-probs, decoding through the
//! top log-probs of one-token completions.
//!
//! The server receives text, so chorus first checks that it tokenizes like the local tokenizer (a
//! probe string on connect, then every scored row exactly through the server's tokenize endpoint)
//! and stops with [`ModelError::Remote`] otherwise.
//!
//! Scoring reads `choices[0].logprobs.token_logprobs` of `{"echo": true, "logprobs": 0,
//! "max_tokens": 1}`: in the OpenAI convention entry i is `log P(token_i | tokens_<i)` (the first
//! is null). llama-cpp-python follows it only after a leading BOS token (without one, each entry
//! is the log-prob of the token *at* its own position under the next-token distribution, its issue
//! #1983), so against that server every row is sent as `[BOS] + row`: the assistant reads the
//! server's BOS before each row, and its scores are those of that row.
//!
//! Decoding asks for `top_logprobs` candidates of the next token (keys are token texts, mapped
//! back to ids through the local vocabulary): the assistant's distribution is its top candidates
//! renormalised, exact for greedy decoding and for the confidence rule's top-1 probability.

use std::collections::HashMap;
use std::time::Duration;

use burn::prelude::*;
use chorus_lm::Tokenizer;
use serde_json::{Value, json};

use crate::{Assistant, AssistantDecoder, AssistantUpdate, ModelError, ScoreRows};

/// Text whose tokenization the server must reproduce before it is used: words, digits, spaces,
/// punctuation and non-ASCII text.
pub const TOKENIZER_PROBE: &str =
    "Hello, world! The 1865 State of the Union —  naïve café, 12 × 7 = 84.\n\tdef f(x): return x";

/// Whether an assistant is named by a server URL (`http://…`, `https://…`) rather than a file.
pub fn is_server_url(name: impl AsRef<std::ffi::OsStr>) -> bool {
    name.as_ref()
        .to_str()
        .is_some_and(|n| n.starts_with("http://") || n.starts_with("https://"))
}

/// How chorus talks to a server.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteSettings {
    /// One request's limit (connect, send, answer).
    pub timeout: Duration,
    /// Further attempts after a dropped connection, a timeout or a 5xx/429 answer.
    pub retries: u32,
    /// Wait before the first retry, doubled before each next one.
    pub backoff: Duration,
    /// Requests in flight at once when scoring.
    pub concurrency: usize,
    /// Next-token candidates asked for when decoding.
    pub top_logprobs: usize,
    /// The server's context window (rows longer than this are refused before sending).
    pub max_seq_len: usize,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_millis(500),
            concurrency: 2,
            top_logprobs: 20,
            max_seq_len: 2048,
        }
    }
}

/// What kind of server answers, told apart by its tokenize endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    /// `POST /extras/tokenize`; echo log-probs aligned only after this BOS id.
    LlamaCppPython { bos: u32 },
    /// `POST /tokenize` (vLLM); OpenAI echo semantics.
    OpenAi,
}

/// An assistant LM behind an OpenAI-compatible completions endpoint.
#[derive(Debug)]
pub struct RemoteAssistant {
    url: String,
    model: String,
    agent: ureq::Agent,
    tokenizer: Tokenizer,
    settings: RemoteSettings,
    kind: ServerKind,
    /// Token text → the smallest id with that text (decoding's candidates come back as text).
    ids_by_text: HashMap<String, u32>,
}

impl RemoteAssistant {
    /// Connects to `url` (e.g. `http://127.0.0.1:8080`), reads the served model's name, and checks
    /// that the server tokenizes [`TOKENIZER_PROBE`] like `tokenizer`.
    pub fn connect(
        url: &str,
        tokenizer: &Tokenizer,
        settings: RemoteSettings,
    ) -> Result<Self, ModelError> {
        let url = url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") {
            return Err(ModelError::Remote {
                url,
                reason: "only http:// URLs are supported (run TLS in a proxy in front)".into(),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut ids_by_text = HashMap::new();
        for id in (0..tokenizer.vocab_size() as u32).rev() {
            let text = tokenizer.decode(&[id])?;
            if !text.is_empty() && !text.contains('\u{fffd}') {
                ids_by_text.insert(text, id);
            }
        }
        let mut remote = Self {
            model: String::new(),
            url,
            agent,
            tokenizer: tokenizer.clone(),
            settings,
            kind: ServerKind::OpenAi,
            ids_by_text,
        };
        let models = remote.request("/v1/models", None)?;
        remote.model = models["data"][0]["id"]
            .as_str()
            .ok_or_else(|| remote.error("/v1/models lists no model".into()))?
            .to_string();
        remote.kind = remote.server_kind()?;
        let local = tokenizer.encode(TOKENIZER_PROBE)?;
        let served = remote.server_tokens(TOKENIZER_PROBE)?;
        if served != local {
            let at = served
                .iter()
                .zip(&local)
                .take_while(|(a, b)| a == b)
                .count();
            return Err(remote.error(format!(
                "the server tokenizes differently from {} (probe {TOKENIZER_PROBE:?}: {} ids there, {} here, first difference at token {at}): it serves another model's tokenizer",
                tokenizer.source(),
                served.len(),
                local.len()
            )));
        }
        Ok(remote)
    }

    fn error(&self, reason: String) -> ModelError {
        ModelError::Remote {
            url: self.url.clone(),
            reason,
        }
    }

    /// llama-cpp-python answers `/extras/tokenize`; anything else must answer `/tokenize`.
    fn server_kind(&self) -> Result<ServerKind, ModelError> {
        match self.try_request("/extras/tokenize", Some(&json!({"input": ""}))) {
            Ok(Some(_)) => {
                let bos = self.tokenizer.bos_id().ok_or_else(|| {
                    self.error(format!(
                        "llama-cpp-python's echoed log-probs are aligned only after a BOS token \
                         (its issue #1983), and the local tokenizer ({}) names none: load it \
                         from the served GGUF",
                        self.tokenizer.source()
                    ))
                })?;
                Ok(ServerKind::LlamaCppPython { bos })
            }
            Ok(None) => Ok(ServerKind::OpenAi),
            Err(e) => Err(e),
        }
    }

    /// The server's ids for `text` (no BOS added).
    fn server_tokens(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let answer = match self.kind {
            ServerKind::LlamaCppPython { .. } => {
                self.request("/extras/tokenize", Some(&json!({"input": text})))?
            }
            ServerKind::OpenAi => self.request(
                "/tokenize",
                Some(&json!({"model": self.model, "prompt": text, "add_special_tokens": false})),
            )?,
        };
        answer["tokens"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_u64().map(|t| t as u32))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                self.error(format!(
                    "tokenize answered without a `tokens` list of ids: {}",
                    excerpt(&answer.to_string())
                ))
            })
    }

    /// [`Self::try_request`], with a 404 as an error.
    fn request(&self, path: &str, body: Option<&Value>) -> Result<Value, ModelError> {
        self.try_request(path, body)?.ok_or_else(|| {
            self.error(format!(
                "{path}: not found (404): is this an OpenAI-compatible completions server?"
            ))
        })
    }

    /// One JSON request, a POST of `body` or a GET without one, with retries (dropped connections,
    /// timeouts, 5xx and 429 are retried with backoff; 4xx and malformed JSON are not). `Ok(None)`
    /// for a 404.
    fn try_request(&self, path: &str, body: Option<&Value>) -> Result<Option<Value>, ModelError> {
        let url = format!("{}{path}", self.url);
        let mut delay = self.settings.backoff;
        let mut last = String::new();
        for attempt in 0..=self.settings.retries {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay *= 2;
            }
            let sent = match body {
                Some(body) => self.agent.post(&url).send_json(body),
                None => self.agent.get(&url).call(),
            };
            let mut response = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = response.status().as_u16();
            let text = match response.body_mut().read_to_string() {
                Ok(t) => t,
                Err(e) => {
                    last = format!("the answer broke off: {e}");
                    continue;
                }
            };
            match status {
                200..=299 => {}
                404 => return Ok(None),
                429 | 500..=599 => {
                    last = format!("HTTP {status}: {}", excerpt(&text));
                    continue;
                }
                _ => {
                    return Err(self.error(format!("{path}: HTTP {status}: {}", excerpt(&text))));
                }
            }
            return serde_json::from_str(&text).map(Some).map_err(|e| {
                self.error(format!(
                    "{path}: the answer is not JSON ({e}): {}",
                    excerpt(&text)
                ))
            });
        }
        Err(self.error(format!(
            "{path}: no answer after {} attempts: {last}",
            self.settings.retries + 1
        )))
    }

    /// The ids the server is sent for `row`, and whether a BOS was put in front.
    fn request_ids(&self, row: &[u32]) -> Result<Vec<u32>, ModelError> {
        match self.kind {
            ServerKind::LlamaCppPython { bos } => {
                if let Some(at) = row.iter().position(|&t| t == bos) {
                    return Err(self.error(format!(
                        "the row holds the BOS token {bos} at position {at}: llama-cpp-python \
                         drops the log-probs of BOS tokens, so it cannot score this row"
                    )));
                }
                Ok(std::iter::once(bos).chain(row.iter().copied()).collect())
            }
            ServerKind::OpenAi => Ok(row.to_vec()),
        }
    }

    /// `log P(row[t + 1] | row[..=t])` for t in `0..row.len() − 1`.
    pub fn score_row(&self, row: &[u32]) -> Result<Vec<f32>, ModelError> {
        if row.len() < 2 {
            return Ok(Vec::new()); // nothing to score (an all-padding row)
        }
        let ids = self.request_ids(row)?;
        if ids.len() + 1 > self.settings.max_seq_len {
            return Err(self.error(format!(
                "a row of {} tokens exceeds the server's context window of {}",
                ids.len(),
                self.settings.max_seq_len
            )));
        }
        let text = self.tokenizer.decode(&ids)?;
        let served = self.server_tokens(&text)?;
        if served != ids {
            let at = served.iter().zip(&ids).take_while(|(a, b)| a == b).count();
            return Err(self.error(format!(
                "the server tokenizes a row's text differently (first difference at token {at} of {}): its scores would belong to other tokens",
                ids.len()
            )));
        }
        let answer = self.request(
            "/v1/completions",
            Some(&json!({
                "model": self.model, "prompt": text, "max_tokens": 1, "echo": true,
                "logprobs": 0, "temperature": 0.0, "add_special_tokens": false,
            })),
        )?;
        let entries = answer["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .ok_or_else(|| {
                self.error(format!(
                    "/v1/completions answered without choices[0].logprobs.token_logprobs: {}",
                    excerpt(&answer.to_string())
                ))
            })?;
        // Entry i scores the row's token i (a leading BOS has no entry), the first is null:
        // target t, row[t + 1], is entry t + 1.
        let first = 1;
        let wanted = row.len() - 1;
        if entries.len() < first + wanted {
            return Err(self.error(format!(
                "/v1/completions echoed {} log-probs for a prompt of {} tokens",
                entries.len(),
                ids.len()
            )));
        }
        entries[first..first + wanted]
            .iter()
            .map(|v| match v.as_f64() {
                Some(lp) if lp.is_finite() && lp <= 1e-3 => Ok(lp.min(0.0) as f32),
                _ => Err(self.error(format!("a token log-prob is {v}, not a finite number ≤ 0"))),
            })
            .collect()
    }

    /// `[vocab]` next-token logits after `row`: the server's top log-probs, `-∞` elsewhere.
    pub fn next_logits(&self, row: &[u32]) -> Result<Vec<f32>, ModelError> {
        let ids = self.request_ids(row)?;
        let text = self.tokenizer.decode(&ids)?;
        let answer = self.request(
            "/v1/completions",
            Some(&json!({
                "model": self.model, "prompt": text, "max_tokens": 1,
                "logprobs": self.settings.top_logprobs, "temperature": 0.0,
                "add_special_tokens": false,
            })),
        )?;
        let top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .ok_or_else(|| {
                self.error(format!(
                    "/v1/completions answered without choices[0].logprobs.top_logprobs[0]: {}",
                    excerpt(&answer.to_string())
                ))
            })?;
        let mut logits = vec![f32::NEG_INFINITY; self.tokenizer.vocab_size()];
        for (text, lp) in top {
            let (Some(&id), Some(lp)) = (self.ids_by_text.get(text), lp.as_f64()) else {
                continue; // a byte fragment without text of its own: left out
            };
            logits[id as usize] = logits[id as usize].max(lp as f32);
        }
        if logits.iter().all(|l| l.is_infinite()) {
            return Err(self.error(format!(
                "none of the next-token candidates is a token of {}: {}",
                self.tokenizer.source(),
                excerpt(&Value::Object(top.clone()).to_string())
            )));
        }
        Ok(logits)
    }

    /// `log P(row[t + 1] | row[..=t])` of several rows, `concurrency` requests at a time.
    pub fn score_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let workers = self.settings.concurrency.max(1);
        let mut out: Vec<Option<Result<Vec<f32>, ModelError>>> =
            (0..rows.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            for (w, slots) in out
                .chunks_mut(rows.len().div_ceil(workers).max(1))
                .enumerate()
            {
                let start = w * rows.len().div_ceil(workers).max(1);
                scope.spawn(move || {
                    for (i, slot) in slots.iter_mut().enumerate() {
                        *slot = Some(self.score_row(&rows[start + i]));
                    }
                });
            }
        });
        out.into_iter()
            .map(|r| r.expect("every row scored"))
            .collect()
    }
}

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

impl<B: Backend> Assistant<B> for RemoteAssistant {
    fn describe(&self) -> String {
        format!("{} ({})", self.url, self.model)
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    fn max_seq_len(&self) -> usize {
        self.settings.max_seq_len - 1
    }

    fn token_log_probs(
        &self,
        rows: &ScoreRows<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        if z.is_some() {
            return Err(self.error("a remote assistant cannot read z (it has no adapter)".into()));
        }
        let [batch, seq] = rows.tokens.dims();
        let host = |t: Tensor<B, 2, Int>| -> Result<Vec<i64>, ModelError> {
            t.into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .map_err(|e| ModelError::HostRead {
                    tensor: "score rows",
                    reason: format!("{e:?}"),
                })
        };
        let (tokens, targets) = (host(rows.tokens.clone())?, host(rows.targets.clone())?);
        let padding = rows
            .padding
            .clone()
            .into_data()
            .to_vec::<bool>()
            .map_err(|e| ModelError::HostRead {
                tensor: "padding",
                reason: format!("{e:?}"),
            })?;
        let requests: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                let len = (0..seq).take_while(|&t| !padding[b * seq + t]).count();
                let r = b * seq;
                let mut row: Vec<u32> = tokens[r..r + len].iter().map(|&t| t as u32).collect();
                if len > 0 {
                    row.push(targets[r + len - 1] as u32);
                }
                row
            })
            .collect();
        let scored = self.score_rows(&requests)?;
        let mut flat = vec![0.0f32; batch * seq];
        for (b, values) in scored.iter().enumerate() {
            flat[b * seq..b * seq + values.len()].copy_from_slice(values);
        }
        Ok(Tensor::from_data(
            TensorData::new(flat, [batch, seq]).convert::<B::FloatElem>(),
            &rows.tokens.device(),
        ))
    }

    fn decoder<'a>(
        &'a self,
        rows: usize,
        _z: Option<Tensor<B, 2>>,
        _update: AssistantUpdate,
        _device: &B::Device,
    ) -> Box<dyn AssistantDecoder + 'a> {
        Box::new(RemoteDecoder {
            remote: self,
            history: vec![Vec::new(); rows],
            logits: None,
        })
    }
}

/// A remote assistant's decoding state: the rows so far (the server caches their prefix).
struct RemoteDecoder<'a> {
    remote: &'a RemoteAssistant,
    history: Vec<Vec<u32>>,
    logits: Option<Vec<Vec<f32>>>,
}

impl AssistantDecoder for RemoteDecoder<'_> {
    fn push(&mut self, tokens: &[Vec<u32>]) {
        for (h, t) in self.history.iter_mut().zip(tokens) {
            h.extend_from_slice(t);
        }
        self.logits = None;
    }

    fn next_logits(&mut self) -> Result<&[Vec<f32>], ModelError> {
        if self.logits.is_none() {
            let logits = self
                .history
                .iter()
                .map(|row| self.remote.next_logits(row))
                .collect::<Result<Vec<_>, _>>()?;
            self.logits = Some(logits);
        }
        Ok(self.logits.as_deref().expect("computed above"))
    }
}
