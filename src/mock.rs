//! A loopback imitation of the Gemini API, for the demo, the tests and the benchmarks: no network, no
//! real keys.
//!
//! It answers `POST` on any path with Gemini's shapes: a success after a fixed latency; Gemini's real
//! 429 body (with `RetryInfo.retryDelay`) once a key used
//! up its quota in the sliding window (the delay says when the key's window is entirely free again);
//! `API_KEY_INVALID` for the keys it is told are bad; the 503
//! "model is overloaded" for every n-th request. Paths starting with `/slow` take 60 s (for tests that
//! kill a worker in the middle of a request). It counts what it saw, per key: requests in flight at
//! once, and requests that arrived before the deadline it had announced for the key.
//!
//! It also meters like the real Gemini: per Google Cloud project (several secrets may share one) and
//! per model (read from `/…/models/{model}:method`, else from the JSON body's `model`, as the
//! OpenAI-compatible paths send it). A (project, model) bucket has an optional per-day and per-minute
//! request limit, or none at all (quota 0); it answers the real QuotaFailure shapes, including the
//! short, misleading `retryDelay` of a per-day 429. The mock's day ends only when a test calls
//! [`MockUpstream::reset_day`]: no wall clock. Per bucket it counts the requests that arrived after
//! the bucket had already answered a per-day 429 that day, which a correct client never sends.
//!
//! It streams in both dialects: `…/models/{m}:streamGenerateContent?alt=sse` answers Gemini's event
//! stream (events end with CRLF CRLF, the last one carries `finishReason` and `usageMetadata`), and
//! `…/chat/completions` with `"stream": true` in its JSON body answers OpenAI's (LF LF, a last chunk
//! with `finish_reason`, then `data: [DONE]`; without it, one `chat.completion`); see [`good_stream`].
//! Each event is its own body frame, flushed on its own, [`MockConfig::stream_delay`] apart. A
//! streaming request is metered and judged like any other (a 429, 400 or 503 comes before the stream,
//! as JSON), unless it takes one of the configured [`StreamFault`]s, which replaces its answer. A
//! stream keeps its key in flight until hyper drops its body, and counts as cancelled when that happens
//! before its script ended without the terminal event having been handed over (the client went away).
//! Every request is recorded as a [`SeenRequest`], secrets included: this is the fake upstream.
//!
//! As Gemini answers what is not the key's fault: [`MockConfig::files_forbidden`] answers a request
//! naming a file with the 403 "You do not have permission to access the File … or it may not exist"
//! ([`file_403`]), and [`MockConfig::openai_error_arrays`] wraps the errors of the OpenAI-compatible
//! paths in a one-element array, as Gemini's OpenAI layer does.
//!
//! For the limits of a client: [`MockConfig::fixed_answer`] gives every request one answer (a 429 with
//! `Retry-After: 0`), [`MockConfig::endless_bodies`] and [`StreamFault::EndlessEvent`] send a body or an
//! event that never ends (about 30 MB/s), and [`MockUpstream::endless_bytes`] says how much of it left.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

mod files;
pub use files::file_denied_body;

/// The header the mock reads the key from (Gemini's). On paths without it, the mock reads
/// `Authorization: Bearer …` (Gemini's OpenAI-compatible endpoints).
pub const KEY_HEADER: &str = "x-goog-api-key";

/// The `retryDelay` of a per-day 429: short and misleading, as real Gemini sends it; the bucket stays
/// exhausted until [`MockUpstream::reset_day`].
pub const PER_DAY_RETRY_DELAY: &str = "47s";

/// The quotaId of a per-day, per-project, per-model 429.
pub const PER_DAY_QUOTA_ID: &str = "GenerateRequestsPerDayPerProjectPerModel-FreeTier";

/// The quotaId of a per-minute, per-project, per-model 429.
pub const PER_MINUTE_QUOTA_ID: &str = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier";

/// The `quota_limit` of the older project-wide ErrorInfo `RATE_LIMIT_EXCEEDED` 429 (no model in it).
pub const PROJECT_QUOTA_LIMIT: &str = "GenerateContentRequestsPerMinutePerProjectPerRegion";

/// Gemini's old bare 429, without any detail.
pub const BARE_429: &str = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Each key may make this many successful requests per `window` (sliding); `None`: unlimited.
    pub quota: Option<u32>,
    /// The quota window.
    pub window: Duration,
    /// Time to answer a request.
    pub latency: Duration,
    /// Secrets answered with 400 `API_KEY_INVALID`.
    pub bad_keys: HashSet<String>,
    /// Every n-th request (counted over all keys) answers 503 "The model is overloaded".
    pub overload_every: Option<u64>,
    /// Secret -> Google Cloud project name; a secret not listed is its own project.
    pub projects: HashMap<String, String>,
    /// Limits per (project, model); a model not listed is unlimited (apart from `quota`).
    pub model_quotas: Vec<ModelQuota>,
    /// The length of the mock's "minute" for [`ModelQuota::per_minute`] (sliding); 60 s by default.
    pub minute: Duration,
    /// Models that always answer the old bare 429 [`BARE_429`].
    pub bare_429_models: HashSet<String>,
    /// Projects that always answer the project-wide ErrorInfo `RATE_LIMIT_EXCEEDED` 429, with
    /// `consumer: projects/<`[`project_number`]`>`.
    pub project_rate_limited: HashSet<String>,
    /// Events in a good stream (at least 1): in Gemini's dialect the last one is the terminal event;
    /// OpenAI's adds a `finish_reason` chunk and `[DONE]`. See [`good_stream`].
    pub stream_events: usize,
    /// The pause before each event after the first (the first one comes after `latency`).
    pub stream_delay: Duration,
    /// Faults taken in order, one by each streaming request with a valid key that
    /// [`MockConfig::stream_faults_by_key`] has none left for; then streams are good again.
    pub stream_faults: Vec<StreamFault>,
    /// Faults per secret, taken in order by that key's streaming requests, before `stream_faults`.
    pub stream_faults_by_key: HashMap<String, Vec<StreamFault>>,
    /// Every request with a valid key gets this answer (after `latency`), whatever its quotas.
    pub fixed_answer: Option<FixedAnswer>,
    /// Every non-streaming request with a valid key gets a 200 JSON body that never ends (see
    /// [`MockUpstream::endless_bytes`]).
    pub endless_bodies: bool,
    /// As Gemini does: its native paths (not `/openai/` nor `/chat/completions`) answer a key sent only
    /// as `Authorization: Bearer …` with 401 [`UNAUTHENTICATED`] (it takes a Bearer token for OAuth).
    pub gemini_auth: bool,
    /// Every request with a valid key that names a file (`files/ID` in its path or body) gets Gemini's
    /// 403 for a file that expired or belongs to another project ([`file_403`]), before any quota.
    pub files_forbidden: bool,
    /// Error answers on `…/chat/completions` paths come wrapped in a one-element array
    /// (`[{"error": {...}}]`), as Gemini's OpenAI-compatible layer sends them.
    pub openai_error_arrays: bool,
    /// How long an uploaded file lives (Gemini: 48 h), and the longest a cached content lives; see the
    /// `files` module.
    pub file_lifetime: Duration,
}

/// Gemini's 401 for an API key sent as a Bearer token on its native paths.
pub const UNAUTHENTICATED: &str = r#"{"error":{"code":401,"message":"Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.","status":"UNAUTHENTICATED"}}"#;

/// One answer given to every request: status, extra headers and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedAnswer {
    /// The HTTP status.
    pub status: u16,
    /// Headers besides `content-type: application/json`, e.g. `("retry-after", "0")`.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

/// The size of each frame of an endless body or event.
pub const ENDLESS_FRAME: usize = 64 * 1024;

/// A way for one streaming request to fail, instead of judging and streaming it normally: the request
/// bypasses every quota and `overload_every`, and counts in [`KeyStats::faults`]. "`after_events: n`"
/// counts events of the good stream ([`good_stream`]), capped so that the terminal event never is
/// among them. An in-band error is `data: ` + [`error_body`] + the dialect's blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFault {
    /// No stream: this status and JSON body (see [`StreamFault::quota_429`], [`StreamFault::overloaded_503`]).
    StatusBeforeStream(u16, String),
    /// 200 event-stream whose only event is the in-band error [`error_body`] of this code, then the end.
    ErrorAsFirstEvent(u16),
    /// 200 event-stream with an empty body.
    EndBeforeFirstEvent,
    /// 200 event-stream with the first event's `data:` line but not the blank line that ends it, then
    /// a clean end.
    PartialFirstEvent,
    /// Headers, nothing for this long, then the good stream.
    SilentBeforeFirstEvent(Duration),
    /// `after_events` good events, the in-band 503 "The model is overloaded", then a clean end.
    ErrorMidStream {
        /// Good events before the error.
        after_events: usize,
    },
    /// `after_events` good events (flushed), then the body fails: hyper aborts the connection and the
    /// client sees an incomplete chunked body.
    BreakMidStream {
        /// Good events before the break.
        after_events: usize,
    },
    /// `after_events` good events, then a clean end without the terminal event.
    TruncateMidStream {
        /// Good events before the end.
        after_events: usize,
    },
    /// `after_events` good events, nothing for `pause`, then the rest of the good stream.
    IdleMidStream {
        /// Good events before the pause.
        after_events: usize,
        /// How long nothing is sent.
        pause: Duration,
    },
    /// The whole good stream, then the in-band 503 after the terminal event.
    TrailingErrorAfterTerminal,
    /// The good stream's bytes, each event in several frames: after `data`, in the middle, and between
    /// every two bytes of its closing blank line (so between the CR and the LF of Gemini's CRLF CRLF).
    SplitFrames,
    /// `after_events` good events, then an event that never ends: `data: ` and a JSON text sent one
    /// [`ENDLESS_FRAME`] after another, without a line ending (see [`MockUpstream::endless_bytes`]).
    /// With 0, the first event never ends.
    EndlessEvent {
        /// Good events before the endless one.
        after_events: usize,
    },
}

impl StreamFault {
    /// A per-minute 429 before the stream, with the QuotaFailure (model `model`) and RetryInfo (20 s)
    /// of today's Gemini.
    pub fn quota_429(model: &str) -> Self {
        Self::StatusBeforeStream(429, quota_failure(PER_MINUTE_QUOTA_ID, model, 10, "20s"))
    }

    /// Gemini's 503 "The model is overloaded" before the stream.
    pub fn overloaded_503() -> Self {
        Self::StatusBeforeStream(503, OVERLOADED.to_owned())
    }
}

/// The two stream formats the mock speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamDialect {
    /// `:streamGenerateContent?alt=sse`: events end with CRLF CRLF; the terminal event carries
    /// `finishReason`.
    Gemini,
    /// `/chat/completions` with `"stream": true`: events end with LF LF; the terminal event is
    /// `data: [DONE]`.
    OpenAi,
}

impl StreamDialect {
    fn blank_line(self) -> &'static str {
        match self {
            Self::Gemini => "\r\n\r\n",
            Self::OpenAi => "\n\n",
        }
    }

    fn event(self, data: &str) -> Bytes {
        Bytes::from(format!("data: {data}{}", self.blank_line()))
    }
}

/// The events of a good stream, each with its closing blank line, in order; the last one is the
/// terminal event. Gemini: `events` events with the text `chunk 1` … `chunk N`, the last with
/// `finishReason: STOP` and `usageMetadata`. OpenAI: `events` chunks with the same texts, a chunk with
/// `finish_reason: stop` and `usage`, then `[DONE]`. The bytes depend only on the arguments.
pub fn good_stream(dialect: StreamDialect, model: &str, events: usize) -> Vec<Bytes> {
    let events = events.max(1);
    let (prompt, output) = (5, events);
    let total = prompt + output;
    let mut stream: Vec<Bytes> = (1..=events)
        .map(|i| {
            let text = format!("chunk {i}");
            let data = match dialect {
                StreamDialect::Gemini if i == events => json!({
                    "candidates": [{
                        "content": {"parts": [{"text": text}], "role": "model"},
                        "finishReason": "STOP",
                        "index": 0,
                    }],
                    "usageMetadata": {
                        "promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": total,
                    },
                    "modelVersion": model,
                }),
                StreamDialect::Gemini => json!({
                    "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
                    "modelVersion": model,
                }),
                StreamDialect::OpenAi => json!({
                    "id": OPENAI_ID, "object": "chat.completion.chunk", "created": OPENAI_CREATED, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": null}],
                }),
            };
            dialect.event(&data.to_string())
        })
        .collect();
    if dialect == StreamDialect::OpenAi {
        let stop = json!({
            "id": OPENAI_ID, "object": "chat.completion.chunk", "created": OPENAI_CREATED, "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": total},
        });
        stream.push(dialect.event(&stop.to_string()));
        stream.push(dialect.event("[DONE]"));
    }
    stream
}

/// The JSON of an in-band (or before-stream) error of this code, in Gemini's shape:
/// `{"error":{"code":…,"message":…,"status":…}}`. 429 is [`BARE_429`], 503 is "The model is
/// overloaded. Please try again later." with `UNAVAILABLE`.
pub fn error_body(code: u16) -> String {
    match code {
        429 => BARE_429.to_owned(),
        503 => OVERLOADED.to_owned(),
        _ => {
            let (message, status) = match code {
                400 => ("Request contains an invalid argument.", "INVALID_ARGUMENT"),
                403 => ("Permission denied.", "PERMISSION_DENIED"),
                500 => ("An internal error has occurred.", "INTERNAL"),
                504 => ("The service is currently unavailable.", "DEADLINE_EXCEEDED"),
                _ => ("Unknown error.", "UNKNOWN"),
            };
            json!({"error": {"code": code, "message": message, "status": status}}).to_string()
        }
    }
}

/// What the mock saw of one request, secrets included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// `POST`, `GET`…
    pub method: String,
    /// The path and the query string, as received.
    pub path_and_query: String,
    /// Every header, names lowercase, values as received (non-UTF-8 bytes replaced), in order.
    pub headers: Vec<(String, String)>,
    /// The key the mock read (`x-goog-api-key`, else `Authorization: Bearer …`); `None` when empty.
    pub key: Option<String>,
    /// The request body.
    pub body: Bytes,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            quota: None,
            window: Duration::from_secs(60),
            latency: Duration::from_millis(20),
            bad_keys: HashSet::new(),
            overload_every: None,
            projects: HashMap::new(),
            model_quotas: Vec::new(),
            minute: Duration::from_secs(60),
            bare_429_models: HashSet::new(),
            project_rate_limited: HashSet::new(),
            stream_events: 3,
            stream_delay: Duration::ZERO,
            stream_faults: Vec::new(),
            stream_faults_by_key: HashMap::new(),
            fixed_answer: None,
            endless_bodies: false,
            gemini_auth: false,
            files_forbidden: false,
            openai_error_arrays: false,
            file_lifetime: Duration::from_secs(48 * 3600),
        }
    }
}

/// The request limits of one model, metered per (project, model).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelQuota {
    /// The model name, without `models/`.
    pub model: String,
    /// Successful requests per mock day (until [`MockUpstream::reset_day`]); `None`: unlimited.
    pub per_day: Option<u32>,
    /// Successful requests per [`MockConfig::minute`] (sliding); `None`: unlimited.
    pub per_minute: Option<u32>,
    /// Quota 0: the model is not on this tier; every request answers a per-day 429 with `limit: 0`.
    pub zero: bool,
}

/// What the mock saw for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests answered 429.
    pub rate_limited: u64,
    /// Requests answered 400 `API_KEY_INVALID`.
    pub invalid: u64,
    /// Requests answered 503.
    pub overloaded: u64,
    /// The most requests with this key in flight at the same moment.
    pub max_in_flight: u64,
    /// Requests that arrived before the deadline the mock had announced in a 429.
    pub before_deadline: u64,
    /// Streaming requests answered with a [`StreamFault`].
    pub faults: u64,
    /// 200 event-stream answers begun (good ones and faults alike).
    pub streams_started: u64,
    /// Streams whose terminal event was handed to hyper to write.
    pub streams_completed: u64,
    /// Streams whose body was dropped before its script ended, with no terminal event handed over:
    /// the client went away.
    pub streams_cancelled: u64,
    in_flight: u64,
    accepted: VecDeque<Instant>,
    deadline: Option<Instant>,
}

impl KeyStats {
    /// Requests with this key in flight now; a stream is in flight until hyper drops its body.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// What the mock saw for one (project, model) bucket, over all the days.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Requests that arrived for this bucket with a valid key, whatever the answer.
    pub requests: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Requests answered 429, of any form.
    pub rate_limited: u64,
    /// Requests that arrived after this bucket had answered a per-day 429 (or a quota-0 429) in the
    /// same mock day: a client that reads per-day 429s right sends none.
    pub after_429: u64,
    /// Requests that arrived before the deadline announced in this bucket's per-minute 429.
    pub before_deadline: u64,
    today: u64,
    exhausted_today: bool,
    accepted: VecDeque<Instant>,
    deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    requests: u64,
    keys: HashMap<String, KeyStats>,
    models: HashMap<(String, String), ModelStats>,
    seen: Vec<SeenRequest>,
    faults: VecDeque<StreamFault>,
    faults_by_key: HashMap<String, VecDeque<StreamFault>>,
    /// Bytes of endless bodies and events handed to hyper to write.
    endless_bytes: u64,
    /// Uploaded files, per project.
    files: files::Files,
}

impl State {
    fn lock(state: &Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault the next streaming request of `key` takes, if any.
    fn take_fault(&mut self, key: &str) -> Option<StreamFault> {
        let own = self.faults_by_key.get_mut(key).and_then(VecDeque::pop_front);
        own.or_else(|| self.faults.pop_front())
    }
}

/// A running mock upstream; it stops when dropped.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Starts listening on 127.0.0.1 on a free port (on the current tokio runtime).
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            faults: config.stream_faults.iter().cloned().collect(),
            faults_by_key: (config.stream_faults_by_key.iter())
                .map(|(key, faults)| (key.clone(), faults.iter().cloned().collect()))
                .collect(),
            ..State::default()
        }));
        let config = Arc::new(config);
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, config) = (Arc::clone(&shared), Arc::clone(&config));
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(Arc::clone(&state), Arc::clone(&config), request));
                    // A client that goes away mid-answer (a killed worker) is not the mock's problem.
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it saw per key (by secret: the mock is the one place that knows them), and in all.
    pub fn stats(&self) -> (u64, HashMap<String, KeyStats>) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.requests, state.keys.clone())
    }

    /// What it saw per (project, model); the project of a secret not in [`MockConfig::projects`] is
    /// the secret itself.
    pub fn model_stats(&self) -> HashMap<(String, String), ModelStats> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).models.clone()
    }

    /// Every request it received so far, in order of arrival.
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        State::lock(&self.state).seen.clone()
    }

    /// The bytes of endless bodies and events ([`MockConfig::endless_bodies`],
    /// [`StreamFault::EndlessEvent`]) handed to hyper so far. hyper asks for the next frame only once
    /// it wrote the last one, so this is what the client read plus the socket buffers in between.
    pub fn endless_bytes(&self) -> u64 {
        State::lock(&self.state).endless_bytes
    }

    /// Queues a fault for the next streaming requests, after those already queued.
    pub fn push_stream_fault(&self, fault: StreamFault) {
        State::lock(&self.state).faults.push_back(fault);
    }

    /// Queues a fault for the next streaming requests of one key (secret), before the shared ones.
    pub fn push_stream_fault_for(&self, key: &str, fault: StreamFault) {
        State::lock(&self.state).faults_by_key.entry(key.to_owned()).or_default().push_back(fault);
    }

    /// Waits until `condition` holds on the per-key stats, checking every 10 ms; `false` if it still
    /// does not after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, condition: impl Fn(&HashMap<String, KeyStats>) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(&State::lock(&self.state).keys) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until no key has a request in flight (streams included); `false` on timeout.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |keys| keys.values().all(|stats| stats.in_flight == 0)).await
    }

    /// Waits until `key` (a secret) has no request in flight; `false` on timeout.
    pub async fn wait_key_idle(&self, key: &str, timeout: Duration) -> bool {
        self.wait_for(timeout, |keys| keys.get(key).is_none_or(|stats| stats.in_flight == 0)).await
    }

    /// The mock's midnight: every per-day counter starts again, and no bucket has answered a per-day
    /// 429 yet. The cumulative stats stay.
    pub fn reset_day(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for bucket in state.models.values_mut() {
            bucket.today = 0;
            bucket.exhausted_today = false;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The project number the mock reports for a project name (`consumer: projects/<number>`): 12 digits
/// derived from the name, stable across runs.
pub fn project_number(project: &str) -> u64 {
    let digest = Sha256::digest(project.as_bytes());
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&digest[..8]);
    100_000_000_000 + u64::from_be_bytes(bytes) % 900_000_000_000
}

async fn answer(
    state: Arc<Mutex<State>>,
    config: Arc<MockConfig>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let key = parts
        .headers
        .get(KEY_HEADER)
        .or_else(|| parts.headers.get(hyper::header::AUTHORIZATION))
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
        .unwrap_or_default()
        .to_owned();
    let body = body.collect().await.map(|body| body.to_bytes()).unwrap_or_default();
    if let Some(response) = files::answer(&state, &config, &parts, &key, &body) {
        return Ok(response);
    }
    let path = parts.uri.path();
    let slow = path.starts_with("/slow");
    let chat = path.ends_with("/chat/completions");
    let bearer_on_native = config.gemini_auth
        && parts.headers.get(KEY_HEADER).is_none()
        && parts.headers.contains_key(hyper::header::AUTHORIZATION)
        && !chat
        && !path.contains("/openai/");
    let model = model_in_path(path).map(str::to_owned).or_else(|| model_in_body(&body));
    let stream = stream_dialect(&parts.uri, &body);
    let file = config.files_forbidden.then(|| file_in_request(path, &body)).flatten();
    let arrived = Instant::now();
    let (status, body, fault) = {
        let mut state = State::lock(&state);
        state.requests += 1;
        state.seen.push(SeenRequest {
            method: parts.method.to_string(),
            path_and_query: parts.uri.path_and_query().map_or_else(|| path.to_owned(), ToString::to_string),
            headers: (parts.headers.iter())
                .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                .collect(),
            key: (!key.is_empty()).then(|| key.clone()),
            body,
        });
        let valid = !key.is_empty() && !config.bad_keys.contains(&key);
        let fault = if stream.is_some() && valid { state.take_fault(&key) } else { None };
        let overload = config.overload_every.is_some_and(|every| state.requests.is_multiple_of(every));
        let State { keys, models, .. } = &mut *state;
        let stats = keys.entry(key.clone()).or_default();
        stats.in_flight += 1;
        stats.max_in_flight = stats.max_in_flight.max(stats.in_flight);
        if stats.deadline.is_some_and(|deadline| arrived < deadline) {
            stats.before_deadline += 1;
        }
        if fault.is_some() {
            stats.faults += 1;
            (StatusCode::OK, String::new(), fault)
        } else if bearer_on_native {
            (StatusCode::UNAUTHORIZED, UNAUTHENTICATED.to_owned(), None)
        } else if let Some(file) = file.as_deref().filter(|_| valid) {
            (StatusCode::FORBIDDEN, file_403(file), None)
        } else if let Some(fixed) = config.fixed_answer.as_ref().filter(|_| valid) {
            if fixed.status == 429 {
                stats.rate_limited += 1;
            }
            (StatusCode::from_u16(fixed.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), fixed.body.clone(), None)
        } else {
            let (status, body) = judge(&config, stats, models, &key, model.as_deref(), arrived, overload);
            (status, body, None)
        }
    };
    let body = if config.openai_error_arrays && chat && !status.is_success() { format!("[{body}]") } else { body };
    // From here on, however the answer ends (a client gone during the latency included), the request
    // leaves the key's in-flight count when this guard drops.
    let mut flight = Flight { state, key, streaming: false, terminal: false, ended: false };
    let latency = if slow { Duration::from_secs(60) } else { config.latency };
    // Even a zero sleep waits for the timer's next millisecond tick; an instant mock answers at once.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let model = model.as_deref().unwrap_or("gemini-2.5-flash");
    if let Some(fixed) = config.fixed_answer.as_ref().filter(|fixed| fixed.status == status.as_u16()) {
        let mut response = whole(status, body);
        for (name, value) in &fixed.headers {
            if let (Ok(name), Ok(value)) =
                (hyper::header::HeaderName::from_bytes(name.as_bytes()), hyper::header::HeaderValue::from_str(value))
            {
                response.headers_mut().insert(name, value);
            }
        }
        return Ok(response);
    }
    if config.endless_bodies && stream.is_none() && status == StatusCode::OK {
        let steps = [Step::Data(Bytes::from_static(ENDLESS_PREFIX.as_bytes())), Step::Endless].into();
        let mut response =
            Response::new(MockBody::Stream(Box::new(Script { steps, sleep: None, flushed: false, flight })));
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
        return Ok(response);
    }
    let script = match (stream, fault) {
        (Some(_), Some(StreamFault::StatusBeforeStream(code, body))) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(whole(status, body));
        }
        (Some(dialect), fault) if status == StatusCode::OK => script(dialect, model, &config, fault),
        _ if status == StatusCode::OK && chat => return Ok(whole(status, chat_completion(model))),
        _ => return Ok(whole(status, body)),
    };
    if let Some(stats) = State::lock(&flight.state).keys.get_mut(&flight.key) {
        stats.streams_started += 1;
    }
    flight.streaming = true;
    let body = MockBody::Stream(Box::new(Script { steps: script, sleep: None, flushed: false, flight }));
    let mut response = Response::new(body);
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/event-stream"));
    Ok(response)
}

/// The id of the file a request names (`files/abc` in its path, or anywhere in its body, e.g. a
/// `fileUri`), if any.
fn file_in_request(path: &str, body: &[u8]) -> Option<String> {
    let body = String::from_utf8_lossy(body);
    [path, body.as_ref()].into_iter().find_map(|text| {
        let (_, rest) = text.split_once("files/")?;
        let id: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        (!id.is_empty()).then_some(id)
    })
}

/// Gemini's 403 for a file that does not exist, expired, or belongs to another project.
pub fn file_403(id: &str) -> String {
    json!({"error": {
        "code": 403,
        "message": format!("You do not have permission to access the File {id} or it may not exist."),
        "status": "PERMISSION_DENIED",
    }})
    .to_string()
}

/// A whole JSON answer.
fn whole(status: StatusCode, body: String) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Whole(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// The dialect of a streaming request: Gemini's `:streamGenerateContent?alt=sse` (without `alt=sse`
/// the mock answers one JSON object, as before), or a chat completion whose body says `"stream": true`
/// (OpenAI's SDK sends `Accept: application/json` even then).
fn stream_dialect(uri: &hyper::Uri, body: &[u8]) -> Option<StreamDialect> {
    let path = uri.path();
    if path.contains(":streamGenerateContent") {
        let sse = uri.query().is_some_and(|query| query.split('&').any(|pair| pair == "alt=sse"));
        return sse.then_some(StreamDialect::Gemini);
    }
    let streaming = || {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        value.get("stream")?.as_bool()
    };
    (path.ends_with("/chat/completions") && streaming() == Some(true)).then_some(StreamDialect::OpenAi)
}

/// What one streaming answer sends, step by step.
fn script(dialect: StreamDialect, model: &str, config: &MockConfig, fault: Option<StreamFault>) -> VecDeque<Step> {
    let events = good_stream(dialect, model, config.stream_events);
    let last = events.len() - 1;
    // Each event's steps: the pause before it (not before the first), then its bytes.
    let good: Vec<Vec<Step>> = (events.iter().enumerate())
        .map(|(i, event)| {
            let mut steps = Vec::new();
            if i > 0 && !config.stream_delay.is_zero() {
                steps.push(Step::Pause(config.stream_delay));
            }
            steps.push(if i == last { Step::Terminal(event.clone()) } else { Step::Data(event.clone()) });
            steps
        })
        .collect();
    let until = |n: usize| good[..n.min(last)].iter().flatten().cloned();
    let arrays = config.openai_error_arrays && matches!(dialect, StreamDialect::OpenAi);
    let error =
        |code| Step::Data(dialect.event(&if arrays { format!("[{}]", error_body(code)) } else { error_body(code) }));
    let Some(fault) = fault else { return good.into_iter().flatten().collect() };
    match fault {
        // Answered before any stream: `answer` never gets here with it.
        StreamFault::StatusBeforeStream(..) => VecDeque::new(),
        StreamFault::ErrorAsFirstEvent(code) => [error(code)].into(),
        StreamFault::EndBeforeFirstEvent => VecDeque::new(),
        StreamFault::PartialFirstEvent => {
            let first = &events[0];
            let line_end = dialect.blank_line().len() / 2;
            [Step::Data(first.slice(..first.len() - line_end))].into()
        }
        StreamFault::SilentBeforeFirstEvent(pause) => {
            std::iter::once(Step::Pause(pause)).chain(good.into_iter().flatten()).collect()
        }
        StreamFault::ErrorMidStream { after_events } => until(after_events).chain([error(503)]).collect(),
        StreamFault::BreakMidStream { after_events } => until(after_events).chain([Step::Abort]).collect(),
        StreamFault::TruncateMidStream { after_events } => until(after_events).collect(),
        StreamFault::IdleMidStream { after_events, pause } => {
            let n = after_events.min(last);
            let rest = good[n..].iter().flatten().cloned();
            until(n).chain([Step::Pause(pause)]).chain(rest).collect()
        }
        StreamFault::EndlessEvent { after_events } => {
            let start = Step::Data(Bytes::from(format!("data: {ENDLESS_PREFIX}")));
            until(after_events).chain([start, Step::Endless]).collect()
        }
        StreamFault::TrailingErrorAfterTerminal => good.into_iter().flatten().chain([error(503)]).collect(),
        StreamFault::SplitFrames => good
            .into_iter()
            .flatten()
            .flat_map(|step| match step {
                Step::Data(event) => split(&event, dialect).into_iter().map(Step::Data).collect(),
                Step::Terminal(event) => {
                    let mut parts = split(&event, dialect);
                    let end = parts.pop().map(Step::Terminal);
                    parts.into_iter().map(Step::Data).chain(end).collect()
                }
                other => vec![other],
            })
            .collect(),
    }
}

/// An event cut after `data`, in the middle, and between every two bytes of its closing blank line.
fn split(event: &Bytes, dialect: StreamDialect) -> Vec<Bytes> {
    let blank = dialect.blank_line().len();
    let mut cuts = vec![4, event.len() / 2];
    cuts.extend((1..blank).map(|i| event.len() - blank + i));
    let mut start = 0;
    let mut parts = Vec::new();
    for cut in cuts.into_iter().chain([event.len()]) {
        if cut > start {
            parts.push(event.slice(start..cut));
            start = cut;
        }
    }
    parts
}

/// A non-streaming chat completion, in OpenAI's shape.
fn chat_completion(model: &str) -> String {
    json!({
        "id": OPENAI_ID, "object": "chat.completion", "created": OPENAI_CREATED, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the mock upstream."},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
    })
    .to_string()
}

const OPENAI_ID: &str = "chatcmpl-mock";

/// A fixed `created`, so the bytes of an answer depend only on the request.
const OPENAI_CREATED: u64 = 1_700_000_000;

/// One step of a streaming answer.
#[derive(Debug, Clone)]
enum Step {
    /// A body frame.
    Data(Bytes),
    /// The frame that completes the stream's terminal event.
    Terminal(Bytes),
    /// Nothing is sent for this long.
    Pause(Duration),
    /// The body fails, so hyper aborts the connection.
    Abort,
    /// [`ENDLESS_FRAME`] bytes of text, again and again: the last step, never taken off the script.
    Endless,
}

/// How an endless body or event starts: a JSON answer whose text never ends.
const ENDLESS_PREFIX: &str = r#"{"candidates":[{"content":{"parts":[{"text":""#;

/// The text of an endless body or event, one frame of it.
static ENDLESS_TEXT: [u8; ENDLESS_FRAME] = [b'a'; ENDLESS_FRAME];

/// The pause after each frame of an endless body or event.
const ENDLESS_PAUSE: Duration = Duration::from_millis(2);

/// The mock's response body: a whole JSON answer, or a scripted event stream.
enum MockBody {
    Whole(Option<Bytes>),
    Stream(Box<Script>),
}

struct Script {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connection has been given a chance to flush since the last frame.
    flushed: bool,
    flight: Flight,
}

/// Keeps a request in its key's in-flight count until dropped: with the answer, or with a stream's
/// body when hyper drops it. For a stream, it tells how the stream ended.
struct Flight {
    state: Arc<Mutex<State>>,
    key: String,
    streaming: bool,
    /// The terminal event was handed to hyper.
    terminal: bool,
    /// The script ended (cleanly or by its abort).
    ended: bool,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(stats) = State::lock(&self.state).keys.get_mut(&self.key) {
            stats.in_flight -= 1;
            if self.streaming && !self.terminal && !self.ended {
                stats.streams_cancelled += 1;
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let script = match self.get_mut() {
            Self::Whole(bytes) => return Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Self::Stream(script) => script,
        };
        loop {
            if let Some(sleep) = script.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                script.sleep = None;
            }
            match script.steps.front() {
                None => {
                    script.flight.ended = true;
                    return Poll::Ready(None);
                }
                Some(Step::Pause(pause)) => {
                    script.sleep = Some(Box::pin(tokio::time::sleep(*pause)));
                    script.steps.pop_front();
                    continue;
                }
                // hyper flushes what it buffered only once the body is pending: going pending once
                // before each frame puts each frame on the wire on its own, and lets the frames before
                // an abort out before hyper drops the connection's write buffer.
                Some(_) if !script.flushed => {
                    script.flushed = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(_) => script.flushed = false,
            }
            if let Some(Step::Endless) = script.steps.front() {
                State::lock(&script.flight.state).endless_bytes += ENDLESS_FRAME as u64;
                // A pause between frames keeps an endless body to about 30 MB/s: a client without a cap
                // fills its memory in seconds, not in an instant.
                script.sleep = Some(Box::pin(tokio::time::sleep(ENDLESS_PAUSE)));
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ENDLESS_TEXT)))));
            }
            return Poll::Ready(match script.steps.pop_front() {
                Some(Step::Data(bytes)) => Some(Ok(Frame::data(bytes))),
                Some(Step::Terminal(bytes)) => {
                    script.flight.terminal = true;
                    if let Some(stats) = State::lock(&script.flight.state).keys.get_mut(&script.flight.key) {
                        stats.streams_completed += 1;
                    }
                    Some(Ok(Frame::data(bytes)))
                }
                _ => {
                    script.flight.ended = true;
                    Some(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "mock: stream broken on purpose",
                    )))
                }
            });
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64)),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// `gemini-2.5-pro` from `/v1beta/models/gemini-2.5-pro:generateContent`.
fn model_in_path(path: &str) -> Option<&str> {
    let (_, rest) = path.rsplit_once("/models/")?;
    let model = rest.split_once(':').map_or(rest, |(model, _)| model);
    (!model.is_empty()).then_some(model)
}

/// The `model` of an OpenAI-compatible JSON body, without `models/`.
fn model_in_body(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let model = value.get("model")?.as_str()?;
    let model = model.strip_prefix("models/").unwrap_or(model);
    (!model.is_empty()).then(|| model.to_owned())
}

/// The answer for one request, updating the key's window and the (project, model) bucket.
fn judge(
    config: &MockConfig,
    stats: &mut KeyStats,
    models: &mut HashMap<(String, String), ModelStats>,
    key: &str,
    model: Option<&str>,
    now: Instant,
    overload: bool,
) -> (StatusCode, String) {
    if config.bad_keys.contains(key) || key.is_empty() {
        stats.invalid += 1;
        return (StatusCode::BAD_REQUEST, INVALID_KEY.to_owned());
    }
    let project = config.projects.get(key).map_or(key, String::as_str);
    let mut bucket = model.map(|model| {
        let bucket = models.entry((project.to_owned(), model.to_owned())).or_default();
        bucket.requests += 1;
        if bucket.exhausted_today {
            bucket.after_429 += 1;
        }
        if bucket.deadline.is_some_and(|deadline| now < deadline) {
            bucket.before_deadline += 1;
        }
        bucket
    });
    if overload {
        stats.overloaded += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, OVERLOADED.to_owned());
    }
    let mut limited = |body: String| {
        stats.rate_limited += 1;
        (StatusCode::TOO_MANY_REQUESTS, body)
    };
    if config.project_rate_limited.contains(project) {
        bucket.iter_mut().for_each(|bucket| bucket.rate_limited += 1);
        return limited(project_rate_limited(project));
    }
    let quota = model.and_then(|model| config.model_quotas.iter().find(|quota| quota.model == model));
    if let (Some(model), Some(bucket)) = (model, bucket.as_deref_mut()) {
        if config.bare_429_models.contains(model) {
            bucket.rate_limited += 1;
            return limited(BARE_429.to_owned());
        }
        if let Some(quota) = quota {
            let per_day = if quota.zero { Some(0) } else { quota.per_day };
            if let Some(limit) = per_day.filter(|limit| bucket.today >= u64::from(*limit)) {
                bucket.exhausted_today = true;
                bucket.rate_limited += 1;
                return limited(quota_failure(PER_DAY_QUOTA_ID, model, limit, PER_DAY_RETRY_DELAY));
            }
            if let Some(limit) = quota.per_minute {
                while bucket.accepted.front().is_some_and(|at| now.duration_since(*at) >= config.minute) {
                    bucket.accepted.pop_front();
                }
                if bucket.accepted.len() >= limit as usize {
                    let frees_at = bucket.accepted.back().map_or(now, |newest| *newest + config.minute);
                    bucket.deadline = Some(frees_at);
                    bucket.rate_limited += 1;
                    let delay = format!("{:.3}s", ceil_millis(frees_at.duration_since(now)));
                    return limited(quota_failure(&window_quota_id(config.minute), model, limit, &delay));
                }
            }
        }
    }
    if let Some(quota) = config.quota {
        while stats.accepted.front().is_some_and(|at| now.duration_since(*at) >= config.window) {
            stats.accepted.pop_front();
        }
        if stats.accepted.len() >= quota as usize {
            // The key may come back when its whole window is free again: when the newest accepted
            // request leaves it. A client that honours this sees one 429 per key per window.
            let frees_at = stats.accepted.back().map_or(now, |newest| *newest + config.window);
            stats.deadline = Some(frees_at);
            stats.rate_limited += 1;
            bucket.iter_mut().for_each(|bucket| bucket.rate_limited += 1);
            let delay = ceil_millis(frees_at.duration_since(now));
            return (StatusCode::TOO_MANY_REQUESTS, rate_limited(delay, quota, config.window));
        }
        stats.accepted.push_back(now);
    }
    if let Some(bucket) = bucket {
        bucket.ok += 1;
        bucket.today += 1;
        // Only a bucket with a per-minute limit needs its window; the others would grow without end.
        if quota.is_some_and(|quota| quota.per_minute.is_some()) {
            bucket.accepted.push_back(now);
        }
    }
    stats.ok += 1;
    (StatusCode::OK, SUCCESS.to_owned())
}

/// Seconds, rounded up to the millisecond, so a client that waits exactly this long is never early.
fn ceil_millis(delay: Duration) -> f64 {
    (delay.as_secs_f64() * 1000.0).ceil() / 1000.0
}

const SUCCESS: &str = r#"{"candidates":[{"content":{"parts":[{"text":"Hello from the mock upstream."}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":6,"totalTokenCount":11},"modelVersion":"gemini-2.5-flash"}"#;

const INVALID_KEY: &str = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;

const OVERLOADED: &str =
    r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

/// Gemini's 429 for a key's `limit` requests per `window`, with the delay until the key's window
/// frees.
fn rate_limited(delay_secs: f64, limit: u32, window: Duration) -> String {
    let quota_id = window_quota_id(window);
    format!(
        r#"{{"error":{{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"{quota_id}","quotaDimensions":{{"location":"global","model":"gemini-2.5-flash"}},"quotaValue":"{limit}"}}]}},{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay_secs:.3}s"}}]}}}}"#
    )
}

/// The quota id of requests per `window`: Gemini's per-minute id for a real minute; for the shortened
/// windows of tests, an id that says its length in milliseconds, which no client can take for a limit
/// per minute (apijongler learns limits from ids naming a second, minute, hour or day).
fn window_quota_id(window: Duration) -> String {
    if window == Duration::from_secs(60) {
        PER_MINUTE_QUOTA_ID.to_owned()
    } else {
        format!("GenerateRequestsPer{}MillisecondsPerProjectPerModel-Mock", window.as_millis())
    }
}

/// Gemini's free-tier 429 for one (project, model) quota, in today's long form: the limit both in the
/// message (`limit: N`) and as `quotaValue`, and the delay in the text and in `RetryInfo`.
fn quota_failure(quota_id: &str, model: &str, limit: u32, retry_delay: &str) -> String {
    const METRIC: &str = "generativelanguage.googleapis.com/generate_content_free_tier_requests";
    let seconds = retry_delay.trim_end_matches('s');
    let message = format!(
        "You exceeded your current quota, please check your plan and billing details. For more information on \
         this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, \
         head to: https://ai.dev/usage?tab=rate-limit. \n* Quota exceeded for metric: {METRIC}, limit: {limit}, \
         model: {model}\nPlease retry in {seconds}s."
    );
    json!({"error": {
        "code": 429,
        "message": message,
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": METRIC,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": limit.to_string(),
            }]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
        ],
    }})
    .to_string()
}

/// The older project-wide 429 (ErrorInfo `RATE_LIMIT_EXCEEDED`, no model, no RetryInfo), which names
/// the project as `consumer`.
fn project_rate_limited(project: &str) -> String {
    let number = project_number(project);
    json!({"error": {
        "code": 429,
        "message": format!(
            "Quota exceeded for quota metric 'Generate Content API requests per minute' and limit 'GenerateContent \
             request limit per minute for a region' of service 'generativelanguage.googleapis.com' for consumer \
             'project_number:{number}'."
        ),
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED",
             "domain": "googleapis.com", "metadata": {
                "service": "generativelanguage.googleapis.com",
                "consumer": format!("projects/{number}"),
                "quota_limit_value": "60",
                "quota_limit": PROJECT_QUOTA_LIMIT,
                "quota_location": "us-west4",
                "quota_metric": "generativelanguage.googleapis.com/generate_content_requests",
            }},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Request a higher quota limit.",
                "url": "https://cloud.google.com/docs/quota#requesting_higher_quota",
            }]},
        ],
    }})
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRO: &str = "gemini-2.5-pro";
    const FLASH: &str = "gemini-2.5-flash";

    fn config() -> MockConfig {
        MockConfig {
            latency: Duration::ZERO,
            // k1 and k2 share project p; k3 is its own project; k4 is in a project-wide rate-limited one.
            projects: [("k1", "p"), ("k2", "p"), ("k4", "throttled")]
                .map(|(key, project)| (key.to_owned(), project.to_owned()))
                .into(),
            model_quotas: vec![
                ModelQuota { model: PRO.into(), per_day: Some(2), ..ModelQuota::default() },
                ModelQuota { model: FLASH.into(), per_minute: Some(2), ..ModelQuota::default() },
                ModelQuota { model: "gemini-3-pro".into(), zero: true, ..ModelQuota::default() },
            ],
            bare_429_models: ["gemini-old".to_owned()].into(),
            project_rate_limited: ["throttled".to_owned()].into(),
            ..MockConfig::default()
        }
    }

    /// A running mock and one client for all of a test's requests (a client per request is slow enough
    /// to make a short window expire between them).
    struct Probe {
        upstream: MockUpstream,
        client: reqwest::Client,
    }

    async fn start(config: MockConfig) -> Probe {
        Probe { upstream: MockUpstream::start(config).await.unwrap(), client: reqwest::Client::new() }
    }

    /// Sends one Gemini request (`key`, `model`) and returns the status and the parsed body.
    async fn gemini(mock: &Probe, key: &str, model: &str) -> (u16, serde_json::Value) {
        let url = format!("{}/v1beta/models/{model}:generateContent", mock.upstream.url());
        let response = mock.client.post(url).header(KEY_HEADER, key).body("{}").send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_slice(&response.bytes().await.unwrap()).unwrap())
    }

    /// The single QuotaFailure violation and the RetryInfo delay of a 429 body.
    fn violation(body: &serde_json::Value) -> (serde_json::Value, String) {
        let details = body["error"]["details"].as_array().expect("details");
        let find = |kind: &str| details.iter().find(|detail| detail["@type"].as_str().unwrap().ends_with(kind));
        let violations = find("QuotaFailure").expect("QuotaFailure")["violations"].as_array().unwrap().clone();
        assert_eq!(violations.len(), 1, "{body}");
        let delay = find("RetryInfo").expect("RetryInfo")["retryDelay"].as_str().unwrap().to_owned();
        (violations[0].clone(), delay)
    }

    fn bucket(mock: &Probe, project: &str, model: &str) -> ModelStats {
        mock.upstream.model_stats().remove(&(project.to_owned(), model.to_owned())).unwrap_or_default()
    }

    #[test]
    fn the_model_is_read_from_the_path_or_the_body() {
        for (path, model) in [
            ("/v1beta/models/gemini-2.5-pro:generateContent", Some("gemini-2.5-pro")),
            ("/slow/v1beta/models/m:streamGenerateContent", Some("m")),
            ("/v1beta/models/gemini-2.5-pro", Some("gemini-2.5-pro")),
            ("/v1beta/models/:generateContent", None),
            ("/v1beta/openai/chat/completions", None),
        ] {
            assert_eq!(model_in_path(path), model, "{path}");
        }
        for (body, model) in [
            (r#"{"model":"models/gemini-2.5-pro","messages":[]}"#, Some("gemini-2.5-pro")),
            (r#"{"model":"gemini-2.5-flash"}"#, Some("gemini-2.5-flash")),
            (r#"{"model":""}"#, None),
            (r#"{"messages":[]}"#, None),
            ("not json", None),
        ] {
            assert_eq!(model_in_body(body.as_bytes()).as_deref(), model, "{body}");
        }
    }

    #[tokio::test]
    async fn a_per_day_quota_is_per_project_and_model_until_the_mock_midnight() {
        let mock = start(config()).await;
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 200);
        assert_eq!(gemini(&mock, "k2", PRO).await.0, 200);
        // Project p has used its 2 pro requests, through two keys; flash and project k3 are untouched.
        let (status, body) = gemini(&mock, "k2", PRO).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        let (violation, delay) = violation(&body);
        assert_eq!(violation["quotaId"], PER_DAY_QUOTA_ID);
        assert_eq!(violation["quotaValue"], "2");
        assert_eq!(violation["quotaDimensions"], json!({"location": "global", "model": PRO}));
        assert_eq!(delay, PER_DAY_RETRY_DELAY, "the short, misleading delay of real Gemini");
        assert!(body["error"]["message"].as_str().unwrap().contains("limit: 2, model: gemini-2.5-pro"), "{body}");
        assert_eq!(bucket(&mock, "p", PRO).after_429, 0, "the first 429 is not a request after a 429");
        assert_eq!(gemini(&mock, "k3", PRO).await.0, 200);
        assert_eq!(gemini(&mock, "k1", FLASH).await.0, 200);
        // A request after the per-day 429, even with the other key of the project, is counted.
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 429);
        let pro = bucket(&mock, "p", PRO);
        assert_eq!((pro.requests, pro.ok, pro.rate_limited, pro.after_429), (4, 2, 2, 1));
        assert_eq!(bucket(&mock, "k3", PRO).after_429, 0);
        let (_, keys) = mock.upstream.stats();
        assert_eq!((keys["k1"].ok, keys["k1"].rate_limited, keys["k2"].rate_limited), (2, 1, 1));

        mock.upstream.reset_day();
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 200, "a new day");
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 200);
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 429);
        let pro = bucket(&mock, "p", PRO);
        assert_eq!((pro.ok, pro.rate_limited, pro.after_429), (4, 3, 1), "no request after today's 429 yet");
    }

    #[tokio::test]
    async fn a_per_minute_quota_announces_when_its_window_frees() {
        let mock = start(config()).await;
        let started = Instant::now();
        assert_eq!(gemini(&mock, "k1", FLASH).await.0, 200);
        assert_eq!(gemini(&mock, "k2", FLASH).await.0, 200);
        let (status, body) = gemini(&mock, "k1", FLASH).await;
        assert_eq!(status, 429, "{body}");
        let (violation, delay) = violation(&body);
        assert_eq!(violation["quotaId"], PER_MINUTE_QUOTA_ID);
        assert_eq!(violation["quotaValue"], "2");
        assert_eq!(violation["quotaDimensions"]["model"], FLASH);
        let delay: f64 = delay.strip_suffix('s').unwrap().parse().unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        assert!(delay <= 60.0 && delay >= 60.0 - elapsed - 0.001, "{delay} s, {elapsed} s elapsed");
        // Too early: counted against the bucket, not as a request after a per-day 429.
        assert_eq!(gemini(&mock, "k2", FLASH).await.0, 429);
        let flash = bucket(&mock, "p", FLASH);
        assert_eq!((flash.ok, flash.rate_limited, flash.before_deadline, flash.after_429), (2, 2, 1, 0));
        assert_eq!(gemini(&mock, "k3", FLASH).await.0, 200, "another project");
    }

    #[tokio::test]
    async fn a_sliding_minute_frees_the_bucket_when_it_said() {
        let mock = start(MockConfig { minute: Duration::from_secs(1), ..config() }).await;
        // Two successes within the minute, then a 429: however slow the machine, within a few tries.
        let mut tries = 0;
        let body = loop {
            tries += 1;
            let (status, body) = gemini(&mock, "k1", FLASH).await;
            if status == 429 {
                break body;
            }
            assert!(status == 200 && tries < 20, "{status} after {tries} tries");
        };
        let delay: f64 = violation(&body).1.strip_suffix('s').unwrap().parse().unwrap();
        assert!(delay > 0.0 && delay <= 1.0, "{delay}");
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        assert_eq!(gemini(&mock, "k1", FLASH).await.0, 200, "after the announced delay");
        assert_eq!(bucket(&mock, "p", FLASH).before_deadline, 0);
    }

    #[tokio::test]
    async fn quota_zero_bare_and_project_wide_429s_have_their_real_shapes() {
        let mock = start(config()).await;
        let (status, body) = gemini(&mock, "k3", "gemini-3-pro").await;
        assert_eq!(status, 429);
        let (violation, _) = violation(&body);
        assert_eq!((&violation["quotaId"], &violation["quotaValue"]), (&json!(PER_DAY_QUOTA_ID), &json!("0")));
        assert!(body["error"]["message"].as_str().unwrap().contains("limit: 0"), "{body}");
        assert_eq!(gemini(&mock, "k3", "gemini-3-pro").await.0, 429);
        assert_eq!(bucket(&mock, "k3", "gemini-3-pro").after_429, 1);

        for _ in 0..2 {
            let (status, body) = gemini(&mock, "k1", "gemini-old").await;
            assert_eq!((status, body), (429, serde_json::from_str(BARE_429).unwrap()));
        }
        assert_eq!(bucket(&mock, "p", "gemini-old").rate_limited, 2);

        let (status, body) = gemini(&mock, "k4", FLASH).await;
        assert_eq!(status, 429);
        let info = &body["error"]["details"][0];
        assert_eq!(info["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
        assert_eq!(info["reason"], "RATE_LIMIT_EXCEEDED");
        assert_eq!(info["metadata"]["quota_limit"], PROJECT_QUOTA_LIMIT);
        let consumer = format!("projects/{}", project_number("throttled"));
        assert_eq!(info["metadata"]["consumer"], consumer.as_str());
        assert_eq!(consumer.len(), "projects/".len() + 12);
        assert_ne!(project_number("throttled"), project_number("p"));
        assert_eq!(gemini(&mock, "k4", "any-model").await.0, 429, "the whole project");
        assert_eq!(gemini(&mock, "k1", FLASH).await.0, 200, "not another project");
    }

    #[tokio::test]
    async fn the_openai_compatible_paths_meter_the_body_s_model() {
        let mock = start(config()).await;
        let url = format!("{}/v1beta/openai/chat/completions", mock.upstream.url());
        let body = json!({"model": format!("models/{PRO}"), "messages": [{"role": "user", "content": "hi"}]});
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let request = mock.client.post(&url).bearer_auth("k1").body(body.to_string());
            statuses.push(request.send().await.unwrap().status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 429]);
        assert_eq!(gemini(&mock, "k2", PRO).await.0, 429, "the same bucket as Gemini's paths");
        assert_eq!(bucket(&mock, "p", PRO).after_429, 1);
    }

    #[tokio::test]
    async fn the_per_key_quota_still_applies_and_counts_in_the_bucket() {
        let config = MockConfig { quota: Some(1), ..config() };
        let mock = start(config).await;
        assert_eq!(gemini(&mock, "k1", PRO).await.0, 200);
        let (status, body) = gemini(&mock, "k1", PRO).await;
        assert_eq!(status, 429);
        assert_eq!(violation(&body).0["quotaId"], PER_MINUTE_QUOTA_ID);
        assert_eq!(gemini(&mock, "k2", PRO).await.0, 200, "the per-day quota counts only successes");
        let (_, keys) = mock.upstream.stats();
        assert_eq!((keys["k1"].ok, keys["k1"].rate_limited, keys["k1"].max_in_flight), (1, 1, 1));
        let pro = bucket(&mock, "p", PRO);
        assert_eq!((pro.ok, pro.rate_limited, pro.after_429), (2, 1, 0));
    }

    /// A model without quotas in [`config`].
    const LITE: &str = "gemini-2.5-flash-lite";

    fn streaming(faults: Vec<StreamFault>) -> MockConfig {
        MockConfig {
            latency: Duration::ZERO,
            bad_keys: ["bad".to_owned()].into(),
            stream_faults: faults,
            ..MockConfig::default()
        }
    }

    /// What a client saw of one streaming request.
    #[derive(Debug)]
    struct Streamed {
        status: u16,
        content_type: String,
        /// The body frames as they arrived, each with the time since the request was sent.
        frames: Vec<(Bytes, Duration)>,
        /// The time `send` took (until the headers).
        headers_after: Duration,
        /// The body ended in an error rather than cleanly.
        broken: bool,
    }

    impl Streamed {
        fn frames(&self) -> Vec<Bytes> {
            self.frames.iter().map(|(frame, _)| frame.clone()).collect()
        }

        fn bytes(&self) -> Vec<u8> {
            self.frames().concat()
        }
    }

    async fn send_stream(mock: &Probe, dialect: StreamDialect, key: &str) -> (reqwest::Response, Instant) {
        let url = mock.upstream.url();
        let request = match dialect {
            StreamDialect::Gemini => (mock.client)
                .post(format!("{url}/v1beta/models/{LITE}:streamGenerateContent?alt=sse"))
                .header(KEY_HEADER, key)
                .body("{}"),
            StreamDialect::OpenAi => (mock.client)
                .post(format!("{url}/v1beta/openai/chat/completions"))
                .bearer_auth(key)
                .body(json!({"model": LITE, "stream": true, "messages": []}).to_string()),
        };
        let sent = Instant::now();
        (request.send().await.unwrap(), sent)
    }

    /// Sends one streaming request and reads its body to the end.
    async fn stream(mock: &Probe, dialect: StreamDialect, key: &str) -> Streamed {
        let (mut response, sent) = send_stream(mock, dialect, key).await;
        let headers_after = sent.elapsed();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        let mut frames = Vec::new();
        let broken = loop {
            match response.chunk().await {
                Ok(Some(frame)) => frames.push((frame, sent.elapsed())),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        Streamed { status, content_type, frames, headers_after, broken }
    }

    fn key_stats(mock: &Probe, key: &str) -> KeyStats {
        mock.upstream.stats().1.remove(key).unwrap_or_default()
    }

    #[tokio::test]
    async fn gemini_streams_each_event_in_its_own_frame_ending_in_crlf_crlf() {
        let mock = start(streaming(Vec::new())).await;
        let got = stream(&mock, StreamDialect::Gemini, "k1").await;
        assert_eq!((got.status, got.content_type.as_str(), got.broken), (200, "text/event-stream", false));
        let good = good_stream(StreamDialect::Gemini, LITE, 3);
        assert_eq!(got.frames(), good);
        assert_eq!(
            good[0],
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"chunk 1\"}}],\"role\":\"model\"}},\
                 \"index\":0}}],\"modelVersion\":\"{LITE}\"}}\r\n\r\n"
            )
        );
        let last: serde_json::Value = serde_json::from_slice(good[2].strip_prefix(b"data: ").unwrap()).unwrap();
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["candidates"][0]["content"]["parts"][0]["text"], "chunk 3");
        assert_eq!(last["usageMetadata"]["totalTokenCount"], 8);
        assert!(good[1].ends_with(b"}\r\n\r\n") && !good[1].windows(7).any(|w| w == b"finishR"));

        assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
        let k1 = key_stats(&mock, "k1");
        let counts = (k1.ok, k1.streams_started, k1.streams_completed, k1.streams_cancelled, k1.faults);
        assert_eq!(counts, (1, 1, 1, 0, 0));
        // Without alt=sse, the mock answers one JSON object, as before.
        let url = format!("{}/v1beta/models/{LITE}:streamGenerateContent", mock.upstream.url());
        let response = mock.client.post(url).header(KEY_HEADER, "k1").body("{}").send().await.unwrap();
        assert_eq!(response.headers()["content-type"], "application/json");
    }

    #[tokio::test]
    async fn openai_streams_chunks_then_done_only_when_the_body_asks() {
        let mock = start(streaming(Vec::new())).await;
        let got = stream(&mock, StreamDialect::OpenAi, "k1").await;
        assert_eq!((got.status, got.content_type.as_str(), got.broken), (200, "text/event-stream", false));
        let good = good_stream(StreamDialect::OpenAi, LITE, 3);
        assert_eq!(got.frames(), good);
        assert_eq!(good.len(), 5);
        assert_eq!(good[4], "data: [DONE]\n\n");
        let parse = |event: &Bytes| -> serde_json::Value {
            let data = event.strip_prefix(b"data: ").unwrap().strip_suffix(b"\n\n").unwrap();
            serde_json::from_slice(data).unwrap()
        };
        let first = parse(&good[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["content"], "chunk 1");
        assert_eq!(first["choices"][0]["finish_reason"], serde_json::Value::Null);
        assert_eq!(parse(&good[3])["choices"][0]["finish_reason"], "stop");

        let url = format!("{}/v1/chat/completions", mock.upstream.url());
        for body in [json!({"model": LITE, "messages": []}), json!({"model": LITE, "stream": false})] {
            let response = mock.client.post(&url).bearer_auth("k1").body(body.to_string()).send().await.unwrap();
            assert_eq!(response.headers()["content-type"], "application/json");
            let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            assert_eq!(answer["object"], "chat.completion", "{answer}");
            assert_eq!(answer["choices"][0]["finish_reason"], "stop");
            assert_eq!(answer["model"], LITE);
        }
        assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
        let k1 = key_stats(&mock, "k1");
        assert_eq!((k1.ok, k1.streams_started, k1.streams_completed), (3, 1, 1));
    }

    #[tokio::test]
    async fn each_fault_sends_its_bytes_in_both_dialects() {
        use StreamFault::*;
        for dialect in [StreamDialect::Gemini, StreamDialect::OpenAi] {
            let good = good_stream(dialect, LITE, 3);
            let last = good.len() - 1;
            let error = |code| dialect.event(&error_body(code));
            let line_end: &[u8] = if dialect == StreamDialect::Gemini { b"\r\n" } else { b"\n" };
            let partial = good[0].slice(..good[0].len() - line_end.len());
            assert!(partial.strip_suffix(line_end).is_some_and(|data| data.ends_with(b"}")), "{partial:?}");
            let quota = StreamFault::quota_429(LITE);
            let StatusBeforeStream(_, quota_body) = &quota else { unreachable!() };
            let whole = |body: &str| vec![Bytes::from(body.to_owned())];
            let with = |events: &[Bytes], more: Bytes| events.iter().cloned().chain([more]).collect::<Vec<_>>();
            // (fault, status, the frames the client gets, the body breaks, a terminal event is sent)
            let cases: Vec<(StreamFault, u16, Vec<Bytes>, bool, bool)> = vec![
                (quota.clone(), 429, whole(quota_body), false, false),
                (StreamFault::overloaded_503(), 503, whole(OVERLOADED), false, false),
                (StatusBeforeStream(500, "{}".into()), 500, whole("{}"), false, false),
                (ErrorAsFirstEvent(429), 200, vec![error(429)], false, false),
                (ErrorAsFirstEvent(503), 200, vec![error(503)], false, false),
                (EndBeforeFirstEvent, 200, Vec::new(), false, false),
                (PartialFirstEvent, 200, vec![partial], false, false),
                (ErrorMidStream { after_events: 1 }, 200, with(&good[..1], error(503)), false, false),
                (BreakMidStream { after_events: 2 }, 200, good[..2].to_vec(), true, false),
                (TruncateMidStream { after_events: 2 }, 200, good[..2].to_vec(), false, false),
                (TruncateMidStream { after_events: 99 }, 200, good[..last].to_vec(), false, false),
                (TrailingErrorAfterTerminal, 200, with(&good, error(503)), false, true),
                (SplitFrames, 200, good.clone(), false, true),
            ];
            let mock = start(streaming(cases.iter().map(|case| case.0.clone()).collect())).await;
            for (fault, status, frames, broken, _) in &cases {
                let got = stream(&mock, dialect, "k1").await;
                let what = format!("{dialect:?} {fault:?}: {:?}", String::from_utf8_lossy(&got.bytes()));
                assert_eq!((got.status, got.bytes(), got.broken), (*status, frames.concat(), *broken), "{what}");
                let content_type = if *status == 200 { "text/event-stream" } else { "application/json" };
                assert_eq!(got.content_type, content_type, "{what}");
                if *status == 200 && *fault != SplitFrames {
                    assert_eq!(&got.frames(), frames, "each event its own frame: {what}");
                }
            }
            let got = stream(&mock, dialect, "k1").await;
            assert_eq!(got.frames(), good, "{dialect:?}: the faults are used up");

            assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
            let k1 = key_stats(&mock, "k1");
            let terminal = cases.iter().filter(|case| case.4).count() as u64 + 1;
            let streams = cases.iter().filter(|case| case.1 == 200).count() as u64 + 1;
            let counts = (k1.faults, k1.ok, k1.streams_started, k1.streams_completed, k1.streams_cancelled);
            assert_eq!(counts, (cases.len() as u64, 1, streams, terminal, 0), "{dialect:?}");
        }
    }

    #[tokio::test]
    async fn split_frames_cut_between_the_cr_and_the_lf() {
        for dialect in [StreamDialect::Gemini, StreamDialect::OpenAi] {
            let mock = start(streaming(vec![StreamFault::SplitFrames])).await;
            let got = stream(&mock, dialect, "k1").await;
            let good = good_stream(dialect, LITE, 3);
            assert_eq!(got.bytes(), good.concat());
            let frames = got.frames();
            let first = &good[0];
            assert_eq!(frames[0], "data");
            assert_eq!(frames[0].len() + frames[1].len(), first.len() / 2);
            match dialect {
                StreamDialect::Gemini => {
                    assert!(frames[2].ends_with(b"}\r"), "{:?}", frames[2]);
                    assert_eq!(frames[3..6], ["\n", "\r", "\n"]);
                    assert_eq!(frames.len(), 6 * good.len());
                }
                StreamDialect::OpenAi => {
                    assert!(frames[2].ends_with(b"}\n"), "{:?}", frames[2]);
                    assert_eq!(frames[3], "\n");
                    // `data: [DONE]\n\n` has no middle cut of its own beyond `data`.
                    assert_eq!(frames.len(), 4 * good.len());
                }
            }
            assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
            assert_eq!(key_stats(&mock, "k1").streams_completed, 1);
        }
    }

    #[tokio::test]
    async fn delays_and_pauses_hold_the_events_back() {
        const PAUSE: Duration = Duration::from_secs(1);
        let config = MockConfig {
            stream_delay: Duration::from_millis(100),
            stream_faults_by_key: [
                ("silent".to_owned(), vec![StreamFault::SilentBeforeFirstEvent(PAUSE)]),
                ("idle".to_owned(), vec![StreamFault::IdleMidStream { after_events: 1, pause: PAUSE }]),
            ]
            .into(),
            ..streaming(Vec::new())
        };
        let mock = start(config).await;
        let (delayed, silent, idle) = tokio::join!(
            stream(&mock, StreamDialect::Gemini, "k1"),
            stream(&mock, StreamDialect::Gemini, "silent"),
            stream(&mock, StreamDialect::OpenAi, "idle"),
        );
        for (k, (_, at)) in delayed.frames.iter().enumerate() {
            assert!(*at >= Duration::from_millis(100) * k as u32, "frame {k} at {at:?}");
        }
        assert_eq!(silent.frames(), good_stream(StreamDialect::Gemini, LITE, 3));
        assert!(silent.headers_after < PAUSE, "the headers come before the silence: {:?}", silent.headers_after);
        assert!(silent.frames[0].1 >= PAUSE, "{:?}", silent.frames[0].1);
        assert_eq!(idle.frames(), good_stream(StreamDialect::OpenAi, LITE, 3));
        assert!(idle.frames[0].1 < PAUSE, "{:?}", idle.frames[0].1);
        assert!(idle.frames[1].1 >= PAUSE, "{:?}", idle.frames[1].1);
    }

    #[tokio::test]
    async fn faults_go_in_order_to_valid_streaming_requests_and_per_key_first() {
        let mock = start(streaming(vec![StreamFault::overloaded_503()])).await;
        assert_eq!(gemini(&mock, "k1", LITE).await.0, 200, "not a streaming request");
        assert_eq!(stream(&mock, StreamDialect::Gemini, "bad").await.status, 400, "not a valid key");
        assert_eq!(stream(&mock, StreamDialect::Gemini, "k1").await.status, 503);
        assert_eq!(stream(&mock, StreamDialect::Gemini, "k1").await.status, 200);
        mock.upstream.push_stream_fault(StreamFault::ErrorAsFirstEvent(503));
        mock.upstream.push_stream_fault_for("k2", StreamFault::quota_429(LITE));
        assert_eq!(
            stream(&mock, StreamDialect::OpenAi, "k1").await.bytes(),
            b"data: ".iter().chain(OVERLOADED.as_bytes()).chain(b"\n\n").copied().collect::<Vec<_>>()
        );
        assert_eq!(stream(&mock, StreamDialect::OpenAi, "k2").await.status, 429, "its own fault");
        assert_eq!(stream(&mock, StreamDialect::OpenAi, "k2").await.frames().len(), 5);
        assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
        let (k1, k2) = (key_stats(&mock, "k1"), key_stats(&mock, "k2"));
        assert_eq!((k1.faults, k1.ok, k1.streams_started, k1.streams_completed), (2, 2, 2, 1));
        assert_eq!((k2.faults, k2.ok, k2.rate_limited, k2.streams_started), (1, 1, 0, 1), "a fault is not metered");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_cancels_the_stream_and_frees_the_key() {
        let config = MockConfig {
            stream_faults_by_key: [
                ("before".to_owned(), vec![StreamFault::SilentBeforeFirstEvent(Duration::from_secs(60))]),
                (
                    "during".to_owned(),
                    vec![StreamFault::IdleMidStream { after_events: 1, pause: Duration::from_secs(60) }],
                ),
            ]
            .into(),
            ..streaming(Vec::new())
        };
        let mock = start(config).await;
        let (before, _) = send_stream(&mock, StreamDialect::Gemini, "before").await;
        let (mut during, _) = send_stream(&mock, StreamDialect::OpenAi, "during").await;
        assert!(during.chunk().await.unwrap().is_some());
        assert_eq!((key_stats(&mock, "before").in_flight(), key_stats(&mock, "during").in_flight()), (1, 1));
        assert!(!mock.upstream.wait_idle(Duration::from_millis(50)).await, "streams hold their keys");
        drop(before);
        assert!(mock.upstream.wait_key_idle("before", Duration::from_secs(5)).await);
        assert_eq!(key_stats(&mock, "during").in_flight(), 1);
        drop(during);
        assert!(mock.upstream.wait_idle(Duration::from_secs(5)).await);
        for key in ["before", "during"] {
            let stats = key_stats(&mock, key);
            let counts = (stats.streams_started, stats.streams_completed, stats.streams_cancelled, stats.max_in_flight);
            assert_eq!(counts, (1, 0, 1, 1), "{key}");
        }
        // A client gone during the latency frees its key too.
        let url = format!("{}/slow/v1beta/models/{LITE}:generateContent", mock.upstream.url());
        let request = mock.client.post(url).header(KEY_HEADER, "slow").timeout(Duration::from_millis(100));
        assert!(request.send().await.is_err());
        assert!(mock.upstream.wait_key_idle("slow", Duration::from_secs(5)).await);
        assert_eq!(key_stats(&mock, "slow").streams_cancelled, 0, "not a stream");
    }

    #[tokio::test]
    async fn every_request_is_recorded_with_its_headers_query_and_key() {
        let mock = start(streaming(Vec::new())).await;
        let url = mock.upstream.url();
        let request = mock.client.post(format!("{url}/v1beta/models/{LITE}:streamGenerateContent?alt=sse&key=q"));
        request
            .header(KEY_HEADER, "k1")
            .header("x-custom", "v")
            .body("{}")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        stream(&mock, StreamDialect::OpenAi, "k2").await;
        mock.client.get(format!("{url}/v1beta/models")).send().await.unwrap();
        let seen = mock.upstream.seen_requests();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[0].path_and_query, format!("/v1beta/models/{LITE}:streamGenerateContent?alt=sse&key=q"));
        assert!(seen[0].headers.contains(&("x-custom".to_owned(), "v".to_owned())), "{:?}", seen[0].headers);
        assert!(seen[0].headers.contains(&(KEY_HEADER.to_owned(), "k1".to_owned())));
        assert_eq!((seen[0].key.as_deref(), &seen[0].body[..]), (Some("k1"), &b"{}"[..]));
        assert!(seen[1].headers.contains(&("authorization".to_owned(), "Bearer k2".to_owned())));
        assert_eq!(seen[1].key.as_deref(), Some("k2"));
        assert_eq!((seen[2].method.as_str(), seen[2].key.as_deref()), ("GET", None));
    }
}
