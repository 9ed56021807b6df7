//! What this process's claims pace by, per connector (declared limits and learned ones), cached so a
//! pool with nothing declared or learned costs its claims no statement. Every backend keeps one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::pool::{LearnedLimit, Limit, Limits, Pacing, Source};

/// What this process's claims pace by, per connector: the limits declared by the keyring it synced,
/// and those learned from answers (by any process). The learned ones are read when the keyring is
/// synced, at once after this process learned one, and after a claim's own statement saw that the
/// connector learned something new (the claim returns the connector's latest lesson time): a pool with
/// nothing declared or learned costs its claims no statement, and a lesson reaches every process from
/// its next claim on. The claim that saw it went out under the copy it had; the 429 that taught the
/// lesson locks its scope down for the model for the rest of the provider's window meanwhile.
#[derive(Debug, Default)]
pub(in crate::store) struct Paced {
    state: Mutex<PacedState>,
}

#[derive(Debug, Default)]
struct PacedState {
    declared: HashMap<String, Arc<Limits>>,
    learned: HashMap<String, Vec<LearnedLimit>>,
    /// Each connector's latest lesson time as last read or seen (`learned_limits.learned_at`).
    lessons: HashMap<String, i64>,
    /// The learned limits must be read before the next claim.
    stale: bool,
    /// Declared and learned, per connector with either.
    merged: HashMap<String, Arc<Pacing>>,
}

impl PacedState {
    fn merge(&mut self) {
        let connectors = self.declared.keys().chain(self.learned.keys()).cloned().collect::<Vec<_>>();
        self.merged = connectors
            .into_iter()
            .map(|connector| {
                let pacing = Pacing {
                    declared: self.declared.get(&connector).cloned().unwrap_or_default(),
                    learned: self.learned.get(&connector).cloned().unwrap_or_default(),
                };
                (connector, Arc::new(pacing))
            })
            .collect();
    }
}

/// What one read of the learned limits found: each connector's lessons and latest lesson time.
pub(in crate::store) type Lessons = Vec<(String, LearnedLimit, i64)>;

impl Paced {
    fn state(&self) -> std::sync::MutexGuard<'_, PacedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `connector`'s claims pace by `limits` from now on (`None` or empty: by no declared limit), and
    /// by the limits learned so far, read with `read`.
    pub(in crate::store) fn declare(
        &self,
        connector: &str,
        limits: Option<Arc<Limits>>,
        read: impl FnOnce() -> crate::error::Result<Lessons>,
    ) {
        {
            let mut state = self.state();
            match limits.filter(|limits| !limits.is_empty()) {
                Some(limits) => _ = state.declared.insert(connector.to_owned(), limits),
                None => _ = state.declared.remove(connector),
            }
            state.merge();
            state.stale = true;
        }
        self.read_if_stale(read);
    }

    /// The learned limits are read again before the next claim (this process just learned one).
    pub(in crate::store) fn read_again(&self) {
        self.state().stale = true;
    }

    /// A claim's statement saw `connector`'s latest lesson time: one this process has not read makes
    /// the learned limits be read before the next claim (and the answer true).
    pub(in crate::store) fn seen(&self, connector: &str, lesson: i64) -> bool {
        let mut state = self.state();
        let new = state.lessons.get(connector).copied().unwrap_or(0) != lesson;
        if new {
            state.lessons.insert(connector.to_owned(), lesson);
            state.stale = true;
        }
        new
    }

    /// The limits declared for `connector`, if any.
    pub(in crate::store) fn declared(&self, connector: &str) -> Option<Arc<Limits>> {
        self.state().declared.get(connector).cloned()
    }

    /// Whether `connector`'s claims pace by anything (as last read: no database read here).
    pub(in crate::store) fn paces(&self, connector: &str) -> bool {
        self.state().merged.contains_key(connector)
    }

    /// What `connector`'s claims pace by (`None`: nothing), reading the learned limits with `read`
    /// first when a lesson this process has not read was seen. A failed read keeps the old copy (and
    /// is tried again before the next claim): pacing is a courtesy to the provider, a claim is not
    /// refused for it.
    pub(in crate::store) fn of(
        &self,
        connector: &str,
        read: impl FnOnce() -> crate::error::Result<Lessons>,
    ) -> Option<Arc<Pacing>> {
        self.read_if_stale(read);
        self.state().merged.get(connector).filter(|pacing| !pacing.is_empty()).cloned()
    }

    /// Reads the learned limits with `read` if they are stale, without holding the state's lock
    /// during the read.
    fn read_if_stale(&self, read: impl FnOnce() -> crate::error::Result<Lessons>) {
        {
            let mut state = self.state();
            if !state.stale {
                return;
            }
            // Taken now: a lesson seen during the read marks it stale again.
            state.stale = false;
        }
        match read() {
            Ok(rows) => {
                let mut state = self.state();
                let mut learned: HashMap<String, Vec<LearnedLimit>> = HashMap::new();
                for (connector, limit, lesson) in rows {
                    let latest = state.lessons.entry(connector.clone()).or_insert(lesson);
                    *latest = (*latest).max(lesson);
                    learned.entry(connector).or_default().push(limit);
                }
                state.learned = learned;
                state.merge();
            }
            Err(error) => {
                self.state().stale = true;
                tracing::warn!(error = %error, "could not read the learned limits; using the last ones read");
            }
        }
    }
}

/// A window with no room: the first limit found full, and when it has room again.
#[derive(Debug)]
pub(in crate::store) struct Full {
    pub(in crate::store) limit: Limit,
    pub(in crate::store) source: Source,
    pub(in crate::store) until: i64,
}

impl Full {
    /// The reason of the lockdown that paces `model` until the window has room.
    pub(in crate::store) fn reason(&self, model: &str) -> String {
        match &self.source {
            Source::Declared => format!("paced: {} declared for {model}", self.limit),
            Source::Learned { quota_id, .. } => format!("paced: {} learned from {quota_id} for {model}", self.limit),
        }
    }
}

/// What one reservation is for.
pub(in crate::store) struct Reservation<'a> {
    pub(in crate::store) connector: &'a str,
    pub(in crate::store) scope: &'a str,
    pub(in crate::store) model: &'a str,
    pub(in crate::store) key_name: &'a str,
    pub(in crate::store) lease: i64,
    /// The request's estimated input tokens (see `crate::tokens`).
    pub(in crate::store) tokens: u64,
}
