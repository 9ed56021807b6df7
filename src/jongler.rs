//! The facade users call: send a request to an API through whichever key is free, and let rate
//! limits, bad keys and outages be handled as `classify` decides.
//!
//! Two lease scopes:
//! - per request (the default): a key is claimed for one request and released right after. With more
//!   workers than keys (the usual case), no idle worker sits on a key another could use; the price is
//!   two short write transactions per request (well under a millisecond).
//! - per connection (the seed's model): a key is claimed at connect, kept across requests (the
//!   coordinator heartbeats it), changed only when it goes to lockdown or error, and released at
//!   `disconnect()` or drop. Requests through one `Jongler` then take turns.
//!
//! Every attempt is recorded in the `requests` table. Keys travel only in request headers (marked
//! sensitive), never in URLs, logs or errors.
//!
//! Faults: a lease is checked right before every send and a key whose lease is no longer trusted is
//! given up and another claimed; a request dropped mid-flight (SIGINT, a client gone) gives its key
//! back and records the attempt as `cancelled`; an answer that came is returned even when the
//! database could not record what followed from it ([`Response::bookkeeping`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::connector::{Connector, Connectors};
use crate::coordinator::{Coordinator, CoordinatorOptions, KeyStates};
use crate::error::{Error, Result};
use crate::exchange::{
    Bookkeeping, Exchange, ExchangeBody, LeaseScope, Limits, Outgoing, TOR_PROXY_ENV, Upstream, build_client,
};
use crate::keyring::Keyring;
use crate::offload::blocking;
use crate::pool::Transition;

/// Tor's usual SOCKS port; `socks5h` so that host names are resolved through Tor too.
pub const DEFAULT_TOR_PROXY: &str = "socks5h://127.0.0.1:9050";

/// The environment variable setting the largest stream event held whole, in bytes.
pub const MAX_EVENT_ENV: &str = "APIJONGLER_MAX_EVENT";

/// The environment variable setting the largest whole answer read, in bytes.
pub const MAX_RESPONSE_ENV: &str = "APIJONGLER_MAX_RESPONSE";

/// The default largest stream event: 32 MiB. Gemini sends a generated image inline, base64, in one
/// event (a 4K PNG can pass 20 MiB that way); nothing legitimate comes near this otherwise, and a
/// gateway with a few dozen streams stays well inside a small machine's memory.
pub const DEFAULT_MAX_EVENT: usize = 32 * 1024 * 1024;

/// The default largest whole answer: 256 MiB, far above any generation or listing (a batch's inline
/// results, a file's metadata), still a bound a small machine survives a few of at once.
pub const DEFAULT_MAX_RESPONSE: usize = 256 * 1024 * 1024;

const SIZE_EXPECTED: &str = "write a positive number of bytes, optionally with a unit: 4096, 512KiB, 16MiB, 1GiB";

/// A size variable (`APIJONGLER_MAX_EVENT`, `APIJONGLER_MAX_RESPONSE`): `None` when unset or empty, an
/// error naming the variable when it is not a positive size.
fn size_from_env(variable: &'static str) -> Result<Option<usize>> {
    let Some(value) = std::env::var_os(variable) else { return Ok(None) };
    let text = value.to_string_lossy().trim().to_owned();
    if text.is_empty() {
        return Ok(None);
    }
    parse_size(&text).map(Some).ok_or(Error::InvalidEnv { variable, value: text, expected: SIZE_EXPECTED })
}

/// `4096`, `512KiB`, `16MiB`, `1GiB` (also `K`, `KB`, `M`, `MB`, `G`, `GB`, as binary units), positive.
fn parse_size(text: &str) -> Option<usize> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    let number = number.parse::<usize>().ok().filter(|number| *number > 0)?;
    number.checked_mul(1 << shift)
}

/// An upstream answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body text.
    pub body: String,
    /// The key that got this answer, if the connector needs keys.
    pub key_name: Option<String>,
    /// Upstream attempts this request made.
    pub attempts: u32,
    /// Whether the database recorded everything that followed from the request's attempts.
    pub bookkeeping: Bookkeeping,
}

impl Response {
    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Options for [`Jongler::connect`]; every one has a default.
#[derive(Debug, Clone)]
pub struct JonglerBuilder {
    connector: String,
    keyring: Option<PathBuf>,
    connectors_dir: Option<PathBuf>,
    coordinator: CoordinatorOptions,
    tor: bool,
    tor_proxy: Option<String>,
    wait: Duration,
    scope: LeaseScope,
    timeout: Option<Duration>,
    retry_timeouts: bool,
    max_event: Option<usize>,
    max_response: Option<usize>,
}

impl JonglerBuilder {
    /// The keyring file (default: `APIJONGLER_CONFIG`).
    pub fn keyring(mut self, path: impl Into<PathBuf>) -> Self {
        self.keyring = Some(path.into());
        self
    }

    /// The database file (default: `APIJONGLER_DB`, else the per-user state directory).
    pub fn database(mut self, path: impl Into<PathBuf>) -> Self {
        self.coordinator.db_path = Some(path.into());
        self
    }

    /// A directory of connector files (default: `APIJONGLER_CONNECTORS`).
    pub fn connectors_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.connectors_dir = Some(dir.into());
        self
    }

    /// The coordinator's timings (heartbeat, stale threshold, reaping) and clock.
    pub fn coordinator(mut self, options: CoordinatorOptions) -> Self {
        let db_path = self.coordinator.db_path.take();
        self.coordinator = CoordinatorOptions { db_path: options.db_path.or(db_path), ..options };
        self
    }

    /// Route through Tor (`socks5h://127.0.0.1:9050`, or `APIJONGLER_TOR_PROXY`).
    pub fn tor(mut self, enabled: bool) -> Self {
        self.tor = enabled;
        self
    }

    /// The SOCKS proxy used for Tor (implies [`tor`](Self::tor)).
    pub fn tor_proxy(mut self, url: impl Into<String>) -> Self {
        self.tor = true;
        self.tor_proxy = Some(url.into());
        self
    }

    /// How long a request may wait for a key when all are held or in lockdown (default: not at all).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Per request (default) or per connection.
    pub fn scope(mut self, scope: LeaseScope) -> Self {
        self.scope = scope;
        self
    }

    /// The per-attempt timeout (default: the connector's, else `APIJONGLER_TIMEOUT`, else 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether a non-idempotent request (a POST: a generation) that may have reached the upstream but got
    /// no answer (a timeout after it was sent, a connection broken after it) is sent again, on this or
    /// another key (default: no). The upstream may have generated and billed the first one: allowing
    /// this may pay twice for one answer. A connection that failed before anything was sent is always
    /// retried.
    pub fn retry_timeouts(mut self, allowed: bool) -> Self {
        self.retry_timeouts = allowed;
        self
    }

    /// The largest stream event held whole, in bytes (default: `APIJONGLER_MAX_EVENT`, else
    /// `DEFAULT_MAX_EVENT`, 32 MiB). A first event beyond it fails the attempt; a later one ends the stream
    /// with an error event. Neither blames the key.
    pub fn max_event(mut self, bytes: usize) -> Self {
        self.max_event = Some(bytes);
        self
    }

    /// The largest whole answer read, in bytes (default: `APIJONGLER_MAX_RESPONSE`, else
    /// `DEFAULT_MAX_RESPONSE`, 256 MiB). A larger answer fails the attempt without blaming the key.
    pub fn max_response(mut self, bytes: usize) -> Self {
        self.max_response = Some(bytes);
        self
    }

    /// Loads the connector and keyring, opens and syncs the database, and (per connection) claims a key.
    pub async fn connect(self) -> Result<Jongler> {
        let connectors = match &self.connectors_dir {
            Some(dir) => Connectors::load(Some(dir))?,
            None => Connectors::from_env()?,
        };
        let connector = connectors.get(&self.connector)?.clone();
        let keyring = if connector.requires_api_key {
            let keyring = match &self.keyring {
                Some(path) => Keyring::load(path)?,
                None => Keyring::from_env()?,
            };
            keyring.keys(&connector.name)?;
            Some(keyring)
        } else {
            None
        };
        let options = self.coordinator.clone();
        let synced = keyring.clone();
        let coordinator = blocking(move || {
            let coordinator = Coordinator::open(options)?;
            if let Some(keyring) = &synced {
                coordinator.sync(keyring)?;
            }
            Ok(coordinator)
        })
        .await?;
        let tor = self.tor.then(|| {
            self.tor_proxy
                .clone()
                .or_else(|| std::env::var(TOR_PROXY_ENV).ok().filter(|url| !url.is_empty()))
                .unwrap_or_else(|| DEFAULT_TOR_PROXY.to_owned())
        });
        let timeout = match self.timeout {
            Some(timeout) => timeout,
            None => connector.policy.try_timeout()?,
        };
        let limits = Limits {
            max_event: match self.max_event {
                Some(bytes) => bytes,
                None => size_from_env(MAX_EVENT_ENV)?.unwrap_or(DEFAULT_MAX_EVENT),
            },
            max_response: match self.max_response {
                Some(bytes) => bytes,
                None => size_from_env(MAX_RESPONSE_ENV)?.unwrap_or(DEFAULT_MAX_RESPONSE),
            },
        };
        let client = build_client(tor.as_deref(), timeout)?;
        let jongler = Jongler {
            inner: Arc::new(Upstream {
                connector,
                keyring,
                coordinator,
                client: Mutex::new(client),
                tor,
                timeout,
                retry_timeouts: self.retry_timeouts,
                limits,
                wait: self.wait,
                scope: self.scope,
                held: tokio::sync::Mutex::new(None),
            }),
        };
        if jongler.inner.scope == LeaseScope::PerConnection && jongler.inner.keyring.is_some() {
            let lease = jongler
                .inner
                .claim(crate::store::ClaimFor::new(&jongler.inner.connector.name, None, &[]), jongler.inner.wait)
                .await?;
            *jongler.inner.held.lock().await = Some(lease);
        }
        tracing::info!(connector = %jongler.inner.connector.name, scope = ?jongler.inner.scope, "connected");
        Ok(jongler)
    }
}

/// A connection to one API through the shared key pool. Cheap to clone; safe to share between tasks.
#[derive(Debug, Clone)]
pub struct Jongler {
    inner: Arc<Upstream>,
}

impl Jongler {
    /// Options for connecting to `connector`.
    pub fn builder(connector: impl Into<String>) -> JonglerBuilder {
        JonglerBuilder {
            connector: connector.into(),
            keyring: None,
            connectors_dir: None,
            coordinator: CoordinatorOptions::default(),
            tor: false,
            tor_proxy: None,
            wait: Duration::ZERO,
            scope: LeaseScope::default(),
            timeout: None,
            retry_timeouts: false,
            max_event: None,
            max_response: None,
        }
    }

    /// Connects to `connector` with the default options (see [`JonglerBuilder`]).
    pub async fn connect(connector: impl Into<String>) -> Result<Self> {
        Self::builder(connector).connect().await
    }

    /// The connector.
    pub fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    /// The coordinator underneath (for monitoring and the history).
    pub fn coordinator(&self) -> &Coordinator {
        &self.inner.coordinator
    }

    /// Ok in the process that connected; [`Error::ForkedChild`] in a child forked from it. For a
    /// binding that runs calls on a runtime of its own: checked before handing a call to that runtime,
    /// whose threads a forked child does not have.
    pub fn check_process(&self) -> Result<()> {
        self.inner.coordinator.inner.alive_here()
    }

    /// Sends `outgoing` through a free key, retrying on other keys and after provider trouble as the
    /// policy says, and returns the final answer whatever its status (see the `exchange` module docs
    /// for streams). Errors: no key free in time, the network failing beyond the retry budget, a lost
    /// lease, a keyring that no longer matches the database.
    pub async fn send(&self, outgoing: Outgoing) -> Result<Exchange> {
        self.inner.send(outgoing).await
    }

    /// Sends `body` (empty: none) to `endpoint` with `method` through a free key, retrying on other keys
    /// and after provider trouble as the policy says, and returns the final answer whatever its status.
    /// Errors: no key free in time, the network failing beyond the retry budget, a lost lease. For
    /// bytes, headers and streams, see [`send`](Self::send).
    pub async fn request(&self, method: &str, endpoint: &str, body: &str) -> Result<Response> {
        self.request_with_deadline(method, endpoint, body, None).await
    }

    /// [`request`](Self::request) with the caller's deadline for the whole request, the wait for a key
    /// included (see [`Outgoing::deadline`](crate::Outgoing::deadline)); `None`: the jongler's timeout
    /// per attempt only.
    pub async fn request_with_deadline(
        &self,
        method: &str,
        endpoint: &str,
        body: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Response> {
        let method = reqwest::Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| Error::InvalidRequest { problem: format!("'{method}' is not an HTTP method") })?;
        let endpoint = if endpoint.starts_with('/') { endpoint.to_owned() } else { format!("/{endpoint}") };
        let exchange = self.send(Outgoing { deadline, ..Outgoing::new(method, endpoint, body.to_owned()) }).await?;
        let body = match exchange.body {
            ExchangeBody::Full(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            ExchangeBody::Stream(mut stream) => {
                let mut bytes = Vec::new();
                while let Some(chunk) = stream.chunk().await {
                    bytes.extend_from_slice(&chunk);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        Ok(Response {
            status: exchange.status,
            headers: exchange.headers,
            body,
            key_name: exchange.key_name,
            attempts: exchange.attempts,
            bookkeeping: exchange.bookkeeping,
        })
    }

    /// POSTs `body` as JSON to `endpoint` and returns the parsed JSON of a 2xx answer. A non-2xx answer
    /// is [`Error::Upstream`] with the status and the upstream's parsed error; a 2xx answer that is not
    /// JSON is [`Error::NotJson`] with its text.
    pub async fn request_json(&self, endpoint: &str, body: &Value) -> Result<Value> {
        let response = self.request("POST", endpoint, &body.to_string()).await?;
        let parsed = serde_json::from_str::<Value>(&response.body);
        if !response.is_success() {
            return Err(Error::Upstream {
                connector: self.inner.connector.name.clone(),
                status: response.status,
                body: Box::new(parsed.unwrap_or(Value::String(response.body))),
            });
        }
        parsed.map_err(|_| Error::NotJson { status: response.status, text: response.body })
    }

    /// Key names by state (the seed's `getKeyStates()`).
    pub async fn key_states(&self) -> Result<KeyStates> {
        let (coordinator, connector) = (self.inner.coordinator.clone(), self.inner.connector.name.clone());
        blocking(move || coordinator.key_states(&connector)).await
    }

    /// Key names by state as a request for `model` sees them: a key whose quota group is locked down
    /// for that model counts as in lockdown (it still serves other models).
    pub async fn key_states_for(&self, model: Option<&str>) -> Result<KeyStates> {
        let (coordinator, connector) = (self.inner.coordinator.clone(), self.inner.connector.name.clone());
        let model = model.map(str::to_owned);
        blocking(move || coordinator.key_states_for(&connector, model.as_deref())).await
    }

    /// Names of the vacant keys.
    pub async fn vacant_keys(&self) -> Result<Vec<String>> {
        Ok(self.key_states().await?.vacant.into_iter().collect())
    }

    /// Names of the keys held by some process.
    pub async fn locked_keys(&self) -> Result<Vec<String>> {
        Ok(self.key_states().await?.locked.into_iter().collect())
    }

    /// Names of the keys in lockdown for every model (the seed's meaning; per model: [`key_states_for`]).
    ///
    /// [`key_states_for`]: Self::key_states_for
    pub async fn lockdown_keys(&self) -> Result<Vec<String>> {
        Ok(self.key_states().await?.lockdown.into_iter().collect())
    }

    /// Names of the keys in error.
    pub async fn error_keys(&self) -> Result<Vec<String>> {
        Ok(self.key_states().await?.error.into_iter().collect())
    }

    /// Names of the keys that could be claimed now (never secrets, unlike the seed's).
    pub async fn available_keys(&self) -> Result<Vec<String>> {
        self.vacant_keys().await
    }

    /// The seed's `cleanUp`: this connector's (or, with `all`, every connector's) lockdown and error
    /// keys back to vacant, dead holders' locks freed; live holders keep their keys.
    pub async fn cleanup(&self, all: bool) -> Result<Vec<Transition>> {
        let (coordinator, connector) = (self.inner.coordinator.clone(), self.inner.connector.name.clone());
        blocking(move || coordinator.cleanup((!all).then_some(connector.as_str()), false)).await
    }

    /// Releases the key held per connection, if any. Later requests claim again.
    pub async fn disconnect(&self) -> Result<()> {
        let held = self.inner.held.lock().await.take();
        match held {
            Some(lease) => blocking(move || lease.release()).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bytes_or_binary_units() {
        let cases: &[(&str, Option<usize>)] = &[
            ("4096", Some(4096)),
            ("512KiB", Some(512 << 10)),
            ("16MiB", Some(16 << 20)),
            ("16 M", Some(16 << 20)),
            ("1GiB", Some(1 << 30)),
            ("2gb", Some(2 << 30)),
            ("0", None),
            ("-1", None),
            ("1.5MiB", None),
            ("16 furlongs", None),
            ("MiB", None),
            ("99999999999999999999", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), *expected, "{text}");
        }
    }
}
