//! What an answer may cost in memory: a whole answer up to `max_response` bytes, a stream event up to
//! `max_event` bytes. Past them the attempt fails (after a stream's commit: one error event), without
//! blaming the key.

use bytes::Bytes;

/// The size limits of one jongler's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The largest stream event held whole.
    pub(crate) max_event: usize,
    /// The largest whole answer read.
    pub(crate) max_response: usize,
}

/// Why a whole answer's body was not read.
#[derive(Debug)]
pub(super) enum Unread {
    /// The transport failed while reading it.
    Transport(reqwest::Error),
    /// It passed its limit: what the caller hears.
    TooLarge(String),
}

/// A whole answer's body, refused as soon as it is known to pass `max` bytes (from its
/// `Content-Length`, or from the bytes read): never more than `max` plus one chunk is held.
pub(super) async fn read_whole(response: &mut reqwest::Response, max: usize) -> Result<Bytes, Unread> {
    let too_large = || {
        Unread::TooLarge(format!(
            "the upstream's answer is larger than {max} bytes; raise the limit (APIJONGLER_MAX_RESPONSE, or \
             max_response) if such an answer is legitimate"
        ))
    };
    if response.content_length().is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Unread::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// A stream event longer than the limit, as the caller hears it: the attempt fails (before commit) or
/// the stream ends (after).
pub(super) fn event_too_large(limits: Limits) -> String {
    format!(
        "an upstream event is larger than {} bytes; raise the limit (APIJONGLER_MAX_EVENT, or max_event) if such \
         an event is legitimate",
        limits.max_event
    )
}
