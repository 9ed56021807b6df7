//! A lease while its request is on the wire, and what happens when the request is dropped there.
//!
//! Invariant: a request future cancelled mid-flight (SIGINT, a client gone) never keeps its key: the
//! guard gives it back and records the attempt as `cancelled`, off the runtime thread.

use std::time::{Duration, Instant};

use crate::lease::Lease;
use crate::pool::{Attempt, Fate};

/// A lease while its request is on the wire. Dropped there (the request future was cancelled: SIGINT,
/// a client that went away), it gives the key back and records the attempt as cancelled, off this
/// thread (see `Lease::end_later`).
pub(super) struct InFlight {
    pub(super) lease: Option<Lease>,
    pub(super) cancelled: Attempt,
    pub(super) sent: Instant,
}

impl InFlight {
    /// The send finished: the lease goes on to be settled by the verdict.
    pub(super) fn landed(mut self) -> Option<Lease> {
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

pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
