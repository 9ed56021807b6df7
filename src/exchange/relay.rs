//! A committed stream relayed to its reader by a task that owns the lease until the stream ends, and
//! settles the key by how it ended.
//!
//! Invariants: bytes go out verbatim, whole events at a time, so an error event of ours never lands in
//! the middle of a half-sent one; after a terminal event (or an upstream error event) nothing of ours
//! is added, nor ever to a stream whose dialect cannot judge its end (`Dialect::Plain`: it ends when
//! the upstream ends it); a lost lease stops the stream and leaves the key (someone else's) untouched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderMap;
use tokio::sync::mpsc;

use super::attempt::{HeldStream, error_code};
use super::client::without_url;
use super::in_flight::millis;
use super::limits::{Limits, event_too_large};
use super::verdict::judged;
use super::{StreamingBody, Upstream};
use crate::classify::{self, Next, Verdict};
use crate::error::Error;
use crate::lease::Lease;
use crate::offload::blocking;
use crate::pool::outcome::Outcome;
use crate::pool::{Attempt, Fate};
use crate::stream::Dialect;
use crate::stream::sse::{Event, Framer};

/// How many chunks a relayed stream may run ahead of its reader.
const RELAY_CHUNKS: usize = 16;

impl Upstream {
    /// Relays a committed stream from a task that owns its lease: the held bytes first, then each
    /// complete event as it arrives, with an idle timeout per read. The task settles the key when the
    /// stream ends, and stops (freeing the key, the attempt recorded as cancelled) when the reader goes.
    /// It watches the lease too: once it is lost (or its trust runs out), the stream ends with one
    /// error event, the upstream connection is closed, and the key is not touched (see `gate`).
    pub(super) fn relay(
        self: &Arc<Self>,
        held: Box<HeldStream>,
        dialect: Dialect,
        lease: Option<Lease>,
        attempt: Attempt,
        sent: Instant,
    ) -> StreamingBody {
        let (sender, chunks) = mpsc::channel(RELAY_CHUNKS);
        let upstream = self.clone();
        tokio::spawn(async move {
            // A request that reserved tokens (its attempt expects a count) has its stream's usage read.
            let counts_tokens = attempt.prompt_tokens.is_some();
            let mut relay = Relay::new(held.committed, dialect, upstream.limits, counts_tokens);
            let trust = lease.as_ref().map(Lease::trust);
            let ending = relay.run(held.response, &sender, upstream.timeout, trust.as_ref()).await;
            let attempt = Attempt { prompt_tokens: relay.prompt_tokens.filter(|_| counts_tokens), ..attempt };
            upstream.settle_stream(&ending, lease, attempt, sent).await;
            // Only now does the reader see the end: a caller that sends its next request at once finds
            // the key free again.
            drop(sender);
        });
        StreamingBody { chunks }
    }

    /// Settles the key of a stream that ended so, and records its attempt. A lost lease's end is
    /// fenced: the attempt is recorded, the key (someone else's) untouched.
    async fn settle_stream(&self, ending: &Ending, lease: Option<Lease>, attempt: Attempt, sent: Instant) {
        let verdict = self.judge_ending(ending, attempt.model.as_deref(), lease.as_ref());
        if let Ending::Broken(problem) | Ending::TooLarge(problem) = ending {
            tracing::warn!(connector = %attempt.connector, key = ?attempt.key_name, problem = %problem, "stream broke after its first event");
        }
        let outcome = ending.outcome(&verdict);
        let attempt = Attempt { latency_ms: millis(sent.elapsed()), outcome, ..attempt };
        let Some(lease) = lease else {
            let coordinator = self.coordinator.clone();
            let _ = blocking(move || coordinator.backend().record_attempt(&attempt)).await;
            return;
        };
        let fate = verdict.key;
        match blocking(move || lease.finish(&fate, Some(&attempt))).await {
            Err(Error::LeaseLost { .. }) if matches!(ending, Ending::LeaseLost) => {}
            Err(error) => tracing::warn!(error = %error, "could not settle the key of a finished stream"),
            Ok(()) => {}
        }
    }

    /// The verdict on how a stream ended: an upstream error event is judged like the answer it stands
    /// for; any other ending blames no key.
    fn judge_ending(&self, ending: &Ending, model: Option<&str>, lease: Option<&Lease>) -> Verdict {
        match ending {
            Ending::UpstreamError(data) => {
                let context = self.context(model, lease, 0);
                classify::classify(error_code(data), &HeaderMap::new(), data, &context)
            }
            Ending::Complete => Verdict { key: Fate::Release { success: true }, next: Next::Return },
            Ending::Broken(_) | Ending::TooLarge(_) | Ending::Cancelled | Ending::LeaseLost => {
                Verdict { key: Fate::Release { success: false }, next: Next::Return }
            }
        }
    }
}

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

impl Ending {
    /// The stream's outcome for the `requests` table.
    fn outcome(&self, verdict: &Verdict) -> Outcome {
        match self {
            Ending::Complete => Outcome::SUCCESS,
            Ending::UpstreamError(_) => Outcome::StreamError(judged(verdict)),
            Ending::Broken(_) => Outcome::StreamBroken,
            Ending::TooLarge(_) => Outcome::TooLarge,
            Ending::Cancelled => Outcome::Cancelled,
            Ending::LeaseLost => Outcome::LeaseLost,
        }
    }
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
    /// Whether to read the input tokens the stream's events say the request used.
    counts_tokens: bool,
    /// The input tokens the stream's events said the request used (the last event that said so).
    prompt_tokens: Option<u64>,
    /// What the committed hold allows to forward at once.
    initial: Option<Bytes>,
    /// `unsent` never holds more than `limits.max_event` bytes plus one chunk: an event still
    /// incomplete past it ends the stream.
    limits: Limits,
}

impl Relay {
    fn new(committed: crate::stream::sse::Committed, dialect: Dialect, limits: Limits, counts_tokens: bool) -> Self {
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
            counts_tokens,
            prompt_tokens: None,
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
            let data = crate::stream::sse::event_data(bytes);
            if let Some(data) = data.as_deref().filter(|data| crate::stream::sse::is_error_event(data)) {
                if self.complete {
                    tracing::warn!("upstream error event after a complete stream; not forwarded");
                    continue;
                }
                self.upstream_error = Some(data.to_owned());
            } else if let Some(data) = data.as_deref() {
                self.complete |= crate::stream::sse::is_terminal(self.dialect, data);
                if self.counts_tokens {
                    self.prompt_tokens = crate::tokens::prompt_tokens(data.as_bytes()).or(self.prompt_tokens);
                }
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
        trust: Option<&crate::trust::Trust>,
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
                        let problem = event_too_large(self.limits);
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
                // A stream whose end no one can judge ends when the upstream ends it: nothing to add.
                Ok(Ok(None)) if !self.dialect.judges_end() => {
                    let rest = Bytes::from(std::mem::take(&mut self.unsent));
                    if !rest.is_empty() && !Self::forward(sender, rest, idle).await {
                        return Ending::Cancelled;
                    }
                    return Ending::Complete;
                }
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
        // A stream whose end cannot be judged is just ended: an event of ours could follow a whole answer.
        if let Some(error) = self.dialect.stream_error_event(status, problem) {
            event.extend_from_slice(&error);
            if !Self::forward(sender, Bytes::from(event), idle).await {
                return Ending::Cancelled;
            }
        }
        if too_large { Ending::TooLarge(problem.to_owned()) } else { Ending::Broken(problem.to_owned()) }
    }
}

impl Relay {
    /// Ends a stream whose lease is no longer trusted with one error event of ours (after whole events
    /// only, as any broken stream).
    async fn end_for_lost_lease(
        &mut self,
        sender: &mpsc::Sender<Bytes>,
        idle: Duration,
        trust: Option<&crate::trust::Trust>,
    ) -> Ending {
        let why = if trust.is_some_and(crate::trust::Trust::is_known_lost) {
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
        if let Some(error) = self.dialect.stream_error_event(http::StatusCode::SERVICE_UNAVAILABLE, &problem) {
            event.extend_from_slice(&error);
            if !Self::forward(sender, Bytes::from(event), idle).await {
                return Ending::Cancelled;
            }
        }
        Ending::LeaseLost
    }
}

/// Resolves once the lease behind `trust` is no longer trusted; never without a lease.
async fn lease_lost(trust: Option<&crate::trust::Trust>) {
    match trust {
        Some(trust) => trust.lost().await,
        None => std::future::pending().await,
    }
}
