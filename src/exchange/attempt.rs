//! One attempt: the request sent with one key, and what came back: the whole answer, a stream held up
//! to its first complete event, or why no answer came ([`NoAnswer`]).
//!
//! Invariant: the key travels only in the connector's header; a value the caller left under that
//! header never goes upstream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use super::client::without_url;
use super::limits::{Limits, Unread, event_too_large, read_whole};
use super::{Outgoing, Upstream};
use crate::lease::Lease;
use crate::stream::sse::FirstEventHold;

/// What came back from one attempt.
pub(super) enum Answer {
    /// A whole answer.
    Whole { status: u16, headers: HeaderMap, body: Bytes },
    /// A 2xx stream whose first event is complete: the bytes held so far, and the rest to relay.
    Stream { status: u16, headers: HeaderMap, held: Box<HeldStream> },
}

/// A stream held up to its first event.
pub(super) struct HeldStream {
    pub(super) committed: crate::stream::sse::Committed,
    pub(super) response: reqwest::Response,
}

impl Answer {
    pub(super) fn status(&self) -> u16 {
        match self {
            Answer::Whole { status, .. } | Answer::Stream { status, .. } => *status,
        }
    }

    /// The input tokens a whole answer says the request used (a stream says it in its last events).
    pub(super) fn prompt_tokens(&self) -> Option<u64> {
        match self {
            Answer::Whole { body, .. } => crate::tokens::prompt_tokens(body),
            Answer::Stream { .. } => None,
        }
    }
}

/// A failure of one attempt before any answer could be judged.
#[derive(Debug)]
pub(super) enum NoAnswer {
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
    pub(super) fn may_have_reached(&self) -> bool {
        match self {
            NoAnswer::Transport(error) => !error.is_connect(),
            NoAnswer::Late(_) | NoAnswer::TooLarge(_) => true,
            NoAnswer::Stream(_) | NoAnswer::LeaseLost { .. } => false,
        }
    }
}

impl From<Unread> for NoAnswer {
    fn from(unread: Unread) -> Self {
        match unread {
            Unread::Transport(error) => NoAnswer::Transport(error),
            Unread::TooLarge(problem) => NoAnswer::TooLarge(problem),
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

impl Upstream {
    /// Sends the request with `lease`'s key and reads the answer: whole, or for a streaming request
    /// that got a 2xx, up to its first complete event.
    pub(super) async fn attempt(&self, outgoing: &Outgoing, lease: Option<&Lease>) -> Result<Answer, NoAnswer> {
        // The last trust check, after connection setup: see the `gate` module.
        let gate = lease.map(|lease| crate::gate::Gate::new(lease.trust()));
        let lease_lost = |lease: &Lease| NoAnswer::LeaseLost { key: lease.key_name().to_owned(), lease: lease.token() };
        if let (Some(gate), Some(lease)) = (&gate, lease)
            && outgoing.body.is_empty()
            && !gate.is_open()
        {
            return Err(lease_lost(lease));
        }
        let request = self.request(outgoing, lease, gate.as_ref());
        let time = self.attempt_time(outgoing);
        let sent = if outgoing.stream.is_none() {
            // A whole answer has a total deadline, its body included (reqwest's, so that a timeout is
            // one kind of error); a stream has per-read ones (a long stream is fine) after its first event.
            request
                .timeout(time.timeout)
                .send()
                .await
                .map_err(|error| self.transport(outgoing, error, time.late("answer")))
        } else {
            match tokio::time::timeout_at(time.deadline, request.send()).await {
                Ok(sent) => sent.map_err(NoAnswer::Transport),
                Err(_) => Err(time.late("answer")),
            }
        };
        let response = match sent {
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
        let is_event_stream = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        if outgoing.stream.is_some() && (200..300).contains(&status) && is_event_stream {
            hold_first_event(response, &time, self.limits).await
        } else {
            self.whole_answer(outgoing, response, &time).await
        }
    }

    /// The HTTP request of an attempt: the caller's headers and body, the key in the connector's header
    /// (and nothing else there: a value the caller left in it, a client's own credential under a
    /// header the gateway does not know, never goes upstream), a body released by the gate.
    fn request(
        &self,
        outgoing: &Outgoing,
        lease: Option<&Lease>,
        gate: Option<&crate::gate::Gate>,
    ) -> reqwest::RequestBuilder {
        let url = format!("{}{}", self.connector.base_url(), outgoing.path_and_query);
        let mut headers = outgoing.headers.clone();
        if let Ok(name) = HeaderName::from_bytes(self.connector.key_header().0.as_bytes()) {
            headers.remove(name);
        }
        if let Some((name, value)) = self.key_header(lease) {
            headers.insert(name, value);
        }
        let mut request = self.client().request(outgoing.method.clone(), url).headers(headers);
        if outgoing.body.is_empty() {
            return request;
        }
        if !outgoing.headers.contains_key(CONTENT_TYPE) {
            request = request.header(CONTENT_TYPE, self.connector.content_type());
        }
        match gate {
            // A known length: the upstream acts on the request only once the gate released it all.
            Some(gate) => request
                .header(reqwest::header::CONTENT_LENGTH, outgoing.body.len())
                .body(gate.body(outgoing.body.clone())),
            None => request.body(outgoing.body.clone()),
        }
    }

    /// The time an attempt has: the jongler's timeout, or what is left of the caller's deadline when
    /// that is sooner.
    fn attempt_time(&self, outgoing: &Outgoing) -> AttemptTime {
        let (timeout, whose) = match outgoing.deadline {
            Some(deadline) if deadline.saturating_duration_since(Instant::now()) < self.timeout => {
                (deadline.saturating_duration_since(Instant::now()), "the caller's deadline")
            }
            _ => (self.timeout, "the attempt's timeout"),
        };
        AttemptTime { timeout, whose, deadline: tokio::time::Instant::now() + timeout }
    }

    /// A whole answer, read up to its limit: under reqwest's deadline for a request that is not a
    /// stream, under the attempt's for a stream request's other answer (an error, a JSON body).
    async fn whole_answer(
        &self,
        outgoing: &Outgoing,
        mut response: reqwest::Response,
        time: &AttemptTime,
    ) -> Result<Answer, NoAnswer> {
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        let max = self.limits.max_response;
        let body = if outgoing.stream.is_none() {
            read_whole(&mut response, max).await.map_err(|unread| match unread {
                Unread::Transport(error) => self.transport(outgoing, error, time.late("whole answer")),
                other => NoAnswer::from(other),
            })?
        } else {
            tokio::time::timeout_at(time.deadline, read_whole(&mut response, max))
                .await
                .map_err(|_| time.late("whole answer"))??
        };
        Ok(Answer::Whole { status, headers, body })
    }

    /// A transport error as the failure it stands for: reqwest's timeout of a request that may not be
    /// sent again is `late` (which says what it waited for and how long); anything else stays a
    /// transport error (a timeout that may be retried is reported as one, as it always was).
    pub(super) fn transport(&self, outgoing: &Outgoing, error: reqwest::Error, late: NoAnswer) -> NoAnswer {
        if error.is_timeout() && !self.may_replay(outgoing) { late } else { NoAnswer::Transport(error) }
    }

    /// Whether `outgoing` may be sent again after it may have reached the upstream without an answer:
    /// an idempotent method (sending it twice does what sending it once does), or the caller allowed it
    /// (`JonglerBuilder::retry_timeouts`).
    pub(super) fn may_replay(&self, outgoing: &Outgoing) -> bool {
        use reqwest::Method;
        self.retry_timeouts
            || [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE]
                .contains(&outgoing.method)
    }
}

/// A transport error with its innermost cause (`error sending request (connection reset by peer)`), and
/// no URL.
pub(super) fn innermost(error: &reqwest::Error) -> String {
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

/// An in-band error event (`data: {"error": ...}`) in place of a stream's first event, as the whole
/// answer it stands for: its `error.code` as the status, its JSON as the body.
pub(super) fn error_answer(mut headers: HeaderMap, data: String) -> Answer {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.remove(reqwest::header::CONTENT_LENGTH);
    Answer::Whole { status: error_code(&data), headers, body: Bytes::from(data) }
}

/// The status an in-band error event carries (`error.code`), else 500.
pub(super) fn error_code(data: &str) -> u16 {
    crate::classify::envelope_status(data).unwrap_or(500)
}

/// The time one attempt has, and whose it is (for the caller to hear when it ran out).
struct AttemptTime {
    timeout: Duration,
    whose: &'static str,
    deadline: tokio::time::Instant,
}

impl AttemptTime {
    /// The failure of waiting `what` out.
    fn late(&self, what: &str) -> NoAnswer {
        NoAnswer::Late(format!("no {what} within {:.1} s ({})", self.timeout.as_secs_f64(), self.whose))
    }
}

/// A 2xx stream held up to its first complete event, within the attempt's time: the held stream, or
/// the whole answer an error in its place stands for, or why there was none.
async fn hold_first_event(
    mut response: reqwest::Response,
    time: &AttemptTime,
    limits: Limits,
) -> Result<Answer, NoAnswer> {
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let mut hold = FirstEventHold::new(limits.max_event);
    loop {
        let chunk =
            tokio::time::timeout_at(time.deadline, response.chunk()).await.map_err(|_| time.late("first event"))?;
        match chunk.map_err(NoAnswer::Transport)? {
            Some(chunk) => {
                let first_data = match hold.push(chunk) {
                    Ok(None) => continue,
                    Ok(Some(first)) => first.data().unwrap_or_default(),
                    Err(_) => return Err(NoAnswer::TooLarge(event_too_large(limits))),
                };
                // A first event that is an upstream error is that error's answer, as a whole one.
                if crate::stream::sse::is_error_event(&first_data) {
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
                if let Some(data) = data.filter(|data| crate::stream::sse::is_error_event(data)) {
                    return Ok(error_answer(headers, data));
                }
                return Err(NoAnswer::Stream("the stream ended before its first event".to_owned()));
            }
        }
    }
}
