//! Group commit of lease ends: the ends that threads of one process ask for while another end is being
//! written go into the next transaction together, so that under load a write lock serves many
//! releases instead of one.
//!
//! Invariants: an end is written exactly once, by whichever caller leads when it is taken from the
//! queue; every caller gets the answer for its own end; a caller alone writes its end at once (no
//! waiting for company), so a lone release costs what it cost before.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::{Attempt, Fate};
use crate::error::Result;

/// One lease to end, and where its answer goes.
#[derive(Debug)]
pub(super) struct End {
    pub(super) id: i64,
    pub(super) lease: i64,
    pub(super) fate: Fate,
    pub(super) attempt: Option<Attempt>,
    pub(super) now: i64,
    answer: Mutex<Option<Result<bool>>>,
}

impl End {
    pub(super) fn new(id: i64, lease: i64, fate: &Fate, attempt: Option<&Attempt>, now: i64) -> Arc<Self> {
        Arc::new(Self { id, lease, fate: fate.clone(), attempt: attempt.cloned(), now, answer: Mutex::new(None) })
    }
}

/// The ends not yet written, and whether a caller is writing a batch.
#[derive(Debug, Default)]
pub(super) struct EndQueue {
    state: Mutex<State>,
    written: Condvar,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Arc<End>>,
    leading: bool,
}

impl EndQueue {
    /// Queues `end` and returns its answer: written by this caller (with every end queued meanwhile)
    /// when nobody is writing, else by the caller who is, in its next batch.
    pub(super) fn commit(&self, end: Arc<End>, write: impl Fn(&[Arc<End>]) -> Vec<Result<bool>>) -> Result<bool> {
        let lock = || self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = lock();
        state.pending.push(Arc::clone(&end));
        loop {
            if let Some(answer) = end.answer.lock().unwrap_or_else(PoisonError::into_inner).take() {
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
                    for (end, answer) in batch.iter().zip(answers) {
                        *end.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
                    }
                }
                Err(panic) => {
                    // The others' ends go back to the queue for the next leader.
                    state.pending.extend(batch.into_iter().filter(|queued| !Arc::ptr_eq(queued, &end)));
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

    fn end(id: i64) -> Arc<End> {
        End::new(id, 1, &Fate::Release { success: true }, None, 0)
    }

    #[test]
    fn a_lone_end_is_written_at_once_by_its_caller() {
        let queue = EndQueue::default();
        let batches = AtomicUsize::new(0);
        let answer = queue.commit(end(7), |ends| {
            batches.fetch_add(1, Ordering::SeqCst);
            ends.iter().map(|end| Ok(end.id == 7)).collect()
        });
        assert!(answer.expect("written"));
        assert_eq!(batches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn ends_asked_for_during_a_write_go_together_and_each_gets_its_own_answer() {
        let queue = EndQueue::default();
        let batches = Mutex::new(Vec::new());
        let (entered, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let write = |ends: &[Arc<End>]| {
            let ids: Vec<i64> = ends.iter().map(|end| end.id).collect();
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

    fn lock_len(queue: &EndQueue) -> usize {
        queue.state.lock().expect("state").pending.len()
    }
}
