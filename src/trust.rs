//! A lease's trust, apart from the lease: whether the key it holds may still be used, as the heartbeat
//! thread that renews it, the lease, the last check before a request's bytes leave (the `gate`
//! module) and a relayed stream all see it.
//!
//! Invariants:
//! - A lease is trusted while it was not found lost and the last write that confirmed it is younger,
//!   on the boot clock (which counts a SIGSTOP and a suspend, and cannot step), than the trust window
//!   (a margin short of the reaper's `stale_after`).
//! - Marking a lease lost wakes every watcher at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// What the heartbeat thread and a [`Lease`] share about one lease.
#[derive(Debug)]
pub(crate) struct LeaseLiveness {
    lost: AtomicBool,
    /// Boot-clock ms of the last write that confirmed the lease (its claim, or a heartbeat), as that
    /// write put it in the row: the very time any reaper measures the lease's age from.
    renewed_boot_ms: AtomicI64,
    /// Woken once the lease is found lost, so that a stream using the key stops at once rather than
    /// at its next check.
    found_lost: tokio::sync::Notify,
}

impl LeaseLiveness {
    pub(crate) fn new(claimed_boot_ms: i64) -> Self {
        Self {
            lost: AtomicBool::new(false),
            renewed_boot_ms: AtomicI64::new(claimed_boot_ms),
            found_lost: tokio::sync::Notify::new(),
        }
    }

    /// Marks the lease lost and wakes its watchers; true the first time.
    pub(crate) fn mark_lost(&self) -> bool {
        let first = !self.lost.swap(true, Ordering::SeqCst);
        self.found_lost.notify_waiters();
        first
    }

    /// Whether the lease was found lost.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Records a write that confirmed the lease at `boot_ms` (never moving the renewal back).
    pub(crate) fn renewed_at(&self, boot_ms: i64) {
        self.renewed_boot_ms.fetch_max(boot_ms, Ordering::SeqCst);
    }

    /// Boot-clock ms of the last write that confirmed the lease.
    pub(crate) fn renewed_boot_ms(&self) -> i64 {
        self.renewed_boot_ms.load(Ordering::SeqCst)
    }

    /// Resolves at the next [`mark_lost`](Self::mark_lost) after it was enabled (see
    /// [`tokio::sync::futures::Notified::enable`]).
    pub(crate) fn found_lost(&self) -> tokio::sync::futures::Notified<'_> {
        self.found_lost.notified()
    }
}

/// How often [`Trust::lost`] looks at the boot clock at least: tokio's timers do not count a
/// suspend, the boot clock does.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

/// A lease's trust, shared with the heartbeat thread that renews it, apart from the lease itself.
#[derive(Debug, Clone)]
pub(crate) struct Trust {
    liveness: Arc<LeaseLiveness>,
    clock: Arc<dyn Clock>,
    window: Duration,
}

impl Trust {
    pub(crate) fn new(liveness: Arc<LeaseLiveness>, clock: Arc<dyn Clock>, window: Duration) -> Self {
        Self { liveness, clock, window }
    }

    /// Whether the key may be used now.
    pub(crate) fn is_trusted(&self) -> bool {
        self.left().is_some()
    }

    /// Whether the heartbeat found the lease lost (rather than its trust merely running out).
    pub(crate) fn is_known_lost(&self) -> bool {
        self.liveness.is_lost()
    }

    /// How long the lease stays trusted without another renewal; `None` once it is not.
    fn left(&self) -> Option<Duration> {
        if self.liveness.is_lost() {
            return None;
        }
        let age_ms = self.clock.boot_ms().saturating_sub(self.liveness.renewed_boot_ms());
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let left_ms = window_ms.checked_sub(age_ms).filter(|left| *left > 0)?;
        Some(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)))
    }

    /// Resolves once the lease is no longer trusted: found lost, or not renewed within its window.
    pub(crate) async fn lost(&self) {
        loop {
            // Enabled before the check, so that a loss between the check and the wait still wakes it.
            let found_lost = self.liveness.found_lost();
            tokio::pin!(found_lost);
            found_lost.as_mut().enable();
            let Some(left) = self.left() else { return };
            tokio::select! {
                () = found_lost => {}
                () = tokio::time::sleep(left.min(RECHECK)) => {}
            }
        }
    }
}
