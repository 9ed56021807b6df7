//! Retention: the append-only tables (`history`, `requests`) lose their rows older than a cutoff, so
//! a database does not grow for ever. `apijongler db prune --older-than 30d` prunes on demand; every
//! process that uses a keyring prunes past its retention ([`Retention`], `APIJONGLER_RETENTION`, 30
//! days unless set, `forever` to keep everything) when it syncs the keyring and at most once an hour
//! after, once rows are a day ([`SLACK`]) past retention: for at most [`INLINE_BUDGET`] on the
//! caller's thread (a short command exits right after, so a thread of its own would be cut off), the
//! rest on a thread of its own.
//!
//! Invariants:
//! - A prune never holds the write lock for long: it deletes [`BATCH`] rows per write transaction,
//!   oldest first, and pauses between batches at least as long as the last one held the lock, so
//!   claims waiting for the lock get it between two batches (README "Retention" has the measurement).
//! - Only rows older than the cutoff are deleted; the keys, their lockdowns and the reservations that
//!   pacing counts are never touched.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{Backend, Journal};

/// The variable that sets how long history and request rows are kept (`30d`, `12w`, `forever`).
pub const RETENTION_ENV: &str = "APIJONGLER_RETENTION";

/// How long rows are kept when nothing says otherwise: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// Rows deleted per write transaction: a few milliseconds of the write lock on a 2-core machine.
pub const BATCH: u32 = 500;

/// How long a process's automatic prune may take on the thread that triggered it; the rest goes on
/// in the background. Only a process that finds rows past retention pays it.
pub const INLINE_BUDGET: Duration = Duration::from_millis(100);

/// How far past retention rows must be before a process prunes on its own: a pool in steady use
/// always has rows just past the cutoff, and without this slack nearly every short-lived process
/// (one per CLI request) would run a prune. With it, one process a day deletes; the others read.
pub const SLACK: Duration = Duration::from_secs(86_400);

/// Whether `backend` holds rows older than `before` by more than [`SLACK`] (an error reads as none).
pub(crate) fn overdue(backend: &dyn Backend, before: i64) -> bool {
    let slack = i64::try_from(SLACK.as_millis()).unwrap_or(i64::MAX);
    Journal::ALL.into_iter().any(|journal| backend.has_older(journal, before.saturating_sub(slack)).unwrap_or(false))
}

/// The shortest pause between two batches.
const MIN_PAUSE: Duration = Duration::from_millis(2);

const EXPECTED: &str = "a duration like 30d, 12w or 720h, or `forever` to keep every row";

/// How long history and request rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Rows older than this are deleted.
    Keep(Duration),
    /// Nothing is ever deleted automatically.
    Forever,
}

impl Default for Retention {
    fn default() -> Self {
        Self::Keep(DEFAULT_RETENTION)
    }
}

impl Retention {
    /// `forever`, or a positive duration (`30d`, `12w`, `720h`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("forever") {
            return Some(Self::Forever);
        }
        humantime::parse_duration(text).ok().filter(|kept| !kept.is_zero()).map(Self::Keep)
    }

    /// From [`RETENTION_ENV`]; unset or empty: the default (30 days).
    pub fn from_env() -> Result<Self> {
        match std::env::var(RETENTION_ENV) {
            Ok(text) if text.trim().is_empty() => Ok(Self::default()),
            Ok(text) => {
                Self::parse(&text).ok_or(Error::InvalidEnv { variable: RETENTION_ENV, value: text, expected: EXPECTED })
            }
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(value)) => Err(Error::InvalidEnv {
                variable: RETENTION_ENV,
                value: value.to_string_lossy().into_owned(),
                expected: EXPECTED,
            }),
        }
    }

    /// The cutoff at `now` (unix ms): rows before it go. `None`: keep everything.
    pub fn cutoff(self, now: i64) -> Option<i64> {
        match self {
            Self::Keep(kept) => Some(now.saturating_sub(i64::try_from(kept.as_millis()).unwrap_or(i64::MAX))),
            Self::Forever => None,
        }
    }
}

/// What a prune deleted, and how long its longest write held the lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Whether every row past the cutoff is gone (false: the time budget ran out first).
    pub done: bool,
    /// History rows deleted.
    pub history: u64,
    /// Request rows deleted.
    pub requests: u64,
    /// Write transactions it took.
    pub batches: u64,
    /// The longest any of them held the write lock, ms (the longest a claim could wait on the prune).
    pub longest_batch_ms: u64,
}

/// Deletes every history and request row older than `before` (unix ms), [`BATCH`] at a time, pausing
/// between batches (see the module's invariants); with a `budget`, stops once that much time passed
/// (then `done` is false).
pub(crate) fn prune(backend: &dyn Backend, before: i64, budget: Option<Duration>) -> Result<Pruned> {
    let began = Instant::now();
    let mut pruned = Pruned { done: true, ..Pruned::default() };
    for journal in Journal::ALL {
        if !backend.has_older(journal, before)? {
            continue;
        }
        loop {
            let (deleted, held) = backend.prune_batch(journal, before, BATCH)?;
            pruned.batches += 1;
            pruned.longest_batch_ms = pruned.longest_batch_ms.max(u64::try_from(held.as_millis()).unwrap_or(u64::MAX));
            match journal {
                Journal::History => pruned.history += deleted,
                Journal::Requests => pruned.requests += deleted,
            }
            if deleted < u64::from(BATCH) {
                break;
            }
            if budget.is_some_and(|budget| began.elapsed() >= budget) {
                pruned.done = false;
                return Ok(pruned);
            }
            // SQLite's lock is not fair: without a pause the next batch could take the lock again
            // before a waiting claim's busy handler wakes.
            std::thread::sleep(held.max(MIN_PAUSE));
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        assert_eq!(Retention::parse("30d"), Some(Retention::Keep(Duration::from_secs(30 * 86_400))));
        assert_eq!(Retention::parse(" Forever "), Some(Retention::Forever));
        assert_eq!(Retention::parse("0"), None, "zero would delete every row: say forever or a duration");
        assert_eq!(Retention::parse("soon"), None);
        assert_eq!(Retention::default().cutoff(DEFAULT_RETENTION.as_millis() as i64 + 5), Some(5));
        assert_eq!(Retention::Forever.cutoff(5), None);
    }
}
