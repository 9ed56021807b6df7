//! A held key, the heartbeat that renews exactly the leases this process holds, and the settling of
//! leases whose end could not be written at once.
//!
//! Invariants:
//! - The heartbeat renews exactly the `(key, lease token)` pairs registered here, never "every key
//!   this pid holds", so a key whose end failed is never kept alive by accident; a lease missing from
//!   the heartbeat's answer was lost (reaped, or taken by `cleanup --force`).
//! - A lease is trusted for `trust_window` (a margin short of the reaper's `stale_after`) after the
//!   last write that confirmed it, measured on the boot clock (which counts a SIGSTOP, a suspend, and
//!   cannot step). Every send checks it first ([`Lease::check`]), and checks it again as late as it
//!   can: a request's body is released only on an established connection, right before its bytes are
//!   written, while the lease is still trusted (the `gate` module). What remains is the write itself;
//!   for a request without a body, connection setup too (see the README).
//! - A lease found lost (the heartbeat's answer lacks it, or the database is gone) wakes whoever
//!   watches it (a relayed stream, which then ends): [`LeaseLiveness::mark_lost`].
//! - An end (release, lockdown, error) that cannot be written (disk full, a lock held too long) is
//!   kept, with its attempt row, and retried by the heartbeat thread until it lands, so the key
//!   comes back without waiting for this process to exit. A lease dropped on an async runtime is
//!   ended the same way, off the runtime's threads.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::holder::own_leases;
use crate::pool::{Attempt, Claimed, Fate, Lockdown};
use crate::store::Backend;
use crate::trust::{LeaseLiveness, Trust};

/// What a lease needs from the coordinator that made it: the coordinator implements it, so that this
/// module never reaches up into the coordinator (the dependency points one way).
pub(crate) trait LeaseOwner: Send + Sync + std::fmt::Debug {
    /// The database the lease lives in.
    fn store(&self) -> &dyn Backend;
    /// The clock every write of the lease is stamped with.
    fn clock(&self) -> &Arc<dyn Clock>;
    /// The leases of this process, and the ends still to be written.
    fn leases(&self) -> &Registry;
    /// How long a lease is trusted after its last renewal.
    fn trust_window(&self) -> Duration;
    /// A key of this process was freed: its waiters look at once rather than at their next poll.
    fn key_freed(&self);
    /// Ends wait to be written: the heartbeat thread (started if need be) writes them now.
    fn wake_heartbeat(self: Arc<Self>);
    /// Ok in the process that created the owner; [`Error::ForkedChild`] in a child forked from it,
    /// where the owner's threads and connections do not exist and its leases are the parent's.
    fn alive_here(&self) -> Result<()>;
}

/// A lease end that could not be written yet; retried until it lands or the lease turns out lost.
#[derive(Debug)]
struct Unsettled {
    /// Keeps the coordinator (its store and heartbeat thread) alive until the end lands, even when the
    /// lease outlived every other handle on it.
    _keep_alive: Arc<dyn LeaseOwner>,
    id: i64,
    lease: i64,
    key_name: String,
    fate: Fate,
    attempt: Option<Attempt>,
}

/// Counts lease `token` of key `id` as this process's, whatever coordinator claimed it. A key the
/// database shows held by this very process under a lease not counted is one whose claim committed
/// while its answer was lost with the connection: the reaper frees it once its heartbeat is stale
/// (`reaper::verdict`). A pair is counted until its end's write answered ([`disown`]), so an end in
/// progress is never taken. Keyed by `(id, lease)` alone: two databases sharing a pair only keep an
/// orphan longer.
fn own(id: i64, token: i64) {
    *own_leases().entry((id, token)).or_default() += 1;
}

fn disown(id: i64, token: i64) {
    let mut leases = own_leases();
    if let Some(count) = leases.get_mut(&(id, token)) {
        *count -= 1;
        if *count == 0 {
            leases.remove(&(id, token));
        }
    }
}

/// Whether this process holds lease `token` of key `id`, or is still ending it.
pub(crate) fn is_own(id: i64, token: i64) -> bool {
    own_leases().contains_key(&(id, token))
}

/// The leases this process holds, by key row id, and the ends still to be written.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// By `(key id, lease token)`: a key lost and claimed again by this process is two leases.
    held: Mutex<HashMap<(i64, i64), Arc<LeaseLiveness>>>,
    unsettled: Mutex<Vec<Unsettled>>,
    /// Held for a whole settling pass, so that a caller waiting for the ends to land (a process about
    /// to exit) also waits for the pass another thread is in the middle of.
    settling: Mutex<()>,
}

impl Registry {
    fn insert(&self, id: i64, token: i64, claimed_boot_ms: i64) -> Arc<LeaseLiveness> {
        let liveness = Arc::new(LeaseLiveness::new(claimed_boot_ms));
        own(id, token);
        self.held().insert((id, token), Arc::clone(&liveness));
        liveness
    }

    fn remove(&self, id: i64, token: i64) {
        self.held().remove(&(id, token));
    }

    /// Whether the heartbeat thread has anything to do.
    fn is_idle(&self) -> bool {
        self.held().is_empty() && self.unsettled().is_empty()
    }

    /// The `(id, token)` pairs to renew.
    fn to_renew(&self) -> Vec<(i64, i64)> {
        self.held().keys().copied().collect()
    }

    /// Applies a heartbeat's answer to the leases it `asked` about: those `still_held` are renewed as
    /// of `sent_boot_ms`, the others are lost. Leases registered since it was sent are not judged.
    fn renew(&self, asked: &[(i64, i64)], still_held: &[(i64, i64)], sent_boot_ms: i64) {
        let leases = self.held();
        for pair @ (_, token) in asked {
            let Some(liveness) = leases.get(pair) else { continue };
            if still_held.contains(pair) {
                liveness.renewed_at(sent_boot_ms);
            } else if liveness.mark_lost() {
                tracing::warn!(lease = token, "lease lost: the key was reaped or cleaned up");
            }
        }
    }

    fn defer(&self, unsettled: Unsettled) {
        self.unsettled().push(unsettled);
    }

    /// Writes every deferred end it can; the ones that still fail stay for the next try.
    fn settle(&self, store: &dyn Backend, clock: &dyn Clock) -> usize {
        let _pass = self.settling.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = std::mem::take(&mut *self.unsettled());
        let mut failed = Vec::new();
        for end in pending {
            match store.end_lease(end.id, end.lease, &end.fate, end.attempt.as_ref(), clock.now_ms()) {
                Ok(true) => {
                    disown(end.id, end.lease);
                    tracing::info!(key = %end.key_name, lease = end.lease, fate = ?end.fate, "deferred lease end written")
                }
                Ok(false) => {
                    disown(end.id, end.lease);
                    tracing::warn!(key = %end.key_name, lease = end.lease, "deferred lease end: the lease was already lost")
                }
                Err(error) => {
                    tracing::warn!(key = %end.key_name, lease = end.lease, error = %error, "lease end still cannot be written; will retry");
                    failed.push(end);
                }
            }
        }
        let left = failed.len();
        self.unsettled().extend(failed);
        left
    }

    /// Marks every lease in `asked` lost: the database they were held in is gone.
    fn lose(&self, asked: &[(i64, i64)]) {
        let leases = self.held();
        for pair in asked {
            if let Some(liveness) = leases.get(pair) {
                liveness.mark_lost();
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), Arc<LeaseLiveness>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, Vec<Unsettled>> {
        self.unsettled.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How the coordinator talks to its heartbeat thread: a message wakes it early (to write deferred
/// lease ends); dropping the sender, with the coordinator, ends it.
pub(crate) type HeartbeatWaker = mpsc::Sender<()>;

/// Starts the heartbeat thread of a coordinator.
pub(crate) fn start_heartbeat(owner: Weak<dyn LeaseOwner>, interval: Duration) -> HeartbeatWaker {
    let (waker, woken) = mpsc::channel::<()>();
    let spawned = thread::Builder::new().name("apijongler-heartbeat".into()).spawn(move || {
        loop {
            match woken.recv_timeout(interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(owner) = owner.upgrade() else { return };
            let (store, clock, leases) = (owner.store(), owner.clock(), owner.leases());
            if leases.is_idle() {
                continue;
            }
            // Renew first: a deferred end that waits for a lock must not delay the leases in use.
            let asked = leases.to_renew();
            match store.heartbeat(&asked, &**clock) {
                Ok((still_held, written_boot_ms)) => leases.renew(&asked, &still_held, written_boot_ms),
                Err(error @ Error::DatabaseReplaced { .. }) => {
                    tracing::error!(error = %error, "the database is gone: no held key may be used any more");
                    leases.lose(&asked);
                }
                Err(error) => tracing::warn!(error = %error, "heartbeat failed; will retry"),
            }
            leases.settle(store, &**clock);
        }
    });
    if let Err(error) = spawned {
        tracing::error!(error = %error, "cannot start the heartbeat thread; held keys will not be trusted for long");
    }
    waker
}

/// Writes the deferred lease ends of `owner` now, in the calling thread, until none is left or
/// `deadline` passes; returns how many are left.
pub(crate) fn settle_deferred(owner: &dyn LeaseOwner, deadline: Instant) -> usize {
    loop {
        let left = owner.leases().settle(owner.store(), &**owner.clock());
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// A key held by this process. Ends with [`release`](Lease::release), [`lockdown`](Lease::lockdown)
/// or [`mark_error`](Lease::mark_error); dropping it releases the key.
#[derive(Debug)]
pub struct Lease {
    owner: Arc<dyn LeaseOwner>,
    connector: String,
    claimed: Claimed,
    liveness: Arc<LeaseLiveness>,
    ended: bool,
}

impl Lease {
    pub(crate) fn new(owner: Arc<dyn LeaseOwner>, connector: &str, claimed: Claimed) -> Self {
        let liveness = owner.leases().insert(claimed.id, claimed.lease, claimed.boot_ms);
        Self { owner, connector: connector.to_owned(), claimed, liveness, ended: false }
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

    /// Whether the key may still be used: the lease was not reported lost, and the last write that
    /// confirmed it is recent enough on the boot clock that no reaper can have judged it stale yet
    /// (a process stopped longer than that must not trust a key it held before the stop).
    pub fn is_valid(&self) -> bool {
        self.owner.alive_here().is_ok() && self.trust().is_trusted()
    }

    /// The lease's trust, apart from the lease: what the last check before the bytes leave, and a
    /// relayed stream, watch.
    pub(crate) fn trust(&self) -> Trust {
        Trust::new(Arc::clone(&self.liveness), Arc::clone(self.owner.clock()), self.owner.trust_window())
    }

    /// Confirms the lease now with one conditional write: true (and trusted again) if it is still this
    /// process's, false if it was lost. For a lease whose trust ran out while this process could not
    /// heartbeat (stopped, or the database locked): if nobody took the key, there is no need to give it up.
    pub fn renew(&self) -> Result<bool> {
        self.owner.alive_here()?;
        let pair = (self.claimed.id, self.claimed.lease);
        let (still_held, written_boot_ms) = self.owner.store().heartbeat(&[pair], &**self.owner.clock())?;
        self.owner.leases().renew(&[pair], &still_held, written_boot_ms);
        Ok(still_held.contains(&pair) && self.is_valid())
    }

    /// Ok while the key may still be used; [`Error::LeaseLost`] once it must not be;
    /// [`Error::ForkedChild`] in a child forked after the claim (the key is the parent's).
    pub fn check(&self) -> Result<()> {
        self.owner.alive_here()?;
        if self.is_valid() { Ok(()) } else { Err(self.lost()) }
    }

    /// The key's row id.
    pub(crate) fn id(&self) -> i64 {
        self.claimed.id
    }

    /// The key's consecutive lockdowns for the model it was claimed for, before this lease (for
    /// escalating default lockdowns).
    pub fn lockdown_count(&self) -> i64 {
        self.claimed.lockdown_count
    }

    /// After a success for `model` on a key that is kept: its consecutive-lockdown count for that model
    /// starts again at 0.
    pub fn reset_escalation(&mut self, model: Option<&str>) -> Result<()> {
        self.owner.alive_here()?;
        if self.claimed.lockdown_count == 0 {
            return Ok(());
        }
        let now = self.owner.clock().now_ms();
        if !self.owner.store().reset_escalation(self.claimed.id, self.claimed.lease, model, now)? {
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

    /// Rate-limited: the key is not claimed again, for any model, before `until_ms` (unix ms).
    pub fn lockdown(mut self, until_ms: i64, reason: impl Into<String>, http_status: Option<u16>) -> Result<()> {
        self.end(&Fate::Lockdown(Lockdown::whole_key(until_ms, reason, http_status)), None)
    }

    /// Permanently bad: never claimed again until cleanup or a new secret.
    pub fn mark_error(mut self, reason: impl Into<String>, http_status: Option<u16>) -> Result<()> {
        self.end(&Fate::Error { reason: reason.into(), http_status, project: None }, None)
    }

    /// Ends the lease with `fate` later, off this thread: for a lease given up where no blocking
    /// write may happen (an async runtime's thread, a cancelled request). [`Coordinator::settle`]
    /// waits for such ends.
    pub(crate) fn end_later(mut self, fate: Fate, attempt: Option<Attempt>) {
        self.defer_end(fate, attempt);
    }

    /// Hands the end to the heartbeat thread, which writes it (and retries it) off this thread.
    fn defer_end(&mut self, fate: Fate, attempt: Option<Attempt>) {
        self.ended = true;
        self.owner.leases().remove(self.claimed.id, self.claimed.lease);
        self.owner.leases().defer(Unsettled {
            _keep_alive: Arc::clone(&self.owner),
            id: self.claimed.id,
            lease: self.claimed.lease,
            key_name: self.claimed.key_name.clone(),
            fate,
            attempt,
        });
        Arc::clone(&self.owner).wake_heartbeat();
    }

    fn end(&mut self, fate: &Fate, attempt: Option<&Attempt>) -> Result<()> {
        // Checked first: in a forked child the lease stays unended, so its drop leaves the parent's state be.
        self.owner.alive_here()?;
        self.ended = true;
        self.owner.leases().remove(self.claimed.id, self.claimed.lease);
        let ended = match self.owner.store().end_lease(
            self.claimed.id,
            self.claimed.lease,
            fate,
            attempt,
            self.owner.clock().now_ms(),
        ) {
            Ok(ended) => {
                disown(self.claimed.id, self.claimed.lease);
                ended
            }
            Err(error) => {
                // Not lost, not ended: the key stays locked under our live pid, so nobody else frees it.
                // Keep trying in the background; this caller still hears of the failure.
                tracing::warn!(key = %self.claimed.key_name, error = %error, "ending a lease failed; retrying in the background");
                self.defer_end(fate.clone(), attempt.cloned());
                return Err(error);
            }
        };
        if !ended {
            return Err(self.lost());
        }
        // A key this process freed goes to its longest waiter without waiting for the watcher's poll.
        self.owner.key_freed();
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
    /// Releases the key; on an async runtime's thread the write is left to the heartbeat thread, so no
    /// drop ever blocks a runtime.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if self.owner.alive_here().is_err() {
            // In a forked child the lease is the parent's: it stays held, by the parent, and the owner's
            // connections are never closed from here (nor by any other drop in the child).
            std::mem::forget(Arc::clone(&self.owner));
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.defer_end(Fate::Release { success: false }, None);
        } else if let Err(error) = self.end(&Fate::Release { success: false }, None) {
            tracing::warn!(error = %error, "releasing a dropped lease failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_judges_only_the_leases_it_asked_about() {
        let registry = Registry::default();
        let claimed_after = registry.insert(7, 3, 1_000);
        registry.renew(&[], &[], 2_000);
        assert!(!claimed_after.is_lost(), "not asked about: registered after the heartbeat was sent");
        registry.renew(&[(7, 3)], &[], 3_000);
        assert!(claimed_after.is_lost(), "asked about and missing from the answer");
    }

    #[test]
    fn a_heartbeat_naming_the_lease_renews_it() {
        let registry = Registry::default();
        let liveness = registry.insert(1, 5, 1_000);
        registry.renew(&[(1, 5)], &[(1, 5)], 4_000);
        assert!(!liveness.is_lost());
        assert_eq!(liveness.renewed_boot_ms(), 4_000);
        registry.renew(&[(1, 5)], &[(1, 5)], 2_000);
        assert_eq!(liveness.renewed_boot_ms(), 4_000, "an older answer never moves it back");
        let replaced = registry.insert(1, 6, 5_000);
        registry.renew(&[(1, 5)], &[], 6_000);
        assert!(!replaced.is_lost(), "an answer about token 5 says nothing of token 6");
        assert!(liveness.is_lost(), "while token 5, still registered, is lost");
    }

    #[test]
    fn only_registered_leases_are_renewed() {
        let registry = Registry::default();
        registry.insert(1, 5, 0);
        registry.insert(2, 9, 0);
        registry.remove(2, 8);
        let mut asked = registry.to_renew();
        asked.sort_unstable();
        assert_eq!(asked, vec![(1, 5), (2, 9)], "removing another token leaves the lease");
        registry.remove(2, 9);
        assert_eq!(registry.to_renew(), vec![(1, 5)]);
    }
}
