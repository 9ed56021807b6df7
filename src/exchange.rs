//! Sending one request through the pool: the path the library, the CLI and the gateway share.
//!
//! `Jongler::send` runs [`Upstream::send`], a composition of named steps, each owning one decision
//! and living in a module of its own:
//! - `begin`: what the request is (its model, its wait, whether it may be sent again) and its
//!   [`budget::RetryBudget`], which owns the counters: attempts, backoff retries, Tor circuits,
//!   untrusted claims.
//! - `pin_for` ([`affinity`]): the owner of a resource the request names (a file, a cached content...),
//!   whose quota scope every claim of the request is then pinned to.
//! - `lease_for_next_attempt` ([`keys`]): a key for the request's model (or the one held per
//!   connection), confirmed when its trust ran out before it is used, checked against the keyring.
//! - `try_once`: the attempt ([`attempt`]) sends the bytes with the key and reads the answer (the
//!   whole body, or for a stream the bytes up to its first complete event, within a first-event
//!   deadline), guarded while on the wire ([`in_flight`]); its verdict ([`verdict`], the `classify`
//!   policy) and its outcome for the `requests` table; `learn` ([`affinity`]) records the resources a
//!   successful answer created as its key's.
//! - `hand_over_stream`: a committed stream goes to a task that owns the lease until the stream ends,
//!   and settles the key by how it ended ([`relay`]).
//! - `settle` ([`verdict`]) applies the verdict to the key and records the attempt, in one
//!   transaction; `note_settled` keeps what the caller must hear of it ([`Bookkeeping`]).
//! - `next_step`: retry (after a pause, through a new circuit) or not, within the budget and the
//!   caller's deadline; `conclude`: the last answer, or the error that stands for its absence.
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
//! - Memory ([`limits`]): a whole answer is read up to `max_response` bytes and a stream event up to
//!   `max_event` bytes, the first one before the commit and every later one in the relay. Past them
//!   the attempt fails (after the commit: one error event), without blaming the key and without
//!   another key.
//!
//! This module depends on the coordinator, the lease and the pool's vocabulary below it, never on the
//! `jongler` facade above it.

mod affinity;
mod attempt;
mod budget;
mod client;
mod in_flight;
mod keys;
mod limits;
mod outgoing;
mod relay;
mod reply;
mod suspicion;
mod verdict;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::attempt::{Answer, NoAnswer, innermost};
use self::budget::{Retry, RetryBudget};
use self::in_flight::{InFlight, millis};
use self::keys::Aside;
use self::suspicion::Suspicion;
use self::verdict::describe;
use crate::classify::{Next, Verdict};
use crate::connector::Connector;
use crate::coordinator::Coordinator;
use crate::error::{Error, Result};
use crate::keyring::Keyring;
use crate::lease::Lease;
use crate::pool::outcome::Outcome;
use crate::pool::{Attempt, Fate};
use crate::stream::Dialect;

pub(crate) use self::client::{TOR_PROXY_ENV, build_client};
pub(crate) use self::limits::Limits;
pub use self::outgoing::Outgoing;
pub use self::reply::{Bookkeeping, Exchange, ExchangeBody, StreamingBody, Timings};

/// How long a key is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseScope {
    /// Claimed for one request, released after it (default).
    #[default]
    PerRequest,
    /// Claimed at connect and kept until it goes to lockdown or error, or until disconnect.
    PerConnection,
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

/// What the caller hears when a request that may have reached the upstream is not sent again.
const NOT_SENT_AGAIN: &str = "not sent again, since the upstream may have generated (and billed) it; allow that \
                              with retry_timeouts (--retry-timeouts), which may pay twice";

/// One request's state across its attempts.
#[derive(Debug)]
struct Progress {
    /// The endpoint, without its query string (for the history and errors).
    path: String,
    /// The model the request names, if the connector can tell.
    model: Option<String>,
    /// Quotas meter the request (a generation), so a lockdown of its model keeps it from a key; a
    /// request they do not meter (listing, getting a model, counting tokens) is claimed for no model.
    metered: bool,
    /// The owner of a resource the request names, whose quota scope every claim is pinned to.
    pin: Option<crate::resource::Owner>,
    /// Its estimated input tokens, which claims reserve against token limits (0 where none binds).
    tokens: u64,
    started: Instant,
    /// The caller's deadline for the whole request.
    deadline: Option<Instant>,
    /// How long the request may wait for keys, over all its attempts.
    wait: Duration,
    /// The request may be sent again after it may have reached the upstream without an answer.
    replay: bool,
    budget: RetryBudget,
    /// Keys put aside by this request (tried once each when it does not wait).
    tried: Vec<String>,
    /// The key of the last attempt.
    key_name: Option<String>,
    /// What the request learned about the credentials of the keys it tried.
    suspicion: Suspicion,
    bookkeeping: Bookkeeping,
    timings: Timings,
}

impl Progress {
    /// An error when the caller's deadline passed before the next attempt could start.
    fn ensure_time_left(&self, connector: &str) -> Result<()> {
        if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(Error::Stream {
                connector: connector.to_owned(),
                endpoint: self.path.clone(),
                attempts: self.budget.attempts(),
                problem: "the caller's deadline passed before an attempt could start".to_owned(),
            });
        }
        Ok(())
    }

    /// No retry that would start after the caller's deadline: the last answer is returned instead.
    fn within_deadline(&self, retry: Retry) -> Retry {
        let past = |pause: Duration| self.deadline.is_some_and(|deadline| Instant::now() + pause >= deadline);
        match retry {
            Retry::After(pause) if past(pause) => Retry::No,
            Retry::NewCircuit if past(Duration::ZERO) => Retry::No,
            retry => retry,
        }
    }

    /// Takes note of how settling an attempt went: a lease lost along the way is the caller's to hear
    /// of through the exchange; any other failure to record is returned, so that the answer (if one
    /// came: its quota is spent) is handed over as it is.
    fn note_settled(&mut self, settled: Result<()>, answer: &std::result::Result<Answer, NoAnswer>) -> Result<()> {
        match settled {
            Ok(()) => Ok(()),
            // Refused by the gate: the key is someone else's, but nothing was sent with it.
            Err(Error::LeaseLost { .. }) if matches!(answer, Err(NoAnswer::LeaseLost { .. })) => Ok(()),
            Err(Error::LeaseLost { key, .. }) => {
                self.bookkeeping = Bookkeeping::LeaseLost { key };
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// Whether a key other than the request's own suspect may come free within `hold` of `now_ms`: another
/// key is held (the suspect is one of the held keys), or a lockdown ends by then.
fn may_come_within(availability: &crate::pool::Availability, now_ms: i64, hold: Duration) -> bool {
    let hold_ms = i64::try_from(hold.as_millis()).unwrap_or(i64::MAX);
    availability.locked > 1
        || availability.earliest_lockdown_end.is_some_and(|end| end <= now_ms.saturating_add(hold_ms))
}

/// Where a request keeps its key between attempts: the jongler's own slot (per connection; its lock
/// held, so that requests through one jongler take turns) or the request's.
enum KeySlot<'a> {
    Connection(tokio::sync::MutexGuard<'a, Option<Lease>>),
    Request(Option<Lease>),
}

impl KeySlot<'_> {
    fn get(&mut self) -> &mut Option<Lease> {
        match self {
            KeySlot::Connection(held) => held,
            KeySlot::Request(lease) => lease,
        }
    }
}

/// One attempt's result: the answer (or why none came), its verdict, its record for the `requests`
/// table, and its lease, still to be settled.
struct Tried {
    answer: std::result::Result<Answer, NoAnswer>,
    verdict: Verdict,
    attempt: Attempt,
    lease: Option<Lease>,
    sent: Instant,
}

impl Tried {
    /// A stream whose first event is good is committed: its lease goes to the relay.
    fn commits(&self) -> bool {
        matches!((&self.answer, &self.verdict.key), (Ok(Answer::Stream { .. }), Fate::Release { success: true }))
    }
}

impl Upstream {
    /// Sends `outgoing` (see `Jongler::send`): attempts until an answer is returned, a stream is
    /// committed, or an error ends the request.
    pub(crate) async fn send(self: &Arc<Self>, outgoing: Outgoing) -> Result<Exchange> {
        let mut request = self.begin(&outgoing)?;
        request.pin = self.pin_for(&outgoing).await?;
        let mut slot = self.key_slot().await;
        loop {
            request.ensure_time_left(&self.connector.name)?;
            let lease = match self.lease_for_next_attempt(&outgoing, &mut request, slot.get()).await {
                Ok(lease) => lease,
                // No other key to weigh a suspect's answer against: the caller gets that answer.
                Err(Error::NoKeyAvailable(_)) if let Some(suspect) = request.suspicion.suspect() => {
                    let answer = suspect.answer();
                    self.let_go(&mut request).await;
                    return Ok(self.exchange(answer, request).await);
                }
                // The caller waited since the request began, not only since this claim.
                Err(Error::DatabaseLocked { path, operation, .. }) => {
                    return Err(Error::DatabaseLocked { path, operation, waited: request.started.elapsed() });
                }
                Err(error) => return Err(error),
            };
            let mut tried = self.try_once(&outgoing, &mut request, lease).await;
            if let Ok(answer) = &tried.answer {
                self.learn(&outgoing, request.key_name.as_deref(), answer).await;
            }
            let weighed = request.suspicion.weigh(&mut tried);
            self.act_on(weighed, &mut request).await;
            if tried.commits() {
                return Ok(self.hand_over_stream(&outgoing, request, tried));
            }
            let Tried { answer, verdict, attempt, lease, .. } = tried;
            let settled = self.settle(slot.get(), lease, &verdict, attempt, request.model.as_deref()).await;
            if let Err(unrecorded) = request.note_settled(settled, &answer) {
                return self.answer_unrecorded(answer, request, unrecorded).await;
            }
            match self.next_step(&outgoing, &mut request, &verdict) {
                Retry::After(pause) => {
                    // A backoff follows a 5xx or no answer, which teach nothing about a suspect: it is
                    // kept through a pause within its hold, not through a longer one (`suspicion`).
                    if pause > suspicion::HOLD {
                        self.let_go(&mut request).await;
                    }
                    tokio::time::sleep(pause).await;
                }
                Retry::NewCircuit => self.new_circuit()?,
                Retry::No => {
                    self.let_go(&mut request).await;
                    return self.conclude(answer, request).await;
                }
            }
        }
    }

    /// What the request is: its endpoint and model, its wait (a caller's deadline bounds it too),
    /// whether it may be sent again, and its retry budget.
    fn begin(&self, outgoing: &Outgoing) -> Result<Progress> {
        let connector = &self.connector;
        crate::upstream_url::upstream_url(&connector.base_url(), &outgoing.path_and_query)?;
        let started = Instant::now();
        let deadline = outgoing.deadline;
        let wait = outgoing.wait.unwrap_or(self.wait);
        let wait = deadline.map_or(wait, |deadline| wait.min(deadline.saturating_duration_since(started)));
        let keys = self.keyring.as_ref().map_or(0, |keyring| keyring.keys(&connector.name).map_or(0, <[_]>::len));
        Ok(Progress {
            path: outgoing.path_and_query.split(['?', '#']).next().unwrap_or_default().to_owned(),
            model: connector.model_of(&outgoing.path_and_query, &outgoing.body),
            metered: connector.meters(&outgoing.method, &outgoing.path_and_query),
            pin: None,
            tokens: self.estimate_tokens(outgoing),
            started,
            deadline,
            wait,
            replay: self.may_replay(outgoing),
            budget: RetryBudget::new(keys, connector.policy.retries),
            tried: Vec::new(),
            key_name: None,
            suspicion: Suspicion::default(),
            bookkeeping: Bookkeeping::Recorded,
            timings: Timings::default(),
        })
    }

    /// The input tokens `outgoing` will likely cost, where a token limit may pace its connector's
    /// claims (elsewhere its body is not read for it).
    fn estimate_tokens(&self, outgoing: &Outgoing) -> u64 {
        if self.coordinator.backend().paces_tokens(&self.connector.name, self.coordinator.now_ms()) {
            crate::tokens::estimate(&outgoing.body)
        } else {
            0
        }
    }

    /// The request's key slot (see [`KeySlot`]).
    async fn key_slot(&self) -> KeySlot<'_> {
        match self.scope {
            LeaseScope::PerConnection => KeySlot::Connection(self.held.lock().await),
            LeaseScope::PerRequest => KeySlot::Request(None),
        }
    }

    /// The key of the next attempt (none for a keyless request), its wait counted, checked against
    /// the keyring; the attempt is counted.
    async fn lease_for_next_attempt(
        &self,
        outgoing: &Outgoing,
        request: &mut Progress,
        slot: &mut Option<Lease>,
    ) -> Result<Option<Lease>> {
        let claiming = Instant::now();
        let lease = if outgoing.without_key {
            None
        } else {
            match self.lease_beside_suspect(request, slot).await? {
                Some(lease) => Some(lease),
                None => {
                    let model = request.model.as_deref().filter(|_| request.metered);
                    let (wanted, wait) = ((model, request.pin.as_ref(), request.tokens), request.wait);
                    let aside = Aside { tried: &request.tried, suspected: request.suspicion.suspected() };
                    self.next_lease(slot, wanted, aside, request.started, wait, &mut request.budget).await?
                }
            }
        };
        request.timings.claiming += claiming.elapsed();
        self.check_secret(lease.as_ref())?;
        request.budget.attempt();
        request.key_name = lease.as_ref().map(|lease| lease.key_name().to_owned());
        Ok(lease)
    }

    /// While the request keeps a suspect's lease, another key that comes within [`suspicion::HOLD`];
    /// `None` (and the suspect let go) when none does, or when there is no suspect.
    async fn lease_beside_suspect(&self, request: &mut Progress, slot: &mut Option<Lease>) -> Result<Option<Lease>> {
        if request.suspicion.echoed() {
            // Two keys gave the same answer: one more key, only if one is free at once; else the request
            // ends with that answer (the send loop's `NoKeyAvailable` arm).
            let model = request.model.as_deref().filter(|_| request.metered);
            let suspected = request.suspicion.suspected();
            let at_once = Aside { tried: suspected, suspected };
            let wanted = (model, request.pin.as_ref(), request.tokens);
            return self.next_lease(slot, wanted, at_once, Instant::now(), Duration::ZERO, &mut request.budget).await;
        }
        let remaining = request.wait.saturating_sub(request.started.elapsed());
        if !request.suspicion.holds() || remaining.is_zero() {
            self.let_go(request).await;
            return Ok(None);
        }
        let model = request.model.as_deref().filter(|_| request.metered);
        let wanted = (model, request.pin.as_ref(), request.tokens);
        let suspected = request.suspicion.suspected();
        let hold = remaining.min(suspicion::HOLD);
        // First without waiting: when no key is free and none but the suspect itself is held (nor a
        // lockdown ends within the hold), only the suspect could come free, and it never does for this
        // request. Waiting would cost the caller the whole hold for nothing.
        let now = Instant::now();
        let at_once = Aside { tried: suspected, suspected };
        let waited = match self.next_lease(slot, wanted, at_once, now, Duration::ZERO, &mut request.budget).await {
            Err(Error::NoKeyAvailable(unavailable))
                if may_come_within(&unavailable.availability, self.coordinator.now_ms(), hold) =>
            {
                let aside = Aside { tried: &request.tried, suspected };
                self.next_lease(slot, wanted, aside, now, hold, &mut request.budget).await
            }
            claimed => claimed,
        };
        match waited {
            Ok(lease) => Ok(lease),
            Err(Error::NoKeyAvailable(_)) => {
                self.let_go(request).await;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// One attempt with `lease`, guarded while on the wire, and its verdict and outcome.
    async fn try_once(&self, outgoing: &Outgoing, request: &mut Progress, lease: Option<Lease>) -> Tried {
        let cancelled = Attempt {
            at: self.coordinator.now_ms(),
            connector: self.connector.name.clone(),
            key_name: request.key_name.clone(),
            method: outgoing.method.to_string(),
            endpoint: request.path.clone(),
            status: None,
            latency_ms: 0,
            outcome: Outcome::Cancelled,
            model: request.model.clone(),
            prompt_tokens: None,
        };
        let sent = Instant::now();
        let in_flight = InFlight { lease, cancelled: cancelled.clone(), sent };
        let answer = self.attempt(outgoing, in_flight.lease.as_ref()).await;
        request.timings.upstream = sent.elapsed();
        let lease = in_flight.landed();
        let model = request.model.as_deref();
        let verdict = self.judge(&answer, model, lease.as_ref(), request.budget.backoffs(), request.replay);
        let attempt = Attempt {
            status: answer.as_ref().ok().map(Answer::status),
            // Read only where a token limit binds (the request was estimated): elsewhere nobody needs it.
            prompt_tokens: answer.as_ref().ok().filter(|_| request.tokens > 0).and_then(Answer::prompt_tokens),
            latency_ms: millis(sent.elapsed()),
            outcome: describe(&verdict, &answer),
            ..cancelled
        };
        tracing::debug!(
            connector = %attempt.connector, key = ?attempt.key_name, status = ?attempt.status,
            latency_ms = attempt.latency_ms, outcome = %attempt.outcome, attempt = request.budget.attempts(),
            "upstream attempt"
        );
        Tried { answer, verdict, attempt, lease, sent }
    }

    /// The exchange of a committed stream: its relay owns the lease from here on.
    fn hand_over_stream(self: &Arc<Self>, outgoing: &Outgoing, request: Progress, tried: Tried) -> Exchange {
        let Ok(Answer::Stream { status, headers, held }) = tried.answer else { unreachable!("a committed stream") };
        let dialect = outgoing.stream.unwrap_or(Dialect::Google);
        let attempt = Attempt { prompt_tokens: (request.tokens > 0).then_some(0), ..tried.attempt };
        let body = self.relay(held, dialect, tried.lease, attempt, tried.sent);
        Exchange {
            status,
            headers,
            body: ExchangeBody::Stream(body),
            key_name: request.key_name,
            attempts: request.budget.attempts(),
            model: request.model,
            timings: request.timings,
            bookkeeping: request.bookkeeping,
        }
    }

    /// An answer whose consequences could not be recorded is the caller's all the same (its quota is
    /// spent), marked so; without an answer, the failure to record is the request's error.
    async fn answer_unrecorded(
        &self,
        answer: std::result::Result<Answer, NoAnswer>,
        mut request: Progress,
        unrecorded: Error,
    ) -> Result<Exchange> {
        match answer {
            Ok(answer) => {
                request.bookkeeping = Bookkeeping::NotRecorded { problem: unrecorded.to_string() };
                Ok(self.exchange(answer, request).await)
            }
            Err(_) => Err(unrecorded),
        }
    }

    /// Whether and how to try again after `verdict`: within the budget and the caller's deadline.
    fn next_step(&self, outgoing: &Outgoing, request: &mut Progress, verdict: &Verdict) -> Retry {
        let retry = if outgoing.without_key {
            Retry::No
        } else {
            request.budget.follow(&verdict.next, self.tor.is_some(), self.timeout)
        };
        if verdict.next == Next::OtherKey {
            request.tried.extend(request.key_name.clone());
        }
        request.within_deadline(retry)
    }

    /// The end of a request that is not tried again: its last answer, or the error that stands for
    /// its absence.
    async fn conclude(&self, answer: std::result::Result<Answer, NoAnswer>, request: Progress) -> Result<Exchange> {
        match answer {
            Ok(answer) => Ok(self.exchange(answer, request).await),
            Err(no_answer) => Err(self.no_answer_error(no_answer, &request)),
        }
    }

    /// The error for a request whose last attempt got no answer.
    fn no_answer_error(&self, no_answer: NoAnswer, request: &Progress) -> Error {
        let (connector, endpoint, attempts) =
            (self.connector.name.clone(), request.path.clone(), request.budget.attempts());
        match no_answer {
            NoAnswer::Transport(error) if request.replay || error.is_connect() => {
                Error::Transport { connector, endpoint, attempts, source: Box::new(error.without_url()) }
            }
            NoAnswer::LeaseLost { key, lease } => Error::LeaseLost { connector, key, lease },
            no_answer => {
                let problem = match &no_answer {
                    NoAnswer::TooLarge(_) | NoAnswer::Stream(_) => no_answer.to_string(),
                    _ if request.replay => no_answer.to_string(),
                    NoAnswer::Transport(error) => {
                        format!("{}, after the request was sent; {NOT_SENT_AGAIN}", innermost(error))
                    }
                    _ => format!("{no_answer}; {NOT_SENT_AGAIN}"),
                };
                Error::Stream { connector, endpoint, attempts, problem }
            }
        }
    }

    /// The exchange for an answer that is returned as it is (a stream that was not committed is read
    /// to its end: its first event already said it failed).
    /// An error answer with every secret of the pool it repeats blanked out: some upstreams echo the
    /// key they refused (`Consumer 'api_key:…' has been suspended`), and the caller (a gateway client
    /// that knows only the gateway token) must not learn it.
    fn without_secrets(&self, body: Bytes) -> Bytes {
        use secrecy::ExposeSecret;
        let (Some(keyring), Ok(text)) = (&self.keyring, std::str::from_utf8(&body)) else { return body };
        let Ok(keys) = keyring.keys(&self.connector.name) else { return body };
        let mut text = std::borrow::Cow::Borrowed(text);
        for key in keys {
            let secret = key.secret().expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = std::borrow::Cow::Owned(text.replace(secret, "[key withheld by apijongler]"));
            }
        }
        match text {
            std::borrow::Cow::Borrowed(_) => body,
            std::borrow::Cow::Owned(text) => Bytes::from(text),
        }
    }

    async fn exchange(&self, answer: Answer, request: Progress) -> Exchange {
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
        let body = if (200..300).contains(&status) { body } else { self.without_secrets(body) };
        Exchange {
            status,
            headers,
            body: ExchangeBody::Full(body),
            key_name: request.key_name,
            attempts: request.budget.attempts(),
            model: request.model,
            timings: request.timings,
            bookkeeping: request.bookkeeping,
        }
    }
}
