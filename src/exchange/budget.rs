//! One request's retry budget: how many attempts, backoff retries, Tor circuits and untrusted claims it
//! may spend, and the rule that spends them.
//!
//! Invariant: every retry a request makes was paid for here, so a request ends after a bounded number
//! of attempts whatever the upstream answers.

use std::time::Duration;

use crate::classify::Next;

/// How many times in a row one request may find a freshly claimed lease untrusted before giving up
/// (each time means this process was stopped between claim and send).
pub(super) const MAX_UNTRUSTED_CLAIMS: u32 = 3;

/// The counters of one request's retries, and the rules that spend them.
#[derive(Debug)]
pub(super) struct RetryBudget {
    attempts: u32,
    pub(super) max_attempts: u32,
    pub(super) backoffs: u32,
    pub(super) max_backoffs: u32,
    pub(super) circuits: u32,
    pub(super) untrusted: u32,
}

/// What to do after an answer that was not returned at once.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// Return the answer.
    No,
    /// Try again (on another key if the last one was put aside), after sleeping this long.
    After(Duration),
    /// Try again through a new Tor circuit.
    NewCircuit,
}

impl RetryBudget {
    /// A budget for a pool of `keys` keys and a connector allowing `retries` backoff retries: each key
    /// may be tried a few times (a lockdown may end during a wait), plus the retries.
    pub(super) fn new(keys: usize, retries: u32) -> Self {
        let max_attempts = u32::try_from(keys * 4).unwrap_or(u32::MAX).saturating_add(retries * 2 + 4);
        Self { attempts: 0, max_attempts, backoffs: 0, max_backoffs: retries, circuits: 0, untrusted: 0 }
    }

    /// How many attempts were made.
    pub(super) fn attempts(&self) -> u32 {
        self.attempts
    }

    pub(super) fn attempt(&mut self) {
        self.attempts += 1;
    }

    /// One more lease found untrusted before its send; false once that happened too often.
    pub(super) fn untrusted_claim(&mut self) -> bool {
        self.untrusted += 1;
        self.untrusted <= MAX_UNTRUSTED_CLAIMS
    }

    /// Whether `next` may be followed, spending what it costs; `cap` bounds a backoff.
    pub(super) fn follow(&mut self, next: &Next, via_tor: bool, cap: Duration) -> Retry {
        if self.attempts >= self.max_attempts {
            return Retry::No;
        }
        match *next {
            Next::Return => Retry::No,
            Next::OtherKey => Retry::After(Duration::ZERO),
            Next::Backoff { after } if self.backoffs < self.max_backoffs => {
                self.backoffs += 1;
                // A loading model's estimate is honoured, but never beyond one attempt's timeout.
                Retry::After(after.min(cap))
            }
            Next::NewCircuit if via_tor && self.circuits < self.max_backoffs => {
                self.circuits += 1;
                Retry::NewCircuit
            }
            Next::Backoff { .. } | Next::NewCircuit => Retry::No,
        }
    }

    /// How many backoff retries were made (the escalation of backoff delays).
    pub(super) fn backoffs(&self) -> u32 {
        self.backoffs
    }
}
