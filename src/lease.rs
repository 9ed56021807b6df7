//! A held key, and the heartbeat that keeps this process's keys from being reaped.
//!
//! One heartbeat thread per coordinator refreshes every key this process holds with one statement,
//! and learns from its answer which leases were lost (reaped while we were stopped, or cleaned up by
//! force). A holder trusts its lease for a little less than the reaper's stale threshold after the last
//! successful heartbeat, measured with `Instant`, so it stops using a key before anyone else may take it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::coordinator::{Coordinator, Inner};
use crate::error::{Error, Result};
use crate::store::{Attempt, Claimed, Fate};

/// What the heartbeat thread and a [`Lease`] share about one lease.
#[derive(Debug)]
pub(crate) struct LeaseLiveness {
    token: i64,
    lost: AtomicBool,
    renewed: Mutex<Instant>,
}

/// The leases this process holds, by key row id.
#[derive(Debug, Default)]
pub(crate) struct Registry(Mutex<HashMap<i64, Arc<LeaseLiveness>>>);

impl Registry {
    fn insert(&self, id: i64, token: i64) -> Arc<LeaseLiveness> {
        let liveness =
            Arc::new(LeaseLiveness { token, lost: AtomicBool::new(false), renewed: Mutex::new(Instant::now()) });
        self.lock().insert(id, Arc::clone(&liveness));
        liveness
    }

    fn remove(&self, id: i64, token: i64) {
        let mut leases = self.lock();
        if leases.get(&id).is_some_and(|liveness| liveness.token == token) {
            leases.remove(&id);
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Applies a heartbeat's answer: the leases it names are renewed as of `sent`, the others are lost,
    /// except leases registered after the heartbeat was sent (their claim may have committed after it).
    fn renew(&self, still_held: &[(i64, i64)], sent: Instant) {
        for (id, liveness) in self.lock().iter() {
            let mut renewed = liveness.renewed.lock().unwrap_or_else(PoisonError::into_inner);
            if still_held.contains(&(*id, liveness.token)) {
                *renewed = (*renewed).max(sent);
            } else if *renewed <= sent && !liveness.lost.swap(true, Ordering::SeqCst) {
                tracing::warn!(lease = liveness.token, "lease lost: the key was reaped or cleaned up");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<LeaseLiveness>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts the heartbeat thread of a coordinator; it ends when the coordinator is dropped (the
/// returned sender with it).
pub(crate) fn start_heartbeat(inner: Weak<Inner>, interval: Duration) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = thread::Builder::new().name("apijongler-heartbeat".into()).spawn(move || {
        loop {
            match stopped.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(inner) = inner.upgrade() else { return };
            if inner.leases.is_empty() {
                continue;
            }
            let sent = Instant::now();
            match inner.store.heartbeat(inner.holder, inner.clock.now_ms()) {
                Ok(still_held) => inner.leases.renew(&still_held, sent),
                Err(error) => tracing::warn!(error = %error, "heartbeat failed; will retry"),
            }
        }
    });
    if let Err(error) = spawned {
        tracing::error!(error = %error, "cannot start the heartbeat thread; held keys will be reaped as stale");
    }
    stop
}

/// A key held by this process. Ends with [`release`](Lease::release), [`lockdown`](Lease::lockdown)
/// or [`mark_error`](Lease::mark_error); dropping it releases the key.
#[derive(Debug)]
pub struct Lease {
    coordinator: Coordinator,
    connector: String,
    claimed: Claimed,
    liveness: Arc<LeaseLiveness>,
    ended: bool,
}

impl Lease {
    pub(crate) fn new(coordinator: Coordinator, connector: &str, claimed: Claimed) -> Self {
        let liveness = coordinator.inner.leases.insert(claimed.id, claimed.lease);
        Self { coordinator, connector: connector.to_owned(), claimed, liveness, ended: false }
    }

    /// The connector.
    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// The key's name.
    pub fn key_name(&self) -> &str {
        &self.claimed.key_name
    }

    /// The fingerprint of the secret the key was synced with.
    pub fn fingerprint(&self) -> &str {
        &self.claimed.fingerprint
    }

    /// The lease token (strictly increasing per key).
    pub fn token(&self) -> i64 {
        self.claimed.lease
    }

    /// Whether the key may still be used: the lease was not reported lost, and the last successful
    /// heartbeat is recent enough that no reaper can have judged it stale yet.
    pub fn is_valid(&self) -> bool {
        let renewed = *self.liveness.renewed.lock().unwrap_or_else(PoisonError::into_inner);
        !self.liveness.lost.load(Ordering::SeqCst) && renewed.elapsed() < self.coordinator.inner.trust_window
    }

    /// Ok while the key may still be used; [`Error::LeaseLost`] once it must not be.
    pub fn check(&self) -> Result<()> {
        if self.is_valid() { Ok(()) } else { Err(self.lost()) }
    }

    /// The key's consecutive lockdowns before this lease (for escalating default lockdowns).
    pub fn lockdown_count(&self) -> i64 {
        self.claimed.lockdown_count
    }

    /// After a success on a key that is kept: its consecutive-lockdown count starts again at 0.
    pub fn reset_escalation(&mut self) -> Result<()> {
        if self.claimed.lockdown_count == 0 {
            return Ok(());
        }
        if !self.coordinator.inner.store.reset_escalation(self.claimed.id, self.claimed.lease)? {
            return Err(self.lost());
        }
        self.claimed.lockdown_count = 0;
        Ok(())
    }

    /// Back to vacant.
    pub fn release(mut self) -> Result<()> {
        self.end(&Fate::Release { success: false }, None)
    }

    /// Ends the lease with `fate`, recording `attempt` in the same transaction.
    pub fn finish(mut self, fate: &Fate, attempt: Option<&Attempt>) -> Result<()> {
        self.end(fate, attempt)
    }

    /// Rate-limited: the key is not claimed again before `until_ms` (unix ms).
    pub fn lockdown(mut self, until_ms: i64, reason: impl Into<String>, http_status: Option<u16>) -> Result<()> {
        self.end(&Fate::Lockdown { until: until_ms, reason: reason.into(), http_status }, None)
    }

    /// Permanently bad: never claimed again until cleanup or a new secret.
    pub fn mark_error(mut self, reason: impl Into<String>, http_status: Option<u16>) -> Result<()> {
        self.end(&Fate::Error { reason: reason.into(), http_status }, None)
    }

    fn end(&mut self, fate: &Fate, attempt: Option<&Attempt>) -> Result<()> {
        self.ended = true;
        let inner = &self.coordinator.inner;
        inner.leases.remove(self.claimed.id, self.claimed.lease);
        let ended = inner.store.end_lease(self.claimed.id, self.claimed.lease, fate, attempt, inner.clock.now_ms())?;
        if !ended {
            return Err(self.lost());
        }
        tracing::info!(
            connector = %self.connector, key = %self.claimed.key_name, fingerprint = %self.claimed.fingerprint,
            lease = self.claimed.lease, fate = ?fate, "lease ended"
        );
        Ok(())
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            connector: self.connector.clone(),
            key: self.claimed.key_name.clone(),
            lease: self.claimed.lease,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended
            && let Err(error) = self.end(&Fate::Release { success: false }, None)
        {
            tracing::warn!(error = %error, "releasing a dropped lease failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_sent_before_a_claim_does_not_declare_it_lost() {
        let registry = Registry::default();
        let sent = Instant::now();
        let claimed_after = registry.insert(7, 3);
        registry.renew(&[], sent);
        assert!(!claimed_after.lost.load(Ordering::SeqCst), "registered after the heartbeat was sent");
        let later = Instant::now();
        registry.renew(&[], later);
        assert!(claimed_after.lost.load(Ordering::SeqCst), "missing from a heartbeat sent after its claim");
    }

    #[test]
    fn a_heartbeat_naming_the_lease_renews_it() {
        let registry = Registry::default();
        let liveness = registry.insert(1, 5);
        let sent = Instant::now();
        registry.renew(&[(1, 5)], sent);
        assert!(!liveness.lost.load(Ordering::SeqCst));
        assert_eq!(*liveness.renewed.lock().expect("lock"), sent);
        registry.renew(&[(1, 6)], Instant::now());
        assert!(liveness.lost.load(Ordering::SeqCst), "another lease token on the key means ours is gone");
    }
}
