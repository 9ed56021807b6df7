//! What a caller gets back: the answer (whole, or a stream being relayed), where its time went, and
//! whether the database recorded what followed from it.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use tokio::sync::mpsc;

/// Where the time of an exchange went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting for free keys, over all attempts.
    pub claiming: Duration,
    /// The last attempt, from sending to its answer (a stream: to its first event).
    pub upstream: Duration,
}

/// The answer to an [`Outgoing`](super::Outgoing) request.
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
    pub(super) chunks: mpsc::Receiver<Bytes>,
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
