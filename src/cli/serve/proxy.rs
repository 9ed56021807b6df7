//! One gateway request, from the client's bytes to the answer: the route, the door checks, the body,
//! the send through the pool, and the answer or the gateway's own error.
//!
//! Invariants:
//! - Every request loses the client's credential from all four slots (`x-goog-api-key`,
//!   `Authorization`, `x-api-key`, `?key=`) before anything else reads its headers or query: the pool
//!   key the jongler injects is the only credential that goes upstream.
//! - The checks run in one order, each refusing in the route's dialect (Google for a route that names
//!   no connector): `Host` (421, loopback listeners only), web page origin (403 unless
//!   `--allow-origin` names it), CORS preflight (answered here: 204 for an allowed origin, else 403),
//!   gateway token (401; `/__apijongler/health` is exempt), route (404), a path or query that would
//!   change on its way upstream (400), body size (413). A refused request reaches no upstream and
//!   claims no key.
//! - The path the model is read from is byte for byte the path sent upstream
//!   ([`upstream_url`]).
//! - An allowed origin's answers carry the gateway's CORS headers (that origin, `Vary: Origin`); no
//!   upstream `access-control-*` header reaches any client.
//! - `/__apijongler/health` reads the database (off the async threads) at each call: 200
//!   `{"ok":true,…}` only when that read works, else 503 `{"ok":false,"problem":…}`.
//! - A body beyond `--max-body` is refused from its `Content-Length`, or as soon as the bytes read
//!   pass the cap; it is never read whole.
//! - Responses name the key (`x-apijongler-key`), never its secret; the gateway's errors carry the
//!   library's messages, which never hold secrets. The log line per request has no query string and no
//!   body.
//! - One `Jongler` per connector, built on its first request and kept for the server's life (requests
//!   after a failed build try again).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use api_jongler::pool::outcome::Unanswered;
use api_jongler::stream::MESSAGE_PREFIX;
use api_jongler::upstream_url::upstream_url;
use api_jongler::{
    Connector, Connectors, Coordinator, Dialect, Error, Exchange, ExchangeBody, Jongler, Keyring, Outgoing,
    StreamingBody, Unavailable,
};
use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::credentials::{GatewayToken, check_host, strip_credentials};
use super::dashboard::{self, Dashboard, Page};
use super::headers::{downstream_response_headers, gateway_base, rewrite_upload_url_header, upstream_request_headers};
use super::metrics::Metrics;
use super::origin::{AllowedOrigins, Verdict, add_cors_headers, is_preflight, preflight_headers};

/// The gateway's health endpoint (never forwarded, never behind the token).
pub const HEALTH_PATH: &str = "/__apijongler/health";
/// The Prometheus endpoint (never forwarded; behind the token when one is set).
pub const METRICS_PATH: &str = "/metrics";
/// The prefix reserved for the gateway's own endpoints.
const RESERVED_PREFIX: &str = "/__apijongler/";

/// The key that answered, by name.
pub const X_APIJONGLER_KEY: HeaderName = HeaderName::from_static("x-apijongler-key");
/// How many upstream attempts the answer took.
pub const X_APIJONGLER_ATTEMPTS: HeaderName = HeaderName::from_static("x-apijongler-attempts");
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// The `Retry-After` of a 429 when no lockdown end is known (every key held by a request): about the
/// length of one request.
const RETRY_WHEN_HELD: Duration = Duration::from_secs(5);

/// What the command line decided.
#[derive(Debug)]
pub struct Settings {
    /// Keyring, database and connector files, for the jonglers.
    pub paths: GlobalPaths,
    /// The connector also served at `/`.
    pub root: Option<String>,
    /// The token clients must present, if any.
    pub token: Option<GatewayToken>,
    /// Whether to refuse a `Host` that is not loopback (a loopback listener).
    pub check_host: bool,
    /// The web page origins that may use the gateway (`--allow-origin`).
    pub origins: AllowedOrigins,
    /// The longest wait for a free key.
    pub wait: Duration,
    /// The largest request body.
    pub max_body: u64,
    /// Send upstream through Tor.
    pub tor: bool,
}

/// Where the per-connector jonglers find their keyring, database and connector files.
#[derive(Debug, Clone)]
pub struct GlobalPaths {
    /// The keyring file.
    pub config: PathBuf,
    /// The database (`None`: the default location).
    pub db: Option<PathBuf>,
    /// A directory of connector files.
    pub connectors: Option<PathBuf>,
}

/// The server's shared state.
#[derive(Debug)]
pub struct Gateway {
    settings: Settings,
    connectors: Connectors,
    /// Connectors with keys in the keyring (or needing none), by name.
    served: Vec<String>,
    jonglers: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Jongler>>>>,
    /// For reading key states (`/metrics`).
    coordinator: Coordinator,
    metrics: Metrics,
    /// The page at `/__apijongler/ui/`.
    dashboard: Dashboard,
}

/// Where a request path goes.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Health,
    Metrics,
    /// The dashboard's page, assets and data (`/__apijongler/ui/`).
    Dashboard(Page),
    /// Another path under [`RESERVED_PREFIX`].
    Reserved,
    /// A served connector, and the upstream path (possibly empty).
    Forward {
        connector: &'a str,
        path: &'a str,
    },
    /// The first segment names no served connector, and there is no root connector.
    Unknown {
        name: &'a str,
    },
}

/// The route of `path`: the gateway's endpoints; else `/{connector}/{rest}` for a served connector;
/// else the whole path on the root connector, if any.
fn route<'a>(path: &'a str, served: &[String], root: Option<&'a str>) -> Route<'a> {
    if path == HEALTH_PATH {
        return Route::Health;
    }
    if path == METRICS_PATH {
        return Route::Metrics;
    }
    if let Some(page) = Page::of(path) {
        return Route::Dashboard(page);
    }
    if path.starts_with(RESERVED_PREFIX) {
        return Route::Reserved;
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    let (first, upstream) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, ""),
    };
    if served.iter().any(|name| name == first) {
        return Route::Forward { connector: first, path: upstream };
    }
    match root {
        Some(root) => Route::Forward { connector: root, path },
        None => Route::Unknown { name: first },
    }
}

impl Gateway {
    /// A gateway for the `served` connectors.
    pub fn new(settings: Settings, connectors: Connectors, served: Vec<String>, coordinator: Coordinator) -> Self {
        let dashboard = Dashboard::new(coordinator.clone(), Some(Keyring::load(&settings.paths.config).ok()).flatten());
        Self {
            settings,
            connectors,
            served,
            jonglers: Mutex::default(),
            coordinator,
            metrics: Metrics::new(),
            dashboard,
        }
    }

    /// Ends the dashboard's event streams, so that a stopping server does not wait for open pages.
    pub fn close_dashboard(&self) {
        self.dashboard.close();
    }

    /// `a at http://ADDR/a, …`, for the start-up message.
    pub fn describe_routes(&self, bound: SocketAddr) -> String {
        let mut routes: Vec<String> =
            self.served.iter().map(|name| format!("{name} at {}", gateway_base(bound, name))).collect();
        if let Some(root) = &self.settings.root {
            routes.push(format!("{root} also at http://{bound}/"));
        }
        routes.join(", ")
    }

    /// The coordinators of the jonglers built so far (to settle before exit).
    pub async fn coordinators(&self) -> Vec<Coordinator> {
        let cells: Vec<_> = self.jonglers.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        cells.iter().filter_map(|cell| cell.get()).map(|jongler| jongler.coordinator().clone()).collect()
    }

    /// Answers one request; never fails (every failure is an answer in the route's dialect). An
    /// allowed origin's answer, whatever it is, carries the gateway's CORS headers.
    pub async fn handle(&self, request: Request<Incoming>, local: SocketAddr) -> Response<GatewayBody> {
        let verdict = self.settings.origins.judge(request.headers());
        let mut response = self.respond(request, &verdict, local).await;
        if let Verdict::Allowed(origin) = &verdict {
            add_cors_headers(response.headers_mut(), origin);
        }
        response
    }

    /// The answer to one request whose origin was judged `verdict`.
    async fn respond(&self, request: Request<Incoming>, verdict: &Verdict, local: SocketAddr) -> Response<GatewayBody> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let route = route(parts.uri.path(), &self.served, self.settings.root.as_deref());
        let connector = match &route {
            Route::Forward { connector, .. } => self.connectors.get(connector).ok(),
            _ => None,
        };
        let dialect = match (&route, connector) {
            (Route::Forward { path, .. }, Some(connector)) => connector.dialect_for(path),
            _ => Dialect::Google,
        };
        if self.settings.check_host
            && let Err(refused) = check_host(&parts.headers)
        {
            self.metrics.refused("host");
            let message = refused.to_string();
            let message = message.strip_prefix(MESSAGE_PREFIX).unwrap_or(&message);
            return error(dialect, StatusCode::MISDIRECTED_REQUEST, message, None);
        }
        if let Verdict::Refused(message) = verdict {
            self.metrics.refused("origin");
            return error(dialect, StatusCode::FORBIDDEN, message, None);
        }
        // A preflight carries no credential and asks only whether a page may send: the answer is ours.
        if is_preflight(&parts.method, &parts.headers) {
            if !matches!(verdict, Verdict::Allowed(_)) {
                self.metrics.refused("origin");
                let message = "CORS preflights are answered only for web page origins allowed with --allow-origin \
                               ORIGIN, and this one names none";
                return error(dialect, StatusCode::FORBIDDEN, message, None);
            }
            let mut response = Response::new(GatewayBody::full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            *response.headers_mut() = preflight_headers(&parts.headers);
            return response;
        }
        let mut headers = parts.headers;
        let stripped = strip_credentials(&mut headers, parts.uri.query());
        // The dashboard's page and assets hold no data: a browser opening the page cannot send the token,
        // which the page then sends with each data request.
        let open = route == Route::Health || matches!(route, Route::Dashboard(page) if !page.needs_token());
        if !open
            && let Some(token) = &self.settings.token
            && !token.accepts(stripped.presented.as_ref())
        {
            self.metrics.refused("token");
            let message = "the gateway token is missing or wrong: give it to the client as its API key (it may \
                           travel as x-goog-api-key, Authorization: Bearer, x-api-key or ?key=)";
            return error(dialect, StatusCode::UNAUTHORIZED, message, None);
        }
        match route {
            Route::Health | Route::Metrics if !matches!(parts.method, Method::GET | Method::HEAD) => {
                let mut response = error(dialect, StatusCode::METHOD_NOT_ALLOWED, "use GET", None);
                response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                response
            }
            Route::Health => self.health().await,
            Route::Dashboard(page) => {
                self.dashboard.respond(page, &parts.method, parts.uri.query()).await.map(GatewayBody::Dashboard)
            }
            Route::Metrics => {
                let text = self.metrics.render(&self.coordinator, &self.keyed_connectors()).await;
                full(StatusCode::OK, super::metrics::CONTENT_TYPE, text.into())
            }
            Route::Reserved => {
                self.metrics.refused("route");
                let message = format!(
                    "no gateway endpoint here; try {HEALTH_PATH}, {METRICS_PATH} or the dashboard at {}",
                    dashboard::UI_PATH
                );
                error(dialect, StatusCode::NOT_FOUND, &message, None)
            }
            Route::Unknown { name } => {
                self.metrics.refused("route");
                error(dialect, StatusCode::NOT_FOUND, &self.unknown(name, local), None)
            }
            Route::Forward { path, .. } => {
                let Some(connector) = connector else { unreachable!("a served connector is a known one") };
                let request = Forward { method: parts.method, path, query: stripped.query, headers, dialect };
                self.forward(connector, request, body, local, started).await
            }
        }
    }

    /// The health answer: a cheap real read of the database (the schema version, which also checks
    /// that the path still leads to the file this process opened), off the async threads.
    async fn health(&self) -> Response<GatewayBody> {
        let coordinator = self.coordinator.clone();
        let read = tokio::task::spawn_blocking(move || coordinator.store().schema_version()).await;
        let problem = match read {
            Ok(Ok(_)) => None,
            // The store's error names the database file (and so maybe the user): with a token, health is
            // the one endpoint a stranger may read, so it only says where to look.
            Ok(Err(error)) if self.settings.token.is_some() => {
                tracing::warn!(error = %error, "health check: the database cannot be read");
                Some("the database cannot be read: see the gateway's log for the file and what to do".to_owned())
            }
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(format!("the database read of the health check did not finish ({error})")),
        };
        let (connectors, root) = (&self.served, &self.settings.root);
        match problem {
            None => {
                let health = serde_json::json!({"ok": true, "connectors": connectors, "root": root});
                full(StatusCode::OK, "application/json", health.to_string().into())
            }
            Some(problem) => {
                let health =
                    serde_json::json!({"ok": false, "problem": problem, "connectors": connectors, "root": root});
                full(StatusCode::SERVICE_UNAVAILABLE, "application/json", health.to_string().into())
            }
        }
    }

    /// The 404 message for a first segment that is no served connector.
    fn unknown(&self, name: &str, local: SocketAddr) -> String {
        let served = if self.served.is_empty() {
            "none".to_owned()
        } else {
            self.served.iter().map(|name| gateway_base(local, name)).collect::<Vec<_>>().join(", ")
        };
        match self.connectors.get(name) {
            Ok(_) => format!(
                "connector '{name}' has no keys in the keyring {}: add a [{name}] section with keys and restart the \
                 gateway; served here: {served}",
                self.settings.paths.config.display()
            ),
            Err(_) => format!(
                "no connector '{name}': the first path segment names the connector (see `apijongler connectors`); \
                 served here: {served}"
            ),
        }
    }

    /// Served connectors that have keys (whose states `/metrics` reports).
    fn keyed_connectors(&self) -> Vec<String> {
        self.served
            .iter()
            .filter(|name| self.connectors.get(name).is_ok_and(|connector| connector.requires_api_key))
            .cloned()
            .collect()
    }

    /// Sends a routed request through the pool and answers with the upstream's answer or our error.
    async fn forward(
        &self,
        connector: &Connector,
        request: Forward<'_>,
        body: Incoming,
        local: SocketAddr,
        started: Instant,
    ) -> Response<GatewayBody> {
        let Forward { method, path, query, headers, dialect } = request;
        let path_and_query = match &query {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        // The model is read from the path as written: it must be what goes upstream (no `\`, no dot
        // segments, nothing the URL parser would change), or the request could be counted against
        // another model than it reaches, or leave the connector's base path.
        if let Err(refused) = upstream_url(&connector.base_url(), &path_and_query) {
            self.metrics.refused("path");
            return error(dialect, StatusCode::BAD_REQUEST, &refused.to_string(), None);
        }
        let body = match read_body(body, &headers, self.settings.max_body).await {
            Ok(body) => body,
            Err(BodyProblem::TooLarge) => {
                self.metrics.refused("body");
                let message = format!(
                    "the request body is larger than {} bytes, the gateway's --max-body; raise it, or send large \
                     files through the Files API",
                    self.settings.max_body
                );
                let mut response = error(dialect, StatusCode::PAYLOAD_TOO_LARGE, &message, None);
                // The rest of the body is never read: this connection cannot carry another request.
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
            Err(BodyProblem::Broken(problem)) => {
                let message = format!("could not read the request body ({problem})");
                return error(dialect, StatusCode::BAD_REQUEST, &message, None);
            }
        };
        let model = connector.model_of(&path_and_query, &body);
        let mut upstream_headers = upstream_request_headers(&headers);
        upstream_headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let outgoing = Outgoing {
            method: method.clone(),
            stream: is_streaming(path, &body).then_some(dialect),
            wait: Some(wait_budget(self.settings.wait, &headers)),
            deadline: Outgoing::client_deadline(&headers, started),
            without_key: is_upload_chunk(path, query.as_deref()),
            path_and_query,
            headers: upstream_headers,
            body,
        };
        let sent = match self.jongler(&connector.name).await {
            Ok(jongler) => jongler.send(outgoing).await,
            Err(error) => Err(error),
        };
        let line = LogLine { connector: &connector.name, method: &method, path, started };
        match sent {
            Ok(exchange) => {
                line.answered(&exchange);
                self.metrics.answered(&connector.name, &exchange);
                answer(exchange, connector, local)
            }
            Err(failure) => {
                let (status, retry_after, outcome) = judge_failure(&failure);
                line.failed(model.as_deref(), status, &failure);
                self.metrics.failed(&connector.name, model.as_deref(), outcome);
                error(dialect, status, &failure.to_string(), retry_after)
            }
        }
    }

    /// The connector's jongler, built on first use.
    async fn jongler(&self, name: &str) -> api_jongler::Result<Jongler> {
        let cell = {
            let mut jonglers = self.jonglers.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(jonglers.entry(name.to_owned()).or_default())
        };
        let paths = &self.settings.paths;
        cell.get_or_try_init(|| {
            // Per request (the default scope) and no wait of its own: each request passes its wait.
            let mut builder = Jongler::builder(name).keyring(&paths.config).tor(self.settings.tor);
            if let Some(db) = &paths.db {
                builder = builder.database(db);
            }
            if let Some(dir) = &paths.connectors {
                builder = builder.connectors_dir(dir);
            }
            builder.connect()
        })
        .await
        .cloned()
    }
}

/// A routed request, credentials already stripped.
struct Forward<'a> {
    method: Method,
    /// The upstream path (after the connector's segment), as the client wrote it.
    path: &'a str,
    /// The query without any `key`.
    query: Option<String>,
    headers: HeaderMap,
    dialect: Dialect,
}

/// The one log line per request: never the query string, the body or a secret.
struct LogLine<'a> {
    connector: &'a str,
    method: &'a Method,
    path: &'a str,
    started: Instant,
}

impl LogLine<'_> {
    fn answered(&self, exchange: &Exchange) {
        tracing::info!(
            connector = %self.connector, method = %self.method, path = %self.path,
            model = %exchange.model.as_deref().unwrap_or("-"), key = %exchange.key_name.as_deref().unwrap_or("-"),
            status = exchange.status, latency_ms = millis(self.started.elapsed()), attempts = exchange.attempts,
            stream = matches!(exchange.body, ExchangeBody::Stream(_)), "request"
        );
    }

    fn failed(&self, model: Option<&str>, status: StatusCode, error: &Error) {
        tracing::info!(
            connector = %self.connector, method = %self.method, path = %self.path, model = %model.unwrap_or("-"),
            key = %"-", status = status.as_u16(), latency_ms = millis(self.started.elapsed()), error = %error, "request"
        );
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The client's answer from the upstream's: its status and end-to-end headers, ours added.
fn answer(exchange: Exchange, connector: &Connector, local: SocketAddr) -> Response<GatewayBody> {
    let mut headers = downstream_response_headers(&exchange.headers);
    rewrite_upload_url_header(&mut headers, &connector.base_url(), &gateway_base(local, &connector.name));
    if let Some(value) = exchange.key_name.as_deref().and_then(|name| HeaderValue::from_str(name).ok()) {
        headers.insert(X_APIJONGLER_KEY, value);
    }
    headers.insert(X_APIJONGLER_ATTEMPTS, HeaderValue::from(exchange.attempts));
    let body = match exchange.body {
        ExchangeBody::Full(bytes) => GatewayBody::full(bytes),
        ExchangeBody::Stream(stream) => {
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
            GatewayBody::Stream(stream)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(exchange.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = headers;
    response
}

/// The status, `Retry-After` and metrics outcome of a request the pool could not answer.
fn judge_failure(error: &Error) -> (StatusCode, Option<Duration>, Unanswered) {
    match error {
        Error::NoKeyAvailable(unavailable) => {
            (StatusCode::TOO_MANY_REQUESTS, Some(retry_wait(unavailable)), Unanswered::NoKey)
        }
        Error::Transport { .. } | Error::Stream { .. } => (StatusCode::BAD_GATEWAY, None, Unanswered::Unreachable),
        Error::ResourceOwnerUnavailable { .. } => (StatusCode::CONFLICT, None, Unanswered::Failed),
        Error::DatabaseLocked { .. }
        | Error::Database { .. }
        | Error::DatabaseUnreachable { .. }
        | Error::DatabaseReplaced { .. }
        | Error::LeaseLost { .. }
        | Error::KeyringDiffers { .. } => (StatusCode::SERVICE_UNAVAILABLE, None, Unanswered::Unavailable),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, None, Unanswered::Failed),
    }
}

/// How long a client should wait after a 429 of ours: until the earliest lockdown ends (at least a
/// second), or [`RETRY_WHEN_HELD`] when none is known (every key held by a request).
fn retry_wait(unavailable: &Unavailable) -> Duration {
    match unavailable.availability.earliest_lockdown_end {
        Some(end) => Duration::from_millis(u64::try_from(end - unavailable.at).unwrap_or(0).max(1000)),
        None => RETRY_WHEN_HELD,
    }
}

/// The wait for a free key: `--wait`, shortened to fit the client's own deadline (`X-Server-Timeout`
/// from google-genai, `x-stainless-read-timeout` from openai, in seconds) less a quarter of it (at
/// least a second), which is left for the upstream's answer.
fn wait_budget(wait: Duration, headers: &HeaderMap) -> Duration {
    let client = ["x-server-timeout", "x-stainless-read-timeout"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .filter_map(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .min();
    match client {
        Some(deadline) => wait.min(deadline.saturating_sub((deadline / 4).max(Duration::from_secs(1)))),
        None => wait,
    }
}

/// A streaming request: Gemini's `:streamGenerateContent`, or a JSON body with a top-level
/// `"stream": true` (the openai SDK sends `Accept: application/json` even then).
fn is_streaming(path: &str, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        stream: serde_json::Value,
    }
    if path.contains(":streamGenerateContent") {
        return true;
    }
    let starts_as_object = body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
    starts_as_object
        && serde_json::from_slice::<Flag>(body).is_ok_and(|flag| flag.stream == serde_json::Value::Bool(true))
}

/// A chunk of a resumable upload (`/upload/…?upload_id=…`): its `upload_id` is its capability, bound
/// to the key that started the upload, so it goes with no key and is never retried on another.
fn is_upload_chunk(path: &str, query: Option<&str>) -> bool {
    path.starts_with("/upload/")
        && query.is_some_and(|query| query.split('&').any(|pair| pair.split('=').next() == Some("upload_id")))
}

enum BodyProblem {
    TooLarge,
    Broken(String),
}

/// How long a request body may take to arrive.
const BODY_READ_LIMIT: Duration = Duration::from_secs(300);

/// The request body, up to `max` bytes: refused from its `Content-Length`, or once the bytes read
/// pass the cap.
async fn read_body(body: Incoming, headers: &HeaderMap, max: u64) -> Result<Bytes, BodyProblem> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > max) {
        return Err(BodyProblem::TooLarge);
    }
    // A client that never finishes its body would hold its connection forever (no key is claimed
    // before the body is whole); a slow upload still gets minutes.
    let collected =
        tokio::time::timeout(BODY_READ_LIMIT, Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX)).collect())
            .await
            .map_err(|_| BodyProblem::Broken(format!("not whole after {} s", BODY_READ_LIMIT.as_secs())))?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(BodyProblem::TooLarge),
        Err(error) => Err(BodyProblem::Broken(error.to_string())),
    }
}

/// The gateway's own error, in `dialect`, with retry headers for a `retry_after`.
fn error(dialect: Dialect, status: StatusCode, message: &str, retry_after: Option<Duration>) -> Response<GatewayBody> {
    let mut response = full(status, "application/json", dialect.error_body(status, message, retry_after).into());
    if let Some(wait) = retry_after {
        response.headers_mut().extend(dialect.retry_headers(wait));
    }
    response
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A response body: whole, or a relayed stream. Dropping a stream (hyper does when the client goes
/// away) stops the relay and frees its key.
#[derive(Debug)]
pub enum GatewayBody {
    /// The whole body, until it is sent.
    Full(Option<Bytes>),
    /// Chunks as the relay forwards them.
    Stream(StreamingBody),
    /// The dashboard's answer (its event stream included).
    Dashboard(dashboard::Body),
}

impl GatewayBody {
    fn full(bytes: Bytes) -> Self {
        GatewayBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            GatewayBody::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            GatewayBody::Stream(stream) => {
                stream.poll_chunk(context).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
            }
            GatewayBody::Dashboard(body) => Pin::new(body).poll_frame(context),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(bytes) => bytes.is_none(),
            GatewayBody::Stream(_) => false,
            GatewayBody::Dashboard(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64)),
            GatewayBody::Stream(_) => SizeHint::default(),
            GatewayBody::Dashboard(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let served = ["generativelanguage.googleapis.com".to_owned(), "router.huggingface.co".to_owned()];
        let gemini = "generativelanguage.googleapis.com";
        let cases: &[(&str, Option<&str>, Route)] = &[
            ("/__apijongler/health", None, Route::Health),
            ("/metrics", Some(gemini), Route::Metrics),
            ("/__apijongler/other", Some(gemini), Route::Reserved),
            (
                "/generativelanguage.googleapis.com/v1beta/models/m:generateContent",
                None,
                Route::Forward { connector: gemini, path: "/v1beta/models/m:generateContent" },
            ),
            ("/generativelanguage.googleapis.com", None, Route::Forward { connector: gemini, path: "" }),
            ("/generativelanguage.googleapis.com/", None, Route::Forward { connector: gemini, path: "/" }),
            (
                "/router.huggingface.co/v1/chat/completions",
                Some(gemini),
                Route::Forward { connector: "router.huggingface.co", path: "/v1/chat/completions" },
            ),
            ("/v1/models", None, Route::Unknown { name: "v1" }),
            ("/", None, Route::Unknown { name: "" }),
            ("/v1/models", Some(gemini), Route::Forward { connector: gemini, path: "/v1/models" }),
            ("/", Some(gemini), Route::Forward { connector: gemini, path: "/" }),
            (
                "/generativelanguage.googleapis.comx/v1",
                None,
                Route::Unknown { name: "generativelanguage.googleapis.comx" },
            ),
            ("/metrics/x", None, Route::Unknown { name: "metrics" }),
        ];
        for (path, root, expected) in cases {
            assert_eq!(route(path, &served, *root), *expected, "{path} {root:?}");
        }
    }

    #[test]
    fn wait_budgets() {
        let s = Duration::from_secs;
        let cases: &[(&[(&str, &str)], Duration)] = &[
            (&[], s(30)),
            (&[("x-server-timeout", "600")], s(30)),
            (&[("x-server-timeout", "20")], s(15)),
            (&[("x-server-timeout", "2")], s(1)),
            (&[("x-server-timeout", "1")], s(0)),
            (&[("x-stainless-read-timeout", "8.0")], s(6)),
            (&[("x-stainless-read-timeout", "600"), ("x-server-timeout", "12")], s(9)),
            (&[("x-server-timeout", "soon")], s(30)),
            (&[("x-server-timeout", "-5")], s(30)),
            (&[("x-server-timeout", "inf")], s(30)),
            (&[("x-server-timeout", "1e300")], s(30)),
        ];
        for (pairs, expected) in cases {
            let mut headers = HeaderMap::new();
            for (name, value) in *pairs {
                headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            assert_eq!(wait_budget(s(30), &headers), *expected, "{pairs:?}");
        }
    }

    #[test]
    fn streaming_requests() {
        let cases: &[(&str, &str, bool)] = &[
            ("/v1beta/models/m:streamGenerateContent", "", true),
            ("/v1beta/models/m:generateContent", r#"{"contents":[]}"#, false),
            ("/v1/chat/completions", r#" {"model":"m","stream":true}"#, true),
            ("/v1/chat/completions", r#"{"model":"m","stream":false}"#, false),
            ("/v1/chat/completions", r#"{"model":"m","stream":"true"}"#, false),
            ("/v1/chat/completions", r#"{"model":"m","options":{"stream":true}}"#, false),
            ("/v1/chat/completions", r#"[{"stream":true}]"#, false),
            ("/v1/chat/completions", r#"{"stream":true"#, false),
            ("/v1/chat/completions", "stream=true", false),
        ];
        for (path, body, expected) in cases {
            assert_eq!(is_streaming(path, body.as_bytes()), *expected, "{path} {body}");
        }
    }

    #[test]
    fn upload_chunks() {
        let cases: &[(&str, Option<&str>, bool)] = &[
            ("/upload/v1beta/files", Some("upload_id=AB&upload_protocol=resumable"), true),
            ("/upload/v1beta/files", Some("alt=json&upload_id=AB"), true),
            ("/upload/v1beta/files", None, false),
            ("/upload/v1beta/files", Some("upload_ids=1"), false),
            ("/v1beta/files", Some("upload_id=AB"), false),
        ];
        for (path, query, expected) in cases {
            assert_eq!(is_upload_chunk(path, *query), *expected, "{path} {query:?}");
        }
    }

    #[test]
    fn retry_waits() {
        let unavailable = |end: Option<i64>| Unavailable {
            availability: api_jongler::Availability { earliest_lockdown_end: end, ..Default::default() },
            waited: Duration::ZERO,
            at: 1_000_000,
            passed_over: None,
        };
        assert_eq!(retry_wait(&unavailable(Some(1_037_500))), Duration::from_millis(37_500));
        assert_eq!(retry_wait(&unavailable(Some(1_000_200))), Duration::from_secs(1), "at least a second");
        assert_eq!(retry_wait(&unavailable(Some(900_000))), Duration::from_secs(1), "already over");
        assert_eq!(retry_wait(&unavailable(None)), RETRY_WHEN_HELD);
    }
}
