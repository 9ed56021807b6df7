//! The error shape a route's clients understand, and the gateway's own errors in that shape.
//!
//! apijongler answers some requests itself: the gateway (no key free, bad `Host`, wrong token) and the
//! send path (a stream that broke after the first byte, in [`Outgoing::stream`](crate::Outgoing::stream)'s
//! dialect). Each SDK raises a typed, readable error only for the body shape it expects,
//! so the gateway speaks the dialect of the route, decided once per request by the connector's API family
//! ([`Connector::dialect_for`](crate::Connector::dialect_for)).
//!
//! Invariants:
//! - Every message the gateway writes starts with [`MESSAGE_PREFIX`], so a user can tell the gateway's
//!   errors from the provider's; callers pass the rest of the message and must keep secrets out of it.
//! - An in-stream error event is exactly one event: `data: ` plus one line of JSON, ended by the blank
//!   line the dialect's streams use (CRLF CRLF for Google, LF LF otherwise), and nothing else (no
//!   comment, no `[DONE]`). A dialect whose stream end cannot be judged (`Plain`) has none.
//! - A wait is never shortened: `Retry-After` and `retryDelay` are whole seconds rounded up,
//!   `retry-after-ms` milliseconds rounded up.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header::RETRY_AFTER};
use serde::Serialize;

/// What starts every message the gateway writes itself.
pub const MESSAGE_PREFIX: &str = "apijongler: ";

/// The longest `retry-after-ms` the openai SDK waits for; beyond it the SDK would retry after its own
/// short backoff instead, so the gateway also sends `x-should-retry: false`.
pub const OPENAI_MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// The error shape of a route, and how its streams end. A connector's API family gives it per
/// request ([`ApiFamily::dialect`](crate::family::ApiFamily::dialect)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Gemini's native API: `{"error":{"code","message","status","details"}}`, as google-genai reads it;
    /// a stream ends with a `finishReason`.
    Google,
    /// OpenAI-compatible routes (Gemini's `/v1beta/openai/…`, Hugging Face's router `/v1/…`):
    /// `{"error":{"message","type","code"}}`, as the openai SDK reads it; a stream ends with
    /// `finish_reason` or `[DONE]`.
    OpenAi,
    /// Hugging Face's native `hf-inference/models/…` API: `{"error":"message"}`, the flat shape that
    /// API sends itself (`huggingface_hub` joins the `error` values as strings, so a nested object there
    /// would not read as a message); a text-generation stream ends with `generated_text`.
    HuggingFace,
    /// An API apijongler cannot read: errors in the flat shape, and a stream whose end no one can judge,
    /// so nothing is ever appended to it ([`Dialect::stream_error_event`] is `None`).
    Plain,
}

impl Dialect {
    /// Whether a stream of this dialect has a known last event, so that a stream ending without it is
    /// known to be cut short (and gets one error event of ours).
    pub fn judges_end(self) -> bool {
        self != Dialect::Plain
    }

    /// The gateway's own error body, JSON. `message` gets [`MESSAGE_PREFIX`]. A `retry_after` becomes a
    /// `google.rpc.RetryInfo` detail for Google; the other dialects carry it in headers only
    /// ([`Dialect::retry_headers`]).
    pub fn error_body(self, status: StatusCode, message: &str, retry_after: Option<Duration>) -> String {
        let message = format!("{MESSAGE_PREFIX}{message}");
        let code = status.as_u16();
        let json = match self {
            Dialect::Google => serde_json::to_string(&Envelope {
                error: GoogleError {
                    code,
                    message: &message,
                    status: canonical_status(status),
                    details: retry_after
                        .map(|wait| RetryInfo { kind: RETRY_INFO, retry_delay: format!("{}s", ceil_secs(wait)) })
                        .into_iter()
                        .collect(),
                },
            }),
            Dialect::OpenAi => serde_json::to_string(&Envelope {
                error: OpenAiError { message: &message, kind: openai_error_type(status), code },
            }),
            Dialect::HuggingFace | Dialect::Plain => serde_json::to_string(&Envelope { error: &message }),
        };
        json.expect("structs of strings and integers always serialize")
    }

    /// One in-band error event to end a stream that broke after its first byte reached the client:
    /// google-genai and openai both raise an `APIError` on it. Send it, then end the body cleanly.
    /// `None` for a dialect whose end cannot be judged ([`Dialect::judges_end`]): such a stream is
    /// just ended, since an event of ours could follow a complete answer.
    pub fn stream_error_event(self, status: StatusCode, message: &str) -> Option<Bytes> {
        if !self.judges_end() {
            return None;
        }
        let terminator = if self == Dialect::Google { "\r\n\r\n" } else { "\n\n" };
        Some(Bytes::from(format!("data: {}{terminator}", self.error_body(status, message, None))))
    }

    /// Headers that tell a client how long to wait: `Retry-After` (whole seconds, rounded up) in every
    /// dialect; for OpenAI also `retry-after-ms`, and `x-should-retry: false` when the wait is longer
    /// than [`OPENAI_MAX_RETRY_AFTER`], so the SDK gives up instead of retrying far too early.
    pub fn retry_headers(self, wait: Duration) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
        if self == Dialect::OpenAi {
            let millis = wait.as_nanos().div_ceil(1_000_000);
            headers.insert(RETRY_AFTER_MS, HeaderValue::from(u64::try_from(millis).unwrap_or(u64::MAX)));
            if wait > OPENAI_MAX_RETRY_AFTER {
                headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
            }
        }
        headers
    }
}

/// The openai SDK's precise wait header.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// The openai SDK's override of its own retry decision.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The `google.rpc.Code` name Google pairs with an HTTP status; `UNKNOWN` for statuses it has none
/// for. 413 and 421 (the gateway's body cap and `Host` check) are requests to fix: `INVALID_ARGUMENT`.
pub fn canonical_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 421 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// The `type` of an OpenAI-style error for an HTTP status.
pub fn openai_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        502 | 504 => "upstream_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

fn ceil_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[derive(Serialize)]
struct Envelope<E> {
    error: E,
}

#[derive(Serialize)]
struct GoogleError<'a> {
    code: u16,
    message: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<RetryInfo>,
}

#[derive(Serialize)]
struct RetryInfo {
    #[serde(rename = "@type")]
    kind: &'static str,
    #[serde(rename = "retryDelay")]
    retry_delay: String,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use Dialect::{Google, HuggingFace, OpenAi, Plain};

    #[test]
    fn error_bodies() {
        let wait = Some(Duration::from_millis(36_001));
        let cases: &[(Dialect, u16, Option<Duration>, &str)] = &[
            (
                Google,
                429,
                wait,
                r#"{"error":{"code":429,"message":"apijongler: 0 of 8 keys free","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"37s"}]}}"#,
            ),
            (
                Google,
                503,
                None,
                r#"{"error":{"code":503,"message":"apijongler: 0 of 8 keys free","status":"UNAVAILABLE"}}"#,
            ),
            (
                OpenAi,
                429,
                wait,
                r#"{"error":{"message":"apijongler: 0 of 8 keys free","type":"rate_limit_error","code":429}}"#,
            ),
            (
                OpenAi,
                421,
                None,
                r#"{"error":{"message":"apijongler: 0 of 8 keys free","type":"invalid_request_error","code":421}}"#,
            ),
            (HuggingFace, 429, wait, r#"{"error":"apijongler: 0 of 8 keys free"}"#),
            (Plain, 429, wait, r#"{"error":"apijongler: 0 of 8 keys free"}"#),
        ];
        for (dialect, status, retry_after, expected) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            assert_eq!(dialect.error_body(status, "0 of 8 keys free", *retry_after), *expected, "{dialect:?} {status}");
        }
        let quoted = Google.error_body(StatusCode::BAD_GATEWAY, "a \"quoted\"\nline", None);
        let parsed: serde_json::Value = serde_json::from_str(&quoted).unwrap();
        assert_eq!(parsed["error"]["message"], "apijongler: a \"quoted\"\nline");
    }

    #[test]
    fn stream_error_events() {
        let cases: &[(Dialect, u16, &str)] = &[
            (
                Google,
                503,
                "data: {\"error\":{\"code\":503,\"message\":\"apijongler: upstream stream broke after 3 events\",\"status\":\"UNAVAILABLE\"}}\r\n\r\n",
            ),
            (
                OpenAi,
                502,
                "data: {\"error\":{\"message\":\"apijongler: upstream stream broke after 3 events\",\"type\":\"upstream_error\",\"code\":502}}\n\n",
            ),
            (HuggingFace, 502, "data: {\"error\":\"apijongler: upstream stream broke after 3 events\"}\n\n"),
        ];
        for (dialect, status, expected) in cases {
            let event = dialect
                .stream_error_event(StatusCode::from_u16(*status).unwrap(), "upstream stream broke after 3 events")
                .expect("a dialect that judges its end");
            assert_eq!(event, expected.as_bytes(), "{dialect:?}");
            // The framer sees exactly one complete error event, with nothing after it.
            let mut framer = super::super::sse::Framer::new(1 << 20);
            let events = framer.push(&event);
            assert_eq!(events.len(), 1, "{dialect:?}");
            assert!(events[0].is_error(), "{dialect:?}");
            assert_eq!(events[0].range().end, event.len() as u64, "{dialect:?}");
            assert_eq!(framer.finish(), None, "{dialect:?}");
        }
        assert_eq!(Plain.stream_error_event(StatusCode::BAD_GATEWAY, "broke"), None, "an end no one can judge");
    }

    #[test]
    fn canonical_statuses() {
        let cases: &[(u16, &str)] = &[
            (400, "INVALID_ARGUMENT"),
            (401, "UNAUTHENTICATED"),
            (403, "PERMISSION_DENIED"),
            (404, "NOT_FOUND"),
            (409, "ABORTED"),
            (413, "INVALID_ARGUMENT"),
            (421, "INVALID_ARGUMENT"),
            (429, "RESOURCE_EXHAUSTED"),
            (500, "INTERNAL"),
            (502, "UNAVAILABLE"),
            (503, "UNAVAILABLE"),
            (504, "DEADLINE_EXCEEDED"),
            (418, "UNKNOWN"),
        ];
        for (status, expected) in cases {
            assert_eq!(canonical_status(StatusCode::from_u16(*status).unwrap()), *expected, "{status}");
        }
        let types: &[(u16, &str)] = &[
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (429, "rate_limit_error"),
            (500, "server_error"),
            (502, "upstream_error"),
            (503, "server_error"),
            (504, "upstream_error"),
        ];
        for (status, expected) in types {
            assert_eq!(openai_error_type(StatusCode::from_u16(*status).unwrap()), *expected, "{status}");
        }
    }

    #[test]
    fn retry_headers() {
        let ms = Duration::from_millis;
        // (dialect, wait, retry-after, retry-after-ms, x-should-retry)
        type Case = (Dialect, Duration, &'static str, Option<&'static str>, Option<&'static str>);
        let cases: &[Case] = &[
            (OpenAi, ms(37_000), "37", Some("37000"), None),
            (OpenAi, ms(36_001), "37", Some("36001"), None),
            (OpenAi, Duration::from_nanos(36_000_000_001), "37", Some("36001"), None),
            (OpenAi, ms(0), "0", Some("0"), None),
            (OpenAi, ms(120_000), "120", Some("120000"), None),
            (OpenAi, ms(120_001), "121", Some("120001"), Some("false")),
            (OpenAi, Duration::from_secs(86_400), "86400", Some("86400000"), Some("false")),
            (Google, ms(120_001), "121", None, None),
            (Plain, ms(500), "1", None, None),
            (HuggingFace, ms(500), "1", None, None),
        ];
        for (dialect, wait, after, after_ms, should_retry) in cases {
            let headers = dialect.retry_headers(*wait);
            let get = |name: &HeaderName| headers.get(name).map(|value| value.to_str().unwrap());
            assert_eq!(get(&RETRY_AFTER), Some(*after), "{dialect:?} {wait:?}");
            assert_eq!(get(&RETRY_AFTER_MS), *after_ms, "{dialect:?} {wait:?}");
            assert_eq!(get(&X_SHOULD_RETRY), *should_retry, "{dialect:?} {wait:?}");
            assert_eq!(headers.len(), 1 + usize::from(after_ms.is_some()) + usize::from(should_retry.is_some()));
        }
    }
}
