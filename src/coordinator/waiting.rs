//! The waiters of one process: callers that found no key free and wait for one, first come first
//! served, watched by one thread however many there are.
//!
//! Invariants:
//! - Waiting costs no thread per waiter: a waiter is an entry in a queue and a channel to answer it
//!   on (an async caller awaits it without holding a thread). One watcher thread per coordinator runs
//!   while anyone waits and ends when nobody does.
//! - The watcher reads SQLite's `data_version` every [`POLL`] (PostgreSQL's newest rows every 25 ms,
//!   a round trip each: `ChangeWatch::interval`): it changes exactly when another
//!   connection commits (a key freed by this process or another, a reap, a sync). Only then, at a
//!   deadline that matters to a waiter (its own, the earliest lockdown end of its model), or every
//!   [`RECHECK`] as a safety net, does it read availability and claim (where claims run side by side,
//!   PostgreSQL's, it claims first and reads availability only when a claim finds no key, at most
//!   every [`RECHECK`] for one request, at once when a waiter arrives).
//! - A key that comes free goes to the longest waiter that can use it: waiters of one connector, model
//!   and exclusion list are served in arrival order, and groups in the order of their oldest waiter.
//! - Every waiter is answered by its own deadline: the watcher's claims wait for the write lock only
//!   until the earliest deadline among the waiters, and a wait that cannot succeed (every key in
//!   error, or locked down for the model past the caller's whole wait) is answered at once.
//! - A database server out of reach (restarting, failing over, cut off) answers nobody early: waiters
//!   wait on through it, as through a held write lock, and hear of it only at their own deadline.
//! - A waiter that went away (a cancelled request) is dropped from the queue; a key claimed for it
//!   just as it went is given back at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Coordinator, Inner};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::pool::Availability;
use crate::pool::Unavailable;

/// How often the watcher reads `data_version` while anyone waits.
const POLL: Duration = Duration::from_millis(1);

/// The longest the watcher goes without reading availability while anyone waits (an injected clock
/// that moves, a lockdown cleared by hand in a way `data_version` would show anyway).
const RECHECK: Duration = Duration::from_millis(250);

/// Where a waiter's answer goes.
#[derive(Debug)]
enum Reply {
    /// A thread blocked in [`Coordinator::claim_for`].
    Thread(std::sync::mpsc::SyncSender<Result<Lease>>),
    /// An async caller, which may go away (its receiver dropped).
    Task(oneshot::Sender<Result<Lease>>),
}

/// A [`ClaimFor`](crate::store::ClaimFor) that owns its parts, to keep in the queue or move to
/// another thread.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OwnedClaim {
    connector: String,
    model: Option<String>,
    tried: Vec<String>,
    pin: Option<String>,
    tokens: u64,
}

impl OwnedClaim {
    fn of(claim: crate::store::ClaimFor<'_>) -> Self {
        Self {
            connector: claim.connector.to_owned(),
            model: claim.model.map(str::to_owned),
            tried: claim.tried.to_vec(),
            pin: claim.pin.map(str::to_owned),
            tokens: claim.tokens,
        }
    }

    fn as_claim_for(&self) -> crate::store::ClaimFor<'_> {
        let (connector, model, tried, pin) = (&self.connector, self.model.as_deref(), &self.tried, self.pin.as_deref());
        crate::store::ClaimFor { connector, model, tried, pin, tokens: self.tokens }
    }
}

/// One caller waiting for a key.
#[derive(Debug)]
struct Waiter {
    /// What it waits for.
    claim: OwnedClaim,
    /// When it asked (its message says how long it waited since).
    started: Instant,
    /// When its wait for a key ends.
    deadline: Instant,
    /// When its wait for the write lock ends (its deadline, never less than the store's floor).
    lock_deadline: Instant,
    reply: Mutex<Option<Reply>>,
}

impl Waiter {
    fn same_request(&self, other: &Waiter) -> bool {
        self.claim == other.claim
    }

    /// What it waits for, as the store takes it.
    fn claim_for(&self) -> crate::store::ClaimFor<'_> {
        self.claim.as_claim_for()
    }

    /// Whether nobody waits for the answer any more (answered, or its caller went away).
    fn gone(&self) -> bool {
        match &*self.reply.lock().unwrap_or_else(PoisonError::into_inner) {
            None => true,
            Some(Reply::Task(sender)) => sender.is_closed(),
            Some(Reply::Thread(_)) => false,
        }
    }

    /// Answers the waiter; a lease nobody takes any more is dropped, which gives the key back.
    fn answer(&self, answer: Result<Lease>) {
        let reply = self.reply.lock().unwrap_or_else(PoisonError::into_inner).take();
        match reply {
            Some(Reply::Thread(sender)) => drop(sender.send(answer)),
            Some(Reply::Task(sender)) => drop(sender.send(answer)),
            None => drop(answer),
        }
    }
}

/// The queue of waiters of one coordinator, and whether its watcher runs.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    state: Mutex<Queue>,
    /// Wakes the watcher: a new waiter, or a key freed by this process.
    poked: Condvar,
    /// Async claims running in place (on a runtime thread that blocks meanwhile).
    in_place: std::sync::atomic::AtomicUsize,
}

/// How many async claims may run in place at once; more go to the queue, so a burst of requests does
/// not turn into a burst of threads.
const IN_PLACE: usize = 2;

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Arc<Waiter>>,
    watching: bool,
    poked: bool,
    /// Where claims run side by side, for each request whose claim last found no key: when
    /// availability was read for it, and when it said to look again (the earliest lockdown end). Read
    /// again after [`RECHECK`], or at once when a waiter arrives: a round that finds no key otherwise
    /// costs one claim, not a claim and a read.
    unavailable: HashMap<OwnedClaim, (Instant, Option<Instant>)>,
}

impl Waiters {
    /// Has the watcher look at once (a key of this process was freed, a waiter arrived).
    pub(crate) fn poke(&self) {
        let mut queue = self.queue();
        if !queue.waiting.is_empty() {
            queue.poked = true;
            self.poked.notify_one();
        }
    }

    /// Whether a caller of `connector` may claim in place: nobody of this process waits for its keys
    /// (a newcomer must not take a key from under the longest waiter).
    fn nobody_waits(&self, connector: &str) -> bool {
        !self.queue().waiting.iter().any(|waiter| waiter.claim.connector == connector)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a claim for one request needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request<'a> {
    /// What it asks for, as the store takes it.
    pub(super) claim: crate::store::ClaimFor<'a>,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
}

impl<'a> Request<'a> {
    /// What it asks for, as the store takes it.
    pub(super) fn claim_for(&self) -> crate::store::ClaimFor<'a> {
        self.claim
    }
}

/// A [`Request`] that owns its parts, to move to another thread.
pub(super) struct OwnedRequest {
    claim: OwnedClaim,
    started: Instant,
    deadline: Instant,
}

impl Request<'_> {
    fn owned(self) -> OwnedRequest {
        OwnedRequest { claim: OwnedClaim::of(self.claim), started: self.started, deadline: self.deadline }
    }
}

impl OwnedRequest {
    fn as_request(&self) -> Request<'_> {
        Request { claim: self.claim.as_claim_for(), started: self.started, deadline: self.deadline }
    }
}

impl Coordinator {
    /// A key for `request` on this thread: claimed in place when nobody of this process waits for
    /// the connector's keys, else (or if none is free) from the queue, the caller blocking on it.
    pub(super) fn claim_on_thread(&self, request: &Request<'_>) -> Result<Lease> {
        if (request.deadline <= request.started || self.inner.waiters.nobody_waits(request.claim.connector))
            && let Some(lease) = waiting_if_unreachable(self.try_claim(request), request)?
        {
            return Ok(lease);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.enqueue(request, Reply::Thread(sender));
        // The watcher answers by the deadline (a watcher that panics answers every waiter first).
        receiver.recv().unwrap_or_else(|_| Err(watcher_gone(request.claim.connector)))
    }

    /// A key for `request` for an async caller: claimed in place (blocking the runtime thread briefly)
    /// when nobody of this process waits for the connector's keys and few claims run in place, else
    /// (or if none is free) from the queue, where no thread is held while it waits. Dropping the
    /// future takes the waiter out of the queue (or gives back the key claimed for it).
    pub(super) async fn claim_as_task(&self, request: &Request<'_>) -> Result<Lease> {
        let waiters = &self.inner.waiters;
        let in_place = waiters.in_place.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < IN_PLACE;
        // Counted out however this future ends: dropped while its claim runs on the blocking pool
        // (a current-thread runtime), the count would otherwise stay up for good.
        let counted = InPlace(&waiters.in_place);
        let first = (in_place && waiters.nobody_waits(request.claim.connector)) || request.deadline <= request.started;
        let claimed = if first {
            let coordinator = self.clone();
            let owned = request.owned();
            crate::offload::short_blocking(move || coordinator.try_claim(&owned.as_request())).await
        } else {
            Ok(None)
        };
        drop(counted);
        if let Some(lease) = waiting_if_unreachable(claimed, request)? {
            return Ok(lease);
        }
        let (sender, receiver) = oneshot::channel();
        self.enqueue(request, Reply::Task(sender));
        receiver.await.unwrap_or_else(|_| Err(watcher_gone(request.claim.connector)))
    }

    fn enqueue(&self, request: &Request<'_>, reply: Reply) {
        tracing::debug!(connector = request.claim.connector, "waiting for a free key");
        let waiter = Arc::new(Waiter {
            claim: OwnedClaim::of(request.claim),
            started: request.started,
            deadline: request.deadline,
            lock_deadline: self.inner.backend.lock_deadline(request.started, request.deadline),
            reply: Mutex::new(Some(reply)),
        });
        let waiters = &self.inner.waiters;
        let mut queue = waiters.queue();
        queue.waiting.push_back(waiter);
        queue.unavailable.clear();
        queue.poked = true;
        waiters.poked.notify_one();
        if !queue.watching {
            queue.watching = true;
            let inner = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new().name("apijongler-waiters".to_owned()).spawn(move || watch(inner));
            if let Err(error) = spawned {
                queue.watching = false;
                let waiting: Vec<_> = queue.waiting.drain(..).collect();
                drop(queue);
                for waiter in waiting {
                    waiter.answer(Err(Error::InvalidRequest {
                        problem: format!("cannot start the thread that watches for free keys: {error}"),
                    }));
                }
            }
        }
    }

    /// One round of the watcher: answers the waiters it can (a key, or why none will come in time)
    /// and returns when it must look again at the latest.
    fn serve_waiters(&self) -> Instant {
        let now = Instant::now();
        let waiting: Vec<Arc<Waiter>> = {
            let mut queue = self.inner.waiters.queue();
            queue.waiting.retain(|waiter| !waiter.gone());
            queue.waiting.iter().cloned().collect()
        };
        let mut next = now + RECHECK;
        let Some(earliest) = waiting.iter().map(|waiter| waiter.lock_deadline).min() else { return next };
        // Claims wait for the lock until the earliest deadline, so nobody is answered late for it.
        let lock_deadline = earliest.min(now + RECHECK).max(now + POLL);
        // Why no waiter could be served this round: the write lock held past the round's wait, or the
        // server out of reach. Waiters then go on waiting, and hear of it only at their deadline.
        let mut stalled: Option<Error> = None;
        let mut served: Vec<bool> = vec![false; waiting.len()];
        for (first, waiter) in waiting.iter().enumerate() {
            if served[first] || waiting[..first].iter().any(|earlier| earlier.same_request(waiter)) {
                continue;
            }
            let group: Vec<usize> = (first..waiting.len()).filter(|&i| waiting[i].same_request(waiter)).collect();
            let outcome = self.serve_group(&waiting, &group, lock_deadline, &mut served);
            match outcome {
                Ok(Some(wake)) => next = next.min(wake),
                Ok(None) => {}
                Err(error @ (Error::DatabaseLocked { .. } | Error::DatabaseUnreachable { .. })) => {
                    tracing::debug!(%error, "no key this round: the waiters wait on");
                    stalled = Some(error);
                    next = next.min(Instant::now() + POLL);
                    break;
                }
                // The oldest waiter hears of it; the others meet it (or its end) in the next rounds.
                Err(error) => {
                    if let Some(&i) = group.iter().find(|&&i| !served[i]) {
                        served[i] = true;
                        waiting[i].answer(Err(error));
                    }
                    next = next.min(Instant::now() + POLL);
                }
            }
        }
        // Whoever is past its deadline now hears why.
        let now = Instant::now();
        for (i, waiter) in waiting.iter().enumerate() {
            if served[i] {
                continue;
            }
            let due = if matches!(stalled, Some(Error::DatabaseLocked { .. })) {
                waiter.lock_deadline
            } else {
                waiter.deadline
            };
            if due <= now {
                served[i] = true;
                let answer = match &stalled {
                    Some(Error::DatabaseLocked { path, operation, .. }) => {
                        Err(Error::DatabaseLocked { path: path.clone(), operation, waited: waiter.started.elapsed() })
                    }
                    Some(Error::DatabaseUnreachable { path, operation, hint, source }) => {
                        let source = std::io::Error::other(source.to_string());
                        Err(Error::DatabaseUnreachable {
                            path: path.clone(),
                            operation,
                            hint,
                            source: Box::new(source),
                        })
                    }
                    _ => self.unavailable(waiter),
                };
                waiter.answer(answer);
            } else {
                next = next.min(due);
            }
        }
        let mut queue = self.inner.waiters.queue();
        queue.waiting.retain(|waiter| !waiter.gone());
        next
    }

    /// Serves the waiters `group` (indexes into `waiting`, oldest first) of one request: claims keys
    /// for them while some are free, answers at once those whose wait cannot succeed, and returns when
    /// the earliest lockdown that matters to them ends.
    ///
    /// Where claims queue for one write lock (SQLite), availability is read first (reads run beside
    /// the lock) and only what it calls claimable is claimed. Where claims run side by side
    /// (PostgreSQL), the claim comes first and availability is read only when it finds no key, at most
    /// every [`RECHECK`] for one request (at once when a waiter arrives): when many processes wait for
    /// few keys, each freed key sends every one of them to look, and a look is then one claim.
    fn serve_group(
        &self,
        waiting: &[Arc<Waiter>],
        group: &[usize],
        lock_deadline: Instant,
        served: &mut [bool],
    ) -> Result<Option<Instant>> {
        let first = &waiting[group[0]];
        self.reap_if_due(&first.claim.connector)?;
        let store = &self.inner.backend;
        let claim_first = store.claims_in_parallel();
        let mut pending: VecDeque<usize> = group.iter().copied().filter(|&i| !served[i]).collect();
        loop {
            if pending.is_empty() {
                return Ok(None);
            }
            let excluded = self.inner.passing.excluding(&first.claim.connector, &first.claim.tried);
            let request = super::excluding(first.claim_for(), excluded.as_deref());
            let mut count = pending.len();
            if !claim_first {
                let now_ms = self.now_ms();
                let availability = store.availability(request, now_ms)?;
                if availability.claimable == 0 {
                    return Ok(self.answer_hopeless(waiting, &pending, served, &availability, now_ms));
                }
                count = count.min(usize::try_from(availability.claimable).unwrap_or(0));
            }
            let claimed = store.claim_several(request, count, self.inner.holder, &*self.inner.clock, lock_deadline)?;
            let short = claimed.len() < count;
            // Every key a lease before any is given back or handed out: one that waits its turn is known
            // to this process (see `lease::is_own`), and any left when this returns early is released.
            let leases: Vec<Lease> =
                claimed.into_iter().map(|claimed| self.lease(&first.claim.connector, claimed)).collect();
            if !leases.is_empty() {
                self.ensure_heartbeat();
            }
            let mut passed_over = false;
            for lease in leases {
                if !self.inner.passing.serves(&first.claim.connector, lease.key_name(), lease.fingerprint()) {
                    // Given back unused; the next round claims without it.
                    lease.release()?;
                    passed_over = true;
                    continue;
                }
                let Some(next) = pending.pop_front() else { break };
                served[next] = true;
                let waiter = &waiting[next];
                tracing::info!(
                    connector = %waiter.claim.connector, key = %lease.key_name(), fingerprint = %lease.fingerprint(),
                    lease = lease.token(), waited = ?waiter.started.elapsed(), "key claimed for a waiter"
                );
                waiter.answer(Ok(lease));
            }
            if !short || passed_over {
                continue;
            }
            if !claim_first {
                // Taken by someone else since the read: its commit will wake the watcher again.
                return Ok(None);
            }
            // No key free now: why, and until when, as last read unless that is old.
            if let Some(&(read_at, wake)) = self.inner.waiters.queue().unavailable.get(&first.claim)
                && read_at.elapsed() < RECHECK
            {
                return Ok(wake);
            }
            let now_ms = self.now_ms();
            let availability = store.availability(request, now_ms)?;
            if availability.claimable > 0 {
                // Freed since the claim: the commit that freed it wakes the watcher again.
                return Ok(None);
            }
            let wake = self.answer_hopeless(waiting, &pending, served, &availability, now_ms);
            self.inner.waiters.queue().unavailable.insert(first.claim.clone(), (Instant::now(), wake));
            return Ok(wake);
        }
    }

    /// With no key claimable (`availability`, read at `now_ms`), answers the waiters of `pending`
    /// whose wait cannot succeed, and returns when the earliest lockdown that matters to them ends.
    fn answer_hopeless(
        &self,
        waiting: &[Arc<Waiter>],
        pending: &VecDeque<usize>,
        served: &mut [bool],
        availability: &Availability,
        now_ms: i64,
    ) -> Option<Instant> {
        let wake = lockdown_end(availability, now_ms);
        for &i in pending {
            if hopeless(availability, wake, waiting[i].deadline) {
                served[i] = true;
                waiting[i].answer(self.unavailable(&waiting[i]));
            }
        }
        wake
    }

    /// Why no key came for `waiter`, read now.
    fn unavailable(&self, waiter: &Waiter) -> Result<Lease> {
        let at = self.now_ms();
        let excluded = self.inner.passing.excluding(&waiter.claim.connector, &waiter.claim.tried);
        let availability =
            self.inner.backend.availability(super::excluding(waiter.claim_for(), excluded.as_deref()), at)?;
        let passed_over = self.inner.passing.of(&waiter.claim.connector);
        Err(Error::NoKeyAvailable(Box::new(Unavailable {
            availability,
            waited: waiter.started.elapsed(),
            at,
            passed_over,
        })))
    }
}

/// The error of a waiter whose watcher stopped (a panic) before it could answer.
/// What the claim in place (`claimed`) of `request` means for its caller: a server out of reach
/// before the caller's deadline sends it to wait with the others (the watcher tries again).
fn waiting_if_unreachable(claimed: Result<Option<Lease>>, request: &Request<'_>) -> Result<Option<Lease>> {
    match claimed {
        Err(error @ Error::DatabaseUnreachable { .. }) if Instant::now() < request.deadline => {
            tracing::warn!(%error, "waiting for the database server until the claim's deadline");
            Ok(None)
        }
        claimed => claimed,
    }
}

fn watcher_gone(connector: &str) -> Error {
    Error::InvalidRequest { problem: format!("the thread watching for a free key of '{connector}' stopped; try again") }
}

/// When the earliest lockdown that keeps a key from the request ends, as an instant.
pub(super) fn lockdown_end(availability: &Availability, now_ms: i64) -> Option<Instant> {
    let end = availability.earliest_lockdown_end?;
    Some(Instant::now() + Duration::from_millis(u64::try_from(end - now_ms).unwrap_or(0)))
}

/// Whether a wait until `deadline` cannot end with a key: nothing held that could come back, and no
/// lockdown that ends before the deadline (every key in error, retired, or locked down past it).
pub(super) fn hopeless(availability: &Availability, lockdown_end: Option<Instant>, deadline: Instant) -> bool {
    if !availability.may_free_up() {
        return true;
    }
    availability.locked == 0 && lockdown_end.is_none_or(|end| end >= deadline)
}

/// The watcher thread: rounds of [`Coordinator::serve_waiters`] on each change, poke or deadline, until
/// nobody waits or the coordinator is gone.
fn watch(inner: Weak<Inner>) {
    let _unwinding = Unwinding(inner.clone());
    let watch = match inner.upgrade() {
        Some(inner) => inner.backend.watch_changes(),
        None => return,
    };
    let mut changes = match watch {
        Ok(changes) => Some(changes),
        Err(error) => {
            tracing::warn!(error = %error, "cannot watch the database for changes; waiters poll");
            None
        }
    };
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let coordinator = Coordinator { inner: strong };
        let next = coordinator.serve_waiters();
        let waiters = &coordinator.inner.waiters;
        let mut queue = waiters.queue();
        loop {
            if queue.waiting.is_empty() {
                queue.watching = false;
                return;
            }
            if std::mem::take(&mut queue.poked) {
                break;
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            let look_every = changes.as_ref().map_or(POLL, |changes| changes.interval().max(POLL));
            queue =
                waiters.poked.wait_timeout(queue, look_every.min(next - now)).unwrap_or_else(PoisonError::into_inner).0;
            if queue.poked {
                continue;
            }
            // A commit by any other connection: keys may have come free.
            let changed = changes.as_mut().is_none_or(|changes| changes.changed().unwrap_or(true));
            if changed {
                break;
            }
        }
    }
}

/// Held by the watcher thread: if it panics, the waiters hear of it (their senders live in the queue,
/// not in the thread) and the next waiter starts a new watcher.
struct Unwinding(Weak<Inner>);

impl Drop for Unwinding {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(inner) = self.0.upgrade() else { return };
        let waiting: Vec<Arc<Waiter>> = {
            let mut queue = inner.waiters.queue();
            queue.watching = false;
            queue.waiting.drain(..).collect()
        };
        for waiter in waiting {
            waiter.answer(Err(watcher_gone(&waiter.claim.connector)));
        }
    }
}

/// One async claim counted in [`Waiters::in_place`] until dropped.
struct InPlace<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
