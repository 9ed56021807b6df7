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

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The header the mock reads the key from (Gemini's).
pub const KEY_HEADER: &str = "x-goog-api-key";

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
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            quota: None,
            window: Duration::from_secs(60),
            latency: Duration::from_millis(20),
            bad_keys: HashSet::new(),
            overload_every: None,
        }
    }
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
    in_flight: u64,
    accepted: VecDeque<Instant>,
    deadline: Option<Instant>,
}

impl KeyStats {
    /// Requests with this key in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

#[derive(Debug, Default)]
struct State {
    requests: u64,
    keys: HashMap<String, KeyStats>,
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
        let state = Arc::new(Mutex::new(State::default()));
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
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    config: Arc<MockConfig>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = request.headers().get(KEY_HEADER).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    let slow = request.uri().path().starts_with("/slow");
    let arrived = Instant::now();
    let (status, body) = {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.requests += 1;
        let overload = config.overload_every.is_some_and(|every| state.requests.is_multiple_of(every));
        let stats = state.keys.entry(key.clone()).or_default();
        stats.in_flight += 1;
        stats.max_in_flight = stats.max_in_flight.max(stats.in_flight);
        if stats.deadline.is_some_and(|deadline| arrived < deadline) {
            stats.before_deadline += 1;
        }
        judge(&config, stats, &key, arrived, overload)
    };
    let latency = if slow { Duration::from_secs(60) } else { config.latency };
    // Even a zero sleep waits for the timer's next millisecond tick; an instant mock answers at once.
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(stats) = state.lock().unwrap_or_else(PoisonError::into_inner).keys.get_mut(&key) {
        stats.in_flight -= 1;
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The answer for one request, updating the key's window.
fn judge(config: &MockConfig, stats: &mut KeyStats, key: &str, now: Instant, overload: bool) -> (StatusCode, String) {
    if config.bad_keys.contains(key) || key.is_empty() {
        stats.invalid += 1;
        return (StatusCode::BAD_REQUEST, INVALID_KEY.to_owned());
    }
    if overload {
        stats.overloaded += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, OVERLOADED.to_owned());
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
            // Rounded up to the millisecond, so a client that waits exactly this long is never early.
            let delay = (frees_at.duration_since(now).as_secs_f64() * 1000.0).ceil() / 1000.0;
            return (StatusCode::TOO_MANY_REQUESTS, rate_limited(delay));
        }
        stats.accepted.push_back(now);
    }
    stats.ok += 1;
    (StatusCode::OK, SUCCESS.to_owned())
}

const SUCCESS: &str = r#"{"candidates":[{"content":{"parts":[{"text":"Hello from the mock upstream."}],"role":"model"},"finishReason":"STOP"}],"modelVersion":"gemini-2.5-flash"}"#;

const INVALID_KEY: &str = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;

const OVERLOADED: &str =
    r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

/// Gemini's per-minute 429, with the delay until the key's window frees.
fn rate_limited(delay_secs: f64) -> String {
    format!(
        r#"{{"error":{{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{{"location":"global","model":"gemini-2.5-flash"}},"quotaValue":"10"}}]}},{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay_secs:.3}s"}}]}}}}"#
    )
}
