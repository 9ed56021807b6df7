//! What a caller sends through the pool: bytes and headers, never strings, and the caller's own
//! deadline if its client announced one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderMap;

use crate::stream::Dialect;

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
    /// A streaming request, and the dialect of its error events and terminal event: hold the answer
    /// until its first complete event, then relay it (see the module docs). The connector's API family
    /// gives it: [`Connector::dialect_for`](crate::Connector::dialect_for).
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
