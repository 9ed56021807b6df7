//! Group commit: the claims (or lease ends) that threads of one process ask for while another batch is
//! being written go into the next transaction together, so that under load one write lock serves
//! many of them instead of one.
//!
//! Invariants: an item is written exactly once, by whichever caller leads when it is taken from the
//! queue; every caller gets the answer for its own item; a caller alone writes its item at once (no
//! waiting for company), so a lone claim or release costs what it cost before.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use std::time::Instant;

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
}

impl End {
    pub(super) fn new(id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Self {
        Self { id, lease, fate: fate.clone(), attempt: attempt.cloned(), now }
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
    /// How long it may wait for the write lock.
    pub(super) deadline: Instant,
}

/// The claims of a store.
pub(super) type ClaimQueue = Batcher<Claim, Result<Option<Claimed>>>;

/// A batch of queued claims.
pub(super) type Claims = [Arc<Queued<Claim, Result<Option<Claimed>>>>];

/// A batch of queued lease ends.
pub(super) type Ends = [Arc<Queued<End, Result<bool>>>];

/// An item queued with the slot its answer goes to.
#[derive(Debug)]
pub(super) struct Queued<T, A> {
    pub(super) item: T,
    answer: Mutex<Option<A>>,
}

/// The items not yet written, and whether a caller is writing a batch.
#[derive(Debug)]
pub(super) struct Batcher<T, A> {
    state: Mutex<State<T, A>>,
    written: Condvar,
}

#[derive(Debug)]
struct State<T, A> {
    pending: Vec<Arc<Queued<T, A>>>,
    leading: bool,
}

impl<T, A> Default for Batcher<T, A> {
    fn default() -> Self {
        Self { state: Mutex::new(State { pending: Vec::new(), leading: false }), written: Condvar::new() }
    }
}

impl<T, A> Batcher<T, A> {
    /// Queues `item` and returns its answer: written by this caller (with every item queued meanwhile)
    /// when nobody is writing, else by the caller who is, in its next batch. `write` answers each item
    /// of a batch, in order.
    pub(super) fn commit(&self, item: T, write: impl Fn(&[Arc<Queued<T, A>>]) -> Vec<A>) -> A {
        let lock = || self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let queued = Arc::new(Queued { item, answer: Mutex::new(None) });
        let mut state = lock();
        state.pending.push(Arc::clone(&queued));
        loop {
            if let Some(answer) = queued.answer.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return answer;
            }
            if state.leading {
                state = self.written.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.leading = true;
            let batch = std::mem::take(&mut state.pending);
            drop(state);
            // Answers are published even if the write panics: a follower must never wait forever.
            let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&batch)));
            state = lock();
            state.leading = false;
            match answers {
                Ok(answers) => {
                    for (queued, answer) in batch.iter().zip(answers) {
                        *queued.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
                    }
                }
                Err(panic) => {
                    // The others' items go back to the queue for the next leader.
                    state.pending.extend(batch.into_iter().filter(|other| !Arc::ptr_eq(other, &queued)));
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn end(id: i64) -> End {
        End::new(id, 1, &Fate::Release { success: true }, None, 0)
    }

    #[test]
    fn a_lone_end_is_written_at_once_by_its_caller() {
        let queue = EndQueue::default();
        let batches = AtomicUsize::new(0);
        let answer = queue.commit(end(7), |ends| {
            batches.fetch_add(1, Ordering::SeqCst);
            ends.iter().map(|end| Ok(end.item.id == 7)).collect()
        });
        assert!(answer.expect("written"));
        assert_eq!(batches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn ends_asked_for_during_a_write_go_together_and_each_gets_its_own_answer() {
        let queue = EndQueue::default();
        let batches = Mutex::new(Vec::new());
        let (entered, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let write = |ends: &[Arc<Queued<End, Result<bool>>>]| {
            let ids: Vec<i64> = ends.iter().map(|end| end.item.id).collect();
            if ids == [0] {
                entered.wait(); // the first batch holds the write while the others queue
                release.wait();
            }
            batches.lock().expect("batches").push(ids.clone());
            ids.iter().map(|id| Ok(id % 2 == 0)).collect()
        };
        std::thread::scope(|scope| {
            let (queue, write) = (&queue, &write);
            let first = scope.spawn(move || queue.commit(end(0), write));
            entered.wait();
            let others: Vec<_> = (1..=4).map(|id| scope.spawn(move || (id, queue.commit(end(id), write)))).collect();
            // Wait until all four are queued behind the first write.
            while lock_len(queue) < 4 {
                std::thread::yield_now();
            }
            release.wait();
            assert!(first.join().expect("first").expect("answer"));
            for other in others {
                let (id, answer) = other.join().expect("other");
                assert_eq!(answer.expect("answer"), id % 2 == 0, "end {id} got its own answer");
            }
        });
        let batches = batches.into_inner().expect("batches");
        assert_eq!(batches.len(), 2, "the four queued ends went in one batch: {batches:?}");
        let mut second = batches[1].clone();
        second.sort_unstable();
        assert_eq!(second, [1, 2, 3, 4]);
    }

    /// A write that panics takes down its own caller only: the other items of its batch go back to the
    /// queue and are written by the next leader.
    #[test]
    fn a_panicking_write_hands_the_rest_of_its_batch_to_the_next_leader() {
        let queue = EndQueue::default();
        let (entered, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let panicked = std::sync::atomic::AtomicBool::new(false);
        let write = |ends: &[Arc<Queued<End, Result<bool>>>]| {
            let ids: Vec<i64> = ends.iter().map(|end| end.item.id).collect();
            if ids == [0] {
                entered.wait();
                release.wait();
            } else if ids.len() > 1 && !panicked.swap(true, Ordering::SeqCst) {
                panic!("the first batch of several fails");
            }
            ids.iter().map(|_| Ok(true)).collect()
        };
        let outcomes: Vec<bool> = std::thread::scope(|scope| {
            let (queue, write) = (&queue, &write);
            let first = scope.spawn(move || queue.commit(end(0), write));
            entered.wait();
            let others: Vec<_> = (1..=4).map(|id| scope.spawn(move || queue.commit(end(id), write))).collect();
            while lock_len(queue) < 4 {
                std::thread::yield_now();
            }
            release.wait();
            assert!(first.join().expect("first").expect("answer"));
            others.into_iter().map(|other| other.join().is_ok()).collect()
        });
        assert_eq!(outcomes.iter().filter(|answered| **answered).count(), 3, "{outcomes:?}");
    }

    fn lock_len(queue: &EndQueue) -> usize {
        queue.state.lock().expect("state").pending.len()
    }
}
