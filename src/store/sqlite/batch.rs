//! Group commit: the claims (or lease ends) that threads of one process ask for while another batch is
//! being written go into the next transaction together, so that under load one write lock serves
//! many of them instead of one.
//!
//! Invariants: an item is written at most once, by whichever caller leads when it is taken from the
//! queue; every caller gets the answer for its own item, and gets it by its own deadline whatever the
//! others of its batch do: a batch waits for the write lock only until the earliest deadline among its
//! items, the items whose deadline passed then get [`Written::Busy`]'s answer and the others go back
//! to the front of the queue, and a caller whose item is still queued at its deadline takes it out and
//! answers itself. A caller alone writes its item at once (no waiting for company), so a lone claim or
//! release costs what it cost before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use std::time::{Duration, Instant};

use super::{Attempt, Claimed, Fate};
use crate::error::Result;
use crate::holder::Holder;

/// One lease to end.
#[derive(Debug)]
pub(super) struct End {
    pub(super) id: i64,
    pub(super) lease: i64,
    pub(super) fate: Fate,
    pub(super) attempt: Option<Attempt>,
    pub(super) now: i64,
    /// The attempt's connector paces by limits: its reservation is settled with the answer's tokens.
    pub(super) settles: bool,
}

impl End {
    pub(super) fn new(id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Self {
        Self { id, lease, fate: fate.clone(), attempt: attempt.cloned(), now, settles: false }
    }

    /// The same end, settling the lease's reservation with the answer's tokens when `settles`.
    pub(super) fn settling(mut self, settles: bool) -> Self {
        self.settles = settles;
        self
    }
}

/// The lease ends of a store.
pub(super) type EndQueue = Batcher<End, Result<bool>>;

/// One claim to run.
#[derive(Debug)]
pub(super) struct Claim {
    pub(super) connector: String,
    pub(super) model: Option<String>,
    /// Key names not to take, as a JSON array.
    pub(super) tried: String,
    pub(super) holder: Holder,
    /// Only keys of this quota scope (a request naming a resource its project owns); `None`: any.
    pub(super) pin: Option<String>,
    /// What the connector's claims pace by (`None`: nothing).
    pub(super) pacing: Option<Arc<crate::pool::Pacing>>,
    /// The request's estimated input tokens, reserved against token limits.
    pub(super) tokens: u64,
}

impl Claim {
    /// A claim for a request of `connector` for `model`, taking none of `tried`, for `holder`.
    pub(super) fn new(request: crate::store::ClaimFor<'_>, holder: &Holder) -> Self {
        Self {
            connector: request.connector.to_owned(),
            model: request.model.map(str::to_owned),
            tried: super::json_list(request.tried).into_owned(),
            holder: holder.clone(),
            pin: request.pin.map(str::to_owned),
            pacing: None,
            tokens: request.tokens,
        }
    }

    /// The same claim, reserving against `pacing` when it has limits.
    pub(super) fn paced(mut self, pacing: Option<Arc<crate::pool::Pacing>>) -> Self {
        self.pacing = pacing.filter(|pacing| !pacing.is_empty());
        self
    }
}

/// The claims of a store.
pub(super) type ClaimQueue = Batcher<Claim, Result<Option<Claimed>>>;

/// A batch of queued claims.
pub(super) type Claims = [Arc<Queued<Claim, Result<Option<Claimed>>>>];

/// A batch of queued lease ends.
pub(super) type Ends = [Arc<Queued<End, Result<bool>>>];

/// What writing a batch came to.
#[derive(Debug)]
pub(super) enum Written<A> {
    /// Each item's answer, in order.
    Answers(Vec<A>),
    /// The write lock stayed held by someone else until the batch's deadline: nothing was written.
    Busy,
    /// The batch's transaction failed for another reason: its items are written again one by one, so
    /// one item's failure is its own.
    Failed,
}

/// An item queued with its deadline and the slot its answer goes to.
#[derive(Debug)]
pub(super) struct Queued<T, A> {
    pub(super) item: T,
    /// By when its caller must have an answer (its wait for the write lock ends there).
    pub(super) deadline: Instant,
    /// When its caller asked.
    pub(super) asked: Instant,
    /// Written in a batch of its own (after its batch failed for a reason other than the lock).
    alone: AtomicBool,
    answer: Mutex<Option<A>>,
}

impl<T, A> Queued<T, A> {
    /// How long its caller has waited so far.
    pub(super) fn waited(&self) -> Duration {
        self.asked.elapsed()
    }

    fn answer(&self, answer: A) {
        *self.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
    }

    fn take_answer(&self) -> Option<A> {
        self.answer.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The items not yet written, and whether a caller is writing a batch.
#[derive(Debug)]
pub(super) struct Batcher<T, A> {
    state: Mutex<State<T, A>>,
    written: Condvar,
}

#[derive(Debug)]
struct State<T, A> {
    pending: VecDeque<Arc<Queued<T, A>>>,
    leading: bool,
}

impl<T, A> Default for Batcher<T, A> {
    fn default() -> Self {
        Self { state: Mutex::new(State { pending: VecDeque::new(), leading: false }), written: Condvar::new() }
    }
}

impl<T, A> Batcher<T, A> {
    /// Queues `item` and returns its answer by `deadline`: written by this caller (with every item
    /// queued meanwhile) when nobody is writing, else by the caller who is, in a later batch. `write`
    /// writes a batch, waiting for the write lock until the deadline it is given at most; `expired`
    /// is the answer of an item whose deadline came before the lock did.
    pub(super) fn commit(
        &self,
        item: T,
        deadline: Instant,
        write: impl Fn(&[Arc<Queued<T, A>>], Instant) -> Written<A>,
        expired: impl Fn(&Queued<T, A>) -> A,
    ) -> A {
        let lock = || self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let asked = Instant::now();
        let queued =
            Arc::new(Queued { item, deadline, asked, alone: AtomicBool::new(false), answer: Mutex::new(None) });
        let mut state = lock();
        state.pending.push_back(Arc::clone(&queued));
        loop {
            if let Some(answer) = queued.take_answer() {
                return answer;
            }
            if state.leading {
                let now = Instant::now();
                let position = state.pending.iter().position(|other| Arc::ptr_eq(other, &queued));
                match position {
                    // Still queued at its deadline: nobody will write it in time.
                    Some(index) if now >= deadline => {
                        state.pending.remove(index);
                        return expired(&queued);
                    }
                    Some(_) => {
                        state =
                            self.written.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
                    }
                    // Being written: its batch gives up on the lock by its deadline at the latest.
                    None => state = self.written.wait(state).unwrap_or_else(PoisonError::into_inner),
                }
                continue;
            }
            state.leading = true;
            let batch: Vec<_> = match state.pending.front() {
                Some(first) if first.alone.load(Ordering::Relaxed) => state.pending.pop_front().into_iter().collect(),
                _ => {
                    let together = state.pending.iter().take_while(|item| !item.alone.load(Ordering::Relaxed)).count();
                    state.pending.drain(..together).collect()
                }
            };
            drop(state);
            let batch_deadline = batch.iter().map(|item| item.deadline).min().unwrap_or(deadline);
            // Answers are published even if the write panics: a follower must never wait forever.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&batch, batch_deadline)));
            state = lock();
            state.leading = false;
            match written {
                Ok(Written::Answers(answers)) => {
                    for (queued, answer) in batch.iter().zip(answers) {
                        queued.answer(answer);
                    }
                }
                Ok(Written::Busy) => {
                    let now = Instant::now();
                    for item in batch.iter().rev() {
                        if item.deadline <= now {
                            item.answer(expired(item));
                        } else {
                            state.pending.push_front(Arc::clone(item));
                        }
                    }
                }
                Ok(Written::Failed) => {
                    for item in batch.iter().rev() {
                        item.alone.store(true, Ordering::Relaxed);
                        state.pending.push_front(Arc::clone(item));
                    }
                }
                Err(panic) => {
                    // The others' items go back to the queue for the next leader.
                    for other in batch.iter().rev().filter(|other| !Arc::ptr_eq(other, &queued)) {
                        state.pending.push_front(Arc::clone(other));
                    }
                    self.written.notify_all();
                    drop(state);
                    std::panic::resume_unwind(panic);
                }
            }
            self.written.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    type Answer = Result<bool>;

    fn end(id: i64) -> End {
        End::new(id, 1, &Fate::Release { success: true }, None, 0)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// The answer of an item whose deadline came first: `Ok(false)`, told apart from the writes' `Ok(true)`.
    fn expired(_: &Queued<End, Answer>) -> Answer {
        Ok(false)
    }

    /// Keeps the first batch (end 0 alone) inside its write until ends 1 to 4 queued behind it.
    struct HeldWrite {
        entered: std::sync::Barrier,
        release: std::sync::Barrier,
    }

    impl HeldWrite {
        fn new() -> Self {
            Self { entered: std::sync::Barrier::new(2), release: std::sync::Barrier::new(2) }
        }

        /// Called by a write with its batch's ids: holds the first batch; true for it alone.
        fn hold(&self, ids: &[i64]) -> bool {
            if ids != [0] {
                return false;
            }
            self.entered.wait();
            self.release.wait();
            true
        }

        /// Commits end 0, and ends 1 to 4 while its write is held; lets the write go once all four are
        /// queued behind it. End 0 is answered `Ok(true)`; returns each other end's id and thread result.
        fn commit_behind<W>(&self, queue: &EndQueue, write: &W) -> Vec<(i64, std::thread::Result<Answer>)>
        where
            W: Fn(&[Arc<Queued<End, Answer>>], Instant) -> Written<Answer> + Sync,
        {
            std::thread::scope(|scope| {
                let first = scope.spawn(move || queue.commit(end(0), far(), write, expired));
                self.entered.wait();
                let others: Vec<_> =
                    (1..=4).map(|id| (id, scope.spawn(move || queue.commit(end(id), far(), write, expired)))).collect();
                // Wait until all four are queued behind the first write.
                while lock_len(queue) < 4 {
                    std::thread::yield_now();
                }
                self.release.wait();
                assert!(first.join().expect("first").expect("answer"));
                others.into_iter().map(|(id, other)| (id, other.join())).collect()
            })
        }
    }

    #[test]
    fn a_lone_end_is_written_at_once_by_its_caller() {
        let queue = EndQueue::default();
        let batches = AtomicUsize::new(0);
        let write = |ends: &[Arc<Queued<End, Answer>>], _| {
            batches.fetch_add(1, Ordering::SeqCst);
            Written::Answers(ends.iter().map(|end| Ok(end.item.id == 7)).collect())
        };
        assert!(queue.commit(end(7), far(), write, expired).expect("written"));
        assert_eq!(batches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn ends_asked_for_during_a_write_go_together_and_each_gets_its_own_answer() {
        let queue = EndQueue::default();
        let batches = Mutex::new(Vec::new());
        let held = HeldWrite::new();
        let write = |ends: &[Arc<Queued<End, Answer>>], _| {
            let ids: Vec<i64> = ends.iter().map(|end| end.item.id).collect();
            held.hold(&ids); // the first batch holds the write while the others queue
            batches.lock().expect("batches").push(ids.clone());
            Written::Answers(ids.iter().map(|id| Ok(id % 2 == 0)).collect())
        };
        for (id, answer) in held.commit_behind(&queue, &write) {
            assert_eq!(answer.expect("other").expect("answer"), id % 2 == 0, "end {id} got its own answer");
        }
        let batches = batches.into_inner().expect("batches");
        assert_eq!(batches.len(), 2, "the four queued ends went in one batch: {batches:?}");
        let mut second = batches[1].clone();
        second.sort_unstable();
        assert_eq!(second, [1, 2, 3, 4]);
    }

    /// While the lock stays held (every write waits until its batch's deadline, then says busy), each
    /// of 8 callers with its own deadline gets its answer at that deadline, not after the others'.
    #[test]
    fn under_a_lock_that_stays_held_each_caller_is_answered_by_its_own_deadline() {
        let queue = EndQueue::default();
        let write = |_: &[Arc<Queued<End, Answer>>], deadline: Instant| {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            Written::Busy
        };
        let start = Instant::now();
        // Deadlines 100, 200, ... 800 ms out; the leader's is the longest, so it waits out every other.
        let late: Vec<(i64, Duration)> = std::thread::scope(|scope| {
            let (queue, write) = (&queue, &write);
            let callers: Vec<_> = (1..=8)
                .rev()
                .map(|id| {
                    let deadline = start + Duration::from_millis(100 * id as u64);
                    scope.spawn(move || {
                        let answer = queue.commit(end(id), deadline, write, expired);
                        assert!(!answer.expect("answer"), "end {id} expired");
                        (id, Instant::now().saturating_duration_since(deadline))
                    })
                })
                .collect();
            callers.into_iter().map(|caller| caller.join().expect("caller")).collect()
        });
        // Answered at its own deadline: in sequence each would have waited for the ones before it
        // (the whole 800 ms for the shortest). The margin is for a loaded machine's scheduling.
        for (id, late) in late {
            assert!(late < Duration::from_millis(400), "end {id} answered {late:?} after its deadline");
        }
    }

    /// A batch that fails for a reason other than the lock is written again item by item, so one bad
    /// item fails alone.
    #[test]
    fn a_failed_batch_is_written_again_one_by_one() {
        let queue = EndQueue::default();
        let held = HeldWrite::new();
        let sizes = Mutex::new(Vec::new());
        let write =
            |ends: &[Arc<Queued<End, Answer>>], _| {
                let ids: Vec<i64> = ends.iter().map(|end| end.item.id).collect();
                sizes.lock().expect("sizes").push(ids.len());
                held.hold(&ids);
                if ids.contains(&3) && ids.len() > 1 {
                    return Written::Failed;
                }
                Written::Answers(
                    ids.iter()
                        .map(|id| {
                            if *id == 3 {
                                Err(crate::Error::InvalidRequest { problem: "bad".into() })
                            } else {
                                Ok(true)
                            }
                        })
                        .collect(),
                )
            };
        for (id, answer) in held.commit_behind(&queue, &write) {
            let answer = answer.expect("other");
            assert_eq!(answer.is_err(), id == 3, "end {id}: {answer:?}");
        }
        assert_eq!(sizes.into_inner().expect("sizes"), [1, 4, 1, 1, 1, 1]);
    }

    /// A write that panics takes down its own caller only: the other items of its batch go back to the
    /// queue and are written by the next leader.
    #[test]
    fn a_panicking_write_hands_the_rest_of_its_batch_to_the_next_leader() {
        let queue = EndQueue::default();
        let held = HeldWrite::new();
        let panicked = AtomicBool::new(false);
        let write = |ends: &[Arc<Queued<End, Answer>>], _| {
            let ids: Vec<i64> = ends.iter().map(|end| end.item.id).collect();
            if !held.hold(&ids) && ids.len() > 1 && !panicked.swap(true, Ordering::SeqCst) {
                panic!("the first batch of several fails");
            }
            Written::Answers(ids.iter().map(|_| Ok(true)).collect())
        };
        let outcomes: Vec<bool> =
            held.commit_behind(&queue, &write).into_iter().map(|(_, other)| other.is_ok()).collect();
        assert_eq!(outcomes.iter().filter(|answered| **answered).count(), 3, "{outcomes:?}");
    }

    fn lock_len(queue: &EndQueue) -> usize {
        queue.state.lock().expect("state").pending.len()
    }
}
