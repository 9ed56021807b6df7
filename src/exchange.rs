//! Sending one request through the pool: the path the library, the CLI and the gateway share.
//!
//! `Jongler::send` is a composition of named steps, each owning one decision:
//! - [`RetryBudget`] owns the counters: attempts, backoff retries, Tor circuits, untrusted claims.
//! - `next_lease` claims a key for the request's model (or keeps the one held per connection), and
//!   confirms a lease whose trust ran out before it is used.
//! - `attempt` sends the bytes with the key and reads the answer: the whole body, or for a stream the
//!   bytes up to its first complete event, within a first-event deadline.
//! - `judge` turns the answer into a [`Verdict`] (the `classify` policy).
//! - `settle` applies the verdict to the key and records the attempt, in one transaction.
//! - A committed stream is relayed by a task that owns the lease until the stream ends, and settles
//!   the key by how it ended.
//!
//! Streams follow one rule: until the first event has reached the caller, every failure (a non-2xx
//! status, a transport error, an `{"error": ...}` first event, a body that ends before any event) is
//! judged like a non-streaming answer and may be retried on another key. After it: never a retry,
//! never another key, never two attempts joined. A later failure ends the stream with one error event
//! in the stream's dialect; after a terminal event (or an upstream error event) nothing is added.
//! Bytes are forwarded verbatim, whole events at a time, so an error event never lands in the middle
//! of a half-sent one.
//!
//! What an attempt may cost is bounded:
//! - Time: each attempt has the jongler's timeout, or what is left of the caller's deadline
//!   ([`Outgoing::deadline`]) when that is sooner; no attempt or retry starts after that deadline.
//! - Copies: a non-idempotent request (a POST: a generation) that may have reached the upstream and got
//!   no answer (a timeout after it was sent, a connection broken after it) is not sent again, since
//!   the upstream may have generated and billed it, unless the caller allowed it (`retry_timeouts`).
//!   A connection that could not be made sent nothing, and goes to another key as before.
//! - Memory: a whole answer is read up to `max_response` bytes and a stream event up to `max_event`
//!   bytes, the first one before the commit and every later one in the relay. Past them the attempt
//!   fails (after the commit: one error event), without blaming the key and without another key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;

use crate::classify::{self, Context, Next, Verdict};
use crate::connector::Connector;
use crate::coordinator::Coordinator;
use crate::error::{Error, Result};
use crate::gateway::dialect::Dialect;
use crate::gateway::sse::{Event, FirstEventHold, Framer};
use crate::keyring::Keyring;
use crate::lease::Lease;
use crate::offload::{blocking, short_blocking};
use crate::pool::outcome::{Judged, Outcome};
use crate::pool::{Attempt, Fate};

/// How many times in a row one request may find a freshly claimed lease untrusted before giving up
/// (each time means this process was stopped between claim and send).
const MAX_UNTRUSTED_CLAIMS: u32 = 3;

/// How many chunks a relayed stream may run ahead of its reader.
const RELAY_CHUNKS: usize = 16;

/// The environment variable overriding the Tor SOCKS proxy.
pub const TOR_PROXY_ENV: &str = "APIJONGLER_TOR_PROXY";

/// The size limits of one jongler's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The largest stream event held whole.
    pub(crate) max_event: usize,
    /// The largest whole answer read.
    pub(crate) max_response: usize,
}

/// How long a key is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseScope {
    /// Claimed for one request, released after it (default).
    #[default]
    PerRequest,
    /// Claimed at connect and kept until it goes to lockdown or error, or until disconnect.
    PerConnection,
}

/// Whether the database recorded what followed from an answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Bookkeeping {
    /// The attempt and the key's new state were written.
    #[default]
    Recorded,
    /// A key's lease was taken away during the request (reaped after this process was stopped, or
    /// `cleanup --force`): another process may have used the key at the same time.
    LeaseLost {
        /// The key.
        key: String,
    },
    /// The answer came, but the attempt or the key's new state could not be written (disk full, the
    /// database locked too long); the key is released in the background or by the reaper.
    NotRecorded {
        /// What failed.
        problem: String,
    },
}

/// One API reached through the pool's keys: what every attempt of every request of one jongler
/// shares (its connector, keyring, coordinator, HTTP client and limits).
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) connector: Connector,
    /// `None` for connectors that need no key.
    pub(crate) keyring: Option<Keyring>,
    pub(crate) coordinator: Coordinator,
    /// Replaced by a new one (new SOCKS credentials, so a new Tor circuit) after a location refusal.
    pub(crate) client: Mutex<reqwest::Client>,
    pub(crate) tor: Option<String>,
    pub(crate) timeout: Duration,
    /// A POST that may have reached the upstream is sent again after a timeout.
    pub(crate) retry_timeouts: bool,
    pub(crate) limits: Limits,
    pub(crate) wait: Duration,
    pub(crate) scope: LeaseScope,
    /// The key held across requests (per connection); its lock also makes those requests take turns.
    pub(crate) held: tokio::sync::Mutex<Option<Lease>>,
}

impl Upstream {
    /// A free key at once if there is one (in place: no hand-off), else a place in the process's
    /// queue of waiters, which holds no thread while it waits.
    pub(crate) async fn claim(&self, model: Option<&str>, tried: &[String], wait: Duration) -> Result<Lease> {
        self.coordinator.claim_for_async(&self.connector.name, model, tried, wait).await
    }

    /// The current HTTP client (a new one after each new Tor circuit).
    pub(crate) fn client(&self) -> reqwest::Client {
        self.client.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fresh SOCKS credentials: Tor isolates streams by credentials, so this is a new circuit (and exit).
    pub(crate) fn new_circuit(&self) -> Result<()> {
        let client = build_client(self.tor.as_deref(), self.timeout)?;
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) = client;
        tracing::info!(connector = %self.connector.name, "new Tor circuit");
        Ok(())
    }
}

/// A request to send through the pool: bytes and headers, never strings.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// HTTP method.
    pub method: reqwest::Method,
    /// The upstream path and query, e.g. `/v1beta/models/gemini-2.5-flash:generateContent?alt=sse`. It
    /// must carry no credential: the key travels only in the connector's header.
    pub path_and_query: String,
    /// End-to-end headers to forward (no credentials, no hop-by-hop headers). Without a
    /// `content-type`, a non-empty body is sent as the connector's format.
    pub headers: HeaderMap,
    /// The body (empty: none). Kept whole, so that a retry on another key sends the same bytes.
    pub body: Bytes,
    /// A streaming request, and the dialect of its error events: hold the answer until its first
    /// complete event, then relay it (see the module docs).
    pub stream: Option<Dialect>,
    /// How long to wait for a free key (default: the jongler's).
    pub wait: Option<Duration>,
    /// The caller's own deadline for the whole request, if it has one (the gateway's client sends it
    /// as `X-Server-Timeout` or `x-stainless-read-timeout`, see [`Outgoing::client_deadline`]): each
    /// attempt gets what is left of it when that is less than the jongler's timeout, and no attempt or
    /// retry starts once it has passed.
    pub deadline: Option<Instant>,
    /// Send with no key and never retry: a resumable upload's chunk, whose `upload_id` is its own
    /// capability and belongs to the key that started the upload.
    pub without_key: bool,
}

impl Outgoing {
    /// A request with no extra header, no stream and the jongler's wait.
    pub fn new(method: reqwest::Method, path_and_query: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            method,
            path_and_query: path_and_query.into(),
            headers: HeaderMap::new(),
            body: body.into(),
            stream: None,
            wait: None,
            deadline: None,
            without_key: false,
        }
    }

    /// The deadline a client announces in its headers, counted from `received`: `X-Server-Timeout`
    /// (google-genai) or `x-stainless-read-timeout` (openai), in seconds, the shorter if both; `None`
    /// without a usable one (not a positive, finite number).
    pub fn client_deadline(headers: &HeaderMap, received: Instant) -> Option<Instant> {
        ["x-server-timeout", "x-stainless-read-timeout"]
            .iter()
            .filter_map(|name| headers.get(*name)?.to_str().ok()?.trim().parse::<f64>().ok())
            .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
            .filter_map(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .min()
            .and_then(|timeout| received.checked_add(timeout))
    }
}

/// Where the time of an exchange went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting for free keys, over all attempts.
    pub claiming: Duration,
    /// The last attempt, from sending to its answer (a stream: to its first event).
    pub upstream: Duration,
}

/// The answer to an [`Outgoing`] request.
#[derive(Debug)]
pub struct Exchange {
    /// HTTP status.
    pub status: u16,
    /// The upstream's response headers.
    pub headers: HeaderMap,
    /// The body: whole, or a stream being relayed.
    pub body: ExchangeBody,
    /// The key that got this answer, if the connector needs keys.
    pub key_name: Option<String>,
    /// Upstream attempts this request made.
    pub attempts: u32,
    /// The model the request named, if the connector could tell.
    pub model: Option<String>,
    /// Where the time went.
    pub timings: Timings,
    /// Whether the database recorded everything that followed from the attempts so far (a relayed
    /// stream settles its key when it ends).
    pub bookkeeping: Bookkeeping,
}

/// The body of an [`Exchange`].
#[derive(Debug)]
pub enum ExchangeBody {
    /// The whole body.
    Full(Bytes),
    /// A stream: its chunks as the relay forwards them.
    Stream(StreamingBody),
}

/// A stream being relayed: whole events, verbatim, ending with at most one error event of ours.
/// Dropping it (a client that went away) stops the relay, frees the key at once and records the
/// attempt as cancelled.
#[derive(Debug)]
pub struct StreamingBody {
    chunks: mpsc::Receiver<Bytes>,
}

impl StreamingBody {
    /// The next chunk; `None` at the end of the stream.
    pub async fn chunk(&mut self) -> Option<Bytes> {
        self.chunks.recv().await
    }

    /// Polls for the next chunk (for an HTTP body implementation).
    pub fn poll_chunk(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<Option<Bytes>> {
        self.chunks.poll_recv(context)
    }
}

/// The counters of one request's retries, and the rules that spend them.
#[derive(Debug)]
struct RetryBudget {
    attempts: u32,
    max_attempts: u32,
    backoffs: u32,
    max_backoffs: u32,
    circuits: u32,
    untrusted: u32,
}

/// What to do after an answer that was not returned at once.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// Return the answer.
    No,
    /// Try again (on another key if the last one was put aside), after sleeping this long.
    After(Duration),
    /// Try again through a new Tor circuit.
    NewCircuit,
}

impl RetryBudget {
    /// A budget for a pool of `keys` keys and a connector allowing `retries` backoff retries: each key
    /// may be tried a few times (a lockdown may end during a wait), plus the retries.
    fn new(keys: usize, retries: u32) -> Self {
        let max_attempts = u32::try_from(keys * 4).unwrap_or(u32::MAX).saturating_add(retries * 2 + 4);
        Self { attempts: 0, max_attempts, backoffs: 0, max_backoffs: retries, circuits: 0, untrusted: 0 }
    }

    fn attempt(&mut self) {
        self.attempts += 1;
    }

    /// One more lease found untrusted before its send; false once that happened too often.
    fn untrusted_claim(&mut self) -> bool {
        self.untrusted += 1;
        self.untrusted <= MAX_UNTRUSTED_CLAIMS
    }

    /// Whether `next` may be followed, spending what it costs; `cap` bounds a backoff.
    fn follow(&mut self, next: &Next, via_tor: bool, cap: Duration) -> Retry {
        if self.attempts >= self.max_attempts {
            return Retry::No;
        }
        match *next {
            Next::Return => Retry::No,
            Next::OtherKey => Retry::After(Duration::ZERO),
            Next::Backoff { after } if self.backoffs < self.max_backoffs => {
                self.backoffs += 1;
                // A loading model's estimate is honoured, but never beyond one attempt's timeout.
                Retry::After(after.min(cap))
            }
            Next::NewCircuit if via_tor && self.circuits < self.max_backoffs => {
                self.circuits += 1;
                Retry::NewCircuit
            }
            Next::Backoff { .. } | Next::NewCircuit => Retry::No,
        }
    }

    /// How many backoff retries were made (the escalation of backoff delays).
    fn backoffs(&self) -> u32 {
        self.backoffs
    }
}

/// What came back from one attempt.
enum Answer {
    /// A whole answer.
    Whole { status: u16, headers: HeaderMap, body: Bytes },
    /// A 2xx stream whose first event is complete: the bytes held so far, and the rest to relay.
    Stream { status: u16, headers: HeaderMap, held: Box<HeldStream> },
}

/// A stream held up to its first event.
struct HeldStream {
    committed: crate::gateway::sse::Committed,
    response: reqwest::Response,
}

impl Answer {
    fn status(&self) -> u16 {
        match self {
            Answer::Whole { status, .. } | Answer::Stream { status, .. } => *status,
        }
    }
}

/// A failure of one attempt before any answer could be judged.
#[derive(Debug)]
enum NoAnswer {
    Transport(reqwest::Error),
    /// No answer (or no first event) within the attempt's time, after the request went out.
    Late(String),
    /// The stream ended before its first event.
    Stream(String),
    /// The lease was no longer trusted once the connection was ready: nothing was sent (`gate`).
    LeaseLost {
        key: String,
        lease: i64,
    },
    /// The answer, or one event of it, is larger than its limit.
    TooLarge(String),
}

impl NoAnswer {
    /// Whether the request may have reached the upstream, which may then have generated (and billed)
    /// it: anything but a connection that could not be made, or an empty stream the upstream ended.
    fn may_have_reached(&self) -> bool {
        match self {
            NoAnswer::Transport(error) => !error.is_connect(),
            NoAnswer::Late(_) | NoAnswer::TooLarge(_) => true,
            NoAnswer::Stream(_) | NoAnswer::LeaseLost { .. } => false,
        }
    }
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Transport(error) => write!(f, "{}", without_url(error)),
            NoAnswer::Late(problem) | NoAnswer::Stream(problem) | NoAnswer::TooLarge(problem) => f.write_str(problem),
            NoAnswer::LeaseLost { key, .. } => write!(f, "the lease of {key} was lost before the request was sent"),
        }
    }
}

/// What the caller hears when a request that may have reached the upstream is not sent again.
const NOT_SENT_AGAIN: &str = "not sent again, since the upstream may have generated (and billed) it; allow that \
                              with retry_timeouts (--retry-timeouts), which may pay twice";

impl Upstream {
    /// Sends `outgoing` (see `Jongler::send`).
    pub(crate) async fn send(self: &Arc<Self>, outgoing: Outgoing) -> Result<Exchange> {
        let inner = self;
        let connector = &inner.connector;
        crate::gateway::path::upstream_url(&connector.base_url(), &outgoing.path_and_query)?;
        let path = outgoing.path_and_query.split(['?', '#']).next().unwrap_or_default().to_owned();
        let model = connector.model_of(&outgoing.path_and_query, &outgoing.body);
        let started = Instant::now();
        let deadline = outgoing.deadline;
        // A caller's deadline also bounds the wait for a key.
        let wait = outgoing.wait.unwrap_or(inner.wait);
        let wait = deadline.map_or(wait, |deadline| wait.min(deadline.saturating_duration_since(started)));
        let replay = self.may_replay(&outgoing);
        let mut connection_slot =
            if inner.scope == LeaseScope::PerConnection { Some(inner.held.lock().await) } else { None };
        let mut request_slot = None;
        let slot: &mut Option<Lease> = match connection_slot.as_mut() {
            Some(guard) => guard,
            None => &mut request_slot,
        };
        let keys = inner.keyring.as_ref().map_or(0, |keyring| keyring.keys(&connector.name).map_or(0, <[_]>::len));
        let mut budget = RetryBudget::new(keys, connector.policy.retries);
        let mut tried: Vec<String> = Vec::new();
        let mut bookkeeping = Bookkeeping::Recorded;
        let mut timings = Timings::default();
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(Error::Stream {
                    connector: connector.name.clone(),
                    endpoint: path,
                    attempts: budget.attempts,
                    problem: "the caller's deadline passed before an attempt could start".to_owned(),
                });
            }
            let claiming = Instant::now();
            let lease = if outgoing.without_key {
                None
            } else {
                self.next_lease(slot, model.as_deref(), &tried, started, wait, &mut budget).await?
            };
            timings.claiming += claiming.elapsed();
            self.check_secret(lease.as_ref())?;
            budget.attempt();
            let key_name = lease.as_ref().map(|lease| lease.key_name().to_owned());
            let attempt = Attempt {
                at: inner.coordinator.now_ms(),
                connector: connector.name.clone(),
                key_name: key_name.clone(),
                method: outgoing.method.to_string(),
                endpoint: path.clone(),
                status: None,
                latency_ms: 0,
                outcome: Outcome::Cancelled,
                model: model.clone(),
            };
            let sent = Instant::now();
            let in_flight = InFlight { lease, cancelled: attempt.clone(), sent };
            let answer = self.attempt(&outgoing, in_flight.lease.as_ref()).await;
            timings.upstream = sent.elapsed();
            let lease = in_flight.landed();
            let verdict = self.judge(&answer, model.as_deref(), lease.as_ref(), budget.backoffs(), replay);
            let attempt = Attempt {
                status: answer.as_ref().ok().map(Answer::status),
                latency_ms: millis(sent.elapsed()),
                outcome: describe(&verdict, &answer),
                ..attempt
            };
            tracing::debug!(
                connector = %attempt.connector, key = ?attempt.key_name, status = ?attempt.status,
                latency_ms = attempt.latency_ms, outcome = %attempt.outcome, attempt = budget.attempts,
                "upstream attempt"
            );
            // A stream whose first event is good is committed: its lease goes to the relay.
            if let (Ok(Answer::Stream { .. }), Fate::Release { success: true }) = (&answer, &verdict.key) {
                let Ok(Answer::Stream { status, headers, held }) = answer else { unreachable!("matched above") };
                let dialect = outgoing.stream.unwrap_or(Dialect::Google);
                let body = self.relay(held, dialect, lease, attempt, sent);
                return Ok(Exchange {
                    status,
                    headers,
                    body: ExchangeBody::Stream(body),
                    key_name,
                    attempts: budget.attempts,
                    model,
                    timings,
                    bookkeeping,
                });
            }
            match self.settle(slot, lease, &verdict, attempt, model.as_deref()).await {
                Ok(()) => {}
                // Refused by the gate: the key is someone else's, but nothing was sent with it.
                Err(Error::LeaseLost { .. }) if matches!(answer, Err(NoAnswer::LeaseLost { .. })) => {}
                Err(Error::LeaseLost { key, .. }) => bookkeeping = Bookkeeping::LeaseLost { key },
                // The answer (if one came) is the caller's: the quota is spent. Stop here and hand it over.
                Err(error) => match answer {
                    Ok(answer) => {
                        let bookkeeping = Bookkeeping::NotRecorded { problem: error.to_string() };
                        let summary = (key_name, budget.attempts, model, timings, bookkeeping);
                        return Ok(self.exchange(answer, summary).await);
                    }
                    Err(_) => return Err(error),
                },
            }
            let retry = if outgoing.without_key {
                Retry::No
            } else {
                budget.follow(&verdict.next, inner.tor.is_some(), inner.timeout)
            };
            // No retry that would start after the caller's deadline: the last answer is returned instead.
            let retry = match retry {
                Retry::After(pause) if deadline.is_some_and(|deadline| Instant::now() + pause >= deadline) => Retry::No,
                Retry::NewCircuit if deadline.is_some_and(|deadline| Instant::now() >= deadline) => Retry::No,
                retry => retry,
            };
            if verdict.next == Next::OtherKey {
                tried.extend(key_name.clone());
            }
            match retry {
                Retry::After(pause) => tokio::time::sleep(pause).await,
                Retry::NewCircuit => self.new_circuit()?,
                Retry::No => {
                    return match answer {
                        Ok(answer) => {
                            Ok(self.exchange(answer, (key_name, budget.attempts, model, timings, bookkeeping)).await)
                        }
                        Err(NoAnswer::Transport(error)) if replay || error.is_connect() => Err(Error::Transport {
                            connector: connector.name.clone(),
                            endpoint: path,
                            attempts: budget.attempts,
                            source: Box::new(error.without_url()),
                        }),
                        Err(NoAnswer::LeaseLost { key, lease }) => {
                            Err(Error::LeaseLost { connector: connector.name.clone(), key, lease })
                        }
                        Err(no_answer) => {
                            let problem = match &no_answer {
                                NoAnswer::TooLarge(_) | NoAnswer::Stream(_) => no_answer.to_string(),
                                _ if replay => no_answer.to_string(),
                                NoAnswer::Transport(error) => {
                                    format!("{}, after the request was sent; {NOT_SENT_AGAIN}", innermost(error))
                                }
                                _ => format!("{no_answer}; {NOT_SENT_AGAIN}"),
                            };
                            Err(Error::Stream {
                                connector: connector.name.clone(),
                                endpoint: path,
                                attempts: budget.attempts,
                                problem,
                            })
                        }
                    };
                }
            }
        }
    }

    /// The key for the next attempt (see `lease_for_attempt`), confirmed if its trust ran out: a lease
    /// claimed (or held) before this process was stopped, or the database locked, for longer than it is
    /// trusted is confirmed with one conditional write, and given up for another claim if it was lost.
    async fn next_lease(
        &self,
        slot: &mut Option<Lease>,
        model: Option<&str>,
        tried: &[String],
        started: Instant,
        wait: Duration,
        budget: &mut RetryBudget,
    ) -> Result<Option<Lease>> {
        loop {
            let Some(lease) = self.lease_for_attempt(slot, model, tried, started, wait).await? else {
                return Ok(None);
            };
            if lease.is_valid() {
                return Ok(Some(lease));
            }
            let (lease, renewed) = short_blocking(move || {
                let renewed = lease.renew().unwrap_or(false);
                Ok((lease, renewed))
            })
            .await?;
            if renewed {
                return Ok(Some(lease));
            }
            // The key may be someone else's by now. Give it up and claim again.
            tracing::warn!(key = %lease.key_name(), "lease no longer trusted before sending; claiming again");
            if !budget.untrusted_claim() {
                return Err(Error::LeaseLost {
                    connector: self.connector.name.clone(),
                    key: lease.key_name().to_owned(),
                    lease: lease.token(),
                });
            }
        }
    }

    /// The key to use for the next attempt: none for keyless connectors, the held one per connection
    /// while it is valid, else a fresh claim that waits what is left of the caller's wait.
    async fn lease_for_attempt(
        &self,
        slot: &mut Option<Lease>,
        model: Option<&str>,
        tried: &[String],
        started: Instant,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        if self.keyring.is_none() {
            return Ok(None);
        }
        if let Some(lease) = slot.take() {
            // A key kept across requests may since have been locked down for this request's model (by
            // its group): give it back and claim one free for the model.
            let coordinator = self.coordinator.clone();
            let model = model.map(str::to_owned);
            let (lease, usable) = short_blocking(move || {
                let locked = match &model {
                    Some(model) => coordinator.store().is_locked_down_for(lease.id(), model, coordinator.now_ms())?,
                    None => false,
                };
                if locked {
                    lease.release()?;
                    return Ok((None, false));
                }
                Ok((Some(lease), true))
            })
            .await?;
            if usable {
                // Its trust is checked (and renewed if it can be) by the caller, like a fresh claim's.
                return Ok(lease);
            }
        }
        let remaining = wait.saturating_sub(started.elapsed());
        // Without a wait, each key is tried once per request (the seed's rule). With one, a key put in
        // lockdown by this request may be tried again once its deadline has passed.
        let exclude = if wait.is_zero() { tried } else { &[] };
        self.claim(model, exclude, remaining).await.map(Some)
    }

    /// The secret this process would send for `lease` is the one the database row was synced with;
    /// otherwise another keyring synced the database since this process loaded its own, and sending
    /// would go out without a key or with an old one (and put a good key in error).
    fn check_secret(&self, lease: Option<&Lease>) -> Result<()> {
        let (Some(lease), Some(keyring)) = (lease, &self.keyring) else { return Ok(()) };
        let connector = &self.connector.name;
        let problem = match keyring.key(connector, lease.key_name()) {
            Some(key) if key.fingerprint().as_str() == lease.fingerprint() => return Ok(()),
            Some(_) => "has another secret for it",
            None => "has no such key",
        };
        Err(Error::KeyringDiffers {
            connector: connector.clone(),
            key: lease.key_name().to_owned(),
            path: keyring.path().to_owned(),
            problem,
        })
    }

    /// Sends the request with `lease`'s key and reads the answer: whole, or for a streaming request
    /// that got a 2xx, up to its first complete event.
    async fn attempt(&self, outgoing: &Outgoing, lease: Option<&Lease>) -> std::result::Result<Answer, NoAnswer> {
        let inner = self;
        let client = self.client();
        let url = format!("{}{}", inner.connector.base_url(), outgoing.path_and_query);
        // The connector's key header carries the pool key and nothing else: a value the caller left in it
        // (a client's own credential, under a header the gateway does not know) never goes upstream.
        let mut headers = outgoing.headers.clone();
        if let Ok(name) = HeaderName::from_bytes(inner.connector.key_header().0.as_bytes()) {
            headers.remove(name);
        }
        if let Some((name, value)) = self.key_header(lease) {
            headers.insert(name, value);
        }
        // The last trust check, after connection setup: see the `gate` module.
        let gate = lease.map(|lease| crate::gate::Gate::new(lease.trust()));
        let lease_lost = |lease: &Lease| NoAnswer::LeaseLost { key: lease.key_name().to_owned(), lease: lease.token() };
        let mut request = client.request(outgoing.method.clone(), url).headers(headers);
        if !outgoing.body.is_empty() {
            if !outgoing.headers.contains_key(CONTENT_TYPE) {
                request = request.header(CONTENT_TYPE, inner.connector.content_type());
            }
            request = match &gate {
                // A known length: the upstream acts on the request only once the gate released it all.
                Some(gate) => request
                    .header(reqwest::header::CONTENT_LENGTH, outgoing.body.len())
                    .body(gate.body(outgoing.body.clone())),
                None => request.body(outgoing.body.clone()),
            };
        } else if let (Some(gate), Some(lease)) = (&gate, lease)
            && !gate.is_open()
        {
            return Err(lease_lost(lease));
        }
        // The jongler's timeout, or what is left of the caller's deadline when that is sooner.
        let (timeout, whose) = match outgoing.deadline {
            Some(deadline) if deadline.saturating_duration_since(Instant::now()) < inner.timeout => {
                (deadline.saturating_duration_since(Instant::now()), "the caller's deadline")
            }
            _ => (inner.timeout, "the attempt's timeout"),
        };
        let late = |what: &str| NoAnswer::Late(format!("no {what} within {:.1} s ({whose})", timeout.as_secs_f64()));
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = if outgoing.stream.is_none() {
            // A whole answer has a total deadline, its body included (reqwest's, so that a timeout is
            // one kind of error); a stream has per-read ones (a long stream is fine) after its first event.
            request.timeout(timeout).send().await.map_err(|error| self.transport(outgoing, error, late("answer")))
        } else {
            match tokio::time::timeout_at(deadline, request.send()).await {
                Ok(sent) => sent.map_err(NoAnswer::Transport),
                Err(_) => Err(late("answer")),
            }
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(no_answer) => {
                return Err(match (&gate, lease) {
                    // The gate held the body back: nothing was sent.
                    (Some(gate), Some(lease)) if gate.refused() => lease_lost(lease),
                    _ => no_answer,
                });
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let is_event_stream = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        let limits = inner.limits;
        if outgoing.stream.is_none() || !(200..300).contains(&status) || !is_event_stream {
            // A whole answer's body is under reqwest's deadline; a stream request's other answer, ours.
            let body = if outgoing.stream.is_none() {
                read_whole(&mut response, limits.max_response).await.map_err(|no_answer| match no_answer {
                    NoAnswer::Transport(error) => self.transport(outgoing, error, late("whole answer")),
                    other => other,
                })?
            } else {
                tokio::time::timeout_at(deadline, read_whole(&mut response, limits.max_response))
                    .await
                    .map_err(|_| late("whole answer"))??
            };
            return Ok(Answer::Whole { status, headers, body });
        }
        let mut hold = FirstEventHold::new(limits.max_event);
        loop {
            let chunk = tokio::time::timeout_at(deadline, response.chunk()).await.map_err(|_| late("first event"))?;
            match chunk.map_err(NoAnswer::Transport)? {
                Some(chunk) => {
                    let first_data = match hold.push(chunk) {
                        Ok(None) => continue,
                        Ok(Some(first)) => first.data().unwrap_or_default(),
                        Err(_) => return Err(event_too_large(limits)),
                    };
                    // A first event that is an upstream error is that error's answer, as a whole one.
                    if crate::gateway::sse::is_error_event(&first_data) {
                        return Ok(error_answer(headers, first_data));
                    }
                    let held = Box::new(HeldStream { committed: hold.commit(), response });
                    return Ok(Answer::Stream { status, headers, held });
                }
                None => {
                    // Ended before any event: the whole body, judged like a non-streaming answer (an
                    // error written without its blank line), or as no answer at all.
                    let (_, last) = hold.finish();
                    let data = last.and_then(|event| event.data());
                    if let Some(data) = data.filter(|data| crate::gateway::sse::is_error_event(data)) {
                        return Ok(error_answer(headers, data));
                    }
                    return Err(NoAnswer::Stream("the stream ended before its first event".to_owned()));
                }
            }
        }
    }

    /// The verdict on an answer (or on its absence).
    fn judge(
        &self,
        answer: &std::result::Result<Answer, NoAnswer>,
        model: Option<&str>,
        lease: Option<&Lease>,
        backoffs: u32,
        replay: bool,
    ) -> Verdict {
        let context = Context {
            now_ms: self.coordinator.now_ms(),
            policy: &self.connector.policy,
            lockdown_count: lease.map_or(0, Lease::lockdown_count),
            retries: backoffs,
            via_tor: self.tor.is_some(),
            model,
            names_models: self.connector.names_models(),
        };
        match answer {
            Ok(Answer::Whole { status, headers, body }) => {
                classify::classify(*status, headers, &String::from_utf8_lossy(body), &context)
            }
            Ok(Answer::Stream { status, headers, .. }) => classify::classify(*status, headers, "", &context),
            // Not the key's fault, and nothing was processed upstream: another key may take it.
            Err(NoAnswer::LeaseLost { .. }) => Verdict { key: Fate::Release { success: false }, next: Next::OtherKey },
            // The same answer would be as large from any key.
            Err(NoAnswer::TooLarge(_)) => classify::unanswered(),
            Err(no_answer) if no_answer.may_have_reached() && !replay => classify::unanswered(),
            Err(_) => classify::transport_failure(&context),
        }
    }

    /// A transport error as the failure it stands for: reqwest's timeout of a request that may not be
    /// sent again is `late` (which says what it waited for and how long); anything else stays a
    /// transport error (a timeout that may be retried is reported as one, as it always was).
    fn transport(&self, outgoing: &Outgoing, error: reqwest::Error, late: NoAnswer) -> NoAnswer {
        if error.is_timeout() && !self.may_replay(outgoing) { late } else { NoAnswer::Transport(error) }
    }

    /// Whether `outgoing` may be sent again after it may have reached the upstream without an answer:
    /// an idempotent method (sending it twice does what sending it once does), or the caller allowed it
    /// (`JonglerBuilder::retry_timeouts`).
    fn may_replay(&self, outgoing: &Outgoing) -> bool {
        use reqwest::Method;
        self.retry_timeouts
            || [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE]
                .contains(&outgoing.method)
    }

    /// Applies the verdict to the key and records the attempt (in one transaction when the lease ends).
    async fn settle(
        &self,
        slot: &mut Option<Lease>,
        lease: Option<Lease>,
        verdict: &Verdict,
        attempt: Attempt,
        model: Option<&str>,
    ) -> Result<()> {
        let Some(mut lease) = lease else {
            let coordinator = self.coordinator.clone();
            return short_blocking(move || coordinator.store().record_attempt(&attempt)).await;
        };
        let fate = verdict.key.clone();
        let keep = self.scope == LeaseScope::PerConnection && matches!(fate, Fate::Release { .. });
        let coordinator = self.coordinator.clone();
        let model = model.map(str::to_owned);
        let settled = short_blocking(move || {
            if keep {
                coordinator.store().record_attempt(&attempt)?;
                if matches!(fate, Fate::Release { success: true }) {
                    lease.reset_escalation(model.as_deref())?;
                }
                Ok(Some(lease))
            } else {
                lease.finish(&fate, Some(&attempt)).map(|()| None)
            }
        })
        .await;
        match settled {
            Ok(kept) => {
                *slot = kept;
                Ok(())
            }
            // The key was reaped or cleaned up under us: its new state is not ours to touch. The caller
            // hears of it through the response.
            Err(error @ Error::LeaseLost { .. }) => {
                tracing::warn!(error = %error, "lease lost during a request");
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// The exchange for an answer that is returned as it is (a stream that was not committed is read
    /// to its end: its first event already said it failed).
    async fn exchange(&self, answer: Answer, summary: Summary) -> Exchange {
        let (key_name, attempts, model, timings, bookkeeping) = summary;
        let (status, headers, body) = match answer {
            Answer::Whole { status, headers, body } => (status, headers, body),
            Answer::Stream { status, headers, held } => {
                let mut bytes: Vec<u8> = held.committed.held.iter().flat_map(|chunk| chunk.iter().copied()).collect();
                let mut response = held.response;
                let deadline = tokio::time::Instant::now() + self.timeout;
                while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, response.chunk()).await {
                    if bytes.len() + chunk.len() > self.limits.max_response {
                        break;
                    }
                    bytes.extend_from_slice(&chunk);
                }
                (status, headers, Bytes::from(bytes))
            }
        };
        Exchange { status, headers, body: ExchangeBody::Full(body), key_name, attempts, model, timings, bookkeeping }
    }

    /// The connector's key header with `lease`'s secret, marked sensitive.
    fn key_header(&self, lease: Option<&Lease>) -> Option<(HeaderName, HeaderValue)> {
        let (lease, keyring) = (lease?, self.keyring.as_ref()?);
        let key = keyring.key(&self.connector.name, lease.key_name())?;
        let (header, prefix) = self.connector.key_header();
        let name = HeaderName::from_bytes(header.as_bytes()).ok()?;
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", key.secret().expose_secret())).ok()?;
        value.set_sensitive(true);
        Some((name, value))
    }

    /// Relays a committed stream from a task that owns its lease: the held bytes first, then each
    /// complete event as it arrives, with an idle timeout per read. The task settles the key when the
    /// stream ends, and stops (freeing the key, the attempt recorded as cancelled) when the reader goes.
    /// It watches the lease too: once it is lost (or its trust runs out), the stream ends with one
    /// error event, the upstream connection is closed, and the key is not touched (see `gate`).
    fn relay(
        self: &Arc<Self>,
        held: Box<HeldStream>,
        dialect: Dialect,
        lease: Option<Lease>,
        attempt: Attempt,
        sent: Instant,
    ) -> StreamingBody {
        let (sender, chunks) = mpsc::channel(RELAY_CHUNKS);
        let jongler = self.clone();
        tokio::spawn(async move {
            let mut relay = Relay::new(held.committed, dialect, jongler.limits);
            let trust = lease.as_ref().map(Lease::trust);
            let ending = relay.run(held.response, &sender, jongler.timeout, trust.as_ref()).await;
            let context_model = attempt.model.clone();
            let verdict = match &ending {
                Ending::UpstreamError(data) => {
                    let context = Context {
                        now_ms: jongler.coordinator.now_ms(),
                        policy: &jongler.connector.policy,
                        lockdown_count: lease.as_ref().map_or(0, Lease::lockdown_count),
                        retries: 0,
                        via_tor: jongler.tor.is_some(),
                        model: context_model.as_deref(),
                        names_models: jongler.connector.names_models(),
                    };
                    classify::classify(error_code(data), &HeaderMap::new(), data, &context)
                }
                Ending::Complete => Verdict { key: Fate::Release { success: true }, next: Next::Return },
                Ending::Broken(_) | Ending::TooLarge(_) | Ending::Cancelled | Ending::LeaseLost => {
                    Verdict { key: Fate::Release { success: false }, next: Next::Return }
                }
            };
            let outcome = match &ending {
                Ending::Complete => Outcome::SUCCESS,
                Ending::UpstreamError(_) => Outcome::StreamError(judged(&verdict)),
                Ending::Broken(_) => Outcome::StreamBroken,
                Ending::TooLarge(_) => Outcome::TooLarge,
                Ending::Cancelled => Outcome::Cancelled,
                Ending::LeaseLost => Outcome::LeaseLost,
            };
            if let Ending::Broken(problem) | Ending::TooLarge(problem) = &ending {
                tracing::warn!(connector = %attempt.connector, key = ?attempt.key_name, problem = %problem, "stream broke after its first event");
            }
            let attempt = Attempt { latency_ms: millis(sent.elapsed()), outcome, ..attempt };
            let Some(lease) = lease else {
                let coordinator = jongler.coordinator.clone();
                let _ = blocking(move || coordinator.store().record_attempt(&attempt)).await;
                return;
            };
            let fate = verdict.key;
            // A lost lease's end is fenced: the attempt is recorded, the key (someone else's) untouched.
            match blocking(move || lease.finish(&fate, Some(&attempt))).await {
                Err(Error::LeaseLost { .. }) if matches!(ending, Ending::LeaseLost) => {}
                Err(error) => tracing::warn!(error = %error, "could not settle the key of a finished stream"),
                Ok(()) => {}
            }
            // Only now does the reader see the end: a caller that sends its next request at once finds
            // the key free again.
            drop(sender);
        });
        StreamingBody { chunks }
    }
}

/// What an exchange returns besides its answer: key, attempts, model, timings, bookkeeping.
type Summary = (Option<String>, u32, Option<String>, Timings, Bookkeeping);

/// How a relayed stream ended.
#[derive(Debug)]
enum Ending {
    /// After a terminal event.
    Complete,
    /// With an upstream error event (its data), forwarded as it is.
    UpstreamError(String),
    /// Without a terminal event: the upstream failed, went idle or ended early (one error event of
    /// ours was sent).
    Broken(String),
    /// An event grew past the event limit (one error event of ours was sent).
    TooLarge(String),
    /// The reader went away.
    Cancelled,
    /// The lease was lost, or its trust ran out: the key may be someone else's now (one error event of
    /// ours was sent, and the upstream stream closed).
    LeaseLost,
}

/// The relay's state: the bytes not yet forwarded (at most one incomplete event) and what was seen.
///
/// Upstream bytes go out verbatim, whole events at a time. After a terminal event the rest still goes
/// out (OpenAI's usage chunk and `[DONE]`, other candidates' last chunks), except an upstream error
/// event, which would make an SDK throw the complete answer away; nothing of ours is added then. An
/// upstream error event before any terminal one goes out and ends the relay.
struct Relay {
    framer: Framer,
    dialect: Dialect,
    /// Bytes after the last forwarded one, starting at stream offset `unsent_from`. Events are judged
    /// from these bytes, so an event too long for the framer to keep is judged all the same.
    unsent: Vec<u8>,
    unsent_from: u64,
    /// Events forwarded.
    events: u64,
    /// A terminal event was forwarded: the answer is complete.
    complete: bool,
    /// An upstream error event was forwarded before any terminal one: its data.
    upstream_error: Option<String>,
    /// What the committed hold allows to forward at once.
    initial: Option<Bytes>,
    /// `unsent` never holds more than `limits.max_event` bytes plus one chunk: an event still
    /// incomplete past it ends the stream.
    limits: Limits,
}

impl Relay {
    fn new(committed: crate::gateway::sse::Committed, dialect: Dialect, limits: Limits) -> Self {
        let mut framer = committed.framer;
        // Events are judged from `unsent`: a second copy of each in the framer would double the memory.
        framer.set_max_event_len(0);
        let mut relay = Relay {
            framer,
            dialect,
            unsent: committed.held.iter().flat_map(|chunk| chunk.iter().copied()).collect(),
            unsent_from: 0,
            events: 0,
            complete: false,
            upstream_error: None,
            initial: None,
            limits,
        };
        relay.initial = relay.see(&committed.events);
        relay
    }

    /// Takes note of complete events; returns the bytes to forward now (through the last complete
    /// event, less an upstream error event after a terminal one).
    fn see(&mut self, events: &[Event]) -> Option<Bytes> {
        let mut out = Vec::new();
        let mut through = None;
        for event in events {
            let range = event.range();
            let start = usize::try_from(range.start.saturating_sub(self.unsent_from)).unwrap_or(usize::MAX);
            let end = usize::try_from(range.end - self.unsent_from).unwrap_or(usize::MAX).min(self.unsent.len());
            let bytes = &self.unsent[start.min(end)..end];
            through = Some(range.end);
            if self.upstream_error.is_some() {
                break;
            }
            let data = crate::gateway::sse::event_data(bytes);
            if let Some(data) = data.as_deref().filter(|data| crate::gateway::sse::is_error_event(data)) {
                if self.complete {
                    tracing::warn!("upstream error event after a complete stream; not forwarded");
                    continue;
                }
                self.upstream_error = Some(data.to_owned());
            } else if data.is_some_and(|data| crate::gateway::sse::is_terminal(self.dialect, &data)) {
                self.complete = true;
            }
            self.events += 1;
            out.extend_from_slice(bytes);
        }
        let through = through?;
        let take = usize::try_from(through - self.unsent_from).unwrap_or(usize::MAX).min(self.unsent.len());
        self.unsent.drain(..take);
        self.unsent_from = through;
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// Hands `bytes` to the reader; false when it went away or stopped reading for `idle`.
    async fn forward(sender: &mpsc::Sender<Bytes>, bytes: Bytes, idle: Duration) -> bool {
        matches!(tokio::time::timeout(idle, sender.send(bytes)).await, Ok(Ok(())))
    }

    /// Forwards the stream until it ends; returns how.
    async fn run(
        &mut self,
        mut response: reqwest::Response,
        sender: &mpsc::Sender<Bytes>,
        idle: Duration,
        trust: Option<&crate::gate::Trust>,
    ) -> Ending {
        if let Some(bytes) = self.initial.take()
            && !Self::forward(sender, bytes, idle).await
        {
            return Ending::Cancelled;
        }
        loop {
            if let Some(data) = self.upstream_error.take() {
                return Ending::UpstreamError(data);
            }
            let read = tokio::select! {
                read = tokio::time::timeout(idle, response.chunk()) => read,
                () = sender.closed() => return Ending::Cancelled,
                () = lease_lost(trust) => {
                    // Stop reading at once: dropping the response closes the upstream stream.
                    drop(response);
                    return self.end_for_lost_lease(sender, idle, trust).await;
                }
            };
            let problem = match read {
                Ok(Ok(Some(chunk))) => {
                    self.unsent.extend_from_slice(&chunk);
                    let events = self.framer.push(&chunk);
                    if let Some(bytes) = self.see(&events)
                        && !Self::forward(sender, bytes, idle).await
                    {
                        return Ending::Cancelled;
                    }
                    if self.unsent.len() > self.limits.max_event && !self.complete {
                        let problem = event_too_large(self.limits).to_string();
                        return self.end_with_error(sender, idle, http::StatusCode::BAD_GATEWAY, &problem, true).await;
                    }
                    if self.unsent.len() > self.limits.max_event {
                        // After a complete answer nothing of ours is added: the rest is dropped.
                        tracing::warn!("an oversized upstream event after a complete stream; not forwarded");
                        return Ending::Complete;
                    }
                    continue;
                }
                // The end of a complete answer: what is left (the LF of a last CRLF that came alone)
                // goes out too.
                Ok(Ok(None)) if self.complete => {
                    let rest = Bytes::from(std::mem::take(&mut self.unsent));
                    if !rest.is_empty() && !Self::forward(sender, rest, idle).await {
                        return Ending::Cancelled;
                    }
                    return Ending::Complete;
                }
                _ if self.complete => return Ending::Complete,
                Ok(Ok(None)) => format!("upstream stream ended after {} events without its last one", self.events),
                Ok(Err(error)) if error.is_timeout() => {
                    format!("upstream stream idle for {:.0} s after {} events", idle.as_secs_f64(), self.events)
                }
                Ok(Err(error)) => {
                    format!("upstream stream broke after {} events ({})", self.events, without_url(&error))
                }
                Err(_) => format!("upstream stream idle for {:.0} s after {} events", idle.as_secs_f64(), self.events),
            };
            return self.end_with_error(sender, idle, http::StatusCode::SERVICE_UNAVAILABLE, &problem, false).await;
        }
    }

    /// Ends the stream with one error event of ours; returns the ending it stands for.
    async fn end_with_error(
        &mut self,
        sender: &mpsc::Sender<Bytes>,
        idle: Duration,
        status: http::StatusCode,
        problem: &str,
        too_large: bool,
    ) -> Ending {
        // Line endings left over (the LF of a CRLF) go first, so our event starts on a line of its
        // own; a half-sent event's bytes never go out.
        let mut event = if self.unsent.iter().all(|byte| matches!(byte, b'\r' | b'\n')) {
            std::mem::take(&mut self.unsent)
        } else {
            self.unsent = Vec::new();
            Vec::new()
        };
        event.extend_from_slice(&self.dialect.stream_error_event(status, problem));
        if !Self::forward(sender, Bytes::from(event), idle).await {
            return Ending::Cancelled;
        }
        if too_large { Ending::TooLarge(problem.to_owned()) } else { Ending::Broken(problem.to_owned()) }
    }
}

/// A whole answer's body, refused as soon as it is known to pass `max` bytes (from its
/// `Content-Length`, or from the bytes read): never more than `max` plus one chunk is held.
async fn read_whole(response: &mut reqwest::Response, max: usize) -> std::result::Result<Bytes, NoAnswer> {
    let too_large = || {
        NoAnswer::TooLarge(format!(
            "the upstream's answer is larger than {max} bytes; raise the limit (APIJONGLER_MAX_RESPONSE, or \
             max_response) if such an answer is legitimate"
        ))
    };
    if response.content_length().is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(NoAnswer::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// A transport error with its innermost cause (`error sending request (connection reset by peer)`), and
/// no URL.
fn innermost(error: &reqwest::Error) -> String {
    let text = without_url(error);
    let mut innermost = None;
    let mut cause = std::error::Error::source(error);
    while let Some(source) = cause {
        innermost = Some(source);
        cause = source.source();
    }
    match innermost {
        Some(cause) => format!("{text} ({cause})"),
        None => text,
    }
}

/// A stream event longer than the limit: the attempt fails (before commit) or the stream ends (after).
fn event_too_large(limits: Limits) -> NoAnswer {
    NoAnswer::TooLarge(format!(
        "an upstream event is larger than {} bytes; raise the limit (APIJONGLER_MAX_EVENT, or max_event) if such \
         an event is legitimate",
        limits.max_event
    ))
}

impl Relay {
    /// Ends a stream whose lease is no longer trusted with one error event of ours (after whole events
    /// only, as any broken stream).
    async fn end_for_lost_lease(
        &mut self,
        sender: &mpsc::Sender<Bytes>,
        idle: Duration,
        trust: Option<&crate::gate::Trust>,
    ) -> Ending {
        let why = if trust.is_some_and(crate::gate::Trust::is_known_lost) {
            "was taken away (reaped or cleaned up)"
        } else {
            "could not be confirmed in time"
        };
        let problem = format!("the key's lease {why} after {} events; the stream was stopped", self.events);
        tracing::warn!(problem = %problem, "stream stopped: lease no longer trusted");
        if self.complete {
            // The answer is whole already: nothing of ours after it.
            return Ending::Complete;
        }
        let mut event = if self.unsent.iter().all(|byte| matches!(byte, b'\r' | b'\n')) {
            std::mem::take(&mut self.unsent)
        } else {
            Vec::new()
        };
        event.extend_from_slice(&self.dialect.stream_error_event(http::StatusCode::SERVICE_UNAVAILABLE, &problem));
        if !Self::forward(sender, Bytes::from(event), idle).await {
            return Ending::Cancelled;
        }
        Ending::LeaseLost
    }
}

/// Resolves once the lease behind `trust` is no longer trusted; never without a lease.
async fn lease_lost(trust: Option<&crate::gate::Trust>) {
    match trust {
        Some(trust) => trust.lost().await,
        None => std::future::pending().await,
    }
}

/// An in-band error event (`data: {"error": ...}`) in place of a stream's first event, as the whole
/// answer it stands for: its `error.code` as the status, its JSON as the body.
fn error_answer(mut headers: HeaderMap, data: String) -> Answer {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.remove(reqwest::header::CONTENT_LENGTH);
    Answer::Whole { status: error_code(&data), headers, body: Bytes::from(data) }
}

/// The status an in-band error event carries (`error.code`), else 500.
fn error_code(data: &str) -> u16 {
    serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|json| json["error"]["code"].as_u64())
        .and_then(|code| u16::try_from(code).ok())
        .filter(|code| (400..600).contains(code))
        .unwrap_or(500)
}

/// What an attempt came to, for the `requests` table.
fn describe(verdict: &Verdict, answer: &std::result::Result<Answer, NoAnswer>) -> Outcome {
    match answer {
        Err(NoAnswer::Transport(error)) if error.is_timeout() => Outcome::Timeout,
        Err(NoAnswer::Transport(_)) => Outcome::ConnectionError,
        Err(NoAnswer::Late(_)) => Outcome::Timeout,
        Err(NoAnswer::Stream(_)) => Outcome::StreamFailed,
        Err(NoAnswer::LeaseLost { .. }) => Outcome::NotSent,
        Err(NoAnswer::TooLarge(_)) => Outcome::TooLarge,
        Ok(_) => Outcome::Answered(judged(verdict)),
    }
}

/// What an answer that came was judged to be.
fn judged(verdict: &Verdict) -> Judged {
    match &verdict.key {
        Fate::Release { success: true } => Judged::Success,
        Fate::Lockdown(_) => Judged::RateLimited,
        Fate::Error { .. } => Judged::BadKey,
        Fate::Release { success: false } => match verdict.next {
            Next::Backoff { .. } => Judged::ProviderError,
            Next::NewCircuit => Judged::LocationRefused,
            _ => Judged::ClientError,
        },
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A lease while its request is on the wire. Dropped there (the request future was cancelled: SIGINT,
/// a client that went away), it gives the key back and records the attempt as cancelled, off this
/// thread (see `Lease::end_later`).
struct InFlight {
    lease: Option<Lease>,
    cancelled: Attempt,
    sent: Instant,
}

impl InFlight {
    /// The send finished: the lease goes on to be settled by the verdict.
    fn landed(mut self) -> Option<Lease> {
        self.lease.take()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let mut attempt = self.cancelled.clone();
            attempt.latency_ms = millis(self.sent.elapsed());
            tracing::info!(key = %lease.key_name(), "request cancelled; giving the key back");
            lease.end_later(Fate::Release { success: false }, Some(attempt));
        }
    }
}

/// An HTTP client, through `tor_proxy` with fresh random credentials if given.
pub(crate) fn build_client(tor_proxy: Option<&str>, timeout: Duration) -> Result<reqwest::Client> {
    // No total timeout: a stream may last long. Each whole answer gets its own (see `exchange`); reads
    // of a stream get this one each.
    let mut builder = reqwest::Client::builder().connect_timeout(timeout).read_timeout(timeout).no_proxy();
    if let Some(proxy) = tor_proxy {
        let isolated = proxy.replacen("://", &format!("://apijongler-{:016x}:circuit@", fastrand::u64(..)), 1);
        let proxy = reqwest::Proxy::all(&isolated).map_err(|_| Error::InvalidRequest {
            problem: format!("'{proxy}' is not a proxy URL (check {TOR_PROXY_ENV})"),
        })?;
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(|error| Error::InvalidRequest { problem: format!("cannot build the HTTP client: {error}") })
}

/// A transport error's text without its URL (which names the upstream host, never a secret, but is
/// noise in a one-line message).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" ({url})"), "").replace(url.as_str(), "");
    }
    text
}
