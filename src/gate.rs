//! The last trust check before a request's bytes leave, and the watch a relayed stream keeps on its
//! lease.
//!
//! A key may be used only while its lease is trusted ([`Trust`]: not found lost, and confirmed
//! recently enough on the boot clock that no reaper can have judged it stale). Checking that before
//! `send()` leaves connection setup (DNS, TCP, TLS, a proxy's handshake) between the check and the
//! bytes: a holder paused there (a stopped VM in its TLS handshake) would send with a lost lease
//! while the key's new holder is in flight.
//!
//! Invariants:
//! - A request with a body and a key sends its body through a [`Gate`]: hyper's HTTP/1 client polls
//!   a request body only on an established connection, right after buffering the head and before
//!   flushing anything, so the check runs after connection setup and just before the request is
//!   written. Refused, the body fails: hyper closes the connection with the head unflushed, and had
//!   any byte left, the upstream would still hold an incomplete request (its `Content-Length` is
//!   sent, the body never completes), which no server acts on. The attempt ends as "lease lost, not
//!   sent": no key is blamed and the request may go to another key. What remains is the write itself.
//!   This rests on hyper's HTTP/1 client (the only protocol reqwest is built with here: no `http2`
//!   feature); tests/lease_trust.rs checks that a refused request sends not one byte. A gated body
//!   cannot be replayed, so a 307/308 redirect of a keyed request is returned, not followed.
//! - A request without a body (a GET) has nothing to hold back: it is checked right before it is
//!   handed to the HTTP client, and its window still includes connection setup when no pooled
//!   connection is ready. Such requests with a key are reads (model lists, file metadata), which
//!   spend no quota.
//! - A relayed stream waits on [`Trust::lost`]: it resolves when the heartbeat finds the lease lost,
//!   or when the trust window runs out without a renewal (a heartbeat that could not be written).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::trust::Trust;

/// The trust check of one attempt's body: releases the body only while the lease is trusted, and
/// remembers a refusal so that the attempt can tell it from a transport failure.
#[derive(Debug)]
pub(crate) struct Gate {
    trust: Trust,
    refused: Arc<AtomicBool>,
}

impl Gate {
    pub(crate) fn new(trust: Trust) -> Self {
        Self { trust, refused: Arc::new(AtomicBool::new(false)) }
    }

    /// Whether the lease is trusted now (the last check of a request without a body).
    pub(crate) fn is_open(&self) -> bool {
        self.trust.is_trusted()
    }

    /// `bytes` as a request body whose only frame is released by the trust check, when hyper asks for
    /// it on the established connection. Send it with an explicit `Content-Length`.
    pub(crate) fn body(&self, bytes: Bytes) -> reqwest::Body {
        reqwest::Body::wrap(GatedBody {
            bytes: Some(bytes),
            trust: self.trust.clone(),
            refused: Arc::clone(&self.refused),
        })
    }

    /// Whether the check refused the body: nothing of the request was completed upstream.
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::SeqCst)
    }
}

/// A whole body behind the trust check.
#[derive(Debug)]
struct GatedBody {
    bytes: Option<Bytes>,
    trust: Trust,
    refused: Arc<AtomicBool>,
}

/// The body of a request whose lease was no longer trusted when the connection was ready.
#[derive(Debug, thiserror::Error)]
#[error("the key's lease is no longer trusted: the request was not sent")]
pub(crate) struct NotTrusted;

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = NotTrusted;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, NotTrusted>>> {
        let this = self.get_mut();
        let Some(bytes) = this.bytes.take() else { return Poll::Ready(None) };
        if !this.trust.is_trusted() {
            this.refused.store(true, Ordering::SeqCst);
            tracing::warn!("lease no longer trusted once connected; the request is not sent");
            return Poll::Ready(Some(Err(NotTrusted)));
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use std::time::Duration;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::trust::{LeaseLiveness, RECHECK};

    fn trust(clock: &Arc<ManualClock>, liveness: &Arc<LeaseLiveness>) -> Trust {
        Trust::new(Arc::clone(liveness), Arc::clone(clock) as Arc<dyn Clock>, Duration::from_secs(10))
    }

    fn poll(body: &mut GatedBody) -> Option<Result<Bytes, NotTrusted>> {
        let mut context = Context::from_waker(std::task::Waker::noop());
        match Pin::new(body).poll_frame(&mut context) {
            Poll::Ready(frame) => frame.map(|frame| frame.map(|frame| frame.into_data().expect("data"))),
            Poll::Pending => panic!("a gated body never waits"),
        }
    }

    fn gated(trust: &Trust) -> (GatedBody, Arc<AtomicBool>) {
        let refused = Arc::new(AtomicBool::new(false));
        let body =
            GatedBody { bytes: Some(Bytes::from_static(b"{}")), trust: trust.clone(), refused: Arc::clone(&refused) };
        (body, refused)
    }

    #[test]
    fn the_body_is_released_whole_while_the_lease_is_trusted() {
        let (clock, liveness) = (Arc::new(ManualClock::new(1_000)), Arc::new(LeaseLiveness::new(1_000)));
        let (mut body, refused) = gated(&trust(&clock, &liveness));
        assert_eq!((body.size_hint().exact(), body.is_end_stream()), (Some(2), false));
        clock.advance(9_999);
        assert_eq!(poll(&mut body).expect("a frame").expect("trusted"), Bytes::from_static(b"{}"));
        assert!(body.is_end_stream() && poll(&mut body).is_none() && !refused.load(Ordering::SeqCst));
    }

    #[test]
    fn the_body_is_refused_once_the_lease_is_lost_or_its_trust_ran_out() {
        let (clock, liveness) = (Arc::new(ManualClock::new(1_000)), Arc::new(LeaseLiveness::new(1_000)));
        let (mut body, refused) = gated(&trust(&clock, &liveness));
        clock.advance(10_000);
        assert!(poll(&mut body).expect("a frame").is_err(), "not renewed within the window");
        assert!(refused.load(Ordering::SeqCst));

        let fresh = Arc::new(LeaseLiveness::new(clock.boot_ms()));
        let (mut body, refused) = gated(&trust(&clock, &fresh));
        fresh.mark_lost();
        assert!(poll(&mut body).expect("a frame").is_err(), "found lost by the heartbeat");
        assert!(refused.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn lost_resolves_when_the_heartbeat_finds_the_lease_lost() {
        let (clock, liveness) = (Arc::new(ManualClock::new(1_000)), Arc::new(LeaseLiveness::new(1_000)));
        let trust = trust(&clock, &liveness);
        let watcher = tokio::spawn(async move { trust.lost().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watcher.is_finished(), "trusted: the manual clock has not moved");
        liveness.mark_lost();
        // Woken at once; the margin is a loaded machine's, far below the 10 s window.
        tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("woken").expect("task");
    }

    #[tokio::test]
    async fn lost_resolves_when_the_trust_window_runs_out() {
        let (clock, liveness) = (Arc::new(ManualClock::new(1_000)), Arc::new(LeaseLiveness::new(1_000)));
        let trust = trust(&clock, &liveness);
        let watcher = tokio::spawn(async move { trust.lost().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watcher.is_finished());
        clock.advance(10_000);
        // Seen at the next recheck, within RECHECK (1 s); the rest is a loaded machine's margin.
        tokio::time::timeout(RECHECK * 5, watcher).await.expect("seen").expect("task");
    }
}
