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

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

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

    /// What it saw per (project, model); the project of a secret not in [`MockConfig::projects`] is
    /// the secret itself.
    pub fn model_stats(&self) -> HashMap<(String, String), ModelStats> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).models.clone()
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
) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers = request.headers();
    let key = headers
        .get(KEY_HEADER)
        .or_else(|| headers.get(hyper::header::AUTHORIZATION))
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
        .unwrap_or_default()
        .to_owned();
    let slow = request.uri().path().starts_with("/slow");
    let mut model = model_in_path(request.uri().path()).map(str::to_owned);
    if model.is_none() {
        let body = request.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
        model = model_in_body(&body);
    }
    let arrived = Instant::now();
    let (status, body) = {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.requests += 1;
        let overload = config.overload_every.is_some_and(|every| state.requests.is_multiple_of(every));
        let State { keys, models, .. } = &mut *state;
        let stats = keys.entry(key.clone()).or_default();
        stats.in_flight += 1;
        stats.max_in_flight = stats.max_in_flight.max(stats.in_flight);
        if stats.deadline.is_some_and(|deadline| arrived < deadline) {
            stats.before_deadline += 1;
        }
        judge(&config, stats, models, &key, model.as_deref(), arrived, overload)
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
                    return limited(quota_failure(PER_MINUTE_QUOTA_ID, model, limit, &delay));
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
            return (StatusCode::TOO_MANY_REQUESTS, rate_limited(ceil_millis(frees_at.duration_since(now))));
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
}
